//! One dsync session, in either role: the brain's top-level state machine.
//!
//! ```text
//!  both:   send H ─► recv H ─► [master: send S* .  | slave: recv S* .]   (stateful syncs)
//!  both:   send N* . D ─► recv N* . D ─► merge trees, apply our half      (mailbox_tree.rs)
//!  master: for each mailbox: send B ─► recv B ─► exchange ─► S ⇄ S ; then send .
//!  slave:  loop: recv B ─► reply B ─► exchange ─► S ⇄ S ; until recv .   (box_sync.rs)
//!  slave:  send F, X                 master: recv F
//! ```
//!
//! One implementation serves both roles, as Dovecot's one brain with its `master_brain` flag:
//! the role changes who sends the handshake's settings, who holds the saved state, who picks
//! the mailboxes and who finishes; the tree exchange and the per-mailbox exchange are shared.
//!
//! The machine is driven by [`Brain::step`], which does whatever can be done without waiting
//! and reports whether it got anywhere; [`run`] waits on the connection when it did not.
//! Sends never block (the connection queues them), bulk sends pause while the queue is full,
//! and receiving is polled, so both directions interleave as in Dovecot and two of our brains
//! never wait for each other in a circle.

use std::collections::{HashMap, HashSet};

use super::box_sync::BoxSync;
use super::ibc::{Ibc, IbcError, Incoming, Settings, SyncKind};
use super::importer::ImportError;
use super::limits::Limits;
use super::tree::Tree;
use super::types::MailboxState;
use crate::store::{Guid128, MailStore, MailboxName, StoreError};

/// Dovecot's `enum mail_error` values used in `F` records.
pub(crate) mod mail_error {
    /// Temporary failure.
    pub(crate) const TEMP: u32 = 1;
    /// Not possible (e.g. a limit).
    pub(crate) const NOT_POSSIBLE: u32 = 3;
    /// The peer sent invalid data.
    pub(crate) const INVALID_DATA: u32 = 12;
    /// A limit was reached.
    pub(crate) const LIMIT: u32 = 13;
}

/// What kind of failure ended a session: what a caller (the replicator, an exit code) needs
/// to decide whether and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth retrying soon: something changed under us, a lock was busy, a mailbox could not
    /// be synced this time.
    Temporary,
    /// The connection broke or the peer closed early.
    Connection,
    /// Nothing moved in either direction for the stall timeout.
    TimedOut,
    /// The peer broke the protocol or one of our limits; retrying will not help until the
    /// peer changes.
    PeerMisbehaved,
    /// The peer reported that its side failed.
    RemoteFailed,
    /// Our own side cannot do this (store error, unsupported request); needs an admin.
    Permanent,
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrainError {
    /// The connection failed or the peer's bytes were not dsync.
    #[error(transparent)]
    Ibc(#[from] IbcError),
    /// Our store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The peer sent records out of order or inconsistent ones.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer exceeded one of our limits.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The peer asked for something this implementation does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A mailbox could not be synced; the session stopped (a slave closes with `X`).
    #[error("{0}")]
    Failed(String),
    /// The peer reported failure (`F` with an error, or `X` instead of `F`).
    #[error("remote dsync failed: {error}")]
    RemoteFailed { error: String, mail_error: u32 },
}

impl From<ImportError> for BrainError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Store(s) => Self::Store(s),
            ImportError::Protocol(p) => Self::Protocol(p),
            ImportError::Limit(l) => Self::Limit(l),
            ImportError::Failed(f) => Self::Failed(f),
        }
    }
}

impl BrainError {
    /// The kind of failure.
    pub(crate) fn kind(&self) -> FailureKind {
        use std::io::ErrorKind;
        match self {
            Self::Ibc(IbcError::Io(e)) if e.kind() == ErrorKind::TimedOut => FailureKind::TimedOut,
            Self::Ibc(IbcError::Io(_)) => FailureKind::Connection,
            Self::Ibc(IbcError::Wire(w))
                if !w.is_peer_fault() && matches!(w, crate::dsync::wire::WireError::Misuse(_)) =>
            {
                FailureKind::Permanent
            }
            Self::Ibc(IbcError::Wire(_) | IbcError::Protocol(_)) | Self::Protocol(_) | Self::Limit(_) => {
                FailureKind::PeerMisbehaved
            }
            Self::Store(StoreError::LockTimeout { .. }) => FailureKind::Temporary,
            Self::Store(_) | Self::Unsupported(_) => FailureKind::Permanent,
            Self::Failed(_) => FailureKind::Temporary,
            Self::RemoteFailed { .. } => FailureKind::RemoteFailed,
        }
    }

    /// The `mail_error` code to report for this failure (Dovecot's `enum mail_error`).
    pub(crate) fn mail_error(&self) -> u32 {
        match self {
            Self::Limit(_) => mail_error::LIMIT,
            Self::Protocol(_) | Self::Ibc(IbcError::Wire(_) | IbcError::Protocol(_)) => mail_error::INVALID_DATA,
            Self::Unsupported(_) => mail_error::NOT_POSSIBLE,
            Self::RemoteFailed { mail_error, .. } if *mail_error != 0 => *mail_error,
            _ => mail_error::TEMP,
        }
    }
}

/// Counters of what a session moved, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Mailboxes whose mails were exchanged.
    pub mailboxes_synced: u32,
    /// Mailboxes looked at (synced or found unchanged).
    pub mailboxes_seen: u32,
    /// Mails received and saved.
    pub mails_received: u64,
    /// Mails sent.
    pub mails_sent: u64,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Something changed while we synced; the next run will fix it.
    pub(crate) changes_during_sync: Option<String>,
    /// Our state must not be used for the next sync.
    pub(crate) require_full_resync: bool,
    /// A mailbox failed (a slave reports it in `F`; a master's sync failed).
    pub(crate) failed: Option<String>,
    /// Master only: the per-mailbox states to save for the next stateful sync (empty when a
    /// full resync is required).
    pub(crate) states: Vec<MailboxState>,
    pub(crate) stats: SyncStats,
}

/// The slave's fixed configuration.
#[derive(Debug, Clone)]
pub(crate) struct SlaveConfig {
    pub(crate) hostname: String,
}

/// Which direction a backup goes, seen from the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backup {
    /// `backup`: the master is the source, the slave becomes a copy.
    ToRemote,
    /// `backup -R`: the slave is the source, the master becomes a copy.
    FromRemote,
}

/// The master's configuration: what `mailreplica sync|backup` (or a test) asks for.
#[derive(Debug, Clone)]
pub(crate) struct MasterConfig {
    pub(crate) hostname: String,
    /// Full, Changed (no state), or State (with `states`).
    pub(crate) sync_kind: SyncKind,
    /// The saved per-mailbox states of a stateful sync.
    pub(crate) states: Vec<MailboxState>,
    pub(crate) backup: Option<Backup>,
    /// `-1`: a backup that keeps the destination's own changes.
    pub(crate) no_backup_overwrite: bool,
    /// Only the mailbox list, no mails (`-m ''`).
    pub(crate) no_mail_sync: bool,
    pub(crate) sync_box: Option<String>,
    pub(crate) sync_box_guid: Option<Guid128>,
    pub(crate) exclude_mailboxes: Vec<String>,
    pub(crate) sync_since_timestamp: i64,
    pub(crate) sync_until_timestamp: i64,
    pub(crate) sync_max_size: u64,
    pub(crate) sync_flags: Option<String>,
    /// `-l SECS`: lock the user's sync lock on the side that takes it.
    pub(crate) lock_timeout: u32,
    pub(crate) purge_remote: bool,
    pub(crate) import_commit_msgs_interval: u32,
    pub(crate) debug: bool,
}

impl MasterConfig {
    /// A two-way sync of everything that changed, without a state (`doveadm sync`).
    pub(crate) fn new(hostname: &str) -> Self {
        Self {
            hostname: hostname.to_owned(),
            sync_kind: SyncKind::Changed,
            states: Vec::new(),
            backup: None,
            no_backup_overwrite: false,
            no_mail_sync: false,
            sync_box: None,
            sync_box_guid: None,
            exclude_mailboxes: Vec::new(),
            sync_since_timestamp: 0,
            sync_until_timestamp: 0,
            sync_max_size: 0,
            sync_flags: None,
            lock_timeout: 0,
            purge_remote: false,
            import_commit_msgs_interval: 100,
            debug: false,
        }
    }
}

/// A session's role.
#[derive(Debug, Clone)]
pub(crate) enum Role {
    Master(Box<MasterConfig>),
    Slave(SlaveConfig),
}

/// The escape character we announce for mailbox names (doveadm forces `%` for dsync).
pub(crate) const ESCAPE_CHAR: char = '%';

/// The top-level states (`enum dsync_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    RecvHandshake,
    MasterSendLastCommon,
    SlaveRecvLastCommon,
    SendTree,
    RecvTree,
    RecvDeletes,
    MasterSendMailbox,
    SlaveRecvMailbox,
    SyncMails,
    Finish,
    Done,
}

/// A session in progress.
pub(super) struct Brain<'a, S: MailStore, I: Ibc> {
    pub(super) store: &'a mut S,
    pub(super) ibc: &'a mut I,
    pub(super) master: bool,
    pub(super) hostname: String,
    /// The session's settings from our own point of view (backup flags as they apply to us).
    pub(super) settings: Settings,
    pub(super) sync_kind: SyncKind,
    pub(super) limits: Limits,
    pub(super) state: State,
    /// Last-common states by mailbox GUID (the master's saved ones, as the slave received them).
    pub(super) states: HashMap<Guid128, MailboxState>,
    /// Master: the states still to send.
    pub(super) states_to_send: Vec<MailboxState>,
    pub(super) local_tree: Tree,
    pub(super) remote_tree: Tree,
    pub(super) alt_char: char,
    /// Tree nodes still to send (depth-first order), once the tree was filled.
    pub(super) tree_send: Option<(Vec<usize>, usize)>,
    /// Master: local tree nodes still to consider for syncing.
    pub(super) mailbox_iter: Option<(Vec<usize>, usize)>,
    pub(super) cur: Option<BoxSync<S::Mailbox>>,
    /// Final per-mailbox states of this session.
    pub(super) remote_mailbox_states: Vec<MailboxState>,
    pub(super) changes_during_sync: Option<String>,
    pub(super) changes_during_remote_sync: bool,
    pub(super) require_full_resync: bool,
    pub(super) failed: Option<String>,
    /// Mailbox names by GUID, listed once and kept up to date as we change the tree.
    pub(super) guid_names: Option<HashMap<Guid128, MailboxName>>,
    /// Mailboxes (by their final GUID) that both sides created independently under one name:
    /// their contents have never been compared, so they must be synced in this session even
    /// if every counter happens to be equal.
    pub(super) merged_by_name: HashSet<Guid128>,
    pub(super) stats: SyncStats,
    /// Held for the whole session when the handshake asks for a lock (`-l`).
    pub(super) sync_lock: Option<Box<dyn std::any::Any>>,
    pub(super) finish_error: Option<(String, u32)>,
}

fn expect(what: &str, got: &Incoming) -> BrainError {
    match got {
        Incoming::Done => BrainError::RemoteFailed {
            error: format!("the remote closed the session (expected {what})"),
            mail_error: mail_error::TEMP,
        },
        _ => BrainError::Protocol(format!("expected {what}, got {}", got.what())),
    }
}

pub(super) fn unexpected(what: &str, got: &Incoming) -> BrainError {
    expect(what, got)
}

/// Runs a session to its end over `ibc`.
pub(crate) fn run<S: MailStore, I: Ibc>(
    store: &mut S,
    ibc: &mut I,
    role: Role,
    limits: Limits,
) -> Result<Outcome, BrainError> {
    let sep = store.hierarchy_separator();
    let (master, hostname, settings, states_to_send) = match role {
        Role::Master(cfg) => {
            let settings = master_settings(&cfg);
            let mut wire = settings.clone();
            // The slave's view of the backup direction is the reverse of ours.
            std::mem::swap(&mut wire.backup_send, &mut wire.backup_recv);
            ibc.send_handshake(&wire)?;
            (true, cfg.hostname.clone(), settings, cfg.states)
        }
        Role::Slave(cfg) => {
            ibc.send_handshake(&Settings { hostname: cfg.hostname.clone(), ..Default::default() })?;
            (false, cfg.hostname, Settings::default(), Vec::new())
        }
    };
    ibc.flush()?;
    let sync_kind = settings.sync_type.unwrap_or(SyncKind::Changed);
    let mut brain = Brain {
        store,
        ibc,
        master,
        hostname,
        alt_char: settings.alt_char.unwrap_or('_'),
        settings,
        sync_kind,
        limits,
        state: State::RecvHandshake,
        states: states_to_send.iter().map(|s| (s.guid, *s)).collect(),
        states_to_send,
        local_tree: Tree::new(sep),
        remote_tree: Tree::new(sep),
        tree_send: None,
        mailbox_iter: None,
        cur: None,
        remote_mailbox_states: Vec::new(),
        changes_during_sync: None,
        changes_during_remote_sync: false,
        require_full_resync: false,
        failed: None,
        guid_names: None,
        merged_by_name: HashSet::new(),
        stats: SyncStats::default(),
        sync_lock: None,
        finish_error: None,
    };
    brain.run()
}

/// The settings a master sends (from its own point of view).
fn master_settings(cfg: &MasterConfig) -> Settings {
    Settings {
        hostname: cfg.hostname.clone(),
        sync_ns_prefixes: None,
        sync_box: cfg.sync_box.clone(),
        sync_box_guid: cfg.sync_box_guid,
        sync_type: Some(cfg.sync_kind),
        debug: cfg.debug,
        sync_visible_namespaces: false,
        exclude_mailboxes: cfg.exclude_mailboxes.clone(),
        send_mail_requests: true,
        backup_send: cfg.backup == Some(Backup::ToRemote),
        backup_recv: cfg.backup == Some(Backup::FromRemote),
        lock_timeout: cfg.lock_timeout,
        no_mail_sync: cfg.no_mail_sync,
        no_backup_overwrite: cfg.no_backup_overwrite,
        purge_remote: cfg.purge_remote,
        no_notify: false,
        sync_since_timestamp: cfg.sync_since_timestamp,
        sync_max_size: cfg.sync_max_size,
        sync_flags: cfg.sync_flags.clone(),
        sync_until_timestamp: cfg.sync_until_timestamp,
        virtual_all_box: None,
        empty_hdr_workaround: false,
        import_commit_msgs_interval: cfg.import_commit_msgs_interval.max(1),
        hashed_headers: vec!["Date".to_owned(), "Message-ID".to_owned()],
        alt_char: Some('_'),
    }
}

impl<S: MailStore, I: Ibc> Brain<'_, S, I> {
    pub(super) fn set_changes_during_sync(&mut self, reason: String) {
        tracing::debug!("change during sync: {reason}");
        if self.changes_during_sync.is_none() {
            self.changes_during_sync = Some(reason);
        }
    }

    fn run(&mut self) -> Result<Outcome, BrainError> {
        while self.state != State::Done {
            if !self.step()? {
                self.ibc.flush()?;
                self.ibc.wait()?;
            }
        }
        self.ibc.flush()?;
        if let Some((error, mail_error)) = self.finish_error.take() {
            return Err(BrainError::RemoteFailed { error, mail_error });
        }
        let states = if self.master && !self.require_full_resync { self.new_states() } else { Vec::new() };
        let changes = self.changes_during_sync.take().or_else(|| {
            self.changes_during_remote_sync.then(|| "Remote notified that changes happened during sync".to_owned())
        });
        Ok(Outcome {
            changes_during_sync: changes,
            require_full_resync: self.require_full_resync,
            failed: self.failed.take(),
            states,
            stats: self.stats,
        })
    }

    /// Does what can be done now; false if nothing could (the caller then waits).
    fn step(&mut self) -> Result<bool, BrainError> {
        match self.state {
            State::RecvHandshake => self.recv_handshake(),
            State::MasterSendLastCommon => self.send_last_common(),
            State::SlaveRecvLastCommon => self.recv_last_common(),
            State::SendTree => self.send_tree(),
            State::RecvTree => self.recv_tree(),
            State::RecvDeletes => self.recv_deletes(),
            State::MasterSendMailbox => self.master_send_mailbox(),
            State::SlaveRecvMailbox => self.slave_recv_mailbox(),
            State::SyncMails => self.sync_mails(),
            State::Finish => self.finish(),
            State::Done => Ok(false),
        }
    }

    fn recv_handshake(&mut self) -> Result<bool, BrainError> {
        let Some(inc) = self.ibc.try_recv()? else { return Ok(false) };
        let remote = match inc {
            Incoming::Handshake(s) => s,
            other => return Err(expect("a handshake", &other)),
        };
        if !self.master {
            if remote.sync_ns_prefixes.as_ref().is_some_and(|p| p.iter().any(|x| !x.is_empty())) {
                return Err(BrainError::Unsupported("only the default namespace (prefix \"\") exists here".into()));
            }
            self.sync_kind = remote.sync_type.unwrap_or(SyncKind::Changed);
            self.alt_char = remote.alt_char.unwrap_or('_');
            if remote.lock_timeout > 0 {
                self.lock(&remote.hostname, remote.lock_timeout)?;
            }
            self.warn_ignored_settings(&remote);
            self.settings = remote;
            self.state = if self.sync_kind == SyncKind::State { State::SlaveRecvLastCommon } else { State::SendTree };
        } else {
            if self.settings.lock_timeout > 0 {
                let t = self.settings.lock_timeout;
                self.lock(&remote.hostname, t)?;
            }
            self.state = if self.sync_kind == SyncKind::State { State::MasterSendLastCommon } else { State::SendTree };
        }
        Ok(true)
    }

    /// Settings a peer may send that change nothing here: said once, so that an admin does
    /// not believe they took effect. `-N` and `-P` are satisfied as they are (one namespace;
    /// nothing to purge in a Maildir), and Dovecot's replicator sends `-N` on every sync while
    /// Dovecot logs a remote's stderr as errors: those two are only debug lines.
    fn warn_ignored_settings(&self, s: &Settings) {
        if s.purge_remote {
            tracing::debug!("the master asked for a purge (-P): a Maildir has nothing to purge");
        }
        if let Some(b) = &s.virtual_all_box {
            tracing::warn!("the master named a virtual all-mails mailbox ({b}); it is not used here");
        }
        if s.sync_visible_namespaces {
            tracing::debug!("the master asked for all visible namespaces (-N): the default one is all there is");
        }
    }

    /// Takes the user's sync lock if this side is the one that takes it (Dovecot's
    /// `dsync_brain_lock`: the side whose hostname sorts lower; on a tie, the master).
    fn lock(&mut self, remote_hostname: &str, timeout_secs: u32) -> Result<(), BrainError> {
        match remote_hostname.cmp(self.hostname.as_str()) {
            std::cmp::Ordering::Less => return Ok(()),
            std::cmp::Ordering::Equal if !self.master => return Ok(()),
            _ => {}
        }
        let lock = self.store.lock_sync(std::time::Duration::from_secs(u64::from(timeout_secs)))?;
        self.sync_lock = Some(lock);
        Ok(())
    }

    fn send_last_common(&mut self) -> Result<bool, BrainError> {
        while !self.ibc.send_queue_full() {
            match self.states_to_send.pop() {
                Some(s) => self.ibc.send_mailbox_state(&s)?,
                None => {
                    self.ibc.send_end_of_list()?;
                    self.state = State::SendTree;
                    return Ok(true);
                }
            }
        }
        Ok(true)
    }

    fn recv_last_common(&mut self) -> Result<bool, BrainError> {
        let mut progress = false;
        while let Some(inc) = self.ibc.try_recv()? {
            progress = true;
            match inc {
                Incoming::MailboxState(s) => {
                    if self.states.len() >= self.limits.max_mailboxes && !self.states.contains_key(&s.guid) {
                        return Err(BrainError::Limit(format!(
                            "more than {} saved mailbox states",
                            self.limits.max_mailboxes
                        )));
                    }
                    self.states.insert(s.guid, s);
                }
                Incoming::EndOfList => {
                    self.state = State::SendTree;
                    break;
                }
                other => return Err(expect("a mailbox state or its list end", &other)),
            }
        }
        Ok(progress)
    }

    fn sync_mails(&mut self) -> Result<bool, BrainError> {
        let Some(mut cur) = self.cur.take() else {
            self.state = if self.master { State::MasterSendMailbox } else { State::SlaveRecvMailbox };
            return Ok(true);
        };
        let r = self.box_step(&mut cur);
        match r {
            Ok(progress) => {
                if cur.is_done() {
                    self.box_finished(cur)?;
                } else {
                    self.cur = Some(cur);
                }
                Ok(progress)
            }
            Err(e) => {
                self.box_failed(cur);
                Err(e)
            }
        }
    }

    fn finish(&mut self) -> Result<bool, BrainError> {
        if !self.master {
            let error = self.failed.as_ref().map(|_| "dsync failed");
            let code = if self.failed.is_some() { mail_error::TEMP } else { 0 };
            self.ibc.send_finish(error, code, self.require_full_resync)?;
            self.ibc.send_done()?;
            self.state = State::Done;
            return Ok(true);
        }
        let Some(inc) = self.ibc.try_recv()? else { return Ok(false) };
        match inc {
            Incoming::Finish { error, mail_error, require_full_resync } => {
                if let Some(e) = error {
                    tracing::error!("remote dsync failed: {e}");
                    self.finish_error = Some((e, mail_error));
                }
                if require_full_resync {
                    self.require_full_resync = true;
                }
            }
            Incoming::Done if self.ibc.peer_minor() < crate::dsync::wire::MINOR_HAVE_FINISH => {}
            other => return Err(expect("the finish record", &other)),
        }
        self.state = State::Done;
        Ok(true)
    }

    /// The master's states for the next sync (`dsync_brain_get_state`): the saved ones,
    /// updated with this session's results, without mailboxes that no longer exist.
    fn new_states(&self) -> Vec<MailboxState> {
        let mut all: HashMap<Guid128, MailboxState> = self.states.clone();
        for s in &self.remote_mailbox_states {
            all.insert(s.guid, *s);
        }
        let mut v: Vec<MailboxState> = all
            .into_values()
            .filter(|s| {
                self.local_tree
                    .guid_hash
                    .get(&s.guid)
                    .is_some_and(|&n| self.local_tree.node(n).existence == super::tree::Existence::Exists)
            })
            .collect();
        v.sort_by_key(|s| s.guid);
        v
    }
}
