//! Crash-safe delivery of messages into Maildir mailboxes.
//!
//! Each mailbox lives at `<root>/<mailbox>/` and holds the usual `tmp/`,
//! `new/` and `cur/` subdirectories. A delivery follows the classic maildir
//! protocol, made durable:
//!
//! 1. create a uniquely named file in `tmp/` (`O_CREAT | O_EXCL`, mode 0600),
//! 2. write the whole message and `fsync` the file,
//! 3. hard-link it into `new/` under the same name (a link never replaces an
//!    existing entry; filesystems without hard links fall back to `rename`),
//! 4. `fsync` the `new/` directory, and only then
//! 5. unlink the `tmp/` name.
//!
//! A message is therefore either complete in `new/` or absent from it, even
//! after `kill -9` or a power failure. A crash between steps 3 and 5 can
//! leave a stale copy in `tmp/`, which maildir readers ignore and which tmp
//! cleaners remove (the usual rule is anything older than 36 hours).
//!
//! The calls are blocking; async callers should run them on a blocking
//! thread pool (for example `tokio::task::spawn_blocking`).

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// durable by this process.
    ready: Mutex<HashSet<String>>,
}

impl MaildirRoot {
    /// Creates a handle for the maildirs below `root`. Nothing is touched on
    /// disk until the first delivery.
    pub fn new(root: impl Into<PathBuf>) -> MaildirRoot {
        MaildirRoot {
            inner: Arc::new(Inner { root: root.into(), ready: Mutex::new(HashSet::new()) }),
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
        self.prepare(mailbox, &maildir)?;
        let size = prefix.len() + content.len();
        let name = unique_name(size);
        let tmp_path = maildir.join("tmp").join(&name);

        let file = match create_message_file(&tmp_path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // The maildir was removed behind our back: set it up again.
                self.forget(mailbox);
                self.prepare(mailbox, &maildir)?;
                create_message_file(&tmp_path)
            }
            other => other,
        }
        .map_err(|e| MaildirError::io(format!("creating {}", tmp_path.display()), e))?;
        let mut tmp = TmpFile::new(tmp_path);

        write_and_sync(file, prefix, content)
            .map_err(|e| MaildirError::io(format!("writing {}", tmp.path().display()), e))?;

        let new_dir = maildir.join("new");
        let new_path = new_dir.join(&name);
        let moved = publish(tmp.path(), &new_path).map_err(|e| {
            MaildirError::io(
                format!("moving {} to {}", tmp.path().display(), new_path.display()),
                e,
            )
        })?;
        if moved {
            tmp.disarm();
        }

        if let Err(err) = sync_dir(&new_dir) {
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

    fn forget(&self, mailbox: &str) {
        self.ready_set().remove(mailbox);
    }

    fn ready_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set only caches work already done; a poisoned lock is harmless.
        self.inner.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure `maildir` and its subdirectories exist and are durable.
    ///
    /// The first time a mailbox is used by this process, the maildir and the
    /// root directory are synced even when nothing had to be created: another
    /// thread or process may have just created them without having synced
    /// them yet.
    fn prepare(&self, mailbox: &str, maildir: &Path) -> Result<(), MaildirError> {
        if self.ready_set().contains(mailbox) {
            return Ok(());
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
            ready.clear();
        }
        ready.insert(mailbox.to_owned());
        Ok(())
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

/// Writes `prefix` then `content` with vectored writes until everything is
/// written, then flushes data and metadata to stable storage.
fn write_and_sync(mut file: File, prefix: &[u8], content: &[u8]) -> io::Result<()> {
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
    fn storage_full_errors_are_recognised() {
        let nospc = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        let dquot = io::Error::from_raw_os_error(rustix::io::Errno::DQUOT.raw_os_error());
        let other = io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error());
        assert!(matches!(MaildirError::io("x", nospc), MaildirError::StorageFull(..)));
        assert!(matches!(MaildirError::io("x", dquot), MaildirError::StorageFull(..)));
        assert!(matches!(MaildirError::io("x", other), MaildirError::Io { .. }));
    }
}
