//! The journal: new mail, appended to files, until it is delivered or needs a second try.
//!
//! Most mail is delivered at its first attempt, seconds after it arrived. Storing such a
//! message in SQLite cost a row insert, an index update, a removal and, at the next checkpoint,
//! the same pages written a second time, for a message the database never serves a query
//! about. The journal stores it with one append instead: the writer encodes every message of
//! a batch into one record, writes it with one `pwrite`, and the sync thread syncs the file
//! (`fdatasync`) before any of its senders is answered. A delivered message is removed by a
//! removal record appended the same way (not synced: a lost removal repeats a delivery, as for
//! the database's records). A message that stays, because a recipient was deferred or an
//! outcome was recorded without removing it, moves into SQLite (the move commits there with
//! the outcome) and its journal entry is dead from then on.
//!
//! # Files
//!
//! `journal/<slot>` (16 hex digits), each starting with a 64-octet header: magic, state
//! (active or free), a sequence number that grows with every file activated, and a random
//! 64-bit nonce chosen when the file was activated. Records follow: payload length (u64), CRC-32
//! of the nonce and the payload (u32), the payload. Integers are little-endian.
//!
//! A file is written until it passes [`Limits::file_size`], then synced, and the next one is
//! activated: a free file is reused (overwriting old data is cheaper to sync than growing a
//! file), else a new one is created and synced with its directory.
//!
//! # Recovery
//!
//! Active files are replayed in sequence order, each up to its first record that is short,
//! fails its checksum or is empty: the tail a crash tore, or stale data from a previous use
//! of the file. The nonce is in every checksum, so neither old records of a reused file nor
//! message content that imitates a record (a message is attacker-controlled data, and a failed
//! write can leave part of one where the next record does not overwrite it) pass the check
//! unless the nonce is guessed. A message stored and not removed is in the queue, unless
//! SQLite has it (it moved there).
//!
//! # Reclaiming files
//!
//! A removal record can be in a later file than its message, so files are reclaimed in order:
//! the oldest file goes once none of its messages is left in the journal, after the database's
//! log is synced (so that a move cannot be lost to a power failure once the message's entry is
//! gone; a removal record lost with a later file is harmless once its message's file is
//! freed). Reclaiming rewrites the header as free and syncs it; from then on recovery ignores
//! the file. A message that moved to SQLite and is later removed there, while its journal file
//! still exists, leaves a row in SQLite's `journal_removed` table, written in the removal's
//! transaction, or recovery would find it in the journal and not in SQLite, and bring it back;
//! the rows go once the file is reclaimed. One message waiting long would keep every later
//! file: when there are more than [`Limits::max_files`] and the oldest is
//! [`Limits::move_after`] old, the messages left in it move to SQLite.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::error::Context;
use crate::sqlite::{create_private_dir, sync_dir};
use crate::writer::{Counters, sync_file};
use crate::{NewMessage, QueueId, QueuedMessage, SpoolError, db};

/// The journal's directory, in the spool directory.
pub(crate) const DIR: &str = "journal";
/// How large the journal's files grow, and how many there may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A file is synced and the next one activated once this much is written to it.
    pub(crate) file_size: u64,
    /// Files the journal may have before the messages left in the oldest are moved into
    /// SQLite, once that file is [`Limits::move_after`] old.
    pub(crate) max_files: usize,
    /// How old the oldest file must be before its messages move. A burst of mail fills many
    /// files that are delivered and reclaimed within seconds: moving their messages would
    /// only write them again.
    pub(crate) move_after: Duration,
}

impl Default for Limits {
    /// 8 files of 16 MiB: a message that waits long keeps at most 128 MiB of journal, and
    /// whatever arrives in a minute.
    fn default() -> Limits {
        Limits { file_size: 16 << 20, max_files: 8, move_after: Duration::from_secs(60) }
    }
}

/// Free files kept for reuse; more are deleted.
const SPARE_FILES: usize = 4;
const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"PSTLJRNL";
const VERSION: u32 = 1;
const STATE_ACTIVE: u32 = 1;
const STATE_FREE: u32 = 2;
/// Payload length (u64) and checksum (u32).
const RECORD_HEADER_LEN: usize = 12;

/// A file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    active: bool,
    sequence: u64,
    nonce: u64,
}

impl Header {
    fn encode(self) -> [u8; HEADER_LEN as usize] {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let state = if self.active { STATE_ACTIVE } else { STATE_FREE };
        header[12..16].copy_from_slice(&state.to_le_bytes());
        header[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        header[24..32].copy_from_slice(&self.nonce.to_le_bytes());
        let checksum = crc32fast::hash(&header[..32]);
        header[32..36].copy_from_slice(&checksum.to_le_bytes());
        header
    }

    /// `None` for anything but an intact header of this version: a file created but never
    /// written, say.
    fn decode(header: &[u8]) -> Option<Header> {
        let header = header.get(..HEADER_LEN as usize)?;
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let long = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        if &header[..8] != MAGIC || word(8) != VERSION || word(32) != crc32fast::hash(&header[..32])
        {
            return None;
        }
        let active = match word(12) {
            STATE_ACTIVE => true,
            STATE_FREE => false,
            _ => return None,
        };
        Some(Header { active, sequence: long(16), nonce: long(24) })
    }
}

fn checksum(nonce: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&nonce.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes one record (a batch's new messages and removals) into `out`, returning where each
/// message's entry is, relative to the start of the record.
///
/// Payload: the number of messages (u32), each message's entry, the number of removals (u32)
/// and the removed ids (u64 each). An entry: id (u64), time of receipt in Unix milliseconds
/// (u64), envelope (u32 length, JSON), recipients (u32 length, JSON, all pending), content
/// (u64 length, octets).
fn encode_record(
    nonce: u64,
    messages: &[EncodedMessage<'_>],
    removals: &[QueueId],
    out: &mut Vec<u8>,
) -> Vec<EntryPlace> {
    out.clear();
    out.extend_from_slice(&[0; RECORD_HEADER_LEN]);
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    let mut places = Vec::with_capacity(messages.len());
    for message in messages {
        let start = out.len() as u64;
        out.extend_from_slice(&message.message.id.0.to_le_bytes());
        let received = db::sql_millis(message.message.envelope.received_at) as u64;
        out.extend_from_slice(&received.to_le_bytes());
        for text in [&message.envelope, &message.recipients] {
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        let content = message.message.content.as_slice();
        out.extend_from_slice(&(content.len() as u64).to_le_bytes());
        let content_at = out.len() as u64;
        out.extend_from_slice(content);
        places.push(EntryPlace { entry: start, content: content_at, length: content.len() as u64 });
    }
    out.extend_from_slice(&(removals.len() as u32).to_le_bytes());
    for id in removals {
        out.extend_from_slice(&id.0.to_le_bytes());
    }
    let payload_len = (out.len() - RECORD_HEADER_LEN) as u64;
    let sum = checksum(nonce, &out[RECORD_HEADER_LEN..]);
    out[..8].copy_from_slice(&payload_len.to_le_bytes());
    out[8..12].copy_from_slice(&sum.to_le_bytes());
    places
}

/// A message to append, with the parts of it that are stored as text, encoded beforehand so
/// that an encoding error fails only its own request.
pub(crate) struct EncodedMessage<'a> {
    message: &'a NewMessage,
    envelope: String,
    recipients: String,
}

impl<'a> EncodedMessage<'a> {
    /// Only a message whose recipients are all pending goes into the journal.
    pub(crate) fn new(message: &'a NewMessage) -> Result<EncodedMessage<'a>, SpoolError> {
        Ok(EncodedMessage {
            message,
            envelope: db::encode_envelope(message)?,
            recipients: db::encode_inline(message)?,
        })
    }
}

/// Where an entry is in its record (or, once written, in its file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryPlace {
    entry: u64,
    content: u64,
    length: u64,
}

/// Reads a payload front to back, failing on data that ends early.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SpoolError> {
        let end =
            self.at.checked_add(n).filter(|end| *end <= self.data.len()).ok_or_else(|| {
                SpoolError::Corrupt(format!(
                    "a journal entry ends early, at {} octets",
                    self.data.len()
                ))
            })?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, SpoolError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, SpoolError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn text(&mut self) -> Result<&'a str, SpoolError> {
        let length = self.u32()? as usize;
        std::str::from_utf8(self.take(length)?)
            .map_err(|_| SpoolError::Corrupt("a journal entry with text that is not UTF-8".into()))
    }
}

/// An entry's envelope and recipients, and where its content is relative to the entry's start.
fn decode_entry(cursor: &mut Cursor<'_>) -> Result<(QueuedMessage, EntryPlace), SpoolError> {
    let start = cursor.at as u64;
    let id = QueueId(cursor.u64()?);
    let received_at = db::from_sql_millis(i64::try_from(cursor.u64()?).unwrap_or(0));
    let envelope = db::decode_envelope(id, cursor.text()?, received_at)?;
    let recipients = db::decode_inline(id, cursor.text()?)?;
    let length = cursor.u64()?;
    let content = cursor.at as u64;
    let skip = usize::try_from(length)
        .map_err(|_| SpoolError::Corrupt(format!("message {id}: content of {length} octets")))?;
    cursor.take(skip)?;
    let message = QueuedMessage { id, envelope, recipients, size: length };
    Ok((message, EntryPlace { entry: start, content, length }))
}

/// A message in the journal, as the readers and the writer find it.
#[derive(Clone)]
struct Resident {
    sequence: u64,
    file: Arc<File>,
    place: EntryPlace,
    /// Moved into SQLite, which has it from now on; the entry stays known until its file is
    /// reclaimed, so that a removal from SQLite can be recorded here too.
    moved: bool,
}

/// The messages in the journal; shared between the writer and the readers.
#[derive(Default)]
pub(crate) struct Index {
    residents: HashMap<QueueId, Resident>,
}

pub(crate) type SharedIndex = Arc<Mutex<Index>>;

fn lock(index: &SharedIndex) -> std::sync::MutexGuard<'_, Index> {
    // Every change under the lock is a single insert or removal: a panic cannot leave it
    // half-made.
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a message stands, for the writer's routing of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Residence {
    /// In the journal only.
    Journal,
    /// Moved to SQLite; its journal file still exists.
    Moved,
    /// Not in the journal: in SQLite or nowhere.
    Elsewhere,
}

/// Reads from the journal for the readers; `None` when SQLite has the message, or nobody.
pub(crate) fn load_content(
    index: &SharedIndex,
    id: QueueId,
) -> Option<Result<Vec<u8>, SpoolError>> {
    // The file handle keeps the file from being reused while it is read (see
    // `Journal::activate`), so the read needs no lock.
    let resident = lock(index).residents.get(&id).filter(|resident| !resident.moved).cloned()?;
    Some(read_content(&resident, id))
}

fn read_content(resident: &Resident, id: QueueId) -> Result<Vec<u8>, SpoolError> {
    read_at(resident, resident.place.content, resident.place.length, id)
}

/// `length` octets at `offset` of a resident's file.
fn read_at(
    resident: &Resident,
    offset: u64,
    length: u64,
    id: QueueId,
) -> Result<Vec<u8>, SpoolError> {
    let length = usize::try_from(length).map_err(|_| {
        SpoolError::Corrupt(format!("message {id}: {length} octets in the journal"))
    })?;
    let mut data = vec![0; length];
    resident
        .file
        .read_exact_at(&mut data, offset)
        .context(|| format!("reading message {id} from the journal"))?;
    Ok(data)
}

/// Every message in the journal only, oldest first, without content.
pub(crate) fn list(index: &SharedIndex) -> Result<Vec<QueuedMessage>, SpoolError> {
    let mut residents: Vec<(QueueId, Resident)> = lock(index)
        .residents
        .iter()
        .filter(|(_, resident)| !resident.moved)
        .map(|(id, resident)| (*id, resident.clone()))
        .collect();
    residents.sort_unstable_by_key(|(id, _)| *id);
    residents.iter().map(|(id, resident)| read_entry(resident, *id)).collect()
}

/// An entry's envelope and recipients, read from its file.
fn read_entry(resident: &Resident, id: QueueId) -> Result<QueuedMessage, SpoolError> {
    // The entry up to its content, and the content's length field before it.
    let place = resident.place;
    let mut entry = read_at(resident, place.entry, place.content - place.entry, id)?;
    // decode_entry wants the content too; skip it by faking a zero length.
    let cut = entry.len() - 8;
    entry[cut..].copy_from_slice(&0u64.to_le_bytes());
    let (mut message, _) = decode_entry(&mut Cursor { data: &entry, at: 0 })?;
    if message.id != id {
        return Err(SpoolError::Corrupt(format!("the journal entry of {id} holds {}", message.id)));
    }
    message.size = resident.place.length;
    Ok(message)
}

/// A file holding records: the current one (the last) or an older one with messages left.
struct ActiveFile {
    slot: u64,
    sequence: u64,
    nonce: u64,
    file: Arc<File>,
    /// Its messages still in the journal only.
    live: usize,
    /// When it was activated (or, after a restart, replayed).
    since: Instant,
}

/// The writer's side of the journal.
pub(crate) struct Journal {
    dir: PathBuf,
    limits: Limits,
    index: SharedIndex,
    /// Oldest first; the last is the one appended to.
    files: VecDeque<ActiveFile>,
    /// Free files ready for reuse, with their slots.
    spare: Vec<(u64, Arc<File>)>,
    next_slot: u64,
    next_sequence: u64,
    /// Where the next record goes in the current file.
    offset: u64,
    /// Records were appended to the current file that no sync has been asked for yet.
    unsynced: bool,
    buffer: Vec<u8>,
    counters: Arc<Counters>,
}

impl Journal {
    /// Opens the journal in `spool_dir`, replays it, and activates a file to append to.
    /// `in_database` says whether SQLite has a message (it moved there).
    pub(crate) fn open(
        spool_dir: &Path,
        limits: Limits,
        counters: Arc<Counters>,
        in_database: &mut dyn FnMut(QueueId) -> Result<bool, SpoolError>,
    ) -> Result<Journal, SpoolError> {
        let dir = spool_dir.join(DIR);
        create_private_dir(&dir)?;
        let mut journal = Journal {
            dir,
            limits,
            index: SharedIndex::default(),
            files: VecDeque::new(),
            spare: Vec::new(),
            next_slot: 0,
            next_sequence: 1,
            offset: HEADER_LEN,
            unsynced: false,
            buffer: Vec::new(),
            counters,
        };
        let mut active = Vec::new();
        let listing =
            fs::read_dir(&journal.dir).context(|| format!("listing {}", journal.dir.display()))?;
        for entry in listing {
            let entry = entry.context(|| format!("listing {}", journal.dir.display()))?;
            let Some(slot) = slot_number(&entry.file_name()) else { continue };
            journal.next_slot = journal.next_slot.max(slot + 1);
            let path = entry.path();
            let file = open_file(&path, false)?;
            match read_header(&file, &path)? {
                Some(header) => {
                    journal.next_sequence = journal.next_sequence.max(header.sequence + 1);
                    match header.active {
                        true => active.push((header, slot, file)),
                        false => journal.spare.push((slot, Arc::new(file))),
                    }
                }
                // Created and never activated (a crash at the wrong moment): free.
                None => journal.spare.push((slot, Arc::new(file))),
            }
        }
        // A free header written by a killed process may be in the page cache only. It must
        // reach the disk before the later files, which hold the removals of that file's
        // messages, are reclaimed and reused: else a power failure would bring them back.
        for (slot, file) in &journal.spare {
            file.sync_data().context(|| format!("syncing journal file {slot:016x}"))?;
        }
        active.sort_unstable_by_key(|(header, ..)| header.sequence);
        let mut residents: HashMap<QueueId, Resident> = HashMap::new();
        for (header, slot, file) in active {
            let file = Arc::new(file);
            // Removals from a killed process may be in the page cache only: make them durable
            // before a reclaim relies on them.
            file.sync_data().context(|| format!("syncing journal file {slot:016x}"))?;
            replay(&file, header, &mut residents).map_err(|error| match error {
                SpoolError::Corrupt(what) => {
                    SpoolError::Corrupt(format!("journal file {slot:016x}: {what}"))
                }
                error => error,
            })?;
            journal.files.push_back(ActiveFile {
                slot,
                sequence: header.sequence,
                nonce: header.nonce,
                file,
                live: 0,
                since: Instant::now(),
            });
        }
        for (id, resident) in &mut residents {
            resident.moved = in_database(*id)?;
            if !resident.moved {
                journal.file_mut(resident.sequence).live += 1;
            }
        }
        lock(&journal.index).residents = residents;
        journal.activate()?;
        // SQLite's log was synced when the spool opened, and the files just above.
        journal.reclaim_synced();
        Ok(journal)
    }

    pub(crate) fn index(&self) -> SharedIndex {
        self.index.clone()
    }

    pub(crate) fn residence(&self, id: QueueId) -> Residence {
        match lock(&self.index).residents.get(&id) {
            None => Residence::Elsewhere,
            Some(resident) if resident.moved => Residence::Moved,
            Some(_) => Residence::Journal,
        }
    }

    /// A message in the journal with its content, to move into SQLite.
    pub(crate) fn read(&self, id: QueueId) -> Result<(QueuedMessage, Vec<u8>), SpoolError> {
        let resident =
            lock(&self.index).residents.get(&id).cloned().ok_or(SpoolError::NotFound(id))?;
        Ok((read_entry(&resident, id)?, read_content(&resident, id)?))
    }

    /// Appends one record with `messages` and the removals of `removals` (messages in the
    /// journal only). Returns the file written, which must be synced before anyone is told a
    /// message is stored. On failure nothing is known to be written, and nothing changes.
    pub(crate) fn append(
        &mut self,
        messages: &[EncodedMessage<'_>],
        removals: &[QueueId],
    ) -> Result<Arc<File>, SpoolError> {
        if self.offset >= self.limits.file_size
            && let Err(error) = self.next_file()
        {
            // The current file grows instead; the next append tries again.
            warn!(%error, "cannot start a new journal file");
        }
        let current = self.files.back().expect("a current journal file");
        let places = encode_record(current.nonce, messages, removals, &mut self.buffer);
        let file = current.file.clone();
        let sequence = current.sequence;
        let offset = self.offset;
        // A failed write may leave part of the record behind; the next record overwrites it
        // from the same offset, and what it does not overwrite fails its checksum.
        file.write_all_at(&self.buffer, offset)
            .context(|| format!("appending {} octets to the journal", self.buffer.len()))?;
        self.offset += self.buffer.len() as u64;
        self.unsynced = true;
        let mut index = lock(&self.index);
        let mut live = 0;
        for (message, place) in messages.iter().zip(places) {
            let place = EntryPlace {
                entry: offset + place.entry,
                content: offset + place.content,
                length: place.length,
            };
            let resident = Resident { sequence, file: file.clone(), place, moved: false };
            index.residents.insert(message.message.id, resident);
            live += 1;
        }
        let mut emptied = Vec::new();
        for id in removals {
            if let Some(resident) = index.residents.remove(id)
                && !resident.moved
            {
                emptied.push(resident.sequence);
            }
        }
        drop(index);
        self.file_mut(sequence).live += live;
        for sequence in emptied {
            self.file_mut(sequence).live -= 1;
        }
        Ok(file)
    }

    /// Records that messages moved to SQLite: its copy is the message from now on.
    pub(crate) fn moved(&mut self, ids: &[QueueId]) {
        let mut index = lock(&self.index);
        let mut emptied = Vec::new();
        for id in ids {
            if let Some(resident) = index.residents.get_mut(id)
                && !resident.moved
            {
                resident.moved = true;
                emptied.push(resident.sequence);
            }
        }
        drop(index);
        for sequence in emptied {
            self.file_mut(sequence).live -= 1;
        }
    }

    /// Whether records were appended to the current file that no sync was asked for.
    pub(crate) fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// A sync of the current file is under way or done: its records are covered.
    pub(crate) fn sync_requested(&mut self) {
        self.unsynced = false;
    }

    pub(crate) fn current_file(&self) -> Arc<File> {
        self.files.back().expect("a current journal file").file.clone()
    }

    /// Whether the oldest file has no message left in the journal only and can go.
    pub(crate) fn reclaimable(&self) -> bool {
        self.files.len() > 1 && self.files.front().is_some_and(|file| file.live == 0)
    }

    /// The messages left in the oldest file, when the journal has more than
    /// [`Limits::max_files`] files and the oldest is [`Limits::move_after`] old: they
    /// should move into SQLite, so that the file can be reclaimed.
    pub(crate) fn overflow(&self) -> Vec<QueueId> {
        let oldest = self.files.front().expect("a current journal file");
        if self.files.len() <= self.limits.max_files
            || oldest.since.elapsed() < self.limits.move_after
        {
            return Vec::new();
        }
        let oldest = oldest.sequence;
        let index = lock(&self.index);
        let mut ids: Vec<QueueId> = index
            .residents
            .iter()
            .filter(|(_, resident)| resident.sequence == oldest && !resident.moved)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Reclaims every leading file with no message left. The caller has synced SQLite's log
    /// after the last move. Returns the messages of those files that had moved to SQLite:
    /// their rows in `journal_removed`, if any, can go.
    pub(crate) fn reclaim_synced(&mut self) -> Vec<QueueId> {
        let mut moved = Vec::new();
        while self.reclaimable() {
            let oldest = self.files.front().expect("reclaimable");
            let free = Header { active: false, sequence: oldest.sequence, nonce: 0 };
            let freed = oldest
                .file
                .write_all_at(&free.encode(), 0)
                .context(|| "freeing a journal file".into())
                .and_then(|()| sync_file(&oldest.file, &self.counters, "a freed journal file"));
            if let Err(error) = freed {
                // Kept as it is: recovery replays it, which is correct, only slower.
                warn!(%error, slot = oldest.slot, "cannot free a journal file");
                break;
            }
            let oldest = self.files.pop_front().expect("reclaimable");
            lock(&self.index).residents.retain(|id, resident| {
                let gone = resident.sequence == oldest.sequence;
                if gone && resident.moved {
                    moved.push(*id);
                }
                !gone
            });
            if self.spare.len() < SPARE_FILES {
                self.spare.push((oldest.slot, oldest.file));
            } else if let Err(error) = fs::remove_file(self.path(oldest.slot)) {
                warn!(%error, slot = oldest.slot, "cannot delete a free journal file");
            }
        }
        moved
    }

    /// Syncs the current file and activates the next.
    fn next_file(&mut self) -> Result<(), SpoolError> {
        // Through sync_file: a failure here stops acknowledgements, as one on the sync
        // thread would (the two share the file, and Linux reports a failure once).
        sync_file(&self.current_file(), &self.counters, "a full journal file")?;
        self.unsynced = false;
        self.activate()
    }

    /// Makes a free file (or a new one) the current file.
    fn activate(&mut self) -> Result<(), SpoolError> {
        let nonce = u64::from_le_bytes(random()?);
        let sequence = self.next_sequence;
        // A reader may still hold a free file's handle, from a message's content it read
        // before the file was reclaimed: such a file waits.
        let reusable = self.spare.iter().position(|(_, file)| Arc::strong_count(file) == 1);
        let (slot, file) = match reusable {
            Some(position) => self.spare.swap_remove(position),
            None => self.new_file()?,
        };
        // Synced with the first records, by the sync that makes them durable; until then
        // recovery takes the file for a free one.
        let header = Header { active: true, sequence, nonce }.encode();
        if let Err(error) = file.write_all_at(&header, 0) {
            self.spare.push((slot, file));
            return Err(SpoolError::io(format!("activating journal file {slot:016x}"), error));
        }
        self.next_sequence += 1;
        let since = Instant::now();
        self.files.push_back(ActiveFile { slot, sequence, nonce, file, live: 0, since });
        self.offset = HEADER_LEN;
        Ok(())
    }

    /// A new empty file, for want of a free one.
    fn new_file(&mut self) -> Result<(u64, Arc<File>), SpoolError> {
        let slot = self.next_slot;
        self.next_slot += 1;
        Ok((slot, Arc::new(create_file(&self.dir, slot)?)))
    }

    fn file_mut(&mut self, sequence: u64) -> &mut ActiveFile {
        let position = self
            .files
            .binary_search_by_key(&sequence, |file| file.sequence)
            .expect("a resident's journal file is active");
        &mut self.files[position]
    }

    fn path(&self, slot: u64) -> PathBuf {
        self.dir.join(format!("{slot:016x}"))
    }
}

/// The messages in the journal in `spool_dir`, read without taking the spool's lock (while
/// the server runs, say), oldest first: those that moved to SQLite too. The caller reads
/// the database after this, and then asks the returned [`JournalFiles`] whether every file
/// is still as it was.
pub(crate) fn read_only(
    spool_dir: &Path,
) -> Result<(Vec<QueuedMessage>, JournalFiles), SpoolError> {
    let dir = spool_dir.join(DIR);
    let listing = match fs::read_dir(&dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), JournalFiles(Vec::new())));
        }
        listing => listing.context(|| format!("listing {}", dir.display()))?,
    };
    let mut active = Vec::new();
    for entry in listing {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        if slot_number(&entry.file_name()).is_none() {
            continue;
        }
        let path = entry.path();
        let file = match File::open(&path) {
            // Deleted since the listing: it was free.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            file => file.context(|| format!("opening {}", path.display()))?,
        };
        if let Some(header) = read_header(&file, &path)?.filter(|header| header.active) {
            active.push((header, path, Arc::new(file)));
        }
    }
    active.sort_unstable_by_key(|(header, ..)| header.sequence);
    let mut residents = HashMap::new();
    for (header, _, file) in &active {
        replay(file, *header, &mut residents)?;
    }
    let mut residents: Vec<_> = residents.into_iter().collect();
    residents.sort_unstable_by_key(|(id, _)| *id);
    let entries: Vec<_> = residents
        .iter()
        .map(|(id, resident)| (resident.sequence, read_entry(resident, *id)))
        .collect();
    // A file reclaimed (or reclaimed and reused) while it was read had no message left in the
    // journal only: each was removed, or moved to the database, which the caller reads
    // after this. What was read from it is dropped, errors included.
    let mut changed = HashSet::new();
    for (header, path, file) in &active {
        if read_header(file, path)? != Some(*header) {
            changed.insert(header.sequence);
        }
    }
    let messages = entries
        .into_iter()
        .filter(|(sequence, _)| !changed.contains(sequence))
        .map(|(_, entry)| entry)
        .collect::<Result<_, _>>()?;
    active.retain(|(header, ..)| !changed.contains(&header.sequence));
    Ok((messages, JournalFiles(active)))
}

/// The journal files a [`read_only`] read, to check afterwards that none changed.
pub(crate) struct JournalFiles(Vec<(Header, PathBuf, Arc<File>)>);

impl JournalFiles {
    /// Whether every file is still as it was read. When one was freed meanwhile, what was
    /// read from it and what the database said about its messages need not agree: the
    /// database's rows of messages removed after moving there go when their file is freed.
    pub(crate) fn unchanged(&self) -> Result<bool, SpoolError> {
        for (header, path, file) in &self.0 {
            if read_header(file, path)? != Some(*header) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn read_header(file: &File, path: &Path) -> Result<Option<Header>, SpoolError> {
    let mut header = [0u8; HEADER_LEN as usize];
    let read = file.read_at(&mut header, 0).context(|| format!("reading {}", path.display()))?;
    Ok(Header::decode(&header[..read]))
}

/// Applies every intact record of `file` to `residents`.
fn replay(
    file: &Arc<File>,
    header: Header,
    residents: &mut HashMap<QueueId, Resident>,
) -> Result<(), SpoolError> {
    let length = file.metadata().context(|| "reading a journal file's size".into())?.len();
    let mut data = vec![0; usize::try_from(length).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut data, 0).context(|| "reading a journal file".into())?;
    let mut at = HEADER_LEN as usize;
    while let Some(record_header) = data.get(at..at + RECORD_HEADER_LEN) {
        let length = u64::from_le_bytes(record_header[..8].try_into().unwrap());
        let sum = u32::from_le_bytes(record_header[8..].try_into().unwrap());
        let start = at + RECORD_HEADER_LEN;
        let Some(payload) = usize::try_from(length)
            .ok()
            .and_then(|length| start.checked_add(length))
            .and_then(|end| data.get(start..end))
        else {
            break;
        };
        let length = payload.len();
        if length == 0 || checksum(header.nonce, payload) != sum {
            break;
        }
        let mut cursor = Cursor { data: payload, at: 0 };
        let count = cursor.u32()?;
        for _ in 0..count {
            let (message, place) = decode_entry(&mut cursor)?;
            let offset = start as u64;
            let place = EntryPlace {
                entry: offset + place.entry,
                content: offset + place.content,
                length: place.length,
            };
            let resident =
                Resident { sequence: header.sequence, file: file.clone(), place, moved: false };
            residents.insert(message.id, resident);
        }
        let removals = cursor.u32()?;
        for _ in 0..removals {
            residents.remove(&QueueId(cursor.u64()?));
        }
        at = start + length;
    }
    Ok(())
}

fn slot_number(name: &std::ffi::OsStr) -> Option<u64> {
    let name = name.to_str()?;
    if name.len() != 16 {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
}

/// Creates an empty journal file and makes it and its name durable.
fn create_file(dir: &Path, slot: u64) -> Result<File, SpoolError> {
    let path = dir.join(format!("{slot:016x}"));
    let file = open_file(&path, true)?;
    if let Err(error) = file.sync_all() {
        let _ = fs::remove_file(&path);
        return Err(SpoolError::io(format!("syncing {}", path.display()), error));
    }
    sync_dir(dir)?;
    Ok(file)
}

fn open_file(path: &Path, create: bool) -> Result<File, SpoolError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .mode(0o600)
        .open(path)
        .context(|| format!("opening {}", path.display()))
}

fn random() -> Result<[u8; 8], SpoolError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|error| {
        SpoolError::io(
            "choosing a journal file's nonce".into(),
            std::io::Error::other(error.to_string()),
        )
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests;
