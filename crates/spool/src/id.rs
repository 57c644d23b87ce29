//! Queue ids: unique, sortable by arrival, short enough for log lines and Received fields.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A queue id: `(unix_millis << 20) | sequence`, so ids sort by arrival time. Generated ids
/// stay below 2^63 (they fit SQLite's signed INTEGER PRIMARY KEY) until the year 2248.
///
/// Displayed as 13 characters of Crockford base32; the alphabet is in ASCII order, so the
/// strings sort like the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u64);

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// 13 digits of 5 bits hold 65 bits; the first digit carries only the top 4.
const DIGITS: usize = 13;
const SEQUENCE_BITS: u32 = 20;

impl QueueId {
    /// A new id, greater than every id this process generated before, from any thread. If
    /// the clock steps back, or more than 2^20 ids are taken in one millisecond, the ids run
    /// ahead of the clock rather than repeat or go backwards.
    pub fn generate() -> QueueId {
        static LAST: AtomicU64 = AtomicU64::new(0);
        // A clock before 1970 is broken; 0 still yields increasing ids. (u128 milliseconds
        // overflow u64 only after 500 million years.)
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let floor = (millis as u64) << SEQUENCE_BITS;
        let next = |last: u64| floor.max(last + 1);
        // The closure never returns None, so both arms carry the previous value.
        let previous = match LAST
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next(last)))
        {
            Ok(previous) | Err(previous) => previous,
        };
        QueueId(next(previous))
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; DIGITS];
        for (i, digit) in text.iter_mut().enumerate() {
            let shift = 5 * (DIGITS - 1 - i);
            *digit = ALPHABET[((self.0 >> shift) & 31) as usize];
        }
        // Every byte comes from the ASCII alphabet.
        text.iter().try_for_each(|&b| fmt::Write::write_char(f, char::from(b)))
    }
}

/// The text is not a queue id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a queue id (13 characters of Crockford base32)")]
pub struct ParseQueueIdError(String);

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    /// Parses the [`Display`](fmt::Display) form, in either case.
    fn from_str(text: &str) -> Result<QueueId, ParseQueueIdError> {
        let invalid = || ParseQueueIdError(text.to_string());
        if text.len() != DIGITS {
            return Err(invalid());
        }
        let mut value: u64 = 0;
        for (i, c) in text.bytes().enumerate() {
            let c = c.to_ascii_uppercase();
            let digit = ALPHABET.iter().position(|&a| a == c).ok_or_else(invalid)? as u64;
            if i == 0 && digit > 15 {
                // Would need a 65th bit.
                return Err(invalid());
            }
            value = (value << 5) | digit;
        }
        Ok(QueueId(value))
    }
}
