//! The wrapper's only `unsafe` code: thin wrappers over libc calls that `nix` does not offer in
//! a safe form. Everything else in the crate is `#![deny(unsafe_code)]`; the capability calls
//! of the drop are the library's (`mailreplica::privdrop`, its `sys` module).
//!
//! Each function keeps its `unsafe` block to the call itself and says why the call is sound.
//! Most of these are only sound while the process has one thread; the wrapper calls them in
//! its root phase, which runs on the main thread before any other thread exists (the caller
//! checks `Threads: 1` in `/proc/self/status` before the drop).
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

/// True if `fd` is an open descriptor (`fcntl(F_GETFD)` does not fail with `EBADF`).
fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; any integer is a valid argument.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Makes sure fds 0, 1 and 2 are open, putting `/dev/null` into any that is closed (as
/// OpenSSH's `sanitise_stdfd` and git-shell do): a closed stdout must not become the next file
/// we open, or mail data or log lines would land in it.
pub(crate) fn ensure_std_fds() -> io::Result<()> {
    for fd in 0..=2 {
        if fd_is_open(fd) {
            continue;
        }
        let null = open("/dev/null", OFlag::O_RDWR, Mode::empty())?;
        let raw = null.into_raw_fd();
        if raw != fd {
            // SAFETY: `raw` is a descriptor we just opened and own; dup2 onto a closed `fd` only
            // creates a new descriptor.
            let rc = unsafe { libc::dup2(raw, fd) };
            let err = io::Error::last_os_error();
            // SAFETY: `raw` is ours and is not used after this.
            unsafe { libc::close(raw) };
            if rc != fd {
                return Err(err);
            }
        }
        // else: open() returned the lowest free descriptor, which is exactly `fd`; it now
        // stays open for the life of the process.
    }
    Ok(())
}

/// Closes every descriptor ≥ 3 (`close_range(3, ~0U, 0)`), so nothing a launcher leaked (a
/// root-only file, a socket) survives into the unprivileged phase.
pub(crate) fn close_fds_from_3() -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; no Rust object owns any fd ≥ 3 at this point
    // (main calls this first thing, before opening anything).
    let rc = unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // Kernels before 5.9: close one by one up to the soft limit (capped, to stay fast).
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let top = soft.min(1 << 20) as RawFd;
    for fd in 3..top {
        // SAFETY: as above, no Rust object owns these descriptors.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// fd 0 as a borrowed descriptor. Sound because `ensure_std_fds` ran first and the wrapper
/// never closes fd 0: the username is read from it byte by byte and the server reads the rest.
pub(crate) fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 is open (ensure_std_fds) and is never closed by this process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// Resets SIGALRM to its default action (terminate) and unblocks it. Both the disposition
/// `SIG_IGN` and the signal mask survive `execve`, so a launcher could otherwise disarm the
/// pre-drop deadline.
pub(crate) fn arm_sigalrm_default() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, pthread_sigmask, signal};
    // SAFETY: installing SIG_DFL runs no Rust code in signal context.
    unsafe { signal(Signal::SIGALRM, SigHandler::SigDfl) }?;
    let mut set = SigSet::empty();
    set.add(Signal::SIGALRM);
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
    Ok(())
}

/// Removes every environment variable. Sound only while single-threaded (Rust 2024 makes
/// `remove_var` unsafe because concurrent `getenv` in another thread is undefined behaviour).
pub(crate) fn clear_env() {
    let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in names {
        if k.is_empty() || k.as_encoded_bytes().contains(&b'=') {
            continue; // remove_var would panic on these; they cannot be set either
        }
        // SAFETY: the process has one thread (root phase, checked by the caller's design).
        unsafe { std::env::remove_var(&k) };
    }
}

/// Sets one environment variable. Sound only while single-threaded (see `clear_env`).
pub(crate) fn set_env(key: &str, value: impl AsRef<OsStr>) {
    // SAFETY: the process has one thread; keys are fixed ASCII names from this crate.
    unsafe { std::env::set_var(key, value) };
}
