//! The codec's one error type, sorted by blame.
//!
//! Who is at fault decides what the caller does: a [`WireError::Malformed`] or
//! [`WireError::LimitExceeded`] stream is the peer's fault and ends the session (Dovecot does
//! the same: "Invalid input to …" stops the connection), [`WireError::Incompatible`] means the
//! two programs cannot talk at all, [`WireError::BadState`] blames the saved state string the
//! operator passed in, and [`WireError::Misuse`] / [`WireError::Unrepresentable`] are bugs or
//! unusable local data on our side. Context (line number, record type, field name) travels in
//! fields, not in formatted strings, so callers can match on it.

use std::fmt;

use super::header::ItemType;

/// A line number in the peer's byte stream, counted from 1 over every LF the decoder consumed
/// (mail bodies included), so it matches the line of a Dovecot rawlog (`-r`) of the session.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LineNo(pub Option<u64>);

impl fmt::Display for LineNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "line {n}: "),
            None => Ok(()),
        }
    }
}

/// Which record and field a decoding error is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FieldContext {
    /// The record type, when the error is inside a record.
    pub item: Option<ItemType>,
    /// The field (header key), when the error is about one field.
    pub field: Option<&'static str>,
}

impl fmt::Display for FieldContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.item, self.field) {
            (Some(item), Some(field)) => write!(f, " in {item}.{field}"),
            (Some(item), None) => write!(f, " in {item} record"),
            (None, Some(field)) => write!(f, " in field {field}"),
            (None, None) => Ok(()),
        }
    }
}

/// What exactly was wrong with the peer's input.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Malformation {
    /// The first line was not a `VERSION<TAB>…` line.
    #[error("expected a VERSION line")]
    NotVersionLine,
    /// The VERSION line's numbers are not decimal.
    #[error("unparsable protocol version")]
    BadVersionNumber,
    /// A required field is absent (`<02>`) or missing from the end of the line.
    #[error("required field missing")]
    MissingRequiredField,
    /// A number field is not a number of the expected base, or does not fit its type.
    #[error("invalid number {0:?}")]
    InvalidNumber(String),
    /// A number field that must be greater than zero is zero.
    #[error("value must be greater than zero")]
    Zero,
    /// A GUID is not 32 hex digits.
    #[error("invalid GUID {0:?}")]
    InvalidGuid(String),
    /// A one-letter field holds a letter the protocol does not define.
    #[error("unknown value {0:?}")]
    UnknownChoice(String),
    /// `N.name` is empty.
    #[error("empty mailbox name")]
    EmptyName,
    /// A field has the wrong length (e.g. a hierarchy separator that is not one byte).
    #[error("wrong length, expected {0}")]
    WrongLength(&'static str),
    /// A `D` pair list (`guid time guid time …`) is not made of pairs.
    #[error("invalid GUID/timestamp pair list")]
    BadPairList,
    /// An empty line where a record was expected.
    #[error("empty line")]
    EmptyLine,
    /// A line whose first byte is no record type of the protocol.
    #[error("unknown record type {0:?}")]
    UnknownRecordType(char),
    /// A known type that never appears on its own line here (`c` lives inside `B`).
    #[error("record type {0} is not allowed here")]
    UnexpectedRecordType(ItemType),
    /// A record of a type whose header line the peer never sent.
    #[error("record type {0} arrived without a header line for it")]
    RecordWithoutHeader(ItemType),
}

/// Why the peer cannot be talked to.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Incompatibility {
    /// The VERSION line names another service than `dsync`.
    #[error("peer is not a dsync peer (VERSION line {0:?})")]
    NotDsync(String),
    /// The peer speaks another major protocol version than 3.
    #[error("peer speaks dsync protocol major version {0}, we speak 3")]
    MajorVersion(u64),
    /// A header line lacks a key that the type requires (Dovecot: "Remote sent invalid handshake").
    #[error("header for {item} lacks the required key {key}")]
    HeaderLacksRequiredKey {
        /// The record type of the header line.
        item: ItemType,
        /// The missing key.
        key: &'static str,
    },
    /// The header block ended without a header line that the peer's version must send
    /// (Dovecot: "Remote didn't handshake deserializer for …").
    #[error("peer sent no header line for {0}")]
    MissingHeader(ItemType),
}

/// What a limit protects.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Limited {
    /// One protocol line (record, header or VERSION line).
    Line,
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Line => "a line",
        })
    }
}

/// What the input ended inside of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Inside {
    /// The VERSION line and header block.
    Greeting,
    /// A record line (no final LF).
    Line,
    /// A dot-stuffed body (no `.` line). Dovecot: "dot-input stream ends without '.' line".
    Body,
}

impl fmt::Display for Inside {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Greeting => "the VERSION line and header block",
            Self::Line => "a line",
            Self::Body => "a mail or attribute body",
        })
    }
}

/// Why a saved state string was refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateProblem {
    /// Not standard, padded base64.
    #[error("not valid base64")]
    Base64,
    /// Fewer than 8 bytes (header and CRC).
    #[error("too short")]
    TooShort,
    /// The length is not header + n × 44 + CRC.
    #[error("invalid size")]
    BadLength,
    /// The CRC-32 does not match.
    #[error("CRC32 mismatch")]
    CrcMismatch,
    /// The header names a major version other than 1.
    #[error("unsupported state format version {0}")]
    UnsupportedVersion(u8),
}

/// How our own code misused the codec.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Misuse {
    /// A record was encoded while a body was still open.
    #[error("a body is still open; finish it before the next record")]
    BodyOpen,
    /// A body chunk or body end was encoded with no body open.
    #[error("no body is open")]
    NoBodyOpen,
    /// The decoder was used again after it returned an error.
    #[error("the decoder already failed")]
    DecoderFailed,
}

/// Every error of the wire codec.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The peer sent bytes that break the protocol's syntax or a field's format.
    #[error("{at}malformed input from peer{ctx}: {problem}")]
    Malformed {
        /// Where in the stream.
        at: LineNo,
        /// Which record and field.
        ctx: FieldContext,
        /// What was wrong.
        problem: Malformation,
    },
    /// The peer speaks a version or schema we cannot talk to.
    #[error("{at}incompatible peer: {problem}")]
    Incompatible {
        /// Where in the stream.
        at: LineNo,
        /// Why.
        problem: Incompatibility,
    },
    /// The peer sent more than a hard limit allows.
    #[error("{at}{what} longer than the limit of {limit} bytes")]
    LimitExceeded {
        /// Where in the stream.
        at: LineNo,
        /// What was too long.
        what: Limited,
        /// The limit in bytes.
        limit: usize,
    },
    /// The peer's stream ended in the middle of something.
    #[error("{at}input ended inside {inside}")]
    Truncated {
        /// Where in the stream.
        at: LineNo,
        /// What was unfinished.
        inside: Inside,
    },
    /// A saved state string (`-s`) is unusable.
    #[error("invalid state string: {0}")]
    BadState(StateProblem),
    /// A value we were asked to send cannot be represented on the wire.
    #[error("cannot put {what} on the wire: {why}")]
    Unrepresentable {
        /// Which value.
        what: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// Our own code called the codec wrongly: a bug in mailreplica.
    #[error("codec misuse (a bug in mailreplica): {0}")]
    Misuse(Misuse),
}

impl WireError {
    /// True when the peer is to blame (malformed, oversized or truncated input).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, Self::Malformed { .. } | Self::LimitExceeded { .. } | Self::Truncated { .. })
    }

    /// Fill in the line number of an error that was built without one.
    pub(crate) fn at_line(mut self, line: u64) -> Self {
        match &mut self {
            Self::Malformed { at, .. }
            | Self::Incompatible { at, .. }
            | Self::LimitExceeded { at, .. }
            | Self::Truncated { at, .. } => {
                if at.0.is_none() {
                    at.0 = Some(line);
                }
            }
            Self::BadState(_) | Self::Unrepresentable { .. } | Self::Misuse(_) => {}
        }
        self
    }

    /// A malformed-input error without a line number (the decoder adds it).
    pub(crate) fn malformed(item: Option<ItemType>, field: Option<&'static str>, problem: Malformation) -> Self {
        Self::Malformed { at: LineNo(None), ctx: FieldContext { item, field }, problem }
    }

    /// An incompatibility error without a line number (the decoder adds it).
    pub(crate) fn incompatible(problem: Incompatibility) -> Self {
        Self::Incompatible { at: LineNo(None), problem }
    }
}
