//! `mailreplica sync|backup`: the dsync master, with doveadm's options and destinations.
//!
//! ```text
//!   maildir:PATH[:…]        our slave on another Maildir of the same user, in this process
//!   remote:[LOGIN@]HOST[:PORT]
//!                            the embedded SSH client runs `dsync_remote_cmd` on HOST
//!   remoteprefix:[LOGIN@]HOST[:PORT]
//!                            the same, and the stream starts with `USER\n` (for
//!                            mailreplica-wrapper or the upstream shell wrapper)
//!   a command line           spawned; its stdin/stdout carry the stream (doveadm appends
//!                            `dsync-server` unless the line already ends with it)
//! ```
//!
//! The new state (`-s`) goes to stdout, nothing else does; logs go to stderr. Exit codes are
//! doveadm's: 0, 2 when something changed during the sync (run it again), 75 when it failed
//! for a reason worth retrying, and the usual codes for the rest.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::anyhow;
use mailreplica::config::Config;
use mailreplica::dsync::master::{Direction, MasterOptions, MasterReport, run_master, sync_stores};
use mailreplica::dsync::server::{FailureKind, SessionError};
use mailreplica::fleet::{Report, STDIN_SOCKET_DEST};
use mailreplica::store::maildir::Maildir;
use mailreplica::transport::RemoteTarget;
use mailreplica::transport::ssh::{self, SshChannel, SshConnection, SshSettings};

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
    /// Only mails up to this size: bytes, or with a unit as doveadm takes it (`2k`, `10M`, `1G`).
    #[arg(short = 'I', value_name = "SIZE", value_parser = parse_size)]
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
    /// `remote:`/`remoteprefix:`: trust a host that known_hosts doesn't list yet and add its
    /// key there (OpenSSH's StrictHostKeyChecking=accept-new); a changed key is still refused.
    #[arg(long = "accept-new-host-key")]
    pub(crate) accept_new_host_key: bool,
    /// Internal (the child of a many-user run): report the outcome on stdout for the parent.
    #[arg(long = "report-stdout", hide = true)]
    pub(crate) report: bool,
    /// Where to: `maildir:PATH`, `remote:[LOGIN@]HOST[:PORT]`, `remoteprefix:[LOGIN@]HOST[:PORT]`,
    /// or a command line whose stdin/stdout speak dsync.
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

/// An SSH connection made before the privilege drop, for a `remote:` or `remoteprefix:`
/// destination.
#[derive(Debug)]
pub(crate) struct Remote {
    pub(super) conn: SshConnection,
    /// How `conn` was made: a run over many users makes a new one if it drops.
    pub(super) settings: SshSettings,
    /// `remoteprefix:`: the stream starts with the user name.
    pub(super) prefix: bool,
    pub(super) login: String,
    pub(super) host: String,
}

/// The name of the user this process runs as.
fn running_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".to_owned())
}

/// Connects to a `remote:` or `remoteprefix:` destination (none for other destinations): as
/// the invoking user, before the drop to `-u USER`.
pub(crate) fn connect_remote(config: &Config, a: &SyncArgs) -> Result<Option<Remote>, Failure> {
    let Some(r) = remote_settings(config, &a.destination, a.accept_new_host_key, a.timeout)? else {
        return Ok(None);
    };
    let conn = SshConnection::connect(&r.settings)?;
    Ok(Some(Remote { conn, settings: r.settings, prefix: r.prefix, login: r.login, host: r.host }))
}

/// How to reach a `remote:` or `remoteprefix:` destination.
pub(crate) struct RemoteSettings {
    pub(crate) settings: SshSettings,
    /// `remoteprefix:`.
    pub(crate) prefix: bool,
    pub(crate) login: String,
    pub(crate) host: String,
}

/// The SSH settings for `destination` if it is `remote:` or `remoteprefix:` (none for other
/// destinations); `timeout` is the stall timeout in seconds.
pub(crate) fn remote_settings(
    config: &Config,
    destination: &[String],
    accept_new_host_key: bool,
    timeout: u64,
) -> Result<Option<RemoteSettings>, Failure> {
    let dest = destination.join(" ");
    let (prefix, rest) = if let Some(r) = dest.strip_prefix("remoteprefix:") {
        (true, r)
    } else if let Some(r) = dest.strip_prefix("remote:") {
        (false, r)
    } else {
        if accept_new_host_key {
            return Err(Failure::new(exit::USAGE, anyhow!("--accept-new-host-key is for remote: destinations")));
        }
        return Ok(None);
    };
    if destination.len() > 1 {
        return Err(Failure::new(exit::USAGE, anyhow!("destination {dest:?}: one remote:[LOGIN@]HOST[:PORT]")));
    }
    let target = RemoteTarget::parse(rest).map_err(|e| Failure::new(exit::USAGE, e.into()))?;
    // doveadm's convention: remoteprefix: logs in as root (its forced command picks the
    // user); remote: as whoever runs this.
    let login = target
        .login
        .clone()
        .or_else(|| config.ssh.user.clone())
        .unwrap_or_else(|| if prefix { "root".to_owned() } else { running_user() });
    let ssh_cfg = &config.ssh;
    let mut settings = SshSettings::new(&target.host, target.port.unwrap_or(ssh_cfg.port), &login);
    settings.key_file.clone_from(&ssh_cfg.key);
    settings.passphrase_file.clone_from(&ssh_cfg.key_passphrase_file);
    settings.known_hosts = ssh::known_hosts_or_default(ssh_cfg.known_hosts.as_deref());
    settings.accept_new_host_key = accept_new_host_key;
    settings.connect_timeout = ssh_cfg.connect_timeout;
    settings.inactivity_timeout = Duration::from_secs(timeout.max(60));
    Ok(Some(RemoteSettings { settings, prefix, login, host: target.host }))
}

/// `sync|backup DESTINATION`.
pub(crate) fn run(s: &Session, mode: Mode, a: &SyncArgs, remote: Option<Remote>) -> Result<(), Failure> {
    let opts = options(s, mode, a)?;
    let timeout = Duration::from_secs(a.timeout.max(1));
    let dest = a.destination.join(" ");
    let result = if let Some(r) = remote {
        over_ssh(s, r, &opts, timeout)
    } else if a.report && dest == STDIN_SOCKET_DEST {
        stdin_socket(s, &opts, timeout)
    } else if let Some(loc) = dest.strip_prefix("maildir:").map(|_| dest.as_str()) {
        local(s, loc, &opts, timeout)
    } else if a.destination.len() > 1 || dest.contains(' ') || dest.contains('/') {
        command(s, &a.destination, &opts, timeout)
    } else {
        return Err(Failure::new(
            exit::USAGE,
            anyhow!(
                "destination {dest:?}: use maildir:PATH, remote:[LOGIN@]HOST[:PORT], \
                 remoteprefix:[LOGIN@]HOST[:PORT] or a command line"
            ),
        ));
    };
    if a.report {
        return report(a, result);
    }
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

/// A child of a many-user run: the outcome goes to the parent on stdout, as a
/// [`Report`], and nothing else does.
fn report(a: &SyncArgs, result: Result<MasterReport, Failure>) -> Result<(), Failure> {
    let r = match result {
        Ok(m) => Report {
            code: if m.changes_during_sync.is_some() { 2 } else { exit::OK },
            state: a.state.is_some().then_some(m.state),
            changes: m.changes_during_sync,
            error: None,
        },
        Err(f) => Report { code: f.code, state: None, changes: None, error: Some(super::error_text(&f.error)) },
    };
    write_report(&r);
    if r.code == exit::OK { Ok(()) } else { Err(Failure::quiet(r.code)) }
}

/// Writes a child's report on stdout (the parent's pipe); if that fails the parent sees no
/// report and says so.
pub(crate) fn write_report(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(r.encode().as_bytes()).and_then(|()| out.flush());
}

/// A child of a many-user run: the dsync stream is the socket on stdin, relayed by the parent.
fn stdin_socket(s: &Session, opts: &MasterOptions, timeout: Duration) -> Result<MasterReport, Failure> {
    use std::os::fd::AsFd;
    let mut store = s.store()?;
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let st = nix::sys::stat::fstat(&fd).map_err(std::io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Failure::new(exit::USAGE, anyhow!("{STDIN_SOCKET_DEST} needs a socket on stdin")));
    }
    let input = UnixStream::from(fd);
    let output = SocketWriter(input.try_clone()?);
    run_master(&mut store, input, output, opts, timeout).map_err(failure)
}

/// The write half of the stdin socket: dropping it tells the parent (and the remote) that
/// the master is done sending, while the read half stays open.
struct SocketWriter(UnixStream);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
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

/// The master over an SSH exec channel; the remote command's exit status decides what a
/// failed session is reported as.
fn over_ssh(s: &Session, mut r: Remote, opts: &MasterOptions, timeout: Duration) -> Result<MasterReport, Failure> {
    let mut store = s.store()?;
    let command = ssh::remote_command(&s.config.ssh.dsync_remote_cmd, &s.user, &r.login, &r.host);
    let label = r.conn.label().to_owned();
    let SshChannel { reader, mut writer, end } = r.conn.exec(&command)?;
    if r.prefix {
        // The first line the wrapper (or `read username`) reads; it goes out in the same
        // packet as the master's greeting.
        writer
            .write_all(format!("{}\n", s.user).as_bytes())
            .map_err(|e| Failure::new(exit::TEMPFAIL, anyhow!("writing to {label}: {e}")))?;
    }
    let result = run_master(&mut store, reader, writer, opts, timeout);
    // The master closed its side. OpenSSH sends the exit status after its EOF, just before
    // closing the channel: wait for that, briefly when the session failed already.
    let wait = if result.is_ok() { timeout } else { timeout.min(Duration::from_secs(30)) };
    let end = end.wait(wait);
    r.conn.close();
    let Some(end) = end else {
        return match result {
            Ok(report) => Ok(report),
            Err(e) => Err(failure(e)),
        };
    };
    let stderr = if end.stderr_tail.is_empty() { String::new() } else { format!(": {}", end.stderr_tail) };
    match result {
        Ok(report) if end.success() || end.exit_status.is_none() && end.exit_signal.is_none() => Ok(report),
        Ok(_) => Err(Failure::new(
            exit::TEMPFAIL,
            anyhow!("the sync finished, but {command:?} on {label} ended with {}{stderr}", end.describe()),
        )),
        Err(_) if end.exit_status == Some(126) => Err(Failure::new(
            exit::NOPERM,
            anyhow!("{label}: the replica refused user {} (remote exit status 126){stderr}", s.user),
        )),
        Err(e) if end.exec_refused || !end.success() => {
            let code = if end.exec_refused { exit::NOPERM } else { exit::TEMPFAIL };
            let what = format!("{command:?} on {label} ended with {}{stderr}", end.describe());
            Err(Failure::new(code, anyhow!(e).context(what)))
        }
        Err(e) => Err(failure(e)),
    }
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
    // The command runs as the mail user with that user's environment, as doveadm's does:
    // after `-u`, root's HOME and working directory are neither right nor reachable.
    let cwd = if s.home.is_dir() { s.home.as_path() } else { std::path::Path::new("/") };
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("HOME", &s.home)
        .env("USER", &s.user)
        .env("LOGNAME", &s.user)
        .current_dir(cwd)
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

/// A size as doveadm's `-I` takes it: a number with an optional unit `B`, `k`, `M`, `G` or `T`
/// (powers of 1024; any case, `kB`/`KiB` spellings too).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a size (e.g. 2048, 2k, 10M)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} (B, k, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_as_doveadm_takes_them() {
        assert_eq!(parse_size("2048"), Ok(2048));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("2 KB"), Ok(2048));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("2x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
