//! Finding entries by a string key (a mail's GUID, a file's base name) without a hash map of
//! strings.
//!
//! The importer and the exporter each need "which of my entries has this GUID" for every mail
//! of a mailbox, and a Maildir's open "which scanned file has this base name" for every file:
//! 200,000 entries in an initial sync, a million in a large mailbox. A `HashMap<String, _>`
//! costs a string allocation and a 40-byte slot per entry (a `HashMap<&str, u32>` 24 bytes),
//! which was a third of the slave's memory. This index
//! keeps only 32 bits of a keyed hash and a `u32` per entry (10 bytes an entry) and asks the owner
//! of the entries to confirm a match, so it is exact: two GUIDs that share a hash (SipHash with
//! keys chosen at random per index, so a peer cannot aim for it; among 400,000 GUIDs a few
//! dozen pairs do) are kept apart, the later one in a small map of full strings.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// 32-bit hash → entry, by linear probing in one array of 8-byte slots kept at most 80 %
/// full: 10 bytes an entry. (A `HashMap<u32, u32>` rounds its buckets up to a power of two
/// at 7/8 load and adds a control byte: 9 to 18 bytes an entry, 19 MiB for a million.)
#[derive(Debug, Default)]
struct Slots {
    /// (hash, entry + 1); (0, 0) is an empty slot.
    slots: Vec<(u32, u32)>,
    len: usize,
}

impl Slots {
    const MIN: usize = 8;

    fn room_for(n: usize) -> usize {
        (n.saturating_mul(5) / 4 + 1).max(Self::MIN)
    }

    fn with_capacity(n: usize) -> Self {
        Self { slots: vec![(0, 0); Self::room_for(n)], len: 0 }
    }

    /// Where probing for `h` starts: the hash spread over the table (the hashes are uniform).
    fn home(&self, h: u32) -> usize {
        ((u64::from(h) * self.slots.len() as u64) >> 32) as usize
    }

    /// The slot holding `h`, if any.
    fn find(&self, h: u32) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(h);
        loop {
            match self.slots[i] {
                (_, 0) => return None,
                (k, _) if k == h => return Some(i),
                _ => i = (i + 1) % self.slots.len(),
            }
        }
    }

    fn get(&self, h: u32) -> Option<u32> {
        self.find(h).map(|i| self.slots[i].1 - 1)
    }

    /// Adds `h` → `v` (`v` below `u32::MAX`) unless `h` is there; false if it was.
    fn insert(&mut self, h: u32, v: u32) -> bool {
        debug_assert!(v < u32::MAX);
        if self.find(h).is_some() {
            return false;
        }
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            let mut bigger = Self::with_capacity(self.slots.len() * 3 / 2);
            for &(k, e) in &self.slots {
                if e != 0 {
                    bigger.place(k, e);
                }
            }
            *self = bigger;
        }
        self.place(h, v + 1);
        true
    }

    fn place(&mut self, h: u32, stored: u32) {
        let mut i = self.home(h);
        while self.slots[i].1 != 0 {
            i = (i + 1) % self.slots.len();
        }
        self.slots[i] = (h, stored);
        self.len += 1;
    }

    /// Removes `h`, moving back the slots after it that probed past it, so that no lookup
    /// needs a tombstone.
    fn remove(&mut self, h: u32) -> Option<u32> {
        let mut i = self.find(h)?;
        let v = self.slots[i].1 - 1;
        let n = self.slots.len();
        let mut j = i;
        loop {
            j = (j + 1) % n;
            let (k, e) = self.slots[j];
            if e == 0 {
                break;
            }
            let home = self.home(k);
            // The slot at `j` may move to `i` unless its home lies cyclically in (i, j].
            let stays = if i < j { home > i && home <= j } else { home > i || home <= j };
            if !stays {
                self.slots[i] = self.slots[j];
                i = j;
            }
        }
        self.slots[i] = (0, 0);
        self.len -= 1;
        Some(v)
    }

    fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().filter(|s| s.1 != 0).map(|s| s.1 - 1)
    }
}

/// Whoever owns the entries: says whether entry `v` has the key `key`.
pub(crate) trait KeySource {
    fn key_is(&self, v: u32, key: &str) -> bool;
}

/// Key → entry, one entry per key.
#[derive(Debug, Default)]
pub(crate) struct StrIndex {
    keys: RandomState,
    by_hash: Slots,
    /// Entries whose key's hash was taken by another key (and any entry `u32::MAX`).
    collided: HashMap<Box<str>, u32>,
}

impl StrIndex {
    /// An index with room for `n` entries, so that a table built up to a known size is never
    /// copied to a larger one (a resize holds both tables at once).
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self { by_hash: Slots::with_capacity(n), ..Self::default() }
    }

    fn hash(&self, guid: &str) -> u32 {
        self.keys.hash_one(guid) as u32
    }

    /// The entry with this GUID.
    pub(crate) fn get(&self, guid: &str, src: &impl KeySource) -> Option<u32> {
        if let Some(v) = self.by_hash.get(self.hash(guid))
            && src.key_is(v, guid)
        {
            return Some(v);
        }
        if self.collided.is_empty() { None } else { self.collided.get(guid).copied() }
    }

    /// Adds `v` for `guid` unless the GUID has an entry already; returns that entry then.
    pub(crate) fn insert(&mut self, guid: &str, v: u32, src: &impl KeySource) -> Option<u32> {
        if let Some(old) = self.get(guid, src) {
            return Some(old);
        }
        if v == u32::MAX || !self.by_hash.insert(self.hash(guid), v) {
            self.collided.insert(guid.into(), v);
        }
        None
    }

    /// Removes the entry for `guid` and returns it.
    pub(crate) fn remove(&mut self, guid: &str, src: &impl KeySource) -> Option<u32> {
        let h = self.hash(guid);
        if let Some(v) = self.by_hash.get(h)
            && src.key_is(v, guid)
        {
            return self.by_hash.remove(h);
        }
        if self.collided.is_empty() { None } else { self.collided.remove(guid) }
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len + self.collided.len()
    }

    /// Every entry, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_hash.values().chain(self.collided.values().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names(Vec<&'static str>);
    impl KeySource for Names {
        fn key_is(&self, v: u32, guid: &str) -> bool {
            self.0[v as usize] == guid
        }
    }

    #[test]
    fn exact_even_when_hashes_collide() {
        let names = Names(vec!["a", "b", "c"]);
        let mut ix = StrIndex::default();
        assert_eq!(ix.insert("a", 0, &names), None);
        assert_eq!(ix.insert("a", 2, &names), Some(0));
        // Force a collision: "b" lands in the slot "a" holds.
        let ha = ix.hash("a");
        ix.by_hash.remove(ha);
        ix.by_hash.insert(ix.hash("b"), 0);
        ix.collided.insert("a".into(), 0);
        assert_eq!(ix.get("a", &names), Some(0));
        assert_eq!(ix.get("b", &names), None, "a hash match alone is no match");
        assert_eq!(ix.insert("b", 1, &names), None);
        assert_eq!(ix.get("b", &names), Some(1));
        assert_eq!(ix.remove("a", &names), Some(0));
        assert_eq!(ix.get("a", &names), None);
        assert_eq!(ix.get("b", &names), Some(1));
        assert_eq!(ix.get("c", &names), None);
    }

    #[test]
    fn slots_behave_as_a_map_through_growth_and_removals() {
        // A small hash range forces long probe runs, wrap-arounds and equal homes.
        let mut s = Slots::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 1;
        for step in 0..200_000u32 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let h = ((x >> 33) as u32) % 5_000 * 858_993;
            if x.is_multiple_of(3) {
                assert_eq!(s.remove(h), model.remove(&h), "step {step}");
            } else {
                let fresh = !model.contains_key(&h);
                assert_eq!(s.insert(h, step), fresh, "step {step}");
                model.entry(h).or_insert(step);
            }
            if step % 997 == 0 {
                assert_eq!(s.len, model.len());
                for (&h, &v) in &model {
                    assert_eq!(s.get(h), Some(v), "step {step}");
                }
            }
        }
        let mut all: Vec<u32> = s.values().collect();
        all.sort_unstable();
        let mut want: Vec<u32> = model.values().copied().collect();
        want.sort_unstable();
        assert_eq!(all, want);
        // 10 bytes an entry at the size it was made for, not a power of two.
        let t = Slots::with_capacity(1_000_000);
        assert!(t.slots.len() * 8 <= 10_000_016, "{}", t.slots.len());
    }
}
