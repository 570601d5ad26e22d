//! The hand-off to the dsync server: the one place the lead wires to `mailreplica::dsync`.
//!
//! Everything before this runs on one thread as root and then as the user; by the time
//! [`run`] is called the process is the mail user for good (the [`Unprivileged`] token in the
//! session proves it), its working directory is the checked home, the environment is clean,
//! the per-user lock is held, and fd 0 is positioned exactly after the username's LF. From
//! here on threads and an async runtime are allowed.
//!
//! [`run`] opens the user's Maildir and serves the dsync protocol in-process on fd 0 and fd 1
//! (`mailreplica::dsync::server`), with the reader and writer threads that the protocol needs.
//! Its log lines go to stderr, which sshd passes back to the peer's `doveadm`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use mailreplica::privdrop::Unprivileged;
use mailreplica::store::maildir::{Maildir, MaildirSettings};
use nix::fcntl::Flock;

/// Exit status of a session that failed after it was accepted (sysexits `EX_TEMPFAIL`).
pub(crate) const EXIT_TEMPFAIL: u8 = 75;

/// How long the peer may stay silent before the session is abandoned (doveadm's default).
const IO_TIMEOUT: Duration = Duration::from_secs(600);

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

/// Serves one session and returns the process's exit status.
pub(crate) fn run(session: Session) -> ExitCode {
    let fail = |what: &str| {
        let _ = writeln!(
            std::io::stderr(),
            "mailreplica-wrapper: peer {} user {} (uid {}): {what}",
            session.peer,
            session.user,
            session.unprivileged.uid()
        );
        ExitCode::from(EXIT_TEMPFAIL)
    };
    let input = match session.input.try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => return fail(&format!("duplicating the input: {e}")),
    };
    let output = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => return fail(&format!("duplicating the output: {e}")),
    };
    let mut store = match Maildir::open(session.settings.clone()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("opening the mail store: {e}")),
    };
    let hostname = session.settings.hostname.clone();
    // Warnings of the server go to stderr, which reaches the peer's doveadm log.
    mailreplica::logging::init_stderr("warn");
    match mailreplica::dsync::server::serve(&mut store, input, output, &hostname, IO_TIMEOUT) {
        Ok(o) if o.failed.is_none() => ExitCode::SUCCESS,
        Ok(o) => fail(&format!("dsync failed: {}", o.failed.unwrap_or_default())),
        Err(e) => fail(&e.to_string()),
    }
}
