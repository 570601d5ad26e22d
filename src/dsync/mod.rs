//! Dovecot's dsync replication protocol (version 3.5, as spoken by Dovecot 2.3.19).
//!
//! Only the pure wire codec exists so far ([`wire`]); the sync engine ("brain") and the
//! transports will sit on top of it and never below it.

pub mod wire;
