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

use std::path::{Path, PathBuf};

use super::{UserEntry, UserdbError};

/// A parsed passwd-file.
#[derive(Debug, Clone)]
pub struct PasswdFile {
    /// Its users, in file order.
    pub users: Vec<UserEntry>,
}

impl PasswdFile {
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
        Ok(Self { users })
    }

    /// The user with exactly this name.
    pub fn lookup(&self, name: &str) -> Option<&UserEntry> {
        self.users.iter().find(|u| u.name == name)
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
    fn malformed_names_line() {
        match PasswdFile::parse("ok:x:1:1::/h\nbad:x:notanumber-nor-user:1::/h\n", Path::new("f")) {
            Err(UserdbError::Malformed { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }
}
