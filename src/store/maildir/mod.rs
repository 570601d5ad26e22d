//! A Dovecot-compatible Maildir store: Dovecot can serve the same files at the same time.
//!
//! ```text
//! ~/Maildir/                      the root = INBOX (Maildir++), or INBOX=PATH
//!   cur/ new/ tmp/                mails (file names carry size, flags, keyword letters)
//!   dovecot-uidlist               UIDs, UIDVALIDITY, mailbox GUID    (uidlist.rs)
//!   dovecot-keywords              keyword letters                    (keywords.rs)
//!   mailreplica-index             our modseqs and change log         (index.rs)
//!   dovecot-uidvalidity[.XXXX]    UIDVALIDITY counter                (uidvalidity.rs)
//!   dovecot.mailbox.log[.2]       deletes, renames, subscriptions    (mailbox_log.rs)
//!   subscriptions                                                    (subscriptions.rs)
//!   .Archive.2024/                a child mailbox (Maildir++: `.`-separated, modified UTF-7)
//!     maildirfolder  cur/ new/ tmp/  dovecot-uidlist ...
//! ```
//!
//! With `LAYOUT=fs` children are nested directories (`Archive/2024/`) and the separator is `/`.

mod change_log;
mod delete;
mod dotlock;
mod dovecot_log;
mod filename;
mod fsutil;
mod index;
mod keywords;
mod mailbox;
mod mailbox_log;
mod names;
mod scan;
mod subscriptions;
mod synclock;
#[cfg(test)]
mod tests;
mod tmpclean;
mod uidlist;
mod uidvalidity;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use mailbox::{MaildirAppender, MaildirMailbox};
use subscriptions::NameCodec;

use crate::store::error::{IoContext, StoreResult};
use crate::store::{
    Guid128, ListChange, ListChangeKind, MailStore, MailboxInfo, MailboxKind, MailboxName, StoreError, mutf7,
};

/// Directory layout of the mailbox tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Courier's Maildir++: `.A.B/` directories under the root, separator `.`.
    MaildirPlusPlus,
    /// `LAYOUT=fs`: nested `A/B/` directories, separator `/`.
    Fs,
}

impl Layout {
    /// The hierarchy separator of this layout.
    pub fn separator(self) -> char {
        match self {
            Self::MaildirPlusPlus => '.',
            Self::Fs => '/',
        }
    }
}

/// Where and how a Maildir store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildirSettings {
    /// The root directory (e.g. `~/Maildir`).
    pub root: PathBuf,
    /// INBOX's directory when it is not the root (`:INBOX=`).
    pub inbox: Option<PathBuf>,
    /// Dovecot's index root (`:INDEX=`), where `dovecot.mailbox.log` lives; the root if `None`.
    pub index_root: Option<PathBuf>,
    /// Layout of children.
    pub layout: Layout,
    /// Directory names in UTF-8 instead of modified UTF-7 (`:UTF-8`).
    pub utf8: bool,
    /// Host name for lock files and new file names.
    pub hostname: String,
    /// How long to wait for `dovecot-uidlist.lock`.
    pub lock_wait: Duration,
    /// The user's home directory, where the dsync lock lives (`None`: the mail root's parent).
    pub home: Option<PathBuf>,
}

impl MaildirSettings {
    /// Settings for a Maildir++ store at `root` with this host's name.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            inbox: None,
            index_root: None,
            layout: Layout::MaildirPlusPlus,
            utf8: false,
            hostname: fsutil::hostname(),
            lock_wait: dotlock::DEFAULT_WAIT,
            home: None,
        }
    }
}

/// Shared by the store and its open mailboxes.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) root: PathBuf,
    pub(crate) hostname: String,
    pub(crate) names: filename::UniqueNames,
    pub(crate) lock_wait: Duration,
    pub(crate) sep: char,
    /// Dovecot's index root (`:INDEX=`), when not the mail root: where Dovecot's index of a
    /// mailbox is, whose HIGHESTMODSEQ ours follows (see `dovecot_log`).
    pub(crate) index_root: Option<PathBuf>,
}

/// Name of the directory Dovecot renames a Maildir++ mailbox to while deleting it.
const TRASH_DIR: &str = delete::MAILDIRPP_TRASH;

/// A Maildir mail store.
#[derive(Debug)]
pub struct Maildir {
    settings: MaildirSettings,
    ctx: Arc<Ctx>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}

fn mkdir(path: &Path) -> StoreResult<bool> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StoreError::io("mkdir", path, e)),
    }
}

fn is_dir(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_dir())
}

impl Maildir {
    /// Opens the store, creating the root and the INBOX if they are missing (as Dovecot does).
    /// The root's parent (normally the home directory) must exist.
    pub fn open(settings: MaildirSettings) -> StoreResult<Self> {
        let root = &settings.root;
        if !is_dir(root) {
            let parent = root.parent().unwrap_or(Path::new("/"));
            if !is_dir(parent) {
                return Err(StoreError::io(
                    "stat",
                    parent,
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "the directory that should hold the mail root does not exist",
                    ),
                ));
            }
            mkdir(root)?;
        }
        let ctx = Arc::new(Ctx {
            root: root.clone(),
            hostname: settings.hostname.clone(),
            names: filename::UniqueNames::new(&settings.hostname),
            lock_wait: settings.lock_wait,
            sep: settings.layout.separator(),
            index_root: settings.index_root.clone(),
        });
        let store = Self { settings, ctx };
        store.ensure_inbox()?;
        Ok(store)
    }

    /// The settings the store was opened with.
    pub fn settings(&self) -> &MaildirSettings {
        &self.settings
    }

    fn codec(&self) -> NameCodec {
        NameCodec { sep: self.settings.layout.separator(), utf8: self.settings.utf8 }
    }

    fn inbox_dir(&self) -> PathBuf {
        self.settings.inbox.clone().unwrap_or_else(|| self.settings.root.clone())
    }

    fn ensure_inbox(&self) -> StoreResult<()> {
        let dir = self.inbox_dir();
        if is_dir(&dir.join("cur")) {
            return Ok(());
        }
        mkdir(&dir)?;
        for sub in ["cur", "new", "tmp"] {
            mkdir(&dir.join(sub))?;
        }
        Ok(())
    }

    fn encode_level(&self, level: &str) -> String {
        if self.settings.utf8 { level.to_owned() } else { mutf7::encode(level) }
    }

    /// The directory of a mailbox. Fails for names that cannot be stored in this layout.
    pub fn mailbox_dir(&self, name: &MailboxName) -> StoreResult<PathBuf> {
        if name.is_inbox() {
            return Ok(self.inbox_dir());
        }
        let bad =
            |reason| StoreError::BadName(crate::store::types::BadMailboxName { name: name.join(self.ctx.sep), reason });
        match self.settings.layout {
            Layout::MaildirPlusPlus => {
                let mut dir = String::from(".");
                for (i, c) in name.components().iter().enumerate() {
                    if c.contains('.') {
                        return Err(bad("a hierarchy level contains the separator `.`"));
                    }
                    if i > 0 {
                        dir.push('.');
                    }
                    dir.push_str(&self.encode_level(c));
                }
                if dir.len() > 255 {
                    return Err(bad("name too long"));
                }
                Ok(self.settings.root.join(dir))
            }
            Layout::Fs => {
                let mut p = self.settings.root.clone();
                for c in name.components() {
                    // Dovecot's rule (mailbox_list_is_valid_fs_name): Maildir's own directory
                    // names are reserved; `.`/`..` are refused by `MailboxName` itself. A level
                    // that merely starts with `.` is an ordinary mailbox for Dovecot.
                    if matches!(c.as_str(), "cur" | "new" | "tmp") {
                        return Err(bad("a hierarchy level is `cur`, `new` or `tmp`"));
                    }
                    p.push(self.encode_level(c));
                }
                Ok(p)
            }
        }
    }

    /// True if `name` is a selectable mailbox (its directory has `cur/`). Fails only for names
    /// this layout cannot store.
    pub fn mailbox_exists(&self, name: &MailboxName) -> StoreResult<bool> {
        Ok(is_dir(&self.mailbox_dir(name)?.join("cur")))
    }

    fn decode_level(&self, level: &str) -> Option<String> {
        if self.settings.utf8 { Some(level.to_owned()) } else { mutf7::decode(level).ok() }
    }

    /// Every directory that holds or could hold a mailbox, by name.
    fn scan_tree(&self) -> StoreResult<BTreeMap<MailboxName, PathBuf>> {
        let mut out = BTreeMap::new();
        let root = &self.settings.root;
        match self.settings.layout {
            Layout::MaildirPlusPlus => {
                for e in fs::read_dir(root).ctx("opendir", root)? {
                    let e = e.ctx("readdir", root)?;
                    let fname = e.file_name();
                    let Some(fname) = fname.to_str() else {
                        continue;
                    };
                    let Some(enc) = fname.strip_prefix('.') else {
                        continue;
                    };
                    if enc.is_empty() || enc == "." || fname.starts_with(TRASH_DIR) {
                        continue;
                    }
                    let path = e.path();
                    if !is_dir(&path) {
                        continue;
                    }
                    let levels: Option<Vec<String>> = enc.split('.').map(|l| self.decode_level(l)).collect();
                    match levels.map(MailboxName::from_components) {
                        Some(Ok(n)) if !n.is_inbox() => {
                            out.insert(n, path);
                        }
                        _ => {
                            tracing::warn!(dir = %path.display(), "skipping a directory that is not a valid mailbox name")
                        }
                    }
                }
            }
            Layout::Fs => {
                let mut stack = vec![(Vec::<String>::new(), root.clone())];
                while let Some((prefix, dir)) = stack.pop() {
                    let rd = match fs::read_dir(&dir) {
                        Ok(rd) => rd,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::io("opendir", dir, e)),
                    };
                    for e in rd {
                        let e = e.ctx("readdir", &dir)?;
                        let fname = e.file_name();
                        let Some(fname) = fname.to_str() else {
                            continue;
                        };
                        // Dovecot lists every directory but `.`, `..` and Maildir's own.
                        if matches!(fname, "." | ".." | "cur" | "new" | "tmp") {
                            continue;
                        }
                        let path = e.path();
                        if !is_dir(&path) {
                            continue;
                        }
                        let Some(level) = self.decode_level(fname) else {
                            continue;
                        };
                        let mut parts = prefix.clone();
                        parts.push(level);
                        if let Ok(n) = MailboxName::from_components(parts.clone()) {
                            if prefix.is_empty() && n.is_inbox() {
                                continue;
                            }
                            out.insert(n, path.clone());
                            stack.push((parts, path));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// True if INBOX has an identity or mails.
    fn inbox_in_use(&self) -> bool {
        let dir = self.inbox_dir();
        if dir.join(uidlist::NAME).exists() {
            return true;
        }
        ["new", "cur"].iter().any(|sub| {
            fs::read_dir(dir.join(sub))
                .map(|rd| rd.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.')))
                .unwrap_or(false)
        })
    }

    fn log_root(&self) -> &Path {
        self.settings.index_root.as_deref().unwrap_or(&self.settings.root)
    }

    fn vname(&self, name: &MailboxName) -> String {
        name.join(self.ctx.sep)
    }

    fn log(&self, kind: ListChangeKind, guid: Guid128) -> StoreResult<()> {
        let dir = self.log_root();
        mkdir(dir)?;
        mailbox_log::append(dir, ListChange { kind, guid, time: now() })
    }

    /// Reads the identity of a mailbox from its uidlist header, creating the uidlist (by
    /// opening the mailbox) when there is none yet.
    fn identity(&self, name: &MailboxName, dir: &Path) -> StoreResult<(Guid128, u32, u32)> {
        if let Ok(Some((l, next_uid))) = uidlist::Uidlist::read_identity(dir)
            && let Some(g) = l.guid
        {
            return Ok((g, l.uid_validity, next_uid));
        }
        let mb = MaildirMailbox::open(self.ctx.clone(), name.clone(), dir.to_path_buf())?;
        let s = crate::store::Mailbox::status(&mb);
        Ok((s.guid, s.uid_validity, s.uid_next))
    }
}

impl Maildir {
    /// Opens a mailbox to add mails to it, as cheaply as the files allow (see
    /// [`MaildirAppender`]).
    pub fn open_appender(&mut self, name: &MailboxName) -> StoreResult<MaildirAppender> {
        let dir = self.mailbox_dir(name)?;
        MaildirMailbox::open_for_append(self.ctx.clone(), name.clone(), dir).map(MaildirAppender::new)
    }
}

impl MailStore for Maildir {
    type Mailbox = MaildirMailbox;

    fn lock_sync(&mut self, timeout: Duration) -> StoreResult<Box<dyn std::any::Any>> {
        let home = match &self.settings.home {
            Some(h) => h.clone(),
            None => self.settings.root.parent().unwrap_or(Path::new("/")).to_path_buf(),
        };
        Ok(Box::new(synclock::lock(&home, timeout)?))
    }

    fn hierarchy_separator(&self) -> char {
        self.ctx.sep
    }

    fn list(&mut self) -> StoreResult<Vec<MailboxInfo>> {
        let tree = self.scan_tree()?;
        let subscribed = subscriptions::read(&self.settings.root, self.codec())?;
        let changes = mailbox_log::read(self.log_root())?;
        let mut by_hash: HashMap<Guid128, (i64, i64)> = HashMap::new();
        for c in &changes {
            let e = by_hash.entry(c.guid).or_default();
            match c.kind {
                ListChangeKind::Rename | ListChangeKind::CreateDir => e.0 = e.0.max(c.time),
                ListChangeKind::Subscribe | ListChangeKind::Unsubscribe => e.1 = e.1.max(c.time),
                _ => {}
            }
        }
        let node = |this: &Self, name: MailboxName, dir: Option<&Path>| -> StoreResult<MailboxInfo> {
            let stamps = by_hash.get(&Guid128::sha128(this.vname(&name).as_bytes())).copied().unwrap_or_default();
            let mut info = MailboxInfo {
                name: name.clone(),
                kind: MailboxKind::Nonexistent,
                guid: None,
                uid_validity: 0,
                uid_next: 0,
                subscribed: false,
                last_renamed_or_created: stamps.0,
                last_subscription_change: stamps.1,
            };
            if let Some(dir) = dir {
                if is_dir(&dir.join("cur")) {
                    let (g, uv, next) = this.identity(&name, dir)?;
                    info.kind = MailboxKind::Mailbox;
                    info.guid = Some(g);
                    info.uid_validity = uv;
                    info.uid_next = next;
                } else {
                    info.kind = MailboxKind::Directory;
                }
            }
            Ok(info)
        };
        let mut nodes: BTreeMap<MailboxName, MailboxInfo> = BTreeMap::new();
        let inbox = MailboxName::inbox();
        // An INBOX that was never used (no uidlist, no mails) has no identity yet; listing it
        // would give it one, which a replica would then have to fight with the source's.
        if self.inbox_in_use() {
            nodes.insert(inbox.clone(), node(self, inbox, Some(&self.inbox_dir()))?);
        }
        for (name, dir) in &tree {
            nodes.insert(name.clone(), node(self, name.clone(), Some(dir))?);
        }
        // Parents that exist only as part of a child's name, and subscription-only names.
        let mut implied: Vec<MailboxName> = Vec::new();
        for name in nodes.keys().chain(subscribed.iter()) {
            let mut p = name.parent();
            while let Some(n) = p {
                implied.push(n.clone());
                p = n.parent();
            }
        }
        implied.extend(subscribed.iter().cloned());
        for n in implied {
            if let std::collections::btree_map::Entry::Vacant(e) = nodes.entry(n) {
                let info = node(self, e.key().clone(), None)?;
                e.insert(info);
            }
        }
        for s in &subscribed {
            if let Some(n) = nodes.get_mut(s) {
                n.subscribed = true;
            }
        }
        Ok(nodes.into_values().collect())
    }

    fn list_changes(&mut self) -> StoreResult<Vec<ListChange>> {
        mailbox_log::read(self.log_root())
    }

    fn create_mailbox(
        &mut self,
        name: &MailboxName,
        guid: Option<Guid128>,
        uid_validity: Option<u32>,
    ) -> StoreResult<()> {
        let dir = self.mailbox_dir(name)?;
        if is_dir(&dir.join("cur")) {
            if name.is_inbox() && !dir.join(uidlist::NAME).exists() {
                // The INBOX directories are created on first access; give it its identity now.
            } else {
                return Err(StoreError::MailboxExists(self.vname(name)));
            }
        }
        match self.settings.layout {
            Layout::Fs => fs::DirBuilder::new().mode(0o700).recursive(true).create(&dir).ctx("mkdir", &dir)?,
            Layout::MaildirPlusPlus => {
                mkdir(&dir)?;
            }
        }
        for sub in ["tmp", "new", "cur"] {
            mkdir(&dir.join(sub))?;
        }
        if self.settings.layout == Layout::MaildirPlusPlus && !name.is_inbox() {
            let mf = dir.join("maildirfolder");
            fs::OpenOptions::new().write(true).create(true).truncate(false).open(&mf).ctx("creat", &mf)?;
        }
        let uv = match uid_validity {
            Some(v) if v != 0 => v,
            _ => uidvalidity::next(&self.settings.root)?,
        };
        let lock = dotlock::Dotlock::acquire(&dir.join(uidlist::NAME), &self.ctx.hostname, self.ctx.lock_wait)?;
        if let Some(existing) = uidlist::Uidlist::read(&dir)?
            && existing.guid.is_some()
        {
            lock.release()?;
            return Err(StoreError::MailboxExists(self.vname(name)));
        }
        let mut list = uidlist::Uidlist::new(uv, guid.filter(|g| !g.is_empty()).unwrap_or_else(Guid128::generate));
        list.rewrite(&dir, |_| true)?;
        lock.release()?;
        index::remove(&dir)?;
        fsutil::fsync_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            fsutil::fsync_dir(parent)?;
        }
        Ok(())
    }

    /// See [`MailStore::delete_mailbox`] and `delete.rs`: waits for the uidlist lock, deletes
    /// only what it saw, and refuses with [`StoreError::ChangedDuringDelete`] if a mail arrived.
    fn delete_mailbox(&mut self, name: &MailboxName) -> StoreResult<()> {
        if name.is_inbox() {
            return Err(StoreError::NotPossible("INBOX can't be deleted.".to_owned()));
        }
        let dir = self.mailbox_dir(name)?;
        if !is_dir(&dir.join("cur")) {
            return Err(StoreError::MailboxNotFound(self.vname(name)));
        }
        let (guid, _, _) = self.identity(name, &dir)?;
        let vname = self.vname(name);
        let vname_hash = Guid128::sha128(vname.as_bytes());
        let env = delete::Env { hostname: &self.ctx.hostname, lock_wait: self.ctx.lock_wait, vname: &vname };
        let fs_layout = self.settings.layout == Layout::Fs;
        let root = self.settings.root.clone();
        let removed_dir = delete::delete_mailbox(&root, &dir, fs_layout, env, || {
            // The GUID as it is now, under the lock (the mailbox may have been recreated).
            let guid = match uidlist::Uidlist::read_header(&dir) {
                Ok(Some(l)) => l.guid.unwrap_or(guid),
                _ => guid,
            };
            self.log(ListChangeKind::DeleteMailbox, guid)?;
            if !fs_layout {
                self.log(ListChangeKind::DeleteDir, vname_hash)?;
            }
            Ok(())
        });
        // With LAYOUT=fs the directory stays when it holds children.
        if removed_dir? && fs_layout {
            self.log(ListChangeKind::DeleteDir, vname_hash)?;
        }
        Ok(())
    }

    fn clear_inbox(&mut self) -> StoreResult<()> {
        let dir = self.inbox_dir();
        let old_guid = uidlist::Uidlist::read_header(&dir).ok().flatten().and_then(|l| l.guid);
        // Our own lock on the mailbox (as an open handle takes it), so that no other
        // mailreplica process rebuilds the identity from an index it read before.
        let dirf = fs::File::open(&dir).ctx("open", &dir)?;
        let _flock = nix::fcntl::Flock::lock(dirf, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::io("flock", &dir, io::Error::from(e)))?;
        let env = delete::Env { hostname: &self.ctx.hostname, lock_wait: self.ctx.lock_wait, vname: "INBOX" };
        delete::clear_mailbox(&dir, &[uidlist::NAME, keywords::NAME, index::NAME], env)?;
        if let Some(g) = old_guid {
            self.log(ListChangeKind::DeleteMailbox, g)?;
        }
        Ok(())
    }

    fn rename_mailbox(&mut self, from: &MailboxName, to: &MailboxName) -> StoreResult<()> {
        if from.is_inbox() || to.is_inbox() {
            return Err(StoreError::NotPossible("renaming INBOX is not supported".to_owned()));
        }
        if to.starts_with(from) {
            return Err(StoreError::NotPossible("can't rename a mailbox under itself".to_owned()));
        }
        let tree = self.scan_tree()?;
        let moves: Vec<(PathBuf, PathBuf)> = match self.settings.layout {
            Layout::MaildirPlusPlus => {
                let mut v = Vec::new();
                for (name, dir) in &tree {
                    if let Some(dest) = name.rebase(from, to) {
                        v.push((dir.clone(), self.mailbox_dir(&dest)?));
                    }
                }
                v
            }
            Layout::Fs => match tree.get(from) {
                Some(dir) => vec![(dir.clone(), self.mailbox_dir(to)?)],
                None => Vec::new(),
            },
        };
        if moves.is_empty() {
            return Err(StoreError::MailboxNotFound(self.vname(from)));
        }
        for (_, dest) in &moves {
            if dest.exists() {
                return Err(StoreError::MailboxExists(self.vname(to)));
            }
        }
        for (src, dest) in &moves {
            if let Some(parent) = dest.parent() {
                fs::DirBuilder::new().mode(0o700).recursive(true).create(parent).ctx("mkdir", parent)?;
            }
            fs::rename(src, dest).ctx("rename", src)?;
        }
        let parents: std::collections::BTreeSet<PathBuf> =
            moves.iter().flat_map(|(a, b)| [a.parent(), b.parent()]).flatten().map(Path::to_path_buf).collect();
        for p in parents {
            fsutil::fsync_dir(&p)?;
        }
        self.log(ListChangeKind::Rename, Guid128::sha128(self.vname(to).as_bytes()))
    }

    fn set_subscribed(&mut self, name: &MailboxName, subscribed: bool) -> StoreResult<()> {
        let changed = subscriptions::set(&self.settings.root, &self.ctx.hostname, self.codec(), name, subscribed)?;
        if changed {
            let kind = if subscribed { ListChangeKind::Subscribe } else { ListChangeKind::Unsubscribe };
            self.log(kind, Guid128::sha128(self.vname(name).as_bytes()))?;
        }
        Ok(())
    }

    fn forget_subscription(&mut self, name: &MailboxName) -> StoreResult<()> {
        subscriptions::set(&self.settings.root, &self.ctx.hostname, self.codec(), name, false)?;
        self.log(ListChangeKind::Unsubscribe, Guid128::sha128(self.vname(name).as_bytes()))
    }

    fn open(&mut self, name: &MailboxName) -> StoreResult<MaildirMailbox> {
        let dir = self.mailbox_dir(name)?;
        MaildirMailbox::open(self.ctx.clone(), name.clone(), dir)
    }
}
