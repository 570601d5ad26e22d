//! The typed records and their field mapping (`dsync_ibc_stream_send_*` / `_recv_*`).
//!
//! Each record type maps its fields to and from header keys. Decoding follows Dovecot's
//! receiver exactly (which fields are required, which letters are accepted, what an absent
//! value means); encoding follows Dovecot's sender exactly (which zero values are left out,
//! which fields are always sent), so that a record decoded from a Dovecot capture encodes
//! back to the same bytes.

use std::num::{NonZeroI64, NonZeroU8, NonZeroU32, NonZeroU64};

use super::error::{Malformation, WireError};
use super::escape::{c_string, escape_into, join_tabescaped, split_tabescaped};
use super::fields::{FieldReader, FieldWriter, parse_signed};
use super::header::{Headers, ItemType, MINOR_HAVE_SAVE_GUID};
use super::types::{
    AttributeType, CacheDecision, ChangeType, Existence, Guid128, HierarchySep, KeywordChange, KeywordOp, MailboxPath,
    NsPrefixes, SyncType, Text, WireFlags,
};

/// `H`: the settings each side announces once, right after its header block.
///
/// The slave sends only `hostname` and an empty `hashed_headers`; the master's values steer the
/// whole run (sync type, backup direction, filters). Options that Dovecot only sends when
/// non-zero are `Option<NonZero…>` here, so a zero (which Dovecot's receiver rejects) cannot be
/// built.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Handshake {
    /// The sender's host name (logs; the side whose name sorts lower takes the `-l` lock).
    pub hostname: Text,
    /// Only these namespaces (`-n`).
    pub sync_ns_prefixes: Option<NsPrefixes>,
    /// Only this mailbox (`-m`); starting with `\` it is a SPECIAL-USE flag.
    pub sync_box: Option<Text>,
    /// Only this mailbox GUID (`-g`).
    pub sync_box_guid: Option<Guid128>,
    /// Full, changed or state sync; the slave sends none.
    pub sync_type: Option<SyncType>,
    /// `-D`: both brains log debug lines.
    pub debug: bool,
    /// `-N`: sync all visible namespaces.
    pub sync_visible_namespaces: bool,
    /// `-x` patterns. `Some(empty)` is what an empty value decodes to; Dovecot treats it as none.
    pub exclude_mailboxes: Option<Vec<Text>>,
    /// Bodies are fetched with `R` requests (always set by `doveadm sync/backup`).
    pub send_mail_requests: bool,
    /// The *receiver* of this flag is the backup source.
    pub backup_send: bool,
    /// The *receiver* of this flag is the backup destination.
    pub backup_recv: bool,
    /// `-l secs`.
    pub lock_timeout: Option<NonZeroU32>,
    /// Sync only the mailbox list.
    pub no_mail_sync: bool,
    /// `sync -1`: one-way without reverting destination-only changes.
    pub no_backup_overwrite: bool,
    /// `-P`: the slave purges at the end.
    pub purge_remote: bool,
    /// Never sent by doveadm 2.3.19.
    pub no_notify: bool,
    /// `-t`.
    pub sync_since_timestamp: Option<NonZeroI64>,
    /// `-I`.
    pub sync_max_size: Option<NonZeroU64>,
    /// `-O`: a flag or keyword a mail must (or, with a leading `-`, must not) have.
    pub sync_flags: Option<Text>,
    /// `-e`. (Dovecot 2.3.19's sender puts the *since* value here by mistake; we send ours.)
    pub sync_until_timestamp: Option<NonZeroI64>,
    /// `-a`: a virtual "all mail" box to copy from.
    pub virtual_all_box: Option<Text>,
    /// `dsync_features = empty-header-workaround`.
    pub empty_hdr_workaround: bool,
    /// Commit every this many imported mails (2.3 only; 2.4 dropped the key).
    pub import_commit_msgs_interval: Option<NonZeroU32>,
    /// Headers to hash when mails have no GUIDs. `None` when absent (pre-2.3 peers); the slave
    /// sends `Some(empty)`.
    pub hashed_headers: Option<Vec<Text>>,
    /// Replaces the local separator inside remote name components (`_` by default).
    pub alt_char: Option<NonZeroU8>,
}

/// `S`: a mailbox's sync state, sent in the initial state list and at the end of every
/// mailbox. The same values make up the saved state string (see [`super::decode_state`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MailboxState {
    /// The mailbox.
    pub mailbox_guid: Guid128,
    /// The UIDVALIDITY the state refers to (0 forces a resync).
    pub last_uidvalidity: u32,
    /// Highest UID known to be identical on both sides.
    pub last_common_uid: u32,
    /// Modseq up to which changes are known to be synced.
    pub last_common_modseq: u64,
    /// The same for private flags.
    pub last_common_pvt_modseq: u64,
    /// Message count at that point.
    pub last_messages_count: u32,
    /// The sender saw unexpected changes during the sync (not stored in the state string).
    pub changes_during_sync: bool,
}

/// `N`: one node of the sender's mailbox tree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MailboxNode {
    /// The full name as hierarchy components.
    pub name: MailboxPath,
    /// Whether a mailbox exists at this name.
    pub existence: Existence,
    /// Set for selectable mailboxes.
    pub mailbox_guid: Option<Guid128>,
    /// UIDVALIDITY, 0 when unknown (then not sent).
    pub uid_validity: u32,
    /// UIDNEXT, 0 when unknown (then not sent).
    pub uid_next: u32,
    /// From the mailbox-list changelog, 0 when unknown (then not sent).
    pub last_renamed_or_created: i64,
    /// Subscribed.
    pub subscribed: bool,
    /// From the changelog, 0 when unknown (then not sent).
    pub last_subscription_change: i64,
}

/// One deletion in a `D` record: a GUID (or name hash) and when it happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Deletion {
    /// Mailbox GUID, or for directories and unsubscriptions the first 16 bytes of SHA-1 of the
    /// full name.
    pub guid: Guid128,
    /// Unix time of the deletion.
    pub timestamp: i64,
}

/// `D`: the sender's separator, escape character and deletion log, sent once after the tree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MailboxDeletes {
    /// The sender's hierarchy separator.
    pub hierarchy_sep: HierarchySep,
    /// The sender's vname escape character, if any.
    pub escape_char: Option<NonZeroU8>,
    /// Deleted mailboxes.
    pub mailboxes: Vec<Deletion>,
    /// Deleted directories.
    pub dirs: Vec<Deletion>,
    /// Unsubscribed names no longer in the tree.
    pub unsubscribes: Vec<Deletion>,
}

/// A `c` sub-record of `B.cache_fields`: one index cache decision.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CacheField {
    /// The cache field name (`flags`, `date.save`, `hdr.Message-ID`…).
    pub name: Text,
    /// How it is cached.
    pub decision: CacheDecision,
    /// Last use, 0 when unknown (then not sent).
    pub last_used: i64,
}

/// `B`: a mailbox's status, opening (or answering) its per-mailbox exchange.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Mailbox {
    /// The mailbox.
    pub mailbox_guid: Guid128,
    /// UIDVALIDITY.
    pub uid_validity: u32,
    /// UIDNEXT.
    pub uid_next: u32,
    /// Number of messages.
    pub messages_count: u32,
    /// Lowest UID that may still be `\Recent`.
    pub first_recent_uid: u32,
    /// HIGHESTMODSEQ (0 without permanent modseqs).
    pub highest_modseq: u64,
    /// The same for private flags.
    pub highest_pvt_modseq: u64,
    /// Slave: "I don't have this mailbox".
    pub mailbox_lost: bool,
    /// Slave: "skip it silently".
    pub mailbox_ignore: bool,
    /// Index cache decisions (always sent, maybe empty).
    pub cache_fields: Vec<CacheField>,
    /// Mails have GUIDs.
    pub have_guids: bool,
    /// Mails can be saved with a given GUID. (Peers below minor 2 never send it; Dovecot then
    /// assumes it from `have_guids`, and so does our decoder.)
    pub have_save_guids: bool,
    /// GUIDs are always 128-bit (dbox).
    pub have_only_guid128: bool,
}

/// How an attribute's value travels.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AttributeValue {
    /// No value (e.g. a deleted attribute).
    Absent,
    /// A small value on the record line.
    Inline(Text),
    /// The value follows as a dot-stream body.
    Stream,
}

/// `A`: a mailbox attribute (IMAP METADATA). Only sent to peers of minor ≥ 1.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Attribute {
    /// Private or shared.
    pub attr_type: AttributeType,
    /// The key relative to the type.
    pub key: Text,
    /// The value, inline or as a following body.
    pub value: AttributeValue,
    /// The attribute was deleted.
    pub deleted: bool,
    /// Last change, 0 when unknown (then not sent).
    pub last_change: i64,
    /// Modseq, 0 when unknown (then not sent).
    pub modseq: u64,
}

/// `C`: one mail change, sent sorted by UID.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MailChange {
    /// Save, expunge or flag change.
    pub change_type: ChangeType,
    /// The sender's UID.
    pub uid: u32,
    /// The backend's GUID string for saves and flag changes (`""` if it has none), the 32-hex
    /// GUID128 for expunges, absent when unknown.
    pub guid: Option<Text>,
    /// Header hash when GUIDs cannot be used; `""` means "no hashes needed" (empty remote).
    pub hdr_hash: Option<Text>,
    /// The mail's modseq, 0 = not sent.
    pub modseq: u64,
    /// The mail's private modseq, 0 = not sent.
    pub pvt_modseq: u64,
    /// System flags added since the last common modseq (hex).
    pub add_flags: WireFlags,
    /// System flags removed since then (hex).
    pub remove_flags: WireFlags,
    /// Current system flags, `\Recent` included (hex).
    pub final_flags: WireFlags,
    /// All keywords were reset (old logs only).
    pub keywords_reset: bool,
    /// Keyword changes. Entries with an operation letter Dovecot does not know are dropped on
    /// decoding: its importer ignores them too.
    pub keyword_changes: Vec<KeywordChange>,
    /// Received time (hex), only with `-t`/`-e`; 0 = not sent.
    pub received_timestamp: u64,
    /// Virtual size (hex); saves carry `u64::MAX` (unknown) unless `-I`; 0 = not sent.
    pub virtual_size: u64,
}

/// `R`: a request for a mail body, by GUID and/or by the receiver's UID.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct MailRequest {
    /// The wanted mail's GUID as received in `C.guid`.
    pub guid: Option<Text>,
    /// The receiver's UID of the wanted mail, 0 = not sent.
    pub uid: u32,
}

/// `M`: a mail. With `stream` set its body follows as a dot-stream; without it (and with a
/// GUID) it means "all instances of this GUID were expunged on the sender".
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Mail {
    /// Set when requested by GUID; `""` when requested by UID.
    pub guid: Option<Text>,
    /// The sender's UID when requested by UID, 0 = not sent.
    pub uid: u32,
    /// POP3 UIDL; Dovecot always sends the field, usually empty.
    pub pop3_uidl: Option<Text>,
    /// POP3 order, 0 = not sent.
    pub pop3_order: u32,
    /// INTERNALDATE; only positive values are sent.
    pub received_date: i64,
    /// Save date, 0 = not sent.
    pub saved_date: i64,
    /// A body follows.
    pub stream: bool,
}

/// `F`: the slave's result, its last record (only to peers of minor ≥ 3).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Finish {
    /// Error text, absent on success.
    pub error: Option<Text>,
    /// `enum mail_error` (0 none, 1 temp, …, 14 lookup aborted), 0 = not sent.
    pub mail_error: i32,
    /// The master must forget its saved state.
    pub require_full_resync: bool,
}

/// Any record that travels on its own line.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Record {
    /// `H` (boxed: it is by far the largest record and comes once per session).
    Handshake(Box<Handshake>),
    /// `S`.
    MailboxState(MailboxState),
    /// `N`.
    MailboxNode(MailboxNode),
    /// `D`.
    MailboxDeletes(MailboxDeletes),
    /// `B`.
    Mailbox(Mailbox),
    /// `A`.
    Attribute(Attribute),
    /// `C`.
    MailChange(MailChange),
    /// `R`.
    MailRequest(MailRequest),
    /// `M`.
    Mail(Mail),
    /// `F`.
    Finish(Finish),
}

impl Record {
    /// The record's type byte.
    pub fn item_type(&self) -> ItemType {
        match self {
            Self::Handshake(_) => ItemType::HANDSHAKE,
            Self::MailboxState(_) => ItemType::MAILBOX_STATE,
            Self::MailboxNode(_) => ItemType::MAILBOX_NODE,
            Self::MailboxDeletes(_) => ItemType::MAILBOX_DELETES,
            Self::Mailbox(_) => ItemType::MAILBOX,
            Self::Attribute(_) => ItemType::ATTRIBUTE,
            Self::MailChange(_) => ItemType::MAIL_CHANGE,
            Self::MailRequest(_) => ItemType::MAIL_REQUEST,
            Self::Mail(_) => ItemType::MAIL,
            Self::Finish(_) => ItemType::FINISH,
        }
    }

    /// True when a dot-stream body follows this record on the wire.
    pub fn has_body(&self) -> bool {
        match self {
            Self::Mail(m) => m.stream,
            Self::Attribute(a) => a.value == AttributeValue::Stream,
            _ => false,
        }
    }

    /// Decode one record line (without its LF) by the peer's `headers`.
    ///
    /// `peer_minor` is the peer's protocol minor version (it changes how `B.have_save_guids` is
    /// read). The `.` and `X` lines are not records; the [`super::Decoder`] handles them.
    pub fn decode(line: &[u8], headers: &Headers, peer_minor: u32) -> Result<Self, WireError> {
        let Some((&first, rest)) = line.split_first() else {
            return Err(WireError::malformed(None, None, Malformation::EmptyLine));
        };
        let item = ItemType::from_byte(first);
        let known = [
            ItemType::HANDSHAKE,
            ItemType::MAILBOX_STATE,
            ItemType::MAILBOX_NODE,
            ItemType::MAILBOX_DELETES,
            ItemType::MAILBOX,
            ItemType::ATTRIBUTE,
            ItemType::MAIL_CHANGE,
            ItemType::MAIL_REQUEST,
            ItemType::MAIL,
            ItemType::FINISH,
        ];
        if !known.contains(&item) {
            return Err(WireError::malformed(
                None,
                None,
                if item == ItemType::CACHE_FIELD || item == ItemType::DONE {
                    Malformation::UnexpectedRecordType(item)
                } else {
                    Malformation::UnknownRecordType(char::from(first))
                },
            ));
        }
        let header = headers
            .get(item)
            .ok_or_else(|| WireError::malformed(Some(item), None, Malformation::RecordWithoutHeader(item)))?;
        let r = FieldReader::new(item, header, rest)?;
        Ok(match item {
            ItemType::HANDSHAKE => Self::Handshake(Box::new(Handshake::decode(&r)?)),
            ItemType::MAILBOX_STATE => Self::MailboxState(MailboxState::decode(&r)?),
            ItemType::MAILBOX_NODE => Self::MailboxNode(MailboxNode::decode(&r)?),
            ItemType::MAILBOX_DELETES => Self::MailboxDeletes(MailboxDeletes::decode(&r)?),
            ItemType::MAILBOX => Self::Mailbox(Mailbox::decode(&r, headers, peer_minor)?),
            ItemType::ATTRIBUTE => Self::Attribute(Attribute::decode(&r)?),
            ItemType::MAIL_CHANGE => Self::MailChange(MailChange::decode(&r)?),
            ItemType::MAIL_REQUEST => Self::MailRequest(MailRequest::decode(&r)?),
            ItemType::MAIL => Self::Mail(Mail::decode(&r)?),
            _ => Self::Finish(Finish::decode(&r)?),
        })
    }

    /// Append the record line (with its LF) to `out`, laid out by `headers` (normally our own,
    /// [`Headers::ours`]). Keys the headers do not declare are left out.
    pub fn encode(&self, headers: &Headers, out: &mut Vec<u8>) -> Result<(), WireError> {
        let item = self.item_type();
        let header = headers
            .get(item)
            .ok_or(WireError::Unrepresentable { what: "record", why: "the encoding headers lack its type" })?;
        let mut w = FieldWriter::new(item, header);
        match self {
            Self::Handshake(h) => h.encode(&mut w),
            Self::MailboxState(s) => s.encode(&mut w),
            Self::MailboxNode(n) => n.encode(&mut w),
            Self::MailboxDeletes(d) => d.encode(&mut w),
            Self::Mailbox(b) => b.encode(&mut w, headers)?,
            Self::Attribute(a) => a.encode(&mut w),
            Self::MailChange(c) => c.encode(&mut w),
            Self::MailRequest(r) => r.encode(&mut w),
            Self::Mail(m) => m.encode(&mut w),
            Self::Finish(f) => f.encode(&mut w),
        }
        w.finish_line(out);
        Ok(())
    }
}

impl From<Handshake> for Record {
    fn from(h: Handshake) -> Self {
        Self::Handshake(Box::new(h))
    }
}

macro_rules! record_from {
    ($($variant:ident),*) => {$(
        impl From<$variant> for Record {
            fn from(r: $variant) -> Self {
                Self::$variant(r)
            }
        }
    )*};
}

record_from!(MailboxState, MailboxNode, MailboxDeletes, Mailbox, Attribute, MailChange, MailRequest, Mail, Finish);

/// Split a nested TAB list into texts, each cut at NUL like Dovecot's C strings.
fn split_texts(value: &[u8]) -> Vec<Text> {
    split_tabescaped(value).into_iter().map(|v| Text::from_wire(&c_string(v))).collect()
}

/// A required value as text.
fn required_text(r: &FieldReader<'_>, key: &'static str) -> Result<Text, WireError> {
    r.required(key).map(Text::from_wire)
}

/// The first byte of a one-letter choice, mapped; an unknown letter is malformed.
fn choice<T>(
    r: &FieldReader<'_>,
    key: &'static str,
    value: &[u8],
    map: impl Fn(u8) -> Option<T>,
) -> Result<T, WireError> {
    value
        .first()
        .and_then(|&b| map(b))
        .ok_or_else(|| r.error(key, Malformation::UnknownChoice(String::from_utf8_lossy(value).into_owned())))
}

/// A number that must not be zero when present.
fn nonzero<T, N>(
    r: &FieldReader<'_>,
    key: &'static str,
    value: Option<T>,
    make: impl Fn(T) -> Option<N>,
) -> Result<Option<N>, WireError> {
    match value {
        None => Ok(None),
        Some(v) => make(v).map(Some).ok_or_else(|| r.error(key, Malformation::Zero)),
    }
}

impl Handshake {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let sync_type = match r.get("sync_type") {
            None => None,
            Some(v) => Some(choice(r, "sync_type", v, SyncType::from_letter)?),
        };
        let hashed_headers = r.get("hashed_headers").map(|v| {
            // Each name is followed by a TAB, so the split ends in one empty part.
            let mut names = split_texts(v);
            if names.last().is_some_and(Text::is_empty) {
                names.pop();
            }
            names
        });
        Ok(Self {
            hostname: required_text(r, "hostname")?,
            sync_ns_prefixes: r.get("sync_ns_prefix").map(NsPrefixes::decode),
            sync_box: r.text("sync_box"),
            sync_box_guid: r.guid("sync_box_guid")?,
            sync_type,
            debug: r.flag("debug"),
            sync_visible_namespaces: r.flag("sync_visible_namespaces"),
            exclude_mailboxes: r.get("exclude_mailboxes").map(split_texts),
            send_mail_requests: r.flag("send_mail_requests"),
            backup_send: r.flag("backup_send"),
            backup_recv: r.flag("backup_recv"),
            lock_timeout: nonzero(r, "lock_timeout", r.dec_u32("lock_timeout")?, NonZeroU32::new)?,
            no_mail_sync: r.flag("no_mail_sync"),
            no_backup_overwrite: r.flag("no_backup_overwrite"),
            purge_remote: r.flag("purge_remote"),
            no_notify: r.flag("no_notify"),
            sync_since_timestamp: nonzero(r, "sync_since_timestamp", r.time("sync_since_timestamp")?, NonZeroI64::new)?,
            sync_max_size: nonzero(r, "sync_max_size", r.dec_u64("sync_max_size")?, NonZeroU64::new)?,
            sync_flags: r.text("sync_flags"),
            sync_until_timestamp: nonzero(r, "sync_until_timestamp", r.time("sync_until_timestamp")?, NonZeroI64::new)?,
            virtual_all_box: r.text("virtual_all_box"),
            empty_hdr_workaround: r.flag("empty_hdr_workaround"),
            import_commit_msgs_interval: nonzero(
                r,
                "import_commit_msgs_interval",
                r.dec_u32("import_commit_msgs_interval")?,
                NonZeroU32::new,
            )?,
            hashed_headers,
            // Dovecot takes the first byte; an empty value is "no alt char".
            alt_char: r.get("alt_char").and_then(|v| v.first().copied()).and_then(NonZeroU8::new),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set("hostname", &self.hostname);
        w.opt("sync_ns_prefix", self.sync_ns_prefixes.as_ref().map(NsPrefixes::encode));
        w.opt("sync_box", self.sync_box.as_ref());
        w.opt("virtual_all_box", self.virtual_all_box.as_ref());
        w.opt("exclude_mailboxes", self.exclude_mailboxes.as_ref().map(join_tabescaped));
        w.opt("sync_box_guid", self.sync_box_guid.map(|g| g.to_hex()));
        w.opt("sync_type", self.sync_type.map(|t| [t.letter()]));
        w.opt("lock_timeout", self.lock_timeout.map(|n| n.to_string()));
        w.opt("import_commit_msgs_interval", self.import_commit_msgs_interval.map(|n| n.to_string()));
        w.opt("sync_since_timestamp", self.sync_since_timestamp.map(|n| n.to_string()));
        w.opt("sync_until_timestamp", self.sync_until_timestamp.map(|n| n.to_string()));
        w.opt("sync_max_size", self.sync_max_size.map(|n| n.to_string()));
        w.opt("sync_flags", self.sync_flags.as_ref());
        w.opt("alt_char", self.alt_char.map(|c| [c.get()]));
        w.flag("send_mail_requests", self.send_mail_requests);
        w.flag("backup_send", self.backup_send);
        w.flag("backup_recv", self.backup_recv);
        w.flag("debug", self.debug);
        w.flag("sync_visible_namespaces", self.sync_visible_namespaces);
        w.flag("no_mail_sync", self.no_mail_sync);
        w.flag("no_backup_overwrite", self.no_backup_overwrite);
        w.flag("purge_remote", self.purge_remote);
        w.flag("no_notify", self.no_notify);
        w.flag("empty_hdr_workaround", self.empty_hdr_workaround);
        if let Some(names) = &self.hashed_headers {
            let mut value = Vec::new();
            for name in names {
                escape_into(&mut value, name.as_bytes());
                value.push(b'\t');
            }
            w.set("hashed_headers", value);
        }
    }
}

impl MailboxState {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let missing = |key| r.error(key, Malformation::MissingRequiredField);
        Ok(Self {
            mailbox_guid: r.guid("mailbox_guid")?.ok_or_else(|| missing("mailbox_guid"))?,
            last_uidvalidity: r.dec_u32("last_uidvalidity")?.ok_or_else(|| missing("last_uidvalidity"))?,
            last_common_uid: r.dec_u32("last_common_uid")?.ok_or_else(|| missing("last_common_uid"))?,
            last_common_modseq: r.dec_u64("last_common_modseq")?.ok_or_else(|| missing("last_common_modseq"))?,
            last_common_pvt_modseq: r
                .dec_u64("last_common_pvt_modseq")?
                .ok_or_else(|| missing("last_common_pvt_modseq"))?,
            last_messages_count: r.dec_u32("last_messages_count")?.unwrap_or(0),
            changes_during_sync: r.flag("changes_during_sync"),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set("mailbox_guid", self.mailbox_guid.to_hex());
        w.dec("last_uidvalidity", self.last_uidvalidity);
        w.dec("last_common_uid", self.last_common_uid);
        w.dec("last_common_modseq", self.last_common_modseq);
        w.dec("last_common_pvt_modseq", self.last_common_pvt_modseq);
        w.dec("last_messages_count", self.last_messages_count);
        w.flag("changes_during_sync", self.changes_during_sync);
    }
}

impl MailboxNode {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let name = r.required("name")?;
        if name.is_empty() {
            return Err(r.error("name", Malformation::EmptyName));
        }
        let name = MailboxPath::new(split_texts(name)).map_err(|_| r.error("name", Malformation::EmptyName))?;
        Ok(Self {
            name,
            existence: Existence::from_value(r.required("existence")?),
            mailbox_guid: r.guid("mailbox_guid")?,
            uid_validity: r.dec_u32("uid_validity")?.unwrap_or(0),
            uid_next: r.dec_u32("uid_next")?.unwrap_or(0),
            last_renamed_or_created: r.time("last_renamed_or_created")?.unwrap_or(0),
            subscribed: r.flag("subscribed"),
            last_subscription_change: r.time("last_subscription_change")?.unwrap_or(0),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set("name", join_tabescaped(self.name.components()));
        w.set("existence", [self.existence.letter()]);
        w.opt("mailbox_guid", self.mailbox_guid.map(|g| g.to_hex()));
        w.dec_nonzero("uid_validity", self.uid_validity.into());
        w.dec_nonzero("uid_next", self.uid_next.into());
        if self.last_renamed_or_created != 0 {
            w.dec("last_renamed_or_created", self.last_renamed_or_created);
        }
        if self.last_subscription_change != 0 {
            w.dec("last_subscription_change", self.last_subscription_change);
        }
        w.flag("subscribed", self.subscribed);
    }
}

impl MailboxDeletes {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let sep = match r.required("hierarchy_sep")? {
            [b] => HierarchySep::new(*b),
            _ => None,
        }
        .ok_or_else(|| r.error("hierarchy_sep", Malformation::WrongLength("exactly one byte")))?;
        let escape_char = match r.get("escape_char") {
            None | Some([]) => None,
            Some([b]) => NonZeroU8::new(*b),
            Some(_) => return Err(r.error("escape_char", Malformation::WrongLength("at most one byte"))),
        };
        let list = |key: &'static str| -> Result<Vec<Deletion>, WireError> {
            match r.get(key) {
                None => Ok(Vec::new()),
                Some(v) => decode_deletions(v).ok_or_else(|| r.error(key, Malformation::BadPairList)),
            }
        };
        Ok(Self {
            hierarchy_sep: sep,
            escape_char,
            mailboxes: list("mailboxes")?,
            dirs: list("dirs")?,
            unsubscribes: list("unsubscribes")?,
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set("hierarchy_sep", [self.hierarchy_sep.get()]);
        // Always sent, empty when there is no escape character.
        w.set("escape_char", self.escape_char.map(|c| vec![c.get()]).unwrap_or_default());
        for (key, list) in [("mailboxes", &self.mailboxes), ("dirs", &self.dirs), ("unsubscribes", &self.unsubscribes)]
        {
            if !list.is_empty() {
                let pairs: Vec<String> = list.iter().map(|d| format!("{} {}", d.guid, d.timestamp)).collect();
                w.set(key, pairs.join(" "));
            }
        }
    }
}

/// `guid time guid time …`, split on single spaces (`t_strsplit`, so an empty value is an
/// empty list and doubled spaces give empty, invalid tokens).
fn decode_deletions(value: &[u8]) -> Option<Vec<Deletion>> {
    if value.is_empty() {
        return Some(Vec::new());
    }
    let tokens: Vec<&[u8]> = value.split(|&b| b == b' ').collect();
    tokens
        .chunks(2)
        .map(|pair| match pair {
            [guid, time] => Some(Deletion { guid: Guid128::parse_hex(guid)?, timestamp: parse_signed(time)? }),
            _ => None,
        })
        .collect()
}

impl Mailbox {
    fn decode(r: &FieldReader<'_>, headers: &Headers, peer_minor: u32) -> Result<Self, WireError> {
        let missing = |key| r.error(key, Malformation::MissingRequiredField);
        let have_guids = r.flag("have_guids");
        let cache_fields = match r.get("cache_fields") {
            None | Some([]) => Vec::new(),
            Some(v) => {
                let header = headers.get(ItemType::CACHE_FIELD).ok_or_else(|| {
                    WireError::malformed(
                        Some(ItemType::CACHE_FIELD),
                        None,
                        Malformation::RecordWithoutHeader(ItemType::CACHE_FIELD),
                    )
                })?;
                v.split(|&b| b == b'\n')
                    .map(|line| CacheField::decode(&FieldReader::new(ItemType::CACHE_FIELD, header, line)?))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Self {
            mailbox_guid: r.guid("mailbox_guid")?.ok_or_else(|| missing("mailbox_guid"))?,
            uid_validity: r.dec_u32("uid_validity")?.ok_or_else(|| missing("uid_validity"))?,
            uid_next: r.dec_u32("uid_next")?.ok_or_else(|| missing("uid_next"))?,
            messages_count: r.dec_u32("messages_count")?.ok_or_else(|| missing("messages_count"))?,
            first_recent_uid: r.dec_u32("first_recent_uid")?.ok_or_else(|| missing("first_recent_uid"))?,
            highest_modseq: r.dec_u64("highest_modseq")?.ok_or_else(|| missing("highest_modseq"))?,
            highest_pvt_modseq: r.dec_u64("highest_pvt_modseq")?.ok_or_else(|| missing("highest_pvt_modseq"))?,
            mailbox_lost: r.flag("mailbox_lost"),
            mailbox_ignore: r.flag("mailbox_ignore"),
            cache_fields,
            have_guids,
            have_save_guids: r.flag("have_save_guids") || (have_guids && peer_minor < MINOR_HAVE_SAVE_GUID),
            have_only_guid128: r.flag("have_only_guid128"),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>, headers: &Headers) -> Result<(), WireError> {
        w.set("mailbox_guid", self.mailbox_guid.to_hex());
        w.flag("mailbox_lost", self.mailbox_lost);
        w.flag("mailbox_ignore", self.mailbox_ignore);
        w.flag("have_guids", self.have_guids);
        w.flag("have_save_guids", self.have_save_guids);
        w.flag("have_only_guid128", self.have_only_guid128);
        w.dec("uid_validity", self.uid_validity);
        w.dec("uid_next", self.uid_next);
        w.dec("messages_count", self.messages_count);
        w.dec("first_recent_uid", self.first_recent_uid);
        w.dec("highest_modseq", self.highest_modseq);
        w.dec("highest_pvt_modseq", self.highest_pvt_modseq);
        let mut value = Vec::new();
        if !self.cache_fields.is_empty() {
            let header = headers.get(ItemType::CACHE_FIELD).ok_or(WireError::Unrepresentable {
                what: "cache fields",
                why: "the encoding headers lack the c type",
            })?;
            for (i, field) in self.cache_fields.iter().enumerate() {
                if i > 0 {
                    value.push(b'\n');
                }
                let mut cw = FieldWriter::new(ItemType::CACHE_FIELD, header);
                field.encode(&mut cw);
                cw.finish_fields(&mut value);
            }
        }
        // Always sent, even when empty.
        w.set("cache_fields", value);
        Ok(())
    }
}

impl CacheField {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let decision = r.required("decision")?;
        Ok(Self {
            name: required_text(r, "name")?,
            decision: choice(r, "decision", decision, |_| CacheDecision::decode(decision))?,
            last_used: r.time("last_used")?.unwrap_or(0),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set("name", &self.name);
        w.set("decision", self.decision.encode());
        if self.last_used != 0 {
            w.dec("last_used", self.last_used);
        }
    }
}

impl Attribute {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let attr_type = choice(r, "type", r.required("type")?, |b| match b {
            b'p' => Some(AttributeType::Private),
            b's' => Some(AttributeType::Shared),
            _ => None,
        })?;
        // Dovecot looks at `stream` first: if both are present the stream wins.
        let value = if r.flag("stream") {
            AttributeValue::Stream
        } else {
            r.text("value").map_or(AttributeValue::Absent, AttributeValue::Inline)
        };
        Ok(Self {
            attr_type,
            key: required_text(r, "key")?,
            value,
            deleted: r.flag("deleted"),
            last_change: r.time("last_change")?.unwrap_or(0),
            modseq: r.dec_u64("modseq")?.unwrap_or(0),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set(
            "type",
            match self.attr_type {
                AttributeType::Private => "p",
                AttributeType::Shared => "s",
            },
        );
        w.set("key", &self.key);
        match &self.value {
            AttributeValue::Absent => {}
            AttributeValue::Inline(v) => w.set("value", v),
            AttributeValue::Stream => w.flag("stream", true),
        }
        w.flag("deleted", self.deleted);
        if self.last_change != 0 {
            w.dec("last_change", self.last_change);
        }
        w.dec_nonzero("modseq", self.modseq);
    }
}

impl MailChange {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        let change_type = choice(r, "type", r.required("type")?, |b| match b {
            b's' => Some(ChangeType::Save),
            b'e' => Some(ChangeType::Expunge),
            b'f' => Some(ChangeType::FlagChange),
            _ => None,
        })?;
        let keyword_changes = match r.get("keyword_changes") {
            None => Vec::new(),
            Some(v) => split_texts(v)
                .into_iter()
                .filter_map(|entry| {
                    let (&op, keyword) = entry.as_bytes().split_first()?;
                    Some(KeywordChange { op: KeywordOp::from_letter(op)?, keyword: Text::from_wire(keyword) })
                })
                .collect(),
        };
        Ok(Self {
            change_type,
            uid: r.dec_u32("uid")?.ok_or_else(|| r.error("uid", Malformation::MissingRequiredField))?,
            guid: r.text("guid"),
            hdr_hash: r.text("hdr_hash"),
            modseq: r.dec_u64("modseq")?.unwrap_or(0),
            pvt_modseq: r.dec_u64("pvt_modseq")?.unwrap_or(0),
            add_flags: WireFlags(r.hex_u8("add_flags")?.unwrap_or(0)),
            remove_flags: WireFlags(r.hex_u8("remove_flags")?.unwrap_or(0)),
            final_flags: WireFlags(r.hex_u8("final_flags")?.unwrap_or(0)),
            keywords_reset: r.flag("keywords_reset"),
            keyword_changes,
            received_timestamp: r.hex_u64("received_timestamp")?.unwrap_or(0),
            virtual_size: r.hex_u64("virtual_size")?.unwrap_or(0),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.set(
            "type",
            match self.change_type {
                ChangeType::Save => "s",
                ChangeType::Expunge => "e",
                ChangeType::FlagChange => "f",
            },
        );
        w.dec("uid", self.uid);
        w.opt("guid", self.guid.as_ref());
        w.opt("hdr_hash", self.hdr_hash.as_ref());
        w.dec_nonzero("modseq", self.modseq);
        w.dec_nonzero("pvt_modseq", self.pvt_modseq);
        w.hex_nonzero("add_flags", self.add_flags.bits().into());
        w.hex_nonzero("remove_flags", self.remove_flags.bits().into());
        w.hex_nonzero("final_flags", self.final_flags.bits().into());
        w.flag("keywords_reset", self.keywords_reset);
        if !self.keyword_changes.is_empty() {
            let entries = self.keyword_changes.iter().map(|k| {
                let mut e = vec![k.op.letter()];
                e.extend_from_slice(k.keyword.as_bytes());
                e
            });
            w.set("keyword_changes", join_tabescaped(entries));
        }
        w.hex_nonzero("received_timestamp", self.received_timestamp);
        w.hex_nonzero("virtual_size", self.virtual_size);
    }
}

impl MailRequest {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        Ok(Self { guid: r.text("guid"), uid: r.dec_u32("uid")?.unwrap_or(0) })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.opt("guid", self.guid.as_ref());
        w.dec_nonzero("uid", self.uid.into());
    }
}

impl Mail {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        Ok(Self {
            guid: r.text("guid"),
            uid: r.dec_u32("uid")?.unwrap_or(0),
            pop3_uidl: r.text("pop3_uidl"),
            pop3_order: r.dec_u32("pop3_order")?.unwrap_or(0),
            received_date: r.time("received_date")?.unwrap_or(0),
            saved_date: r.time("saved_date")?.unwrap_or(0),
            stream: r.flag("stream"),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.opt("guid", self.guid.as_ref());
        w.dec_nonzero("uid", self.uid.into());
        w.opt("pop3_uidl", self.pop3_uidl.as_ref());
        w.dec_nonzero("pop3_order", self.pop3_order.into());
        if self.received_date > 0 {
            w.dec("received_date", self.received_date);
        }
        if self.saved_date != 0 {
            w.dec("saved_date", self.saved_date);
        }
        w.flag("stream", self.stream);
    }
}

impl Finish {
    fn decode(r: &FieldReader<'_>) -> Result<Self, WireError> {
        Ok(Self {
            error: r.text("error"),
            mail_error: r.dec_i32("mail_error")?.unwrap_or(0),
            require_full_resync: r.flag("require_full_resync"),
        })
    }

    fn encode(&self, w: &mut FieldWriter<'_>) {
        w.opt("error", self.error.as_ref());
        if self.mail_error != 0 {
            w.dec("mail_error", self.mail_error);
        }
        w.flag("require_full_resync", self.require_full_resync);
    }
}
