//! Continuous replication (`mailreplica replicator`): which user syncs next ([`queue`]), the
//! per-user records that survive a crash and the import of Dovecot 2.3's `replicator.db`
//! ([`state_db`]), the service that runs the syncs ([`service`]), the change feeds of Dovecot
//! 2.3's `replication` plugin ([`feeds`]) or a watcher of the Maildirs themselves
//! ([`watcher`] with inotify, [`fanotify`] with filesystem marks), and the `doveadm replicator` admin socket
//! ([`admin`]), with their line formats in [`protocol`]. How a sync is run (a child process
//! per user over a shared SSH connection) is the binary's, behind [`service::Syncer`].

pub mod admin;
pub mod fanotify;
pub mod feeds;
pub mod protocol;
pub mod queue;
pub mod service;
pub mod state_db;
pub mod watcher;
