//! The drop from root to the mail user, for good, and its proof: phase C of WRAPPER-SECURITY
//! §2.1. The drop itself is the library's [`mailreplica::privdrop`], the same code that
//! `mailreplica -u USER` runs as root, in this order:
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
//! Here it becomes the wrapper's: any failure is a refusal, `drop-not-verified` when the proof
//! failed and `drop-failed` otherwise. Success yields [`Unprivileged`], the library's token,
//! which the later steps (home, lock, serve) require.

use mailreplica::privdrop::{self, DropError, Target, Unprivileged};

use crate::authz::Account;
use crate::refusal::{Reason, Refusal};

/// Drops to `acct`. Must run on the main thread while it is the only thread.
pub(crate) fn drop_to(acct: &Account) -> Result<Unprivileged, Refusal> {
    let target = Target::new(acct.uid, acct.gid, &acct.groups).map_err(refusal)?;
    privdrop::drop_to(&target).map_err(refusal)
}

fn refusal(e: DropError) -> Refusal {
    let reason = match e {
        DropError::NotVerified(_) => Reason::DropNotVerified,
        _ => Reason::DropFailed,
    };
    Refusal::new(reason, e.to_string())
}
