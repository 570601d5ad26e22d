//! The dsync wire codec: bytes ↔ typed records, with no I/O at all.
//!
//! Dovecot's dsync (protocol 3.5, Dovecot 2.3.19) is a pair of byte streams of LF-terminated,
//! tab-separated records, with mail bodies as dot-stuffed streams in between. This module
//! converts between those bytes and typed records exactly as Dovecot's `dsync-ibc-stream.c`
//! does, without ever touching a socket, file or clock.

mod dot;
mod error;
pub mod escape;
mod fields;
mod header;
mod record;
mod types;

pub use dot::{DotDecoder, DotEncoder, DotProgress, encode_body};
pub use error::{
    FieldContext, Incompatibility, Inside, Limited, LineNo, Malformation, Misuse, StateProblem, WireError,
};
pub use header::{
    Headers, ItemHeader, ItemType, MINOR_HAVE_ATTRIBUTES, MINOR_HAVE_FINISH, MINOR_HAVE_SAVE_GUID, PROTOCOL_MAJOR,
    PROTOCOL_MINOR, encode_version_line, parse_version_line,
};
pub use record::{
    Attribute, AttributeValue, CacheField, Deletion, Finish, Handshake, Mail, MailChange, MailRequest, Mailbox,
    MailboxDeletes, MailboxNode, MailboxState, Record,
};
pub use types::{
    AttributeType, BodyChunk, CacheDecision, CacheDecisionKind, ChangeType, Existence, Guid128, HierarchySep,
    KeywordChange, KeywordOp, MailboxPath, NsPrefixes, SyncType, Text, WireFlags,
};
