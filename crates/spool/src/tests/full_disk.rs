//! A full file system: the store refuses new mail with `StorageFull`, keeps what it has, and
//! works again once there is room.

use std::path::PathBuf;
use std::process::Command;

use super::*;

/// Unmounts the tmpfs even when the test panics.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Something still has a file open there; detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_full_disk_refuses_new_mail_and_keeps_the_old() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts a small tmpfs and must run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs failed");
    let _unmount = Unmount(mount.clone());
    // Room to give back later: SQLite does not shrink its files when messages are removed.
    let filler = mount.join("filler");
    fs::write(&filler, vec![0u8; 256 << 10]).unwrap();
    let spool_dir = mount.join("spool");
    let rt = runtime();

    let spool = Arc::new(SqliteSpool::open(&spool_dir).unwrap());
    let mut stored = Vec::new();
    rt.block_on(async {
        loop {
            let message = message(&vec![0xA5; 64 << 10]);
            match spool.store(message.clone()).await {
                Ok(()) => stored.push(message),
                Err(SpoolError::StorageFull) => break,
                Err(error) => panic!("expected StorageFull, got {error}"),
            }
            assert!(stored.len() < 40, "2 MiB never filled up");
        }
        assert!(!stored.is_empty(), "not even one message fit");
        // More sessions at once against the full disk: refused, none half stored.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (spool, message) = (spool.clone(), message(&vec![0x5A; 64 << 10]));
                tokio::spawn(async move { spool.store(message).await })
            })
            .collect();
        for task in tasks {
            let result = task.await.unwrap();
            assert!(matches!(result, Err(SpoolError::StorageFull)), "{result:?}");
        }
        // ENOSPC from fsync or ftruncate reaches us as a generic I/O error; on this full file
        // system it counts as a full disk, on a roomy one it does not.
        let io_error = || {
            let code = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC);
            SpoolError::database("syncing".into(), rusqlite::Error::SqliteFailure(code, None))
        };
        let needed = (64 << 10) + (1 << 20);
        assert!(matches!(writer::refine(io_error(), &spool_dir, needed), SpoolError::StorageFull));
        assert!(matches!(
            writer::refine(io_error(), dir.path(), needed),
            SpoolError::Database { .. }
        ));

        let listed = spool.list().await.unwrap();
        assert_eq!(listed, stored.iter().map(queued).collect::<Vec<_>>());
        for message in &stored {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }

        // The store works again once there is room.
        fs::remove_file(&filler).unwrap();
        let after = message(b"small enough");
        spool.store(after.clone()).await.unwrap();
        stored.push(after);
    });
    Arc::into_inner(spool).unwrap().close().unwrap();

    let spool = SqliteSpool::open(&spool_dir).unwrap();
    rt.block_on(async {
        assert_eq!(spool.list().await.unwrap(), stored.iter().map(queued).collect::<Vec<_>>());
        for message in &stored {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }
    });
    spool.close().unwrap();
    assert_eq!(integrity_check(&spool_dir), "ok");
}
