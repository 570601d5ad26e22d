//! The brain's view of dsync records: the meaning of each record, without its encoding.
//! The session layer converts between these and the wire codec's records.

use crate::store::Guid128;

/// `C.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    /// `s`: the mail exists and is new relative to the last common UID.
    Save,
    /// `e`: the mail was expunged.
    Expunge,
    /// `f`: flags or keywords changed.
    FlagChange,
}

/// A keyword change operation in `C.keyword_changes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KwOp {
    /// `+`: added since the last common modseq.
    Add,
    /// `-`: removed since then.
    Remove,
    /// `=`: present now.
    Final,
    /// `&`: added and present now.
    AddAndFinal,
}

/// A `C` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailChange {
    pub(crate) kind: ChangeType,
    pub(crate) uid: u32,
    /// `None` = absent on the wire; `Some("")` = the backend has no GUIDs.
    pub(crate) guid: Option<String>,
    pub(crate) hdr_hash: Option<String>,
    pub(crate) modseq: u64,
    pub(crate) pvt_modseq: u64,
    pub(crate) add_flags: u8,
    pub(crate) remove_flags: u8,
    pub(crate) final_flags: u8,
    pub(crate) keywords_reset: bool,
    pub(crate) keyword_changes: Vec<(KwOp, String)>,
    pub(crate) received_timestamp: i64,
    /// `None` = unknown (`ffffffffffffffff` on the wire).
    pub(crate) virtual_size: Option<u64>,
}

impl MailChange {
    /// An empty change of a kind for a UID.
    pub(crate) fn new(kind: ChangeType, uid: u32) -> Self {
        Self {
            kind,
            uid,
            guid: None,
            hdr_hash: None,
            modseq: 0,
            pvt_modseq: 0,
            add_flags: 0,
            remove_flags: 0,
            final_flags: 0,
            keywords_reset: false,
            keyword_changes: Vec::new(),
            received_timestamp: 0,
            virtual_size: None,
        }
    }

    /// The keywords the mail has after the change (`+`, `=` and `&` entries).
    pub(crate) fn final_keywords(&self) -> Vec<&str> {
        self.keyword_changes.iter().filter(|(op, _)| *op != KwOp::Remove).map(|(_, k)| k.as_str()).collect()
    }
}

/// An `R` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailRequest {
    pub(crate) guid: Option<String>,
    pub(crate) uid: u32,
}

/// The fields of an `M` record (the body travels separately).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MailHeader {
    pub(crate) guid: String,
    pub(crate) uid: u32,
    pub(crate) pop3_uidl: String,
    pub(crate) pop3_order: u32,
    pub(crate) received_date: i64,
    pub(crate) saved_date: i64,
    /// A body follows; without one, all instances were expunged on the sender.
    pub(crate) has_body: bool,
}

/// An `S` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct MailboxState {
    pub(crate) guid: Guid128,
    pub(crate) last_uidvalidity: u32,
    pub(crate) last_common_uid: u32,
    pub(crate) last_common_modseq: u64,
    pub(crate) last_common_pvt_modseq: u64,
    pub(crate) last_messages_count: u32,
    pub(crate) changes_during_sync: bool,
    /// Not on the wire: the same point in the numbering of the other index of the master's
    /// mails (Dovecot's, on the same Maildir), when there is one; then doveadm may use the
    /// printed state too (see `dsync::saved_state`).
    pub(crate) shared_modseq: Option<u64>,
}

/// A cache field decision inside `B.cache_fields`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheField {
    pub(crate) name: String,
    pub(crate) decision: String,
    pub(crate) last_used: i64,
}

/// A `B` record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DsyncMailbox {
    pub(crate) guid: Guid128,
    pub(crate) uid_validity: u32,
    pub(crate) uid_next: u32,
    pub(crate) messages_count: u32,
    pub(crate) first_recent_uid: u32,
    pub(crate) highest_modseq: u64,
    pub(crate) highest_pvt_modseq: u64,
    pub(crate) mailbox_lost: bool,
    pub(crate) mailbox_ignore: bool,
    pub(crate) cache_fields: Vec<CacheField>,
    pub(crate) have_guids: bool,
    pub(crate) have_save_guids: bool,
    pub(crate) have_only_guid128: bool,
}

/// The IMAP `\Recent` bit, which travels in `final_flags` but is never stored.
pub(crate) const FLAG_RECENT: u8 = 0x20;
