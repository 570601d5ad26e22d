//! Importing the other side's changes into one of our mailboxes (`dsync-mailbox-import.c`).
//!
//! The remote's `C` records arrive in ascending UID order. Until the last common UID is known,
//! each record is matched against our mail with the same UID (by GUID); the first mismatch ends
//! the common prefix. After it, remote saves and our own mails above the prefix are "new mails":
//! instances with the same GUID are linked, each keeps its UID if that UID is free on the other
//! side, and the rest get fresh UIDs above both UIDNEXTs, in the order found. Both sides run
//! this same algorithm on the same data and so agree on every UID without talking about it.
//! Mails we lack are copied from a local instance with the same GUID when we have one, and
//! requested with `R` otherwise.
//!
//! Flag changes are merged by modseq (on equal modseqs the master's state wins); in backup mode
//! our flags are simply replaced. A backup destination that finds a conflict it cannot fix in
//! place (a UID used by a different mail, or a mail missing below our UIDNEXT) deletes the
//! whole mailbox and fails this run, so the next run recreates it.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use super::limits::MAX_UID;
use super::logged::LoggedChanges;
use super::new_mails::{Ix, NewMails};
use super::types::{ChangeType, FLAG_RECENT, KwOp, MailChange, MailHeader, MailRequest};
use crate::runs;
use crate::spill::{self, SpillVec};
use crate::spill_set::SpillSet;
use crate::store::{
    FlagOp, Flags, Guid128, Keyword, MailGuid, MailRecord, Mailbox, MailboxUpdate, SaveRequest, StoreError, Uid,
};

/// UIDs handed to the store's expunge at a time.
const EXPUNGE_PIECE: usize = 16_384;

/// How the importer behaves.
#[derive(Debug, Clone)]
pub(crate) struct ImportOptions {
    pub(crate) master_brain: bool,
    pub(crate) revert_local_changes: bool,
    pub(crate) want_mail_requests: bool,
    pub(crate) mails_use_guid128: bool,
    pub(crate) commit_msgs_interval: usize,
    /// The most mails one mailbox may hold after the import (a peer-controlled count).
    pub(crate) max_mails: usize,
    /// Which of the remote's mails we want at all (doveadm's `-t`, `-e`, `-I`, `-O`).
    pub(crate) filter: MailFilter,
}

/// The master's restrictions on which mails a sync moves: received within
/// `since..=until` (0: unbounded), at most `max_size` bytes (virtual size; 0: any), and
/// having (or with `flag_unwanted`, not having) a flag or keyword. Mails outside are left
/// alone on both sides, never deleted.
#[derive(Debug, Clone, Default)]
pub(crate) struct MailFilter {
    pub(crate) since: i64,
    pub(crate) until: i64,
    pub(crate) max_size: u64,
    pub(crate) flag: Option<Flags>,
    pub(crate) keyword: Option<String>,
    pub(crate) flag_unwanted: bool,
}

impl MailFilter {
    /// From the handshake's `sync_since_timestamp`, `sync_until_timestamp`, `sync_max_size`
    /// and `sync_flags` (`\\Flag`, `keyword`, either with a leading `-` for "without").
    pub(crate) fn new(since: i64, until: i64, max_size: u64, sync_flag: Option<&str>) -> Self {
        let mut f = Self { since, until, max_size, ..Default::default() };
        if let Some(mut s) = sync_flag.filter(|s| !s.is_empty()) {
            if let Some(rest) = s.strip_prefix('-') {
                f.flag_unwanted = true;
                s = rest;
            }
            if s.starts_with('\\') {
                // An unknown system flag matches nothing, as in Dovecot (flag 0 = no filter).
                f.flag = Flags::from_name(s).filter(|x| !x.is_empty());
            } else {
                f.keyword = Some(s.to_owned());
            }
        }
        f
    }

    /// True when the remote sends received dates with its changes (we need them).
    pub(crate) fn needs_timestamps(&self) -> bool {
        self.since > 0 || self.until > 0
    }

    /// `dsync_mailbox_import_want_change`: whether a mail the remote has and we lack is
    /// one this sync moves at all.
    fn wants(&self, change: &MailChange) -> Result<bool, ImportError> {
        if self.needs_timestamps() && change.received_timestamp <= 0 {
            return Err(ImportError::Protocol(format!("UID {}: no received date, but -t/-e is in use", change.uid)));
        }
        if self.since > 0 && change.received_timestamp < self.since {
            return Ok(false);
        }
        if self.until > 0 && change.received_timestamp > self.until {
            return Ok(false);
        }
        // (A size of 0 travels as no size at all.)
        if self.max_size > 0 && change.virtual_size.unwrap_or(0) > self.max_size {
            return Ok(false);
        }
        if let Some(flag) = self.flag {
            let have = change.final_flags & flag.bits() != 0;
            if have == self.flag_unwanted {
                return Ok(false);
            }
        }
        if let Some(kw) = &self.keyword {
            let have = change
                .keyword_changes
                .iter()
                .any(|(op, k)| matches!(op, KwOp::Final | KwOp::AddAndFinal) && k.eq_ignore_ascii_case(kw));
            if have == self.flag_unwanted {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The remote mailbox's numbers that the importer needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteBox {
    pub(crate) uid_next: u32,
    pub(crate) first_recent_uid: u32,
    pub(crate) highest_modseq: u64,
    pub(crate) highest_pvt_modseq: u64,
}

/// Where a sync of a mailbox left off.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LastCommon {
    pub(crate) uid: u32,
    pub(crate) modseq: u64,
}

/// What the import achieved.
#[derive(Debug, Clone)]
pub(crate) struct ImportResult {
    /// The import failed (already logged); the session must report failure.
    pub(crate) error: Option<String>,
    /// A backup conflict that can only be fixed by deleting the mailbox (the caller does it).
    pub(crate) delete_mailbox: bool,
    pub(crate) last_common_uid: u32,
    pub(crate) last_common_modseq: u64,
    pub(crate) last_common_pvt_modseq: u64,
    pub(crate) messages_count: u32,
    pub(crate) changes_during_sync: Option<String>,
    pub(crate) require_full_resync: bool,
}

/// A fatal import error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The remote did something the protocol does not allow.
    #[error("{0}")]
    Protocol(String),
    /// The remote's data exceeds one of our limits.
    #[error("{0}")]
    Limit(String),
    /// The import failed for a reason already logged (e.g. the mailbox had to be deleted).
    #[error("{0}")]
    Failed(String),
}

/// The importer of one mailbox.
pub(crate) struct Importer {
    opts: ImportOptions,
    remote: RemoteBox,
    last_common_uid: u32,
    last_common_uid_found: bool,
    local_uid_next: u32,
    local_initial_hms: u64,
    local_initial_pvt_hms: u64,
    /// The UIDs of our mails above the initial last common UID, ascending (the "search"),
    /// and the record of the one the search is at. Walked in order: a list that moves into a
    /// file once large.
    local: SpillVec<u32>,
    cur: Option<usize>,
    cur_rec: Option<MailRecord>,
    next_local_seq: usize,
    cur_mail_skip: bool,
    cur_uid_has_change: bool,
    local_changes: Option<LoggedChanges>,
    maybe_expunge_uids: SpillSet,
    maybe_saves: Vec<MailChange>,
    /// The new mails, grouped by GUID once the change list ended; the groups waiting for a
    /// body are marked `pending` on their first instance.
    newmails: NewMails,
    /// Mails without a GUID (which the remote's saves always have: only our own, rarely),
    /// grouped by remote UID as they come: the first instance of each group, in the order
    /// found.
    import_uids: Ordered<u32>,
    /// Where the store's files for large lists go.
    scratch: Option<Arc<Path>>,
    /// The UIDs each committed save or move wanted, and the UIDs the store gave them.
    wanted_uids: SpillVec<u32>,
    saved_uids: SpillVec<u32>,
    highest_wanted_uid: u32,
    /// The mails to ask for (`R`), by the new mail that names them.
    requests: SpillVec<u32>,
    request_idx: usize,
    prev_uid: u32,
    new_uids_assigned: bool,
    require_full_resync: bool,
    delete_mailbox: bool,
    failed: Option<String>,
    expunges: SpillSet,
    /// (final UID, new mail) sorted (after UID assignment), and how many leading ones are
    /// saved or never will be: an intermediate commit is allowed only when every UID staged
    /// so far is below every UID still to be saved.
    order: SpillVec<[u32; 2]>,
    first_unsaved_idx: usize,
    /// Our own mails were matched (moved, copied, expunged): no move follows.
    local_handled: bool,
    saves_since_commit: usize,
    /// Wanted UIDs of staged, not yet committed saves, in staging order.
    pending_wanted: Vec<u32>,
    /// UIDs our own mails moved to during this import (old → new).
    moved: HashMap<u32, u32>,
    /// Where committed moves ended up (wanted UID → UID the store gave); saves are not
    /// kept here, nothing looks them up.
    committed: HashMap<u32, u32>,
    /// The wanted UIDs of `moved`.
    move_targets: BTreeSet<u32>,
}

/// A map that remembers the order its keys were first inserted in.
#[derive(Debug)]
struct Ordered<K> {
    order: Vec<K>,
    map: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Ordered<K> {
    fn new() -> Self {
        Self { order: Vec::new(), map: HashMap::new() }
    }

    fn get<Q>(&self, k: &Q) -> Option<usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(k).copied()
    }

    fn insert(&mut self, k: K, v: usize) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push(k);
        }
    }

    fn remove<Q>(&mut self, k: &Q) -> Option<usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(k)
    }

    /// The entries still present, in insertion order.
    fn values(&self) -> Vec<usize> {
        self.order.iter().filter_map(|k| self.map.get(k).copied()).collect()
    }

    /// Removes and returns every entry, in insertion order.
    fn take_all(&mut self) -> Vec<(K, usize)> {
        let map = std::mem::take(&mut self.map);
        std::mem::take(&mut self.order).into_iter().filter_map(|k| map.get(&k).map(|&v| (k, v))).collect()
    }
}

fn recent_stripped(f: u8) -> u8 {
    f & !FLAG_RECENT
}

fn kw_names(kws: &[Keyword]) -> Vec<String> {
    kws.iter().map(|k| k.as_str().to_owned()).collect()
}

/// The UIDs of `mb`'s mails above `after`, ascending, walked one at a time through the store
/// (listing them all at once took 4 more bytes a mail for a moment).
fn local_uids_above<M: Mailbox>(mb: &M, after: u32, scratch: Option<Arc<Path>>) -> SpillVec<u32> {
    let mut v = SpillVec::new_in(scratch);
    let mut at = after;
    while let Some(u) = mb.uid_after(at) {
        v.push(u.get());
        at = u.get();
    }
    v
}

impl Importer {
    /// Starts importing into `mb`.
    pub(crate) fn new<M: Mailbox>(
        mb: &mut M,
        opts: ImportOptions,
        last: LastCommon,
        remote: RemoteBox,
    ) -> Result<Self, ImportError> {
        let status = mb.status();
        // Not taken for our own changes later, and numbered as Dovecot's importer numbers them
        // in a two-way sync; a backup destination stays at its source's modseqs, so that a
        // repeated backup finds nothing to do (see `Mailbox::begin_import`).
        let one_modseq = opts.revert_local_changes.then(|| status.highest_modseq.max(remote.highest_modseq));
        mb.begin_import(one_modseq);
        let stateful = last.uid != 0 || last.modseq != 0;
        let scratch = mb.scratch_dir().as_deref().and_then(spill::dir);
        let mut imp = Self {
            opts,
            remote,
            last_common_uid: last.uid,
            last_common_uid_found: stateful,
            local_uid_next: status.uid_next,
            local_initial_hms: status.highest_modseq,
            local_initial_pvt_hms: 0,
            local: local_uids_above(mb, last.uid, scratch.clone()),
            scratch: scratch.clone(),
            cur: None,
            cur_rec: None,
            next_local_seq: 0,
            cur_mail_skip: true,
            cur_uid_has_change: false,
            local_changes: None,
            maybe_expunge_uids: SpillSet::new_in(scratch.clone()),
            maybe_saves: Vec::new(),
            newmails: NewMails::new(scratch.clone()),
            import_uids: Ordered::new(),
            wanted_uids: SpillVec::new_in(scratch.clone()),
            saved_uids: SpillVec::new_in(scratch.clone()),
            highest_wanted_uid: 0,
            requests: SpillVec::new_in(scratch.clone()),
            request_idx: 0,
            prev_uid: 0,
            new_uids_assigned: false,
            require_full_resync: false,
            delete_mailbox: false,
            failed: None,
            expunges: SpillSet::new_in(scratch),
            order: SpillVec::default(),
            first_unsaved_idx: 0,
            local_handled: false,
            saves_since_commit: 0,
            pending_wanted: Vec::new(),
            moved: HashMap::new(),
            committed: HashMap::new(),
            move_targets: BTreeSet::new(),
        };
        if imp.local.len() > imp.opts.max_mails {
            return Err(ImportError::Limit(format!(
                "the mailbox holds {} mails, more than the limit of {}",
                imp.local.len(),
                imp.opts.max_mails
            )));
        }
        imp.search_init(mb);
        if stateful {
            if imp.local_uid_next <= last.uid {
                imp.unexpected_state(format!("local UIDNEXT {} <= last common UID {}", imp.local_uid_next, last.uid));
            } else if imp.local_initial_hms < last.modseq {
                imp.unexpected_state(format!(
                    "local HIGHESTMODSEQ {} < last common HIGHESTMODSEQ {}",
                    imp.local_initial_hms, last.modseq
                ));
            }
        }
        match LoggedChanges::read(&*mb, last.modseq, last.uid) {
            Some(changes) => imp.local_changes = Some(changes?),
            None => imp.unexpected_state(format!("modseq {} is no longer in our change log", last.modseq)),
        }
        Ok(imp)
    }

    fn unexpected_state(&mut self, why: String) {
        if self.last_common_uid_found {
            tracing::warn!(
                "mailbox doesn't match the previous state: {why} (dsync must be run again without the state)"
            );
        } else {
            tracing::error!("mailbox: {why}");
        }
        self.require_full_resync = true;
    }

    fn fail(&mut self, why: String) {
        tracing::error!("{why}");
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    fn search_init<M: Mailbox>(&mut self, mb: &M) {
        let start = self.local.partition_point(|&u| u <= self.last_common_uid);
        let start = (start < self.local.len()).then_some(start);
        self.cur = start;
        self.next_local_seq = start.unwrap_or(self.local.len());
        self.cur_mail_skip = true;
        self.load_cur(mb);
    }

    /// Reads the record the search is at.
    fn load_cur<M: Mailbox>(&mut self, mb: &M) {
        if let Some(i) = self.cur {
            self.local.note_lookup(i);
        }
        self.cur_rec = self.cur.and_then(|i| Uid::new(self.local[i])).and_then(|u| mb.mail(u));
        if self.cur.is_some() && self.cur_rec.is_none() {
            // Expunged by another writer since the import began: as good as absent, but the
            // search must stay on it for its UID.
            self.cur_rec = self.cur.and_then(|i| Uid::new(self.local[i])).map(|uid| MailRecord {
                uid,
                guid: MailGuid::new("expunged").expect("a valid GUID"),
                flags: Flags::NONE,
                keywords: Vec::new(),
                modseq: 0,
                recent: false,
            });
        }
    }

    fn cur_mail(&self) -> Option<&MailRecord> {
        self.cur_rec.as_ref()
    }

    /// `importer_next_mail`: moves to the next local mail at or above `wanted_uid` that has
    /// not been consumed yet. Mails passed over without a remote change are remembered as
    /// possibly expunged on the other side.
    fn next_mail<M: Mailbox>(&mut self, mb: &M, wanted_uid: u32) -> bool {
        let Some(mut i) = self.cur else { return false };
        let start = i;
        while i < self.next_local_seq || self.local[i] < wanted_uid {
            if !self.cur_uid_has_change && !self.last_common_uid_found {
                self.maybe_expunge_uids.insert(u64::from(self.local[i]));
            }
            self.cur_mail_skip = false;
            i += 1;
            if i >= self.local.len() {
                self.cur = None;
                self.cur_rec = None;
                return false;
            }
            self.cur = Some(i);
            self.cur_uid_has_change = false;
        }
        if i != start {
            self.load_cur(mb);
        }
        self.cur_uid_has_change = self.local[i] == wanted_uid;
        self.next_local_seq = i;
        true
    }

    fn guid_equals(&self, change: &MailChange, local_guid: &str) -> bool {
        let Some(cg) = change.guid.as_deref() else { return true };
        if change.kind == ChangeType::Expunge {
            let Ok(cg) = cg.parse::<Guid128>() else { return false };
            return Guid128::from_mail_guid(local_guid) == cg;
        }
        if self.opts.mails_use_guid128 {
            Guid128::from_mail_guid(cg) == Guid128::from_mail_guid(local_guid)
        } else {
            cg == local_guid
        }
    }

    fn revert_existing_uid(&mut self, uid: u32, reason: &str) {
        tracing::warn!("UID={uid} already exists locally for a different mail: {reason}");
        self.delete_mailbox = true;
        self.fail(format!("UID {uid} conflicts ({reason}); the mailbox must be copied anew, which the next sync does"));
    }

    fn revert_missing(&mut self, change: &MailChange) {
        tracing::warn!("UID={} GUID={} is missing locally", change.uid, change.guid.as_deref().unwrap_or(""));
        self.delete_mailbox = true;
        self.fail(format!(
            "UID {} is missing locally; the mailbox must be copied anew, which the next sync does",
            change.uid
        ));
    }

    /// `newmail_link` for a mail without a GUID: grouped by remote UID as it comes (mails with
    /// a GUID are grouped when the change list ended, [`NewMails::link_by_guid`]).
    fn link_newmail(&mut self, idx: usize, remote_uid: u32) {
        if !self.newmails.guid(idx).is_empty() || remote_uid == 0 {
            return;
        }
        let Some(first) = self.import_uids.get(&remote_uid) else {
            self.import_uids.insert(remote_uid, idx);
            return;
        };
        let mut link = None;
        let mut cur = Some(first);
        let mut last = first;
        while let Some(m) = cur {
            if self.newmails[m].final_uid == self.newmails[idx].final_uid {
                self.newmails[m].uid_is_usable = true;
            }
            if link.is_none()
                && self.newmails[m].link.is_none()
                && self.newmails[m].uid_in_local != self.newmails[idx].uid_in_local
            {
                link = Some(m);
            }
            last = m;
            cur = self.newmails[m].next.get();
        }
        self.newmails[last].next = Ix::to(idx);
        if let Some(l) = link
            && self.newmails[idx].link.is_none()
        {
            self.newmails[l].link = Ix::to(idx);
            self.newmails[idx].link = Ix::to(l);
        }
    }

    /// `dsync_mailbox_try_save_cur`. Returns true when the remote save was consumed.
    fn try_save_cur<M: Mailbox>(&mut self, mb: &mut M, save: Option<&MailChange>) -> bool {
        use std::cmp::Ordering;
        let cur = self.cur_mail().cloned();
        let diff = match (&cur, save) {
            (None, None) => return true,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(c), Some(s)) => {
                let sg = s.guid.as_deref().unwrap_or("");
                c.guid.as_str().cmp(sg).then(c.uid.get().cmp(&s.uid))
            }
        };
        let (idx, remote_saved) = match diff {
            Ordering::Less => {
                let c = cur.expect("diff < 0 means a local mail");
                if self.opts.revert_local_changes {
                    if save.is_none() && c.uid.get() >= self.remote.uid_next {
                        self.revert_existing_uid(
                            c.uid.get(),
                            &format!("higher than remote's UIDs (remote UIDNEXT={})", self.remote.uid_next),
                        );
                        return true;
                    }
                    self.expunges.insert(u64::from(c.uid.get()));
                    self.cur_mail_skip = true;
                    self.next_local_seq += 1;
                    return false;
                }
                let u = c.uid.get();
                let usable = u >= self.remote.uid_next;
                (self.newmails.push(c.guid.as_str(), None, [u, u, 0], true, usable), false)
            }
            Ordering::Greater => {
                let s = save.expect("diff > 0 means a remote save");
                let usable = s.uid >= self.local_uid_next;
                if !usable && self.opts.revert_local_changes {
                    self.revert_existing_uid(s.uid, &format!("UID >= local UIDNEXT={}", self.local_uid_next));
                    return true;
                }
                let g = s.guid.as_deref().unwrap_or_default();
                (self.newmails.push(g, Some(s), [s.uid, 0, s.uid], false, usable), true)
            }
            Ordering::Equal => {
                let c = cur.expect("equal means both exist");
                let s = save.expect("equal means both exist");
                let g = s.guid.as_deref().unwrap_or_default();
                let u = c.uid.get();
                (self.newmails.push(g, Some(s), [u, u, s.uid], true, true), true)
            }
        };
        let in_local = self.newmails[idx].uid_in_local;
        let remote_uid = self.newmails[idx].remote_uid;
        if in_local {
            self.cur_mail_skip = true;
            self.next_local_seq += 1;
        }
        if diff == Ordering::Equal {
            self.newmails[idx].link = Ix::to(idx);
        }
        // Grouped by remote UID only when it is a remote save alone.
        self.link_newmail(idx, if in_local { 0 } else { remote_uid });
        let _ = mb;
        remote_saved
    }

    fn try_save<M: Mailbox>(&mut self, mb: &mut M, save: Option<&MailChange>) -> bool {
        if self.cur_mail_skip && !self.next_mail(mb, 0) && save.is_none() {
            return true;
        }
        self.try_save_cur(mb, save)
    }

    fn save<M: Mailbox>(&mut self, mb: &mut M, save: &MailChange) {
        while !self.try_save(mb, Some(save)) {
            if self.failed.is_some() {
                return;
            }
        }
    }

    fn current_record<M: Mailbox>(&self, mb: &M, uid: u32) -> Option<MailRecord> {
        if self.expunges.contains(uid.into()) {
            // Expunged in this import but, as in Dovecot's open transaction, still readable.
            // The store still has it: expunges are applied when the import ends.
            return Uid::new(uid).and_then(|u| mb.mail(u));
        }
        Uid::new(uid).and_then(|u| mb.mail(u))
    }

    /// `dsync_import_set_mail`: the local mail with the change's UID, checked by GUID.
    fn set_mail<M: Mailbox>(&mut self, mb: &M, change: &MailChange) -> Option<MailRecord> {
        let rec = self.current_record(mb, change.uid)?;
        match change.guid.as_deref() {
            None | Some("") => Some(rec),
            Some(g) => {
                if self.guid_equals(change, rec.guid.as_str()) {
                    Some(rec)
                } else {
                    self.unexpected_state(format!(
                        "Unexpected GUID mismatch for UID={}: {} != {g}",
                        change.uid, rec.guid
                    ));
                    None
                }
            }
        }
    }

    fn replace_flags<M: Mailbox>(
        &mut self,
        mb: &mut M,
        rec: &MailRecord,
        change: &MailChange,
    ) -> Result<(), ImportError> {
        let mut kws = Vec::new();
        for k in change.final_keywords() {
            match Keyword::new(k) {
                Ok(k) => kws.push(k),
                Err(e) => tracing::warn!("ignoring invalid keyword from the remote: {e}"),
            }
        }
        let flags = Flags::from_bits_truncate(recent_stripped(change.add_flags | change.final_flags));
        mb.change_flags(rec.uid, FlagOp::Replace, flags, &kws, change.modseq)?;
        Ok(())
    }

    /// `dsync_mailbox_import_flag_change`.
    fn flag_change<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) -> Result<(), ImportError> {
        let rec = match self.cur_mail().filter(|c| c.uid.get() == change.uid).cloned() {
            Some(c) => {
                if let Some(g) = change.guid.as_deref()
                    && !g.is_empty()
                    && !self.guid_equals(change, c.guid.as_str())
                {
                    self.unexpected_state(format!(
                        "Unexpected GUID mismatch (2) for UID={}: {} != {g}",
                        change.uid, c.guid
                    ));
                    return Ok(());
                }
                // Our current view of the mail (flags may have changed since the snapshot).
                match self.current_record(mb, c.uid.get()) {
                    Some(r) => r,
                    None => return Ok(()),
                }
            }
            None => match self.set_mail(mb, change) {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        if self.expunges.contains(rec.uid.get().into()) {
            return Ok(());
        }
        if self.opts.revert_local_changes {
            return self.replace_flags(mb, &rec, change);
        }
        let local = self.local_changes.as_ref().and_then(|l| l.find(change.uid)).unwrap_or_default();
        let prefer_remote = match rec.modseq.cmp(&change.modseq) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => !self.opts.master_brain,
        };
        let mut remote_changed = false;
        let local_final = rec.flags.bits();
        let (add, remove) = merge_flags(
            local_final,
            local.add,
            local.remove,
            recent_stripped(change.final_flags),
            recent_stripped(change.add_flags),
            recent_stripped(change.remove_flags),
            prefer_remote,
            &mut remote_changed,
        );
        let new_flags = (local_final | add) & !remove;
        let new_kws =
            merge_keywords(&rec.keywords, &local.keywords, &change.keyword_changes, prefer_remote, &mut remote_changed);
        let mut new_modseq = change.modseq;
        if remote_changed && new_modseq <= self.remote.highest_modseq {
            new_modseq = self.remote.highest_modseq.saturating_add(1);
        }
        let kws: Vec<Keyword> = new_kws.iter().filter_map(|k| Keyword::new(k).ok()).collect();
        let changed = new_flags != local_final || kw_names(&rec.keywords) != new_kws;
        if changed || rec.modseq < new_modseq {
            mb.change_flags(rec.uid, FlagOp::Replace, Flags::from_bits_truncate(new_flags), &kws, new_modseq)?;
        }
        Ok(())
    }

    /// `dsync_mailbox_import_save`.
    fn import_save<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) -> Result<(), ImportError> {
        if change.uid == self.last_common_uid {
            // Already verified to match: apply flag changes.
            return self.flag_change(mb, change);
        }
        if !self.opts.filter.wants(change)? {
            return Ok(());
        }
        if self.last_common_uid_found {
            self.save(mb, change);
        } else {
            self.maybe_saves.push(change.clone());
        }
        Ok(())
    }

    /// `dsync_mailbox_import_expunge`.
    fn import_expunge<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) {
        if self.last_common_uid_found {
            if self.set_mail(mb, change).is_some() {
                self.expunges.insert(u64::from(change.uid));
            }
        } else if self.cur_mail().is_none_or(|c| change.uid < c.uid.get()) {
            // Already expunged locally.
        } else if change.uid == self.last_common_uid {
            if let Some(c) = self.cur_mail().cloned() {
                let ok = match change.guid.as_deref() {
                    None | Some("") => true,
                    Some(_) => self.guid_equals(change, c.guid.as_str()),
                };
                if ok {
                    self.expunges.insert(u64::from(c.uid.get()));
                } else {
                    self.unexpected_state(format!("Unexpected GUID mismatch (2) for UID={}", change.uid));
                }
            }
        } else {
            self.maybe_expunge_uids.insert(u64::from(change.uid));
        }
    }

    fn rewind_search<M: Mailbox>(&mut self, mb: &M) {
        if self.cur_mail().is_some_and(|c| c.uid.get() <= self.last_common_uid.saturating_add(1)) {
            return;
        }
        self.search_init(mb);
    }

    /// `dsync_mailbox_common_uid_found`.
    fn common_uid_found<M: Mailbox>(&mut self, mb: &mut M) {
        self.last_common_uid_found = true;
        self.rewind_search(mb);
        // Not needed once the common UID is found (a backup from an emptied mailbox puts every
        // local mail in it: a set that moves into a file).
        let mut delayed = std::mem::replace(&mut self.maybe_expunge_uids, SpillSet::new_in(None));
        let last = self.last_common_uid;
        for uid in delayed.sorted().map_while(|u| u32::try_from(u).ok()).take_while(|&u| u <= last) {
            if self.current_record(mb, uid).is_some() {
                self.expunges.insert(u64::from(uid));
            }
        }
        let saves = std::mem::take(&mut self.maybe_saves);
        for s in saves {
            if s.uid > self.last_common_uid {
                self.save(mb, &s);
            }
        }
    }

    fn match_msg(&mut self, change: &MailChange) -> Option<bool> {
        let cur = self.cur_mail().cloned()?;
        let cg = change.guid.as_deref().unwrap_or("");
        if !cg.is_empty() && !cur.guid.as_str().is_empty() {
            return Some(self.guid_equals(change, cur.guid.as_str()));
        }
        if change.kind == ChangeType::Expunge {
            return None;
        }
        self.fail("the remote's mails have no GUIDs; header hashes are not supported".to_owned());
        None
    }

    /// `dsync_mailbox_find_common_expunged_uid`.
    fn find_common_expunged_uid<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) -> bool {
        let Some(g) = change.guid.as_deref().filter(|g| !g.is_empty()) else {
            return false;
        };
        let Some(Some(local_guid)) = self.local_changes.as_ref().and_then(|l| l.find(change.uid)).map(|c| c.expunged)
        else {
            return false;
        };
        let remote128 = if change.kind == ChangeType::Expunge {
            g.parse::<Guid128>().unwrap_or(Guid128::EMPTY)
        } else {
            Guid128::from_mail_guid(g)
        };
        if remote128 == local_guid {
            self.last_common_uid = change.uid;
        } else if change.kind != ChangeType::Expunge {
            self.common_uid_found(mb);
        }
        true
    }

    /// `dsync_mailbox_find_common_uid`.
    fn find_common_uid<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) -> Result<(), ImportError> {
        if !self.next_mail(mb, change.uid) {
            if change.kind == ChangeType::Expunge {
                return Ok(());
            }
            if !self.opts.filter.wants(change)? {
                // Not a mail this sync moves.
            } else if self.local_uid_next <= change.uid {
                self.common_uid_found(mb);
            } else if self.opts.revert_local_changes {
                self.revert_missing(change);
            } else if !self.find_common_expunged_uid(mb, change) {
                self.common_uid_found(mb);
            }
            return Ok(());
        }
        if change.guid.is_none() {
            return Ok(());
        }
        if self.cur_mail().is_some_and(|c| c.uid.get() == change.uid) {
            match self.match_msg(change) {
                None => {}
                Some(true) => self.last_common_uid = change.uid,
                Some(false) if !self.opts.revert_local_changes => self.common_uid_found(mb),
                Some(false) => self.revert_existing_uid(change.uid, "GUIDs don't match"),
            }
            return Ok(());
        }
        // The mail exists remotely, but not here.
        if change.kind != ChangeType::Expunge && !self.opts.filter.wants(change)? {
            return Ok(());
        }
        if self.opts.revert_local_changes && change.kind != ChangeType::Expunge {
            self.revert_missing(change);
        } else {
            let _ = self.find_common_expunged_uid(mb, change);
        }
        Ok(())
    }

    /// Imports one `C` record.
    pub(crate) fn import_change<M: Mailbox>(&mut self, mb: &mut M, change: &MailChange) -> Result<(), ImportError> {
        if self.new_uids_assigned {
            return Err(ImportError::Protocol("change received after the change list ended".into()));
        }
        if change.uid <= self.prev_uid {
            return Err(ImportError::Protocol(format!(
                "changes not in ascending UID order ({} after {})",
                change.uid, self.prev_uid
            )));
        }
        self.prev_uid = change.uid;
        if self.failed.is_some() || self.require_full_resync {
            return Ok(());
        }
        if !self.last_common_uid_found {
            self.find_common_uid(mb, change)?;
        }
        if self.failed.is_some() || self.require_full_resync {
            return Ok(());
        }
        if self.last_common_uid_found {
            if change.uid <= self.last_common_uid {
                if change.kind == ChangeType::Save {
                    return Err(ImportError::Protocol(format!(
                        "remote sent a save for UID {} at or below the last common UID {}",
                        change.uid, self.last_common_uid
                    )));
                }
            } else if change.kind == ChangeType::Expunge {
                return Ok(());
            } else if change.kind != ChangeType::Save {
                return Err(ImportError::Protocol(format!(
                    "remote sent a flag change for UID {} above the last common UID {}",
                    change.uid, self.last_common_uid
                )));
            }
        }
        match change.kind {
            ChangeType::Save => self.import_save(mb, change)?,
            ChangeType::Expunge => self.import_expunge(mb, change),
            ChangeType::FlagChange => {
                if !self.last_common_uid_found {
                    return Err(ImportError::Protocol(format!(
                        "flag change for UID {} before the common UIDs were known",
                        change.uid
                    )));
                }
                self.flag_change(mb, change)?;
            }
        }
        match &self.failed {
            Some(f) => Err(ImportError::Failed(f.clone())),
            None => Ok(()),
        }
    }

    /// `dsync_mailbox_import_assign_new_uids`. Fails when the UID space is used up.
    fn assign_new_uids(&mut self) -> Result<(), ImportError> {
        self.newmails.link_by_guid().map_err(|e| self.io_error(e))?;
        let mut common_uid_next = self.local_uid_next.max(self.remote.uid_next).max(1);
        for i in 0..self.newmails.len() {
            if self.newmails[i].skip {
                continue;
            }
            let new_uid = if self.newmails[i].uid_is_usable {
                self.newmails[i].final_uid
            } else if let Some(l) = self.newmails[i].link.get().filter(|&l| self.newmails[l].uid_is_usable) {
                self.newmails[l].final_uid
            } else {
                let u = common_uid_next;
                if u > MAX_UID {
                    return Err(ImportError::Limit(format!(
                        "no UID left for new mails (the highest UID is {MAX_UID})"
                    )));
                }
                common_uid_next += 1;
                u
            };
            self.newmails[i].final_uid = new_uid;
            if let Some(l) = self.newmails[i].link.get()
                && l != i
            {
                self.newmails[l].skip = true;
            }
        }
        self.last_common_uid = common_uid_next - 1;
        self.new_uids_assigned = true;
        let nm = &self.newmails;
        let order = runs::sort_pairs(
            self.scratch.clone(),
            (0..nm.len()).map(|i| {
                if i % spill::RELEASE_EVERY == spill::RELEASE_EVERY - 1 {
                    nm.release();
                }
                [nm[i].final_uid, i as u32]
            }),
        );
        self.order = order.map_err(|e| self.io_error(e))?;
        Ok(())
    }

    /// An error of the files a large import keeps its lists in.
    fn io_error(&self, e: io::Error) -> ImportError {
        let place = self.scratch.as_deref().map_or_else(|| "(memory)".into(), Path::to_path_buf);
        ImportError::Store(StoreError::io("read", place, e))
    }

    /// Handles everything after the remote's change list ended: local mails above the common
    /// prefix become new mails, UIDs are assigned, local instances are reused and the rest is
    /// requested. After this, [`Importer::next_request`] yields the `R` records.
    pub(crate) fn changes_finish<M: Mailbox>(&mut self, mb: &mut M) -> Result<(), ImportError> {
        if self.new_uids_assigned {
            return Ok(());
        }
        if !self.last_common_uid_found {
            self.common_uid_found(mb);
        }
        let _ = self.next_mail(mb, self.last_common_uid.saturating_add(1));
        while self.cur.is_some() && self.failed.is_none() {
            let _ = self.try_save(mb, None);
        }
        self.assign_new_uids()?;
        if self.failed.is_none() {
            self.handle_local_mails(mb)?;
        }
        match &self.failed {
            Some(f) => Err(ImportError::Failed(f.clone())),
            None => Ok(()),
        }
    }

    fn chain(&self, first: usize) -> Vec<usize> {
        let mut v = Vec::new();
        let mut cur = Some(first);
        while let Some(i) = cur {
            v.push(i);
            cur = self.newmails[i].next.get();
        }
        v
    }

    fn handle_local_mails<M: Mailbox>(&mut self, mb: &mut M) -> Result<(), ImportError> {
        for first in 0..self.newmails.len() {
            if first % spill::RELEASE_EVERY == spill::RELEASE_EVERY - 1 {
                self.newmails.release();
            }
            if self.newmails[first].first && !self.handle_mail(mb, first)? {
                self.newmails[first].pending = true;
            }
        }
        for (u, first) in self.import_uids.take_all() {
            if !self.handle_mail(mb, first)? {
                self.import_uids.insert(u, first);
            }
        }
        self.local_handled = true;
        self.newmails.index_pending().map_err(|e| self.io_error(e))
    }

    /// `dsync_mailbox_import_handle_mail`: true if handled locally, false if requested.
    fn handle_mail<M: Mailbox>(&mut self, mb: &mut M, first: usize) -> Result<bool, ImportError> {
        let chain = self.chain(first);
        let mut local_uids = BTreeSet::new();
        let mut wanted = BTreeSet::new();
        let mut request: Option<u32> = None;
        for &i in &chain {
            let m = &self.newmails[i];
            if m.uid_in_local {
                local_uids.insert(m.local_uid);
            } else if request.is_none() {
                request = Some(i as u32);
            }
            if !m.skip {
                wanted.insert(m.final_uid);
            }
        }
        if self.try_local(mb, first, &chain, &local_uids, &wanted)? {
            return Ok(true);
        }
        if self.opts.want_mail_requests
            && let Some(i) = request
        {
            self.requests.push(i);
        }
        Ok(false)
    }

    /// Where a local mail is now: at its old UID, or (moved by this import and committed
    /// since) at the UID the store gave it.
    fn local_now<M: Mailbox>(&self, mb: &M, uid: u32) -> Option<MailRecord> {
        if let Some(r) = Uid::new(uid).and_then(|u| mb.mail(u)) {
            return Some(r);
        }
        let wanted = self.moved.get(&uid)?;
        let actual = self.committed.get(wanted)?;
        Uid::new(*actual).and_then(|u| mb.mail(u))
    }

    /// `dsync_mailbox_import_try_local`: reuse local instances (moving them to the wanted
    /// UIDs), expunge unwanted ones, and copy a local instance to the remaining wanted UIDs.
    fn try_local<M: Mailbox>(
        &mut self,
        mb: &mut M,
        first: usize,
        chain: &[usize],
        local_uids: &BTreeSet<u32>,
        wanted: &BTreeSet<u32>,
    ) -> Result<bool, ImportError> {
        if local_uids.is_empty() {
            return Ok(false);
        }
        let mut assigned = BTreeSet::new();
        let mut unwanted: Vec<u32> = Vec::new();
        let wanted_v: Vec<u32> = wanted.iter().copied().collect();
        let mut wi = 0;
        for &l in local_uids {
            if let Some(&w) = wanted_v.get(wi)
                && l == w
            {
                assigned.insert(w);
                wi += 1;
                continue;
            }
            unwanted.push(l);
        }
        // Reuse existing mails by giving them the wanted UIDs (latest first).
        while let Some(&w) = wanted_v.get(wi) {
            let Some(old) = unwanted.pop() else { break };
            // Staged like a save: the old UID stays readable until the commit, and the
            // commit hands out UIDs in ascending order together with the saves.
            match mb.stage_move(
                Uid::new(old).ok_or_else(|| ImportError::Protocol("UID 0".into()))?,
                Uid::new(w).unwrap_or(Uid::MIN),
            ) {
                Ok(()) => {
                    self.moved.insert(old, w);
                    self.move_targets.insert(w);
                    self.highest_wanted_uid = self.highest_wanted_uid.max(w);
                    self.pending_wanted.push(w);
                    assigned.insert(w);
                    wi += 1;
                }
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        for u in unwanted {
            self.expunges.insert(u64::from(u));
        }
        for &i in chain {
            if !self.newmails[i].skip && assigned.contains(&self.newmails[i].final_uid) {
                self.newmails[i].skip = true;
            }
        }
        if wi >= wanted_v.len() {
            return Ok(true);
        }
        // Copy a local instance to the remaining wanted UIDs.
        for &l in local_uids {
            let Some(rec) = self.local_now(mb, l) else { continue };
            let uid = rec.uid.get();
            let guid = self.newmails.guid(first);
            if !guid.is_empty() && rec.guid.as_str() != guid {
                self.unexpected_state(format!("Unexpected GUID mismatch (3) for UID={uid}: {} != {guid}", rec.guid));
                return Ok(false);
            }
            let received = mb.received_date(rec.uid).ok();
            let header = MailHeader {
                guid: rec.guid.as_str().to_owned(),
                uid: 0,
                received_date: received.unwrap_or(0),
                has_body: true,
                ..Default::default()
            };
            // Streamed from the file: a large mail is never held in memory.
            let mut body = mb.open_body(rec.uid)?;
            self.save_newmails(mb, &header, first, &mut body)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The next `R` record to send.
    pub(crate) fn next_request(&mut self) -> Option<MailRequest> {
        let &i = self.requests.get(self.request_idx)?;
        self.request_idx += 1;
        if self.request_idx == self.requests.len() {
            self.requests = SpillVec::default();
            self.request_idx = 0;
        }
        let guid = self.newmails.guid(i as usize);
        Some(MailRequest {
            guid: (!guid.is_empty()).then(|| guid.to_owned()),
            uid: self.newmails[i as usize].remote_uid,
        })
    }

    /// True while [`Importer::next_request`] has more to give.
    pub(crate) fn has_more_requests(&self) -> bool {
        self.request_idx < self.requests.len()
    }

    /// Saves every wanted instance of a mail from one body: the first from the stream, the
    /// others as copies of that first one (the body is never held in memory).
    fn save_newmails<M: Mailbox>(
        &mut self,
        mb: &mut M,
        header: &MailHeader,
        first: usize,
        body: &mut dyn Read,
    ) -> Result<(), ImportError> {
        let targets: Vec<usize> = self.chain(first).into_iter().filter(|&i| !self.newmails[i].skip).collect();
        if targets.is_empty() {
            return Ok(());
        }
        let guid = if header.guid.is_empty() { None } else { MailGuid::new(&header.guid).ok() };
        for (n, &i) in targets.iter().enumerate() {
            let final_uid = self.newmails[i].final_uid;
            let change = [i, first].into_iter().find(|&j| self.newmails[j].has_change);
            let (flags, keywords, modseq) = match change {
                Some(j) => (
                    Flags::from_bits_truncate(self.newmails[j].flags),
                    self.newmails.keywords(j).iter().filter_map(|k| Keyword::new(k).ok()).collect(),
                    self.newmails[j].modseq,
                ),
                None => (Flags::NONE, Vec::new(), 0),
            };
            let req = SaveRequest {
                uid: Uid::new(final_uid),
                guid: guid.clone(),
                flags,
                keywords,
                received: (header.received_date > 0).then_some(header.received_date),
                min_modseq: modseq,
            };
            if n == 0 {
                mb.save(req, body)?;
            } else {
                mb.save_copy_of_last(req)?;
            }
            self.newmails[i].saved = true;
            self.pending_wanted.push(final_uid);
            self.highest_wanted_uid = self.highest_wanted_uid.max(final_uid);
            self.saves_since_commit += 1;
        }
        while let Some(&[_, i]) = self.order.get(self.first_unsaved_idx) {
            self.order.note_lookup(self.first_unsaved_idx);
            let m = &self.newmails[i as usize];
            if !m.saved && !m.skip {
                break;
            }
            self.first_unsaved_idx += 1;
        }
        // Committing early is safe only if every later save has a higher UID than every one
        // staged (the store hands UIDs out in ascending order), no move is still to come, and
        // none was made: a moved mail's old UID must stay readable until the end, for the
        // export that may still send it.
        let below_the_rest =
            self.order.get(self.first_unsaved_idx).is_none_or(|&[uid, _]| self.highest_wanted_uid < uid);
        if self.saves_since_commit >= self.opts.commit_msgs_interval.max(1)
            && self.local_handled
            && self.moved.is_empty()
            && below_the_rest
        {
            self.commit(mb)?;
        }
        Ok(())
    }

    fn commit<M: Mailbox>(&mut self, mb: &mut M) -> Result<(), ImportError> {
        let saved = mb.commit()?;
        let wanted = std::mem::take(&mut self.pending_wanted);
        for (s, w) in saved.iter().zip(wanted) {
            self.wanted_uids.push(w);
            self.saved_uids.push(s.uid.get());
            if self.move_targets.contains(&w) {
                self.committed.insert(w, s.uid.get());
            }
        }
        self.saves_since_commit = 0;
        Ok(())
    }

    /// Imports one `M` record and its body. Returns false for a mail we did not ask for
    /// (its body is skipped).
    pub(crate) fn import_mail<M: Mailbox>(
        &mut self,
        mb: &mut M,
        header: &MailHeader,
        body: Option<&mut dyn Read>,
    ) -> Result<bool, ImportError> {
        if !self.new_uids_assigned {
            return Err(ImportError::Protocol("mail received before the change list ended".into()));
        }
        if self.failed.is_some() || self.require_full_resync {
            // The body is skipped by the connection.
            return Ok(true);
        }
        let found = if !header.guid.is_empty() {
            self.newmails.take_pending(&header.guid)
        } else {
            self.import_uids.remove(&header.uid)
        };
        let Some(first) = found else {
            if self.opts.want_mail_requests {
                tracing::error!("remote sent an unwanted mail body for GUID={} UID={}", header.guid, header.uid);
            }
            return Ok(false);
        };
        match body {
            Some(b) if header.has_body => self.save_newmails(mb, header, first, b)?,
            _ => {
                // Expunged on the remote meanwhile: nothing to save.
                for i in self.chain(first) {
                    self.newmails[i].skip = true;
                }
            }
        }
        Ok(true)
    }

    /// Renumbers mails that ended up at UIDs we did not want because another writer saved
    /// mails during the sync (`reassign_unwanted_uids`). Only mails that exist are looked at,
    /// so a peer's huge UIDNEXT costs nothing.
    fn reassign_unwanted<M: Mailbox>(&mut self, mb: &mut M) -> Result<Option<String>, ImportError> {
        if self.wanted_uids.is_empty() || self.wanted_uids.len() != self.saved_uids.len() {
            return Ok(None);
        }
        let highest_seen = (self.remote.uid_next.saturating_sub(1)).max(self.highest_wanted_uid);
        if self.local_uid_next > highest_seen {
            return Ok(None);
        }
        // The UIDs we saved and got, sorted; the mails in the range that are not among them
        // were saved by another writer (found by a walk, never listing the whole mailbox).
        let kept = runs::sort_pairs(
            self.scratch.clone(),
            self.wanted_uids
                .iter_releasing()
                .zip(self.saved_uids.iter_releasing())
                .filter(|(w, s)| w == s)
                .map(|(_, &s)| [s, 0]),
        )
        .map_err(|e| self.io_error(e))?;
        let mut unwanted: Vec<Uid> = Vec::new();
        let mut at = self.local_uid_next.saturating_sub(1);
        while let Some(u) = mb.uid_after(at).filter(|u| u.get() <= highest_seen) {
            at = u.get();
            if kept.search_by_key(at, |p| p[0]).is_err() {
                unwanted.push(u);
            }
        }
        drop(kept);
        let mut renumbered = 0;
        for &u in &unwanted {
            let target = mb.status().uid_next;
            if target > MAX_UID {
                return Err(ImportError::Limit(format!("no UID left to renumber UID {u} to")));
            }
            match mb.stage_move(u, Uid::new(target).unwrap_or(u)) {
                Ok(()) => renumbered += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        if renumbered == 0 {
            return Ok(None);
        }
        mb.commit()?;
        self.last_common_uid = self.local_uid_next.saturating_sub(1);
        Ok(Some(format!("{renumbered} UIDs changed due to UID conflicts")))
    }

    /// Finishes the import: commits, updates the mailbox's numbers and reports the state.
    pub(crate) fn finish<M: Mailbox>(mut self, mb: &mut M, success: bool) -> Result<ImportResult, ImportError> {
        if (!success || self.require_full_resync) && self.failed.is_none() {
            self.failed = Some("incomplete import".to_owned());
        }
        if !self.new_uids_assigned
            && self.failed.is_none()
            && let Err(e) = self.assign_new_uids()
        {
            self.fail(e.to_string());
        }
        if self.failed.is_none() {
            let firsts = self.newmails.pending().chain(self.import_uids.values());
            let missing: Vec<String> = firsts
                .flat_map(|f| self.chain(f))
                .filter(|&i| !self.newmails[i].skip && !self.newmails[i].saved)
                .take(20)
                .map(|i| format!("GUID={} UID={}", self.newmails.guid(i), self.newmails[i].remote_uid))
                .collect();
            if !missing.is_empty() {
                self.fail(format!("remote didn't send mails: {}", missing.join(", ")));
            }
        }
        let mut changes_during_sync = None;
        let commit = self.commit(mb);
        let mut ok = commit.is_ok() && self.failed.is_none();
        if commit.is_ok() {
            // In pieces, in UID order, so that neither this list nor the store's record of
            // the expunges holds them all (a backup may expunge a whole mailbox).
            let mut piece = Vec::with_capacity(EXPUNGE_PIECE);
            for u in self.expunges.sorted() {
                piece.extend(u32::try_from(u).ok().and_then(Uid::new));
                if piece.len() == EXPUNGE_PIECE {
                    mb.expunge(&piece)?;
                    piece.clear();
                }
            }
            if !piece.is_empty() {
                mb.expunge(&piece)?;
            }
        }
        if ok {
            let update = MailboxUpdate {
                min_next_uid: Some(self.remote.uid_next),
                min_first_recent_uid: Some(self.last_common_uid.saturating_add(1).min(self.remote.first_recent_uid)),
                min_highest_modseq: Some(self.remote.highest_modseq),
                ..Default::default()
            };
            if let Err(e) = mb.update(&update) {
                tracing::error!("updating the mailbox failed: {e}");
                ok = false;
            }
        } else {
            tracing::debug!(failed = ?self.failed, "import incomplete: the mailbox's numbers are left as they are");
        }
        if ok {
            changes_during_sync = self.reassign_unwanted(mb)?;
        }
        let (modseq, pvt) = if changes_during_sync.is_none() {
            (self.remote.highest_modseq, self.remote.highest_pvt_modseq)
        } else {
            (self.local_initial_hms, self.local_initial_pvt_hms)
        };
        let messages_count = if self.delete_mailbox { 0 } else { mb.status().messages };
        mb.sync_point()?;
        commit?;
        let error = if self.require_full_resync { None } else { self.failed.clone() };
        let result = ImportResult {
            error,
            delete_mailbox: self.delete_mailbox,
            last_common_uid: self.last_common_uid,
            last_common_modseq: modseq,
            last_common_pvt_modseq: pvt,
            messages_count,
            changes_during_sync,
            require_full_resync: self.require_full_resync,
        };
        Ok(result)
    }
}

/// Dovecot's `merge_flags` for one 32-bit group (no private flags here): returns the flags to
/// add and remove locally; sets `remote_changed` if the result differs from the remote's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_flags(
    local_final: u8,
    mut local_add: u8,
    mut local_remove: u8,
    remote_final: u8,
    mut remote_add: u8,
    mut remote_remove: u8,
    prefer_remote: bool,
    remote_changed: &mut bool,
) -> (u8, u8) {
    let conflict = local_add & remote_remove;
    if conflict != 0 {
        if prefer_remote {
            local_add &= !conflict;
        } else {
            remote_remove &= !conflict;
        }
    }
    let conflict = local_remove & remote_add;
    if conflict != 0 {
        if prefer_remote {
            local_remove &= !conflict;
        } else {
            remote_add &= !conflict;
        }
    }
    let differ = local_final ^ remote_final;
    let combined_add = (local_add | remote_add) & differ;
    let combined_remove = (local_remove | remote_remove) & differ;
    let mut local_wanted = (local_final | combined_add) & !combined_remove;
    let remote_wanted = (remote_final | combined_add) & !combined_remove;
    if local_wanted ^ remote_wanted != 0 && prefer_remote {
        local_wanted = remote_wanted;
    }
    if local_wanted != remote_final {
        *remote_changed = true;
    }
    (local_wanted & !local_final, local_final & !local_wanted)
}

/// Dovecot's `merge_keywords`: the same merge per keyword name. Returns the final keywords.
fn merge_keywords(
    local_final: &[Keyword],
    local_changes: &[(KwOp, String)],
    remote_changes: &[(KwOp, String)],
    prefer_remote: bool,
    remote_changed: &mut bool,
) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let idx = |names: &mut Vec<String>, n: &str| -> usize {
        match names.iter().position(|x| x == n) {
            Some(i) => i,
            None => {
                names.push(n.to_owned());
                names.len() - 1
            }
        }
    };
    let mut bits: Vec<[bool; 6]> = Vec::new(); // la lr lf ra rr rf
    let set = |names: &mut Vec<String>, bits: &mut Vec<[bool; 6]>, n: &str, slot: usize| {
        let i = idx(names, n);
        if bits.len() <= i {
            bits.resize(i + 1, [false; 6]);
        }
        bits[i][slot] = true;
    };
    for (op, n) in remote_changes {
        match op {
            KwOp::Add => set(&mut names, &mut bits, n, 3),
            KwOp::Remove => set(&mut names, &mut bits, n, 4),
            KwOp::Final => set(&mut names, &mut bits, n, 5),
            KwOp::AddAndFinal => {
                set(&mut names, &mut bits, n, 3);
                set(&mut names, &mut bits, n, 5);
            }
        }
    }
    for (op, n) in local_changes {
        match op {
            KwOp::Add | KwOp::AddAndFinal => set(&mut names, &mut bits, n, 0),
            KwOp::Remove => set(&mut names, &mut bits, n, 1),
            KwOp::Final => {
                let i = idx(&mut names, n);
                if bits.len() <= i {
                    bits.resize(i + 1, [false; 6]);
                }
            }
        }
    }
    for k in local_final {
        set(&mut names, &mut bits, k.as_str(), 2);
    }
    let mut out = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let b = bits.get(i).copied().unwrap_or([false; 6]);
        let bit = |x: bool| u8::from(x);
        let (add, remove) = merge_flags(
            bit(b[2]),
            bit(b[0]),
            bit(b[1]),
            bit(b[5]),
            bit(b[3]),
            bit(b[4]),
            prefer_remote,
            remote_changed,
        );
        let present = (bit(b[2]) | add) & !remove;
        if present != 0 {
            out.push(n.clone());
        }
    }
    // Keep our existing keywords in their order, then new ones.
    let mut ordered: Vec<String> =
        local_final.iter().map(|k| k.as_str().to_owned()).filter(|k| out.contains(k)).collect();
    for n in out {
        if !ordered.contains(&n) {
            ordered.push(n);
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{MailStore, MailboxName};

    /// A peer may save one GUID at every UID: all instances form one group, asked for once and
    /// saved from one body. The group is built in linear time (it used to walk the group's
    /// chain for each instance: some 5,000,000,000 steps here).
    #[test]
    fn one_guid_at_100000_uids_is_asked_for_once_and_saved_at_each() {
        const N: u32 = 100_000;
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        let opts = ImportOptions {
            master_brain: false,
            revert_local_changes: true,
            want_mail_requests: true,
            mails_use_guid128: false,
            commit_msgs_interval: 100,
            max_mails: 4_000_000,
            filter: MailFilter::default(),
        };
        let remote = RemoteBox { uid_next: N + 1, first_recent_uid: 1, highest_modseq: 2, highest_pvt_modseq: 0 };
        let mut imp = Importer::new(&mut mb, opts, LastCommon::default(), remote).unwrap();
        let guid = "0123456789abcdef0123456789abcdef";
        for uid in 1..=N {
            let mut c = MailChange::new(ChangeType::Save, uid);
            c.guid = Some(guid.to_owned());
            c.modseq = 2;
            imp.import_change(&mut mb, &c).unwrap();
        }
        imp.changes_finish(&mut mb).unwrap();
        let requests: Vec<MailRequest> = std::iter::from_fn(|| imp.next_request()).collect();
        assert_eq!(requests, vec![MailRequest { guid: Some(guid.to_owned()), uid: 1 }]);
        let header = MailHeader { guid: guid.to_owned(), uid: 1, has_body: true, ..Default::default() };
        let body = b"Subject: many\n\nbody\n";
        assert!(imp.import_mail(&mut mb, &header, Some(&mut &body[..])).unwrap());
        assert!(!imp.import_mail(&mut mb, &header, Some(&mut &body[..])).unwrap(), "asked for once");
        let r = imp.finish(&mut mb, true).unwrap();
        assert_eq!(r.error, None);
        assert_eq!(mb.status().messages, N);
        assert_eq!(mb.uid_after(N - 1).map(Uid::get), Some(N));
    }

    #[test]
    fn merge_flags_tie_prefers_the_chosen_side() {
        let mut rc = false;
        // Local added \Seen, remote removed it: remote preferred -> removed.
        let (a, r) = merge_flags(0x08, 0x08, 0, 0, 0, 0x08, true, &mut rc);
        assert_eq!((a, r), (0, 0x08));
        let mut rc = false;
        let (a, r) = merge_flags(0x08, 0x08, 0, 0, 0, 0x08, false, &mut rc);
        assert_eq!((a, r), (0, 0));
        assert!(rc);
        // Identical flags are never touched.
        let mut rc = false;
        assert_eq!(merge_flags(0x0a, 0, 0, 0x0a, 0x02, 0, true, &mut rc), (0, 0));
        assert!(!rc);
    }

    #[test]
    fn keyword_merge() {
        let local = vec![Keyword::new("a").unwrap(), Keyword::new("b").unwrap()];
        let mut rc = false;
        let out = merge_keywords(
            &local,
            &[],
            &[(KwOp::Final, "a".into()), (KwOp::Remove, "b".into()), (KwOp::AddAndFinal, "c".into())],
            true,
            &mut rc,
        );
        assert_eq!(out, vec!["a".to_owned(), "c".to_owned()]);
    }
}
