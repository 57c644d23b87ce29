//! Crash-safe delivery into Maildirs.
//!
//! A message is written to `tmp/`, fsync'ed, renamed into `new/`, and then `new/` itself is
//! fsync'ed so that the rename is durable. Until the rename the message is invisible to
//! readers; after the directory fsync it survives a crash or power loss. A crash in between
//! leaves at most a stray file in `tmp/`, never a partial message in `new/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum MaildirError {
    /// The mailbox name could escape the root or is not a usable directory name.
    #[error("invalid mailbox name {0:?}")]
    InvalidMailbox(String),
    /// No space (or quota) left on the file system.
    #[error("no space left for mailbox {mailbox}: {source}")]
    StorageFull { mailbox: String, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl MaildirError {
    /// Worth retrying later; an invalid mailbox never gets better.
    pub fn is_transient(&self) -> bool {
        !matches!(self, MaildirError::InvalidMailbox(_))
    }
}

/// A directory holding one Maildir per mailbox.
#[derive(Debug, Clone)]
pub struct MaildirRoot {
    root: PathBuf,
}

/// True when `name` can be a mailbox directory directly under the root: not empty, not
/// starting with `.` (no `.`, `..` or hidden folders), no `/`, no control characters, and at
/// most 255 bytes.
pub fn is_valid_mailbox_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c.is_control())
}

impl MaildirRoot {
    pub fn new(root: impl Into<PathBuf>) -> MaildirRoot {
        MaildirRoot { root: root.into() }
    }

    /// Delivers `prefix` followed by `content` as one new message in `mailbox`, creating the
    /// Maildir when missing. Returns the path of the message in `new/`.
    pub fn deliver(
        &self,
        mailbox: &str,
        prefix: &[u8],
        content: &[u8],
    ) -> Result<PathBuf, MaildirError> {
        if !is_valid_mailbox_name(mailbox) {
            return Err(MaildirError::InvalidMailbox(mailbox.to_string()));
        }
        let dir = self.root.join(mailbox);
        self.ensure_maildir(&dir, mailbox)?;
        let size = prefix.len() + content.len();
        let name = unique_name(size);
        let tmp = dir.join("tmp").join(&name);
        let new = dir.join("new").join(&name);
        let result = write_synced(&tmp, prefix, content)
            .and_then(|()| fs::rename(&tmp, &new).map_err(|e| ("moving the message into new/", e)))
            .and_then(|()| sync_dir(&dir.join("new")).map_err(|e| ("syncing new/", e)));
        match result {
            Ok(()) => Ok(new),
            Err((context, source)) => {
                let _ = fs::remove_file(&tmp);
                Err(classify(mailbox, context, source))
            }
        }
    }

    /// Creates `<mailbox>/{tmp,new,cur}` (0700) and makes their creation durable.
    fn ensure_maildir(&self, dir: &Path, mailbox: &str) -> Result<(), MaildirError> {
        if dir.join("new").is_dir() && dir.join("tmp").is_dir() {
            return Ok(());
        }
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for sub in ["tmp", "new", "cur"] {
            builder
                .create(dir.join(sub))
                .map_err(|e| classify(mailbox, "creating the maildir", e))?;
        }
        // The new directory entries must survive a crash like the messages in them.
        for path in [dir, &self.root] {
            sync_dir(path).map_err(|e| classify(mailbox, "syncing the maildir", e))?;
        }
        Ok(())
    }
}

fn classify(mailbox: &str, context: &str, source: io::Error) -> MaildirError {
    // ENOSPC and EDQUOT: the disk or the quota is full.
    if matches!(source.raw_os_error(), Some(28) | Some(122)) {
        MaildirError::StorageFull { mailbox: mailbox.to_string(), source }
    } else {
        MaildirError::Io { context: format!("mailbox {mailbox}: {context}"), source }
    }
}

/// Writes both parts with vectored writes into a new file (0600), then fsyncs it.
fn write_synced(
    path: &Path,
    prefix: &[u8],
    content: &[u8],
) -> Result<(), (&'static str, io::Error)> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ("creating the message in tmp/", e))?;
    let (mut first, mut second) = (prefix, content);
    while !first.is_empty() || !second.is_empty() {
        let written = file
            .write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
            .map_err(|e| ("writing the message", e))?;
        if written == 0 {
            return Err(("writing the message", io::Error::from(io::ErrorKind::WriteZero)));
        }
        let from_first = written.min(first.len());
        first = &first[from_first..];
        second = &second[written - from_first..];
    }
    file.sync_all().map_err(|e| ("syncing the message", e))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// `<seconds>.M<microseconds>P<pid>Q<counter>.<host>,S=<size>`: unique across processes
/// (pid), within a process (counter) and across hosts sharing a Maildir (host name).
fn unique_name(size: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.M{}P{}Q{}.{},S={}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        counter,
        hostname(),
        size
    )
}

/// The host name with `/` and `:` escaped as the Maildir convention asks.
fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let name =
            fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        name.trim().replace('/', "\\057").replace(':', "\\072")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn delivers_byte_exact_into_new() {
        let dir = tempfile::tempdir().unwrap();
        let root = MaildirRoot::new(dir.path());
        let content: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let path = root.deliver("alice", b"Return-Path: <a@b>\r\n", &content).unwrap();
        assert_eq!(path.parent().unwrap(), dir.path().join("alice/new"));
        let stored = fs::read(&path).unwrap();
        assert_eq!(&stored[..20], b"Return-Path: <a@b>\r\n");
        assert_eq!(&stored[20..], &content[..]);
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.ends_with(&format!(",S={}", stored.len())));
        assert_eq!(fs::read_dir(dir.path().join("alice/tmp")).unwrap().count(), 0);
        assert!(dir.path().join("alice/cur").is_dir());
        assert_eq!(mode(&path), 0o600);
        for sub in ["", "tmp", "new", "cur"] {
            assert_eq!(mode(&dir.path().join("alice").join(sub)), 0o700);
        }
    }

    #[test]
    fn invalid_names_never_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = MaildirRoot::new(dir.path().join("root"));
        for name in [
            "",
            ".",
            "..",
            "../x",
            "a/../../b",
            "/etc",
            ".hidden",
            "a/b",
            "nul\0",
            "tab\t",
            &"x".repeat(256),
        ] {
            let error = root.deliver(name, b"", b"x").unwrap_err();
            assert!(matches!(error, MaildirError::InvalidMailbox(_)), "{name:?}");
            assert!(!error.is_transient());
        }
        assert!(!dir.path().join("x").exists() && !dir.path().join("b").exists());
        assert!(
            is_valid_mailbox_name("jösé")
                && is_valid_mailbox_name("user+tag")
                && is_valid_mailbox_name("a.b")
        );
    }

    #[test]
    fn names_are_unique_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let root = MaildirRoot::new(dir.path());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        root.deliver("box", b"", b"m").unwrap();
                    }
                });
            }
        });
        assert_eq!(fs::read_dir(dir.path().join("box/new")).unwrap().count(), 1600);
    }

    /// Needs root to mount a tmpfs; the project's tests run as root.
    #[test]
    fn full_disk_is_transient_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("small");
        fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _guard = Unmount(mount.clone());
        let root = MaildirRoot::new(&mount);
        root.deliver("box", b"", b"small").unwrap();
        let error = root.deliver("box", b"", &vec![b'x'; 200 * 1024]).unwrap_err();
        assert!(matches!(error, MaildirError::StorageFull { .. }), "{error}");
        assert!(error.is_transient());
        assert_eq!(fs::read_dir(mount.join("box/tmp")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(mount.join("box/new")).unwrap().count(), 1);
    }
}
