//! Exporting one of our mailboxes to the other side (`dsync-mailbox-export.c`).
//!
//! With a last common UID `L` and modseq `Q`: every mail above `L` is a save (`C s`) with its
//! GUID, final flags and keywords; mails at or below `L` whose flags changed since `Q` are flag
//! changes (`C f`) with what was added and removed since `Q`; mails expunged since `Q` are
//! expunges (`C e`) with their 128-bit GUID. If our change log no longer reaches back to `Q`,
//! every mail up to `L` is sent as a flag change, which the other side always accepts. Changes
//! go out sorted by UID. Afterwards the other side asks for the bodies it lacks (`R`), and we
//! send one instance per GUID (`M`).

use std::collections::{BTreeMap, HashMap};

use super::types::{ChangeType, FLAG_RECENT, KwOp, MailChange, MailHeader, MailRequest};
use crate::store::{Change, MailRecord, Mailbox, StoreError, Uid, UnixTime};

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

/// The exporter of one mailbox.
pub(crate) struct Exporter {
    changes: Vec<MailChange>,
    idx: usize,
    /// GUID → our UIDs holding it, and whether it was requested.
    guids: HashMap<String, (Vec<u32>, bool)>,
    /// Mails requested by UID (peers without GUIDs).
    requested_uids: Vec<u32>,
    /// Order in which GUIDs were first seen, for a deterministic send order.
    guid_order: Vec<String>,
}

impl Exporter {
    /// Prepares the changes of `mb` since `last_common_uid` / `last_common_modseq`.
    pub(crate) fn new<M: Mailbox>(
        mb: &mut M,
        last_common_uid: u32,
        last_common_modseq: u64,
        opts: ExportOptions,
    ) -> Result<Self, StoreError> {
        let auto_export = opts.auto_export;
        let highest_wanted = if last_common_uid == 0 { u32::MAX } else { last_common_uid };
        let (log, return_all) = match mb.changes_since(last_common_modseq) {
            Some(l) => (l, last_common_modseq == 0),
            None => (Vec::new(), true),
        };
        // Per UID: accumulated changes since Q, as in Dovecot's log scan.
        let mut per_uid: BTreeMap<u32, MailChange> = BTreeMap::new();
        for c in &log {
            match c {
                Change::Expunge { uid, guid, .. } => {
                    if uid.get() > highest_wanted {
                        continue;
                    }
                    let mut e = MailChange::new(ChangeType::Expunge, uid.get());
                    e.guid = Some(guid.to_string());
                    if opts.timestamps {
                        // Meaningless for an expunge, but a Dovecot master filtering by date
                        // asserts that every change it weighs has one (2.3.19 panics in
                        // dsync_mailbox_import_want_change); "long ago" makes it skip the
                        // record, which is right: neither side has the mail.
                        e.received_timestamp = 1;
                    }
                    per_uid.insert(uid.get(), e);
                }
                Change::Flags { uid, added, removed, keywords_added, keywords_removed, .. } => {
                    if uid.get() > highest_wanted {
                        continue;
                    }
                    let e =
                        per_uid.entry(uid.get()).or_insert_with(|| MailChange::new(ChangeType::FlagChange, uid.get()));
                    if e.kind == ChangeType::Expunge {
                        continue;
                    }
                    e.add_flags |= added.bits();
                    e.remove_flags &= !added.bits();
                    e.remove_flags |= removed.bits();
                    e.add_flags &= !removed.bits();
                    for k in keywords_added {
                        e.keyword_changes.retain(|(_, n)| n != k.as_str());
                        e.keyword_changes.push((KwOp::Add, k.as_str().to_owned()));
                    }
                    for k in keywords_removed {
                        e.keyword_changes.retain(|(_, n)| n != k.as_str());
                        e.keyword_changes.push((KwOp::Remove, k.as_str().to_owned()));
                    }
                }
            }
        }
        let mut ex = Self {
            changes: Vec::new(),
            idx: 0,
            guids: HashMap::new(),
            requested_uids: Vec::new(),
            guid_order: Vec::new(),
        };
        let mails = mb.mails();
        let present: std::collections::HashSet<u32> = mails.iter().map(|m| m.uid.get()).collect();
        for m in &mails {
            let uid = m.uid.get();
            if uid <= last_common_uid {
                match per_uid.get_mut(&uid) {
                    Some(c) if c.kind == ChangeType::FlagChange => fill_flags(c, m),
                    Some(_) => {}
                    None if return_all => {
                        let mut c = MailChange::new(ChangeType::FlagChange, uid);
                        fill_flags(&mut c, m);
                        per_uid.insert(uid, c);
                    }
                    None => {}
                }
            } else {
                let c = per_uid.entry(uid).or_insert_with(|| MailChange::new(ChangeType::Save, uid));
                c.kind = ChangeType::Save;
                c.virtual_size = None;
                fill_flags(c, m);
                if opts.timestamps {
                    // Never 0: the peer takes 0 for "not sent".
                    c.received_timestamp = mb.received_date(m.uid)?.max(1);
                }
                if opts.virtual_sizes {
                    c.virtual_size = Some(mb.virtual_size(m.uid)?);
                }
                let g = m.guid.as_str().to_owned();
                let entry = ex.guids.entry(g.clone()).or_insert_with(|| {
                    ex.guid_order.push(g);
                    (Vec::new(), auto_export)
                });
                entry.0.push(uid);
            }
        }
        // Flag changes for mails that are gone without an expunge record carry no GUID and
        // would only confuse the other side: drop them, as Dovecot drops those above L.
        per_uid.retain(|uid, c| c.kind != ChangeType::FlagChange || present.contains(uid));
        ex.changes = per_uid.into_values().collect();
        Ok(ex)
    }

    /// The next `C` record, in UID order.
    pub(crate) fn next_change(&mut self) -> Option<&MailChange> {
        let c = self.changes.get(self.idx);
        if c.is_some() {
            self.idx += 1;
        }
        c
    }

    /// True while [`Exporter::next_change`] has more to give.
    pub(crate) fn has_more_changes(&self) -> bool {
        self.idx < self.changes.len()
    }

    /// Notes an `R` record from the other side.
    pub(crate) fn want_mail(&mut self, req: &MailRequest) -> Result<(), StoreError> {
        match req.guid.as_deref().filter(|g| !g.is_empty()) {
            Some(g) => match self.guids.get_mut(g) {
                Some(e) => {
                    e.1 = true;
                    Ok(())
                }
                None => Err(StoreError::NotPossible(format!("remote requested unexpected GUID {g}"))),
            },
            None => {
                self.requested_uids.push(req.uid);
                Ok(())
            }
        }
    }

    /// The `M` records to send: one per requested GUID (the first instance still present) and
    /// one per requested UID.
    pub(crate) fn mails_to_send<M: Mailbox>(&self, mb: &mut M) -> Result<Vec<OutMail>, StoreError> {
        let mut out = Vec::new();
        // Our own importer may have moved a requested mail to a new UID meanwhile (a UID
        // conflict): then the mail is found by its GUID. Built only when needed.
        let mut by_guid: Option<HashMap<String, Uid>> = None;
        for g in &self.guid_order {
            let Some((uids, requested)) = self.guids.get(g) else { continue };
            if !requested {
                continue;
            }
            let mut found = uids
                .iter()
                .filter_map(|&u| Uid::new(u))
                .find(|&uid| mb.mail(uid).is_some_and(|m| m.guid.as_str() == g));
            if found.is_none() {
                let map = by_guid.get_or_insert_with(|| {
                    let mut map = HashMap::new();
                    for m in mb.mails() {
                        map.entry(m.guid.as_str().to_owned()).or_insert(m.uid);
                    }
                    map
                });
                found = map.get(g).copied();
            }
            match found {
                Some(uid) => out.push(OutMail::with_body(g.clone(), 0, uid, mb.received_date(uid)?)),
                None => {
                    out.push(OutMail { header: MailHeader { guid: g.clone(), ..Default::default() }, body_uid: None })
                }
            }
        }
        for &u in &self.requested_uids {
            let Some(uid) = Uid::new(u) else { continue };
            if mb.mail(uid).is_none() {
                continue;
            }
            out.push(OutMail::with_body(String::new(), u, uid, mb.received_date(uid)?));
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{FlagOp, Flags, Keyword, MailStore, MailboxName, SaveRequest};

    #[test]
    fn full_then_incremental_export() {
        let mut s = MemoryStore::new();
        let mut mb = s.open(&MailboxName::inbox()).unwrap();
        for _ in 0..3 {
            mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        }
        mb.commit().unwrap();
        let mut ex = Exporter::new(&mut mb, 0, 0, ExportOptions::default()).unwrap();
        let kinds: Vec<_> = std::iter::from_fn(|| ex.next_change().map(|c| (c.kind, c.uid))).collect();
        assert_eq!(kinds, vec![(ChangeType::Save, 1), (ChangeType::Save, 2), (ChangeType::Save, 3)]);
        let hms = mb.status().highest_modseq;
        mb.change_flags(Uid::new(2).unwrap(), FlagOp::Add, Flags::SEEN, &[Keyword::new("k").unwrap()], 0).unwrap();
        mb.expunge(&[Uid::new(3).unwrap()]).unwrap();
        let mut ex = Exporter::new(&mut mb, 3, hms, ExportOptions::default()).unwrap();
        let c = ex.next_change().unwrap().clone();
        assert_eq!((c.kind, c.uid, c.add_flags), (ChangeType::FlagChange, 2, Flags::SEEN.bits()));
        assert_eq!(c.keyword_changes, vec![(KwOp::AddAndFinal, "k".to_owned())]);
        let c = ex.next_change().unwrap().clone();
        assert_eq!((c.kind, c.uid), (ChangeType::Expunge, 3));
        assert!(ex.next_change().is_none());
    }
}
