//! `mailreplica-index`: our own per-mailbox file with what Maildir itself cannot hold:
//! per-mail modseqs, HIGHESTMODSEQ, the first recent UID and a log of recent flag changes and
//! expunges, plus a snapshot of the mailbox so that an unchanged Maildir needs no directory scan.
//!
//! Dovecot never reads it (it only looks at `cur/`, `new/`, `tmp/` and its own `dovecot*` files).
//! Nothing in it is authoritative for UIDs, flags or bodies; what only it holds is modseqs, the
//! change log, and keywords beyond the 26 a Maildir file name can carry (see below).
//!
//! ## A lost index
//!
//! If the index is lost or damaged it is rebuilt from the Maildir, and modseqs restart low, as
//! Dovecot's own do when its index is rebuilt (measured with Dovecot 2.3.19: a fresh index of
//! a Maildir with mails reports HIGHESTMODSEQ 2 and modseq 2 for every mail, an empty one 1).
//! They must: dsync carries modseqs to the peer, and a replica that jumped far ahead (an
//! earlier design restarted at `unix_time << 20`) pushed a Dovecot master's HIGHESTMODSEQ to
//! ~10^15. What a restart from a low number cannot do by itself is make a peer's saved sync
//! state from before the loss look invalid: its modseq may well lie above our new floor. So the
//! header records the loss (`L1`); the store then reports
//! [`crate::store::MailboxStatus::history_lost`] and refuses every incremental export
//! ([`crate::store::Mailbox::changes_since`] with a modseq other than 0), until the sync engine
//! clears the flag after a full sync. A stale state is caught by the flag, not by magnitude.
//! (A mailbox rebuilt while it has no mails and UIDNEXT 1 has no history to lose.)
//!
//! ## Keywords beyond 26
//!
//! A Maildir file name holds at most 26 keyword letters (`dovecot-keywords`). Keywords that get
//! no letter are kept here, per mail, as numbers into the mailbox's own keyword table (`K`
//! lines, never renumbered, at most [`crate::store::MAX_MAILBOX_KEYWORDS`] names with the
//! letters). Dovecot keeps such keywords only in its own index too, so it does not show ours,
//! just as a Dovecot replica whose index is lost does not; losing this file loses them.
//!
//! ## Format
//!
//! Text, one record per line; the file is replayed top to bottom, later lines win:
//!
//! ```text
//! mailreplica-index 1
//! H V<uidvalidity> G<mailbox guid> N<next uid> M<highest modseq> F<log floor> R<first recent uid>
//!   Y<replicated modseq> [L1]                            (L1: history lost; absent = not lost)
//! S <uidlist stamp> <new/ stamp> <cur/ stamp> <keywords stamp>
//! K <id> <keyword>                                        a keyword without a letter
//! m <uid> <modseq> <n|c> <G<guid>|-> <file name>          a mail (snapshot or upsert)
//! e <uid> <modseq> <n|c> <G<guid>|-> <ids> <file name>    the same, with keyword ids `1,7,3`
//! f <modseq> <uid> <added> <removed> <kw added> <kw removed> [<ids added> <ids removed>]
//!                                                         flag change (hex masks; ids or `-`)
//! x <modseq> <uid> <guid128>                              expunge
//! ```
//!
//! A rewrite writes the header, the stamps, the keyword table, every mail, `-- log`, the
//! retained change log and `-- end`; appends (keyword table entries, mail upserts, log
//! entries, header updates) follow `-- end`. Files written before `L`, `K` and `e` existed
//! read the same as before; an older mailreplica treats a file that uses them as damaged and
//! rebuilds it.
//!
//! `f` and `x` lines newer than the log floor are the change log; changes at or below the floor
//! are forgotten, so incremental export since a modseq below the floor is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::change_log::ChangeLog;
use super::filename::KeywordMask;
use super::fsutil::{self, Stamp};
use super::names::{MAX_NAME, NameRef, Names, Rare};
use crate::spill::SpillVec;
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Flags, Guid128, Keyword, Modseq};

/// File name of the index in each mailbox directory.
pub(crate) const NAME: &str = "mailreplica-index";
const TMP_NAME: &str = "mailreplica-index.tmp";
const MAGIC: &str = "mailreplica-index 1";

/// Keep at least this many log entries when compacting.
const LOG_KEEP_MIN: usize = 10_000;

/// A mail as the index remembers it, and as an open mailbox keeps it in memory: one per mail,
/// so it is kept small (32 bytes; its file name, base and info, is in the mailbox's
/// [`Names`]) and plain (`Copy`, no pointer), so that a large mailbox's list can live in a
/// file ([`crate::spill`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexedMail {
    pub(crate) modseq: Modseq,
    /// What few mails have, kept aside in [`Names`] so that the others do not pay for it:
    /// its place there + 1, or 0.
    rare: u32,
    /// The file name's place in [`Names`] (a [`NameRef`] in two fields, which packs tighter).
    name_off: u32,
    pub(crate) uid: u32,
    /// Keyword letters and flags, as the file name says.
    pub(crate) kw: KeywordMask,
    pub(crate) flags: Flags,
    name_len: u8,
    pub(crate) in_new: bool,
    /// Expunged: marked, and swept out of the vector in bulk.
    pub(crate) gone: bool,
}

const _: () = assert!(std::mem::size_of::<IndexedMail>() == 32);

impl IndexedMail {
    /// The uidlist's `G` extension, if any.
    pub(crate) fn guid_ext<'a>(&self, names: &'a Names) -> Option<&'a str> {
        names.rare(self.rare).and_then(|r| r.guid_ext.as_deref())
    }

    /// Keywords without a letter, as ids into [`Index::extra_keywords`], in the mail's order.
    pub(crate) fn extras<'a>(&self, names: &'a Names) -> &'a [u16] {
        names.rare(self.rare).map_or(&[], |r| &r.extras)
    }

    /// Replaces the keywords without a letter; returns the old ones.
    pub(crate) fn replace_extras(&mut self, names: &mut Names, extras: Box<[u16]>) -> Box<[u16]> {
        let mut rare = names.rare(self.rare).cloned().unwrap_or_default();
        let old = std::mem::replace(&mut rare.extras, extras);
        names.set_rare(&mut self.rare, rare);
        old
    }

    /// A mail with the flags its file name carries, the name stored in `names`.
    pub(crate) fn new(
        uid: u32,
        modseq: Modseq,
        in_new: bool,
        guid_ext: Option<Box<str>>,
        file: &str,
        names: &mut Names,
        extras: Box<[u16]>,
    ) -> StoreResult<Self> {
        let name = names.push(file)?;
        Ok(Self::with_name(uid, modseq, in_new, guid_ext, name, names, extras))
    }

    /// A mail whose file name is already in `names`, at `name`.
    pub(crate) fn with_name(
        uid: u32,
        modseq: Modseq,
        in_new: bool,
        guid_ext: Option<Box<str>>,
        name: NameRef,
        names: &mut Names,
        extras: Box<[u16]>,
    ) -> Self {
        let (flags, kw) = super::filename::parse_flags(names.get(name));
        Self {
            modseq,
            rare: names.add_rare(Rare { guid_ext, extras }),
            name_off: name.off,
            uid,
            kw,
            flags,
            name_len: name.len,
            in_new,
            gone: false,
        }
    }

    /// Where the file name is in [`Names`].
    pub(crate) fn name(&self) -> NameRef {
        NameRef { off: self.name_off, len: self.name_len }
    }

    /// Points the mail at another name (see [`Names::compact`]).
    pub(crate) fn set_name(&mut self, r: NameRef) {
        (self.name_off, self.name_len) = (r.off, r.len);
    }

    /// The mail's file has a new name (a rename by us or by another writer).
    pub(crate) fn rename(&mut self, names: &mut Names, file: &str) -> StoreResult<()> {
        let mut r = self.name();
        names.replace(&mut r, file)?;
        self.set_name(r);
        Ok(())
    }

    /// The full file name (base and info).
    pub(crate) fn file<'a>(&self, names: &'a Names) -> &'a str {
        names.get(self.name())
    }

    /// This mail as a [`MailLine`].
    pub(crate) fn line<'a>(&'a self, names: &'a Names) -> MailLine<'a> {
        MailLine {
            uid: self.uid,
            modseq: self.modseq,
            in_new: self.in_new,
            guid_ext: self.guid_ext(names),
            file: self.file(names),
            extras: self.extras(names),
        }
    }

    /// The mail's GUID: the uidlist's `G` extension, else the base file name.
    pub(crate) fn guid<'a>(&'a self, names: &'a Names) -> &'a str {
        self.guid_ext(names).unwrap_or_else(|| super::filename::base(self.file(names)))
    }
}

/// What merging a directory scan into the index needs of a mail the index knew, without its
/// names (a full open holds the old index and the scan at once: this keeps the old one small,
/// and plain, so that it can live in a file: see [`crate::spill`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KnownMail {
    pub(crate) modseq: Modseq,
    /// [`mail_ident`] of the mail: the same mail if and only if equal.
    pub(crate) ident: u64,
    /// The 128-bit form of its GUID, for an expunge record.
    pub(crate) guid128: Guid128,
    /// Its keywords without a letter: their place in [`Index::known_extras`] + 1, or 0.
    pub(crate) extras: u32,
    pub(crate) uid: u32,
    pub(crate) kw: KeywordMask,
    pub(crate) flags: Flags,
    pub(crate) gone: bool,
}

impl KnownMail {
    pub(crate) fn of(m: &IndexedMail, names: &Names, extras: &mut Vec<Box<[u16]>>) -> Self {
        Self { kw: m.kw, flags: m.flags, gone: m.gone, ..Self::from_line(&m.line(names), extras) }
    }

    /// The same from an index line, without storing the name anywhere.
    fn from_line(m: &MailLine<'_>, all_extras: &mut Vec<Box<[u16]>>) -> Self {
        let (flags, kw) = super::filename::parse_flags(m.file);
        Self {
            modseq: m.modseq,
            ident: mail_ident(m.file, m.guid_ext),
            guid128: Guid128::from_mail_guid(m.guid_ext.unwrap_or_else(|| super::filename::base(m.file))),
            extras: if m.extras.is_empty() {
                0
            } else {
                all_extras.push(m.extras.into());
                all_extras.len() as u32
            },
            uid: m.uid,
            kw,
            flags,
            gone: false,
        }
    }
}

/// A 64-bit hash of what makes a mail the same mail: its base file name and its uidlist `G`
/// extension. (Two different mails under one UID with equal hashes would need a 64-bit hash
/// collision.)
pub(crate) fn mail_ident(file: &str, guid_ext: Option<&str>) -> u64 {
    crate::fasthash::strong_hash(&(super::filename::base(file), guid_ext))
}

/// Keywords without a letter that a flag change added and removed (ids).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ExtraChange {
    pub(crate) added: Box<[u16]>,
    pub(crate) removed: Box<[u16]>,
}

impl ExtraChange {
    /// `None` when nothing changed, which is nearly always: log entries stay small.
    pub(crate) fn boxed(added: Box<[u16]>, removed: Box<[u16]>) -> Option<Box<Self>> {
        (!added.is_empty() || !removed.is_empty()).then(|| Box::new(Self { added, removed }))
    }
}

/// One change-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogEntry {
    Flags {
        modseq: Modseq,
        uid: u32,
        added: Flags,
        removed: Flags,
        kw_added: KeywordMask,
        kw_removed: KeywordMask,
        /// Keywords without a letter that were added and removed, if any.
        extra: Option<Box<ExtraChange>>,
    },
    Expunge {
        modseq: Modseq,
        uid: u32,
        guid: Guid128,
    },
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
    /// [`crate::store::MailboxStatus::history_lost`].
    pub(crate) history_lost: bool,
    /// [`crate::store::MailboxStatus::peer_modseq`].
    pub(crate) peer_modseq: Modseq,
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
    /// Keywords without a letter, by id.
    pub(crate) extra_keywords: Vec<Keyword>,
    /// Mails in ascending UID order (empty when `known` holds them).
    pub(crate) mails: SpillVec<IndexedMail>,
    /// Their file names.
    pub(crate) names: Names,
    /// The same in the form a merge needs, when the snapshot could not be trusted as it is
    /// (see [`Index::read`]).
    pub(crate) known: SpillVec<KnownMail>,
    /// The keywords without a letter of mails in `known` (see [`KnownMail::extras`]).
    pub(crate) known_extras: Vec<Box<[u16]>>,
    pub(crate) log: ChangeLog,
    /// Lines appended since the last rewrite.
    pub(crate) appended: usize,
    /// The file ended in a partial line (a crash during an append): rewrite before appending.
    pub(crate) torn: bool,
}

/// The modseq every mail of a rebuilt index gets, and its HIGHESTMODSEQ: what Dovecot's own
/// fresh index reports (1 for an empty mailbox, 2 once it holds mails, added in one
/// transaction). See the module documentation for why it must be low.
pub(crate) fn rebuilt_modseq(has_mails: bool) -> Modseq {
    if has_mails { 2 } else { 1 }
}

/// Parses `1,7,3` (keyword ids); `-` is none.
fn parse_ids(s: &str, known: usize) -> Option<Box<[u16]>> {
    if s == "-" {
        return Some(Box::default());
    }
    let mut v = Vec::new();
    for t in s.split(',') {
        let id: u16 = t.parse().ok()?;
        if usize::from(id) >= known {
            return None;
        }
        v.push(id);
    }
    Some(v.into_boxed_slice())
}

fn push_ids(out: &mut String, ids: &[u16]) {
    use std::fmt::Write as _;
    if ids.is_empty() {
        out.push('-');
    }
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{id}");
    }
}

impl Index {
    /// Reads the index of a mailbox directory; `None` if missing or unreadable as an index
    /// (a damaged index is logged and treated as missing, since it can be rebuilt). The file
    /// is parsed as it is read, straight into the mails' in-memory form, so that opening a
    /// large mailbox holds one copy of its mails, not the file and two copies. Unless its
    /// snapshot's stamps are `trusted` (the Maildir is unchanged since), the mails are read
    /// into [`Index::known`] instead: the caller will scan the Maildir and merge.
    pub(crate) fn read(dir: &Path, trusted: Option<&Stamps>) -> StoreResult<Option<Self>> {
        let path = dir.join(NAME);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::store::StoreError::io("open", &path, e)),
        };
        let len = f.metadata().ctx("fstat", &path)?.len();
        let mut r = BufReader::with_capacity(64 * 1024, f);
        let mut p = Parser::new(len, trusted.copied());
        // A large mailbox's lists move into files of its own directory.
        let spill_dir = crate::spill::dir(dir);
        p.idx.names = Names::in_dir(dir);
        p.idx.mails = SpillVec::new_in(spill_dir.clone());
        p.idx.known = SpillVec::new_in(spill_dir.clone());
        p.idx.log = ChangeLog::new_in(spill_dir);
        let mut buf = Vec::with_capacity(256);
        let mut n = 0;
        let outcome = loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf).ctx("read", &path)? == 0 {
                break p.finish();
            }
            if buf.last() != Some(&b'\n') {
                p.idx.torn = true; // a crash during an append
                break p.finish();
            }
            n += 1;
            let step = std::str::from_utf8(&buf[..buf.len() - 1]).map_err(|_| n).and_then(|l| p.line(n, l));
            if let Err(line) = step {
                break Err(line);
            }
        };
        match outcome {
            Ok(idx) => Ok(Some(idx)),
            Err(line) => {
                tracing::warn!(file = %path.display(), line, "damaged index, rebuilding it from the Maildir");
                Ok(None)
            }
        }
    }

    /// Parses index data; `Err(line)` names the first bad line.
    #[cfg(test)]
    pub(crate) fn parse(data: &[u8]) -> Result<Self, usize> {
        let mut p = Parser::new(data.len() as u64, None);
        let complete_len = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        p.idx.torn = complete_len != data.len();
        if complete_len > 0 {
            for (i, line) in data[..complete_len - 1].split(|&b| b == b'\n').enumerate() {
                let line = std::str::from_utf8(line).map_err(|_| i + 1)?;
                p.line(i + 1, line)?;
            }
        }
        p.finish()
    }
}

/// Replays an index line by line.
struct Parser {
    idx: Index,
    have_magic: bool,
    have_header: bool,
    /// 0: snapshot mails, 1: retained log, 2: lines appended after the snapshot.
    section: u8,
    /// Mails marked gone by appended expunges, swept out at the end.
    gone: usize,
    /// Stamps that make the snapshot trusted (`None`: always read full mails).
    trusted: Option<Stamps>,
    /// Mails go to `known` (decided at the first mail line, after the stamps line).
    lean: Option<bool>,
    /// Expected size of the file, for the vector.
    len: u64,
}

impl Parser {
    /// A parser for a file of `len` bytes (to size the mail vector once).
    fn new(len: u64, trusted: Option<Stamps>) -> Self {
        Self {
            idx: Index::default(),
            have_magic: false,
            have_header: false,
            section: 0,
            gone: 0,
            trusted,
            lean: None,
            len,
        }
    }

    /// Whether mails go to `known`; sizes the vector on first use.
    fn lean(&mut self) -> bool {
        if let Some(l) = self.lean {
            return l;
        }
        let lean = self.trusted.is_some() && self.idx.stamps != self.trusted;
        // Mail lines are 60 to 100 bytes: room for most without growing, trimmed at the end.
        let n = (self.len / 72) as usize;
        if lean {
            self.idx.known.reserve_exact(n)
        } else {
            self.idx.mails.reserve_exact(n)
        }
        self.lean = Some(lean);
        lean
    }

    /// One line (without its LF); `Err(n)` if it is bad.
    fn line(&mut self, n: usize, line: &str) -> Result<(), usize> {
        if !self.have_magic {
            self.have_magic = line == MAGIC;
            return if self.have_magic { Ok(()) } else { Err(1) };
        }
        let section = self.section;
        let (kind, rest) = line.split_once(' ').ok_or(n)?;
        let lean = if matches!(kind, "m" | "e") { self.lean() } else { false };
        let idx = &mut self.idx;
        match kind {
            "H" => {
                idx.header = parse_header(rest).ok_or(n)?;
                self.have_header = true;
                idx.appended += usize::from(section == 2);
            }
            "S" => {
                let v: Vec<&str> = rest.split(' ').collect();
                if v.len() != 4 {
                    return Err(n);
                }
                let s = |i: usize| Stamp::decode(v[i]).map_err(|()| n);
                idx.stamps = Some(Stamps { uidlist: s(0)?, new: s(1)?, cur: s(2)?, keywords: s(3)? });
            }
            "K" => {
                let (id, name) = rest.split_once(' ').ok_or(n)?;
                let id: usize = id.parse().map_err(|_| n)?;
                let kw = Keyword::new(name).map_err(|_| n)?;
                if id != idx.extra_keywords.len() || id >= crate::store::MAX_MAILBOX_KEYWORDS {
                    return Err(n);
                }
                idx.extra_keywords.push(kw);
                idx.appended += usize::from(section == 2);
            }
            "m" | "e" => {
                let with_extras = kind == "e";
                let mut it = rest.splitn(if with_extras { 6 } else { 5 }, ' ');
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
                    g => Some(Box::from(g.strip_prefix('G').ok_or(n)?)),
                };
                let extras =
                    if with_extras { parse_ids(next()?, idx.extra_keywords.len()).ok_or(n)? } else { Box::default() };
                let file = next()?;
                if uid == 0 || file.is_empty() || file.len() > MAX_NAME {
                    return Err(n);
                }
                if section == 1 {
                    return Err(n);
                }
                idx.appended += usize::from(section == 2);
                if lean {
                    let line = MailLine { uid, modseq, in_new, guid_ext: guid_ext.as_deref(), file, extras: &extras };
                    let k = KnownMail::from_line(&line, &mut idx.known_extras);
                    self.gone -= usize::from(place(&mut idx.known, k, |k| (k.uid, k.gone), section, n)?);
                } else {
                    let m =
                        IndexedMail::new(uid, modseq, in_new, guid_ext, file, &mut idx.names, extras).map_err(|_| n)?;
                    self.gone -= usize::from(place(&mut idx.mails, m, |k| (k.uid, k.gone), section, n)?);
                }
            }
            "f" => {
                if section == 0 {
                    return Err(n);
                }
                idx.appended += usize::from(section == 2);
                let v: Vec<&str> = rest.split(' ').collect();
                if v.len() != 6 && v.len() != 8 {
                    return Err(n);
                }
                let hex8 = |s: &str| u8::from_str_radix(s, 16).map_err(|_| n);
                let hex32 = |s: &str| u32::from_str_radix(s, 16).map_err(|_| n);
                let known = idx.extra_keywords.len();
                let ids = |i: usize| v.get(i).map_or(Some(Box::default()), |s| parse_ids(s, known)).ok_or(n);
                idx.log.push_back(LogEntry::Flags {
                    modseq: v[0].parse().map_err(|_| n)?,
                    uid: v[1].parse().map_err(|_| n)?,
                    added: Flags::from_bits_truncate(hex8(v[2])?),
                    removed: Flags::from_bits_truncate(hex8(v[3])?),
                    kw_added: hex32(v[4])?,
                    kw_removed: hex32(v[5])?,
                    extra: ExtraChange::boxed(ids(6)?, ids(7)?),
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
                // Marked, not removed: removing shifts every later mail, once per expunge.
                if let Ok(i) = idx.mails.binary_search_by_key(&uid, |x| x.uid)
                    && !idx.mails[i].gone
                {
                    idx.mails[i].gone = true;
                    self.gone += 1;
                }
                if let Ok(i) = idx.known.binary_search_by_key(&uid, |x| x.uid)
                    && !idx.known[i].gone
                {
                    idx.known[i].gone = true;
                    self.gone += 1;
                }
            }
            "--" if rest == "log" && section == 0 => self.section = 1,
            "--" if rest == "end" && section == 1 => self.section = 2,
            _ => return Err(n),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Index, usize> {
        if !self.have_magic || !self.have_header {
            return Err(1);
        }
        if self.gone > 0 {
            self.idx.mails.retain(|m| !m.gone);
            self.idx.known.retain(|m| !m.gone);
        }
        self.idx.mails.shrink_to_fit();
        self.idx.known.shrink_to_fit();
        Ok(self.idx)
    }
}

/// Puts a mail line's mail into `mails` (UID order): appended at the end in the snapshot
/// section (where UIDs must ascend), upserted after it. Returns whether it replaced a mail
/// marked gone.
fn place<M: Copy>(
    mails: &mut SpillVec<M>,
    m: M,
    key: impl Fn(&M) -> (u32, bool),
    section: u8,
    n: usize,
) -> Result<bool, usize> {
    let uid = key(&m).0;
    if section == 0 {
        if mails.last().is_some_and(|l| key(l).0 >= uid) {
            return Err(n);
        }
        mails.push(m);
        return Ok(false);
    }
    match mails.binary_search_by_key(&uid, |x| key(x).0) {
        Ok(i) => {
            let was_gone = key(&mails[i]).1;
            mails[i] = m;
            Ok(was_gone)
        }
        // Appended mails are new ones, above all others: nothing shifts.
        Err(i) => {
            mails.insert(i, m);
            Ok(false)
        }
    }
}

/// The header an index ends with (appends add a header line after every change, and the last
/// one wins), without parsing the rest. `None` when there is no index, or it is damaged at
/// either end (no magic line, a torn last line, no header line).
pub(crate) fn read_last_header(dir: &Path) -> StoreResult<Option<Header>> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join(NAME);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::store::StoreError::io("open", &path, e)),
    };
    let len = f.metadata().ctx("fstat", &path)?.len();
    let mut head = vec![0u8; MAGIC.len() + 1];
    if len < head.len() as u64 {
        return Ok(None);
    }
    f.read_exact_at(&mut head, 0).ctx("read", &path)?;
    if head[..MAGIC.len()] != *MAGIC.as_bytes() || head[MAGIC.len()] != b'\n' {
        return Ok(None);
    }
    // The last header line is near the end (appends write one after every change): read a
    // growing tail, not the whole file, which for a large mailbox is megabytes.
    let mut window = 4096u64;
    loop {
        let start = len.saturating_sub(window);
        let mut data = vec![0u8; (len - start) as usize];
        f.read_exact_at(&mut data, start).ctx("read", &path)?;
        if data.last() != Some(&b'\n') {
            return Ok(None); // torn
        }
        let mut end = data.len() - 1; // the LF that ends the current line
        // (A line without a LF before it may start before the window: the next round sees it.)
        while let Some(lf) = data[..end].iter().rposition(|&b| b == b'\n') {
            let line = &data[lf + 1..end];
            if let Some(rest) = line.strip_prefix(b"H ") {
                return Ok(std::str::from_utf8(rest).ok().and_then(parse_header));
            }
            if line == b"-- end" {
                // Nothing appended since the snapshot: its header is the second line.
                return snapshot_header(&f, &path);
            }
            end = lf;
        }
        if start == 0 {
            // The whole file: its first line is the magic line, not a header.
            return Ok(None);
        }
        window = window.saturating_mul(8);
    }
}

/// The header of a snapshot: the line after the magic line.
fn snapshot_header(f: &File, path: &Path) -> StoreResult<Option<Header>> {
    use std::os::unix::fs::FileExt as _;
    let mut head = vec![0u8; 1024];
    let n = f.read_at(&mut head, 0).ctx("read", path)?;
    let mut lines = head[..n].split(|&b| b == b'\n');
    let _magic = lines.next();
    Ok(lines
        .next()
        .and_then(|l| l.strip_prefix(b"H "))
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .and_then(parse_header))
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
            "P" => h.peer_modseq = v.parse().ok()?,
            "L" => {
                h.history_lost = match v {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some(h)
}

/// Renders a header line. `L1` and `P` are written only when set, so that an index without
/// them stays readable by mailreplica versions from before them.
pub(crate) fn header_line(h: &Header) -> String {
    format!(
        "H V{} G{} N{} M{} F{} R{} Y{}{}{}\n",
        h.uid_validity,
        h.guid.map_or_else(|| "-".to_owned(), |g| g.to_string()),
        h.next_uid,
        h.highest_modseq,
        h.log_floor,
        h.first_recent_uid,
        h.replicated_modseq,
        if h.history_lost { " L1" } else { "" },
        if h.peer_modseq != 0 { format!(" P{}", h.peer_modseq) } else { String::new() }
    )
}

/// Renders a keyword-table line.
pub(crate) fn keyword_line(id: usize, kw: &Keyword) -> String {
    format!("K {id} {kw}\n")
}

/// A mail as an index line describes it, borrowed from wherever the mail is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailLine<'a> {
    pub(crate) uid: u32,
    pub(crate) modseq: Modseq,
    pub(crate) in_new: bool,
    pub(crate) guid_ext: Option<&'a str>,
    pub(crate) file: &'a str,
    pub(crate) extras: &'a [u16],
}

/// Appends a mail line to `out`.
pub(crate) fn push_mail_line(out: &mut String, m: &MailLine<'_>) {
    use std::fmt::Write as _;
    let kind = if m.extras.is_empty() { 'm' } else { 'e' };
    let _ = write!(out, "{kind} {} {}", m.uid, m.modseq);
    out.push_str(if m.in_new { " n " } else { " c " });
    match m.guid_ext {
        Some(g) => {
            out.push('G');
            out.push_str(g);
        }
        None => out.push('-'),
    }
    out.push(' ');
    if !m.extras.is_empty() {
        push_ids(out, m.extras);
        out.push(' ');
    }
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
        LogEntry::Flags { modseq, uid, added, removed, kw_added, kw_removed, extra } => {
            let mut s = format!("f {modseq} {uid} {:x} {:x} {kw_added:x} {kw_removed:x}", added.bits(), removed.bits());
            if let Some(x) = extra {
                s.push(' ');
                push_ids(&mut s, &x.added);
                s.push(' ');
                push_ids(&mut s, &x.removed);
            }
            s.push('\n');
            s
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
    extra_keywords: &[Keyword],
    mails: &mut dyn Iterator<Item = MailLine<'_>>,
    log: &mut ChangeLog,
    messages: usize,
) -> StoreResult<Modseq> {
    let keep = LOG_KEEP_MIN.max(messages);
    let mut floor = header.log_floor;
    while log.len() > keep {
        if let Some(modseq) = log.pop_front() {
            floor = floor.max(modseq);
        }
    }
    let mut h = *header;
    h.log_floor = floor;
    // Written in chunks: at 200,000 mails the whole text would be 25 MiB.
    const CHUNK: usize = 1 << 16;
    let tmp: PathBuf = dir.join(TMP_NAME);
    fsutil::replace_file_with(&tmp, &dir.join(NAME), 0o600, |f| {
        let mut data = String::with_capacity(CHUNK + 4096);
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
        for (id, kw) in extra_keywords.iter().enumerate() {
            data.push_str(&keyword_line(id, kw));
        }
        for m in mails {
            push_mail_line(&mut data, &m);
            if data.len() >= CHUNK {
                f.write_all(data.as_bytes())?;
                data.clear();
            }
        }
        data.push_str("-- log\n");
        for e in log.iter() {
            data.push_str(&log_line(&e));
            if data.len() >= CHUNK {
                f.write_all(data.as_bytes())?;
                data.clear();
            }
        }
        data.push_str("-- end\n");
        f.write_all(data.as_bytes())
    })?;
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
            history_lost: false,
            peer_modseq: 9,
        };
        let mut names = Names::default();
        let mails = [
            IndexedMail::new(1, 2, false, None, "a,S=1:2,S", &mut names, Box::default()).unwrap(),
            IndexedMail::new(2, 5, true, Some("g2".into()), "b", &mut names, Box::default()).unwrap(),
        ];
        let mut log = ChangeLog::default();
        log.push_back(LogEntry::Flags {
            modseq: 2,
            uid: 1,
            added: Flags::SEEN,
            removed: Flags::NONE,
            kw_added: 0,
            kw_removed: 0,
            extra: None,
        });
        write_snapshot(
            dir.path(),
            &h,
            Some(&Stamps::default()),
            &[],
            &mut mails.iter().map(|m| m.line(&names)),
            &mut log,
            2,
        )
        .unwrap();
        let mut ap = Appender::open(dir.path()).unwrap();
        ap.append(&log_line(&LogEntry::Expunge { modseq: 6, uid: 2, guid: Guid128([2; 16]) })).unwrap();
        ap.append(&mail_line(&MailLine {
            uid: 3,
            modseq: 7,
            in_new: false,
            guid_ext: None,
            file: "c with space:2,",
            extras: &[],
        }))
        .unwrap();
        let mut h2 = h;
        h2.highest_modseq = 7;
        ap.append(&header_line(&h2)).unwrap();
        ap.sync().unwrap();
        let idx = Index::read(dir.path(), None).unwrap().unwrap();
        assert_eq!(idx.header.highest_modseq, 7);
        assert_eq!(idx.mails.iter().map(|m| m.uid).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(idx.mails[1].file(&idx.names), "c with space:2,");
        assert_eq!(idx.log.len(), 2);
        assert_eq!(idx.appended, 3);
        assert!(!idx.torn);
        assert!(!idx.header.history_lost);
        assert!(!std::fs::read_to_string(dir.path().join(NAME)).unwrap().contains(" L"), "no L key unless lost");
    }

    #[test]
    fn history_lost_flag_and_old_headers() {
        let mut h = Header { uid_validity: 1, next_uid: 1, highest_modseq: 2, log_floor: 2, ..Header::default() };
        // An index written before the flag existed reads as "not lost".
        let old = Index::parse(b"mailreplica-index 1\nH V1 G- N1 M2 F2 R1 Y0\n-- log\n-- end\n").unwrap();
        assert!(!old.header.history_lost);
        h.history_lost = true;
        let line = header_line(&h);
        assert!(line.ends_with(" L1\n"), "{line}");
        let data = format!("mailreplica-index 1\n{line}-- log\n-- end\n");
        assert!(Index::parse(data.as_bytes()).unwrap().header.history_lost);
        // A later header line without the key clears it (the last header wins).
        h.history_lost = false;
        let data = format!("{data}{}", header_line(&h));
        assert!(!Index::parse(data.as_bytes()).unwrap().header.history_lost);
        assert!(Index::parse(b"mailreplica-index 1\nH V1 G- N1 M2 F2 R1 L2\n").is_err());
        assert_eq!(rebuilt_modseq(false), 1);
        assert_eq!(rebuilt_modseq(true), 2);
    }

    #[test]
    fn extra_keywords_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let kws: Vec<Keyword> = (0..3).map(|i| Keyword::new(&format!("extra{i}")).unwrap()).collect();
        let h = Header { uid_validity: 1, next_uid: 3, highest_modseq: 4, log_floor: 1, ..Header::default() };
        let mut names = Names::default();
        let mails =
            [IndexedMail::new(2, 3, false, None, "x y:2,Sa", &mut names, vec![2, 0].into_boxed_slice()).unwrap()];
        let mut log = ChangeLog::default();
        log.push_back(LogEntry::Flags {
            modseq: 3,
            uid: 2,
            added: Flags::NONE,
            removed: Flags::NONE,
            kw_added: 1,
            kw_removed: 0,
            extra: ExtraChange::boxed(vec![2, 0].into_boxed_slice(), Box::default()),
        });
        write_snapshot(dir.path(), &h, None, &kws, &mut mails.iter().map(|m| m.line(&names)), &mut log, 1).unwrap();
        let mut ap = Appender::open(dir.path()).unwrap();
        ap.append(&keyword_line(3, &Keyword::new("late").unwrap())).unwrap();
        ap.append(&log_line(&LogEntry::Flags {
            modseq: 5,
            uid: 2,
            added: Flags::NONE,
            removed: Flags::NONE,
            kw_added: 0,
            kw_removed: 0,
            extra: ExtraChange::boxed(vec![3].into_boxed_slice(), vec![2].into_boxed_slice()),
        }))
        .unwrap();
        ap.sync().unwrap();
        let idx = Index::read(dir.path(), None).unwrap().unwrap();
        assert_eq!(
            idx.extra_keywords.iter().map(Keyword::as_str).collect::<Vec<_>>(),
            ["extra0", "extra1", "extra2", "late"]
        );
        assert_eq!(idx.mails[0].extras(&idx.names), &[2, 0]);
        assert_eq!(idx.mails[0].file(&idx.names), "x y:2,Sa");
        assert_eq!((idx.mails[0].flags, idx.mails[0].kw), (Flags::SEEN, 1));
        assert_eq!(idx.log.len(), 2);
        assert!(matches!(idx.log.get(1), Some(LogEntry::Flags { extra: Some(x), .. })
            if *x.added == [3] && *x.removed == [2]));
        // A reference to a keyword id that the table does not have is damage.
        assert!(Index::parse(b"mailreplica-index 1\nH V1 G- N1 M1 F1 R1\ne 1 1 c - 0 f\n").is_err());
        assert!(Index::parse(b"mailreplica-index 1\nH V1 G- N1 M1 F1 R1\nK 1 skipped\n").is_err());
    }

    #[test]
    fn an_untrusted_snapshot_is_read_for_a_merge() {
        let dir = tempfile::tempdir().unwrap();
        let h = Header { uid_validity: 1, next_uid: 4, highest_modseq: 5, log_floor: 1, ..Header::default() };
        let stamps = Stamps { uidlist: Some(Stamp::default()), ..Stamps::default() };
        let mut names = Names::default();
        let mails = [
            IndexedMail::new(1, 2, false, None, "a,S=1:2,S", &mut names, Box::default()).unwrap(),
            IndexedMail::new(2, 3, true, Some("g2".into()), "b", &mut names, vec![0].into_boxed_slice()).unwrap(),
        ];
        let kws = [Keyword::new("x").unwrap()];
        let mut log = ChangeLog::default();
        write_snapshot(dir.path(), &h, Some(&stamps), &kws, &mut mails.iter().map(|m| m.line(&names)), &mut log, 2)
            .unwrap();
        let mut ap = Appender::open(dir.path()).unwrap();
        ap.append(&log_line(&LogEntry::Expunge { modseq: 6, uid: 1, guid: Guid128([1; 16]) })).unwrap();
        let c = IndexedMail::new(3, 7, false, None, "c:2,F", &mut names, Box::default()).unwrap();
        ap.append(&mail_line(&c.line(&names))).unwrap();
        ap.sync().unwrap();
        let trusted = Index::read(dir.path(), Some(&stamps)).unwrap().unwrap();
        assert_eq!(trusted.mails.iter().map(|m| m.uid).collect::<Vec<_>>(), [2, 3]);
        assert!(trusted.known.is_empty());
        let other = Stamps { new: Some(Stamp::default()), ..stamps };
        let merge = Index::read(dir.path(), Some(&other)).unwrap().unwrap();
        assert!(merge.mails.is_empty());
        let extras = |k: &KnownMail| k.extras.checked_sub(1).map_or(&[][..], |i| &*merge.known_extras[i as usize]);
        let k: Vec<(u32, u64, Guid128, &[u16], Flags)> =
            merge.known.iter().map(|k| (k.uid, k.modseq, k.guid128, extras(k), k.flags)).collect();
        assert_eq!(
            k,
            [
                (2, 3, Guid128::from_mail_guid("g2"), &[0u16][..], Flags::NONE),
                (3, 7, Guid128::from_mail_guid("c"), &[][..], Flags::FLAGGED)
            ]
        );
        assert_eq!(merge.known[0].ident, mail_ident("b:2,S", Some("g2")));
        assert_ne!(merge.known[0].ident, mail_ident("b", None));
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
        // A header far from the end is found too (the tail read grows), and none is none.
        let many: String = (1..20_000).map(|u| format!("m {u} 1 c - file{u}\n")).collect();
        std::fs::write(&p, format!("mailreplica-index 1\nH V1 G- N7 M1 F1 R1\n{many}")).unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap().unwrap().next_uid, 7);
        std::fs::write(&p, format!("mailreplica-index 1\n{many}")).unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap(), None);
        // A snapshot with nothing appended: the header is its second line (and only that is
        // read, not the mails between).
        std::fs::write(&p, format!("mailreplica-index 1\nH V1 G- N8 M1 F1 R1\n{many}-- log\n-- end\n")).unwrap();
        assert_eq!(read_last_header(dir.path()).unwrap().unwrap().next_uid, 8);
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
