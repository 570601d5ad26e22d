//! Helpers for the wrapper's root-only integration tests: a root-owned sandbox directory, real
//! users made by `useradd` (serialized with an flock, deleted on drop, stale ones from killed
//! runs swept), running the wrapper binary with a clean environment and captured output, a
//! scripted dsync master ([`MasterSession`], built with the project's own wire encoder) and a
//! live view of a served process's output ([`Live`]).
//!
//! Kept inside the wrapper's tests for now; `tests/common/mod.rs` is being written in a
//! parallel branch and this can move there once both are merged.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mailreplica::dsync::wire::{
    Decoder, Deletion, Encoder, Event, Existence, Guid128, Handshake, HierarchySep, MailboxDeletes, MailboxNode,
    MailboxPath, Record, SyncType, Text,
};

/// The wrapper binary: Cargo's path for integration tests; the release build for the example
/// benchmark, which includes this module too.
pub const WRAPPER: &str = match option_env!("CARGO_BIN_EXE_mailreplica-wrapper") {
    Some(p) => p,
    None => concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/mailreplica-wrapper"),
};
pub const DENIED: &str = "mailreplica-wrapper: access denied\n";
/// Where sandboxes live: under /run, root-owned 0755 all the way up, as the wrapper's
/// StrictModes-like checks demand (/tmp is world-writable and would be refused).
const BASE: &str = "/run/mailreplica-wrapper-tests";
const USERADD_LOCK: &str = "/run/mailreplica-wrapper-tests.useradd.lock";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics unless the tests run as root (they create users and run a root-owned forced command).
pub fn require_root() {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    assert_eq!(uid, 0, "the wrapper tests must run as root (they create users with useradd); run tests/run as root");
    for tool in ["/usr/sbin/useradd", "/usr/sbin/userdel", "/usr/sbin/groupadd", "/usr/sbin/groupdel"] {
        assert!(Path::new(tool).exists(), "{tool} is missing (package passwd)");
    }
}

fn unique() -> String {
    format!("{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shadow tool (useradd, groupadd) under our lock, retrying while /etc/passwd or
/// /etc/group is locked by someone our lock does not cover (another project's tests, a package
/// manager): the tools exit with 1 or 10 then instead of waiting.
fn passwd_tool_ok(cmd: &mut Command) -> String {
    for attempt in 0u64..40 {
        let out = {
            let _l = passwd_lock();
            cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
        };
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let busy = matches!(out.status.code(), Some(1) | Some(10));
        assert!(busy && attempt < 39, "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(50 * (attempt + 1).min(10)));
    }
    unreachable!("the loop returns or panics")
}

/// The same for clean-up (userdel, groupdel): retried while the databases are locked, any
/// other outcome accepted (e.g. already gone).
fn passwd_tool_cleanup(args: &[&str]) {
    for attempt in 0u64..40 {
        let out = {
            let _l = passwd_lock();
            Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output()
        };
        match out {
            Ok(o) if matches!(o.status.code(), Some(1) | Some(10)) => {
                std::thread::sleep(Duration::from_millis(50 * (attempt + 1).min(10)));
            }
            _ => return,
        }
    }
}

/// Holds the useradd lock: shadow's tools fail rather than wait when another one has
/// /etc/passwd locked, and tests run in parallel threads and binaries.
fn passwd_lock() -> File {
    let f = fs::OpenOptions::new().create(true).append(true).open(USERADD_LOCK).expect("useradd lock file");
    f.lock().expect("flock useradd lock");
    f
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes users, groups and sandboxes left behind by test processes that were killed.
fn sweep_stale() {
    let _l = passwd_lock();
    for (db, del) in [("/etc/passwd", "userdel -f"), ("/etc/group", "groupdel")] {
        let text = fs::read_to_string(db).unwrap_or_default();
        for line in text.lines() {
            let name = line.split(':').next().unwrap_or("");
            let Some(rest) = name.strip_prefix("mrw") else { continue };
            let Some((pid, _)) = rest.split_once('x') else { continue };
            if let Ok(pid) = pid.parse::<u32>()
                && !pid_alive(pid)
            {
                let mut words = del.split(' ');
                let prog = words.next().unwrap_or(del);
                let _ = Command::new(prog).args(words).arg(name).stdin(Stdio::null()).output();
            }
        }
    }
    if let Ok(rd) = fs::read_dir(BASE) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some((pid, _)) = n.split_once('x')
                && pid.parse::<u32>().is_ok_and(|p| !pid_alive(p))
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A root-owned 0755 directory for one test: policy, auth log, lock dir, homes.
pub struct Sandbox {
    pub dir: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        require_root();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_stale);
        fs::create_dir_all(BASE).expect("create test base");
        fs::set_permissions(BASE, fs::Permissions::from_mode(0o755)).expect("chmod base");
        let dir = PathBuf::from(BASE).join(unique());
        fs::create_dir(&dir).expect("create sandbox");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod sandbox");
        fs::create_dir(dir.join("home")).expect("homes");
        fs::set_permissions(dir.join("home"), fs::Permissions::from_mode(0o755)).expect("chmod homes");
        Self { dir }
    }

    pub fn policy(&self) -> PathBuf {
        self.dir.join("wrapper.toml")
    }

    pub fn auth_log(&self) -> PathBuf {
        self.dir.join("auth.log")
    }

    /// Writes the policy (root-owned, 0644), with `lock_dir` in the sandbox prepended.
    pub fn write_policy(&self, body: &str) {
        let text = format!("lock_dir = \"{}\"\nlock_wait_secs = 2\n\n{body}", self.dir.join("locks").display());
        fs::write(self.policy(), text).expect("write policy");
        fs::set_permissions(self.policy(), fs::Permissions::from_mode(0o644)).expect("chmod policy");
    }

    /// The standard arguments: `--peer PEER --policy … --auth-log …`.
    pub fn args(&self, peer: &str) -> Vec<String> {
        vec![
            "--peer".into(),
            peer.into(),
            "--policy".into(),
            self.policy().display().to_string(),
            "--auth-log".into(),
            self.auth_log().display().to_string(),
        ]
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.auth_log()).unwrap_or_default()
    }

    /// The auth-log line of process `pid`, if written.
    pub fn log_line(&self, pid: u32) -> Option<String> {
        let tag = format!("mailreplica-wrapper[{pid}]: ");
        self.log_text().lines().find(|l| l.contains(&tag)).map(str::to_owned)
    }

    /// Waits up to 12 s for the `accept` line of `pid`.
    pub fn wait_accept(&self, pid: u32) -> String {
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            if let Some(l) = self.log_line(pid) {
                assert!(l.contains(": accept "), "pid {pid} was not accepted: {l}");
                return l;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no auth-log line for pid {pid}; log:\n{}", self.log_text());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// How to make a test user.
#[derive(Default)]
pub struct UserSpec {
    /// `-r`: a system account (uid below 1000).
    pub system: bool,
    /// `-o -u UID`: a duplicate uid (e.g. 0).
    pub dup_uid: Option<u32>,
    /// `-g GID`: primary group.
    pub gid: Option<u32>,
    /// `-G a,b`: supplementary groups.
    pub groups: Vec<String>,
    /// Do not create the home directory.
    pub no_home: bool,
}

/// A real user, deleted (with its own group) on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    pub fn new(sb: &Sandbox) -> Self {
        Self::with(sb, UserSpec::default())
    }

    pub fn with(sb: &Sandbox, spec: UserSpec) -> Self {
        let name = format!("mrw{}", unique());
        let home = sb.dir.join("home").join(&name);
        let mut cmd = Command::new("useradd");
        cmd.args(["-s", "/usr/sbin/nologin", "-d"]).arg(&home);
        if spec.system {
            cmd.arg("-r");
        }
        if let Some(u) = spec.dup_uid {
            cmd.args(["-o", "-u", &u.to_string()]);
        }
        if let Some(g) = spec.gid {
            cmd.args(["-g", &g.to_string()]);
        } else {
            cmd.arg("-U");
        }
        if !spec.groups.is_empty() {
            cmd.args(["-G", &spec.groups.join(",")]);
        }
        cmd.arg("-M").arg(&name);
        passwd_tool_ok(&mut cmd);
        let ent = run_ok(Command::new("getent").args(["passwd", &name]));
        let f: Vec<&str> = ent.trim().split(':').collect();
        let (uid, gid) = (f[2].parse().expect("uid"), f[3].parse().expect("gid"));
        let user = Self { name, uid, gid, home };
        if !spec.no_home {
            fs::create_dir(&user.home).expect("create home");
            chown(&user.home, uid, gid);
            fs::set_permissions(&user.home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        }
        user
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // -f: userdel refuses a uid-0 alias otherwise (uid 0 "is logged in"). Without -r it
        // removes no files.
        passwd_tool_cleanup(&["userdel", "-f", &self.name]);
        // `useradd -U` made a group of the same name; userdel removes it unless shared.
        passwd_tool_cleanup(&["groupdel", &self.name]);
    }
}

/// A real group, deleted on drop.
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn new() -> Self {
        let name = format!("mrw{}", unique());
        passwd_tool_ok(Command::new("groupadd").arg(&name));
        let ent = run_ok(Command::new("getent").args(["group", &name]));
        let gid = ent.trim().split(':').nth(2).expect("gid field").parse().expect("gid");
        Self { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        passwd_tool_cleanup(&["groupdel", &self.name]);
    }
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
}

/// The environment sshd gives a forced command (no test-harness variables: cargo sets
/// LD_LIBRARY_PATH, which the wrapper rightly refuses).
pub fn sshd_env() -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("HOME".into(), "/root".into()),
        ("SHELL".into(), "/bin/bash".into()),
        ("SSH_CONNECTION".into(), "127.0.0.1 40000 127.0.0.1 22".into()),
        ("SSH_CLIENT".into(), "127.0.0.1 40000 22".into()),
    ]
}

/// Starts the wrapper with `args` and exactly `env`, all three std streams piped.
pub fn spawn(args: &[String], env: &[(String, String)]) -> Child {
    Command::new(WRAPPER)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wrapper")
}

/// A finished run.
pub struct Run {
    pub pid: u32,
    pub out: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn status(&self) -> ExitStatus {
        self.out.status
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

/// Runs the wrapper, writes `input` in one write, closes stdin, waits.
pub fn run(args: &[String], env: &[(String, String)], input: &[u8]) -> Run {
    let start = Instant::now();
    let mut child = spawn(args, env);
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    // A refused peer may see EPIPE: the wrapper stops reading at the cap.
    let _ = stdin.write_all(input);
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    Run { pid, out, elapsed: start.elapsed() }
}

/// Asserts the uniform refusal and that the auth log has the reason for this pid.
pub fn assert_refused(sb: &Sandbox, r: &Run, reason: &str) {
    assert_eq!(r.status().code(), Some(126), "exit status; stderr: {}", r.stderr());
    assert!(r.out.stdout.is_empty(), "stdout must be empty, got {:?}", r.out.stdout);
    assert_eq!(r.stderr(), DENIED, "stderr");
    assert!(r.elapsed >= Duration::from_millis(990), "refusal after {:?}, before the minimum delay", r.elapsed);
    let line = sb.log_line(r.pid).unwrap_or_else(|| panic!("no log line for pid {}; log:\n{}", r.pid, sb.log_text()));
    assert!(line.contains(": deny ") && line.contains(&format!(" reason={reason} ")), "want reason {reason}: {line}");
}

/// Every path under `root` with (mode, uid, size, mtime): to prove a refused session touched
/// nothing.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        out.insert(p.clone(), (m.mode(), m.uid(), m.size(), m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// `/proc/PID/status` field.
pub fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(|v| v.trim().to_owned())
}

/// Asserts the kernel's view of a served process and each of its threads.
pub fn assert_dropped(pid: u32, uid: u32, gid: u32, groups: &[u32]) {
    let tasks: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .map(|e| e.path().join("status"))
        .collect();
    assert!(!tasks.is_empty());
    let mut all = vec![PathBuf::from(format!("/proc/{pid}/status"))];
    all.extend(tasks);
    for st_path in all {
        let st = fs::read_to_string(&st_path).expect("read status");
        let four = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
        assert_eq!(status_field(&st, "Uid"), Some(four(uid)), "{st_path:?}");
        assert_eq!(status_field(&st, "Gid"), Some(four(gid)), "{st_path:?}");
        let mut got: Vec<u32> = status_field(&st, "Groups")
            .unwrap_or_default()
            .split_whitespace()
            .map(|g| g.parse().expect("group id"))
            .collect();
        got.sort_unstable();
        let mut want = groups.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "Groups in {st_path:?}");
        for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&st, k).as_deref(), Some("0000000000000000"), "{k} in {st_path:?}");
        }
        assert_eq!(status_field(&st, "NoNewPrivs").as_deref(), Some("1"), "{st_path:?}");
        assert_eq!(status_field(&st, "Umask").as_deref(), Some("0077"), "{st_path:?}");
    }
}

/// Kills and reaps a child on drop (sshd, long-lived ssh clients), so a failing test leaves no
/// process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Host key and client keys for one sshd sandbox.
pub struct SshKeys {
    pub dir: PathBuf,
    pub host: PathBuf,
    pub clients: Vec<PathBuf>,
}

impl SshKeys {
    pub fn new(sb: &Sandbox, clients: usize) -> Self {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing: install openssh-server (tests/run does)"
        );
        assert!(
            Command::new("ssh").arg("-V").stdin(Stdio::null()).output().is_ok(),
            "ssh is missing: install openssh-client (tests/run does)"
        );
        let dir = sb.dir.join("ssh");
        fs::create_dir(&dir).expect("mkdir ssh");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let keygen = |name: &str| {
            let p = dir.join(name);
            run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&p));
            p
        };
        let host = keygen("host_ed25519");
        let clients = (0..clients).map(|i| keygen(&format!("client{i}_ed25519"))).collect();
        Self { dir, host, clients }
    }

    /// The public half of client key `i`, one line.
    pub fn client_pub(&self, i: usize) -> String {
        let p = self.clients[i].with_extension("pub");
        fs::read_to_string(&p).expect("read pub").trim().to_owned()
    }
}

/// A real OpenSSH sshd on 127.0.0.1, killed on drop. Its output goes to `sshd.log`.
pub struct Sshd {
    pub port: u16,
    pub log: PathBuf,
    pub known_hosts: PathBuf,
    _child: KillOnDrop,
}

impl Sshd {
    /// Starts sshd with `authorized_keys` as root's keys and `extra` appended to the config.
    pub fn start(keys: &SshKeys, tag: &str, authorized_keys: &str, extra: &str) -> Self {
        Self::start_on(keys, tag, authorized_keys, extra, None)
    }

    /// Kills sshd and every connection it serves (each connection is a child process of its
    /// own, which killing the listener alone leaves running): the replica is gone.
    pub fn kill_all(self) {
        let pid = self._child.0.id().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
        drop(self);
    }

    /// [`Sshd::start`], on `port` if given (a restart where clients expect it).
    pub fn start_on(keys: &SshKeys, tag: &str, authorized_keys: &str, extra: &str, port: Option<u16>) -> Self {
        // sshd's privilege-separation directory (Debian's path); created only when missing.
        if !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
            fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).expect("chmod /run/sshd");
        }
        let ak = keys.dir.join(format!("authorized_keys_{tag}"));
        fs::write(&ak, authorized_keys).expect("write authorized_keys");
        fs::set_permissions(&ak, fs::Permissions::from_mode(0o600)).expect("chmod");
        let log = keys.dir.join(format!("sshd_{tag}.log"));
        for _attempt in 0..5 {
            // sshd cannot take port 0: borrow a free port from the kernel, then hand it over.
            let port = port.unwrap_or_else(|| {
                std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
            });
            let cfg = keys.dir.join(format!("sshd_config_{tag}"));
            fs::write(
                &cfg,
                // sshd takes the first value of an option: `extra` goes first so it overrides.
                format!(
                    "{extra}\nPort {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
                     StrictModes yes\nUsePAM no\nPermitRootLogin forced-commands-only\nPubkeyAuthentication yes\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitUserEnvironment no\n\
                     ClientAliveInterval 10\nClientAliveCountMax 3\nLogLevel VERBOSE\n",
                    keys.host.display(),
                    ak.display()
                ),
            )
            .expect("write sshd_config");
            let check = Command::new("/usr/sbin/sshd").arg("-t").arg("-f").arg(&cfg).stdin(Stdio::null()).output();
            let check = check.expect("sshd -t");
            assert!(check.status.success(), "sshd -t: {}", String::from_utf8_lossy(&check.stderr));
            let logf = File::create(&log).expect("sshd log");
            let child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&cfg)
                .env_clear()
                .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup log"))
                .stderr(logf)
                .spawn()
                .expect("spawn sshd");
            let mut child = KillOnDrop(child);
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let text = fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Server listening on") {
                    let known_hosts = keys.dir.join(format!("known_hosts_{tag}"));
                    let host_pub = fs::read_to_string(keys.host.with_extension("pub")).expect("host pub");
                    let mut f = File::create(&known_hosts).expect("known_hosts");
                    writeln!(f, "[127.0.0.1]:{port} {}", host_pub.trim()).expect("write known_hosts");
                    return Self { port, log, known_hosts, _child: child };
                }
                if let Ok(Some(_)) = child.0.try_wait() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                assert!(Instant::now() < until, "sshd did not start: {text}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("sshd did not start: {}", fs::read_to_string(&log).unwrap_or_default());
    }

    /// An `ssh` command to root@127.0.0.1 with client key `key`, strict host key checking and
    /// no user configuration. Add options, then the remote command.
    pub fn ssh(&self, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
        .args(["-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .args(["-p", &self.port.to_string()])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", self.log.parent().unwrap_or(Path::new("/")));
        c
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The pid in an auth-log line (`mailreplica-wrapper[PID]: …`).
pub fn log_pid(line: &str) -> u32 {
    let (_, rest) = line.split_once("mailreplica-wrapper[").expect("tag");
    rest.split(']').next().expect("pid").parse().expect("pid number")
}

/// Waits up to 12 s for a log line containing all of `needles`.
pub fn wait_log_line(sb: &Sandbox, needles: &[&str]) -> String {
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        if let Some(l) = sb.log_text().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return l.to_owned();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no log line with {needles:?}; log:\n{}", sb.log_text());
}

// ------------------------------------------------------------------------------------------
// The dsync side of a served session

/// The first line a dsync 3.5 peer sends (Dovecot 2.3.19 and our server alike).
pub const VERSION_LINE: &[u8] = b"VERSION\tdsync\t3\t5\n";

/// One mailbox a [`MasterSession`] announces.
#[derive(Clone, Debug)]
pub struct MasterBox {
    pub name: String,
    /// 32 lower-case hex digits.
    pub guid: String,
    pub uid_validity: u32,
}

/// What a dsync master (`doveadm sync` on the sending host) sends in a whole session whose
/// mailboxes hold no mails: the VERSION line and header block, its handshake `H` (a two-way
/// "changed" sync, as `doveadm sync` sends it), its mailbox tree (`N` records for new, empty
/// mailboxes, then `.`), its deletion log (`D`, optionally padded with deletions of mailboxes
/// nobody has, to make the stream long), and an empty mailbox list (`.`). A slave answers with
/// its own greeting and handshake at once, its tree and `D` only after it parsed the master's
/// `H`, creates the announced mailboxes with exactly these GUIDs and UIDVALIDITYs, and ends
/// with `F` and `X`. Built with `mailreplica::dsync::wire::Encoder`, whose output is pinned
/// byte for byte against captured Dovecot sessions.
pub struct MasterSession {
    /// VERSION line, the 11 header lines, `.` and the `H` line.
    pub greeting: Vec<u8>,
    /// Everything after the handshake.
    pub rest: Vec<u8>,
    pub boxes: Vec<MasterBox>,
}

impl MasterSession {
    /// `boxes` new mailboxes (names unique to this session) and `deletions` padding entries.
    pub fn new(boxes: usize, deletions: usize) -> Self {
        let tag = unique();
        let t = |s: &str| Text::try_from(s).expect("text");
        let mut enc = Encoder::new();
        let mut greeting = Vec::new();
        enc.greeting(&mut greeting);
        let hello = Handshake {
            hostname: t("mx1"),
            sync_type: Some(SyncType::Changed),
            send_mail_requests: true,
            import_commit_msgs_interval: std::num::NonZeroU32::new(100),
            hashed_headers: Some(vec![t("Date"), t("Message-ID")]),
            alt_char: std::num::NonZeroU8::new(b'_'),
            ..Default::default()
        };
        enc.record(&Record::from(hello), &mut greeting).expect("encode H");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let boxes: Vec<MasterBox> = (0..boxes)
            .map(|i| MasterBox {
                name: format!("Box{tag}n{i}"),
                guid: format!("{:08x}{:08x}{:016x}", std::process::id(), n, i + 1),
                uid_validity: 1_700_000_000 + i as u32,
            })
            .collect();
        let mut rest = Vec::new();
        for b in &boxes {
            let node = MailboxNode {
                name: MailboxPath::new(vec![t(&b.name)]).expect("path"),
                existence: Existence::Exists,
                mailbox_guid: Some(b.guid.parse::<Guid128>().expect("guid")),
                uid_validity: b.uid_validity,
                uid_next: 1,
                last_renamed_or_created: 0,
                subscribed: false,
                last_subscription_change: 0,
            };
            enc.record(&Record::from(node), &mut rest).expect("encode N");
        }
        enc.end_of_list(&mut rest).expect("tree end");
        let deletes = MailboxDeletes {
            hierarchy_sep: HierarchySep::new(b'.').expect("sep"),
            escape_char: None,
            mailboxes: (0..deletions)
                .map(|i| Deletion {
                    // A prefix no GUID of `boxes` has: these name mailboxes that never existed.
                    guid: format!("dead{:04x}{:024x}", n & 0xffff, i).parse::<Guid128>().expect("guid"),
                    timestamp: 1_600_000_000 + i as i64,
                })
                .collect(),
            dirs: Vec::new(),
            unsubscribes: Vec::new(),
        };
        enc.record(&Record::from(deletes), &mut rest).expect("encode D");
        enc.end_of_list(&mut rest).expect("mailbox list end");
        Self { greeting, rest, boxes }
    }

    /// The whole stream.
    pub fn all(&self) -> Vec<u8> {
        let mut v = self.greeting.clone();
        v.extend_from_slice(&self.rest);
        v
    }

    /// Asserts that the served user's Maildir (`root`, Maildir++ layout) has every announced
    /// mailbox with the announced GUID and UIDVALIDITY (the header of its `dovecot-uidlist`),
    /// owned by `uid`.
    pub fn assert_created_in(&self, root: &Path, uid: u32) {
        for b in &self.boxes {
            let list = root.join(format!(".{}", b.name)).join("dovecot-uidlist");
            let text = fs::read_to_string(&list).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
            let header = text.lines().next().unwrap_or("");
            let words: Vec<&str> = header.split(' ').collect();
            assert!(words.contains(&format!("V{}", b.uid_validity).as_str()), "{}: {header}", list.display());
            assert!(words.contains(&format!("G{}", b.guid).as_str()), "{}: {header}", list.display());
            assert_eq!(fs::metadata(&list).expect("stat").uid(), uid, "{}", list.display());
        }
    }
}

/// Decodes everything a served process wrote on stdout. Panics on bytes that are not dsync.
pub fn decode_server_output(out: &[u8]) -> Vec<Event> {
    let mut dec = Decoder::new();
    dec.feed(out);
    dec.feed_eof();
    let mut events = Vec::new();
    loop {
        match dec.next() {
            Ok(Some(e)) => events.push(e),
            Ok(None) => return events,
            Err(e) => panic!("the served process wrote something that is not dsync ({e}): {}", out.escape_ascii()),
        }
    }
}

/// Asserts the slave's side of a whole, successful session: its greeting (protocol 3.5, all
/// headers), handshake, tree, deletion log, a finish record without error, and `X`.
pub fn assert_full_server_session(out: &[u8]) {
    assert!(out.starts_with(VERSION_LINE), "the server's first line: {}", out.escape_ascii());
    let events = decode_server_output(out);
    let shown = || format!("{events:#?}");
    assert_eq!(events.first(), Some(&Event::Greeting { minor: 5 }), "{}", shown());
    assert!(matches!(events.get(1), Some(Event::Record(Record::Handshake(_)))), "{}", shown());
    let tree_end = events.iter().position(|e| *e == Event::EndOfList).expect("the tree's end");
    assert!(events[2..tree_end].iter().all(|e| matches!(e, Event::Record(Record::MailboxNode(_)))), "{}", shown());
    let tail = &events[tree_end + 1..];
    assert!(
        matches!(
            tail,
            [Event::Record(Record::MailboxDeletes(_)), Event::Record(Record::Finish(f)), Event::Done]
                if f.error.is_none() && f.mail_error == 0 && !f.require_full_resync
        ),
        "{}",
        shown()
    );
}

/// A running process whose stdin is fed from a thread (so that big writes never block the
/// test) and whose stdout and stderr are collected by threads, so that a test can wait for
/// what it has written so far. Killed and reaped on drop.
pub struct Live {
    pub pid: u32,
    child: Option<Child>,
    input: Option<Sender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    out_rx: Receiver<Vec<u8>>,
    out_eof: bool,
    err: Option<JoinHandle<Vec<u8>>>,
    /// Everything read from stdout so far.
    pub out: Vec<u8>,
}

impl Live {
    /// Starts `cmd` with all three streams piped (overriding whatever `cmd` said).
    pub fn start(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Self::from_child(child)
    }

    /// Takes over a child started with all three streams piped.
    pub fn from_child(mut child: Child) -> Self {
        let pid = child.id();
        let mut stdin: ChildStdin = child.stdin.take().expect("piped stdin");
        let (input, in_rx) = channel::<Vec<u8>>();
        let writer = std::thread::spawn(move || {
            while let Ok(buf) = in_rx.recv() {
                // One write_all per buffer: the bytes of one `send` go out in the same write(2)
                // as far as the pipe takes them. A process that stopped reading gives EPIPE.
                if stdin.write_all(&buf).is_err() {
                    return;
                }
            }
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (out_tx, out_rx) = channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match std::io::Read::read(&mut stdout, &mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = out_tx.send(Vec::new());
                        return;
                    }
                    Ok(n) => {
                        if out_tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
            v
        });
        Self {
            pid,
            child: Some(child),
            input: Some(input),
            writer: Some(writer),
            out_rx,
            out_eof: false,
            err: Some(err),
            out: Vec::new(),
        }
    }

    /// Queues `bytes` for the process's stdin, as one write.
    pub fn send(&self, bytes: Vec<u8>) {
        self.input.as_ref().expect("input still open").send(bytes).expect("writer thread");
    }

    /// Closes stdin once everything queued is written (the writer thread does it).
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// Waits until `done(stdout so far)` holds; panics after `timeout` or at EOF.
    pub fn wait_out(&mut self, what: &str, timeout: Duration, done: impl Fn(&[u8]) -> bool) {
        let until = Instant::now() + timeout;
        while !done(&self.out) {
            if self.out_eof {
                let err = self.stderr_after_exit();
                panic!("stdout ended before {what}: {}\nstderr: {err}", self.out.escape_ascii());
            }
            match self.out_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(chunk) if chunk.is_empty() => self.out_eof = true,
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} within {timeout:?}; stdout so far: {}", self.out.escape_ascii())
                }
                Err(RecvTimeoutError::Disconnected) => self.out_eof = true,
            }
        }
    }

    /// The process's stderr once it has exited (waiting up to 10 s), for failure messages.
    fn stderr_after_exit(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        if let Some(c) = self.child.as_mut() {
            while Instant::now() < until && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            if c.try_wait().ok().flatten().is_none() {
                return "(still running)".to_owned();
            }
        }
        let err = self.err.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        String::from_utf8_lossy(&err).into_owned()
    }

    /// Collects whatever stdout brings during `dur`.
    pub fn collect_for(&mut self, dur: Duration) {
        let until = Instant::now() + dur;
        while !self.out_eof {
            match self.out_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(chunk) if chunk.is_empty() => self.out_eof = true,
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => self.out_eof = true,
            }
        }
    }

    /// Waits until the decoded stdout has an event matching `want`.
    pub fn wait_event(&mut self, what: &str, timeout: Duration, want: impl Fn(&Event) -> bool) {
        self.wait_out(what, timeout, |out| {
            let mut dec = Decoder::new();
            dec.feed(out);
            let mut found = false;
            while let Ok(Some(e)) = dec.next() {
                found |= want(&e);
            }
            found
        });
    }

    /// Closes stdin (if still open), waits up to `timeout` for the exit, collects all output.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<u8>, String) {
        self.close_input();
        let mut child = self.child.take().expect("child");
        let until = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pid {} still running after {timeout:?}; stdout so far: {}", self.pid, self.out.escape_ascii());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        while !self.out_eof {
            match self.out_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(chunk) if chunk.is_empty() => self.out_eof = true,
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(_) => self.out_eof = true,
            }
        }
        if let Some(w) = self.writer.take() {
            w.join().expect("writer thread");
        }
        let err = self.err.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        (status, std::mem::take(&mut self.out), String::from_utf8_lossy(&err).into_owned())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.input = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The names (`comm`) of every thread of `pid`.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .map(|e| fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that `pid` runs the dsync server's reader and writer threads besides its main one.
pub fn assert_server_threads(pid: u32) {
    let names = thread_names(pid);
    assert!(
        names.iter().any(|n| n == "dsync-read") && names.iter().any(|n| n == "dsync-write") && names.len() >= 3,
        "threads of {pid}: {names:?}"
    );
}

// ------------------------------------------------------------------------------------------
// A sandboxed Dovecot daemon (the sending side of the upstream scenario)

/// Panics unless Dovecot's `dovecot` and `doveadm` are installed.
pub fn require_dovecot() {
    for tool in ["/usr/sbin/dovecot", "/usr/bin/doveadm"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Dovecot 2.3 (apt-get install -y dovecot-core dovecot-imapd; tests/run does)"
        );
    }
}

/// Our `mailreplica` binary, built next to the wrapper by `cargo build --release --workspace`
/// (Cargo builds only the wrapper's own binary for its tests, so the workspace build must come
/// first, as `tests/run` does).
pub fn mailreplica_bin() -> PathBuf {
    let p = Path::new(WRAPPER).with_file_name("mailreplica");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace; tests/run does)",
        p.display()
    );
    p
}

/// A private Dovecot 2.3 daemon (master, auth, config, log, stats; no listeners) whose
/// configuration, sockets, state and log live in the sandbox, so that `doveadm -c CONF -u USER`
/// can look users up (system passwd). Its output goes to its own log file, never to the test's
/// stdout/stderr. Stopped on drop (SIGTERM to the master, which stops its children; SIGKILL
/// after 10 s).
pub struct Dovecot {
    pub conf: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// What every Dovecot program is run through: nothing for the host's Dovecot 2.3; for
    /// Dovecot 2.4, entering the Debian 13 root ([`Dovecot::start24`]).
    prefix: Vec<String>,
}

/// The Debian 13 root with Dovecot 2.4 (`tests/lab/debian-root.sh trixie DIR …` makes it;
/// `tests/run` runs that): `$MAILREPLICA_TEST_ROOTS/trixie`, by default
/// /var/lib/mailreplica-tests/trixie.
pub fn trixie_root() -> PathBuf {
    let roots = std::env::var_os("MAILREPLICA_TEST_ROOTS")
        .map_or_else(|| PathBuf::from("/var/lib/mailreplica-tests"), PathBuf::from);
    let root = roots.join("trixie");
    assert!(
        root.join("usr/sbin/dovecot").exists(),
        "no Debian 13 root with Dovecot 2.4 at {r}: make it with \
         `tests/lab/debian-root.sh trixie {r} dovecot-core,dovecot-imapd` (tests/run does)",
        r = root.display()
    );
    root
}

impl Dovecot {
    pub fn start(sb: &Sandbox, mail_location: &str) -> Self {
        Self::start_with(sb, mail_location, "")
    }

    /// [`Dovecot::start`] with `extra` at the end of the configuration.
    pub fn start_with(sb: &Sandbox, mail_location: &str, extra: &str) -> Self {
        Self::start_userdb(sb, mail_location, "driver = passwd", extra)
    }

    /// As [`Dovecot::start_with`], with `userdb` the body of its userdb block.
    pub fn start_userdb(sb: &Sandbox, mail_location: &str, userdb: &str, extra: &str) -> Self {
        require_dovecot();
        let (dir, conf, log) = Self::home(sb, "dovecot");
        fs::write(
            &conf,
            format!(
                "# a mailreplica-wrapper test's private Dovecot: nothing outside this directory\n\
                 base_dir = {run}\nstate_dir = {state}\nlog_path = {log}\ninfo_log_path = {log}\n\
                 protocols =\nlisten = 127.0.0.1\nssl = no\nmail_location = {mail_location}\nfirst_valid_uid = 1000\n\
                 passdb {{\n  driver = passwd\n}}\nuserdb {{\n  {userdb}\n}}\n\
                 namespace inbox {{\n  inbox = yes\n}}\n\
                 service anvil {{\n  chroot =\n}}\n\
                 default_internal_user = dovecot\ndefault_login_user = dovenull\n{extra}\n",
                run = dir.join("run").display(),
                state = dir.join("state").display(),
                log = log.display(),
            ),
        )
        .expect("write dovecot.conf");
        // What the master prints before its log is open (configuration errors) goes here too.
        let early = File::create(&log).expect("dovecot log");
        let child = Command::new("/usr/sbin/dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(early.try_clone().expect("dup log"))
            .stderr(early)
            .spawn()
            .expect("start dovecot");
        let mut me = Self { conf, log, child: Some(child), prefix: Vec::new() };
        me.wait_started(&dir.join("run").join("auth-userdb"));
        me
    }

    /// The instance's directory (with `state/`), its dovecot.conf and its log.
    fn home(sb: &Sandbox, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = sb.dir.join(name);
        for d in [dir.clone(), dir.join("state")] {
            fs::create_dir(&d).expect("mkdir dovecot dir");
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let (conf, log) = (dir.join("dovecot.conf"), dir.join("dovecot.log"));
        (dir, conf, log)
    }

    /// Waits until `socket` exists (Dovecot's auth is up), or panics with the log.
    fn wait_started(&mut self, socket: &Path) {
        let until = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("dovecot exited ({st}) at start; log:\n{}", self.log_text());
            }
            assert!(Instant::now() < until, "dovecot did not start; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Dovecot 2.4.1 from the Debian 13 root, as a second host's Dovecot would be: Maildir at
    /// `mail_path`, users from the passwd-file `users`. Every program of it runs entered
    /// into the root with `unshare --mount` and `chroot`, /dev, /proc and the tests' base
    /// directory mounted in its own mount namespace (gone with the process), so that paths
    /// are the same inside and out.
    pub fn start24(sb: &Sandbox, mail_path: &str, users: &Path) -> Self {
        let root = trixie_root();
        fs::create_dir_all(root.join(BASE.trim_start_matches('/'))).expect("the base directory in the root");
        let script = "r=$1; b=$2; shift 2; mount --rbind /dev \"$r/dev\" && mount -t proc proc \"$r/proc\" \
                      && mount --bind \"$b\" \"$r$b\" && exec chroot \"$r\" \"$@\"";
        let prefix: Vec<String> = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([root.display().to_string(), BASE.to_owned()])
            .collect();
        let (dir, conf, log) = Self::home(sb, "dovecot24");
        fs::write(
            &conf,
            format!(
                "dovecot_config_version = 2.4.1\ndovecot_storage_version = 2.4.1\n\
                 base_dir = {run}\nstate_dir = {state}\nlog_path = {log}\ninfo_log_path = {log}\n\
                 protocols =\nmail_driver = maildir\nmail_path = {mail_path}\nmail_home = {homes}/%{{user}}\n\
                 first_valid_uid = 1000\n\
                 passdb passwd-file {{\n  passwd_file_path = {users}\n}}\n\
                 userdb passwd-file {{\n  passwd_file_path = {users}\n}}\n\
                 namespace inbox {{\n  inbox = yes\n}}\nservice anvil {{\n  chroot =\n}}\n\
                 default_internal_user = dovecot\ndefault_login_user = dovenull\n",
                run = dir.join("run").display(),
                state = dir.join("state").display(),
                log = log.display(),
                homes = sb.dir.join("home").display(),
                users = users.display(),
            ),
        )
        .expect("write dovecot.conf");
        let early = File::create(&log).expect("dovecot log");
        let mut me = Self { conf, log, child: None, prefix };
        let mut start = me.command("/usr/sbin/dovecot");
        start.arg("-F").arg("-c").arg(&me.conf);
        let child = start
            .stdin(Stdio::null())
            .stdout(early.try_clone().expect("dup log"))
            .stderr(early)
            .spawn()
            .expect("start dovecot 2.4");
        me.child = Some(child);
        me.wait_started(&dir.join("run").join("auth-userdb"));
        me
    }

    /// One of this Dovecot's programs (`/usr/lib/dovecot/dovecot-lda`, …), with a clean
    /// environment; for Dovecot 2.4, entered into its root.
    pub fn command(&self, program: &str) -> Command {
        let mut c = match self.prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        };
        c.env_clear().env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        c
    }

    /// The words that run `program` of this Dovecot (for Dovecot 2.4, the root's entry
    /// first), for a script that runs it.
    pub fn argv(&self, program: &str) -> Vec<String> {
        self.prefix.iter().cloned().chain([program.to_owned()]).collect()
    }

    /// `doveadm -c CONF ARGS…` with a clean environment (not started).
    pub fn doveadm(&self) -> Command {
        let mut c = self.command("/usr/bin/doveadm");
        c.arg("-c")
            .arg(&self.conf)
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("TZ", "UTC")
            .env("LANG", "C.UTF-8");
        c
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `cmd` to its end (stdin closed at once), killing it after `timeout`: (status, stdout
/// as text, stderr).
pub fn run_for(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let mut live = Live::start(cmd);
    live.close_input();
    let (status, out, err) = live.finish(timeout);
    (status, String::from_utf8_lossy(&out).into_owned(), err)
}
