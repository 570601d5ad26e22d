//! Becoming a mail user for good, and proving it: the one privilege drop of both
//! `mailreplica -u USER` (as root, before it touches a single mail file) and
//! `mailreplica-wrapper` (phase C of its root phase).
//!
//! The order is the one of WRAPPER-SECURITY §2.1 phase C (OpenSSH `permanently_set_uid`,
//! systemd, Dovecot):
//!
//! ```text
//! (still root, one thread)  Threads: 1 ─ ambient caps cleared ─ inheritable cleared
//!                           ─ bounding set dropped (every cap up to /proc/sys/kernel/cap_last_cap;
//!                             needs CAP_SETPCAP, so before the uid change)
//!   setgroups(primary + extras) ─ setresgid(g,g,g) ─ setresuid(u,u,u)
//!   no_new_privs ─ dumpable 0
//! (now the user)            verify: getres[ug]id, getgroups, setuid(0)/seteuid(0)/setgid(0)/
//!                           setegid(0)/setgroups([0]) all fail, no capability in any set,
//!                           /proc/self/task/*/status Cap* = 0, NoNewPrivs = 1, not dumpable
//! ```
//!
//! Capabilities, the bounding set and `no_new_privs` are per thread, so the drop refuses to
//! start unless the process has exactly one thread. Every return value is checked; any
//! surprise is a [`DropError`], after which the caller must not go on. Success yields
//! [`Unprivileged`], a token only this module can make, for the steps that must come after.
//! The two `prctl` calls that neither `nix` nor `caps` offer are in [`crate::sys`].

use std::collections::BTreeSet;
use std::io;

use nix::unistd::{
    Gid, Uid, getgroups, getresgid, getresuid, setegid, seteuid, setgid, setgroups, setresgid, setresuid, setuid,
};

/// Why a privilege drop failed. Any of these is fatal: the caller must exit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DropError {
    /// The target is root, or an id that `set*id` treats as "unchanged" ([`forbidden_id`]).
    #[error("refusing to drop to uid {uid} / gid {gid} / groups {groups:?}")]
    Forbidden {
        /// Target uid.
        uid: u32,
        /// Target primary gid.
        gid: u32,
        /// Target groups.
        groups: Vec<u32>,
    },
    /// Another thread exists: it would keep its own capabilities.
    #[error("threads: more than one thread before the drop")]
    Threaded,
    /// A call of the drop failed.
    #[error("{call}: {error}")]
    Call {
        /// The call.
        call: &'static str,
        /// Its error.
        error: io::Error,
    },
    /// Dropping one capability from the bounding set failed.
    #[error("PR_CAPBSET_DROP {cap}: {error}")]
    BoundingCap {
        /// The capability number.
        cap: u32,
        /// The error.
        error: io::Error,
    },
    /// The state after the drop is not the one asked for, or root can be regained.
    #[error("{0}")]
    NotVerified(String),
}

fn failed(call: &'static str, error: impl Into<io::Error>) -> DropError {
    DropError::Call { call, error: error.into() }
}

fn not_verified(what: String) -> DropError {
    DropError::NotVerified(what)
}

/// True for ids that must never be a drop target: 0 (root), and -1 / 16-bit -1, which `set*id`
/// treat as "leave unchanged" (sudo CVE-2019-14287).
pub fn forbidden_id(id: u32) -> bool {
    id == 0 || id == u32::MAX || id == 0xffff
}

/// Whom to become: a uid, a primary gid and the exact set of groups to hold afterwards (the
/// primary gid first). Checked when built, so a `Target` never names root or a "leave
/// unchanged" id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Target {
    /// `uid` and `gid`, holding `gid` plus `extra_groups` (duplicates and the primary gid
    /// among them are ignored) and no other group.
    pub fn new(uid: u32, gid: u32, extra_groups: &[u32]) -> Result<Self, DropError> {
        let mut groups = vec![gid];
        for &g in extra_groups {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        if forbidden_id(uid) || groups.iter().any(|&g| forbidden_id(g)) {
            return Err(DropError::Forbidden { uid, gid, groups });
        }
        Ok(Self { uid, gid, groups })
    }

    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The primary gid.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Every group held after the drop, the primary gid first.
    pub fn groups(&self) -> &[u32] {
        &self.groups
    }
}

/// Proof that this process dropped root for good and verified it. Only [`drop_to`] makes one,
/// so a function that takes `&Unprivileged` cannot run before the drop.
#[derive(Debug)]
#[must_use = "the proof is what the steps after the drop require"]
pub struct Unprivileged {
    target: Target,
    evidence: String,
}

impl Unprivileged {
    /// The uid the process runs as.
    pub fn uid(&self) -> u32 {
        self.target.uid
    }

    /// The primary gid the process runs as.
    pub fn gid(&self) -> u32 {
        self.target.gid
    }

    /// The groups the process holds, the primary gid first.
    pub fn groups(&self) -> &[u32] {
        &self.target.groups
    }

    /// What was proven, on one line for a log: ids, groups, the errno of every attempt to get
    /// root back, and that no capability and no other privilege is left, e.g.
    /// `uid=1001 gid=1001 groups=1001 setuid(0)=EPERM … caps=0 bounding=0 nnp=1 threads=1`.
    pub fn evidence(&self) -> &str {
        &self.evidence
    }
}

/// One field of a `/proc/…/status` file, e.g. `Uid` → `"1001\t1001\t1001\t1001"`.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(str::trim)
}

/// The highest capability number this kernel knows.
fn cap_last_cap() -> Result<u32, DropError> {
    let s = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(|e| failed("cap_last_cap", e))?;
    let n: u32 = s.trim().parse().map_err(|e| failed("cap_last_cap", io::Error::other(e)))?;
    if n > 63 {
        return Err(failed("cap_last_cap", io::Error::other(format!("implausible value {n}"))));
    }
    Ok(n)
}

/// Drops root for good: becomes `target` in the order above, then proves it. Must run on the
/// main thread while it is the only thread, as root (the bounding set needs CAP_SETPCAP).
pub fn drop_to(target: &Target) -> Result<Unprivileged, DropError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| failed("/proc/self/status", e))?;
    if status_field(&status, "Threads") != Some("1") {
        return Err(DropError::Threaded);
    }
    crate::sys::clear_ambient_caps().map_err(|e| failed("PR_CAP_AMBIENT_CLEAR_ALL", e))?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| failed("clear inheritable caps", io::Error::other(e)))?;
    let last = cap_last_cap()?;
    for cap in 0..=last {
        crate::sys::drop_bounding_cap(cap).map_err(|error| DropError::BoundingCap { cap, error })?;
    }
    let groups: Vec<Gid> = target.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    setgroups(&groups).map_err(|e| failed("setgroups", e))?;
    let g = Gid::from_raw(target.gid);
    setresgid(g, g, g).map_err(|e| failed("setresgid", e))?;
    let u = Uid::from_raw(target.uid);
    setresuid(u, u, u).map_err(|e| failed("setresuid", e))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| failed("PR_SET_NO_NEW_PRIVS", e))?;
    // The kernel already reset dumpable on the id change (to suid_dumpable); make it explicit.
    nix::sys::prctl::set_dumpable(false).map_err(|e| failed("PR_SET_DUMPABLE", e))?;
    let evidence = verify(target, last)?;
    Ok(Unprivileged { target: target.clone(), evidence })
}

/// A call that must fail now: returns its errno for the evidence line.
fn must_fail(name: &str, r: nix::Result<()>) -> Result<String, DropError> {
    match r {
        Ok(()) => Err(not_verified(format!("{name} succeeded after the drop"))),
        Err(e) => Ok(format!("{name}={e:?}")),
    }
}

/// Proves the drop; returns the evidence line.
fn verify(target: &Target, last_cap: u32) -> Result<String, DropError> {
    let r = getresuid().map_err(|e| failed("getresuid", e))?;
    if [r.real, r.effective, r.saved].iter().any(|x| x.as_raw() != target.uid) {
        return Err(not_verified(format!("uids {} {} {} != {}", r.real, r.effective, r.saved, target.uid)));
    }
    let g = getresgid().map_err(|e| failed("getresgid", e))?;
    if [g.real, g.effective, g.saved].iter().any(|x| x.as_raw() != target.gid) {
        return Err(not_verified(format!("gids {} {} {} != {}", g.real, g.effective, g.saved, target.gid)));
    }
    let have: BTreeSet<u32> = getgroups().map_err(|e| failed("getgroups", e))?.iter().map(|g| g.as_raw()).collect();
    let want: BTreeSet<u32> = target.groups.iter().copied().collect();
    if have != want {
        return Err(not_verified(format!("groups {have:?} != {want:?}")));
    }
    let root_u = Uid::from_raw(0);
    let root_g = Gid::from_raw(0);
    let tries = [
        must_fail("setuid(0)", setuid(root_u))?,
        must_fail("seteuid(0)", seteuid(root_u))?,
        must_fail("setgid(0)", setgid(root_g))?,
        must_fail("setegid(0)", setegid(root_g))?,
        must_fail("setgroups([0])", setgroups(&[root_g]))?,
    ];
    for cap in 0..=last_cap {
        if crate::sys::bounding_cap_present(cap).map_err(|e| failed("PR_CAPBSET_READ", e))? {
            return Err(not_verified(format!("capability {cap} still in the bounding set")));
        }
    }
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted, caps::CapSet::Inheritable, caps::CapSet::Ambient] {
        let held = caps::read(None, set).map_err(|e| failed("capget", io::Error::other(e)))?;
        if !held.is_empty() {
            return Err(not_verified(format!("{set:?} capabilities left: {held:?}")));
        }
    }
    // The kernel's own view, for every thread (there is one, but a library could have started
    // another; its capabilities would be its own).
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| failed("/proc/self/task", e))?;
    let mut threads = 0;
    for t in tasks {
        let t = t.map_err(|e| failed("/proc/self/task", e))?;
        let st = std::fs::read_to_string(t.path().join("status")).map_err(|e| failed("task status", e))?;
        check_status(&st, target)?;
        threads += 1;
    }
    if nix::sys::prctl::get_dumpable().map_err(|e| failed("PR_GET_DUMPABLE", e))? {
        return Err(not_verified("still dumpable".to_owned()));
    }
    let groups: Vec<String> = target.groups.iter().map(u32::to_string).collect();
    Ok(format!(
        "uid={} gid={} groups={} {} caps=0 bounding=0 nnp=1 threads={threads}",
        target.uid,
        target.gid,
        groups.join(","),
        tries.join(" ")
    ))
}

/// Checks one `/proc/…/status` text against the target.
fn check_status(st: &str, target: &Target) -> Result<(), DropError> {
    let four = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    let want = [("Uid", four(target.uid)), ("Gid", four(target.gid)), ("NoNewPrivs", "1".to_owned())];
    for (k, v) in &want {
        if status_field(st, k) != Some(v.as_str()) {
            return Err(not_verified(format!("status {k}: {:?}", status_field(st, k))));
        }
    }
    for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let v = status_field(st, k).unwrap_or("?");
        if v.is_empty() || !v.bytes().all(|b| b == b'0') {
            return Err(not_verified(format!("status {k}: {v}")));
        }
    }
    let groups: BTreeSet<u32> =
        status_field(st, "Groups").unwrap_or("").split_whitespace().filter_map(|g| g.parse().ok()).collect();
    if groups != target.groups.iter().copied().collect() {
        return Err(not_verified(format!("status Groups: {groups:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_special_ids() {
        for (u, g, extra) in
            [(0, 100, &[][..]), (100, 0, &[]), (u32::MAX, 100, &[]), (0xffff, 100, &[]), (100, 100, &[0])]
        {
            assert!(matches!(Target::new(u, g, extra), Err(DropError::Forbidden { .. })), "{u} {g} {extra:?}");
        }
    }

    #[test]
    fn primary_group_first_and_once() {
        let t = Target::new(1001, 1001, &[2000, 1001, 2000, 3000]).unwrap();
        assert_eq!(t.groups(), [1001, 2000, 3000]);
    }

    #[test]
    fn status_fields() {
        let st = "Name:\tx\nUid:\t5\t5\t5\t5\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(status_field(st, "Uid"), Some("5\t5\t5\t5"));
        assert_eq!(status_field(st, "CapBnd"), Some("0000000000000000"));
        assert_eq!(status_field(st, "Gid"), None);
    }

    #[test]
    fn status_check_wants_everything_dropped() {
        let t = Target::new(5, 6, &[7]).unwrap();
        let good = "Uid:\t5\t5\t5\t5\nGid:\t6\t6\t6\t6\nGroups:\t6 7 \nCapInh:\t0000000000000000\n\
                    CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert!(check_status(good, &t).is_ok());
        for (from, to) in [
            ("Uid:\t5\t5\t5\t5", "Uid:\t5\t5\t0\t5"),
            ("Groups:\t6 7 ", "Groups:\t0 6 7 "),
            ("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff"),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0"),
        ] {
            let bad = good.replace(from, to);
            assert!(matches!(check_status(&bad, &t), Err(DropError::NotVerified(_))), "{to}");
        }
    }
}
