//! The drop from root to the mail user, for good, and its proof. The order is the one from
//! WRAPPER-SECURITY §2.1 phase C (OpenSSH `permanently_set_uid`, systemd, Dovecot):
//!
//! ```text
//! (still root, one thread)  ambient caps cleared ─ inheritable cleared ─ bounding set dropped
//!                           (every cap up to /proc/sys/kernel/cap_last_cap; needs CAP_SETPCAP)
//!   setgroups(primary + policy extras) ─ setresgid(g,g,g) ─ setresuid(u,u,u)
//!   no_new_privs ─ dumpable 0
//! (now the user)            verify: getres[ug]id, getgroups, setuid(0)/seteuid(0)/setgid(0)/
//!                           setegid(0)/setgroups([0]) all fail, /proc/self/status Cap* = 0,
//!                           NoNewPrivs = 1, for every thread
//! ```
//!
//! Every return value is checked; any surprise is a refusal. Success yields [`Unprivileged`],
//! a token only this module can make, which the later steps (home, serve) require.

use std::collections::BTreeSet;

use nix::errno::Errno;
use nix::unistd::{
    Gid, Uid, getgroups, getresgid, getresuid, setegid, seteuid, setgid, setgroups, setresgid, setresuid, setuid,
};

use crate::authz::Account;
use crate::refusal::{Reason, Refusal};

/// Proof that this process dropped root for good and verified it. Cannot be built outside
/// this module.
#[derive(Debug)]
pub(crate) struct Unprivileged {
    uid: u32,
}

impl Unprivileged {
    /// The uid the process runs as.
    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }
}

fn failed(call: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::DropFailed, format!("{call}: {e}"))
}

fn not_verified(what: String) -> Refusal {
    Refusal::new(Reason::DropNotVerified, what)
}

/// The highest capability number this kernel knows.
fn cap_last_cap() -> Result<u32, Refusal> {
    let s = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(|e| failed("cap_last_cap", e))?;
    let n: u32 = s.trim().parse().map_err(|e| failed("cap_last_cap", e))?;
    if n > 63 {
        return Err(failed("cap_last_cap", format!("implausible value {n}")));
    }
    Ok(n)
}

/// One field of a `/proc/…/status` file, e.g. `Uid` → `"1001\t1001\t1001\t1001"`.
pub(crate) fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(str::trim)
}

/// Drops to `acct`. Must run on the main thread while it is the only thread.
pub(crate) fn drop_to(acct: &Account) -> Result<(Unprivileged, String), Refusal> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| failed("/proc/self/status", e))?;
    if status_field(&status, "Threads") != Some("1") {
        return Err(failed("threads", "more than one thread before the drop"));
    }
    crate::sys::clear_ambient_caps().map_err(|e| failed("PR_CAP_AMBIENT_CLEAR_ALL", e))?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| failed("clear inheritable caps", e))?;
    let last = cap_last_cap()?;
    for cap in 0..=last {
        crate::sys::drop_bounding_cap(cap).map_err(|e| failed(&format!("PR_CAPBSET_DROP {cap}"), e))?;
    }
    let groups: Vec<Gid> = acct.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    setgroups(&groups).map_err(|e| failed("setgroups", e))?;
    let g = Gid::from_raw(acct.gid);
    setresgid(g, g, g).map_err(|e| failed("setresgid", e))?;
    let u = Uid::from_raw(acct.uid);
    setresuid(u, u, u).map_err(|e| failed("setresuid", e))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| failed("PR_SET_NO_NEW_PRIVS", e))?;
    // The kernel already reset dumpable on the id change (to suid_dumpable); make it explicit.
    nix::sys::prctl::set_dumpable(false).map_err(|e| failed("PR_SET_DUMPABLE", e))?;
    let proof = verify(acct, last)?;
    Ok((Unprivileged { uid: acct.uid }, proof))
}

/// A call that must fail now: returns its errno for the proof line.
fn must_fail(name: &str, r: nix::Result<()>) -> Result<String, Refusal> {
    match r {
        Ok(()) => Err(not_verified(format!("{name} succeeded after the drop"))),
        Err(e) => Ok(format!("{name}={}", errno_name(e))),
    }
}

fn errno_name(e: Errno) -> String {
    format!("{e:?}")
}

/// Proves the drop; returns a one-line summary for the auth log.
fn verify(acct: &Account, last_cap: u32) -> Result<String, Refusal> {
    let r = getresuid().map_err(|e| failed("getresuid", e))?;
    if [r.real, r.effective, r.saved].iter().any(|x| x.as_raw() != acct.uid) {
        return Err(not_verified(format!("uids {} {} {} != {}", r.real, r.effective, r.saved, acct.uid)));
    }
    let g = getresgid().map_err(|e| failed("getresgid", e))?;
    if [g.real, g.effective, g.saved].iter().any(|x| x.as_raw() != acct.gid) {
        return Err(not_verified(format!("gids {} {} {} != {}", g.real, g.effective, g.saved, acct.gid)));
    }
    let have: BTreeSet<u32> = getgroups().map_err(|e| failed("getgroups", e))?.iter().map(|g| g.as_raw()).collect();
    let want: BTreeSet<u32> = acct.groups.iter().copied().collect();
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
        let held = caps::read(None, set).map_err(|e| failed("capget", e))?;
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
        check_status(&st, acct)?;
        threads += 1;
    }
    if nix::sys::prctl::get_dumpable().map_err(|e| failed("PR_GET_DUMPABLE", e))? {
        return Err(not_verified("still dumpable".to_owned()));
    }
    let groups: Vec<String> = acct.groups.iter().map(u32::to_string).collect();
    Ok(format!(
        "uid={} gid={} groups={} {} caps=0 bounding=0 nnp=1 threads={threads}",
        acct.uid,
        acct.gid,
        groups.join(","),
        tries.join(" ")
    ))
}

/// Checks one `/proc/…/status` text against the target.
fn check_status(st: &str, acct: &Account) -> Result<(), Refusal> {
    let four = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    let want = [("Uid", four(acct.uid)), ("Gid", four(acct.gid)), ("NoNewPrivs", "1".to_owned())];
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
    if groups != acct.groups.iter().copied().collect() {
        return Err(not_verified(format!("status Groups: {groups:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let st = "Name:\tx\nUid:\t5\t5\t5\t5\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(status_field(st, "Uid"), Some("5\t5\t5\t5"));
        assert_eq!(status_field(st, "CapBnd"), Some("0000000000000000"));
        assert_eq!(status_field(st, "Gid"), None);
    }
}
