//! A mailbox's change log (flag changes and expunges above the log floor, which a stateful
//! sync exports), in a list that moves into a file once large.
//!
//! The index keeps as many entries as the mailbox has mails (at least 10,000), so the log
//! grows with the mailbox: a sync that expunged or flagged every mail of a mailbox of a
//! million left a million entries, which every later open of it read back. As a queue of
//! enums on the heap that was some 42 bytes an entry; here each is a fixed 40-byte record in a
//! [`SpillVec`] (in the mailbox's directory past the spill threshold, see [`crate::spill`]),
//! and the rare keywords without a letter a change carries sit in a map beside it.

use std::path::Path;
use std::sync::Arc;

use super::index::{ExtraChange, LogEntry};
use crate::fasthash::FastMap;
use crate::spill::SpillVec;
use crate::store::{Flags, Guid128};

/// One entry as stored.
#[derive(Debug, Clone, Copy)]
struct Rec {
    modseq: u64,
    uid: u32,
    /// Flags: the key of its [`ExtraChange`] in [`ChangeLog::extras`] (0: none).
    extra: u32,
    /// Flags: added and removed keyword masks, little-endian; an expunge: the GUID.
    payload: [u8; 16],
    expunge: bool,
    added: u8,
    removed: u8,
}

/// See the module's documentation. A queue: entries are appended, and dropped from the front
/// when the index is compacted.
#[derive(Debug, Default, Clone)]
pub(crate) struct ChangeLog {
    recs: SpillVec<Rec>,
    /// Entries before this one were dropped; the space is reclaimed when they are half.
    start: usize,
    extras: FastMap<u32, Box<ExtraChange>>,
    next_extra: u32,
}

impl ChangeLog {
    /// An empty log whose list may move into a file of `dir`.
    pub(crate) fn new_in(dir: Option<Arc<Path>>) -> Self {
        Self { recs: SpillVec::new_in(dir), ..Self::default() }
    }

    /// An empty log whose list may move into a file of `dir`.
    pub(crate) fn in_dir(dir: &Path) -> Self {
        Self::new_in(crate::spill::dir(dir))
    }

    pub(crate) fn len(&self) -> usize {
        self.recs.len() - self.start
    }

    pub(crate) fn push_back(&mut self, e: LogEntry) {
        let rec = match e {
            LogEntry::Flags { modseq, uid, added, removed, kw_added, kw_removed, extra } => {
                let mut payload = [0u8; 16];
                payload[..4].copy_from_slice(&kw_added.to_le_bytes());
                payload[4..8].copy_from_slice(&kw_removed.to_le_bytes());
                let extra = match extra {
                    None => 0,
                    Some(x) => {
                        // Keys are never reused while the entry lives: 4 billion changes with
                        // such keywords would have to come first.
                        self.next_extra = self.next_extra.wrapping_add(1).max(1);
                        self.extras.insert(self.next_extra, x);
                        self.next_extra
                    }
                };
                Rec { modseq, uid, extra, payload, expunge: false, added: added.bits(), removed: removed.bits() }
            }
            LogEntry::Expunge { modseq, uid, guid } => {
                Rec { modseq, uid, extra: 0, payload: guid.0, expunge: true, added: 0, removed: 0 }
            }
        };
        self.recs.push(rec);
    }

    /// Drops the oldest entry; returns its modseq.
    pub(crate) fn pop_front(&mut self) -> Option<u64> {
        let r = *self.recs.get(self.start)?;
        self.recs.note_lookup(self.start);
        if r.extra != 0 {
            self.extras.remove(&r.extra);
        }
        self.start += 1;
        if self.start == self.recs.len() {
            self.recs.truncate(0);
            self.start = 0;
        } else if self.start >= 4096 && self.start * 2 >= self.recs.len() {
            // Moves the live half to the front: O(1) amortised per entry dropped.
            let live = self.recs.len() - self.start;
            let (start, recs) = (self.start, &mut self.recs);
            for i in 0..live {
                recs[i] = recs[start + i];
                if i % crate::spill::RELEASE_EVERY == crate::spill::RELEASE_EVERY - 1 {
                    recs.release();
                }
            }
            self.recs.truncate(live);
            self.start = 0;
        }
        Some(r.modseq)
    }

    /// The entry at `i` (0: the oldest).
    #[cfg(test)]
    pub(crate) fn get(&self, i: usize) -> Option<LogEntry> {
        let at = self.start.checked_add(i)?;
        let r = *self.recs.get(at)?;
        self.recs.note_lookup(at);
        Some(self.entry(r))
    }

    /// Every entry, oldest first, releasing the list's pages as it goes.
    pub(crate) fn iter(&self) -> impl Iterator<Item = LogEntry> + '_ {
        self.recs.iter_releasing().skip(self.start).map(|&r| self.entry(r))
    }

    fn entry(&self, r: Rec) -> LogEntry {
        if r.expunge {
            return LogEntry::Expunge { modseq: r.modseq, uid: r.uid, guid: Guid128(r.payload) };
        }
        let mask = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        LogEntry::Flags {
            modseq: r.modseq,
            uid: r.uid,
            added: Flags::from_bits_truncate(r.added),
            removed: Flags::from_bits_truncate(r.removed),
            kw_added: mask(&r.payload[..4]),
            kw_removed: mask(&r.payload[4..8]),
            extra: if r.extra == 0 { None } else { self.extras.get(&r.extra).cloned() },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn entry(i: u32) -> LogEntry {
        if i.is_multiple_of(3) {
            let mut g = [0u8; 16];
            g[..4].copy_from_slice(&i.to_be_bytes());
            LogEntry::Expunge { modseq: u64::from(i) + 1, uid: i, guid: Guid128(g) }
        } else {
            LogEntry::Flags {
                modseq: u64::from(i) + 1,
                uid: i,
                added: Flags::from_bits_truncate((i % 32) as u8),
                removed: Flags::from_bits_truncate((i / 32 % 32) as u8),
                kw_added: i.wrapping_mul(2654435761),
                kw_removed: i,
                extra: ExtraChange::boxed(
                    if i.is_multiple_of(7) { vec![i as u16].into() } else { Box::default() },
                    if i.is_multiple_of(11) { vec![1, 2].into() } else { Box::default() },
                ),
            }
        }
    }

    /// Pushes and pops in waves, through the compaction of the front, against a `VecDeque`.
    #[test]
    fn behaves_as_a_queue() {
        let d = tempfile::tempdir().unwrap();
        for dir in [Some(d.path()), None] {
            let mut log = dir.map_or_else(ChangeLog::default, ChangeLog::in_dir);
            let mut model = VecDeque::new();
            let mut next = 0u32;
            for wave in 0..6u32 {
                for _ in 0..5000 + wave * 1000 {
                    log.push_back(entry(next));
                    model.push_back(entry(next));
                    next += 1;
                }
                for _ in 0..4000 + wave * 1300 {
                    assert_eq!(log.pop_front(), model.pop_front().map(|e| e.modseq()));
                }
                assert_eq!(log.len(), model.len());
                assert!(log.iter().eq(model.iter().cloned()), "wave {wave}");
                assert_eq!(log.get(17), model.get(17).cloned());
                assert_eq!(log.get(model.len()), None);
            }
            while model.pop_front().is_some() {
                assert!(log.pop_front().is_some());
            }
            assert_eq!(log.pop_front(), None);
            assert!(log.extras.is_empty(), "the keywords of dropped entries go with them");
        }
    }
}
