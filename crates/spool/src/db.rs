//! The SQLite schema and every statement run against it.
//!
//! Message content lives in its own table so that listing the queue never reads the blobs;
//! large bodies live in segment files and the `body` table says where (see `segments`).
//! Recipient states are plain columns (not JSON) so an operator can query them with the
//! `sqlite3` shell, e.g. `SELECT * FROM recipient WHERE status = 'deferred'`. A message
//! stored with every recipient pending keeps them in `message.recipients` (JSON) instead,
//! until the first outcome that does not remove it moves them to the recipient table: most
//! mail is delivered at the first attempt and removed, and a row per recipient written,
//! indexed and deleted again cost the spool a quarter of the pages it wrote per message.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::error::Context;
use crate::segments::{self, BodyLocation};
use crate::{
    BodyType, Envelope, NewMessage, Notify, OriginalRecipient, QueueId, QueuedMessage, Recipient,
    RecipientStatus, Ret, SpoolError,
};

/// `PRAGMA user_version` of the layout below. Version 1 was a pre-release layout (recipients
/// as JSON); it was never released and is not migrated. Version 2 lacked
/// `recipient.delay_notified`, which [`MIGRATE_2_TO_3`] adds; version 3 lacked the `body`
/// table, which [`MIGRATE_3_TO_4`] adds; version 4 checked `recipient.status` with `IN`,
/// which [`MIGRATE_4_TO_5`] replaces; version 5 lacked `message.recipients`, which
/// [`MIGRATE_5_TO_6`] adds; version 6 lacked the `journal_removed` table, which
/// [`MIGRATE_6_TO_7`] adds.
const SCHEMA_VERSION: i32 = 7;

/// Upgrades a version 2 spool in place: no recipient of it has had a delay notice.
const MIGRATE_2_TO_3: &str =
    "ALTER TABLE recipient ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;";

/// Upgrades a version 3 spool in place: its bodies are all in `content`.
const MIGRATE_3_TO_4: &str = "
    CREATE TABLE body (
        id      INTEGER PRIMARY KEY,       -- message.id
        segment INTEGER NOT NULL,          -- the segment file's number
        offset  INTEGER NOT NULL,
        length  INTEGER NOT NULL
    );
    CREATE INDEX body_segment ON body (segment);
";

/// The recipient table, named `$name`. `status` is checked with `=` and `OR`, not `IN`: SQLite
/// builds a temporary table for an `IN` list of more than two values each time the check
/// runs, which cost more than the rest of the insert.
macro_rules! recipient_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
        message_id    INTEGER NOT NULL,    -- message.id
        idx           INTEGER NOT NULL,    -- position in the message's recipient list
        address       TEXT NOT NULL,
        original      TEXT NOT NULL,
        notify        TEXT,                -- NULL (not given), NEVER, or e.g. SUCCESS,FAILURE
        orcpt_type    TEXT,
        orcpt_address TEXT,
        status        TEXT NOT NULL CHECK (status = 'pending' OR status = 'deferred'
                                           OR status = 'delivered' OR status = 'failed'),
        attempts      INTEGER NOT NULL,    -- kept when a recipient becomes delivered or failed
        next_attempt  INTEGER,             -- deferred: Unix milliseconds
        last_error    TEXT,                -- deferred: the last temporary error; failed: the error
        done_at       INTEGER,             -- delivered or failed: Unix milliseconds
        detail        TEXT,                -- delivered: the receiving side's answer
        delay_notified INTEGER NOT NULL DEFAULT 0, -- deferred: 1 once a delay notice was due
        PRIMARY KEY (message_id, idx)
    ) WITHOUT ROWID;"
        )
    };
}

/// Upgrades a version 4 spool in place: the recipient table again, with the new check (SQLite
/// cannot change a check in place).
const MIGRATE_4_TO_5: &str = concat!(
    recipient_table!("recipient_5"),
    "
    INSERT INTO recipient_5 (message_id, idx, address, original, notify, orcpt_type,
        orcpt_address, status, attempts, next_attempt, last_error, done_at, detail,
        delay_notified)
    SELECT message_id, idx, address, original, notify, orcpt_type, orcpt_address, status,
        attempts, next_attempt, last_error, done_at, detail, delay_notified FROM recipient;
    DROP TABLE recipient;
    ALTER TABLE recipient_5 RENAME TO recipient;
"
);

/// Upgrades a version 5 spool in place: its recipients are all in the recipient table.
const MIGRATE_5_TO_6: &str = "ALTER TABLE message ADD COLUMN recipients TEXT;";

/// Upgrades a version 6 spool in place (it had no journal), and creates the table in a new
/// one: messages that moved here from the journal and were removed here while their journal
/// file still exists. Recovery would otherwise find them in the journal and not here, and
/// bring them back; the row is written in the removal's transaction, so the two cannot
/// disagree after a crash. Rows go once the journal file is reclaimed.
const MIGRATE_6_TO_7: &str = "CREATE TABLE journal_removed (id INTEGER PRIMARY KEY);";

const SCHEMA: &str = concat!(
    "
    CREATE TABLE message (
        id          INTEGER PRIMARY KEY,   -- QueueId
        envelope    TEXT NOT NULL,         -- JSON, see StoredEnvelope
        size        INTEGER NOT NULL,      -- octets of content
        received_at INTEGER NOT NULL,      -- Unix milliseconds
        recipients  TEXT                   -- JSON, see InlineRecipient; NULL: in `recipient`
    );
    CREATE TABLE content (
        id   INTEGER PRIMARY KEY,          -- message.id; bodies up to segments::INLINE_LIMIT
        data BLOB NOT NULL
    );
    ",
    recipient_table!("recipient")
);

/// Creates the tables in a new database and refuses a layout this program does not know.
pub(crate) fn migrate(connection: &Connection) -> Result<(), SpoolError> {
    let context = || "creating the spool schema".to_string();
    // IMMEDIATE: decide and create under the write lock, all or nothing.
    connection.execute_batch("BEGIN IMMEDIATE").context(context)?;
    let result = (|| {
        let version: i32 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .context(context)?;
        match version {
            0 => {
                connection.execute_batch(SCHEMA).context(context)?;
                connection.execute_batch(MIGRATE_3_TO_4).context(context)?;
                connection.execute_batch(MIGRATE_6_TO_7).context(context)?;
                connection.pragma_update(None, "user_version", SCHEMA_VERSION).context(context)
            }
            2..=6 => {
                if version == 2 {
                    connection.execute_batch(MIGRATE_2_TO_3).context(context)?;
                }
                if version <= 3 {
                    connection.execute_batch(MIGRATE_3_TO_4).context(context)?;
                }
                if version <= 4 {
                    connection.execute_batch(MIGRATE_4_TO_5).context(context)?;
                }
                if version <= 5 {
                    connection.execute_batch(MIGRATE_5_TO_6).context(context)?;
                }
                connection.execute_batch(MIGRATE_6_TO_7).context(context)?;
                connection.pragma_update(None, "user_version", SCHEMA_VERSION).context(context)
            }
            SCHEMA_VERSION => Ok(()),
            other => Err(SpoolError::Corrupt(format!(
                "the spool database has schema version {other}; this program knows only \
                 version {SCHEMA_VERSION}"
            ))),
        }
    })();
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    connection.execute_batch(end).context(context)?;
    result
}

/// Checks the structure of the metadata tables (and their indexes), which recovery lists in
/// full at start-up. The content table is left out on purpose: checking it reads every byte
/// of every queued message, which after an outage can be gigabytes and would delay start-up;
/// SQLite still detects a damaged content page when that message is loaded.
pub(crate) fn check_metadata(connection: &Connection) -> Result<(), SpoolError> {
    for table in ["message", "recipient", "body"] {
        let context = || format!("checking the spool table {table}");
        let mut check =
            connection.prepare(&format!("PRAGMA quick_check({table})")).context(context)?;
        let problems = check
            .query_map([], |row| row.get::<_, String>(0))
            .context(context)?
            .collect::<Result<Vec<_>, _>>()
            .context(context)?;
        if problems != ["ok"] {
            return Err(SpoolError::Corrupt(format!(
                "table {table} failed its integrity check: {}",
                problems.join("; ")
            )));
        }
    }
    Ok(())
}

/// SQLite stores the id bit for bit as a signed integer. Generated ids stay below 2^63, so
/// they sort the same either way.
fn sql_id(id: QueueId) -> i64 {
    id.0 as i64
}

pub(crate) fn sql_millis(time: SystemTime) -> i64 {
    let millis = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    i64::try_from(millis).unwrap_or(i64::MAX)
}

pub(crate) fn from_sql_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// Stores a message; its body is inline, or at `body` in a segment already synced.
pub(crate) fn store(
    connection: &Connection,
    message: &NewMessage,
    body: Option<BodyLocation>,
) -> Result<(), SpoolError> {
    let id = sql_id(message.id);
    let context = || format!("storing message {}", message.id);
    let envelope = encode_envelope(message)?;
    let all_pending = all_pending(message);
    let inline = match all_pending {
        true => Some(encode_inline(message)?),
        false => None,
    };
    connection
        .prepare_cached(
            "INSERT INTO message (id, envelope, size, received_at, recipients)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut insert| {
            insert.execute(params![
                id,
                envelope,
                message.content.len() as i64,
                sql_millis(message.envelope.received_at),
                inline,
            ])
        })
        .context(context)?;
    match body {
        None => connection
            .prepare_cached("INSERT INTO content (id, data) VALUES (?1, ?2)")
            .and_then(|mut insert| insert.execute(params![id, message.content.as_slice()])),
        Some(at) => connection
            .prepare_cached(
                "INSERT INTO body (id, segment, offset, length) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut insert| {
                insert.execute(params![id, at.segment as i64, at.offset as i64, at.length as i64])
            }),
    }
    .context(context)?;
    if !all_pending {
        insert_recipients(connection, message.id, &message.recipients)?;
    }
    Ok(())
}

/// Whether every recipient of a message is still to be tried (and there is one): such a
/// message's recipients can be stored inline, see [`encode_inline`].
pub(crate) fn all_pending(message: &NewMessage) -> bool {
    !message.recipients.is_empty()
        && message.recipients.iter().all(|recipient| recipient.status == RecipientStatus::Pending)
}

/// The envelope as stored (JSON, see `StoredEnvelope`), without the time of receipt.
pub(crate) fn encode_envelope(message: &NewMessage) -> Result<String, SpoolError> {
    serde_json::to_string(&StoredEnvelope::from(&message.envelope))
        .map_err(|e| SpoolError::Corrupt(format!("encoding the envelope of {}: {e}", message.id)))
}

/// The envelope stored by [`encode_envelope`].
pub(crate) fn decode_envelope(
    id: QueueId,
    envelope: &str,
    received_at: SystemTime,
) -> Result<Envelope, SpoolError> {
    let corrupt = |what: String| SpoolError::Corrupt(format!("message {id}: envelope: {what}"));
    let stored: StoredEnvelope =
        serde_json::from_str(envelope).map_err(|e| corrupt(e.to_string()))?;
    stored.into_envelope(received_at).map_err(corrupt)
}

/// The recipients of a message whose recipients are [`all_pending`], as stored inline (JSON,
/// see `InlineRecipient`); [`decode_inline`] reads them back.
pub(crate) fn encode_inline(message: &NewMessage) -> Result<String, SpoolError> {
    let inline: Vec<InlineRecipient> =
        message.recipients.iter().map(InlineRecipient::from).collect();
    serde_json::to_string(&inline)
        .map_err(|e| SpoolError::Corrupt(format!("encoding the recipients of {}: {e}", message.id)))
}

/// Whether a message is in the database.
pub(crate) fn exists(connection: &Connection, id: QueueId) -> Result<bool, SpoolError> {
    connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM message WHERE id = ?1)")
        .and_then(|mut select| select.query_row([sql_id(id)], |row| row.get(0)))
        .context(|| format!("looking for message {id}"))
}

/// The highest id of a message in the database (0 when empty).
pub(crate) fn highest_id(connection: &Connection) -> Result<QueueId, SpoolError> {
    connection
        .query_row("SELECT coalesce(max(id), 0) FROM message", [], |row| row.get::<_, i64>(0))
        .map(|id| QueueId(id as u64))
        .context(|| "finding the highest queue id".into())
}

/// Records that a message that came from the journal was removed here.
pub(crate) fn mark_journal_removed(connection: &Connection, id: QueueId) -> Result<(), SpoolError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO journal_removed (id) VALUES (?1)")
        .and_then(|mut insert| insert.execute([sql_id(id)]))
        .map(drop)
        .context(|| format!("recording the removal of message {id}"))
}

/// The messages moved here from the journal and removed; none in a database of version 6
/// or older, which a server of that version may still have open.
pub(crate) fn journal_removed(connection: &Connection) -> Result<HashSet<QueueId>, SpoolError> {
    let context = || "listing the removals of messages that came from the journal".to_string();
    let table: bool = connection
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master
                 WHERE type = 'table' AND name = 'journal_removed')",
            [],
            |row| row.get(0),
        )
        .context(context)?;
    if !table {
        return Ok(HashSet::new());
    }
    connection
        .prepare_cached("SELECT id FROM journal_removed")
        .and_then(|mut select| {
            select.query_map([], |row| row.get::<_, i64>(0).map(|id| QueueId(id as u64)))?.collect()
        })
        .context(context)
}

/// Forgets the removal of a message whose journal entry is gone.
pub(crate) fn forget_journal_removal(
    connection: &Connection,
    id: QueueId,
) -> Result<(), SpoolError> {
    connection
        .prepare_cached("DELETE FROM journal_removed WHERE id = ?1")
        .and_then(|mut delete| delete.execute([sql_id(id)]))
        .map(drop)
        .context(|| format!("forgetting the removal of message {id}"))
}

/// Forgets removals of messages whose journal entries are gone (`keep` says which entries
/// are still there).
pub(crate) fn forget_journal_removals(
    connection: &Connection,
    keep: impl Fn(QueueId) -> bool,
) -> Result<(), SpoolError> {
    journal_removed(connection)?
        .into_iter()
        .filter(|id| !keep(*id))
        .try_for_each(|id| forget_journal_removal(connection, id))
}

/// Writes a message's recipients into the recipient table.
fn insert_recipients(
    connection: &Connection,
    id: QueueId,
    recipients: &[Recipient],
) -> Result<(), SpoolError> {
    let context = || format!("storing the recipients of message {id}");
    let mut insert = connection
        .prepare_cached(
            "INSERT INTO recipient (message_id, idx, address, original, notify, orcpt_type,
                 orcpt_address, status, attempts, next_attempt, last_error, done_at, detail,
                 delay_notified)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )
        .context(context)?;
    for (index, recipient) in recipients.iter().enumerate() {
        let status = StatusColumns::from(&recipient.status);
        insert
            .execute(params![
                sql_id(id),
                index as i64,
                recipient.address,
                recipient.original,
                recipient.notify.map(|notify| notify.to_string()),
                recipient.orcpt.as_ref().map(|orcpt| &orcpt.addr_type),
                recipient.orcpt.as_ref().map(|orcpt| &orcpt.address),
                status.status,
                status.attempts.unwrap_or(0),
                status.next_attempt,
                status.last_error,
                status.done_at,
                status.detail,
                status.delay_notified,
            ])
            .context(context)?;
    }
    Ok(())
}

/// Applies every update or fails; the caller's savepoint undoes a partial update.
pub(crate) fn update_recipients(
    connection: &Connection,
    id: QueueId,
    updates: &[(usize, RecipientStatus)],
) -> Result<(), SpoolError> {
    let context = || format!("updating the recipients of message {id}");
    let inline = connection
        .prepare_cached("SELECT recipients FROM message WHERE id = ?1")
        .and_then(|mut select| {
            select.query_row([sql_id(id)], |row| row.get::<_, Option<String>>(0)).optional()
        })
        .context(context)?
        .ok_or(SpoolError::NotFound(id))?;
    // The first outcome that keeps the message moves its recipients to the recipient table.
    if let Some(inline) = inline {
        let recipients = decode_inline(id, &inline)?;
        insert_recipients(connection, id, &recipients)?;
        connection
            .prepare_cached("UPDATE message SET recipients = NULL WHERE id = ?1")
            .and_then(|mut update| update.execute([sql_id(id)]))
            .context(context)?;
    }
    // attempts: NULL keeps the count, see the schema.
    let mut update = connection
        .prepare_cached(
            "UPDATE recipient SET status = ?3, attempts = coalesce(?4, attempts),
                 next_attempt = ?5, last_error = ?6, done_at = ?7, detail = ?8,
                 delay_notified = ?9
             WHERE message_id = ?1 AND idx = ?2",
        )
        .context(context)?;
    for (index, status) in updates {
        let status = StatusColumns::from(status);
        let changed = update
            .execute(params![
                sql_id(id),
                *index as i64,
                status.status,
                status.attempts,
                status.next_attempt,
                status.last_error,
                status.done_at,
                status.detail,
                status.delay_notified,
            ])
            .context(context)?;
        if changed == 0 {
            return Err(SpoolError::NoSuchRecipient { id, index: *index });
        }
    }
    Ok(())
}

/// Removes a message; the segment its body was in, if any, is added to `segments`.
pub(crate) fn remove(
    connection: &Connection,
    id: QueueId,
    segments: &mut Vec<u64>,
) -> Result<(), SpoolError> {
    let context = || format!("removing message {id}");
    let delete = |sql: &str| {
        connection.prepare_cached(sql).and_then(|mut delete| delete.execute([sql_id(id)]))
    };
    if delete("DELETE FROM message WHERE id = ?1").context(context)? == 0 {
        return Err(SpoolError::NotFound(id));
    }
    let inline = delete("DELETE FROM content WHERE id = ?1").context(context)? == 1;
    delete("DELETE FROM recipient WHERE message_id = ?1").context(context)?;
    // A body is either inline or in a segment. Not `DELETE ... RETURNING`: SQLite builds a
    // temporary table for the returned rows, which cost more than the rest of the removal.
    if !inline {
        let segment = connection
            .prepare_cached("SELECT segment FROM body WHERE id = ?1")
            .and_then(|mut select| {
                select.query_row([sql_id(id)], |row| row.get::<_, i64>(0)).optional()
            })
            .context(context)?;
        if let Some(segment) = segment {
            delete("DELETE FROM body WHERE id = ?1").context(context)?;
            segments.push(segment as u64);
        }
    }
    Ok(())
}

/// The content of a message: inline, or read from its segment in `segments_dir`.
pub(crate) fn load_content(
    connection: &Connection,
    segments_dir: &Path,
    id: QueueId,
) -> Result<Vec<u8>, SpoolError> {
    let context = || format!("loading the content of message {id}");
    let inline = connection
        .prepare_cached("SELECT data FROM content WHERE id = ?1")
        .and_then(|mut select| select.query_row([sql_id(id)], |row| row.get(0)).optional())
        .context(context)?;
    if let Some(content) = inline {
        return Ok(content);
    }
    let location = connection
        .prepare_cached("SELECT segment, offset, length FROM body WHERE id = ?1")
        .and_then(|mut select| {
            select
                .query_row([sql_id(id)], |row| {
                    Ok(BodyLocation {
                        segment: row.get::<_, i64>(0)? as u64,
                        offset: row.get::<_, i64>(1)? as u64,
                        length: row.get::<_, i64>(2)? as u64,
                    })
                })
                .optional()
        })
        .context(context)?
        .ok_or(SpoolError::NotFound(id))?;
    segments::read(segments_dir, location)
}

/// The segments that bodies are in.
pub(crate) fn referenced_segments(connection: &Connection) -> Result<HashSet<u64>, SpoolError> {
    let context = || "listing the spool's segments".to_string();
    let mut select = connection.prepare("SELECT DISTINCT segment FROM body").context(context)?;
    let segments = select
        .query_map([], |row| row.get::<_, i64>(0))
        .context(context)?
        .map(|segment| segment.map(|segment| segment as u64))
        .collect::<Result<_, _>>()
        .context(context)?;
    Ok(segments)
}

/// Whether any body is still in `segment`.
pub(crate) fn segment_in_use(connection: &Connection, segment: u64) -> Result<bool, SpoolError> {
    connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM body WHERE segment = ?1)")
        .and_then(|mut select| select.query_row([segment as i64], |row| row.get(0)))
        .context(|| format!("looking for bodies in segment {segment}"))
}

/// Every message with its recipients, oldest first.
pub(crate) fn list(connection: &mut Connection) -> Result<Vec<QueuedMessage>, SpoolError> {
    // One read transaction, so both queries see the same snapshot: a message removed between
    // them must not show up without its recipients.
    let snapshot = connection.transaction().context(|| "listing the queue".into())?;
    list_in(&snapshot)
}

/// [`list`], and the messages moved here from the journal and removed (see
/// [`MIGRATE_6_TO_7`]), in one snapshot.
pub(crate) fn list_with_journal_removed(
    connection: &mut Connection,
) -> Result<(Vec<QueuedMessage>, HashSet<QueueId>), SpoolError> {
    let snapshot = connection.transaction().context(|| "listing the queue".into())?;
    Ok((list_in(&snapshot)?, journal_removed(&snapshot)?))
}

fn list_in(snapshot: &Connection) -> Result<Vec<QueuedMessage>, SpoolError> {
    let context = || "listing the queue".to_string();
    let mut messages = Vec::new();
    {
        let mut select = snapshot
            .prepare("SELECT id, envelope, size, received_at, recipients FROM message ORDER BY id")
            .context(context)?;
        let mut rows = select.query([]).context(context)?;
        while let Some(row) = rows.next().context(context)? {
            messages.push(decode_message(row)?);
        }
    }
    let mut select = snapshot
        .prepare(
            "SELECT message_id, idx, address, original, notify, orcpt_type, orcpt_address,
                 status, attempts, next_attempt, last_error, done_at, detail, delay_notified
             FROM recipient ORDER BY message_id, idx",
        )
        .context(context)?;
    let mut rows = select.query([]).context(context)?;
    while let Some(row) = rows.next().context(context)? {
        let (id, index, recipient) = decode_recipient(row)?;
        let position = messages.binary_search_by_key(&id, |message| message.id).map_err(|_| {
            SpoolError::Corrupt(format!("recipient {index} of missing message {id}"))
        })?;
        let recipients = &mut messages[position].recipients;
        // Inline recipients are never empty, so a first row after them is one too many.
        if index == 0 && !recipients.is_empty() {
            return Err(SpoolError::Corrupt(format!(
                "message {id} has recipients both inline and in the recipient table"
            )));
        }
        // update_recipients addresses recipients by index, so there must be no gaps.
        if index != recipients.len() as i64 {
            return Err(SpoolError::Corrupt(format!(
                "message {id} has recipient {index} where {} was expected",
                recipients.len()
            )));
        }
        recipients.push(recipient);
    }
    Ok(messages)
}

fn decode_message(row: &Row<'_>) -> Result<QueuedMessage, SpoolError> {
    let context = || "reading a message row".to_string();
    let id = QueueId(row.get::<_, i64>(0).context(context)? as u64);
    let envelope: String = row.get(1).context(context)?;
    let size: i64 = row.get(2).context(context)?;
    let received_at = from_sql_millis(row.get(3).context(context)?);
    let corrupt = |what: String| SpoolError::Corrupt(format!("message {id}: {what}"));
    let inline: Option<String> = row.get(4).context(context)?;
    Ok(QueuedMessage {
        id,
        envelope: decode_envelope(id, &envelope, received_at)?,
        // From the recipient table when NULL, see list.
        recipients: inline
            .map(|inline| decode_inline(id, &inline))
            .transpose()?
            .unwrap_or_default(),
        size: u64::try_from(size).map_err(|_| corrupt(format!("negative size {size}")))?,
    })
}

/// A pending recipient as stored in `message.recipients`: the recipient table's columns
/// that a pending recipient has.
#[derive(Serialize, Deserialize)]
struct InlineRecipient {
    address: String,
    original: String,
    notify: Option<String>,
    orcpt_type: Option<String>,
    orcpt_address: Option<String>,
}

impl From<&Recipient> for InlineRecipient {
    fn from(recipient: &Recipient) -> InlineRecipient {
        InlineRecipient {
            address: recipient.address.clone(),
            original: recipient.original.clone(),
            notify: recipient.notify.map(|notify| notify.to_string()),
            orcpt_type: recipient.orcpt.as_ref().map(|orcpt| orcpt.addr_type.clone()),
            orcpt_address: recipient.orcpt.as_ref().map(|orcpt| orcpt.address.clone()),
        }
    }
}

/// The recipients in `message.recipients`, all pending.
pub(crate) fn decode_inline(id: QueueId, inline: &str) -> Result<Vec<Recipient>, SpoolError> {
    let corrupt = |what: String| SpoolError::Corrupt(format!("recipients of message {id}: {what}"));
    let stored: Vec<InlineRecipient> =
        serde_json::from_str(inline).map_err(|e| corrupt(e.to_string()))?;
    if stored.is_empty() {
        return Err(corrupt("none".into()));
    }
    stored
        .into_iter()
        .map(|stored| {
            let (notify, orcpt) =
                decode_dsn(stored.notify.as_deref(), stored.orcpt_type, stored.orcpt_address)
                    .map_err(corrupt)?;
            Ok(Recipient {
                address: stored.address,
                original: stored.original,
                notify,
                orcpt,
                status: RecipientStatus::Pending,
            })
        })
        .collect()
}

/// A recipient's NOTIFY and ORCPT from their stored form, in the recipient table's columns
/// or inline.
fn decode_dsn(
    notify: Option<&str>,
    orcpt_type: Option<String>,
    orcpt_address: Option<String>,
) -> Result<(Option<Notify>, Option<OriginalRecipient>), String> {
    let notify = notify.map(parse_notify).transpose()?;
    let orcpt = match (orcpt_type, orcpt_address) {
        (Some(addr_type), Some(address)) => Some(OriginalRecipient { addr_type, address }),
        (None, None) => None,
        _ => return Err("half an ORCPT".into()),
    };
    Ok((notify, orcpt))
}

/// A row of the recipient table: the message id, the index and the recipient.
fn decode_recipient(row: &Row<'_>) -> Result<(QueueId, i64, Recipient), SpoolError> {
    let context = || "reading a recipient row".to_string();
    let id = QueueId(row.get::<_, i64>(0).context(context)? as u64);
    let index: i64 = row.get(1).context(context)?;
    let corrupt =
        |what: String| SpoolError::Corrupt(format!("recipient {index} of message {id}: {what}"));
    let notify: Option<String> = row.get(4).context(context)?;
    let (notify, orcpt) =
        decode_dsn(notify.as_deref(), row.get(5).context(context)?, row.get(6).context(context)?)
            .map_err(corrupt)?;
    let status: String = row.get(7).context(context)?;
    let attempts: i64 = row.get(8).context(context)?;
    let next_attempt: Option<i64> = row.get(9).context(context)?;
    let last_error: Option<String> = row.get(10).context(context)?;
    let done_at: Option<i64> = row.get(11).context(context)?;
    let detail: Option<String> = row.get(12).context(context)?;
    let delay_notified: bool = row.get(13).context(context)?;
    let missing = |column: &str| corrupt(format!("{status} without {column}"));
    let status = match status.as_str() {
        "pending" => RecipientStatus::Pending,
        "deferred" => RecipientStatus::Deferred {
            attempts: u32::try_from(attempts)
                .map_err(|_| corrupt(format!("{attempts} attempts")))?,
            next_attempt: from_sql_millis(next_attempt.ok_or_else(|| missing("next_attempt"))?),
            last_error: last_error.ok_or_else(|| missing("last_error"))?,
            delay_notified,
        },
        "delivered" => RecipientStatus::Delivered {
            at: from_sql_millis(done_at.ok_or_else(|| missing("done_at"))?),
            detail: detail.ok_or_else(|| missing("detail"))?,
        },
        "failed" => RecipientStatus::Failed {
            at: from_sql_millis(done_at.ok_or_else(|| missing("done_at"))?),
            error: last_error.ok_or_else(|| missing("last_error"))?,
        },
        other => return Err(corrupt(format!("unknown status {other:?}"))),
    };
    let recipient = Recipient {
        address: row.get(2).context(context)?,
        original: row.get(3).context(context)?,
        notify,
        orcpt,
        status,
    };
    Ok((id, index, recipient))
}

/// A [`RecipientStatus`] spread over the recipient table's columns.
struct StatusColumns<'a> {
    status: &'static str,
    /// `None` keeps the stored count on update.
    attempts: Option<u32>,
    next_attempt: Option<i64>,
    last_error: Option<&'a str>,
    done_at: Option<i64>,
    detail: Option<&'a str>,
    delay_notified: bool,
}

impl<'a> From<&'a RecipientStatus> for StatusColumns<'a> {
    fn from(status: &'a RecipientStatus) -> StatusColumns<'a> {
        let empty = StatusColumns {
            status: "pending",
            attempts: None,
            next_attempt: None,
            last_error: None,
            done_at: None,
            detail: None,
            delay_notified: false,
        };
        match status {
            RecipientStatus::Pending => empty,
            RecipientStatus::Deferred { attempts, next_attempt, last_error, delay_notified } => {
                StatusColumns {
                    status: "deferred",
                    attempts: Some(*attempts),
                    next_attempt: Some(sql_millis(*next_attempt)),
                    last_error: Some(last_error),
                    delay_notified: *delay_notified,
                    ..empty
                }
            }
            RecipientStatus::Delivered { at, detail } => StatusColumns {
                status: "delivered",
                done_at: Some(sql_millis(*at)),
                detail: Some(detail),
                ..empty
            },
            RecipientStatus::Failed { at, error } => StatusColumns {
                status: "failed",
                done_at: Some(sql_millis(*at)),
                last_error: Some(error),
                ..empty
            },
        }
    }
}

/// Parses what `Notify`'s `Display` writes: `NEVER` or a comma-separated list.
fn parse_notify(text: &str) -> Result<Notify, String> {
    let mut notify = Notify::NEVER;
    if text == "NEVER" {
        return Ok(notify);
    }
    for word in text.split(',') {
        match word {
            "SUCCESS" => notify.success = true,
            "FAILURE" => notify.failure = true,
            "DELAY" => notify.delay = true,
            _ => return Err(format!("unknown NOTIFY value {text:?}")),
        }
    }
    Ok(notify)
}

/// The envelope as stored in `message.envelope`. smtp-proto has no serde, so its enums are
/// stored as their SMTP keywords. `received_at` has its own column.
#[derive(Serialize, Deserialize)]
struct StoredEnvelope {
    sender: String,
    body: String,
    smtputf8: bool,
    ret: Option<String>,
    envid: Option<String>,
    client_ip: IpAddr,
    helo: String,
    tls: Option<String>,
    authenticated_as: Option<String>,
}

impl From<&Envelope> for StoredEnvelope {
    fn from(envelope: &Envelope) -> StoredEnvelope {
        StoredEnvelope {
            sender: envelope.sender.clone(),
            body: envelope.body.as_str().to_string(),
            smtputf8: envelope.smtputf8,
            ret: envelope.ret.map(|ret| ret.as_str().to_string()),
            envid: envelope.envid.clone(),
            client_ip: envelope.client_ip,
            helo: envelope.helo.clone(),
            tls: envelope.tls.clone(),
            authenticated_as: envelope.authenticated_as.clone(),
        }
    }
}

impl StoredEnvelope {
    fn into_envelope(self, received_at: SystemTime) -> Result<Envelope, String> {
        let body = [BodyType::SevenBit, BodyType::EightBitMime, BodyType::BinaryMime]
            .into_iter()
            .find(|body| body.as_str() == self.body)
            .ok_or_else(|| format!("unknown body type {:?}", self.body))?;
        let ret = match self.ret {
            None => None,
            Some(text) => Some(
                [Ret::Full, Ret::Headers]
                    .into_iter()
                    .find(|ret| ret.as_str() == text)
                    .ok_or_else(|| format!("unknown RET {text:?}"))?,
            ),
        };
        Ok(Envelope {
            sender: self.sender,
            body,
            smtputf8: self.smtputf8,
            ret,
            envid: self.envid,
            client_ip: self.client_ip,
            helo: self.helo,
            tls: self.tls,
            authenticated_as: self.authenticated_as,
            received_at,
        })
    }
}
