//! An in-memory [`MailStore`] for fast tests of code above the store (the sync engine).
//!
//! It keeps the same observable rules as the Maildir store: UIDs never reused, a UID asked for
//! is used only if it is still free, one modseq per change, a change log with a floor, and the
//! mailbox-list change log. Cloning a [`MemoryStore`] shares the data, so a test can keep a
//! handle to inspect what the code under test did.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    Change, FlagOp, Flags, Guid128, Keyword, ListChange, ListChangeKind, MAX_MAILBOX_KEYWORDS, MAX_UID, MailGuid,
    MailRecord, MailStore, Mailbox, MailboxInfo, MailboxKind, MailboxName, MailboxStatus, MailboxUpdate, Modseq,
    SaveRequest, SavedMail, StoreError, StoreResult, Uid, UnixTime,
};

#[derive(Debug, Clone)]
struct MemMail {
    uid: Uid,
    guid: MailGuid,
    flags: Flags,
    keywords: Vec<Keyword>,
    modseq: Modseq,
    received: UnixTime,
    body: Arc<Vec<u8>>,
    recent: bool,
}

#[derive(Debug, Clone)]
struct MemMailbox {
    guid: Guid128,
    uid_validity: u32,
    uid_next: u32,
    first_recent_uid: u32,
    highest_modseq: Modseq,
    replicated_modseq: Modseq,
    peer_modseq: Modseq,
    log_floor: Modseq,
    history_lost: bool,
    /// Every keyword ever used in the mailbox, lowercased (the Maildir store's table never
    /// shrinks either), for the [`MAX_MAILBOX_KEYWORDS`] bound.
    keywords_used: std::collections::BTreeSet<String>,
    mails: BTreeMap<Uid, MemMail>,
    log: VecDeque<Change>,
}

#[derive(Debug, Default)]
struct Data {
    mailboxes: BTreeMap<MailboxName, MemMailbox>,
    dirs: BTreeMap<MailboxName, ()>,
    subscriptions: BTreeMap<MailboxName, ()>,
    changes: Vec<ListChange>,
    next_uid_validity: u32,
    guid_counter: u64,
}

/// An in-memory mail store with `/` as hierarchy separator.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    data: Arc<Mutex<Data>>,
}

fn now() -> UnixTime {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}

fn lock(data: &Mutex<Data>) -> MutexGuard<'_, Data> {
    data.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    /// An empty store with an INBOX.
    pub fn new() -> Self {
        let s = Self::default();
        {
            let mut d = lock(&s.data);
            d.next_uid_validity = 1_000_000;
            let mb = new_mailbox(Guid128::generate(), 999_999);
            d.mailboxes.insert(MailboxName::inbox(), mb);
        }
        s
    }

    /// Number of mails in a mailbox (for tests).
    pub fn message_count(&self, name: &MailboxName) -> Option<usize> {
        lock(&self.data).mailboxes.get(name).map(|m| m.mails.len())
    }

    /// Does to a mailbox what losing the Maildir store's index does (for tests of the sync
    /// engine): modseqs restart low (every mail at 2, HIGHESTMODSEQ 2, or 1 when empty), the
    /// change log is gone and [`MailboxStatus::history_lost`] is set. Returns false if there
    /// is no such mailbox.
    pub fn lose_history(&self, name: &MailboxName) -> bool {
        let mut d = lock(&self.data);
        let Some(mb) = d.mailboxes.get_mut(name) else {
            return false;
        };
        let base = if mb.mails.is_empty() { 1 } else { 2 };
        for m in mb.mails.values_mut() {
            m.modseq = base;
        }
        mb.highest_modseq = base;
        mb.log_floor = base;
        mb.log.clear();
        mb.replicated_modseq = 0;
        mb.history_lost = true;
        true
    }
}

/// Records `keywords` as used in `mb`, refusing more than [`MAX_MAILBOX_KEYWORDS`] distinct ones.
fn use_keywords(mb: &mut MemMailbox, keywords: &[Keyword]) -> StoreResult<()> {
    for k in keywords {
        let key = k.as_str().to_ascii_lowercase();
        if !mb.keywords_used.contains(&key) {
            if mb.keywords_used.len() >= MAX_MAILBOX_KEYWORDS {
                return Err(StoreError::Limit(format!(
                    "cannot add keyword {k}: a mailbox holds at most {MAX_MAILBOX_KEYWORDS} distinct keywords"
                )));
            }
            mb.keywords_used.insert(key);
        }
    }
    Ok(())
}

fn new_mailbox(guid: Guid128, uid_validity: u32) -> MemMailbox {
    MemMailbox {
        guid,
        uid_validity,
        uid_next: 1,
        first_recent_uid: 1,
        highest_modseq: 1,
        replicated_modseq: 0,
        peer_modseq: 0,
        log_floor: 1,
        history_lost: false,
        keywords_used: std::collections::BTreeSet::new(),
        mails: BTreeMap::new(),
        log: VecDeque::new(),
    }
}

impl MailStore for MemoryStore {
    type Mailbox = MemoryMailbox;

    fn lock_sync(&mut self, _timeout: std::time::Duration) -> StoreResult<Box<dyn std::any::Any>> {
        // One process, one store: nothing else can sync it meanwhile.
        Ok(Box::new(()))
    }

    fn hierarchy_separator(&self) -> char {
        '/'
    }

    fn list(&mut self) -> StoreResult<Vec<MailboxInfo>> {
        let d = lock(&self.data);
        let mut out: BTreeMap<MailboxName, MailboxInfo> = BTreeMap::new();
        let blank = |name: &MailboxName, kind| MailboxInfo {
            name: name.clone(),
            kind,
            guid: None,
            uid_validity: 0,
            uid_next: 0,
            subscribed: false,
            last_renamed_or_created: 0,
            last_subscription_change: 0,
        };
        for (name, mb) in &d.mailboxes {
            let mut i = blank(name, MailboxKind::Mailbox);
            i.guid = Some(mb.guid);
            i.uid_validity = mb.uid_validity;
            i.uid_next = mb.uid_next;
            out.insert(name.clone(), i);
        }
        for name in d.dirs.keys() {
            out.entry(name.clone()).or_insert_with(|| blank(name, MailboxKind::Directory));
        }
        let names: Vec<MailboxName> = out.keys().chain(d.subscriptions.keys()).cloned().collect();
        for n in names {
            let mut p = Some(n.clone());
            while let Some(x) = p {
                out.entry(x.clone()).or_insert_with(|| blank(&x, MailboxKind::Nonexistent));
                p = x.parent();
            }
        }
        for s in d.subscriptions.keys() {
            if let Some(i) = out.get_mut(s) {
                i.subscribed = true;
            }
        }
        Ok(out.into_values().collect())
    }

    fn list_changes(&mut self) -> StoreResult<Vec<ListChange>> {
        Ok(lock(&self.data).changes.clone())
    }

    fn create_mailbox(
        &mut self,
        name: &MailboxName,
        guid: Option<Guid128>,
        uid_validity: Option<u32>,
    ) -> StoreResult<()> {
        let mut d = lock(&self.data);
        if d.mailboxes.contains_key(name) {
            return Err(StoreError::MailboxExists(name.join('/')));
        }
        let uv = match uid_validity {
            Some(v) if v != 0 => v,
            _ => {
                d.next_uid_validity = d.next_uid_validity.wrapping_add(1).max(1);
                d.next_uid_validity
            }
        };
        d.guid_counter += 1;
        let guid = guid.filter(|g| !g.is_empty()).unwrap_or_else(Guid128::generate);
        d.mailboxes.insert(name.clone(), new_mailbox(guid, uv));
        Ok(())
    }

    fn delete_mailbox(&mut self, name: &MailboxName) -> StoreResult<()> {
        if name.is_inbox() {
            return Err(StoreError::NotPossible("INBOX can't be deleted.".to_owned()));
        }
        let mut d = lock(&self.data);
        let mb = d.mailboxes.remove(name).ok_or_else(|| StoreError::MailboxNotFound(name.join('/')))?;
        let t = now();
        d.changes.push(ListChange { kind: ListChangeKind::DeleteMailbox, guid: mb.guid, time: t });
        Ok(())
    }

    fn clear_inbox(&mut self) -> StoreResult<()> {
        let mut d = lock(&self.data);
        let old = d.mailboxes.remove(&MailboxName::inbox());
        if let Some(mb) = old {
            let t = now();
            d.changes.push(ListChange { kind: ListChangeKind::DeleteMailbox, guid: mb.guid, time: t });
        }
        Ok(())
    }

    fn rename_mailbox(&mut self, from: &MailboxName, to: &MailboxName) -> StoreResult<()> {
        if from.is_inbox() || to.is_inbox() {
            return Err(StoreError::NotPossible("renaming INBOX is not supported".to_owned()));
        }
        if to.starts_with(from) {
            return Err(StoreError::NotPossible("can't rename a mailbox under itself".to_owned()));
        }
        let mut d = lock(&self.data);
        let moving: Vec<MailboxName> = d.mailboxes.keys().filter(|n| n.starts_with(from)).cloned().collect();
        if moving.is_empty() {
            return Err(StoreError::MailboxNotFound(from.join('/')));
        }
        for n in &moving {
            let dest = n.rebase(from, to).ok_or_else(|| StoreError::MailboxNotFound(n.join('/')))?;
            if d.mailboxes.contains_key(&dest) {
                return Err(StoreError::MailboxExists(dest.join('/')));
            }
        }
        for n in moving {
            if let (Some(mb), Some(dest)) = (d.mailboxes.remove(&n), n.rebase(from, to)) {
                d.mailboxes.insert(dest, mb);
            }
        }
        let t = now();
        d.changes.push(ListChange {
            kind: ListChangeKind::Rename,
            guid: Guid128::sha128(to.join('/').as_bytes()),
            time: t,
        });
        Ok(())
    }

    fn set_subscribed(&mut self, name: &MailboxName, subscribed: bool) -> StoreResult<()> {
        let mut d = lock(&self.data);
        let changed = if subscribed {
            d.subscriptions.insert(name.clone(), ()).is_none()
        } else {
            d.subscriptions.remove(name).is_some()
        };
        if changed {
            let kind = if subscribed { ListChangeKind::Subscribe } else { ListChangeKind::Unsubscribe };
            let t = now();
            d.changes.push(ListChange { kind, guid: Guid128::sha128(name.join('/').as_bytes()), time: t });
        }
        Ok(())
    }

    fn forget_subscription(&mut self, name: &MailboxName) -> StoreResult<()> {
        let mut d = lock(&self.data);
        d.subscriptions.remove(name);
        let t = now();
        d.changes.push(ListChange {
            kind: ListChangeKind::Unsubscribe,
            guid: Guid128::sha128(name.join('/').as_bytes()),
            time: t,
        });
        Ok(())
    }

    fn open(&mut self, name: &MailboxName) -> StoreResult<MemoryMailbox> {
        let d = lock(&self.data);
        let mb = d.mailboxes.get(name).ok_or_else(|| StoreError::MailboxNotFound(name.join('/')))?;
        Ok(MemoryMailbox {
            data: self.data.clone(),
            name: name.clone(),
            guid: mb.guid,
            pending: Vec::new(),
            importing: false,
            import_modseq: None,
        })
    }
}

/// An open in-memory mailbox.
#[derive(Debug)]
pub struct MemoryMailbox {
    data: Arc<Mutex<Data>>,
    name: MailboxName,
    guid: Guid128,
    /// Staged saves: request, body, and the UID the mail moves away from (for moves).
    pending: Vec<(SaveRequest, Vec<u8>, Option<Uid>)>,
    /// An import is in progress ([`Mailbox::begin_import`]).
    importing: bool,
    /// The import's one modseq, if it asked for one.
    import_modseq: Option<Modseq>,
}

impl MemoryMailbox {
    fn with<T>(&self, f: impl FnOnce(&mut MemMailbox) -> StoreResult<T>) -> StoreResult<T> {
        let mut d = lock(&self.data);
        let mb = d
            .mailboxes
            .values_mut()
            .find(|m| m.guid == self.guid)
            .ok_or_else(|| StoreError::MailboxNotFound(self.name.join('/')))?;
        f(mb)
    }

    fn read<T>(&self, f: impl FnOnce(&MemMailbox) -> T) -> Option<T> {
        let d = lock(&self.data);
        d.mailboxes.values().find(|m| m.guid == self.guid).map(f)
    }
}

fn record(m: &MemMail) -> MailRecord {
    MailRecord {
        uid: m.uid,
        guid: m.guid.clone(),
        flags: m.flags,
        keywords: m.keywords.clone(),
        modseq: m.modseq,
        recent: m.recent,
    }
}

/// The modseq of a change: one above HIGHESTMODSEQ (or the import's one modseq), raised to
/// `min`.
fn bump(mb: &mut MemMailbox, one: Option<Modseq>, min: Modseq) -> Modseq {
    let modseq = one.unwrap_or(mb.highest_modseq.saturating_add(1)).max(min);
    mb.highest_modseq = mb.highest_modseq.max(modseq);
    modseq
}

impl Mailbox for MemoryMailbox {
    fn name(&self) -> &MailboxName {
        &self.name
    }

    fn status(&self) -> MailboxStatus {
        self.read(|mb| MailboxStatus {
            guid: mb.guid,
            uid_validity: mb.uid_validity,
            uid_next: mb.uid_next,
            messages: mb.mails.len() as u32,
            unseen: mb.mails.values().filter(|m| !m.flags.contains(Flags::SEEN)).count() as u32,
            recent: mb.mails.values().filter(|m| m.recent).count() as u32,
            first_recent_uid: mb.first_recent_uid,
            highest_modseq: mb.highest_modseq,
            replicated_modseq: mb.replicated_modseq,
            peer_modseq: mb.peer_modseq,
            history_lost: mb.history_lost,
            log_floor: mb.log_floor,
            other_index_modseq: None,
        })
        .unwrap_or(MailboxStatus {
            guid: self.guid,
            uid_validity: 0,
            uid_next: 0,
            messages: 0,
            unseen: 0,
            recent: 0,
            first_recent_uid: 0,
            highest_modseq: 0,
            replicated_modseq: 0,
            peer_modseq: 0,
            history_lost: false,
            log_floor: 0,
            other_index_modseq: None,
        })
    }

    fn mails(&self) -> Vec<MailRecord> {
        self.read(|mb| mb.mails.values().map(record).collect()).unwrap_or_default()
    }

    fn mail(&self, uid: Uid) -> Option<MailRecord> {
        self.read(|mb| mb.mails.get(&uid).map(record)).flatten()
    }

    fn uid_after(&self, after: u32) -> Option<Uid> {
        let from = Uid::new(after.checked_add(1)?)?;
        self.read(|mb| mb.mails.range(from..).next().map(|(u, _)| *u)).flatten()
    }

    fn uids_above(&self, after: u32) -> (usize, Option<Uid>) {
        self.read(|mb| {
            let n = match after.checked_add(1).and_then(Uid::new) {
                Some(from) => mb.mails.range(from..).count(),
                None => 0,
            };
            (n, mb.mails.keys().next_back().copied())
        })
        .unwrap_or((0, None))
    }

    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>> {
        self.read(|mb| {
            if since != 0 && (since < mb.log_floor || mb.history_lost) {
                None
            } else {
                Some(mb.log.iter().filter(|c| c.modseq() > since).cloned().collect())
            }
        })
        .flatten()
    }

    fn open_body(&mut self, uid: Uid) -> StoreResult<Box<dyn Read + Send>> {
        let body =
            self.with(|mb| mb.mails.get(&uid).map(|m| m.body.clone()).ok_or(StoreError::MailNotFound(uid.get())))?;
        Ok(Box::new(Cursor::new(body.as_ref().clone())))
    }

    fn received_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        self.with(|mb| mb.mails.get(&uid).map(|m| m.received).ok_or(StoreError::MailNotFound(uid.get())))
    }

    fn physical_size(&mut self, uid: Uid) -> StoreResult<u64> {
        self.with(|mb| mb.mails.get(&uid).map(|m| m.body.len() as u64).ok_or(StoreError::MailNotFound(uid.get())))
    }

    fn virtual_size(&mut self, uid: Uid) -> StoreResult<u64> {
        self.with(|mb| {
            let m = mb.mails.get(&uid).ok_or(StoreError::MailNotFound(uid.get()))?;
            let mut prev = 0u8;
            let mut n = 0u64;
            for &b in m.body.iter() {
                n += if b == b'\n' && prev != b'\r' { 2 } else { 1 };
                prev = b;
            }
            Ok(n)
        })
    }

    fn save(&mut self, request: SaveRequest, body: &mut dyn Read) -> StoreResult<()> {
        let mut data = Vec::new();
        body.read_to_end(&mut data).map_err(|e| StoreError::io("read", "<mail body>", e))?;
        self.pending.push((request, data, None));
        Ok(())
    }

    fn save_copy_of_last(&mut self, mut request: SaveRequest) -> StoreResult<()> {
        let (last, data, _) = self
            .pending
            .iter()
            .rev()
            .find(|p| p.2.is_none())
            .ok_or_else(|| StoreError::NotPossible("no staged mail to copy".to_owned()))?;
        if request.guid.is_none() {
            request.guid.clone_from(&last.guid);
        }
        if request.received.is_none() {
            request.received = last.received;
        }
        let data = data.clone();
        self.pending.push((request, data, None));
        Ok(())
    }

    fn commit(&mut self) -> StoreResult<Vec<SavedMail>> {
        let pending = std::mem::take(&mut self.pending);
        let import = self.importing;
        let one = self.import_modseq;
        let name = self.name.join('/');
        self.with(|mb| {
            // One modseq for the whole commit, or during an import one per mail, as Dovecot's
            // importer gives them.
            let base = one.unwrap_or(mb.highest_modseq.saturating_add(1));
            let per_mail = import && one.is_none();
            let mut out = Vec::new();
            // UIDs are assigned in ascending order of the UIDs asked for, as the Maildir does.
            let mut order: Vec<usize> = (0..pending.len()).collect();
            order.sort_by_key(|&i| pending[i].0.uid.map_or(u64::MAX, |u| u64::from(u.get())));
            // Every UID and keyword is checked before anything is saved, as in the Maildir.
            let mut uids = vec![Uid::MIN; pending.len()];
            let mut next = mb.uid_next;
            for &i in &order {
                let uid = match pending[i].0.uid {
                    Some(u) if u.get() >= next => u.get(),
                    _ => next,
                };
                if uid == 0 || uid > MAX_UID {
                    return Err(StoreError::uid_space_exhausted(&name, uid));
                }
                uids[i] = Uid::new(uid).unwrap_or(Uid::MIN);
                next = uid + 1;
            }
            let all_kw: Vec<Keyword> = pending.iter().flat_map(|p| p.0.keywords.iter().cloned()).collect();
            use_keywords(mb, &all_kw)?;
            let mut results = vec![None; pending.len()];
            for i in order {
                let (req, body, from) = pending[i].clone();
                let uid = uids[i];
                mb.uid_next = uid.get() + 1;
                let own = if per_mail { mb.highest_modseq.saturating_add(1) } else { base };
                let modseq = own.max(req.min_modseq);
                mb.highest_modseq = mb.highest_modseq.max(modseq);
                let guid = match req.guid {
                    Some(g) => g,
                    None => MailGuid::new(&Guid128::generate().to_string())?,
                };
                let mut kws = req.keywords.clone();
                kws.sort();
                kws.dedup();
                mb.mails.insert(
                    uid,
                    MemMail {
                        uid,
                        guid: guid.clone(),
                        flags: req.flags.stored(),
                        keywords: kws,
                        modseq,
                        received: req.received.unwrap_or_else(now),
                        body: Arc::new(body),
                        recent: true,
                    },
                );
                results[i] = Some(SavedMail { requested: req.uid, uid, guid });
                if let Some(from) = from
                    && let Some(m) = mb.mails.remove(&from)
                {
                    let modseq = bump(mb, one, 0);
                    mb.log.push_back(Change::Expunge { uid: from, modseq, guid: m.guid.guid128() });
                }
            }
            out.extend(results.into_iter().flatten());
            Ok(out)
        })
    }

    fn change_flags(
        &mut self,
        uid: Uid,
        op: FlagOp,
        flags: Flags,
        keywords: &[Keyword],
        min_modseq: Modseq,
    ) -> StoreResult<()> {
        let import = self.importing;
        let one = self.import_modseq;
        self.with(|mb| {
            if op != FlagOp::Remove {
                mb.mails.get(&uid).ok_or(StoreError::MailNotFound(uid.get()))?;
                use_keywords(mb, keywords)?;
            }
            let m = mb.mails.get(&uid).ok_or(StoreError::MailNotFound(uid.get()))?;
            let (of, okw) = (m.flags, m.keywords.clone());
            let flags = flags.stored();
            let (nf, mut nkw) = match op {
                FlagOp::Add => (of | flags, okw.iter().chain(keywords).cloned().collect::<Vec<_>>()),
                FlagOp::Remove => (of & !flags, okw.iter().filter(|k| !keywords.contains(k)).cloned().collect()),
                FlagOp::Replace => (flags, keywords.to_vec()),
            };
            nkw.sort();
            nkw.dedup();
            if nf == of && nkw == okw {
                if min_modseq > m.modseq {
                    // Only the modseq is raised, to exactly the value asked for.
                    let modseq = one.unwrap_or(min_modseq).max(min_modseq);
                    mb.highest_modseq = mb.highest_modseq.max(modseq);
                    if let Some(m) = mb.mails.get_mut(&uid) {
                        m.modseq = modseq;
                    }
                }
                return Ok(());
            }
            let modseq = bump(mb, one, min_modseq);
            // An import's own changes are not logged: they came from the peer and must not be
            // taken for ours (Dovecot's log scan skips its sync transactions). A user's command
            // is logged as Dovecot's index logs it: flags and keywords each as asked, where that
            // part changed anything (see the Maildir store).
            if !import {
                let (added, removed) = match (op, nf != of) {
                    (_, false) => (Flags::NONE, Flags::NONE),
                    (FlagOp::Add, true) => (flags, Flags::NONE),
                    (FlagOp::Remove, true) => (Flags::NONE, flags),
                    (FlagOp::Replace, true) => (flags, Flags::ALL_STORED & !flags),
                };
                let (kw_added, kw_removed) = match (op, nkw != okw) {
                    (_, false) => (Vec::new(), Vec::new()),
                    (FlagOp::Add, true) => (keywords.to_vec(), Vec::new()),
                    (FlagOp::Remove, true) => (Vec::new(), keywords.to_vec()),
                    (FlagOp::Replace, true) => {
                        (nkw.clone(), okw.iter().filter(|k| !nkw.contains(k)).cloned().collect())
                    }
                };
                mb.log.push_back(Change::Flags {
                    uid,
                    modseq,
                    added,
                    removed,
                    keywords_added: kw_added,
                    keywords_removed: kw_removed,
                });
            }
            if let Some(m) = mb.mails.get_mut(&uid) {
                m.flags = nf;
                m.keywords = nkw;
                m.modseq = modseq;
            }
            Ok(())
        })
    }

    fn expunge(&mut self, uids: &[Uid]) -> StoreResult<()> {
        let one = self.import_modseq;
        self.with(|mb| {
            for uid in uids {
                if let Some(m) = mb.mails.remove(uid) {
                    let modseq = bump(mb, one, 0);
                    mb.log.push_back(Change::Expunge { uid: *uid, modseq, guid: m.guid.guid128() });
                }
            }
            Ok(())
        })
    }

    fn stage_move(&mut self, from: Uid, to: Uid) -> StoreResult<()> {
        let (req, body) = self.with(|mb| {
            let m = mb.mails.get(&from).ok_or(StoreError::MailNotFound(from.get()))?;
            let req = SaveRequest {
                uid: Some(to),
                guid: Some(m.guid.clone()),
                flags: m.flags,
                keywords: m.keywords.clone(),
                received: Some(m.received),
                min_modseq: 0,
            };
            Ok((req, m.body.as_ref().clone()))
        })?;
        self.pending.push((req, body, Some(from)));
        Ok(())
    }

    fn update(&mut self, update: &MailboxUpdate) -> StoreResult<()> {
        if let Some(n) = update.min_next_uid
            && n > MAX_UID
        {
            return Err(StoreError::next_uid_too_high(&self.name.join('/'), n));
        }
        let new_guid = self.with(|mb| {
            if let Some(v) = update.uid_validity {
                mb.uid_validity = v;
            }
            if let Some(g) = update.guid {
                mb.guid = g;
            }
            if let Some(n) = update.min_next_uid {
                mb.uid_next = mb.uid_next.max(n);
            }
            if let Some(r) = update.min_first_recent_uid {
                mb.first_recent_uid = mb.first_recent_uid.max(r);
            }
            if let Some(m) = update.min_highest_modseq {
                mb.highest_modseq = mb.highest_modseq.max(m);
            }
            if let Some(m) = update.peer_modseq {
                mb.peer_modseq = m;
            }
            if let Some(m) = update.replicated_modseq {
                mb.replicated_modseq = m;
            }
            if update.clear_history_lost {
                mb.history_lost = false;
            }
            Ok(mb.guid)
        })?;
        self.guid = new_guid;
        Ok(())
    }

    fn refresh(&mut self) -> StoreResult<()> {
        self.importing = false;
        self.import_modseq = None;
        Ok(())
    }

    fn begin_import(&mut self, one_modseq: Option<Modseq>) {
        self.importing = true;
        self.import_modseq = one_modseq.and_then(|m| self.with(|mb| Ok(m.max(mb.highest_modseq))).ok());
    }

    fn sync_point(&mut self) -> StoreResult<()> {
        self.importing = false;
        self.import_modseq = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_flags_expunge_log() {
        let mut s = MemoryStore::new();
        let inbox = MailboxName::inbox();
        let mut mb = s.open(&inbox).unwrap();
        mb.save(SaveRequest { uid: Uid::new(5), ..Default::default() }, &mut &b"a\n"[..]).unwrap();
        mb.save(SaveRequest { uid: Uid::new(3), ..Default::default() }, &mut &b"b\n"[..]).unwrap();
        let saved = mb.commit().unwrap();
        // UIDs are assigned in ascending order of the UIDs asked for, reported in staging order.
        assert_eq!(saved.iter().map(|s| s.uid.get()).collect::<Vec<_>>(), [5, 3]);
        let hms = mb.status().highest_modseq;
        let kw = Keyword::new("$Junk").unwrap();
        mb.change_flags(Uid::new(5).unwrap(), FlagOp::Add, Flags::SEEN, std::slice::from_ref(&kw), 0).unwrap();
        mb.expunge(&[Uid::new(3).unwrap()]).unwrap();
        let ch = mb.changes_since(hms).unwrap();
        assert_eq!(ch.len(), 2);
        assert!(
            matches!(&ch[0], Change::Flags { added, keywords_added, .. } if *added == Flags::SEEN && keywords_added == std::slice::from_ref(&kw))
        );
        assert!(matches!(ch[1], Change::Expunge { .. }));
        assert_eq!(mb.changes_since(0).unwrap().len(), 2);
    }

    #[test]
    fn lost_history_refuses_incremental_export_until_cleared() {
        let mut s = MemoryStore::new();
        let inbox = MailboxName::inbox();
        let mut mb = s.open(&inbox).unwrap();
        for _ in 0..3 {
            mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        }
        mb.commit().unwrap();
        mb.change_flags(Uid::new(1).unwrap(), FlagOp::Add, Flags::SEEN, &[], 0).unwrap();
        let before = mb.status().highest_modseq;
        assert!(s.lose_history(&inbox));
        let st = mb.status();
        assert!(st.history_lost);
        assert_eq!(st.highest_modseq, 2);
        assert!(mb.mails().iter().all(|m| m.modseq == 2));
        for since in [1, 2, before, 100] {
            assert!(mb.changes_since(since).is_none(), "{since}");
        }
        assert_eq!(mb.changes_since(0), Some(vec![]));
        mb.update(&MailboxUpdate { clear_history_lost: true, ..Default::default() }).unwrap();
        assert!(!mb.status().history_lost);
        assert_eq!(mb.changes_since(2), Some(vec![]));
    }

    #[test]
    fn uid_limit_and_keyword_limit() {
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        let err = mb.update(&MailboxUpdate { min_next_uid: Some(u32::MAX), ..Default::default() });
        assert!(matches!(err, Err(StoreError::NotPossible(_))));
        assert_eq!(mb.status().uid_next, 1);
        mb.update(&MailboxUpdate { min_next_uid: Some(MAX_UID), ..Default::default() }).unwrap();
        mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        assert_eq!(mb.commit().unwrap()[0].uid.get(), MAX_UID);
        mb.save(SaveRequest::default(), &mut &b"y\n"[..]).unwrap();
        assert!(matches!(mb.commit(), Err(StoreError::Limit(_))));
        assert_eq!(mb.mails().len(), 1);
        let kws: Vec<Keyword> = (0..MAX_MAILBOX_KEYWORDS).map(|i| Keyword::new(&format!("k{i}")).unwrap()).collect();
        mb.change_flags(Uid::new(MAX_UID).unwrap(), FlagOp::Add, Flags::NONE, &kws, 0).unwrap();
        let more = [Keyword::new("K5").unwrap(), Keyword::new("new").unwrap()];
        let err = mb.change_flags(Uid::new(MAX_UID).unwrap(), FlagOp::Add, Flags::NONE, &more, 0);
        assert!(matches!(err, Err(StoreError::Limit(_))));
    }

    #[test]
    fn an_import_numbers_changes_as_dovecot_does_and_logs_only_expunges() {
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        for u in [1, 2, 3] {
            mb.save(SaveRequest { uid: Uid::new(u), ..Default::default() }, &mut &b"x\n"[..]).unwrap();
        }
        mb.commit().unwrap();
        let start = mb.status().highest_modseq;
        mb.begin_import(None);
        // A peer's changes, in UID order, with the peer's modseqs out of order: each change
        // takes the next modseq, raised to the peer's.
        mb.change_flags(Uid::new(1).unwrap(), FlagOp::Add, Flags::SEEN, &[], start + 40).unwrap();
        mb.change_flags(Uid::new(2).unwrap(), FlagOp::Add, Flags::SEEN, &[], start + 30).unwrap();
        mb.expunge(&[Uid::new(3).unwrap()]).unwrap();
        mb.save(SaveRequest { uid: Uid::new(4), min_modseq: start + 20, ..Default::default() }, &mut &b"y\n"[..])
            .unwrap();
        mb.commit().unwrap();
        assert_eq!(mb.mail(Uid::new(1).unwrap()).unwrap().modseq, start + 40);
        assert_eq!(mb.mail(Uid::new(2).unwrap()).unwrap().modseq, start + 41);
        assert_eq!(mb.mail(Uid::new(4).unwrap()).unwrap().modseq, start + 43);
        assert_eq!(mb.status().highest_modseq, start + 43);
        // Only the expunge is in the change log: the import's flag changes came from the peer.
        let modseqs: Vec<Modseq> = mb.changes_since(start).unwrap().iter().map(Change::modseq).collect();
        assert_eq!(modseqs, [start + 42]);
        // After it, a user's change is logged again.
        mb.sync_point().unwrap();
        mb.change_flags(Uid::new(2).unwrap(), FlagOp::Add, Flags::FLAGGED, &[], 0).unwrap();
        assert_eq!(mb.status().highest_modseq, start + 44);
        assert_eq!(mb.changes_since(start + 42).unwrap().len(), 1);
    }
}
