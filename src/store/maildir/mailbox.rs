//! One open Maildir mailbox.
//!
//! Opening takes an exclusive `flock` on the mailbox directory (so two mailreplica processes
//! never update the same index at once; Dovecot does not use it and is not blocked), then
//! either trusts the index snapshot (when `dovecot-uidlist`, `new/`, `cur/` and
//! `dovecot-keywords` are unchanged since it was written) or scans the Maildir, gives files
//! without a UID their UIDs the way Dovecot would, and turns every difference from the index
//! into a change with a new modseq. A handle opened only to add mails ([`MaildirAppender`])
//! reads just our index's latest header and the uidlist's header instead.
//!
//! Saving follows the durability order of the Maildir spec and Dovecot: write and fdatasync
//! the file in `tmp/`; take `dovecot-uidlist.lock`; rename into `new/` or `cur/` (never
//! replacing an existing name); fsync those directories once per batch; append the UIDs to the
//! uidlist and fdatasync it; unlock; then note the change in our index. The first write through
//! a handle first clears `tmp/` of what dead writers left there (see `tmpclean.rs`).
//!
//! Everything a sync engine does per mail is O(1) or O(log n) on the handle, so that importing
//! hundreds of thousands of mails into one mailbox stays linear: mails are a UID-sorted vector
//! where expunged ones are only marked (and swept out in bulk), the status counters are kept
//! up to date rather than counted, a set of base-name hashes answers "is this name taken", and
//! a commit re-reads only what other writers appended to the uidlist since our last look.
//! Memory is kept to about one small struct and one file name per mail (a full open of a
//! 200,000-mail mailbox peaks around 40 MiB): a scan matches uidlist records to files while
//! it streams the uidlist, and holds the old index only as hashes (see `index::KnownMail`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{AT_FDCWD, Flock, FlockArg, RenameFlags, renameat2};

use super::change_log::ChangeLog;
use super::filename::{self, KeywordMask};
use super::fsutil::{self, Stamp};
use super::index::{self, ExtraChange, Header, Index, IndexedMail, KnownMail, LogEntry, Stamps};
use super::keywords::{ExtraKeywords, KeywordMap};
use super::names::Names;
use super::scan::{BaseIndex, DirScan, Scan, append_in_chunks, sorted_unlisted};
use super::uidlist::{self, Record, Salvage, Uidlist};
use super::{Ctx, dotlock::Dotlock, dovecot_log, tmpclean, uidvalidity};
use crate::spill::{self, SpillVec};
use crate::spill_set::SpillSet;
use crate::store::error::{IoContext, StoreResult};
use crate::store::{
    Change, FlagOp, Flags, Guid128, Keyword, MAX_UID, MailGuid, MailRecord, Mailbox, MailboxName, MailboxStatus,
    MailboxUpdate, Modseq, SaveRequest, SavedMail, StoreError, Uid, UnixTime,
};

/// A directory whose mtime is this close to "now" may still change within the same timestamp
/// tick, so a snapshot taken from it is not trusted without a rescan (files are told apart by
/// their size and inode as well).
const FRESH: Duration = Duration::from_secs(2);

/// One mail in memory: the index's form, which loads without conversion.
type Mail = IndexedMail;

/// A mail written to `tmp/` and waiting for [`Mailbox::commit`].
#[derive(Debug)]
struct Pending {
    tmp: PathBuf,
    /// The written file, still to be fsynced; `None` once synced, and for hard links to a
    /// file that is already durable (or whose own pending entry syncs it). Never more than
    /// [`MAX_UNSYNCED`] are held, so a large batch does not run out of descriptors.
    file: Option<File>,
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

/// How many written files may wait for their fsync at once: enough to batch the syncs (the
/// writeback of each was started when it was written), few enough for any descriptor limit.
const MAX_UNSYNCED: usize = 128;

/// Bytes of index lines an expunge gathers before it appends them.
const EXPUNGE_LINES_PIECE: usize = 64 << 10;

/// The status counters, kept up to date by every change so that `status()` is O(1).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    messages: u32,
    unseen: u32,
    recent: u32,
}

impl Counts {
    fn add(&mut self, flags: Flags, in_new: bool) {
        self.messages += 1;
        self.unseen += u32::from(!flags.contains(Flags::SEEN));
        self.recent += u32::from(in_new);
    }

    fn sub(&mut self, flags: Flags, in_new: bool) {
        self.messages = self.messages.saturating_sub(1);
        self.unseen = self.unseen.saturating_sub(u32::from(!flags.contains(Flags::SEEN)));
        self.recent = self.recent.saturating_sub(u32::from(in_new));
    }
}

/// Hash of a base name, for [`MaildirMailbox::base_hashes`].
fn base_hash(base: &str) -> u64 {
    crate::fasthash::strong_hash(base)
}

/// How a uidlist looked before we took the lock.
enum ListRead {
    Missing,
    Good(Uidlist),
    Damaged,
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
    /// Keywords without a letter, and how many of them our index file already names.
    extra_kw: ExtraKeywords,
    extra_kw_written: usize,
    /// Mails by ascending UID, including expunged ones not yet swept out (`removed` of them).
    /// A large mailbox's list lives in a file ([`crate::spill`]): loops over all of it
    /// release its pages as they go.
    mails: SpillVec<Mail>,
    /// Their file names.
    names: Names,
    removed: usize,
    counts: Counts,
    /// Every keyword letter some mail carries or carried (a superset is harmless: it only
    /// keeps a letter without a name from being handed out).
    used_kw: KeywordMask,
    /// Hashes of the base names of our mails and pending saves, built on first need.
    base_hashes: Option<SpillSet>,
    /// The uidlist as we last read or wrote it (header only), so that a commit re-reads only
    /// what others appended since.
    uidlist_cache: Option<Uidlist>,
    /// `new/` and `cur/` stamps at our last rescan for moved files (see `relocate`).
    rescanned: Option<(Option<Stamp>, Option<Stamp>)>,
    /// `tmp/` was cleaned by this handle.
    tmp_cleaned: bool,
    header: Header,
    log: ChangeLog,
    appender: Option<index::Appender>,
    appended: usize,
    pending: Vec<Pending>,
    /// How many entries of `pending` still hold a file to fsync.
    unsynced: usize,
    dirs_dirty: bool,
    /// An import is in progress ([`Mailbox::begin_import`]): its flag changes are not logged.
    importing: bool,
    /// The import's one modseq, if it asked for one ([`Mailbox::begin_import`]).
    import_modseq: Option<Modseq>,
    /// Opened for appending only ([`MaildirAppender`]): `mails` and `log` hold only what this
    /// handle saved, the header is the index's latest.
    partial: bool,
    /// [`MailboxStatus::other_index_modseq`]: the lowest `applied` point of Dovecot's log
    /// over this handle's loads (`None` once a load found no log); unset before the first.
    dovecot_applied: Option<Option<Modseq>>,
}

fn is_fresh(s: Option<Stamp>) -> bool {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128;
    s.is_some_and(|s| now - s.mtime_ns < FRESH.as_nanos() as i128)
}

/// Reads the whole uidlist, for a repair.
fn read_uidlist(dir: &Path) -> StoreResult<ListRead> {
    match Uidlist::read(dir) {
        Ok(Some(l)) => Ok(ListRead::Good(l)),
        Ok(None) => Ok(ListRead::Missing),
        Err(StoreError::Corrupt { .. }) => Ok(ListRead::Damaged),
        Err(e) => Err(e),
    }
}

impl MaildirMailbox {
    /// Opens the mailbox stored in `dir`.
    pub(crate) fn open(ctx: Arc<Ctx>, name: MailboxName, dir: PathBuf) -> StoreResult<Self> {
        let mut mb = Self::open_unloaded(ctx, name, dir)?;
        mb.load()?;
        Ok(mb)
    }

    /// Opens the mailbox stored in `dir` for appending only: without a scan when our index
    /// and the uidlist agree on the mailbox's identity (else like [`MaildirMailbox::open`]).
    pub(crate) fn open_for_append(ctx: Arc<Ctx>, name: MailboxName, dir: PathBuf) -> StoreResult<Self> {
        let mut mb = Self::open_unloaded(ctx, name, dir)?;
        if !mb.load_header_only()? {
            mb.load()?;
        }
        Ok(mb)
    }

    /// Checks the directory, creates a missing new/ or tmp/ and takes the flock.
    fn open_unloaded(ctx: Arc<Ctx>, name: MailboxName, dir: PathBuf) -> StoreResult<Self> {
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
        let mb = Self {
            name,
            ctx,
            _lock: lock,
            file_mode: if file_mode == 0 { 0o600 } else { file_mode },
            uid_validity: 0,
            guid: Guid128::EMPTY,
            next_uid: 1,
            keywords: KeywordMap::default(),
            extra_kw: ExtraKeywords::default(),
            extra_kw_written: 0,
            mails: SpillVec::new_in(spill::dir(&dir)),
            names: Names::in_dir(&dir),
            dir,
            removed: 0,
            counts: Counts::default(),
            used_kw: 0,
            base_hashes: None,
            uidlist_cache: None,
            rescanned: None,
            tmp_cleaned: false,
            header: Header::default(),
            log: ChangeLog::default(),
            appender: None,
            appended: 0,
            pending: Vec::new(),
            unsynced: 0,
            dirs_dirty: false,
            importing: false,
            import_modseq: None,
            partial: false,
            dovecot_applied: None,
        };
        Ok(mb)
    }

    /// The partial load of [`MaildirMailbox::open_for_append`]: the latest header of our index
    /// and the identity in the uidlist's header, nothing else. Returns false (and loads
    /// nothing) when they are missing, damaged or disagree; then a full load must follow.
    fn load_header_only(&mut self) -> StoreResult<bool> {
        let theirs = self.read_dovecot_log();
        let Some(header) = index::read_last_header(&self.dir)? else {
            return Ok(false);
        };
        let list = match Uidlist::read_header(&self.dir) {
            Ok(Some(l)) => l,
            // A damaged uidlist is repaired by the full load.
            Ok(None) | Err(StoreError::Corrupt { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if list.version != 3 || list.uid_validity != header.uid_validity || list.guid != header.guid {
            return Ok(false);
        }
        self.keywords = KeywordMap::read(&self.dir)?;
        self.uid_validity = header.uid_validity;
        self.guid = header.guid.unwrap_or_default();
        self.next_uid = header.next_uid;
        self.header = header;
        self.follow_dovecot_modseq(theirs);
        self.partial = true;
        Ok(true)
    }

    /// Dovecot's modseqs of this mailbox, from Dovecot's own index of it, if it keeps one we
    /// can read. Read at the start of every load, before any file of the mailbox: then every
    /// change counted up to `applied` is in what the load finds.
    fn read_dovecot_log(&mut self) -> Option<dovecot_log::LogModseqs> {
        let dir = match &self.ctx.index_root {
            None => self.dir.clone(),
            Some(ix) => match self.dir.strip_prefix(&self.ctx.root) {
                Ok(rel) => ix.join(rel),
                Err(_) => ix.clone(),
            },
        };
        let theirs = dovecot_log::read(&dir);
        let applied = theirs.map(|t| t.applied);
        self.dovecot_applied = Some(match self.dovecot_applied {
            None => applied,
            Some(before) => before.zip(applied).map(|(a, b)| a.min(b)),
        });
        theirs
    }

    /// Raises our HIGHESTMODSEQ to Dovecot's, before anything of this load gets a modseq: then
    /// every change we record from now on lies above every point of Dovecot's numbering a
    /// state printed by `doveadm sync` can name, and such a state may be used with our index
    /// (see `dovecot_log`). Only ever raises; nothing is written for it.
    fn follow_dovecot_modseq(&mut self, theirs: Option<dovecot_log::LogModseqs>) {
        let theirs = theirs.map_or(0, |t| t.highest);
        if theirs > self.header.highest_modseq {
            tracing::debug!(
                mailbox = %self.dir.display(),
                ours = self.header.highest_modseq,
                theirs,
                "HIGHESTMODSEQ raised to Dovecot's"
            );
            self.header.highest_modseq = theirs;
        }
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
        let theirs = self.read_dovecot_log();
        let stamps = self.current_stamps()?;
        let old = Index::read(&self.dir, Some(&stamps))?;
        let valid = old.as_ref().is_some_and(|old| {
            old.stamps == Some(stamps)
                && !old.torn
                && old.header.uid_validity != 0
                && old.header.guid.is_some()
                && stamps.uidlist.is_some()
        });
        match old {
            Some(old) if valid => {
                self.keywords = KeywordMap::read(&self.dir)?;
                self.header = old.header;
                self.follow_dovecot_modseq(theirs);
                self.uid_validity = old.header.uid_validity;
                self.guid = old.header.guid.unwrap_or_default();
                self.next_uid = old.header.next_uid;
                self.extra_kw_written = old.extra_keywords.len();
                self.extra_kw = ExtraKeywords::from_names(old.extra_keywords);
                self.mails = old.mails;
                self.names = old.names;
                self.log = old.log;
                self.appended = old.appended;
                self.after_load();
                Ok(())
            }
            old => self.full_scan(old, stamps, theirs.map_or(0, |t| t.highest)),
        }
    }

    /// Recomputes what is derived from the mails, once per load.
    fn after_load(&mut self) {
        self.removed = 0;
        self.counts = Counts::default();
        self.used_kw = 0;
        for m in self.mails.iter_releasing() {
            self.counts.add(m.flags, m.in_new);
            self.used_kw |= m.kw;
        }
        self.base_hashes = None;
        self.rescanned = None;
        self.warn_unnamed_keywords();
    }

    fn warn_unnamed_keywords(&self) {
        let unnamed = self.keywords.unnamed(self.used_kw);
        if unnamed != 0 {
            let letters: String = (0..26u8).filter(|i| unnamed & (1 << i) != 0).map(|i| char::from(b'a' + i)).collect();
            tracing::warn!(
                mailbox = %self.dir.display(),
                letters,
                "keyword letters without a name in dovecot-keywords; shown as unknown-N, as Dovecot shows them"
            );
        }
    }

    /// `dovecot_highest`: Dovecot's HIGHESTMODSEQ as the load read it (0: none).
    fn full_scan(&mut self, old: Option<Index>, stamps_before: Stamps, dovecot_highest: Modseq) -> StoreResult<()> {
        let mut stamps = stamps_before;
        let mut old = old;
        if let Some(o) = &mut old
            && !o.mails.is_empty()
        {
            // Read in full (a torn index with a trusted snapshot): the merge needs less.
            let names = std::mem::take(&mut o.names);
            let mails = std::mem::take(&mut o.mails);
            o.known = SpillVec::new_in(mails.dir());
            o.known.reserve_exact(mails.len());
            for m in mails.iter_releasing() {
                let k = KnownMail::of(m, &names, &mut o.known_extras);
                o.known.push(k);
            }
        }
        let (list, mut current, mut names) = self.scan_mails(old.as_ref(), &mut stamps)?;
        self.uidlist_cache = Some(list.header_only());
        self.keywords = KeywordMap::read(&self.dir)?;
        stamps.keywords = self.keywords.stamp;
        self.uid_validity = list.uid_validity;
        self.guid = list.guid.unwrap_or_default();
        self.next_uid = list.next_uid();

        let old = old.filter(|o| o.header.uid_validity == self.uid_validity && o.header.guid == Some(self.guid));
        match old {
            Some(old) => {
                let Index { mut header, known, known_extras, mut log, extra_keywords, .. } = old;
                let mut hms = header.highest_modseq.max(dovecot_highest);
                let mut next = || {
                    hms = hms.saturating_add(1);
                    hms
                };
                let mut oi = known.iter_releasing().copied().peekable();
                current.update_releasing(|m| {
                    // Mails the index knew but that are gone: expunged behind our back.
                    while let Some(o) = oi.next_if(|o| o.uid < m.uid) {
                        log.push_back(LogEntry::Expunge { modseq: next(), uid: o.uid, guid: o.guid128 });
                    }
                    match oi.next_if(|o| o.uid == m.uid) {
                        Some(o) if o.ident == index::mail_ident(m.file(&names), m.guid_ext(&names)) => {
                            // Keywords without a letter are only ever in our index: they stay.
                            let extras = o.extras.checked_sub(1).and_then(|i| known_extras.get(i as usize));
                            m.replace_extras(&mut names, extras.cloned().unwrap_or_default());
                            let (of, okw) = (o.flags, o.kw);
                            if (of, okw) == (m.flags, m.kw) {
                                m.modseq = o.modseq;
                            } else {
                                m.modseq = next();
                                log.push_back(LogEntry::Flags {
                                    modseq: m.modseq,
                                    uid: m.uid,
                                    added: m.flags & !of,
                                    removed: of & !m.flags,
                                    kw_added: m.kw & !okw,
                                    kw_removed: okw & !m.kw,
                                    extra: None,
                                });
                            }
                        }
                        Some(o) => {
                            // Same UID, different file: the old mail is gone, this one is new.
                            log.push_back(LogEntry::Expunge { modseq: next(), uid: o.uid, guid: o.guid128 });
                            m.modseq = next();
                        }
                        None => m.modseq = next(),
                    }
                });
                for o in oi {
                    log.push_back(LogEntry::Expunge { modseq: next(), uid: o.uid, guid: o.guid128 });
                }
                header.highest_modseq = hms;
                self.header = header;
                self.log = log;
                self.extra_kw_written = extra_keywords.len();
                self.extra_kw = ExtraKeywords::from_names(extra_keywords);
            }
            None => {
                // No index for this identity: start over as a fresh Dovecot index would (see
                // index.rs), and say that the history before now is lost, unless there was
                // none (an empty mailbox that never had a mail).
                let has_mails = !current.is_empty();
                let lost = has_mails || self.next_uid != 1;
                // The mails get what a fresh Dovecot index gives them: a low modseq, as the
                // peer's importer compares it with its own changes' when both sides changed a
                // mail. HIGHESTMODSEQ and the start of our history lie above Dovecot's
                // HIGHESTMODSEQ, if it keeps one here and there is a history to lose: no state
                // either tool printed before now may pass for a point in it.
                let per_mail = index::rebuilt_modseq(has_mails);
                let base = match dovecot_highest {
                    0 => per_mail,
                    theirs => per_mail.max(theirs.saturating_add(u64::from(lost))),
                };
                current.update_releasing(|m| m.modseq = per_mail);
                if lost {
                    tracing::info!(
                        mailbox = %self.dir.display(),
                        "no usable mailreplica-index: rebuilt it from the Maildir; modseqs restart at {base} and \
                         the change history before now is marked lost"
                    );
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
                    peer_modseq: 0,
                    history_lost: lost,
                };
                self.log = ChangeLog::in_dir(&self.dir);
                self.extra_kw = ExtraKeywords::default();
                self.extra_kw_written = 0;
            }
        }
        self.header.uid_validity = self.uid_validity;
        self.header.guid = Some(self.guid);
        self.header.next_uid = self.next_uid;
        self.mails = current;
        self.names = names;
        self.after_load();
        // Only the directories can change unseen within one mtime tick (a file added to cur/
        // leaves its size as it was). The uidlist and the keywords file are appended to or
        // replaced by a rename, which changes their size or inode, both in the stamp: our own
        // write of the uidlist a moment ago (a Maildir that had none) does not make the
        // snapshot untrusted, and the next open does not scan again.
        let trusted = ![stamps.new, stamps.cur].into_iter().any(is_fresh);
        self.write_snapshot(if trusted { Some(stamps) } else { None })?;
        Ok(())
    }

    /// Reads the directories and the uidlist: the uidlist's header, and the mails in UID
    /// order with their names. The uidlist is fixed under its lock when files lack a UID, or
    /// it is missing or damaged (the directories are then read again under the lock).
    fn scan_mails(&self, old: Option<&Index>, stamps: &mut Stamps) -> StoreResult<(Uidlist, SpillVec<Mail>, Names)> {
        // The common case, a uidlist that lists every file: matched against the directories
        // as it is read, without the lock.
        match Scan::read(&self.dir)? {
            Scan::Small(scan) => {
                let by_base = scan.by_base();
                let matched = match Uidlist::read_matched(&self.dir, |b| by_base.get(b), by_base.len()) {
                    Ok(Some((l, found))) if l.guid.is_some() && l.version == 3 && found.len() == by_base.len() => {
                        Some((l, found))
                    }
                    Ok(_) | Err(StoreError::Corrupt { .. }) => None,
                    Err(e) => return Err(e),
                };
                drop(by_base);
                if let Some((l, found)) = matched {
                    return Ok(self.mails_of(l, &found, scan));
                }
            }
            Scan::Big(big) => {
                if let Some(j) = big.join(&self.dir, None)? {
                    return Ok((j.list, j.mails, j.names));
                }
            }
        }
        // Files without UIDs, no uidlist, a damaged one, or no mailbox GUID: fixed under the
        // lock, from a fresh look (the first one dropped first).
        let lock = Dotlock::acquire(&self.dir.join(uidlist::NAME), &self.ctx.hostname, self.ctx.lock_wait)?;
        stamps.new = Stamp::read(&self.dir.join("new"))?;
        stamps.cur = Stamp::read(&self.dir.join("cur"))?;
        let scan = match Scan::read(&self.dir)? {
            Scan::Small(scan) => scan,
            Scan::Big(big) => {
                let new_list = || self.new_uidlist(old);
                match big.join(&self.dir, Some(&new_list))? {
                    Some(j) => {
                        stamps.uidlist = j.list.stamp;
                        lock.release()?;
                        if j.created {
                            nudge_dovecot(&self.dir);
                        }
                        return Ok((j.list, j.mails, j.names));
                    }
                    // A repair reads the uidlist whole, and the directories into memory.
                    None => DirScan::read(&self.dir)?,
                }
            }
        };
        let (l, found) = match self.append_unlisted(&scan)? {
            Some(m) => m,
            None => {
                let read = read_uidlist(&self.dir)?;
                let by_base = scan.by_base();
                self.fix_uidlist(read, &by_base, old)?
            }
        };
        stamps.uidlist = l.stamp;
        lock.release()?;
        Ok(self.mails_of(l, &found, scan))
    }

    /// The files of `found` (listed in UID order), with their names moved over from the scan
    /// into a buffer of their own, which moves into a file once large.
    fn mails_of(&self, list: Uidlist, found: &uidlist::FoundList, scan: DirScan) -> (Uidlist, SpillVec<Mail>, Names) {
        let DirScan { mut names, files } = scan;
        let mut current: SpillVec<Mail> = SpillVec::new_in(spill::dir(&self.dir));
        current.reserve_exact(found.len());
        for (uid, i, guid_ext) in found.iter() {
            let (name, in_new) = files[i as usize];
            current.push(Mail::with_name(uid, 0, in_new, guid_ext.map(Box::from), name, &mut names, Box::default()));
        }
        drop(files);
        // Without the names of files that got no UID.
        names.compact_into(&self.dir, &mut current, Mail::name, Mail::set_name);
        (list, current, names)
    }

    /// A new uidlist (not yet written) for a mailbox that has none: with our index's identity
    /// if we have one, so that replicas keep recognising the mailbox, else a new one.
    fn new_uidlist(&self, old: Option<&Index>) -> StoreResult<Uidlist> {
        let (uv, guid, next) = match old {
            Some(o) if o.header.uid_validity != 0 => {
                (o.header.uid_validity, o.header.guid.unwrap_or_else(Guid128::generate), o.header.next_uid.max(1))
            }
            _ => (uidvalidity::next(&self.ctx.root)?, Guid128::generate(), 1),
        };
        let mut l = Uidlist::new(uv, guid);
        l.header_next_uid = next;
        Ok(l)
    }

    /// Under the uidlist lock, the common case of an incomplete uidlist: it is good and lacks
    /// only files delivered since (Dovecot's LDA, a hand copy). They get UIDs appended, as
    /// Dovecot gives them, without reading every record's name into memory the way a repair
    /// must. `None` when the uidlist needs more than that ([`MaildirMailbox::fix_uidlist`]).
    fn append_unlisted(&self, scan: &DirScan) -> StoreResult<Option<(Uidlist, uidlist::FoundList)>> {
        let by_base = scan.by_base();
        let (mut list, mut found) = match Uidlist::read_matched(&self.dir, |b| by_base.get(b), by_base.len()) {
            Ok(Some((l, found))) if l.guid.is_some() && l.version == 3 => (l, found),
            Ok(_) | Err(StoreError::Corrupt { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut listed = vec![false; scan.files.len()];
        for (_, i, _) in found.iter() {
            listed[i as usize] = true;
        }
        let missing = sorted_unlisted(&by_base, |i| !listed[i as usize]);
        let first = list.next_uid();
        let room = (u64::from(MAX_UID) + 1).saturating_sub(u64::from(first));
        if missing.len() as u64 > room {
            // Said (and handled) by the repair.
            return Ok(None);
        }
        append_in_chunks(&self.dir, &mut list, scan, &missing, &mut found)?;
        Ok(Some((list, found)))
    }

    /// Under the uidlist lock: creates a missing uidlist, repairs a damaged one, adds a missing
    /// mailbox GUID, and gives UIDs to files that have none, in Dovecot's order.
    ///
    /// Returns the list's header and (UID, file index, `G` extension) of every file, in UID
    /// order.
    fn fix_uidlist(
        &self,
        read: ListRead,
        files: &BaseIndex<'_>,
        old: Option<&Index>,
    ) -> StoreResult<(Uidlist, uidlist::FoundList)> {
        let path = self.dir.join(uidlist::NAME);
        let mut salvage = None;
        // A new or rebuilt uidlist may give files other UIDs than Dovecot's index has.
        let renumbered = !matches!(read, ListRead::Good(_));
        let (mut list, mut rewrite) = match read {
            ListRead::Good(l) => {
                let rw = l.version != 3;
                (l, rw)
            }
            ListRead::Missing => (self.new_uidlist(old)?, true),
            ListRead::Damaged => {
                let data = fsutil::read_optional(&path)?.unwrap_or_default();
                let mut sv = Salvage::of(&data);
                let fallback = match old {
                    Some(o) if o.header.uid_validity != 0 => (o.header.uid_validity, o.header.guid, o.header.next_uid),
                    _ => (uidvalidity::next(&self.ctx.root)?, None, 1),
                };
                let l = salvaged_list(&mut sv, fallback);
                salvage = Some(sv);
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
        let mut listed = vec![false; files.scan.files.len()];
        for r in &list.records {
            if let Some(i) = files.get(&r.base) {
                listed[i as usize] = true;
            }
        }
        let mut missing = sorted_unlisted(files, |i| !listed[i as usize]);
        drop(listed);
        let first = list.next_uid();
        let room = (u64::from(MAX_UID) + 1).saturating_sub(u64::from(first));
        if missing.len() as u64 > room {
            tracing::warn!(
                mailbox = %self.dir.display(),
                "UID space exhausted: {} files get no UID (no UID is left below 4294967295)",
                missing.len() as u64 - room
            );
            missing.truncate(room as usize);
        }
        let new_uids = missing.len();
        if rewrite {
            // The records kept first; the new ones are appended below, from `first` on (the
            // rewrite keeps the header's next UID at `first` even when trailing records go).
            list.rewrite(&self.dir, |r| files.contains(r.base.as_str()))?;
        }
        let mut found = uidlist::FoundList::in_dir(&self.dir);
        found.reserve(list.records.len() + missing.len());
        for r in &list.records {
            if let Some(i) = files.get(r.base.as_str()) {
                found.push(r.uid, i, r.guid.as_deref());
            }
        }
        let mut list = list.header_only();
        debug_assert!(missing.is_empty() || list.next_uid() == first);
        append_in_chunks(&self.dir, &mut list, files.scan, &missing, &mut found)?;
        if let Some(sv) = salvage {
            warn_salvaged(&path, &sv, &list, new_uids, first);
        }
        if renumbered {
            nudge_dovecot(&self.dir);
        }
        Ok((list, found))
    }

    fn write_snapshot(&mut self, stamps: Option<Stamps>) -> StoreResult<()> {
        self.sweep();
        let n = self.mails.len();
        let names = &self.names;
        let mut mails = self.mails.iter_releasing().map(|m| m.line(names));
        let floor = index::write_snapshot(
            &self.dir,
            &self.header,
            stamps.as_ref(),
            self.extra_kw.names(),
            &mut mails,
            &mut self.log,
            n,
        )?;
        self.header.log_floor = floor;
        self.extra_kw_written = self.extra_kw.len();
        self.appended = 0;
        self.appender = None;
        Ok(())
    }

    /// Appends lines to our index, preceded by the keyword-table entries they may use.
    fn append_index(&mut self, lines: &str) -> StoreResult<()> {
        let mut table = String::new();
        while self.extra_kw_written < self.extra_kw.len() {
            if let Some(k) = self.extra_kw.name(self.extra_kw_written as u16) {
                table.push_str(&index::keyword_line(self.extra_kw_written, k));
            }
            self.extra_kw_written += 1;
        }
        if self.appender.is_none() {
            self.appender = Some(index::Appender::open(&self.dir)?);
        }
        if let Some(a) = &mut self.appender {
            // Two writes rather than a copy of `lines` (an expunge's may be long): the table's
            // entries are whole lines that stand on their own.
            a.append(&table)?;
            a.append(lines)?;
        }
        self.appended += table.bytes().chain(lines.bytes()).filter(|&b| b == b'\n').count();
        Ok(())
    }

    /// Drops expunged mails from the vector.
    fn sweep(&mut self) {
        if self.removed > 0 {
            let names = &mut self.names;
            self.mails.retain(|m| {
                if m.gone {
                    names.release_name(m.name());
                }
                !m.gone
            });
            self.removed = 0;
        }
        self.compact_names();
    }

    /// Bytes the file names take (for tests).
    #[cfg(test)]
    pub(crate) fn names_held(&self) -> usize {
        self.names.held()
    }

    /// True when the list of mails and their names live in files (for tests).
    #[cfg(test)]
    pub(crate) fn lists_in_files(&self) -> bool {
        self.mails.in_file() && self.names.in_file()
    }

    /// Reclaims the names that renames and sweeps left behind, once they outweigh the live
    /// ones: O(1) amortised per rename.
    fn compact_names(&mut self) {
        if self.names.wants_compaction() {
            self.names.compact(&mut self.mails, Mail::name, Mail::set_name);
        }
    }

    /// Sweeps once expunged mails are a quarter of the vector: O(1) amortised per expunge.
    fn maybe_sweep(&mut self) {
        if self.removed >= 64 && self.removed * 4 >= self.mails.len() {
            self.sweep();
        }
    }

    fn find(&self, uid: Uid) -> Option<usize> {
        let i = self.mails.search_by_key(uid.get(), |m| m.uid).ok()?;
        (!self.mails[i].gone).then_some(i)
    }

    fn path_of(&self, m: &Mail) -> PathBuf {
        self.dir.join(if m.in_new { "new" } else { "cur" }).join(m.file(&self.names))
    }

    /// After a file was not found where we expected it (Dovecot renamed or moved it), looks it
    /// up again by base name. One directory scan corrects every mail that moved (a Dovecot
    /// session may have moved them all from new/ to cur/), and while `new/` and `cur/` stay
    /// unchanged since that scan it is not repeated: a mail it did not find is gone. Returns
    /// false if the mail is gone.
    fn relocate(&mut self, idx: usize) -> StoreResult<bool> {
        let stamps = (Stamp::read(&self.dir.join("new"))?, Stamp::read(&self.dir.join("cur"))?);
        if self.rescanned == Some(stamps) && !is_fresh(stamps.0) && !is_fresh(stamps.1) {
            return Ok(false);
        }
        let scan = DirScan::read(&self.dir)?;
        let by_base = scan.by_base();
        let mut found = false;
        for i in 0..self.mails.len() {
            if i % spill::RELEASE_EVERY == 0 {
                self.mails.release();
            }
            if self.mails[i].gone {
                continue;
            }
            let Some(j) = by_base.get(filename::base(self.mails[i].file(&self.names))) else {
                continue;
            };
            found |= i == idx;
            let (file, in_new) = scan.file(j as usize);
            let m = &mut self.mails[i];
            if file != m.file(&self.names) || in_new != m.in_new {
                self.counts.sub(m.flags, m.in_new);
                let (f, kw) = filename::parse_flags(file);
                m.rename(&mut self.names, file)?;
                m.in_new = in_new;
                m.flags = f;
                m.kw = kw;
                self.counts.add(f, in_new);
                self.used_kw |= kw;
            }
        }
        self.rescanned = Some(stamps);
        Ok(found)
    }

    /// The modseq of a change: one above HIGHESTMODSEQ (or the import's one modseq), raised
    /// to `min`.
    fn next_modseq(&mut self, min: Modseq) -> Modseq {
        let modseq = self.import_modseq.unwrap_or(self.header.highest_modseq.saturating_add(1)).max(min);
        self.header.highest_modseq = self.header.highest_modseq.max(modseq);
        modseq
    }

    /// The keywords of a mail: those with a letter in `dovecot-keywords` order, then the
    /// others in the order they were added (each name once).
    fn keywords_of(&self, m: &Mail) -> Vec<Keyword> {
        let mut kws = self.keywords.keywords(m.kw);
        for &id in m.extras(&self.names) {
            if let Some(k) = self.extra_kw.name(id)
                && !kws.iter().any(|x| x.as_str().eq_ignore_ascii_case(k.as_str()))
            {
                kws.push(k.clone());
            }
        }
        kws
    }

    fn record(&self, m: &Mail) -> MailRecord {
        MailRecord {
            uid: Uid::new(m.uid).unwrap_or(Uid::MIN),
            guid: MailGuid::new(m.guid(&self.names)).unwrap_or_else(|_| MailGuid::new("invalid").expect("valid")),
            flags: m.flags,
            keywords: self.keywords_of(m),
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

    /// Takes the uidlist lock and brings our view of the uidlist up to date, so that new UIDs
    /// are assigned above everything any writer has assigned. Unless `full` (a caller that
    /// rewrites the file needs every record), only what others appended since our last look
    /// is read: a commit during an import costs the same for the first mail and the millionth.
    fn lock_uidlist(&mut self, full: bool) -> StoreResult<(Dotlock, Uidlist)> {
        let lock = Dotlock::acquire(&self.dir.join(uidlist::NAME), &self.ctx.hostname, self.ctx.lock_wait)?;
        let current = match (&mut self.uidlist_cache, full) {
            (Some(c), false) => c.refresh_appended(&self.dir)?,
            _ => false,
        };
        let list = match &self.uidlist_cache {
            Some(c) if current => c.header_only(),
            _ => {
                self.uidlist_cache = None;
                // A header-only read (checking every record, keeping none) is all an append
                // needs: a delivery into a large mailbox need not hold its UIDs in memory.
                let lean = if full {
                    None
                } else {
                    match Uidlist::read_matched(&self.dir, |_| None, 0) {
                        Ok(Some((l, _))) => Some(l),
                        Ok(None) | Err(StoreError::Corrupt { .. }) => None,
                        Err(e) => return Err(e),
                    }
                };
                let l = match lean {
                    Some(l) => l,
                    None => self.read_uidlist_locked()?,
                };
                self.uidlist_cache = Some(l.header_only());
                l
            }
        };
        if list.uid_validity != self.uid_validity || list.guid != Some(self.guid) {
            return Err(StoreError::NotPossible(format!(
                "mailbox {} was recreated by another process while open; retry",
                self.name.join(self.ctx.sep)
            )));
        }
        Ok((lock, list))
    }

    /// Reads the whole uidlist (caller holds the lock), repairing it if it was damaged since
    /// we opened the mailbox. Files whose records had to go get new UIDs at the next full open.
    fn read_uidlist_locked(&self) -> StoreResult<Uidlist> {
        let path = self.dir.join(uidlist::NAME);
        match Uidlist::read(&self.dir) {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(StoreError::corrupt(path, None, "disappeared while the mailbox was open")),
            Err(StoreError::Corrupt { .. }) => {
                let data = fsutil::read_optional(&path)?.unwrap_or_default();
                let mut sv = Salvage::of(&data);
                let mut l = salvaged_list(&mut sv, (self.uid_validity, Some(self.guid), self.next_uid));
                if l.guid.is_none() {
                    l.guid = Some(self.guid);
                }
                l.rewrite(&self.dir, |_| true)?;
                warn_salvaged(&path, &sv, &l, 0, 0);
                nudge_dovecot(&self.dir);
                Ok(l)
            }
            Err(e) => Err(e),
        }
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

    /// fdatasyncs every written file still held and lets its descriptor go.
    fn sync_pending(&mut self) -> StoreResult<()> {
        for p in &mut self.pending {
            if let Some(f) = p.file.take() {
                f.sync_data().ctx("fdatasync", &p.tmp)?;
            }
        }
        self.unsynced = 0;
        Ok(())
    }

    /// Queues a staged mail; syncs the held files when too many wait.
    fn push_pending(&mut self, p: Pending) -> StoreResult<()> {
        let held = p.file.is_some();
        self.pending.push(p);
        if held {
            self.unsynced += 1;
            if self.unsynced >= MAX_UNSYNCED {
                self.sync_pending()?;
            }
        }
        Ok(())
    }

    fn discard_pending(&mut self) {
        self.unsynced = 0;
        for p in self.pending.drain(..) {
            let _ = fs::remove_file(&p.tmp);
        }
    }

    fn commit_inner(&mut self) -> StoreResult<Vec<SavedMail>> {
        // 1. Data durable in tmp/ (writeback was started when each file was written).
        self.sync_pending()?;
        // 2. Under the uidlist lock: keywords, UIDs, names, renames. Everything that can be
        // refused (a keyword over the limit, no UID left) is decided before the first rename.
        let (lock, mut list) = self.lock_uidlist(false)?;
        // Only a commit that fully succeeds leaves the cached view of the uidlist current.
        self.uidlist_cache = None;
        let pending = std::mem::take(&mut self.pending);
        let name = self.name.join(self.ctx.sep);
        let prepared = (|| -> StoreResult<_> {
            let mut kwmap = read_keywords_for_update(&self.dir, self.used_kw)?;
            let mut kw_changed = false;
            let mut resolved = Vec::with_capacity(pending.len());
            for p in &pending {
                let (mask, ids, changed) = assign_keywords(&mut kwmap, &mut self.extra_kw, &p.keywords)?;
                kw_changed |= changed;
                resolved.push((mask, ids.into_boxed_slice()));
            }
            // UIDs are assigned in ascending order of the UIDs asked for (the uidlist must stay
            // sorted), whatever order the mails were staged in.
            let mut by_uid: Vec<usize> = (0..pending.len()).collect();
            by_uid.sort_by_key(|&i| pending[i].requested.map_or(u64::MAX, |u| u64::from(u.get())));
            let mut uids = vec![0u32; pending.len()];
            let mut next = list.next_uid();
            for &i in &by_uid {
                let uid = match pending[i].requested {
                    Some(r) if r.get() >= next => r.get(),
                    _ => next,
                };
                if uid > MAX_UID {
                    return Err(StoreError::uid_space_exhausted(&name, uid));
                }
                uids[i] = uid;
                next = uid + 1; // at most u32::MAX, since uid <= MAX_UID
            }
            if kw_changed {
                kwmap.write(&self.dir)?;
            }
            Ok((kwmap, resolved, by_uid, uids))
        })();
        let (kwmap, mut resolved, by_uid, uids) = match prepared {
            Ok(p) => p,
            Err(e) => {
                for p in &pending {
                    let _ = fs::remove_file(&p.tmp);
                }
                drop(lock);
                return Err(e);
            }
        };
        let mut records = Vec::with_capacity(pending.len());
        let mut placed: Vec<(usize, Mail)> = Vec::with_capacity(pending.len());
        let mut used_new = false;
        let mut used_cur = false;
        let outcome = (|| {
            for &i in &by_uid {
                let p = &pending[i];
                let (kw, extra) = std::mem::take(&mut resolved[i]);
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
                used_new |= in_new;
                used_cur |= !in_new;
                let uid = uids[i];
                records.push(Record { uid, base: base.clone(), guid: guid_ext.clone(), other_exts: String::new() });
                let guid_ext = guid_ext.map(String::into_boxed_str);
                placed.push((i, Mail::new(uid, 0, in_new, guid_ext, &dest, &mut self.names, extra)?));
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
        self.keywords = kwmap;
        self.uidlist_cache = Some(list.header_only());
        // 3. Our index: one modseq for the whole commit, or during an import one per mail, as
        // Dovecot's importer gives them (each raised to its min_modseq). `placed` is in
        // ascending UID order, above every UID we hold.
        let base_modseq = self.import_modseq.unwrap_or(self.header.highest_modseq.saturating_add(1));
        let per_mail = self.importing && self.import_modseq.is_none();
        let mut lines = String::new();
        let mut saved: Vec<Option<SavedMail>> = vec![None; pending.len()];
        // Grown by an eighth rather than doubled: the list of a large mailbox is the largest
        // thing a sync holds, and doubling it for a few new mails would double the peak.
        if self.mails.capacity() - self.mails.len() < placed.len() {
            self.mails.reserve_exact(placed.len().max(self.mails.len() / 8));
        }
        let sorted = match (self.mails.last(), placed.first()) {
            (Some(last), Some((_, first))) => last.uid < first.uid,
            _ => true,
        };
        for (i, mut m) in placed {
            let p = &pending[i];
            let base = if per_mail { self.header.highest_modseq.saturating_add(1) } else { base_modseq };
            m.modseq = base.max(p.min_modseq);
            self.header.highest_modseq = self.header.highest_modseq.max(m.modseq);
            index::push_mail_line(&mut lines, &m.line(&self.names));
            saved[i] = Some(SavedMail {
                requested: p.requested,
                uid: Uid::new(m.uid).unwrap_or(Uid::MIN),
                guid: MailGuid::new(m.guid(&self.names))?,
            });
            self.counts.add(m.flags, m.in_new);
            self.used_kw |= m.kw;
            if let Some(h) = &mut self.base_hashes {
                h.insert(base_hash(filename::base(m.file(&self.names))));
            }
            self.mails.push(m);
        }
        if !sorted {
            // Only if another writer lowered the uidlist's UIDs under us (a damaged file).
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
        Ok(saved.into_iter().flatten().collect())
    }

    /// Letters and ids of keywords already known (without allocating); `None` if any is new.
    fn lookup_keywords(&self, keywords: &[Keyword]) -> Option<(KeywordMask, Vec<u16>)> {
        let mut mask = 0;
        let mut ids = Vec::new();
        for kw in keywords {
            if let Some(i) = self.keywords.letter_of(kw) {
                mask |= 1 << i;
            } else {
                let id = self.extra_kw.id_of(kw)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Some((mask, ids))
    }

    /// Every letter and id that stands for one of `keywords`, for removing them; keywords
    /// nobody uses are skipped (they cannot be on any mail).
    fn keywords_to_remove(&self, keywords: &[Keyword]) -> (KeywordMask, Vec<u16>) {
        let mut mask = 0;
        let mut ids = Vec::new();
        for kw in keywords {
            if let Some(i) = self.keywords.letter_of(kw) {
                mask |= 1 << i;
            }
            if let Some(id) = self.extra_kw.id_of(kw) {
                ids.push(id);
            }
        }
        (mask, ids)
    }

    /// Letters and ids for keywords to add or set, allocating what is missing: free letters
    /// first (under the uidlist lock, written to `dovecot-keywords`), then ids in our index.
    fn resolve_keywords(&mut self, keywords: &[Keyword]) -> StoreResult<(KeywordMask, Vec<u16>)> {
        if let Some(known) = self.lookup_keywords(keywords) {
            return Ok(known);
        }
        let (lock, _list) = self.lock_uidlist(false)?;
        let mut map = read_keywords_for_update(&self.dir, self.used_kw)?;
        let (mask, ids, changed) = assign_keywords(&mut map, &mut self.extra_kw, keywords)?;
        if changed {
            map.write(&self.dir)?;
        }
        lock.release()?;
        self.keywords = map;
        Ok((mask, ids))
    }

    /// Compacts the index if many lines were appended since the last rewrite.
    fn maybe_compact(&mut self) -> StoreResult<()> {
        if self.partial {
            return Ok(()); // knows too little to write a snapshot; the next full open will
        }
        if self.appended > 1000 && self.appended > self.counts.messages as usize / 4 {
            self.write_snapshot(None)?;
        }
        Ok(())
    }

    /// Is `base` the base name of one of our mails or pending saves? A set of hashes answers
    /// in O(1); only a hit is confirmed by a scan (a real duplicate, which is rare).
    fn base_in_use(&mut self, base: &str) -> StoreResult<bool> {
        let h = base_hash(base);
        let set = match &mut self.base_hashes {
            Some(set) => set,
            None => {
                let names = &self.names;
                let all = self
                    .mails
                    .iter_releasing()
                    .filter(|m| !m.gone)
                    .map(|m| base_hash(filename::base(m.file(names))))
                    .chain(self.pending.iter().map(|p| base_hash(&p.base)));
                let set = SpillSet::build(spill::dir(&self.dir), all)
                    .map_err(|e| StoreError::io("read", self.dir.clone(), e))?;
                self.base_hashes.insert(set)
            }
        };
        Ok(set.contains(h)
            && (self.mails.iter_releasing().any(|m| !m.gone && filename::base(m.file(&self.names)) == base)
                || self.pending.iter().any(|p| p.base == base)))
    }

    /// Clears `tmp/` of what dead writers left, once per handle, before its first write there.
    fn clean_tmp_once(&mut self) {
        if self.tmp_cleaned {
            return;
        }
        self.tmp_cleaned = true;
        let tmp = self.dir.join("tmp");
        if let Err(e) = tmpclean::clean(&tmp, &self.ctx.hostname, &self.ctx.names) {
            tracing::warn!("cleaning {}: {e}", tmp.display());
        }
    }
}

/// Re-reads `dovecot-keywords` (caller holds the uidlist lock) before allocating letters,
/// reserving the letters our mails carry without a name (`used`) so that none is reused.
fn read_keywords_for_update(dir: &Path, used: KeywordMask) -> StoreResult<KeywordMap> {
    let mut map = KeywordMap::read(dir)?;
    map.reserve(used);
    Ok(map)
}

/// Letters for keywords (free letters handed out while any is left), ids in our index for the
/// rest. Returns the mask, the ids (each once, in the order given) and whether the letter map
/// changed (and must be written before any file uses it).
fn assign_keywords(
    map: &mut KeywordMap,
    extra: &mut ExtraKeywords,
    keywords: &[Keyword],
) -> StoreResult<(KeywordMask, Vec<u16>, bool)> {
    let (mask, changed, left) = map.assign(keywords);
    let mut ids = Vec::with_capacity(left.len());
    for pos in left {
        let id = extra.id_for(&keywords[pos])?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok((mask, ids, changed))
}

/// The uidlist to write for a damaged file: its own header if readable, else the identity in
/// `fallback` (UIDVALIDITY, mailbox GUID, next UID: from our index, or new); the records that
/// can stay; a next UID above every UID seen in the file, and above the fallback's if the
/// identity is the same.
fn salvaged_list(sv: &mut Salvage, fallback: (u32, Option<Guid128>, u32)) -> Uidlist {
    let (uv, guid, next) = fallback;
    let mut l = sv.header.take().unwrap_or_else(|| {
        let mut l = Uidlist::new(uv, Guid128::EMPTY);
        l.guid = guid;
        l
    });
    if l.uid_validity == uv {
        l.header_next_uid = l.header_next_uid.max(next);
    }
    l.records = std::mem::take(&mut sv.records);
    l.last_uid = l.records.last().map_or(0, |r| r.uid);
    l.header_next_uid = l.header_next_uid.max(sv.max_uid_seen.saturating_add(1));
    l.version = 3;
    l.complete = true;
    l
}

/// Makes Dovecot look at the mailbox again after a repaired uidlist gave files new UIDs:
/// Dovecot rescans (and re-reads the uidlist) only when the mtime of `new/` or `cur/` changed
/// (`maildir_sync_quick_check`), and a repair changes neither. Until then it would keep the
/// old UIDs in its index and report those mails expunged when it looks for their files.
fn nudge_dovecot(dir: &Path) {
    for sub in ["new", "cur"] {
        let d = dir.join(sub);
        if let Err(e) = File::open(&d).and_then(|f| f.set_modified(SystemTime::now())) {
            tracing::warn!("touching {}: {e}", d.display());
        }
    }
}

/// After a UIDVALIDITY change: removes Dovecot's index of the mailbox (when it is kept in the
/// mailbox's directory, Dovecot's default), which describes UIDs that no longer mean anything.
/// Dovecot rebuilds it from the Maildir at its next look, as it does after changing the
/// UIDVALIDITY itself; left in place, it makes Dovecot warn "UIDVALIDITY changed" and reset
/// it then. Only Dovecot's index files are removed: flags and keywords live in the file names
/// and `dovecot-keywords`, UIDs in the uidlist.
fn forget_dovecot_index(dir: &Path, old: u32, new: u32) {
    let mut removed = 0;
    for name in ["dovecot.index", "dovecot.index.log", "dovecot.index.log.2", "dovecot.index.cache"] {
        let p = dir.join(name);
        match fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", p.display()),
        }
    }
    if removed > 0 {
        tracing::info!(
            mailbox = %dir.display(),
            "UIDVALIDITY changed from {old} to {new}: Dovecot's index of the mailbox removed (Dovecot rebuilds it)"
        );
    }
}

/// The one warning for a repaired uidlist: what was kept and what was dropped.
fn warn_salvaged(path: &Path, sv: &Salvage, list: &Uidlist, new_uids: usize, first_new: u32) {
    const SHOWN: usize = 10;
    let mut dropped: Vec<String> = sv.problems.iter().take(SHOWN).cloned().collect();
    if sv.problems.len() > SHOWN {
        dropped.push(format!("and {} more", sv.problems.len() - SHOWN));
    }
    let new = if new_uids > 0 {
        format!("{new_uids} files got new UIDs from {first_new}")
    } else {
        "files that lost their UID get new ones at the next full open".to_owned()
    };
    tracing::warn!(
        file = %path.display(),
        "damaged uidlist rebuilt: UIDVALIDITY {} and mailbox GUID {} kept, {} of {} records kept their UIDs, next \
         UID {}; {new}; dropped: {}",
        list.uid_validity,
        list.guid.map_or_else(|| "(new)".to_owned(), |g| g.to_string()),
        sv.kept,
        sv.lines,
        list.next_uid(),
        if dropped.is_empty() { "nothing".to_owned() } else { dropped.join("; ") }
    );
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
            messages: self.counts.messages,
            unseen: self.counts.unseen,
            recent: self.counts.recent,
            first_recent_uid: self.header.first_recent_uid.max(1),
            highest_modseq: self.header.highest_modseq,
            replicated_modseq: self.header.replicated_modseq,
            peer_modseq: self.header.peer_modseq,
            history_lost: self.header.history_lost,
            log_floor: self.header.log_floor,
            other_index_modseq: self.dovecot_applied.flatten(),
        }
    }

    fn mails(&self) -> Vec<MailRecord> {
        self.mails.iter_releasing().filter(|m| !m.gone).map(|m| self.record(m)).collect()
    }

    fn uids(&self) -> Vec<Uid> {
        self.mails.iter_releasing().filter(|m| !m.gone).filter_map(|m| Uid::new(m.uid)).collect()
    }

    fn uid_after(&self, after: u32) -> Option<Uid> {
        // The first UID above `after`: its position, found or not, is where `after + 1` goes.
        let start = match after.checked_add(1) {
            Some(next) => self.mails.search_by_key(next, |m| m.uid).unwrap_or_else(|i| i),
            None => return None,
        };
        self.mails[start..].iter().find(|m| !m.gone).and_then(|m| Uid::new(m.uid))
    }

    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn uids_above(&self, after: u32) -> (usize, Option<Uid>) {
        // Expunged mails not swept out yet are counted: this sizes tables, it does not list.
        let n = self.mails.len() - self.mails.partition_point(|m| m.uid <= after);
        (n, self.mails.iter().rev().find(|m| !m.gone).and_then(|m| Uid::new(m.uid)))
    }

    fn mail(&self, uid: Uid) -> Option<MailRecord> {
        self.find(uid).map(|i| self.record(&self.mails[i]))
    }

    fn changes_since(&self, since: Modseq) -> Option<Vec<Change>> {
        let mut out = Vec::new();
        self.each_change_since(since, &mut |c| out.push(c)).then_some(out)
    }

    fn each_change_since(&self, since: Modseq, each: &mut dyn FnMut(Change)) -> bool {
        if since != 0 && (since < self.header.log_floor || self.header.history_lost) {
            return false;
        }
        let with_extra = |mask: KeywordMask, ids: &[u16]| {
            let mut v = self.keywords.keywords(mask);
            v.extend(ids.iter().filter_map(|&id| self.extra_kw.name(id)).cloned());
            v
        };
        for e in self.log.iter() {
            if e.modseq() <= since {
                continue;
            }
            // UID 0 is never logged.
            let change = match e {
                LogEntry::Flags { modseq, uid, added, removed, kw_added, kw_removed, extra } => {
                    Uid::new(uid).map(|uid| Change::Flags {
                        uid,
                        modseq,
                        added,
                        removed,
                        keywords_added: with_extra(kw_added, extra.as_ref().map_or(&[], |x| &x.added)),
                        keywords_removed: with_extra(kw_removed, extra.as_ref().map_or(&[], |x| &x.removed)),
                    })
                }
                LogEntry::Expunge { modseq, uid, guid } => {
                    Uid::new(uid).map(|uid| Change::Expunge { uid, modseq, guid })
                }
            };
            if let Some(c) = change {
                each(c);
            }
        }
        true
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
        if let Some(s) = filename::size_field(self.mails[idx].file(&self.names), b'S') {
            return Ok(s);
        }
        let (f, idx) = self.open_file(uid)?;
        Ok(f.metadata().ctx("fstat", &self.path_of(&self.mails[idx]))?.len())
    }

    fn virtual_size(&mut self, uid: Uid) -> StoreResult<u64> {
        let idx = self.find(uid).ok_or(StoreError::MailNotFound(uid.get()))?;
        if let Some(s) = filename::size_field(self.mails[idx].file(&self.names), b'W') {
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
        if self.partial && (request.guid.is_some() || !request.keywords.is_empty()) {
            // Keeping a GUID must know every base name in use, and new keyword letters must
            // know every letter in use: both need the full picture.
            self.load()?;
            self.partial = false;
        }
        self.clean_tmp_once();
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
        let keep_name = match &request.guid {
            Some(g)
                if filename::valid_base(g.as_str())
                    && filename::size_field(g.as_str(), b'S') == Some(size)
                    && filename::size_field(g.as_str(), b'W') == Some(vsize) =>
            {
                match self.base_in_use(g.as_str()) {
                    Ok(used) => !used,
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
            _ => false,
        };
        let (base, guid_ext) = match &request.guid {
            Some(g) if keep_name => (g.as_str().to_owned(), None),
            Some(g) => (format!("{},S={size},W={vsize}", self.ctx.names.next()), Some(g.as_str().to_owned())),
            None => (format!("{},S={size},W={vsize}", tmp.file_name().and_then(|n| n.to_str()).unwrap_or("x")), None),
        };
        if let Some(h) = &mut self.base_hashes {
            h.insert(base_hash(&base));
        }
        self.push_pending(Pending {
            tmp,
            file: Some(file),
            base,
            guid_ext,
            requested: request.uid,
            flags: request.flags.stored(),
            keywords: request.keywords,
            min_modseq: request.min_modseq,
            move_from: None,
        })
    }

    fn commit(&mut self) -> StoreResult<Vec<SavedMail>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.commit_inner()
    }

    fn save_copy_of_last(&mut self, request: SaveRequest) -> StoreResult<()> {
        for k in &request.keywords {
            Keyword::new(k.as_str())?;
        }
        let last = self
            .pending
            .iter()
            .rev()
            .find(|p| p.move_from.is_none())
            .ok_or_else(|| StoreError::NotPossible("no staged mail to copy".to_owned()))?;
        // The copy is a second name for the same file: no data is written twice. Its base name
        // must be new (Maildir names are unique), so the GUID goes to the uidlist.
        let guid = match &request.guid {
            Some(g) => g.as_str().to_owned(),
            None => last.guid_ext.clone().unwrap_or_else(|| last.base.clone()),
        };
        let sizes = last.base.find(",S=").map(|i| last.base[i..].to_owned()).unwrap_or_default();
        let src = last.tmp.clone();
        let tmp = self.dir.join("tmp").join(self.ctx.names.next());
        fs::hard_link(&src, &tmp).ctx("link", &tmp)?;
        // No descriptor: the data is the last save's, synced through its own entry.
        self.push_pending(Pending {
            tmp,
            file: None,
            base: format!("{}{}", self.ctx.names.next(), sizes),
            guid_ext: Some(guid),
            requested: request.uid,
            flags: request.flags.stored(),
            keywords: request.keywords,
            min_modseq: request.min_modseq,
            move_from: None,
        })
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
        let (mask, ids) = match op {
            FlagOp::Remove => self.keywords_to_remove(keywords),
            _ => self.resolve_keywords(keywords)?,
        };
        let flags = flags.stored();
        for attempt in 0..2 {
            let m = &self.mails[idx];
            let (nf, nkw) = match op {
                FlagOp::Add => (m.flags | flags, m.kw | mask),
                FlagOp::Remove => (m.flags & !flags, m.kw & !mask),
                FlagOp::Replace => (flags, mask),
            };
            let nextra: Box<[u16]> = match op {
                FlagOp::Add => m
                    .extras(&self.names)
                    .iter()
                    .copied()
                    .chain(ids.iter().copied().filter(|i| !m.extras(&self.names).contains(i)))
                    .collect(),
                FlagOp::Remove => m.extras(&self.names).iter().copied().filter(|i| !ids.contains(i)).collect(),
                FlagOp::Replace => ids.clone().into_boxed_slice(),
            };
            let file_changes = (nf, nkw) != (m.flags, m.kw);
            let import = self.importing;
            if !file_changes && *nextra == *m.extras(&self.names) {
                if min_modseq > m.modseq {
                    // Only the modseq is raised, to exactly the value asked for (Dovecot's
                    // modseq update), not past it.
                    let modseq = self.import_modseq.unwrap_or(min_modseq).max(min_modseq);
                    self.header.highest_modseq = self.header.highest_modseq.max(modseq);
                    self.mails[idx].modseq = modseq;
                    let mut lines = index::mail_line(&self.mails[idx].line(&self.names));
                    lines.push_str(&index::header_line(&self.header));
                    self.append_index(&lines)?;
                }
                return Ok(());
            }
            let mut newfile = None;
            if file_changes {
                // Keywords without a letter are not in the file name: only letters rename it.
                let name = filename::with_flags(m.file(&self.names), nf, nkw);
                let sub = if m.in_new { "new" } else { "cur" };
                let from = self.dir.join(sub).join(m.file(&self.names));
                let to = self.dir.join(sub).join(&name);
                match renameat2(AT_FDCWD, &from, AT_FDCWD, &to, RenameFlags::RENAME_NOREPLACE) {
                    Ok(()) => newfile = Some(name),
                    Err(nix::errno::Errno::ENOENT) if attempt == 0 => {
                        if !self.relocate(idx)? {
                            return Err(StoreError::MailNotFound(uid.get()));
                        }
                        continue;
                    }
                    Err(e) => return Err(StoreError::io("rename", from, io::Error::from(e))),
                }
            }
            let modseq = self.next_modseq(min_modseq);
            let m = &mut self.mails[idx];
            let (of, okw) = (m.flags, m.kw);
            if let Some(name) = newfile {
                m.rename(&mut self.names, &name)?;
                self.dirs_dirty = true;
            }
            self.counts.sub(of, m.in_new);
            self.counts.add(nf, m.in_new);
            self.used_kw |= nkw;
            let old_extras = m.replace_extras(&mut self.names, nextra);
            m.flags = nf;
            m.kw = nkw;
            m.modseq = modseq;
            let mut lines = String::new();
            // An import's own changes are not logged: they came from the peer and must not be
            // taken for ours (Dovecot's log scan skips its sync transactions). A user's command
            // is logged as Dovecot's index logs it: the system flags and the keywords each as
            // asked (a replace removes every other flag, and every keyword it does not keep),
            // where that part changed anything, and not at all where it did not.
            if !import {
                let flags_changed = nf != of;
                let kw_changed = nkw != okw || *m.extras(&self.names) != *old_extras;
                let (added, removed) = match (op, flags_changed) {
                    (_, false) => (Flags::NONE, Flags::NONE),
                    (FlagOp::Add, true) => (flags, Flags::NONE),
                    (FlagOp::Remove, true) => (Flags::NONE, flags),
                    (FlagOp::Replace, true) => (flags, Flags::ALL_STORED & !flags),
                };
                let (kw_added, kw_removed, x_added, x_removed): (_, _, Box<[u16]>, Box<[u16]>) = match (op, kw_changed)
                {
                    (_, false) => (0, 0, Box::default(), Box::default()),
                    (FlagOp::Add, true) => (mask, 0, ids.into_boxed_slice(), Box::default()),
                    (FlagOp::Remove, true) => (0, mask, Box::default(), ids.into_boxed_slice()),
                    (FlagOp::Replace, true) => (
                        nkw,
                        okw & !nkw,
                        m.extras(&self.names).into(),
                        old_extras.iter().copied().filter(|i| !m.extras(&self.names).contains(i)).collect(),
                    ),
                };
                let entry = LogEntry::Flags {
                    modseq,
                    uid: m.uid,
                    added,
                    removed,
                    kw_added,
                    kw_removed,
                    extra: ExtraChange::boxed(x_added, x_removed),
                };
                lines = index::log_line(&entry);
                self.log.push_back(entry);
            }
            let m = &self.mails[idx];
            index::push_mail_line(&mut lines, &m.line(&self.names));
            lines.push_str(&index::header_line(&self.header));
            return self.append_index(&lines);
        }
        Err(StoreError::MailNotFound(uid.get()))
    }

    fn expunge(&mut self, uids: &[Uid]) -> StoreResult<()> {
        let mut lines = String::new();
        let mut any = false;
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
                let m = &mut self.mails[idx];
                let entry =
                    LogEntry::Expunge { modseq, uid: m.uid, guid: Guid128::from_mail_guid(m.guid(&self.names)) };
                lines.push_str(&index::log_line(&entry));
                self.log.push_back(entry);
                m.gone = true;
                self.removed += 1;
                self.counts.sub(m.flags, m.in_new);
                if let Some(h) = &mut self.base_hashes {
                    h.remove(base_hash(filename::base(m.file(&self.names))));
                }
                any = true;
                self.dirs_dirty = true;
                // The lines of many expunges go out in pieces, each closed by the header (the
                // modseqs so far), so that they need not all be held.
                if lines.len() >= EXPUNGE_LINES_PIECE {
                    lines.push_str(&index::header_line(&self.header));
                    self.append_index(&lines)?;
                    lines.clear();
                }
            }
        }
        if !any {
            return Ok(());
        }
        if !lines.is_empty() {
            lines.push_str(&index::header_line(&self.header));
            self.append_index(&lines)?;
        }
        self.maybe_sweep();
        Ok(())
    }

    fn stage_move(&mut self, from: Uid, to: Uid) -> StoreResult<()> {
        let idx = self.find(from).ok_or(StoreError::MailNotFound(from.get()))?;
        self.clean_tmp_once();
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
        // No descriptor: the linked mail is already durable, and the link itself becomes so
        // with the directory fsyncs of the commit.
        let m = &self.mails[idx];
        let old_base = filename::base(m.file(&self.names));
        let sizes = old_base.find(",S=").map(|i| old_base[i..].to_owned()).unwrap_or_default();
        self.push_pending(Pending {
            tmp,
            file: None,
            base: format!("{}{}", self.ctx.names.next(), sizes),
            guid_ext: Some(m.guid(&self.names).to_owned()),
            requested: Some(to),
            flags: m.flags,
            keywords: self.keywords_of(m),
            min_modseq: 0,
            move_from: Some(from),
        })
    }

    fn update(&mut self, update: &MailboxUpdate) -> StoreResult<()> {
        // Refused before anything changes.
        if update.uid_validity == Some(0) {
            return Err(StoreError::NotPossible("UIDVALIDITY 0 is not allowed".to_owned()));
        }
        if let Some(n) = update.min_next_uid
            && n > MAX_UID
        {
            return Err(StoreError::next_uid_too_high(&self.name.join(self.ctx.sep), n));
        }
        let header_change = update.uid_validity.is_some_and(|v| v != self.uid_validity)
            || update.guid.is_some_and(|g| g != self.guid)
            || update.min_next_uid.is_some_and(|n| n > self.next_uid);
        if header_change {
            let (lock, mut list) = self.lock_uidlist(true)?;
            if let Some(v) = update.uid_validity {
                list.uid_validity = v;
            }
            if let Some(g) = update.guid {
                list.guid = Some(g);
            }
            if let Some(n) = update.min_next_uid {
                list.header_next_uid = list.header_next_uid.max(n);
            }
            self.uidlist_cache = None;
            list.rewrite(&self.dir, |_| true)?;
            lock.release()?;
            self.uidlist_cache = Some(list.header_only());
            let old_validity = self.uid_validity;
            let old_next_uid = self.next_uid;
            self.uid_validity = list.uid_validity;
            self.guid = list.guid.unwrap_or_default();
            self.next_uid = list.next_uid();
            if self.next_uid > old_next_uid {
                // Otherwise Dovecot's index would go on reporting the old UIDNEXT until
                // the next delivery (its own saves read the uidlist, so no UID is reused).
                fsutil::touch_dir(&self.dir.join("cur"))?;
            }
            if old_validity != self.uid_validity {
                forget_dovecot_index(&self.dir, old_validity, self.uid_validity);
            }
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
        if let Some(m) = update.peer_modseq {
            h.peer_modseq = m;
        }
        if let Some(m) = update.replicated_modseq {
            h.replicated_modseq = m;
        }
        if update.clear_history_lost {
            h.history_lost = false;
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
        self.importing = false;
        self.import_modseq = None;
        self.load()
    }

    fn begin_import(&mut self, one_modseq: Option<Modseq>) {
        self.importing = true;
        self.import_modseq = one_modseq.map(|m| m.max(self.header.highest_modseq));
    }

    fn sync_point(&mut self) -> StoreResult<()> {
        self.importing = false;
        self.import_modseq = None;
        if self.dirs_dirty {
            fsutil::fsync_dir(&self.dir.join("cur"))?;
            fsutil::fsync_dir(&self.dir.join("new"))?;
            self.dirs_dirty = false;
        }
        if let Some(a) = &mut self.appender {
            a.sync()?;
        }
        self.compact_names();
        Ok(())
    }
}

/// A mailbox opened only to add mails, as a delivery does: opening it costs the same for ten
/// mails or a million, because it neither scans the directories nor reads our whole index
/// (Dovecot's own saves likewise sync only the uidlist). Mails already there, and changes
/// others made, are picked up by the next full open, exactly as after any other writer.
///
/// Saving and committing are [`Mailbox::save`] and [`Mailbox::commit`] of a full handle, with
/// the same durability; a request that keeps a GUID or sets keywords first loads the mailbox.
#[derive(Debug)]
pub struct MaildirAppender(MaildirMailbox);

impl MaildirAppender {
    pub(crate) fn new(mb: MaildirMailbox) -> Self {
        Self(mb)
    }

    /// Stages a mail (see [`Mailbox::save`]).
    pub fn save(&mut self, request: SaveRequest, body: &mut dyn Read) -> StoreResult<()> {
        self.0.save(request, body)
    }

    /// Makes the staged mails visible and durable (see [`Mailbox::commit`]).
    pub fn commit(&mut self) -> StoreResult<Vec<SavedMail>> {
        self.0.commit()
    }

    /// Makes everything durable (see [`Mailbox::sync_point`]).
    pub fn sync_point(&mut self) -> StoreResult<()> {
        self.0.sync_point()
    }

    /// True if the mailbox was opened without a scan.
    pub fn is_partial(&self) -> bool {
        self.0.partial
    }
}
