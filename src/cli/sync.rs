//! `mailreplica sync|backup`: the dsync master, with doveadm's options and destinations.
//!
//! ```text
//!   maildir:PATH[:…]        our slave on another Maildir of the same user, in this process
//!   a command line           spawned; its stdin/stdout carry the stream (doveadm appends
//!                            `dsync-server` unless the line already ends with it)
//! ```
//!
//! The new state (`-s`) goes to stdout, nothing else does; logs go to stderr. Exit codes are
//! doveadm's: 0, 2 when something changed during the sync (run it again), 75 when it failed
//! for a reason worth retrying, and the usual codes for the rest.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::anyhow;
use mailreplica::dsync::master::{Direction, MasterOptions, MasterReport, run_master, sync_stores};
use mailreplica::dsync::server::{FailureKind, SessionError};
use mailreplica::store::maildir::Maildir;

use super::{Failure, Session, exit, hostname};

/// What `sync`/`backup` was asked for.
#[derive(Debug, clap::Args)]
pub(crate) struct SyncArgs {
    /// Reverse backup: make this side a copy of the destination (`backup` only).
    #[arg(short = 'R')]
    pub(crate) reverse: bool,
    /// One-way sync: the destination's own changes are kept (a backup that doesn't revert).
    #[arg(short = '1')]
    pub(crate) one_way: bool,
    /// Full sync: compare every mailbox mail by mail.
    #[arg(short = 'f')]
    pub(crate) full: bool,
    /// The state printed by the previous run ('' for none yet); the new state is printed.
    #[arg(short = 's', value_name = "STATE", allow_hyphen_values = true)]
    pub(crate) state: Option<String>,
    /// Only this mailbox ('' syncs only the mailbox list).
    #[arg(short = 'm', value_name = "MAILBOX")]
    pub(crate) mailbox: Option<String>,
    /// Leave out mailboxes matching this mask (repeatable).
    #[arg(short = 'x', value_name = "MASK")]
    pub(crate) exclude: Vec<String>,
    /// Only mails received since this time (UNIX time).
    #[arg(short = 't', value_name = "TIME")]
    pub(crate) since: Option<i64>,
    /// Only mails received until this time (UNIX time).
    #[arg(short = 'e', value_name = "TIME")]
    pub(crate) until: Option<i64>,
    /// Only mails up to this size in bytes.
    #[arg(short = 'I', value_name = "SIZE")]
    pub(crate) max_size: Option<u64>,
    /// Only mails with this flag or keyword (`-FLAG`: without it).
    #[arg(short = 'O', value_name = "FLAG", allow_hyphen_values = true)]
    pub(crate) flag: Option<String>,
    /// Take the user's sync lock, waiting up to SECS.
    #[arg(short = 'l', value_name = "SECS")]
    pub(crate) lock_timeout: Option<u32>,
    /// Ask the destination to purge afterwards (no effect on Maildir).
    #[arg(short = 'P')]
    pub(crate) purge: bool,
    /// I/O stall timeout in seconds.
    #[arg(short = 'T', value_name = "SECS", default_value_t = 600)]
    pub(crate) timeout: u64,
    /// Where to: `maildir:PATH`, or a command line whose stdin/stdout speak dsync.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    pub(crate) destination: Vec<String>,
}

/// `sync` (two-way) or `backup` (one-way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Sync,
    Backup,
}

fn options(s: &Session, mode: Mode, a: &SyncArgs) -> Result<MasterOptions, Failure> {
    let mut o = MasterOptions::new(&s.config.hostname.clone().unwrap_or_else(hostname));
    o.direction = match (mode, a.reverse) {
        (Mode::Backup, false) => Direction::Backup,
        (Mode::Backup, true) => Direction::BackupReverse,
        (Mode::Sync, false) => Direction::TwoWay,
        // doveadm: -R only means something for a backup, or a one-way sync.
        (Mode::Sync, true) if a.one_way => Direction::BackupReverse,
        (Mode::Sync, true) => Direction::TwoWay,
    };
    o.one_way = a.one_way;
    o.full = a.full;
    o.state.clone_from(&a.state);
    o.mailbox.clone_from(&a.mailbox);
    o.exclude.clone_from(&a.exclude);
    o.since = a.since.unwrap_or(0);
    o.until = a.until.unwrap_or(0);
    if o.since > 0 && o.until > 0 && o.since > o.until {
        return Err(Failure::new(exit::USAGE, anyhow!("start date is later than end date")));
    }
    o.max_size = a.max_size.unwrap_or(0);
    o.flag.clone_from(&a.flag);
    o.lock_timeout = a.lock_timeout.unwrap_or(0);
    o.purge_remote = a.purge;
    Ok(o)
}

/// doveadm's exit code for a failed session.
fn failure(e: SessionError) -> Failure {
    let code = match e.kind {
        FailureKind::PeerMisbehaved | FailureKind::Permanent if e.mail_error >= 3 => exit::DATAERR,
        FailureKind::Permanent => exit::DATAERR,
        _ => exit::TEMPFAIL,
    };
    Failure::new(code, anyhow!(e))
}

/// `sync|backup DESTINATION`.
pub(crate) fn run(s: &Session, mode: Mode, a: &SyncArgs) -> Result<(), Failure> {
    let opts = options(s, mode, a)?;
    let timeout = Duration::from_secs(a.timeout.max(1));
    let dest = a.destination.join(" ");
    let result = if let Some(loc) = dest.strip_prefix("maildir:").map(|_| dest.as_str()) {
        local(s, loc, &opts, timeout)
    } else if a.destination.len() > 1 || dest.contains(' ') || dest.contains('/') {
        command(s, &a.destination, &opts, timeout)
    } else {
        return Err(Failure::new(
            exit::USAGE,
            anyhow!(
                "destination {dest:?}: use maildir:PATH or a command line (remote: and remoteprefix: are not built yet)"
            ),
        ));
    };
    match result {
        Ok(report) => finish(a, report),
        Err(f) => {
            // As doveadm: a failed run still prints a state, an empty one, so that whoever
            // keeps it makes the next run a full sync instead of reusing a stale one.
            if a.state.is_some() {
                println!();
            }
            Err(f)
        }
    }
}

fn finish(a: &SyncArgs, report: MasterReport) -> Result<(), Failure> {
    if a.state.is_some() {
        println!("{}", report.state);
    }
    if let Some(why) = report.changes_during_sync {
        tracing::warn!("Mailbox changes caused a desync. You may want to run dsync again: {why}");
        return Err(Failure::quiet(2));
    }
    Ok(())
}

fn local(s: &Session, location: &str, opts: &MasterOptions, timeout: Duration) -> Result<MasterReport, Failure> {
    let ours = s.maildir_settings(None)?;
    let theirs = s.maildir_settings(Some(location))?;
    if ours.root == theirs.root {
        return Err(Failure::new(exit::USAGE, anyhow!("source and destination are the same Maildir")));
    }
    let mut master = Maildir::open(ours)?;
    let mut slave = Maildir::open(theirs)?;
    sync_stores(&mut master, &mut slave, opts, timeout).map_err(failure)
}

fn command(s: &Session, words: &[String], opts: &MasterOptions, timeout: Duration) -> Result<MasterReport, Failure> {
    // One argument with spaces is split on them, as doveadm does; `dsync-server` is appended
    // unless it is the last word already.
    let mut argv: Vec<String> = if words.len() == 1 {
        words[0].split(' ').filter(|w| !w.is_empty()).map(str::to_owned).collect()
    } else {
        words.to_vec()
    };
    if argv.last().map(String::as_str) != Some("dsync-server") {
        argv.push("dsync-server".to_owned());
    }
    let mut store = s.store()?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::new(exit::TEMPFAIL, anyhow!("starting {:?}: {e}", argv[0])))?;
    let (Some(input), Some(output)) = (child.stdout.take(), child.stdin.take()) else {
        return Err(Failure::new(exit::TEMPFAIL, anyhow!("the remote command has no stdin/stdout")));
    };
    let result = run_master(&mut store, input, output, opts, timeout);
    let status = child.wait();
    match (result, status) {
        (Ok(r), _) => Ok(r),
        (Err(e), Ok(st)) if !st.success() => {
            let e = anyhow!(e).context(format!("remote command {:?} returned {st}", argv.join(" ")));
            Err(Failure::new(exit::TEMPFAIL, e))
        }
        (Err(e), _) => Err(failure(e)),
    }
}
