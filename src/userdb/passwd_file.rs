//! Dovecot's `passwd-file` userdb format.
//!
//! ```text
//! user:password:uid:gid:gecos:home:shell:extra_fields
//! alice@example.com:{SHA512-CRYPT}...:5000:5000::/var/vmail/example.com/alice::userdb_mail=maildir:~/Maildir
//! ```
//!
//! Empty lines and lines starting with `#` are ignored. UID and GID may be numbers or names
//! (resolved through NSS). Extra fields are space-separated `key=value` pairs; a `userdb_`
//! prefix is kept as written.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::{UserEntry, UserdbError};

/// A parsed passwd-file.
#[derive(Debug, Clone)]
pub struct PasswdFile {
    /// Its users, in file order.
    pub users: Vec<UserEntry>,
    /// Each name's first entry in `users`.
    by_name: HashMap<Box<str>, usize>,
}

/// What tells one version of a file from another without reading it: replaced (a new
/// inode), rewritten (size, times).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Files parsed once and kept while unchanged: a long-running service looks users up on
/// every notification, and a host's passwd-file may list tens of thousands of them.
static CACHE: Mutex<Vec<(PathBuf, Stamp, Arc<PasswdFile>)>> = Mutex::new(Vec::new());

impl PasswdFile {
    /// The parsed file, re-read only when it changed since the last call (checked with one
    /// `stat`).
    pub fn cached(path: &Path) -> Result<Arc<Self>, UserdbError> {
        let io = |e| UserdbError::Io { what: path.display().to_string(), source: e };
        let before = Stamp::of(&std::fs::metadata(path).map_err(io)?);
        {
            let cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, _, f)) = cache.iter().find(|(p, s, _)| p == path && *s == before) {
                return Ok(Arc::clone(f));
            }
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let parsed = Arc::new(Self::parse(&text, path)?);
        // Kept only if it did not change while it was read.
        if Stamp::of(&std::fs::metadata(path).map_err(io)?) == before {
            let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
            cache.retain(|(p, _, _)| p != path);
            cache.push((path.to_path_buf(), before, Arc::clone(&parsed)));
        }
        Ok(parsed)
    }

    /// Reads and parses a passwd-file.
    pub fn read(path: &Path) -> Result<Self, UserdbError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UserdbError::Io { what: path.display().to_string(), source: e })?;
        Self::parse(&text, path)
    }

    /// Parses passwd-file text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, UserdbError> {
        let mut users = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let bad = |reason: &str| UserdbError::Malformed {
                path: PathBuf::from(path),
                line: lineno,
                reason: reason.to_owned(),
            };
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.splitn(8, ':').collect();
            if f.len() < 6 {
                return Err(bad("needs at least user:password:uid:gid:gecos:home"));
            }
            let name = f[0];
            if name.is_empty() {
                return Err(bad("empty user name"));
            }
            let uid = resolve_uid(f[2]).ok_or_else(|| bad("bad uid"))?;
            let gid = resolve_gid(f[3]).ok_or_else(|| bad("bad gid"))?;
            let home = f[5];
            if !home.is_empty() && !home.starts_with('/') {
                return Err(bad("home must be an absolute path"));
            }
            let mut extra = Vec::new();
            if let Some(x) = f.get(7) {
                for field in x.split_whitespace() {
                    let (k, v) = field.split_once('=').unwrap_or((field, ""));
                    extra.push((k.to_owned(), v.to_owned()));
                }
            }
            users.push(UserEntry { name: name.to_owned(), uid, gid, home: PathBuf::from(home), extra });
        }
        let mut by_name = HashMap::with_capacity(users.len());
        for (i, u) in users.iter().enumerate() {
            by_name.entry(Box::from(u.name.as_str())).or_insert(i);
        }
        Ok(Self { users, by_name })
    }

    /// The user with exactly this name (the first line naming them, as Dovecot takes it).
    pub fn lookup(&self, name: &str) -> Option<&UserEntry> {
        self.by_name.get(name).map(|&i| &self.users[i])
    }
}

fn resolve_uid(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    nix::unistd::User::from_name(s).ok().flatten().map(|u| u.uid.as_raw())
}

fn resolve_gid(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    nix::unistd::Group::from_name(s).ok().flatten().map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dovecot_lines() {
        let t = "# comment\n\nalice@example.com:{PLAIN}x:5000:5000::/var/vmail/alice::userdb_mail=maildir:~/M quota=1G userdb_mail_replica=remoteprefix:root@r2\nbob:x:root:root::/home/bob\n";
        let f = PasswdFile::parse(t, Path::new("users")).unwrap();
        assert_eq!(f.users.len(), 2);
        let a = f.lookup("alice@example.com").unwrap();
        assert_eq!(a.uid, 5000);
        assert_eq!(a.mail_location(), Some("maildir:~/M"));
        assert_eq!(a.mail_replica(), Some("remoteprefix:root@r2"));
        assert_eq!(f.lookup("bob").unwrap().uid, 0);
        assert_eq!(f.lookup("bob").unwrap().mail_replica(), None);
    }

    #[test]
    fn a_cached_file_is_read_again_once_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users");
        std::fs::write(&p, "a:x:1:1::/h\n").unwrap();
        let first = PasswdFile::cached(&p).unwrap();
        assert!(Arc::ptr_eq(&first, &PasswdFile::cached(&p).unwrap()), "unchanged: not parsed again");
        // Replaced by a rename (a new inode), as editors and config tools do.
        std::fs::write(dir.path().join("new"), "a:x:1:1::/h\nb:x:2:2::/h\n").unwrap();
        std::fs::rename(dir.path().join("new"), &p).unwrap();
        let second = PasswdFile::cached(&p).unwrap();
        assert!(second.lookup("b").is_some());
        // Rewritten in place with another length.
        std::fs::write(&p, "c:x:3:3::/h\n").unwrap();
        let third = PasswdFile::cached(&p).unwrap();
        assert!(third.lookup("c").is_some() && third.lookup("a").is_none());
        // Duplicates: the first line wins.
        let f = PasswdFile::parse("d:x:4:4::/one\nd:x:5:5::/two\n", Path::new("f")).unwrap();
        assert_eq!(f.lookup("d").unwrap().uid, 4);
    }

    #[test]
    fn malformed_names_line() {
        match PasswdFile::parse("ok:x:1:1::/h\nbad:x:notanumber-nor-user:1::/h\n", Path::new("f")) {
            Err(UserdbError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }
}
