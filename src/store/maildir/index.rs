//! `mailreplica-index`: our own per-mailbox file with what Maildir itself cannot hold:
//! per-mail modseqs, HIGHESTMODSEQ, the first recent UID and a log of recent flag changes and
//! expunges, plus a snapshot of the mailbox so that an unchanged Maildir needs no directory scan.
//!
//! Dovecot never reads it (it only looks at `cur/`, `new/`, `tmp/` and its own `dovecot*` files),
//! and nothing in it is authoritative for mail: if it is lost or damaged it is rebuilt from the
//! Maildir, with modseqs restarting above any value it could have handed out before, so that a
//! peer's saved state can never be mistaken for a valid one.
//!
//! Format (text, one record per line; the file is replayed top to bottom, later lines win):
//!
//! ```text
//! mailreplica-index 1
//! H V<uidvalidity> G<mailbox guid> N<next uid> M<highest modseq> F<log floor> R<first recent uid>
//! S <uidlist stamp> <new/ stamp> <cur/ stamp> <keywords stamp>
//! m <uid> <modseq> <n|c> <G<guid>|-> <file name>          a mail (snapshot or upsert)
//! f <modseq> <uid> <added> <removed> <kw added> <kw removed>   flag change (hex masks)
//! x <modseq> <uid> <guid128>                              expunge
//! ```
//!
//! A rewrite writes the header, the stamps, every mail, `-- log`, the retained change log and
//! `-- end`; appends (mail upserts, log entries, header updates) follow `-- end`.
//!
//! `f` and `x` lines newer than the log floor are the change log; changes at or below the floor
//! are forgotten, so incremental export since a modseq below the floor is refused.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::filename::KeywordMask;
use super::fsutil::{self, Stamp};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Flags, Guid128, Modseq};

/// File name of the index in each mailbox directory.
pub(crate) const NAME: &str = "mailreplica-index";
const TMP_NAME: &str = "mailreplica-index.tmp";
const MAGIC: &str = "mailreplica-index 1";

/// Keep at least this many log entries when compacting.
const LOG_KEEP_MIN: usize = 10_000;

/// A mail as the index remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexedMail {
    pub(crate) uid: u32,
    pub(crate) modseq: Modseq,
    pub(crate) in_new: bool,
    /// The uidlist's `G` extension, if any.
    pub(crate) guid_ext: Option<String>,
    /// Full file name (base and info).
    pub(crate) file: String,
}

/// One change-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogEntry {
    Flags { modseq: Modseq, uid: u32, added: Flags, removed: Flags, kw_added: KeywordMask, kw_removed: KeywordMask },
    Expunge { modseq: Modseq, uid: u32, guid: Guid128 },
}

impl LogEntry {
    pub(crate) fn modseq(&self) -> Modseq {
        match self {
            Self::Flags { modseq, .. } | Self::Expunge { modseq, .. } => *modseq,
        }
    }
}

/// Header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Header {
    pub(crate) uid_validity: u32,
    pub(crate) guid: Option<Guid128>,
    pub(crate) next_uid: u32,
    pub(crate) highest_modseq: Modseq,
    pub(crate) log_floor: Modseq,
    pub(crate) first_recent_uid: u32,
    /// [`crate::store::MailboxStatus::replicated_modseq`].
    pub(crate) replicated_modseq: Modseq,
}

/// Change stamps of the files the snapshot was taken from; all `None` = "rescan next time".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stamps {
    pub(crate) uidlist: Option<Stamp>,
    pub(crate) new: Option<Stamp>,
    pub(crate) cur: Option<Stamp>,
    pub(crate) keywords: Option<Stamp>,
}

/// The index as read from disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    pub(crate) header: Header,
    /// `None` when the snapshot must not be trusted without a scan.
    pub(crate) stamps: Option<Stamps>,
    /// Mails in ascending UID order.
    pub(crate) mails: Vec<IndexedMail>,
    pub(crate) log: VecDeque<LogEntry>,
    /// Lines appended since the last rewrite.
    pub(crate) appended: usize,
    /// The file ended in a partial line (a crash during an append): rewrite before appending.
    pub(crate) torn: bool,
}

/// A modseq that is guaranteed to be above anything an earlier, lost index handed out:
/// 2^20 per second of wall-clock time since the epoch. An index gains far fewer than a million
/// modseqs per second, so a rebuilt one always starts above the old one.
pub(crate) fn rebuild_modseq_base() -> Modseq {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    secs << 20
}

impl Index {
    /// Reads the index of a mailbox directory; `None` if missing or unreadable as an index
    /// (a damaged index is logged and treated as missing, since it can be rebuilt).
    pub(crate) fn read(dir: &Path) -> StoreResult<Option<Self>> {
        let path = dir.join(NAME);
        let Some(data) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        match Self::parse(&data) {
            Ok(idx) => Ok(Some(idx)),
            Err(line) => {
                tracing::warn!(file = %path.display(), line, "damaged index, rebuilding it from the Maildir");
                Ok(None)
            }
        }
    }

    /// Parses index data; `Err(line)` names the first bad line.
    pub(crate) fn parse(data: &[u8]) -> Result<Self, usize> {
        let mut idx = Self::default();
        let complete_len = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        idx.torn = complete_len != data.len();
        let text = std::str::from_utf8(&data[..complete_len]).map_err(|_| 1usize)?;
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, MAGIC)) => {}
            _ => return Err(1),
        }
        let mut have_header = false;
        // 0: snapshot mails, 1: retained log, 2: lines appended after the snapshot.
        let mut section = 0u8;
        for (i, line) in lines {
            let n = i + 1;
            let (kind, rest) = line.split_once(' ').ok_or(n)?;
            match kind {
                "H" => {
                    idx.header = parse_header(rest).ok_or(n)?;
                    have_header = true;
                    if section == 2 {
                        idx.appended += 1;
                    }
                }
                "S" => {
                    let v: Vec<&str> = rest.split(' ').collect();
                    if v.len() != 4 {
                        return Err(n);
                    }
                    let s = |i: usize| Stamp::decode(v[i]).map_err(|()| n);
                    idx.stamps = Some(Stamps { uidlist: s(0)?, new: s(1)?, cur: s(2)?, keywords: s(3)? });
                }
                "m" => {
                    let mut it = rest.splitn(5, ' ');
                    let mut next = || it.next().ok_or(n);
                    let uid: u32 = next()?.parse().map_err(|_| n)?;
                    let modseq: Modseq = next()?.parse().map_err(|_| n)?;
                    let in_new = match next()? {
                        "n" => true,
                        "c" => false,
                        _ => return Err(n),
                    };
                    let guid_ext = match next()? {
                        "-" => None,
                        g => Some(g.strip_prefix('G').ok_or(n)?.to_owned()),
                    };
                    let file = next()?.to_owned();
                    if uid == 0 || file.is_empty() {
                        return Err(n);
                    }
                    let m = IndexedMail { uid, modseq, in_new, guid_ext, file };
                    if section == 2 {
                        idx.appended += 1;
                        idx.upsert(m);
                    } else if section == 1 {
                        return Err(n);
                    } else {
                        if idx.mails.last().is_some_and(|l| l.uid >= uid) {
                            return Err(n);
                        }
                        idx.mails.push(m);
                    }
                }
                "f" => {
                    if section == 0 {
                        return Err(n);
                    }
                    idx.appended += usize::from(section == 2);
                    let v: Vec<&str> = rest.split(' ').collect();
                    if v.len() != 6 {
                        return Err(n);
                    }
                    let hex8 = |s: &str| u8::from_str_radix(s, 16).map_err(|_| n);
                    let hex32 = |s: &str| u32::from_str_radix(s, 16).map_err(|_| n);
                    idx.log.push_back(LogEntry::Flags {
                        modseq: v[0].parse().map_err(|_| n)?,
                        uid: v[1].parse().map_err(|_| n)?,
                        added: Flags::from_bits_truncate(hex8(v[2])?),
                        removed: Flags::from_bits_truncate(hex8(v[3])?),
                        kw_added: hex32(v[4])?,
                        kw_removed: hex32(v[5])?,
                    });
                }
                "x" => {
                    if section == 0 {
                        return Err(n);
                    }
                    idx.appended += usize::from(section == 2);
                    let v: Vec<&str> = rest.split(' ').collect();
                    if v.len() != 3 {
                        return Err(n);
                    }
                    let uid: u32 = v[1].parse().map_err(|_| n)?;
                    idx.log.push_back(LogEntry::Expunge {
                        modseq: v[0].parse().map_err(|_| n)?,
                        uid,
                        guid: v[2].parse().map_err(|_| n)?,
                    });
                    idx.remove(uid);
                }
                "--" if rest == "log" && section == 0 => section = 1,
                "--" if rest == "end" && section == 1 => section = 2,
                _ => return Err(n),
            }
        }
        if !have_header {
            return Err(1);
        }
        Ok(idx)
    }

    fn upsert(&mut self, m: IndexedMail) {
        match self.mails.binary_search_by_key(&m.uid, |x| x.uid) {
            Ok(i) => self.mails[i] = m,
            Err(i) => self.mails.insert(i, m),
        }
    }

    fn remove(&mut self, uid: u32) {
        if let Ok(i) = self.mails.binary_search_by_key(&uid, |x| x.uid) {
            self.mails.remove(i);
        }
    }
}

/// The header an index ends with (appends add a header line after every change, and the last
/// one wins), without parsing the rest. `None` when there is no index, or it is damaged at
/// either end (no magic line, a torn last line, no header line).
pub(crate) fn read_last_header(dir: &Path) -> StoreResult<Option<Header>> {
    let Some(data) = fsutil::read_optional(&dir.join(NAME))? else {
        return Ok(None);
    };
    let magic_ok = data.strip_prefix(MAGIC.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'\n'));
    if !magic_ok || data.last() != Some(&b'\n') {
        return Ok(None);
    }
    let mut end = data.len() - 1; // the LF that ends the current line
    loop {
        let start = data[..end].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if let Some(rest) = data[start..end].strip_prefix(b"H ") {
            return Ok(std::str::from_utf8(rest).ok().and_then(parse_header));
        }
        if start == 0 {
            return Ok(None);
        }
        end = start - 1;
    }
}

fn parse_header(rest: &str) -> Option<Header> {
    let mut h = Header::default();
    for t in rest.split(' ') {
        let (k, v) = t.split_at(1.min(t.len()));
        match k {
            "V" => h.uid_validity = v.parse().ok()?,
            "G" => h.guid = if v == "-" { None } else { Some(v.parse().ok()?) },
            "N" => h.next_uid = v.parse().ok()?,
            "M" => h.highest_modseq = v.parse().ok()?,
            "F" => h.log_floor = v.parse().ok()?,
            "R" => h.first_recent_uid = v.parse().ok()?,
            "Y" => h.replicated_modseq = v.parse().ok()?,
            _ => return None,
        }
    }
    Some(h)
}

/// Renders a header line.
pub(crate) fn header_line(h: &Header) -> String {
    format!(
        "H V{} G{} N{} M{} F{} R{} Y{}\n",
        h.uid_validity,
        h.guid.map_or_else(|| "-".to_owned(), |g| g.to_string()),
        h.next_uid,
        h.highest_modseq,
        h.log_floor,
        h.first_recent_uid,
        h.replicated_modseq
    )
}

/// A mail as an index line describes it, borrowed from wherever the mail is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailLine<'a> {
    pub(crate) uid: u32,
    pub(crate) modseq: Modseq,
    pub(crate) in_new: bool,
    pub(crate) guid_ext: Option<&'a str>,
    pub(crate) file: &'a str,
}

#[cfg(test)]
impl IndexedMail {
    /// This mail as a [`MailLine`].
    pub(crate) fn line(&self) -> MailLine<'_> {
        MailLine {
            uid: self.uid,
            modseq: self.modseq,
            in_new: self.in_new,
            guid_ext: self.guid_ext.as_deref(),
            file: &self.file,
        }
    }
}

/// Appends a mail line to `out`.
pub(crate) fn push_mail_line(out: &mut String, m: &MailLine<'_>) {
    use std::fmt::Write as _;
    let _ = write!(out, "m {} {}", m.uid, m.modseq);
    out.push_str(if m.in_new { " n " } else { " c " });
    match m.guid_ext {
        Some(g) => {
            out.push('G');
            out.push_str(g);
        }
        None => out.push('-'),
    }
    out.push(' ');
    out.push_str(m.file);
    out.push('\n');
}

/// Renders a mail line.
pub(crate) fn mail_line(m: &MailLine<'_>) -> String {
    let mut s = String::with_capacity(m.file.len() + 40);
    push_mail_line(&mut s, m);
    s
}

/// Renders a log line.
pub(crate) fn log_line(e: &LogEntry) -> String {
    match e {
        LogEntry::Flags { modseq, uid, added, removed, kw_added, kw_removed } => {
            format!("f {modseq} {uid} {:x} {:x} {kw_added:x} {kw_removed:x}\n", added.bits(), removed.bits())
        }
        LogEntry::Expunge { modseq, uid, guid } => format!("x {modseq} {uid} {guid}\n"),
    }
}

/// Writes a whole new index (snapshot plus retained log) through a temporary file.
/// Returns the log floor actually used (raised if old entries were dropped).
pub(crate) fn write_snapshot(
    dir: &Path,
    header: &Header,
    stamps: Option<&Stamps>,
    mails: &mut dyn Iterator<Item = MailLine<'_>>,
    log: &mut VecDeque<LogEntry>,
    messages: usize,
) -> StoreResult<Modseq> {
    let keep = LOG_KEEP_MIN.max(messages);
    let mut floor = header.log_floor;
    while log.len() > keep {
        if let Some(e) = log.pop_front() {
            floor = floor.max(e.modseq());
        }
    }
    let mut h = *header;
    h.log_floor = floor;
    let mut data = String::with_capacity(64 + messages * 64);
    data.push_str(MAGIC);
    data.push('\n');
    data.push_str(&header_line(&h));
    if let Some(s) = stamps {
        data.push_str(&format!(
            "S {} {} {} {}\n",
            Stamp::encode(s.uidlist),
            Stamp::encode(s.new),
            Stamp::encode(s.cur),
            Stamp::encode(s.keywords)
        ));
    }
    for m in mails {
        push_mail_line(&mut data, &m);
    }
    data.push_str("-- log\n");
    for e in log.iter() {
        data.push_str(&log_line(e));
    }
    data.push_str("-- end\n");
    let tmp: PathBuf = dir.join(TMP_NAME);
    fsutil::replace_file(&tmp, &dir.join(NAME), data.as_bytes(), 0o600)?;
    Ok(floor)
}

/// An open index file for appending.
#[derive(Debug)]
pub(crate) struct Appender {
    file: File,
    path: PathBuf,
    dirty: bool,
}

impl Appender {
    pub(crate) fn open(dir: &Path) -> StoreResult<Self> {
        let path = dir.join(NAME);
        let file = OpenOptions::new().append(true).open(&path).ctx("open", &path)?;
        Ok(Self { file, path, dirty: false })
    }

    /// Appends lines (whole lines in one write, so a crash leaves at most a torn last line).
    pub(crate) fn append(&mut self, lines: &str) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.file.write_all(lines.as_bytes()).ctx("write", &self.path)?;
        self.dirty = true;
        Ok(())
    }

    /// Makes the appended lines durable.
    pub(crate) fn sync(&mut self) -> StoreResult<()> {
        if self.dirty {
            self.file.sync_data().ctx("fdatasync", &self.path)?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Removes the index (e.g. when the mailbox gets a new identity).
pub(crate) fn remove(dir: &Path) -> StoreResult<()> {
    match fs::remove_file(dir.join(NAME)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::store::StoreError::io("unlink", dir.join(NAME), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_append_replay() {
        let dir = tempfile::tempdir().unwrap();
        let h = Header {
            uid_validity: 7,
            guid: Some(Guid128([1; 16])),
            next_uid: 3,
            highest_modseq: 5,
            log_floor: 1,
            first_recent_uid: 1,
            replicated_modseq: 4,
        };
        let mails = [
            IndexedMail { uid: 1, modseq: 2, in_new: false, guid_ext: None, file: "a,S=1:2,S".into() },
            IndexedMail { uid: 2, modseq: 5, in_new: true, guid_ext: Some("g2".into()), file: "b".into() },
        ];
        let mut log = VecDeque::from(vec![LogEntry::Flags {
            modseq: 2,
            uid: 1,
            added: Flags::SEEN,
            removed: Flags::NONE,
            kw_added: 0,
            kw_removed: 0,
        }]);
        write_snapshot(dir.path(), &h, Some(&Stamps::default()), &mut mails.iter().map(IndexedMail::line), &mut log, 2)
            .unwrap();
        let mut ap = Appender::open(dir.path()).unwrap();
        ap.append(&log_line(&LogEntry::Expunge { modseq: 6, uid: 2, guid: Guid128([2; 16]) })).unwrap();
        ap.append(&mail_line(&MailLine { uid: 3, modseq: 7, in_new: false, guid_ext: None, file: "c with space:2," }))
            .unwrap();
        let mut h2 = h;
        h2.highest_modseq = 7;
        ap.append(&header_line(&h2)).unwrap();
        ap.sync().unwrap();
        let idx = Index::read(dir.path()).unwrap().unwrap();
        assert_eq!(idx.header.highest_modseq, 7);
        assert_eq!(idx.mails.iter().map(|m| m.uid).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(idx.mails[1].file, "c with space:2,");
        assert_eq!(idx.log.len(), 2);
        assert_eq!(idx.appended, 3);
        assert!(!idx.torn);
    }

    #[test]
    fn last_header() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap(), None);
        let p = dir.path().join(NAME);
        std::fs::write(&p, "mailreplica-index 1\nH V1 G- N1 M1 F1 R1\nm 1 1 c - f\n-- log\n-- end\n").unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap().unwrap().highest_modseq, 1);
        std::fs::write(
            &p,
            "mailreplica-index 1\nH V1 G- N1 M1 F1 R1\n-- log\n-- end\nm 2 2 n - g\nH V1 G- N3 M2 F1 R1\n",
        )
        .unwrap();
        let h = read_last_header(dir.path()).unwrap().unwrap();
        assert_eq!((h.next_uid, h.highest_modseq), (3, 2));
        std::fs::write(&p, "mailreplica-index 1\nH V1 G- N1 M1 F1 R1\nm 2 2 n - g").unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap(), None, "torn");
        std::fs::write(&p, "something else\nH V1 G- N1 M1 F1 R1\n").unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap(), None, "no magic");
    }

    #[test]
    fn damaged_index_is_rejected() {
        assert_eq!(Index::parse(b"garbage\n").unwrap_err(), 1);
        assert_eq!(Index::parse(b"mailreplica-index 1\nH V1 G- N1 M1 F1 R1\nm 1 x c - f\n").unwrap_err(), 3);
        let torn = Index::parse(b"mailreplica-index 1\nH V1 G- N1 M1 F1 R1\nm 1 1 c - f\nm 2").unwrap();
        assert!(torn.torn);
        assert_eq!(torn.mails.len(), 1);
    }
}
