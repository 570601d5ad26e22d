//! The sync engine: one implementation for both roles (master and slave) and every mode
//! (two-way, backup in either direction); role and mode are data.
//!
//! ```text
//!   session     the top-level state machine: handshake, saved states, finish, both roles
//!   mailbox_tree  our tree from the store, tree exchange, merge (tree_sync), apply
//!   box_sync    choosing mailboxes, the per-mailbox exchange of changes, requests, mails
//!   importer / exporter   one mailbox's import (merge, UIDs, saving) and export
//!   new_mails   the importer's new mails, grouped by GUID in partitions when the changes end
//!   sent_guids  the exporter's sent GUIDs and the peer's requests, matched in partitions
//!   ibc         the typed connection the brain talks through (wire stream or in-process)
//!   limits      bounds on everything the peer controls
//! ```

pub(crate) mod box_sync;
pub(crate) mod exporter;
pub(crate) mod ibc;
pub(crate) mod importer;
pub(crate) mod limits;
pub(crate) mod logged;
pub(crate) mod mailbox_tree;
pub(crate) mod new_mails;
pub(crate) mod sent_guids;
pub(crate) mod session;
pub(crate) mod tree;
pub(crate) mod tree_sync;
pub(crate) mod types;
