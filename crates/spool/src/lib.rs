//! The durable message queue.
//!
//! RFC 5321 section 6.1: "When the receiver-SMTP accepts a piece of mail (by sending a "250 OK"
//! message in response to DATA), it is accepting responsibility for delivering or relaying
//! the message. It must take this responsibility seriously." A server may only send that 250
//! once the message would survive a crash, so [`QueueStore::store`] resolves only after the
//! message, its envelope and its recipients are committed to SQLite in WAL mode with
//! `synchronous=FULL`: the commit returns after the write-ahead log is fsync'ed.
//!
//! One writer thread owns the database. It takes every request already waiting, applies them
//! in one transaction and commits once, so concurrent SMTP sessions share each fsync (group
//! commit): more sessions, more messages per fsync. A transaction is atomic, so a crash at any
//! moment leaves either the whole message or nothing; recovery is SQLite's own WAL replay.

#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use smtp_proto::{BodyType, Notify, OriginalRecipient, Ret};
use tokio::sync::oneshot;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Most operations applied in one transaction.
const MAX_BATCH_OPERATIONS: usize = 512;
/// Most message octets applied in one transaction, so a batch stays bounded in memory and time.
const MAX_BATCH_BYTES: usize = 64 << 20;
const SCHEMA_VERSION: i32 = 1;

/// A queue id: unique, increasing with arrival time. The top bits are milliseconds since the
/// Unix epoch, the low 20 bits a sequence, so ids sort by arrival as numbers and as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u64);

const BASE32: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl QueueId {
    /// A new id, greater than every id this process generated before, even if the clock
    /// steps back.
    pub fn generate() -> QueueId {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let millis =
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let candidate = millis << 20;
        let mut last = LAST.load(Ordering::Relaxed);
        loop {
            let next = candidate.max(last + 1);
            match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return QueueId(next),
                Err(seen) => last = seen,
            }
        }
    }
}

impl fmt::Display for QueueId {
    /// 13 characters of Crockford base32 (the alphabet is in ASCII order, so string order is
    /// numeric order).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 13];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (12 - i);
            *slot = BASE32[((self.0 >> shift) & 31) as usize];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for QueueId {
    type Err = SpoolError;

    fn from_str(text: &str) -> Result<QueueId, SpoolError> {
        let invalid = || SpoolError::InvalidId(text.to_string());
        if text.len() != 13 {
            return Err(invalid());
        }
        let mut value: u64 = 0;
        for (i, c) in text.bytes().enumerate() {
            let digit =
                BASE32.iter().position(|&b| b == c.to_ascii_uppercase()).ok_or_else(invalid)?
                    as u64;
            // The first character carries only the top 4 bits.
            if i == 0 && digit > 15 {
                return Err(invalid());
            }
            value = (value << 5) | digit;
        }
        Ok(QueueId(value))
    }
}

/// What the server knew about a message when it accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path without brackets; empty for the null sender.
    pub sender: String,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// TLS version and cipher; None for plaintext.
    pub tls: Option<String>,
    pub authenticated_as: Option<String>,
    pub received_at: SystemTime,
}

/// One recipient and its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The final address to deliver to.
    pub address: String,
    /// The RCPT TO address as the client gave it.
    pub original: String,
    pub notify: Option<Notify>,
    pub orcpt: Option<OriginalRecipient>,
    pub status: RecipientStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientStatus {
    Pending,
    Deferred { attempts: u32, next_attempt: SystemTime, last_error: String },
    Delivered { at: SystemTime, detail: String },
    Failed { at: SystemTime, error: String },
}

impl RecipientStatus {
    /// Delivered or failed: nothing more will be tried.
    pub fn is_final(&self) -> bool {
        matches!(self, RecipientStatus::Delivered { .. } | RecipientStatus::Failed { .. })
    }
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    /// The message as it will be delivered (with our Received field).
    pub content: Vec<u8>,
}

/// A stored message without its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// The file system is full: the operation was not applied.
    #[error("spool storage is full")]
    StorageFull,
    #[error("message {0} is not in the spool")]
    NotFound(QueueId),
    #[error("{0:?} is not a queue id")]
    InvalidId(String),
    #[error("spool I/O error: {0}")]
    Io(String),
    #[error("spool database error: {0}")]
    Database(String),
    /// The writer thread has stopped.
    #[error("the spool is closed")]
    Closed,
}

impl From<rusqlite::Error> for SpoolError {
    fn from(error: rusqlite::Error) -> SpoolError {
        match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => SpoolError::StorageFull,
            Some(ErrorCode::SystemIoFailure) => SpoolError::Io(error.to_string()),
            _ => SpoolError::Database(error.to_string()),
        }
    }
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Committed (fsync'ed) transactions.
    pub commits: u64,
    /// Operations (store, update, remove) applied.
    pub operations: u64,
    pub messages_stored: u64,
}

/// The queue as the server and delivery code see it. A PostgreSQL implementation can sit
/// behind the same trait.
pub trait QueueStore: Send + Sync + 'static {
    /// Stores a message; durable once the future resolves `Ok`.
    fn store(&self, message: NewMessage) -> BoxFuture<'_, Result<(), SpoolError>>;
    fn load_content(&self, id: QueueId) -> BoxFuture<'_, Result<Vec<u8>, SpoolError>>;
    /// Durably records new statuses for recipients, by index.
    fn update_recipients(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
    ) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Durably deletes a message with its content and recipients.
    fn remove(&self, id: QueueId) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Every queued message, oldest first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<QueuedMessage>, SpoolError>>;
    fn stats(&self) -> SpoolStats;
}

enum Operation {
    Store(NewMessage),
    Update(QueueId, Vec<(usize, RecipientStatus)>),
    Remove(QueueId),
}

struct Request {
    operation: Operation,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    operations: AtomicU64,
    messages_stored: AtomicU64,
}

/// The SQLite queue store.
pub struct SqliteSpool {
    writer: mpsc::Sender<Request>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    counters: Arc<Counters>,
}

impl SqliteSpool {
    /// Opens (or creates) the spool in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<SqliteSpool, SpoolError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SpoolError::Io(format!("creating {}: {e}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| SpoolError::Io(format!("setting the mode of {}: {e}", dir.display())))?;
        let path = dir.join("queue.db");
        // SQLite gives the -wal and -shm files the mode of the database file.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SpoolError::Io(format!("creating {}: {e}", path.display())))?;
        let connection = open_connection(&path)?;
        migrate(&connection)?;
        let (writer, requests) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_loop(connection, requests, &thread_counters))
            .map_err(|e| SpoolError::Io(format!("starting the spool writer: {e}")))?;
        Ok(SqliteSpool { writer, readers: Arc::new(Mutex::new(Vec::new())), path, counters })
    }

    async fn submit(&self, operation: Operation) -> Result<(), SpoolError> {
        let (done, result) = oneshot::channel();
        self.writer.send(Request { operation, done }).map_err(|_| SpoolError::Closed)?;
        result.await.map_err(|_| SpoolError::Closed)?
    }

    /// Runs `read` on a pooled read connection in the blocking thread pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let connection = match pooled {
                Some(connection) => connection,
                None => open_connection(&path)?,
            };
            let result = read(&connection);
            readers.lock().unwrap_or_else(|p| p.into_inner()).push(connection);
            result
        })
        .await
        .map_err(|e| SpoolError::Io(format!("spool reader task: {e}")))?
    }
}

fn open_connection(path: &Path) -> Result<Connection, SpoolError> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(30))?;
    // WAL: one fsync per commit, readers never block the writer. FULL: the WAL is fsync'ed at
    // every commit, which is what makes a commit durable.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}

fn migrate(connection: &Connection) -> Result<(), SpoolError> {
    let version: i32 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(SpoolError::Database(format!(
            "spool schema version {version} is newer than this program's {SCHEMA_VERSION}"
        )));
    }
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS message (
             id INTEGER PRIMARY KEY,
             envelope TEXT NOT NULL,
             size INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS content (
             id INTEGER PRIMARY KEY,
             data BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS recipient (
             message_id INTEGER NOT NULL,
             idx INTEGER NOT NULL,
             data TEXT NOT NULL,
             PRIMARY KEY (message_id, idx)
         ) WITHOUT ROWID;",
    )?;
    connection.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// The writer thread: batches waiting requests into one transaction each.
fn write_loop(mut connection: Connection, requests: mpsc::Receiver<Request>, counters: &Counters) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        let mut bytes = batch_bytes(&batch[0]);
        while batch.len() < MAX_BATCH_OPERATIONS && bytes < MAX_BATCH_BYTES {
            match requests.try_recv() {
                Ok(request) => {
                    bytes += batch_bytes(&request);
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let results = apply_batch(&mut connection, &batch);
        let stored = batch
            .iter()
            .zip(&results)
            .filter(|(r, ok)| matches!(r.operation, Operation::Store(_)) && ok.is_ok())
            .count();
        counters.operations.fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.messages_stored.fetch_add(stored as u64, Ordering::Relaxed);
        counters.commits.fetch_add(1, Ordering::Relaxed);
        for (request, result) in batch.into_iter().zip(results) {
            let _ = request.done.send(result);
        }
    }
}

fn batch_bytes(request: &Request) -> usize {
    match &request.operation {
        Operation::Store(message) => message.content.len(),
        _ => 0,
    }
}

/// Applies a batch in one transaction. Each operation runs inside a savepoint, so one failing
/// operation fails only its own caller; a failed commit fails them all.
fn apply_batch(connection: &mut Connection, batch: &[Request]) -> Vec<Result<(), SpoolError>> {
    let mut transaction =
        match connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(transaction) => transaction,
            Err(error) => {
                let error = SpoolError::from(error);
                return batch.iter().map(|_| Err(error.clone())).collect();
            }
        };
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        let result = (|| {
            let savepoint = transaction.savepoint()?;
            apply(&savepoint, &request.operation)?;
            savepoint.commit()?;
            Ok(())
        })();
        results.push(result);
    }
    if let Err(error) = transaction.commit() {
        let error = SpoolError::from(error);
        return batch.iter().map(|_| Err(error.clone())).collect();
    }
    results
}

fn apply(connection: &Connection, operation: &Operation) -> Result<(), SpoolError> {
    match operation {
        Operation::Store(message) => {
            let id = message.id.0 as i64;
            let envelope = serde_json::to_string(&StoredEnvelope::from(&message.envelope))
                .map_err(|e| SpoolError::Database(format!("encoding the envelope: {e}")))?;
            connection
                .prepare_cached("INSERT INTO message (id, envelope, size) VALUES (?1, ?2, ?3)")?
                .execute(params![id, envelope, message.content.len() as i64])?;
            connection
                .prepare_cached("INSERT INTO content (id, data) VALUES (?1, ?2)")?
                .execute(params![id, message.content])?;
            let mut insert = connection.prepare_cached(
                "INSERT INTO recipient (message_id, idx, data) VALUES (?1, ?2, ?3)",
            )?;
            for (index, recipient) in message.recipients.iter().enumerate() {
                insert.execute(params![id, index as i64, encode_recipient(recipient)?])?;
            }
        }
        Operation::Update(id, updates) => {
            let mut select = connection
                .prepare_cached("SELECT data FROM recipient WHERE message_id = ?1 AND idx = ?2")?;
            let mut update = connection.prepare_cached(
                "UPDATE recipient SET data = ?3 WHERE message_id = ?1 AND idx = ?2",
            )?;
            for (index, status) in updates {
                let data: Option<String> = select
                    .query_row(params![id.0 as i64, *index as i64], |row| row.get(0))
                    .optional()?;
                let data = data.ok_or(SpoolError::NotFound(*id))?;
                let mut recipient = decode_recipient(&data)?;
                recipient.status = status.clone();
                update.execute(params![
                    id.0 as i64,
                    *index as i64,
                    encode_recipient(&recipient)?
                ])?;
            }
        }
        Operation::Remove(id) => {
            let id = id.0 as i64;
            connection
                .prepare_cached("DELETE FROM recipient WHERE message_id = ?1")?
                .execute([id])?;
            connection.prepare_cached("DELETE FROM content WHERE id = ?1")?.execute([id])?;
            connection.prepare_cached("DELETE FROM message WHERE id = ?1")?.execute([id])?;
        }
    }
    Ok(())
}

impl QueueStore for SqliteSpool {
    fn store(&self, message: NewMessage) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Store(message)))
    }

    fn load_content(&self, id: QueueId) -> BoxFuture<'_, Result<Vec<u8>, SpoolError>> {
        Box::pin(self.read(move |connection| {
            connection
                .prepare_cached("SELECT data FROM content WHERE id = ?1")?
                .query_row([id.0 as i64], |row| row.get(0))
                .optional()?
                .ok_or(SpoolError::NotFound(id))
        }))
    }

    fn update_recipients(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
    ) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Update(id, updates)))
    }

    fn remove(&self, id: QueueId) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Remove(id)))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<QueuedMessage>, SpoolError>> {
        Box::pin(self.read(|connection| {
            let mut messages = Vec::new();
            let mut select =
                connection.prepare("SELECT id, envelope, size FROM message ORDER BY id")?;
            let mut recipients = connection
                .prepare("SELECT data FROM recipient WHERE message_id = ?1 ORDER BY idx")?;
            let rows = select.query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
            })?;
            for row in rows {
                let (id, envelope, size) = row?;
                let envelope: StoredEnvelope = serde_json::from_str(&envelope).map_err(|e| {
                    SpoolError::Database(format!(
                        "decoding the envelope of {}: {e}",
                        QueueId(id as u64)
                    ))
                })?;
                let recipients = recipients
                    .query_map([id], |row| row.get::<_, String>(0))?
                    .map(|data| decode_recipient(&data?))
                    .collect::<Result<Vec<_>, _>>()?;
                messages.push(QueuedMessage {
                    id: QueueId(id as u64),
                    envelope: envelope.into_envelope()?,
                    recipients,
                    size: size as u64,
                });
            }
            Ok(messages)
        }))
    }

    fn stats(&self) -> SpoolStats {
        SpoolStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
            messages_stored: self.counters.messages_stored.load(Ordering::Relaxed),
        }
    }
}

// The stored (JSON) forms. smtp-proto stays free of serde; these mirror its types.

#[derive(Serialize, Deserialize)]
struct StoredEnvelope {
    sender: String,
    body: String,
    smtputf8: bool,
    ret: Option<String>,
    envid: Option<String>,
    client_ip: IpAddr,
    helo: String,
    tls: Option<String>,
    authenticated_as: Option<String>,
    received_at_ms: u64,
}

impl From<&Envelope> for StoredEnvelope {
    fn from(envelope: &Envelope) -> StoredEnvelope {
        StoredEnvelope {
            sender: envelope.sender.clone(),
            body: envelope.body.as_str().to_string(),
            smtputf8: envelope.smtputf8,
            ret: envelope.ret.map(|ret| ret.as_str().to_string()),
            envid: envelope.envid.clone(),
            client_ip: envelope.client_ip,
            helo: envelope.helo.clone(),
            tls: envelope.tls.clone(),
            authenticated_as: envelope.authenticated_as.clone(),
            received_at_ms: to_millis(envelope.received_at),
        }
    }
}

impl StoredEnvelope {
    fn into_envelope(self) -> Result<Envelope, SpoolError> {
        let body = match self.body.as_str() {
            "7BIT" => BodyType::SevenBit,
            "8BITMIME" => BodyType::EightBitMime,
            "BINARYMIME" => BodyType::BinaryMime,
            other => return Err(SpoolError::Database(format!("unknown body type {other:?}"))),
        };
        let ret = match self.ret.as_deref() {
            None => None,
            Some("FULL") => Some(Ret::Full),
            Some("HDRS") => Some(Ret::Headers),
            Some(other) => return Err(SpoolError::Database(format!("unknown RET {other:?}"))),
        };
        Ok(Envelope {
            sender: self.sender,
            body,
            smtputf8: self.smtputf8,
            ret,
            envid: self.envid,
            client_ip: self.client_ip,
            helo: self.helo,
            tls: self.tls,
            authenticated_as: self.authenticated_as,
            received_at: from_millis(self.received_at_ms),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredRecipient {
    address: String,
    original: String,
    /// `[success, failure, delay]`.
    notify: Option<[bool; 3]>,
    orcpt: Option<(String, String)>,
    status: StoredStatus,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum StoredStatus {
    Pending,
    Deferred { attempts: u32, next_attempt_ms: u64, last_error: String },
    Delivered { at_ms: u64, detail: String },
    Failed { at_ms: u64, error: String },
}

fn encode_recipient(recipient: &Recipient) -> Result<String, SpoolError> {
    let status = match &recipient.status {
        RecipientStatus::Pending => StoredStatus::Pending,
        RecipientStatus::Deferred { attempts, next_attempt, last_error } => {
            StoredStatus::Deferred {
                attempts: *attempts,
                next_attempt_ms: to_millis(*next_attempt),
                last_error: last_error.clone(),
            }
        }
        RecipientStatus::Delivered { at, detail } => {
            StoredStatus::Delivered { at_ms: to_millis(*at), detail: detail.clone() }
        }
        RecipientStatus::Failed { at, error } => {
            StoredStatus::Failed { at_ms: to_millis(*at), error: error.clone() }
        }
    };
    let stored = StoredRecipient {
        address: recipient.address.clone(),
        original: recipient.original.clone(),
        notify: recipient.notify.map(|n| [n.success, n.failure, n.delay]),
        orcpt: recipient.orcpt.as_ref().map(|o| (o.addr_type.clone(), o.address.clone())),
        status,
    };
    serde_json::to_string(&stored)
        .map_err(|e| SpoolError::Database(format!("encoding a recipient: {e}")))
}

fn decode_recipient(data: &str) -> Result<Recipient, SpoolError> {
    let stored: StoredRecipient = serde_json::from_str(data)
        .map_err(|e| SpoolError::Database(format!("decoding a recipient: {e}")))?;
    let status = match stored.status {
        StoredStatus::Pending => RecipientStatus::Pending,
        StoredStatus::Deferred { attempts, next_attempt_ms, last_error } => {
            RecipientStatus::Deferred {
                attempts,
                next_attempt: from_millis(next_attempt_ms),
                last_error,
            }
        }
        StoredStatus::Delivered { at_ms, detail } => {
            RecipientStatus::Delivered { at: from_millis(at_ms), detail }
        }
        StoredStatus::Failed { at_ms, error } => {
            RecipientStatus::Failed { at: from_millis(at_ms), error }
        }
    };
    Ok(Recipient {
        address: stored.address,
        original: stored.original,
        notify: stored.notify.map(|[success, failure, delay]| Notify { success, failure, delay }),
        orcpt: stored.orcpt.map(|(addr_type, address)| OriginalRecipient { addr_type, address }),
        status,
    })
}

fn to_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn from_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

#[cfg(test)]
mod tests;
