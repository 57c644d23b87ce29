//! The accounts that may authenticate (SMTP AUTH) and so submit and relay mail.
//!
//! An account is a login name (an address), its credentials in the forms the SASL mechanisms
//! need (an argon2id hash for PLAIN and LOGIN, SCRAM-SHA-256 keys for SCRAM; never the
//! password itself), the sender addresses it may use, and whether it is enabled. The crate
//! stores them and answers questions about them; it knows nothing of hashing, which belongs
//! to the `sasl` crate: credentials are kept as the strings that crate writes.
//!
//! [`AccountDb`] keeps them in `accounts.db`, an SQLite database in WAL mode beside the spool,
//! so `postilion user add` can change them while a server is running and the server sees the
//! change at the next login.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The login name, as [`normalize_name`] writes it.
    pub name: String,
    /// An argon2id PHC string (`$argon2id$v=19$...`), for PLAIN and LOGIN.
    pub password_hash: Option<String>,
    /// SCRAM-SHA-256 keys in their text form, for SCRAM-SHA-256.
    pub scram: Option<String>,
    /// Sender addresses this account may use in MAIL FROM; see [`Account::may_send_as`].
    pub senders: Vec<String>,
    pub enabled: bool,
}

impl Account {
    /// Whether the account may use `sender` (the MAIL FROM address without brackets) as its
    /// envelope sender. Each entry of `senders` is an address (`alice@example.org`), a whole
    /// domain (`@example.org`) or `*` (any sender, for trusted applications); with no entries
    /// the account may use its own name only. Addresses compare without regard to case: a
    /// user who logs in as Alice@Example.org must not be refused Alice's own address, and no
    /// one gains anything by the case of another's. The null sender is allowed: it is what
    /// bounces and auto-replies use (RFC 5321 section 4.5.5).
    pub fn may_send_as(&self, sender: &str) -> bool {
        if sender.is_empty() {
            return true;
        }
        let sender = sender.to_lowercase();
        if self.senders.is_empty() {
            return sender == self.name.to_lowercase();
        }
        self.senders.iter().any(|allowed| {
            let allowed = allowed.to_lowercase();
            allowed == "*"
                || allowed == sender
                || (allowed.starts_with('@')
                    && sender.rsplit_once('@').is_some_and(|(_, domain)| domain == &allowed[1..]))
        })
    }
}

/// Login names compare without regard to case and surrounding space: the domain part is
/// case-insensitive anyway (RFC 5321 section 2.4), and two accounts that differ only in the
/// case of the local part would be a trap for the people using them.
pub fn normalize_name(name: &str) -> String {
    name.trim().to_lowercase()
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("account {0} does not exist")]
    NotFound(String),
    #[error(
        "the accounts database has schema version {0}; this program knows only version {SCHEMA_VERSION}"
    )]
    UnknownSchema(i32),
    #[error("account {name}: stored sender list is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, AccountError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, AccountError> {
        self.map_err(|source| AccountError::Database { context: what(), source })
    }
}

const SCHEMA_VERSION: i32 = 1;

const SCHEMA: &str = "
    CREATE TABLE account (
        name          TEXT PRIMARY KEY,   -- normalize_name()
        password_hash TEXT,               -- argon2id PHC string
        scram         TEXT,               -- SCRAM-SHA-256 keys
        senders       TEXT NOT NULL,      -- JSON array of allowed senders
        enabled       INTEGER NOT NULL
    ) WITHOUT ROWID;
";

fn connect(path: &Path) -> Result<Connection, AccountError> {
    use std::os::unix::fs::OpenOptionsExt;
    let context = || format!("opening {}", path.display());
    // Created private before SQLite opens it: it holds password hashes.
    if let Err(source) =
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)
    {
        return Err(AccountError::Io { context: context(), source });
    }
    let connection = Connection::open(path).context(context)?;
    connection.busy_timeout(BUSY_TIMEOUT).context(context)?;
    connection.pragma_update(None, "journal_mode", "WAL").context(context)?;
    connection.pragma_update(None, "synchronous", "FULL").context(context)?;
    Ok(connection)
}

/// How long a statement waits for another connection's write (the CLI's, a server's).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The accounts database: one connection, each call one short statement under its lock.
/// Open it once and call it from blocking threads.
pub struct AccountDb {
    connection: Mutex<Connection>,
}

impl AccountDb {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<AccountDb, AccountError> {
        let connection = connect(path)?;
        let context = || format!("creating the accounts schema in {}", path.display());
        connection.execute_batch("BEGIN IMMEDIATE").context(context)?;
        let result = (|| {
            let version: i32 = connection
                .pragma_query_value(None, "user_version", |row| row.get(0))
                .context(context)?;
            match version {
                0 => {
                    connection.execute_batch(SCHEMA).context(context)?;
                    connection.pragma_update(None, "user_version", SCHEMA_VERSION).context(context)
                }
                SCHEMA_VERSION => Ok(()),
                other => Err(AccountError::UnknownSchema(other)),
            }
        })();
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        connection.execute_batch(end).context(context)?;
        result?;
        Ok(AccountDb { connection: Mutex::new(connection) })
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The account with this login name.
    pub fn get(&self, name: &str) -> Result<Option<Account>, AccountError> {
        let name = normalize_name(name);
        let connection = self.connection();
        let row = connection
            .query_row(
                "SELECT name, password_hash, scram, senders, enabled FROM account WHERE name = ?1",
                [&name],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, Option<String>>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, bool>(4)?,
                    ))
                },
            )
            .optional()
            .context(|| format!("looking up account {name}"))?;
        row.map(decode).transpose()
    }

    /// Creates the account or replaces every field of it.
    pub fn put(&self, account: &Account) -> Result<(), AccountError> {
        let name = normalize_name(&account.name);
        let senders = serde_json::to_string(&account.senders)
            .map_err(|e| AccountError::Corrupt { name: name.clone(), reason: e.to_string() })?;
        self.connection()
            .execute(
                "INSERT INTO account (name, password_hash, scram, senders, enabled)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET password_hash = ?2, scram = ?3,
                     senders = ?4, enabled = ?5",
                params![name, account.password_hash, account.scram, senders, account.enabled],
            )
            .context(|| format!("storing account {name}"))?;
        Ok(())
    }

    /// Removes the account; [`AccountError::NotFound`] if there was none.
    pub fn remove(&self, name: &str) -> Result<(), AccountError> {
        let name = normalize_name(name);
        let removed = self
            .connection()
            .execute("DELETE FROM account WHERE name = ?1", [&name])
            .context(|| format!("removing account {name}"))?;
        match removed {
            0 => Err(AccountError::NotFound(name)),
            _ => Ok(()),
        }
    }

    /// Every account, by name.
    pub fn list(&self) -> Result<Vec<Account>, AccountError> {
        let connection = self.connection();
        let context = || "listing accounts".to_string();
        let mut select = connection
            .prepare(
                "SELECT name, password_hash, scram, senders, enabled FROM account ORDER BY name",
            )
            .context(context)?;
        let rows = select
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            })
            .context(context)?
            .collect::<Result<Vec<_>, _>>()
            .context(context)?;
        rows.into_iter().map(decode).collect()
    }
}

fn decode(
    (name, password_hash, scram, senders, enabled): (
        String,
        Option<String>,
        Option<String>,
        String,
        bool,
    ),
) -> Result<Account, AccountError> {
    let senders = serde_json::from_str(&senders)
        .map_err(|e| AccountError::Corrupt { name: name.clone(), reason: e.to_string() })?;
    Ok(Account { name, password_hash, scram, senders, enabled })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str, senders: &[&str]) -> Account {
        Account {
            name: name.into(),
            password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            scram: None,
            senders: senders.iter().map(|s| s.to_string()).collect(),
            enabled: true,
        }
    }

    #[test]
    fn store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = AccountDb::open(&dir.path().join("accounts.db")).unwrap();
        assert_eq!(db.get("alice@example.org").unwrap(), None);
        let alice = account("alice@example.org", &["@example.org"]);
        db.put(&alice).unwrap();
        assert_eq!(db.get("  Alice@Example.ORG ").unwrap(), Some(alice.clone()));
        let changed = Account { enabled: false, scram: Some("SCRAM".into()), ..alice.clone() };
        db.put(&changed).unwrap();
        db.put(&account("bob@example.org", &[])).unwrap();
        let names: Vec<String> = db.list().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["alice@example.org", "bob@example.org"]);
        assert_eq!(db.get("alice@example.org").unwrap(), Some(changed));
        db.remove("ALICE@example.org").unwrap();
        assert!(matches!(db.remove("alice@example.org"), Err(AccountError::NotFound(_))));
        // Reopening keeps what was stored.
        let db = AccountDb::open(&dir.path().join("accounts.db")).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
    }

    #[test]
    fn the_database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.db");
        AccountDb::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn unknown_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.db");
        AccountDb::open(&path).unwrap();
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 7).unwrap();
        assert!(matches!(AccountDb::open(&path), Err(AccountError::UnknownSchema(7))));
    }

    #[test]
    fn sender_rules() {
        let own = account("alice@example.org", &[]);
        assert!(own.may_send_as("alice@example.org"));
        assert!(own.may_send_as("ALICE@EXAMPLE.ORG"));
        assert!(own.may_send_as(""), "the null sender");
        assert!(!own.may_send_as("bob@example.org"));
        assert!(!own.may_send_as("alice@example.org.evil"));
        let listed = account("alice@example.org", &["alias@example.net", "@example.com"]);
        assert!(listed.may_send_as("alias@example.net"));
        assert!(listed.may_send_as("anyone@Example.com"));
        assert!(!listed.may_send_as("anyone@sub.example.com"));
        assert!(!listed.may_send_as("anyone@example.com.evil"));
        assert!(!listed.may_send_as("alice@example.org"), "a list replaces the default");
        let any = account("app@example.org", &["*"]);
        assert!(any.may_send_as("whoever@wherever.test"));
    }
}
