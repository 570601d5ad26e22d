//! Continuous replication (`mailreplica replicator`), in the making: so far the queue that
//! decides which user syncs next ([`queue`]) and the per-user records that survive a crash,
//! with the import of Dovecot 2.3's `replicator.db` ([`state_db`]). The service that runs
//! them (change feeds, syncs, status) is not built yet; no command uses these modules.

pub mod queue;
pub mod state_db;
