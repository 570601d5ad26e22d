//! Our own changes since the last common modseq, summed up per UID: what the exporter sends
//! as flag changes and expunges, and what the importer weighs a remote change against
//! (Dovecot's log scan, `dsync_mailbox_export_log_scan` and the importer's twin).
//!
//! The log lists changes in modseq order and a sync wants them by UID, each UID's changes
//! folded into one. Held as one record per UID in a map that was some 250 bytes a changed
//! mail (a stateful sync after a user marked 200,000 mails read peaked at 80 MiB). Here
//! each change is copied once into a compact record in a list that moves into a file
//! ([`crate::spill`]), the (UID, position) pairs are sorted in pieces ([`runs::sort_pairs`]),
//! and a UID's changes are folded only when it is reached or looked up.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::types::KwOp;
use crate::fenced::FencedList;
use crate::runs;
use crate::spill::SpillVec;
use crate::store::{Change, Guid128, Mailbox, Modseq, StoreError, StoreResult};

/// The keyword changes of one logged change: the added, then the removed.
type KwSet = Box<[(KwOp, Box<str>)]>;

/// One logged change, as copied.
#[derive(Debug, Clone, Copy)]
struct Entry {
    guid: [u8; 16],
    uid: u32,
    /// The keyword changes ([`LoggedChanges::kwsets`]; 0: none).
    kw: u32,
    expunge: bool,
    added: u8,
    removed: u8,
}

/// Everything one UID's changes since the last common modseq add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Summed {
    /// Expunged: its GUID. Later flag changes of an expunged mail count for nothing.
    pub(crate) expunged: Option<Guid128>,
    pub(crate) add: u8,
    pub(crate) remove: u8,
    /// The last operation on each keyword, in the order they came.
    pub(crate) keywords: Vec<(KwOp, String)>,
}

impl Summed {
    fn fold(&mut self, e: &Entry, kw: &[(KwOp, Box<str>)]) {
        if e.expunge {
            *self = Self { expunged: Some(Guid128(e.guid)), ..Self::default() };
            return;
        }
        if self.expunged.is_some() {
            return;
        }
        self.add |= e.added;
        self.remove &= !e.added;
        self.remove |= e.removed;
        self.add &= !e.removed;
        for (op, k) in kw {
            self.keywords.retain(|(_, n)| n != &**k);
            self.keywords.push((*op, k.to_string()));
        }
    }
}

/// See the module's documentation.
pub(crate) struct LoggedChanges {
    entries: SpillVec<Entry>,
    /// (UID, position in `entries`), sorted: a UID's changes in the order they were logged.
    by_uid: FencedList,
    /// The distinct keyword changes of the logged changes.
    kwsets: Vec<KwSet>,
}

impl LoggedChanges {
    /// The changes of `mb` above `since`, of UIDs up to `last_common_uid` (all if 0); `None`
    /// if the log no longer reaches back that far ([`Mailbox::changes_since`]). Lists move
    /// into files of the mailbox's scratch directory.
    pub(crate) fn read<M: Mailbox + ?Sized>(mb: &M, since: Modseq, last_common_uid: u32) -> Option<StoreResult<Self>> {
        let highest_wanted = if last_common_uid == 0 { u32::MAX } else { last_common_uid };
        let scratch = mb.scratch_dir();
        let dir = scratch.as_deref().and_then(crate::spill::dir);
        let built = Self::build(|each| mb.each_change_since(since, each), highest_wanted, dir)?;
        Some(built.map_err(|e| StoreError::io("sort the change log in", scratch.unwrap_or_default(), e)))
    }

    /// The same from the changes `source` gives `each` (false: the log does not reach).
    fn build(
        source: impl FnOnce(&mut dyn FnMut(Change)) -> bool,
        highest_wanted: u32,
        dir: Option<Arc<Path>>,
    ) -> Option<io::Result<Self>> {
        let mut entries = SpillVec::new_in(dir.clone());
        let mut kwsets: Vec<KwSet> = vec![Box::default()];
        let mut kw_ids: HashMap<KwSet, u32> = HashMap::new();
        let reaches = source(&mut |c| {
            if c.uid().get() > highest_wanted {
                return;
            }
            let (mut e, set) = entry_of(&c);
            if !set.is_empty() {
                e.kw = *kw_ids.entry(set).or_insert_with_key(|set| {
                    kwsets.push(set.clone());
                    (kwsets.len() - 1) as u32
                });
            }
            entries.push(e);
        });
        if !reaches {
            return None;
        }
        let pairs = entries.iter_releasing().enumerate().map(|(i, e)| [e.uid, i as u32]);
        Some(runs::sort_pairs(dir, pairs).map(|sorted| Self { entries, by_uid: FencedList::new(sorted), kwsets }))
    }

    /// The UID at position `at` of the walk by UID.
    pub(crate) fn uid_at(&self, at: usize) -> Option<u32> {
        self.by_uid.get(at).map(|p| p[0])
    }

    /// The UID at position `at`, what its changes add up to, and the position of the next UID.
    pub(crate) fn summed_at(&self, mut at: usize) -> Option<(u32, Summed, usize)> {
        let uid = self.uid_at(at)?;
        let mut s = Summed::default();
        while let Some([u, i]) = self.by_uid.get(at)
            && u == uid
        {
            let i = i as usize;
            self.entries.note_lookup(i);
            let e = self.entries[i];
            s.fold(&e, &self.kwsets[e.kw as usize]);
            at += 1;
        }
        Some((uid, s, at))
    }

    /// What the changes of `uid` add up to, if it has any.
    pub(crate) fn find(&self, uid: u32) -> Option<Summed> {
        let at = self.by_uid.lower_bound([uid, 0]);
        self.summed_at(at).filter(|(u, ..)| *u == uid).map(|(_, s, _)| s)
    }
}

/// A change as an entry (its keyword changes not numbered yet) and its keyword changes.
fn entry_of(c: &Change) -> (Entry, KwSet) {
    match c {
        Change::Expunge { uid, guid, .. } => {
            (Entry { guid: guid.0, uid: uid.get(), kw: 0, expunge: true, added: 0, removed: 0 }, Box::default())
        }
        Change::Flags { uid, added, removed, keywords_added, keywords_removed, .. } => {
            let set = keywords_added
                .iter()
                .map(|k| (KwOp::Add, k.as_str().into()))
                .chain(keywords_removed.iter().map(|k| (KwOp::Remove, k.as_str().into())))
                .collect();
            let e = Entry {
                guid: [0; 16],
                uid: uid.get(),
                kw: 0,
                expunge: false,
                added: added.bits(),
                removed: removed.bits(),
            };
            (e, set)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Flags, Keyword, Uid};

    /// What a UID's changes add up to (Dovecot's log scan): a later change of a flag or
    /// keyword overrides an earlier one; an expunge overrides everything, before and after.
    #[test]
    fn changes_add_up_as_dovecot_scans_its_log() {
        let flags = |added: u8, removed: u8| Entry { guid: [0; 16], uid: 1, kw: 0, expunge: false, added, removed };
        let kw =
            |ops: &[(KwOp, &str)]| -> Vec<(KwOp, Box<str>)> { ops.iter().map(|(o, k)| (*o, (*k).into())).collect() };
        let mut s = Summed::default();
        s.fold(&flags(0b011, 0), &kw(&[(KwOp::Add, "a"), (KwOp::Add, "b")]));
        s.fold(&flags(0b100, 0b001), &kw(&[(KwOp::Remove, "a")]));
        assert_eq!((s.add, s.remove), (0b110, 0b001));
        assert_eq!(s.keywords, [(KwOp::Add, "b".to_owned()), (KwOp::Remove, "a".to_owned())]);
        s.fold(&flags(0b001, 0b010), &[]);
        assert_eq!((s.add, s.remove), (0b101, 0b010));
        let gone = Entry { guid: [7; 16], uid: 1, kw: 0, expunge: true, added: 0, removed: 0 };
        s.fold(&gone, &[]);
        assert_eq!(s, Summed { expunged: Some(Guid128([7; 16])), ..Summed::default() });
        s.fold(&flags(0b1, 0), &kw(&[(KwOp::Add, "c")]));
        assert_eq!(s, Summed { expunged: Some(Guid128([7; 16])), ..Summed::default() });
    }

    /// The fold over positions sorted in pieces, on many changes of few UIDs, against the
    /// same fold done in one map as the changes come.
    #[test]
    fn summed_per_uid_as_a_map_would() {
        let d = tempfile::tempdir().unwrap();
        let kws: Vec<Keyword> = ["a", "b", "c"].iter().map(|k| Keyword::new(k).unwrap()).collect();
        let mut changes = Vec::new();
        let mut x = 99u64;
        for m in 1..6000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let uid = Uid::new((x >> 40) as u32 % 700 + 1).unwrap();
            changes.push(if (x >> 20).is_multiple_of(9) {
                Change::Expunge { uid, modseq: m, guid: Guid128([(x >> 8) as u8; 16]) }
            } else {
                let pick = |s: u64| {
                    kws.iter().enumerate().filter(|(i, _)| (s >> i) & 1 == 1).map(|(_, k)| k.clone()).collect()
                };
                Change::Flags {
                    uid,
                    modseq: m,
                    added: Flags::from_bits_truncate((x >> 24) as u8),
                    removed: Flags::from_bits_truncate((x >> 32) as u8),
                    keywords_added: pick(x >> 50),
                    keywords_removed: pick(x >> 53),
                }
            });
        }
        let mut want: BTreeMap<u32, Summed> = BTreeMap::new();
        for c in &changes {
            if c.uid().get() > 600 {
                continue;
            }
            let (e, kw) = entry_of(c);
            want.entry(e.uid).or_default().fold(&e, &kw);
        }
        let source = |each: &mut dyn FnMut(Change)| {
            changes.into_iter().for_each(each);
            true
        };
        let logged = LoggedChanges::build(source, 600, crate::spill::dir(d.path())).unwrap().unwrap();
        let mut got = BTreeMap::new();
        let mut at = 0;
        while let Some((uid, s, next)) = logged.summed_at(at) {
            assert_eq!(logged.find(uid).as_ref(), Some(&s));
            got.insert(uid, s);
            at = next;
        }
        assert_eq!(got, want);
        assert_eq!(logged.find(601), None);
        assert_eq!(logged.find(0), None);
    }
}
