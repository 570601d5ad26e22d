//! The GUIDs of the saves an export sent, and those the peer asked for.
//!
//! The peer asks for mail bodies by GUID (`R` records) after our changes; we send the first
//! save we sent with each GUID asked for, in the order of our UIDs. A map from every sent
//! GUID to its UID, held until the asking ends, grows with the mailbox (a backup of a million
//! mails sends a million saves). So both lists are only written down as they come, each
//! into one of `n` runs ([`crate::runs`]) by a keyed hash of the GUID, and matched when the
//! sending starts, one partition at a time, as a large Maildir's open matches its directories
//! with its uidlist (`store::maildir::scan`). The runs of a large export go to a file in the
//! place the store offers ([`crate::store::Mailbox::scratch_dir`]); a small one's stay in
//! memory.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::runs::{self, Partitions, Runs};
use crate::spill::{self, SpillVec};
use crate::store::{StoreError, StoreResult};

/// The bytes of a sent save's record: its length, its UID and a GUID of 32 hex digits
/// (Dovecot's and ours; other GUIDs vary).
const RECORD: usize = 4 + 4 + 32;

/// See the module's documentation.
pub(crate) struct SentGuids {
    /// Partition `p`'s sent saves (UID, GUID) in run `p`, its asked GUIDs in `parts + p`.
    runs: Runs,
    /// By GUID.
    part: Partitions,
    /// Where the runs and the result go when large (`None`: memory).
    dir: Option<Arc<Path>>,
}

impl SentGuids {
    /// Ready for about `saves` saves; large lists go to files in `dir`.
    pub(crate) fn new(dir: Option<&Path>, saves: usize) -> Self {
        let part = Partitions::new(saves.saturating_mul(RECORD), spill::threshold() / 4, 1, 2);
        let dir = if part.parts > 1 { dir.map(Arc::from) } else { None };
        Self { runs: Runs::new(dir.as_deref(), 2 * part.parts, part.chunk), part, dir }
    }

    /// Notes a save sent with `guid` as our mail `uid`; saves come in ascending UID order.
    pub(crate) fn sent(&mut self, guid: &str, uid: u32) {
        let p = self.part.of(guid);
        self.runs.push(p, &[&uid.to_le_bytes(), guid.as_bytes()]);
    }

    /// Notes that the peer asked for `guid`.
    pub(crate) fn asked(&mut self, guid: &str) {
        let p = self.part.of(guid);
        self.runs.push(self.part.parts + p, &[guid.as_bytes()]);
    }

    /// The UIDs to send, ascending, each once: the first save sent with each GUID asked for
    /// (with `all`, with each GUID sent at all). `Err(NotPossible)` names a GUID asked for
    /// that no save was sent with.
    pub(crate) fn resolve(mut self, all: bool) -> StoreResult<SpillVec<u32>> {
        let place = self.dir.as_deref().map_or_else(|| "(memory)".into(), Path::to_path_buf);
        let io_err = |e: io::Error| StoreError::io("read", place.clone(), e);
        let parts = self.part.parts;
        for run in 0..2 * parts {
            self.runs.finish(run);
        }
        let mut out = Runs::new(self.dir.as_deref(), parts, self.part.chunk);
        for p in 0..parts {
            let mut first: HashMap<Box<str>, u32> = HashMap::new();
            let mut r = self.runs.reader(p);
            while let Some(rec) = r.next().map_err(io_err)? {
                let (uid, guid) = sent_record(rec).map_err(io_err)?;
                first.entry(guid.into()).or_insert(uid);
            }
            drop(r);
            self.runs.clear(p);
            let mut uids: Vec<u32> = if all { first.values().copied().collect() } else { Vec::new() };
            let mut r = self.runs.reader(parts + p);
            while let Some(rec) = r.next().map_err(io_err)? {
                let guid = std::str::from_utf8(rec).map_err(|_| io_err(bad_run()))?;
                match first.get(guid) {
                    Some(&uid) if !all => uids.push(uid),
                    Some(_) => {}
                    None => return Err(StoreError::NotPossible(format!("remote requested unexpected GUID {guid}"))),
                }
            }
            drop(r);
            self.runs.clear(parts + p);
            uids.sort_unstable();
            uids.dedup();
            for u in uids {
                out.push(p, &[&u.to_le_bytes()]);
            }
            out.finish(p);
        }
        drop(self.runs);
        let mut result = SpillVec::new_in(self.dir.clone());
        let mut readers: Vec<_> = (0..parts).map(|p| out.reader(p)).collect();
        let uid = |rec: &[u8]| sent_record(rec).map_or(0, |(u, _)| u);
        runs::merge(
            &mut readers,
            |a, b| uid(a).cmp(&uid(b)),
            |rec| {
                result.push(uid(rec));
                Ok(())
            },
            io_err,
        )?;
        Ok(result)
    }
}

fn bad_run() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a record of a run is damaged")
}

/// A record that starts with a UID: (UID, the rest as text).
fn sent_record(rec: &[u8]) -> io::Result<(u32, &str)> {
    let (uid, guid) = rec.split_first_chunk::<4>().ok_or_else(bad_run)?;
    Ok((u32::from_le_bytes(*uid), std::str::from_utf8(guid).map_err(|_| bad_run())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid(i: u32) -> String {
        format!("{:032x}", u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    #[test]
    fn asked_guids_resolve_to_the_first_save_sent_with_each_in_uid_order() {
        let d = tempfile::tempdir().unwrap();
        // Enough saves for many partitions (the unit tests' threshold is 0), and few for one.
        for saves in [5000u32, 3] {
            let mut s = SentGuids::new(Some(d.path()), saves as usize);
            assert_eq!(s.part.parts > 1, saves > 100, "{saves} saves, {} partitions", s.part.parts);
            assert_eq!(s.runs.in_file(), s.part.parts > 1);
            // Every tenth save repeats the GUID of the one before it.
            let g = |uid: u32| guid(if uid.is_multiple_of(10) { uid - 1 } else { uid });
            for uid in 1..=saves {
                s.sent(&g(uid), uid);
            }
            // Asked in no order, some twice; the repeated GUIDs resolve to their first save.
            let mut asked: Vec<u32> = (1..=saves).filter(|u: &u32| !u.is_multiple_of(3)).collect();
            asked.reverse();
            asked.extend((1..=saves).filter(|u: &u32| u.is_multiple_of(7)));
            for &uid in &asked {
                s.asked(&g(uid));
            }
            let mut want: Vec<u32> = asked.iter().map(|&u| if u.is_multiple_of(10) { u - 1 } else { u }).collect();
            want.sort_unstable();
            want.dedup();
            assert_eq!(s.resolve(false).unwrap().to_vec(), want);
        }
    }

    #[test]
    fn all_sends_every_first_save_and_an_unknown_guid_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SentGuids::new(Some(d.path()), 2000);
        for uid in 1..=2000 {
            s.sent(&guid(uid / 2), uid);
        }
        s.asked(&guid(7));
        let want: Vec<u32> = (1..=2000u32).filter(|u| u.is_multiple_of(2) || *u == 1).collect();
        assert_eq!(s.resolve(true).unwrap().to_vec(), want);

        let mut s = SentGuids::new(Some(d.path()), 2000);
        for uid in 1..=2000 {
            s.sent(&guid(uid), uid);
        }
        s.asked(&guid(5));
        s.asked("nope");
        match s.resolve(false) {
            Err(StoreError::NotPossible(m)) => assert!(m.contains("nope"), "{m}"),
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    }
}
