use std::io;
use std::sync::Arc;

use rusqlite::ErrorCode;

use crate::QueueId;

/// Why a spool operation failed. Nothing of a failed `store`, `update_recipients` or
/// `remove` was applied, except in the rare case described in the crate documentation (a
/// failed commit that still reached the disk).
///
/// `Clone`, because when a group commit fails every operation in it gets the same error; the
/// underlying errors are shared behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The file system holding the spool is full. The server answers 452 and the client
    /// retries later (RFC 5321 section 6.1 lists a predictable resource shortage as no
    /// excuse for losing mail, so refusing new mail is the only safe reaction).
    #[error("the spool file system is full")]
    StorageFull,
    #[error("message {0} is not in the spool")]
    NotFound(QueueId),
    /// A message with this id is stored already.
    #[error("message {0} is already in the spool")]
    AlreadyStored(QueueId),
    #[error("message {id} has no recipient with index {index}")]
    NoSuchRecipient { id: QueueId, index: usize },
    /// Stored data this program cannot use: damage, changes made behind its back, or the
    /// schema of another version.
    #[error("corrupt spool data: {0}")]
    Corrupt(String),
    #[error("{context}: {error}")]
    Io { context: String, error: Arc<io::Error> },
    #[error("{context}: {error}")]
    Database { context: String, error: Arc<rusqlite::Error> },
    /// The spool was closed (or its writer thread died) before the operation was applied.
    #[error("the spool is closed")]
    Closed,
}

impl SpoolError {
    pub(crate) fn io(context: String, error: io::Error) -> SpoolError {
        if error.kind() == io::ErrorKind::StorageFull {
            return SpoolError::StorageFull;
        }
        SpoolError::Io { context, error: Arc::new(error) }
    }

    pub(crate) fn database(context: String, error: rusqlite::Error) -> SpoolError {
        // SQLite reports ENOSPC from write(2) as SQLITE_FULL. (ENOSPC from other calls comes
        // as a generic I/O error; the writer tells those apart, see `writer::refine`.)
        if error.sqlite_error_code() == Some(ErrorCode::DiskFull) {
            return SpoolError::StorageFull;
        }
        SpoolError::Database { context, error: Arc::new(error) }
    }
}

/// Adds context to I/O and SQLite errors; the closure runs only on failure, which keeps
/// formatting off the hot path.
pub(crate) trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, SpoolError>;
}

impl<T> Context<T> for Result<T, io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, SpoolError> {
        self.map_err(|error| SpoolError::io(context(), error))
    }
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, SpoolError> {
        self.map_err(|error| SpoolError::database(context(), error))
    }
}
