//! Sorted lists of pairs searched through a fence index on the heap, so that a lookup in a
//! list that lives in a file touches one page of it.
//!
//! A binary search of a list in a file ([`crate::spill`]) probes pages all over it, and each
//! fault maps 16 pages around the probe: the lookups between two releases then hold some
//! `log2(pages)` faults' worth each, which grows with the list (the importer's pending groups
//! and the base-name hashes held 32 MiB of mapped pages at 4,000,000 mails). Here the first
//! pair of every page-sized block is copied into a vector on the heap (1/512 of the list);
//! a lookup searches that vector, then the one block, and counts as one lookup on one page.

use crate::spill::SpillVec;

/// Pairs in one block: one 4 KiB page of the list.
const BLOCK: usize = 4096 / size_of::<[u32; 2]>();

/// A 64-bit key as the pair it sorts as (high half first).
pub(crate) fn split(h: u64) -> [u32; 2] {
    [(h >> 32) as u32, h as u32]
}

/// A sorted list with its fence index (see the module's documentation). Read-only: a list that
/// changes is rebuilt and fenced again ([`FencedList::new`]).
#[derive(Debug, Default)]
pub(crate) struct FencedList {
    list: SpillVec<[u32; 2]>,
    /// `list[i * BLOCK]` for every block `i`.
    fences: Vec<[u32; 2]>,
}

impl FencedList {
    /// Fences `list`, which must be sorted (a list out of order gives wrong answers, never a
    /// panic). Reads one pair a page, releasing as it goes.
    pub(crate) fn new(list: SpillVec<[u32; 2]>) -> Self {
        let fences = (0..list.len())
            .step_by(BLOCK)
            .map(|i| {
                list.note_lookup(i);
                list[i]
            })
            .collect();
        list.release();
        Self { list, fences }
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The list, for a walk over all of it (which should release as it goes:
    /// [`SpillVec::iter_releasing`]).
    pub(crate) fn list(&self) -> &SpillVec<[u32; 2]> {
        &self.list
    }

    /// The first position whose pair is not below `key` (`partition_point(|p| p < key)`).
    pub(crate) fn lower_bound(&self, key: [u32; 2]) -> usize {
        let b = self.fences.partition_point(|f| *f < key);
        if b == 0 {
            return 0;
        }
        // Block b - 1 starts below the key and block b (if any) does not.
        let start = (b - 1) * BLOCK;
        let end = (start + BLOCK).min(self.list.len());
        self.list.note_lookup(start);
        start + self.list[start..end].partition_point(|p| *p < key)
    }

    /// The pair at `i`, counted as a lookup.
    pub(crate) fn get(&self, i: usize) -> Option<[u32; 2]> {
        let p = self.list.get(i).copied();
        if p.is_some() {
            self.list.note_lookup(i);
        }
        p
    }

    /// True if `key` is in the list.
    pub(crate) fn contains(&self, key: [u32; 2]) -> bool {
        self.get(self.lower_bound(key)) == Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill;

    #[test]
    fn lower_bound_is_partition_point() {
        let d = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 7 * BLOCK + 5] {
            let mut x = n as u64 + 5;
            let mut v: Vec<[u32; 2]> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // Few distinct first halves: runs of equal keys across block boundaries.
                    [(x >> 60) as u32 * 2, (x >> 62) as u32]
                })
                .collect();
            v.sort_unstable();
            let mut list = SpillVec::new_in(spill::dir(d.path()));
            list.extend_from_slice(&v);
            let f = FencedList::new(list);
            assert_eq!(f.len(), n);
            for a in 0..34u32 {
                for b in 0..5u32 {
                    let key = [a, b];
                    assert_eq!(f.lower_bound(key), v.partition_point(|p| *p < key), "{n} pairs, key {key:?}");
                    assert_eq!(f.contains(key), v.contains(&key), "{n} pairs, key {key:?}");
                }
            }
            assert_eq!(f.lower_bound([u32::MAX, u32::MAX]), v.partition_point(|p| *p < [u32::MAX, u32::MAX]));
        }
    }
}
