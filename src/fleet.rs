//! Many users' syncs from one root process: the parent keeps the privileges it needs (root's
//! SSH connection, the userdb) and runs each user's sync in a child that drops to that user.
//!
//! ```text
//!   root parent (never drops; opens nothing a mail user controls)
//!    │  one SshConnection ─────────────── exec channel per user ────────► sshd ► wrapper
//!    │        ▲ relay threads count bytes      ▲
//!    │        │                                │ (remoteprefix: "USER\n" first)
//!    │  socketpair ── fd 0 of the child: the dsync stream, both directions
//!    │  pipe ◄─────── fd 1 of the child: one [`Report`], nothing else
//!    │  pipe ◄─────── fd 2 of the child: its log lines, attributed to the user
//!    ▼
//!   child = /proc/self/exe … -u USER sync|backup … (drops to USER for good, runs the master)
//! ```
//!
//! A process cannot drop to many users in turn, so each user gets a fresh process, started
//! with `std::process::Command` (fork+exec, no code of ours runs between the two, which is
//! what makes it safe after the SSH client's threads exist). Its three standard fds are set
//! explicitly and nothing else is inherited: every fd this crate and its dependencies open is
//! close-on-exec, and the caller marks the fds it inherited close-on-exec too
//! ([`crate::sys::cloexec_from`]) before it starts any child.
//!
//! Why these fds, with no `unsafe`: the dsync stream is a Unix socketpair, so one fd (stdin)
//! carries both directions; that frees stdout for the report, which is exactly what stdout
//! is for in a single-user run (the state, and nothing else), while stderr stays the log.
//! A report on an extra fd 3 would need a `pre_exec` dup2 (unsafe after fork); a report
//! file would have to be created by root in a directory the user can write, which is
//! the kind of path a root process must not open.
//!
//! The parent reads the report after the child exits. A child that dies without one (killed,
//! crashed) is reported as such, with its exit status. For [`Carrier::Own`] the child
//! reaches its destination itself (a local Maildir, a command line) and only the report and
//! the log come back.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::transport::ssh::{RemoteEnd, SshChannel};

/// The destination a child is given when its dsync stream is the socket on its stdin.
/// Internal: the parent passes it, nobody else has a reason to.
pub const STDIN_SOCKET_DEST: &str = "stdin-socket:";

/// At most this much of a child's report is read (a state string is a few hundred bytes
/// per mailbox).
const MAX_REPORT: u64 = 16 << 20;

/// A child's log line longer than this is passed on in pieces.
const MAX_LOG_LINE: u64 = 64 << 10;

/// What a child reports about its sync: one `key=value` line per field, values escaped
/// (`\\`, `\n`, `\r`), ended by `end` so that a cut-off report is told from a complete one.
///
/// ```text
/// code=0
/// state=…              (only when the run was asked for a state)
/// changes=…            (something changed during the sync: exit code 2)
/// error=…              (why it failed)
/// end
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The child's exit code (doveadm's codes: 0, 2, 64…78).
    pub code: u8,
    /// The new state (`-s`), when one was asked for.
    pub state: Option<String>,
    /// Why the sync must be run again (exit code 2).
    pub changes: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A report that can't be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed report from the child: {0}")]
pub struct BadReport(&'static str);

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Result<String, BadReport> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            _ => return Err(BadReport("bad escape")),
        }
    }
    Ok(out)
}

impl Report {
    /// The report's text.
    pub fn encode(&self) -> String {
        let mut out = format!("code={}\n", self.code);
        for (k, v) in [("state", &self.state), ("changes", &self.changes), ("error", &self.error)] {
            if let Some(v) = v {
                out.push_str(k);
                out.push('=');
                out.push_str(&escape(v));
                out.push('\n');
            }
        }
        out.push_str("end\n");
        out
    }

    /// Reads a report's text.
    pub fn decode(text: &str) -> Result<Self, BadReport> {
        let mut r = Self::default();
        let mut code = false;
        let mut lines = text.split('\n');
        for line in lines.by_ref() {
            if line == "end" {
                return if !code {
                    Err(BadReport("no code"))
                } else if lines.any(|l| !l.is_empty()) {
                    Err(BadReport("text after the end"))
                } else {
                    Ok(r)
                };
            }
            let (k, v) = line.split_once('=').ok_or(BadReport("a line without ="))?;
            let v = unescape(v)?;
            match k {
                "code" => {
                    r.code = v.parse().map_err(|_| BadReport("bad code"))?;
                    code = true;
                }
                "state" => r.state = Some(v),
                "changes" => r.changes = Some(v),
                "error" => r.error = Some(v),
                _ => return Err(BadReport("unknown key")),
            }
        }
        Err(BadReport("cut off (no end line)"))
    }
}

/// The program and arguments of one child, and its whole environment. It starts in the
/// caller's working directory, so that a relative path on the command line means what it
/// means in a single-user run.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    /// The program (the parent's own binary: `/proc/self/exe`).
    pub program: PathBuf,
    /// `argv[0]`.
    pub arg0: OsString,
    /// The arguments.
    pub args: Vec<OsString>,
    /// The environment (nothing else of the parent's is passed on).
    pub env: Vec<(OsString, OsString)>,
    /// What the child writes on stdout.
    pub output: ChildOutput,
}

/// What a child's stdout carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildOutput {
    /// One [`Report`] (our own binary, `--report-stdout`).
    Report,
    /// The new state on its first line, as `doveadm sync -s STATE` prints it; the exit status
    /// is the code, and the last line logged on stderr says why it failed.
    StateLine,
}

/// How a child's dsync stream reaches its destination.
#[derive(Debug)]
pub enum Carrier {
    /// The child connects its destination itself; its stdin is `/dev/null`.
    Own,
    /// The parent relays between the child's stdin socket and an SSH exec channel.
    Ssh {
        /// The channel (already exec'd).
        channel: SshChannel,
        /// Written to the channel before anything else (`remoteprefix:`'s `USER\n`).
        first: Vec<u8>,
        /// How long to wait for the remote's exit status once the child is done.
        wait: Duration,
    },
}

/// Byte counters of one user's stream, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes relayed from the child to the destination.
    pub sent: AtomicU64,
    /// Bytes relayed from the destination to the child.
    pub received: AtomicU64,
}

/// How one user's child ended.
#[derive(Debug)]
pub struct Outcome {
    /// The child's report, or why there is none.
    pub report: Result<Report, ChildError>,
    /// How the remote command ended (SSH only; `None` when it did not end in time).
    pub remote: Option<RemoteEnd>,
    /// Bytes sent and received (SSH only).
    pub sent: u64,
    /// Bytes received (SSH only).
    pub received: u64,
    /// From spawning the child to its end.
    pub elapsed: Duration,
}

/// A child that could not be run or did not report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChildError {
    /// The child could not be started.
    #[error("starting the child process: {0}")]
    Spawn(#[source] io::Error),
    /// The socketpair or a relay thread could not be made.
    #[error("setting up the child's stream: {0}")]
    Setup(#[source] io::Error),
    /// It ended without a report.
    #[error("the child process ended ({status}) without a report")]
    NoReport {
        /// Its exit status.
        status: String,
    },
    /// Its report is unreadable.
    #[error("{source} ({status})")]
    Report {
        /// What is wrong.
        source: BadReport,
        /// Its exit status.
        status: String,
    },
}

/// Runs one child to its end: spawns it, relays its stream (for [`Carrier::Ssh`]), passes
/// each of its stderr lines to `log`, then reads its report.
pub fn run_child(
    cmd: &ChildCommand,
    carrier: Carrier,
    counters: &Arc<Counters>,
    log: Arc<dyn Fn(&str) + Send + Sync>,
) -> Outcome {
    let started = Instant::now();
    let fail = |e| Outcome { report: Err(e), remote: None, sent: 0, received: 0, elapsed: started.elapsed() };
    let (stdin, ssh) = match carrier {
        Carrier::Own => (Stdio::null(), None),
        Carrier::Ssh { channel, first, wait } => {
            let (ours, theirs) = match UnixStream::pair() {
                Ok(p) => p,
                Err(e) => return fail(ChildError::Setup(e)),
            };
            (Stdio::from(OwnedFd::from(theirs)), Some((ours, channel, first, wait)))
        }
    };
    let mut command = Command::new(&cmd.program);
    {
        use std::os::unix::process::CommandExt;
        command.arg0(&cmd.arg0);
    }
    command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = command.spawn();
    // The child's end of the socketpair is held by `command` until it is dropped: the relay
    // sees the child's EOF only once no copy is left here.
    drop(command);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(ChildError::Spawn(e)),
    };
    let stderr_thread = child.stderr.take().map(|err| {
        let log = Arc::clone(&log);
        thread::Builder::new().name("child-stderr".into()).spawn(move || {
            // Lines are bounded: a child can't make the parent hold more than this at once.
            let mut r = BufReader::new(err);
            let mut line = Vec::new();
            let mut last = String::new();
            while let Ok(n) = r.by_ref().take(MAX_LOG_LINE).read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                log(text);
                if !text.trim().is_empty() {
                    text.clone_into(&mut last);
                }
                line.clear();
            }
            last
        })
    });
    let relay = ssh.map(|(ours, channel, first, wait)| Relay::start(ours, channel, first, counters, wait));
    let mut report_text = String::new();
    let read = child.stdout.take().map(|out| out.take(MAX_REPORT).read_to_string(&mut report_text));
    let status = child.wait();
    let last_line = match stderr_thread {
        Some(Ok(t)) => t.join().unwrap_or_default(),
        _ => String::new(),
    };
    let status_text = match &status {
        Ok(s) => describe_status(*s),
        Err(e) => format!("wait failed: {e}"),
    };
    let report = match (cmd.output, read) {
        (ChildOutput::StateLine, Some(Ok(_))) => state_line_report(status.ok(), &report_text, last_line, status_text),
        (ChildOutput::Report, Some(Ok(_))) if report_text.is_empty() => {
            Err(ChildError::NoReport { status: status_text })
        }
        (ChildOutput::Report, Some(Ok(_))) => {
            Report::decode(&report_text).map_err(|source| ChildError::Report { source, status: status_text })
        }
        _ => Err(ChildError::NoReport { status: status_text }),
    };
    let remote = match relay {
        Some(Ok(r)) => {
            let wait = match (&report, r.wait) {
                (Ok(rep), w) if rep.code == 0 || rep.code == 2 => w,
                (_, w) => w.min(Duration::from_secs(30)),
            };
            r.finish(wait)
        }
        Some(Err(e)) => {
            return Outcome {
                report: Err(ChildError::Setup(e)),
                remote: None,
                sent: 0,
                received: 0,
                elapsed: started.elapsed(),
            };
        }
        None => None,
    };
    Outcome {
        report,
        remote,
        sent: counters.sent.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

/// The report of a child that prints only a state line (`doveadm sync -s`): its exit status
/// is the code; a failure's reason is the last line it logged.
fn state_line_report(
    status: Option<ExitStatus>,
    stdout: &str,
    last_line: String,
    status_text: String,
) -> Result<Report, ChildError> {
    let Some(code) = status.and_then(|s| s.code()).and_then(|c| u8::try_from(c).ok()) else {
        return Err(ChildError::NoReport { status: status_text });
    };
    let state = stdout.lines().next().map(str::trim).filter(|_| code == 0 || code == 2).map(str::to_owned);
    let why = if last_line.is_empty() { status_text } else { format!("{last_line} ({status_text})") };
    Ok(Report {
        code,
        state,
        changes: (code == 2).then(|| why.clone()),
        error: (code != 0 && code != 2).then_some(why),
    })
}

fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// The two relay threads between a child's socket and an SSH channel.
struct Relay {
    up: thread::JoinHandle<()>,
    down: thread::JoinHandle<()>,
    end: crate::transport::ssh::ChannelEnd,
    wait: Duration,
}

impl Relay {
    fn start(
        ours: UnixStream,
        channel: SshChannel,
        first: Vec<u8>,
        counters: &Arc<Counters>,
        wait: Duration,
    ) -> io::Result<Self> {
        let SshChannel { mut reader, mut writer, end } = channel;
        let mut from_child = ours.try_clone()?;
        let mut to_child = ours;
        let c = Arc::clone(counters);
        // Child → remote. `first` goes out with the child's first bytes, in one packet.
        let up = thread::Builder::new().name("relay-up".into()).spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut ok = writer.write_all(&first).is_ok();
            while ok {
                match from_child.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        ok = writer.write_all(&buf[..n]).and_then(|()| writer.flush()).is_ok();
                        c.sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            // EOF to the remote: the child is done writing (or the channel is gone).
            let _ = writer.close();
        })?;
        let c = Arc::clone(counters);
        // Remote → child.
        let down = thread::Builder::new().name("relay-down".into()).spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        let _ = to_child.shutdown(Shutdown::Write);
                        break;
                    }
                    Ok(n) => {
                        if to_child.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        c.received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // The channel was lost: the child sees its stream end.
                        let _ = to_child.shutdown(Shutdown::Both);
                        break;
                    }
                }
            }
        })?;
        Ok(Self { up, down, end, wait })
    }

    /// After the child exited: its side is closed, so the up thread ends; then the remote's
    /// exit status, and the down thread once the channel is closed; all within `wait`. A
    /// remote that never closes leaves its threads to end with the connection.
    fn finish(self, wait: Duration) -> Option<RemoteEnd> {
        // The up thread can only be stuck handing data to a remote that stopped reading.
        let until = Instant::now() + wait;
        while !self.up.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(1));
        }
        if self.up.is_finished() {
            let _ = self.up.join();
        }
        let end = self.end.wait(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)));
        if end.is_some() {
            let _ = self.down.join();
        }
        end
    }
}

/// Runs `f` on every item, at most `parallel` at a time, in the order given; the results come
/// back in that order.
pub fn for_each_parallel<T, R, F>(items: Vec<T>, parallel: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(usize, T) -> R + Sync,
{
    let n = items.len();
    let slots: Vec<std::sync::Mutex<Option<T>>> = items.into_iter().map(|t| std::sync::Mutex::new(Some(t))).collect();
    let results: Vec<std::sync::Mutex<Option<R>>> = (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..parallel.clamp(1, n.max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = slots.get(i) else { break };
                    let item = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    if let Some(item) = item {
                        let r = f(i, item);
                        *results[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                    }
                }
            });
        }
    });
    // Every index below n was taken by exactly one worker, which stored its result.
    results.into_iter().filter_map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip() {
        let r = Report { code: 2, state: Some("AQAAAA\\x".into()), changes: Some("two\nlines\r".into()), error: None };
        assert_eq!(Report::decode(&r.encode()), Ok(r));
        assert_eq!(Report::decode("code=0\nend\n"), Ok(Report::default()));
    }

    #[test]
    fn bad_reports() {
        assert!(Report::decode("").is_err());
        assert!(Report::decode("code=0\n").is_err(), "cut off");
        assert!(Report::decode("end\n").is_err(), "no code");
        assert!(Report::decode("code=0\nerror=\\q\nend\n").is_err());
        assert!(Report::decode("code=0\nwho=me\nend\n").is_err());
        assert!(Report::decode("code=0\nend\ncode=1\n").is_err());
    }

    #[test]
    fn a_state_line_child_reports_as_doveadm_exits() {
        use std::os::unix::process::ExitStatusExt;
        let st = |code: i32| Some(ExitStatus::from_raw(code << 8));
        let r = state_line_report(st(0), "AQAAAA\n", String::new(), "exit status 0".into()).unwrap();
        assert_eq!((r.code, r.state.as_deref(), r.error), (0, Some("AQAAAA"), None));
        let r = state_line_report(st(2), "AQ\n", "Warning: changed".into(), "exit status 2".into()).unwrap();
        assert_eq!((r.code, r.state.as_deref()), (2, Some("AQ")));
        assert!(r.changes.is_some_and(|c| c.contains("changed")));
        let r = state_line_report(st(75), "junk\n", "Error: no route".into(), "exit status 75".into()).unwrap();
        assert_eq!((r.code, r.state), (75, None), "no state from a failed run");
        assert_eq!(r.error.as_deref(), Some("Error: no route (exit status 75)"));
        let killed = Some(ExitStatus::from_raw(9));
        assert!(state_line_report(killed, "", String::new(), "killed by signal 9".into()).is_err());
    }

    #[test]
    fn parallel_keeps_order() {
        let out = for_each_parallel((0..50).collect(), 4, |i, x: i32| {
            assert_eq!(i as i32, x);
            x * 2
        });
        assert_eq!(out, (0..50).map(|x| x * 2).collect::<Vec<_>>());
        assert!(for_each_parallel(Vec::<i32>::new(), 3, |_, x| x).is_empty());
    }
}
