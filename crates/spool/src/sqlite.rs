//! [`SqliteSpool`]: opening the spool, the reader pool and the [`QueueStore`] implementation.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;
use tracing::warn;

use crate::error::Context;
use crate::journal::{self, Journal, Residence, SharedIndex};
use crate::segments::Segments;
use crate::writer::{CheckpointerHandle, Counters, Operation, Request, Syncer, Writer};
use crate::{
    BoxFuture, NewMessage, QueueId, QueueStore, QueuedMessage, RecipientStatus, SpoolError,
    SpoolStats, db,
};

const DATABASE: &str = "queue.db";
/// Held (flock) by the process that has the spool open.
const LOCK: &str = "lock";
/// How long opening waits for the lock file; see `lock`.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How long a connection waits for a lock held by another connection (an operator's
/// `sqlite3` shell, a checkpoint) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept for reuse; more are opened when reads pile up. Enough for the
/// message loads of a busy queue manager (one per delivery under way), so a connection is
/// not opened and closed, with its log file, for each message.
const IDLE_READERS: usize = 16;
/// Times [`SqliteSpool::read_queue`] reads the journal and the database again when journal
/// files were freed meanwhile.
const READ_QUEUE_ATTEMPTS: u32 = 5;
/// After a checkpoint the log is truncated back to this size; without a limit it keeps the
/// size of the largest batch ever written.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// The SQLite queue store; see the crate documentation for its durability argument.
pub struct SqliteSpool {
    /// `None` only while closing: dropping the sender is what stops the writer.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<Result<(), SpoolError>>>,
    readers: Arc<Readers>,
    pub(crate) counters: Arc<Counters>,
}

impl SqliteSpool {
    /// Opens the spool in `dir`, creating the directory (mode 0700) and `queue.db` (0600)
    /// if needed, checks the queue metadata and starts the writer thread. Fails if the spool
    /// is already open, in this process or another.
    pub fn open(dir: &Path) -> Result<SqliteSpool, SpoolError> {
        SqliteSpool::open_with(dir, journal::Limits::default())
    }

    /// [`SqliteSpool::open`] with other journal limits (small ones, for tests).
    pub(crate) fn open_with(
        dir: &Path,
        journal_limits: journal::Limits,
    ) -> Result<SqliteSpool, SpoolError> {
        create_private_dir(dir)?;
        let lock = lock(&dir.join(LOCK))?;
        let path = dir.join(DATABASE);
        create_private_file(&path)?;
        // SQLite creates the -wal and -shm files with the mode of the database file, but a
        // crash leaves them behind, perhaps from a time when that mode was laxer.
        for suffix in ["-wal", "-shm"] {
            let mut name = path.clone().into_os_string();
            name.push(suffix);
            match fs::set_permissions(&name, fs::Permissions::from_mode(0o600)) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                result => {
                    result.context(|| format!("restricting {}", Path::new(&name).display()))?
                }
            }
        }
        // Make the new directory entries durable before anything is stored under them.
        sync_dir(dir)?;

        let mut connection = open_writer(&path)?;
        db::migrate(&connection)?;
        db::check_metadata(&connection)?;
        let mut log_path = path.clone().into_os_string();
        log_path.push("-wal");
        let log_path = PathBuf::from(log_path);
        let log = File::open(&log_path).context(|| format!("opening {}", log_path.display()))?;
        // After a kill -9 the log may hold removals that reached the page cache but not the
        // disk. Segments they emptied are deleted below: the removals must be durable first.
        log.sync_data().context(|| format!("syncing {}", log_path.display()))?;
        let segments = Segments::open(dir, &db::referenced_segments(&connection)?)?;
        let segments_dir = segments.dir().to_path_buf();
        let counters = Arc::new(Counters::default());
        // After the log's sync: a message the journal still has and SQLite has too (or
        // removed after taking it) moved there, durably. Most of the journal's messages are
        // newer than anything in the database and need no look-up there.
        let highest_database_id = db::highest_id(&connection)?;
        let removed = db::journal_removed(&connection)?;
        let journal = Journal::open(dir, journal_limits, counters.clone(), &mut |id| {
            Ok(removed.contains(&id) || (id <= highest_database_id && db::exists(&connection, id)?))
        })?;
        // Removals of messages whose journal files are gone (freed before a crash let the
        // writer forget them).
        db::forget_journal_removals(&connection, |id| {
            journal.residence(id) != Residence::Elsewhere
        })?;
        let journal_index = journal.index();
        // From here on the writer's commits do not sync the log; the sync thread does before
        // anyone is answered (see writer::Syncer). NORMAL rather than OFF: in WAL mode NORMAL
        // skips the sync at commit but keeps the one SQLite makes of a new log header when it
        // starts the log over, without which a crash could replay an old frame over newer data.
        connection
            .pragma_update(None, "synchronous", "NORMAL")
            .context(|| "setting synchronous = NORMAL on the writer".into())?;

        // The checkpoint thread syncs the log through its own handle; the writer and the
        // sync thread share one.
        let checkpoint_log =
            log.try_clone().context(|| format!("opening {}", log_path.display()))?;
        let syncer = Syncer::start(counters.clone())?;
        let checkpointer = CheckpointerHandle::start(
            open_checkpointer(&path)?,
            checkpoint_log,
            &mut connection,
            counters.clone(),
        )?;
        let writer = Writer {
            connection,
            dir: dir.to_path_buf(),
            counters: counters.clone(),
            lock,
            checkpointer,
            syncer,
            segments,
            log: Arc::new(log),
            journal,
            highest_database_id,
        };
        let (requests, receiver) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                crate::writer::raise_thread_priority();
                writer.run(receiver)
            })
            .context(|| "starting the spool writer thread".into())?;
        Ok(SqliteSpool {
            requests: Some(requests),
            writer: Some(writer),
            readers: Arc::new(Readers {
                path,
                segments_dir,
                journal: journal_index,
                idle: Mutex::new(Vec::new()),
            }),
            counters,
        })
    }

    /// The queue in `dir`, read without opening the spool (while the server has it open,
    /// say): every message with its recipients, oldest first. A snapshot, as of a moment
    /// during the call.
    pub fn read_queue(dir: &Path) -> Result<Vec<QueuedMessage>, SpoolError> {
        let mut connection = open_reader(&dir.join(DATABASE))?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (in_journal, files) = journal::read_only(dir)?;
            // After the journal: a message moving meanwhile is found in both, never in
            // neither.
            let (in_database, removed) = db::list_with_journal_removed(&mut connection)?;
            // A journal file freed since it was read may have held a message moved to the
            // database and removed there, whose removal row went with the file: read again.
            // A busy server frees files often; after a few attempts the listing stands as it
            // is, which at worst shows such a message once more.
            if files.unchanged()? || attempts == READ_QUEUE_ATTEMPTS {
                let in_journal =
                    in_journal.into_iter().filter(|m| !removed.contains(&m.id)).collect();
                return Ok(merge_by_id(in_database, in_journal));
            }
        }
    }

    /// Stops the writer after it has finished every operation already submitted, and closes
    /// the database. Dropping the spool does the same but can only log errors.
    pub fn close(mut self) -> Result<(), SpoolError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SpoolError> {
        // Idle readers go first, so that the writer's connection is the last one and its
        // close checkpoints the log into the database and removes it.
        self.readers.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
        drop(self.requests.take());
        match self.writer.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(SpoolError::Io {
                context: "stopping the spool writer".into(),
                error: Arc::new(io::Error::other("the writer thread panicked")),
            }),
        }
    }

    async fn submit(&self, operation: Operation) -> Result<(), SpoolError> {
        let (reply, result) = oneshot::channel();
        let requests = self.requests.as_ref().ok_or(SpoolError::Closed)?;
        requests.send(Request { operation, reply }).map_err(|_| SpoolError::Closed)?;
        // The writer drops the reply sender without answering only if it died.
        result.await.map_err(|_| SpoolError::Closed)?
    }

    /// Runs `read` on a read connection in tokio's blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut Connection) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(read)).await.map_err(|error| {
            SpoolError::Io {
                context: "running a spool read".into(),
                error: Arc::new(io::Error::other(error)),
            }
        })?
    }
}

impl Drop for SqliteSpool {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            warn!(%error, "closing the spool");
        }
    }
}

impl QueueStore for SqliteSpool {
    fn store(&self, message: NewMessage) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Store(message)))
    }

    fn load_content(&self, id: QueueId) -> BoxFuture<'_, Result<Vec<u8>, SpoolError>> {
        let (segments_dir, journal) =
            (self.readers.segments_dir.clone(), self.readers.journal.clone());
        Box::pin(self.read(move |connection| match journal::load_content(&journal, id) {
            Some(content) => content,
            None => db::load_content(connection, &segments_dir, id),
        }))
    }

    fn update_recipients(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
    ) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Update(id, updates)))
    }

    fn store_all(&self, messages: Vec<NewMessage>) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::StoreAll(messages)))
    }

    fn record_outcome(
        &self,
        id: QueueId,
        updates: Vec<(usize, RecipientStatus)>,
        remove: bool,
        new: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Outcome { id, updates, remove, new }))
    }

    fn remove(&self, id: QueueId) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.submit(Operation::Remove(id)))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<QueuedMessage>, SpoolError>> {
        let journal = self.readers.journal.clone();
        Box::pin(self.read(move |connection| {
            // The journal first: a message moving to SQLite meanwhile is then found in both
            // (and listed once), never in neither.
            let in_journal = journal::list(&journal)?;
            let in_database = db::list(connection)?;
            Ok(merge_by_id(in_database, in_journal))
        }))
    }

    fn stats(&self) -> SpoolStats {
        self.counters.snapshot()
    }
}

/// Read-only connections. In WAL mode they read the last committed state without blocking
/// the writer or waiting for it.
struct Readers {
    path: PathBuf,
    segments_dir: PathBuf,
    journal: SharedIndex,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn with<T>(
        &self,
        read: impl FnOnce(&mut Connection) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        // A panic while the lock was held cannot leave the list half-changed.
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut connection = match idle {
            Some(connection) => connection,
            None => open_reader(&self.path)?,
        };
        let result = read(&mut connection);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(connection);
        }
        result
    }
}

/// Two lists of messages sorted by id as one; a message in both is taken from the first.
fn merge_by_id(first: Vec<QueuedMessage>, second: Vec<QueuedMessage>) -> Vec<QueuedMessage> {
    let mut merged = Vec::with_capacity(first.len() + second.len());
    let mut second = second.into_iter().peekable();
    for message in first {
        while let Some(earlier) = second.next_if(|other| other.id < message.id) {
            merged.push(earlier);
        }
        second.next_if(|other| other.id == message.id);
        merged.push(message);
    }
    merged.extend(second);
    merged
}

/// A connection to the spool database, waiting up to [`BUSY_TIMEOUT`] for locks.
fn open_connection(
    path: &Path,
    writable: bool,
    context: impl Fn() -> String,
) -> Result<Connection, SpoolError> {
    let access = match writable {
        true => OpenFlags::SQLITE_OPEN_READ_WRITE,
        false => OpenFlags::SQLITE_OPEN_READ_ONLY,
    };
    let connection = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .context(&context)?;
    connection.busy_timeout(BUSY_TIMEOUT).context(&context)?;
    Ok(connection)
}

fn open_writer(path: &Path) -> Result<Connection, SpoolError> {
    let context = || format!("opening {}", path.display());
    let connection = open_connection(path, true, context)?;
    // WAL: a commit appends to the log and fsyncs it once, and readers never block the
    // writer. The mode is stored in the database; check that it took, because SQLite keeps
    // the old mode silently when it cannot switch (e.g. without shared memory support).
    let mode: String =
        connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).context(context)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SpoolError::Corrupt(format!(
            "{} stays in journal mode {mode:?}; the spool needs WAL",
            path.display()
        )));
    }
    // FULL while the spool opens (the schema, its checks). Once the writer thread runs, its
    // commits do not sync and the sync thread syncs the log before any reply; see
    // writer::Syncer.
    connection.pragma_update(None, "synchronous", "FULL").context(context)?;
    connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT).context(context)?;
    Ok(connection)
}

/// The checkpointer's connection. FULL: a checkpoint fsyncs the log before it copies and
/// the database after.
fn open_checkpointer(path: &Path) -> Result<Connection, SpoolError> {
    let context = || format!("opening {} for checkpoints", path.display());
    let connection = open_connection(path, true, context)?;
    connection.pragma_update(None, "synchronous", "FULL").context(context)?;
    connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT).context(context)?;
    Ok(connection)
}

fn open_reader(path: &Path) -> Result<Connection, SpoolError> {
    open_connection(path, false, || format!("opening {} for reading", path.display()))
}

/// Creates `dir` (and missing parents) with mode 0700 and tightens an existing one: queued
/// mail is private.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SpoolError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|ancestor| !ancestor.exists()).collect();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .context(|| format!("restricting {}", dir.display()))?;
    // A new directory's entry lives in its parent, which must reach the disk too.
    for created in missing.into_iter().rev() {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Creates `path` with mode 0600 unless it exists, and tightens it if it does.
fn create_private_file(path: &Path) -> Result<File, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .context(|| format!("creating {}", path.display()))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .context(|| format!("restricting {}", path.display()))?;
    Ok(file)
}

/// Takes the spool's process lock. Two processes on one spool would both deliver every
/// message.
fn lock(path: &Path) -> Result<File, SpoolError> {
    let file = create_private_file(path)?;
    let started = Instant::now();
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            // A child process between fork and exec holds a copy of every descriptor of its
            // parent, a previous owner's lock included, for a moment. A lock still held after
            // LOCK_WAIT belongs to a live owner.
            Err(rustix::io::Errno::WOULDBLOCK) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                return Err(io::Error::from(error)).context(|| {
                    format!("locking {}: is another instance using this spool?", path.display())
                });
            }
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .context(|| format!("syncing the directory {}", dir.display()))
}
