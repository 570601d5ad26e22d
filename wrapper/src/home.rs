//! Entering the user's home, as the user (never as root: a user-controlled path opened by
//! root is how symlink attacks work). The home must be a real directory (`O_NOFOLLOW`: a
//! symlinked home is refused, fail closed, WRAPPER-SECURITY §7.4), owned by the user and not
//! writable by group or others (OpenSSH StrictModes / `safely_chroot`). The checks run on the
//! opened descriptor, then `fchdir` makes it the working directory.

use std::os::fd::OwnedFd;

use mailreplica::privdrop::Unprivileged;
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, SFlag, fstat, lstat};

use crate::authz::Account;
use crate::refusal::{Reason, Refusal};

/// Opens, checks and enters the home of `acct`. Requires the drop (`Unprivileged`).
pub(crate) fn enter(acct: &Account, me: &Unprivileged) -> Result<OwnedFd, Refusal> {
    let home = &acct.home;
    let shown = home.display();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let fd = match open(home, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            let is_link = lstat(home).is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits());
            let reason = if is_link { Reason::HomeSymlink } else { Reason::HomeOpen };
            return Err(Refusal::new(reason, format!("{shown}: {e}")));
        }
        Err(e) => return Err(Refusal::new(Reason::HomeOpen, format!("{shown}: {e}"))),
    };
    let st = fstat(&fd).map_err(|e| Refusal::new(Reason::HomeOpen, format!("{shown}: fstat: {e}")))?;
    if st.st_uid != me.uid() {
        return Err(Refusal::new(Reason::HomeOwner, format!("{shown} is owned by uid {}", st.st_uid)));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(Refusal::new(Reason::HomeMode, format!("{shown} has mode {:o}", st.st_mode & 0o7777)));
    }
    nix::unistd::fchdir(&fd).map_err(|e| Refusal::new(Reason::HomeOpen, format!("{shown}: fchdir: {e}")))?;
    Ok(fd)
}
