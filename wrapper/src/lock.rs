//! The per-user lock: two replications of one user never run at once (they would race on the
//! same uidlist and mails; Dovecot keeps a per-user dsync lock for the same reason).
//!
//! Choice: a lock file per username in a root-owned directory (`lock_dir`, default
//! `/run/mailreplica`, mode 0700), created and opened **as root before the drop**
//! ([`prepare`]), and `flock`ed **after the drop** ([`acquire`]), with a bounded wait.
//! Why not a lock in the user's Maildir: the Maildir may not exist yet on the first
//! replication, creating it would touch user files before the session is accepted, and a file
//! the user owns can be replaced or held by the user. Here the user holds only a read-only
//! descriptor to an empty root-owned file; `flock` works on it, and nothing else can be done
//! with it. The username passed the grammar, so it is a safe file name (no `/`, no leading `.`).

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use mailreplica::privdrop::Unprivileged;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag, open, openat};
use nix::sys::stat::{Mode, SFlag, fstat};

use crate::refusal::{Reason, Refusal};
use crate::username::Username;

fn setup(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::LockSetup, e.to_string())
}

/// As root: makes sure `dir` exists (0700) and is root's all the way up, then opens (creating)
/// `dir/NAME.lock` read-only.
pub(crate) fn prepare(dir: &Path, name: &Username) -> Result<OwnedFd, Refusal> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(setup(format!("{}: {e}", dir.display()))),
    }
    let dir = crate::trust::check_dir_chain(dir).map_err(setup)?;
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dfd = open(&dir, dflags, Mode::empty()).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
    let file = format!("{}.lock", name.as_str());
    let fflags = OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = openat(&dfd, file.as_str(), fflags, Mode::from_bits_truncate(0o600))
        .map_err(|e| setup(format!("{}/{file}: {e}", dir.display())))?;
    let st = fstat(&fd).map_err(setup)?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() || st.st_uid != 0 || st.st_nlink != 1 {
        return Err(setup(format!("{}/{file} is not a root-owned regular file with one link", dir.display())));
    }
    Ok(fd)
}

/// As the user: takes the lock, waiting at most `wait` for another session of the same user.
pub(crate) fn acquire(fd: OwnedFd, wait: Duration, _me: &Unprivileged) -> Result<Flock<OwnedFd>, Refusal> {
    let until = Instant::now() + wait;
    let mut fd = fd;
    loop {
        match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                if Instant::now() >= until {
                    return Err(Refusal::new(Reason::LockBusy, format!("another session still runs after {wait:?}")));
                }
                std::thread::sleep(Duration::from_millis(50));
                fd = back;
            }
            Err((_, e)) => return Err(setup(format!("flock: {e}"))),
        }
    }
}
