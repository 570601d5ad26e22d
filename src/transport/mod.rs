//! Byte transports under a dsync session: for now the embedded SSH client behind
//! `remote:` and `remoteprefix:` destinations.
//!
//! ```text
//!   mailreplica sync -u alice remoteprefix:root@replica
//!        │
//!        │  SshConnection::connect   (as the invoking user: root's key, root's known_hosts;
//!        │                            host key checked by known_hosts.rs before anything is
//!        │                            sent, then public-key auth with keys.rs or the agent)
//!        │  ── privileges are dropped to alice here (no thread exists yet) ──
//!        │  SshConnection::exec      exec channel; one "ssh-io" thread drives the connection
//!        ▼
//!   ChannelWriter (std::io::Write) ─► bounded queue ─► channel data ─► sshd ─► forced command
//!   ChannelReader (std::io::Read)  ◄─ bounded queue ◄─ pump task ◄─ channel data/EOF/exit/close
//!   ChannelEnd::wait               the remote exit status, collected after EOF until Close
//! ```
//!
//! The store and the dsync layers know nothing of this module: the sync engine is handed a
//! plain `Read` + `Write` pair.
//!
//! | file | what |
//! |---|---|
//! | `ssh.rs` | connection, authentication, exec channels, the blocking bridge, errors |
//! | `keys.rs` | private keys from files (mode checks, passphrase files) |
//! | `known_hosts.rs` | OpenSSH's known_hosts rules: hashed names, patterns, markers |

pub mod keys;
pub mod known_hosts;
pub mod ssh;

use std::fmt;

/// Where a `remote:` or `remoteprefix:` destination points: `[LOGIN@]HOST[:PORT]`, with an
/// IPv6 address in brackets (`[::1]:2222`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// The SSH login, if the destination names one.
    pub login: Option<String>,
    /// Host name or address (without brackets).
    pub host: String,
    /// The port, if the destination names one.
    pub port: Option<u16>,
}

/// A destination that is not `[LOGIN@]HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad remote destination {text:?}: {reason}")]
pub struct BadTarget {
    /// What was given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl RemoteTarget {
    /// Parses `[LOGIN@]HOST[:PORT]` (the part after `remote:` or `remoteprefix:`).
    pub fn parse(text: &str) -> Result<Self, BadTarget> {
        let bad = |reason| BadTarget { text: text.to_owned(), reason };
        let (login, rest) = match text.rsplit_once('@') {
            Some(("", _)) => return Err(bad("empty login before @")),
            Some((l, r)) => (Some(l.to_owned()), r),
            None => (None, text),
        };
        if let Some(l) = &login
            && l.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("the login contains white space"));
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (h, after) = inner.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad("expected :PORT after ]"))?)),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | ',')) {
            return Err(bad("the host name contains a character a host name can't have"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port is not 1-65535"))?),
        };
        Ok(Self { login, host: host.to_owned(), port })
    }
}

impl fmt::Display for RemoteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.login {
            write!(f, "{l}@")?;
        }
        match (self.host.contains(':'), self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (_, None) => f.write_str(&self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = RemoteTarget::parse("root@replica.example.org:2222").unwrap();
        assert_eq!(t.login.as_deref(), Some("root"));
        assert_eq!(t.host, "replica.example.org");
        assert_eq!(t.port, Some(2222));
        let t = RemoteTarget::parse("replica").unwrap();
        assert_eq!((t.login, t.host.as_str(), t.port), (None, "replica", None));
        let t = RemoteTarget::parse("vmail@[::1]:22").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", Some(22)));
        assert_eq!(t.to_string(), "vmail@[::1]:22");
        assert!(RemoteTarget::parse("[::1").is_err());
        assert!(RemoteTarget::parse("host:0").is_err());
        assert!(RemoteTarget::parse("host:x").is_err());
        assert!(RemoteTarget::parse("@host").is_err());
        assert!(RemoteTarget::parse("").is_err());
        assert!(RemoteTarget::parse("a b").is_err());
    }
}
