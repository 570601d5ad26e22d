//! A fast, non-cryptographic hasher for the maps a mailbox scan builds over file names
//! (100,000 names are hashed several times on every full scan, and SipHash was a tenth of it).
//!
//! The mixing step is FxHash's (rotate, xor, multiply by an odd constant), eight bytes at a
//! time. It makes no attempt to resist hash flooding: the names come from the user's own
//! Maildir, so the worst a crafted set of names could do is slow down that user's own scans.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

const K: u64 = 0x517c_c1b7_2722_0a95;

/// FxHash-style hasher.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A 64-bit hash good enough to stand for the value itself (SipHash-1-3 with fixed keys), for
/// values that are compared by hash alone: a mail's identity, "is this name taken". FastHasher
/// is not: among 300,000 Maildir names that differ only in their digits it gives hundreds of
/// equal 64-bit hashes, which is harmless for spreading a map's buckets and wrong for identity.
pub(crate) fn strong_hash<T: std::hash::Hash + ?Sized>(v: &T) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A `HashMap` with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
/// A `HashSet` with [`FastHasher`].
pub(crate) type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    fn h(s: &str) -> u64 {
        let mut x = FastHasher::default();
        s.hash(&mut x);
        x.finish()
    }

    #[test]
    fn distinguishes_similar_names() {
        let names: Vec<String> = (0..10_000).map(|i| format!("1700000000.M{i}P1.host,S=100,W=102")).collect();
        let hashes: FastSet<u64> = names.iter().map(|n| h(n)).collect();
        assert_eq!(hashes.len(), names.len());
        assert_ne!(h("ab"), h("ab\0"));
        assert_ne!(h(""), h("\0"));
    }

    #[test]
    fn strong_hash_tells_similar_names_apart() {
        let names: Vec<String> =
            (1..=300_000u32).map(|i| format!("{}.M{i}P4242.master,S=74,W=79", 1_700_000_000 + i)).collect();
        let strong: FastSet<u64> = names.iter().map(|n| strong_hash(n.as_str())).collect();
        assert_eq!(strong.len(), names.len());
        // Why it exists: the fast hash does not, on the same names.
        let fast: FastSet<u64> = names.iter().map(|n| h(n)).collect();
        assert!(fast.len() < names.len());
    }
}
