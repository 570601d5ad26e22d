//! A set of 64-bit values that grows past memory: the hashes of the base names in use in one
//! mailbox (a save that wants to keep its GUID as its file name checks them: Dovecot's names
//! carry the GUID, so a backup keeps them), the UIDs an import expunges.
//!
//! A hash set grows with what it holds: some 10 to 18 bytes a value, and twice that while it
//! doubles (56 MiB at a moment for the names of 4,000,000 mails). Here only the values added
//! lately are in a set on the heap; the rest are a sorted list that moves into a file like a
//! mailbox's other lists ([`crate::spill`]), into which the recent ones are merged whenever
//! [`RECENT`] of them have gathered. A merge copies the whole list, so `n` additions cost
//! `n * n / RECENT` copies of eight bytes: at 4,000,000, 30 merges of 2,000,000 on average,
//! well under a second. A lookup is a search of the list through its fences
//! ([`FencedList`]) and a probe of the set; removals wait in a set of their own until the next
//! merge, which drops them.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::fasthash::FastSet;
use crate::fenced::{FencedList, split};
use crate::runs;
use crate::spill::SpillVec;

/// Hashes gathered on the heap before a merge: 1 MiB of set, or so.
const RECENT: usize = 1 << 16;

/// See the module's documentation. A set: adding a hash twice keeps it once, and removing it
/// removes it, as a `HashSet` would.
pub(crate) struct SpillSet {
    /// Each hash as its high and low halves (which sort as the hash does): the form
    /// [`runs::sort_pairs`] gives, fenced so that a lookup touches one page of it.
    sorted: FencedList,
    recent: FastSet<u64>,
    removed: FastSet<u64>,
    /// The hashes added and removed below this many gather before a merge (tests set it low).
    recent_max: usize,
}

impl SpillSet {
    /// The set of `hashes` (sorted in pieces and merged: [`runs::sort_pairs`]), whose list
    /// may move into a file of `dir`.
    pub(crate) fn build(dir: Option<Arc<Path>>, hashes: impl IntoIterator<Item = u64>) -> io::Result<Self> {
        Self::build_with(dir, hashes, RECENT)
    }

    fn build_with(
        dir: Option<Arc<Path>>,
        hashes: impl IntoIterator<Item = u64>,
        recent_max: usize,
    ) -> io::Result<Self> {
        let sorted = FencedList::new(runs::sort_pairs(dir, hashes.into_iter().map(split))?);
        Ok(Self { sorted, recent: FastSet::default(), removed: FastSet::default(), recent_max })
    }

    /// An empty set whose list may move into a file of `dir`.
    pub(crate) fn new_in(dir: Option<Arc<Path>>) -> Self {
        Self {
            sorted: FencedList::new(SpillVec::new_in(dir)),
            recent: FastSet::default(),
            removed: FastSet::default(),
            recent_max: RECENT,
        }
    }

    /// Every value, in ascending order (the recent ones are merged into the list first).
    pub(crate) fn sorted(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.merge();
        // A set built from values with repeats keeps them in its list.
        let mut last = None;
        self.sorted.list().iter_releasing().map(|&p| join(p)).filter(move |&v| last.replace(v) != Some(v))
    }

    pub(crate) fn contains(&self, h: u64) -> bool {
        if self.recent.contains(&h) {
            return true;
        }
        if self.removed.contains(&h) {
            return false;
        }
        self.sorted.contains(split(h))
    }

    pub(crate) fn insert(&mut self, h: u64) {
        self.removed.remove(&h);
        self.recent.insert(h);
        self.merge_if_full();
    }

    pub(crate) fn remove(&mut self, h: u64) {
        // It may be in the list as well, even when it was added again lately.
        self.recent.remove(&h);
        self.removed.insert(h);
        self.merge_if_full();
    }

    fn merge_if_full(&mut self) {
        if self.recent.len() + self.removed.len() >= self.recent_max {
            self.merge();
        }
    }

    fn merge(&mut self) {
        if self.recent.is_empty() && self.removed.is_empty() {
            return;
        }
        let mut recent: Vec<[u32; 2]> = self.recent.drain().map(split).collect();
        recent.sort_unstable();
        let removed = std::mem::take(&mut self.removed);
        let mut out = SpillVec::new_in(self.sorted.list().dir());
        out.reserve_exact(self.sorted.len() + recent.len());
        let mut add = recent.into_iter().peekable();
        for &h in self.sorted.list().iter_releasing() {
            while let Some(a) = add.next_if(|&a| a < h) {
                out.push(a);
            }
            add.next_if_eq(&h);
            if !removed.contains(&join(h)) {
                out.push(h);
            }
        }
        for a in add {
            out.push(a);
        }
        self.sorted = FencedList::new(out);
    }
}

impl std::fmt::Debug for SpillSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillSet")
            .field("sorted", &self.sorted.len())
            .field("recent", &self.recent.len())
            .field("removed", &self.removed.len())
            .finish()
    }
}

fn join(p: [u32; 2]) -> u64 {
    (u64::from(p[0]) << 32) | u64::from(p[1])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::spill;

    #[test]
    fn behaves_as_a_hash_set_through_merges() {
        let d = tempfile::tempdir().unwrap();
        for dir in [spill::dir(d.path()), None] {
            let dir_given = dir.is_some();
            // Built from a start with duplicates, then changed; the high halves vary too.
            let start = (0..1000u64).map(|h| (h % 700) * 3 + (h << 40));
            let mut model: HashSet<u64> = start.clone().collect();
            let mut s = SpillSet::build_with(dir, start, 100).unwrap();
            let mut x = 7u64;
            for step in 0..20_000u32 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Few distinct values, so that adds and removes meet.
                let h = match (x >> 20) % 3 {
                    0 => (x >> 40) % 3000,
                    _ => ((x >> 40) % 700) * 3 + (((x >> 30) % 1000) << 40),
                };
                match step % 5 {
                    0..=2 => {
                        s.insert(h);
                        model.insert(h);
                    }
                    3 => {
                        s.remove(h);
                        model.remove(&h);
                    }
                    _ => assert_eq!(s.contains(h), model.contains(&h), "step {step}: {h}"),
                }
                assert!(s.recent.len() + s.removed.len() < 100);
            }
            for h in (0..3000).chain(model.clone()) {
                assert_eq!(s.contains(h), model.contains(&h), "{h}");
            }
            assert_eq!(s.sorted.list().in_file(), dir_given, "the list is in a file when it may be");
            let mut want: Vec<u64> = model.into_iter().collect();
            want.sort_unstable();
            assert_eq!(s.sorted().collect::<Vec<_>>(), want);
        }
    }
}
