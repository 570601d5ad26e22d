//! The Maildir watcher with fanotify: one filesystem mark for each filesystem that holds mail
//! roots, instead of an inotify watch on every directory of every Maildir ([`super::watcher`]).
//!
//! ```text
//!   fanotify group (FAN_REPORT_DFID_NAME)  ◄── mark: the whole filesystem of each root
//!     event = mask + (fsid, handle of the directory) + entry name
//!       handle ─► class (cached): open_by_handle_at(O_PATH) ─► /proc/self/fd/N ─► path
//!                  ─► which user's root is above it (at most MAX_DEPTH levels), and whether it
//!                     is new/, cur/, tmp/ or a mailbox directory
//!       (user, kind, name) ─► priority, as the inotify watcher maps it
//! ```
//!
//! No watch budget is spent, a new mailbox needs no new watch, and a user with 50,000 folders
//! costs nothing more than one with five. It needs what only root has (`CAP_SYS_ADMIN` for a
//! filesystem mark, `CAP_DAC_READ_SEARCH` to open handles) and a filesystem that makes file
//! handles; where either is missing, the caller falls back to inotify.
//!
//! A filesystem mark sees every change on the filesystem, mail or not: each directory is
//! resolved once and its class cached, so that unrelated activity costs a hash lookup. The
//! trees belong to mail users and this runs as root, so nothing in them is opened for reading
//! or followed: a handle is opened `O_PATH` (which only names the directory), and a path is
//! attributed to the user whose configured root (resolved once, at start) is its ancestor.
//! A directory moved into a user's tree from elsewhere clears the cache, so that it is seen
//! from then on.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::queue::Priority;
use super::watcher::{Kind, MAX_DEPTH, ignored};

/// Directory classes cached; the cache is emptied when it holds more.
const MAX_CACHED: usize = 100_000;

const MASK: u64 = libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO | libc::FAN_ONDIR;

/// What a directory is to us.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    /// Nobody's mail (or `tmp/`, or deeper than [`MAX_DEPTH`]).
    Outside,
    /// A directory of `user`'s Maildir.
    In(Arc<str>, Kind),
    /// The parent of roots that may not exist yet: only those names are looked at.
    Parent(PathBuf),
}

/// One event: what happened, in which directory, to which entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    mask: u64,
    fsid: [i32; 2],
    handle_type: i32,
    handle: Vec<u8>,
    name: OsString,
}

/// The fanotify watcher of every user's Maildir.
pub struct FsWatcher {
    group: File,
    /// Each marked filesystem, with a descriptor on it to open handles with.
    filesystems: Vec<([i32; 2], File)>,
    /// Each user's roots, resolved.
    roots: HashMap<PathBuf, Arc<str>>,
    /// The parent of each root → (the root's name, its user).
    parents: HashMap<PathBuf, Vec<(OsString, Arc<str>)>>,
    users: Vec<Arc<str>>,
    /// Each directory's class, by filesystem and handle type, then handle.
    cache: HashMap<([i32; 2], i32), HashMap<Vec<u8>, Class>>,
    /// Entries in `cache`.
    cached: usize,
}

/// `path` with symlinks resolved as far as it exists; the rest appended as it is.
fn resolve(path: &Path) -> (PathBuf, PathBuf) {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<OsString> = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let full = rest.iter().rev().fold(c.clone(), |p, n| p.join(n));
            return (full, c);
        }
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n.to_owned());
                existing = p.to_path_buf();
            }
            _ => return (path.to_path_buf(), PathBuf::from("/")),
        }
    }
}

impl FsWatcher {
    /// Marks the filesystems of every user's roots. Fails (and the caller uses inotify) where
    /// fanotify with directory file handles is not available to this process.
    pub fn new(roots: &[(String, Vec<PathBuf>)]) -> io::Result<Self> {
        let group = crate::sys::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_REPORT_DFID_NAME,
            (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
        )?;
        let mut w = Self {
            group: File::from(group),
            filesystems: Vec::new(),
            roots: HashMap::new(),
            parents: HashMap::new(),
            users: Vec::new(),
            cache: HashMap::new(),
            cached: 0,
        };
        for (user, dirs) in roots {
            let user: Arc<str> = Arc::from(user.as_str());
            w.users.push(Arc::clone(&user));
            for d in dirs {
                let (root, existing) = resolve(d);
                if let (Some(parent), Some(name)) = (root.parent(), root.file_name()) {
                    w.parents.entry(parent.to_path_buf()).or_default().push((name.to_owned(), Arc::clone(&user)));
                }
                w.roots.insert(root, Arc::clone(&user));
                w.mark(&existing)?;
            }
        }
        Ok(w)
    }

    /// Marks the filesystem of `dir` (once per filesystem).
    fn mark(&mut self, dir: &Path) -> io::Result<()> {
        let fsid = crate::sys::filesystem_id(dir)?;
        if self.filesystems.iter().any(|(f, _)| *f == fsid) {
            return Ok(());
        }
        crate::sys::fanotify_mark(self.group.as_fd(), libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM, MASK, dir)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("fanotify mark on the filesystem of {}: {e}", dir.display()))
            })?;
        let fd = File::open(dir)?;
        // Opening a handle needs CAP_DAC_READ_SEARCH: found out now, not at the first event.
        let probe = Self::probe_handles(&fd);
        if let Err(e) = probe {
            return Err(io::Error::new(e.kind(), format!("opening file handles on {}: {e}", dir.display())));
        }
        self.filesystems.push((fsid, fd));
        Ok(())
    }

    /// Whether this process may open file handles on the filesystem of `fd`.
    fn probe_handles(fd: &File) -> io::Result<()> {
        // A zero-length handle is invalid: EINVAL or ESTALE say the call is allowed, EPERM
        // that it is not.
        match crate::sys::open_by_handle(fd.as_fd(), 1, &[0u8; 8]) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e),
            _ => Ok(()),
        }
    }

    /// Filesystems marked.
    pub fn filesystems(&self) -> usize {
        self.filesystems.len()
    }

    /// Reads events for ever, passing each change to `notify` (a user and a priority).
    pub fn run(mut self, notify: impl Fn(&str, Priority)) -> io::Result<()> {
        tracing::info!(
            "watching {} users' Maildirs with fanotify ({} filesystems marked)",
            self.users.len(),
            self.filesystems.len()
        );
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match self.group.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut batch: HashMap<Arc<str>, Priority> = HashMap::new();
            for ev in parse(&buf[..n])? {
                self.event(&ev, &mut batch);
            }
            for (user, p) in batch {
                notify(&user, p);
            }
        }
    }

    fn event(&mut self, ev: &Event, batch: &mut HashMap<Arc<str>, Priority>) {
        let mut raise = |user: &Arc<str>, p: Priority| {
            let e = batch.entry(Arc::clone(user)).or_default();
            *e = (*e).max(p);
        };
        if ev.mask & libc::FAN_Q_OVERFLOW != 0 {
            tracing::warn!("fanotify queue overflow: every user is synced");
            for u in &self.users {
                raise(u, Priority::Low);
            }
            return;
        }
        let is_dir = ev.mask & libc::FAN_ONDIR != 0;
        if ev.name.is_empty() || ignored(&ev.name, is_dir) {
            return;
        }
        let arrived = ev.mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) != 0;
        match self.class(ev) {
            Class::Outside => {}
            Class::Parent(dir) => {
                if arrived && is_dir {
                    for (name, user) in self.parents.get(&dir).into_iter().flatten() {
                        if *name == ev.name {
                            raise(user, Priority::High);
                        }
                    }
                }
            }
            Class::In(user, kind) => {
                if is_dir && ev.mask & libc::FAN_MOVED_TO != 0 {
                    // A directory moved in may have been cached as someone else's or nobody's.
                    self.cache.clear();
                    self.cached = 0;
                }
                let p = if kind == Kind::New && arrived { Priority::High } else { Priority::Low };
                raise(&user, p);
            }
        }
    }

    /// The class of the event's directory, from the cache (looked up without copying the
    /// handle: every event on the filesystem comes here) or resolved now.
    fn class(&mut self, ev: &Event) -> Class {
        if let Some(c) = self.cache.get(&(ev.fsid, ev.handle_type)).and_then(|m| m.get(ev.handle.as_slice())) {
            return c.clone();
        }
        let class = match self.path_of(ev) {
            Some(dir) => self.classify(&dir),
            None => Class::Outside,
        };
        if self.cached >= MAX_CACHED {
            self.cache.clear();
            self.cached = 0;
        }
        self.cache.entry((ev.fsid, ev.handle_type)).or_default().insert(ev.handle.clone(), class.clone());
        self.cached += 1;
        class
    }

    /// The path of the event's directory, through its handle.
    fn path_of(&self, ev: &Event) -> Option<PathBuf> {
        let (_, fs) = self.filesystems.iter().find(|(f, _)| *f == ev.fsid)?;
        let fd: OwnedFd = crate::sys::open_by_handle(fs.as_fd(), ev.handle_type, &ev.handle).ok()?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        // A directory removed meanwhile: "(deleted)" is appended, and it holds no mail.
        (!path.as_os_str().as_encoded_bytes().ends_with(b" (deleted)")).then_some(path)
    }

    /// What `dir` is: in whose tree, and which kind of directory.
    fn classify(&self, dir: &Path) -> Class {
        let mut here = dir;
        for depth in 0..=MAX_DEPTH {
            if let Some(user) = self.roots.get(here) {
                let kind = match dir.file_name().map(OsStr::as_encoded_bytes) {
                    _ if depth == 0 => Kind::Mailbox,
                    Some(b"tmp") => return Class::Outside,
                    Some(b"new") => Kind::New,
                    Some(b"cur") => Kind::Cur,
                    _ => Kind::Mailbox,
                };
                return Class::In(Arc::clone(user), kind);
            }
            // A directory of Dovecot's or ours inside a Maildir (an index directory) is not mail.
            if here.file_name().is_some_and(|n| ignored(n, true)) {
                return Class::Outside;
            }
            match here.parent() {
                Some(p) => here = p,
                None => break,
            }
        }
        if self.parents.contains_key(dir) { Class::Parent(dir.to_path_buf()) } else { Class::Outside }
    }
}

/// The events in one `read` of the group (FAN_REPORT_DFID_NAME records).
fn parse(buf: &[u8]) -> io::Result<Vec<Event>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("fanotify event: {what}"));
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < 24 {
            return Err(bad("cut off"));
        }
        let len = u32_at(rest, 0) as usize;
        if rest[4] != libc::FANOTIFY_METADATA_VERSION {
            return Err(bad("unknown version"));
        }
        let meta_len = usize::from(u16_at(rest, 6));
        if len < 24 || len > rest.len() || meta_len < 24 || meta_len > len {
            return Err(bad("bad length"));
        }
        let mask = u64::from_ne_bytes(rest[8..16].try_into().expect("8 bytes"));
        let (event, next) = rest.split_at(len);
        rest = next;
        let mut ev = Event { mask, fsid: [0, 0], handle_type: 0, handle: Vec::new(), name: OsString::new() };
        let mut info = &event[meta_len..];
        while info.len() >= 4 {
            let (kind, ilen) = (info[0], usize::from(u16_at(info, 2)));
            if ilen < 4 || ilen > info.len() {
                return Err(bad("bad record length"));
            }
            let (record, next) = info.split_at(ilen);
            info = next;
            if kind != libc::FAN_EVENT_INFO_TYPE_DFID_NAME && kind != libc::FAN_EVENT_INFO_TYPE_DFID {
                continue;
            }
            // header (4), fsid (8), handle_bytes (4), handle_type (4), handle, [name NUL]
            if record.len() < 20 {
                return Err(bad("short record"));
            }
            ev.fsid = [u32_at(record, 4) as i32, u32_at(record, 8) as i32];
            let hlen = u32_at(record, 12) as usize;
            ev.handle_type = u32_at(record, 16) as i32;
            let end = 20usize.checked_add(hlen).filter(|e| *e <= record.len()).ok_or_else(|| bad("bad handle"))?;
            ev.handle = record[20..end].to_vec();
            if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                let name = &record[end..];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                ev.name = OsStr::from_bytes(name).to_owned();
            }
        }
        out.push(ev);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out: metadata, then a DFID_NAME record.
    fn event_bytes(mask: u64, handle: &[u8], name: &str) -> Vec<u8> {
        let mut record = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0];
        record.extend(7i32.to_ne_bytes());
        record.extend(9i32.to_ne_bytes());
        record.extend((handle.len() as u32).to_ne_bytes());
        record.extend(1i32.to_ne_bytes());
        record.extend(handle);
        record.extend(name.as_bytes());
        record.push(0);
        while record.len() % 4 != 0 {
            record.push(0);
        }
        let rlen = record.len() as u16;
        record[2..4].copy_from_slice(&rlen.to_ne_bytes());
        let mut ev = Vec::new();
        ev.extend(((24 + record.len()) as u32).to_ne_bytes());
        ev.push(libc::FANOTIFY_METADATA_VERSION);
        ev.push(0);
        ev.extend(24u16.to_ne_bytes());
        ev.extend(mask.to_ne_bytes());
        ev.extend((-1i32).to_ne_bytes());
        ev.extend(1234i32.to_ne_bytes());
        ev.extend(record);
        ev
    }

    #[test]
    fn events_parse_and_malformed_ones_are_refused() {
        let mut two = event_bytes(libc::FAN_CREATE, &[1, 2, 3, 4, 5, 6, 7, 8], "1.host");
        two.extend(event_bytes(libc::FAN_MOVED_TO | libc::FAN_ONDIR, &[9; 12], ".Work"));
        let evs = parse(&two).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].fsid, [7, 9]);
        assert_eq!(evs[0].handle, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(evs[0].name, OsString::from("1.host"));
        assert_eq!(evs[1].mask, libc::FAN_MOVED_TO | libc::FAN_ONDIR);
        assert_eq!(evs[1].name, OsString::from(".Work"));
        // Cut off, a length beyond the buffer, a record longer than its event, a handle
        // longer than its record: errors, never a read past the end.
        assert!(parse(&two[..10]).is_err());
        assert!(parse(&two[..30]).is_err());
        let mut long = event_bytes(libc::FAN_CREATE, &[1; 8], "x");
        long[24 + 2..24 + 4].copy_from_slice(&500u16.to_ne_bytes());
        assert!(parse(&long).is_err());
        let mut handle = event_bytes(libc::FAN_CREATE, &[1; 8], "x");
        handle[24 + 12..24 + 16].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&handle).is_err());
        let mut version = event_bytes(libc::FAN_CREATE, &[1; 8], "x");
        version[4] = 99;
        assert!(parse(&version).is_err());
    }

    #[test]
    fn directories_are_classified_by_the_root_above_them() {
        let alice: Arc<str> = Arc::from("alice");
        let w = FsWatcher {
            group: File::open("/dev/null").unwrap(),
            filesystems: Vec::new(),
            roots: HashMap::from([(PathBuf::from("/home/alice/Maildir"), Arc::clone(&alice))]),
            parents: HashMap::from([(PathBuf::from("/home/alice"), vec![("Maildir".into(), Arc::clone(&alice))])]),
            users: vec![Arc::clone(&alice)],
            cache: HashMap::new(),
            cached: 0,
        };
        let c = |p: &str| w.classify(Path::new(p));
        assert_eq!(c("/home/alice/Maildir"), Class::In(Arc::clone(&alice), Kind::Mailbox));
        assert_eq!(c("/home/alice/Maildir/new"), Class::In(Arc::clone(&alice), Kind::New));
        assert_eq!(c("/home/alice/Maildir/.Work/cur"), Class::In(Arc::clone(&alice), Kind::Cur));
        assert_eq!(c("/home/alice/Maildir/.Work"), Class::In(Arc::clone(&alice), Kind::Mailbox));
        assert_eq!(c("/home/alice/Maildir/tmp"), Class::Outside);
        assert_eq!(c("/home/alice/Maildir/dovecot.index.d/x"), Class::Outside);
        assert_eq!(c("/home/alice"), Class::Parent(PathBuf::from("/home/alice")));
        assert_eq!(c("/home/alicex/Maildir"), Class::Outside);
        assert_eq!(c("/var/log"), Class::Outside);
        let deep = format!("/home/alice/Maildir{}", "/d".repeat(MAX_DEPTH + 1));
        assert_eq!(c(&deep), Class::Outside, "deeper than MAX_DEPTH");
    }
}
