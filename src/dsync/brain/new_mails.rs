//! The new mails of one import, and their grouping by GUID.
//!
//! Every mail that is new to one side (a remote save, one of our mails above the common prefix,
//! or both at one UID) gets a [`NewMail`]. Instances with the same GUID form a group, chained in
//! the order they were found; a local instance is linked with a remote one, and a UID used by
//! two instances of a group may be kept (Dovecot's `newmail_link`). Nothing reads the groups
//! before the remote's change list ends, so they are not built as the changes come: at the end
//! every instance is written into one of `n` partitions by a keyed hash of its GUID, and each
//! partition's groups are built in memory on their own, replaying the instances in the order
//! they came. What an import holds on the heap then no longer grows with the mailbox: an
//! initial sync of a million mails had a million-entry GUID map and its order list.
//!
//! After the import's local matching, the groups still waiting for a body from the remote are
//! found by a GUID's hash in a sorted list ([`crate::runs::sort_pairs`]), which a large import
//! keeps in a file like the instances themselves.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::ops::{Index, IndexMut};
use std::path::Path;
use std::sync::Arc;

use super::types::{FLAG_RECENT, MailChange};
use crate::fenced::FencedList;
use crate::runs::{self, Partitions, Runs};
use crate::spill::{self, SpillVec};

/// One instance of a mail that is new to one side. Kept for every such mail until the import
/// ends (in an initial sync, for every mail of the mailbox), so it is small and plain: the GUID
/// lives in [`NewMails::text`], the keywords of a remote save in [`NewMails::kwsets`], and of
/// the save's change record only what saving needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewMail {
    /// The remote's modseq, the least the saved mail gets (0: none).
    pub(super) modseq: u64,
    /// The next instance with the same GUID.
    pub(super) next: Ix,
    /// The instance on the other side this one pairs with.
    pub(super) link: Ix,
    guid_at: u32,
    guid_len: u32,
    /// Final keywords of the remote save ([`NewMails::kwsets`]; 0: none).
    kwset: u32,
    pub(super) final_uid: u32,
    pub(super) local_uid: u32,
    pub(super) remote_uid: u32,
    /// Final system flags of the remote save, `\Recent` removed.
    pub(super) flags: u8,
    /// A remote save: `modseq`, `kwset` and `flags` are its.
    pub(super) has_change: bool,
    pub(super) uid_in_local: bool,
    pub(super) uid_is_usable: bool,
    pub(super) skip: bool,
    pub(super) saved: bool,
    /// The first instance of its GUID's group (set by [`NewMails::link_by_guid`]).
    pub(super) first: bool,
    /// On a group's first instance: the group waits for its body from the remote.
    pub(super) pending: bool,
}

/// An optional index into [`NewMails`], in four bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Ix(Option<std::num::NonZeroU32>);

impl Ix {
    pub(super) const NONE: Self = Self(None);

    pub(super) fn to(i: usize) -> Self {
        // New mails are limited to a few million (`max_mails_per_mailbox`).
        Self(u32::try_from(i + 1).ok().and_then(std::num::NonZeroU32::new))
    }

    pub(super) fn get(self) -> Option<usize> {
        self.0.map(|n| n.get() as usize - 1)
    }

    pub(super) fn is_none(self) -> bool {
        self.0.is_none()
    }
}

/// The bytes of an instance in a partition: its index and a GUID of 32 hex digits.
const RECORD: usize = 4 + 4 + 32;

/// The new mails of an import, indexed by `u32` (a mailbox holds at most a few million). The
/// records and the GUIDs' text move into a file once large, like a mailbox's own lists: they
/// are written in the order the changes come and mostly read back in that order (the saving
/// walks them by UID).
#[derive(Debug)]
pub(super) struct NewMails {
    list: SpillVec<NewMail>,
    /// Every GUID, one after another (each from a `&str`).
    text: SpillVec<u8>,
    /// Distinct keyword sets of remote saves; entry 0 is the empty set.
    kwsets: Vec<Box<[Box<str>]>>,
    kwset_ids: HashMap<Box<[Box<str>]>, u32>,
    dir: Option<Arc<Path>>,
    /// The hash of [`NewMails::by_guid`], keyed.
    keys: RandomState,
    /// The pending groups' first instances by their GUID's hash: (hash, index), sorted.
    by_guid: FencedList,
}

impl NewMails {
    /// New mails whose lists may move into a file of `dir`.
    pub(super) fn new(dir: Option<Arc<Path>>) -> Self {
        Self {
            list: SpillVec::new_in(dir.clone()),
            text: SpillVec::new_in(dir.clone()),
            kwsets: vec![Box::default()],
            kwset_ids: HashMap::new(),
            dir,
            keys: RandomState::new(),
            by_guid: FencedList::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    pub(super) fn guid(&self, i: usize) -> &str {
        let m = &self[i];
        let at = m.guid_at as usize;
        self.text.note_lookup(at);
        std::str::from_utf8(&self.text[at..at + m.guid_len as usize]).expect("GUIDs are stored from a str")
    }

    pub(super) fn keywords(&self, i: usize) -> &[Box<str>] {
        &self.kwsets[self[i].kwset as usize]
    }

    /// Adds a mail; `save` is the remote's save record, if it is one.
    pub(super) fn push(
        &mut self,
        guid: &str,
        save: Option<&MailChange>,
        uids: [u32; 3],
        in_local: bool,
        usable: bool,
    ) -> usize {
        let guid_at = u32::try_from(self.text.len()).expect("GUID text stays below 4 GiB: mails are limited");
        self.text.extend_from_slice(guid.as_bytes());
        let mut m = NewMail {
            modseq: 0,
            next: Ix::NONE,
            link: Ix::NONE,
            guid_at,
            guid_len: guid.len() as u32,
            kwset: 0,
            final_uid: uids[0],
            local_uid: uids[1],
            remote_uid: uids[2],
            flags: 0,
            has_change: false,
            uid_in_local: in_local,
            uid_is_usable: usable,
            skip: false,
            saved: false,
            first: false,
            pending: false,
        };
        if let Some(c) = save {
            m.has_change = true;
            m.modseq = if c.modseq > 1 { c.modseq } else { 0 };
            m.flags = c.final_flags & !FLAG_RECENT;
            let kws: Box<[Box<str>]> = c.final_keywords().into_iter().map(Box::from).collect();
            if !kws.is_empty() {
                m.kwset = match self.kwset_ids.get(&kws) {
                    Some(&id) => id,
                    None => {
                        let id = self.kwsets.len() as u32;
                        self.kwsets.push(kws.clone());
                        self.kwset_ids.insert(kws, id);
                        id
                    }
                };
            }
        }
        self.list.push(m);
        self.list.len() - 1
    }

    /// Drops the pages of the lists in files that this process holds (a walk calls it every
    /// [`spill::RELEASE_EVERY`] mails).
    pub(super) fn release(&self) {
        self.list.release();
        self.text.release();
    }

    /// `newmail_link` for every instance with a GUID, in the order they were pushed: chains
    /// each group, links local and remote instances pairwise (each with the earliest unlinked
    /// one of the other side), marks a UID two instances of a group share as usable, and marks
    /// each group's first instance. Partition by partition (see the module's documentation);
    /// each instance is looked at a bounded number of times, so a group of any size (a peer
    /// that sends one GUID a million times) costs linear time.
    pub(super) fn link_by_guid(&mut self) -> io::Result<()> {
        let n = self.len();
        let part = Partitions::new(n.saturating_mul(RECORD), spill::threshold() / 4, 1, 1);
        let parts = part.parts;
        if parts == 1 {
            // A small import: its instances fit in one partition.
            let all: Vec<u32> = (0..n).filter(|&i| self[i].guid_len > 0).map(|i| i as u32).collect();
            self.link_part(all);
            return Ok(());
        }
        let mut runs = Runs::new(self.dir.as_deref(), parts, part.chunk);
        for i in 0..n {
            if i % spill::RELEASE_EVERY == spill::RELEASE_EVERY - 1 {
                self.release();
            }
            let g = self.guid(i);
            if !g.is_empty() {
                runs.push(part.of(g), &[&(i as u32).to_le_bytes()]);
            }
        }
        self.release();
        for p in 0..parts {
            runs.finish(p);
            let mut r = runs.reader(p);
            let mut indices = Vec::new();
            while let Some(rec) = r.next()? {
                let b: [u8; 4] = rec.try_into().map_err(|_| io::Error::other("a partition's record is damaged"))?;
                indices.push(u32::from_le_bytes(b));
            }
            drop(r);
            runs.clear(p);
            self.link_part(indices);
            self.release();
        }
        Ok(())
    }

    /// Builds the groups of one partition from its instances' indices, ascending.
    fn link_part(&mut self, indices: Vec<u32>) {
        /// A group being built: its first and last instance, and the earliest instance of each
        /// side (remote, local) that is not linked yet.
        struct Group {
            first: usize,
            last: usize,
            unlinked: [Option<usize>; 2],
        }
        let mut groups: HashMap<Box<str>, Group> = HashMap::new();
        // (group, UID) -> the last instance of the group with that final UID.
        let mut by_uid: HashMap<(usize, u32), usize> = HashMap::new();
        for i in indices {
            let i = i as usize;
            let side = usize::from(self[i].uid_in_local);
            let uid = self[i].final_uid;
            let guid = self.guid(i);
            let Some(g) = groups.get_mut(guid) else {
                let unlinked = if self[i].link.is_none() { Some(i) } else { None };
                let mut g = Group { first: i, last: i, unlinked: [None; 2] };
                g.unlinked[side] = unlinked;
                groups.insert(guid.into(), g);
                by_uid.insert((i, uid), i);
                self[i].first = true;
                continue;
            };
            if let Some(m) = by_uid.insert((g.first, uid), i) {
                self[m].uid_is_usable = true;
            }
            let last = g.last;
            self[last].next = Ix::to(i);
            g.last = i;
            if !self[i].link.is_none() {
                continue;
            }
            let other = 1 - side;
            match g.unlinked[other] {
                Some(l) => {
                    self[l].link = Ix::to(i);
                    self[i].link = Ix::to(l);
                    // The next unlinked instance of that side, after `l` in the chain.
                    let mut at = self[l].next.get();
                    while let Some(m) = at {
                        if usize::from(self[m].uid_in_local) == other && self[m].link.is_none() {
                            break;
                        }
                        at = self[m].next.get();
                    }
                    g.unlinked[other] = at;
                }
                None => {
                    if g.unlinked[side].is_none() {
                        g.unlinked[side] = Some(i);
                    }
                }
            }
        }
    }

    /// The first instances of the groups, in the order the groups were found.
    pub(super) fn firsts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).filter(|&i| {
            if i % spill::RELEASE_EVERY == spill::RELEASE_EVERY - 1 {
                self.list.release();
            }
            self[i].first
        })
    }

    /// The first instances of the groups that wait for a body.
    pub(super) fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.firsts().filter(|&i| self[i].pending)
    }

    /// Lists the pending groups by their GUID's hash, for [`NewMails::take_pending`].
    pub(super) fn index_pending(&mut self) -> io::Result<()> {
        let keys = self.keys.clone();
        let hash = |g: &str| (keys.hash_one(g) >> 32) as u32;
        let items = self.pending().map(|i| [hash(self.guid(i)), i as u32]);
        let sorted = runs::sort_pairs(self.dir.clone(), items)?;
        self.by_guid = FencedList::new(sorted);
        Ok(())
    }

    /// The pending group of `guid`, which stops being pending (its body came).
    pub(super) fn take_pending(&mut self, guid: &str) -> Option<usize> {
        let h = (self.keys.hash_one(guid) >> 32) as u32;
        let mut at = self.by_guid.lower_bound([h, 0]);
        while let Some([k, i]) = self.by_guid.get(at) {
            if k != h {
                break;
            }
            let i = i as usize;
            if self[i].pending && self.guid(i) == guid {
                self[i].pending = false;
                return Some(i);
            }
            at += 1;
        }
        None
    }
}

impl Index<usize> for NewMails {
    type Output = NewMail;
    fn index(&self, i: usize) -> &NewMail {
        self.list.note_lookup(i);
        &self.list[i]
    }
}

impl IndexMut<usize> for NewMails {
    fn index_mut(&mut self, i: usize) -> &mut NewMail {
        self.list.note_lookup(i);
        &mut self.list[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One instance as the test makes it: GUID, final UID, local or remote, paired with itself
    /// (a local mail the remote saved at the same UID), usable.
    type Made = (String, u32, bool, bool, bool);

    /// The groups as Dovecot's `newmail_link` builds them, one instance at a time, each
    /// walking its group's chain (what the importer did as the changes came).
    fn model(made: &[Made]) -> Vec<(Option<usize>, Option<usize>, bool, bool)> {
        let mut next = vec![None; made.len()];
        let mut link: Vec<Option<usize>> = made.iter().enumerate().map(|(i, m)| m.3.then_some(i)).collect();
        let mut usable: Vec<bool> = made.iter().map(|m| m.4).collect();
        let mut first = vec![false; made.len()];
        let mut groups: HashMap<&str, usize> = HashMap::new();
        for (i, m) in made.iter().enumerate() {
            if m.0.is_empty() {
                continue;
            }
            let Some(&f) = groups.get(m.0.as_str()) else {
                groups.insert(&m.0, i);
                first[i] = true;
                continue;
            };
            let (mut cur, mut last, mut l) = (Some(f), f, None);
            while let Some(c) = cur {
                if made[c].1 == m.1 {
                    usable[c] = true;
                }
                if l.is_none() && link[c].is_none() && made[c].2 != m.2 {
                    l = Some(c);
                }
                last = c;
                cur = next[c];
            }
            next[last] = Some(i);
            if let Some(l) = l
                && link[i].is_none()
            {
                link[l] = Some(i);
                link[i] = Some(l);
            }
        }
        (0..made.len()).map(|i| (next[i], link[i], usable[i], first[i])).collect()
    }

    fn build(made: &[Made], dir: Option<Arc<Path>>) -> NewMails {
        let mut nm = NewMails::new(dir);
        for (guid, uid, local, paired, usable) in made {
            let i = nm.push(guid, None, [*uid, 0, 0], *local, *usable);
            if *paired {
                nm[i].link = Ix::to(i);
            }
        }
        nm
    }

    fn random_mails(n: usize, guids: u64, uids: u64, seed: u64) -> Vec<Made> {
        let mut x = seed;
        let mut r = |m: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        (0..n)
            .map(|_| {
                let g = r(guids);
                let guid = if g == 0 { String::new() } else { format!("{g:032x}") };
                let local = r(2) == 0;
                (guid, 1 + r(uids) as u32, local, local && r(8) == 0, r(4) == 0)
            })
            .collect()
    }

    #[test]
    fn groups_built_at_the_end_match_dovecots_one_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        // One partition, and (the unit tests' threshold is 0) many; groups of every size, one
        // GUID of 3000 instances, and instances without a GUID, which are left alone.
        let cases = [(40, 10, 20, 1), (3000, 50, 400, 2), (3000, 1500, 3000, 3), (3000, 2, 100, 4)];
        for (n, guids, uids, seed) in cases {
            let made = random_mails(n, guids, uids, seed);
            for dir in [spill::dir(d.path()), None] {
                let mut nm = build(&made, dir);
                nm.link_by_guid().unwrap();
                let got: Vec<_> =
                    (0..n).map(|i| (nm[i].next.get(), nm[i].link.get(), nm[i].uid_is_usable, nm[i].first)).collect();
                let want = model(&made);
                for i in 0..n {
                    assert_eq!(got[i], want[i], "{n} mails, seed {seed}: instance {i} {:?}", made[i]);
                }
            }
        }
    }

    #[test]
    fn a_pending_group_is_found_by_its_guid_once() {
        let d = tempfile::tempdir().unwrap();
        let made = random_mails(5000, 700, 9000, 7);
        let mut nm = build(&made, spill::dir(d.path()));
        nm.link_by_guid().unwrap();
        let firsts: Vec<usize> = nm.firsts().collect();
        // Every other group waits for its body.
        for &f in firsts.iter().step_by(2) {
            nm[f].pending = true;
        }
        nm.index_pending().unwrap();
        for (k, &f) in firsts.iter().enumerate() {
            let guid = nm.guid(f).to_owned();
            let want = (k % 2 == 0).then_some(f);
            assert_eq!(nm.take_pending(&guid), want, "group {k} at {f}");
            assert_eq!(nm.take_pending(&guid), None, "group {k} taken twice");
        }
        assert_eq!(nm.take_pending("no such GUID"), None);
    }
}
