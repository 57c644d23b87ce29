use std::collections::HashSet;
use std::process::Command;

use super::*;

fn envelope() -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        body: BodyType::EightBitMime,
        smtputf8: true,
        ret: Some(Ret::Headers),
        envid: Some("env-1".into()),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "client.example".into(),
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        authenticated_as: None,
        // Stored with millisecond precision.
        received_at: from_millis(1_795_386_725_123),
    }
}

fn recipient(address: &str) -> Recipient {
    Recipient {
        address: address.into(),
        original: format!("orig-{address}"),
        notify: Some(Notify { success: true, failure: true, delay: false }),
        orcpt: Some(OriginalRecipient { addr_type: "rfc822".into(), address: address.into() }),
        status: RecipientStatus::Pending,
    }
}

fn message(content: Vec<u8>) -> NewMessage {
    NewMessage {
        id: QueueId::generate(),
        envelope: envelope(),
        recipients: vec![recipient("a@x"), recipient("b@x")],
        content,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn store_list_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    runtime().block_on(async {
        let binary: Vec<u8> = (0..=255u8).cycle().take(5 << 20).collect();
        let first = message(binary.clone());
        let second = message(b"\0\xff\r\n.\r\n".to_vec());
        spool.store(first.clone()).await.unwrap();
        spool.store(second.clone()).await.unwrap();
        let listed = spool.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, first.id, "oldest first");
        assert_eq!(listed[0].envelope, first.envelope);
        assert_eq!(listed[0].recipients, first.recipients);
        assert_eq!(listed[0].size, binary.len() as u64);
        assert_eq!(spool.load_content(first.id).await.unwrap(), binary);
        assert_eq!(spool.load_content(second.id).await.unwrap(), second.content);
        assert_eq!(spool.load_content(QueueId(1)).await, Err(SpoolError::NotFound(QueueId(1))));
    });
}

#[test]
fn concurrent_stores_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    runtime().block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.store(message(vec![b'x'; 1024])).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let stats = spool.stats();
        assert_eq!(stats.messages_stored, 200);
        assert!(stats.commits < 200, "group commit: {} commits for 200 stores", stats.commits);
        eprintln!("group commit: 200 concurrent stores in {} commits", stats.commits);
        assert_eq!(spool.list().await.unwrap().len(), 200);
    });
}

#[test]
fn everything_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (kept, removed) = (message(b"kept".to_vec()), message(b"removed".to_vec()));
    let delivered = RecipientStatus::Delivered { at: from_millis(1_000), detail: "ok".into() };
    let deferred = RecipientStatus::Deferred {
        attempts: 2,
        next_attempt: from_millis(2_000),
        last_error: "4.2.2 full".into(),
    };
    {
        let spool = SqliteSpool::open(dir.path()).unwrap();
        rt.block_on(async {
            spool.store(kept.clone()).await.unwrap();
            spool.store(removed.clone()).await.unwrap();
            spool
                .update_recipients(kept.id, vec![(0, delivered.clone()), (1, deferred.clone())])
                .await
                .unwrap();
            spool.remove(removed.id).await.unwrap();
        });
    }
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(async {
        let listed = spool.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, kept.id);
        assert_eq!(listed[0].recipients[0].status, delivered);
        assert_eq!(listed[0].recipients[1].status, deferred);
        assert!(
            listed[0].recipients[0].status.is_final() && !listed[0].recipients[1].status.is_final()
        );
        assert_eq!(spool.load_content(removed.id).await, Err(SpoolError::NotFound(removed.id)));
    });
}

#[test]
fn a_failing_operation_fails_only_its_caller() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    runtime().block_on(async {
        let original = message(b"one".to_vec());
        spool.store(original.clone()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let spool = spool.clone();
            let duplicate = original.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    spool.store(duplicate).await.is_err()
                } else {
                    spool.store(message(b"new".to_vec())).await.is_ok()
                }
            }));
        }
        for task in tasks {
            assert!(task.await.unwrap());
        }
        assert_eq!(spool.list().await.unwrap().len(), 11);
        assert_eq!(spool.load_content(original.id).await.unwrap(), b"one");
        let missing =
            spool.update_recipients(QueueId(7), vec![(0, RecipientStatus::Pending)]).await;
        assert_eq!(missing, Err(SpoolError::NotFound(QueueId(7))));
    });
}

#[test]
fn queue_ids_are_unique_monotonic_and_round_trip() {
    let ids: Vec<Vec<QueueId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| (0..10_000).map(|_| QueueId::generate()).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = HashSet::new();
    for thread_ids in &ids {
        assert!(thread_ids.windows(2).all(|w| w[0] < w[1]), "monotonic within a thread");
        for id in thread_ids {
            assert!(all.insert(*id));
            let text = id.to_string();
            assert_eq!(text.len(), 13);
            assert_eq!(text.parse::<QueueId>().unwrap(), *id);
            assert_eq!(text.to_lowercase().parse::<QueueId>().unwrap(), *id);
        }
    }
    let (a, b) = (QueueId(5), QueueId(1 << 40));
    assert!(a.to_string() < b.to_string());
    assert_eq!(QueueId(u64::MAX).to_string().parse::<QueueId>().unwrap(), QueueId(u64::MAX));
    assert!("GZZZZZZZZZZZZ".parse::<QueueId>().is_err(), "over 64 bits");
    assert!("short".parse::<QueueId>().is_err());
    assert!("0000000000I00".parse::<QueueId>().is_err(), "not in the alphabet");
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let spool = SqliteSpool::open(&spool_dir).unwrap();
    runtime().block_on(spool.store(message(b"x".to_vec()))).unwrap();
    assert_eq!(fs::metadata(&spool_dir).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in fs::read_dir(&spool_dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
    }
}

/// Needs root to mount a tmpfs; the project's tests run as root.
#[test]
fn full_disk_refuses_new_messages_and_keeps_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    fs::create_dir(&mount).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
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
    let filler = mount.join("filler");
    fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let spool = SqliteSpool::open(&mount.join("spool")).unwrap();
    runtime().block_on(async {
        let mut stored = Vec::new();
        let full = loop {
            let next = message(vec![b'm'; 100 * 1024]);
            match spool.store(next.clone()).await {
                Ok(()) => stored.push(next),
                Err(error) => break error,
            }
            assert!(stored.len() < 100, "the disk never filled");
        };
        assert_eq!(full, SpoolError::StorageFull);
        assert!(!stored.is_empty());
        for message in &stored {
            assert_eq!(spool.load_content(message.id).await.unwrap(), message.content);
        }
        fs::remove_file(&filler).unwrap();
        let after = message(vec![b'n'; 100 * 1024]);
        spool.store(after.clone()).await.unwrap();
        assert_eq!(spool.list().await.unwrap().len(), stored.len() + 1);
        let connection = open_connection(&mount.join("spool/queue.db")).unwrap();
        let check: String =
            connection.query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
        assert_eq!(check, "ok");
    });
}
