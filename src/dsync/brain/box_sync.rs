//! Choosing mailboxes and syncing the mails of one (`dsync-brain-mailbox.c`,
//! `dsync-brain-mails.c`).
//!
//! The master offers each of its mailboxes with a `B` record; the slave answers with its own
//! `B` (or "lost"), and both decide from the two records, identically, whether the mailbox
//! needs syncing. Then each side runs two sub-machines at once, one per direction:
//!
//! | role | sends, in order | receives, in order |
//! |---|---|---|
//! | two-way | `A* .` `C* .` `R* .` `M* .` `S` | `A* .` `C* .` `R* .` `M* .` `S` |
//! | backup source | `A* .` `C* .` `M* .` `S` | `R* .` `S` |
//! | backup destination | `R* .` `S` | `A* .` `C* .` `M* .` `S` |
//!
//! The only couplings: our `R` list can be complete only after the peer's `C` list (the
//! importer decides what to ask for), our `M` list starts after the peer's `R` list, and our
//! `S` goes out when both directions are through their mails. Everything else interleaves,
//! so both sides can stream mails to each other at the same time.

use std::io::Read;

use super::exporter::{ExportGuard, ExportOptions, Exporter};
use super::ibc::{Ibc, Incoming, SyncKind};
use super::importer::{ImportOptions, Importer, LastCommon, MailFilter, RemoteBox};
use super::limits::{MAX_UID, MAX_UID_NEXT};
use super::session::{Brain, BrainError, State, unexpected};
use super::tree::Existence;
use super::types::{DsyncMailbox, MailboxState};
use crate::dsync::wire::MINOR_HAVE_ATTRIBUTES;
use crate::store::{Guid128, MailStore, Mailbox, MailboxName, MailboxStatus, MailboxUpdate};

/// One direction's progress through a mailbox (`enum dsync_box_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum BoxState {
    /// Master: waiting for the slave's `B`.
    Mailbox,
    Attributes,
    Changes,
    MailRequests,
    Mails,
    RecvLastCommon,
    Done,
}

/// A mailbox being synced.
pub(super) struct BoxSync<M> {
    mb: M,
    name: MailboxName,
    local: DsyncMailbox,
    send_state: BoxState,
    recv_state: BoxState,
    exporter: Option<Exporter>,
    importer: Option<Importer>,
    /// Our final state for this mailbox, once sent; merged with the peer's when it arrives.
    state: MailboxState,
    state_sent: bool,
    /// The mails were exchanged (not skipped as unchanged).
    synced: bool,
    done: bool,
    changes_received: usize,
    attributes_received: usize,
    unwanted_mails: usize,
    /// The peer's requests are in and the exporter is sending the mails.
    sending: bool,
    /// The import found conflicts only a new copy can fix: the mailbox is deleted (INBOX
    /// emptied) once this handle is closed.
    delete_after: bool,
    /// The peer's HIGHESTMODSEQ as its `B` said.
    remote_hms: u64,
    /// Master: the mailbox was offered a second time (see `Brain::reoffer`).
    reoffered: bool,
}

impl<M> BoxSync<M> {
    pub(super) fn is_done(&self) -> bool {
        self.done
    }
}

/// Records handled per step before the send side gets its turn.
const RECV_BATCH: usize = 256;

/// One modseq step above `modseq`: how our counters are made to differ from the peer's.
pub(super) fn modseq_above(modseq: u64, mailbox: impl FnOnce() -> String) -> Result<u64, BrainError> {
    modseq.checked_add(1).ok_or_else(|| BrainError::Failed(format!("mailbox {}: HIGHESTMODSEQ exhausted", mailbox())))
}

/// Whether our side changed the mailbox since the last completed sync, by our records.
fn changed_here(st: &MailboxStatus) -> bool {
    st.replicated_modseq != 0 && st.highest_modseq > st.replicated_modseq
}

fn dsync_box<M: Mailbox>(mb: &M) -> DsyncMailbox {
    let st = mb.status();
    DsyncMailbox {
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
    }
}

impl<S: MailStore, I: Ibc> Brain<'_, S, I> {
    // ---- choosing mailboxes --------------------------------------------------------------

    /// Master: offers the next mailbox that may need syncing (`dsync_brain_master_send_mailbox`).
    pub(super) fn master_send_mailbox(&mut self) -> Result<bool, BrainError> {
        if self.mailbox_iter.is_none() {
            let order = if self.settings.no_mail_sync { Vec::new() } else { self.local_tree.iter_dfs() };
            self.mailbox_iter = Some((order, 0));
        }
        loop {
            let Some((order, i)) = self.mailbox_iter.as_mut() else { return Ok(false) };
            let Some(&id) = order.get(*i) else {
                self.ibc.send_end_of_list()?;
                self.state = State::Finish;
                return Ok(true);
            };
            *i += 1;
            let n = self.local_tree.node(id);
            if n.existence != Existence::Exists || n.guid.is_empty() {
                continue;
            }
            // By name, as Dovecot allocates it: the tree merge may just have given the mailbox
            // the other side's GUID; the `B` carries whatever GUID the mailbox has now.
            let Ok(name) = MailboxName::from_components(self.local_tree.parts(id)) else { continue };
            let mut mb = match self.store.open(&name) {
                Ok(mb) => mb,
                Err(e) if e.is_not_found() => {
                    tracing::debug!(mailbox = %name.join('/'), "mailbox vanished before it could be synced");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut local = dsync_box(&mb);
            self.stats.mailboxes_seen += 1;
            if !self.has_mailbox_state_changed(&local) {
                tracing::debug!(mailbox = %name.join('/'), "skipping mailbox with unchanged state");
                continue;
            }
            // Equal counters do not prove equal contents (one new mail on each side leaves
            // every counter equal, and the slave would skip the mailbox): when we know ours
            // changed since the last sync, our HIGHESTMODSEQ takes one more step.
            let st = mb.status();
            if self.sync_kind == SyncKind::Changed && changed_here(&st) {
                let modseq = modseq_above(st.highest_modseq, || name.join('/'))?;
                mb.update(&MailboxUpdate { min_highest_modseq: Some(modseq), ..Default::default() })?;
                mb.sync_point()?;
                local = dsync_box(&mb);
            }
            self.ibc.send_mailbox(&local)?;
            let state = self.initial_state(&local);
            self.cur = Some(BoxSync::new(mb, name, local, state, BoxState::Mailbox, BoxState::Mailbox));
            self.state = State::SyncMails;
            return Ok(true);
        }
    }

    /// `dsync_brain_has_mailbox_state_changed`: in a stateful sync, a mailbox whose numbers
    /// equal its saved state is skipped without asking the slave.
    fn has_mailbox_state_changed(&self, b: &DsyncMailbox) -> bool {
        if self.sync_kind != SyncKind::State {
            return true;
        }
        match self.states.get(&b.guid) {
            None => true,
            Some(s) => {
                s.last_uidvalidity != b.uid_validity
                    || s.last_common_uid.checked_add(1) != Some(b.uid_next)
                    || s.last_common_modseq != b.highest_modseq
                    || s.last_common_pvt_modseq != b.highest_pvt_modseq
                    || s.last_messages_count != b.messages_count
            }
        }
    }

    fn initial_state(&self, local: &DsyncMailbox) -> MailboxState {
        match self.states.get(&local.guid) {
            Some(s) => *s,
            None => MailboxState { guid: local.guid, last_uidvalidity: local.uid_validity, ..Default::default() },
        }
    }

    /// Slave: the master's next `B`, or the end of its list.
    pub(super) fn slave_recv_mailbox(&mut self) -> Result<bool, BrainError> {
        let Some(inc) = self.ibc.try_recv()? else { return Ok(false) };
        match inc {
            Incoming::Mailbox(b) => self.slave_handle_mailbox(b)?,
            Incoming::EndOfList => self.state = State::Finish,
            Incoming::Finish { .. } => {
                return Err(BrainError::Protocol("the master sent a finish record; only slaves send it".into()));
            }
            other => return Err(unexpected("a mailbox or the end of the mailbox list", &other)),
        }
        Ok(true)
    }

    fn send_lost(&mut self, guid: Guid128, ignore: bool) -> Result<(), BrainError> {
        let b = DsyncMailbox { guid, mailbox_lost: !ignore, mailbox_ignore: ignore, ..Default::default() };
        self.ibc.send_mailbox(&b)?;
        Ok(())
    }

    /// `dsync_brain_slave_recv_mailbox`.
    fn slave_handle_mailbox(&mut self, remote: DsyncMailbox) -> Result<(), BrainError> {
        self.stats.mailboxes_seen += 1;
        if self.stats.mailboxes_seen as usize > self.limits.max_mailboxes {
            return Err(BrainError::Limit(format!("more than {} mailboxes offered", self.limits.max_mailboxes)));
        }
        let Some(name) = self.find_by_guid(remote.guid)? else {
            if self.settings.backup_send && self.settings.no_backup_overwrite {
                return self.send_lost(remote.guid, true);
            }
            self.set_changes_during_sync(format!("mailbox GUID {} was lost", remote.guid));
            return self.send_lost(remote.guid, false);
        };
        let mut mb = match self.store.open(&name) {
            Ok(mb) => mb,
            Err(e) if e.is_not_found() => {
                self.forget_names();
                self.set_changes_during_sync(format!("mailbox GUID {} was lost", remote.guid));
                return self.send_lost(remote.guid, false);
            }
            Err(e) => return Err(e.into()),
        };
        let st = mb.status();
        let mut local = dsync_box(&mb);
        let resync_reason = self.update_pre(&mut mb, &local, &remote)?;
        // The master skips a mailbox whose counters equal ours. Equal counters do not prove
        // equal contents: both sides may have changed alike since the last sync (one new mail
        // each), the master's changes may have brought its numbers exactly to ours (a slave's
        // import runs a few modseqs ahead, as Dovecot's does), or the mailbox was created on
        // both sides independently. When we know either side changed since the last sync,
        // ours are made to differ by a real modseq step, so that both sides compare.
        if !self.boxes_need_sync(&local, &remote)
            && self.sync_kind == SyncKind::Changed
            && !self.settings.no_mail_sync
            && self.changed_since_last_sync(&st, remote.highest_modseq, &local.guid)
        {
            let modseq = modseq_above(local.highest_modseq.max(remote.highest_modseq), || name.join('/'))?;
            tracing::debug!(mailbox = %name.join('/'), modseq, "counters equal the master's after changes on both sides: raising HIGHESTMODSEQ to force a sync");
            mb.update(&MailboxUpdate { min_highest_modseq: Some(modseq), ..Default::default() })?;
            local.highest_modseq = mb.status().highest_modseq;
        }
        if !self.boxes_need_sync(&local, &remote) {
            // Nothing changed on either side: this is the content the master has.
            if (st.replicated_modseq != st.highest_modseq || st.peer_modseq != remote.highest_modseq || st.history_lost)
                && !self.settings.no_mail_sync
            {
                mb.update(&MailboxUpdate {
                    replicated_modseq: Some(st.highest_modseq),
                    peer_modseq: Some(remote.highest_modseq),
                    clear_history_lost: true,
                    ..Default::default()
                })?;
            }
            mb.sync_point()?;
            self.ibc.send_mailbox(&local)?;
            return Ok(());
        }
        let state = self.initial_state(&local);
        let mut cur = BoxSync::new(mb, name, local, state, BoxState::Mailbox, BoxState::Mailbox);
        match self.open_exchange(&mut cur, &remote)? {
            Some(reason) => {
                let reason = resync_reason.unwrap_or(reason);
                tracing::warn!(
                    "failed to do incremental sync for mailbox {}, retry with a full sync ({reason})",
                    cur.name.join('/')
                );
                self.set_changes_during_sync(format!("Incremental sync failed: {reason}"));
                self.require_full_resync = true;
                self.send_lost(remote.guid, false)
            }
            None if resync_reason.is_some() => {
                let reason = resync_reason.unwrap_or_default();
                self.set_changes_during_sync(reason);
                self.require_full_resync = true;
                self.send_lost(remote.guid, false)
            }
            None => {
                self.ibc.send_mailbox(&cur.local)?;
                self.init_box_states(&mut cur);
                self.cur = Some(cur);
                self.state = State::SyncMails;
                Ok(())
            }
        }
    }

    /// `dsync_brain_mailbox_update_pre`: a UIDVALIDITY conflict is settled for the side with
    /// more mails (then the higher value). Returns a reason when this session cannot go on
    /// with the mailbox (the conflict arose in the middle of a stateful sync).
    fn update_pre(
        &mut self,
        mb: &mut S::Mailbox,
        local: &DsyncMailbox,
        remote: &DsyncMailbox,
    ) -> Result<Option<String>, BrainError> {
        if local.uid_validity == remote.uid_validity {
            return Ok(None);
        }
        let mut reason = None;
        if remote.messages_count > local.messages_count
            || (remote.messages_count == local.messages_count && remote.uid_validity > local.uid_validity)
        {
            if remote.uid_validity == 0 {
                return Err(BrainError::Protocol("the remote's mailbox has UIDVALIDITY 0".into()));
            }
            mb.update(&MailboxUpdate { uid_validity: Some(remote.uid_validity), ..Default::default() })?;
        }
        if self.states.get(&local.guid).is_some_and(|s| s.last_common_uid > 0) {
            self.states.remove(&local.guid);
            reason = Some("UIDVALIDITY changed during a stateful sync, need to restart".to_owned());
            self.failed = Some("UIDVALIDITY changed during a stateful sync".to_owned());
        }
        Ok(reason)
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

    /// Why our saved state cannot be used for an incremental sync of this mailbox, if it
    /// cannot (`dsync_brain_sync_mailbox_open`).
    fn incremental_unusable(&self, mb: &S::Mailbox, last: &LastCommon) -> Option<String> {
        let st = mb.status();
        // What `changes_since` would answer `None` for, without listing the changes.
        if last.modseq != 0 && (last.modseq < st.log_floor || st.history_lost) {
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

    /// Creates the exporter and importer for a mailbox both sides will sync. Returns a reason
    /// if the incremental state is unusable (then nothing was created).
    fn open_exchange(
        &mut self,
        cur: &mut BoxSync<S::Mailbox>,
        remote: &DsyncMailbox,
    ) -> Result<Option<String>, BrainError> {
        if remote.uid_next == MAX_UID_NEXT {
            return Err(BrainError::Limit(format!(
                "mailbox {}: the remote's UIDNEXT {} leaves no UID for new mail (the highest UID is {MAX_UID})",
                cur.name.join('/'),
                remote.uid_next
            )));
        }
        let last = LastCommon { uid: cur.state.last_common_uid, modseq: cur.state.last_common_modseq };
        if let Some(reason) = self.incremental_unusable(&cur.mb, &last) {
            return Ok(Some(reason));
        }
        if last.uid != 0 || last.modseq != 0 {
            tracing::debug!(
                mailbox = %cur.name.join('/'),
                last_common_uid = last.uid,
                last_common_modseq = last.modseq,
                "incremental: only changes since the saved state are exchanged"
            );
        }
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
        if !backup_send {
            let mails_have_guids = remote.have_save_guids || (backup_recv && remote.have_guids);
            if !mails_have_guids {
                return Err(BrainError::Unsupported(
                    "the remote's mails have no GUIDs; syncing with header hashes is not supported".into(),
                ));
            }
        }
        cur.remote_hms = remote.highest_modseq;
        cur.exporter =
            if backup_recv { None } else { Some(Exporter::new(&mut cur.mb, last.uid, last.modseq, export_opts)?) };
        cur.importer = if backup_send {
            None
        } else {
            let opts = ImportOptions {
                master_brain: self.master,
                revert_local_changes: backup_recv && !self.settings.no_backup_overwrite,
                want_mail_requests: mail_requests,
                mails_use_guid128: remote.have_only_guid128,
                commit_msgs_interval: (self.settings.import_commit_msgs_interval.max(1)) as usize,
                max_mails: self.limits.max_mails_per_mailbox,
                filter,
            };
            let rb = RemoteBox {
                uid_next: remote.uid_next,
                first_recent_uid: remote.first_recent_uid,
                highest_modseq: remote.highest_modseq,
                highest_pvt_modseq: remote.highest_pvt_modseq,
            };
            Some(Importer::new(&mut cur.mb, opts, last, rb)?)
        };
        cur.synced = true;
        Ok(None)
    }

    /// `dsync_brain_sync_init_box_states`.
    fn init_box_states(&self, cur: &mut BoxSync<S::Mailbox>) {
        let mail_requests = self.settings.send_mail_requests;
        if self.settings.backup_send {
            cur.send_state = BoxState::Attributes;
            cur.recv_state = if mail_requests { BoxState::MailRequests } else { BoxState::RecvLastCommon };
        } else if self.settings.backup_recv {
            cur.send_state = if mail_requests { BoxState::MailRequests } else { BoxState::Done };
            cur.recv_state = BoxState::Attributes;
        } else {
            cur.send_state = BoxState::Attributes;
            cur.recv_state = BoxState::Attributes;
        }
        self.skip_attributes_of_old_peers(cur);
    }

    /// Peers below protocol minor 1 neither send nor expect attribute lists.
    fn skip_attributes_of_old_peers(&self, cur: &mut BoxSync<S::Mailbox>) {
        if self.ibc.peer_minor() < MINOR_HAVE_ATTRIBUTES && cur.recv_state == BoxState::Attributes {
            cur.recv_state = BoxState::Changes;
        }
    }

    // ---- the exchange ----------------------------------------------------------------------

    /// One turn of the mailbox's two sub-machines (`dsync_brain_sync_mails`).
    /// Each received record is followed by a turn of the send side, as in Dovecot: a record
    /// may unblock something to send (our requests after the peer's changes), and our state
    /// must be out before the peer's is taken.
    pub(super) fn box_step(&mut self, cur: &mut BoxSync<S::Mailbox>) -> Result<bool, BrainError> {
        let mut progress = false;
        for _ in 0..RECV_BATCH {
            let received = !cur.done && self.box_recv(cur)?;
            let sent = !cur.done && self.box_send(cur)?;
            if !received && !sent {
                break;
            }
            progress = true;
        }
        Ok(progress)
    }

    /// Handles at most one received record; false if none was there.
    fn box_recv(&mut self, cur: &mut BoxSync<S::Mailbox>) -> Result<bool, BrainError> {
        if cur.recv_state == BoxState::Done {
            return Ok(false);
        }
        let Some(inc) = self.ibc.try_recv()? else { return Ok(false) };
        match cur.recv_state {
            BoxState::Mailbox => self.master_recv_mailbox(cur, inc)?,
            BoxState::Attributes => match inc {
                Incoming::Attribute => {
                    cur.attributes_received += 1;
                    if cur.attributes_received > self.limits.max_attributes_per_mailbox {
                        return Err(BrainError::Limit(format!(
                            "more than {} attributes for one mailbox",
                            self.limits.max_attributes_per_mailbox
                        )));
                    }
                }
                Incoming::EndOfList => cur.recv_state = BoxState::Changes,
                other => return Err(unexpected("an attribute or its list end", &other)),
            },
            BoxState::Changes => match inc {
                Incoming::Change(c) => {
                    cur.changes_received += 1;
                    if cur.changes_received > self.limits.max_mails_per_mailbox {
                        return Err(BrainError::Limit(format!(
                            "more than {} mail changes for one mailbox",
                            self.limits.max_mails_per_mailbox
                        )));
                    }
                    if c.uid == 0 || c.uid > MAX_UID {
                        return Err(BrainError::Protocol(format!("a mail change for the invalid UID {}", c.uid)));
                    }
                    let imp = cur
                        .importer
                        .as_mut()
                        .ok_or_else(|| BrainError::Protocol("mail changes sent to the backup source".into()))?;
                    imp.import_change(&mut ExportGuard::new(&mut cur.mb, cur.exporter.as_mut()), &c)?;
                }
                Incoming::EndOfList => {
                    if let Some(imp) = cur.importer.as_mut() {
                        imp.changes_finish(&mut ExportGuard::new(&mut cur.mb, cur.exporter.as_mut()))?;
                    }
                    cur.recv_state = if self.settings.send_mail_requests && cur.exporter.is_some() {
                        BoxState::MailRequests
                    } else {
                        BoxState::Mails
                    };
                }
                other => return Err(unexpected("a mail change or its list end", &other)),
            },
            BoxState::MailRequests => match inc {
                Incoming::Request(r) => {
                    let ex = cur
                        .exporter
                        .as_mut()
                        .ok_or_else(|| BrainError::Protocol("mail requests sent to the backup destination".into()))?;
                    ex.want_mail(&r).map_err(|e| BrainError::Protocol(e.to_string()))?;
                }
                Incoming::EndOfList => {
                    cur.recv_state = if cur.importer.is_some() { BoxState::Mails } else { BoxState::RecvLastCommon };
                    self.half_finished(cur)?;
                }
                other => return Err(unexpected("a mail request or its list end", &other)),
            },
            BoxState::Mails => match inc {
                Incoming::Mail(h) => {
                    let imp = cur
                        .importer
                        .as_mut()
                        .ok_or_else(|| BrainError::Protocol("mails sent to the backup source".into()))?;
                    let mut mb = ExportGuard::new(&mut cur.mb, cur.exporter.as_mut());
                    let wanted = if h.has_body {
                        imp.import_mail(&mut mb, &h, Some(self.ibc.body()))?
                    } else {
                        imp.import_mail(&mut mb, &h, None)?
                    };
                    if wanted {
                        self.stats.mails_received += 1;
                    } else {
                        cur.unwanted_mails += 1;
                        if cur.unwanted_mails > self.limits.max_unwanted_mails {
                            return Err(BrainError::Limit(format!(
                                "more than {} mails that were not asked for",
                                self.limits.max_unwanted_mails
                            )));
                        }
                    }
                }
                Incoming::EndOfList => {
                    cur.recv_state = BoxState::RecvLastCommon;
                    self.half_finished(cur)?;
                }
                other => return Err(unexpected("a mail or its list end", &other)),
            },
            BoxState::RecvLastCommon => match inc {
                Incoming::MailboxState(s) => {
                    if cur.send_state != BoxState::Done || !cur.state_sent {
                        return Err(BrainError::Protocol("the remote sent its mailbox state too early".into()));
                    }
                    if s.guid != cur.local.guid {
                        return Err(BrainError::Protocol(format!(
                            "state for mailbox {} while syncing {}",
                            s.guid, cur.local.guid
                        )));
                    }
                    // Normally both sides end with the same numbers; after unexpected changes
                    // they may differ, and the lower ones are the safe ones.
                    cur.state.last_common_uid = cur.state.last_common_uid.min(s.last_common_uid);
                    cur.state.last_common_modseq = cur.state.last_common_modseq.min(s.last_common_modseq);
                    cur.state.last_common_pvt_modseq = cur.state.last_common_pvt_modseq.min(s.last_common_pvt_modseq);
                    if s.changes_during_sync {
                        tracing::debug!("remote notified that changes happened during sync");
                        self.changes_during_remote_sync = true;
                    }
                    cur.recv_state = BoxState::Done;
                    cur.done = true;
                }
                other => return Err(unexpected("the mailbox state", &other)),
            },
            BoxState::Done => return Err(unexpected("nothing for this mailbox", &inc)),
        }
        Ok(true)
    }

    /// Master: the slave's answer to our `B` (`dsync_brain_master_sync_recv_mailbox`).
    fn master_recv_mailbox(&mut self, cur: &mut BoxSync<S::Mailbox>, inc: Incoming) -> Result<(), BrainError> {
        let remote = match inc {
            Incoming::Mailbox(b) => b,
            Incoming::EndOfList => {
                return Err(BrainError::Protocol("remote sent end-of-list instead of a mailbox".into()));
            }
            other => return Err(unexpected("the remote's mailbox", &other)),
        };
        if remote.guid != cur.local.guid {
            return Err(BrainError::Protocol("remote sent a mailbox with a wrong GUID".into()));
        }
        if remote.mailbox_ignore {
            tracing::debug!(guid = %remote.guid, "ignoring the remote's missing mailbox");
            cur.done = true;
            return Ok(());
        }
        if remote.mailbox_lost {
            // The remote lost the mailbox: it was probably just deleted; the next sync checks.
            self.set_changes_during_sync(format!(
                "Remote lost mailbox GUID {} (maybe it was just deleted?)",
                remote.guid
            ));
            self.require_full_resync = true;
            cur.done = true;
            return Ok(());
        }
        let local = cur.local.clone();
        let resync = self.update_pre(&mut cur.mb, &local, &remote)?;
        if !self.boxes_need_sync(&cur.local, &remote) {
            if resync.is_none() && self.reoffer(cur, &remote)? {
                return Ok(());
            }
            let st = cur.mb.status();
            if (st.replicated_modseq != st.highest_modseq || st.peer_modseq != remote.highest_modseq || st.history_lost)
                && !self.settings.no_mail_sync
            {
                cur.mb.update(&MailboxUpdate {
                    replicated_modseq: Some(st.highest_modseq),
                    peer_modseq: Some(remote.highest_modseq),
                    clear_history_lost: true,
                    ..Default::default()
                })?;
                cur.mb.sync_point()?;
            }
            cur.done = true;
            return Ok(());
        }
        tracing::debug!(
            mailbox = %cur.name.join('/'),
            local = ?(cur.local.uid_validity, cur.local.uid_next, cur.local.messages_count, cur.local.highest_modseq),
            remote = ?(remote.uid_validity, remote.uid_next, remote.messages_count, remote.highest_modseq),
            "syncing mailbox (uidvalidity, uidnext, messages, highestmodseq)"
        );
        let unusable = self.open_exchange(cur, &remote)?;
        if let Some(reason) = &unusable {
            tracing::warn!(
                "failed to do incremental sync for mailbox {}, retry with a full sync ({reason})",
                cur.name.join('/')
            );
            self.set_changes_during_sync(format!("Incremental sync failed: {reason}"));
        }
        if let Some(r) = &resync {
            self.set_changes_during_sync(r.clone());
        }
        if unusable.is_some() || resync.is_some() {
            self.require_full_resync = true;
            return Err(BrainError::Failed(format!(
                "mailbox {}: {}",
                cur.name.join('/'),
                unusable.or(resync).unwrap_or_default()
            )));
        }
        self.init_box_states(cur);
        Ok(())
    }

    /// Master: the slave skipped the mailbox because its counters equal ours, although one
    /// side changed it since the last sync (or it was just merged by name). Equal counters
    /// then are a coincidence (both sides' HIGHESTMODSEQ took the same number of steps), and
    /// Dovecot's slave compares nothing more: offer the mailbox once more with a HIGHESTMODSEQ
    /// above both, so that the mails are compared. True when it was offered again.
    fn reoffer(&mut self, cur: &mut BoxSync<S::Mailbox>, remote: &DsyncMailbox) -> Result<bool, BrainError> {
        if cur.reoffered || self.sync_kind != SyncKind::Changed || self.settings.no_mail_sync {
            return Ok(false);
        }
        let st = cur.mb.status();
        if !self.changed_since_last_sync(&st, remote.highest_modseq, &cur.local.guid) {
            return Ok(false);
        }
        let modseq = modseq_above(st.highest_modseq.max(remote.highest_modseq), || cur.name.join('/'))?;
        tracing::debug!(mailbox = %cur.name.join('/'), modseq, "counters equal the slave's after changes: offering the mailbox again");
        cur.mb.update(&MailboxUpdate { min_highest_modseq: Some(modseq), ..Default::default() })?;
        cur.mb.sync_point()?;
        cur.local = dsync_box(&cur.mb);
        cur.reoffered = true;
        self.ibc.send_mailbox(&cur.local)?;
        Ok(true)
    }

    /// Whether either side changed the mailbox since the last sync, as far as our records of
    /// it say (`st`, and the peer's HIGHESTMODSEQ now), or it was just merged by name, or our
    /// records of it were lost (an index rebuilt from the Maildir: its HIGHESTMODSEQ follows
    /// Dovecot's, which may equal the peer's by chance): then counters equal to the peer's
    /// are a coincidence, not equal contents.
    fn changed_since_last_sync(&self, st: &MailboxStatus, remote_hms: u64, guid: &Guid128) -> bool {
        let changed_there = st.peer_modseq != 0 && remote_hms != st.peer_modseq;
        changed_here(st) || changed_there || st.history_lost || self.merged_by_name.contains(guid)
    }

    /// Sends what this mailbox's send side can send now.
    fn box_send(&mut self, cur: &mut BoxSync<S::Mailbox>) -> Result<bool, BrainError> {
        if self.ibc.send_queue_full() {
            return Ok(false);
        }
        match cur.send_state {
            BoxState::Mailbox | BoxState::RecvLastCommon | BoxState::Done => Ok(false),
            BoxState::Attributes => {
                if self.ibc.peer_minor() >= MINOR_HAVE_ATTRIBUTES {
                    self.ibc.send_end_of_list()?; // attributes: we keep none
                }
                cur.send_state = BoxState::Changes;
                Ok(true)
            }
            BoxState::Changes => {
                if let Some(ex) = cur.exporter.as_mut() {
                    while !self.ibc.send_queue_full() {
                        match ex.next_change(&mut cur.mb)? {
                            Some(c) => self.ibc.send_change(c)?,
                            None => break,
                        }
                    }
                    if ex.has_more_changes() {
                        return Ok(true);
                    }
                }
                self.ibc.send_end_of_list()?;
                cur.send_state = if self.settings.send_mail_requests && cur.importer.is_some() {
                    BoxState::MailRequests
                } else {
                    BoxState::Mails
                };
                Ok(true)
            }
            BoxState::MailRequests => {
                let mut progress = false;
                if let Some(imp) = cur.importer.as_mut() {
                    while !self.ibc.send_queue_full() {
                        match imp.next_request() {
                            Some(r) => {
                                self.ibc.send_request(&r)?;
                                progress = true;
                            }
                            None => break,
                        }
                    }
                    if imp.has_more_requests() {
                        return Ok(progress);
                    }
                }
                if cur.recv_state < BoxState::MailRequests {
                    return Ok(progress);
                }
                self.ibc.send_end_of_list()?;
                cur.send_state = if cur.exporter.is_some() { BoxState::Mails } else { BoxState::Done };
                self.half_finished(cur)?;
                Ok(true)
            }
            BoxState::Mails => {
                if self.settings.send_mail_requests && cur.recv_state < BoxState::Mails {
                    // The peer's requests first: then one pass sends them all.
                    return Ok(false);
                }
                if !cur.sending {
                    if let Some(ex) = cur.exporter.as_mut() {
                        ex.start_sending(&cur.mb).map_err(|e| match e {
                            crate::store::StoreError::NotPossible(m) => BrainError::Protocol(m),
                            e => BrainError::Store(e),
                        })?;
                    }
                    cur.sending = true;
                }
                let mut progress = false;
                while !self.ibc.send_queue_full() {
                    let next = match cur.exporter.as_mut() {
                        Some(ex) => ex.next_mail(&mut cur.mb)?,
                        None => None,
                    };
                    let Some(m) = next else {
                        self.ibc.send_end_of_list()?;
                        cur.send_state = BoxState::Done;
                        self.half_finished(cur)?;
                        return Ok(true);
                    };
                    let body: Option<Box<dyn Read + Send>> = match m.body_uid {
                        Some(uid) => match cur.mb.open_body(uid) {
                            Ok(b) => Some(b),
                            // Expunged meanwhile: "all instances are gone", as Dovecot says it.
                            Err(e) if e.is_not_found() => None,
                            Err(e) => return Err(e.into()),
                        },
                        None => None,
                    };
                    if body.is_some() {
                        self.stats.mails_sent += 1;
                    }
                    self.ibc.send_mail(&m.header, body)?;
                    progress = true;
                }
                Ok(progress)
            }
        }
    }

    /// `dsync_brain_sync_half_finished`: once both directions are through their mails, our
    /// state for the mailbox goes out.
    fn half_finished(&mut self, cur: &mut BoxSync<S::Mailbox>) -> Result<(), BrainError> {
        if cur.state_sent || cur.recv_state < BoxState::RecvLastCommon || cur.send_state < BoxState::RecvLastCommon {
            return Ok(());
        }
        let mut state =
            MailboxState { guid: cur.local.guid, last_uidvalidity: cur.local.uid_validity, ..Default::default() };
        let mut failed = None;
        match cur.importer.take() {
            None => {
                state.last_common_uid = cur.local.uid_next.saturating_sub(1);
                state.last_common_modseq = cur.local.highest_modseq;
                state.last_common_pvt_modseq = cur.local.highest_pvt_modseq;
                state.last_messages_count = cur.local.messages_count;
            }
            Some(imp) => {
                let r = imp.finish(&mut cur.mb, true)?;
                state.last_common_uid = r.last_common_uid;
                state.last_common_modseq = r.last_common_modseq;
                // Dovecot keeps the peer's HIGHESTMODSEQ as the common point, and so must we
                // (both sides look it up in their own logs next time), except where our log
                // starts above it: after a rebuild our history begins at the rebuilt value,
                // and a state below it would make the next sync fail as "no longer in the
                // transaction log". Every change of ours up to there went out in this sync,
                // and the peer holds nothing of its own between its value and ours but what
                // it imported from us, so the common point may move up to our floor.
                let floor = cur.mb.status().log_floor;
                if r.changes_during_sync.is_none() && state.last_common_modseq != 0 && state.last_common_modseq < floor
                {
                    state.last_common_modseq = floor;
                }
                state.last_common_pvt_modseq = r.last_common_pvt_modseq;
                state.last_messages_count = r.messages_count;
                if r.require_full_resync {
                    self.require_full_resync = true;
                }
                if let Some(c) = r.changes_during_sync {
                    state.changes_during_sync = true;
                    self.set_changes_during_sync(c);
                }
                cur.delete_after |= r.delete_mailbox;
                failed = r.error;
            }
        }
        if self.require_full_resync {
            state.last_uidvalidity = 0;
            state.changes_during_sync = true;
        }
        cur.mb.sync_point()?;
        self.ibc.send_mailbox_state(&state)?;
        cur.state = state;
        cur.state_sent = true;
        if let Some(e) = failed {
            // Dovecot's brain sends its state and then stops: the session has failed.
            return Err(BrainError::Failed(e));
        }
        Ok(())
    }

    /// A mailbox is through: the session goes on with the next one.
    pub(super) fn box_finished(&mut self, mut cur: BoxSync<S::Mailbox>) -> Result<(), BrainError> {
        if cur.delete_after {
            let name = cur.name.clone();
            drop(cur);
            self.delete_for_recreate(&name);
            self.state = if self.master { State::MasterSendMailbox } else { State::SlaveRecvMailbox };
            return Ok(());
        }
        if cur.synced {
            self.stats.mailboxes_synced += 1;
            if !cur.state.changes_during_sync && self.failed.is_none() && !self.require_full_resync {
                // Both sides now hold the same mails: remember where our modseqs stood.
                let hms = cur.mb.status().highest_modseq;
                cur.mb.update(&MailboxUpdate {
                    replicated_modseq: Some(hms),
                    peer_modseq: Some(cur.remote_hms),
                    clear_history_lost: true,
                    ..Default::default()
                })?;
                cur.mb.sync_point()?;
            }
        }
        if self.master {
            if cur.synced {
                cur.state.shared_modseq = shared_point(&cur.state, &cur.mb.status());
            }
            self.remote_mailbox_states.push(cur.state);
            self.state = State::MasterSendMailbox;
        } else {
            self.state = State::SlaveRecvMailbox;
        }
        Ok(())
    }

    /// The session failed inside a mailbox (Dovecot's `brain->failed`): the importer is
    /// finished on the way out, which commits what was completely received and deletes a
    /// mailbox whose conflicts only a new copy can fix, so that the next run recreates it.
    pub(super) fn box_failed(&mut self, mut cur: BoxSync<S::Mailbox>) {
        if let Some(imp) = cur.importer.take() {
            match imp.finish(&mut cur.mb, false) {
                Ok(r) => cur.delete_after |= r.delete_mailbox,
                Err(e) => tracing::error!("finishing the import of {} failed: {e}", cur.name.join('/')),
            }
        }
        if let Err(e) = cur.mb.sync_point() {
            tracing::error!("mailbox {}: {e}", cur.name.join('/'));
        }
        // Our own handle is closed first: deleting takes the mailbox's locks.
        let (name, delete) = (cur.name.clone(), cur.delete_after);
        drop(cur);
        if delete {
            self.delete_for_recreate(&name);
        }
    }

    /// Deletes a mailbox whose conflicts only a new copy can fix (Dovecot's importer does it
    /// when it is finished). INBOX cannot be deleted: it is emptied and forgets its identity
    /// instead, which is the same for a backup. Failing is logged, as Dovecot logs it.
    fn delete_for_recreate(&mut self, name: &MailboxName) {
        let result = if name.is_inbox() {
            tracing::warn!("INBOX conflicts with the source: emptying it so that the next sync copies it again");
            self.store.clear_inbox()
        } else {
            tracing::warn!("deleting mailbox {} so that the next sync recreates it", name.join('/'));
            self.store.delete_mailbox(name)
        };
        if let Err(e) = result {
            tracing::error!("couldn't delete mailbox {}: {e}", name.join('/'));
        }
        self.forget_names();
    }
}

impl<M> BoxSync<M> {
    fn new(mb: M, name: MailboxName, local: DsyncMailbox, state: MailboxState, send: BoxState, recv: BoxState) -> Self {
        Self {
            mb,
            name,
            local,
            send_state: send,
            recv_state: recv,
            exporter: None,
            importer: None,
            state,
            state_sent: false,
            synced: false,
            done: false,
            changes_received: 0,
            attributes_received: 0,
            unwanted_mails: 0,
            sending: false,
            delete_after: false,
            remote_hms: 0,
            reoffered: false,
        }
    }
}

/// The master's state for a mailbox it just synced, as a point in the other index's numbering
/// (see [`MailboxState::shared_modseq`]): every change that index counted up to it was in
/// the mails this sync compared, and it is not above the common point.
fn shared_point(state: &MailboxState, st: &MailboxStatus) -> Option<u64> {
    let theirs = st.other_index_modseq?;
    (state.last_uidvalidity != 0 && !st.history_lost).then(|| state.last_common_modseq.min(theirs))
}
