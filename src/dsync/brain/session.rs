//! One dsync session, as the slave (the `dsync-server` end).
//!
//! ```text
//!  recv H ─► [state sync: recv S* .] ─► send N* . D ─► recv N* . D ─► merge trees, apply
//!    ─► loop { recv B: reply B (lost / unchanged / sync) ─► per-mailbox exchange ─► S ⇄ S }
//!    ─► recv . ─► send F, X
//! ```
//!
//! The per-mailbox exchange depends on the role the master's handshake gives us:
//!
//! | role | we send | we receive |
//! |---|---|---|
//! | two-way | `A* .`, `C* .`, `R* .`, `M* .`, `S` | `A* .`, `C* .`, `R* .`, `M* .`, `S` |
//! | backup destination | `R* .`, `S` | `A* .`, `C* .`, `M* .`, `S` |
//! | backup source | `A* .`, `C* .`, `M* .`, `S` | `R* .`, `S` |
//!
//! Everything we send goes through the connection's own writer, so sending never waits for
//! the other side to read; the order below follows what each side sends only after receiving
//! what, so neither side ever waits for the other in a circle.

use std::collections::{HashMap, HashSet};

use super::exporter::{ExportOptions, Exporter};
use super::ibc::{Ibc, IbcError, Incoming, Settings, SyncKind};
use super::importer::{ImportError, ImportOptions, Importer, LastCommon, MailFilter, RemoteBox};
use super::tree::{Delete, DeleteKind, Existence, NodeData, Tree};
use super::tree_sync::{SyncType, TreeChange, sync_trees};
use super::types::{DsyncMailbox, MailboxState};
use crate::store::{
    Guid128, ListChangeKind, MailStore, Mailbox, MailboxInfo, MailboxKind, MailboxName, MailboxUpdate, StoreError,
};

/// Dovecot's `enum mail_error` values used in `F` records.
pub(crate) mod mail_error {
    /// Temporary failure.
    pub(crate) const TEMP: u32 = 1;
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrainError {
    /// The connection failed or the peer broke the protocol.
    #[error(transparent)]
    Ibc(#[from] IbcError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The peer sent something out of order or inconsistent.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A mailbox could not be synced; the session reported failure to the peer.
    #[error("{0}")]
    Failed(String),
}

impl From<ImportError> for BrainError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Store(s) => Self::Store(s),
            ImportError::Protocol(p) => Self::Protocol(p),
            ImportError::Failed(f) => Self::Failed(f),
        }
    }
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Something changed while we synced; the next run will fix it.
    pub(crate) changes_during_sync: Option<String>,
    /// The master must forget its saved state.
    pub(crate) require_full_resync: bool,
    /// A mailbox failed (reported to the master in `F`).
    pub(crate) failed: Option<String>,
}

/// The slave's fixed configuration.
#[derive(Debug, Clone)]
pub(crate) struct SlaveConfig {
    pub(crate) hostname: String,
}

/// The escape character we announce for mailbox names (doveadm forces `%` for dsync).
const ESCAPE_CHAR: char = '%';

struct Slave<'a, S: MailStore, I: Ibc> {
    store: &'a mut S,
    ibc: &'a mut I,
    settings: Settings,
    sync_kind: SyncKind,
    states: HashMap<Guid128, MailboxState>,
    local_tree: Tree,
    remote_tree: Tree,
    alt_char: char,
    changes_during_sync: Option<String>,
    require_full_resync: bool,
    failed: Option<String>,
    boxes: Option<Vec<MailboxInfo>>,
    /// Mailboxes (by their final GUID) that both sides created independently under one name:
    /// their contents have never been compared, so they must be synced in this session even
    /// if every counter happens to be equal.
    merged_by_name: HashSet<Guid128>,
}

fn expect_end(what: &str, got: &Incoming) -> BrainError {
    BrainError::Protocol(format!("expected {what}, got {}", got.what()))
}

/// Runs a slave session to its end.
pub(crate) fn run_slave<S: MailStore, I: Ibc>(
    store: &mut S,
    ibc: &mut I,
    cfg: &SlaveConfig,
) -> Result<Outcome, BrainError> {
    let sep = store.hierarchy_separator();
    ibc.send_handshake(&Settings { hostname: cfg.hostname.clone(), ..Default::default() })?;
    ibc.flush()?;
    let settings = match ibc.recv()? {
        Incoming::Handshake(s) => s,
        other => return Err(expect_end("a handshake", &other)),
    };
    let sync_kind = settings.sync_type.unwrap_or(SyncKind::Changed);
    let alt_char = settings.alt_char.unwrap_or('_');
    let mut slave = Slave {
        store,
        ibc,
        settings,
        sync_kind,
        states: HashMap::new(),
        local_tree: Tree::new(sep),
        remote_tree: Tree::new(sep),
        alt_char,
        changes_during_sync: None,
        require_full_resync: false,
        failed: None,
        boxes: None,
        merged_by_name: HashSet::new(),
    };
    slave.run()
}

impl<S: MailStore, I: Ibc> Slave<'_, S, I> {
    fn set_changes_during_sync(&mut self, reason: String) {
        tracing::debug!("change during sync: {reason}");
        if self.changes_during_sync.is_none() {
            self.changes_during_sync = Some(reason);
        }
    }

    fn run(&mut self) -> Result<Outcome, BrainError> {
        if self.settings.sync_ns_prefixes.as_ref().is_some_and(|p| p.iter().any(|x| !x.is_empty())) {
            return Err(BrainError::Protocol("only the default namespace (prefix \"\") exists here".into()));
        }
        if self.sync_kind == SyncKind::State {
            loop {
                match self.ibc.recv()? {
                    Incoming::MailboxState(s) => {
                        self.states.insert(s.guid, s);
                    }
                    Incoming::EndOfList => break,
                    other => return Err(expect_end("a mailbox state or its list end", &other)),
                }
            }
        }
        self.local_tree = fill_local_tree(self.store, &self.settings)?;
        self.send_tree()?;
        self.recv_tree()?;
        self.apply_tree_changes()?;
        loop {
            match self.ibc.recv()? {
                Incoming::Mailbox(b) => self.recv_mailbox(b)?,
                Incoming::EndOfList => break,
                Incoming::Finish { error, mail_error, require_full_resync } => {
                    return Err(BrainError::Protocol(format!(
                        "the master sent a finish record (error {error:?}, code {mail_error}, resync {require_full_resync}); only slaves send it"
                    )));
                }
                other => return Err(expect_end("a mailbox or the end of the mailbox list", &other)),
            }
        }
        let error = self.failed.as_ref().map(|_| "dsync failed");
        let code = if self.failed.is_some() { mail_error::TEMP } else { 0 };
        self.ibc.send_finish(error, code, self.require_full_resync)?;
        self.ibc.send_done()?;
        self.ibc.flush()?;
        Ok(Outcome {
            changes_during_sync: self.changes_during_sync.take(),
            require_full_resync: self.require_full_resync,
            failed: self.failed.take(),
        })
    }

    fn send_tree(&mut self) -> Result<(), BrainError> {
        for id in self.local_tree.iter_dfs() {
            let n = self.local_tree.node(id);
            let data = NodeData {
                guid: n.guid,
                uid_validity: n.uid_validity,
                uid_next: n.uid_next,
                existence: n.existence,
                last_renamed_or_created: n.last_renamed_or_created,
                subscribed: n.subscribed,
                last_subscription_change: n.last_subscription_change,
            };
            let parts = self.local_tree.parts(id);
            self.ibc.send_node(&parts, &data)?;
        }
        self.ibc.send_end_of_list()?;
        let sep = self.local_tree.sep;
        let deletes = self.local_tree.deletes.clone();
        self.ibc.send_deletes(sep, Some(ESCAPE_CHAR), &deletes)?;
        self.ibc.flush()?;
        Ok(())
    }

    fn recv_tree(&mut self) -> Result<(), BrainError> {
        let sep = self.local_tree.sep;
        loop {
            match self.ibc.recv()? {
                Incoming::Node { parts, data } => {
                    if parts.is_empty() {
                        return Err(BrainError::Protocol("mailbox tree node without a name".into()));
                    }
                    let parts = fix_remote_parts(&parts, sep, self.alt_char);
                    let id = self.remote_tree.get(&parts);
                    self.remote_tree.node_mut(id).copy_data_from(&data);
                }
                Incoming::EndOfList => break,
                other => return Err(expect_end("a mailbox tree node or its list end", &other)),
            }
        }
        if let Err((a, b)) = self.remote_tree.build_guid_hash() {
            return Err(BrainError::Protocol(format!(
                "remote sent duplicate mailbox GUID {} for mailboxes {} and {}",
                self.remote_tree.node(a).guid,
                self.remote_tree.full_name(a),
                self.remote_tree.full_name(b)
            )));
        }
        let (rsep, resc, rdeletes) = match self.ibc.recv()? {
            Incoming::Deletes { sep, escape, deletes } => (sep, escape, deletes),
            other => return Err(expect_end("the mailbox deletions", &other)),
        };
        // The remote's deletions, matched against our tree, marked in the remote tree.
        self.local_tree.remote_sep = Some(rsep);
        self.local_tree.remote_escape = resc;
        for d in &rdeletes {
            add_delete(&self.local_tree, &mut self.remote_tree, d);
        }
        // Our deletions, matched against the remote tree, marked in our tree.
        let ours = self.local_tree.deletes.clone();
        self.remote_tree.remote_sep = Some(self.local_tree.sep);
        self.remote_tree.remote_escape = Some(ESCAPE_CHAR);
        for d in &ours {
            add_delete(&self.remote_tree, &mut self.local_tree, d);
        }
        Ok(())
    }

    fn tree_sync_type(&self) -> SyncType {
        if self.settings.no_backup_overwrite {
            SyncType::TwoWay
        } else if self.settings.backup_send {
            SyncType::PreserveLocal
        } else if self.settings.backup_recv {
            SyncType::PreserveRemote
        } else {
            SyncType::TwoWay
        }
    }

    fn apply_tree_changes(&mut self) -> Result<(), BrainError> {
        let ty = self.tree_sync_type();
        let changes = sync_trees(&mut self.local_tree, &mut self.remote_tree, ty)
            .map_err(|e| BrainError::Failed(e.to_string()))?;
        if self.settings.backup_send {
            // The backup source never changes its mailboxes.
            return Ok(());
        }
        for change in changes {
            tracing::debug!(?change, "mailbox tree change");
            self.apply_tree_change(&change)?;
        }
        self.boxes = None;
        Ok(())
    }

    fn name(&self, parts: &[String]) -> Result<MailboxName, BrainError> {
        MailboxName::from_components(parts.iter().cloned())
            .map_err(|e| BrainError::Protocol(format!("unusable mailbox name: {e}")))
    }

    fn find_by_guid(&mut self, guid: Guid128) -> Result<Option<MailboxInfo>, BrainError> {
        if self.boxes.is_none() {
            self.boxes = Some(self.store.list()?);
        }
        let found = self.boxes.as_ref().and_then(|b| b.iter().find(|i| i.guid == Some(guid)).cloned());
        if found.is_some() {
            return Ok(found);
        }
        // Maybe created or renamed since we listed.
        let list = self.store.list()?;
        let found = list.iter().find(|i| i.guid == Some(guid)).cloned();
        self.boxes = Some(list);
        Ok(found)
    }

    fn apply_tree_change(&mut self, change: &TreeChange) -> Result<(), BrainError> {
        let conflict = |e: &StoreError| {
            matches!(e, StoreError::MailboxExists(_) | StoreError::MailboxNotFound(_)) || e.is_not_found()
        };
        match change {
            TreeChange::DeleteBox { name, guid } => match self.find_by_guid(*guid)? {
                None => {
                    self.set_changes_during_sync(format!("mailbox {} GUID {guid} deletion conflict", name.join("/")))
                }
                Some(info) if info.name.is_inbox() => {
                    // INBOX cannot be deleted; forgetting its identity and mails is the same for
                    // a replica, and the following create gives it the source's identity.
                    self.store.clear_inbox()?;
                    self.boxes = None;
                }
                Some(info) => match self.store.delete_mailbox(&info.name) {
                    Ok(()) => self.boxes = None,
                    Err(e) if conflict(&e) => self.set_changes_during_sync(format!("deleting {}: {e}", name.join("/"))),
                    Err(e) => return Err(e.into()),
                },
            },
            TreeChange::CreateBox { name, guid, uid_validity } => {
                let mb = self.name(name)?;
                match self.store.create_mailbox(&mb, Some(*guid), Some(*uid_validity)) {
                    Ok(()) => {}
                    Err(e) if conflict(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                self.boxes = None;
                // The name may already have held another mailbox (both sides created INBOX):
                // the larger GUID wins in a two-way sync; a backup destination takes the
                // source's GUID.
                let mut b = self.store.open(&mb)?;
                let local = b.status().guid;
                let ord = guid.0.cmp(&local.0);
                if ord != std::cmp::Ordering::Equal && !self.settings.backup_recv && !self.settings.backup_send {
                    self.merged_by_name.insert(*guid);
                    self.merged_by_name.insert(local);
                }
                let change_ours =
                    (ord == std::cmp::Ordering::Greater && !self.settings.backup_recv && !self.settings.backup_send)
                        || (ord != std::cmp::Ordering::Equal && self.settings.backup_recv);
                if change_ours {
                    tracing::debug!(mailbox = %name.join("/"), from = %local, to = %guid, "changing mailbox GUID");
                    b.update(&MailboxUpdate { guid: Some(*guid), ..Default::default() })?;
                    b.sync_point()?;
                }
            }
            TreeChange::Rename { from, to } => {
                let (f, t) = (self.name(from)?, self.name(to)?);
                match self.store.rename_mailbox(&f, &t) {
                    Ok(()) => self.boxes = None,
                    Err(e) if conflict(&e) => {
                        self.set_changes_during_sync(format!("renaming {} to {}: {e}", from.join("/"), to.join("/")))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            TreeChange::Subscribe { name } | TreeChange::Unsubscribe { name } => {
                let mb = self.name(name)?;
                let on = matches!(change, TreeChange::Subscribe { .. });
                self.store.set_subscribed(&mb, on)?;
            }
            TreeChange::CreateDir { name } | TreeChange::DeleteDir { name } => {
                // A Maildir has no directories apart from its mailboxes; nothing to do.
                tracing::debug!(mailbox = %name.join("/"), ?change, "directory change needs no action");
            }
        }
        Ok(())
    }

    fn send_lost(&mut self, guid: Guid128, ignore: bool) -> Result<(), BrainError> {
        let b = DsyncMailbox { guid, mailbox_lost: !ignore, mailbox_ignore: ignore, ..Default::default() };
        self.ibc.send_mailbox(&b)?;
        self.ibc.flush()?;
        Ok(())
    }

    fn recv_mailbox(&mut self, remote: DsyncMailbox) -> Result<(), BrainError> {
        let Some(info) = self.find_by_guid(remote.guid)? else {
            if self.settings.backup_send && self.settings.no_backup_overwrite {
                return self.send_lost(remote.guid, true);
            }
            self.set_changes_during_sync(format!("mailbox GUID {} was lost", remote.guid));
            return self.send_lost(remote.guid, false);
        };
        let mut mb = self.store.open(&info.name)?;
        let st = mb.status();
        let mut local = DsyncMailbox {
            guid: st.guid,
            uid_validity: st.uid_validity,
            uid_next: st.uid_next,
            messages_count: st.messages,
            first_recent_uid: st.first_recent_uid,
            highest_modseq: st.highest_modseq,
            highest_pvt_modseq: 0,
            have_guids: true,
            have_save_guids: true,
            ..Default::default()
        };
        // UIDVALIDITY conflict: the side with more mails keeps its value, then the higher one.
        let mut resync_reason = None;
        if local.uid_validity != remote.uid_validity {
            if remote.messages_count > local.messages_count
                || (remote.messages_count == local.messages_count && remote.uid_validity > local.uid_validity)
            {
                mb.update(&MailboxUpdate { uid_validity: Some(remote.uid_validity), ..Default::default() })?;
            }
            if self.states.get(&local.guid).is_some_and(|s| s.last_common_uid > 0) {
                self.states.remove(&local.guid);
                resync_reason = Some("UIDVALIDITY changed during a stateful sync, need to restart".to_owned());
                self.failed = Some("UIDVALIDITY changed during a stateful sync".to_owned());
            }
        }
        // The master skips a mailbox whose counters (UIDVALIDITY, UIDNEXT, message count,
        // HIGHESTMODSEQ) equal ours. Equal counters do not prove equal contents: both sides
        // may have changed alike since the last sync (one new mail each), or the mailbox was
        // created on both sides independently. When we know our side changed, ours are made
        // to differ by a real modseq step, so that both sides compare their mails.
        let changed_here = st.replicated_modseq != 0 && st.highest_modseq > st.replicated_modseq;
        if !self.boxes_need_sync(&local, &remote)
            && self.sync_kind == SyncKind::Changed
            && !self.settings.no_mail_sync
            && (changed_here || self.merged_by_name.contains(&local.guid))
        {
            let modseq = local.highest_modseq.max(remote.highest_modseq) + 1;
            tracing::debug!(mailbox = %info.name.join('/'), modseq, "counters equal the master's after changes on both sides: raising HIGHESTMODSEQ to force a sync");
            mb.update(&MailboxUpdate { min_highest_modseq: Some(modseq), ..Default::default() })?;
            local.highest_modseq = mb.status().highest_modseq;
        }
        if !self.boxes_need_sync(&local, &remote) {
            // Nothing changed on either side: this is the content the master has.
            if st.replicated_modseq != st.highest_modseq && !self.settings.no_mail_sync {
                mb.update(&MailboxUpdate { replicated_modseq: Some(st.highest_modseq), ..Default::default() })?;
            }
            self.ibc.send_mailbox(&local)?;
            self.ibc.flush()?;
            return Ok(());
        }
        let state = self.states.get(&local.guid).copied();
        let last = LastCommon {
            uid: state.map_or(0, |s| s.last_common_uid),
            modseq: state.map_or(0, |s| s.last_common_modseq),
        };
        let desync = self.incremental_unusable(&mb, &last);
        if let Some(reason) = desync.or(resync_reason) {
            tracing::warn!(
                "failed to do incremental sync for mailbox {}, retry with a full sync ({reason})",
                info.name.join('/')
            );
            self.set_changes_during_sync(format!("Incremental sync failed: {reason}"));
            self.require_full_resync = true;
            return self.send_lost(remote.guid, false);
        }
        self.ibc.send_mailbox(&local)?;
        self.ibc.flush()?;
        self.exchange(&mut mb, &info, &local, &remote, last)
    }

    fn boxes_need_sync(&self, a: &DsyncMailbox, b: &DsyncMailbox) -> bool {
        if self.settings.no_mail_sync {
            return false;
        }
        if self.sync_kind != SyncKind::Changed {
            return true;
        }
        a.uid_validity != b.uid_validity
            || a.uid_next != b.uid_next
            || a.messages_count != b.messages_count
            || a.highest_modseq != b.highest_modseq
            || a.highest_pvt_modseq != b.highest_pvt_modseq
            || a.first_recent_uid != b.first_recent_uid
    }

    fn incremental_unusable(&self, mb: &S::Mailbox, last: &LastCommon) -> Option<String> {
        let st = mb.status();
        if last.modseq != 0 && mb.changes_since(last.modseq).is_none() {
            return Some(format!(
                "Modseq {} no longer in transaction log (highest={}, last_common_uid={}, nextuid={})",
                last.modseq, st.highest_modseq, last.uid, st.uid_next
            ));
        }
        if last.uid != 0 {
            if st.uid_next < last.uid {
                return Some(format!("uidnext {} < {}", st.uid_next, last.uid));
            }
            if st.highest_modseq < last.modseq {
                return Some(format!("highest_modseq {} < {}", st.highest_modseq, last.modseq));
            }
        }
        None
    }

    /// The per-mailbox exchange after both `B` records.
    fn exchange(
        &mut self,
        mb: &mut S::Mailbox,
        info: &MailboxInfo,
        local: &DsyncMailbox,
        remote: &DsyncMailbox,
        last: LastCommon,
    ) -> Result<(), BrainError> {
        let backup_send = self.settings.backup_send;
        let backup_recv = self.settings.backup_recv;
        let mail_requests = self.settings.send_mail_requests;
        let s = &self.settings;
        let filter =
            MailFilter::new(s.sync_since_timestamp, s.sync_until_timestamp, s.sync_max_size, s.sync_flags.as_deref());
        let export_opts = ExportOptions {
            auto_export: !mail_requests,
            timestamps: filter.needs_timestamps(),
            virtual_sizes: filter.max_size > 0,
        };
        let mut exporter =
            if backup_recv { None } else { Some(Exporter::new(&mut *mb, last.uid, last.modseq, export_opts)?) };
        let mut importer = if backup_send {
            None
        } else {
            let mails_have_guids = remote.have_save_guids || (backup_recv && remote.have_guids);
            if !mails_have_guids {
                return Err(BrainError::Failed(
                    "the remote's mails have no GUIDs; syncing with header hashes is not supported".into(),
                ));
            }
            let opts = ImportOptions {
                master_brain: false,
                revert_local_changes: backup_recv && !self.settings.no_backup_overwrite,
                want_mail_requests: mail_requests,
                mails_use_guid128: remote.have_only_guid128,
                commit_msgs_interval: self.settings.import_commit_msgs_interval.max(1) as usize,
                filter,
            };
            let rb = RemoteBox {
                uid_next: remote.uid_next,
                first_recent_uid: remote.first_recent_uid,
                highest_modseq: remote.highest_modseq,
                highest_pvt_modseq: remote.highest_pvt_modseq,
            };
            Some(Importer::new(mb, opts, last, rb)?)
        };
        // What we send first: attributes (none) and changes.
        let attributes = self.ibc.peer_minor() >= 1;
        if let Some(ex) = exporter.as_mut() {
            if attributes {
                self.ibc.send_end_of_list()?; // attributes: we keep none
            }
            while let Some(c) = ex.next_change() {
                self.ibc.send_change(c)?;
            }
            self.ibc.send_end_of_list()?;
            self.ibc.flush()?;
        }
        // What we receive first: the remote's attributes and changes.
        if let Some(imp) = importer.as_mut() {
            if attributes {
                self.recv_list("attributes", |_, item| match item {
                    Incoming::Attribute => Ok(()),
                    other => Err(expect_end("an attribute or its list end", &other)),
                })?;
            }
            loop {
                match self.ibc.recv()? {
                    Incoming::Change(c) => match imp.import_change(mb, &c) {
                        Ok(()) => {}
                        Err(ImportError::Failed(f)) => return self.abort_import(mb, info, importer, f),
                        Err(other) => return Err(other.into()),
                    },
                    Incoming::EndOfList => break,
                    other => return Err(expect_end("a mail change or its list end", &other)),
                }
            }
            match imp.changes_finish(mb) {
                Ok(()) => {}
                Err(ImportError::Failed(f)) => return self.abort_import(mb, info, importer, f),
                Err(other) => return Err(other.into()),
            }
            if mail_requests {
                while let Some(r) = imp.next_request() {
                    self.ibc.send_request(&r)?;
                }
                self.ibc.send_end_of_list()?;
                self.ibc.flush()?;
            }
        }
        // The remote's requests, then our mails.
        if let Some(ex) = exporter.as_mut() {
            if mail_requests {
                loop {
                    match self.ibc.recv()? {
                        Incoming::Request(r) => ex.want_mail(&r)?,
                        Incoming::EndOfList => break,
                        other => return Err(expect_end("a mail request or its list end", &other)),
                    }
                }
            }
            for m in ex.mails_to_send(mb)? {
                match m.body_uid {
                    Some(uid) => {
                        let mut body = mb.open_body(uid)?;
                        self.ibc.send_mail(&m.header, Some(&mut *body))?;
                    }
                    None => self.ibc.send_mail(&m.header, None)?,
                }
            }
            self.ibc.send_end_of_list()?;
            self.ibc.flush()?;
        }
        // The remote's mails.
        if let Some(imp) = importer.as_mut() {
            loop {
                match self.ibc.recv()? {
                    Incoming::Mail(h) => {
                        let has_body = h.has_body;
                        let res = if has_body {
                            let body = self.ibc.body();
                            imp.import_mail(mb, &h, Some(body))
                        } else {
                            imp.import_mail(mb, &h, None)
                        };
                        match res {
                            Ok(()) => {}
                            Err(ImportError::Failed(f)) => return self.abort_import(mb, info, importer, f),
                            Err(other) => return Err(other.into()),
                        }
                        // Whatever the importer did not read of the body is skipped.
                        if has_body {
                            std::io::copy(self.ibc.body(), &mut std::io::sink()).map_err(IbcError::Io)?;
                        }
                    }
                    Incoming::EndOfList => break,
                    other => return Err(expect_end("a mail or its list end", &other)),
                }
            }
        }
        // Our state for this mailbox.
        let mut state = MailboxState { guid: local.guid, last_uidvalidity: local.uid_validity, ..Default::default() };
        let mut failed = None;
        match importer.take() {
            None => {
                state.last_common_uid = local.uid_next.saturating_sub(1);
                state.last_common_modseq = local.highest_modseq;
                state.last_common_pvt_modseq = local.highest_pvt_modseq;
                state.last_messages_count = local.messages_count;
            }
            Some(imp) => {
                let r = imp.finish(mb, true)?;
                state.last_common_uid = r.last_common_uid;
                state.last_common_modseq = r.last_common_modseq;
                state.last_common_pvt_modseq = r.last_common_pvt_modseq;
                state.last_messages_count = r.messages_count;
                if r.require_full_resync {
                    self.require_full_resync = true;
                }
                if let Some(c) = r.changes_during_sync {
                    state.changes_during_sync = true;
                    self.set_changes_during_sync(c);
                }
                if r.delete_mailbox {
                    self.delete_for_recreate(info);
                }
                failed = r.error;
            }
        }
        if self.require_full_resync {
            state.last_uidvalidity = 0;
            state.changes_during_sync = true;
        }
        mb.sync_point()?;
        self.ibc.send_mailbox_state(&state)?;
        self.ibc.flush()?;
        if let Some(e) = failed {
            // Dovecot's slave sends its state and then stops: the brain has failed.
            return Err(BrainError::Failed(e));
        }
        match self.ibc.recv()? {
            Incoming::MailboxState(s) if s.guid == local.guid => {
                if s.changes_during_sync {
                    tracing::debug!("remote notified that changes happened during sync");
                }
            }
            Incoming::MailboxState(s) => {
                return Err(BrainError::Protocol(format!("state for mailbox {} while syncing {}", s.guid, local.guid)));
            }
            other => return Err(expect_end("the mailbox state", &other)),
        }
        // (Reaching here, the import succeeded and deleted nothing: see `failed` above.)
        if !state.changes_during_sync && self.failed.is_none() && !self.require_full_resync {
            // Both sides now hold the same mails: remember where our modseqs stood. (The
            // import kept ours at or below the master's, see `Mailbox::begin_import`.)
            let hms = mb.status().highest_modseq;
            mb.update(&MailboxUpdate { replicated_modseq: Some(hms), ..Default::default() })?;
        }
        Ok(())
    }

    /// An import failed (a backup conflict that only recreating the mailbox can fix, or a
    /// mail the remote did not deliver). Dovecot's brain then fails at once
    /// (`brain->failed`): its slave sends nothing more for this mailbox, syncs no further
    /// mailbox and closes with `X` instead of `F`; the importer is finished on the way out,
    /// which deletes a mailbox it marked for deletion, so that the next run recreates it. We
    /// do the same, so that the master sees the same session (and the same later mailboxes
    /// are left for the next run).
    fn abort_import(
        &mut self,
        mb: &mut S::Mailbox,
        info: &MailboxInfo,
        importer: Option<Importer>,
        reason: String,
    ) -> Result<(), BrainError> {
        if let Some(imp) = importer {
            let r = imp.finish(mb, false)?;
            if r.delete_mailbox {
                self.delete_for_recreate(info);
            }
        }
        mb.sync_point()?;
        Err(BrainError::Failed(reason))
    }

    /// Deletes a mailbox whose conflicts only a new copy can fix (Dovecot's importer does it
    /// when it is finished); failing that is logged, as Dovecot logs it.
    fn delete_for_recreate(&mut self, info: &MailboxInfo) {
        tracing::warn!("deleting mailbox {} so that the next sync recreates it", info.name.join('/'));
        if let Err(e) = self.store.delete_mailbox(&info.name) {
            tracing::error!("couldn't delete mailbox {}: {e}", info.name.join('/'));
        }
        self.boxes = None;
    }

    fn recv_list(
        &mut self,
        what: &str,
        mut each: impl FnMut(&mut Self, Incoming) -> Result<(), BrainError>,
    ) -> Result<(), BrainError> {
        loop {
            match self.ibc.recv()? {
                Incoming::EndOfList => return Ok(()),
                Incoming::Done => return Err(BrainError::Protocol(format!("remote closed while sending {what}"))),
                item => each(self, item)?,
            }
        }
    }
}

/// Builds our side's tree from the store and its mailbox-list change log
/// (`dsync_mailbox_tree_fill` and `dsync_mailbox_tree_add_change_timestamps`).
pub(crate) fn fill_local_tree<S: MailStore>(store: &mut S, settings: &Settings) -> Result<Tree, BrainError> {
    let sep = store.hierarchy_separator();
    let mut tree = Tree::new(sep);
    let infos = store.list()?;
    let wanted = |i: &MailboxInfo| -> bool {
        let vname = i.name.join(sep);
        if let Some(b) = &settings.sync_box
            && !b.starts_with('\\')
            && !crate::userdb::wildcard_match(b, &vname)
        {
            return false;
        }
        !settings.exclude_mailboxes.iter().any(|x| !x.starts_with('\\') && crate::userdb::wildcard_match(x, &vname))
    };
    for i in &infos {
        if !wanted(i) {
            continue;
        }
        if let Some(g) = settings.sync_box_guid
            && i.guid != Some(g)
        {
            continue;
        }
        match i.kind {
            MailboxKind::Mailbox => {
                let id = tree.get(i.name.components());
                let n = tree.node_mut(id);
                n.existence = Existence::Exists;
                n.guid = i.guid.unwrap_or_default();
                n.uid_validity = i.uid_validity;
                n.uid_next = i.uid_next;
            }
            MailboxKind::Directory => {
                let id = tree.get(i.name.components());
                tree.node_mut(id).existence = Existence::Exists;
            }
            MailboxKind::Nonexistent => {}
        }
    }
    for i in infos.iter().filter(|i| i.subscribed && wanted(i)) {
        let id = tree.get(i.name.components());
        tree.node_mut(id).subscribed = true;
    }
    if let Err((a, b)) = tree.build_guid_hash() {
        return Err(BrainError::Failed(format!(
            "duplicate mailbox GUID {} for mailboxes {} and {}",
            tree.node(a).guid,
            tree.full_name(a),
            tree.full_name(b)
        )));
    }
    // Timestamps and deletions from the mailbox-list change log.
    let changes = store.list_changes()?;
    let by_hash: HashMap<Guid128, usize> =
        tree.iter_dfs().into_iter().map(|id| (Guid128::sha128(tree.full_name(id).as_bytes()), id)).collect();
    for c in changes {
        let node = by_hash.get(&c.guid).copied();
        match c.kind {
            ListChangeKind::DeleteMailbox => {
                if !tree.guid_hash.contains_key(&c.guid) {
                    tree.deletes.push(Delete { kind: DeleteKind::Mailbox, guid: c.guid, time: c.time });
                }
            }
            ListChangeKind::DeleteDir => {
                if node.is_some_and(|n| tree.node(n).existence == Existence::Exists) {
                    continue;
                }
                tree.deletes.push(Delete { kind: DeleteKind::Dir, guid: c.guid, time: c.time });
            }
            ListChangeKind::CreateDir | ListChangeKind::Rename => {
                if let Some(n) = node {
                    tree.node_mut(n).last_renamed_or_created = c.time;
                }
            }
            ListChangeKind::Subscribe => {
                if let Some(n) = node {
                    tree.node_mut(n).last_subscription_change = c.time;
                }
            }
            ListChangeKind::Unsubscribe => match node {
                Some(n) => tree.node_mut(n).last_subscription_change = c.time,
                None => tree.deletes.push(Delete { kind: DeleteKind::Unsubscribe, guid: c.guid, time: c.time }),
            },
        }
    }
    Ok(tree)
}

/// Turns the remote's name levels into names our store can hold (`dsync_get_mailbox_name` and
/// `dsync_fix_mailbox_name`): our separator and control characters become the alt char, and
/// reserved names get a `_` prefix.
pub(crate) fn fix_remote_parts(parts: &[String], sep: char, alt: char) -> Vec<String> {
    parts
        .iter()
        .map(|p| {
            let mut s: String =
                p.chars().map(|c| if c == sep || c == '/' || c.is_control() { alt } else { c }).collect();
            if s.is_empty() || s == "." || s == ".." || s.starts_with('.') {
                s.insert(0, '_');
            }
            s
        })
        .collect()
}

/// `dsync_brain_mailbox_tree_add_delete`: a deletion from the other side, found by name or GUID
/// in `tree` (where the mailbox still exists), becomes a deleted node in `other`.
fn add_delete(tree: &Tree, other: &mut Tree, del: &Delete) {
    let Some(node) = tree.find_delete(del) else { return };
    let n = tree.node(node);
    match del.kind {
        DeleteKind::Mailbox => {}
        DeleteKind::Dir => {
            if del.time <= n.last_renamed_or_created {
                return;
            }
        }
        DeleteKind::Unsubscribe => {
            if del.time <= n.last_subscription_change {
                return;
            }
        }
    }
    let parts = tree.parts(node);
    let guid = n.guid;
    let oid = other.get(&parts);
    let o = other.node(oid);
    if o.existence == Existence::Exists && (!o.guid.is_empty() || del.kind != DeleteKind::Mailbox) {
        return; // recreated on the other side
    }
    if del.kind == DeleteKind::Mailbox {
        other.node_mut(oid).guid = guid;
    }
    if del.kind != DeleteKind::Unsubscribe {
        other.node_mut(oid).existence = Existence::Deleted;
    } else {
        let o = other.node_mut(oid);
        o.last_subscription_change = del.time;
        o.subscribed = false;
    }
    let _ = other.guid_hash_add(oid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_names_are_made_storable() {
        let fixed = fix_remote_parts(&["a.b".into(), "..".into(), "x/y".into(), "tab\tbed".into()], '.', '_');
        assert_eq!(fixed, vec!["a_b", "__", "x_y", "tab_bed"]);
        assert_eq!(fix_remote_parts(&["..".into()], '/', '_'), vec!["_.."]);
    }
}
