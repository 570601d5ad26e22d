//! The sync engine: one implementation for both roles (master and slave) and every mode
//! (two-way, backup in either direction); role and mode are data.

pub(crate) mod exporter;
pub(crate) mod ibc;
pub(crate) mod importer;
pub(crate) mod session;
pub(crate) mod tree;
pub(crate) mod tree_sync;
pub(crate) mod types;
