//! The writer thread (group commit), the sync thread and the checkpointer thread.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, ErrorCode};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use crate::error::Context;
use crate::journal::{EncodedMessage, Journal, Residence};
use crate::segments::{BodyLocation, INLINE_LIMIT, Segments};
use crate::{NewMessage, QueueId, RecipientStatus, SpoolError, SpoolStats, db};

/// At most this many operations share a transaction, so one commit never keeps the first
/// waiter of a long queue waiting for too long.
const MAX_BATCH_OPERATIONS: usize = 512;
/// At most this many content octets share a transaction (one message may exceed it alone),
/// which bounds the memory held by a batch and the size of the log.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Headroom SQLite needs beyond the content for pages, indexes and the log.
const SPACE_SLACK: u64 = 1 << 20;

/// Log frames (pages) after which the checkpointer copies the log back into the database:
/// SQLite's own default for automatic checkpoints.
const CHECKPOINT_FRAMES: i32 = 1000;
/// The writer copies the frames the checkpoint thread left only when they are this few: more
/// means the thread's checkpoint failed or was held back, and the bulk stays its work.
const TAIL_FRAMES: i32 = CHECKPOINT_FRAMES / 4;
/// A commit made without fsync (see [`Operation::needs_fsync`]) reaches the disk at the
/// next fsync'ed commit or, when none comes, within this long: the checkpointer syncs.
const LAZY_SYNC_DELAY: Duration = Duration::from_secs(1);
/// A batch of records that need no fsync waits this long for more requests before it
/// commits, so that records share transactions with each other and with stored mail
/// instead of writing the same pages once each. A request that needs an fsync ends the wait.
const LAZY_LINGER: Duration = Duration::from_millis(10);

/// Runs the calling thread [`THREAD_PRIORITY_BOOST`](crate::THREAD_PRIORITY_BOOST) nice
/// levels above the rest of the process, where the system allows it. Linux: the "process" of
/// getpriority(2) and setpriority(2) is the calling thread here.
pub(crate) fn raise_thread_priority() {
    let raised = rustix::process::getpriority_process(None).and_then(|nice| {
        rustix::process::setpriority_process(None, (nice - crate::THREAD_PRIORITY_BOOST).max(-20))
    });
    if let Err(error) = raised {
        debug!(%error, "spool thread keeps the server's priority (no CAP_SYS_NICE or RLIMIT_NICE)");
    }
}

pub(crate) enum Operation {
    Store(NewMessage),
    StoreAll(Vec<NewMessage>),
    Update(QueueId, Vec<(usize, RecipientStatus)>),
    Remove(QueueId),
    /// See [`QueueStore::record_outcome`](crate::QueueStore::record_outcome).
    Outcome {
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
        remove: bool,
        new: Vec<NewMessage>,
    },
    /// Not a request: a message moving from the journal into SQLite with its outcome applied
    /// (first), and the messages that outcome stores.
    Move(Vec<NewMessage>),
}

pub(crate) struct Request {
    pub(crate) operation: Operation,
    pub(crate) reply: oneshot::Sender<Result<(), SpoolError>>,
}

impl Operation {
    /// The messages the operation stores.
    fn new_messages(&self) -> &[NewMessage] {
        match self {
            Operation::Store(message) => std::slice::from_ref(message),
            Operation::StoreAll(messages)
            | Operation::Outcome { new: messages, .. }
            | Operation::Move(messages) => messages,
            Operation::Update(..) | Operation::Remove(_) => &[],
        }
    }

    /// Whether a reply may only follow a sync of the log after the operation's commit.
    ///
    /// New mail must be on stable storage before the 250 (RFC 5321 section 6.1). Everything
    /// else records what happened to mail already stored, after the delivery itself was
    /// made durable (a Maildir file fsync'ed, a remote 250): if such a record is lost to a
    /// power failure, the recipient is tried again, a duplicate delivery rather than a loss,
    /// and a notice that commits with its outcome is lost and made again with it. The log
    /// is written in order, so any later fsync (the next stored message's commit, a
    /// checkpoint) makes these records durable too; without one, the checkpointer syncs
    /// within [`LAZY_SYNC_DELAY`]. Postfix, likewise, does not sync the removal of a
    /// delivered queue file.
    fn needs_fsync(&self) -> bool {
        match self {
            Operation::Store(_) | Operation::StoreAll(_) => true,
            Operation::Update(..)
            | Operation::Remove(_)
            | Operation::Outcome { .. }
            | Operation::Move(_) => false,
        }
    }

    /// Octets of content the operation stores.
    fn bytes(&self) -> usize {
        self.new_messages().iter().map(|message| message.content.len()).sum()
    }
}

/// Shared with [`SqliteSpool::stats`](crate::SqliteSpool).
#[derive(Default)]
pub(crate) struct Counters {
    commits: AtomicU64,
    synced_commits: AtomicU64,
    operations: AtomicU64,
    messages_stored: AtomicU64,
    checkpoints: AtomicU64,
    log_syncs: AtomicU64,
    log_restarts: AtomicU64,
    lazy_syncs: AtomicU64,
    /// A sync of the log failed. Linux reports a failed writeback once and then marks the
    /// pages clean, so a later sync succeeding proves nothing about the frames before it:
    /// from then on no operation is acknowledged, until the spool is opened again.
    pub(crate) log_sync_failed: AtomicBool,
    /// Held across each sync and the check of `log_sync_failed` after it: threads sync the
    /// same files through shared handles, and of two syncs running at once the one that
    /// does not get the error must still see it (see [`sync_file`]).
    sync_lock: std::sync::Mutex<()>,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SpoolStats {
        SpoolStats {
            commits: self.commits.load(Ordering::Relaxed),
            synced_commits: self.synced_commits.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
            messages_stored: self.messages_stored.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            log_syncs: self.log_syncs.load(Ordering::Relaxed),
            log_restarts: self.log_restarts.load(Ordering::Relaxed),
            lazy_syncs: self.lazy_syncs.load(Ordering::Relaxed),
            log_sync_failed: self.log_sync_failed.load(Ordering::Relaxed),
        }
    }
}

/// Each operation's result, in the batch's order.
type Results = Vec<Result<(), SpoolError>>;

/// A committed batch: its waiters are answered after a sync of the log (it stored mail), or
/// at once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    Synced,
    Unsynced,
}

/// Where an operation of a batch is carried out.
enum Route {
    /// In SQLite.
    Database,
    /// In the journal: the operation's new messages are appended, and `remove` is removed.
    Journal { remove: Option<QueueId> },
    /// The message `id` moves from the journal into SQLite, with `operation` (a
    /// [`Operation::Move`]).
    Move { id: QueueId, operation: Operation },
    /// Known to fail before anything is written.
    Failed(SpoolError),
}

/// An error that ends the whole transaction, not just one operation.
struct TransactionFailed(SpoolError);

pub(crate) struct Writer {
    pub(crate) connection: Connection,
    /// The spool directory, to tell a full disk from other I/O errors.
    pub(crate) dir: PathBuf,
    pub(crate) counters: Arc<Counters>,
    /// Holds the lock that keeps other processes out of the spool until the connection is
    /// closed.
    pub(crate) lock: File,
    pub(crate) checkpointer: CheckpointerHandle,
    pub(crate) syncer: Syncer,
    pub(crate) segments: Segments,
    /// The log file, synced before a segment is deleted or a journal file reclaimed.
    pub(crate) log: Arc<File>,
    pub(crate) journal: Journal,
    /// No message in the database has a higher id: a new message with a higher one (every
    /// message, ids growing with time) needs no look-up there to rule out a duplicate.
    pub(crate) highest_database_id: QueueId,
}

impl Writer {
    /// Serves requests until every sender is gone, then closes the database.
    pub(crate) fn run(mut self, requests: Receiver<Request>) -> Result<(), SpoolError> {
        // Block for the first request, then take whatever else is already waiting: the
        // requests that arrived during the previous commit's fsync share the next one.
        // While journal records wait for a sync (removals), wait at most until it is due.
        let mut unsynced_since: Option<Instant> = None;
        loop {
            let first = match unsynced_since {
                None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(since) => requests.recv_timeout(
                    (since + LAZY_SYNC_DELAY).saturating_duration_since(Instant::now()),
                ),
            };
            let first = match first {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync_journal();
                    unsynced_since = None;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut bytes = first.operation.bytes();
            let mut urgent = first.operation.needs_fsync();
            let mut batch = vec![first];
            let linger_until = Instant::now() + LAZY_LINGER;
            while batch.len() < MAX_BATCH_OPERATIONS && bytes < MAX_BATCH_BYTES {
                let request = match requests.try_recv() {
                    Ok(request) => request,
                    Err(_) if urgent => break,
                    Err(_) => {
                        let left = linger_until.saturating_duration_since(Instant::now());
                        match requests.recv_timeout(left) {
                            Ok(request) => request,
                            Err(_) => break,
                        }
                    }
                };
                urgent |= request.operation.needs_fsync();
                bytes += request.operation.bytes();
                batch.push(request);
            }
            if self.counters.log_sync_failed.load(Ordering::Relaxed) {
                reply(
                    batch
                        .into_iter()
                        .map(|request| (request.reply, Err(log_sync_failed())))
                        .collect(),
                );
                continue;
            }
            self.apply_batch(batch);
            self.reclaim_journal();
            self.compact_journal();
            unsynced_since = match self.journal.unsynced() {
                true => unsynced_since.or_else(|| Some(Instant::now())),
                false => None,
            };
            // Requests that keep coming (removals, with no new mail to sync) must not put the
            // sync off for ever.
            if unsynced_since.is_some_and(|since| since.elapsed() >= LAZY_SYNC_DELAY) {
                self.sync_journal();
                unsynced_since = None;
            }
        }
        // Every acknowledgement goes out before the spool closes. The checkpointer's
        // connection goes first, so that this one is the last: the last connection to close
        // checkpoints and removes the log, which it must sync first (FULL) before the log's
        // contents are gone. Close before releasing the lock, so that a new owner never
        // shares the files with this connection.
        self.sync_journal();
        let Writer { connection, lock, checkpointer, syncer, .. } = self;
        syncer.stop();
        checkpointer.stop();
        let closed = connection
            .pragma_update(None, "synchronous", "FULL")
            .and_then(|()| connection.close().map_err(|(_, error)| error))
            .map_err(|error| SpoolError::database("closing the spool".into(), error));
        drop(lock);
        closed
    }

    /// Applies a batch: its journal part with one append, its database part in one
    /// transaction. Answers each request once what it did is durable (new mail) or written
    /// (records of outcomes, see [`Operation::needs_fsync`]).
    fn apply_batch(&mut self, batch: Vec<Request>) {
        let (waiters, operations): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|request| (request.reply, request.operation)).unzip();
        let routes = self.route(&operations);
        let mut results: Results = vec![Ok(()); operations.len()];

        // The database's part.
        let database: Vec<(usize, &Operation)> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, route)| match route {
                Route::Database => Some((i, &operations[i])),
                Route::Move { operation, .. } => Some((i, operation)),
                Route::Journal { .. } | Route::Failed(_) => None,
            })
            .collect();
        let mut committed = None;
        if !database.is_empty() {
            let ops: Vec<&Operation> = database.iter().map(|(_, operation)| *operation).collect();
            let (database_results, commit) = self.apply_transaction(&ops);
            committed = commit;
            let mut moved = Vec::new();
            for ((i, _), result) in database.iter().zip(database_results) {
                if let (Ok(()), Route::Move { id, .. }) = (&result, &routes[*i]) {
                    moved.push(*id);
                }
                results[*i] = result;
            }
            self.journal.moved(&moved);
        }
        for (i, route) in routes.iter().enumerate() {
            if let Route::Failed(error) = route {
                results[i] = Err(error.clone());
            }
        }

        // The journal's part: one record.
        let mut appended = Vec::new();
        let mut removals = Vec::new();
        let mut encoded = Vec::new();
        let mut seen = HashSet::new();
        for (i, route) in routes.iter().enumerate() {
            let Route::Journal { remove } = route else { continue };
            match self.encode_new(operations[i].new_messages(), &mut seen) {
                Ok(messages) => {
                    encoded.extend(messages);
                    removals.extend(*remove);
                    appended.push(i);
                }
                Err(error) => results[i] = Err(error),
            }
        }
        if !appended.is_empty() {
            match self.journal.append(&encoded, &removals) {
                Ok(_) => {
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    if !encoded.is_empty() {
                        self.counters.synced_commits.fetch_add(1, Ordering::Relaxed);
                    }
                    self.counters.operations.fetch_add(appended.len() as u64, Ordering::Relaxed);
                    self.counters
                        .messages_stored
                        .fetch_add(encoded.len() as u64, Ordering::Relaxed);
                }
                Err(error) => {
                    warn!(%error, operations = appended.len(), "appending to the spool journal failed");
                    for i in appended {
                        results[i] = Err(error.clone());
                    }
                }
            }
        }
        drop(encoded);

        // The replies: after a sync for new mail, at once for the rest. A request that stored
        // mail and succeeded was appended to the journal (the current file), or committed to
        // the database in a transaction that needs the log synced.
        let (mut now, mut later) = (Vec::new(), Vec::new());
        let (mut sync_journal, mut sync_log) = (false, false);
        for (i, (waiter, result)) in waiters.into_iter().zip(results).enumerate() {
            let stores = result.is_ok() && !operations[i].new_messages().is_empty();
            match &routes[i] {
                Route::Journal { .. } if stores => sync_journal = true,
                Route::Database if stores && operations[i].needs_fsync() => sync_log = true,
                _ => {
                    now.push((waiter, result));
                    continue;
                }
            }
            later.push((waiter, result));
        }
        reply(now);
        if !later.is_empty() {
            let mut files = Vec::new();
            if sync_journal {
                files.push(self.journal.current_file());
                self.journal.sync_requested();
            }
            if sync_log {
                files.push(self.log.clone());
            }
            self.syncer.sync_then_reply(files, later);
        }
        // After the hand-over, so that this batch's waiters do not wait for the writer's
        // checkpoint (the next batch's requests do: two fsyncs, every 1000 frames or so).
        if let Some(commit) = committed {
            self.checkpointer.committed(commit == Commit::Synced, &self.connection);
        }
    }

    /// Where each operation of a batch is carried out.
    fn route(&self, operations: &[Operation]) -> Vec<Route> {
        // Messages that an earlier operation of the batch moves out of the journal (true) or
        // removes from it (false: a later operation on it finds nothing).
        let mut handled: HashMap<QueueId, bool> = HashMap::new();
        let residence = |handled: &HashMap<QueueId, bool>, id: QueueId| match handled.get(&id) {
            Some(true) => Ok(Residence::Elsewhere),
            Some(false) => Err(SpoolError::NotFound(id)),
            None => Ok(self.journal.residence(id)),
        };
        operations
            .iter()
            .map(|operation| {
                let route = match operation {
                    Operation::Store(_) | Operation::StoreAll(_) => {
                        match operation.new_messages().iter().all(db::all_pending) {
                            true => Route::Journal { remove: None },
                            false => Route::Database,
                        }
                    }
                    Operation::Remove(id) => match residence(&handled, *id) {
                        Ok(Residence::Journal) => Route::Journal { remove: Some(*id) },
                        Ok(Residence::Moved | Residence::Elsewhere) => Route::Database,
                        Err(error) => Route::Failed(error),
                    },
                    Operation::Update(id, updates) => match residence(&handled, *id) {
                        Ok(Residence::Journal) => self.plan_move(*id, updates, Vec::new()),
                        Ok(Residence::Moved | Residence::Elsewhere) => Route::Database,
                        Err(error) => Route::Failed(error),
                    },
                    Operation::Outcome { id, updates, remove, new } => {
                        match (residence(&handled, *id), remove) {
                            (Ok(Residence::Journal), true) if new.iter().all(db::all_pending) => {
                                Route::Journal { remove: Some(*id) }
                            }
                            (Ok(Residence::Journal), true) => Route::Failed(SpoolError::Corrupt(
                                format!("a notice about {id} with recipients already tried"),
                            )),
                            (Ok(Residence::Journal), false) => {
                                self.plan_move(*id, updates, new.clone())
                            }
                            (Ok(Residence::Moved | Residence::Elsewhere), _) => Route::Database,
                            (Err(error), _) => Route::Failed(error),
                        }
                    }
                    Operation::Move(_) => unreachable!("moves are made here, not requested"),
                };
                match (&route, operation) {
                    (Route::Move { id, .. }, _) => {
                        handled.insert(*id, true);
                    }
                    (Route::Journal { remove: Some(id) }, _) => {
                        handled.insert(*id, false);
                    }
                    _ => {}
                }
                route
            })
            .collect()
    }

    /// A message in the journal, with `updates` applied, to store in SQLite with `new`.
    fn plan_move(
        &self,
        id: QueueId,
        updates: &[(usize, RecipientStatus)],
        new: Vec<NewMessage>,
    ) -> Route {
        match self.move_operation(id, updates, new) {
            Ok(operation) => Route::Move { id, operation },
            Err(error) => Route::Failed(error),
        }
    }

    /// The [`Operation::Move`] of a message in the journal, with `updates` applied.
    fn move_operation(
        &self,
        id: QueueId,
        updates: &[(usize, RecipientStatus)],
        new: Vec<NewMessage>,
    ) -> Result<Operation, SpoolError> {
        let (queued, content) = self.journal.read(id)?;
        let mut recipients = queued.recipients;
        for (index, status) in updates {
            let recipient = recipients
                .get_mut(*index)
                .ok_or(SpoolError::NoSuchRecipient { id, index: *index })?;
            recipient.status = status.clone();
        }
        let moved =
            NewMessage { id, envelope: queued.envelope, recipients, content: Arc::new(content) };
        let mut messages = Vec::with_capacity(1 + new.len());
        messages.push(moved);
        messages.extend(new);
        Ok(Operation::Move(messages))
    }

    /// Moves the messages left in the oldest journal file into SQLite when the journal has
    /// grown past its bound (files are reclaimed in order, so one message waiting long, for
    /// a slow destination, say, would otherwise keep every later file too).
    fn compact_journal(&mut self) {
        let waiting = self.journal.overflow();
        if waiting.is_empty() {
            return;
        }
        let (mut ids, mut operations) = (Vec::new(), Vec::new());
        for id in waiting {
            match self.move_operation(id, &[], Vec::new()) {
                Ok(operation) => {
                    ids.push(id);
                    operations.push(operation);
                }
                Err(error) => warn!(%error, %id, "cannot move a message out of the journal"),
            }
        }
        let batch: Vec<&Operation> = operations.iter().collect();
        let (results, committed) = self.apply_transaction(&batch);
        let mut moved = Vec::with_capacity(ids.len());
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(()) => moved.push(id),
                Err(error) => warn!(%error, %id, "cannot move a message out of the journal"),
            }
        }
        debug!(
            messages = moved.len(),
            "moved the oldest journal file's messages into the database"
        );
        self.journal.moved(&moved);
        if let Some(commit) = committed {
            self.checkpointer.committed(commit == Commit::Synced, &self.connection);
        }
        self.reclaim_journal();
    }

    /// The new messages of an operation, ready to append to the journal, unless one of them
    /// is already stored (or stored earlier in the batch: `seen`).
    fn encode_new<'a>(
        &self,
        messages: &'a [NewMessage],
        seen: &mut HashSet<QueueId>,
    ) -> Result<Vec<EncodedMessage<'a>>, SpoolError> {
        messages
            .iter()
            .map(|message| {
                let id = message.id;
                let duplicate = !seen.insert(id)
                    || self.journal.residence(id) != Residence::Elsewhere
                    || (id <= self.highest_database_id && db::exists(&self.connection, id)?);
                if duplicate {
                    return Err(SpoolError::AlreadyStored(id));
                }
                EncodedMessage::new(message)
            })
            .collect()
    }

    /// Syncs the journal's current file if records were appended to it that no sync covers.
    fn sync_journal(&mut self) {
        if self.journal.unsynced() {
            self.journal.sync_requested();
            // A failure stops every acknowledgement, see sync_file.
            if sync_file(&self.journal.current_file(), &self.counters, "the spool journal").is_ok()
            {
                self.counters.lazy_syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reclaims journal files with no message left. A message that moved to SQLite must be
    /// durable there before its journal entry goes: after a failed sync of the log (here or
    /// on another thread, which Linux reports to one of them only) nothing is reclaimed.
    fn reclaim_journal(&mut self) {
        if !self.journal.reclaimable()
            || sync_log(&self.log, &self.counters).is_err()
            || self.counters.log_sync_failed.load(Ordering::Relaxed)
        {
            return;
        }
        let moved = self.journal.reclaim_synced();
        if moved.is_empty() {
            return;
        }
        // The files are freed durably; their removal rows can go, with the next sync.
        let forgotten = self
            .connection
            .execute_batch("BEGIN IMMEDIATE")
            .context(|| "starting a spool transaction".into())
            .and_then(|()| {
                moved.iter().try_for_each(|id| db::forget_journal_removal(&self.connection, *id))
            })
            .and_then(|()| self.connection.execute_batch("COMMIT").context(|| "committing".into()));
        match forgotten {
            Ok(()) => self.checkpointer.committed(false, &self.connection),
            Err(error) => {
                // Left for the next start-up, which forgets the rows of messages it does not
                // find in the journal.
                warn!(%error, "cannot forget removals of messages that left the journal");
                self.roll_back();
            }
        }
    }

    /// Applies the database's part of a batch in one transaction; returns each operation's
    /// result, and the commit made, if any.
    fn apply_transaction(&mut self, batch: &[&Operation]) -> (Results, Option<Commit>) {
        let bytes: usize = batch.iter().map(|operation| operation.bytes()).sum();
        let (results, committed) = match self.transaction(batch) {
            Ok(committed) => committed,
            Err(TransactionFailed(error)) => {
                warn!(%error, operations = batch.len(), "spool transaction failed");
                self.roll_back();
                (vec![Err(error); batch.len()], None)
            }
        };
        let needed = bytes as u64 + SPACE_SLACK;
        let results = results
            .into_iter()
            .map(|result| result.map_err(|error| refine(error, &self.dir, needed)))
            .collect();
        (results, committed)
    }

    fn transaction(
        &mut self,
        batch: &[&Operation],
    ) -> Result<(Results, Option<Commit>), TransactionFailed> {
        if !self.connection.is_autocommit() {
            // A rollback after an earlier failure did not go through; retry it rather than
            // fail every later batch with "cannot start a transaction within a transaction".
            self.connection
                .execute_batch("ROLLBACK")
                .context(|| "rolling back a failed spool transaction".into())
                .map_err(TransactionFailed)?;
        }
        let bodies = self.write_bodies(batch);
        let sync = batch.iter().any(|operation| operation.needs_fsync());
        // IMMEDIATE takes the write lock now rather than at the first write, so an outside
        // reader-turned-writer (an operator's sqlite3 shell) cannot make us fail midway.
        self.connection
            .execute_batch("BEGIN IMMEDIATE")
            .context(|| "starting a spool transaction".into())
            .map_err(TransactionFailed)?;
        let mut results = Vec::with_capacity(batch.len());
        // Segments that removals took bodies out of.
        let mut emptied = Vec::new();
        if !self.apply_all(batch, &bodies, &mut results, &mut emptied)? {
            // An operation failed, perhaps halfway. Undo the whole batch and apply it again,
            // each operation in a savepoint, so that its failure undoes only its own changes.
            results.clear();
            emptied.clear();
            self.connection
                .execute_batch("ROLLBACK; BEGIN IMMEDIATE")
                .context(|| "starting a spool transaction again, with savepoints".into())
                .map_err(TransactionFailed)?;
            for (operation, bodies) in batch.iter().zip(bodies) {
                let result = match bodies {
                    Ok(bodies) => {
                        let mark = emptied.len();
                        let result = self.apply_in_savepoint(operation, &bodies, &mut emptied)?;
                        if result.is_err() {
                            emptied.truncate(mark);
                        }
                        result
                    }
                    Err(error) => Err(error),
                };
                results.push(result);
            }
        }
        let (mut durable, mut stored) = (0, 0);
        // "durable": committed; made durable at once or with the next fsync, see needs_fsync.
        for (operation, result) in batch.iter().zip(&results) {
            if result.is_ok() {
                durable += 1;
                if let Some(highest) = operation.new_messages().iter().map(|m| m.id).max() {
                    self.highest_database_id = self.highest_database_id.max(highest);
                }
                stored += match operation {
                    // The first message moves; the others are new.
                    Operation::Move(messages) => messages.len() as u64 - 1,
                    operation => operation.new_messages().len() as u64,
                };
            }
        }
        if durable == 0 {
            // Nothing to make durable: skip the fsync.
            self.roll_back();
            return Ok((results, None));
        }
        self.connection
            .execute_batch("COMMIT")
            .context(|| format!("committing {durable} spool operations"))
            .map_err(TransactionFailed)?;
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        if sync {
            self.counters.synced_commits.fetch_add(1, Ordering::Relaxed);
        }
        emptied.extend(self.segments.take_retired());
        self.delete_empty_segments(emptied);
        self.counters.operations.fetch_add(durable, Ordering::Relaxed);
        self.counters.messages_stored.fetch_add(stored, Ordering::Relaxed);
        Ok((results, Some(if sync { Commit::Synced } else { Commit::Unsynced })))
    }

    /// Appends the batch's large bodies to the active segment and syncs it, before the rows
    /// that point at them are written. Returns, for each request, where each of its new
    /// messages' bodies went (`None`: inline), or the error that fails the request.
    fn write_bodies(
        &mut self,
        batch: &[&Operation],
    ) -> Vec<Result<Vec<Option<BodyLocation>>, SpoolError>> {
        let mut appended = false;
        let mut bodies: Vec<Result<Vec<Option<BodyLocation>>, SpoolError>> = batch
            .iter()
            .map(|operation| {
                operation
                    .new_messages()
                    .iter()
                    .map(|message| match message.content.len() > INLINE_LIMIT {
                        true => {
                            appended = true;
                            self.segments.append(&message.content).map(Some)
                        }
                        false => Ok(None),
                    })
                    .collect()
            })
            .collect();
        if appended {
            // Its error is kept with the segment, below.
            let _ = self.segments.sync();
        }
        // A body in a segment whose sync failed (at the end, or when the batch moved on to a
        // new segment) may not be on the disk: its request fails, like the one that failed.
        let failed = self.segments.take_failed();
        if !failed.is_empty() {
            for placed in &mut bodies {
                let lost = placed.as_ref().ok().and_then(|bodies| {
                    bodies
                        .iter()
                        .flatten()
                        .find_map(|at| failed.iter().find(|(segment, _)| *segment == at.segment))
                });
                if let Some((_, error)) = lost {
                    *placed = Err(error.clone());
                }
            }
        }
        bodies
    }

    /// Deletes the segments among `candidates` that no body is in any more and that are not
    /// being appended to. The removals that emptied them must be durable first: a power
    /// failure that brought the rows back without their data would lose mail. So the log is
    /// synced here, once before the deletions, rather than left to the sync thread.
    fn delete_empty_segments(&mut self, mut candidates: Vec<u64>) {
        candidates.sort_unstable();
        candidates.dedup();
        let mut empty = Vec::new();
        for segment in candidates {
            if self.segments.is_active(segment) {
                continue;
            }
            match db::segment_in_use(&self.connection, segment) {
                Ok(false) => empty.push(segment),
                Ok(true) => {}
                Err(error) => warn!(%error, segment, "cannot tell whether a segment is empty"),
            }
        }
        if empty.is_empty() {
            return;
        }
        if sync_log(&self.log, &self.counters).is_err()
            || self.counters.log_sync_failed.load(Ordering::Relaxed)
        {
            // Kept, and deleted at the next start-up when no row points into it.
            return;
        }
        for segment in empty {
            if let Err(error) = self.segments.delete(segment) {
                warn!(%error, segment, "cannot delete an empty segment");
            }
        }
    }

    /// Applies every operation of the batch with no savepoint between them: a savepoint costs
    /// two statements, and a copy of every page an operation changes, for each operation,
    /// while operations almost never fail. Returns false, with the transaction still open,
    /// as soon as one fails; the outer result is for failures that end the transaction.
    fn apply_all(
        &self,
        batch: &[&Operation],
        bodies: &[Result<Vec<Option<BodyLocation>>, SpoolError>],
        results: &mut Results,
        emptied: &mut Vec<u64>,
    ) -> Result<bool, TransactionFailed> {
        for (operation, bodies) in batch.iter().zip(bodies) {
            match bodies {
                Ok(bodies) => match self.apply(operation, bodies, emptied) {
                    Ok(()) => results.push(Ok(())),
                    // On a full disk or an I/O error SQLite may have rolled back the whole
                    // transaction already.
                    Err(error) if self.connection.is_autocommit() => {
                        return Err(TransactionFailed(error));
                    }
                    Err(_) => return Ok(false),
                },
                // Nothing of it was written: its body is not on the disk.
                Err(error) => results.push(Err(error.clone())),
            }
        }
        Ok(true)
    }

    /// Runs one operation in a savepoint, so its failure undoes only its own changes. The
    /// outer result is for failures that end the transaction.
    fn apply_in_savepoint(
        &self,
        operation: &Operation,
        bodies: &[Option<BodyLocation>],
        emptied: &mut Vec<u64>,
    ) -> Result<Result<(), SpoolError>, TransactionFailed> {
        let connection = &self.connection;
        // Prepared once and cached: these run twice per operation.
        let savepoint = |sql: &str| {
            connection
                .prepare_cached(sql)
                .and_then(|mut statement| statement.execute([]))
                .map(drop)
                .context(|| format!("spool savepoint: {sql}"))
                .map_err(TransactionFailed)
        };
        savepoint("SAVEPOINT operation")?;
        let result = self.apply(operation, bodies, emptied);
        match result {
            Ok(()) => savepoint("RELEASE operation")?,
            // On a full disk or an I/O error SQLite may roll back the whole transaction
            // rather than the statement; the savepoint is gone then, and the operations
            // before this one were undone too.
            Err(error) if connection.is_autocommit() => return Err(TransactionFailed(error)),
            Err(_) => {
                savepoint("ROLLBACK TO operation")?;
                savepoint("RELEASE operation")?;
            }
        }
        Ok(result)
    }

    /// One operation's statements.
    fn apply(
        &self,
        operation: &Operation,
        bodies: &[Option<BodyLocation>],
        emptied: &mut Vec<u64>,
    ) -> Result<(), SpoolError> {
        let connection = &self.connection;
        let store_all = |messages: &[NewMessage]| {
            messages
                .iter()
                .zip(bodies)
                .try_for_each(|(message, body)| db::store(connection, message, *body))
        };
        match operation {
            Operation::Store(message) => store_all(std::slice::from_ref(message)),
            Operation::StoreAll(messages) | Operation::Move(messages) => store_all(messages),
            Operation::Update(id, updates) => db::update_recipients(connection, *id, updates),
            Operation::Remove(id) => self.remove_from_database(*id, emptied),
            // The new messages and the outcome commit together or not at all.
            Operation::Outcome { id, updates, remove, new } => {
                store_all(new).and_then(|()| match remove {
                    true => self.remove_from_database(*id, emptied),
                    false => db::update_recipients(connection, *id, updates),
                })
            }
        }
    }

    /// Removes a message from the database, and records the removal there if the message
    /// came from a journal file that still exists (see `journal`): moved before, or by an
    /// earlier operation of this transaction (the journal learns of that move after the
    /// commit, so it still says `Journal`).
    fn remove_from_database(&self, id: QueueId, emptied: &mut Vec<u64>) -> Result<(), SpoolError> {
        db::remove(&self.connection, id, emptied)?;
        if self.journal.residence(id) != Residence::Elsewhere {
            db::mark_journal_removed(&self.connection, id)?;
        }
        Ok(())
    }

    fn roll_back(&self) {
        if !self.connection.is_autocommit()
            && let Err(error) = self.connection.execute_batch("ROLLBACK")
        {
            // The next batch retries it.
            error!(%error, "cannot roll back a spool transaction");
        }
    }
}

/// SQLite reports ENOSPC as SQLITE_FULL only when write(2) fails; from ftruncate,
/// fallocate, the shared-memory file or fsync it reports a generic I/O error, and the errno
/// is out of reach without unsafe code. An I/O error while the file system under `dir` has
/// less room than the batch needs (`needed` octets) is taken for a full disk, so the client
/// gets 452 (insufficient storage, try later) rather than 451.
pub(crate) fn refine(error: SpoolError, dir: &Path, needed: u64) -> SpoolError {
    let SpoolError::Database { error: cause, .. } = &error else { return error };
    if cause.sqlite_error_code() != Some(ErrorCode::SystemIoFailure) {
        return error;
    }
    match rustix::fs::statvfs(dir) {
        Ok(stat) if stat.f_bavail.saturating_mul(stat.f_frsize) < needed => SpoolError::StorageFull,
        _ => error,
    }
}

/// The writer's side of the checkpointer thread.
///
/// The log can only start over (from its first frame, keeping its file small and its
/// pages hot) when a transaction begins with every frame already copied. A checkpoint on
/// another thread never gets there under load: by the time it has copied the log and synced
/// the database, the writer has committed more, and checkpointing again only chases it, two
/// fsyncs at a time. So the work is split: when the log passes [`CHECKPOINT_FRAMES`] the
/// thread copies it (the bulk, and the slow sync of the database); once it has, the writer
/// copies the few frames committed since, between two of its transactions, and the next
/// transaction starts the log over.
pub(crate) struct CheckpointerHandle {
    nudges: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Log frames after the last commit, set by the writer connection's WAL hook.
    frames: Arc<AtomicI32>,
    /// The log's frames at the commit before: fewer now means the log started over.
    last_frames: i32,
    shared: Arc<CheckpointRequests>,
    phase: LogPhase,
    counters: Arc<Counters>,
}

/// What the writer asks of the checkpointer thread.
#[derive(Default)]
struct CheckpointRequests {
    /// Checkpoints asked for, numbered from 1.
    asked: AtomicU64,
    /// The number of the last one asked for when the thread last began a checkpoint, set
    /// when that checkpoint is over.
    done: AtomicU64,
    /// Frames of the log copied into the database, as the thread's last checkpoint left it.
    copied: AtomicI32,
    /// A commit was made without fsync; the thread syncs within [`LAZY_SYNC_DELAY`].
    unsynced: AtomicBool,
}

/// Where the writer is in bringing the log back to its start.
#[derive(Clone, Copy, Debug)]
enum LogPhase {
    /// The thread is asked to checkpoint when the log reaches `until` frames.
    Growing { until: i32 },
    /// The thread is checkpointing; `ticket` is done when [`CheckpointRequests::done`]
    /// reaches it.
    Copying { ticket: u64 },
    /// Everything was copied: the next transaction should start the log over.
    Restarting,
}

impl CheckpointerHandle {
    /// Starts the thread. `connection` is its own read-write connection; `writer` gets the WAL
    /// hook that counts log frames, which also turns off SQLite's automatic checkpoints, which
    /// would run inside the writer's COMMIT and hold every waiter of the batch through two
    /// more fsyncs and the copying.
    pub(crate) fn start(
        connection: Connection,
        log: File,
        writer: &mut Connection,
        counters: Arc<Counters>,
    ) -> Result<CheckpointerHandle, SpoolError> {
        let frames = Arc::new(AtomicI32::new(0));
        let hook_frames = frames.clone();
        writer
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
                hook_frames.store(pages, Ordering::Relaxed);
                Ok(())
            }))
            .context(|| "installing the spool's log hook".into())?;
        // One pending nudge is enough: the thread reads what is asked of it from `shared`.
        let (nudges, receiver) = std::sync::mpsc::sync_channel(1);
        let shared = Arc::new(CheckpointRequests::default());
        let thread = {
            let (shared, counters) = (shared.clone(), counters.clone());
            std::thread::Builder::new()
                .name("spool-checkpoint".into())
                .spawn(move || checkpoint_loop(&connection, &log, &receiver, &shared, &counters))
                .context(|| "starting the spool checkpoint thread".into())?
        };
        Ok(CheckpointerHandle {
            nudges: Some(nudges),
            thread: Some(thread),
            frames,
            last_frames: 0,
            shared,
            phase: LogPhase::Growing { until: CHECKPOINT_FRAMES },
            counters,
        })
    }

    /// Called after each commit, with the writer's connection, outside any transaction.
    fn committed(&mut self, synced: bool, connection: &Connection) {
        if !synced {
            self.shared.unsynced.store(true, Ordering::Release);
            self.nudge();
        }
        let frames = self.frames.load(Ordering::Relaxed);
        if frames < self.last_frames {
            self.counters.log_restarts.fetch_add(1, Ordering::Relaxed);
            self.phase = LogPhase::Growing { until: CHECKPOINT_FRAMES };
        }
        self.last_frames = frames;
        let later = LogPhase::Growing { until: frames.saturating_add(CHECKPOINT_FRAMES) };
        self.phase = match self.phase {
            LogPhase::Growing { until } if frames >= until => {
                let ticket = self.shared.asked.fetch_add(1, Ordering::AcqRel) + 1;
                self.nudge();
                LogPhase::Copying { ticket }
            }
            LogPhase::Copying { ticket } if self.shared.done.load(Ordering::Acquire) >= ticket => {
                let left = frames.saturating_sub(self.shared.copied.load(Ordering::Acquire));
                if left > TAIL_FRAMES {
                    // The thread's checkpoint failed or a reader held it back: the bulk is
                    // still to copy, and the thread's to copy, a little later.
                    LogPhase::Growing { until: frames.saturating_add(TAIL_FRAMES) }
                } else {
                    self.copy_tail(connection, later)
                }
            }
            // Still here a commit after everything was copied: the log did not start over (a
            // reader still held a snapshot taken before the copying ended).
            LogPhase::Restarting => later,
            phase => phase,
        };
    }

    /// The writer's checkpoint of the frames committed while the thread copied the rest;
    /// returns the phase after it (`later` unless everything was copied).
    fn copy_tail(&self, connection: &Connection, later: LogPhase) -> LogPhase {
        // synchronous=NORMAL syncs the log before copying and the database after, as
        // the thread's FULL does.
        match connection.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((log, copied)) => {
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                // Short of everything, a reader's snapshot holds the rest: later.
                if copied == log { LogPhase::Restarting } else { later }
            }
            Err(error) => {
                // BUSY: a lock another connection holds for a moment; PASSIVE does
                // not wait. Anything else is worth seeing.
                if error.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) {
                    debug!(%error, "spool checkpoint by the writer put off");
                } else {
                    warn!(%error, "spool checkpoint by the writer failed");
                }
                later
            }
        }
    }

    fn nudge(&self) {
        if let Some(nudges) = &self.nudges {
            match nudges.try_send(()) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => warn!("the spool checkpoint thread is gone"),
            }
        }
    }

    /// Lets the thread finish its checkpoint, if one is running, and waits for it to close
    /// its connection.
    fn stop(mut self) {
        drop(self.nudges.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the spool checkpoint thread panicked");
        }
    }
}

/// Copies the log back into the database when asked, and syncs commits made without fsync
/// within [`LAZY_SYNC_DELAY`]. A PASSIVE checkpoint never waits for the writer or the
/// readers: it copies what it can, fsyncing the log first and the database after.
fn checkpoint_loop(
    connection: &Connection,
    log: &File,
    nudges: &Receiver<()>,
    shared: &CheckpointRequests,
    counters: &Counters,
) {
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let woken = match unsynced_since {
            None => nudges.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(since) => nudges
                .recv_timeout((since + LAZY_SYNC_DELAY).saturating_duration_since(Instant::now())),
        };
        if let Err(RecvTimeoutError::Disconnected) = woken {
            return;
        }
        if shared.unsynced.swap(false, Ordering::AcqRel) {
            unsynced_since.get_or_insert_with(Instant::now);
        }
        let asked = shared.asked.load(Ordering::Acquire);
        let sync_due = unsynced_since.is_some_and(|since| since.elapsed() >= LAZY_SYNC_DELAY);
        if asked == shared.done.load(Ordering::Acquire) && !sync_due {
            continue;
        }
        // A PASSIVE checkpoint syncs the log only when it has frames to copy, which readers'
        // snapshots can prevent: the records waiting for a sync get one here.
        if unsynced_since.take().is_some() && sync_log(log, counters).is_ok() {
            counters.lazy_syncs.fetch_add(1, Ordering::Relaxed);
        }
        match connection.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((_, copied)) => {
                counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                shared.copied.store(copied, Ordering::Release);
            }
            Err(error) => {
                // Nothing known copied: the writer leaves the bulk to a later checkpoint.
                shared.copied.store(0, Ordering::Release);
                // SQLITE_BUSY: another connection holds a lock a checkpoint needs for a
                // moment (recovering the log when it opens, say); PASSIVE does not wait.
                // Either way the writer goes on, and unsynced commits get a sync in a second.
                if error.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) {
                    debug!(%error, "spool checkpoint put off");
                } else {
                    warn!(%error, "spool checkpoint failed");
                }
            }
        }
        // Even when it failed: the writer then sees how much is left (`copied`).
        shared.done.store(asked, Ordering::Release);
    }
}

/// Each waiter's reply sender with its result.
type Replies = Vec<(oneshot::Sender<Result<(), SpoolError>>, Result<(), SpoolError>)>;

fn reply(replies: Replies) {
    for (waiter, result) in replies {
        // A waiter that has gone away (the client hung up) changes nothing: the outcome
        // stands and recovery or the next listing sees it.
        let _ = waiter.send(result);
    }
}

/// The sync thread: makes committed transactions durable and only then answers their waiters.
///
/// The writer's connection commits without syncing the log (`synchronous=NORMAL`): COMMIT
/// writes the transaction's frames to the log and returns. The writer then hands the batch's replies to
/// this thread and goes on with the next batch while the disk flushes. This thread takes every
/// batch handed over so far, syncs the log (`fdatasync`) once, and answers them all: a sync
/// that starts after a commit's frames were written makes them durable, with every earlier
/// frame of the log. So the writer's work on one batch overlaps the flush of the previous
/// ones, where with `synchronous=FULL` the two took turns. A crash before the sync loses only
/// transactions no one was told about.
pub(crate) struct Syncer {
    batches: Option<std::sync::mpsc::Sender<(Vec<Arc<File>>, Replies)>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(crate) fn start(counters: Arc<Counters>) -> Result<Syncer, SpoolError> {
        // See Counters::log_sync_failed.
        let (batches, receiver) = std::sync::mpsc::channel::<(Vec<Arc<File>>, Replies)>();
        let thread = std::thread::Builder::new()
            .name("spool-sync".into())
            .spawn(move || {
                raise_thread_priority();
                while let Ok((mut files, mut replies)) = receiver.recv() {
                    while let Ok((more_files, more)) = receiver.try_recv() {
                        files.extend(more_files);
                        replies.extend(more);
                    }
                    // Usually one file: the journal's current one.
                    files.sort_unstable_by_key(Arc::as_ptr);
                    files.dedup_by(|a, b| Arc::ptr_eq(a, b));
                    if counters.log_sync_failed.load(Ordering::Relaxed) {
                        reply_failed(replies, log_sync_failed());
                        continue;
                    }
                    match files.iter().try_for_each(|file| sync_file(file, &counters, "the spool"))
                    {
                        Ok(()) => {
                            counters.log_syncs.fetch_add(1, Ordering::Relaxed);
                            reply(replies)
                        }
                        // Written but perhaps not durable: the clients are told to try
                        // again, and a retry may make a duplicate, never a loss.
                        Err(error) => reply_failed(replies, error),
                    }
                }
            })
            .context(|| "starting the spool sync thread".into())?;
        Ok(Syncer { batches: Some(batches), thread: Some(thread) })
    }

    /// Syncs `files` (the journal's, the database's log) and then sends the replies.
    fn sync_then_reply(&self, files: Vec<Arc<File>>, replies: Replies) {
        let Some(batches) = &self.batches else { return reply_closed(replies) };
        if let Err(std::sync::mpsc::SendError((_, replies))) = batches.send((files, replies)) {
            error!("the spool sync thread is gone");
            reply_closed(replies);
        }
    }

    /// Lets the thread sync and answer everything handed over, then waits for it.
    fn stop(mut self) {
        drop(self.batches.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the spool sync thread panicked");
        }
    }
}

/// Never known to be durable: the waiters are told the spool is closed.
fn reply_closed(replies: Replies) {
    reply_failed(replies, SpoolError::Closed);
}

fn reply_failed(replies: Replies, error: SpoolError) {
    reply(
        replies
            .into_iter()
            .map(|(waiter, result)| (waiter, result.and(Err(error.clone()))))
            .collect(),
    );
}

/// Syncs the database's log; see [`sync_file`].
fn sync_log(log: &File, counters: &Counters) -> Result<(), SpoolError> {
    sync_file(log, counters, "the spool log")
}

/// Syncs a file of the spool (the database's log, a journal file). Several threads sync
/// them, through handles of one open file, and Linux reports a failed writeback to only one
/// of them: so whichever sees the failure stops all acknowledgements (see
/// [`Counters::log_sync_failed`]).
pub(crate) fn sync_file(file: &File, counters: &Counters, what: &str) -> Result<(), SpoolError> {
    // One sync at a time: two running at once through one open file would see a failed
    // writeback once between them, and the other would succeed for the same pages. Taken
    // in turns, the second sees the flag the first set.
    let _turn = counters.sync_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(error) = file.sync_data() {
        counters.log_sync_failed.store(true, Ordering::Relaxed);
        let error = SpoolError::io(format!("syncing {what}"), error);
        error!(%error, "spool sync failed; no more mail is accepted until the server is restarted");
        return Err(error);
    }
    match counters.log_sync_failed.load(Ordering::Relaxed) {
        true => Err(log_sync_failed()),
        false => Ok(()),
    }
}

fn log_sync_failed() -> SpoolError {
    SpoolError::Io {
        context: "the spool log could not be synced earlier; restart the server".into(),
        error: Arc::new(std::io::Error::other("spool log sync failed")),
    }
}
