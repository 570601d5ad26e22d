//! Value types shared by every mail store and by the sync engine.
//!
//! Each type validates on construction, so code that holds one never has to check it again
//! ("parse, don't validate"). Wire and disk formats live elsewhere; these are the meanings.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use sha1::{Digest, Sha1};

/// A 128-bit GUID: mailbox GUIDs, and the 128-bit form of mail GUIDs used in expunge records.
///
/// Dovecot writes them as 32 lowercase hex digits (`guid_128_to_string`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid128(pub [u8; 16]);

impl Guid128 {
    /// The all-zero GUID, which Dovecot treats as "no GUID".
    pub const EMPTY: Self = Self([0; 16]);

    /// True for the all-zero GUID.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random GUID (never all-zero).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        crate::sys::random_bytes(&mut bytes);
        if bytes == [0; 16] {
            bytes[0] = 1;
        }
        Self(bytes)
    }

    /// The 128-bit form of a mail GUID string, as Dovecot's `mail_generate_guid_128_hash`
    /// computes it: a 32-hex-digit GUID is taken as is, anything else is the last 16 bytes
    /// of the SHA-1 of the string. Expunge records carry this form.
    pub fn from_mail_guid(guid: &str) -> Self {
        if let Ok(g) = guid.parse::<Self>() {
            return g;
        }
        let digest = Sha1::digest(guid.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[4..20]);
        Self(out)
    }

    /// The first 16 bytes of SHA-1 of a string: how dsync names deleted directories and
    /// unsubscriptions (`mailbox_name_get_sha128`).
    pub fn sha128(data: &[u8]) -> Self {
        let digest = Sha1::digest(data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        Self(out)
    }
}

impl fmt::Display for Guid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid128({self})")
    }
}

/// Error for a GUID that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 128-bit GUID (32 hex digits): {0:?}")]
pub struct BadGuid(pub String);

impl FromStr for Guid128 {
    type Err = BadGuid;
    fn from_str(s: &str) -> Result<Self, BadGuid> {
        let b = s.as_bytes();
        if b.len() != 32 {
            return Err(BadGuid(s.to_owned()));
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| BadGuid(s.to_owned()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| BadGuid(s.to_owned()))?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// An IMAP UID: never zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(NonZeroU32);

impl Uid {
    /// The smallest UID.
    pub const MIN: Self = Self(NonZeroU32::MIN);

    /// `None` for zero.
    pub fn new(v: u32) -> Option<Self> {
        NonZeroU32::new(v).map(Self)
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The next UID, or `None` at the top of the range.
    pub fn next(self) -> Option<Self> {
        self.0.get().checked_add(1).and_then(Self::new)
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", self.0)
    }
}

/// IMAP system flags, with the bit values dsync puts on the wire (`enum mail_flags`).
/// `\Recent` (0x20) is a session property and is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// `\Answered`
    pub const ANSWERED: Self = Self(0x01);
    /// `\Flagged`
    pub const FLAGGED: Self = Self(0x02);
    /// `\Deleted`
    pub const DELETED: Self = Self(0x04);
    /// `\Seen`
    pub const SEEN: Self = Self(0x08);
    /// `\Draft`
    pub const DRAFT: Self = Self(0x10);
    /// `\Recent`: only ever reported, never stored.
    pub const RECENT: Self = Self(0x20);
    /// The storable flags.
    pub const ALL_STORED: Self = Self(0x1f);
    /// No flags.
    pub const NONE: Self = Self(0);

    /// From wire bits; bits above `\Recent` are dropped.
    pub fn from_bits_truncate(bits: u8) -> Self {
        Self(bits & 0x3f)
    }

    /// The wire bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// True if every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// No flag set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags that can be stored (without `\Recent`).
    pub fn stored(self) -> Self {
        Self(self.0 & Self::ALL_STORED.0)
    }

    /// IMAP names, in Dovecot's order (`\Answered \Flagged \Deleted \Seen \Draft \Recent`).
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        const NAMES: [(u8, &str); 6] = [
            (0x01, "\\Answered"),
            (0x02, "\\Flagged"),
            (0x04, "\\Deleted"),
            (0x08, "\\Seen"),
            (0x10, "\\Draft"),
            (0x20, "\\Recent"),
        ];
        NAMES.into_iter().filter(move |(bit, _)| self.0 & bit != 0).map(|(_, n)| n)
    }

    /// Parses one IMAP system flag name (case-insensitive), `None` if it is not one.
    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase();
        Some(match n.as_str() {
            "\\answered" => Self::ANSWERED,
            "\\flagged" => Self::FLAGGED,
            "\\deleted" => Self::DELETED,
            "\\seen" => Self::SEEN,
            "\\draft" => Self::DRAFT,
            "\\recent" => Self::RECENT,
            _ => return None,
        })
    }
}

impl std::ops::BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}
impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}
impl std::ops::BitAnd for Flags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}
impl std::ops::Not for Flags {
    type Output = Self;
    fn not(self) -> Self {
        Self(!self.0 & 0x3f)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({:#04x})", self.0)
    }
}

/// An IMAP keyword (a flag without a backslash), e.g. `$Junk`.
///
/// Grammar: 1..=255 bytes of printable ASCII or UTF-8, no space, no control characters,
/// none of `( ) { % * " \ ]`, and not starting with `\`. Dovecot's keyword file stores one per
/// line after a space, so spaces and newlines must never reach it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Keyword(String);

/// Error for a keyword that breaks the grammar of [`Keyword`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid keyword {0:?}")]
pub struct BadKeyword(pub String);

impl Keyword {
    /// Validates a keyword.
    pub fn new(s: &str) -> Result<Self, BadKeyword> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && !s.starts_with('\\')
            && s.chars().all(|c| !c.is_control() && !matches!(c, ' ' | '(' | ')' | '{' | '%' | '*' | '"' | '\\' | ']'));
        if ok { Ok(Self(s.to_owned())) } else { Err(BadKeyword(s.to_owned())) }
    }

    /// The keyword text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Keyword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Keyword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyword({:?})", self.0)
    }
}

/// A modification sequence number (CONDSTORE). 0 means "none".
pub type Modseq = u64;

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

/// A mailbox name as a list of hierarchy components, without any separator.
///
/// This is what dsync puts on the wire (`N.name`) and what every layout maps to its own
/// directory names. Components are non-empty, contain no control characters and no `/`,
/// and are neither `.` nor `..`, so no component can ever climb out of the mail root.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxName(Vec<String>);

/// Why a mailbox name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mailbox name {name:?}: {reason}")]
pub struct BadMailboxName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl MailboxName {
    /// The INBOX.
    pub fn inbox() -> Self {
        Self(vec!["INBOX".to_owned()])
    }

    /// Builds a name from components, validating each.
    pub fn from_components<I, S>(parts: I) -> Result<Self, BadMailboxName>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let parts: Vec<String> = parts.into_iter().map(Into::into).collect();
        let joined = || parts.join("/");
        if parts.is_empty() {
            return Err(BadMailboxName { name: String::new(), reason: "empty name" });
        }
        for p in &parts {
            let reason = if p.is_empty() {
                Some("empty hierarchy level")
            } else if p == "." || p == ".." {
                Some("`.` or `..` as a hierarchy level")
            } else if p.contains('/') {
                Some("contains `/`")
            } else if p.chars().any(char::is_control) {
                Some("contains a control character")
            } else if p.len() > 255 {
                Some("a hierarchy level longer than 255 bytes")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(BadMailboxName { name: joined(), reason });
            }
        }
        let mut parts = parts;
        if parts.len() == 1 && parts[0].eq_ignore_ascii_case("INBOX") {
            parts[0] = "INBOX".to_owned();
        }
        Ok(Self(parts))
    }

    /// Parses a name written with the hierarchy separator `sep` (as an admin types it).
    /// `INBOX` in any case is the INBOX.
    pub fn parse(s: &str, sep: char) -> Result<Self, BadMailboxName> {
        let name = Self::from_components(s.split(sep)).map_err(|mut e| {
            e.name = s.to_owned();
            e
        })?;
        Ok(name)
    }

    /// The hierarchy components.
    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// True for the INBOX.
    pub fn is_inbox(&self) -> bool {
        self.0.len() == 1 && self.0[0] == "INBOX"
    }

    /// The name written with the separator `sep`.
    pub fn join(&self, sep: char) -> String {
        let mut s = String::new();
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(sep);
            }
            s.push_str(p);
        }
        s
    }

    /// The parent name, `None` at the top level.
    pub fn parent(&self) -> Option<Self> {
        if self.0.len() > 1 { Some(Self(self.0[..self.0.len() - 1].to_vec())) } else { None }
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &Self) -> bool {
        self.0.starts_with(&other.0)
    }

    /// Replaces the prefix `from` by `to` (for renames of whole subtrees).
    pub fn rebase(&self, from: &Self, to: &Self) -> Option<Self> {
        if !self.starts_with(from) {
            return None;
        }
        let mut parts = to.0.clone();
        parts.extend_from_slice(&self.0[from.0.len()..]);
        Some(Self(parts))
    }
}

impl fmt::Debug for MailboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailboxName({:?})", self.0)
    }
}

/// A mail's GUID as its storage reports it: for Maildir the base file name (up to `:`),
/// or the uidlist's `G` extension when present; for dbox 32 hex digits.
///
/// dsync compares these strings byte for byte, so they must survive replication unchanged.
/// Grammar: non-empty, at most 255 bytes, no whitespace and no control characters (the uidlist
/// and the wire are line- and space-separated).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailGuid(String);

/// A mail GUID that breaks the grammar of [`MailGuid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mail GUID {0:?}")]
pub struct BadMailGuid(pub String);

impl MailGuid {
    /// Validates a GUID string.
    pub fn new(s: &str) -> Result<Self, BadMailGuid> {
        if s.is_empty() || s.len() > 255 || s.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(BadMailGuid(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The GUID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 128-bit form used in expunge records.
    pub fn guid128(&self) -> Guid128 {
        Guid128::from_mail_guid(&self.0)
    }
}

impl fmt::Display for MailGuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MailGuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailGuid({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid128_roundtrip_and_hash() {
        let g: Guid128 = "d42a051608b20a6bc63a000083ecc375".parse().unwrap();
        assert_eq!(g.to_string(), "d42a051608b20a6bc63a000083ecc375");
        assert_eq!(Guid128::from_mail_guid("d42a051608b20a6bc63a000083ecc375"), g);
        // Last 16 bytes of SHA-1, as Dovecot computes for non-hex GUIDs.
        let h = Guid128::from_mail_guid("abc");
        assert_eq!(h.to_string(), "4706816a ba3e25717850c26c9cd0d89d".replace(' ', ""));
        assert!("xyz".parse::<Guid128>().is_err());
    }

    #[test]
    fn mailbox_names() {
        let n = MailboxName::parse("Archive.2024", '.').unwrap();
        assert_eq!(n.components(), ["Archive", "2024"]);
        assert_eq!(n.join('/'), "Archive/2024");
        assert!(MailboxName::parse("inbox", '.').unwrap().is_inbox());
        for bad in ["a/b", "..", "a..b", "", "x.", "a\nb"] {
            assert!(MailboxName::parse(bad, '.').is_err(), "{bad:?}");
        }
        assert!(MailboxName::parse("../x", '/').is_err());
    }

    #[test]
    fn keywords() {
        assert!(Keyword::new("$Junk").is_ok());
        for bad in ["", "a b", "\\Seen", "a(b", "a\tb"] {
            assert!(Keyword::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_names_in_dovecot_order() {
        let f = Flags::SEEN | Flags::ANSWERED | Flags::RECENT;
        assert_eq!(f.names().collect::<Vec<_>>(), ["\\Answered", "\\Seen", "\\Recent"]);
        assert_eq!(Flags::from_name("\\SEEN"), Some(Flags::SEEN));
    }
}
