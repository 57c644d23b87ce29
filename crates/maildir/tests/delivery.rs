use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;

use maildir::{MaildirError, MaildirRoot, is_valid_mailbox_name};

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn size_from_name(path: &Path) -> u64 {
    let name = path.file_name().unwrap().to_str().unwrap();
    let (_, size) = name.rsplit_once(",S=").expect("name has ,S=");
    size.parse().expect("numeric size")
}

#[test]
fn delivers_exact_bytes_into_new() {
    let dir = tempfile::tempdir().unwrap();
    let root = MaildirRoot::new(dir.path());
    let prefix = b"Return-Path: <a@example.org>\r\nDelivered-To: bob\r\n";
    let mut content: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    content.extend_from_slice(b"\r\n.\r\n\0\xff");

    let path = root.deliver("bob", prefix, &content).unwrap();

    let maildir = dir.path().join("bob");
    assert_eq!(path.parent().unwrap(), maildir.join("new"));
    assert_eq!(entries(&maildir.join("new")), vec![path.clone()]);
    assert!(entries(&maildir.join("tmp")).is_empty());
    assert!(entries(&maildir.join("cur")).is_empty());

    let stored = fs::read(&path).unwrap();
    assert_eq!(&stored[..prefix.len()], prefix);
    assert_eq!(&stored[prefix.len()..], &content[..]);
    assert_eq!(size_from_name(&path), stored.len() as u64);
    assert_eq!(fs::metadata(&path).unwrap().len(), stored.len() as u64);
}

#[test]
fn empty_prefix_and_empty_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = MaildirRoot::new(dir.path());

    let a = root.deliver("u", b"", b"body only").unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"body only");
    assert_eq!(size_from_name(&a), 9);

    let b = root.deliver("u", b"prefix only", b"").unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"prefix only");

    let c = root.deliver("u", b"", b"").unwrap();
    assert_eq!(fs::read(&c).unwrap(), b"");
    assert_eq!(size_from_name(&c), 0);

    assert_eq!(entries(&dir.path().join("u/new")).len(), 3);
    assert!(entries(&dir.path().join("u/tmp")).is_empty());
}

#[test]
fn size_in_name_matches_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = MaildirRoot::new(dir.path());
    for len in [0usize, 1, 17, 4096, 100_003] {
        let content = vec![b'x'; len];
        let path = root.deliver("sizes", b"H: v\r\n", &content).unwrap();
        let actual = fs::metadata(&path).unwrap().len();
        assert_eq!(actual, (len + 6) as u64);
        assert_eq!(size_from_name(&path), actual);
    }
}

#[test]
fn modes_are_private() {
    let dir = tempfile::tempdir().unwrap();
    // A root that does not exist yet is created too.
    let root_path = dir.path().join("spool").join("mail");
    let root = MaildirRoot::new(&root_path);
    let path = root.deliver("carol", b"", b"hello\r\n").unwrap();

    assert_eq!(mode(&root_path), 0o700);
    let maildir = root_path.join("carol");
    assert_eq!(mode(&maildir), 0o700);
    for sub in ["tmp", "new", "cur"] {
        assert_eq!(mode(&maildir.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn existing_maildir_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("dave");
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    fs::write(maildir.join("cur").join("old:2,S"), b"old").unwrap();
    let root = MaildirRoot::new(dir.path());
    root.deliver("dave", b"", b"new mail").unwrap();
    assert_eq!(entries(&maildir.join("new")).len(), 1);
    assert_eq!(entries(&maildir.join("cur")).len(), 1);
}

#[test]
fn maildir_removed_between_deliveries_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let root = MaildirRoot::new(dir.path());
    root.deliver("erin", b"", b"one").unwrap();
    fs::remove_dir_all(dir.path().join("erin")).unwrap();
    let path = root.deliver("erin", b"", b"two").unwrap();
    assert_eq!(fs::read(path).unwrap(), b"two");
}

#[test]
fn names_are_unique_across_threads() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let root = Arc::new(MaildirRoot::new(dir.path()));

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let root = Arc::clone(&root);
            thread::spawn(move || {
                (0..PER_THREAD)
                    .map(|i| {
                        let body = format!("thread {t} message {i}\r\n");
                        let path = root.deliver("shared", b"", body.as_bytes()).unwrap();
                        (path, body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();

    let mut seen = HashSet::new();
    for handle in handles {
        for (path, body) in handle.join().unwrap() {
            assert_eq!(fs::read(&path).unwrap(), body.as_bytes());
            assert!(seen.insert(path), "duplicate name returned");
        }
    }
    assert_eq!(seen.len(), THREADS * PER_THREAD);
    let maildir = dir.path().join("shared");
    assert_eq!(entries(&maildir.join("new")).len(), THREADS * PER_THREAD);
    assert!(entries(&maildir.join("tmp")).is_empty());
}

#[test]
fn name_validation() {
    for good in ["bob", "Bob.Smith", "a+tag", "x-y_z", "ünïcode", "a..b", "a."] {
        assert!(is_valid_mailbox_name(good), "{good:?} should be valid");
    }
    let long = "a".repeat(256);
    let bad = [
        "",
        ".",
        "..",
        ".hidden",
        "../x",
        "a/../../b",
        "/etc",
        "/",
        "a/b",
        "a\0b",
        "a\nb",
        "a\rb",
        "tab\t",
        "del\x7f",
        "c1\u{85}",
        long.as_str(),
    ];
    for name in bad {
        assert!(!is_valid_mailbox_name(name), "{name:?} should be invalid");
    }
    assert!(is_valid_mailbox_name(&"a".repeat(255)));
    // The limit is in bytes, not characters.
    assert!(!is_valid_mailbox_name(&"é".repeat(128)));
}

#[test]
fn invalid_names_are_rejected_without_touching_disk() {
    let outer = tempfile::tempdir().unwrap();
    let root_path = outer.path().join("root");
    fs::create_dir(&root_path).unwrap();
    let root = MaildirRoot::new(&root_path);
    let absolute = outer.path().join("abs").to_str().unwrap().to_owned();

    for name in ["", ".", "..", "../x", "a/../../b", "..\0", "x/y", absolute.as_str(), ".new"] {
        let err = root.deliver(name, b"", b"data").unwrap_err();
        assert!(matches!(&err, MaildirError::InvalidMailbox(n) if n == name), "{name:?}: {err:?}");
        assert!(!err.is_transient());
    }
    // Nothing was created anywhere.
    assert_eq!(entries(outer.path()), vec![root_path.clone()]);
    assert!(entries(&root_path).is_empty());
    assert!(root.mailbox_path("../x").is_none());
    assert_eq!(root.mailbox_path("bob"), Some(root_path.join("bob")));
}

#[test]
fn regular_file_in_place_of_maildir_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("frank"), b"not a dir").unwrap();
    let root = MaildirRoot::new(dir.path());
    let err = root.deliver("frank", b"", b"x").unwrap_err();
    assert!(matches!(err, MaildirError::Io { .. }), "{err:?}");
    assert!(err.is_transient());
}

/// Unmounts the tmpfs when dropped, also when the test panics.
struct Mount {
    dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok =
            Command::new("umount").arg(&self.dir).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[test]
fn full_filesystem_is_storage_full() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("fs");
    fs::create_dir(&mount_point).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&mount_point)
        .status();
    // The project's tests run as root; a test that cannot run must not pass.
    assert!(matches!(status, Ok(s) if s.success()), "mounting a tmpfs needs root: {status:?}");
    let _guard = Mount { dir: mount_point.clone() };

    let root = MaildirRoot::new(&mount_point);
    // A small message fits.
    let small = root.deliver("gina", b"P: 1\r\n", b"small\r\n").unwrap();
    assert_eq!(fs::read(&small).unwrap(), b"P: 1\r\nsmall\r\n");

    // A message larger than the whole filesystem does not.
    let big = vec![0xa5u8; 256 * 1024];
    let err = root.deliver("gina", b"P: 2\r\n", &big).unwrap_err();
    assert!(matches!(err, MaildirError::StorageFull(..)), "{err:?}");
    assert!(err.is_transient());

    let maildir = mount_point.join("gina");
    assert!(entries(&maildir.join("tmp")).is_empty());
    assert_eq!(entries(&maildir.join("new")), vec![small]);

    // The space is given back: another small message still fits.
    root.deliver("gina", b"", b"after\r\n").unwrap();
    assert_eq!(entries(&maildir.join("new")).len(), 2);
}
