//! A change feed without any Dovecot plugin: inotify on every user's Maildir (Dovecot 2.4,
//! which has no replication plugin, or any other writer: `doveadm save`, a hand-made file).
//!
//! Every directory of a Maildir is watched but `tmp/` (a delivery ends with a rename into
//! `new/`, which is seen): about `1 + 3 × mailboxes` watches a user. A change maps to the user
//! whose tree it is in and to a priority: a mail arriving in `new/` is `high`; anything else
//! (a flag change renames a file in `cur/`, an expunge deletes one, a mailbox directory comes
//! or goes, `subscriptions` is replaced) is `low`. Dovecot's index, uidlist, keyword and lock
//! files, and ours, are ignored: reading mail writes them. A queue overflow (the kernel drops
//! events) asks for a sync of every user.
//!
//! The replicator's own two-way syncs write into these trees too (mail that came from the
//! replica); that costs one more sync of the user, which changes nothing and so writes no
//! mail file: the loop ends there.
//!
//! The trees belong to the mail users and this runs as root, so nothing in them is followed:
//! below the configured root a symlink is never watched or entered (`IN_DONTFOLLOW`, and the
//! entry's own type from `readdir`), only
//! directory names are read, and a tree gets at most [`MAX_WATCHES_PER_USER`] watches and
//! [`MAX_DEPTH`] levels, so a user cannot spend the host's inotify budget.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

use super::queue::Priority;

/// The most directories watched in one user's tree.
pub const MAX_WATCHES_PER_USER: usize = 20_000;
/// The deepest directory watched below a Maildir root.
pub const MAX_DEPTH: usize = 32;

/// What a watched directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A mailbox directory (or the root): subdirectories, `subscriptions`.
    Mailbox,
    /// `new/`: mail arrives here.
    New,
    /// `cur/`: flag changes rename files here.
    Cur,
    /// The parent of a root that does not exist yet (a new user's Maildir appears with their
    /// first mail): only that name is looked at.
    Parent,
}

struct Watched {
    user: Arc<str>,
    kind: Kind,
    dir: PathBuf,
    depth: usize,
    /// [`Kind::Parent`]: the root's name.
    awaiting: Option<std::ffi::OsString>,
}

/// The watches of every user's Maildir.
pub struct Watcher {
    inotify: Inotify,
    watched: HashMap<WatchDescriptor, Watched>,
    per_user: HashMap<Arc<str>, usize>,
    users: Vec<Arc<str>>,
}

/// The events watched; a root given by the configuration may be a symlink (a common way to
/// put mail on another disk), a directory inside it may not.
fn mask(depth: usize) -> AddWatchFlags {
    let follow = if depth == 0 { AddWatchFlags::empty() } else { AddWatchFlags::IN_DONT_FOLLOW };
    follow
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ONLYDIR
}

/// Files whose changes are not changes of mail: indexes, uidlists, keyword files, locks, and
/// Dovecot's dot files in a home that is also the Maildir (`.dovecot.sieve`,
/// `.dovecot.lda-dupes`). A directory named `.dovecot…` is a Maildir++ folder (a mailbox
/// called "dovecot…"), and is watched like any other.
pub(super) fn ignored(name: &OsStr, is_dir: bool) -> bool {
    let n = name.as_encoded_bytes();
    n.starts_with(b"dovecot")
        || n.starts_with(b"mailreplica-index")
        || n.ends_with(b".lock")
        || n == b"maildirfolder"
        || (n.starts_with(b".dovecot") && !is_dir)
        || n.starts_with(b".mailreplica")
}

/// How the Maildirs are watched (`[replicator] watch_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// fanotify where this process may use it, inotify otherwise.
    #[default]
    Auto,
    /// fanotify only (fails to start without it).
    Fanotify,
    /// inotify only.
    Inotify,
}

impl Method {
    /// Parses `auto`, `fanotify` or `inotify`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "fanotify" => Some(Self::Fanotify),
            "inotify" => Some(Self::Inotify),
            _ => None,
        }
    }
}

/// A started watcher, of either kind.
pub enum Feed {
    /// inotify watches on every directory.
    Inotify(Watcher),
    /// fanotify marks on the filesystems.
    Fanotify(super::fanotify::FsWatcher),
}

impl From<Watcher> for Feed {
    fn from(w: Watcher) -> Self {
        Self::Inotify(w)
    }
}

impl From<super::fanotify::FsWatcher> for Feed {
    fn from(w: super::fanotify::FsWatcher) -> Self {
        Self::Fanotify(w)
    }
}

impl Feed {
    /// Starts watching every user's Maildir roots with `method`.
    pub fn start(roots: &[(String, Vec<PathBuf>)], method: Method) -> io::Result<Self> {
        Ok(match method {
            Method::Inotify => Self::Inotify(Watcher::new(roots)?),
            Method::Fanotify => Self::Fanotify(super::fanotify::FsWatcher::new(roots)?),
            Method::Auto => match super::fanotify::FsWatcher::new(roots) {
                Ok(w) => Self::Fanotify(w),
                Err(e) => {
                    tracing::info!("fanotify is not available here ({e}); watching with inotify");
                    Self::Inotify(Watcher::new(roots)?)
                }
            },
        })
    }

    /// Passes each change to `notify` (a user and a priority), for ever, in the calling thread.
    pub fn run(self, notify: impl Fn(&str, Priority)) -> io::Result<()> {
        match self {
            Self::Inotify(w) => w.run(notify),
            Self::Fanotify(w) => w.run(notify),
        }
    }
}

impl Watcher {
    /// Watches each user's Maildir roots (`root`, and a separate INBOX directory if any). For
    /// a root that does not exist yet its parent is watched until it appears.
    pub fn new(roots: &[(String, Vec<PathBuf>)]) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
        let mut w = Self { inotify, watched: HashMap::new(), per_user: HashMap::new(), users: Vec::new() };
        for (user, dirs) in roots {
            let user: Arc<str> = Arc::from(user.as_str());
            w.users.push(Arc::clone(&user));
            for d in dirs {
                if d.is_dir() {
                    w.watch_tree(&user, d, 0);
                } else {
                    w.await_root(&user, d);
                }
            }
        }
        Ok(w)
    }

    /// Directories watched now.
    pub fn watches(&self) -> usize {
        self.watched.len()
    }

    /// Watches the parent of `root` (which does not exist) for its creation.
    fn await_root(&mut self, user: &Arc<str>, root: &Path) {
        let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else { return };
        match self.inotify.add_watch(parent, mask(0)) {
            Ok(wd) => {
                let w = Watched {
                    user: Arc::clone(user),
                    kind: Kind::Parent,
                    dir: parent.to_path_buf(),
                    depth: 0,
                    awaiting: Some(name.to_owned()),
                };
                // Two users may await roots in one directory: the watch is shared, the first
                // user keeps it (the other gets the periodic syncs until a restart).
                self.watched.entry(wd).or_insert(w);
                // It may have appeared meanwhile.
                if root.is_dir() {
                    self.watch_tree(user, root, 0);
                }
            }
            Err(e) => {
                tracing::info!(user = %user, "{} does not exist yet and {}: {e}", root.display(), parent.display())
            }
        }
    }

    /// Adds watches on `dir` and every directory below it but `tmp/` and symlinks.
    fn watch_tree(&mut self, user: &Arc<str>, dir: &Path, depth: usize) {
        let mut stack = vec![(dir.to_path_buf(), depth)];
        while let Some((d, depth)) = stack.pop() {
            let used = self.per_user.get(user).copied().unwrap_or(0);
            if used >= MAX_WATCHES_PER_USER {
                tracing::warn!(user = %user, "{}: more than {MAX_WATCHES_PER_USER} directories, not watched", d.display());
                return;
            }
            let kind = match d.file_name().map(OsStr::as_encoded_bytes) {
                Some(b"tmp") if depth > 0 => continue,
                Some(b"new") if depth > 0 => Kind::New,
                Some(b"cur") if depth > 0 => Kind::Cur,
                _ => Kind::Mailbox,
            };
            let wd = match self.inotify.add_watch(&d, mask(depth)) {
                Ok(wd) => wd,
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => continue,
                Err(e) => {
                    tracing::warn!(user = %user, "watching {}: {e}", d.display());
                    continue;
                }
            };
            let w = Watched { user: Arc::clone(user), kind, dir: d.clone(), depth, awaiting: None };
            if self.watched.insert(wd, w).is_none() {
                *self.per_user.entry(Arc::clone(user)).or_default() += 1;
            }
            if kind != Kind::Mailbox || depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                // `file_type` is the entry's own (lstat): a symlink is not a directory here.
                if e.file_type().is_ok_and(|t| t.is_dir()) && !ignored(&e.file_name(), true) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }

    /// Reads events for ever, passing each change to `notify` (a user and a priority).
    pub fn run(mut self, notify: impl Fn(&str, Priority)) -> io::Result<()> {
        tracing::info!("watching {} directories of {} users with inotify", self.watched.len(), self.users.len());
        loop {
            let events = match self.inotify.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            // One notification per user and priority per batch of events.
            let mut batch: HashMap<Arc<str>, Priority> = HashMap::new();
            for ev in events {
                self.event(ev, &mut batch);
            }
            for (user, p) in batch {
                notify(&user, p);
            }
        }
    }

    fn event(&mut self, ev: InotifyEvent, batch: &mut HashMap<Arc<str>, Priority>) {
        let mut raise = |user: &Arc<str>, p: Priority| {
            let e = batch.entry(Arc::clone(user)).or_default();
            *e = (*e).max(p);
        };
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            tracing::warn!("inotify queue overflow: every user is synced");
            for u in &self.users {
                raise(u, Priority::Low);
            }
            return;
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            if let Some(w) = self.watched.remove(&ev.wd)
                && let Some(n) = self.per_user.get_mut(&w.user)
            {
                *n = n.saturating_sub(1);
            }
            return;
        }
        let Some(w) = self.watched.get(&ev.wd) else { return };
        let Some(name) = ev.name.as_deref() else { return };
        if ignored(name, ev.mask.contains(AddWatchFlags::IN_ISDIR)) {
            return;
        }
        let (user, kind) = (Arc::clone(&w.user), w.kind);
        let arrived = ev.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
        if kind == Kind::Parent {
            if arrived && ev.mask.contains(AddWatchFlags::IN_ISDIR) && w.awaiting.as_deref() == Some(name) {
                let root = w.dir.join(name);
                self.watch_tree(&user, &root, 0);
                raise(&user, Priority::High);
            }
            return;
        }
        if ev.mask.contains(AddWatchFlags::IN_ISDIR) && arrived && kind == Kind::Mailbox {
            let (path, depth) = (w.dir.join(name), w.depth + 1);
            if depth <= MAX_DEPTH {
                self.watch_tree(&user, &path, depth);
            }
        }
        let p = if kind == Kind::New && arrived { Priority::High } else { Priority::Low };
        // A file written in place in a mailbox directory that is not `subscriptions` (Dovecot
        // replaces that one by a rename) is nobody's mail.
        if kind == Kind::Mailbox
            && ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE)
            && name.as_encoded_bytes() != b"subscriptions"
        {
            return;
        }
        raise(&user, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    fn maildir(root: &Path, boxes: &[&str]) {
        for b in std::iter::once(&"").chain(boxes) {
            let d = if b.is_empty() { root.to_path_buf() } else { root.join(format!(".{b}")) };
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir_all(d.join(sub)).unwrap();
            }
        }
    }

    /// Runs the watcher in a thread; returns what it notified since the last call.
    struct Probe {
        seen: Arc<Mutex<Vec<(String, Priority)>>>,
    }

    impl Probe {
        fn start(w: impl Into<Feed>) -> Self {
            let feed: Feed = w.into();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let s = Arc::clone(&seen);
            std::thread::spawn(move || feed.run(move |u, p| s.lock().unwrap().push((u.to_owned(), p))));
            Self { seen }
        }

        /// Waits for `want` (the highest priority per user seen), up to 10 s; then 100 ms
        /// more for anything else.
        fn expect(&self, want: &[(&str, Priority)]) {
            let until = Instant::now() + Duration::from_secs(10);
            let got = || {
                let mut m: HashMap<String, Priority> = HashMap::new();
                for (u, p) in self.seen.lock().unwrap().iter() {
                    let e = m.entry(u.clone()).or_default();
                    *e = (*e).max(*p);
                }
                let mut v: Vec<(String, Priority)> = m.into_iter().collect();
                v.sort();
                v
            };
            let want: Vec<(String, Priority)> = want.iter().map(|(u, p)| ((*u).to_owned(), *p)).collect();
            while got() != want && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(got(), want);
            self.seen.lock().unwrap().clear();
        }
    }

    /// Two users' Maildirs under `dir`, one with a symlink out of its tree.
    fn two_users(dir: &Path) -> (PathBuf, PathBuf, PathBuf, Vec<(String, Vec<PathBuf>)>) {
        let (a, b) = (dir.join("alice"), dir.join("bob"));
        maildir(&a, &["Work"]);
        maildir(&b, &[]);
        // A symlink out of the tree is not followed.
        let outside = dir.join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, a.join(".Evil")).unwrap();
        let roots = vec![("alice".into(), vec![a.clone()]), ("bob".into(), vec![b.clone()])];
        (a, b, outside, roots)
    }

    #[test]
    fn maildir_changes_map_to_users_and_priorities_and_index_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, outside, roots) = two_users(dir.path());
        let w = Watcher::new(&roots).unwrap();
        assert_eq!(w.watches(), 2 * 3 + 3, "the directory, new and cur of each mailbox; no tmp, no symlink");
        changes_map_to_users(Probe::start(w), &a, &b, &outside);
    }

    #[test]
    fn with_fanotify_too() {
        assert!(nix::unistd::geteuid().is_root(), "fanotify filesystem marks need root: run the tests as root");
        let dir = tempfile::tempdir().unwrap();
        let (a, b, outside, roots) = two_users(dir.path());
        let w = crate::replicator::fanotify::FsWatcher::new(&roots).expect("fanotify as root");
        assert_eq!(w.filesystems(), 1);
        changes_map_to_users(Probe::start(w), &a, &b, &outside);
    }

    fn changes_map_to_users(p: Probe, a: &Path, b: &Path, outside: &Path) {
        // A delivery: written in tmp/, renamed into new/.
        fs::write(a.join("tmp/1.host"), "mail").unwrap();
        fs::rename(a.join("tmp/1.host"), a.join("new/1.host")).unwrap();
        p.expect(&[("alice", Priority::High)]);
        // A flag change: a rename in cur/.
        fs::write(b.join("cur/2.host:2,"), "mail").unwrap();
        p.expect(&[("bob", Priority::Low)]);
        fs::rename(b.join("cur/2.host:2,"), b.join("cur/2.host:2,S")).unwrap();
        p.expect(&[("bob", Priority::Low)]);
        // Index, uidlist and lock files, Dovecot's dot files: nothing.
        for f in ["dovecot-uidlist", "dovecot.index.log", "dovecot-uidlist.lock", "mailreplica-index", ".dovecot.sieve"]
        {
            fs::write(a.join(f), "x").unwrap();
            fs::write(a.join(".Work").join(f), "x").unwrap();
        }
        fs::write(outside.join("x"), "x").unwrap();
        p.expect(&[]);
        // A new mailbox is watched from its creation on, including its new/.
        fs::create_dir(b.join(".Later")).unwrap();
        fs::create_dir(b.join(".Later/new")).unwrap();
        fs::create_dir(b.join(".Later/tmp")).unwrap();
        p.expect(&[("bob", Priority::Low)]);
        fs::write(b.join(".Later/tmp/3.host"), "mail").unwrap();
        fs::rename(b.join(".Later/tmp/3.host"), b.join(".Later/new/3.host")).unwrap();
        p.expect(&[("bob", Priority::High)]);
        // A mailbox named "dovecot-lists" (".dovecot-lists") is a mailbox like any other.
        fs::create_dir(b.join(".dovecot-lists")).unwrap();
        for sub in ["new", "cur", "tmp"] {
            fs::create_dir(b.join(".dovecot-lists").join(sub)).unwrap();
        }
        p.expect(&[("bob", Priority::Low)]);
        fs::write(b.join(".dovecot-lists/tmp/4.host"), "mail").unwrap();
        fs::rename(b.join(".dovecot-lists/tmp/4.host"), b.join(".dovecot-lists/new/4.host")).unwrap();
        p.expect(&[("bob", Priority::High)]);
        // Subscriptions replaced by a rename; an expunge.
        fs::write(a.join("subscriptions.lock"), "V\t2\n\nWork\n").unwrap();
        fs::rename(a.join("subscriptions.lock"), a.join("subscriptions")).unwrap();
        p.expect(&[("alice", Priority::Low)]);
        fs::remove_file(a.join("new/1.host")).unwrap();
        p.expect(&[("alice", Priority::Low)]);
        // A mailbox deleted: a change; its watches go.
        fs::remove_dir_all(b.join(".Later")).unwrap();
        p.expect(&[("bob", Priority::Low)]);
    }

    #[test]
    fn a_maildir_that_appears_later_is_watched_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("carol/Maildir");
        fs::create_dir(dir.path().join("carol")).unwrap();
        let w = Watcher::new(&[("carol".into(), vec![root.clone()])]).unwrap();
        assert_eq!(w.watches(), 1, "the home, for the Maildir to come");
        appears_later(Probe::start(w), dir.path(), &root);
    }

    #[test]
    fn a_maildir_that_appears_later_is_seen_with_fanotify_too() {
        assert!(nix::unistd::geteuid().is_root(), "fanotify filesystem marks need root: run the tests as root");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("carol/Maildir");
        fs::create_dir(dir.path().join("carol")).unwrap();
        let w = crate::replicator::fanotify::FsWatcher::new(&[("carol".into(), vec![root.clone()])]).unwrap();
        appears_later(Probe::start(w), dir.path(), &root);
    }

    fn appears_later(p: Probe, dir: &Path, root: &Path) {
        fs::write(dir.join("carol/.profile"), "x").unwrap();
        p.expect(&[]);
        maildir(root, &[]);
        p.expect(&[("carol", Priority::High)]);
        fs::write(root.join("tmp/1.host"), "mail").unwrap();
        fs::rename(root.join("tmp/1.host"), root.join("new/1.host")).unwrap();
        p.expect(&[("carol", Priority::High)]);
    }
}
