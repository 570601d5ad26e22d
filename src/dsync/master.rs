//! The master end of a dsync session: what `mailreplica sync|backup` runs.
//!
//! [`run_master`] drives any slave behind a pair of byte streams (our `dsync-server`, the
//! wrapper over SSH, or Dovecot's `doveadm dsync-server`); [`sync_stores`] joins our master
//! and our slave in one process without the wire codec (Dovecot's local `maildir:` syncs),
//! the slave's brain on a second thread.

use std::io::{Read, Write};
use std::time::Duration;

use super::brain::ibc::SyncKind;
use super::brain::limits::Limits;
use super::brain::session::{Backup, MasterConfig, Outcome, Role, SlaveConfig, run};
use super::server::{FailureKind, SessionError, SyncStats};
use super::{pipe, saved_state};
use crate::store::MailStore;

/// Which way mails and changes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `sync`: both sides' changes go both ways.
    TwoWay,
    /// `backup`: the remote becomes a copy of us.
    Backup,
    /// `backup -R`: we become a copy of the remote.
    BackupReverse,
}

/// What the master asks for (doveadm's `sync`/`backup` options).
#[derive(Debug, Clone)]
pub struct MasterOptions {
    /// Our host name (in the handshake; decides who takes the sync lock).
    pub hostname: String,
    /// Two-way, backup, or reverse backup.
    pub direction: Direction,
    /// `-1`: one-way: the destination keeps its own changes (with a backup direction).
    pub one_way: bool,
    /// `-f`: full sync, every mailbox compared mail by mail.
    pub full: bool,
    /// `-s STATE`: the state a previous run printed (`Some("")`: none yet, but report one).
    pub state: Option<String>,
    /// `-m MAILBOX`: only this mailbox (an empty name syncs only the mailbox list).
    pub mailbox: Option<String>,
    /// `-x MASK`: mailboxes to leave out.
    pub exclude: Vec<String>,
    /// `-t`: only mails received since this time (0: no limit).
    pub since: i64,
    /// `-e`: only mails received until this time (0: no limit).
    pub until: i64,
    /// `-I`: only mails up to this size (0: no limit).
    pub max_size: u64,
    /// `-O`: only mails with (or, prefixed `-`, without) this flag or keyword.
    pub flag: Option<String>,
    /// `-l SECS`: take the user's sync lock (0: don't).
    pub lock_timeout: u32,
    /// `-P`: ask the remote to purge afterwards.
    pub purge_remote: bool,
}

impl MasterOptions {
    /// A plain two-way sync of what changed.
    pub fn new(hostname: &str) -> Self {
        Self {
            hostname: hostname.to_owned(),
            direction: Direction::TwoWay,
            one_way: false,
            full: false,
            state: None,
            mailbox: None,
            exclude: Vec::new(),
            since: 0,
            until: 0,
            max_size: 0,
            flag: None,
            lock_timeout: 0,
            purge_remote: false,
        }
    }

    /// The brain's configuration; an invalid saved state falls back to a full sync, as
    /// doveadm does ("Saved sync state is invalid, falling back to full sync").
    fn config(&self) -> MasterConfig {
        let mut cfg = MasterConfig::new(&self.hostname);
        cfg.sync_kind = if self.full { SyncKind::Full } else { SyncKind::Changed };
        if let Some(s) = self.state.as_deref().filter(|s| !s.is_empty())
            && !self.full
        {
            match saved_state::decode(s) {
                Ok(states) => {
                    cfg.sync_kind = SyncKind::State;
                    cfg.states = states;
                    for st in &cfg.states {
                        tracing::debug!(
                            "imported mailbox {} state: uidvalidity={} uid={} modseq={} messages={} changes_during_sync={}",
                            st.guid,
                            st.last_uidvalidity,
                            st.last_common_uid,
                            st.last_common_modseq,
                            st.last_messages_count,
                            u8::from(st.changes_during_sync)
                        );
                    }
                }
                Err(e) => {
                    tracing::error!("saved sync state is invalid, falling back to full sync: {e}");
                    cfg.sync_kind = SyncKind::Full;
                }
            }
        }
        cfg.backup = match self.direction {
            Direction::TwoWay if self.one_way => Some(Backup::ToRemote),
            Direction::TwoWay => None,
            Direction::Backup => Some(Backup::ToRemote),
            Direction::BackupReverse => Some(Backup::FromRemote),
        };
        cfg.no_backup_overwrite = self.one_way;
        match self.mailbox.as_deref() {
            Some("") => cfg.no_mail_sync = true,
            Some(m) => cfg.sync_box = Some(m.to_owned()),
            None => {}
        }
        cfg.exclude_mailboxes.clone_from(&self.exclude);
        cfg.sync_since_timestamp = self.since;
        cfg.sync_until_timestamp = self.until;
        cfg.sync_max_size = self.max_size;
        cfg.sync_flags.clone_from(&self.flag);
        cfg.lock_timeout = self.lock_timeout;
        cfg.purge_remote = self.purge_remote;
        cfg
    }
}

/// What a master session achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterReport {
    /// The state to pass to the next stateful sync (`-s`); empty when the next one must be
    /// full.
    pub state: String,
    /// Something changed during the sync (doveadm exits 2); the next run fixes it.
    pub changes_during_sync: Option<String>,
    /// The next sync must be a full one.
    pub require_full_resync: bool,
    /// What moved.
    pub stats: SyncStats,
}

fn report(o: Outcome) -> MasterReport {
    let state = if o.require_full_resync { String::new() } else { saved_state::encode(&o.states) };
    MasterReport {
        state,
        changes_during_sync: o.changes_during_sync,
        require_full_resync: o.require_full_resync,
        stats: o.stats,
    }
}

/// Runs a master session against the slave behind `input`/`output`. `timeout` bounds a
/// stall in either direction.
pub fn run_master<S, R, W>(
    store: &mut S,
    input: R,
    output: W,
    opts: &MasterOptions,
    timeout: Duration,
) -> Result<MasterReport, SessionError>
where
    S: MailStore,
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let mut ibc = super::server::start_wire(input, output, timeout)?;
    let result = run(store, &mut ibc, Role::Master(Box::new(opts.config())), Limits::default());
    if result.is_err() {
        // Giving up mid-session: say so before closing, as Dovecot's master does, so that the
        // slave ends quietly instead of logging a broken stream ("read(...) failed: EOF").
        let _ = super::brain::ibc::Ibc::send_done(&mut ibc);
    }
    // The master says nothing after its last `.`: closing our side is the end.
    let _ = ibc.finish();
    result.map(report).map_err(|e| SessionError::new(&e))
}

/// Syncs two stores in this process: `master` as the master, `slave` on a second thread.
/// Both sides' errors are reported; the master's first.
pub fn sync_stores<A, B>(
    master: &mut A,
    slave: &mut B,
    opts: &MasterOptions,
    timeout: Duration,
) -> Result<MasterReport, SessionError>
where
    A: MailStore,
    B: MailStore + Send,
{
    let (mut m_ibc, mut s_ibc) = pipe::pipe_pair(timeout);
    let slave_cfg = SlaveConfig { hostname: opts.hostname.clone() };
    let cfg = opts.config();
    std::thread::scope(|scope| {
        let slave_thread = std::thread::Builder::new().name("dsync-slave".into()).spawn_scoped(scope, move || {
            let r = run(slave, &mut s_ibc, Role::Slave(slave_cfg), Limits::default());
            if r.is_err() {
                let _ = super::brain::ibc::Ibc::send_done(&mut s_ibc);
            }
            r.map(|_| ()).map_err(|e| SessionError::new(&e))
        });
        let slave_thread = match slave_thread {
            Ok(t) => t,
            Err(e) => {
                return Err(SessionError {
                    kind: FailureKind::Permanent,
                    mail_error: 1,
                    message: format!("starting the slave thread: {e}"),
                });
            }
        };
        let result = run(master, &mut m_ibc, Role::Master(Box::new(cfg)), Limits::default());
        drop(m_ibc);
        let slave_result = slave_thread.join().unwrap_or_else(|_| {
            Err(SessionError { kind: FailureKind::Permanent, mail_error: 1, message: "the slave panicked".into() })
        });
        match (result, slave_result) {
            (Ok(o), Ok(())) => Ok(report(o)),
            (Err(e), _) => Err(SessionError::new(&e)),
            (Ok(_), Err(e)) => Err(e),
        }
    })
}
