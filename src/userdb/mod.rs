//! User lookup: who a mail user is on this system (UID, GID, home) and which users exist.
//!
//! Two sources, as in Dovecot: the system database through NSS (`passwd`), and Dovecot's
//! `passwd-file` format (`user:password:uid:gid:gecos:home:shell:extra fields`).

mod passwd_file;

use std::path::{Path, PathBuf};

pub use passwd_file::PasswdFile;

/// One user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// The name as the database spells it.
    pub name: String,
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Extra fields (`key=value`) from a passwd-file, e.g. `userdb_mail=…` or `mail=…`.
    pub extra: Vec<(String, String)>,
}

impl UserEntry {
    /// The user's own `mail` setting from the userdb (Dovecot's `mail` or `userdb_mail` field),
    /// which overrides the global `mail_location`.
    pub fn mail_location(&self) -> Option<&str> {
        self.extra.iter().find(|(k, _)| k == "userdb_mail" || k == "mail").map(|(_, v)| v.as_str())
    }

    /// The user's own replica from the userdb (Dovecot's `mail_replica` plugin setting, as a
    /// `userdb_mail_replica` or `mail_replica` field), which overrides the replicator's
    /// `destination`.
    pub fn mail_replica(&self) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == "userdb_mail_replica" || k == "mail_replica")
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.trim().is_empty())
    }
}

/// Lookup failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserdbError {
    /// The database could not be read.
    #[error("reading {what}: {source}")]
    Io {
        /// The source (a path or "passwd").
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A passwd-file line is malformed.
    #[error("{path} line {line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// A user database.
#[derive(Debug, Clone)]
pub enum Userdb {
    /// The system database (NSS: /etc/passwd, LDAP, sssd, ...).
    Passwd,
    /// A Dovecot passwd-file.
    PasswdFile(PathBuf),
}

impl Userdb {
    /// Parses a `userdb` setting: `passwd` or `passwd-file:PATH`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        if spec == "passwd" {
            Ok(Self::Passwd)
        } else if let Some(p) = spec.strip_prefix("passwd-file:") {
            if p.is_empty() || !Path::new(p).is_absolute() {
                return Err("passwd-file needs an absolute path".to_owned());
            }
            Ok(Self::PasswdFile(PathBuf::from(p)))
        } else {
            Err(format!("unknown userdb {spec:?} (expected `passwd` or `passwd-file:/path`)"))
        }
    }

    /// Looks a user up by exact name. `Ok(None)` if there is no such user.
    pub fn lookup(&self, name: &str) -> Result<Option<UserEntry>, UserdbError> {
        match self {
            Self::Passwd => {
                if name.is_empty() || name.contains('\0') {
                    return Ok(None);
                }
                let user = nix::unistd::User::from_name(name)
                    .map_err(|e| UserdbError::Io { what: "passwd".to_owned(), source: e.into() })?;
                Ok(user.filter(|u| u.name == name).map(|u| UserEntry {
                    name: u.name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                    home: u.dir,
                    extra: Vec::new(),
                }))
            }
            Self::PasswdFile(p) => Ok(PasswdFile::cached(p)?.lookup(name).cloned()),
        }
    }

    /// Every user, in database order.
    pub fn list(&self) -> Result<Vec<UserEntry>, UserdbError> {
        match self {
            Self::Passwd => Ok(crate::sys::all_passwd_entries()
                .map_err(|e| UserdbError::Io { what: "passwd".to_owned(), source: e })?
                .into_iter()
                .map(|e| UserEntry {
                    name: e.name,
                    uid: e.uid,
                    gid: e.gid,
                    home: PathBuf::from(e.home),
                    extra: Vec::new(),
                })
                .collect()),
            Self::PasswdFile(p) => Ok(PasswdFile::cached(p)?.users.clone()),
        }
    }
}

/// Dovecot-style wildcard match: `*` any run, `?` one character.
pub fn wildcard_match(mask: &str, name: &str) -> bool {
    let m: Vec<char> = mask.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut mi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if mi < m.len() && (m[mi] == '?' || m[mi] == n[ni]) {
            mi += 1;
            ni += 1;
        } else if mi < m.len() && m[mi] == '*' {
            star = Some(mi);
            mark = ni;
            mi += 1;
        } else if let Some(s) = star {
            mi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while mi < m.len() && m[mi] == '*' {
        mi += 1;
    }
    mi == m.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", "alice"));
        assert!(wildcard_match("a*e", "alice"));
        assert!(wildcard_match("al?ce", "alice"));
        assert!(!wildcard_match("b*", "alice"));
        assert!(wildcard_match("*@example.com", "bob@example.com"));
    }

    #[test]
    fn system_root_exists() {
        let r = Userdb::Passwd.lookup("root").unwrap().unwrap();
        assert_eq!(r.uid, 0);
        assert!(Userdb::Passwd.lookup("no-such-user-xyz").unwrap().is_none());
        assert!(Userdb::Passwd.list().unwrap().iter().any(|u| u.name == "root"));
    }

    #[test]
    fn parse_spec() {
        assert!(matches!(Userdb::parse("passwd"), Ok(Userdb::Passwd)));
        assert!(matches!(Userdb::parse("passwd-file:/etc/x"), Ok(Userdb::PasswdFile(_))));
        assert!(Userdb::parse("passwd-file:rel").is_err());
        assert!(Userdb::parse("ldap").is_err());
    }
}
