//! Delivery status notifications (DSNs): the bounces, delay warnings, success and relay notices
//! that the queue manager sends to the envelope sender of a message.
//!
//! A notice is an RFC 6522 `multipart/report; report-type=delivery-status` message in three
//! parts: a text/plain explanation for people, a `message/delivery-status` part (RFC 3464) for
//! programs, and the original message or its header. [`Report::build`] turns the facts the
//! queue knows into the complete message, ready to be queued. Nothing here reads a clock,
//! generates randomness or does I/O: the date and the unique part of the Message-ID come in
//! with the [`Report`], so a notice is a pure function of its inputs.
//!
//! # Sending a notice
//!
//! The caller queues [`Notification::message`] with this envelope (RFC 3461 section 6.1):
//!
//! > The DSN sender address (in the SMTP MAIL command) MUST be a null reverse-path ("<>"), as
//! > required by section 5.3.3 of \[11\].  The DSN recipient address (in the RCPT command) is
//! > copied from the MAIL command which accompanied the message for which the DSN is being
//! > issued.  When transmitting a DSN via SMTP, the RET parameter MUST NOT be used.  The NOTIFY
//! > parameter MAY be used, but its value MUST be NEVER.
//!
//! So: `MAIL FROM:<>` with `BODY=` from [`Notification::body`] and `SMTPUTF8` when
//! [`Notification::smtputf8`] says so, `RCPT TO:<original sender>`, no RET, and NOTIFY=NEVER
//! if anything. The null reverse-path is also what stops loops: [`should_notify`] never
//! allows a notice about a message whose sender is null, so a notice that cannot be delivered
//! never produces another one.
//!
//! # Deciding whether to send one
//!
//! [`should_notify`] applies the NOTIFY rules of RFC 3461 to one recipient; the queue manager
//! reports together the recipients of one message that need a notice of the same kind
//! (RFC 3461 section 5.2.8: a DSN "SHOULD NOT contain information for recipients for whom
//! DSNs would not otherwise have been issued"). [`is_notification`] recognises reports and
//! automatic replies that other systems sent with a real reverse-path.

mod build;
mod field;
mod policy;

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

pub use policy::{is_notification, should_notify};
pub use smtp_proto::{BodyType, EnhancedStatus, Notify, OriginalRecipient, Ret};

/// What Postfix returns at most by default (`bounce_size_limit`): big enough for nearly every
/// text message, small enough that a flood of bounces cannot carry much.
pub const DEFAULT_RETURN_SIZE_LIMIT: usize = 50_000;

/// The kind of notice, which decides its subject, its explanation, whether the whole
/// original message may be returned, and which NOTIFY keyword asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Delivery failed for good (a bounce). Asked for by NOTIFY=FAILURE, and sent when NOTIFY
    /// was not given.
    Failure,
    /// Delivery has not succeeded yet and is still being retried. NOTIFY=DELAY.
    Delay,
    /// Delivered to the final destination (including an alias that was expanded).
    /// NOTIFY=SUCCESS.
    Success,
    /// Passed on to a system that will not report success (RFC 3461 section 5.2.2).
    /// NOTIFY=SUCCESS.
    Relayed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Failure => "failure",
            Kind::Delay => "delay",
            Kind::Success => "success",
            Kind::Relayed => "relayed",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `Action` field of one recipient (RFC 3464 section 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Given up: no further attempts. Status class 4 or 5.
    Failed,
    /// Not delivered yet, still being retried. Status class 4.
    Delayed,
    /// Delivered to the recipient's mailbox (or a mailing list exploder). Status class 2.
    Delivered,
    /// Passed on to a system that does not report success. Status class 2.
    Relayed,
    /// Delivered to an alias with several members and forwarded to them (RFC 3461 section
    /// 5.2.7.3 (c)). Status class 2.
    Expanded,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }

    /// The kind of notice that reports this action, for [`should_notify`].
    pub fn kind(self) -> Kind {
        match self {
            Action::Failed => Kind::Failure,
            Action::Delayed => Kind::Delay,
            Action::Delivered | Action::Expanded => Kind::Success,
            Action::Relayed => Kind::Relayed,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a notice says, except the original message content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Our fully qualified host name (ASCII): the `Reporting-MTA`, the domain of the From
    /// address (`MAILER-DAEMON@host`) and of the Message-ID.
    pub reporting_mta: String,
    /// When the notice is made: its `Date` field.
    pub date: SystemTime,
    /// The part of the Message-ID before the `@`, unique for every notice this host sends
    /// (for example the queue id of the notice). A dot-atom: letters, digits, `.` and the
    /// other `atext` characters of RFC 5322.
    pub message_id: String,
    /// A failure notice returns the whole original message only up to this many octets;
    /// above it, only the header. A header above it is not returned either.
    pub return_size_limit: usize,
    pub original: OriginalEnvelope,
    /// The recipients this notice reports on, in the order they are listed. At least one.
    pub recipients: Vec<RecipientReport>,
}

/// What the server knew about the original message when it accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalEnvelope {
    /// The reverse-path of the original message, in wire form without brackets: the
    /// recipient of the notice. Never empty (a null sender gets no notice).
    pub sender: String,
    /// The xtext-decoded `ENVID` (RFC 3461 section 4.4), copied to `Original-Envelope-Id`.
    pub envid: Option<String>,
    /// The `RET` parameter (RFC 3461 section 4.3).
    pub ret: Option<Ret>,
    /// The message came with `SMTPUTF8` (RFC 6531): the notice uses the RFC 6533 types.
    pub smtputf8: bool,
    /// When the message arrived here: `Arrival-Date`.
    pub arrival_date: SystemTime,
    /// The SMTP client the message came from, for `Received-From-MTA`; `None` for mail
    /// submitted locally.
    pub received_from: Option<ReceivedFrom>,
}

/// The client that handed us the original message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrom {
    /// The name the client gave in EHLO or HELO.
    pub helo: String,
    pub ip: IpAddr,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient address from the envelope, in wire form without brackets:
    /// `Final-Recipient`.
    pub final_recipient: String,
    /// The `ORCPT` parameter, when the client gave one: `Original-Recipient`. RFC 3461
    /// section 6.3 (d): "If no ORCPT parameter was provided for this recipient, the
    /// Original-Recipient field MUST NOT appear."
    pub original_recipient: Option<OriginalRecipient>,
    pub action: Action,
    /// The RFC 3463 status code; its class must fit the action (2 for delivered, relayed and
    /// expanded, 4 for delayed, 4 or 5 for failed).
    pub status: EnhancedStatus,
    /// The host name of the server that gave the diagnostic. RFC 3461 section 6.3 (h): when
    /// the message was relayed by SMTP, "the Remote-MTA field MUST be supplied".
    pub remote_mta: Option<String>,
    pub diagnostic: Option<Diagnostic>,
    /// When delivery to this recipient was last tried.
    pub last_attempt: Option<SystemTime>,
    /// Only for [`Action::Delayed`]: when we will give up (RFC 3464 section 2.3.9: "MUST NOT
    /// appear in other DSNs").
    pub will_retry_until: Option<SystemTime>,
}

impl RecipientReport {
    /// A report with only the required facts; set the optional fields as known.
    pub fn new(final_recipient: impl Into<String>, action: Action, status: EnhancedStatus) -> Self {
        RecipientReport {
            final_recipient: final_recipient.into(),
            original_recipient: None,
            action,
            status,
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        }
    }
}

/// The `Diagnostic-Code` of one recipient (RFC 3464 section 2.3.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    /// The reply of an SMTP server, code and text as received, e.g.
    /// `550 5.1.1 No such user`; lines of a multi-line reply separated by `\n` (or CRLF).
    /// Written with the `smtp` diagnostic type (RFC 3461 section 9.2).
    Smtp(String),
    /// A reason found by this server itself (a local delivery error, say), written with the
    /// private `X-Postilion` diagnostic type.
    Local(String),
}

/// Which part of the original message a notice returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Returned {
    /// The whole message (`message/rfc822` or `message/global`).
    Full,
    /// Only its header section (`text/rfc822-headers` or `message/global-headers`).
    Headers,
    /// Nothing: the header was too large or could not be carried unchanged. The notice then
    /// has two parts, which RFC 6522 allows.
    Nothing,
}

/// A notice, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The complete message: CRLF line endings, no line longer than 998 octets.
    pub message: Vec<u8>,
    pub kind: Kind,
    /// The `BODY=` to send it with. [`BodyType::EightBitMime`] when a part is declared
    /// `8bit`: an original message with 8-bit content returned in full, or any RFC 6533
    /// notice. Such a notice can only go to a server that offers 8BITMIME.
    pub body: BodyType,
    /// Send it with `SMTPUTF8`: it uses the RFC 6533 types, whose header fields may be UTF-8.
    /// RFC 6533 section 4.5 asks for a 7-bit re-encoding of the returned parts when the next
    /// server lacks SMTPUTF8; this crate does not produce one.
    pub smtputf8: bool,
    pub returned: Returned,
}

/// Why a notice could not be built. Each is a mistake of the caller, not of the remote side:
/// values that come from outside (addresses, replies) are cleaned, never refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsnError {
    /// RFC 3461 section 5.2: "A DSN MUST NOT be returned to the sender for any message for
    /// which the return address from the SMTP MAIL command was NULL ("<>")".
    NullSender,
    NoRecipients,
    /// The reporting MTA name cannot be used in the From address and Message-ID.
    InvalidHostName(String),
    /// The unique part of the Message-ID is not a dot-atom.
    InvalidMessageId(String),
    /// A recipient's facts contradict each other.
    InvalidRecipient {
        recipient: String,
        reason: String,
    },
}

impl fmt::Display for DsnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DsnError::NullSender => {
                f.write_str("no delivery status notification for a message with a null sender")
            }
            DsnError::NoRecipients => {
                f.write_str("a delivery status notification needs at least one recipient")
            }
            DsnError::InvalidHostName(name) => {
                write!(f, "reporting MTA name {name:?} is not a usable host name")
            }
            DsnError::InvalidMessageId(id) => {
                write!(f, "Message-ID part {id:?} is not a dot-atom")
            }
            DsnError::InvalidRecipient { recipient, reason } => {
                write!(f, "recipient {recipient:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for DsnError {}

impl Report {
    /// Builds the notice. `content` is the original message as stored, byte for byte.
    pub fn build(&self, content: &[u8]) -> Result<Notification, DsnError> {
        build::build(self, content)
    }
}

#[cfg(test)]
mod tests;
