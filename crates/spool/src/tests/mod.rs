//! Tests of the public behaviour. The crash and full-disk tests have their own modules.

mod crash;
mod full_disk;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

pub(crate) fn envelope() -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        body: BodyType::EightBitMime,
        smtputf8: true,
        ret: Some(Ret::Headers),
        envid: Some("env+2B1".into()),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "client.example".into(),
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        authenticated_as: Some("alice".into()),
        // Whole milliseconds: that is the stored precision.
        received_at: UNIX_EPOCH + Duration::from_millis(1_795_386_725_123),
    }
}

pub(crate) fn recipient(address: &str) -> Recipient {
    Recipient {
        address: address.into(),
        original: format!("Original-{address}"),
        notify: Some(Notify { success: true, failure: true, delay: false }),
        orcpt: Some(OriginalRecipient { addr_type: "rfc822".into(), address: address.into() }),
        status: RecipientStatus::Pending,
    }
}

pub(crate) fn message(content: &[u8]) -> NewMessage {
    NewMessage {
        id: QueueId::generate(),
        envelope: envelope(),
        recipients: vec![recipient("a@example.com"), recipient("b@example.com")],
        content: Arc::new(content.to_vec()),
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// `PRAGMA integrity_check` over the whole database, content included.
pub(crate) fn integrity_check(dir: &Path) -> String {
    let connection = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    let rows: Vec<String> = connection
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.join("; ")
}

/// A message with a recipient already tried: stored in SQLite rather than the journal, as
/// a message is once an outcome keeps it.
pub(crate) fn tried(content: &[u8]) -> NewMessage {
    let mut message = message(content);
    message.recipients[1].status = RecipientStatus::Deferred {
        attempts: 1,
        next_attempt: millis(60_000),
        last_error: "451 4.4.1 no answer".into(),
        delay_notified: false,
    };
    message
}

/// Messages in SQLite's message table.
fn database_messages(dir: &Path) -> i64 {
    let connection = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    connection.query_row("SELECT count(*) FROM message", [], |row| row.get(0)).unwrap()
}

fn millis(millis: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

fn queued(message: &NewMessage) -> QueuedMessage {
    QueuedMessage {
        id: message.id,
        envelope: message.envelope.clone(),
        recipients: message.recipients.clone(),
        size: message.content.len() as u64,
    }
}

#[test]
fn store_list_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    // Every byte value, NUL and 0xFF included, over 5 MiB.
    let big: Vec<u8> =
        (0..5 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(big.contains(&0) && big.contains(&0xff));
    let mut first = message(&big);
    first.recipients[1].status = RecipientStatus::Deferred {
        attempts: 3,
        next_attempt: millis(1_795_400_000_001),
        last_error: "451 4.3.0 try again".into(),
        delay_notified: false,
    };
    let mut second = message(b"\0\xff\r\n.\r\n\0");
    second.envelope = Envelope {
        sender: String::new(),
        body: BodyType::BinaryMime,
        smtputf8: false,
        ret: None,
        envid: None,
        client_ip: "2001:db8::25".parse().unwrap(),
        helo: "[IPv6:2001:db8::25]".into(),
        tls: None,
        authenticated_as: None,
        received_at: millis(0),
    };
    second.recipients = vec![
        Recipient { notify: None, orcpt: None, ..recipient("plain@example.com") },
        Recipient { notify: Some(Notify::NEVER), ..recipient("never@example.com") },
        Recipient {
            status: RecipientStatus::Delivered { at: millis(5), detail: "250 2.0.0 ok".into() },
            ..recipient("done@example.com")
        },
        Recipient {
            status: RecipientStatus::Failed {
                at: millis(6),
                error: "550 5.1.1 no such user".into(),
            },
            ..recipient("bounced@example.com")
        },
    ];
    let mut third = message(b"");
    third.envelope.body = BodyType::SevenBit;
    third.envelope.ret = Some(Ret::Full);
    third.recipients[0].notify = Some(Notify { success: false, failure: false, delay: true });
    runtime().block_on(async {
        // Stored newest first: the listing must still be oldest first.
        for message in [&third, &second, &first] {
            spool.store(message.clone()).await.unwrap();
        }
        let listed = spool.list().await.unwrap();
        assert_eq!(listed, vec![queued(&first), queued(&second), queued(&third)]);
        for message in [&first, &second, &third] {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }
        let missing = QueueId::generate();
        assert!(matches!(spool.load_content(missing).await, Err(SpoolError::NotFound(id)) if id == missing));
    });
    assert_eq!(spool.stats().messages_stored, 3);
}

#[test]
fn concurrent_stores_share_commits() {
    const SESSIONS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    runtime().block_on(async {
        // Like SMTP sessions finishing DATA at about the same moment.
        let start = Arc::new(tokio::sync::Barrier::new(SESSIONS));
        let tasks: Vec<_> = (0..SESSIONS)
            .map(|_| {
                let (spool, start) = (spool.clone(), start.clone());
                tokio::spawn(async move {
                    let message = message(&[b'x'; 4096]);
                    start.wait().await;
                    spool.store(message.clone()).await.map(|()| message.id)
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for task in tasks {
            ids.insert(task.await.unwrap().unwrap());
        }
        let stats = spool.stats();
        eprintln!(
            "group commit: {} stores in {} commits ({:.1} operations per fsync)",
            stats.operations,
            stats.commits,
            stats.operations as f64 / stats.commits as f64
        );
        assert_eq!((stats.operations, stats.messages_stored), (SESSIONS as u64, SESSIONS as u64));
        assert!(stats.commits < SESSIONS as u64 / 2, "little batching: {stats:?}");
        let listed: HashSet<QueueId> = spool.list().await.unwrap().iter().map(|m| m.id).collect();
        assert_eq!(listed, ids);

        // Sustained load: sessions storing one message after another, unsynchronised.
        let tasks: Vec<_> = (0..SESSIONS)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        spool.store(message(&[b'y'; 4096])).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let sustained = spool.stats();
        let (operations, commits) =
            (sustained.operations - stats.operations, sustained.commits - stats.commits);
        eprintln!(
            "group commit, sustained: {operations} stores in {commits} commits ({:.1} per fsync)",
            operations as f64 / commits as f64
        );
        assert!(commits * 4 < operations, "little batching: {sustained:?}");
        // Every store was answered after a sync, and syncs were shared too.
        assert!(sustained.log_syncs <= sustained.synced_commits, "{sustained:?}");
        assert!(sustained.log_syncs > 0, "{sustained:?}");
    });
}

#[test]
fn everything_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (kept, updated, removed) = (message(b"kept"), message(b"updated"), message(b"removed"));
    let delivered = RecipientStatus::Delivered { at: millis(1_000), detail: "ok".into() };
    let deferred = RecipientStatus::Deferred {
        attempts: 2,
        next_attempt: millis(2_000),
        last_error: "452 4.2.2 mailbox full".into(),
        delay_notified: true,
    };
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(async {
        for message in [&kept, &updated, &removed] {
            spool.store(message.clone()).await.unwrap();
        }
        spool
            .update_recipients(updated.id, vec![(0, delivered.clone()), (1, deferred.clone())])
            .await
            .unwrap();
        spool.remove(removed.id).await.unwrap();
    });
    spool.close().unwrap();
    assert!(!dir.path().join("queue.db-wal").exists(), "close checkpoints the log");

    let spool = SqliteSpool::open(dir.path()).unwrap();
    let mut expected_update = queued(&updated);
    expected_update.recipients[0].status = delivered.clone();
    expected_update.recipients[1].status = deferred.clone();
    rt.block_on(async {
        assert_eq!(spool.list().await.unwrap(), vec![queued(&kept), expected_update]);
        assert_eq!(spool.load_content(updated.id).await.unwrap(), b"updated");
        assert!(matches!(spool.load_content(removed.id).await, Err(SpoolError::NotFound(_))));
        // A delivered recipient can become pending again (an operator's "retry").
        spool.update_recipients(updated.id, vec![(0, RecipientStatus::Pending)]).await.unwrap();
        spool.remove(kept.id).await.unwrap();
    });
    // Dropped without close(): the same orderly shutdown.
    drop(spool);

    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(async {
        let listed = spool.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].recipients[0].status, RecipientStatus::Pending);
        assert_eq!(listed[0].recipients[1].status, deferred);
    });
    drop(spool);
    assert_eq!(integrity_check(dir.path()), "ok");
}

#[test]
fn failing_operations_fail_only_their_callers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    let in_database = runtime().block_on(async {
        let original = message(b"original");
        spool.store(original.clone()).await.unwrap();
        let before = spool.stats();
        let start = Arc::new(tokio::sync::Barrier::new(40));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (spool, start) = (spool.clone(), start.clone());
                let message = if i % 2 == 0 {
                    NewMessage { content: Arc::new(b"duplicate".to_vec()), ..original.clone() }
                } else {
                    message(b"new")
                };
                tokio::spawn(async move {
                    start.wait().await;
                    (i, spool.store(message).await)
                })
            })
            .collect();
        for task in tasks {
            match task.await.unwrap() {
                (i, Err(SpoolError::AlreadyStored(id))) if i % 2 == 0 => {
                    assert_eq!(id, original.id);
                }
                (i, Ok(())) if i % 2 == 1 => {}
                (i, result) => panic!("store {i}: {result:?}"),
            }
        }
        let after = spool.stats();
        assert_eq!(after.messages_stored - before.messages_stored, 20);
        assert!(after.commits - before.commits < 20, "the failures were not batched: {after:?}");
        assert_eq!(spool.list().await.unwrap().len(), 21);
        assert_eq!(spool.load_content(original.id).await.unwrap(), b"original");

        // update_recipients is all or nothing.
        let delivered = RecipientStatus::Delivered { at: millis(1), detail: "ok".into() };
        let partial = spool
            .update_recipients(original.id, vec![(0, delivered.clone()), (2, delivered)])
            .await;
        assert!(matches!(
            partial,
            Err(SpoolError::NoSuchRecipient { id, index: 2 }) if id == original.id
        ));
        let listed = spool.list().await.unwrap();
        assert_eq!(listed[0].recipients, original.recipients);

        // The same, amid other operations of its batch: its first change is undone, theirs
        // are kept.
        let before = spool.stats();
        let start = Arc::new(tokio::sync::Barrier::new(21));
        let stores: Vec<_> = (0..20)
            .map(|_| {
                let (spool, start) = (spool.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    spool.store(message(b"beside")).await
                })
            })
            .collect();
        start.wait().await;
        let delivered = RecipientStatus::Delivered { at: millis(2), detail: "ok".into() };
        let partial = spool
            .update_recipients(original.id, vec![(1, delivered.clone()), (5, delivered)])
            .await;
        assert!(matches!(partial, Err(SpoolError::NoSuchRecipient { index: 5, .. })));
        for store in stores {
            store.await.unwrap().unwrap();
        }
        let after = spool.stats();
        assert!(after.commits - before.commits < 20, "not batched: {after:?}");
        let listed = spool.list().await.unwrap();
        assert_eq!(listed.len(), 41);
        let kept = listed.iter().find(|queued| queued.id == original.id).unwrap();
        assert_eq!(kept.recipients, original.recipients);

        // A new message with the id of one in the database (not the journal) is refused too.
        let in_database = tried(b"in the database");
        spool.store(in_database.clone()).await.unwrap();
        let again = NewMessage { id: in_database.id, ..message(b"again") };
        let refused = spool.store(again).await;
        assert!(
            matches!(refused, Err(SpoolError::AlreadyStored(id)) if id == in_database.id),
            "{refused:?}"
        );
        let missing = QueueId::generate();
        let update = spool.update_recipients(missing, vec![(0, RecipientStatus::Pending)]).await;
        assert!(matches!(update, Err(SpoolError::NotFound(id)) if id == missing));
        assert!(
            matches!(spool.remove(missing).await, Err(SpoolError::NotFound(id)) if id == missing)
        );
        in_database.id
    });
    drop(spool);
    // After a restart, which has to find out again what the database holds.
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let refused = runtime().block_on(spool.store(NewMessage { id: in_database, ..message(b"") }));
    assert!(matches!(refused, Err(SpoolError::AlreadyStored(_))), "{refused:?}");
}

#[test]
fn a_spool_has_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteSpool::open(dir.path()).unwrap();
    match SqliteSpool::open(dir.path()) {
        Err(SpoolError::Io { context, .. }) => {
            assert!(context.contains("another instance"), "{context}")
        }
        Err(error) => panic!("unexpected error: {error}"),
        Ok(_) => panic!("a second owner was let in"),
    }
    drop(first);
    SqliteSpool::open(dir.path()).unwrap();
}

#[test]
fn an_unknown_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    SqliteSpool::open(dir.path()).unwrap().close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    connection.pragma_update(None, "user_version", 99).unwrap();
    drop(connection);
    match SqliteSpool::open(dir.path()) {
        Err(SpoolError::Corrupt(why)) => assert!(why.contains("schema version 99"), "{why}"),
        Err(error) => panic!("unexpected error: {error}"),
        Ok(_) => panic!("opened a database with an unknown schema"),
    }
}

#[test]
fn a_version_2_spool_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut stored = message(b"kept across the upgrade");
    stored.recipients[0].status = RecipientStatus::Deferred {
        attempts: 1,
        next_attempt: millis(5_000),
        last_error: "4.4.1 no answer".into(),
        delay_notified: false,
    };
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(spool.store(stored.clone())).unwrap();
    spool.close().unwrap();
    // Turn the database back into the version 2 layout.
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    connection
        .execute_batch(
            "ALTER TABLE recipient DROP COLUMN delay_notified; DROP TABLE body;
             ALTER TABLE message DROP COLUMN recipients; DROP TABLE journal_removed",
        )
        .unwrap();
    connection.pragma_update(None, "user_version", 2).unwrap();
    drop(connection);

    let spool = SqliteSpool::open(dir.path()).unwrap();
    let listed = rt.block_on(spool.list()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].recipients, stored.recipients);
    let notified = RecipientStatus::Deferred {
        attempts: 2,
        next_attempt: millis(9_000),
        last_error: "4.4.1 no answer".into(),
        delay_notified: true,
    };
    rt.block_on(spool.update_recipients(stored.id, vec![(0, notified.clone())])).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap()[0].recipients[0].status, notified);
}

#[test]
fn a_version_4_spool_gets_the_new_status_check() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut stored = message(b"kept across the upgrade");
    // Not all pending: stored in the recipient table, as every version before 6 did.
    stored.recipients[0].status =
        RecipientStatus::Delivered { at: millis(7_000), detail: "250 ok".into() };
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(spool.store(stored.clone())).unwrap();
    spool.close().unwrap();
    // Version 4 checked the status with IN.
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    let table_sql = |connection: &rusqlite::Connection| -> String {
        connection
            .query_row("SELECT sql FROM sqlite_schema WHERE name = 'recipient'", [], |row| {
                row.get(0)
            })
            .unwrap()
    };
    let old = table_sql(&connection)
        .replace("CREATE TABLE recipient", "CREATE TABLE recipient_4")
        .replace(
            "status = 'pending' OR status = 'deferred'\n                                           \
             OR status = 'delivered' OR status = 'failed'",
            "status IN ('pending', 'deferred', 'delivered', 'failed')",
        );
    assert!(old.contains(" IN ("), "{old}");
    connection
        .execute_batch(&format!(
            "{old}; INSERT INTO recipient_4 SELECT * FROM recipient; DROP TABLE recipient;
             ALTER TABLE recipient_4 RENAME TO recipient;
             ALTER TABLE message DROP COLUMN recipients; DROP TABLE journal_removed"
        ))
        .unwrap();
    connection.pragma_update(None, "user_version", 4).unwrap();
    drop(connection);

    let spool = SqliteSpool::open(dir.path()).unwrap();
    let listed = rt.block_on(spool.list()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].recipients, stored.recipients);
    spool.close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    let version: i32 =
        connection.pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
    assert_eq!(version, 7);
    assert!(!table_sql(&connection).contains(" IN ("));
    // The check still holds.
    let bogus = connection.execute(
        "UPDATE recipient SET status = 'bogus' WHERE message_id = ?1",
        [stored.id.0 as i64],
    );
    assert!(bogus.is_err(), "{bogus:?}");
}

/// Where a message's recipients are: inline (the JSON, `None` if NULL) and how many rows.
fn recipients_stored(dir: &Path, id: QueueId) -> (Option<String>, i64) {
    let connection = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    let inline = connection
        .query_row("SELECT recipients FROM message WHERE id = ?1", [id.0 as i64], |row| row.get(0))
        .unwrap();
    let rows = connection
        .query_row("SELECT count(*) FROM recipient WHERE message_id = ?1", [id.0 as i64], |row| {
            row.get(0)
        })
        .unwrap();
    (inline, rows)
}

#[test]
fn new_mail_stays_in_the_journal_until_an_outcome_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let mut stored = message(b"journal");
    // Without NOTIFY and ORCPT (the other one has both).
    stored.recipients[1].notify = None;
    stored.recipients[1].orcpt = None;
    rt.block_on(spool.store(stored.clone())).unwrap();
    let delivered_at_once = message(b"delivered at the first attempt");
    rt.block_on(spool.store(delivered_at_once.clone())).unwrap();
    assert_eq!(database_messages(dir.path()), 0, "new mail is in the journal only");
    assert_eq!(
        rt.block_on(spool.list()).unwrap(),
        vec![queued(&stored), queued(&delivered_at_once)]
    );

    // Removed at once: SQLite never saw it.
    rt.block_on(spool.remove(delivered_at_once.id)).unwrap();
    // An outcome that keeps the message moves it into SQLite, its recipients into the table.
    let deferred = RecipientStatus::Deferred {
        attempts: 1,
        next_attempt: millis(60_000),
        last_error: "451 4.4.1 no answer".into(),
        delay_notified: false,
    };
    rt.block_on(spool.update_recipients(stored.id, vec![(1, deferred.clone())])).unwrap();
    assert_eq!(recipients_stored(dir.path(), stored.id), (None, 2));
    let mut expected = queued(&stored);
    expected.recipients[1].status = deferred;
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![expected.clone()]);
    assert_eq!(rt.block_on(spool.load_content(stored.id)).unwrap(), b"journal");
    // An index past the end fails whether the message moved or not.
    let fresh = message(b"fresh");
    rt.block_on(spool.store(fresh.clone())).unwrap();
    for id in [stored.id, fresh.id] {
        let missing = rt.block_on(spool.update_recipients(id, vec![(2, RecipientStatus::Pending)]));
        assert!(
            matches!(missing, Err(SpoolError::NoSuchRecipient { index: 2, .. })),
            "{missing:?}"
        );
    }
    // The failed update of the fresh message did not move it.
    assert_eq!(database_messages(dir.path()), 1);
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![expected, queued(&fresh)]);
    // A move that leaves every recipient pending keeps them inline in the message row.
    rt.block_on(spool.update_recipients(fresh.id, vec![(0, RecipientStatus::Pending)])).unwrap();
    let (inline, rows) = recipients_stored(dir.path(), fresh.id);
    assert!(inline.is_some() && rows == 0, "{inline:?} {rows}");
    rt.block_on(spool.remove(stored.id)).unwrap();
    assert_eq!(recipients_stored_count(dir.path()), 0);
    spool.close().unwrap();
    assert_eq!(integrity_check(dir.path()), "ok");

    // Recipients in both places: the spool says so rather than pick one.
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    connection
        .execute(
            "INSERT INTO recipient (message_id, idx, address, original, status, attempts)
             VALUES (?1, 0, 'a@example.com', 'a@example.com', 'pending', 0)",
            [fresh.id.0 as i64],
        )
        .unwrap();
    drop(connection);
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let both = rt.block_on(spool.list());
    assert!(
        matches!(&both, Err(SpoolError::Corrupt(what)) if what.contains("both inline and in the recipient table")),
        "{both:?}"
    );
}

fn recipients_stored_count(dir: &Path) -> i64 {
    let connection = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    connection.query_row("SELECT count(*) FROM recipient", [], |row| row.get(0)).unwrap()
}

#[test]
fn a_version_5_spool_keeps_its_recipient_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut old = message(b"stored by version 5");
    old.recipients[0].status =
        RecipientStatus::Failed { at: millis(3_000), error: "550 no".into() };
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(spool.store(old.clone())).unwrap();
    spool.close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    connection
        .execute_batch("ALTER TABLE message DROP COLUMN recipients; DROP TABLE journal_removed")
        .unwrap();
    connection.pragma_update(None, "user_version", 5).unwrap();
    drop(connection);

    let spool = SqliteSpool::open(dir.path()).unwrap();
    let new = message(b"stored by version 6");
    rt.block_on(spool.store(new.clone())).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![queued(&old), queued(&new)]);
    assert_eq!(recipients_stored(dir.path(), old.id), (None, 2));
    assert_eq!(database_messages(dir.path()), 1, "new mail goes to the journal");
    spool.close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    let version: i32 =
        connection.pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
    assert_eq!(version, 7);
}

#[test]
fn queue_ids_are_unique_monotonic_and_round_trip() {
    let ids: Vec<Vec<QueueId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| (0..10_000).map(|_| QueueId::generate()).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    });
    let mut all = HashSet::new();
    for thread_ids in &ids {
        assert!(thread_ids.windows(2).all(|pair| pair[0] < pair[1]), "monotonic within a thread");
        for id in thread_ids {
            assert!(all.insert(*id), "{id} generated twice");
            let text = id.to_string();
            assert_eq!(text.len(), 13);
            assert_eq!(text.parse::<QueueId>(), Ok(*id));
            assert_eq!(text.to_lowercase().parse::<QueueId>(), Ok(*id));
        }
    }
    // Close to now, and below 2^63 for SQLite.
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let newest = *all.iter().max().unwrap();
    assert!((newest.0 >> 20).abs_diff(now) < 60_000 && newest.0 < 1 << 63);

    // String order is numeric order, for generated ids and for the extremes.
    let mut sorted: Vec<QueueId> = all.into_iter().collect();
    sorted.extend([QueueId(0), QueueId(31), QueueId(32), QueueId(1 << 40), QueueId(u64::MAX)]);
    sorted.sort();
    let strings: Vec<String> = sorted.iter().map(QueueId::to_string).collect();
    assert!(strings.windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(QueueId(0).to_string(), "0000000000000");
    assert_eq!(QueueId(u64::MAX).to_string(), "FZZZZZZZZZZZZ");
    assert_eq!("FZZZZZZZZZZZZ".parse::<QueueId>(), Ok(QueueId(u64::MAX)));

    for bad in ["GZZZZZZZZZZZZ", "short", "00000000000000", "0000000000I00", "000000000000U", ""] {
        assert!(bad.parse::<QueueId>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("new/spool");
    let lax_dir = dir.path().join("lax");
    fs::DirBuilder::new().mode(0o755).create(&lax_dir).unwrap();
    for spool_dir in [spool_dir, lax_dir] {
        let spool = SqliteSpool::open(&spool_dir).unwrap();
        runtime().block_on(spool.store(message(b"secret"))).unwrap();
        runtime().block_on(spool.store(message(&[b's'; 100 << 10]))).unwrap();
        // A large body that stays goes to a segment.
        runtime().block_on(spool.store(tried(&[b't'; 100 << 10]))).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool_dir), 0o700);
        let mut names: Vec<String> = fs::read_dir(&spool_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["journal", "lock", "queue.db", "queue.db-shm", "queue.db-wal", "segments"]
        );
        for name in &names[1..5] {
            assert_eq!(mode(&spool_dir.join(name)), 0o600, "{name}");
        }
        for subdirectory in ["journal", "segments"] {
            let subdirectory = spool_dir.join(subdirectory);
            assert_eq!(mode(&subdirectory), 0o700);
            for file in fs::read_dir(&subdirectory).unwrap() {
                assert_eq!(mode(&file.unwrap().path()), 0o600);
            }
        }
        assert_eq!(fs::read_dir(spool_dir.join("journal")).unwrap().count(), 1);
    }
}

#[test]
fn an_outcome_and_its_notices_commit_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let original = message(b"original");
    rt.block_on(spool.store(original.clone())).unwrap();
    let failed = RecipientStatus::Failed { at: millis(1_000), error: "5.1.1 gone".into() };
    // An update that cannot apply (no recipient 99) takes the notice down with it.
    let notice = message(b"notice");
    let result = rt.block_on(spool.record_outcome(
        original.id,
        vec![(99, failed.clone())],
        false,
        vec![notice.clone()],
    ));
    assert!(matches!(result, Err(SpoolError::NoSuchRecipient { index: 99, .. })), "{result:?}");
    let listed = rt.block_on(spool.list()).unwrap();
    assert_eq!(listed.iter().map(|m| m.id).collect::<Vec<_>>(), [original.id]);
    // A good one stores the notice and records the outcome.
    rt.block_on(spool.record_outcome(
        original.id,
        vec![(0, failed.clone())],
        false,
        vec![notice.clone()],
    ))
    .unwrap();
    let listed = rt.block_on(spool.list()).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].recipients[0].status, failed);
    assert_eq!(rt.block_on(spool.load_content(notice.id)).unwrap(), b"notice");
    // Removal with a notice: the original goes, the notice stays.
    let second = message(b"second notice");
    rt.block_on(spool.record_outcome(original.id, Vec::new(), true, vec![second.clone()])).unwrap();
    let ids: Vec<QueueId> = rt.block_on(spool.list()).unwrap().iter().map(|m| m.id).collect();
    assert_eq!(ids, [notice.id, second.id]);
}

#[test]
fn messages_stored_together_are_all_there_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let (first, second) = (message(b"one"), message(b"two"));
    rt.block_on(spool.store_all(vec![first.clone(), second.clone()])).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap().len(), 2);
    // A duplicate id fails the whole group: the new message beside it is not stored.
    let third = message(b"three");
    assert!(rt.block_on(spool.store_all(vec![third.clone(), first.clone()])).is_err());
    let ids: Vec<QueueId> = rt.block_on(spool.list()).unwrap().iter().map(|m| m.id).collect();
    assert_eq!(ids, [first.id, second.id]);
}

#[test]
fn records_of_outcomes_commit_without_fsync_and_a_checkpoint_syncs_them_soon() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    runtime().block_on(async {
        let kept = message(b"kept");
        let removed = message(b"removed");
        spool.store_all(vec![kept.clone(), removed.clone()]).await.unwrap();
        let stored = spool.stats();
        assert_eq!((stored.commits, stored.synced_commits), (1, 1));
        assert_eq!(stored.log_syncs, 1, "answered only after the log was synced");

        spool.remove(removed.id).await.unwrap();
        let at = millis(1_700_000_000_000);
        let status = RecipientStatus::Delivered { at, detail: "250 ok".into() };
        spool.update_recipients(kept.id, vec![(0, status)]).await.unwrap();
        let recorded = spool.stats();
        assert_eq!(recorded.commits, 3, "{recorded:?}");
        assert_eq!(recorded.synced_commits, 1, "records are not fsync'ed: {recorded:?}");
        assert_eq!(recorded.log_syncs, 1, "records are not fsync'ed: {recorded:?}");

        // No mail follows to carry them to the disk: within a second the writer syncs the
        // journal (the removal) and the checkpointer the log (the delivered recipient, and
        // the message's move into the database).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while spool.stats().checkpoints == 0 || spool.stats().lazy_syncs < 2 {
            assert!(std::time::Instant::now() < deadline, "not synced: {:?}", spool.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(spool.stats().lazy_syncs, 2, "once each");
        // A store after them is fsync'ed again.
        spool.store(message(b"next")).await.unwrap();
        assert_eq!(spool.stats().synced_commits, 2);
        assert_eq!(spool.stats().log_syncs, 2);
        let listed = spool.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].recipients[0].status.is_final());
    });
}

#[test]
fn a_growing_log_is_checkpointed_by_the_checkpoint_thread() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    runtime().block_on(async {
        // About 1300 pages of log, past the 1000 that start a checkpoint (bodies small
        // enough to be kept in the database).
        for _ in 0..400 {
            spool.store(tried(&[b'z'; 12 << 10])).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while spool.stats().checkpoints == 0 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint: {:?}", spool.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every store was fsync'ed at its commit, none waited for a checkpoint.
        let stats = spool.stats();
        assert_eq!(stats.synced_commits, stats.commits);
    });
    spool.close().unwrap();
    assert!(!dir.path().join("queue.db-wal").exists(), "close checkpoints the log");
    assert_eq!(integrity_check(dir.path()), "ok");
}

#[test]
fn under_sustained_load_the_log_starts_over_without_chasing_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    sustained_load(&spool, &runtime());
    let stats = spool.stats();
    eprintln!("sustained load: {stats:?}");
    assert!(stats.log_restarts >= 2, "the log never started over: {stats:?}");
    // One checkpoint by the thread and one by the writer for each time the log started
    // over, and the odd one put off by a reader: not one per commit while the writer runs.
    assert!(stats.checkpoints <= 2 * stats.log_restarts + 4, "{stats:?}");
    let log = fs::metadata(dir.path().join("queue.db-wal")).unwrap().len();
    assert!(log < 3 * 1000 * 4120, "a log of {log} octets");
    drop(spool);
    assert_eq!(integrity_check(dir.path()), "ok");
}

/// Sessions storing 8 KiB bodies back to back: several times the 1000 pages of log that
/// start a checkpoint.
fn sustained_load(spool: &Arc<SqliteSpool>, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    for _ in 0..120 {
                        spool.store(tried(&[b'w'; 8 << 10])).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[test]
fn a_reader_holding_an_old_snapshot_does_not_make_every_commit_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(SqliteSpool::open(dir.path()).unwrap());
    let rt = runtime();
    rt.block_on(spool.store(tried(b"first"))).unwrap();
    // An operator's sqlite3 shell, say, in the middle of a read: no checkpoint can copy past
    // its snapshot, so the log cannot start over.
    let reader = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let seen: i64 = reader.query_row("SELECT count(*) FROM message", [], |row| row.get(0)).unwrap();
    assert_eq!(seen, 1);
    sustained_load(&spool, &rt);
    let held = spool.stats();
    eprintln!("reader holding the log: {held:?}");
    assert_eq!(held.log_restarts, 0, "{held:?}");
    // Asked again only every 250 frames, not after every commit, and not on the writer.
    assert!(held.checkpoints * 5 < held.commits, "{held:?}");
    // The reader lets go: the log is copied and starts over again.
    reader.execute_batch("COMMIT").unwrap();
    sustained_load(&spool, &rt);
    let after = spool.stats();
    assert!(after.log_restarts >= 1, "{after:?}");
    drop(reader);
    drop(spool);
    assert_eq!(integrity_check(dir.path()), "ok");
}

/// Bodies above the inline limit, one byte pattern per message, in messages that SQLite
/// stores.
fn large(seed: u8, len: usize) -> NewMessage {
    tried(&(0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
}

fn segment_files(spool_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(spool_dir.join("segments"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn large_bodies_go_to_segments_and_come_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    // Around the limit, far above it, and several in one transaction.
    let limit = crate::segments::INLINE_LIMIT;
    let messages =
        vec![large(1, limit), large(2, limit + 1), large(3, 1 << 20), large(4, 3 * limit)];
    rt.block_on(async {
        spool.store(messages[0].clone()).await.unwrap();
        spool.store(messages[1].clone()).await.unwrap();
        spool.store_all(messages[2..].to_vec()).await.unwrap();
        for message in &messages {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }
    });
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    let count = |table: &str| -> i64 {
        connection
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!((count("content"), count("body")), (1, 3), "only the one at the limit is inline");
    drop(connection);
    assert_eq!(segment_files(dir.path()).len(), 1);
    spool.close().unwrap();

    // After a restart the same bodies are read from the same segment.
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(async {
        for message in &messages {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }
    });
}

#[test]
fn a_segment_is_deleted_once_its_last_body_is_removed_and_it_is_no_longer_written() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (first, second) = (large(1, 100 << 10), large(2, 100 << 10));
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(spool.store_all(vec![first.clone(), second.clone()])).unwrap();
    // Emptied, but still the segment new bodies go to: kept.
    rt.block_on(spool.remove(first.id)).unwrap();
    let third = large(3, 100 << 10);
    rt.block_on(spool.store(third.clone())).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    spool.close().unwrap();

    // A crash can leave a segment that no row points into (its commit never happened).
    fs::write(dir.path().join("segments/00000000000000ff"), b"torn tail").unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let old = segment_files(dir.path());
    assert_eq!(old.len(), 1, "the unreferenced segment is gone: {old:?}");
    // New bodies go to a new segment, numbered after every one seen.
    let fourth = large(4, 100 << 10);
    rt.block_on(spool.store(fourth.clone())).unwrap();
    let both = segment_files(dir.path());
    assert_eq!(both, [old[0].clone(), "0000000000000100".to_string()]);
    // The old segment goes with its last body; the removals commit without fsync, so the
    // log is synced before the file is deleted.
    rt.block_on(spool.remove(second.id)).unwrap();
    assert_eq!(segment_files(dir.path()), both, "one body is still in it");
    rt.block_on(spool.remove(third.id)).unwrap();
    assert_eq!(segment_files(dir.path()), ["0000000000000100"]);
    assert_eq!(rt.block_on(spool.load_content(fourth.id)).unwrap(), *fourth.content);
    assert_eq!(rt.block_on(spool.list()).unwrap().len(), 1);
    spool.close().unwrap();
    assert_eq!(integrity_check(dir.path()), "ok");
}

#[test]
fn after_a_failed_log_sync_nothing_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let rt = runtime();
    let kept = message(b"before");
    rt.block_on(spool.store(kept.clone())).unwrap();
    // As the sync thread does when fdatasync fails: Linux reports a failed writeback once,
    // so a later sync that succeeds would prove nothing.
    spool.counters.log_sync_failed.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = rt.block_on(spool.store(message(b"after")));
    assert!(
        matches!(&refused, Err(SpoolError::Io { context, .. }) if context.contains("restart")),
        "{refused:?}"
    );
    assert!(rt.block_on(spool.remove(kept.id)).is_err(), "records are refused too");
    assert!(spool.stats().log_sync_failed);
    spool.close().unwrap();
    // A new start begins afresh, with what was acknowledged before.
    let spool = SqliteSpool::open(dir.path()).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap().len(), 1);
    rt.block_on(spool.store(message(b"again"))).unwrap();
}

#[test]
fn messages_waiting_long_move_out_of_a_full_journal() {
    let dir = tempfile::tempdir().unwrap();
    let limits = journal::Limits { file_size: 64 << 10, max_files: 2, move_after: Duration::ZERO };
    let spool = Arc::new(SqliteSpool::open_with(dir.path(), limits).unwrap());
    let rt = runtime();
    // About 400 KiB: six files' worth, none delivered.
    let messages: Vec<NewMessage> = (0..100u8).map(|i| message(&[i; 4 << 10])).collect();
    rt.block_on(async {
        for message in &messages {
            spool.store(message.clone()).await.unwrap();
        }
    });
    let moved = database_messages(dir.path());
    assert!(moved >= 50, "only {moved} moved into SQLite");
    let files = fs::read_dir(dir.path().join("journal")).unwrap().count();
    // At most the bound, the one being filled, and spares.
    assert!(files <= 2 + 1 + 4, "{files} journal files");
    let all: Vec<QueuedMessage> = messages.iter().map(queued).collect();
    rt.block_on(async {
        assert_eq!(spool.list().await.unwrap(), all);
        for message in &messages {
            assert_eq!(spool.load_content(message.id).await.unwrap(), *message.content);
        }
    });
    drop(spool);
    let spool = SqliteSpool::open_with(dir.path(), limits).unwrap();
    rt.block_on(async {
        assert_eq!(spool.list().await.unwrap(), all);
        for message in &messages {
            spool.remove(message.id).await.unwrap();
        }
        assert_eq!(spool.list().await.unwrap(), []);
    });
    drop(spool);
    // Removals from both places stand after a restart.
    let spool = SqliteSpool::open_with(dir.path(), limits).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), []);
    drop(spool);
    assert_eq!(integrity_check(dir.path()), "ok");
}

#[test]
fn a_message_moved_and_removed_does_not_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let limits =
        journal::Limits { file_size: 16 << 10, max_files: 8, move_after: Duration::from_secs(60) };
    let removed_rows = |dir: &Path| -> i64 {
        let connection = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
        connection.query_row("SELECT count(*) FROM journal_removed", [], |row| row.get(0)).unwrap()
    };
    let (moved, other) = (message(b"moved, then removed"), message(b"other"));
    let spool = SqliteSpool::open_with(dir.path(), limits).unwrap();
    rt.block_on(async {
        spool.store(moved.clone()).await.unwrap();
        spool.store(other.clone()).await.unwrap();
        let deferred = RecipientStatus::Deferred {
            attempts: 1,
            next_attempt: millis(60_000),
            last_error: "451 4.4.1 no answer".into(),
            delay_notified: false,
        };
        spool.update_recipients(moved.id, vec![(0, deferred)]).await.unwrap();
        spool.remove(moved.id).await.unwrap();
    });
    drop(spool);
    // Its journal file is still there, with the message in it: SQLite says it was removed.
    assert_eq!(removed_rows(dir.path()), 1);
    assert_eq!(SqliteSpool::read_queue(dir.path()).unwrap(), vec![queued(&other)]);
    let spool = SqliteSpool::open_with(dir.path(), limits).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![queued(&other)]);
    // Once the file is reclaimed (more mail fills it, everything in it is removed), the row
    // goes.
    rt.block_on(async {
        spool.remove(other.id).await.unwrap();
        for i in 0..8u8 {
            let filler = message(&[i; 4 << 10]);
            spool.store(filler.clone()).await.unwrap();
            spool.remove(filler.id).await.unwrap();
        }
    });
    drop(spool);
    assert_eq!(removed_rows(dir.path()), 0);
    let spool = SqliteSpool::open_with(dir.path(), limits).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), []);
    drop(spool);
    assert_eq!(integrity_check(dir.path()), "ok");
}

#[test]
fn a_version_6_spool_gets_the_journal_removal_table() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let old = tried(b"stored by version 6");
    let spool = SqliteSpool::open(dir.path()).unwrap();
    rt.block_on(spool.store(old.clone())).unwrap();
    spool.close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    connection.execute_batch("DROP TABLE journal_removed").unwrap();
    connection.pragma_update(None, "user_version", 6).unwrap();
    drop(connection);

    let spool = SqliteSpool::open(dir.path()).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![queued(&old)]);
    rt.block_on(spool.remove(old.id)).unwrap();
    spool.close().unwrap();
    let connection = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    let version: i32 =
        connection.pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
    assert_eq!(version, 7);
    let rows: i64 =
        connection.query_row("SELECT count(*) FROM journal_removed", [], |row| row.get(0)).unwrap();
    assert_eq!(rows, 0, "it never was in the journal");
}

#[test]
fn a_message_moved_and_removed_in_one_batch_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let spool = SqliteSpool::open(dir.path()).unwrap();
    let (message, other) = (message(b"moved and removed at once"), message(b"other"));
    rt.block_on(async {
        spool.store_all(vec![message.clone(), other.clone()]).await.unwrap();
        let deferred = RecipientStatus::Deferred {
            attempts: 1,
            next_attempt: millis(60_000),
            last_error: "451 4.4.1 no answer".into(),
            delay_notified: false,
        };
        // Submitted together, they share a batch (a record without fsync waits for more):
        // the move, then the removal, in one transaction.
        let before = spool.stats().commits;
        let (moved, removed) = tokio::join!(
            spool.update_recipients(message.id, vec![(0, deferred)]),
            spool.remove(message.id)
        );
        moved.unwrap();
        removed.unwrap();
        assert_eq!(spool.stats().commits - before, 1, "one batch");
    });
    drop(spool);
    assert_eq!(SqliteSpool::read_queue(dir.path()).unwrap(), vec![queued(&other)]);
    let spool = SqliteSpool::open(dir.path()).unwrap();
    assert_eq!(rt.block_on(spool.list()).unwrap(), vec![queued(&other)]);
}
