//! Finding entries by a string key (a mail's GUID, a file's base name) without a hash map of
//! strings.
//!
//! The importer and the exporter each need "which of my entries has this GUID" for every mail
//! of a mailbox, and a Maildir's open "which scanned file has this base name" for every file:
//! 200,000 entries in an initial sync, a million in a large mailbox. A `HashMap<String, _>`
//! costs a string allocation and a 40-byte slot per entry (a `HashMap<&str, u32>` 24 bytes),
//! which was a third of the slave's memory. This index
//! keeps only 32 bits of a keyed hash and a `u32` per entry (9 bytes a slot) and asks the owner
//! of the entries to confirm a match, so it is exact: two GUIDs that share a hash (SipHash with
//! keys chosen at random per index, so a peer cannot aim for it; among 400,000 GUIDs a few
//! dozen pairs do) are kept apart, the later one in a small map of full strings.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

/// The keys of `by_hash` are SipHash outputs already: they are their own hash, spread over 64
/// bits (the table takes its bucket from the low bits and a tag from the top ones).
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed with this; anything else still spreads.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.0 = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Prehashed>>;

/// Whoever owns the entries: says whether entry `v` has the key `key`.
pub(crate) trait KeySource {
    fn key_is(&self, v: u32, key: &str) -> bool;
}

/// Key → entry, one entry per key.
#[derive(Debug, Default)]
pub(crate) struct StrIndex {
    keys: RandomState,
    by_hash: FastMap<u32, u32>,
    /// Entries whose key's hash was taken by another key.
    collided: HashMap<Box<str>, u32>,
}

impl StrIndex {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// An index with room for `n` entries, so that a table built up to a known size is never
    /// copied to a larger one (a resize holds both tables at once).
    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut ix = Self::default();
        ix.by_hash.reserve(n);
        ix
    }

    fn hash(&self, guid: &str) -> u32 {
        self.keys.hash_one(guid) as u32
    }

    /// The entry with this GUID.
    pub(crate) fn get(&self, guid: &str, src: &impl KeySource) -> Option<u32> {
        if let Some(&v) = self.by_hash.get(&self.hash(guid))
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
        let h = self.hash(guid);
        match self.by_hash.entry(h) {
            Entry::Vacant(e) => {
                e.insert(v);
            }
            Entry::Occupied(_) => {
                self.collided.insert(guid.into(), v);
            }
        }
        None
    }

    /// Removes the entry for `guid` and returns it.
    pub(crate) fn remove(&mut self, guid: &str, src: &impl KeySource) -> Option<u32> {
        let h = self.hash(guid);
        if let Some(&v) = self.by_hash.get(&h)
            && src.key_is(v, guid)
        {
            self.by_hash.remove(&h);
            return Some(v);
        }
        if self.collided.is_empty() { None } else { self.collided.remove(guid) }
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }

    /// Every entry, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_hash.values().chain(self.collided.values()).copied()
    }

    /// Forgets every entry, and the memory they took.
    pub(crate) fn clear(&mut self) {
        self.by_hash = FastMap::default();
        self.collided = HashMap::new();
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
        let mut ix = StrIndex::new();
        assert_eq!(ix.insert("a", 0, &names), None);
        assert_eq!(ix.insert("a", 2, &names), Some(0));
        // Force a collision: "b" lands in the slot "a" holds.
        let ha = ix.hash("a");
        ix.by_hash.remove(&ha);
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
}
