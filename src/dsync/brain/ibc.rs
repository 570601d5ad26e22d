//! The brain's connection to the other brain ("inter-brain connection", as Dovecot calls it):
//! typed records in and out. [`super::super::stream::WireIbc`] implements it over a byte
//! stream with the wire codec; [`super::super::pipe`] joins two brains in one process.
//!
//! Sending never blocks: records are queued, and bulk senders ask
//! [`Ibc::send_queue_full`] before each record, pausing while the peer catches up. Receiving
//! is polled with [`Ibc::try_recv`]; when a brain can make no progress it calls
//! [`Ibc::wait`]. This is what lets the two directions interleave (both sides may send
//! mails at the same time) with bounded memory and no deadlock, as in Dovecot's brain.

use std::io::Read;

use super::tree::{Delete, NodeData};
use super::types::{DsyncMailbox, MailChange, MailHeader, MailRequest, MailboxState};
use crate::dsync::wire::WireError;
use crate::store::Guid128;

/// `H.sync_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncKind {
    /// `f`: every mailbox, every mail.
    Full,
    /// `c`: mailboxes whose status differs.
    Changed,
    /// `s`: incremental from saved states.
    State,
}

/// What a handshake (`H`) says. The slave sends only its hostname.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) hostname: String,
    pub(crate) sync_ns_prefixes: Option<Vec<String>>,
    pub(crate) sync_box: Option<String>,
    pub(crate) sync_box_guid: Option<Guid128>,
    pub(crate) sync_type: Option<SyncKind>,
    pub(crate) debug: bool,
    pub(crate) sync_visible_namespaces: bool,
    pub(crate) exclude_mailboxes: Vec<String>,
    pub(crate) send_mail_requests: bool,
    pub(crate) backup_send: bool,
    pub(crate) backup_recv: bool,
    pub(crate) lock_timeout: u32,
    pub(crate) no_mail_sync: bool,
    pub(crate) no_backup_overwrite: bool,
    pub(crate) purge_remote: bool,
    pub(crate) no_notify: bool,
    pub(crate) sync_since_timestamp: i64,
    pub(crate) sync_max_size: u64,
    pub(crate) sync_flags: Option<String>,
    pub(crate) sync_until_timestamp: i64,
    pub(crate) virtual_all_box: Option<String>,
    pub(crate) empty_hdr_workaround: bool,
    /// 0 = not sent (the slave's handshake).
    pub(crate) import_commit_msgs_interval: u32,
    pub(crate) hashed_headers: Vec<String>,
    pub(crate) alt_char: Option<char>,
}

/// A received record.
#[derive(Debug)]
pub(crate) enum Incoming {
    Handshake(Settings),
    MailboxState(MailboxState),
    Node {
        parts: Vec<String>,
        data: NodeData,
    },
    Deletes {
        sep: char,
        escape: Option<char>,
        deletes: Vec<Delete>,
    },
    Mailbox(DsyncMailbox),
    /// A mailbox attribute; its value (and stream) has been consumed.
    Attribute,
    Change(MailChange),
    Request(MailRequest),
    /// A mail; when `has_body` is set, the body must be read with [`Ibc::body`] before the
    /// next receive (whatever is left unread is skipped then).
    Mail(MailHeader),
    Finish {
        error: Option<String>,
        mail_error: u32,
        require_full_resync: bool,
    },
    /// `.`
    EndOfList,
    /// `X`: the other side is closing.
    Done,
}

impl Incoming {
    /// A short name for error messages.
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Self::Handshake(_) => "handshake",
            Self::MailboxState(_) => "mailbox state",
            Self::Node { .. } => "mailbox tree node",
            Self::Deletes { .. } => "mailbox deletions",
            Self::Mailbox(_) => "mailbox",
            Self::Attribute => "attribute",
            Self::Change(_) => "mail change",
            Self::Request(_) => "mail request",
            Self::Mail(_) => "mail",
            Self::Finish { .. } => "finish",
            Self::EndOfList => "end of list",
            Self::Done => "done",
        }
    }
}

/// Why the connection failed. The kinds stay apart so that a caller can tell a peer that broke
/// the protocol from a connection that broke or timed out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IbcError {
    /// The byte stream failed, ended early or stalled (`ErrorKind::TimedOut`).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer's bytes are not valid dsync.
    #[error("invalid input from the remote: {0}")]
    Wire(#[from] WireError),
    /// The peer's records break the protocol's structure.
    #[error("invalid input from the remote: {0}")]
    Protocol(String),
}

/// A typed connection to the other brain. See the module documentation.
pub(crate) trait Ibc {
    fn send_handshake(&mut self, s: &Settings) -> Result<(), IbcError>;
    fn send_mailbox_state(&mut self, s: &MailboxState) -> Result<(), IbcError>;
    fn send_node(&mut self, parts: &[String], data: &NodeData) -> Result<(), IbcError>;
    fn send_deletes(&mut self, sep: char, escape: Option<char>, deletes: &[Delete]) -> Result<(), IbcError>;
    fn send_mailbox(&mut self, b: &DsyncMailbox) -> Result<(), IbcError>;
    fn send_change(&mut self, c: &MailChange) -> Result<(), IbcError>;
    fn send_request(&mut self, r: &MailRequest) -> Result<(), IbcError>;
    /// Sends a mail; its body, if any, is streamed to the peer in the background.
    fn send_mail(&mut self, h: &MailHeader, body: Option<Box<dyn Read + Send>>) -> Result<(), IbcError>;
    fn send_finish(&mut self, error: Option<&str>, mail_error: u32, require_full_resync: bool) -> Result<(), IbcError>;
    fn send_end_of_list(&mut self) -> Result<(), IbcError>;
    fn send_done(&mut self) -> Result<(), IbcError>;
    /// True when bulk senders should pause until the peer has read more.
    fn send_queue_full(&mut self) -> bool;
    /// Pushes queued records towards the peer.
    fn flush(&mut self) -> Result<(), IbcError>;
    /// The peer's protocol minor version (attributes need ≥ 1, `F` needs ≥ 3).
    fn peer_minor(&self) -> u32;
    /// The next record if one has arrived; never waits (except to finish skipping the rest
    /// of a body the caller left unread, which the peer is already sending).
    fn try_recv(&mut self) -> Result<Option<Incoming>, IbcError>;
    /// Waits until a record may have arrived or the send queue has room again, up to the
    /// connection's stall timeout.
    fn wait(&mut self) -> Result<(), IbcError>;
    /// The body of the mail last received (blocking reads: the peer is sending it).
    fn body(&mut self) -> &mut dyn Read;
}
