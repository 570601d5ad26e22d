//! mailreplica: replicate Dovecot Maildirs user by user over Dovecot's own dsync protocol.
//!
//! ```text
//!   CLI / daemons (main.rs, cli/, wrapper/)
//!        │
//!   config ── userdb
//!        │
//!   store (MailStore trait) ── store::maildir (Dovecot-compatible files) ── store::memory
//! ```
//!
//! The library is layered: the store knows files and nothing of any protocol; the CLI knows
//! everything below it. See `README.md` for what runs today and `BENCHMARKS.md` for figures.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod dsync;
pub mod privdrop;
pub mod store;
pub mod sys;
pub mod userdb;
