//! The dsync wire codec: bytes ↔ typed records, with no I/O at all.
//!
//! Dovecot's dsync (protocol 3.5, Dovecot 2.3.19) is a pair of byte streams of LF-terminated,
//! tab-separated records, with mail bodies as dot-stuffed streams in between. This module turns
//! received bytes into [`Event`]s and typed [`Record`]s into bytes, exactly as Dovecot's
//! `dsync-ibc-stream.c` does, so that a real `doveadm sync` cannot tell us apart. It never
//! reads or writes a socket, file or clock: the transport feeds it bytes and sends what it
//! appends to a `Vec<u8>`, and the brain decides what to send when. That keeps it testable
//! against recorded sessions and fuzzable.
//!
//! ```text
//!           peer bytes                                          our bytes
//!               │                                                   ▲
//!   Decoder::feed(&[u8])                                 Vec<u8> (appended to)
//!               │                                                   │
//!   ┌───────────▼────────────┐                         ┌────────────┴───────────┐
//!   │ framing: lines ≤ limit │                         │ Encoder: our headers,  │
//!   │ dot-bodies, streamed   │                         │ DotEncoder for bodies  │
//!   ├────────────────────────┤                         ├────────────────────────┤
//!   │ VERSION + peer headers │                         │ VERSION + our headers  │
//!   │ records by peer header │                         │ records by our header  │
//!   └───────────┬────────────┘                         └────────────▲───────────┘
//!               │ Event::{Greeting, Record, EndOfList,              │ Record, ".", "X",
//!               ▼        Done, BodyChunk, BodyEnd}                  │ body chunks
//!                              brain (sync state machine)
//! ```
//!
//! # Example
//!
//! ```
//! use mailreplica::dsync::wire::{Decoder, Encoder, Event, Handshake, Record, Text};
//!
//! // What we send first: VERSION, the header block, and our handshake.
//! let mut enc = Encoder::new();
//! let mut out = Vec::new();
//! enc.greeting(&mut out);
//! let hello = Handshake { hostname: Text::try_from("replica").unwrap(), hashed_headers: Some(vec![]), ..Default::default() };
//! enc.record(&Record::from(hello.clone()), &mut out).unwrap();
//! enc.end_of_list(&mut out).unwrap();
//!
//! // The peer decodes it, in whatever chunks the bytes arrive.
//! let mut dec = Decoder::new();
//! let mut events = Vec::new();
//! for chunk in out.chunks(7) {
//!     dec.feed(chunk);
//!     while let Some(event) = dec.next().unwrap() {
//!         events.push(event);
//!     }
//! }
//! assert_eq!(events, vec![Event::Greeting { minor: 5 }, Event::Record(Record::from(hello)), Event::EndOfList]);
//! ```
//!
//! # What is covered
//!
//! | piece | where | Dovecot source it mirrors |
//! |---|---|---|
//! | tab-escaping, nested lists | [`escape`] | `lib/strescape.c` |
//! | VERSION line, header block, by-name decoding | [`Headers`], [`parse_version_line`] | `dsync-ibc-stream.c` (`items[]`, handshake), `dsync-deserializer.c` |
//! | absent (`<02>`), omitted trailing fields, booleans, decimal vs hex | `fields` (internal) | `dsync-serializer.c`, `dsync-deserializer.c` |
//! | typed records `H S N D B(c) A C R M F`, `.`, `X` | [`Record`], [`Event`] | `dsync_ibc_stream_send_*` / `_recv_*` |
//! | framing with limits, streamed bodies | [`Decoder`], [`DotDecoder`] | `i_stream_next_line`, `lib-mail/istream-dot.c` |
//! | body encoding (leading dot stuffed, CVE-2026-33606) | [`Encoder`], [`DotEncoder`] | `dsync_ibc_stream_send_value_stream` (Debian-fixed) |
//! | saved state string | [`decode_state`], [`encode_state`] | `dsync-mailbox-state.c` |
//!
//! Left to the brain: which record may come when (Dovecot's "Received unexpected input"),
//! skipping `A` records and their list end for peers below minor 1, and the meaning of it all.

mod base64;
mod crc32;
mod decoder;
mod dot;
mod encoder;
mod error;
pub mod escape;
mod fields;
mod header;
mod record;
mod state;
mod types;

#[cfg(test)]
pub(crate) mod tests;

pub use decoder::{Decoder, DecoderLimits, Event};
pub use dot::{DotDecoder, DotEncoder, DotProgress, encode_body};
pub use encoder::Encoder;
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
pub use state::{decode_state, encode_state};
pub use types::{
    AttributeType, BodyChunk, CacheDecision, CacheDecisionKind, ChangeType, Existence, Guid128, HierarchySep,
    KeywordChange, KeywordOp, MailboxPath, NsPrefixes, SyncType, Text, WireFlags,
};
