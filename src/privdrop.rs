//! Becoming a mail user for good: what `mailreplica -u USER` does as root before it touches a
//! single mail file.
//!
//! The order is the one OpenSSH, systemd and Dovecot use: supplementary groups, then
//! `setresgid`, then `setresuid` (all three ids, so the saved id cannot bring root back), then
//! `no_new_privs`; afterwards the drop is proven by checking the ids and that `setuid(0)` fails.
//! Every call goes through `nix`, so this module needs no `unsafe`.

use nix::unistd::{Gid, Uid, getresgid, getresuid, setgroups, setresgid, setresuid};

/// Why a privilege drop failed. Any of these is fatal: the caller must not continue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DropError {
    /// The target is root, or a uid/gid that `set*id` treats as "unchanged".
    #[error("refusing to run as uid {uid} / gid {gid}")]
    Forbidden {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
    },
    /// A system call failed.
    #[error("{call} failed: {errno}")]
    Call {
        /// The call.
        call: &'static str,
        /// Its error.
        errno: nix::errno::Errno,
    },
    /// The ids after the drop are not the ones asked for, or root can be regained.
    #[error("privilege drop could not be verified: {0}")]
    NotVerified(&'static str),
}

fn call<T>(name: &'static str, r: nix::Result<T>) -> Result<T, DropError> {
    r.map_err(|errno| DropError::Call { call: name, errno })
}

/// True for ids that must never be a drop target: 0 (root), and -1 / 16-bit -1, which the
/// kernel and glibc treat as "leave unchanged".
pub fn forbidden_id(id: u32) -> bool {
    id == 0 || id == u32::MAX || id == 0xffff
}

/// Switches the whole process to `uid`/`gid` with exactly `groups` as supplementary groups
/// (the primary gid is always included). Must run while the process has one thread.
pub fn drop_to(uid: u32, gid: u32, groups: &[u32]) -> Result<(), DropError> {
    if forbidden_id(uid) || forbidden_id(gid) || groups.iter().any(|&g| forbidden_id(g)) {
        return Err(DropError::Forbidden { uid, gid });
    }
    let mut all: Vec<Gid> = vec![Gid::from_raw(gid)];
    all.extend(groups.iter().filter(|&&g| g != gid).map(|&g| Gid::from_raw(g)));
    call("setgroups", setgroups(&all))?;
    let g = Gid::from_raw(gid);
    call("setresgid", setresgid(g, g, g))?;
    let u = Uid::from_raw(uid);
    call("setresuid", setresuid(u, u, u))?;
    call("prctl(PR_SET_NO_NEW_PRIVS)", nix::sys::prctl::set_no_new_privs())?;
    verify(uid, gid)
}

/// Proves that the process runs as `uid`/`gid` on all three ids and cannot get root back.
pub fn verify(uid: u32, gid: u32) -> Result<(), DropError> {
    let r = call("getresuid", getresuid())?;
    if [r.real, r.effective, r.saved].iter().any(|x| x.as_raw() != uid) {
        return Err(DropError::NotVerified("uids differ from the target"));
    }
    let g = call("getresgid", getresgid())?;
    if [g.real, g.effective, g.saved].iter().any(|x| x.as_raw() != gid) {
        return Err(DropError::NotVerified("gids differ from the target"));
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || nix::unistd::seteuid(Uid::from_raw(0)).is_ok() {
        return Err(DropError::NotVerified("setuid(0) succeeded"));
    }
    if nix::unistd::setgid(Gid::from_raw(0)).is_ok() {
        return Err(DropError::NotVerified("setgid(0) succeeded"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_special_ids() {
        for (u, g) in [(0, 100), (100, 0), (u32::MAX, 100), (0xffff, 100)] {
            assert!(matches!(drop_to(u, g, &[]), Err(DropError::Forbidden { .. })));
        }
    }
}
