//! Dovecot's `mail_location` syntax, as far as it applies to Maildir:
//! `maildir:PATH[:LAYOUT=fs|maildir++][:INBOX=PATH][:INDEX=PATH][:UTF-8]`.
//!
//! Paths may start with `~` (the user's home) and use `%u` (user), `%n` (user part before
//! `@`), `%d` (domain), `%h` (home), `%%`, or the long forms `%{user}`, `%{username}`,
//! `%{domain}`, `%{home}`. Parameters that would move Dovecot's files somewhere we do not look
//! (`CONTROL=`, `DIRNAME=`) are refused rather than silently ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::maildir::{Layout, MaildirSettings};

/// A parsed, not yet expanded, mail location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailLocation {
    /// Another format's driver (`sdbox`, `mdbox`, …), from [`MailLocation::parse_any`]: our
    /// store can't open it ([`MailLocation::expand`] refuses it), but the replicator hands such
    /// users to `doveadm sync`.
    pub foreign: Option<String>,
    /// The root path template.
    pub root: String,
    /// INBOX path template.
    pub inbox: Option<String>,
    /// Index path template (only Dovecot's `dovecot.mailbox.log` lives there for us).
    pub index: Option<String>,
    /// Layout.
    pub layout: Layout,
    /// UTF-8 directory names.
    pub utf8: bool,
}

/// A mail location that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MailLocationError(pub String);

impl MailLocation {
    /// Parses a location string.
    pub fn parse(s: &str) -> Result<Self, MailLocationError> {
        let err = |m: String| MailLocationError(m);
        let rest =
            s.strip_prefix("maildir:").ok_or_else(|| err(format!("{s:?}: only `maildir:` locations are supported")))?;
        let mut parts = rest.split(':');
        let root = parts.next().unwrap_or_default().to_owned();
        if root.is_empty() {
            return Err(err(format!("{s:?}: the maildir path is missing")));
        }
        let mut loc =
            Self { foreign: None, root, inbox: None, index: None, layout: Layout::MaildirPlusPlus, utf8: false };
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "LAYOUT" => {
                    loc.layout = match v.to_ascii_lowercase().as_str() {
                        "fs" => Layout::Fs,
                        "maildir++" => Layout::MaildirPlusPlus,
                        _ => return Err(err(format!("{s:?}: LAYOUT must be fs or maildir++"))),
                    }
                }
                "INBOX" if !v.is_empty() => loc.inbox = Some(v.to_owned()),
                "INDEX" if !v.is_empty() => loc.index = Some(v.to_owned()),
                "UTF-8" | "UTF8" => loc.utf8 = true,
                // These only concern Dovecot's own caches.
                "INDEXPVT" | "VOLATILEDIR" | "ITERINDEX" | "NO-NOSELECT" | "BROKENCHAR" => {}
                _ => return Err(err(format!("{s:?}: parameter {k} is not supported"))),
            }
        }
        Ok(loc)
    }

    /// Parses a location of any format: a `maildir:` one as [`MailLocation::parse`] does,
    /// any other `DRIVER:…` (Dovecot's rule: the driver is the alphanumeric word before the
    /// first `:`) kept as foreign, to be named in errors and handed to Dovecot.
    pub fn parse_any(s: &str) -> Result<Self, MailLocationError> {
        match driver(s) {
            Some("maildir") | None => Self::parse(s),
            Some(d) => Ok(Self {
                foreign: Some(d.to_owned()),
                root: s[d.len() + 1..].split(':').next().unwrap_or_default().to_owned(),
                inbox: None,
                index: None,
                layout: Layout::MaildirPlusPlus,
                utf8: false,
            }),
        }
    }

    /// Expands the templates for one user into store settings.
    pub fn expand(
        &self,
        user: &str,
        home: &Path,
        hostname: &str,
        lock_wait: Duration,
    ) -> Result<MaildirSettings, MailLocationError> {
        if let Some(d) = &self.foreign {
            return Err(MailLocationError(format!(
                "mail_location {d}:{}: mailreplica's own store reads maildir: locations only \
                 (the replicator hands {d} users to doveadm sync)",
                self.root
            )));
        }
        let root = expand(&self.root, user, home)?;
        let inbox = self.inbox.as_deref().map(|i| expand(i, user, home)).transpose()?;
        let index = self.index.as_deref().map(|i| expand(i, user, home)).transpose()?;
        let mut s = MaildirSettings::new(root);
        s.inbox = inbox;
        s.index_root = index;
        s.layout = self.layout;
        s.utf8 = self.utf8;
        s.hostname = hostname.to_owned();
        s.lock_wait = lock_wait;
        s.home = Some(home.to_path_buf());
        Ok(s)
    }
}

/// The driver of a location string (`maildir`, `sdbox`, …): the alphanumeric word before its
/// first `:`, as Dovecot tells a location from a path or a command.
pub(crate) fn driver(s: &str) -> Option<&str> {
    let (d, _) = s.split_once(':')?;
    (!d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(d)
}

/// Expands `~` and `%` variables in a path template.
pub fn expand(template: &str, user: &str, home: &Path) -> Result<PathBuf, MailLocationError> {
    let home_s = home.to_str().ok_or_else(|| MailLocationError("home directory is not UTF-8".to_owned()))?;
    let (local, domain) = user.split_once('@').unwrap_or((user, ""));
    let mut out = String::new();
    let mut rest = template;
    if let Some(r) = rest.strip_prefix('~')
        && (r.is_empty() || r.starts_with('/'))
    {
        out.push_str(home_s);
        rest = r;
    }
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let var: String = match chars.next() {
            Some('{') => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => {
                            return Err(MailLocationError(format!("{template:?}: unterminated %{{")));
                        }
                    }
                }
                name
            }
            Some(ch) => ch.to_string(),
            None => return Err(MailLocationError(format!("{template:?}: trailing %"))),
        };
        match var.as_str() {
            "u" | "user" => out.push_str(user),
            "n" | "username" => out.push_str(local),
            "d" | "domain" => out.push_str(domain),
            "h" | "home" => out.push_str(home_s),
            "%" => out.push('%'),
            v => {
                return Err(MailLocationError(format!("{template:?}: unknown variable %{v}")));
            }
        }
    }
    if out.split('/').any(|c| c == "..") {
        return Err(MailLocationError(format!("{template:?} expands to a path with `..` ({out:?})")));
    }
    if out.starts_with('/') {
        return Ok(PathBuf::from(out));
    }
    // A relative path (typed on the command line) is relative to the current directory.
    let cwd = std::env::current_dir().map_err(|e| {
        MailLocationError(format!("{template:?} is relative and the current directory is unknown: {e}"))
    })?;
    Ok(cwd.join(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_expand() {
        let l = MailLocation::parse("maildir:~/Maildir:LAYOUT=fs:INBOX=/var/mail/%u").unwrap();
        assert_eq!(l.layout, Layout::Fs);
        let s = l.expand("bob@ex.org", Path::new("/home/bob"), "h", Duration::ZERO).unwrap();
        assert_eq!(s.root, PathBuf::from("/home/bob/Maildir"));
        assert_eq!(s.inbox, Some(PathBuf::from("/var/mail/bob@ex.org")));
        let l = MailLocation::parse("maildir:/srv/%d/%n/Maildir:UTF-8").unwrap();
        let s = l.expand("bob@ex.org", Path::new("/x"), "h", Duration::ZERO).unwrap();
        assert_eq!(s.root, PathBuf::from("/srv/ex.org/bob/Maildir"));
        assert!(s.utf8);
    }

    #[test]
    fn other_formats_are_kept_but_not_opened() {
        let l = MailLocation::parse_any("sdbox:~/sdbox:INDEX=/var/idx/%u").unwrap();
        assert_eq!(l.foreign.as_deref(), Some("sdbox"));
        let e = l.expand("u", Path::new("/h"), "h", Duration::ZERO).unwrap_err();
        assert!(e.0.contains("mail_location sdbox:~/sdbox") && e.0.contains("maildir: locations only"), "{e}");
        assert_eq!(MailLocation::parse_any("maildir:~/M").unwrap(), MailLocation::parse("maildir:~/M").unwrap());
        assert!(MailLocation::parse_any("maildir:~/M:CONTROL=/x").is_err());
        assert!(MailLocation::parse_any("/no/driver").is_err());
        assert_eq!(driver("mdbox:~/m"), Some("mdbox"));
        assert_eq!(driver("~/x:y"), None);
    }

    #[test]
    fn refusals() {
        assert!(MailLocation::parse("mbox:~/mail").is_err());
        assert!(MailLocation::parse("maildir:").is_err());
        assert!(MailLocation::parse("maildir:~/M:CONTROL=/x").is_err());
        assert!(MailLocation::parse("maildir:~/M:LAYOUT=weird").is_err());
        let l = MailLocation::parse("maildir:relative/path").unwrap();
        assert!(l.expand("u", Path::new("/h"), "h", Duration::ZERO).unwrap().root.is_absolute());
        let l = MailLocation::parse("maildir:/srv/%u").unwrap();
        assert!(l.expand("../../etc", Path::new("/h"), "h", Duration::ZERO).is_err());
        assert!(
            MailLocation::parse("maildir:/srv/%x").unwrap().expand("u", Path::new("/h"), "h", Duration::ZERO).is_err()
        );
    }
}
