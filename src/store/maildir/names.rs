//! The file names of an open mailbox's mails, in one buffer.
//!
//! An open Maildir mailbox keeps every mail's file name, to open, rename or match the file.
//! Kept as one allocation each, a 42-byte name took a 64-byte heap block and a 16-byte pointer:
//! at 400,000 mails that was 32 MiB, most of what an export of one large mailbox held. Here the
//! names lie end to end in one buffer and a mail keeps a 4-byte offset and a 1-byte length
//! (a file name has at most 255 bytes: `NAME_MAX`). A rename appends the new name and leaves
//! the old one behind as garbage, which [`Names::compact`] reclaims once it outweighs the live
//! names. A large mailbox's buffer moves into a file ([`crate::spill`]).
//!
//! It also holds what few mails have (the uidlist's `G` extension, keywords without a letter),
//! so that the per-mail record stays a plain 32-byte value that can live in a file too.

use std::path::Path;

use crate::spill::{self, SpillVec};
use crate::store::error::{StoreError, StoreResult};

/// Where a name lies in [`Names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct NameRef {
    pub(crate) off: u32,
    pub(crate) len: u8,
}

/// The longest file name Linux allows (`NAME_MAX`).
pub(crate) const MAX_NAME: usize = 255;

/// Garbage below this is never worth a compaction.
const MIN_GARBAGE: usize = 1 << 20;

/// The parts of a mail that most mails lack (see [`Names::rare`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Rare {
    /// The uidlist's `G` extension.
    pub(crate) guid_ext: Option<Box<str>>,
    /// Keywords without a letter, as ids into the index's keyword table, in the mail's order.
    pub(crate) extras: Box<[u16]>,
}

/// The names of one mailbox's mails.
#[derive(Debug, Default, Clone)]
pub(crate) struct Names {
    buf: SpillVec<u8>,
    garbage: usize,
    /// Every [`Rare`] a mail of this mailbox was given; a mail keeps its place + 1 (0: none).
    /// Places of expunged mails are not reused: they are few.
    rare: Vec<Rare>,
}

impl Names {
    /// An empty buffer that moves into a file of `dir` once large.
    pub(crate) fn in_dir(dir: &Path) -> Self {
        Self { buf: SpillVec::new_in(spill::dir(dir)), ..Self::default() }
    }

    /// Stores `name`. Fails for a name longer than any file name can be, or when the buffer
    /// would pass 4 GiB (some 16 million names even at the longest).
    pub(crate) fn push(&mut self, name: &str) -> StoreResult<NameRef> {
        let len = u8::try_from(name.len())
            .map_err(|_| StoreError::Limit(format!("a file name of {} bytes (at most {MAX_NAME})", name.len())))?;
        let off = u32::try_from(self.buf.len())
            .ok()
            .filter(|o| o.checked_add(u32::from(len)).is_some())
            .ok_or_else(|| StoreError::Limit("more than 4 GiB of file names in one mailbox".into()))?;
        self.buf.extend_from_slice(name.as_bytes());
        Ok(NameRef { off, len })
    }

    /// The name at `r`.
    pub(crate) fn get(&self, r: NameRef) -> &str {
        self.buf.note_lookup(r.off as usize);
        let start = r.off as usize;
        let bytes = self.buf.get(start..start + usize::from(r.len)).unwrap_or_default();
        // Every name went in as a whole `&str` and a NameRef covers exactly one.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// `old` is no longer used; [`Names::compact`] will reclaim it.
    pub(crate) fn release_name(&mut self, old: NameRef) {
        self.garbage += usize::from(old.len);
    }

    /// Replaces the name at `*r` with `name`.
    pub(crate) fn replace(&mut self, r: &mut NameRef, name: &str) -> StoreResult<()> {
        let new = self.push(name)?;
        self.release_name(*r);
        *r = new;
        Ok(())
    }

    /// True when released names take more room than the live ones (and at least 1 MiB).
    pub(crate) fn wants_compaction(&self) -> bool {
        self.garbage >= MIN_GARBAGE && self.garbage > self.buf.len() - self.garbage
    }

    /// Like [`Names::compact`], into a buffer that moves into a file of `dir` once large: a
    /// directory scan's names, kept on the heap while it is matched in no particular order,
    /// become the open mailbox's.
    pub(crate) fn compact_into<T: Copy>(
        &mut self,
        dir: &Path,
        items: &mut SpillVec<T>,
        get: impl Fn(&T) -> NameRef,
        set: impl Fn(&mut T, NameRef),
    ) {
        self.buf.set_dir(spill::dir(dir));
        self.compact(items, get, set);
    }

    /// Copies the names that `items` still use into a new buffer of their size and points them
    /// there (`get` reads an item's place, `set` changes it). Every name in use must belong to
    /// one of `items`.
    pub(crate) fn compact<T: Copy>(
        &mut self,
        items: &mut SpillVec<T>,
        get: impl Fn(&T) -> NameRef,
        set: impl Fn(&mut T, NameRef),
    ) {
        let mut buf = SpillVec::new_in(self.buf.dir());
        buf.reserve_exact(self.buf.len() - self.garbage);
        items.update_releasing(|item| {
            let r = get(item);
            // The new buffer is no larger than the old one: the offset fits.
            let off = buf.len() as u32;
            buf.extend_from_slice(self.get(r).as_bytes());
            set(item, NameRef { off, len: r.len });
        });
        self.buf = buf;
        self.garbage = 0;
    }

    /// Keeps `rare` for a mail: its place + 1, or 0 for a mail without any.
    pub(crate) fn add_rare(&mut self, rare: Rare) -> u32 {
        if rare == Rare::default() {
            return 0;
        }
        self.rare.push(rare);
        self.rare.len() as u32
    }

    /// The [`Rare`] at `place` (from [`Names::add_rare`]; 0: none).
    pub(crate) fn rare(&self, place: u32) -> Option<&Rare> {
        place.checked_sub(1).and_then(|i| self.rare.get(i as usize))
    }

    /// Replaces the [`Rare`] at `*place`, giving it one if it had none.
    pub(crate) fn set_rare(&mut self, place: &mut u32, rare: Rare) {
        match place.checked_sub(1).and_then(|i| self.rare.get_mut(i as usize)) {
            Some(r) => *r = rare,
            None => *place = self.add_rare(rare),
        }
    }

    /// Bytes held (for tests and figures).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// True once the buffer is in a file (for tests).
    #[cfg(test)]
    pub(crate) fn in_file(&self) -> bool {
        self.buf.in_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_compaction_keeps_only_the_live_ones() {
        let mut n = Names::default();
        let a = n.push("1700000000.M1P2.host,S=10:2,S").unwrap();
        let mut b = n.push("").unwrap();
        assert_eq!(n.get(a), "1700000000.M1P2.host,S=10:2,S");
        assert_eq!(n.get(b), "");
        assert!(n.push(&"x".repeat(256)).is_err(), "longer than NAME_MAX");
        let long = "y".repeat(255);
        let mut refs = vec![a, n.push(&long).unwrap()];
        assert_eq!(n.get(refs[1]), long);
        // Rename one mail many times: garbage grows until a compaction takes it back.
        for i in 0..100_000 {
            n.replace(&mut b, &format!("renamed-{i}:2,")).unwrap();
        }
        assert_eq!(n.get(b), "renamed-99999:2,");
        assert!(n.wants_compaction());
        refs.push(b);
        let mut refs = SpillVec::from(refs);
        n.compact(&mut refs, |r| *r, |r, new| *r = new);
        assert!(!n.wants_compaction());
        assert_eq!(n.get(refs[0]), "1700000000.M1P2.host,S=10:2,S");
        assert_eq!(n.get(refs[1]), long);
        assert_eq!(n.get(refs[2]), "renamed-99999:2,");
        assert!(n.held() < 4096, "only the live names are kept: {}", n.held());
    }
}
