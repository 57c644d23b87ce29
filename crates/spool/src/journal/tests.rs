use super::*;
use crate::tests::message;

/// Opens the journal in `dir` as if SQLite held `in_database`.
fn open(dir: &Path, in_database: &[QueueId]) -> Journal {
    Journal::open(dir, Limits::default(), Arc::default(), &mut |id| Ok(in_database.contains(&id)))
        .unwrap()
}

fn append(journal: &mut Journal, messages: &[&NewMessage], removals: &[QueueId]) {
    let encoded: Vec<_> = messages.iter().map(|m| EncodedMessage::new(m).unwrap()).collect();
    journal.append(&encoded, removals).unwrap();
}

fn listed(journal: &Journal) -> Vec<QueueId> {
    list(&journal.index()).unwrap().into_iter().map(|message| message.id).collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        fs::read_dir(dir.join(DIR)).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn headers_round_trip_and_damage_is_seen() {
    let header = Header { active: true, sequence: 7, nonce: 0x0123_4567_89ab_cdef };
    let encoded = header.encode();
    assert_eq!(Header::decode(&encoded), Some(header));
    let free = Header { active: false, ..header };
    assert_eq!(Header::decode(&free.encode()), Some(free));
    for at in [0, 9, 13, 17, 25, 33] {
        let mut damaged = encoded;
        damaged[at] ^= 1;
        assert_eq!(Header::decode(&damaged), None, "byte {at}");
    }
    assert_eq!(Header::decode(&encoded[..40]), None, "short");
    assert_eq!(Header::decode(&[0; 64]), None, "never written");
}

#[test]
fn records_replay_after_a_reopen_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (message(b"first"), message(&[7; 40 << 10]), message(b""));
    let mut journal = open(dir.path(), &[]);
    append(&mut journal, &[&a, &b], &[]);
    append(&mut journal, &[&c], &[a.id]);
    let expected = vec![b.id, c.id];
    assert_eq!(listed(&journal), expected);
    drop(journal);

    let journal = open(dir.path(), &[]);
    assert_eq!(listed(&journal), expected);
    let index = journal.index();
    for m in [&b, &c] {
        assert_eq!(load_content(&index, m.id).unwrap().unwrap(), *m.content);
        let (queued, content) = journal.read(m.id).unwrap();
        assert_eq!(
            (queued.envelope, queued.recipients),
            (m.envelope.clone(), m.recipients.clone())
        );
        assert_eq!(content, *m.content);
    }
    assert!(load_content(&index, a.id).is_none(), "removed");
    // The same, read by another process while this one has the journal open.
    let (read, files) = read_only(dir.path()).unwrap();
    assert_eq!(read.iter().map(|m| m.id).collect::<Vec<_>>(), expected);
    assert!(files.unchanged().unwrap());
    // A file freed after the read is seen.
    let mut journal = journal;
    append(&mut journal, &[&message(&vec![0; Limits::default().file_size as usize])], &[]);
    append(&mut journal, &[], &[b.id, c.id]);
    assert!(journal.reclaimable());
    journal.reclaim_synced();
    assert!(!files.unchanged().unwrap());
}

#[test]
fn replay_stops_at_a_torn_or_foreign_record() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (message(b"kept"), message(b"torn"));
    let mut journal = open(dir.path(), &[]);
    append(&mut journal, &[&a], &[]);
    let torn_at = journal.offset;
    append(&mut journal, &[&b], &[]);
    let end = journal.offset;
    let nonce = journal.files.back().unwrap().nonce;
    let file = journal.current_file();
    drop(journal);

    // The second record cut short, as a crash during its write leaves it.
    file.set_len(end - 3).unwrap();
    assert_eq!(listed(&open(dir.path(), &[])), [a.id]);

    // A whole record whose checksum was made without the file's nonce (stale data of an
    // earlier use of the file, or message content imitating a record) is not replayed.
    let forged = message(b"forged");
    let mut record = Vec::new();
    encode_record(nonce ^ 1, &[EncodedMessage::new(&forged).unwrap()], &[a.id], &mut record);
    file.write_all_at(&record, torn_at).unwrap();
    assert_eq!(listed(&open(dir.path(), &[])), [a.id]);
    // With the right nonce it would have been.
    encode_record(nonce, &[EncodedMessage::new(&forged).unwrap()], &[a.id], &mut record);
    file.write_all_at(&record, torn_at).unwrap();
    let journal = open(dir.path(), &[]);
    assert_eq!(listed(&journal), [forged.id]);
    // Each open started a file of its own; the replayed ones stay while they hold messages.
    assert!(files(dir.path()).len() >= 2);
}

#[test]
fn a_moved_message_is_sqlites() {
    let dir = tempfile::tempdir().unwrap();
    let (moved, stays) = (message(b"moved"), message(b"stays"));
    let mut journal = open(dir.path(), &[]);
    append(&mut journal, &[&moved, &stays], &[]);
    journal.moved(&[moved.id]);
    assert_eq!(journal.residence(moved.id), Residence::Moved);
    assert_eq!(listed(&journal), [stays.id]);
    drop(journal);

    // SQLite has it (or had it and removed it): not listed from the journal, but known
    // until its file is reclaimed.
    let mut journal = open(dir.path(), &[moved.id]);
    assert_eq!(listed(&journal), [stays.id]);
    assert_eq!(journal.residence(moved.id), Residence::Moved);
    append(&mut journal, &[], &[stays.id]);
    assert!(journal.reclaimable());
    assert_eq!(journal.reclaim_synced(), [moved.id], "its removal row, if any, can go");
    assert_eq!(journal.residence(moved.id), Residence::Elsewhere);
}

#[test]
fn files_are_reclaimed_in_order_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let big = |seed| message(&vec![seed; Limits::default().file_size as usize]);
    let (first, second) = (big(1), message(b"second"));
    let small = message(b"small");
    let mut journal = open(dir.path(), &[]);
    append(&mut journal, &[&first, &small], &[]);
    // Full: the next append starts the second file.
    append(&mut journal, &[&second], &[]);
    assert_eq!(journal.files.len(), 2);
    // The first file has a message left: nothing can go.
    append(&mut journal, &[], &[first.id]);
    assert!(!journal.reclaimable());
    append(&mut journal, &[], &[small.id]);
    assert!(journal.reclaimable());
    journal.reclaim_synced();
    assert_eq!(journal.files.len(), 1);
    assert_eq!(journal.spare.len(), 1);
    let freed = journal.spare[0].1.clone();
    // A reader still holding the free file keeps it from being reused.
    let third = big(3);
    append(&mut journal, &[&third], &[second.id]);
    let held = journal.spare.len();
    append(&mut journal, &[&message(b"after")], &[]);
    assert_eq!(journal.spare.len(), held, "the held file was not reused");
    assert!(journal.files.iter().all(|file| !Arc::ptr_eq(&file.file, &freed)));
    drop(freed);
    let mut slots: Vec<u64> = journal.files.iter().map(|file| file.slot).collect();
    slots.sort_unstable();
    drop(journal);

    // What the reused and the freed files held before does not come back.
    let journal = open(dir.path(), &[]);
    let left = listed(&journal);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&third.id));
    assert!(!left.contains(&first.id) && !left.contains(&second.id) && !left.contains(&small.id));
    drop(journal);
    // And once a reused file is reused again, its old records still do not.
    let mut journal = open(dir.path(), &[]);
    let ids = listed(&journal);
    append(&mut journal, &[], &ids);
    journal.reclaim_synced();
    let fresh = big(4);
    append(&mut journal, &[&fresh], &[]);
    append(&mut journal, &[&message(b"next")], &[]);
    drop(journal);
    let left = listed(&open(dir.path(), &[]));
    assert_eq!(left.len(), 2);
    assert!(left.contains(&fresh.id));
}

#[test]
fn only_messages_waiting_long_in_a_full_journal_are_to_move() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { file_size: 1024, max_files: 2, move_after: Duration::from_secs(3600) };
    let mut journal =
        Journal::open(dir.path(), limits, Arc::default(), &mut |_| Ok(false)).unwrap();
    let messages: Vec<NewMessage> = (0..4u8).map(|i| message(&[i; 2048])).collect();
    for message in &messages {
        append(&mut journal, &[message], &[]);
    }
    append(&mut journal, &[], &[]);
    assert!(journal.files.len() > 2);
    assert_eq!(journal.overflow(), [], "a burst: the oldest file is young");
    journal.limits.move_after = Duration::ZERO;
    assert_eq!(journal.overflow(), [messages[0].id], "the oldest file's message");
    journal.moved(&[messages[0].id]);
    assert!(journal.reclaimable());
    journal.limits.max_files = 10;
    assert_eq!(journal.overflow(), [], "within the bound");
}

/// A file whose sync fails, as after a failed writeback: a pipe (`fdatasync` says EINVAL).
fn unsyncable() -> Arc<File> {
    let (_, writer) = std::io::pipe().unwrap();
    Arc::new(File::from(std::os::fd::OwnedFd::from(writer)))
}

#[test]
fn a_failed_sync_stops_acknowledgements_even_where_another_succeeds() {
    let counters = Counters::default();
    assert!(sync_file(&unsyncable(), &counters, "a test file").is_err());
    assert!(counters.log_sync_failed.load(std::sync::atomic::Ordering::Relaxed));
    // The next sync of a good file succeeds, but the pages of the failed one may be gone: it
    // must not be taken for a success.
    let dir = tempfile::tempdir().unwrap();
    let good = File::create(dir.path().join("good")).unwrap();
    let after = sync_file(&good, &counters, "a test file");
    assert!(matches!(&after, Err(SpoolError::Io { context, .. }) if context.contains("restart")));
}

#[test]
fn a_failed_sync_of_a_full_file_stops_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let limits = Limits { file_size: 1024, ..Limits::default() };
    let mut journal =
        Journal::open(dir.path(), limits, counters.clone(), &mut |_| Ok(false)).unwrap();
    append(&mut journal, &[&message(&[1; 2048])], &[]);
    // The full file's sync, before the next one is started, fails.
    journal.files.back_mut().unwrap().file = unsyncable();
    let next = message(b"next");
    let _ = journal.append(&[EncodedMessage::new(&next).unwrap()], &[]);
    assert!(counters.log_sync_failed.load(std::sync::atomic::Ordering::Relaxed));
}
