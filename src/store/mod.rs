//! The mail store: what the sync engine and the mail commands need from a mailbox backend.
//!
//! ```text
//!   sync engine / mail commands
//!            │  MailStore (mailbox tree, list change log, create/delete/rename/subscribe)
//!            │  Mailbox   (status, mails, changes since a modseq, bodies, save/flags/expunge)
//!            ▼
//!   ┌────────────────────┬──────────────────────┐
//!   │ maildir::Maildir   │ memory::MemoryStore  │
//!   │ (Dovecot-compatible│ (fast tests)         │
//!   │  files on disk)    │                      │
//!   └────────────────────┴──────────────────────┘
//! ```
//!
//! The traits speak only in the values of [`types`]: no file names and no wire formats.
//! Every mutation is visible to the next call on the same handle; [`Mailbox::sync_point`]
//! makes everything reported so far durable, which the sync engine calls before it tells a
//! peer about modseqs.

pub mod error;
pub mod maildir;
pub mod memory;
pub mod mutf7;
pub mod types;

use std::io::Read;

pub use error::{StoreError, StoreResult};
pub use types::{Flags, Guid128, Keyword, MailGuid, MailboxName, Modseq, Uid, UnixTime};

/// What kind of node a name in the mailbox tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxKind {
    /// A selectable mailbox with a GUID and UIDVALIDITY.
    Mailbox,
    /// A directory that exists on disk but holds no mails (`\NoSelect`).
    Directory,
    /// A name that only exists as the parent of another name, or as a subscription.
    Nonexistent,
}

/// One node of the mailbox tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxInfo {
    /// Full name.
    pub name: MailboxName,
    /// Kind of node.
    pub kind: MailboxKind,
    /// Mailbox GUID (selectable mailboxes only).
    pub guid: Option<Guid128>,
    /// UIDVALIDITY (0 if not a mailbox).
    pub uid_validity: u32,
    /// UIDNEXT (0 if not a mailbox).
    pub uid_next: u32,
    /// Listed in the subscriptions file.
    pub subscribed: bool,
    /// When the mailbox was last created or renamed (0 = unknown).
    pub last_renamed_or_created: UnixTime,
    /// When its subscription last changed (0 = unknown).
    pub last_subscription_change: UnixTime,
}

/// What a mailbox-list change record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListChangeKind {
    /// A mailbox was deleted; the GUID is the mailbox GUID.
    DeleteMailbox,
    /// A directory was deleted; the GUID is the SHA-1/128 of its name.
    DeleteDir,
    /// A mailbox was renamed; the GUID is the mailbox GUID.
    Rename,
    /// A name was subscribed; the GUID is the SHA-1/128 of the name.
    Subscribe,
    /// A name was unsubscribed; the GUID is the SHA-1/128 of the name.
    Unsubscribe,
    /// A directory was created; the GUID is the SHA-1/128 of its name.
    CreateDir,
}

/// One record of the mailbox-list change log (Dovecot's `dovecot.mailbox.log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListChange {
    /// What happened.
    pub kind: ListChangeKind,
    /// Mailbox GUID, or SHA-1/128 of the name (see [`ListChangeKind`]).
    pub guid: Guid128,
    /// When.
    pub time: UnixTime,
}

/// A mailbox's IMAP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Mailbox GUID.
    pub guid: Guid128,
    /// UIDVALIDITY.
    pub uid_validity: u32,
    /// UIDNEXT.
    pub uid_next: u32,
    /// Number of mails.
    pub messages: u32,
    /// Mails without `\Seen`.
    pub unseen: u32,
    /// Mails still in `new/` (IMAP `\Recent` for the first session that sees them).
    pub recent: u32,
    /// Lowest UID that may still be recent.
    pub first_recent_uid: u32,
    /// HIGHESTMODSEQ.
    pub highest_modseq: Modseq,
    /// HIGHESTMODSEQ when a replication peer last had exactly this mailbox's content (0:
    /// unknown). A higher HIGHESTMODSEQ means local changes since, even when every counter
    /// happens to equal the peer's.
    pub replicated_modseq: Modseq,
}

/// One mail as the store lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailRecord {
    /// UID.
    pub uid: Uid,
    /// GUID as stored.
    pub guid: MailGuid,
    /// System flags (never `\Recent`).
    pub flags: Flags,
    /// Keywords, in the order the store keeps them.
    pub keywords: Vec<Keyword>,
    /// Modseq of the last change.
    pub modseq: Modseq,
    /// Still in `new/`.
    pub recent: bool,
}

/// A change recorded in a mailbox's change log, for incremental export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Flags or keywords of a mail changed.
    Flags {
        /// The mail.
        uid: Uid,
        /// Modseq of this change.
        modseq: Modseq,
        /// System flags added.
        added: Flags,
        /// System flags removed.
        removed: Flags,
        /// Keywords added.
        keywords_added: Vec<Keyword>,
        /// Keywords removed.
        keywords_removed: Vec<Keyword>,
    },
    /// A mail was expunged.
    Expunge {
        /// Its UID.
        uid: Uid,
        /// Modseq of the expunge.
        modseq: Modseq,
        /// The 128-bit form of its GUID.
        guid: Guid128,
    },
}

impl Change {
    /// The modseq of this change.
    pub fn modseq(&self) -> Modseq {
        match self {
            Self::Flags { modseq, .. } | Self::Expunge { modseq, .. } => *modseq,
        }
    }
}

/// How to change flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    /// Add the given flags and keywords.
    Add,
    /// Remove them.
    Remove,
    /// Replace all flags and keywords by them.
    Replace,
}

/// A mail to save.
#[derive(Debug, Clone, Default)]
pub struct SaveRequest {
    /// The UID wanted; the store uses it if it is still free (at least UIDNEXT), else the next
    /// free one. `None` = the next free one.
    pub uid: Option<Uid>,
    /// The GUID to keep; `None` lets the store choose (for Maildir: the new file's name).
    pub guid: Option<MailGuid>,
    /// System flags (`\Recent` ignored).
    pub flags: Flags,
    /// Keywords.
    pub keywords: Vec<Keyword>,
    /// INTERNALDATE; `None` = now.
    pub received: Option<UnixTime>,
    /// The smallest modseq the mail may get.
    pub min_modseq: Modseq,
}

/// Where a staged mail ended up after [`Mailbox::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMail {
    /// The UID asked for, if any.
    pub requested: Option<Uid>,
    /// The UID it got.
    pub uid: Uid,
    /// Its GUID.
    pub guid: MailGuid,
}

/// Changes to a mailbox's own metadata (Dovecot's `mailbox_update`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxUpdate {
    /// New UIDVALIDITY.
    pub uid_validity: Option<u32>,
    /// New mailbox GUID.
    pub guid: Option<Guid128>,
    /// Raise UIDNEXT to at least this.
    pub min_next_uid: Option<u32>,
    /// Raise the first recent UID to at least this.
    pub min_first_recent_uid: Option<u32>,
    /// Raise HIGHESTMODSEQ to at least this.
    pub min_highest_modseq: Option<Modseq>,
    /// Record [`MailboxStatus::replicated_modseq`].
    pub replicated_modseq: Option<Modseq>,
}

/// A mailbox backend: the mailbox tree and handles to single mailboxes.
pub trait MailStore {
    /// Handle to one open mailbox.
    type Mailbox: Mailbox;

    /// The hierarchy separator admins type in names (`.` for Maildir++, `/` for `LAYOUT=fs`).
    fn hierarchy_separator(&self) -> char;

    /// Every node of the mailbox tree: mailboxes, directories, parents and subscription-only
    /// names. Order is unspecified.
    fn list(&mut self) -> StoreResult<Vec<MailboxInfo>>;

    /// The mailbox-list change log (deletes, renames, subscription changes) still on record.
    fn list_changes(&mut self) -> StoreResult<Vec<ListChange>>;

    /// Creates a mailbox. `guid` and `uid_validity` are generated when `None`.
    fn create_mailbox(
        &mut self,
        name: &MailboxName,
        guid: Option<Guid128>,
        uid_validity: Option<u32>,
    ) -> StoreResult<()>;

    /// Deletes a mailbox and its mails (not its children) and records the deletion.
    fn delete_mailbox(&mut self, name: &MailboxName) -> StoreResult<()>;

    /// Empties INBOX and forgets its identity (GUID, UIDVALIDITY, UIDs): what deleting it means
    /// for a replica, since INBOX itself can never be deleted. The next `create_mailbox` of
    /// INBOX gives it a new identity.
    fn clear_inbox(&mut self) -> StoreResult<()>;

    /// Renames a mailbox and its children and records the rename.
    fn rename_mailbox(&mut self, from: &MailboxName, to: &MailboxName) -> StoreResult<()>;

    /// Subscribes or unsubscribes a name and records the change.
    fn set_subscribed(&mut self, name: &MailboxName, subscribed: bool) -> StoreResult<()>;

    /// Opens a mailbox by name.
    fn open(&mut self, name: &MailboxName) -> StoreResult<Self::Mailbox>;
}

/// An open mailbox.
///
/// The handle shows the mailbox as it was when opened plus its own changes; other writers'
/// changes appear at the next [`Mailbox::refresh`].
pub trait Mailbox {
    /// The mailbox name.
    fn name(&self) -> &MailboxName;

    /// Current status.
    fn status(&self) -> MailboxStatus;

    /// All mails in ascending UID order.
    fn mails(&self) -> Vec<MailRecord>;

    /// One mail.
    fn mail(&self, uid: Uid) -> Option<MailRecord>;

    /// Changes with a modseq above `since`, in modseq order, or `None` if the log no longer
    /// reaches back that far (the caller must then fall back to a full comparison).
    /// `since == 0` returns whatever the log still holds.
    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>>;

    /// The mail's body as stored (Maildir: LF line ends unless the sender used CRLF).
    fn open_body(&mut self, uid: Uid) -> StoreResult<Box<dyn Read + Send>>;

    /// INTERNALDATE.
    fn received_date(&mut self, uid: Uid) -> StoreResult<UnixTime>;

    /// When the mail was saved into this mailbox (IMAP's SAVEDATE). Stores that do not keep
    /// it apart report the received date.
    fn saved_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        self.received_date(uid)
    }

    /// Size as stored (bytes).
    fn physical_size(&mut self, uid: Uid) -> StoreResult<u64>;

    /// Size with CRLF line ends (IMAP RFC822.SIZE).
    fn virtual_size(&mut self, uid: Uid) -> StoreResult<u64>;

    /// Stages a mail; it becomes visible (with its UID) at [`Mailbox::commit`].
    fn save(&mut self, request: SaveRequest, body: &mut dyn Read) -> StoreResult<()>;

    /// Makes staged mails visible and durable, in the order they were staged.
    fn commit(&mut self) -> StoreResult<Vec<SavedMail>>;

    /// Changes flags and keywords of one mail. `min_modseq` raises the mail's modseq to at
    /// least that value (for replicas that keep the peer's modseq).
    fn change_flags(
        &mut self,
        uid: Uid,
        op: FlagOp,
        flags: Flags,
        keywords: &[Keyword],
        min_modseq: Modseq,
    ) -> StoreResult<()>;

    /// Expunges mails; UIDs that no longer exist are skipped.
    fn expunge(&mut self, uids: &[Uid]) -> StoreResult<()>;

    /// Stages giving a mail a new, higher UID (`to` or above), keeping its GUID, flags and
    /// body. Like a save it takes effect at [`Mailbox::commit`], which reports it in staging
    /// order among the saves; only then does the old UID disappear (as an expunge). Until then
    /// the mail can still be read at its old UID, so a peer asking for it meanwhile gets it.
    fn stage_move(&mut self, from: Uid, to: Uid) -> StoreResult<()>;

    /// Changes the mailbox's own metadata.
    fn update(&mut self, update: &MailboxUpdate) -> StoreResult<()>;

    /// Picks up changes made by other writers since the handle was opened.
    fn refresh(&mut self) -> StoreResult<()>;

    /// Starts importing a peer's changes, as one transaction: until the next
    /// [`Mailbox::sync_point`] every change made through this handle gets the modseq `at`
    /// (at least the current HIGHESTMODSEQ; raised per mail to the `min_modseq` asked for,
    /// the peer's modseq of that mail), instead of one new modseq per change.
    ///
    /// The importer passes the larger of our HIGHESTMODSEQ and the peer's, so that an import
    /// never carries our HIGHESTMODSEQ past both: afterwards the peer's is at least ours. A
    /// replica that ran ahead of its master could later show exactly the numbers of a master
    /// that did change, and the master would skip the mailbox as unchanged (dsync's `CHANGED`
    /// mode) and lose the change; and raising a Dovecot master far past its own changes makes
    /// it distrust its transaction log ("modseq tracking is corrupted").
    fn begin_import(&mut self, at: Modseq) {
        let _ = at;
    }

    /// Makes everything this handle has reported durable.
    fn sync_point(&mut self) -> StoreResult<()>;
}
