//! Validated value types of the wire.
//!
//! These are the *wire's* raw types, deliberately separate from `store::types`: the codec must
//! not depend on the store (see `ARCHITECTURE.md`, layers). The brain converts between the two.
//! Every type here can only hold what can be written on the wire and read back unchanged.

use std::fmt;
use std::num::NonZeroU8;
use std::str::FromStr;

use super::error::WireError;

/// A byte string from or for the wire: any bytes except NUL.
///
/// Dovecot keeps every value in a C string, so NUL cannot travel (the decoder cuts values at a
/// NUL exactly as Dovecot does). Values are not necessarily UTF-8: mail GUIDs are Maildir file
/// names and attribute values are arbitrary. Mailbox names and keywords are UTF-8 in practice;
/// [`Text::to_str`] checks.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Text(Vec<u8>);

impl Text {
    /// A text from bytes; fails if they contain NUL.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, WireError> {
        let bytes = bytes.into();
        if bytes.contains(&0) {
            return Err(WireError::Unrepresentable { what: "text", why: "contains a NUL byte" });
        }
        Ok(Self(bytes))
    }

    /// A text from bytes the decoder already cut at NUL.
    pub(crate) fn from_wire(bytes: &[u8]) -> Self {
        debug_assert!(!bytes.contains(&0));
        Self(bytes.to_vec())
    }

    /// The empty text.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The text as UTF-8, if it is.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// True for the empty text.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<&str> for Text {
    type Error = WireError;
    fn try_from(s: &str) -> Result<Self, WireError> {
        Self::new(s)
    }
}

impl TryFrom<String> for Text {
    type Error = WireError;
    fn try_from(s: String) -> Result<Self, WireError> {
        Self::new(s)
    }
}

impl TryFrom<&[u8]> for Text {
    type Error = WireError;
    fn try_from(s: &[u8]) -> Result<Self, WireError> {
        Self::new(s)
    }
}

impl TryFrom<Vec<u8>> for Text {
    type Error = WireError;
    fn try_from(s: Vec<u8>) -> Result<Self, WireError> {
        Self::new(s)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// A 128-bit GUID (mailbox GUIDs, expunged-mail GUIDs, deleted-name hashes).
///
/// Wire form: 32 hex digits (`guid_128_to_string`). We write lowercase and, like Dovecot's
/// `guid_128_from_string`, read either case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid128([u8; 16]);

impl Guid128 {
    /// The all-zero GUID, Dovecot's "no GUID".
    pub const EMPTY: Self = Self([0; 16]);

    /// A GUID from its 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// True for the all-zero GUID.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parse exactly 32 hex digits.
    pub fn parse_hex(s: &[u8]) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let hi = char::from(*pair.first()?).to_digit(16)?;
            let lo = char::from(*pair.get(1)?).to_digit(16)?;
            *byte = u8::try_from(hi << 4 | lo).ok()?;
        }
        Some(Self(out))
    }

    /// The 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Guid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Guid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid128({self})")
    }
}

impl FromStr for Guid128 {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, WireError> {
        Self::parse_hex(s.as_bytes()).ok_or(WireError::Unrepresentable { what: "GUID", why: "not 32 hex digits" })
    }
}

/// A mailbox hierarchy separator (`D.hierarchy_sep`): exactly one byte, not NUL.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HierarchySep(NonZeroU8);

impl HierarchySep {
    /// A separator from a byte; `None` for NUL.
    pub fn new(b: u8) -> Option<Self> {
        NonZeroU8::new(b).map(Self)
    }

    /// The byte.
    pub fn get(self) -> u8 {
        self.0.get()
    }
}

impl fmt::Debug for HierarchySep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HierarchySep({:?})", char::from(self.get()))
    }
}

/// A mailbox name as `N.name` carries it: the hierarchy components, unescaped, without any
/// separator (namespace prefix components included).
///
/// Wire form: components tab-escaped and joined by TAB, then escaped again as the field. At
/// least one component; a single empty component would be the empty name, which Dovecot
/// refuses ("Empty name").
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MailboxPath(Vec<Text>);

impl MailboxPath {
    /// A path from its components.
    pub fn new(components: Vec<Text>) -> Result<Self, WireError> {
        match components.as_slice() {
            [] => Err(WireError::Unrepresentable { what: "mailbox name", why: "has no components" }),
            [only] if only.is_empty() => Err(WireError::Unrepresentable { what: "mailbox name", why: "is empty" }),
            _ => Ok(Self(components)),
        }
    }

    /// The components.
    pub fn components(&self) -> &[Text] {
        &self.0
    }

    /// The components, owned.
    pub fn into_components(self) -> Vec<Text> {
        self.0
    }
}

impl fmt::Debug for MailboxPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

/// The namespace prefixes of `H.sync_ns_prefix` (`doveadm sync -n`).
///
/// Wire form: prefixes joined by LF (no escaping inside; a prefix cannot contain LF). The empty
/// value means one empty prefix (Dovecot's "ugly workaround for strsplit API"), so the list is
/// never empty.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NsPrefixes(Vec<Text>);

impl NsPrefixes {
    /// Prefixes from a list; fails for an empty list or a prefix containing LF.
    pub fn new(prefixes: Vec<Text>) -> Result<Self, WireError> {
        if prefixes.is_empty() {
            return Err(WireError::Unrepresentable { what: "namespace prefixes", why: "the list is empty" });
        }
        if prefixes.iter().any(|p| p.as_bytes().contains(&b'\n')) {
            return Err(WireError::Unrepresentable { what: "namespace prefix", why: "contains LF" });
        }
        Ok(Self(prefixes))
    }

    /// The prefixes.
    pub fn prefixes(&self) -> &[Text] {
        &self.0
    }

    pub(crate) fn decode(value: &[u8]) -> Self {
        Self(value.split(|&b| b == b'\n').map(Text::from_wire).collect())
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        self.0.iter().map(Text::as_bytes).collect::<Vec<_>>().join(&b'\n')
    }
}

/// `H.sync_type`: how much the master wants to exchange.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum SyncType {
    /// `f`: every mailbox, every mail (`doveadm sync -f`).
    Full,
    /// `c`: mailboxes whose status changed (the default).
    Changed,
    /// `s`: incremental from a saved state (`-s <state>`).
    State,
}

impl SyncType {
    pub(crate) fn letter(self) -> u8 {
        match self {
            Self::Full => b'f',
            Self::Changed => b'c',
            Self::State => b's',
        }
    }

    pub(crate) fn from_letter(b: u8) -> Option<Self> {
        match b {
            b'f' => Some(Self::Full),
            b'c' => Some(Self::Changed),
            b's' => Some(Self::State),
            _ => None,
        }
    }
}

/// `N.existence`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Existence {
    /// `n`: a filler parent or a subscription-only name.
    Nonexistent,
    /// `y`: the mailbox or directory exists.
    Exists,
    /// `d`: deleted (2.3.19 never sends it; it exists in Dovecot's enum).
    Deleted,
}

impl Existence {
    pub(crate) fn letter(self) -> u8 {
        match self {
            Self::Nonexistent => b'n',
            Self::Exists => b'y',
            Self::Deleted => b'd',
        }
    }

    /// Dovecot's reader switches on the first byte with no default branch, so anything else
    /// (even the empty value) leaves the zero value, "nonexistent". We read it the same way.
    pub(crate) fn from_value(v: &[u8]) -> Self {
        match v.first() {
            Some(b'y') => Self::Exists,
            Some(b'd') => Self::Deleted,
            _ => Self::Nonexistent,
        }
    }
}

/// How a cache field is kept (`c.decision`, `enum mail_cache_decision_type`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum CacheDecisionKind {
    /// `n`: not cached.
    No,
    /// `t`: cached for a while.
    Temp,
    /// `y`: cached permanently.
    Yes,
}

/// `c.decision`: the kind plus Dovecot's "forced" bit (a trailing `F`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct CacheDecision {
    /// The decision.
    pub kind: CacheDecisionKind,
    /// Set by configuration, not by usage.
    pub forced: bool,
}

impl CacheDecision {
    pub(crate) fn encode(self) -> Vec<u8> {
        let mut v = vec![match self.kind {
            CacheDecisionKind::No => b'n',
            CacheDecisionKind::Temp => b't',
            CacheDecisionKind::Yes => b'y',
        }];
        if self.forced {
            v.push(b'F');
        }
        v
    }

    /// First byte `n`/`t`/`y`, `F` as second byte for "forced"; anything later is ignored
    /// (as in `parse_cache_field`).
    pub(crate) fn decode(v: &[u8]) -> Option<Self> {
        let kind = match v.first()? {
            b'n' => CacheDecisionKind::No,
            b't' => CacheDecisionKind::Temp,
            b'y' => CacheDecisionKind::Yes,
            _ => return None,
        };
        Some(Self { kind, forced: v.get(1) == Some(&b'F') })
    }
}

/// `A.type`: which IMAP METADATA tree the attribute lives in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum AttributeType {
    /// `p`: `/private`.
    Private,
    /// `s`: `/shared`.
    Shared,
}

/// `C.type`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ChangeType {
    /// `s`: the mail exists and is new to the peer (or this is a full export).
    Save,
    /// `e`: the mail was expunged.
    Expunge,
    /// `f`: the mail's flags or keywords changed.
    FlagChange,
}

/// The operation of one keyword change (`KEYWORD_CHANGE_*` in `dsync-mail.h`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum KeywordOp {
    /// `+`: added since the last common modseq.
    Add,
    /// `-`: removed since then.
    Remove,
    /// `=`: present now, unchanged.
    Final,
    /// `&`: added and present now.
    AddAndFinal,
}

impl KeywordOp {
    pub(crate) fn letter(self) -> u8 {
        match self {
            Self::Add => b'+',
            Self::Remove => b'-',
            Self::Final => b'=',
            Self::AddAndFinal => b'&',
        }
    }

    pub(crate) fn from_letter(b: u8) -> Option<Self> {
        match b {
            b'+' => Some(Self::Add),
            b'-' => Some(Self::Remove),
            b'=' => Some(Self::Final),
            b'&' => Some(Self::AddAndFinal),
            _ => None,
        }
    }
}

/// One entry of `C.keyword_changes`: an operation and a keyword (`+$Label1`, `&$Important`).
#[derive(Clone, PartialEq, Eq, Debug, Hash)]
pub struct KeywordChange {
    /// What happened to the keyword.
    pub op: KeywordOp,
    /// The keyword.
    pub keyword: Text,
}

/// The system-flag bit mask of `C.add_flags` / `remove_flags` / `final_flags`
/// (`enum mail_flags`), hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WireFlags(pub u8);

impl WireFlags {
    /// `\Answered`.
    pub const ANSWERED: u8 = 0x01;
    /// `\Flagged`.
    pub const FLAGGED: u8 = 0x02;
    /// `\Deleted`.
    pub const DELETED: u8 = 0x04;
    /// `\Seen`.
    pub const SEEN: u8 = 0x08;
    /// `\Draft`.
    pub const DRAFT: u8 = 0x10;
    /// `\Recent`: Dovecot includes it in `final_flags`; importers ignore it.
    pub const RECENT: u8 = 0x20;

    /// The bits.
    pub fn bits(self) -> u8 {
        self.0
    }
}

impl fmt::Debug for WireFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireFlags({:#04x})", self.0)
    }
}

/// A piece of a mail or attribute body. Its `Debug` output shows only the length, so mail
/// content never ends up in logs by accident; [`BodyChunk::declassify`] gets the bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BodyChunk(Vec<u8>);

impl BodyChunk {
    /// Wrap bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The content bytes.
    pub fn declassify(&self) -> &[u8] {
        &self.0
    }

    /// The content bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for BodyChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BodyChunk({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_hex() {
        let g = Guid128::parse_hex(b"7a78240e5db30a6b9767000083ecc375").unwrap();
        assert_eq!(g.to_string(), "7a78240e5db30a6b9767000083ecc375");
        assert_eq!(Guid128::parse_hex(b"7A78240E5DB30A6B9767000083ECC375"), Some(g));
        assert_eq!(Guid128::parse_hex(b"7a78240e5db30a6b9767000083ecc37"), None);
        assert_eq!(Guid128::parse_hex(b"7a78240e5db30a6b9767000083ecc37g"), None);
        assert_eq!(Guid128::parse_hex("é8240e5db30a6b9767000083ecc375".as_bytes()), None);
    }

    #[test]
    fn text_refuses_nul() {
        assert!(Text::new(&b"a\0b"[..]).is_err());
        assert_eq!(Text::try_from("INBOX").unwrap().to_str(), Some("INBOX"));
        assert_eq!(format!("{:?}", Text::try_from("a\tb").unwrap()), "\"a\\tb\"");
    }

    #[test]
    fn mailbox_path_invariants() {
        let t = |s: &str| Text::try_from(s).unwrap();
        assert!(MailboxPath::new(vec![]).is_err());
        assert!(MailboxPath::new(vec![t("")]).is_err());
        assert!(MailboxPath::new(vec![t(""), t("")]).is_ok());
        assert!(MailboxPath::new(vec![t("INBOX")]).is_ok());
    }

    #[test]
    fn ns_prefixes() {
        let t = |s: &str| Text::try_from(s).unwrap();
        assert!(NsPrefixes::new(vec![]).is_err());
        assert!(NsPrefixes::new(vec![t("a\nb")]).is_err());
        assert_eq!(NsPrefixes::decode(b""), NsPrefixes(vec![t("")]));
        assert_eq!(NsPrefixes::decode(b"a\n"), NsPrefixes(vec![t("a"), t("")]));
        assert_eq!(NsPrefixes::new(vec![t(""), t("shared/")]).unwrap().encode(), b"\nshared/");
    }

    #[test]
    fn body_chunk_debug_hides_content() {
        assert_eq!(format!("{:?}", BodyChunk::new(b"secret".to_vec())), "BodyChunk(6 bytes)");
    }
}
