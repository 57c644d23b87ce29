//! The durable message queue.
//!
//! # Why a 250 after [`QueueStore::store`] is safe
//!
//! RFC 5321 section 6.1:
//!
//! > When the receiver-SMTP accepts a piece of mail (by sending a "250 OK" message in response
//! > to DATA), it is accepting responsibility for delivering or relaying the message.  It must
//! > take this responsibility seriously.  It MUST NOT lose the message for frivolous reasons,
//! > such as because the host later crashes or because of a predictable resource shortage.
//!
//! So the server may send that 250 only once the message would survive a crash of the process
//! or of the machine. [`SqliteSpool`] gives that guarantee when the future returned by
//! [`QueueStore::store`] resolves `Ok`:
//!
//! * New mail goes to the **journal** (see `journal`): the writer appends every message of a
//!   batch, envelope, recipients and content, as one record with a checksum, to the current
//!   journal file with one write; the **sync thread syncs the file** (`fdatasync`) in a call
//!   that started after the write returned, and only then answers. A record torn by a crash
//!   fails its checksum and is ignored at recovery, so a message is either wholly there or
//!   wholly absent, never half stored. Most mail is delivered at its first attempt and
//!   removed by a removal record, and SQLite never sees it.
//! * A message that stays (an outcome recorded without removing it: a deferral, a partial
//!   delivery) **moves into SQLite** in the transaction that records the outcome; the
//!   database's copy is the message from then on. A journal file is reclaimed only once
//!   every message in it is removed or moved, and after the database's log is synced, so a
//!   move is never lost with its journal entry. Messages that wait long in the journal are
//!   moved too, when it grows past its bound.
//! * The database runs in **WAL mode**: `COMMIT` appends the transaction's pages and a
//!   checksummed commit frame to the write-ahead log. On the next open SQLite replays the log
//!   up to the last intact commit frame, so a transaction torn by a crash is ignored.
//! * The writer's `COMMIT` does not sync the log (`synchronous=NORMAL`, which in WAL mode
//!   still syncs a new log header when the log starts over after a checkpoint, so that a
//!   crash cannot replay an old frame over newer data). A transaction that stores mail (a
//!   message whose recipients were already tried, which the journal does not take) is
//!   answered only after the sync thread has synced the log, as for the journal: then its
//!   frames, and every frame before them, are on stable storage.
//! * A body larger than 16 KiB is not written into SQLite (which would write it twice: to the
//!   log, then at the checkpoint) but appended to a segment file, which is synced
//!   (`fdatasync`) before the transaction that points at it commits. See `segments`.
//! * Operations that only record what happened to stored mail (delivery outcomes,
//!   removals, moves) are answered once written, without waiting for a sync. Files are
//!   written in order, so the next sync makes them durable too, and when none comes the
//!   writer (journal) or a checkpoint (database) syncs within a second. Losing one to a
//!   power failure repeats a delivery; it never loses mail.
//! * Nothing answers a caller before its write (and, for stored mail, the sync after it).
//! * New directory entries are durable too: [`SqliteSpool::open`] fsyncs the parent of every
//!   directory it creates and the spool directory after creating the database file, SQLite
//!   fsyncs the directory whenever it creates the log file, and the journal fsyncs its
//!   directory after creating a file (reused files keep their names).
//! * When anything fails (full disk, I/O error) the future resolves `Err` and the server
//!   answers 4xx, so the client keeps its copy and retries. A failed sync leaves the
//!   write in place, and perhaps durable; the outcome is then a duplicate delivery, never a
//!   loss. After a failed sync of the journal or the log nothing more is acknowledged until
//!   the spool is opened again: Linux reports a failed writeback once, so a later sync that
//!   succeeds would not prove the earlier data durable.
//! * At start-up the log and the journal files are synced before segments or journal files
//!   that nothing points into are deleted or reused: a process killed with `kill -9` may have
//!   left removals in the page cache only.
//!
//! What remains is trust in the storage stack: fsync must not return before the data is on
//! stable media, as for every MTA and database.
//!
//! # Group commit
//!
//! An fsync takes from a hundred microseconds to tens of milliseconds, and one per message
//! would cap the server at a few hundred messages per second on ordinary disks. Durability
//! is never traded for speed here; instead concurrent sessions share fsyncs. A single writer
//! thread owns the journal and the write connection. It waits for a request, takes every
//! other request already queued, appends their new mail to the journal as one record,
//! applies the rest in one transaction and commits once, then hands the waiters to the sync
//! thread, which syncs once for every batch handed over since its last sync and answers
//! them all. The busier the server, the more messages each sync carries. One
//! failing operation (a duplicate id, say) fails only its caller: the batch is then undone
//! and applied again with each operation in its own savepoint (savepoints cost too much to
//! take for every operation of every batch, when operations almost never fail).
//! A batch of delivery records alone (nothing to fsync) waits up to 10 ms for more requests,
//! so records share transactions, and pages, with each other and with stored mail; a request
//! that stores mail ends that wait at once.
//!
//! Reads (content, listings) use separate read-only connections, which in WAL mode neither
//! block the writer nor wait for it, and read the journal's files directly.
//!
//! # Checkpoints
//!
//! SQLite normally copies the log back into the database (a checkpoint: an fsync of the log,
//! the copying, an fsync of the database) inside the COMMIT that makes the log pass 1000
//! pages, so every waiter of that batch would wait for it too. Here a checkpoint thread with
//! its own connection does it instead, alongside the writer, when the log passes that size
//! and a second after a record that no sync has covered yet. The log starts over only when a
//! transaction begins with all of it copied, which a checkpoint running beside a busy writer
//! never achieves (re-running it after every commit only costs two fsyncs each time). So
//! once the thread has copied the bulk, the writer copies the few frames committed since
//! between two of its transactions, and the next one starts the log over.

mod db;
mod error;
mod id;
mod journal;
mod segments;
mod sqlite;
mod writer;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

pub use error::SpoolError;
pub use id::{ParseQueueIdError, QueueId};
pub use smtp_proto::{BodyType, Notify, OriginalRecipient, Ret};
pub use sqlite::SqliteSpool;

/// How many nice levels above the rest of the server the spool's writer and sync threads
/// ask to run. Every acknowledgement of new mail waits for both, and they use little CPU:
/// when the CPUs are busy, a session thread should not keep them waiting (measured: 2.6%
/// more messages accepted per second at 50 sessions). Lowering a nice value needs
/// `CAP_SYS_NICE` or a high enough `RLIMIT_NICE`; without either the threads run at the
/// server's priority.
pub const THREAD_PRIORITY_BOOST: i32 = 5;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the server knew about a message when it accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path in wire form without brackets; empty for the null sender.
    pub sender: String,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// TLS version and cipher suite, e.g. `TLSv1.3 TLS13_AES_256_GCM_SHA384`; `None` for
    /// plaintext.
    pub tls: Option<String>,
    /// The SASL identity, if the client authenticated.
    pub authenticated_as: Option<String>,
    /// Stored with millisecond precision.
    pub received_at: SystemTime,
}

/// One recipient of a message and its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The final address to deliver to, in wire form.
    pub address: String,
    /// The RCPT TO address as the client gave it.
    pub original: String,
    pub notify: Option<Notify>,
    pub orcpt: Option<OriginalRecipient>,
    pub status: RecipientStatus,
}

/// Where a recipient's delivery stands. Times are stored with millisecond precision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientStatus {
    /// Not tried yet.
    Pending,
    /// Tried and temporarily failed; try again at `next_attempt`.
    Deferred {
        attempts: u32,
        next_attempt: SystemTime,
        last_error: String,
        /// A delay notice was due (and sent if the recipient's NOTIFY asked for one): it
        /// must not be sent again.
        delay_notified: bool,
    },
    Delivered {
        at: SystemTime,
        detail: String,
    },
    /// Permanently failed; a bounce may be due.
    Failed {
        at: SystemTime,
        error: String,
    },
}

impl RecipientStatus {
    /// Delivered or failed: nothing more will be tried.
    pub fn is_final(&self) -> bool {
        matches!(self, RecipientStatus::Delivered { .. } | RecipientStatus::Failed { .. })
    }
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    /// The message as it will be delivered (with our Received field), byte for byte. Shared,
    /// so that a caller can keep it (for the first delivery attempt) without a copy.
    pub content: Arc<Vec<u8>>,
}

/// A stored message without its content; see [`QueueStore::load_content`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    /// In the order they were stored; indexes are what
    /// [`QueueStore::update_recipients`] takes.
    pub recipients: Vec<Recipient>,
    /// Octets of content.
    pub size: u64,
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Committed transactions and journal appends.
    pub commits: u64,
    /// Those of them that stored mail, whose waiters were answered only after a sync; the
    /// others became durable with the next sync.
    pub synced_commits: u64,
    /// Operations (store, update, remove) those commits made.
    pub operations: u64,
    /// Messages those commits stored.
    pub messages_stored: u64,
    /// Checkpoints run (copying the log back into the database).
    pub checkpoints: u64,
    /// Syncs by the sync thread (of the journal, or the log), each answering every waiter
    /// whose write came before it.
    pub log_syncs: u64,
    /// Times the log started over from its first frame, everything in it having been
    /// copied into the database.
    pub log_restarts: u64,
    /// Syncs of records that no stored mail's sync carried to the disk (removals and other
    /// outcomes), made a second after them: of the journal by the writer, of the log by the
    /// checkpoint thread.
    pub lazy_syncs: u64,
    /// A sync of the log or the journal failed: nothing is acknowledged any more until the
    /// spool is opened again (Linux reports a failed writeback only once).
    pub log_sync_failed: bool,
}

/// The narrow interface the server and delivery code use, so that a PostgreSQL backend can be
/// added later.
pub trait QueueStore: Send + Sync + 'static {
    /// Stores a message. Durable when the future resolves `Ok` (group-committed); only then may
    /// the server answer 250.
    fn store(&self, message: NewMessage) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Stores several messages in one transaction: all or none (a message with the
    /// notifications its acceptance gave rise to).
    fn store_all(&self, messages: Vec<NewMessage>) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// The content of a stored message, byte for byte.
    fn load_content(&self, id: QueueId) -> BoxFuture<'_, Result<Vec<u8>, SpoolError>>;
    /// Durably records new statuses for the given recipient indexes: all of them or, on
    /// error, none.
    fn update_recipients(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
    ) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Records the outcome of a delivery attempt and stores the messages it gave rise to
    /// (delivery status notifications) in one transaction: either the new messages are stored
    /// and the message is updated (`updates`) or removed (`remove`), or nothing changes. So a
    /// crash never loses a notification whose cause was recorded, and never records a
    /// delivery whose notification is missing.
    fn record_outcome(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
        remove: bool,
        new: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Durably deletes the message, its content and its recipients. [`SpoolError::NotFound`]
    /// if it is not there, which a caller retrying a removal can treat as done.
    fn remove(&self, id: QueueId) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Every message in the queue (for recovery at start-up and for queue listings), oldest
    /// first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<QueuedMessage>, SpoolError>>;
    fn stats(&self) -> SpoolStats;
}

#[cfg(test)]
mod tests;
