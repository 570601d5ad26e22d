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

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use super::fsutil::{self, Stamp};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Guid128, StoreError};

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
        }
    }

    /// The next UID to assign.
    pub(crate) fn next_uid(&self) -> u32 {
        let after_last = self.records.last().map_or(1, |r| r.uid.saturating_add(1));
        self.header_next_uid.max(after_last)
    }

    /// Reads `<dir>/dovecot-uidlist`; `None` if it does not exist.
    pub(crate) fn read(dir: &Path) -> StoreResult<Option<Self>> {
        let path = dir.join(NAME);
        // Stamp before reading: if the file changes while we read, the stamp is already stale
        // and the next comparison sees the change.
        let stamp = Stamp::read(&path)?;
        let Some(data) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        let mut list = Self::parse(&data, &path)?;
        list.stamp = stamp;
        Ok(Some(list))
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
        Self::parse(&buf[..end], &path).map(Some)
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
        let list = Self::parse(&head[..=end], &path)?;
        let mut tail = vec![0u8; TAIL as usize];
        f.read_exact_at(&mut tail, len - TAIL).ctx("read", &path)?;
        // The last complete line, which must start inside the tail.
        let last_uid = tail.iter().rposition(|&b| b == b'\n').and_then(|last_lf| {
            let start = tail[..last_lf].iter().rposition(|&b| b == b'\n')? + 1;
            let line = &tail[start..last_lf];
            let digits = line.iter().position(|&b| b == b' ')?;
            std::str::from_utf8(&line[..digits]).ok()?.parse::<u32>().ok().filter(|&u| u != 0 && u != u32::MAX)
        });
        match last_uid {
            Some(uid) => {
                let next = list.header_next_uid.max(uid + 1);
                Ok(Some((list, next)))
            }
            None => whole(dir),
        }
    }

    /// Parses the contents of a uidlist file.
    pub(crate) fn parse(data: &[u8], path: &Path) -> StoreResult<Self> {
        let corrupt = |line: usize, why: &str| StoreError::corrupt(path, Some(line), why.to_owned());
        // Only complete lines count.
        let complete = match data.iter().rposition(|&b| b == b'\n') {
            Some(p) => &data[..=p],
            None => &data[..0],
        };
        let mut lines = complete.split(|&b| b == b'\n');
        let header = lines.next().filter(|h| !h.is_empty()).ok_or_else(|| corrupt(1, "empty file"))?;
        let header = std::str::from_utf8(header).map_err(|_| corrupt(1, "header is not UTF-8"))?;
        let mut tokens = header.split(' ');
        let version = tokens.next().unwrap_or("");
        let mut list = Self {
            uid_validity: 0,
            header_next_uid: 0,
            guid: None,
            header_extra: Vec::new(),
            records: Vec::new(),
            version: 3,
            stamp: None,
            read_len: complete.len() as u64,
        };
        match version {
            "3" => {
                for t in tokens.filter(|t| !t.is_empty()) {
                    let (key, value) = t.split_at(1);
                    match key {
                        "V" => list.uid_validity = value.parse().map_err(|_| corrupt(1, "bad V (UIDVALIDITY)"))?,
                        "N" => list.header_next_uid = value.parse().map_err(|_| corrupt(1, "bad N (next UID)"))?,
                        "G" => {
                            list.guid = Some(value.parse().map_err(|_| corrupt(1, "bad G (mailbox GUID)"))?);
                        }
                        _ => list.header_extra.push(t.to_owned()),
                    }
                }
            }
            "1" => {
                list.version = 1;
                let v: Vec<&str> = tokens.collect();
                if v.len() != 2 {
                    return Err(corrupt(1, "version 1 header needs UIDVALIDITY and next UID"));
                }
                list.uid_validity = v[0].parse().map_err(|_| corrupt(1, "bad UIDVALIDITY"))?;
                list.header_next_uid = v[1].parse().map_err(|_| corrupt(1, "bad next UID"))?;
            }
            _ => return Err(corrupt(1, "unsupported uidlist version")),
        }
        if list.uid_validity == 0 {
            return Err(corrupt(1, "UIDVALIDITY is missing or 0"));
        }
        if list.header_next_uid == 0 {
            return Err(corrupt(1, "next UID is missing or 0"));
        }
        let mut last_uid = 0u32;
        let mut seen: super::fasthash::FastSet<&str> = Default::default();
        seen.reserve(complete.len() / 48);
        for (i, line) in lines.enumerate() {
            let lineno = i + 2;
            if line.is_empty() {
                continue; // the split after the final LF
            }
            let line = std::str::from_utf8(line).map_err(|_| corrupt(lineno, "record is not UTF-8"))?;
            let (uid_str, rest) = line.split_once(' ').ok_or_else(|| corrupt(lineno, "record has no file name"))?;
            let uid: u32 = uid_str.parse().map_err(|_| corrupt(lineno, "bad UID"))?;
            if uid == 0 || uid == u32::MAX {
                return Err(corrupt(lineno, "UID out of range"));
            }
            if uid <= last_uid {
                return Err(corrupt(lineno, "UIDs are not in ascending order"));
            }
            last_uid = uid;
            let (exts, name) = if list.version == 1 {
                ("", rest)
            } else if let Some(name) = rest.strip_prefix(':') {
                ("", name)
            } else {
                rest.split_once(" :").ok_or_else(|| corrupt(lineno, "record has no ` :` before the file name"))?
            };
            let base = super::filename::base(name);
            if base.is_empty() || base.contains('/') {
                return Err(corrupt(lineno, "invalid file name"));
            }
            if !seen.insert(base) {
                return Err(corrupt(lineno, "the same file is listed twice"));
            }
            let mut guid = None;
            let mut other = String::new();
            for e in exts.split(' ').filter(|e| !e.is_empty()) {
                match e.as_bytes()[0] {
                    b'G' => {
                        if e.len() > 1 {
                            guid = Some(e[1..].to_owned());
                        }
                    }
                    b'A'..=b'Z' => {
                        if !other.is_empty() {
                            other.push(' ');
                        }
                        other.push_str(e);
                    }
                    _ => return Err(corrupt(lineno, "invalid extension field")),
                }
            }
            list.records.push(Record { uid, base: base.to_owned(), guid, other_exts: other });
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
        let next = self.next_uid();
        self.records.retain(|r| keep(r));
        self.header_next_uid = next;
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
        let mut last = self.records.last().map_or(0, |r| r.uid);
        for r in &new {
            debug_assert!(r.uid > last && r.uid >= self.header_next_uid);
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
            self.records.extend(new);
            return self.rewrite(dir, |_| true);
        }
        f.write_all(data.as_bytes()).ctx("write", &path)?;
        f.sync_data().ctx("fdatasync", &path)?;
        self.read_len += data.len() as u64;
        self.records.extend(new);
        self.stamp = Stamp::read(&path)?;
        Ok(())
    }
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
    fn version1() {
        let l = Uidlist::parse(b"1 1000 5\n3 1000.x.host:2,S\n", p()).unwrap();
        assert_eq!(l.records[0].base, "1000.x.host");
        assert_eq!(l.next_uid(), 5);
    }
}
