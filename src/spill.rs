//! Vectors that move from the heap into an unlinked file once they grow large.
//!
//! An open Maildir mailbox keeps a record and a file name for every mail: some 80 bytes a
//! mail, so 80 MiB for a mailbox of a million, held for the whole sync. Dovecot keeps the
//! same facts in its index files, mapped from disk, and so does this: a [`SpillVec`] lives on
//! the heap while small, and past [`threshold`] bytes moves into a [`FileVec`] in the
//! mailbox's own directory (a file without a name, on the mail's file system, so that it is
//! disk, not a tmpfs's memory). Its pages are then the kernel's page cache, which it writes
//! back and evicts like any file's; the process holds only what it touched since its last
//! [`SpillVec::release`]. Growth releases by itself; code that walks a whole list calls
//! `release` every [`RELEASE_EVERY`] elements.
//!
//! When the file cannot be made (no `O_TMPFILE` on that file system, no space, no quota),
//! the vector stays on the heap: slower to grow, never wrong.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::sys::FileVec;

/// How many elements a walk over a whole list touches between two releases (512 KiB of
/// 32-byte records).
pub(crate) const RELEASE_EVERY: usize = 16_384;

/// How many lookups on another page happen between two releases. The kernel maps up to 16
/// cached pages around each page fault (`fault_around_bytes`, 64 KiB): this bounds what lookups
/// hold to 4 MiB a list. Lookups in no particular order fault on nearly every one after each
/// release, which costs (a 400,000-mail hash join over lists in files took 10 times as long
/// as on the heap): such lists stay on the heap (the directory scan of a Maildir's open).
const LOOKUPS_PER_RELEASE: usize = 64;

/// The size past which a vector moves into a file: 4 MiB, or `MAILREPLICA_SPILL_BYTES`
/// (which the tests set to 0 to run every mailbox through the file path). In the library's
/// own unit tests it is 0.
pub(crate) fn threshold() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MAILREPLICA_SPILL_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(if cfg!(test) {
            0
        } else {
            4 << 20
        })
    })
}

/// A vector of `Copy` values on the heap, or in a file of `dir` once larger than
/// [`threshold`]. Dereferences to a slice like a `Vec`.
pub(crate) struct SpillVec<T: Copy> {
    heap: Vec<T>,
    file: Option<FileVec<T>>,
    /// Where the file goes; `None`: never leaves the heap.
    dir: Option<Arc<Path>>,
    /// Lookups that moved to another page since the last release, and the page of the last
    /// one (see [`SpillVec::note_lookup`]).
    lookups: AtomicUsize,
    last_page: AtomicUsize,
    /// Where the last searches ended (see [`SpillVec::search_by_key`]).
    hints: Hints,
}

/// How many walkers a list's searches follow at once: an export and an import walk one
/// mailbox's records side by side, each by UID and by record.
const HINTS: usize = 4;

/// The positions where the last searches of a sorted list ended, one slot a walker: a search
/// for the key right after a slot's is answered from the slot's neighbourhood instead of by a
/// binary search, whose probes land on pages all over a list in a file (each fault maps 16
/// pages: on 2,000,000 records, two walkers kept some 10 MiB resident between releases).
/// A hint is only a guess, checked against the sorted order before it is used, so a stale one
/// after the list changed costs a binary search and nothing else.
#[derive(Default)]
struct Hints {
    at: [AtomicUsize; HINTS],
    next: AtomicUsize,
}

impl<T: Copy> Default for SpillVec<T> {
    fn default() -> Self {
        Self::new_in(None)
    }
}

impl<T: Copy> SpillVec<T> {
    /// An empty vector that may move into a file of `dir`.
    pub(crate) fn new_in(dir: Option<Arc<Path>>) -> Self {
        Self {
            heap: Vec::new(),
            file: None,
            dir,
            lookups: AtomicUsize::new(0),
            last_page: AtomicUsize::new(0),
            hints: Hints::default(),
        }
    }

    /// The directory its file goes to (for a vector that replaces this one).
    pub(crate) fn dir(&self) -> Option<Arc<Path>> {
        self.dir.clone()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.file.as_ref().map_or(self.heap.capacity(), FileVec::capacity)
    }

    /// Makes room for `additional` more elements, exactly.
    pub(crate) fn reserve_exact(&mut self, additional: usize) {
        let want = self.len().saturating_add(additional);
        if want <= self.capacity() {
            return;
        }
        if self.file.is_none() && want.saturating_mul(size_of::<T>()) >= threshold() {
            self.move_to_file(want);
        }
        if let Some(f) = &mut self.file {
            match f.grow_to(want) {
                Ok(()) => {
                    // What was written is in the page cache now; hold none of it.
                    f.release();
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a large list stays on the heap: its file cannot grow");
                    self.move_to_heap(want);
                }
            }
        }
        self.heap.reserve_exact(want - self.heap.len());
    }

    /// Grows by an eighth (at least 4 KiB), not double: these are the largest lists a mailbox
    /// has, and a doubling would briefly hold three times the list.
    fn grow(&mut self) {
        let len = self.len();
        let step = (len / 8).max(4096 / size_of::<T>()).max(1);
        self.reserve_exact(step);
    }

    pub(crate) fn push(&mut self, v: T) {
        if self.len() == self.capacity() {
            self.grow();
        }
        match &mut self.file {
            Some(f) => {
                let pushed = f.push(v);
                debug_assert!(pushed);
                // Room made in advance is filled without growing: release as a walk does.
                if f.len() % RELEASE_EVERY == 0 {
                    f.release();
                }
            }
            None => self.heap.push(v),
        }
    }

    pub(crate) fn extend_from_slice(&mut self, s: &[T]) {
        if self.capacity() - self.len() < s.len() {
            let len = self.len();
            self.reserve_exact(s.len().max((len / 8).max(4096 / size_of::<T>())));
        }
        match &mut self.file {
            Some(f) => {
                let before = f.len();
                for &v in s {
                    let pushed = f.push(v);
                    debug_assert!(pushed);
                }
                if before / RELEASE_EVERY != f.len() / RELEASE_EVERY {
                    f.release();
                }
            }
            None => self.heap.extend_from_slice(s),
        }
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        match &mut self.file {
            Some(f) => f.truncate(len),
            None => self.heap.truncate(len),
        }
    }

    /// Keeps the elements `keep` says yes to, in order.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut n = 0;
        for i in 0..self.len() {
            if keep(&self[i]) {
                self[n] = self[i];
                n += 1;
            }
            if i % RELEASE_EVERY == RELEASE_EVERY - 1 {
                self.release();
            }
        }
        self.truncate(n);
        self.release();
    }

    /// Changes every element in order, releasing the pages behind every [`RELEASE_EVERY`] of
    /// them (the mutable [`SpillVec::iter_releasing`]).
    pub(crate) fn update_releasing(&mut self, mut f: impl FnMut(&mut T)) {
        for i in 0..self.len() {
            if i % RELEASE_EVERY == RELEASE_EVERY - 1 {
                self.release();
            }
            f(&mut self[i]);
        }
        self.release();
    }

    /// Inserts `v` at `i`, shifting the rest up.
    pub(crate) fn insert(&mut self, i: usize, v: T) {
        assert!(i <= self.len(), "insertion index {i} past the end");
        self.push(v);
        self[i..].rotate_right(1);
    }

    /// Gives back a heap vector's spare room (a file keeps its size until dropped).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.heap.shrink_to_fit();
    }

    /// The elements in order, releasing the pages behind every [`RELEASE_EVERY`] of them: a
    /// walk over a whole list that holds no more of it than that.
    pub(crate) fn iter_releasing(&self) -> impl Iterator<Item = &T> + '_ {
        self.iter().enumerate().map(move |(i, v)| {
            if i % RELEASE_EVERY == RELEASE_EVERY - 1 {
                self.release();
            }
            v
        })
    }

    /// Counts a lookup of element `i` (a binary search's result, a name read) and releases the
    /// pages every [`LOOKUPS_PER_RELEASE`] lookups that landed on another page than the one
    /// before: lookups one by one over a whole list (an export in UID order) then hold no more
    /// than a few MiB, and cost a release every few hundred KiB.
    pub(crate) fn note_lookup(&self, i: usize) {
        if self.file.is_none() {
            return;
        }
        let page = i.saturating_mul(size_of::<T>()) / 4096;
        if self.last_page.swap(page, Ordering::Relaxed) != page
            && self.lookups.fetch_add(1, Ordering::Relaxed) >= LOOKUPS_PER_RELEASE
        {
            self.lookups.store(0, Ordering::Relaxed);
            self.release();
        }
    }

    /// `binary_search_by_key` on a list sorted by `key` with unique keys, answered near a
    /// recent search's end when it can be (see [`Hints`]); the same result either way.
    pub(crate) fn search_by_key(&self, key: u32, f: impl Fn(&T) -> u32) -> Result<usize, usize> {
        let s: &[T] = self;
        let r = 'found: {
            for slot in &self.hints.at {
                let h = slot.load(Ordering::Relaxed);
                for i in [h, h + 1] {
                    // `i` is the answer if the key is there, or if it falls between `i - 1`
                    // and `i` (the insertion point).
                    if i > s.len() || (i > 0 && f(&s[i - 1]) >= key) {
                        continue;
                    }
                    let r = match s.get(i).map(&f) {
                        Some(k) if k == key => Ok(i),
                        Some(k) if k > key => Err(i),
                        None => Err(i),
                        Some(_) => continue,
                    };
                    slot.store(i, Ordering::Relaxed);
                    break 'found r;
                }
            }
            let r = s.binary_search_by_key(&key, &f);
            let n = self.hints.next.fetch_add(1, Ordering::Relaxed) % HINTS;
            self.hints.at[n].store(r.unwrap_or_else(|i| i), Ordering::Relaxed);
            r
        };
        self.note_lookup(r.unwrap_or_else(|i| i));
        r
    }

    /// Moves the vector into a file of `dir` when it grows past the threshold (a vector made
    /// on the heap for random access, kept on once that is over).
    pub(crate) fn set_dir(&mut self, dir: Option<Arc<Path>>) {
        self.dir = dir;
    }

    /// Drops the file's pages from this process (see [`FileVec::release`]); nothing for a
    /// vector on the heap.
    pub(crate) fn release(&self) {
        if let Some(f) = &self.file {
            f.release();
        }
    }

    /// True once the vector lives in a file (for tests).
    #[cfg(test)]
    pub(crate) fn in_file(&self) -> bool {
        self.file.is_some()
    }

    fn move_to_file(&mut self, cap: usize) {
        let Some(dir) = &self.dir else { return };
        let made = FileVec::create(dir, cap).map(|mut f| {
            for &v in &self.heap {
                let pushed = f.push(v);
                debug_assert!(pushed);
            }
            f
        });
        match made {
            Ok(f) => {
                f.release();
                self.file = Some(f);
                self.heap = Vec::new();
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "a large list stays on the heap");
                // Do not try again for this vector.
                self.dir = None;
            }
        }
    }

    fn move_to_heap(&mut self, cap: usize) {
        if let Some(f) = self.file.take() {
            let mut heap = Vec::with_capacity(cap);
            heap.extend_from_slice(f.as_slice());
            self.heap = heap;
        }
        self.dir = None;
    }
}

impl<T: Copy> Deref for SpillVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.file {
            Some(f) => f.as_slice(),
            None => &self.heap,
        }
    }
}

impl<T: Copy> DerefMut for SpillVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.file {
            Some(f) => f.as_mut_slice(),
            None => &mut self.heap,
        }
    }
}

impl<T: Copy> Clone for SpillVec<T> {
    fn clone(&self) -> Self {
        let mut c = Self::new_in(self.dir.clone());
        c.reserve_exact(self.len());
        c.extend_from_slice(self);
        c
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for SpillVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Copy + PartialEq> PartialEq for SpillVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Copy + Eq> Eq for SpillVec<T> {}

impl<T: Copy> From<Vec<T>> for SpillVec<T> {
    fn from(heap: Vec<T>) -> Self {
        Self { heap, ..Self::default() }
    }
}

/// The directory as the shared form a [`SpillVec`] keeps.
pub(crate) fn dir(p: &Path) -> Option<Arc<Path>> {
    Some(Arc::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spilled_vector_behaves_as_a_vec() {
        let d = tempfile::tempdir().unwrap();
        let mut v = SpillVec::<u64>::new_in(dir(d.path()));
        let mut model = Vec::new();
        for i in 0..50_000u64 {
            v.push(i * 3);
            model.push(i * 3);
        }
        assert!(v.in_file(), "threshold 0 in unit tests");
        v.extend_from_slice(&[1, 2, 3]);
        model.extend_from_slice(&[1, 2, 3]);
        v.retain(|x| x % 2 == 1);
        model.retain(|x| x % 2 == 1);
        v[7] = 11;
        model[7] = 11;
        v.sort_unstable();
        model.sort_unstable();
        v.release();
        assert_eq!(&*v, &model[..]);
        let c = v.clone();
        assert_eq!(&*c, &model[..]);
        v.truncate(0);
        assert!(v.is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// The hinted search answers exactly as a binary search, whatever the walkers do and
    /// however the list changes between searches (hints go stale).
    #[test]
    fn a_hinted_search_is_a_binary_search() {
        let d = tempfile::tempdir().unwrap();
        let mut v = SpillVec::<u32>::new_in(dir(d.path()));
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = move |n: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(n.max(1))) as u32
        };
        for i in 0..20_000u32 {
            v.push(i * 3 + 1);
        }
        let mut walkers = [0u32; 6];
        for round in 0..200_000u32 {
            let w = rnd(6) as usize;
            // Mostly the next keys (hits and misses), sometimes a jump, rarely a change.
            let key = match rnd(10) {
                0 => rnd(70_000),
                1 => u32::MAX,
                2 => 0,
                _ => walkers[w] + rnd(4),
            };
            walkers[w] = key;
            let got = v.search_by_key(key, |&x| x);
            assert_eq!(got, v.binary_search_by_key(&key, |&x| x), "round {round}, key {key}");
            if rnd(1000) == 0 {
                let cut = rnd(7) + 2;
                v.retain(|x| x % cut != 0);
            }
            if rnd(3000) == 0 {
                v.truncate(v.len() / 2);
            }
        }
    }

    #[test]
    fn without_a_usable_directory_the_vector_stays_on_the_heap() {
        let mut v = SpillVec::<u32>::new_in(dir(Path::new("/nonexistent/mailreplica")));
        for i in 0..10_000 {
            v.push(i);
        }
        assert!(!v.in_file());
        assert_eq!(v.len(), 10_000);
        assert!(v.iter().copied().eq(0..10_000));
    }
}
