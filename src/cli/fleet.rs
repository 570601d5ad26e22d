//! `sync|backup` for many users: `-A`, `-F FILE`, `-u` given more than once, `--parallel N`;
//! and for one `-u USER` with `-f json`, the same path so that the result is data.
//!
//! ```text
//!   mailreplica -F users --parallel 4 backup remoteprefix:root@replica
//!     root: read config, userdb and FILE; connect ONCE (root's key and known_hosts)
//!       for each user, 4 at a time (mailreplica::fleet):
//!         check the user (userdb, uid range)        ── refusal: a result, no process
//!         exec a channel on the shared connection   ── remoteprefix: "USER\n" first
//!         spawn /proc/self/exe -u USER sync|backup --report-stdout … stdin-socket:
//!           the child drops to USER for good and runs the master on the socket;
//!           the parent relays socket ⇄ channel, counting bytes, and attributes the
//!           child's stderr lines to USER
//!         the child's report + the remote's exit status ⇒ the user's exit code
//!     stderr: a progress line (on a terminal), then a table of every user's result
//!     stdout: the results in the -f format (json, tab, …), or nothing
//! ```
//!
//! For other destinations (`maildir:`, a command line) each child reaches its destination
//! itself (as the user, as a single-user run does); only the report and the log come back.
//!
//! Exit code: 0 when every user succeeded; otherwise the code of the first user (in the order
//! given) that failed with something other than "changes during sync"; 2 when that is all
//! that happened. One user's failure never stops the others.
//!
//! The parent never drops privileges and opens nothing a mail user controls: the
//! configuration, the userdb, the `-F` file (all root's), root's SSH key and known_hosts.
//! Everything under a user's home is opened by that user's child only.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use mailreplica::config::Config;
use mailreplica::fleet::{self, Carrier, ChildCommand, ChildOutput, Counters, Outcome, STDIN_SOCKET_DEST};
use mailreplica::transport::ssh::{self, SshConnection};

use super::output::{Cell, Column, Printer};
use super::sync::{Mode, SyncArgs, connect_remote};
use super::{Cli, Failure, Format, error_text, exit};

/// Whether this run takes the many-user path.
pub(crate) fn wanted(cli: &Cli, a: &SyncArgs) -> bool {
    !a.report
        && (cli.all_users
            || cli.user_file.is_some()
            || cli.users.len() > 1
            || (cli.format == Some(Format::Json) && !cli.users.is_empty()))
}

/// One user's result.
#[derive(Debug)]
pub(crate) struct UserResult {
    pub(crate) user: String,
    pub(crate) code: u8,
    /// Why it failed, or what changed during the sync.
    pub(crate) message: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) elapsed: Duration,
    /// Relayed bytes (sent, received), for destinations the parent relays.
    pub(crate) bytes: Option<(u64, u64)>,
}

impl UserResult {
    pub(crate) fn refused(user: &str, f: &Failure) -> Self {
        Self {
            user: user.to_owned(),
            code: f.code,
            message: Some(error_text(&f.error)),
            state: None,
            elapsed: Duration::ZERO,
            bytes: None,
        }
    }

    fn result_word(&self) -> &'static str {
        match self.code {
            exit::OK => "ok",
            2 => "changed",
            _ => "failed",
        }
    }
}

/// `sync|backup` for every user asked for.
pub(crate) fn run(cli: &Cli, config: Config, mode: Mode, a: &SyncArgs) -> Result<(), Failure> {
    let many = cli.all_users || cli.user_file.is_some() || cli.users.len() > 1;
    if cli.all_users && (cli.user_file.is_some() || !cli.users.is_empty()) {
        return Err(Failure::new(exit::USAGE, anyhow!("-A can't be combined with -u or -F")));
    }
    if many && a.state.is_some() {
        return Err(Failure::new(
            exit::USAGE,
            anyhow!("-s can't be used with -A, -F or several -u: each user has a state of their own"),
        ));
    }
    if cli.parallel == 0 {
        return Err(Failure::new(exit::USAGE, anyhow!("--parallel must be at least 1")));
    }
    // Children get exactly stdin, stdout and stderr: nothing this process inherited besides.
    mailreplica::sys::cloexec_from(3).context("marking inherited file descriptors close-on-exec")?;
    let users = users(cli, &config)?;
    if users.is_empty() {
        return Err(Failure::new(exit::NOUSER, anyhow!("no users to sync")));
    }
    // As root, once: the one connection every user's channel goes over.
    let remote = connect_remote(&config, a)?;
    let template = ChildTemplate::new(cli, mode, a, remote.is_some())?;
    let console = Console::new(std::io::stderr().is_terminal());
    let board = Board::new(users.len());
    let shared = remote.map(|r| Shared {
        conn: Mutex::new(Some(r.conn)),
        settings: r.settings,
        prefix: r.prefix,
        login: r.login,
        host: r.host,
    });
    let wait = Duration::from_secs(a.timeout.max(1));

    let results = std::thread::scope(|s| {
        let ticker = console.tty.then(|| s.spawn(|| ticker(&console, &board)));
        let results = fleet::for_each_parallel(users, cli.parallel, |_, user| {
            let counters = board.start(&user);
            let log: Arc<dyn Fn(&str) + Send + Sync> = {
                let (console, user) = (console.clone(), user.clone());
                Arc::new(move |line: &str| console.line(&format!("{user}: {}", line.trim_start())))
            };
            let r = sync_user(&config, &template, shared.as_ref(), &user, &[], &counters, log, wait);
            board.finish(&user, &r);
            if r.code != exit::OK {
                let text = r.message.as_deref().unwrap_or("failed");
                let what = if r.code == 2 { "changes during sync, run it again" } else { "Error" };
                console.line(&format!("mailreplica: {}: {what}: {text}", r.user));
            }
            r
        });
        board.over.store(true, Ordering::Relaxed);
        if let Some(t) = ticker {
            let _ = t.join();
        }
        results
    });
    console.clear();
    if let Some(Shared { conn, .. }) = shared
        && let Some(c) = conn.into_inner().unwrap_or_else(PoisonError::into_inner)
    {
        c.close();
    }
    if many {
        let _ = print_results(Format::Table, &results, false, std::io::stderr().lock());
    }
    if let Some(format) = cli.format {
        print_results(format, &results, a.state.is_some(), std::io::stdout().lock()).context("writing the results")?;
    }
    match overall(&results) {
        exit::OK => Ok(()),
        code => Err(Failure::quiet(code)),
    }
}

/// The exit code of the whole run: see the module's documentation.
fn overall(results: &[UserResult]) -> u8 {
    let codes = || results.iter().map(|r| r.code);
    codes().find(|c| *c != exit::OK && *c != 2).or_else(|| codes().find(|c| *c == 2)).unwrap_or(exit::OK)
}

/// The users, in the order given, each once.
fn users(cli: &Cli, config: &Config) -> Result<Vec<String>, Failure> {
    let mut names: Vec<String> = Vec::new();
    if cli.all_users {
        // As `mailreplica user '*'` lists them, limited to the uids -u may act for.
        for u in config.userdb.list()? {
            if config.uid_allowed(u.uid)
                && !mailreplica::privdrop::forbidden_id(u.uid)
                && !mailreplica::privdrop::forbidden_id(u.gid)
            {
                names.push(u.name);
            }
        }
    }
    names.extend(cli.users.iter().cloned());
    if let Some(path) = &cli.user_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the user list {}", path.display()))
            .map_err(|e| Failure::new(exit::DATAERR, e))?;
        for line in text.lines() {
            let name = line.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.push(name.to_owned());
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// A child's destination words: the socket on its stdin when the parent relays the stream
/// (`relayed`), else the destination itself.
fn destination_words(destination: &[String], relayed: bool) -> Vec<OsString> {
    if relayed { vec![STDIN_SOCKET_DEST.into()] } else { destination.iter().map(OsString::from).collect() }
}

/// What every child's command line has in common.
pub(crate) struct ChildTemplate {
    /// Global options: `-c`, `-o`, `-D`, `-v`.
    global: Vec<OsString>,
    /// `sync|backup` and its options, up to the destination.
    command: Vec<OsString>,
    /// The destination words.
    destination: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl ChildTemplate {
    pub(crate) fn new(cli: &Cli, mode: Mode, a: &SyncArgs, relayed: bool) -> Result<Self, Failure> {
        let mut global: Vec<OsString> = Vec::new();
        if let Some(c) = &cli.config {
            global.push("-c".into());
            global.push(std::path::absolute(c).context("the configuration file's path")?.into());
        }
        for o in &cli.overrides {
            global.push("-o".into());
            global.push(o.into());
        }
        if cli.debug {
            global.push("-D".into());
        }
        if cli.verbose {
            global.push("-v".into());
        }
        let mut c: Vec<OsString> =
            vec![if mode == Mode::Sync { "sync" } else { "backup" }.into(), "--report-stdout".into()];
        let flag = |c: &mut Vec<OsString>, on: bool, f: &str| {
            if on {
                c.push(f.into());
            }
        };
        flag(&mut c, a.reverse, "-R");
        flag(&mut c, a.one_way, "-1");
        flag(&mut c, a.full, "-f");
        flag(&mut c, a.purge, "-P");
        let mut opt = |f: &str, v: Option<String>| {
            if let Some(v) = v {
                c.push(f.into());
                c.push(v.into());
            }
        };
        opt("-s", a.state.clone());
        opt("-m", a.mailbox.clone());
        for x in &a.exclude {
            opt("-x", Some(x.clone()));
        }
        opt("-t", a.since.map(|v| v.to_string()));
        opt("-e", a.until.map(|v| v.to_string()));
        opt("-I", a.max_size.map(|v| v.to_string()));
        opt("-O", a.flag.clone());
        opt("-l", a.lock_timeout.map(|v| v.to_string()));
        opt("-T", Some(a.timeout.to_string()));
        c.push("--".into());
        let destination = destination_words(&a.destination, relayed);
        // A small, fixed environment: the child needs no more of root's.
        let env = ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "MAILREPLICA_LOG", "RUST_BACKTRACE"]
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
            .collect();
        Ok(Self { global, command: c, destination, env })
    }

    /// The same children, syncing to `destination` instead (`relayed`: over a shared SSH
    /// connection, the child's stream on its stdin socket).
    pub(crate) fn with_destination(&self, destination: &[String], relayed: bool) -> Self {
        Self {
            global: self.global.clone(),
            command: self.command.clone(),
            destination: destination_words(destination, relayed),
            env: self.env.clone(),
        }
    }

    /// `doveadm sync` for the job's user (whose mail is in a format our store does not read), to
    /// `destination`: a `remote:`/`remoteprefix:` one through `relay` over our SSH client,
    /// anything else (a location, a command) as doveadm takes it. `doveadm` is its command
    /// line; `timeout` is doveadm's `-T` (and the relay's).
    pub(crate) fn delegated(
        &self,
        doveadm: &[String],
        relay: Option<&std::path::Path>,
        job: &mailreplica::replicator::queue::Job,
        timeout: u64,
        destination: &[String],
    ) -> ChildCommand {
        let user = job.user.as_str();
        let mut args: Vec<OsString> = doveadm[1..].iter().map(OsString::from).collect();
        args.extend(["sync".into(), "-u".into(), user.into(), "-s".into(), job.state.clone().into()]);
        args.extend(["-T".into(), timeout.to_string().into()]);
        if job.full {
            args.push("-f".into());
        }
        // Whatever follows is the destination, even words that look like options.
        args.push("--".into());
        match relay {
            // Several words: doveadm runs them as a command (as root, before its drop) and
            // appends `dsync-server`, which `relay` ignores.
            Some(exe) => {
                args.push(exe.into());
                args.extend(self.global.iter().cloned());
                args.extend(["relay".into(), "-T".into(), timeout.to_string().into(), "--".into(), user.into()]);
                args.extend(destination.iter().map(OsString::from));
            }
            None => args.extend(destination.iter().map(OsString::from)),
        }
        ChildCommand {
            program: doveadm[0].clone().into(),
            arg0: doveadm[0].clone().into(),
            args,
            env: self.env.clone(),
            output: ChildOutput::StateLine,
        }
    }

    /// `user`'s command line; `extra` options go after the template's (`-s STATE`, `-f`).
    fn for_user(&self, user: &str, extra: &[OsString]) -> ChildCommand {
        let mut args = self.global.clone();
        args.push(format!("--user={user}").into());
        // The template's options end with `--`.
        args.extend(self.command[..self.command.len() - 1].iter().cloned());
        args.extend(extra.iter().cloned());
        args.push("--".into());
        args.extend(self.destination.iter().cloned());
        ChildCommand {
            // This very binary, even if the file was replaced since it started.
            program: "/proc/self/exe".into(),
            arg0: "mailreplica".into(),
            args,
            env: self.env.clone(),
            output: ChildOutput::Report,
        }
    }
}

/// The one SSH connection every user's channel goes over, and how to make it again.
pub(crate) struct Shared {
    /// `None` until the first user needs it (the replicator connects lazily), or after a
    /// connection attempt failed.
    pub(crate) conn: Mutex<Option<SshConnection>>,
    pub(crate) settings: ssh::SshSettings,
    /// `remoteprefix:`: each channel starts with the user name.
    pub(crate) prefix: bool,
    pub(crate) login: String,
    pub(crate) host: String,
}

/// A new connection in place of `conn`, which has ended (or was never made): the users still
/// to come go over it (those whose channels were open on the old one have failed with it).
fn reconnect(conn: &mut Option<SshConnection>, settings: &ssh::SshSettings, user: &str) -> Result<(), Failure> {
    if let Some(old) = conn.take() {
        tracing::warn!("{}: the SSH connection was lost; connecting again for {user} and the users after", old.label());
        old.close();
    }
    *conn = Some(SshConnection::connect(settings).map_err(Failure::from)?);
    Ok(())
}

/// One user: checks, channel, child, verdict. `extra` goes on the child's command line
/// (`-s STATE`, `-f`); each line the child logs goes to `log`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sync_user(
    config: &Config,
    template: &ChildTemplate,
    shared: Option<&Shared>,
    name: &str,
    extra: &[OsString],
    counters: &Arc<Counters>,
    log: Arc<dyn Fn(&str) + Send + Sync>,
    wait: Duration,
) -> UserResult {
    let entry = match super::allowed_user(config, name) {
        Ok(e) => e,
        Err(f) => return UserResult::refused(name, &f),
    };
    let user = entry.name;
    let mut remote_what = None;
    let carrier = match shared {
        None => Carrier::Own,
        Some(sh) => {
            let command = ssh::remote_command(&config.ssh.dsync_remote_cmd, &user, &sh.login, &sh.host);
            // A server's limit on channels per connection (OpenSSH's MaxSessions, 10) below
            // --parallel: wait for another user's channel to close, for up to a minute.
            let mut pause = Duration::from_millis(50);
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut reconnected = false;
            let (label, channel) = loop {
                let mut conn = sh.conn.lock().unwrap_or_else(PoisonError::into_inner);
                // The connection dropped (another user's channel may have seen it first), or
                // was never made: one new connection, made by whichever user finds it gone.
                if conn.as_ref().is_none_or(SshConnection::is_closed) && !reconnected {
                    reconnected = true;
                    if let Err(f) = reconnect(&mut conn, &sh.settings, &user) {
                        return UserResult::refused(&user, &f);
                    }
                }
                let Some(c) = conn.as_mut() else {
                    return UserResult::refused(&user, &Failure::new(exit::TEMPFAIL, anyhow!("no SSH connection")));
                };
                match c.exec_tagged(&command, Some(&user)) {
                    Ok(ch) => break (c.label().to_owned(), ch),
                    Err(e) if e.is_channel_refused() && Instant::now() < deadline => {
                        drop(conn);
                        tracing::debug!("{user}: channel refused ({e}), trying again");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    Err(e) if e.is_connection_lost() && !reconnected => {
                        reconnected = true;
                        if let Err(f) = reconnect(&mut conn, &sh.settings, &user) {
                            return UserResult::refused(&user, &f);
                        }
                    }
                    Err(e) => return UserResult::refused(&user, &Failure::from(e)),
                }
            };
            let first = if sh.prefix { format!("{user}\n").into_bytes() } else { Vec::new() };
            remote_what = Some((label, command));
            Carrier::Ssh { channel, first, wait }
        }
    };
    let cmd = template.for_user(&user, extra);
    let outcome = fleet::run_child(&cmd, carrier, counters, log);
    verdict(&user, remote_what.as_ref(), outcome)
}

/// Runs a delegated sync ([`ChildTemplate::delegated`]) to its end.
pub(crate) fn sync_delegated(
    cmd: &ChildCommand,
    user: &str,
    counters: &Arc<Counters>,
    log: Arc<dyn Fn(&str) + Send + Sync>,
) -> UserResult {
    let mut r = verdict(user, None, fleet::run_child(cmd, Carrier::Own, counters, log));
    if r.code != exit::OK && r.code != 2 {
        let program = cmd.program.display();
        r.message = Some(format!("{program} sync: {}", r.message.as_deref().unwrap_or("failed")));
    }
    r
}

/// The user's exit code and message from the child's report and, over SSH, how the remote
/// command ended: the same rules as a single-user run over SSH.
fn verdict(user: &str, remote: Option<&(String, String)>, o: Outcome) -> UserResult {
    let bytes = remote.map(|_| (o.sent, o.received));
    let mut r = UserResult {
        user: user.to_owned(),
        code: exit::TEMPFAIL,
        message: None,
        state: None,
        elapsed: o.elapsed,
        bytes,
    };
    let (child_code, child_msg) = match o.report {
        Ok(rep) => {
            r.state = rep.state;
            (rep.code, rep.error.or(rep.changes))
        }
        Err(e) => (exit::TEMPFAIL, Some(e.to_string())),
    };
    let child_ok = child_code == exit::OK || child_code == 2;
    let (Some((label, command)), Some(end)) = (remote, o.remote) else {
        r.code = child_code;
        r.message = child_msg;
        return r;
    };
    let stderr = if end.stderr_tail.is_empty() { String::new() } else { format!(": {}", end.stderr_tail) };
    let no_status = end.exit_status.is_none() && end.exit_signal.is_none();
    (r.code, r.message) = if child_ok && (end.success() || no_status) {
        (child_code, child_msg)
    } else if child_ok {
        let m = format!("the sync finished, but {command:?} on {label} ended with {}{stderr}", end.describe());
        (exit::TEMPFAIL, Some(m))
    } else if end.exit_status == Some(126) {
        (exit::NOPERM, Some(format!("{label}: the replica refused user {user} (remote exit status 126){stderr}")))
    } else if end.exec_refused || !end.success() {
        let code = if end.exec_refused { exit::NOPERM } else { exit::TEMPFAIL };
        let m = format!("{command:?} on {label} ended with {}{stderr}", end.describe());
        (
            code,
            Some(match child_msg {
                Some(c) => format!("{m}: {c}"),
                None => m,
            }),
        )
    } else {
        (child_code, child_msg)
    };
    r
}

fn print_results(format: Format, results: &[UserResult], with_state: bool, mut out: impl Write) -> std::io::Result<()> {
    let human = format == Format::Table;
    let mut cols = vec![Column::new("user"), Column::new("result")];
    if !human {
        cols.push(Column::new("code"));
    }
    cols.push(Column::new("duration"));
    if human {
        cols.push(Column::new("bytes"));
    } else {
        cols.extend([Column::new("sent"), Column::new("received")]);
    }
    if with_state {
        cols.push(Column::new("state"));
    }
    cols.push(Column::new("error"));
    let mut p = Printer::new(format, cols, &mut out);
    for r in results {
        let mut row = vec![Cell::Text(r.user.clone()), Cell::Text(r.result_word().to_owned())];
        if human {
            row.push(Cell::Text(format!("{:.1}s", r.elapsed.as_secs_f64())));
            row.push(Cell::Text(r.bytes.map_or_else(|| "-".to_owned(), |(s, v)| human_bytes(s + v))));
        } else {
            row.push(Cell::Text(r.code.to_string()));
            row.push(Cell::Text(format!("{:.3}", r.elapsed.as_secs_f64())));
            let (s, v) = r.bytes.map_or((String::new(), String::new()), |(s, v)| (s.to_string(), v.to_string()));
            row.extend([Cell::Text(s), Cell::Text(v)]);
        }
        if with_state {
            row.push(Cell::Text(r.state.clone().unwrap_or_default()));
        }
        let msg = r.message.clone().unwrap_or_default();
        row.push(Cell::Text(if human { msg.replace('\n', " ") } else { msg }));
        p.row(&row)?;
    }
    p.finish()?;
    if format == Format::Json {
        // The printer ends the array without a newline, as doveadm does; a script reading
        // lines wants one.
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// stderr, shared by the progress line and the log lines of every child: a log line first
/// clears the progress line, which the next tick draws again.
#[derive(Clone)]
struct Console {
    tty: bool,
    shown: Arc<Mutex<bool>>,
}

impl Console {
    fn new(tty: bool) -> Self {
        Self { tty, shown: Arc::new(Mutex::new(false)) }
    }

    fn line(&self, text: &str) {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        let mut err = std::io::stderr().lock();
        if *shown {
            let _ = err.write_all(b"\r\x1b[K");
            *shown = false;
        }
        let _ = writeln!(err, "{text}");
    }

    fn progress(&self, text: &str) {
        // One terminal line, or clearing it would leave the wrapped part behind.
        let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse::<usize>().ok()).unwrap_or(80);
        let text: String = text.chars().take(width.saturating_sub(1).max(20)).collect();
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{text}");
        let _ = err.flush();
        *shown = true;
    }

    fn clear(&self) {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        if *shown {
            let _ = std::io::stderr().write_all(b"\r\x1b[K");
            *shown = false;
        }
    }
}

/// Who is running and how far the run is, for the progress line.
struct Board {
    total: usize,
    started: Instant,
    done: AtomicUsize,
    failed: AtomicUsize,
    /// Every user is done.
    over: AtomicBool,
    running: Mutex<Vec<(String, Arc<Counters>)>>,
    /// Bytes of the users that finished.
    finished_bytes: Mutex<u64>,
}

impl Board {
    fn new(total: usize) -> Self {
        Self {
            total,
            started: Instant::now(),
            done: AtomicUsize::new(0),
            over: AtomicBool::new(false),
            failed: AtomicUsize::new(0),
            running: Mutex::new(Vec::new()),
            finished_bytes: Mutex::new(0),
        }
    }

    fn start(&self, user: &str) -> Arc<Counters> {
        let c = Arc::new(Counters::default());
        self.running.lock().unwrap_or_else(PoisonError::into_inner).push((user.to_owned(), Arc::clone(&c)));
        c
    }

    fn finish(&self, user: &str, r: &UserResult) {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).retain(|(u, _)| u != user);
        if let Some((s, v)) = r.bytes {
            *self.finished_bytes.lock().unwrap_or_else(PoisonError::into_inner) += s + v;
        }
        if r.code != exit::OK && r.code != 2 {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// `12/100 users done, 1 failed | alice 1.2 MiB, bob 40.0 KiB | 35.1 MiB, 2.9 MiB/s`
    fn line(&self) -> String {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = |c: &Counters| c.sent.load(Ordering::Relaxed) + c.received.load(Ordering::Relaxed);
        let mut total = *self.finished_bytes.lock().unwrap_or_else(PoisonError::into_inner);
        total += running.iter().map(|(_, c)| bytes(c)).sum::<u64>();
        let mut names: Vec<String> =
            running.iter().take(3).map(|(u, c)| format!("{u} {}", human_bytes(bytes(c)))).collect();
        if running.len() > 3 {
            names.push(format!("+{}", running.len() - 3));
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let failed = self.failed.load(Ordering::Relaxed);
        let failed = if failed > 0 { format!(", {failed} failed") } else { String::new() };
        format!(
            "{}/{} users done{failed} | {} | {} in {secs:.0} s, {}/s",
            self.done.load(Ordering::Relaxed).min(self.total),
            self.total,
            if names.is_empty() { "-".to_owned() } else { names.join(", ") },
            human_bytes(total),
            human_bytes((total as f64 / secs) as u64)
        )
    }
}

/// Redraws the progress line until the run is over.
fn ticker(console: &Console, board: &Board) {
    while !board.over.load(Ordering::Relaxed) {
        console.progress(&board.line());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(code: u8) -> UserResult {
        UserResult { user: "u".into(), code, message: None, state: None, elapsed: Duration::ZERO, bytes: None }
    }

    #[test]
    fn the_worst_code_wins_and_changes_only_count_alone() {
        assert_eq!(overall(&[res(0), res(0)]), 0);
        assert_eq!(overall(&[res(0), res(2), res(0)]), 2);
        assert_eq!(overall(&[res(2), res(77), res(75)]), 77);
        assert_eq!(overall(&[]), 0);
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
