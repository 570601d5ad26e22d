//! Dovecot's dsync protocol (version 3.5, as spoken by Dovecot 2.3.19): the wire codec, the
//! sync engine ("brain") on top of it, and the slave server that joins them to a byte stream.
//!
//! ```text
//!   bytes ─► io (reader/writer threads) ─► stream (codec ⇄ records) ─► brain ─► store
//!                                            └─ wire (pure codec)
//!   brain ◄─► pipe (in-process records, no codec) ◄─► brain       (both ends in one process)
//! ```
//!
//! The codec knows no I/O, the brain knows records and the `MailStore` trait but no sockets or
//! files; `stream`, `io` and `pipe` are the only places where records meet threads.

pub mod brain;
mod convert;
mod io;
pub mod master;
mod pipe;
mod saved_state;
pub mod server;
mod stream;
pub mod wire;

#[cfg(test)]
mod hostile_tests;
