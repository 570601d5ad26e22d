//! `dsync-server`: the slave end of a dsync session on a pair of byte streams.
//!
//! This is what `doveadm sync|backup` starts on the remote side (over SSH, or as a local
//! command), and what `mailreplica-wrapper` runs in-process after dropping privileges. Our
//! VERSION line and headers go out at once, without waiting for the master; logs go to stderr
//! only, since stdout is the protocol.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use super::brain::session::{BrainError, Outcome, SlaveConfig, run_slave};
use super::io::ByteIo;
use super::stream::WireIbc;
use crate::store::MailStore;

/// What a server session achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOutcome {
    /// Why the session reported failure to the master, if it did.
    pub failed: Option<String>,
    /// Something changed during the sync; the next run fixes it.
    pub changes_during_sync: Option<String>,
    /// The master was told to forget its saved state.
    pub require_full_resync: bool,
}

/// Why a session ended badly.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServerError(String);

fn outcome(o: Outcome) -> ServerOutcome {
    ServerOutcome {
        failed: o.failed,
        changes_during_sync: o.changes_during_sync,
        require_full_resync: o.require_full_resync,
    }
}

/// Serves one session on `input`/`output`.
pub fn serve<S, R, W>(
    store: &mut S,
    input: R,
    output: W,
    hostname: &str,
    timeout: Duration,
) -> Result<ServerOutcome, ServerError>
where
    S: MailStore,
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let io = ByteIo::start(input, output, timeout);
    let mut ibc = WireIbc::start(io);
    let cfg = SlaveConfig { hostname: hostname.to_owned() };
    let result = run_slave(store, &mut ibc, &cfg);
    match result {
        Ok(o) => {
            ibc.finish().map_err(|e| ServerError(format!("finishing the session: {e}")))?;
            if let Some(c) = &o.changes_during_sync {
                tracing::info!("changes during sync: {c}");
            }
            Ok(outcome(o))
        }
        Err(e) => {
            // Tell the master we are closing, so that it reports our error rather than a
            // broken stream; then close.
            let _ = super::brain::ibc::Ibc::send_done(&mut ibc);
            let _ = ibc.finish();
            Err(ServerError(describe(&e)))
        }
    }
}

fn describe(e: &BrainError) -> String {
    e.to_string()
}

/// Serves one session on this process's stdin and stdout.
pub fn serve_stdio<S: MailStore>(
    store: &mut S,
    hostname: &str,
    timeout: Duration,
) -> Result<ServerOutcome, ServerError> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned().map(File::from).map_err(|e| ServerError(format!("duplicating {what}: {e}")))
    };
    let input = dup(std::io::stdin().as_fd(), "stdin")?;
    let output = dup(std::io::stdout().as_fd(), "stdout")?;
    serve(store, input, output, hostname, timeout)
}
