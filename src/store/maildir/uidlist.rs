//! `dovecot-uidlist`: the file that pins UIDs, UIDVALIDITY and the mailbox GUID of a Maildir.
//!
//! ```text
//! 3 V<uidvalidity> N<next uid> G<mailbox guid> [other header fields]
//! <uid> [<EXT><value> ...] :<base file name>
//! ```
//!
//! UIDs are strictly ascending. The header's `N` may be stale because writers append records
//! without rewriting the header; the effective next UID is `max(N, last UID + 1)`. Readers never
//! lock; writers hold `dovecot-uidlist.lock` and either append whole lines or replace the file
//! through `dovecot-uidlist.tmp`. A trailing line without LF is a write in progress and ignored.
//! Courier's version 1 (`1 <uidvalidity> <next uid>`, records `<uid> <file name>`) is read too.
//! UIDs are below 4294967295 ([`crate::store::MAX_UID`] is the highest), as Dovecot requires.
//!
//! ## Damaged files
//!
//! Dovecot, finding a uidlist it cannot read ("Broken file … UIDs not ordered", a bad header,
//! an empty file), logs it, deletes the file and rebuilds it from its own index: the mailbox
//! keeps its UIDVALIDITY only if Dovecot's index is there, gets a new mailbox GUID, and every
//! mail a new UID. We keep more ([`Salvage`]): the identity from the header (or, if that is
//! unreadable, from our own index), every record that can stay (the longest run of records in
//! ascending UID order, so one stray line costs one mail its UID, not all that follow; a file
//! listed twice keeps the later of its lines, as Dovecot does), and a next UID above every UID
//! seen anywhere in the file, so that no UID is ever handed out twice. Files left without a UID
//! get new ones, as any unlisted file does.

use crate::spill::SpillVec;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::fsutil::{self, Stamp};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Guid128, MAX_UID, StoreError};

/// File name of the uidlist.
pub(crate) const NAME: &str = "dovecot-uidlist";
/// File name Dovecot uses for rewrites.
const TMP_NAME: &str = "dovecot-uidlist.tmp";

/// One record: a UID and the file it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) uid: u32,
    /// The base file name (up to the first `:`).
    pub(crate) base: String,
    /// The `G` extension: the mail GUID when it is not the base name.
    pub(crate) guid: Option<String>,
    /// Other extensions, verbatim and space-separated (`S`, `W`, `P`, `O`, ...).
    pub(crate) other_exts: String,
}

/// The records whose file was found, in UID order: each record's UID, the file's index in the
/// directory scan, and its `G` extension. One per file of a mailbox, made and read in order:
/// 12 bytes each, in a file once large ([`crate::spill`]); the few `G` extensions aside.
#[derive(Debug, Default)]
pub(crate) struct FoundList {
    /// (UID, file index, place of the `G` extension in `guids` + 1, or 0).
    entries: SpillVec<(u32, u32, u32)>,
    guids: Vec<Box<str>>,
}

impl FoundList {
    /// An empty list that moves into a file of `dir` once large.
    pub(crate) fn in_dir(dir: &Path) -> Self {
        Self { entries: SpillVec::new_in(crate::spill::dir(dir)), guids: Vec::new() }
    }

    pub(crate) fn push(&mut self, uid: u32, file: u32, guid: Option<&str>) {
        let g = match guid {
            Some(g) => {
                self.guids.push(g.into());
                self.guids.len() as u32
            }
            None => 0,
        };
        self.entries.push((uid, file, g));
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.entries.reserve_exact(n);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// (UID, file index, `G` extension), in UID order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, u32, Option<&str>)> + '_ {
        self.entries
            .iter_releasing()
            .map(|&(u, i, g)| (u, i, g.checked_sub(1).and_then(|g| self.guids.get(g as usize)).map(|g| &**g)))
    }
}

/// A parsed uidlist.
#[derive(Debug, Clone)]
pub(crate) struct Uidlist {
    pub(crate) uid_validity: u32,
    /// The header's `N`, possibly stale.
    pub(crate) header_next_uid: u32,
    pub(crate) guid: Option<Guid128>,
    /// Header fields we do not interpret, kept for rewrites.
    pub(crate) header_extra: Vec<String>,
    pub(crate) records: Vec<Record>,
    /// Version of the file as read (1 or 3); version 1 is always rewritten as 3.
    pub(crate) version: u8,
    /// Stamp of the file when it was read.
    pub(crate) stamp: Option<Stamp>,
    /// Bytes of complete lines read; appends must start exactly here.
    pub(crate) read_len: u64,
    /// The highest UID of any record (0 = none), also when `records` is not kept.
    pub(crate) last_uid: u32,
    /// `records` holds every record of the file; false for a header-only view, which must
    /// never be written back whole.
    pub(crate) complete: bool,
}

impl Uidlist {
    /// A new, empty uidlist.
    pub(crate) fn new(uid_validity: u32, guid: Guid128) -> Self {
        Self {
            uid_validity,
            header_next_uid: 1,
            guid: Some(guid),
            header_extra: Vec::new(),
            records: Vec::new(),
            version: 3,
            stamp: None,
            read_len: 0,
            last_uid: 0,
            complete: true,
        }
    }

    /// The next UID to assign; above [`MAX_UID`] when none is left.
    pub(crate) fn next_uid(&self) -> u32 {
        self.header_next_uid.max(self.last_uid.saturating_add(1))
    }

    /// A header-only copy (no records), cheap to keep between commits.
    pub(crate) fn header_only(&self) -> Self {
        Self {
            uid_validity: self.uid_validity,
            header_next_uid: self.header_next_uid,
            guid: self.guid,
            header_extra: self.header_extra.clone(),
            records: Vec::new(),
            version: self.version,
            stamp: self.stamp,
            read_len: self.read_len,
            last_uid: self.last_uid,
            complete: false,
        }
    }

    /// Brings a view read earlier up to date without reading the whole file, when that is
    /// possible: the file is unchanged, or other writers only appended whole records to it
    /// (which are parsed, strictly). Returns false when the file must be read again (it was
    /// replaced, shrank, or what was appended does not parse); `self` is then unchanged.
    /// The caller holds the lock, so the file cannot change meanwhile.
    pub(crate) fn refresh_appended(&mut self, dir: &Path) -> StoreResult<bool> {
        use std::io::{Read as _, Seek as _};
        let path = dir.join(NAME);
        let Some(now) = Stamp::read(&path)? else {
            return Ok(false);
        };
        let Some(then) = self.stamp else {
            return Ok(false);
        };
        if now == then {
            return Ok(true);
        }
        if (now.dev, now.ino) != (then.dev, then.ino) || now.size < self.read_len || self.version != 3 {
            return Ok(false);
        }
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        f.seek(std::io::SeekFrom::Start(self.read_len)).ctx("lseek", &path)?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).ctx("read", &path)?;
        let complete = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let mut last = self.last_uid;
        for line in tail[..complete].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match std::str::from_utf8(line).ok().and_then(|l| parse_record(l, 3).ok()) {
                Some(r) if r.uid > last => last = r.uid,
                _ => return Ok(false),
            }
        }
        self.last_uid = last;
        self.read_len += complete as u64;
        self.stamp = Some(now);
        Ok(true)
    }

    /// Reads `<dir>/dovecot-uidlist`; `None` if it does not exist.
    pub(crate) fn read(dir: &Path) -> StoreResult<Option<Self>> {
        let mut list: Option<Self> = None;
        let mut bases: crate::fasthash::FastSet<u64> = Default::default();
        let read = read_lines(dir, |line| match line {
            Line::Header(header) => {
                list = Some(header);
                Ok(())
            }
            Line::Record(lineno, line) => {
                let Some(l) = list.as_mut() else { return Ok(()) };
                let rec = parse_record(line, l.version).map_err(|why| (lineno, why))?;
                if rec.uid <= l.last_uid {
                    return Err((lineno, "UIDs are not in ascending order"));
                }
                // Hashes keep this set small; a hit is confirmed (a real duplicate is damage).
                if !bases.insert(base_hash(&rec.base)) && l.records.iter().any(|r| r.base == rec.base) {
                    return Err((lineno, "the same file is listed twice"));
                }
                l.last_uid = rec.uid;
                l.records.push(rec);
                Ok(())
            }
        })?;
        Ok(read.map(|(stamp, read_len)| {
            let mut l = list.unwrap_or_else(|| Self::new(1, Guid128::EMPTY));
            l.stamp = stamp;
            l.read_len = read_len;
            l
        }))
    }

    /// Reads the uidlist matching its records against the files found in the directories
    /// (`by_base`: base name → index in the scan, of `files` files) as it goes, keeping no
    /// names: what a full open of a large mailbox needs, in a fraction of the memory of
    /// [`Uidlist::read`].
    /// Returns the header-only view, and (UID, file index, `G` extension) for each record
    /// whose file exists, in UID order; `None` if there is no uidlist. Damage is an error,
    /// as in [`Uidlist::parse`] (a record listed twice is noticed when its file exists).
    pub(crate) fn read_matched(
        dir: &Path,
        by_base: impl Fn(&str) -> Option<u32>,
        files: usize,
    ) -> StoreResult<Option<(Self, FoundList)>> {
        let mut found = FoundList::in_dir(dir);
        found.reserve(files);
        let mut taken = vec![false; files];
        let list = Self::read_each(dir, |uid, guid, base| {
            if let Some(i) = by_base(base) {
                let slot = usize::try_from(i).unwrap_or(usize::MAX);
                if slot >= taken.len() {
                    taken.resize(slot + 1, false);
                }
                if std::mem::replace(&mut taken[slot], true) {
                    return Err("the same file is listed twice");
                }
                found.push(uid, i, guid);
            }
            Ok(())
        })?;
        Ok(list.map(|l| (l, found)))
    }

    /// Reads the uidlist, checking every record and giving `each` its UID, `G` extension and
    /// base name, in UID order; an error from `each` is damage at that record's line.
    /// Returns the header-only view; `None` if there is no uidlist.
    pub(crate) fn read_each(
        dir: &Path,
        mut each: impl FnMut(u32, Option<&str>, &str) -> Result<(), &'static str>,
    ) -> StoreResult<Option<Self>> {
        let mut list: Option<Self> = None;
        let read = read_lines(dir, |line| match line {
            Line::Header(header) => {
                list = Some(header);
                Ok(())
            }
            Line::Record(lineno, line) => {
                let Some(l) = list.as_mut() else { return Ok(()) };
                let (uid, exts, base) = split_record(line, l.version).map_err(|why| (lineno, why))?;
                if uid <= l.last_uid {
                    return Err((lineno, "UIDs are not in ascending order"));
                }
                l.last_uid = uid;
                let guid = guid_ext(exts).map_err(|why| (lineno, why))?;
                each(uid, guid, base).map_err(|why| (lineno, why))
            }
        })?;
        Ok(read.map(|(stamp, read_len)| {
            let mut l = list.unwrap_or_else(|| Self::new(1, Guid128::EMPTY));
            l.stamp = stamp;
            l.read_len = read_len;
            l.complete = false;
            l
        }))
    }

    /// Reads only the header line of `<dir>/dovecot-uidlist` (the returned list has no
    /// records); `None` if the file does not exist or is empty.
    pub(crate) fn read_header(dir: &Path) -> StoreResult<Option<Self>> {
        use std::io::Read as _;
        let path = dir.join(NAME);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        while !buf.contains(&b'\n') {
            let n = f.read(&mut chunk).ctx("read", &path)?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1);
        let mut list = Self::parse(&buf[..end], &path)?;
        list.complete = false;
        Ok(Some(list))
    }

    /// The header and the effective next UID, reading only the first line and the file's
    /// tail: listing the mailboxes (every sync does) needs no more, and parsing every record
    /// of every mailbox for it grows with the account. Small files, and a tail without one
    /// whole record line, are read and parsed whole. `None` if the file does not exist.
    pub(crate) fn read_identity(dir: &Path) -> StoreResult<Option<(Self, u32)>> {
        use std::os::unix::fs::FileExt as _;
        const TAIL: u64 = 4096;
        let path = dir.join(NAME);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let len = f.metadata().ctx("stat", &path)?.len();
        let whole = |dir: &Path| -> StoreResult<Option<(Self, u32)>> {
            Ok(Self::read(dir)?.map(|l| {
                let next = l.next_uid();
                (l, next)
            }))
        };
        if len <= 2 * TAIL {
            return whole(dir);
        }
        let mut head = vec![0u8; TAIL as usize];
        let n = f.read_at(&mut head, 0).ctx("read", &path)?;
        let Some(end) = head[..n].iter().position(|&b| b == b'\n') else {
            return whole(dir);
        };
        let mut list = Self::parse(&head[..=end], &path)?;
        list.complete = false;
        let mut tail = vec![0u8; TAIL as usize];
        f.read_exact_at(&mut tail, len - TAIL).ctx("read", &path)?;
        // The last complete line, which must start inside the tail.
        let last_uid = tail.iter().rposition(|&b| b == b'\n').and_then(|last_lf| {
            let start = tail[..last_lf].iter().rposition(|&b| b == b'\n')? + 1;
            let line = &tail[start..last_lf];
            let digits = line.iter().position(|&b| b == b' ')?;
            std::str::from_utf8(&line[..digits]).ok()?.parse::<u32>().ok().filter(|&u| u != 0 && u <= MAX_UID)
        });
        match last_uid {
            Some(uid) => {
                let next = list.header_next_uid.max(uid.saturating_add(1));
                Ok(Some((list, next)))
            }
            None => whole(dir),
        }
    }

    /// Parses the contents of a uidlist file, strictly: any damage is an error naming the
    /// line (see [`Salvage`] for what can be kept of a damaged file).
    pub(crate) fn parse(data: &[u8], path: &Path) -> StoreResult<Self> {
        let corrupt = |line: usize, why: &str| StoreError::corrupt(path, Some(line), why.to_owned());
        // Only complete lines count.
        let complete = match data.iter().rposition(|&b| b == b'\n') {
            Some(p) => &data[..=p],
            None => &data[..0],
        };
        let mut lines = complete.split(|&b| b == b'\n');
        let header = lines.next().unwrap_or_default();
        let mut list = parse_header(header).map_err(|why| corrupt(1, why))?;
        list.read_len = complete.len() as u64;
        let mut seen: crate::fasthash::FastSet<&str> = Default::default();
        seen.reserve(complete.len() / 48);
        for (i, line) in lines.enumerate() {
            let lineno = i + 2;
            if line.is_empty() {
                continue; // the split after the final LF
            }
            let line = std::str::from_utf8(line).map_err(|_| corrupt(lineno, "record is not UTF-8"))?;
            let rec = parse_record(line, list.version).map_err(|why| corrupt(lineno, why))?;
            if rec.uid <= list.last_uid {
                return Err(corrupt(lineno, "UIDs are not in ascending order"));
            }
            list.last_uid = rec.uid;
            if !seen.insert(base_of(line)) {
                return Err(corrupt(lineno, "the same file is listed twice"));
            }
            list.records.push(rec);
        }
        Ok(list)
    }

    /// The header line, with `N` set to the effective next UID.
    fn header_line(&self) -> String {
        let mut s = format!("3 V{} N{}", self.uid_validity, self.next_uid());
        if let Some(g) = self.guid {
            s.push_str(&format!(" G{g}"));
        }
        for e in &self.header_extra {
            s.push(' ');
            s.push_str(e);
        }
        s.push('\n');
        s
    }

    /// One record line.
    pub(crate) fn record_line(rec: &Record) -> String {
        let mut s = rec.uid.to_string();
        if let Some(g) = &rec.guid {
            s.push_str(" G");
            s.push_str(g);
        }
        if !rec.other_exts.is_empty() {
            s.push(' ');
            s.push_str(&rec.other_exts);
        }
        s.push_str(" :");
        s.push_str(&rec.base);
        s.push('\n');
        s
    }

    /// Replaces the file through `dovecot-uidlist.tmp` (caller holds the lock). `keep` decides
    /// which records survive (records of files that are gone may be dropped).
    pub(crate) fn rewrite(&mut self, dir: &Path, keep: impl Fn(&Record) -> bool) -> StoreResult<()> {
        if !self.complete {
            // Writing a header-only view back would drop every UID it does not hold.
            return Err(StoreError::NotPossible(format!(
                "internal error: refusing to rewrite {} from a partial read",
                dir.join(NAME).display()
            )));
        }
        let next = self.next_uid();
        self.records.retain(|r| keep(r));
        self.header_next_uid = next;
        self.last_uid = self.records.last().map_or(0, |r| r.uid);
        let mut data = self.header_line();
        for r in &self.records {
            data.push_str(&Self::record_line(r));
        }
        let dest = dir.join(NAME);
        fsutil::replace_file(&dir.join(TMP_NAME), &dest, data.as_bytes(), 0o600)?;
        self.version = 3;
        self.read_len = data.len() as u64;
        self.stamp = Stamp::read(&dest)?;
        Ok(())
    }

    /// Appends records (caller holds the lock and has just re-read the file, so `self` is
    /// current). UIDs must be above every existing one.
    pub(crate) fn append(&mut self, dir: &Path, new: Vec<Record>) -> StoreResult<()> {
        if new.is_empty() {
            return Ok(());
        }
        let path = dir.join(NAME);
        let mut data = String::new();
        let mut last = self.last_uid;
        for r in &new {
            if r.uid <= last || r.uid < self.header_next_uid || r.uid > MAX_UID {
                return Err(StoreError::NotPossible(format!(
                    "internal error: UID {} cannot be appended to {} (last UID {last}, next {})",
                    r.uid,
                    path.display(),
                    self.header_next_uid
                )));
            }
            last = r.uid;
            data.push_str(&Self::record_line(r));
        }
        let mut f = OpenOptions::new().append(true).open(&path).ctx("open", &path)?;
        let len = f.metadata().ctx("fstat", &path)?.len();
        if len != self.read_len {
            // The file does not end where the complete lines we read end: a writer died in the
            // middle of a line (power loss during an append). Appending would glue our first
            // record onto that fragment and give the mail another UID than the one we report;
            // replace the whole file instead, which drops the fragment.
            tracing::warn!(
                file = %path.display(),
                expected = self.read_len,
                found = len,
                "uidlist ends in a partial line; rewriting it"
            );
            drop(f);
            if !self.complete {
                // Under the lock the file can only differ by that fragment: read it whole.
                let full =
                    Self::read(dir)?.ok_or_else(|| StoreError::corrupt(&path, None, "disappeared while locked"))?;
                if (full.uid_validity, full.guid, full.last_uid) != (self.uid_validity, self.guid, self.last_uid) {
                    return Err(StoreError::corrupt(&path, None, "changed while locked"));
                }
                let next = self.header_next_uid;
                *self = full;
                self.header_next_uid = self.header_next_uid.max(next);
            }
            self.last_uid = last;
            self.records.extend(new);
            return self.rewrite(dir, |_| true);
        }
        f.write_all(data.as_bytes()).ctx("write", &path)?;
        f.sync_data().ctx("fdatasync", &path)?;
        self.read_len += data.len() as u64;
        self.last_uid = last;
        if self.complete {
            self.records.extend(new);
        }
        self.stamp = Stamp::read(&path)?;
        Ok(())
    }
}

/// The base name of a record line (after ` :`, or after the UID for version 1), for
/// duplicate checks; the record itself was already checked by [`parse_record`].
fn base_of(line: &str) -> &str {
    let name = match line.find(" :") {
        Some(i) => &line[i + 2..],
        None => line.split_once(' ').map_or("", |(_, r)| r.strip_prefix(':').unwrap_or(r)),
    };
    super::filename::base(name)
}

/// Parses a header line (without its LF) into an empty list.
fn parse_header(header: &[u8]) -> Result<Uidlist, &'static str> {
    if header.is_empty() {
        return Err("empty file");
    }
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let mut tokens = header.split(' ');
    let version = tokens.next().unwrap_or("");
    let mut list = Uidlist {
        uid_validity: 0,
        header_next_uid: 0,
        guid: None,
        header_extra: Vec::new(),
        records: Vec::new(),
        version: 3,
        stamp: None,
        read_len: 0,
        last_uid: 0,
        complete: true,
    };
    match version {
        "3" => {
            for t in tokens.filter(|t| !t.is_empty()) {
                let (key, value) = t.split_at(t.chars().next().map_or(0, char::len_utf8));
                match key {
                    "V" => list.uid_validity = value.parse().map_err(|_| "bad V (UIDVALIDITY)")?,
                    "N" => list.header_next_uid = value.parse().map_err(|_| "bad N (next UID)")?,
                    "G" => list.guid = Some(value.parse().map_err(|_| "bad G (mailbox GUID)")?),
                    _ => list.header_extra.push(t.to_owned()),
                }
            }
        }
        "1" => {
            list.version = 1;
            let v: Vec<&str> = tokens.collect();
            if v.len() != 2 {
                return Err("version 1 header needs UIDVALIDITY and next UID");
            }
            list.uid_validity = v[0].parse().map_err(|_| "bad UIDVALIDITY")?;
            list.header_next_uid = v[1].parse().map_err(|_| "bad next UID")?;
        }
        _ => return Err("unsupported uidlist version"),
    }
    if list.uid_validity == 0 {
        return Err("UIDVALIDITY is missing or 0");
    }
    if list.header_next_uid == 0 {
        return Err("next UID is missing or 0");
    }
    Ok(list)
}

/// Hash of a base name, for duplicate checks.
fn base_hash(base: &str) -> u64 {
    crate::fasthash::strong_hash(base)
}

/// A line of a uidlist, for [`read_lines`].
enum Line<'a> {
    Header(Uidlist),
    /// A record line and its 1-based number.
    Record(usize, &'a str),
}

/// Reads `<dir>/dovecot-uidlist` line by line, without holding the file in memory: `f` gets
/// the parsed header, then each complete record line.
/// A trailing line without LF is a write in progress and is not passed on. Returns the stamp
/// (taken before reading: if the file changes meanwhile, it is already stale) and the length
/// of the complete lines; `None` if the file does not exist.
fn read_lines(
    dir: &Path,
    mut f: impl FnMut(Line<'_>) -> Result<(), (usize, &'static str)>,
) -> StoreResult<Option<(Option<Stamp>, u64)>> {
    use std::io::BufRead as _;
    let path = dir.join(NAME);
    let stamp = Stamp::read(&path)?;
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", &path, e)),
    };
    let corrupt = |line: usize, why: &str| StoreError::corrupt(&path, Some(line), why.to_owned());
    let mut r = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::with_capacity(256);
    let mut read_len = 0u64;
    let mut lineno = 0;
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).ctx("read", &path)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        lineno += 1;
        read_len += n as u64;
        let line = &buf[..n - 1];
        if lineno == 1 {
            let header = parse_header(line).map_err(|why| corrupt(1, why))?;
            f(Line::Header(header)).map_err(|(l, why)| corrupt(l, why))?;
        } else if !line.is_empty() {
            let line = std::str::from_utf8(line).map_err(|_| corrupt(lineno, "record is not UTF-8"))?;
            f(Line::Record(lineno, line)).map_err(|(l, why)| corrupt(l, why))?;
        }
    }
    if lineno == 0 {
        return Err(corrupt(1, "empty file"));
    }
    Ok(Some((stamp, read_len)))
}

/// Splits a record line (without its LF) into UID, extension fields and base name, checking
/// each.
fn split_record(line: &str, version: u8) -> Result<(u32, &str, &str), &'static str> {
    let (uid_str, rest) = line.split_once(' ').ok_or("record has no file name")?;
    let uid: u32 = uid_str.parse().map_err(|_| "bad UID")?;
    if uid == 0 || uid > MAX_UID {
        return Err("UID out of range");
    }
    let (exts, name) = if version == 1 {
        ("", rest)
    } else if let Some(name) = rest.strip_prefix(':') {
        ("", name)
    } else {
        rest.split_once(" :").ok_or("record has no ` :` before the file name")?
    };
    let base = super::filename::base(name);
    if base.is_empty() || base.contains('/') {
        return Err("invalid file name");
    }
    Ok((uid, exts, base))
}

/// The `G` extension among a record's extension fields, checking them all.
fn guid_ext(exts: &str) -> Result<Option<&str>, &'static str> {
    let mut guid = None;
    for e in exts.split(' ').filter(|e| !e.is_empty()) {
        match e.as_bytes()[0] {
            b'G' if e.len() > 1 => guid = Some(&e[1..]),
            b'A'..=b'Z' => {}
            _ => return Err("invalid extension field"),
        }
    }
    Ok(guid)
}

/// Parses one record line (without its LF).
fn parse_record(line: &str, version: u8) -> Result<Record, &'static str> {
    let (uid, exts, base) = split_record(line, version)?;
    let guid = guid_ext(exts)?.map(str::to_owned);
    let mut other = String::new();
    for e in exts.split(' ').filter(|e| !e.is_empty() && !e.starts_with('G')) {
        if !other.is_empty() {
            other.push(' ');
        }
        other.push_str(e);
    }
    Ok(Record { uid, base: base.to_owned(), guid, other_exts: other })
}

/// What can be kept of a damaged uidlist (see the module documentation).
#[derive(Debug)]
pub(crate) struct Salvage {
    /// The header, if it was readable (its records are in [`Salvage::records`], not here).
    pub(crate) header: Option<Uidlist>,
    /// Records that can keep their UIDs: ascending, each base name once.
    pub(crate) records: Vec<Record>,
    /// The highest UID anywhere in the file, kept or not (0 if none): no new UID may be at or
    /// below it.
    pub(crate) max_uid_seen: u32,
    /// Number of record lines read.
    pub(crate) lines: usize,
    /// Number of records kept (the length of `records` as salvaged).
    pub(crate) kept: usize,
    /// What was dropped, one entry per problem, for the warning.
    pub(crate) problems: Vec<String>,
}

impl Salvage {
    /// Keeps what can be kept of `data` (complete lines only).
    pub(crate) fn of(data: &[u8]) -> Self {
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(&data[..0], |p| &data[..=p]);
        let mut lines = complete.split(|&b| b == b'\n');
        let mut problems = Vec::new();
        let header = match parse_header(lines.next().unwrap_or_default()) {
            Ok(h) => Some(h),
            Err(why) => {
                problems.push(format!("line 1 (header): {why}"));
                None
            }
        };
        // Without a readable header the format is unknown: try version 3, the one Dovecot writes.
        let version = header.as_ref().map_or(3, |h| h.version);
        let mut parsed: Vec<(usize, Record)> = Vec::new();
        let mut max_uid_seen = 0u32;
        let mut n = 0;
        for (i, line) in lines.enumerate() {
            if line.is_empty() {
                continue;
            }
            n += 1;
            let lineno = i + 2;
            // A UID that parses counts as seen even if the rest of its line does not.
            if let Some(uid) = line
                .split(|&b| b == b' ')
                .next()
                .and_then(|u| std::str::from_utf8(u).ok())
                .and_then(|u| u.parse::<u32>().ok())
                .filter(|&u| u <= MAX_UID)
            {
                max_uid_seen = max_uid_seen.max(uid);
            }
            match std::str::from_utf8(line).map_err(|_| "record is not UTF-8").and_then(|l| parse_record(l, version)) {
                Ok(r) => parsed.push((lineno, r)),
                Err(why) => problems.push(format!("line {lineno}: {why}")),
            }
        }
        // The longest run of ascending UIDs (patience sorting, O(n log n)).
        let keep = longest_ascending(&parsed);
        let mut kept: Vec<Option<(usize, Record)>> = Vec::with_capacity(keep.len());
        let mut in_run = vec![false; parsed.len()];
        for &i in &keep {
            in_run[i] = true;
        }
        for (i, (lineno, r)) in parsed.into_iter().enumerate() {
            if in_run[i] {
                kept.push(Some((lineno, r)));
            } else {
                problems.push(format!("line {lineno}: UID {} is out of order", r.uid));
            }
        }
        // A file listed twice keeps its later line, as Dovecot does.
        let mut by_base: crate::fasthash::FastMap<String, usize> = Default::default();
        for i in 0..kept.len() {
            let Some((lineno, r)) = &kept[i] else { continue };
            if let Some(prev) = by_base.insert(r.base.clone(), i) {
                let lineno = *lineno;
                if let Some((old_line, old)) = kept[prev].take() {
                    problems.push(format!(
                        "line {old_line}: {} is listed again at line {lineno}; UID {} dropped",
                        old.base, old.uid
                    ));
                }
            }
        }
        let records: Vec<Record> = kept.into_iter().flatten().map(|(_, r)| r).collect();
        Self { header, kept: records.len(), records, max_uid_seen, lines: n, problems }
    }
}

/// Indexes (into `parsed`) of a longest strictly ascending run of UIDs; of several such runs,
/// the one on the earliest lines (a later line with a lower UID is the suspect one: records are
/// appended). O(n log n).
fn longest_ascending(parsed: &[(usize, Record)]) -> Vec<usize> {
    // from[i]: length of the longest ascending run starting at line i. Computed from the end
    // as a longest-ascending-run-ending-at over the negated UIDs (patience sorting).
    let mut from = vec![0usize; parsed.len()];
    let mut tails: Vec<i64> = Vec::new();
    for (i, (_, r)) in parsed.iter().enumerate().rev() {
        let key = -i64::from(r.uid);
        let k = tails.partition_point(|&t| t < key);
        from[i] = k + 1;
        if k == tails.len() {
            tails.push(key);
        } else {
            tails[k] = key;
        }
    }
    // Then the earliest line that can start (or continue) a run of the length still needed.
    let mut need = tails.len();
    let mut last = 0u32;
    let mut out = Vec::with_capacity(need);
    for (i, (_, r)) in parsed.iter().enumerate() {
        if need > 0 && from[i] == need && r.uid > last {
            out.push(i);
            last = r.uid;
            need -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("dovecot-uidlist")
    }

    #[test]
    fn parses_dovecot_output() {
        let data = b"3 V1795863195 N3 G42d01a2e9bb20a6b6454000083ecc375\n1 :1795863195.M773110P21604.vm,S=76,W=82\n3 Gdeadbeef S10 :other:2,S\n";
        let l = Uidlist::parse(data, p()).unwrap();
        assert_eq!(l.uid_validity, 1795863195);
        assert_eq!(l.header_next_uid, 3);
        assert_eq!(l.next_uid(), 4);
        assert_eq!(l.records[1].guid.as_deref(), Some("deadbeef"));
        assert_eq!(l.records[1].other_exts, "S10");
        assert_eq!(l.records[1].base, "other");
        assert_eq!(Uidlist::record_line(&l.records[1]), "3 Gdeadbeef S10 :other\n");
    }

    #[test]
    fn identity_from_head_and_tail_matches_a_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let header = "3 V1700000000 N5 G42d01a2e9bb20a6b6454000083ecc375\n";
        let records: String =
            (1..=3000u32).map(|u| format!("{} W{} :1700000000.M{u}P1.host,S=100\n", u * 2, u + 7)).collect();
        for (what, tail) in [
            ("stale N", String::new()),
            ("a torn last line", "6002 :partial".to_owned()),
            ("N ahead of the records", String::new()),
        ] {
            let header =
                if what == "N ahead of the records" { header.replace("N5", "N9000") } else { header.to_owned() };
            std::fs::write(dir.path().join(NAME), format!("{header}{records}{tail}")).unwrap();
            let full = Uidlist::read(dir.path()).unwrap().unwrap();
            let (l, next) = Uidlist::read_identity(dir.path()).unwrap().unwrap();
            assert_eq!(next, full.next_uid(), "{what}");
            assert_eq!((l.guid, l.uid_validity), (full.guid, full.uid_validity), "{what}");
            assert!(l.records.is_empty(), "{what}: the records were parsed");
        }
        assert!(Uidlist::read_identity(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn partial_last_line_is_ignored() {
        let l = Uidlist::parse(b"3 V1 N1 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n2 :b", p()).unwrap();
        assert_eq!(l.records.len(), 1);
    }

    #[test]
    fn corruption_is_reported_with_line() {
        for (data, line) in [
            (&b"3 V0 N1\n"[..], 1),
            (b"9 V1 N1\n", 1),
            (b"3 V1 N1\n2 :a\n1 :b\n", 3),
            (b"3 V1 N1\nx :a\n", 2),
            (b"3 V1 N1\n1 a\n", 2),
            (b"3 V1 N1\n1 :a/b\n", 2),
            (b"3 V1 N1\n1 :a\n2 :a:2,S\n", 3),
            (b"3 V1 N1\n1 g1 :a\n", 2),
        ] {
            match Uidlist::parse(data, p()) {
                Err(StoreError::Corrupt { line: Some(l), .. }) => assert_eq!(l, line, "{data:?}"),
                other => panic!("{data:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn append_after_a_torn_line_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        std::fs::write(&path, "3 V1 N1 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n2 :tor").unwrap();
        let mut l = Uidlist::read(dir.path()).unwrap().unwrap();
        let next = l.next_uid();
        l.append(dir.path(), vec![Record { uid: next, base: "b".into(), guid: None, other_exts: String::new() }])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "3 V1 N3 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n2 :b\n");
        // A clean file is appended to.
        let mut l = Uidlist::read(dir.path()).unwrap().unwrap();
        l.append(dir.path(), vec![Record { uid: 3, base: "c".into(), guid: None, other_exts: String::new() }]).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("N3 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n2 :b\n3 :c\n")
        );
    }

    #[test]
    fn salvage_keeps_the_longest_ascending_run() {
        let h = "3 V7 N3 G42d01a2e9bb20a6b6454000083ecc375\n";
        let sv = Salvage::of(format!("{h}1 :a\n3 :c\n2 :b\n4 :d\n2 :b\nzz :x\n5 :a\n6 Gg :e\n7 :half").as_bytes());
        let kept: Vec<(u32, &str)> = sv.records.iter().map(|r| (r.uid, r.base.as_str())).collect();
        // 2 :b twice out of order, a listed again later (the later line wins), the torn last
        // line ignored.
        assert_eq!(kept, [(3, "c"), (4, "d"), (5, "a"), (6, "e")]);
        assert_eq!(sv.max_uid_seen, 6);
        assert_eq!(sv.header.as_ref().map(|h| h.uid_validity), Some(7));
        assert_eq!(sv.problems.len(), 4, "{:?}", sv.problems);
        assert!(sv.problems.iter().any(|p| p.contains("line 7") && p.contains("bad UID")), "{:?}", sv.problems);
        // Without a header, records are still read; UIDs above 4294967294 count as nothing.
        let sv = Salvage::of(b"garbage\n1 :a\n4294967295 :b\n9 :c\n");
        assert!(sv.header.is_none());
        assert_eq!(sv.records.iter().map(|r| r.uid).collect::<Vec<_>>(), [1, 9]);
        assert_eq!(sv.max_uid_seen, 9);
        assert!(Salvage::of(b"").records.is_empty());
        // Of two runs of the same length, the one on earlier lines.
        let sv = Salvage::of(format!("{h}1 :a\n3 :c\n2 :b\n4 :d\n").as_bytes());
        assert_eq!(sv.records.iter().map(|r| r.uid).collect::<Vec<_>>(), [1, 3, 4]);
    }

    #[test]
    fn refresh_reads_only_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        std::fs::write(&path, "3 V1 N1 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n2 :b\n").unwrap();
        let mut view = Uidlist::read(dir.path()).unwrap().unwrap().header_only();
        assert!(view.refresh_appended(dir.path()).unwrap(), "unchanged");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"5 Gx :c\n7 :d").unwrap();
        assert!(view.refresh_appended(dir.path()).unwrap());
        assert_eq!((view.last_uid, view.next_uid()), (5, 6), "the torn line is not counted");
        f.write_all(b"\n3 :e\n").unwrap();
        let before = view.clone();
        assert!(!view.refresh_appended(dir.path()).unwrap(), "out of order: read it whole");
        assert_eq!((view.last_uid, view.read_len), (before.last_uid, before.read_len));
        // A header-only view is never written back whole.
        assert!(view.rewrite(dir.path(), |_| true).is_err());
        // Replaced by another file: read it whole.
        let mut full = Uidlist::parse(b"3 V1 N1 G42d01a2e9bb20a6b6454000083ecc375\n1 :a\n", &path).unwrap();
        full.rewrite(dir.path(), |_| true).unwrap();
        let mut view = Uidlist::read(dir.path()).unwrap().unwrap().header_only();
        full.rewrite(dir.path(), |_| true).unwrap();
        assert!(!view.refresh_appended(dir.path()).unwrap());
    }

    #[test]
    fn read_matched_keeps_only_what_it_finds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        let head = "3 V1 N2 G42d01a2e9bb20a6b6454000083ecc375\n";
        std::fs::write(&path, format!("{head}1 :a\n3 Gxx W9 :b\n5 Gyy :c:2,S\n6 :torn")).unwrap();
        let by_base: crate::fasthash::FastMap<&str, u32> = [("a", 0), ("c", 7), ("z", 2)].into_iter().collect();
        let (l, found) =
            Uidlist::read_matched(dir.path(), |b| by_base.get(b).copied(), by_base.len()).unwrap().unwrap();
        assert_eq!(found.iter().collect::<Vec<_>>(), [(1, 0, None), (5, 7, Some("yy"))]);
        assert_eq!((l.last_uid, l.next_uid(), l.complete), (5, 6, false));
        assert_eq!(l.read_len, std::fs::metadata(&path).unwrap().len() - "6 :torn".len() as u64);
        assert!(l.stamp.is_some() && l.records.is_empty());
        // The same checks as a full read.
        for bad in ["1 :a\n1 :x\n", "1 :a\n2 :c\n3 :a\n", "1 g1 :a\n", "0 :a\n"] {
            std::fs::write(&path, format!("{head}{bad}")).unwrap();
            assert!(
                matches!(
                    Uidlist::read_matched(dir.path(), |b| by_base.get(b).copied(), by_base.len()),
                    Err(StoreError::Corrupt { .. })
                ),
                "{bad:?}"
            );
        }
        std::fs::write(&path, "").unwrap();
        assert!(Uidlist::read_matched(dir.path(), |b| by_base.get(b).copied(), by_base.len()).is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(Uidlist::read_matched(dir.path(), |b| by_base.get(b).copied(), by_base.len()).unwrap().is_none());
    }

    #[test]
    fn version1() {
        let l = Uidlist::parse(b"1 1000 5\n3 1000.x.host:2,S\n", p()).unwrap();
        assert_eq!(l.records[0].base, "1000.x.host");
        assert_eq!(l.next_uid(), 5);
    }
}
