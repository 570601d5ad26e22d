//! Dovecot's dsync protocol (version 3.5): the sync engine ("brain") and, below it, the wire
//! codec. The brain knows records and the `MailStore` trait; it knows no sockets and no files.
//!
//! ```text
//!   transport (bytes) ──► wire (records) ──► brain (decisions) ──► store (MailStore)
//! ```

pub mod brain;
