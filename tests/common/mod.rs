//! The harness every integration test shares: throw-away Unix users, a sandboxed `doveadm`
//! (no Dovecot daemon, nothing outside the test's temporary directory), runners for our own
//! binary, and helpers that put what Dovecot shows next to what we show.
//!
//! ```text
//!   TestUser::new()                       useradd mrt<pid><n>, home in a fresh tempdir
//!     ├─ u.doveadm(&[...]) / u.dv_ok()     doveadm -c <tmp>/dovecot.conf ..., run as the user
//!     ├─ u.mr(&[...])      / u.mr_ok()     mailreplica -c <tmp>/mailreplica.toml -u USER ...
//!     ├─ u.view(Tool::X)                   mailboxes, subscriptions, status, uid/guid/flags
//!     ├─ u.view_at(Tool::X, Some(loc))     the same of another Maildir (`-o mail_location=`)
//!     ├─ u.assert_same_view()              both tools agree (panics with a diff otherwise)
//!     └─ u.dsync(master, args, Slave, loc) doveadm backup/sync into Dovecot's or our
//!                                          dsync-server, raw log decoded (see [`dsync`])
//!   drop(u)                                userdel, tempdir removed (also when the test failed)
//! ```
//!
//! Rules the harness keeps so that tests can run in parallel and leave nothing behind:
//! * Every test gets its own user, home and Dovecot `base_dir`; nothing touches the system's
//!   Dovecot configuration (doveadm always runs with `-c <tmp>/dovecot.conf`).
//! * Children never inherit the test's stdout/stderr (both are captured), their stdin is a
//!   pipe or `/dev/null`, and a child still running when its [`Proc`] is dropped is killed.
//! * Both tools run with `TZ=UTC`, so dates can be compared.
//! * Tests that need root or Dovecot panic with a message saying what is missing
//!   ([`require_root`], [`require_doveadm`]); nothing is ever skipped silently.
// Each test binary uses a different part of the harness, and the items are `pub` for them.
#![allow(dead_code, unreachable_pub)]

pub mod dsync;
pub mod rng;

#[allow(unused_imports)] // (not every test binary draws random numbers)
pub use rng::Rng;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Our binary, as cargo built it for this test run.
pub const MAILREPLICA: &str = env!("CARGO_BIN_EXE_mailreplica");

/// How long any single command may run before the harness kills it and fails the test.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// File that serializes `useradd`/`userdel` between concurrently running tests (and test
/// binaries): both take the passwd lock and fail instead of waiting when it is busy.
const PASSWD_LOCK: &str = "/tmp/mailreplica-tests.passwd.lock";

/// Panics unless the test runs as root, saying why root is needed.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test must run as root: it creates throw-away Unix users (useradd/userdel) and runs \
             doveadm and mailreplica as them. Run the suite with `sudo tests/run` (CI runs it as root)."
        );
    }
}

/// Panics unless the tools the harness needs are installed: Dovecot's `doveadm`, and
/// `useradd`/`userdel`. Returns the path of `doveadm`.
pub fn require_doveadm() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let doveadm = which("doveadm").ok_or_else(|| {
            "doveadm (Dovecot 2.3) is not installed: run `apt-get install -y dovecot-core dovecot-imapd` \
             (tests/run installs it when run as root)"
                .to_owned()
        })?;
        for tool in ["useradd", "userdel"] {
            if which(tool).is_none() {
                return Err(format!("{tool} is not installed (package `passwd`); the tests need it"));
            }
        }
        Ok(doveadm)
    });
    match found {
        Ok(p) => p.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True if `name` is an executable on the PATH (or in the sbin directories).
pub fn which_tool(name: &str) -> bool {
    which(name).is_some()
}

/// Both of [`require_root`] and [`require_doveadm`]: what nearly every interop test starts with.
pub fn require_root_and_doveadm() -> PathBuf {
    require_root();
    require_doveadm()
}

// ------------------------------------------------------------------------------------------
// Processes

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics (showing the command, its exit and stderr) unless it exited with 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }

    /// Panics unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "unexpected exit: {}", self.describe());
        self
    }

    /// Panics unless it exited with 0 and, for `tool`, said nothing alarming: no
    /// `Error:`/`Warning:`/`Panic:`/`Fatal:` line from Dovecot, an empty stderr from us.
    #[track_caller]
    pub fn ok_quiet(self, tool: Tool) -> Self {
        let out = self.ok();
        match tool {
            Tool::Dovecot => assert_quiet_dovecot(&out),
            Tool::Ours => assert!(out.stderr.is_empty(), "unexpected stderr from {}", out.describe()),
        }
        out
    }

    /// stdout as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Command, exit status, stdout and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        let status = match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown status".to_owned(),
        };
        let mut out = String::from_utf8_lossy(&self.stdout).into_owned();
        if out.len() > 4000 {
            out.truncate(4000);
            out.push_str("…(truncated)");
        }
        format!("`{}`: {status}\n--- stdout ---\n{out}\n--- stderr ---\n{}", self.cmd, self.stderr)
    }
}

/// A running child process with captured stdout/stderr; killed (SIGKILL) if still running
/// when dropped.
pub struct Proc {
    child: Child,
    cmd: String,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    stdin: Option<JoinHandle<()>>,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

impl Proc {
    /// Starts `cmd` with `stdin` as its input (`None` = `/dev/null`). stdout and stderr are
    /// always captured.
    pub fn spawn(mut cmd: Command, stdin: Option<Vec<u8>>) -> Self {
        let desc = describe_command(&cmd);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{desc}`: {e}"));
        let stdin = stdin.map(|data| {
            let mut w = child.stdin.take().expect("piped stdin");
            // A child that exits (or is killed) early makes this fail with EPIPE: fine.
            thread::spawn(move || {
                let _ = w.write_all(&data);
            })
        });
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Self { child, cmd: desc, stdout, stderr, stdin }
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// True once the child has exited (it is reaped then, so its pid is not signalled later).
    pub fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGKILL (no-op if it has already exited and been reaped).
    pub fn kill(&mut self) {
        if !self.finished() {
            let _ = self.child.kill();
        }
    }

    /// Waits for the child to exit; kills it and panics after `timeout`.
    pub fn wait_timeout(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        let mut pause = Duration::from_micros(100);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => panic!("waiting for `{}`: {e}", self.cmd),
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let out = self.collect(None);
                panic!("`{}` did not finish within {timeout:?}; killed it.\n{}", out.cmd, out.describe());
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        };
        self.collect(Some(status))
    }

    /// Waits with [`COMMAND_TIMEOUT`].
    pub fn wait(self) -> Output {
        self.wait_timeout(COMMAND_TIMEOUT)
    }

    fn collect(&mut self, status: Option<std::process::ExitStatus>) -> Output {
        if let Some(h) = self.stdin.take() {
            let _ = h.join();
        }
        let stdout = self.stdout.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Output {
            cmd: self.cmd.clone(),
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\\', '*', '\'']) {
            let _ = write!(s, "'{a}'");
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs a command to completion (stdin from `stdin`, or `/dev/null`).
pub fn run(cmd: Command, stdin: Option<&[u8]>) -> Output {
    Proc::spawn(cmd, stdin.map(<[u8]>::to_vec)).wait()
}

// ------------------------------------------------------------------------------------------
// Users

/// Which tool to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Dovecot's `doveadm`.
    Dovecot,
    /// Our `mailreplica`.
    Ours,
}

/// A throw-away Unix user with its own home, Maildir location, doveadm sandbox and our
/// configuration file. `userdel` runs on drop, also when the test panicked.
pub struct TestUser {
    /// Login name (`mrt<pid><n>`).
    pub name: String,
    /// UID.
    pub uid: u32,
    /// Primary GID.
    pub gid: u32,
    /// Home directory (inside [`TestUser::tmp`]).
    pub home: PathBuf,
    /// `mail_location` used by both tools.
    pub location: String,
    doveadm: PathBuf,
    dovecot_conf: PathBuf,
    our_conf: PathBuf,
    tmp: tempfile::TempDir,
}

fn passwd_lock() -> nix::fcntl::Flock<File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PASSWD_LOCK)
        .unwrap_or_else(|e| panic!("opening {PASSWD_LOCK}: {e}"));
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {PASSWD_LOCK}: {e}"))
}

/// Runs useradd/userdel under our lock, retrying while the system's passwd lock is busy
/// (another test binary, or a package manager). Returns the last output.
fn passwd_tool(args: &[&str]) -> Output {
    let mut last = None;
    for attempt in 0..40 {
        let out = {
            let _lock = passwd_lock();
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            run(c, None)
        };
        // useradd/userdel: 1 = can't update passwd, 10 = can't update group (lock busy).
        if out.success() || !matches!(out.code, Some(1) | Some(10)) {
            return out;
        }
        last = Some(out);
        thread::sleep(Duration::from_millis(50 * (attempt + 1).min(10)));
    }
    last.expect("at least one attempt")
}

static USER_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestUser {
    /// A user whose mail lives in `~/Maildir` (Maildir++ layout, Dovecot's default).
    pub fn new() -> Self {
        Self::with_location("maildir:~/Maildir")
    }

    /// A user with the given `mail_location` (same syntax for both tools), e.g.
    /// `maildir:~/Maildir:LAYOUT=fs`.
    pub fn with_location(location: &str) -> Self {
        let doveadm = require_root_and_doveadm();
        let n = USER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mrt{}{}", std::process::id(), n);
        let tmp = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir().expect("tempdir");
        // The user must be able to reach its home (and doveadm its base_dir) through it.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
        let home = tmp.path().join("home");
        let home_s = home.to_str().expect("UTF-8 temp path");
        let useradd = [
            "useradd",
            "--no-create-home",
            "--home-dir",
            home_s,
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            &name,
        ];
        let mut out = passwd_tool(&useradd);
        if out.code == Some(9) {
            // Left over from an earlier run that was killed with this very pid: take it back.
            passwd_tool(&["userdel", "--force", &name]);
            out = passwd_tool(&useradd);
        }
        assert!(out.success(), "useradd failed: {}", out.describe());
        let user = nix::unistd::User::from_name(&name).expect("getpwnam").expect("the new user exists");
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        // From here on, Drop deletes the user.
        let mut u = Self {
            name,
            uid,
            gid,
            home: home.clone(),
            location: location.to_owned(),
            doveadm,
            dovecot_conf: tmp.path().join("dovecot.conf"),
            our_conf: tmp.path().join("mailreplica.toml"),
            tmp,
        };
        fs::create_dir(&home).expect("mkdir home");
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        nix::unistd::chown(&home, Some(user.uid), Some(user.gid)).expect("chown home");
        let run_dir = u.tmp.path().join("run");
        fs::create_dir(&run_dir).expect("mkdir run");
        nix::unistd::chown(&run_dir, Some(user.uid), Some(user.gid)).expect("chown run");
        u.set_location(location);
        u
    }

    /// Changes the `mail_location` of both tools.
    pub fn set_location(&mut self, location: &str) {
        self.location = location.to_owned();
        let conf = format!(
            "# doveadm sandbox of a mailreplica test: no daemon, nothing outside this directory\n\
             protocols =\n\
             ssl = no\n\
             base_dir = {run}\n\
             log_path = /dev/stderr\n\
             mail_location = {location}\n\
             first_valid_uid = 100\n\
             namespace inbox {{\n  inbox = yes\n}}\n",
            run = self.tmp.path().join("run").display()
        );
        fs::write(&self.dovecot_conf, conf).expect("write dovecot.conf");
        let ours = format!("mail_location = \"{location}\"\nfirst_valid_uid = 100\n");
        fs::write(&self.our_conf, ours).expect("write mailreplica.toml");
    }

    /// The test's private temporary directory (the home is `tmp()/home`).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// The Maildir root (`~/Maildir`).
    pub fn maildir(&self) -> PathBuf {
        self.home.join("Maildir")
    }

    /// The hierarchy separator of the location's layout.
    pub fn separator(&self) -> char {
        if self.location.to_ascii_uppercase().contains(":LAYOUT=FS") { '/' } else { '.' }
    }

    /// Our configuration file (`-c`).
    pub fn our_conf(&self) -> &Path {
        &self.our_conf
    }

    /// The doveadm sandbox configuration file (`-c`).
    pub fn dovecot_conf(&self) -> &Path {
        &self.dovecot_conf
    }

    fn base_env(cmd: &mut Command) {
        cmd.env_clear().env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").env("TZ", "UTC");
        cmd.env("LANG", "C.UTF-8");
    }

    /// `doveadm -c <sandbox> ARGS`, run as the user, not yet started.
    pub fn doveadm_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.doveadm);
        Self::base_env(&mut c);
        c.env("USER", &self.name).env("HOME", &self.home);
        c.current_dir(&self.home).uid(self.uid).gid(self.gid);
        c.arg("-c").arg(&self.dovecot_conf).args(args);
        c
    }

    /// `mailreplica -c <conf> -u USER ARGS`, started as root (it drops to the user itself),
    /// not yet started.
    pub fn mr_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(MAILREPLICA);
        Self::base_env(&mut c);
        c.env("HOME", "/root").env("USER", "root").current_dir(self.tmp.path());
        c.arg("-c").arg(&self.our_conf).arg("-u").arg(&self.name).args(args);
        // For debugging a test: MAILREPLICA_LOG=debug shows our log in its output.
        if let Some(v) = std::env::var_os("MAILREPLICA_LOG") {
            c.env("MAILREPLICA_LOG", v);
        }
        c
    }

    /// `mailreplica ARGS` exactly as given (no `-c`/`-u` added), started as root with the
    /// same clean environment, not yet started. For tests of the command line itself.
    pub fn mr_raw_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(MAILREPLICA);
        Self::base_env(&mut c);
        c.env("HOME", "/root").env("USER", "root").current_dir(self.tmp.path());
        c.args(args);
        c
    }

    /// The command for `tool`.
    pub fn cmd<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S]) -> Command {
        match tool {
            Tool::Dovecot => self.doveadm_cmd(args),
            Tool::Ours => self.mr_cmd(args),
        }
    }

    /// Runs doveadm.
    pub fn doveadm<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        run(self.doveadm_cmd(args), None)
    }

    /// Runs doveadm with `stdin`.
    pub fn doveadm_in<S: AsRef<OsStr>>(&self, args: &[S], stdin: &[u8]) -> Output {
        run(self.doveadm_cmd(args), Some(stdin))
    }

    /// Runs our binary.
    pub fn mr<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        run(self.mr_cmd(args), None)
    }

    /// Runs our binary with `stdin`.
    pub fn mr_in<S: AsRef<OsStr>>(&self, args: &[S], stdin: &[u8]) -> Output {
        run(self.mr_cmd(args), Some(stdin))
    }

    /// Runs `tool`.
    pub fn run<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S]) -> Output {
        run(self.cmd(tool, args), None)
    }

    /// Runs `tool` with `stdin`.
    pub fn run_in<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S], stdin: &[u8]) -> Output {
        run(self.cmd(tool, args), Some(stdin))
    }

    /// Runs doveadm, asserts success and that Dovecot complained about nothing (no
    /// `Error:`/`Warning:`/`Panic:`/`Fatal:` log lines: those mean it found something it had
    /// to repair). Returns stdout as text.
    #[track_caller]
    pub fn dv_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.doveadm(args).ok();
        assert_quiet_dovecot(&out);
        out.text()
    }

    /// Like [`TestUser::dv_ok`] with `stdin`.
    #[track_caller]
    pub fn dv_ok_in<S: AsRef<OsStr>>(&self, args: &[S], stdin: &[u8]) -> String {
        let out = self.doveadm_in(args, stdin).ok();
        assert_quiet_dovecot(&out);
        out.text()
    }

    /// Runs our binary and asserts success and an empty stderr. Returns stdout as text.
    #[track_caller]
    pub fn mr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.mr(args).ok();
        assert!(out.stderr.is_empty(), "unexpected stderr from {}", out.describe());
        out.text()
    }

    /// Like [`TestUser::mr_ok`] with `stdin`.
    #[track_caller]
    pub fn mr_ok_in<S: AsRef<OsStr>>(&self, args: &[S], stdin: &[u8]) -> String {
        let out = self.mr_in(args, stdin).ok();
        assert!(out.stderr.is_empty(), "unexpected stderr from {}", out.describe());
        out.text()
    }

    /// Runs `tool`, asserting success and a quiet stderr.
    #[track_caller]
    pub fn ok<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S]) -> String {
        match tool {
            Tool::Dovecot => self.dv_ok(args),
            Tool::Ours => self.mr_ok(args),
        }
    }

    /// Runs `tool` with `stdin`, asserting success and a quiet stderr.
    #[track_caller]
    pub fn ok_in<S: AsRef<OsStr>>(&self, tool: Tool, args: &[S], stdin: &[u8]) -> String {
        match tool {
            Tool::Dovecot => self.dv_ok_in(args, stdin),
            Tool::Ours => self.mr_ok_in(args, stdin),
        }
    }

    /// Saves a mail into `mailbox` with `tool` (asserting success).
    #[track_caller]
    pub fn save(&self, tool: Tool, mailbox: &str, mail: &[u8]) {
        self.ok_in(tool, &["save", "-m", mailbox], mail);
    }

    /// Makes a path inside the home belong to the user (for files a test wrote as root).
    pub fn chown(&self, path: &Path) {
        let (u, g) = (nix::unistd::Uid::from_raw(self.uid), nix::unistd::Gid::from_raw(self.gid));
        nix::unistd::chown(path, Some(u), Some(g)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    /// Writes a file as the user would have (owner and mode 0600).
    pub fn write_file(&self, path: &Path, data: &[u8]) {
        fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
        self.chown(path);
    }

    // --------------------------------------------------------------------------------------
    // What a tool shows

    /// `tool ARGS` run on the Maildir at `location` (`-o mail_location=LOCATION`; the
    /// configured location when `None`), asserting success and a quiet stderr.
    #[track_caller]
    pub fn ok_at<S: AsRef<OsStr>>(&self, tool: Tool, location: Option<&str>, args: &[S]) -> String {
        self.run_at(tool, location, args).ok_quiet(tool).text()
    }

    /// `tool ARGS` run on the Maildir at `location` (see [`TestUser::ok_at`]).
    pub fn run_at<S: AsRef<OsStr>>(&self, tool: Tool, location: Option<&str>, args: &[S]) -> Output {
        let mut all: Vec<std::ffi::OsString> = Vec::new();
        if let Some(loc) = location {
            all.push("-o".into());
            all.push(format!("mail_location={loc}").into());
        }
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.run(tool, &all)
    }

    /// Mailbox names `mailbox list` prints, sorted (doveadm prints them in readdir order).
    #[track_caller]
    pub fn mailbox_list(&self, tool: Tool) -> Vec<String> {
        self.mailbox_list_at(tool, None)
    }

    /// [`TestUser::mailbox_list`] of the Maildir at `location`.
    #[track_caller]
    pub fn mailbox_list_at(&self, tool: Tool, location: Option<&str>) -> Vec<String> {
        sorted_lines(&self.ok_at(tool, location, &["mailbox", "list"]))
    }

    /// Subscribed names (`mailbox list -s`), sorted.
    #[track_caller]
    pub fn subscriptions(&self, tool: Tool) -> Vec<String> {
        self.subscriptions_at(tool, None)
    }

    /// [`TestUser::subscriptions`] of the Maildir at `location`.
    #[track_caller]
    pub fn subscriptions_at(&self, tool: Tool, location: Option<&str>) -> Vec<String> {
        sorted_lines(&self.ok_at(tool, location, &["mailbox", "list", "-s"]))
    }

    /// `mailbox status 'messages uidnext uidvalidity unseen guid' '*'`: one row per
    /// selectable mailbox, by name (columns in doveadm's order, which is fixed).
    #[track_caller]
    pub fn status_all(&self, tool: Tool) -> BTreeMap<String, Vec<String>> {
        self.status_all_at(tool, None)
    }

    /// [`TestUser::status_all`] of the Maildir at `location`.
    #[track_caller]
    pub fn status_all_at(&self, tool: Tool, location: Option<&str>) -> BTreeMap<String, Vec<String>> {
        let args = ["-f", "tab", "mailbox", "status", "messages uidnext uidvalidity unseen guid", "*"];
        let t = self.ok_at(tool, location, &args);
        let rows = parse_tab(&t, &["mailbox", "messages", "uidnext", "uidvalidity", "unseen", "guid"]);
        rows.into_iter().map(|mut r| (r.remove(0), r)).collect()
    }

    /// `fetch 'uid guid flags' mailbox NAME all` with `\Recent` removed from the flags.
    #[track_caller]
    pub fn mails(&self, tool: Tool, mailbox: &str) -> Vec<[String; 3]> {
        self.mails_at(tool, None, mailbox)
    }

    /// [`TestUser::mails`] of the Maildir at `location`.
    #[track_caller]
    pub fn mails_at(&self, tool: Tool, location: Option<&str>, mailbox: &str) -> Vec<[String; 3]> {
        let t = self.ok_at(tool, location, &["-f", "tab", "fetch", "uid guid flags", "mailbox", mailbox, "all"]);
        parse_tab(&t, &["uid", "guid", "flags"])
            .into_iter()
            .map(|r| [r[0].clone(), r[1].clone(), normalize_flags(&r[2])])
            .collect()
    }

    /// Everything [`View`] holds, as `tool` shows it.
    #[track_caller]
    pub fn view(&self, tool: Tool) -> View {
        self.view_at(tool, None)
    }

    /// [`TestUser::view`] of the Maildir at `location`.
    #[track_caller]
    pub fn view_at(&self, tool: Tool, location: Option<&str>) -> View {
        let status = self.status_all_at(tool, location);
        let mails = status.keys().map(|m| (m.clone(), self.mails_at(tool, location, m))).collect();
        View {
            mailboxes: self.mailbox_list_at(tool, location),
            subscriptions: self.subscriptions_at(tool, location),
            status,
            mails,
        }
    }

    /// Asserts that Dovecot and we show the same [`View`], and returns it. Dovecot is asked
    /// first, so that a Dovecot sync (which may assign UIDs) happens before we look; use
    /// [`TestUser::assert_same_view_ours_first`] for the other order.
    #[track_caller]
    pub fn assert_same_view(&self) -> View {
        let dv = self.view(Tool::Dovecot);
        let ours = self.view(Tool::Ours);
        assert_views_equal(&dv, &ours);
        dv
    }

    /// Like [`TestUser::assert_same_view`], asking us first.
    #[track_caller]
    pub fn assert_same_view_ours_first(&self) -> View {
        let ours = self.view(Tool::Ours);
        let dv = self.view(Tool::Dovecot);
        assert_views_equal(&dv, &ours);
        dv
    }

    /// The full text (`fetch text`) of one mail, byte for byte.
    #[track_caller]
    pub fn body(&self, tool: Tool, mailbox: &str, uid: &str) -> Vec<u8> {
        self.body_at(tool, None, mailbox, uid)
    }

    /// [`TestUser::body`] from the Maildir at `location`.
    #[track_caller]
    pub fn body_at(&self, tool: Tool, location: Option<&str>, mailbox: &str, uid: &str) -> Vec<u8> {
        let out = self.run_at(tool, location, &["-f", "tab", "fetch", "text", "mailbox", mailbox, "uid", uid]).ok();
        // tab format of a single stream column: a "text" title line, the stream, then LF.
        let b = out.stdout;
        assert!(b.starts_with(b"text\n") && b.ends_with(b"\n"), "odd fetch text output: {b:?}");
        b[5..b.len() - 1].to_vec()
    }

    /// Asserts that both tools return the same bytes for every mail of `mailbox`, and the
    /// same `size.physical`, `size.virtual` and `date.received`.
    #[track_caller]
    pub fn assert_same_bodies(&self, mailbox: &str) {
        for [uid, _, _] in self.mails(Tool::Dovecot, mailbox) {
            let a = self.body(Tool::Dovecot, mailbox, &uid);
            let b = self.body(Tool::Ours, mailbox, &uid);
            assert!(a == b, "{mailbox} UID {uid}: Dovecot shows {a:?}\nwe show {b:?}");
        }
        let fields = "uid size.physical size.virtual date.received";
        let a = self.ok(Tool::Dovecot, &["-f", "tab", "fetch", fields, "mailbox", mailbox, "all"]);
        let b = self.ok(Tool::Ours, &["-f", "tab", "fetch", fields, "mailbox", mailbox, "all"]);
        assert_eq!(a, b, "{mailbox}: sizes/dates differ (left Dovecot, right ours)");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let out = passwd_tool(&["userdel", &self.name]);
        if !out.success() {
            // Never panic in drop (it would abort a failing test's report); say it loudly.
            eprintln!("warning: could not delete test user {}: {}", self.name, out.describe());
        }
    }
}

/// Asserts that doveadm's stderr has no log line that means it found (and repaired)
/// something.
#[track_caller]
pub fn assert_quiet_dovecot(out: &Output) {
    for bad in ["Error:", "Warning:", "Panic:", "Fatal:"] {
        assert!(!out.stderr.contains(bad), "Dovecot complained: {}", out.describe());
    }
}

// ------------------------------------------------------------------------------------------
// Comparisons

/// One tool's view of a user's mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// `mailbox list`, sorted.
    pub mailboxes: Vec<String>,
    /// `mailbox list -s`, sorted.
    pub subscriptions: Vec<String>,
    /// Mailbox → [messages, uidnext, uidvalidity, unseen, guid].
    pub status: BTreeMap<String, Vec<String>>,
    /// Mailbox → [uid, guid, flags without `\Recent`] per mail.
    pub mails: BTreeMap<String, Vec<[String; 3]>>,
}

impl View {
    /// The mails of `mailbox` (panics if it is not a mailbox).
    #[track_caller]
    pub fn mails_of(&self, mailbox: &str) -> &[[String; 3]] {
        self.mails.get(mailbox).unwrap_or_else(|| panic!("no mailbox {mailbox} in {:?}", self.status.keys()))
    }
}

/// Panics with a readable diff unless the two views are equal.
#[track_caller]
pub fn assert_views_equal(dovecot: &View, ours: &View) {
    if let Some(diff) = views_diff(dovecot, ours) {
        panic!("Dovecot and mailreplica disagree:\n{diff}");
    }
}

/// A readable diff of two views (labelled `Dovecot` and `ours`), `None` if they are equal.
pub fn views_diff(dovecot: &View, ours: &View) -> Option<String> {
    if dovecot == ours {
        return None;
    }
    let mut msg = String::new();
    if dovecot.mailboxes != ours.mailboxes {
        let _ =
            writeln!(msg, "mailbox list: Dovecot {:?}\n              ours    {:?}", dovecot.mailboxes, ours.mailboxes);
    }
    if dovecot.subscriptions != ours.subscriptions {
        let _ = writeln!(
            msg,
            "subscriptions: Dovecot {:?}\n               ours    {:?}",
            dovecot.subscriptions, ours.subscriptions
        );
    }
    let names: std::collections::BTreeSet<&String> = dovecot.status.keys().chain(ours.status.keys()).collect();
    for n in names {
        let (a, b) = (dovecot.status.get(n), ours.status.get(n));
        if a != b {
            let _ =
                writeln!(msg, "status of {n} [messages uidnext uidvalidity unseen guid]: Dovecot {a:?}, ours {b:?}");
        }
        let (a, b) = (dovecot.mails.get(n), ours.mails.get(n));
        if a != b {
            let _ = writeln!(msg, "mails of {n} [uid guid flags]:\n  Dovecot {a:#?}\n  ours    {b:#?}");
        }
    }
    Some(msg)
}

/// Flags as printed, made comparable: without `\Recent` (a session property the two tools
/// count differently) and with the keywords sorted. System flags keep their order (both tools
/// print them in the same fixed order); keywords do not: we print them in `dovecot-keywords`
/// letter order, Dovecot in the order its index first learned them, which depends on the
/// index's history, not on the files.
pub fn normalize_flags(flags: &str) -> String {
    let all: Vec<&str> = flags.split(' ').filter(|f| !f.is_empty() && *f != "\\Recent").collect();
    let (mut system, mut keywords): (Vec<&str>, Vec<&str>) = all.into_iter().partition(|f| f.starts_with('\\'));
    keywords.sort_unstable();
    system.append(&mut keywords);
    system.join(" ")
}

/// Parses `-f tab` output: checks the title line and returns the rows.
#[track_caller]
pub fn parse_tab(text: &str, titles: &[&str]) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    assert_eq!(head, titles.join("\t"), "unexpected tab header in {text:?}");
    lines
        .map(|l| {
            let r: Vec<String> = l.split('\t').map(str::to_owned).collect();
            assert_eq!(r.len(), titles.len(), "bad tab row {l:?} in {text:?}");
            r
        })
        .collect()
}

/// The non-empty lines of `text`, sorted.
pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    v.sort();
    v
}

/// A [`tree_snapshot`] or [`mail_snapshot`].
pub type Snapshot = BTreeMap<PathBuf, (String, Vec<u8>)>;

/// Every file and directory under `root` with its type, size, mode, mtime and (for files)
/// contents: two snapshots are equal only if nothing under `root` changed.
pub fn tree_snapshot(root: &Path) -> Snapshot {
    snapshot(root, false)
}

/// Like [`tree_snapshot`], but leaves out our own `mailreplica-index` files and directory
/// mtimes: equal snapshots mean that no mail and no Dovecot file changed, although our
/// rebuildable index may have been refreshed.
pub fn mail_snapshot(root: &Path) -> Snapshot {
    snapshot(root, true)
}

fn snapshot(root: &Path, skip_ours: bool) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        if skip_ours && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("mailreplica-index")) {
            continue;
        }
        let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
        let mtime = if skip_ours && meta.is_dir() { (0, 0) } else { (meta.mtime(), meta.mtime_nsec()) };
        let desc = format!(
            "{} size={} mode={:o} mtime={}.{:09}",
            if meta.is_dir() { "dir" } else { "file" },
            if meta.is_dir() { 0 } else { meta.size() },
            meta.mode(),
            mtime.0,
            mtime.1
        );
        let data = if meta.is_file() { fs::read(&p).unwrap_or_else(|e| format!("<{e}>").into_bytes()) } else { vec![] };
        out.insert(rel, (desc, data));
        if meta.is_dir()
            && let Ok(rd) = fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    out
}

/// Panics, naming the differences, unless `root` still matches the [`tree_snapshot`] `before`.
#[track_caller]
pub fn assert_tree_unchanged(before: &Snapshot, root: &Path, what: &str) {
    assert_snapshot_unchanged(before, &tree_snapshot(root), root, what);
}

/// Panics, naming the differences, unless `root` still matches the [`mail_snapshot`] `before`.
#[track_caller]
pub fn assert_mail_unchanged(before: &Snapshot, root: &Path, what: &str) {
    assert_snapshot_unchanged(before, &mail_snapshot(root), root, what);
}

#[track_caller]
fn assert_snapshot_unchanged(before: &Snapshot, after: &Snapshot, root: &Path, what: &str) {
    if before == after {
        return;
    }
    let mut msg = format!("{what} changed files under {}:\n", root.display());
    for (k, v) in before {
        match after.get(k) {
            None => {
                let _ = writeln!(msg, "  removed {}", k.display());
            }
            Some(w) if w != v => {
                let _ = writeln!(msg, "  changed {}: {} -> {}", k.display(), v.0, w.0);
            }
            _ => {}
        }
    }
    for k in after.keys().filter(|k| !before.contains_key(*k)) {
        let _ = writeln!(msg, "  added   {}", k.display());
    }
    panic!("{msg}");
}

/// Parses a `dovecot-uidlist` strictly (as Dovecot's reader does): header `3 …`, records with
/// strictly ascending UIDs and distinct base names. Returns (header, [(uid, base name)]);
/// panics naming the problem otherwise.
#[track_caller]
pub fn read_uidlist(path: &Path) -> (String, Vec<(u32, String)>) {
    let data = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(data.ends_with('\n'), "{} does not end with a complete line: {data:?}", path.display());
    let mut lines = data.lines();
    let header = lines.next().unwrap_or_default().to_owned();
    assert!(header.starts_with("3 "), "{}: bad header {header:?}", path.display());
    let mut out: Vec<(u32, String)> = Vec::new();
    let mut bases = std::collections::HashSet::new();
    for l in lines {
        let (uid, rest) = l.split_once(' ').unwrap_or_else(|| panic!("{}: bad line {l:?}", path.display()));
        let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("{}: bad UID in {l:?}", path.display()));
        let (_, name) = rest.rsplit_once(':').unwrap_or_else(|| panic!("{}: no file name in {l:?}", path.display()));
        if let Some((last, _)) = out.last() {
            assert!(uid > *last, "{}: UIDs not ascending ({last} then {uid})\n{data}", path.display());
        }
        assert!(bases.insert(name.to_owned()), "{}: {name} listed twice\n{data}", path.display());
        out.push((uid, name.to_owned()));
    }
    (header, out)
}

/// A small RFC 5322 mail whose subject and body carry `marker` (unique per mail in a test).
pub fn mail(marker: &str) -> Vec<u8> {
    format!(
        "From: sender@example.org\nTo: rcpt@example.org\nSubject: {marker}\nMessage-ID: <{marker}@test>\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\n\nbody of {marker}\n"
    )
    .into_bytes()
}
