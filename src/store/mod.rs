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

/// The highest UID a mailbox can hold. Dovecot refuses UID 4294967295 (2^32-1) in a uidlist
/// ("UID too high") and never assigns it, so no store does either: a save that would need it
/// fails with [`StoreError::Limit`], and UIDNEXT can be raised to at most this value.
pub const MAX_UID: u32 = u32::MAX - 1;

/// The most distinct keywords one mailbox may use. Dovecot's Maildir names 26 of them in file
/// names; the rest live in its index, and in ours (see the Maildir store). The bound keeps a
/// mailbox's keyword table, and each mail's list, small.
pub const MAX_MAILBOX_KEYWORDS: usize = 1024;

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
    /// The peer's HIGHESTMODSEQ of this mailbox when it last had exactly this content (0:
    /// unknown). If the peer now shows another value while every counter equals ours, it
    /// changed since, even though the numbers happen to meet.
    pub peer_modseq: Modseq,
    /// The mailbox's change history before some point is lost (its modseq index was rebuilt
    /// from the mails, as for a Maildir we did not create or whose index was deleted), and its
    /// modseqs restarted low, as Dovecot's own do. A peer's saved state from before that point
    /// cannot be trusted: the next sync must be a full one. While set,
    /// [`Mailbox::changes_since`] answers `None` for any modseq but 0. It stays set until
    /// cleared with [`MailboxUpdate::clear_history_lost`], after a successful full sync.
    pub history_lost: bool,
    /// The lowest modseq [`Mailbox::changes_since`] can start from (besides 0): the log
    /// holds every change above it. After a rebuild it is the rebuilt HIGHESTMODSEQ.
    pub log_floor: Modseq,
    /// Another index of the same mails numbers its changes apart from ours (Dovecot's own
    /// index of a Maildir): the highest of its modseqs whose changes were all in the mails
    /// when this handle first read them, so that everything up to it is in what this handle
    /// reports. `None` when there is no such index (or it could not be read at every load).
    /// A sync state printed for the other index's tool must not name a point above it.
    pub other_index_modseq: Option<Modseq>,
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
    /// Keywords, each once, in the order the store keeps them (Maildir: those named in
    /// `dovecot-keywords` in its letter order, then any others in the order they were added).
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

    /// The mail it changed.
    pub fn uid(&self) -> Uid {
        match self {
            Self::Flags { uid, .. } | Self::Expunge { uid, .. } => *uid,
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
    /// free one. `None` = the next free one. A UID above [`MAX_UID`] is refused at commit.
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
    /// Raise UIDNEXT to at least this; values above [`MAX_UID`] are refused
    /// ([`StoreError::NotPossible`], nothing changed), since no mail could ever get that UID.
    pub min_next_uid: Option<u32>,
    /// Raise the first recent UID to at least this.
    pub min_first_recent_uid: Option<u32>,
    /// Raise HIGHESTMODSEQ to at least this.
    pub min_highest_modseq: Option<Modseq>,
    /// Record [`MailboxStatus::replicated_modseq`].
    pub replicated_modseq: Option<Modseq>,
    /// Record [`MailboxStatus::peer_modseq`].
    pub peer_modseq: Option<Modseq>,
    /// Clear [`MailboxStatus::history_lost`]: a full sync has succeeded since the history was
    /// lost, so states saved from now on are good.
    pub clear_history_lost: bool,
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
    ///
    /// It deletes only mails it saw when it checked the mailbox under the mailbox's write lock
    /// (for Maildir: `dovecot-uidlist.lock`, waiting for it as any writer does). A mail that
    /// arrives after that check from a writer that does not wait for the lock (a Dovecot
    /// delivery) makes it refuse with [`StoreError::ChangedDuringDelete`], keeping the
    /// mailbox, its identity and every mail.
    fn delete_mailbox(&mut self, name: &MailboxName) -> StoreResult<()>;

    /// Empties INBOX and forgets its identity (GUID, UIDVALIDITY, UIDs): what deleting it means
    /// for a replica, since INBOX itself can never be deleted. The next `create_mailbox` of
    /// INBOX gives it a new identity. Like [`MailStore::delete_mailbox`] it removes only the
    /// mails it saw under the lock; if others arrive meanwhile it keeps them and INBOX's
    /// identity and fails with [`StoreError::ChangedDuringDelete`].
    fn clear_inbox(&mut self) -> StoreResult<()>;

    /// Renames a mailbox and its children and records the rename.
    fn rename_mailbox(&mut self, from: &MailboxName, to: &MailboxName) -> StoreResult<()>;

    /// Subscribes or unsubscribes a name and records the change.
    fn set_subscribed(&mut self, name: &MailboxName, subscribed: bool) -> StoreResult<()>;

    /// Unsubscribes a name and records an unsubscription even if it was not subscribed here:
    /// a peer that still has it subscribed then learns that it should not be.
    fn forget_subscription(&mut self, name: &MailboxName) -> StoreResult<()>;

    /// Opens a mailbox by name.
    fn open(&mut self, name: &MailboxName) -> StoreResult<Self::Mailbox>;

    /// Takes the user's sync lock, which a dsync session takes for its whole length when the
    /// master asks for it (`doveadm sync -l`), waiting up to `timeout`. Dropping the returned
    /// guard releases it.
    fn lock_sync(&mut self, timeout: std::time::Duration) -> StoreResult<Box<dyn std::any::Any>>;
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

    /// The UIDs of all mails, ascending: a sync walks a large mailbox by UID, fetching one
    /// [`Mailbox::mail`] at a time, rather than holding every record at once.
    fn uids(&self) -> Vec<Uid> {
        self.mails().into_iter().map(|m| m.uid).collect()
    }

    /// Where a sync may keep large working lists about this mailbox in unnamed files (see
    /// [`crate::runs`]): a directory on the mail's own file system. `None`: in memory.
    fn scratch_dir(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// The first UID above `after`: a walk over a large mailbox one mail at a time, holding
    /// nothing per mail (the default lists them all; stores override it).
    fn uid_after(&self, after: u32) -> Option<Uid> {
        self.uids().into_iter().find(|u| u.get() > after)
    }

    /// How many mails have a UID above `after`, and the highest UID (the default lists them
    /// all; stores override it).
    fn uids_above(&self, after: u32) -> (usize, Option<Uid>) {
        let uids = self.uids();
        (uids.len() - uids.partition_point(|u| u.get() <= after), uids.last().copied())
    }

    /// One mail.
    fn mail(&self, uid: Uid) -> Option<MailRecord>;

    /// Changes with a modseq above `since`, in modseq order, or `None` if the log no longer
    /// reaches back that far (the caller must then fall back to a full comparison): `since`
    /// is below the log's floor, or [`MailboxStatus::history_lost`] is set (then `since` may
    /// be a modseq from before the loss, which the log cannot tell apart).
    /// `since == 0` returns whatever the log still holds.
    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>>;

    /// [`Mailbox::changes_since`] one change at a time, for a log too long to list: `each`
    /// gets every change above `since` in modseq order; false where that gives `None`.
    fn each_change_since(&self, since: Modseq, each: &mut dyn FnMut(Change)) -> bool {
        match self.changes_since(since) {
            Some(changes) => {
                changes.into_iter().for_each(each);
                true
            }
            None => false,
        }
    }

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

    /// Makes staged mails visible and durable, in the order they were staged. Fails with
    /// [`StoreError::Limit`] and saves nothing if a mail would need a UID above [`MAX_UID`].
    fn commit(&mut self) -> StoreResult<Vec<SavedMail>>;

    /// Stages another copy of the mail staged last by [`Mailbox::save`], with its own UID,
    /// flags and keywords (the GUID is kept unless `request` names one). This is how one
    /// received body becomes several mails without ever being held in memory; a Maildir
    /// hard-links the staged file.
    fn save_copy_of_last(&mut self, request: SaveRequest) -> StoreResult<()>;

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

    /// Starts importing a peer's changes; it lasts until the next [`Mailbox::sync_point`].
    ///
    /// The import's flag changes are not recorded in [`Mailbox::changes_since`]: they came from
    /// the peer, and taking them for ours would send them back and let them win conflicts
    /// they should not (Dovecot's log scan skips its sync transactions the same way).
    /// Expunges are recorded.
    ///
    /// Modseqs: with `one_modseq: None`, changes are numbered as Dovecot's importer numbers
    /// them: every flag change and every saved mail gets a modseq of its own, raised to the
    /// `min_modseq` asked for (the peer's modseq of that mail); later two-way flag conflicts
    /// are decided by comparing these with the peer's, so they must grow as Dovecot's do.
    /// With `Some(at)`, every change gets `at` (at least the current HIGHESTMODSEQ; raised per
    /// mail to its `min_modseq`): a backup destination passes the larger of its and the
    /// source's HIGHESTMODSEQ, so that it never runs ahead of its source and a repeated backup
    /// finds every counter equal and skips the mailbox.
    fn begin_import(&mut self, one_modseq: Option<Modseq>) {
        let _ = one_modseq;
    }

    /// Makes everything this handle has reported durable.
    fn sync_point(&mut self) -> StoreResult<()>;
}
