//! One open Maildir mailbox.
//!
//! Opening takes an exclusive `flock` on the mailbox directory (so two mailreplica processes
//! never update the same index at once; Dovecot does not use it and is not blocked), then
//! either trusts the index snapshot (when `dovecot-uidlist`, `new/`, `cur/` and
//! `dovecot-keywords` are unchanged since it was written) or scans the Maildir, gives files
//! without a UID their UIDs the way Dovecot would, and turns every difference from the index
//! into a change with a new modseq.
//!
//! Saving follows the durability order of the Maildir spec and Dovecot: write and fdatasync
//! the file in `tmp/`; take `dovecot-uidlist.lock`; rename into `new/` or `cur/` (never
//! replacing an existing name); fsync those directories once per batch; append the UIDs to the
//! uidlist and fdatasync it; unlock; then note the change in our index.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{AT_FDCWD, Flock, FlockArg, RenameFlags, renameat2};

use super::filename::{self, KeywordMask};
use super::fsutil::{self, Stamp};
use super::index::{self, Header, Index, IndexedMail, LogEntry, Stamps};
use super::keywords::KeywordMap;
use super::uidlist::{self, Record, Uidlist};
use super::{Ctx, dotlock::Dotlock, uidvalidity};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{
    Change, FlagOp, Flags, Guid128, Keyword, MailGuid, MailRecord, Mailbox, MailboxName, MailboxStatus, MailboxUpdate,
    Modseq, SaveRequest, SavedMail, StoreError, Uid, UnixTime,
};

/// A directory whose mtime is this close to "now" may still change within the same timestamp
/// tick, so a snapshot taken from it is not trusted without a rescan.
const FRESH: Duration = Duration::from_secs(2);

/// One mail in memory.
#[derive(Debug, Clone)]
struct Mail {
    uid: u32,
    modseq: Modseq,
    in_new: bool,
    guid_ext: Option<String>,
    file: String,
    flags: Flags,
    kw: KeywordMask,
}

impl Mail {
    fn from_indexed(m: IndexedMail) -> Self {
        let (flags, kw) = filename::parse_flags(&m.file);
        Self { uid: m.uid, modseq: m.modseq, in_new: m.in_new, guid_ext: m.guid_ext, file: m.file, flags, kw }
    }

    fn to_indexed(&self) -> IndexedMail {
        IndexedMail {
            uid: self.uid,
            modseq: self.modseq,
            in_new: self.in_new,
            guid_ext: self.guid_ext.clone(),
            file: self.file.clone(),
        }
    }

    fn guid(&self) -> &str {
        self.guid_ext.as_deref().unwrap_or_else(|| filename::base(&self.file))
    }
}

/// A mail written to `tmp/` and waiting for [`Mailbox::commit`].
#[derive(Debug)]
struct Pending {
    tmp: PathBuf,
    file: File,
    /// Base name with size fields.
    base: String,
    /// The GUID to record in the uidlist when it is not the base name.
    guid_ext: Option<String>,
    requested: Option<Uid>,
    flags: Flags,
    keywords: Vec<Keyword>,
    min_modseq: Modseq,
    /// For a staged move: the UID the mail leaves at commit.
    move_from: Option<Uid>,
}

/// An open Maildir mailbox.
#[derive(Debug)]
pub struct MaildirMailbox {
    name: MailboxName,
    dir: PathBuf,
    ctx: Arc<Ctx>,
    _lock: Flock<File>,
    file_mode: u32,
    uid_validity: u32,
    guid: Guid128,
    next_uid: u32,
    keywords: KeywordMap,
    mails: Vec<Mail>,
    header: Header,
    log: VecDeque<LogEntry>,
    appender: Option<index::Appender>,
    appended: usize,
    pending: Vec<Pending>,
    dirs_dirty: bool,
    /// The one modseq of an import in progress ([`Mailbox::begin_import`]).
    import_modseq: Option<Modseq>,
}

fn is_fresh(s: Option<Stamp>) -> bool {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128;
    s.is_some_and(|s| now - s.mtime_ns < FRESH.as_nanos() as i128)
}

/// Files found in `new/` and `cur/`, by base name.
type DirScan = HashMap<String, (bool, String)>;

fn scan_dirs(dir: &Path) -> StoreResult<DirScan> {
    let mut out = HashMap::new();
    for (sub, in_new) in [("new", true), ("cur", false)] {
        let d = dir.join(sub);
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && in_new => continue,
            Err(e) => return Err(StoreError::io("opendir", &d, e)),
        };
        for e in rd {
            let e = e.ctx("readdir", &d)?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(dir = %d.display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let base = filename::base(name).to_owned();
            // A file seen in both (moved new -> cur during our scan): cur wins.
            if in_new || !out.contains_key(&base) || out.get(&base).is_some_and(|(n, _)| *n) {
                out.insert(base, (in_new, name.to_owned()));
            }
        }
    }
    Ok(out)
}

impl MaildirMailbox {
    /// Opens the mailbox stored in `dir`.
    pub(crate) fn open(ctx: Arc<Ctx>, name: MailboxName, dir: PathBuf) -> StoreResult<Self> {
        let cur = dir.join("cur");
        let meta = match fs::metadata(&cur) {
            Ok(m) if m.is_dir() => m,
            Ok(_) => return Err(StoreError::MailboxNotFound(name.join(ctx.sep))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MailboxNotFound(name.join(ctx.sep)));
            }
            Err(e) => return Err(StoreError::io("stat", cur, e)),
        };
        for sub in ["new", "tmp"] {
            let p = dir.join(sub);
            match fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("mkdir", p, e)),
            }
        }
        let dirf = File::open(&dir).ctx("open", &dir)?;
        let lock = Flock::lock(dirf, FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::io("flock", &dir, io::Error::from(e)))?;
        let file_mode = meta.permissions().mode() & 0o666;
        let mut mb = Self {
            name,
            dir,
            ctx,
            _lock: lock,
            file_mode: if file_mode == 0 { 0o600 } else { file_mode },
            uid_validity: 0,
            guid: Guid128::EMPTY,
            next_uid: 1,
            keywords: KeywordMap::default(),
            mails: Vec::new(),
            header: Header::default(),
            log: VecDeque::new(),
            appender: None,
            appended: 0,
            pending: Vec::new(),
            dirs_dirty: false,
            import_modseq: None,
        };
        mb.load()?;
        Ok(mb)
    }

    /// The mailbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current_stamps(&self) -> StoreResult<Stamps> {
        Ok(Stamps {
            uidlist: Stamp::read(&self.dir.join(uidlist::NAME))?,
            new: Stamp::read(&self.dir.join("new"))?,
            cur: Stamp::read(&self.dir.join("cur"))?,
            keywords: Stamp::read(&self.dir.join(super::keywords::NAME))?,
        })
    }

    /// Loads state from the index, or scans the Maildir when the index cannot be trusted.
    fn load(&mut self) -> StoreResult<()> {
        self.appender = None;
        let stamps = self.current_stamps()?;
        let old = Index::read(&self.dir)?;
        if let Some(old) = &old {
            let valid = old.stamps == Some(stamps)
                && !old.torn
                && old.header.uid_validity != 0
                && old.header.guid.is_some()
                && stamps.uidlist.is_some();
            if valid {
                self.keywords = KeywordMap::read(&self.dir)?;
                self.header = old.header;
                self.uid_validity = old.header.uid_validity;
                self.guid = old.header.guid.unwrap_or_default();
                self.next_uid = old.header.next_uid;
                self.mails = old.mails.iter().cloned().map(Mail::from_indexed).collect();
                self.log = old.log.clone();
                self.appended = old.appended;
                self.warn_unnamed_keywords();
                return Ok(());
            }
        }
        self.full_scan(old, stamps)
    }

    fn warn_unnamed_keywords(&self) {
        let all = self.mails.iter().fold(0, |m, x| m | x.kw);
        let unnamed = self.keywords.unnamed(all);
        if unnamed != 0 {
            let letters: String = (0..26u8).filter(|i| unnamed & (1 << i) != 0).map(|i| char::from(b'a' + i)).collect();
            tracing::warn!(
                mailbox = %self.dir.display(),
                letters,
                "keyword letters without a name in dovecot-keywords; shown as unknown-N, as Dovecot shows them"
            );
        }
    }

    fn full_scan(&mut self, old: Option<Index>, stamps_before: Stamps) -> StoreResult<()> {
        let mut stamps = stamps_before;
        let mut list = Uidlist::read(&self.dir)?;
        let mut files = scan_dirs(&self.dir)?;
        let needs_lock = match &list {
            None => true,
            Some(l) => {
                let known: std::collections::HashSet<&str> = l.records.iter().map(|r| r.base.as_str()).collect();
                l.guid.is_none() || l.version != 3 || files.keys().any(|b| !known.contains(b.as_str()))
            }
        };
        if needs_lock {
            let lock = Dotlock::acquire(&self.dir.join(uidlist::NAME), &self.ctx.hostname, self.ctx.lock_wait)?;
            stamps.new = Stamp::read(&self.dir.join("new"))?;
            stamps.cur = Stamp::read(&self.dir.join("cur"))?;
            list = Uidlist::read(&self.dir)?;
            files = scan_dirs(&self.dir)?;
            let l = self.fix_uidlist(list.take(), &files, old.as_ref())?;
            stamps.uidlist = l.stamp;
            list = Some(l);
            lock.release()?;
        }
        let list = list.ok_or_else(|| StoreError::corrupt(self.dir.join(uidlist::NAME), None, "missing"))?;
        self.keywords = KeywordMap::read(&self.dir)?;
        stamps.keywords = self.keywords.stamp;
        self.uid_validity = list.uid_validity;
        self.guid = list.guid.unwrap_or_default();
        self.next_uid = list.next_uid();

        // Files listed in the uidlist, in UID order.
        let mut current: Vec<Mail> = Vec::with_capacity(list.records.len());
        for r in list.records {
            if let Some((in_new, file)) = files.remove(&r.base) {
                let (flags, kw) = filename::parse_flags(&file);
                current.push(Mail { uid: r.uid, modseq: 0, in_new, guid_ext: r.guid, file, flags, kw });
            }
        }

        let old = old.filter(|o| o.header.uid_validity == self.uid_validity && o.header.guid == Some(self.guid));
        match old {
            Some(old) => {
                let mut header = old.header;
                let mut log = old.log;
                let mut hms = header.highest_modseq;
                let mut oi = old.mails.into_iter().peekable();
                for m in &mut current {
                    // Mails the index knew but that are gone: expunged behind our back.
                    while let Some(o) = oi.next_if(|o| o.uid < m.uid) {
                        hms += 1;
                        let guid = o.guid_ext.as_deref().unwrap_or_else(|| filename::base(&o.file));
                        log.push_back(LogEntry::Expunge {
                            modseq: hms,
                            uid: o.uid,
                            guid: Guid128::from_mail_guid(guid),
                        });
                    }
                    match oi.next_if(|o| o.uid == m.uid) {
                        Some(o) if filename::base(&o.file) == filename::base(&m.file) && o.guid_ext == m.guid_ext => {
                            let (of, okw) = filename::parse_flags(&o.file);
                            if (of, okw) == (m.flags, m.kw) {
                                m.modseq = o.modseq;
                            } else {
                                hms += 1;
                                m.modseq = hms;
                                log.push_back(LogEntry::Flags {
                                    modseq: hms,
                                    uid: m.uid,
                                    added: m.flags & !of,
                                    removed: of & !m.flags,
                                    kw_added: m.kw & !okw,
                                    kw_removed: okw & !m.kw,
                                });
                            }
                        }
                        Some(o) => {
                            // Same UID, different file: the old mail is gone, this one is new.
                            hms += 1;
                            let guid = o.guid_ext.as_deref().unwrap_or_else(|| filename::base(&o.file));
                            log.push_back(LogEntry::Expunge {
                                modseq: hms,
                                uid: o.uid,
                                guid: Guid128::from_mail_guid(guid),
                            });
                            hms += 1;
                            m.modseq = hms;
                        }
                        None => {
                            hms += 1;
                            m.modseq = hms;
                        }
                    }
                }
                for o in oi {
                    hms += 1;
                    let guid = o.guid_ext.as_deref().unwrap_or_else(|| filename::base(&o.file));
                    log.push_back(LogEntry::Expunge { modseq: hms, uid: o.uid, guid: Guid128::from_mail_guid(guid) });
                }
                header.highest_modseq = hms;
                self.header = header;
                self.log = log;
            }
            None => {
                let fresh_mailbox = current.is_empty() && self.next_uid == 1;
                let base = if fresh_mailbox { 1 } else { index::rebuild_modseq_base() };
                for m in &mut current {
                    m.modseq = base;
                }
                self.header = Header {
                    uid_validity: self.uid_validity,
                    guid: Some(self.guid),
                    next_uid: self.next_uid,
                    highest_modseq: base,
                    log_floor: base,
                    // As in a rebuilt Dovecot index: only a session that takes \Recent raises
                    // it. (Starting at the first mail in new/ made it differ from the master's
                    // for good, and dsync's CHANGED mode then never skipped the mailbox.)
                    first_recent_uid: 1,
                    replicated_modseq: 0,
                };
                self.log = VecDeque::new();
            }
        }
        self.header.uid_validity = self.uid_validity;
        self.header.guid = Some(self.guid);
        self.header.next_uid = self.next_uid;
        self.mails = current;
        let trusted = ![stamps.new, stamps.cur, stamps.uidlist, stamps.keywords].into_iter().any(is_fresh);
        self.write_snapshot(if trusted { Some(stamps) } else { None })?;
        self.warn_unnamed_keywords();
        Ok(())
    }

    /// Under the uidlist lock: creates a missing uidlist, adds a missing mailbox GUID, and
    /// gives UIDs to files that have none, in Dovecot's order.
    fn fix_uidlist(&self, list: Option<Uidlist>, files: &DirScan, old: Option<&Index>) -> StoreResult<Uidlist> {
        let (mut list, mut rewrite) = match list {
            Some(l) => {
                let rw = l.version != 3;
                (l, rw)
            }
            None => {
                // No uidlist: keep our index's identity if we have one (so replicas keep
                // recognising the mailbox), else start a new one.
                let (uv, guid, next) = match old {
                    Some(o) if o.header.uid_validity != 0 => (
                        o.header.uid_validity,
                        o.header.guid.unwrap_or_else(Guid128::generate),
                        o.header.next_uid.max(1),
                    ),
                    _ => (uidvalidity::next(&self.ctx.root)?, Guid128::generate(), 1),
                };
                let mut l = Uidlist::new(uv, guid);
                l.header_next_uid = next;
                (l, true)
            }
        };
        if list.guid.is_none() {
            list.guid = Some(match old {
                Some(o) if o.header.uid_validity == list.uid_validity && o.header.guid.is_some() => {
                    o.header.guid.unwrap_or_default()
                }
                _ => Guid128::generate(),
            });
            rewrite = true;
        }
        let known: std::collections::HashSet<&str> = list.records.iter().map(|r| r.base.as_str()).collect();
        let mut missing: Vec<&str> = files.keys().map(String::as_str).filter(|b| !known.contains(b)).collect();
        missing.sort_by(|a, b| filename::sort_cmp(a, b));
        let new: Vec<Record> = (list.next_uid()..)
            .zip(missing)
            .map(|(uid, base)| Record { uid, base: base.to_owned(), guid: None, other_exts: String::new() })
            .collect();
        if rewrite {
            list.records.extend(new);
            list.rewrite(&self.dir, |r| files.contains_key(&r.base))?;
        } else {
            list.append(&self.dir, new)?;
        }
        Ok(list)
    }

    fn write_snapshot(&mut self, stamps: Option<Stamps>) -> StoreResult<()> {
        let n = self.mails.len();
        let mails = self.mails.iter().map(Mail::to_indexed);
        let floor =
            index::write_snapshot(&self.dir, &self.header, stamps.as_ref(), &mut mails.into_iter(), &mut self.log, n)?;
        self.header.log_floor = floor;
        self.appended = 0;
        self.appender = None;
        Ok(())
    }

    fn append_index(&mut self, lines: &str) -> StoreResult<()> {
        if self.appender.is_none() {
            self.appender = Some(index::Appender::open(&self.dir)?);
        }
        if let Some(a) = &mut self.appender {
            a.append(lines)?;
        }
        self.appended += lines.bytes().filter(|&b| b == b'\n').count();
        Ok(())
    }

    fn find(&self, uid: Uid) -> Option<usize> {
        self.mails.binary_search_by_key(&uid.get(), |m| m.uid).ok()
    }

    fn path_of(&self, m: &Mail) -> PathBuf {
        self.dir.join(if m.in_new { "new" } else { "cur" }).join(&m.file)
    }

    /// After a file was not found where we expected it (Dovecot renamed or moved it), looks it
    /// up again by base name. Returns false if it is gone.
    fn relocate(&mut self, idx: usize) -> StoreResult<bool> {
        let base = filename::base(&self.mails[idx].file).to_owned();
        let files = scan_dirs(&self.dir)?;
        match files.get(&base) {
            Some((in_new, file)) => {
                let m = &mut self.mails[idx];
                m.in_new = *in_new;
                m.file.clone_from(file);
                let (f, kw) = filename::parse_flags(file);
                m.flags = f;
                m.kw = kw;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The modseq of a change: one above HIGHESTMODSEQ (or the import's one modseq), raised
    /// to `min`.
    fn next_modseq(&mut self, min: Modseq) -> Modseq {
        let modseq = self.import_modseq.unwrap_or(self.header.highest_modseq + 1).max(min);
        self.header.highest_modseq = self.header.highest_modseq.max(modseq);
        modseq
    }

    fn record(&self, m: &Mail) -> MailRecord {
        MailRecord {
            uid: Uid::new(m.uid).unwrap_or(Uid::MIN),
            guid: MailGuid::new(m.guid()).unwrap_or_else(|_| MailGuid::new("invalid").expect("valid")),
            flags: m.flags,
            keywords: self.keywords.keywords(m.kw),
            modseq: m.modseq,
            recent: m.in_new,
        }
    }

    fn open_file(&mut self, uid: Uid) -> StoreResult<(File, usize)> {
        let idx = self.find(uid).ok_or(StoreError::MailNotFound(uid.get()))?;
        for attempt in 0..2 {
            let path = self.path_of(&self.mails[idx]);
            match File::open(&path) {
                Ok(f) => return Ok((f, idx)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    if !self.relocate(idx)? {
                        return Err(StoreError::MailNotFound(uid.get()));
                    }
                }
                Err(e) => return Err(StoreError::io("open", path, e)),
            }
        }
        Err(StoreError::MailNotFound(uid.get()))
    }

    /// Takes the uidlist lock and re-reads the uidlist, so that new UIDs are assigned above
    /// everything any writer has assigned.
    fn lock_uidlist(&self) -> StoreResult<(Dotlock, Uidlist)> {
        let lock = Dotlock::acquire(&self.dir.join(uidlist::NAME), &self.ctx.hostname, self.ctx.lock_wait)?;
        let list = Uidlist::read(&self.dir)?.ok_or_else(|| {
            StoreError::corrupt(self.dir.join(uidlist::NAME), None, "disappeared while the mailbox was open")
        })?;
        if list.uid_validity != self.uid_validity || list.guid != Some(self.guid) {
            return Err(StoreError::NotPossible(format!(
                "mailbox {} was recreated by another process while open; retry",
                self.name.join(self.ctx.sep)
            )));
        }
        Ok((lock, list))
    }

    /// Writes a body to `tmp/`, converting line ends exactly as Dovecot does for Maildir
    /// (`mail_save_crlf = no`, its `i_stream_create_lf`): CRLF becomes LF, any other CR is kept,
    /// except a CR that is the very last byte, which Dovecot drops. Returns the file, its size
    /// and its CRLF size.
    fn write_tmp(&self, body: &mut dyn Read) -> StoreResult<(PathBuf, File, u64, u64)> {
        let tmp_name = self.ctx.names.next();
        let tmp = self.dir.join("tmp").join(&tmp_name);
        let file = OpenOptions::new().write(true).create_new(true).mode(self.file_mode).open(&tmp).ctx("open", &tmp)?;
        let result = (|| {
            let mut w = BufWriter::with_capacity(64 * 1024, &file);
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            let mut lfs = 0u64;
            let mut pending_cr = false;
            let mut prev_out: u8 = 0;
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::io("read", "<mail body>", e)),
                };
                let mut out = Vec::with_capacity(n + 1);
                for &b in &buf[..n] {
                    if pending_cr {
                        pending_cr = false;
                        if b != b'\n' {
                            out.push(b'\r');
                        }
                    }
                    if b == b'\r' {
                        pending_cr = true;
                        continue;
                    }
                    out.push(b);
                }
                for &b in &out {
                    if b == b'\n' && prev_out != b'\r' {
                        lfs += 1;
                    }
                    prev_out = b;
                }
                size += out.len() as u64;
                w.write_all(&out).ctx("write", &tmp)?;
            }
            // A CR still pending at the end is dropped, as Dovecot drops it: the same input
            // must give the same file (and the same ,S= and ,W=) through either tool.
            w.flush().ctx("write", &tmp)?;
            Ok((size, size + lfs))
        })();
        match result {
            Ok((size, vsize)) => {
                crate::sys::start_writeback(std::os::fd::AsFd::as_fd(&file));
                Ok((tmp, file, size, vsize))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn discard_pending(&mut self) {
        for p in self.pending.drain(..) {
            let _ = fs::remove_file(&p.tmp);
        }
    }

    fn commit_inner(&mut self) -> StoreResult<Vec<SavedMail>> {
        // 1. Data durable in tmp/ (writeback was started when each file was written).
        for p in &self.pending {
            p.file.sync_data().ctx("fdatasync", &p.tmp)?;
        }
        // 2. Under the uidlist lock: keywords, names, renames, UIDs.
        let (lock, mut list) = self.lock_uidlist()?;
        let mut kwmap = self.read_keywords_for_update()?;
        let all_kw: Vec<Keyword> = self.pending.iter().flat_map(|p| p.keywords.iter().cloned()).collect();
        let (_, kw_changed) = kwmap.mask_for(&all_kw)?;
        if kw_changed {
            kwmap.write(&self.dir)?;
        }
        let mut next = list.next_uid();
        let mut records = Vec::with_capacity(self.pending.len());
        let mut placed: Vec<(usize, Mail)> = Vec::with_capacity(self.pending.len());
        let mut used_new = false;
        let mut used_cur = false;
        let pending = std::mem::take(&mut self.pending);
        let mut renamed: Vec<PathBuf> = Vec::new();
        // UIDs are assigned in ascending order of the UIDs asked for (the uidlist must stay
        // sorted), whatever order the mails were staged in.
        let mut by_uid: Vec<usize> = (0..pending.len()).collect();
        by_uid.sort_by_key(|&i| pending[i].requested.map_or(u64::MAX, |u| u64::from(u.get())));
        let outcome = (|| {
            for &i in &by_uid {
                let p = &pending[i];
                let (kw, _) = kwmap.mask_for(&p.keywords)?;
                let stored = p.flags.stored();
                let in_new = stored.is_empty() && kw == 0;
                let mut base = p.base.clone();
                let mut guid_ext = p.guid_ext.clone();
                let dest = loop {
                    let file = if in_new { base.clone() } else { filename::with_flags(&base, stored, kw) };
                    let dest = self.dir.join(if in_new { "new" } else { "cur" }).join(&file);
                    match renameat2(AT_FDCWD, &p.tmp, AT_FDCWD, &dest, RenameFlags::RENAME_NOREPLACE) {
                        Ok(()) => break file,
                        Err(nix::errno::Errno::EEXIST) => {
                            // The name is taken (the same GUID saved twice): use a fresh name and
                            // keep the GUID in the uidlist.
                            if guid_ext.is_none() {
                                guid_ext = Some(base.clone());
                            }
                            let sizes = base.find(",S=").map(|i| base[i..].to_owned()).unwrap_or_default();
                            base = format!("{}{}", self.ctx.names.next(), sizes);
                        }
                        Err(e) => return Err(StoreError::io("rename", dest, io::Error::from(e))),
                    }
                };
                renamed.push(self.dir.join(if in_new { "new" } else { "cur" }).join(&dest));
                used_new |= in_new;
                used_cur |= !in_new;
                let uid = match p.requested {
                    Some(r) if r.get() >= next => r.get(),
                    _ => next,
                };
                next = uid + 1;
                records.push(Record { uid, base: base.clone(), guid: guid_ext.clone(), other_exts: String::new() });
                let (flags, kwm) = filename::parse_flags(&dest);
                placed.push((i, Mail { uid, modseq: 0, in_new, guid_ext, file: dest, flags, kw: kwm }));
            }
            if used_new {
                fsutil::fsync_dir(&self.dir.join("new"))?;
            }
            if used_cur {
                fsutil::fsync_dir(&self.dir.join("cur"))?;
            }
            list.append(&self.dir, records)?;
            Ok(())
        })();
        if let Err(e) = outcome {
            // Files not yet renamed are removed; renamed ones stay and get UIDs at the next
            // scan (they are complete and fsynced, so nothing half-written is visible).
            for p in &pending {
                let _ = fs::remove_file(&p.tmp);
            }
            drop(lock);
            return Err(e);
        }
        lock.release()?;
        drop(renamed);
        self.keywords = kwmap;
        // 3. Our index: one modseq for the whole commit, or the import's (raised per mail by
        // min_modseq).
        let base_modseq = self.import_modseq.unwrap_or(self.header.highest_modseq + 1);
        let mut lines = String::new();
        let mut saved = Vec::with_capacity(placed.len());
        placed.sort_by_key(|(i, _)| *i);
        for (i, mut m) in placed {
            let p = &pending[i];
            m.modseq = base_modseq.max(p.min_modseq);
            self.header.highest_modseq = self.header.highest_modseq.max(m.modseq);
            lines.push_str(&index::mail_line(&m.to_indexed()));
            saved.push(SavedMail {
                requested: p.requested,
                uid: Uid::new(m.uid).unwrap_or(Uid::MIN),
                guid: MailGuid::new(m.guid())?,
            });
            self.mails.push(m);
        }
        if self.mails.windows(2).any(|w| w[0].uid > w[1].uid) {
            self.mails.sort_by_key(|m| m.uid);
        }
        self.next_uid = list.next_uid();
        self.header.next_uid = self.next_uid;
        lines.push_str(&index::header_line(&self.header));
        self.append_index(&lines)?;
        // Moves: the new instance is durable and has its UID, so the old one can go.
        let moved: Vec<Uid> = pending.iter().filter_map(|p| p.move_from).collect();
        if !moved.is_empty() {
            self.expunge(&moved)?;
        }
        Ok(saved)
    }

    /// Re-reads `dovecot-keywords` (caller holds the uidlist lock) before allocating letters,
    /// reserving the letters our mails carry without a name so that none is reused.
    fn read_keywords_for_update(&self) -> StoreResult<KeywordMap> {
        let mut map = KeywordMap::read(&self.dir)?;
        map.reserve(self.mails.iter().fold(0, |m, x| m | x.kw));
        Ok(map)
    }

    fn keyword_mask_for(&mut self, keywords: &[Keyword]) -> StoreResult<KeywordMask> {
        if let Some(m) = self.keywords.existing_mask(keywords) {
            return Ok(m);
        }
        let (lock, _list) = self.lock_uidlist()?;
        let mut map = self.read_keywords_for_update()?;
        let (mask, changed) = map.mask_for(keywords)?;
        if changed {
            map.write(&self.dir)?;
        }
        lock.release()?;
        self.keywords = map;
        Ok(mask)
    }

    /// Compacts the index if many lines were appended since the last rewrite.
    fn maybe_compact(&mut self) -> StoreResult<()> {
        if self.appended > 1000 && self.appended > self.mails.len() / 4 {
            self.write_snapshot(None)?;
        }
        Ok(())
    }
}

impl Drop for MaildirMailbox {
    fn drop(&mut self) {
        self.discard_pending();
        if let Err(e) = self.maybe_compact() {
            tracing::warn!("compacting {}: {e}", self.dir.display());
        }
    }
}

impl Mailbox for MaildirMailbox {
    fn name(&self) -> &MailboxName {
        &self.name
    }

    fn status(&self) -> MailboxStatus {
        MailboxStatus {
            guid: self.guid,
            uid_validity: self.uid_validity,
            uid_next: self.next_uid,
            messages: self.mails.len() as u32,
            unseen: self.mails.iter().filter(|m| !m.flags.contains(Flags::SEEN)).count() as u32,
            recent: self.mails.iter().filter(|m| m.in_new).count() as u32,
            first_recent_uid: self.header.first_recent_uid.max(1),
            highest_modseq: self.header.highest_modseq,
            replicated_modseq: self.header.replicated_modseq,
        }
    }

    fn mails(&self) -> Vec<MailRecord> {
        self.mails.iter().map(|m| self.record(m)).collect()
    }

    fn mail(&self, uid: Uid) -> Option<MailRecord> {
        self.find(uid).map(|i| self.record(&self.mails[i]))
    }

    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>> {
        if since != 0 && since < self.header.log_floor {
            return None;
        }
        let mut out = Vec::new();
        for e in &self.log {
            if e.modseq() <= since {
                continue;
            }
            out.push(match e {
                LogEntry::Flags { modseq, uid, added, removed, kw_added, kw_removed } => Change::Flags {
                    uid: Uid::new(*uid)?,
                    modseq: *modseq,
                    added: *added,
                    removed: *removed,
                    keywords_added: self.keywords.keywords(*kw_added),
                    keywords_removed: self.keywords.keywords(*kw_removed),
                },
                LogEntry::Expunge { modseq, uid, guid } => {
                    Change::Expunge { uid: Uid::new(*uid)?, modseq: *modseq, guid: *guid }
                }
            });
        }
        Some(out)
    }

    fn open_body(&mut self, uid: Uid) -> StoreResult<Box<dyn Read + Send>> {
        let (f, _) = self.open_file(uid)?;
        Ok(Box::new(f))
    }

    fn received_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        let (f, idx) = self.open_file(uid)?;
        let meta = f.metadata().ctx("fstat", &self.path_of(&self.mails[idx]))?;
        Ok(meta.mtime())
    }

    /// The file's ctime, Dovecot's fallback for the save date of a Maildir mail (Dovecot
    /// prefers a value in its cache, which a later rename of the file does not change).
    fn saved_date(&mut self, uid: Uid) -> StoreResult<UnixTime> {
        let (f, idx) = self.open_file(uid)?;
        let meta = f.metadata().ctx("fstat", &self.path_of(&self.mails[idx]))?;
        Ok(meta.ctime())
    }

    fn physical_size(&mut self, uid: Uid) -> StoreResult<u64> {
        let idx = self.find(uid).ok_or(StoreError::MailNotFound(uid.get()))?;
        if let Some(s) = filename::size_field(&self.mails[idx].file, b'S') {
            return Ok(s);
        }
        let (f, idx) = self.open_file(uid)?;
        Ok(f.metadata().ctx("fstat", &self.path_of(&self.mails[idx]))?.len())
    }

    fn virtual_size(&mut self, uid: Uid) -> StoreResult<u64> {
        let idx = self.find(uid).ok_or(StoreError::MailNotFound(uid.get()))?;
        if let Some(s) = filename::size_field(&self.mails[idx].file, b'W') {
            return Ok(s);
        }
        let (f, idx) = self.open_file(uid)?;
        let path = self.path_of(&self.mails[idx]);
        let mut r = io::BufReader::new(f);
        let mut buf = [0u8; 64 * 1024];
        let (mut size, mut prev) = (0u64, 0u8);
        loop {
            let n = r.read(&mut buf).ctx("read", &path)?;
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                size += if b == b'\n' && prev != b'\r' { 2 } else { 1 };
                prev = b;
            }
        }
        Ok(size)
    }

    fn save(&mut self, request: SaveRequest, body: &mut dyn Read) -> StoreResult<()> {
        for k in &request.keywords {
            Keyword::new(k.as_str())?;
        }
        let (tmp, file, size, vsize) = self.write_tmp(body)?;
        if let Some(t) = request.received {
            let when = UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            if let Err(e) = file.set_modified(when) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::io("futimens", tmp, e));
            }
        }
        // Dovecot's rule: the GUID becomes the file name when it is a valid name that already
        // carries the right ,S= and ,W= sizes; otherwise the file gets a new name and the
        // uidlist keeps the GUID.
        let in_use = |b: &str| {
            self.mails.iter().any(|m| filename::base(&m.file) == b) || self.pending.iter().any(|p| p.base == b)
        };
        let (base, guid_ext) = match &request.guid {
            Some(g)
                if filename::valid_base(g.as_str())
                    && filename::size_field(g.as_str(), b'S') == Some(size)
                    && filename::size_field(g.as_str(), b'W') == Some(vsize)
                    && !in_use(g.as_str()) =>
            {
                (g.as_str().to_owned(), None)
            }
            Some(g) => (format!("{},S={size},W={vsize}", self.ctx.names.next()), Some(g.as_str().to_owned())),
            None => (format!("{},S={size},W={vsize}", tmp.file_name().and_then(|n| n.to_str()).unwrap_or("x")), None),
        };
        self.pending.push(Pending {
            tmp,
            file,
            base,
            guid_ext,
            requested: request.uid,
            flags: request.flags.stored(),
            keywords: request.keywords,
            min_modseq: request.min_modseq,
            move_from: None,
        });
        Ok(())
    }

    fn commit(&mut self) -> StoreResult<Vec<SavedMail>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.commit_inner()
    }

    fn change_flags(
        &mut self,
        uid: Uid,
        op: FlagOp,
        flags: Flags,
        keywords: &[Keyword],
        min_modseq: Modseq,
    ) -> StoreResult<()> {
        let idx = self.find(uid).ok_or(StoreError::MailNotFound(uid.get()))?;
        let mask = match op {
            FlagOp::Remove => self.keywords.existing_mask(keywords).unwrap_or_else(|| {
                // Keywords that have no letter cannot be on any file.
                keywords
                    .iter()
                    .filter_map(|k| self.keywords.existing_mask(std::slice::from_ref(k)))
                    .fold(0, |a, b| a | b)
            }),
            _ => self.keyword_mask_for(keywords)?,
        };
        let flags = flags.stored();
        for attempt in 0..2 {
            let m = &self.mails[idx];
            let (nf, nkw) = match op {
                FlagOp::Add => (m.flags | flags, m.kw | mask),
                FlagOp::Remove => (m.flags & !flags, m.kw & !mask),
                FlagOp::Replace => (flags, mask),
            };
            if (nf, nkw) == (m.flags, m.kw) {
                if min_modseq > m.modseq {
                    let modseq = self.next_modseq(min_modseq);
                    self.mails[idx].modseq = modseq;
                    let mut lines = index::mail_line(&self.mails[idx].to_indexed());
                    lines.push_str(&index::header_line(&self.header));
                    self.append_index(&lines)?;
                }
                return Ok(());
            }
            let newfile = filename::with_flags(&m.file, nf, nkw);
            let sub = if m.in_new { "new" } else { "cur" };
            let from = self.dir.join(sub).join(&m.file);
            let to = self.dir.join(sub).join(&newfile);
            match renameat2(AT_FDCWD, &from, AT_FDCWD, &to, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => {
                    let (of, okw) = (m.flags, m.kw);
                    let modseq = self.next_modseq(min_modseq);
                    let m = &mut self.mails[idx];
                    m.file = newfile;
                    m.flags = nf;
                    m.kw = nkw;
                    m.modseq = modseq;
                    let entry = LogEntry::Flags {
                        modseq,
                        uid: m.uid,
                        added: nf & !of,
                        removed: of & !nf,
                        kw_added: nkw & !okw,
                        kw_removed: okw & !nkw,
                    };
                    let mut lines = index::log_line(&entry);
                    lines.push_str(&index::mail_line(&m.to_indexed()));
                    lines.push_str(&index::header_line(&self.header));
                    self.log.push_back(entry);
                    self.dirs_dirty = true;
                    return self.append_index(&lines);
                }
                Err(nix::errno::Errno::ENOENT) if attempt == 0 => {
                    if !self.relocate(idx)? {
                        return Err(StoreError::MailNotFound(uid.get()));
                    }
                }
                Err(e) => return Err(StoreError::io("rename", from, io::Error::from(e))),
            }
        }
        Err(StoreError::MailNotFound(uid.get()))
    }

    fn expunge(&mut self, uids: &[Uid]) -> StoreResult<()> {
        let mut lines = String::new();
        let mut gone = Vec::new();
        for &uid in uids {
            let Some(idx) = self.find(uid) else { continue };
            let mut removed = false;
            for attempt in 0..2 {
                let path = self.path_of(&self.mails[idx]);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                        if !self.relocate(idx)? {
                            removed = true; // someone else expunged it
                            break;
                        }
                    }
                    Err(e) => return Err(StoreError::io("unlink", path, e)),
                }
            }
            if removed {
                let modseq = self.next_modseq(0);
                let m = &self.mails[idx];
                let entry = LogEntry::Expunge { modseq, uid: m.uid, guid: Guid128::from_mail_guid(m.guid()) };
                lines.push_str(&index::log_line(&entry));
                self.log.push_back(entry);
                gone.push(uid.get());
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        self.mails.retain(|m| !gone.contains(&m.uid));
        self.dirs_dirty = true;
        lines.push_str(&index::header_line(&self.header));
        self.append_index(&lines)
    }

    fn stage_move(&mut self, from: Uid, to: Uid) -> StoreResult<()> {
        let idx = self.find(from).ok_or(StoreError::MailNotFound(from.get()))?;
        // A hard link in tmp/ is the staged copy: no data is written, and until commit the
        // mail stays readable at its old UID.
        let tmp = self.dir.join("tmp").join(self.ctx.names.next());
        let mut linked = false;
        for attempt in 0..2 {
            let src = self.path_of(&self.mails[idx]);
            match fs::hard_link(&src, &tmp) {
                Ok(()) => {
                    linked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    if !self.relocate(idx)? {
                        break;
                    }
                }
                Err(e) => return Err(StoreError::io("link", tmp, e)),
            }
        }
        if !linked {
            return Err(StoreError::MailNotFound(from.get()));
        }
        let file = match File::open(&tmp) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::io("open", tmp, e));
            }
        };
        let m = &self.mails[idx];
        let old_base = filename::base(&m.file);
        let sizes = old_base.find(",S=").map(|i| old_base[i..].to_owned()).unwrap_or_default();
        self.pending.push(Pending {
            tmp,
            file,
            base: format!("{}{}", self.ctx.names.next(), sizes),
            guid_ext: Some(m.guid().to_owned()),
            requested: Some(to),
            flags: m.flags,
            keywords: self.keywords.keywords(m.kw),
            min_modseq: 0,
            move_from: Some(from),
        });
        Ok(())
    }

    fn update(&mut self, update: &MailboxUpdate) -> StoreResult<()> {
        let header_change = update.uid_validity.is_some_and(|v| v != self.uid_validity)
            || update.guid.is_some_and(|g| g != self.guid)
            || update.min_next_uid.is_some_and(|n| n > self.next_uid);
        if header_change {
            let (lock, mut list) = self.lock_uidlist()?;
            if let Some(v) = update.uid_validity {
                if v == 0 {
                    return Err(StoreError::NotPossible("UIDVALIDITY 0 is not allowed".to_owned()));
                }
                list.uid_validity = v;
            }
            if let Some(g) = update.guid {
                list.guid = Some(g);
            }
            if let Some(n) = update.min_next_uid {
                list.header_next_uid = list.header_next_uid.max(n);
            }
            list.rewrite(&self.dir, |_| true)?;
            lock.release()?;
            self.uid_validity = list.uid_validity;
            self.guid = list.guid.unwrap_or_default();
            self.next_uid = list.next_uid();
        }
        let h = &mut self.header;
        h.uid_validity = self.uid_validity;
        h.guid = Some(self.guid);
        h.next_uid = self.next_uid;
        if let Some(r) = update.min_first_recent_uid {
            h.first_recent_uid = h.first_recent_uid.max(r);
        }
        if let Some(m) = update.min_highest_modseq {
            h.highest_modseq = h.highest_modseq.max(m);
        }
        if let Some(m) = update.replicated_modseq {
            h.replicated_modseq = m;
        }
        if header_change {
            // A new identity: the snapshot is rewritten so that it matches the new uidlist.
            self.write_snapshot(None)
        } else {
            let line = index::header_line(&self.header);
            self.append_index(&line)
        }
    }

    fn refresh(&mut self) -> StoreResult<()> {
        if !self.pending.is_empty() {
            return Err(StoreError::NotPossible("refresh with uncommitted saves".to_owned()));
        }
        if let Some(a) = &mut self.appender {
            a.sync()?;
        }
        self.import_modseq = None;
        self.load()
    }

    fn begin_import(&mut self, at: Modseq) {
        self.import_modseq = Some(at.max(self.header.highest_modseq));
    }

    fn sync_point(&mut self) -> StoreResult<()> {
        self.import_modseq = None;
        if self.dirs_dirty {
            fsutil::fsync_dir(&self.dir.join("cur"))?;
            fsutil::fsync_dir(&self.dir.join("new"))?;
            self.dirs_dirty = false;
        }
        if let Some(a) = &mut self.appender {
            a.sync()?;
        }
        Ok(())
    }
}
