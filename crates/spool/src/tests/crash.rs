//! kill -9 at a random moment loses nothing that was acknowledged.
//!
//! The test re-runs its own test binary as a child that stores, updates and removes messages
//! in a loop and reports each operation on stderr only once its future has resolved, which is
//! when the server would send its 250. The parent kills the child with SIGKILL, several
//! times over the same spool, then checks that every reported operation took effect, that
//! every message present is intact, and that SQLite finds the database sound.
//!
//! SIGKILL keeps the kernel's page cache, so this checks atomicity, recovery and the order
//! of "commit, then answer"; surviving power loss additionally relies on the fsync that
//! `synchronous=FULL` performs at every commit that stores mail (other commits ride on the
//! next fsync, see the crate documentation).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::*;

const CHILD_DIR: &str = "SPOOL_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "tests::crash::child_stores_until_killed";

/// Content derived from the id, so the parent can check it without being told: 0 to 48 KiB
/// of bytes of every value.
fn content(id: QueueId) -> Vec<u8> {
    let mut state = id.0 | 1;
    let len = (id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize % (48 << 10);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The child half: runs only when the parent sets the environment variable.
#[test]
#[ignore = "started by kill_dash_nine_loses_no_acknowledged_operation"]
fn child_stores_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let spool = Arc::new(SqliteSpool::open(Path::new(&dir)).unwrap());
    let report = |line: String| {
        let mut stderr = std::io::stderr().lock();
        writeln!(stderr, "{line}").unwrap();
        stderr.flush().unwrap();
    };
    // A parent that died must not leave the child running forever.
    let deadline = Instant::now() + Duration::from_secs(60);
    runtime().block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    let mut count = 0u64;
                    while Instant::now() < deadline {
                        count += 1;
                        let id = QueueId::generate();
                        let message = NewMessage {
                            id,
                            content: std::sync::Arc::new(content(id)),
                            ..message(b"")
                        };
                        spool.store(message).await.unwrap();
                        report(format!("ack stored {id}"));
                        if count.is_multiple_of(3) {
                            let delivered = RecipientStatus::Delivered {
                                at: millis(count),
                                detail: format!("{id}"),
                            };
                            spool.update_recipients(id, vec![(1, delivered)]).await.unwrap();
                            report(format!("ack updated {id}"));
                        }
                        if count.is_multiple_of(5) {
                            // Killed after this line the removal may or may not have happened.
                            report(format!("begin remove {id}"));
                            spool.remove(id).await.unwrap();
                            report(format!("ack removed {id}"));
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    Stored,
    Updated,
    /// The removal was started; it may have been committed without being acknowledged.
    Removing,
    Removed,
}

/// Runs the child until it has acknowledged something, lets it go on for a random while,
/// kills it and returns what it reported, in order.
fn run_and_kill(dir: &Path, random: u64) -> Vec<(Reported, QueueId)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut reported = Vec::new();
    let mut other = Vec::new();
    while reported.is_empty() {
        match received.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => match parse(&line) {
                Some(report) => reported.push(report),
                None => other.push(line),
            },
            Err(_) => panic!("the child acknowledged nothing; its stderr: {other:#?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(20 + random % 400));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{other:#?}");
    reader.join().unwrap();
    for line in received.try_iter() {
        match parse(&line) {
            Some(report) => reported.push(report),
            None => other.push(line),
        }
    }
    // Anything else on stderr would be a failure in the child before the kill.
    assert!(other.iter().all(|line| !line.contains("panicked")), "{other:#?}");
    reported
}

/// `ack stored ID`, `begin remove ID` and the like; a line cut short by the kill is no
/// report.
fn parse(line: &str) -> Option<(Reported, QueueId)> {
    if let Some(id) = line.strip_prefix("begin remove ") {
        return Some((Reported::Removing, id.parse().ok()?));
    }
    let (what, id) = line.strip_prefix("ack ")?.split_once(' ')?;
    let what = match what {
        "stored" => Reported::Stored,
        "updated" => Reported::Updated,
        "removed" => Reported::Removed,
        _ => return None,
    };
    Some((what, id.parse().ok()?))
}

#[test]
fn kill_dash_nine_loses_no_acknowledged_operation() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("spool");
    let mut expected: HashMap<QueueId, Reported> = HashMap::new();
    let random = RandomState::new();
    for round in 0..3u64 {
        let reported = run_and_kill(&dir, random.hash_one(round));
        eprintln!("round {round}: killed after {} reports", reported.len());
        for (what, id) in reported {
            expected.insert(id, what);
        }
    }

    let spool = SqliteSpool::open(&dir).unwrap();
    let listed = runtime().block_on(spool.list()).unwrap();
    let listed: HashMap<QueueId, QueuedMessage> =
        listed.into_iter().map(|message| (message.id, message)).collect();
    for (id, what) in &expected {
        let message = listed.get(id);
        match what {
            Reported::Removed => assert!(message.is_none(), "{id} was removed but is back"),
            Reported::Removing => {}
            Reported::Stored | Reported::Updated => {
                let message =
                    message.unwrap_or_else(|| panic!("{id} was acknowledged but is lost"));
                // An update may also have been committed without being acknowledged.
                let delivered = matches!(
                    &message.recipients[1].status,
                    RecipientStatus::Delivered { detail, .. } if *detail == id.to_string()
                );
                assert!(*what == Reported::Stored || delivered, "the update of {id} is lost");
            }
        }
    }
    // Nothing torn: every message present, acknowledged or not, is whole.
    let rt = runtime();
    for message in listed.values() {
        let expected_content = content(message.id);
        assert_eq!(message.size, expected_content.len() as u64);
        assert_eq!(message.recipients.len(), 2, "{}", message.id);
        assert_eq!(message.envelope, envelope());
        assert_eq!(rt.block_on(spool.load_content(message.id)).unwrap(), expected_content);
    }
    spool.close().unwrap();
    assert_eq!(integrity_check(&dir), "ok");
    eprintln!(
        "{} reported messages checked, {} messages in the spool",
        expected.len(),
        listed.len()
    );
}
