//! The wrapper's policy: which users each peer (SSH key) may replicate, and how.
//!
//! ```toml
//! # optional, defaults shown
//! lock_dir = "/run/mailreplica"     # root-owned directory for the per-user locks
//! lock_wait_secs = 5                # how long a second session for one user waits
//!
//! [peer.mx1]
//! allow_users = ["alice", "bob"]    # and/or allow_groups = ["vmail"]
//! # allow_all_users_in_uid_range = false
//! first_valid_uid = 1000            # default 1000
//! last_valid_uid = 60000            # default 60000
//! # first_valid_gid = 1, last_valid_gid = 4294967294 (defaults), for the primary group
//! mail_location = "maildir:~/Maildir"
//! # userdb = "passwd"               # or "passwd-file:/etc/dovecot/users"
//! # extra_groups = ["mail"]         # kept after the drop, besides the primary group
//! ```
//!
//! No `[peer.NAME]` table for the peer means deny. Unknown keys are an error: the file is
//! root's, and a typo must not silently widen (or narrow) access. The file must be trusted
//! (`trust::read_trusted`) before it is parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailreplica::config::MailLocation;
use mailreplica::privdrop::forbidden_id;
use mailreplica::userdb::Userdb;
use serde::Deserialize;

/// Groups never kept after the drop, whatever the policy says: each is worth root on a usual
/// system (the list of Dovecot's `drop_restricted_groups` and sudo's deny-list, extended).
pub(crate) const DENIED_GROUPS: &[&str] =
    &["root", "wheel", "sudo", "admin", "adm", "disk", "kmem", "shadow", "docker", "lxd", "libvirt", "systemd-journal"];

/// Default lock directory.
pub(crate) const DEFAULT_LOCK_DIR: &str = "/run/mailreplica";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    lock_dir: Option<PathBuf>,
    lock_wait_secs: Option<u64>,
    #[serde(default)]
    peer: BTreeMap<String, RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    #[serde(default)]
    allow_users: Vec<String>,
    #[serde(default)]
    allow_groups: Vec<String>,
    #[serde(default)]
    allow_all_users_in_uid_range: bool,
    first_valid_uid: Option<u32>,
    last_valid_uid: Option<u32>,
    first_valid_gid: Option<u32>,
    last_valid_gid: Option<u32>,
    mail_location: String,
    userdb: Option<String>,
    #[serde(default)]
    extra_groups: Vec<String>,
}

/// What one peer may do. Group names are resolved only for the peer in use (`resolve_groups`).
#[derive(Debug, Clone)]
pub(crate) struct PeerRule {
    /// Users allowed by name (exact match).
    pub(crate) allow_users: BTreeSet<String>,
    /// Users allowed by primary or supplementary membership in these groups.
    pub(crate) allow_groups: Vec<String>,
    /// Every user whose uid is in the range is allowed.
    pub(crate) allow_all_in_range: bool,
    /// Inclusive uid range.
    pub(crate) uids: (u32, u32),
    /// Inclusive range for the primary gid.
    pub(crate) gids: (u32, u32),
    /// Where the user's mail lives.
    pub(crate) mail_location: MailLocation,
    /// Where users are looked up.
    pub(crate) userdb: Userdb,
    /// Extra groups to keep, by name.
    pub(crate) extra_groups: Vec<String>,
}

/// The whole policy.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Root-owned directory for per-user lock files.
    pub(crate) lock_dir: PathBuf,
    /// How long a second session for the same user waits for the first one.
    pub(crate) lock_wait: Duration,
    /// Per-peer rules.
    pub(crate) peers: BTreeMap<String, PeerRule>,
}

/// Why the policy could not be used.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// Missing, or someone other than root could have changed it.
    Untrusted(String),
    /// Not valid TOML, unknown keys, or bad values.
    Invalid(String),
}

impl Policy {
    /// Reads the policy file, refusing it unless root alone can change it.
    pub(crate) fn load(path: &Path) -> Result<Self, LoadError> {
        let text = crate::trust::read_trusted(path).map_err(LoadError::Untrusted)?;
        Self::parse(&text).map_err(|e| LoadError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Parses and validates policy text.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| e.to_string())?;
        let lock_dir = raw.lock_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_DIR));
        if !lock_dir.is_absolute() {
            return Err("lock_dir must be an absolute path".to_owned());
        }
        let lock_wait = Duration::from_secs(raw.lock_wait_secs.unwrap_or(5));
        if lock_wait > Duration::from_secs(crate::PRE_SERVE_DEADLINE.as_secs() / 2) {
            return Err(format!("lock_wait_secs must be at most {}", crate::PRE_SERVE_DEADLINE.as_secs() / 2));
        }
        let mut peers = BTreeMap::new();
        for (name, p) in raw.peer {
            let bad = |m: String| format!("[peer.{name}]: {m}");
            if !crate::args::valid_peer_name(&name) {
                return Err(bad("invalid peer name".to_owned()));
            }
            let uids = (p.first_valid_uid.unwrap_or(1000), p.last_valid_uid.unwrap_or(60000));
            let gids = (p.first_valid_gid.unwrap_or(1), p.last_valid_gid.unwrap_or(u32::MAX - 1));
            if uids.0 == 0 || uids.0 > uids.1 || uids.1 == u32::MAX {
                return Err(bad("need 1 <= first_valid_uid <= last_valid_uid < 4294967295".to_owned()));
            }
            if gids.0 == 0 || gids.0 > gids.1 || gids.1 == u32::MAX {
                return Err(bad("need 1 <= first_valid_gid <= last_valid_gid < 4294967295".to_owned()));
            }
            let mail_location = MailLocation::parse(&p.mail_location).map_err(|e| bad(e.to_string()))?;
            let home_relative = ["~", "%h", "%{home}"].iter().any(|h| mail_location.root.starts_with(h));
            if !(mail_location.root.starts_with('/') || home_relative) {
                return Err(bad("mail_location must be absolute or start with ~ or %h".to_owned()));
            }
            let userdb = Userdb::parse(p.userdb.as_deref().unwrap_or("passwd")).map_err(bad)?;
            for g in p.extra_groups.iter().chain(&p.allow_groups) {
                if g.is_empty() {
                    return Err(bad("empty group name".to_owned()));
                }
            }
            if let Some(g) = p.extra_groups.iter().find(|g| DENIED_GROUPS.contains(&g.as_str())) {
                return Err(bad(format!("extra group {g} is never allowed")));
            }
            peers.insert(
                name,
                PeerRule {
                    allow_users: p.allow_users.into_iter().collect(),
                    allow_groups: p.allow_groups,
                    allow_all_in_range: p.allow_all_users_in_uid_range,
                    uids,
                    gids,
                    mail_location,
                    userdb,
                    extra_groups: p.extra_groups,
                },
            );
        }
        Ok(Self { lock_dir, lock_wait, peers })
    }
}

impl PeerRule {
    /// The gids of `extra_groups`, checked: each must exist, not be gid 0/-1/0xFFFF and not be
    /// on the deny-list by name.
    pub(crate) fn resolve_extra_groups(&self) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        for name in &self.extra_groups {
            let g = nix::unistd::Group::from_name(name)
                .map_err(|e| format!("extra group {name}: {e}"))?
                .ok_or_else(|| format!("extra group {name} does not exist"))?;
            let gid = g.gid.as_raw();
            if forbidden_id(gid) || DENIED_GROUPS.contains(&g.name.as_str()) {
                return Err(format!("extra group {name} (gid {gid}) is never allowed"));
            }
            out.push(gid);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: &str = r#"
[peer.mx1]
allow_users = ["alice", "bob"]
first_valid_uid = 1000
last_valid_uid = 60000
mail_location = "maildir:~/Maildir"
"#;

    #[test]
    fn documented_shape() {
        let p = Policy::parse(SHAPE).unwrap();
        let r = &p.peers["mx1"];
        assert!(r.allow_users.contains("alice"));
        assert_eq!(r.uids, (1000, 60000));
        assert!(matches!(r.userdb, Userdb::Passwd));
        assert_eq!(p.lock_dir, PathBuf::from(DEFAULT_LOCK_DIR));
        let full = r#"
lock_dir = "/run/x"
lock_wait_secs = 2
[peer.a]
allow_groups = ["vmail"]
mail_location = "maildir:/var/vmail/%d/%n"
userdb = "passwd-file:/etc/dovecot/users"
extra_groups = ["mail"]
first_valid_gid = 100
last_valid_gid = 200
"#;
        let p = Policy::parse(full).unwrap();
        assert_eq!(p.lock_wait, Duration::from_secs(2));
        assert_eq!(p.peers["a"].gids, (100, 200));
    }

    #[test]
    fn refusals() {
        for bad in [
            "[peer.a]\nallow_user = [\"x\"]\nmail_location = \"maildir:~/M\"\n", // typo
            "[peer.a]\nallow_users = []\n",                                      // no mail_location
            "[peer.a]\nmail_location = \"maildir:~/M\"\nfirst_valid_uid = 0\n",
            "[peer.a]\nmail_location = \"maildir:~/M\"\nfirst_valid_uid = 9\nlast_valid_uid = 8\n",
            "[peer.a]\nmail_location = \"maildir:rel/M\"\n",
            "[peer.a]\nmail_location = \"mbox:~/M\"\n",
            "[peer.a]\nmail_location = \"maildir:~/M\"\nuserdb = \"ldap\"\n",
            "[peer.a]\nmail_location = \"maildir:~/M\"\nextra_groups = [\"sudo\"]\n",
            "[peer.\"a b\"]\nmail_location = \"maildir:~/M\"\n",
            "unknown = 1\n",
            "lock_dir = \"rel\"\n",
            "lock_wait_secs = 1000\n",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
