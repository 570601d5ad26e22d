//! Store errors, sorted by blame: the disk, the caller, or the data on disk.

use std::io;
use std::path::PathBuf;

use super::types::{BadKeyword, BadMailGuid, BadMailboxName};

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Why a store operation failed. Every variant names what it was working on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A system call failed on a path.
    #[error("{op}({}) failed: {source}", path.display())]
    Io {
        /// The operation (`open`, `rename`, ...).
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file on disk does not have the format it must have. Nothing was changed.
    #[error("{}{}: {reason}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The 1-based line, when the format is line-based.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// The mailbox does not exist.
    #[error("mailbox {0} does not exist")]
    MailboxNotFound(String),
    /// The mailbox already exists.
    #[error("mailbox {0} already exists")]
    MailboxExists(String),
    /// A mail with this UID does not exist.
    #[error("no mail with UID {0}")]
    MailNotFound(u32),
    /// An invalid mailbox name.
    #[error(transparent)]
    BadName(#[from] BadMailboxName),
    /// An invalid keyword.
    #[error(transparent)]
    BadKeyword(#[from] BadKeyword),
    /// An invalid mail GUID.
    #[error(transparent)]
    BadGuid(#[from] BadMailGuid),
    /// The request cannot be carried out on this mailbox (e.g. deleting INBOX).
    #[error("{0}")]
    NotPossible(String),
    /// A lock could not be taken in time.
    #[error("timed out after {secs} s waiting for the lock {}", path.display())]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        secs: u64,
    },
    /// A store limit was reached (e.g. 1024 distinct keywords in a mailbox, or no UID left
    /// below 4294967295). Nothing was changed.
    #[error("{0}")]
    Limit(String),
    /// A mailbox (or INBOX being cleared) received mails while it was being deleted, from a
    /// writer that does not wait for our lock (a Dovecot delivery). The deletion was refused
    /// and those mails, and the mailbox's identity, were kept: Dovecot's "New mails were added
    /// to mailbox during deletion". Whoever asked for the deletion decides again at its next
    /// look (a sync engine treats it as a conflict, as Dovecot's dsync does).
    #[error("new mails were added to mailbox {0} during deletion; it was kept")]
    ChangedDuringDelete(String),
}

impl StoreError {
    /// Wraps an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }

    /// A save would need a UID above [`crate::store::MAX_UID`].
    pub(crate) fn uid_space_exhausted(mailbox: &str, uid: u32) -> Self {
        Self::Limit(format!(
            "mailbox {mailbox}: UID space exhausted: a mail would get UID {uid}, above {}, the highest UID a \
             mailbox can hold; nothing was saved",
            crate::store::MAX_UID
        ))
    }

    /// UIDNEXT cannot be raised to `next`.
    pub(crate) fn next_uid_too_high(mailbox: &str, next: u32) -> Self {
        Self::NotPossible(format!(
            "mailbox {mailbox}: cannot raise UIDNEXT to {next}: no mail could ever get that UID (the highest is \
             {}); nothing was changed",
            crate::store::MAX_UID
        ))
    }

    /// A format error in a file.
    pub fn corrupt(path: impl Into<PathBuf>, line: Option<usize>, reason: impl Into<String>) -> Self {
        Self::Corrupt { path: path.into(), line, reason: reason.into() }
    }

    /// True if another writer changed the mailbox tree or a mailbox under us in a way that
    /// makes the request moot or premature: the mailbox already exists, is already gone, or
    /// received mails while being deleted. Nothing is broken; the next look decides again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::MailboxExists(_) | Self::MailboxNotFound(_) | Self::ChangedDuringDelete(_))
            || self.is_not_found()
    }

    /// True if the error means "this does not exist" (a vanished file, a missing mailbox).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            Self::MailboxNotFound(_) | Self::MailNotFound(_) => true,
            _ => false,
        }
    }
}

/// Adds the operation and path to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Attaches `op` and `path` to the error.
    fn ctx(self, op: &'static str, path: &std::path::Path) -> StoreResult<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> StoreResult<T> {
        self.map_err(|e| StoreError::io(op, path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> StoreResult<T> {
        self.map_err(|e| StoreError::io(op, path, io::Error::from(e)))
    }
}
