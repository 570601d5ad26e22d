//! Exporting one of our mailboxes to the other side (`dsync-mailbox-export.c`).
//!
//! With a last common UID `L` and modseq `Q`: every mail above `L` is a save (`C s`) with its
//! GUID, final flags and keywords; mails at or below `L` whose flags changed since `Q` are flag
//! changes (`C f`) with what was added and removed since `Q`; mails expunged since `Q` are
//! expunges (`C e`) with their 128-bit GUID. If our change log no longer reaches back to `Q`,
//! every mail up to `L` is sent as a flag change, which the other side always accepts. Changes
//! go out sorted by UID. Afterwards the other side asks for the bodies it lacks (`R`), and we
//! send one instance per GUID (`M`).
//!
//! Memory does not grow with the mailbox: the exporter walks the mailbox's UIDs as they were
//! when the export began, through the store, and reads each mail when its turn comes; the
//! GUIDs it sent and those the peer asks for are written down in partitions and matched when
//! the sending starts ([`super::sent_guids`]). What it sends must still be the mailbox *as it was then*, as Dovecot's
//! exporter (which searches every mail up front) sends it, even though our importer changes
//! the same mailbox meanwhile: [`ExportGuard`] hands the importer the mailbox and lets the
//! exporter copy a mail it has not sent yet just before the importer changes, moves or
//! expunges it. Only those copies are held, so memory grows with the mails both sides touched
//! during the sync, not with the mailbox.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use super::logged::LoggedChanges;
use super::sent_guids::SentGuids;
use super::types::{ChangeType, FLAG_RECENT, KwOp, MailChange, MailHeader, MailRequest};
use crate::spill::SpillVec;
use crate::store::{
    Change, FlagOp, Flags, Keyword, MailRecord, Mailbox, MailboxName, MailboxStatus, MailboxUpdate, Modseq,
    SaveRequest, SavedMail, StoreError, StoreResult, Uid, UnixTime,
};

/// An `M` record to send: the header, and the UID of our mail whose body follows (`None`: all
/// instances were expunged meanwhile, no body).
#[derive(Debug, Clone)]
pub(crate) struct OutMail {
    pub(crate) header: MailHeader,
    pub(crate) body_uid: Option<Uid>,
}

impl OutMail {
    /// A mail sent with its body, asked for by GUID (`uid` 0) or by UID (`guid` empty), as
    /// the peer asked; the received date doubles as the saved date, as our store keeps one.
    fn with_body(guid: String, uid: u32, body: Uid, received: UnixTime) -> Self {
        Self {
            header: MailHeader {
                guid,
                uid,
                pop3_uidl: String::new(),
                pop3_order: 0,
                received_date: received,
                saved_date: received,
                has_body: true,
            },
            body_uid: Some(body),
        }
    }
}

/// What the exporter adds to its save records, and whether it sends mails unasked.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ExportOptions {
    /// Send every new mail without waiting for requests (peers that do not request mails).
    pub(crate) auto_export: bool,
    /// Received dates on saves (the master filters by date: `-t`, `-e`).
    pub(crate) timestamps: bool,
    /// Virtual sizes on saves (the master filters by size: `-I`).
    pub(crate) virtual_sizes: bool,
}

/// A mail the importer was about to change before the exporter got to it, or a sent save
/// that the importer then moved or expunged.
#[derive(Debug)]
enum Kept {
    /// Not sent yet: the mail as it was, with what a save record may need.
    Unsent { rec: MailRecord, received: UnixTime, vsize: u64, gone: bool },
    /// Sent as a save and then moved or expunged: its GUID, which the peer may still ask for.
    Sent { guid: Box<str> },
}

/// The exporter of one mailbox.
pub(crate) struct Exporter {
    opts: ExportOptions,
    last_common_uid: u32,
    /// Our log has no record back to the last common modseq: every mail is a flag change.
    return_all: bool,
    /// Changes from our log since the last common modseq, walked by ascending UID.
    log: Option<LoggedChanges>,
    log_pos: usize,
    /// The highest UID walked: the walk goes up our UIDs as they were when the export began,
    /// one store lookup at a time (a list of them took 4 bytes a mail).
    walked: u32,
    /// The highest of those UIDs: any mail above it was saved during this sync.
    snapshot_max: u32,
    /// Copies taken for the importer's sake (see the module's comment).
    /// By UID: those above `walked` are mails the walk has yet to reach (the importer may
    /// have expunged or moved them in the store meanwhile).
    kept: BTreeMap<u32, Kept>,
    /// The change last returned by [`Exporter::next_change`].
    current: MailChange,
    exhausted: bool,
    /// The saves sent and the GUIDs asked for, until [`Exporter::start_sending`] matches them;
    /// only saves may be asked for by GUID.
    sent: Option<SentGuids>,
    /// Then: UIDs of the saves asked for by GUID (or all, with `auto_export`), the first
    /// instance of each GUID, ascending.
    requested: SpillVec<u32>,
    /// Mails asked for by UID (peers without GUIDs).
    requested_uids: Vec<u32>,
    /// Requested saves whose sent UID is gone: where their GUID lives now.
    relocated: HashMap<Box<str>, Uid>,
    send_pos: usize,
    send_uid_pos: usize,
}

impl Exporter {
    /// Prepares the changes of `mb` since `last_common_uid` / `last_common_modseq`.
    pub(crate) fn new<M: Mailbox>(
        mb: &mut M,
        last_common_uid: u32,
        last_common_modseq: u64,
        opts: ExportOptions,
    ) -> Result<Self, StoreError> {
        let (log, return_all) = match LoggedChanges::read(&*mb, last_common_modseq, last_common_uid) {
            Some(l) => (Some(l?), last_common_modseq == 0),
            None => (None, true),
        };
        // Every mail above the last common UID is sent as a save, and only saves are indexed.
        let (saves, last) = mb.uids_above(last_common_uid);
        let snapshot_max = last.map_or(0, Uid::get);
        Ok(Self {
            opts,
            last_common_uid,
            return_all,
            log,
            log_pos: 0,
            walked: 0,
            snapshot_max,
            kept: BTreeMap::new(),
            current: MailChange::new(ChangeType::Save, 0),
            exhausted: false,
            sent: Some(SentGuids::new(mb.scratch_dir().as_deref(), saves)),
            requested: SpillVec::default(),
            requested_uids: Vec::new(),
            relocated: HashMap::new(),
            send_pos: 0,
            send_uid_pos: 0,
        })
    }

    /// The next `C` record, in UID order.
    pub(crate) fn next_change<M: Mailbox>(&mut self, mb: &mut M) -> Result<Option<&MailChange>, StoreError> {
        while !self.exhausted {
            // The next of our mails as the export began: in the store, or kept aside because
            // the importer has changed it since.
            let stored = mb.uid_after(self.walked).map(Uid::get).filter(|&u| u <= self.snapshot_max);
            let kept = self.kept.range(self.walked.saturating_add(1)..).next().map(|(&u, _)| u);
            let next_uid = match (stored, kept) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // A logged change for a mail that is no longer here: its expunge goes out; a flag
            // change would carry no GUID and only confuse the other side.
            if let Some(l) = self.log.as_ref().and_then(|log| log.uid_at(self.log_pos))
                && next_uid.is_none_or(|u| l < u)
            {
                let c = self.take_logged();
                if let Some(c) = c.filter(|c| c.kind == ChangeType::Expunge) {
                    self.current = c;
                    return Ok(Some(&self.current));
                }
                continue;
            }
            let Some(uid) = next_uid else {
                self.exhausted = true;
                self.log = None;
                break;
            };
            self.walked = uid;
            let logged = match self.log.as_ref().and_then(|log| log.uid_at(self.log_pos)) {
                Some(l) if l == uid => self.take_logged(),
                _ => None,
            };
            if let Some(c) = self.mail_change(mb, uid, logged)? {
                self.current = c;
                return Ok(Some(&self.current));
            }
        }
        Ok(None)
    }

    /// The logged change at the walk's position, as sent, and the walk moved past it.
    fn take_logged(&mut self) -> Option<MailChange> {
        let (uid, s, next) = self.log.as_ref()?.summed_at(self.log_pos)?;
        self.log_pos = next;
        Some(match s.expunged {
            Some(guid) => {
                let mut e = MailChange::new(ChangeType::Expunge, uid);
                e.guid = Some(guid.to_string());
                if self.opts.timestamps {
                    // Meaningless for an expunge, but a Dovecot master filtering by date
                    // asserts that every change it weighs has one (2.3.19 panics in
                    // dsync_mailbox_import_want_change); "long ago" makes it skip the
                    // record, which is right: neither side has the mail.
                    e.received_timestamp = 1;
                }
                e
            }
            None => {
                let mut e = MailChange::new(ChangeType::FlagChange, uid);
                e.add_flags = s.add;
                e.remove_flags = s.remove;
                e.keyword_changes = s.keywords;
                e
            }
        })
    }

    /// The change for our mail `uid`, if it has one to send.
    fn mail_change<M: Mailbox>(
        &mut self,
        mb: &mut M,
        uid: u32,
        logged: Option<MailChange>,
    ) -> Result<Option<MailChange>, StoreError> {
        let is_save = uid > self.last_common_uid;
        if !is_save && logged.is_none() && !self.return_all {
            self.kept.remove(&uid);
            return Ok(None);
        }
        if let Some(c) = logged.as_ref().filter(|c| !is_save && c.kind != ChangeType::FlagChange) {
            self.kept.remove(&uid);
            return Ok(Some(c.clone()));
        }
        // The mail as it was when the export began.
        let kept = self.kept.remove(&uid);
        let (rec, received, vsize) = match kept {
            Some(Kept::Unsent { rec, received, vsize, gone }) => {
                if gone && is_save {
                    // The peer may still ask for it by GUID.
                    self.kept.insert(uid, Kept::Sent { guid: rec.guid.as_str().into() });
                }
                (rec, Some(received), Some(vsize))
            }
            Some(sent @ Kept::Sent { .. }) => {
                self.kept.insert(uid, sent);
                return Ok(None);
            }
            None => match Uid::new(uid).and_then(|u| mb.mail(u)) {
                Some(rec) => (rec, None, None),
                None => {
                    // Gone without the importer's knowledge (never by our own hand).
                    tracing::debug!(uid, "mail vanished before it was exported");
                    return Ok(None);
                }
            },
        };
        let mut c = logged
            .unwrap_or_else(|| MailChange::new(if is_save { ChangeType::Save } else { ChangeType::FlagChange }, uid));
        fill_flags(&mut c, &rec);
        if is_save {
            c.kind = ChangeType::Save;
            c.virtual_size = None;
            if self.opts.timestamps {
                // Never 0: the peer takes 0 for "not sent".
                c.received_timestamp = match received {
                    Some(r) => r,
                    None => mb.received_date(rec.uid)?,
                }
                .max(1);
            }
            if self.opts.virtual_sizes {
                c.virtual_size = Some(match vsize {
                    Some(v) => v,
                    None => mb.virtual_size(rec.uid)?,
                });
            }
            if let Some(sent) = &mut self.sent {
                sent.sent(rec.guid.as_str(), uid);
            }
        }
        Ok(Some(c))
    }

    /// True while [`Exporter::next_change`] may have more to give.
    pub(crate) fn has_more_changes(&self) -> bool {
        !self.exhausted
    }

    /// Called by [`ExportGuard`] before the importer changes (`gone`: moves or expunges) our
    /// mail `uid`.
    fn before_change<M: Mailbox>(&mut self, mb: &mut M, uid: Uid, gone: bool) -> StoreResult<()> {
        let u = uid.get();
        if u > self.snapshot_max {
            return Ok(()); // saved during this sync: never exported
        }
        if let Some(k) = self.kept.get_mut(&u) {
            if let Kept::Unsent { gone: g, .. } = k {
                *g |= gone;
            }
            return Ok(());
        }
        // UIDs are never reused, so a mail at or below the highest UID of the export's
        // start was there then; the walk goes by ascending UID.
        let unsent = !self.exhausted && u > self.walked;
        if unsent {
            let Some(rec) = mb.mail(uid) else { return Ok(()) };
            let received = if self.opts.timestamps { mb.received_date(uid)? } else { 0 };
            let vsize = if self.opts.virtual_sizes { mb.virtual_size(uid)? } else { 0 };
            self.kept.insert(u, Kept::Unsent { rec, received, vsize, gone });
        } else if gone && u > self.last_common_uid {
            // Sent as a save: only its GUID is needed, if the peer asks for it.
            if let Some(rec) = mb.mail(uid) {
                self.kept.insert(u, Kept::Sent { guid: rec.guid.as_str().into() });
            }
        }
        Ok(())
    }

    /// Notes an `R` record from the other side.
    /// A GUID no save was sent with is refused by [`Exporter::start_sending`].
    pub(crate) fn want_mail(&mut self, req: &MailRequest) -> Result<(), StoreError> {
        match req.guid.as_deref().filter(|g| !g.is_empty()) {
            Some(g) => match &mut self.sent {
                Some(sent) => {
                    sent.asked(g);
                    Ok(())
                }
                None => Err(StoreError::NotPossible(format!("remote requested GUID {g} after the mails were sent"))),
            },
            None => {
                self.requested_uids.push(req.uid);
                Ok(())
            }
        }
    }

    /// Readies the `M` records: one per requested GUID, in the order of our UIDs, then one
    /// per requested UID. Requested mails that our importer moved meanwhile (a UID conflict)
    /// are found again by GUID, in one pass over the mailbox. Fails (`NotPossible`) when the
    /// peer asked for a GUID that no save was sent with.
    pub(crate) fn start_sending<M: Mailbox>(&mut self, mb: &M) -> StoreResult<()> {
        if let Some(sent) = self.sent.take() {
            self.requested = sent.resolve(self.opts.auto_export)?;
        }
        let mut lost: HashMap<Box<str>, Option<Uid>> = HashMap::new();
        for &u in self.requested.iter_releasing() {
            if let Some(Kept::Sent { guid }) = self.kept.get(&u) {
                lost.insert(guid.clone(), None);
            }
        }
        if !lost.is_empty() {
            for uid in mb.uids() {
                if let Some(m) = mb.mail(uid)
                    && let Some(slot) = lost.get_mut(m.guid.as_str())
                    && slot.is_none()
                {
                    *slot = Some(uid);
                }
            }
        }
        self.relocated = lost.into_iter().filter_map(|(g, u)| Some((g, u?))).collect();
        Ok(())
    }

    /// The next `M` record to send, after [`Exporter::start_sending`].
    pub(crate) fn next_mail<M: Mailbox>(&mut self, mb: &mut M) -> Result<Option<OutMail>, StoreError> {
        while let Some(&u) = self.requested.get(self.send_pos) {
            self.requested.note_lookup(self.send_pos);
            self.send_pos += 1;
            let (guid, body) = match self.kept.get(&u) {
                Some(Kept::Sent { guid }) => (guid.to_string(), self.relocated.get(guid).copied()),
                // Not sent: cannot have been asked for.
                Some(Kept::Unsent { .. }) => continue,
                None => match Uid::new(u).and_then(|uid| mb.mail(uid)) {
                    Some(m) => (m.guid.as_str().to_owned(), Some(m.uid)),
                    None => {
                        tracing::debug!(uid = u, "requested mail vanished");
                        continue;
                    }
                },
            };
            return Ok(Some(match body {
                Some(uid) => OutMail::with_body(guid, 0, uid, mb.received_date(uid)?),
                None => OutMail { header: MailHeader { guid, ..Default::default() }, body_uid: None },
            }));
        }
        while let Some(&u) = self.requested_uids.get(self.send_uid_pos) {
            self.send_uid_pos += 1;
            let Some(uid) = Uid::new(u) else { continue };
            if mb.mail(uid).is_none() {
                continue;
            }
            return Ok(Some(OutMail::with_body(String::new(), u, uid, mb.received_date(uid)?)));
        }
        Ok(None)
    }
}

/// Fills the final state of a mail into a change (`search_update_flag_changes`): modseq,
/// final flags (with `\Recent` for mails still in `new/`, as Dovecot reports them) and final
/// keywords as `=kw`, or `&kw` when added since the last common modseq.
fn fill_flags(c: &mut MailChange, m: &MailRecord) {
    c.guid = Some(m.guid.as_str().to_owned());
    c.modseq = m.modseq;
    c.final_flags = m.flags.bits() | if m.recent { FLAG_RECENT } else { 0 };
    for k in &m.keywords {
        let name = k.as_str();
        match c.keyword_changes.iter().position(|(_, n)| n == name) {
            Some(i) => match c.keyword_changes[i].0 {
                KwOp::Add => c.keyword_changes[i].0 = KwOp::AddAndFinal,
                KwOp::Remove => c.keyword_changes[i].0 = KwOp::Final,
                KwOp::Final | KwOp::AddAndFinal => {}
            },
            None => c.keyword_changes.push((KwOp::Final, name.to_owned())),
        }
    }
}

/// Our mailbox as the importer sees it while the exporter may still be walking it: before a
/// mail is changed, moved or expunged, the exporter keeps what it still needs of it. Reads go
/// straight through.
pub(crate) struct ExportGuard<'a, M> {
    mb: &'a mut M,
    ex: Option<&'a mut Exporter>,
}

impl<'a, M: Mailbox> ExportGuard<'a, M> {
    pub(crate) fn new(mb: &'a mut M, ex: Option<&'a mut Exporter>) -> Self {
        Self { mb, ex }
    }

    fn before(&mut self, uid: Uid, gone: bool) -> StoreResult<()> {
        match self.ex.as_deref_mut() {
            Some(ex) => ex.before_change(self.mb, uid, gone),
            None => Ok(()),
        }
    }
}

impl<M: Mailbox> Mailbox for ExportGuard<'_, M> {
    fn name(&self) -> &MailboxName {
        self.mb.name()
    }

    fn status(&self) -> MailboxStatus {
        self.mb.status()
    }

    fn mails(&self) -> Vec<MailRecord> {
        self.mb.mails()
    }

    fn uids(&self) -> Vec<Uid> {
        self.mb.uids()
    }

    fn scratch_dir(&self) -> Option<std::path::PathBuf> {
        self.mb.scratch_dir()
    }

    fn uid_after(&self, after: u32) -> Option<Uid> {
        self.mb.uid_after(after)
    }

    fn uids_above(&self, after: u32) -> (usize, Option<Uid>) {
        self.mb.uids_above(after)
    }

    fn mail(&self, uid: Uid) -> Option<MailRecord> {
        self.mb.mail(uid)
    }

    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>> {
        self.mb.changes_since(since)
    }

    fn each_change_since(&self, since: Modseq, each: &mut dyn FnMut(Change)) -> bool {
        self.mb.each_change_since(since, each)
    }

    fn open_body(&mut self, uid: Uid) -> StoreResult<Box<dyn Read + Send>> {
        self.mb.open_body(uid)
    }

    fn received_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        self.mb.received_date(uid)
    }

    fn saved_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        self.mb.saved_date(uid)
    }

    fn physical_size(&mut self, uid: Uid) -> StoreResult<u64> {
        self.mb.physical_size(uid)
    }

    fn virtual_size(&mut self, uid: Uid) -> StoreResult<u64> {
        self.mb.virtual_size(uid)
    }

    fn save(&mut self, request: SaveRequest, body: &mut dyn Read) -> StoreResult<()> {
        self.mb.save(request, body)
    }

    fn commit(&mut self) -> StoreResult<Vec<SavedMail>> {
        self.mb.commit()
    }

    fn save_copy_of_last(&mut self, request: SaveRequest) -> StoreResult<()> {
        self.mb.save_copy_of_last(request)
    }

    fn change_flags(
        &mut self,
        uid: Uid,
        op: FlagOp,
        flags: Flags,
        keywords: &[Keyword],
        min_modseq: Modseq,
    ) -> StoreResult<()> {
        self.before(uid, false)?;
        self.mb.change_flags(uid, op, flags, keywords, min_modseq)
    }

    fn expunge(&mut self, uids: &[Uid]) -> StoreResult<()> {
        for &uid in uids {
            self.before(uid, true)?;
        }
        self.mb.expunge(uids)
    }

    fn stage_move(&mut self, from: Uid, to: Uid) -> StoreResult<()> {
        self.before(from, true)?;
        self.mb.stage_move(from, to)
    }

    fn update(&mut self, update: &MailboxUpdate) -> StoreResult<()> {
        self.mb.update(update)
    }

    fn refresh(&mut self) -> StoreResult<()> {
        self.mb.refresh()
    }

    fn begin_import(&mut self, one_modseq: Option<Modseq>) {
        self.mb.begin_import(one_modseq)
    }

    fn sync_point(&mut self) -> StoreResult<()> {
        self.mb.sync_point()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{MailStore, MailboxName};

    fn changes<M: Mailbox>(ex: &mut Exporter, mb: &mut M) -> Vec<MailChange> {
        std::iter::from_fn(|| ex.next_change(mb).unwrap().cloned()).collect()
    }

    #[test]
    fn full_then_incremental_export() {
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        for _ in 0..3 {
            mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        }
        mb.commit().unwrap();
        let mut ex = Exporter::new(&mut mb, 0, 0, ExportOptions::default()).unwrap();
        let kinds: Vec<_> = changes(&mut ex, &mut mb).iter().map(|c| (c.kind, c.uid)).collect();
        assert_eq!(kinds, vec![(ChangeType::Save, 1), (ChangeType::Save, 2), (ChangeType::Save, 3)]);
        let hms = mb.status().highest_modseq;
        mb.change_flags(Uid::new(2).unwrap(), FlagOp::Add, Flags::SEEN, &[Keyword::new("k").unwrap()], 0).unwrap();
        mb.expunge(&[Uid::new(3).unwrap()]).unwrap();
        let mut ex = Exporter::new(&mut mb, 3, hms, ExportOptions::default()).unwrap();
        let got = changes(&mut ex, &mut mb);
        assert_eq!(got.len(), 2);
        let c = &got[0];
        assert_eq!((c.kind, c.uid, c.add_flags), (ChangeType::FlagChange, 2, Flags::SEEN.bits()));
        assert_eq!(c.keyword_changes, vec![(KwOp::AddAndFinal, "k".to_owned())]);
        assert_eq!((got[1].kind, got[1].uid), (ChangeType::Expunge, 3));
        assert!(!ex.has_more_changes());
    }

    /// What the importer does to a mail before the exporter reaches it does not show in what
    /// is exported; a sent save the importer moves away is still found when asked for.
    #[test]
    fn exports_the_mailbox_as_it_was() {
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        for _ in 0..4 {
            mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        }
        mb.commit().unwrap();
        let guid = |mb: &<MemoryStore as MailStore>::Mailbox, u: u32| mb.mail(Uid::new(u).unwrap()).unwrap().guid;
        let g1 = guid(&mb, 1).as_str().to_owned();
        let g4 = guid(&mb, 4).as_str().to_owned();
        let mut ex = Exporter::new(&mut mb, 0, 0, ExportOptions::default()).unwrap();
        let first = ex.next_change(&mut mb).unwrap().cloned().unwrap();
        assert_eq!(first.uid, 1);
        {
            let mut g = ExportGuard::new(&mut mb, Some(&mut ex));
            // Not exported yet: flagged, then expunged.
            g.change_flags(Uid::new(2).unwrap(), FlagOp::Add, Flags::FLAGGED, &[], 0).unwrap();
            g.expunge(&[Uid::new(3).unwrap()]).unwrap();
            // Exported already: moved to a new UID.
            g.stage_move(Uid::new(1).unwrap(), Uid::new(10).unwrap()).unwrap();
            g.commit().unwrap();
            // Not exported yet: moved as well.
            g.stage_move(Uid::new(4).unwrap(), Uid::new(20).unwrap()).unwrap();
            g.commit().unwrap();
        }
        let rest = changes(&mut ex, &mut mb);
        let got: Vec<_> = rest.iter().map(|c| (c.uid, c.final_flags, c.guid.clone().unwrap())).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].1 & Flags::FLAGGED.bits()), (2, 0), "flags as they were");
        assert_eq!(got[1].0, 3, "an expunged mail still goes out as it was");
        assert_eq!((got[2].0, got[2].2.as_str()), (4, g4.as_str()));
        for g in [&g1, &g4] {
            ex.want_mail(&MailRequest { guid: Some(g.clone()), uid: 0 }).unwrap();
        }
        ex.start_sending(&mb).unwrap();
        let mut sent = Vec::new();
        while let Some(m) = ex.next_mail(&mut mb).unwrap() {
            sent.push((m.header.guid.clone(), m.body_uid.map(Uid::get)));
        }
        assert_eq!(sent, vec![(g1, Some(10)), (g4, Some(20))], "found at their new UIDs");
    }
}
