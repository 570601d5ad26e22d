//! Running a dsync session over a pair of byte streams, in either role.
//!
//! * [`serve`]: the slave end (`dsync-server`): what `doveadm sync|backup` starts on the remote
//!   side (over SSH, or as a local command), and what `mailreplica-wrapper` runs in-process
//!   after dropping privileges. Our VERSION line and headers go out at once, without waiting
//!   for the master; logs go to stderr only, since stdout is the protocol.
//! * [`run_master`]: the master end, against any slave (Dovecot's `doveadm dsync-server` or
//!   ours) behind the streams.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use super::brain::ibc::Ibc;
use super::brain::limits::Limits;
use super::brain::session::{BrainError, Outcome, Role, SlaveConfig, run};
use super::io::ThreadedIo;
use super::stream::WireIbc;
use crate::store::MailStore;

pub use super::brain::session::{FailureKind, SyncStats};

/// What a session achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOutcome {
    /// Why the session reported failure to the master, if it did.
    pub failed: Option<String>,
    /// Something changed during the sync; the next run fixes it.
    pub changes_during_sync: Option<String>,
    /// The master was told to forget its saved state.
    pub require_full_resync: bool,
    /// What moved.
    pub stats: SyncStats,
}

/// Why a session ended badly, and what kind of failure it was.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SessionError {
    /// Retryable, peer misbehaved, timed out, …
    pub kind: FailureKind,
    /// Dovecot's `mail_error` code for it.
    pub mail_error: u32,
    /// What happened, for people.
    pub message: String,
}

impl SessionError {
    pub(crate) fn new(e: &BrainError) -> Self {
        Self { kind: e.kind(), mail_error: e.mail_error(), message: e.to_string() }
    }
}

/// The byte stream of a session on `input`/`output`, for either role.
pub(crate) fn start_wire<R, W>(input: R, output: W, timeout: Duration) -> Result<WireIbc<ThreadedIo>, SessionError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let io = ThreadedIo::start(input, output, timeout).map_err(|e| SessionError {
        kind: FailureKind::Permanent,
        mail_error: 1,
        message: format!("starting the I/O threads: {e}"),
    })?;
    Ok(WireIbc::start(io))
}

fn outcome(o: Outcome) -> ServerOutcome {
    ServerOutcome {
        failed: o.failed,
        changes_during_sync: o.changes_during_sync,
        require_full_resync: o.require_full_resync,
        stats: o.stats,
    }
}

/// Serves one slave session on `input`/`output`. `timeout` bounds a stall in either
/// direction (`dsync-server -T`).
pub fn serve<S, R, W>(
    store: &mut S,
    input: R,
    output: W,
    hostname: &str,
    timeout: Duration,
) -> Result<ServerOutcome, SessionError>
where
    S: MailStore,
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let mut ibc = start_wire(input, output, timeout)?;
    let role = Role::Slave(SlaveConfig { hostname: hostname.to_owned() });
    match run(store, &mut ibc, role, Limits::default()) {
        Ok(o) => {
            ibc.finish().map_err(|e| SessionError {
                kind: FailureKind::Connection,
                mail_error: 1,
                message: format!("finishing the session: {e}"),
            })?;
            if let Some(c) = &o.changes_during_sync {
                tracing::info!("changes during sync: {c}");
            }
            Ok(outcome(o))
        }
        Err(e) => {
            // Tell the master we are closing, so that it reports our error rather than a
            // broken stream; then close, without waiting long for a peer that stopped reading.
            let _ = ibc.send_done();
            let _ = ibc.finish();
            Err(SessionError::new(&e))
        }
    }
}

/// Serves one slave session on this process's stdin and stdout.
pub fn serve_stdio<S: MailStore>(
    store: &mut S,
    hostname: &str,
    timeout: Duration,
) -> Result<ServerOutcome, SessionError> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned().map(File::from).map_err(|e| SessionError {
            kind: FailureKind::Permanent,
            mail_error: 1,
            message: format!("duplicating {what}: {e}"),
        })
    };
    let input = dup(std::io::stdin().as_fd(), "stdin")?;
    let output = dup(std::io::stdout().as_fd(), "stdout")?;
    serve(store, input, output, hostname, timeout)
}

/// Runs a session on input that is all there from the start, throwing the output away (after
/// `keep_output` bytes): for fuzzing and for tests of what a brain does with a given stream.
/// Waiting for more input than there is ends the session with an error, never a hang.
#[doc(hidden)]
pub fn run_on_fixed_input<S: MailStore>(
    store: &mut S,
    input: &[u8],
    master: bool,
    keep_output: usize,
) -> (Result<(), SessionError>, Vec<u8>) {
    let mut io = super::io::MemoryIo::new(input, 4096);
    io.keep_output = keep_output;
    let mut ibc = WireIbc::start(io);
    let role = if master {
        Role::Master(Box::new(super::brain::session::MasterConfig::new("fuzz")))
    } else {
        Role::Slave(SlaveConfig { hostname: "fuzz".to_owned() })
    };
    let result = run(store, &mut ibc, role, Limits::default()).map(|_| ()).map_err(|e| SessionError::new(&e));
    let _ = ibc.finish();
    let out = ibc.into_transport().output;
    (result, out)
}
