//! mailreplica: replicate Dovecot Maildirs user by user over Dovecot's own dsync protocol.
//!
//! ```text
//!   binaries: mailreplica (main.rs, cli/) · mailreplica-wrapper (wrapper/)     not in here
//!        │
//!   fleet (many users: one child process per user, streams relayed over one SSH connection)
//!        │
//!   dsync (server, brain, wire) ── copy ── privdrop ── logging     transport (ssh)
//!        │
//!   config ── userdb
//!        │
//!   store (MailStore trait) ── store::maildir (Dovecot-compatible files) ── store::memory
//! ```
//!
//! The library is layered: the store knows files and nothing of any protocol; the binaries
//! above it own everything about the command line (arguments, output formats, exit codes and
//! error reports), and the library returns typed errors. See `README.md` for what runs today and
//! `BENCHMARKS.md` for figures.
#![deny(unsafe_code)]

pub mod config;
pub mod copy;
pub mod dsync;
pub(crate) mod fasthash;
pub(crate) mod fenced;
pub mod fleet;
pub mod logging;
pub mod privdrop;
pub mod replicator;
pub(crate) mod runs;
pub(crate) mod spill;
pub(crate) mod spill_set;
pub mod store;
pub(crate) mod str_index;
pub mod sys;
pub mod tabescape;
pub mod transport;
pub mod userdb;
