//! The decision: may this peer replicate this (grammatical) username, and as which ids?
//! Runs as root under the pre-drop deadline, using only trusted sources: the userdb and the
//! root-owned policy. Checks, in order: lookup, exact name, forbidden ids, ranges, allow-list,
//! groups, home path.

use std::path::PathBuf;

use mailreplica::privdrop::forbidden_id;
use mailreplica::userdb::{PasswdFile, UserEntry, Userdb};

use crate::policy::PeerRule;
use crate::refusal::{Reason, Refusal};
use crate::username::Username;

/// Who the session will run as.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    /// Target uid (never 0, -1, 0xFFFF; within the peer's range).
    pub(crate) uid: u32,
    /// Target primary gid (same rules).
    pub(crate) gid: u32,
    /// Every group to hold after the drop: the primary gid first, then the policy's extra groups.
    pub(crate) groups: Vec<u32>,
    /// The home directory from the userdb (absolute, UTF-8; not yet opened).
    pub(crate) home: PathBuf,
}

fn lookup(userdb: &Userdb, name: &str) -> Result<Option<UserEntry>, String> {
    match userdb {
        Userdb::PasswdFile(path) => {
            // The passwd-file maps names to uids: it must be root's like the policy.
            let text = crate::trust::read_trusted(path)?;
            let file = PasswdFile::parse(&text, path).map_err(|e| e.to_string())?;
            Ok(file.lookup(name).cloned())
        }
        other => other.lookup(name).map_err(|e| e.to_string()),
    }
}

/// Decides for `name` under `rule`.
pub(crate) fn decide(rule: &PeerRule, name: &Username) -> Result<Account, Refusal> {
    let entry = lookup(&rule.userdb, name.as_str())
        .map_err(|e| Refusal::new(Reason::LookupFailed, e))?
        .ok_or_else(|| Refusal::new(Reason::NoSuchUser, "no such user"))?;
    if entry.name.as_bytes() != name.as_str().as_bytes() {
        let got = crate::authlog::escape(entry.name.as_bytes(), 64);
        return Err(Refusal::new(Reason::NameMismatch, format!("userdb returned name \"{got}\"")));
    }
    let (uid, gid) = (entry.uid, entry.gid);
    if forbidden_id(uid) {
        return Err(Refusal::new(Reason::ForbiddenUid, format!("uid {uid}")));
    }
    if forbidden_id(gid) {
        return Err(Refusal::new(Reason::ForbiddenGid, format!("uid {uid} gid {gid}")));
    }
    if uid < rule.uids.0 || uid > rule.uids.1 {
        return Err(Refusal::new(Reason::UidOutOfRange, format!("uid {uid} not in {}..={}", rule.uids.0, rule.uids.1)));
    }
    if gid < rule.gids.0 || gid > rule.gids.1 {
        return Err(Refusal::new(Reason::GidOutOfRange, format!("gid {gid} not in {}..={}", rule.gids.0, rule.gids.1)));
    }
    if !allowed(rule, &entry).map_err(|e| Refusal::new(Reason::LookupFailed, e))? {
        return Err(Refusal::new(Reason::NotAllowed, format!("uid {uid} not allowed for this peer")));
    }
    let mut groups = vec![gid];
    for g in rule.resolve_extra_groups().map_err(|e| Refusal::new(Reason::BadGroup, e))? {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let home = entry.home;
    if !home.is_absolute() || home.to_str().is_none() {
        return Err(Refusal::new(Reason::BadHome, format!("uid {uid}: home is empty, relative or not UTF-8")));
    }
    Ok(Account { uid, gid, groups, home })
}

fn allowed(rule: &PeerRule, entry: &UserEntry) -> Result<bool, String> {
    if rule.allow_users.contains(&entry.name) || rule.allow_all_in_range {
        return Ok(true);
    }
    for g in &rule.allow_groups {
        let Some(group) = nix::unistd::Group::from_name(g).map_err(|e| format!("group {g}: {e}"))? else {
            continue; // a group that does not exist allows nobody
        };
        if group.gid.as_raw() == entry.gid || group.mem.iter().any(|m| m == &entry.name) {
            return Ok(true);
        }
    }
    Ok(false)
}
