//! Bounds on everything a peer controls.
//!
//! A dsync peer decides how many records it sends, how deep and long its mailbox names are,
//! which UIDs and counters it claims. Each of those drives memory, time or recursion here, so
//! each is checked against a limit *before* it is used, and breaking one ends the session
//! with an error that names the limit ([`super::session::BrainError::Limit`]). The defaults
//! are far above what real mailboxes reach (Dovecot's own Maildir++ names cannot exceed a
//! 255-byte directory name) and low enough that a hostile peer cannot make a replica use more
//! than a few hundred MiB or recurse deeply.

/// The limits of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Hierarchy levels of one mailbox name.
    pub(crate) max_name_levels: usize,
    /// Bytes of one full mailbox name (all levels, Dovecot's `MAILBOX_LIST_NAME_MAX_LENGTH`).
    pub(crate) max_name_bytes: usize,
    /// Mailbox tree nodes, saved mailbox states, and deletion records per session.
    pub(crate) max_mailboxes: usize,
    /// Mail change records the peer may send for one mailbox, and mails one mailbox may hold.
    pub(crate) max_mails_per_mailbox: usize,
    /// Attribute records per mailbox (we keep none, but read them).
    pub(crate) max_attributes_per_mailbox: usize,
    /// Mails the peer may send that we did not ask for, per mailbox.
    pub(crate) max_unwanted_mails: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_name_levels: 256,
            max_name_bytes: 4096,
            max_mailboxes: 100_000,
            max_mails_per_mailbox: 4_000_000,
            max_attributes_per_mailbox: 100_000,
            max_unwanted_mails: 10_000,
        }
    }
}

/// The highest UID a mailbox may hold. UIDs are 32-bit and non-zero; Dovecot refuses a
/// `dovecot-uidlist` that holds 4294967295 ("UID too high"), so the last usable one is below.
pub(crate) const MAX_UID: u32 = u32::MAX - 1;

/// The highest UIDNEXT a mailbox may have: one above [`MAX_UID`] (the mailbox is then full).
pub(crate) const MAX_UID_NEXT: u32 = u32::MAX;
