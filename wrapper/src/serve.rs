//! The hand-off to the dsync server: the one place the lead wires to `mailreplica::dsync`.
//!
//! Everything before this runs on one thread as root and then as the user; by the time
//! [`run`] is called the process is the mail user for good (the [`Unprivileged`] token in the
//! session proves it), its working directory is the checked home, the environment is clean,
//! the per-user lock is held, and fd 0 is positioned exactly after the username's LF. From
//! here on threads and an async runtime are allowed.
//!
//! **Missing piece:** the in-process dsync server does not exist yet. Until it does, `run`
//! keeps the process alive reading fd 0 until EOF (so tests can inspect `/proc/PID/status`
//! of the served process), reports on stderr how many bytes followed the username line, and
//! exits with [`EXIT_UNAVAILABLE`]. The intended body:
//!
//! ```text
//! let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
//! let store = mailreplica::store::maildir::Maildir::open(session.settings)?;
//! rt.block_on(mailreplica::dsync::server::serve(fd0_reader, fd1_writer, store, ...))
//! ```

use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::process::ExitCode;

use mailreplica::store::maildir::MaildirSettings;
use nix::errno::Errno;
use nix::fcntl::Flock;

use crate::demote::Unprivileged;

/// Exit status while the dsync server is missing (sysexits `EX_UNAVAILABLE`).
pub(crate) const EXIT_UNAVAILABLE: u8 = 69;

/// Everything the server needs for one accepted session.
#[derive(Debug)]
pub(crate) struct Session {
    /// The peer (from `--peer`), for the server's own log lines.
    pub(crate) peer: String,
    /// The user being replicated.
    pub(crate) user: String,
    /// The user's Maildir, from the policy's `mail_location`.
    pub(crate) settings: MaildirSettings,
    /// The dsync stream from the peer: fd 0, right after the username's LF.
    pub(crate) input: BorrowedFd<'static>,
    /// The per-user lock, held until the process exits.
    #[expect(dead_code, reason = "held for its Drop: the lock lasts as long as the session")]
    pub(crate) lock: Flock<OwnedFd>,
    /// The home directory (the working directory).
    #[expect(dead_code, reason = "held for its Drop; the server may use it as a dirfd")]
    pub(crate) home: OwnedFd,
    /// Proof of the drop.
    pub(crate) unprivileged: Unprivileged,
}

/// Serves one session. See the module documentation: today this is the interim stand-in.
pub(crate) fn run(session: Session) -> ExitCode {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        match nix::unistd::read(session.input, &mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "mailreplica-wrapper: reading the dsync stream: {e}");
                break;
            }
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "mailreplica-wrapper: peer {} user {} (uid {}, maildir {}): the dsync server is not available yet; \
         read {total} bytes after the username line until EOF",
        session.peer,
        session.user,
        session.unprivileged.uid(),
        session.settings.root.display()
    );
    drop(session);
    ExitCode::from(EXIT_UNAVAILABLE)
}
