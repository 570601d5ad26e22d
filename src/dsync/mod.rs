//! Dovecot's dsync protocol (version 3.5, as spoken by Dovecot 2.3.19): the wire codec, the
//! sync engine ("brain") on top of it, and the slave server that joins them to a byte stream.
//!
//! ```text
//!   bytes ─► io (reader/writer threads) ─► stream (codec ⇄ records) ─► brain ─► store
//!                                            └─ wire (pure codec)
//! ```
//!
//! The codec knows no I/O, the brain knows records and the `MailStore` trait but no sockets or
//! files; `stream` and `io` are the only places where bytes meet threads.

pub mod brain;
mod convert;
mod io;
pub mod server;
mod stream;
pub mod wire;
