//! The directory scan of a full open, and its match against the uidlist.
//!
//! An open that cannot trust its index (the first one, and any after `new/` or `cur/`
//! changed: every delivery) lists both directories and finds each uidlist record's file by
//! base name. The uidlist is in UID order, the directories in none, so this is a join on the
//! base name, and the mails come out in UID order.
//!
//! A mailbox whose names fit in [`crate::spill::threshold`] bytes (4 MiB, some 80,000 files)
//! is joined in memory ([`DirScan`]): a hash index of the scan, probed by each record as the
//! uidlist is read. A larger one would hold some 65 bytes a file on the heap for that, which
//! grows with the mailbox; a hash index whose entries live in a file costs a page fault a
//! probe. So a large scan is joined by partitions ([`BigScan`]): every file name, and every
//! uidlist record, goes into one of `n` runs ([`crate::runs`]) by a keyed hash of its base
//! name, so that a record and its file land in the same one. Each partition is then joined in
//! memory on its own, one after the other: its matches (in UID order, since the records were
//! written in that order) and its files without a UID (sorted as Dovecot orders new files)
//! go to two more runs. Merging the partitions' matches by UID, then their new files in
//! Dovecot's order, gives the mails. Every run is written and read in order, in large
//! pieces; what the heap holds is one partition, at most about the threshold's worth of
//! names, and a buffer a run.

use std::io;
use std::path::Path;

use super::filename;
use super::index::IndexedMail as Mail;
use super::names::{NameRef, Names};
use super::uidlist::{self, Record, Uidlist};
use crate::runs::{self, Partitions, RunReader, Runs};
use crate::spill::{self, SpillVec};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{MAX_UID, StoreError};
use crate::str_index::{KeySource, StrIndex};

/// How many new uidlist records are made and appended at a time: a mailbox of files without
/// UIDs (a Maildir no Dovecot has seen has no uidlist at all) is listed without holding a
/// record, with its own copy of the name, for every file.
pub(super) const APPEND_CHUNK: usize = 8192;

/// Lists `new/` and `cur/`, giving `each` every file's name and whether it is in `new/`.
/// Names that are not UTF-8 are skipped with a warning, dot files silently; a missing `new/`
/// is an empty one.
fn read_entries(dir: &Path, mut each: impl FnMut(&str, bool) -> StoreResult<()>) -> StoreResult<()> {
    for (sub, in_new) in [("new", true), ("cur", false)] {
        let d = dir.join(sub);
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && in_new => continue,
            Err(e) => return Err(StoreError::io("opendir", &d, e)),
        };
        for e in rd {
            let e = e.ctx("readdir", &d)?;
            let Ok(name) = e.file_name().into_string() else {
                tracing::warn!(dir = %d.display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            each(&name, in_new)?;
        }
    }
    Ok(())
}

/// The files found in `new/` and `cur/`, in memory: their names in one buffer, from which a
/// full load copies those that got a UID into the mailbox's own [`Names`], in UID order.
#[derive(Debug, Default)]
pub(super) struct DirScan {
    pub(super) names: Names,
    /// (file name, in `new/`). On the heap, as the names: an open matches them in no
    /// particular order (see [`crate::spill`]).
    pub(super) files: Vec<(NameRef, bool)>,
}

impl DirScan {
    /// Lists the directories into memory, whatever their size: for what needs every file at
    /// hand (a repair of the uidlist, finding moved files again).
    pub(super) fn read(dir: &Path) -> StoreResult<Self> {
        let mut scan = Self::default();
        read_entries(dir, |name, in_new| scan.push(name, in_new))?;
        Ok(scan)
    }

    fn push(&mut self, name: &str, in_new: bool) -> StoreResult<()> {
        let r = self.names.push(name)?;
        self.files.push((r, in_new));
        Ok(())
    }

    /// The name of file `i`.
    pub(super) fn name(&self, i: usize) -> &str {
        self.file(i).0
    }

    /// The name of file `i`, and whether it is in `new/`.
    pub(super) fn file(&self, i: usize) -> (&str, bool) {
        let (name, in_new) = self.files[i];
        (self.names.get(name), in_new)
    }

    /// Base name → index into `files`. A file seen in both directories (moved from new/ to
    /// cur/ while we read them) counts where cur/ has it.
    pub(super) fn by_base(&self) -> BaseIndex<'_> {
        let mut ix = StrIndex::with_capacity(self.files.len());
        for (i, &(name, in_new)) in (0u32..).zip(self.files.iter()) {
            let base = filename::base(self.names.get(name));
            if ix.insert(base, i, self).is_some() && !in_new {
                ix.remove(base, self);
                ix.insert(base, i, self);
            }
        }
        BaseIndex { scan: self, ix }
    }
}

impl KeySource for DirScan {
    fn key_is(&self, v: u32, key: &str) -> bool {
        filename::base(self.name(v as usize)) == key
    }
}

/// The scanned files by base name: 10 bytes a file, where a map of the names took 24.
pub(super) struct BaseIndex<'a> {
    pub(super) scan: &'a DirScan,
    ix: StrIndex,
}

impl BaseIndex<'_> {
    pub(super) fn get(&self, base: &str) -> Option<u32> {
        self.ix.get(base, self.scan)
    }

    pub(super) fn contains(&self, base: &str) -> bool {
        self.get(base).is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.ix.len()
    }

    /// Every (base name, file index), in no order.
    fn iter(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.ix.values().map(|i| (filename::base(self.scan.name(i as usize)), i))
    }
}

/// The key of a file whose order [`unlisted_key`] alone does not settle.
const INEXACT: u64 = u64::MAX;

/// A key that orders new files as [`filename::sort_cmp`] does wherever two keys differ and
/// neither is [`INEXACT`]: made once per file, so that a sort does not parse two names per
/// comparison.
fn unlisted_key(name: &str) -> u64 {
    match filename::sort_key(name) {
        Some((secs, usecs)) if secs < 1 << 40 && usecs < 1 << 24 => (secs << 24) | usecs,
        _ => INEXACT,
    }
}

/// Dovecot's order of new files ([`filename::sort_cmp`]), by their keys where those settle it.
fn unlisted_cmp(a: (u64, &str), b: (u64, &str)) -> std::cmp::Ordering {
    if a.0 != INEXACT && b.0 != INEXACT && a.0 != b.0 { a.0.cmp(&b.0) } else { filename::sort_cmp(a.1, b.1) }
}

/// The scanned files `unlisted` says yes to (by file index), in the order Dovecot gives new
/// files their UIDs ([`filename::sort_cmp`]), with their keys.
pub(super) fn sorted_unlisted(files: &BaseIndex<'_>, unlisted: impl Fn(u32) -> bool) -> Vec<(u64, u32)> {
    let mut v: Vec<(u64, u32)> =
        files.iter().filter(|&(_, i)| unlisted(i)).map(|(b, i)| (unlisted_key(b), i)).collect();
    let name = |i: u32| files.scan.name(i as usize);
    v.sort_by(|a, b| unlisted_cmp((a.0, name(a.1)), (b.0, name(b.1))));
    v
}

/// Gives the files `missing` (from [`sorted_unlisted`]) the next UIDs of `list` (a
/// header-only view, which the appends keep header-only), appending them to the uidlist in
/// chunks and adding them to `found`.
pub(super) fn append_in_chunks(
    dir: &Path,
    list: &mut Uidlist,
    scan: &DirScan,
    missing: &[(u64, u32)],
    found: &mut uidlist::FoundList,
) -> StoreResult<()> {
    for chunk in missing.chunks(APPEND_CHUNK) {
        let first = list.next_uid();
        let new: Vec<Record> =
            (first..=MAX_UID).zip(chunk).map(|(uid, &(_, i))| new_record(uid, scan.name(i as usize))).collect();
        for (r, &(_, i)) in new.iter().zip(chunk) {
            found.push(r.uid, i, None);
        }
        list.append(dir, new)?;
    }
    Ok(())
}

fn new_record(uid: u32, name: &str) -> Record {
    Record { uid, base: filename::base(name).to_owned(), guid: None, other_exts: String::new() }
}

/// A directory scan: in memory when small, in partitions when large (see the module's
/// documentation).
pub(super) enum Scan {
    Small(DirScan),
    Big(BigScan),
}

impl Scan {
    /// Lists `new/` and `cur/` of the mailbox in `dir`.
    pub(super) fn read(dir: &Path) -> StoreResult<Self> {
        // (in new/, name length, name) for each file, in the order read: sequential, so it
        // moves into a file once large, and is read back in the same order.
        let mut stream = SpillVec::<u8>::new_in(spill::dir(dir));
        read_entries(dir, |name, in_new| {
            let len = u8::try_from(name.len())
                .map_err(|_| StoreError::Limit(format!("a file name of {} bytes", name.len())))?;
            stream.extend_from_slice(&[u8::from(in_new), len]);
            stream.extend_from_slice(name.as_bytes());
            Ok(())
        })?;
        let budget = spill::threshold();
        if stream.len() <= budget {
            let mut scan = DirScan::default();
            for (name, in_new) in stream_entries(&stream) {
                scan.push(name, in_new)?;
            }
            return Ok(Self::Small(scan));
        }
        let part = Partitions::new(stream.len(), budget, 2, 1);
        let parts = part.parts;
        let mut big = BigScan { runs: Runs::new(Some(dir), 2 * parts, part.chunk), part };
        for (name, in_new) in stream_entries(&stream) {
            let p = big.part.of(filename::base(name));
            big.runs.push(SCAN * parts + p, &[&[u8::from(in_new)], name.as_bytes()]);
        }
        for p in 0..parts {
            big.runs.finish(SCAN * parts + p);
        }
        Ok(Self::Big(big))
    }
}

/// The (name, in `new/`) of each entry of a scan's stream, in order.
fn stream_entries(stream: &SpillVec<u8>) -> impl Iterator<Item = (&str, bool)> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let head = stream.get(pos..pos + 2)?;
        stream.note_lookup(pos);
        let (in_new, len) = (head[0] != 0, usize::from(head[1]));
        let name = stream.get(pos + 2..pos + 2 + len)?;
        pos += 2 + len;
        // Each went in as a whole `&str`.
        Some((std::str::from_utf8(name).unwrap_or_default(), in_new))
    })
}

/// The runs of a [`BigScan`]'s input (`group * parts + partition`)...
const SCAN: usize = 0;
const LIST: usize = 1;
/// ... and of its output.
const MATCHED: usize = 0;
const UNLISTED: usize = 1;

/// A scan in partitions by base name (see the module's documentation).
pub(super) struct BigScan {
    /// The scan's partitions, then the uidlist's.
    runs: Runs,
    /// By base name.
    part: Partitions,
}

/// The mails a [`BigScan`] found, in UID order, with their names.
pub(super) struct Joined {
    /// The uidlist's header-only view, after any records appended.
    pub(super) list: Uidlist,
    pub(super) mails: SpillVec<Mail>,
    pub(super) names: Names,
    /// The uidlist was missing and has been created.
    pub(super) created: bool,
}

fn bad_run() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a record of a run is damaged")
}

fn take<'a>(rec: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if rec.len() < n {
        return Err(bad_run());
    }
    let (head, rest) = rec.split_at(n);
    *rec = rest;
    Ok(head)
}

fn take_u32(rec: &mut &[u8]) -> io::Result<u32> {
    let b = take(rec, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn text(b: &[u8]) -> io::Result<&str> {
    std::str::from_utf8(b).map_err(|_| bad_run())
}

/// The end of a uidlist record or a matched file in a run: (`G` extension, name).
fn guid_and_name(mut rec: &[u8]) -> io::Result<(Option<&str>, &str)> {
    let has_g = take(&mut rec, 1)?[0] != 0;
    let g = take(&mut rec, 2)?;
    let g = text(take(&mut rec, usize::from(u16::from_le_bytes([g[0], g[1]])))?)?;
    Ok((has_g.then_some(g), text(rec)?))
}

/// A uidlist record in a run: (UID, `G` extension, base name).
fn list_record(mut rec: &[u8]) -> io::Result<(u32, Option<&str>, &str)> {
    let uid = take_u32(&mut rec)?;
    let (guid, base) = guid_and_name(rec)?;
    Ok((uid, guid, base))
}

/// A matched file in a run: (UID, in `new/`, `G` extension, file name).
fn matched_record(mut rec: &[u8]) -> io::Result<(u32, bool, Option<&str>, &str)> {
    let uid = take_u32(&mut rec)?;
    let in_new = take(&mut rec, 1)?[0] != 0;
    let (guid, name) = guid_and_name(rec)?;
    Ok((uid, in_new, guid, name))
}

/// A file without a UID in a run: (sort key, in `new/`, file name).
fn unlisted_record(mut rec: &[u8]) -> io::Result<(u64, bool, &str)> {
    let k = take(&mut rec, 8)?;
    let key = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
    let in_new = take(&mut rec, 1)?[0] != 0;
    Ok((key, in_new, text(rec)?))
}

/// The sort key and name of a file without a UID in a run (damage sorts it anywhere: it is
/// an error when read for use).
fn key_name(rec: &[u8]) -> (u64, &str) {
    unlisted_record(rec).map(|(k, _, n)| (k, n)).unwrap_or((INEXACT, ""))
}

/// The UID a matched record or a uidlist record starts with.
fn uid_of(rec: &[u8]) -> u32 {
    rec.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl BigScan {
    /// Joins the scan with the uidlist of `dir`. `None` when that takes more than reading:
    /// without `new_list` (the caller does not hold the uidlist's lock), when there is no
    /// uidlist or a file has no UID; with it, when the uidlist needs a repair (damaged, listing
    /// a file twice, of version 1 or without a mailbox GUID) or has no room for the new UIDs.
    /// `new_list` gives the identity of a uidlist to create where there is none; files
    /// without a UID get the next ones, in Dovecot's order, appended to the uidlist.
    pub(super) fn join(
        mut self,
        dir: &Path,
        new_list: Option<&dyn Fn() -> StoreResult<Uidlist>>,
    ) -> StoreResult<Option<Joined>> {
        let parts = self.part.parts;
        // The uidlist's records, into the partitions of their base names.
        let read = {
            let this = &mut self;
            Uidlist::read_each(dir, |uid, guid, base| {
                let g = guid.unwrap_or_default();
                let glen = u16::try_from(g.len()).map_err(|_| "a G extension of more than 64 KiB")?;
                let p = this.part.of(base);
                this.runs.push(
                    LIST * parts + p,
                    &[
                        &uid.to_le_bytes(),
                        &[u8::from(guid.is_some())],
                        &glen.to_le_bytes(),
                        g.as_bytes(),
                        base.as_bytes(),
                    ],
                );
                Ok(())
            })
        };
        let list = match read {
            Ok(Some(l)) if l.guid.is_some() && l.version == 3 => Some(l),
            Ok(None) if new_list.is_some() => None,
            Ok(_) | Err(StoreError::Corrupt { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        for p in 0..parts {
            self.runs.finish(LIST * parts + p);
        }

        // Each partition joined in memory, one after the other.
        let mut out = Runs::new(Some(dir), 2 * parts, self.part.chunk);
        let (mut matched, mut unlisted) = (0usize, 0usize);
        for p in 0..parts {
            let mut scan = DirScan::default();
            let mut r = self.runs.reader(SCAN * parts + p);
            while let Some(mut rec) = r.next().ctx("read", dir)? {
                let in_new = take(&mut rec, 1).ctx("read", dir)?[0] != 0;
                scan.push(text(rec).ctx("read", dir)?, in_new)?;
            }
            drop(r);
            self.runs.clear(SCAN * parts + p);
            let by_base = scan.by_base();
            let mut taken = vec![false; scan.files.len()];
            let mut r = self.runs.reader(LIST * parts + p);
            while let Some(rec) = r.next().ctx("read", dir)? {
                let (uid, guid, base) = list_record(rec).ctx("read", dir)?;
                let Some(i) = by_base.get(base) else { continue };
                if std::mem::replace(&mut taken[i as usize], true) {
                    // The same file listed twice: a repair.
                    return Ok(None);
                }
                let (name, in_new) = scan.file(i as usize);
                let g = guid.unwrap_or_default();
                out.push(
                    MATCHED * parts + p,
                    &[
                        &uid.to_le_bytes(),
                        &[u8::from(in_new), u8::from(guid.is_some())],
                        // Checked when it went in.
                        &(g.len() as u16).to_le_bytes(),
                        g.as_bytes(),
                        name.as_bytes(),
                    ],
                );
                matched += 1;
            }
            drop(r);
            self.runs.clear(LIST * parts + p);
            out.finish(MATCHED * parts + p);
            for (key, i) in sorted_unlisted(&by_base, |i| !taken[i as usize]) {
                let (name, in_new) = scan.file(i as usize);
                out.push(UNLISTED * parts + p, &[&key.to_le_bytes(), &[u8::from(in_new)], name.as_bytes()]);
                unlisted += 1;
            }
            out.finish(UNLISTED * parts + p);
        }
        drop(self.runs);

        let (mut list, created) = match (list, new_list) {
            (Some(l), _) if unlisted == 0 => (l, false),
            (Some(l), Some(_)) => (l, false),
            (None, Some(new)) => (new()?, true),
            (_, None) => return Ok(None),
        };
        let room = (u64::from(MAX_UID) + 1).saturating_sub(u64::from(list.next_uid()));
        if unlisted as u64 > room {
            // Said (and handled) by the repair.
            return Ok(None);
        }
        if created {
            list.rewrite(dir, |_| true)?;
            list = list.header_only();
        }

        // The mails in UID order: the partitions' matches merged, then the new files.
        let mut names = Names::in_dir(dir);
        let mut mails = SpillVec::new_in(spill::dir(dir));
        mails.reserve_exact(matched + unlisted);
        let mut readers: Vec<RunReader<'_>> = (0..parts).map(|p| out.reader(MATCHED * parts + p)).collect();
        let io_err = |e: io::Error| StoreError::io("read", dir, e);
        runs::merge(
            &mut readers,
            |a, b| uid_of(a).cmp(&uid_of(b)),
            |rec| {
                let (uid, in_new, guid, name) = matched_record(rec).map_err(io_err)?;
                let r = names.push(name)?;
                mails.push(Mail::with_name(uid, 0, in_new, guid.map(Box::from), r, &mut names, Box::default()));
                Ok(())
            },
            io_err,
        )?;
        let mut readers: Vec<RunReader<'_>> = (0..parts).map(|p| out.reader(UNLISTED * parts + p)).collect();
        let mut batch: Vec<(NameRef, bool)> = Vec::with_capacity(APPEND_CHUNK.min(unlisted));
        runs::merge(
            &mut readers,
            |a, b| unlisted_cmp(key_name(a), key_name(b)),
            |rec| {
                let (_, in_new, name) = unlisted_record(rec).map_err(io_err)?;
                batch.push((names.push(name)?, in_new));
                if batch.len() == APPEND_CHUNK {
                    append_batch(dir, &mut list, &mut names, &mut mails, &mut batch)?;
                }
                Ok(())
            },
            io_err,
        )?;
        append_batch(dir, &mut list, &mut names, &mut mails, &mut batch)?;
        Ok(Some(Joined { list, mails, names, created }))
    }
}

/// Gives the files of `batch` (their names already in `names`) the next UIDs of `list`,
/// appending them to the uidlist, and adds them to `mails`.
fn append_batch(
    dir: &Path,
    list: &mut Uidlist,
    names: &mut Names,
    mails: &mut SpillVec<Mail>,
    batch: &mut Vec<(NameRef, bool)>,
) -> StoreResult<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let first = list.next_uid();
    let new: Vec<Record> =
        (first..=MAX_UID).zip(batch.iter()).map(|(uid, &(r, _))| new_record(uid, names.get(r))).collect();
    list.append(dir, new)?;
    for (uid, (r, in_new)) in (first..=MAX_UID).zip(batch.drain(..)) {
        mails.push(Mail::with_name(uid, 0, in_new, None, r, names, Box::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header-only uidlist view with `next` as its next UID.
    fn list_with_next(next: u32) -> Uidlist {
        let mut l = Uidlist::new(7, crate::store::Guid128::generate());
        l.header_next_uid = next;
        l
    }

    fn write(dir: &Path, sub: &str, name: &str) {
        std::fs::write(dir.join(sub).join(name), b"x").unwrap();
    }

    fn maildir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir(d.path().join(sub)).unwrap();
        }
        d
    }

    fn mails_of(j: &Joined) -> Vec<(u32, bool, String, Option<String>)> {
        j.mails
            .iter()
            .map(|m| (m.uid, m.in_new, m.file(&j.names).to_owned(), m.guid_ext(&j.names).map(str::to_owned)))
            .collect()
    }

    fn big(dir: &Path) -> BigScan {
        match Scan::read(dir).unwrap() {
            Scan::Big(b) => b,
            // The unit tests' threshold is 0: every mailbox with a file is large.
            Scan::Small(_) => panic!("a small scan"),
        }
    }

    #[test]
    fn a_partitioned_join_matches_records_by_base_name_and_numbers_new_files_in_dovecots_order() {
        let d = maildir();
        let dir = d.path();
        // Enough names for several partitions; some listed, some new, one in both new/ and
        // cur/ (cur/ counts), one listed file gone.
        let mut listed = Vec::new();
        for i in 0..300u32 {
            let base = format!("17000{:05}.M{}P1.host", 1000 - i, i % 7);
            if i % 3 == 0 {
                write(dir, "new", &base);
            } else {
                write(dir, "cur", &format!("{base}:2,S"));
            }
            if i % 5 != 0 {
                listed.push(base);
            }
        }
        write(dir, "new", &listed[0]);
        let g = "G0123456789abcdef0123456789abcdef";
        let mut text = String::from("3 V7 N1000 G0123456789abcdef0123456789abcdef\n");
        for (uid, base) in (10u32..).step_by(3).zip(&listed) {
            let ext = if uid % 2 == 0 { format!(" {g}") } else { String::new() };
            text.push_str(&format!("{uid}{ext} :{base}\n"));
        }
        text.push_str("5000 :gone.M1P1.host\n");
        std::fs::write(dir.join(uidlist::NAME), &text).unwrap();

        // Without the lock: files without UIDs leave it to the caller.
        assert!(big(dir).join(dir, None).unwrap().is_none());
        let never = || -> StoreResult<Uidlist> { panic!("the uidlist exists") };
        let j = big(dir).join(dir, Some(&never)).unwrap().unwrap();
        assert!(!j.created);
        let got = mails_of(&j);
        assert_eq!(got.len(), 300);
        let (old, new): (Vec<_>, Vec<_>) = got.iter().partition(|m| m.0 < 5001);
        assert_eq!(old.len(), listed.len());
        for ((uid, in_new, name, guid), (want_uid, base)) in old.iter().zip((10u32..).step_by(3).zip(&listed)) {
            assert_eq!(*uid, want_uid);
            assert_eq!(filename::base(name), base);
            assert_eq!(*in_new, !name.contains(':'), "{name}");
            assert_eq!(guid.as_deref(), (uid % 2 == 0).then_some(&g[1..]));
        }
        // New files after the highest UID ever given, in Dovecot's order.
        let uids: Vec<u32> = new.iter().map(|m| m.0).collect();
        assert_eq!(uids, (5001..5001 + new.len() as u32).collect::<Vec<_>>());
        for w in new.windows(2) {
            assert!(filename::sort_cmp(&w[0].2, &w[1].2).is_lt(), "{} before {}", w[0].2, w[1].2);
        }
        // The uidlist now lists them, and the next open matches every file without the lock.
        let again = big(dir).join(dir, None).unwrap().unwrap();
        assert_eq!(mails_of(&again), got);
        assert_eq!(again.list.next_uid(), j.list.next_uid());
    }

    #[test]
    fn a_partitioned_join_creates_a_missing_uidlist_and_leaves_repairs_to_the_caller() {
        let d = maildir();
        let dir = d.path();
        for i in 0..200u32 {
            write(dir, "cur", &format!("1700000{i:03}.M1P1.h:2,"));
        }
        assert!(big(dir).join(dir, None).unwrap().is_none(), "no uidlist: the lock is needed");
        let new = || Ok(list_with_next(40));
        let j = big(dir).join(dir, Some(&new)).unwrap().unwrap();
        assert!(j.created);
        let uids: Vec<u32> = j.mails.iter().map(|m| m.uid).collect();
        assert_eq!(uids, (40..240).collect::<Vec<_>>());
        let read = Uidlist::read(dir).unwrap().unwrap();
        assert_eq!(read.records.len(), 200);
        assert_eq!(read.uid_validity, 7);

        // Damage: a record listed twice, UIDs out of order, a version 1 list.
        let text = std::fs::read_to_string(dir.join(uidlist::NAME)).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        let dup = lines[5].replacen("44", "9999", 1);
        lines.push(&dup);
        std::fs::write(dir.join(uidlist::NAME), lines.join("\n") + "\n").unwrap();
        let never = || -> StoreResult<Uidlist> { panic!("the uidlist exists") };
        assert!(big(dir).join(dir, Some(&never)).unwrap().is_none(), "listed twice");
        std::fs::write(dir.join(uidlist::NAME), "3 V7 N1 G0123456789abcdef0123456789abcdef\n5 :a\n4 :b\n").unwrap();
        assert!(big(dir).join(dir, Some(&never)).unwrap().is_none(), "out of order");
        std::fs::write(dir.join(uidlist::NAME), "1 7 1\n").unwrap();
        assert!(big(dir).join(dir, Some(&never)).unwrap().is_none(), "version 1");
        // No room left for 200 new UIDs.
        std::fs::write(dir.join(uidlist::NAME), format!("3 V7 N{} G0123456789abcdef0123456789abcdef\n", MAX_UID - 10))
            .unwrap();
        assert!(big(dir).join(dir, Some(&never)).unwrap().is_none(), "no room");
    }
}
