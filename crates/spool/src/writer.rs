//! The writer thread: group commit.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use rusqlite::{Connection, ErrorCode};
use tokio::sync::oneshot;
use tracing::{error, warn};

use crate::error::Context;
use crate::{NewMessage, QueueId, RecipientStatus, SpoolError, SpoolStats, db};

/// At most this many operations share a transaction, so one commit never keeps the first
/// waiter of a long queue waiting for too long.
const MAX_BATCH_OPERATIONS: usize = 512;
/// At most this many content octets share a transaction (one message may exceed it alone),
/// which bounds the memory held by a batch and the size of the log.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Headroom SQLite needs beyond the content for pages, indexes and the log.
const SPACE_SLACK: u64 = 1 << 20;

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
}

pub(crate) struct Request {
    pub(crate) operation: Operation,
    pub(crate) reply: oneshot::Sender<Result<(), SpoolError>>,
}

impl Request {
    fn bytes(&self) -> usize {
        match &self.operation {
            Operation::Store(message) => message.content.len(),
            Operation::StoreAll(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Operation::Outcome { new, .. } => new.iter().map(|m| m.content.len()).sum(),
            Operation::Update(..) | Operation::Remove(_) => 0,
        }
    }
}

/// Shared with [`SqliteSpool::stats`](crate::SqliteSpool).
#[derive(Default)]
pub(crate) struct Counters {
    commits: AtomicU64,
    operations: AtomicU64,
    messages_stored: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SpoolStats {
        SpoolStats {
            commits: self.commits.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
            messages_stored: self.messages_stored.load(Ordering::Relaxed),
        }
    }
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
}

impl Writer {
    /// Serves requests until every sender is gone, then closes the database.
    pub(crate) fn run(self, requests: Receiver<Request>) -> Result<(), SpoolError> {
        // Block for the first request, then take whatever else is already waiting: the
        // requests that arrived during the previous commit's fsync share the next one.
        while let Ok(first) = requests.recv() {
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_OPERATIONS && bytes < MAX_BATCH_BYTES {
                let Ok(request) = requests.try_recv() else { break };
                bytes += request.bytes();
                batch.push(request);
            }
            let results = self.apply_batch(&batch, bytes);
            for (request, result) in batch.into_iter().zip(results) {
                // A waiter that has gone away (the client hung up) changes nothing: the
                // outcome stands and recovery or the next listing sees it.
                let _ = request.reply.send(result);
            }
        }
        // Close before releasing the lock, so that a new owner never shares the files with
        // this connection. The last connection to close checkpoints and removes the log.
        let Writer { connection, lock, .. } = self;
        let closed = connection
            .close()
            .map_err(|(_, error)| SpoolError::database("closing the spool".into(), error));
        drop(lock);
        closed
    }

    /// Applies a batch in one transaction and one fsync; returns each operation's result.
    fn apply_batch(&self, batch: &[Request], bytes: usize) -> Vec<Result<(), SpoolError>> {
        let results = match self.transaction(batch) {
            Ok(results) => results,
            Err(TransactionFailed(error)) => {
                warn!(%error, operations = batch.len(), "spool transaction failed");
                self.roll_back();
                vec![Err(error); batch.len()]
            }
        };
        let needed = bytes as u64 + SPACE_SLACK;
        results
            .into_iter()
            .map(|result| result.map_err(|error| refine(error, &self.dir, needed)))
            .collect()
    }

    fn transaction(
        &self,
        batch: &[Request],
    ) -> Result<Vec<Result<(), SpoolError>>, TransactionFailed> {
        let connection = &self.connection;
        if !connection.is_autocommit() {
            // A rollback after an earlier failure did not go through; retry it rather than
            // fail every later batch with "cannot start a transaction within a transaction".
            connection
                .execute_batch("ROLLBACK")
                .context(|| "rolling back a failed spool transaction".into())
                .map_err(TransactionFailed)?;
        }
        // IMMEDIATE takes the write lock now rather than at the first write, so an outside
        // reader-turned-writer (an operator's sqlite3 shell) cannot make us fail midway.
        connection
            .execute_batch("BEGIN IMMEDIATE")
            .context(|| "starting a spool transaction".into())
            .map_err(TransactionFailed)?;
        let mut results = Vec::with_capacity(batch.len());
        for request in batch {
            results.push(self.apply_in_savepoint(&request.operation)?);
        }
        let (mut durable, mut stored) = (0, 0);
        for (request, result) in batch.iter().zip(&results) {
            if result.is_ok() {
                durable += 1;
                stored += match &request.operation {
                    Operation::Store(_) => 1,
                    Operation::StoreAll(messages) => messages.len() as u64,
                    Operation::Outcome { new, .. } => new.len() as u64,
                    Operation::Update(..) | Operation::Remove(_) => 0,
                };
            }
        }
        if durable == 0 {
            // Nothing to make durable: skip the fsync.
            self.roll_back();
            return Ok(results);
        }
        connection
            .execute_batch("COMMIT")
            .context(|| format!("committing {durable} spool operations"))
            .map_err(TransactionFailed)?;
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters.operations.fetch_add(durable, Ordering::Relaxed);
        self.counters.messages_stored.fetch_add(stored, Ordering::Relaxed);
        Ok(results)
    }

    /// Runs one operation in a savepoint, so its failure undoes only its own changes. The
    /// outer result is for failures that end the transaction.
    fn apply_in_savepoint(
        &self,
        operation: &Operation,
    ) -> Result<Result<(), SpoolError>, TransactionFailed> {
        let connection = &self.connection;
        let savepoint = |sql: &str| {
            connection
                .execute_batch(sql)
                .context(|| format!("spool savepoint: {sql}"))
                .map_err(TransactionFailed)
        };
        savepoint("SAVEPOINT operation")?;
        let result = match operation {
            Operation::Store(message) => db::store(connection, message),
            Operation::StoreAll(messages) => {
                messages.iter().try_for_each(|message| db::store(connection, message))
            }
            Operation::Update(id, updates) => db::update_recipients(connection, *id, updates),
            Operation::Remove(id) => db::remove(connection, *id),
            // All in the one savepoint: the new messages and the outcome commit together or
            // not at all.
            Operation::Outcome { id, updates, remove, new } => new
                .iter()
                .try_for_each(|message| db::store(connection, message))
                .and_then(|()| match remove {
                    true => db::remove(connection, *id),
                    false => db::update_recipients(connection, *id, updates),
                }),
        };
        match result {
            Ok(()) => savepoint("RELEASE operation")?,
            // On a full disk or an I/O error SQLite may roll back the whole transaction
            // rather than the statement; the savepoint is gone then, and the operations
            // before this one were undone too.
            Err(error) if connection.is_autocommit() => return Err(TransactionFailed(error)),
            Err(_) => savepoint("ROLLBACK TO operation; RELEASE operation")?,
        }
        Ok(result)
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
