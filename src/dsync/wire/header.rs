//! Record types, the VERSION line and the header block.
//!
//! Each side starts with `VERSION<TAB>dsync<TAB>3<TAB>5`, then one header line per record type
//! naming, in order, the fields it will send for that type, then `.`. Everything afterwards is
//! decoded **by the peer's header** (by name, in the peer's order) and encoded with our own.
//! That indirection is how Dovecot versions add or drop optional fields without breaking each
//! other (2.4 dropped `import_commit_msgs_interval` from `H`), so we keep it exact:
//! unknown keys and unknown header lines are ignored, required keys are enforced per type, and
//! a type's header may only be missing if the peer's minor version predates that type.

use std::fmt;

use super::error::{Incompatibility, Malformation, WireError};
use super::escape::{join_tabescaped, split_tabescaped};
use super::fields::parse_decimal;

/// The protocol major version we speak; a peer with another major is refused.
pub const PROTOCOL_MAJOR: u32 = 3;
/// The protocol minor version we announce (Dovecot 2.3.x sends 3.5).
pub const PROTOCOL_MINOR: u32 = 5;

/// Minor version from which `A` (attribute) records and their list end exist.
pub const MINOR_HAVE_ATTRIBUTES: u32 = 1;
/// Minor version from which `B.have_save_guids` is explicit (below it is implied by `have_guids`).
pub const MINOR_HAVE_SAVE_GUID: u32 = 2;
/// Minor version from which the `F` (finish) record exists.
pub const MINOR_HAVE_FINISH: u32 = 3;

/// A record type: the first byte of a record line.
///
/// Kept open (a byte, not a closed enum) because the header block may name types we do not
/// know; those header lines are ignored, as Dovecot does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemType(u8);

impl ItemType {
    /// `X`: "done, I am closing" (no fields, no header).
    pub const DONE: Self = Self(b'X');
    /// `H`: handshake settings.
    pub const HANDSHAKE: Self = Self(b'H');
    /// `S`: per-mailbox sync state.
    pub const MAILBOX_STATE: Self = Self(b'S');
    /// `N`: one mailbox tree node.
    pub const MAILBOX_NODE: Self = Self(b'N');
    /// `D`: deleted mailboxes, directories and subscriptions.
    pub const MAILBOX_DELETES: Self = Self(b'D');
    /// `B`: a mailbox's status, opening its per-mailbox exchange.
    pub const MAILBOX: Self = Self(b'B');
    /// `A`: a mailbox attribute (IMAP METADATA).
    pub const ATTRIBUTE: Self = Self(b'A');
    /// `C`: a mail change (save, expunge, flag change).
    pub const MAIL_CHANGE: Self = Self(b'C');
    /// `R`: a request for a mail body.
    pub const MAIL_REQUEST: Self = Self(b'R');
    /// `M`: a mail, usually followed by its body.
    pub const MAIL: Self = Self(b'M');
    /// `F`: the slave's final result.
    pub const FINISH: Self = Self(b'F');
    /// `c`: a cache field decision, only nested inside `B.cache_fields`.
    pub const CACHE_FIELD: Self = Self(b'c');

    /// The type for a record-type byte.
    pub const fn from_byte(b: u8) -> Self {
        Self(b)
    }

    /// The record-type byte.
    pub const fn as_byte(self) -> u8 {
        self.0
    }

    /// Dovecot's name for the type (`items[].name`), for known types.
    pub fn name(self) -> Option<&'static str> {
        spec(self).map(|s| s.name)
    }

    /// The required keys of a known type, in Dovecot's order.
    pub fn required_keys(self) -> &'static [&'static str] {
        spec(self).map_or(&[], |s| s.required)
    }
}

impl fmt::Display for ItemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() { write!(f, "{}", char::from(self.0)) } else { write!(f, "{:?}", self.0) }
    }
}

impl fmt::Debug for ItemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemType({self})")
    }
}

/// One row of Dovecot's `items[]` table (`dsync-ibc-stream.c`).
pub(crate) struct ItemSpec {
    pub(crate) item: ItemType,
    pub(crate) name: &'static str,
    pub(crate) required: &'static [&'static str],
    pub(crate) optional: &'static [&'static str],
    pub(crate) min_minor: u32,
}

/// The types that have header lines, in the order Dovecot sends them (`H S N D B A C R M F c`).
pub(crate) static SPECS: [ItemSpec; 11] = [
    ItemSpec {
        item: ItemType::HANDSHAKE,
        name: "handshake",
        required: &["hostname"],
        optional: &[
            "sync_ns_prefix",
            "sync_box",
            "sync_box_guid",
            "sync_type",
            "debug",
            "sync_visible_namespaces",
            "exclude_mailboxes",
            "send_mail_requests",
            "backup_send",
            "backup_recv",
            "lock_timeout",
            "no_mail_sync",
            "no_backup_overwrite",
            "purge_remote",
            "no_notify",
            "sync_since_timestamp",
            "sync_max_size",
            "sync_flags",
            "sync_until_timestamp",
            "virtual_all_box",
            "empty_hdr_workaround",
            "import_commit_msgs_interval",
            "hashed_headers",
            "alt_char",
        ],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAILBOX_STATE,
        name: "mailbox_state",
        required: &[
            "mailbox_guid",
            "last_uidvalidity",
            "last_common_uid",
            "last_common_modseq",
            "last_common_pvt_modseq",
        ],
        optional: &["last_messages_count", "changes_during_sync"],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAILBOX_NODE,
        name: "mailbox_tree_node",
        required: &["name", "existence"],
        optional: &[
            "mailbox_guid",
            "uid_validity",
            "uid_next",
            "last_renamed_or_created",
            "subscribed",
            "last_subscription_change",
        ],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAILBOX_DELETES,
        name: "mailbox_delete",
        required: &["hierarchy_sep"],
        optional: &["escape_char", "mailboxes", "dirs", "unsubscribes"],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAILBOX,
        name: "mailbox",
        required: &[
            "mailbox_guid",
            "uid_validity",
            "uid_next",
            "messages_count",
            "first_recent_uid",
            "highest_modseq",
            "highest_pvt_modseq",
        ],
        optional: &[
            "mailbox_lost",
            "mailbox_ignore",
            "cache_fields",
            "have_guids",
            "have_save_guids",
            "have_only_guid128",
        ],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::ATTRIBUTE,
        name: "mailbox_attribute",
        required: &["type", "key"],
        optional: &["value", "stream", "deleted", "last_change", "modseq"],
        min_minor: MINOR_HAVE_ATTRIBUTES,
    },
    ItemSpec {
        item: ItemType::MAIL_CHANGE,
        name: "mail_change",
        required: &["type", "uid"],
        optional: &[
            "guid",
            "hdr_hash",
            "modseq",
            "pvt_modseq",
            "add_flags",
            "remove_flags",
            "final_flags",
            "keywords_reset",
            "keyword_changes",
            "received_timestamp",
            "virtual_size",
        ],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAIL_REQUEST,
        name: "mail_request",
        required: &[],
        optional: &["guid", "uid"],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::MAIL,
        name: "mail",
        required: &[],
        optional: &["guid", "uid", "pop3_uidl", "pop3_order", "received_date", "saved_date", "stream"],
        min_minor: 0,
    },
    ItemSpec {
        item: ItemType::FINISH,
        name: "finish",
        required: &[],
        optional: &["error", "mail_error", "require_full_resync"],
        min_minor: MINOR_HAVE_FINISH,
    },
    ItemSpec {
        item: ItemType::CACHE_FIELD,
        name: "mailbox_cache_field",
        required: &["name", "decision"],
        optional: &["last_used"],
        min_minor: 0,
    },
];

/// The spec row of a type that has a header, if we know it.
pub(crate) fn spec(item: ItemType) -> Option<&'static ItemSpec> {
    SPECS.iter().find(|s| s.item == item)
}

/// The ordered field names one side declared for one record type.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemHeader {
    keys: Vec<Vec<u8>>,
}

impl ItemHeader {
    /// A header with the given keys, in order.
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<Vec<u8>>,
    {
        Self { keys: keys.into_iter().map(Into::into).collect() }
    }

    /// Dovecot 2.3.19's own header for a known type: required keys, then optional keys.
    pub fn dovecot(item: ItemType) -> Option<Self> {
        spec(item).map(|s| Self::new(s.required.iter().chain(s.optional).map(|k| k.as_bytes())))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &[u8]> + ExactSizeIterator {
        self.keys.iter().map(Vec::as_slice)
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the header declares no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The index of `key`; the first occurrence wins, as in Dovecot's `field_find`.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.keys.iter().position(|k| k == key.as_bytes())
    }
}

/// All header lines of one side, in the order they were declared.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Headers {
    entries: Vec<(ItemType, ItemHeader)>,
}

impl Headers {
    /// No headers at all (the decoder fills them in as they arrive).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The headers we send: Dovecot 2.3.19's key order for all eleven types, in its order.
    pub fn ours() -> Self {
        let entries = SPECS.iter().filter_map(|s| ItemHeader::dovecot(s.item).map(|header| (s.item, header))).collect();
        Self { entries }
    }

    /// The header of one type, if declared.
    pub fn get(&self, item: ItemType) -> Option<&ItemHeader> {
        self.entries.iter().find(|(t, _)| *t == item).map(|(_, h)| h)
    }

    /// Declare (or re-declare: the last declaration wins, as in Dovecot) one type's header.
    pub fn insert(&mut self, item: ItemType, header: ItemHeader) {
        match self.entries.iter_mut().find(|(t, _)| *t == item) {
            Some(entry) => entry.1 = header,
            None => self.entries.push((item, header)),
        }
    }

    /// All declared headers in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (ItemType, &ItemHeader)> {
        self.entries.iter().map(|(t, h)| (*t, h))
    }

    /// Append the header block (one line per type, then `.`) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (item, header) in &self.entries {
            out.push(item.as_byte());
            out.extend_from_slice(&join_tabescaped(header.keys()));
            out.push(b'\n');
        }
        out.extend_from_slice(b".\n");
    }

    /// Parse one header line of the peer and record it. Lines of types we do not know are
    /// ignored; a known type must declare all its required keys.
    pub(crate) fn accept_line(&mut self, line: &[u8]) -> Result<(), WireError> {
        let Some((&first, rest)) = line.split_first() else { return Ok(()) };
        let item = ItemType::from_byte(first);
        let Some(spec) = spec(item) else { return Ok(()) };
        let header = ItemHeader::new(split_tabescaped(rest));
        if let Some(key) = spec.required.iter().find(|k| header.position(k).is_none()) {
            return Err(WireError::incompatible(Incompatibility::HeaderLacksRequiredKey { item, key }));
        }
        self.insert(item, header);
        Ok(())
    }

    /// At the end of the header block: every type the peer's minor version knows must have
    /// been declared.
    pub(crate) fn check_complete(&self, peer_minor: u32) -> Result<(), WireError> {
        match SPECS.iter().find(|s| s.min_minor <= peer_minor && self.get(s.item).is_none()) {
            Some(s) => Err(WireError::incompatible(Incompatibility::MissingHeader(s.item))),
            None => Ok(()),
        }
    }
}

/// Append our VERSION line (`VERSION<TAB>dsync<TAB>3<TAB>5<LF>`) to `out`.
pub fn encode_version_line(out: &mut Vec<u8>) {
    out.extend_from_slice(format!("VERSION\tdsync\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}\n").as_bytes());
}

/// Parse the peer's VERSION line (without LF) and return its minor version.
///
/// Like Dovecot's `version_string_verify_full`: exactly the prefix `VERSION<TAB>dsync<TAB>`,
/// a major equal to 3 and a decimal minor that runs to the end of the line.
pub fn parse_version_line(line: &[u8]) -> Result<u32, WireError> {
    let malformed = |p| WireError::malformed(None, None, p);
    let Some(rest) = line.strip_prefix(b"VERSION\t") else {
        return Err(malformed(Malformation::NotVersionLine));
    };
    let Some(rest) = rest.strip_prefix(b"dsync\t") else {
        return Err(WireError::incompatible(Incompatibility::NotDsync(String::from_utf8_lossy(line).into_owned())));
    };
    let Some(tab) = rest.iter().position(|&b| b == b'\t') else {
        return Err(malformed(Malformation::BadVersionNumber));
    };
    let (major, minor) = (rest.get(..tab).unwrap_or_default(), rest.get(tab + 1..).unwrap_or_default());
    let major = parse_decimal(major).ok_or_else(|| malformed(Malformation::BadVersionNumber))?;
    let minor = parse_decimal(minor)
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| malformed(Malformation::BadVersionNumber))?;
    if major != u64::from(PROTOCOL_MAJOR) {
        return Err(WireError::incompatible(Incompatibility::MajorVersion(major)));
    }
    Ok(minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_header_block_matches_dovecot_bytes() {
        let mut out = Vec::new();
        encode_version_line(&mut out);
        Headers::ours().encode(&mut out);
        let expected = concat!(
            "VERSION\tdsync\t3\t5\n",
            "Hhostname\tsync_ns_prefix\tsync_box\tsync_box_guid\tsync_type\tdebug\tsync_visible_namespaces\t",
            "exclude_mailboxes\tsend_mail_requests\tbackup_send\tbackup_recv\tlock_timeout\tno_mail_sync\t",
            "no_backup_overwrite\tpurge_remote\tno_notify\tsync_since_timestamp\tsync_max_size\tsync_flags\t",
            "sync_until_timestamp\tvirtual_all_box\tempty_hdr_workaround\timport_commit_msgs_interval\t",
            "hashed_headers\talt_char\n",
            "Smailbox_guid\tlast_uidvalidity\tlast_common_uid\tlast_common_modseq\tlast_common_pvt_modseq\t",
            "last_messages_count\tchanges_during_sync\n",
            "Nname\texistence\tmailbox_guid\tuid_validity\tuid_next\tlast_renamed_or_created\tsubscribed\t",
            "last_subscription_change\n",
            "Dhierarchy_sep\tescape_char\tmailboxes\tdirs\tunsubscribes\n",
            "Bmailbox_guid\tuid_validity\tuid_next\tmessages_count\tfirst_recent_uid\thighest_modseq\t",
            "highest_pvt_modseq\tmailbox_lost\tmailbox_ignore\tcache_fields\thave_guids\thave_save_guids\t",
            "have_only_guid128\n",
            "Atype\tkey\tvalue\tstream\tdeleted\tlast_change\tmodseq\n",
            "Ctype\tuid\tguid\thdr_hash\tmodseq\tpvt_modseq\tadd_flags\tremove_flags\tfinal_flags\t",
            "keywords_reset\tkeyword_changes\treceived_timestamp\tvirtual_size\n",
            "Rguid\tuid\n",
            "Mguid\tuid\tpop3_uidl\tpop3_order\treceived_date\tsaved_date\tstream\n",
            "Ferror\tmail_error\trequire_full_resync\n",
            "cname\tdecision\tlast_used\n",
            ".\n",
        );
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    #[test]
    fn version_line() {
        assert_eq!(parse_version_line(b"VERSION\tdsync\t3\t5"), Ok(5));
        assert_eq!(parse_version_line(b"VERSION\tdsync\t3\t0"), Ok(0));
        assert_eq!(parse_version_line(b"VERSION\tdsync\t3\t17"), Ok(17));
        assert!(matches!(
            parse_version_line(b"VERSION\tdsync\t4\t0"),
            Err(WireError::Incompatible { problem: Incompatibility::MajorVersion(4), .. })
        ));
        assert!(matches!(
            parse_version_line(b"VERSION\tdoveadm-server\t1\t2"),
            Err(WireError::Incompatible { problem: Incompatibility::NotDsync(_), .. })
        ));
        for bad in [&b"VERSION\tdsync\t3\t5x"[..], b"VERSION\tdsync\t3", b"VERSION\tdsync\t3\t", b"hello", b""] {
            assert!(matches!(parse_version_line(bad), Err(WireError::Malformed { .. })), "{bad:?}");
        }
    }

    #[test]
    fn header_lines_unknown_and_required() {
        let mut h = Headers::empty();
        // Unknown type letters and empty lines are ignored.
        h.accept_line(b"Zfoo\tbar").unwrap();
        h.accept_line(b"").unwrap();
        assert!(h.get(ItemType::from_byte(b'Z')).is_none());
        // Unknown keys are fine, required ones must be there.
        h.accept_line(b"Rwhatever\tguid").unwrap();
        assert_eq!(h.get(ItemType::MAIL_REQUEST).and_then(|r| r.position("guid")), Some(1));
        let err = h.accept_line(b"Ssomething\tmailbox_guid").unwrap_err();
        assert!(matches!(
            err,
            WireError::Incompatible {
                problem: Incompatibility::HeaderLacksRequiredKey {
                    item: ItemType::MAILBOX_STATE,
                    key: "last_uidvalidity"
                },
                ..
            }
        ));
    }

    #[test]
    fn missing_headers_depend_on_minor() {
        let mut h = Headers::ours();
        h.entries.retain(|(t, _)| *t != ItemType::ATTRIBUTE && *t != ItemType::FINISH);
        assert!(h.check_complete(0).is_ok());
        assert!(matches!(
            h.check_complete(1),
            Err(WireError::Incompatible { problem: Incompatibility::MissingHeader(ItemType::ATTRIBUTE), .. })
        ));
        assert!(h.check_complete(5).is_err());
        assert!(Headers::ours().check_complete(5).is_ok());
    }

    #[test]
    fn duplicate_key_first_wins_duplicate_line_last_wins() {
        let header = ItemHeader::new(["uid", "guid", "uid"]);
        assert_eq!(header.position("uid"), Some(0));
        let mut h = Headers::empty();
        h.accept_line(b"Rguid").unwrap();
        h.accept_line(b"Ruid\tguid").unwrap();
        assert_eq!(h.get(ItemType::MAIL_REQUEST).and_then(|r| r.position("guid")), Some(1));
    }
}
