//! Crash-safe delivery of messages into Maildir mailboxes.
//!
//! Each mailbox lives at `<root>/<mailbox>/` and holds the usual `tmp/`,
//! `new/` and `cur/` subdirectories. A delivery follows the maildir
//! protocol, made durable:
//!
//! 1. create a file in `tmp/`: on Linux an unnamed one (`O_TMPFILE`, mode
//!    0600), elsewhere a uniquely named one (`O_CREAT | O_EXCL`),
//! 2. write the whole message and `fsync` the file,
//! 3. hard-link it into `new/` under a unique name (a link never replaces an
//!    existing entry; filesystems without hard links fall back to `rename`),
//! 4. `fsync` the `new/` directory, and only then
//! 5. unlink the `tmp/` name, if it has one.
//!
//! A message is therefore either complete in `new/` or absent from it, even
//! after `kill -9` or a power failure. With a named `tmp/` file, a crash
//! between steps 3 and 5 can leave a stale copy in `tmp/`, which maildir
//! readers ignore and which tmp cleaners remove (the usual rule is anything
//! older than 36 hours); an unnamed file simply disappears with the crash.
//!
//! The unnamed file is not only tidier. Creating and unlinking names in
//! `tmp/` takes the directory's lock twice per message, so concurrent
//! deliveries into one mailbox queue behind each other while the file system
//! allocates an inode; `O_TMPFILE` takes no lock on `tmp/` at all.
//!
//! Deliveries into the same mailbox share the `fsync` of `new/` (group
//! commit): one `fsync` that starts after a delivery's link covers it, so
//! concurrent deliveries wait for one flush instead of one each; a delivery
//! about to start that `fsync` first waits up to a millisecond for the
//! others still writing their files into the mailbox.
//!
//! The calls are blocking; async callers should run them on a blocking
//! thread pool (for example `tokio::task::spawn_blocking`).

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Permission bits of directories created by this crate.
const DIR_MODE: u32 = 0o700;
/// Permission bits of message files.
const FILE_MODE: u32 = 0o600;
/// Longest accepted mailbox name, in bytes (a typical `NAME_MAX`).
const MAX_MAILBOX_LEN: usize = 255;
/// Upper bound on the number of mailboxes remembered as already prepared;
/// the cache is simply emptied when it grows past this.
const READY_CACHE_LIMIT: usize = 4096;
/// The three subdirectories every maildir must have.
const SUBDIRS: [&str; 3] = ["tmp", "new", "cur"];

/// Errors returned by [`MaildirRoot::deliver`].
#[derive(Debug, thiserror::Error)]
pub enum MaildirError {
    /// The mailbox name is not acceptable (see [`is_valid_mailbox_name`]).
    /// Retrying will not help.
    #[error("invalid mailbox name {0:?}")]
    InvalidMailbox(String),
    /// The filesystem is out of space or the quota is exhausted
    /// (`ENOSPC` / `EDQUOT`). The first field says what was being done.
    #[error("{0}: storage full ({1})")]
    StorageFull(String, #[source] io::Error),
    /// Any other I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done when the error happened.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl MaildirError {
    /// Whether the failure may go away by itself, so that the delivery should
    /// be retried later (SMTP 4xx) rather than refused (SMTP 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            MaildirError::InvalidMailbox(_) => false,
            MaildirError::StorageFull(..) | MaildirError::Io { .. } => true,
        }
    }

    fn io(context: impl Into<String>, source: io::Error) -> MaildirError {
        let context = context.into();
        if is_storage_full(&source) {
            MaildirError::StorageFull(context, source)
        } else {
            MaildirError::Io { context, source }
        }
    }
}

fn is_storage_full(err: &io::Error) -> bool {
    if matches!(err.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
        return true;
    }
    let nospc = rustix::io::Errno::NOSPC.raw_os_error();
    let dquot = rustix::io::Errno::DQUOT.raw_os_error();
    matches!(err.raw_os_error(), Some(code) if code == nospc || code == dquot)
}

/// Whether `name` may be used as a mailbox name.
///
/// Names come from untrusted input, so anything that is not a single plain
/// path component is refused: the empty string, names starting with `.`
/// (which covers `.` and `..`), names containing `/`, NUL or any other
/// control character, and names longer than 255 bytes.
pub fn is_valid_mailbox_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MAILBOX_LEN
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c.is_control())
}

/// A directory holding one maildir per mailbox.
///
/// Cloning is cheap and clones share their state, so one value can be handed
/// to many threads.
#[derive(Debug, Clone)]
pub struct MaildirRoot {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Mailboxes whose directories are known to exist and to have been made
    /// durable by this process, with the group commit of their `new/`.
    ready: Mutex<HashMap<String, Arc<DirSync>>>,
}

impl MaildirRoot {
    /// Creates a handle for the maildirs below `root`. Nothing is touched on
    /// disk until the first delivery.
    pub fn new(root: impl Into<PathBuf>) -> MaildirRoot {
        MaildirRoot {
            inner: Arc::new(Inner { root: root.into(), ready: Mutex::new(HashMap::new()) }),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The maildir directory of `mailbox`, or `None` when the name is invalid.
    pub fn mailbox_path(&self, mailbox: &str) -> Option<PathBuf> {
        is_valid_mailbox_name(mailbox).then(|| self.inner.root.join(mailbox))
    }

    /// Delivers `prefix` followed by `content` as one new message in mailbox
    /// `mailbox`, creating `root/<mailbox>/{tmp,new,cur}` (mode 0700) when
    /// missing. Files are 0600. Returns the final path in `new/`.
    ///
    /// When this returns `Ok`, the message is durably stored. On error, no
    /// file is left behind in `tmp/` and nothing was added to `new/`.
    pub fn deliver(
        &self,
        mailbox: &str,
        prefix: &[u8],
        content: &[u8],
    ) -> Result<PathBuf, MaildirError> {
        if !is_valid_mailbox_name(mailbox) {
            return Err(MaildirError::InvalidMailbox(mailbox.to_owned()));
        }
        let maildir = self.inner.root.join(mailbox);
        let mut new_dir_sync = self.prepare(mailbox, &maildir)?;
        let size = prefix.len() + content.len();
        let name = unique_name(size);
        let new_dir = maildir.join("new");
        let new_path = new_dir.join(&name);

        let mut writing = DirSync::writing(&new_dir_sync);
        let tmp = match self.write_and_link(&maildir, &new_path, prefix, content) {
            Err(MaildirError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // The maildir was removed behind our back: set it up again.
                drop(writing);
                self.forget(mailbox);
                new_dir_sync = self.prepare(mailbox, &maildir)?;
                writing = DirSync::writing(&new_dir_sync);
                self.write_and_link(&maildir, &new_path, prefix, content)?
            }
            other => other?,
        };

        if let Err(err) = new_dir_sync.sync(&new_dir, writing) {
            // Whether the new entry is on disk is unknown. The caller will be
            // told to retry, so take the entry back to avoid a duplicate.
            let _ = fs::remove_file(&new_path);
            return Err(MaildirError::io(format!("syncing directory {}", new_dir.display()), err));
        }
        // The message is durable in new/. Dropping the old tmp/ name can no
        // longer lose it; if the unlink fails the leftover is harmless.
        drop(tmp);
        Ok(new_path)
    }

    /// Steps 1 to 3: the message, synced, under its final name in `new/`.
    /// Returns the `tmp/` name still to be removed, if there is one.
    fn write_and_link(
        &self,
        maildir: &Path,
        new_path: &Path,
        prefix: &[u8],
        content: &[u8],
    ) -> Result<Option<TmpFile>, MaildirError> {
        let tmp_dir = maildir.join("tmp");
        if let Some(file) = open_unnamed(&tmp_dir)
            .map_err(|e| MaildirError::io(format!("creating a file in {}", tmp_dir.display()), e))?
        {
            write_and_sync(&file, prefix, content)
                .map_err(|e| MaildirError::io(format!("writing to {}", tmp_dir.display()), e))?;
            match link_unnamed(&file, new_path) {
                Ok(true) => return Ok(None),
                // No /proc to name the file by: write it again the classic way.
                Ok(false) => {}
                Err(e) => {
                    return Err(MaildirError::io(format!("linking {}", new_path.display()), e));
                }
            }
        }
        let tmp_path = tmp_dir.join(new_path.file_name().unwrap_or_default());
        let file = create_message_file(&tmp_path)
            .map_err(|e| MaildirError::io(format!("creating {}", tmp_path.display()), e))?;
        let mut tmp = TmpFile::new(tmp_path);
        write_and_sync(&file, prefix, content)
            .map_err(|e| MaildirError::io(format!("writing {}", tmp.path().display()), e))?;
        let moved = publish(tmp.path(), new_path).map_err(|e| {
            MaildirError::io(
                format!("moving {} to {}", tmp.path().display(), new_path.display()),
                e,
            )
        })?;
        if moved {
            tmp.disarm();
        }
        Ok(Some(tmp))
    }

    fn forget(&self, mailbox: &str) {
        self.ready_set().remove(mailbox);
    }

    fn ready_set(&self) -> MutexGuard<'_, HashMap<String, Arc<DirSync>>> {
        // The set only caches work already done; a poisoned lock is harmless.
        self.inner.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure `maildir` and its subdirectories exist and are durable.
    ///
    /// The first time a mailbox is used by this process, the maildir and the
    /// root directory are synced even when nothing had to be created: another
    /// thread or process may have just created them without having synced
    /// them yet.
    fn prepare(&self, mailbox: &str, maildir: &Path) -> Result<Arc<DirSync>, MaildirError> {
        if let Some(sync) = self.ready_set().get(mailbox) {
            return Ok(sync.clone());
        }
        // Parent directories that need an fsync, in creation order.
        let mut to_sync: Vec<PathBuf> = Vec::new();
        for sub in SUBDIRS {
            create_dir_chain(&maildir.join(sub), &mut to_sync)?;
        }
        for dir in [maildir, self.inner.root.as_path()] {
            if !to_sync.iter().any(|d| d == dir) {
                to_sync.push(dir.to_path_buf());
            }
        }
        // Deepest first, so that every entry is durable before the entry
        // naming its directory is.
        to_sync.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in &to_sync {
            sync_dir(dir)
                .map_err(|e| MaildirError::io(format!("syncing directory {}", dir.display()), e))?;
        }

        let mut ready = self.ready_set();
        if ready.len() >= READY_CACHE_LIMIT {
            // Deliveries in progress keep their own handle; the next ones start
            // a new group, which is only less sharing.
            ready.clear();
        }
        Ok(ready.entry(mailbox.to_owned()).or_default().clone())
    }
}

/// Group commit of one directory's `fsync`.
#[derive(Debug, Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct DirSyncState {
    /// Entries added (each caller of [`DirSync::sync`] counts one).
    added: u64,
    /// Every entry up to this count is durable.
    synced: u64,
    /// An `fsync` is running.
    running: bool,
    /// Deliveries writing their file, whose entries are about to be added.
    writing: usize,
}

/// How long an `fsync` of `new/` is put off while other deliveries into the
/// mailbox are still writing their files, so that one `fsync` covers them too.
const DIR_SYNC_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// A delivery between its start and its entry in `new/`; see [`DirSync::writing`].
struct Writing(Option<Arc<DirSync>>);

impl Drop for Writing {
    fn drop(&mut self) {
        // Still counted only when the delivery failed: `sync` takes the count off itself.
        if let Some(sync) = self.0.take() {
            sync.lock().writing -= 1;
            sync.finished.notify_all();
        }
    }
}

impl DirSync {
    fn lock(&self) -> MutexGuard<'_, DirSyncState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a delivery into the mailbox from before its file is written
    /// until its entry is added by [`DirSync::sync`].
    fn writing(this: &Arc<DirSync>) -> Writing {
        this.lock().writing += 1;
        Writing(Some(this.clone()))
    }

    /// Returns once an `fsync` of `dir` that started after the caller's
    /// entry was added (its link is done) has finished, running one itself
    /// when none is running, otherwise waiting for the one that is. Before
    /// starting one it waits up to [`DIR_SYNC_LINGER`] for the deliveries
    /// still writing, so that the one `fsync` covers their entries too.
    fn sync(&self, dir: &Path, writing: Writing) -> io::Result<()> {
        self.sync_with(writing, || sync_dir(dir))
    }

    fn sync_with(
        &self,
        mut writing: Writing,
        fsync: impl Fn() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut state = self.lock();
        // The entry is added and the delivery stops counting as writing in one step.
        if writing.0.take().is_some() {
            state.writing -= 1;
        }
        state.added += 1;
        let ticket = state.added;
        self.finished.notify_all();
        let mut lingered = false;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if state.running {
                state = self.finished.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            if state.writing > 0 && !lingered {
                lingered = true;
                state = self
                    .finished
                    .wait_timeout_while(state, DIR_SYNC_LINGER, |state| {
                        state.writing > 0 && !state.running && state.synced < ticket
                    })
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
                continue;
            }
            // Everything added so far is linked, so this fsync covers it.
            let covers = state.added;
            state.running = true;
            drop(state);
            let result = fsync();
            state = self.lock();
            state.running = false;
            if result.is_ok() {
                state.synced = state.synced.max(covers);
            }
            self.finished.notify_all();
            // A waiter whose entry this failed fsync covered runs its own.
            result?;
        }
    }
}

/// Creates `dir` and any missing ancestors with mode 0700. The parent of
/// every directory found missing is added to `to_sync` (once). A directory
/// that appears concurrently is accepted, and its parent is still synced.
fn create_dir_chain(dir: &Path, to_sync: &mut Vec<PathBuf>) -> Result<(), MaildirError> {
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        match fs::metadata(cur) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(MaildirError::io(
                    format!("preparing {}", dir.display()),
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{} exists and is not a directory", cur.display()),
                    ),
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                missing.push(cur);
                match cur.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => cur = parent,
                    _ => break,
                }
            }
            Err(err) => {
                return Err(MaildirError::io(format!("inspecting {}", cur.display()), err));
            }
        }
    }

    let mut builder = DirBuilder::new();
    builder.mode(DIR_MODE);
    for path in missing.into_iter().rev() {
        match builder.create(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(err) => {
                return Err(MaildirError::io(
                    format!("creating directory {}", path.display()),
                    err,
                ));
            }
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !to_sync.contains(&parent) {
            to_sync.push(parent);
        }
    }
    Ok(())
}

fn create_message_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path)
}

/// Cleared once the file system or kernel turns out not to support unnamed
/// files, so later deliveries go straight to the classic way.
static UNNAMED_FILES: AtomicBool = AtomicBool::new(true);

/// An unnamed file in `dir` (`O_TMPFILE`), or `None` where the kernel or the
/// file system has none.
fn open_unnamed(dir: &Path) -> io::Result<Option<File>> {
    use rustix::fs::{Mode, OFlags};
    if !UNNAMED_FILES.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
    match rustix::fs::open(dir, flags, Mode::from_raw_mode(FILE_MODE)) {
        Ok(fd) => Ok(Some(File::from(fd))),
        // open(2): EISDIR or EOPNOTSUPP when O_TMPFILE is not supported;
        // kernels before 3.11 may say EINVAL.
        Err(e)
            if e == rustix::io::Errno::OPNOTSUPP
                || e == rustix::io::Errno::ISDIR
                || e == rustix::io::Errno::INVAL =>
        {
            UNNAMED_FILES.store(false, Ordering::Relaxed);
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives an unnamed file its name in `new/`. Linking by descriptor
/// (`AT_EMPTY_PATH`) needs a capability the server gives up, so the file is
/// named through `/proc/self/fd`. `Ok(false)` when there is no `/proc`.
fn link_unnamed(file: &File, new: &Path) -> io::Result<bool> {
    use rustix::fs::{AtFlags, CWD};
    use std::os::fd::AsRawFd;
    let by_descriptor = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(CWD, &by_descriptor, CWD, new, AtFlags::SYMLINK_FOLLOW) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::NOENT && !Path::new("/proc/self/fd").is_dir() => {
            UNNAMED_FILES.store(false, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `prefix` then `content` with vectored writes until everything is
/// written, then flushes data and metadata to stable storage.
fn write_and_sync(mut file: &File, prefix: &[u8], content: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(prefix), IoSlice::new(content)];
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut remaining, 0);
    while !remaining.is_empty() {
        match file.write_vectored(remaining) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned zero bytes"));
            }
            Ok(n) => IoSlice::advance_slices(&mut remaining, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    file.sync_all()
}

/// Makes `tmp` visible as `new`. Returns `true` when `tmp` no longer exists
/// (rename fallback), `false` when it still has to be unlinked.
fn publish(tmp: &Path, new: &Path) -> io::Result<bool> {
    match fs::hard_link(tmp, new) {
        Ok(()) => Ok(false),
        // Some filesystems (FAT, some network mounts) have no hard links.
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
            ) =>
        {
            if fs::symlink_metadata(new).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists", new.display()),
                ));
            }
            fs::rename(tmp, new)?;
            Ok(true)
        }
        Err(err) => Err(err),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Owns a file name in `tmp/` and unlinks it when dropped, unless disarmed.
struct TmpFile {
    path: PathBuf,
    armed: bool,
}

impl TmpFile {
    fn new(path: PathBuf) -> TmpFile {
        TmpFile { path, armed: true }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Builds `<secs>.M<usecs>P<pid>Q<counter>.<host>,S=<size>`.
fn unique_name(size: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.M{}P{}Q{}.{},S={}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        seq,
        hostname(),
        size
    )
}

fn hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| {
        let uts = rustix::system::uname();
        sanitize_hostname(&uts.nodename().to_string_lossy())
    })
}

/// Escapes the characters that may not appear in a maildir file name the
/// way other maildir implementations do (`/` as `\057`, `:` as `\072`).
/// Control characters are escaped the same way, in octal.
fn sanitize_hostname(raw: &str) -> String {
    let raw = raw.trim();
    if raw.is_empty() {
        return "localhost".to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '/' | ':' | '\\' | ',' => out.push_str(&format!("\\{:03o}", c as u32)),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:03o}", c as u32)),
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_escaped() {
        assert_eq!(sanitize_hostname("mx.example.org"), "mx.example.org");
        assert_eq!(sanitize_hostname("a/b:c"), "a\\057b\\072c");
        assert_eq!(sanitize_hostname("a,b"), "a\\054b");
        assert_eq!(sanitize_hostname("a\\b"), "a\\134b");
        assert_eq!(sanitize_hostname(""), "localhost");
        assert_eq!(sanitize_hostname("x\ny"), "x\\012y");
    }

    #[test]
    fn names_follow_the_maildir_pattern() {
        let a = unique_name(42);
        let b = unique_name(42);
        assert_ne!(a, b);
        assert!(a.ends_with(",S=42"), "{a}");
        assert!(!a.contains('/'));
        assert!(!a.contains(':'));
        let (secs, rest) = a.split_once(".M").unwrap();
        assert!(secs.parse::<u64>().is_ok());
        let (usecs, rest) = rest.split_once('P').unwrap();
        assert!(usecs.parse::<u32>().unwrap() < 1_000_000);
        let (pid, _) = rest.split_once('Q').unwrap();
        assert_eq!(pid.parse::<u32>().unwrap(), std::process::id());
    }

    #[test]
    fn concurrent_directory_syncs_share_fsyncs() {
        use std::sync::Barrier;
        use std::time::Duration;
        let sync = Arc::new(DirSync::default());
        let fsyncs = Arc::new(AtomicU64::new(0));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (sync, fsyncs, barrier) = (sync.clone(), fsyncs.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let writing = DirSync::writing(&sync);
                    barrier.wait();
                    sync.sync_with(writing, || {
                        fsyncs.fetch_add(1, Ordering::SeqCst);
                        // Hold the flush until every entry is in, so the
                        // count does not depend on thread scheduling.
                        while sync.state.lock().unwrap().added < threads as u64 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Ok(())
                    })
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap().unwrap();
        }
        // The first fsync covers whoever was in before it started; everyone
        // who came during it shares the second.
        let count = fsyncs.load(Ordering::SeqCst);
        assert!((1..=2).contains(&count), "{count} fsyncs for {threads} entries");
        let state = sync.state.lock().unwrap();
        assert_eq!((state.added, state.synced, state.running, state.writing), (8, 8, false, 0));
    }

    #[test]
    fn a_directory_sync_waits_a_little_for_deliveries_still_writing() {
        use std::time::Instant;
        let sync = Arc::new(DirSync::default());
        let slow = DirSync::writing(&sync);
        let started = Instant::now();
        sync.sync_with(DirSync::writing(&sync), || Ok(())).unwrap();
        // The other delivery never finished: the fsync went ahead after the
        // linger, for this entry alone.
        assert!(started.elapsed() >= DIR_SYNC_LINGER);
        let counts = |sync: &DirSync| {
            let state = sync.lock();
            (state.added, state.synced, state.writing)
        };
        assert_eq!(counts(&sync), (1, 1, 1));
        drop(slow);
        assert_eq!(sync.lock().writing, 0, "a failed delivery stops counting");
        // Nobody else writing: no wait at all is needed (not timed here), and
        // the count stays balanced.
        sync.sync_with(DirSync::writing(&sync), || Ok(())).unwrap();
        assert_eq!(counts(&sync), (2, 2, 0));
    }

    #[test]
    fn a_failed_directory_sync_fails_its_caller_and_the_next_one_retries() {
        let sync = Arc::new(DirSync::default());
        let failure = || Err(io::Error::other("disk gone"));
        let failed = sync.sync_with(DirSync::writing(&sync), failure);
        assert_eq!(failed.unwrap_err().to_string(), "disk gone");
        let calls = AtomicU64::new(0);
        sync.sync_with(DirSync::writing(&sync), || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A sync that covered an entry is not repeated for it, but a later
        // entry gets its own.
        let state = sync.state.lock().unwrap();
        assert_eq!((state.added, state.synced), (2, 2));
    }

    #[test]
    fn the_classic_way_delivers_too() {
        let dir = std::env::temp_dir().join(format!("maildir-classic-{}", std::process::id()));
        let root = MaildirRoot::new(&dir);
        // Other tests running meanwhile take the classic way too, which is
        // only another correct path for them.
        UNNAMED_FILES.store(false, Ordering::Relaxed);
        let delivered = root.deliver("u", b"P: 1\r\n", b"body");
        let unnamed = open_unnamed(&dir.join("u/tmp"));
        UNNAMED_FILES.store(true, Ordering::Relaxed);
        assert!(unnamed.unwrap().is_none(), "switched off, no unnamed file is made");
        let path = delivered.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"P: 1\r\nbody");
        assert_eq!(fs::read_dir(dir.join("u/tmp")).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn storage_full_errors_are_recognised() {
        let nospc = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        let dquot = io::Error::from_raw_os_error(rustix::io::Errno::DQUOT.raw_os_error());
        let other = io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error());
        assert!(matches!(MaildirError::io("x", nospc), MaildirError::StorageFull(..)));
        assert!(matches!(MaildirError::io("x", dquot), MaildirError::StorageFull(..)));
        assert!(matches!(MaildirError::io("x", other), MaildirError::Io { .. }));
    }
}
