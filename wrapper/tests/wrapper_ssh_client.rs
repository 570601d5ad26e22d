//! Our own sending side over our embedded SSH client: `mailreplica sync|backup -u USER
//! remoteprefix:root@127.0.0.1:PORT` (and `remote:`) against a real OpenSSH sshd on 127.0.0.1
//! whose root `authorized_keys` forces `mailreplica-wrapper`, plus every refusal the client
//! must make before it sends anything: unknown, changed and revoked host keys, a private key
//! others can read, and the wrapper's own refusal (exit 126) reported as such.
//!
//! ```text
//!   mailreplica -u alice backup remoteprefix:root@127.0.0.1:PORT      (maildir:~/Source)
//!      │ russh: known_hosts check, root's test key, then the drop to alice
//!      ▼
//!   sshd ──root── mailreplica-wrapper --peer mx1 ──drop──► alice     (maildir:~/Maildir)
//! ```
//!
//! Both ends are on this host: each user's source is `~/Source`, the replica `~/Maildir`.
//! Needs root, useradd and OpenSSH's sshd (`tests/run` installs it), and the workspace built
//! first (`cargo build --release --workspace`).

mod wrapper_common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use wrapper_common::*;

/// Any single mailreplica run.
const STEP: Duration = Duration::from_secs(120);

/// Fields drop in this order: users, sshd, then the sandbox directory.
struct World {
    users: Vec<TestUser>,
    sshd: Sshd,
    keys: SshKeys,
    config: PathBuf,
    sb: Sandbox,
}

impl World {
    /// Three users; the policy of peer mx1 allows the first two (different uids).
    /// `extra_sshd` goes first in sshd_config; `forced` chooses the authorized_keys line.
    fn new(tag: &str, forced: bool, extra_sshd: &str) -> Self {
        let command =
            forced.then_some(|sb: &Sandbox, _: &[TestUser]| format!("{WRAPPER} {}", sb.args("mx1").join(" ")));
        Self::with_command(tag, command, extra_sshd)
    }

    /// [`World::new`] with root's key forcing `command(sandbox, users)` (none: no forced command).
    fn with_command(tag: &str, command: Option<impl Fn(&Sandbox, &[TestUser]) -> String>, extra_sshd: &str) -> Self {
        let sb = Sandbox::new();
        let users = vec![TestUser::new(&sb), TestUser::new(&sb), TestUser::new(&sb)];
        assert_ne!(users[0].uid, users[1].uid, "two users with different uids");
        sb.write_policy(&format!(
            "[peer.mx1]\nallow_users = [\"{}\", \"{}\"]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\n\
             mail_location = \"maildir:~/Maildir\"\n",
            users[0].name, users[1].name
        ));
        let keys = SshKeys::new(&sb, 1);
        let ak = match command {
            Some(c) => format!("restrict,command=\"{}\" {}\n", c(&sb, &users), keys.client_pub(0)),
            None => format!("restrict {}\n", keys.client_pub(0)),
        };
        let sshd = Sshd::start(&keys, tag, &ak, extra_sshd);
        let config = sb.dir.join("mailreplica.toml");
        fs::write(&config, "first_valid_uid = 1000\n").expect("mailreplica.toml");
        let w = Self { users, sshd, keys, config, sb };
        for (i, u) in w.users.iter().enumerate() {
            w.fill_source(u, i);
        }
        w
    }

    /// `mailreplica -c CONFIG ARGS…` with a clean environment (no ssh-agent).
    fn mr(&self, args: &[&str]) -> Command {
        let mut c = Command::new(mailreplica_bin());
        c.arg("-c").arg(&self.config).args(args).env_clear().env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        c
    }

    /// Runs to the end with `input` on stdin.
    fn run(&self, mut cmd: Command, input: &[u8]) -> Output {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        let pid = child.id();
        let waiter = std::thread::spawn(move || child.wait_with_output().expect("wait"));
        let until = std::time::Instant::now() + STEP;
        while !waiter.is_finished() {
            if std::time::Instant::now() > until {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                panic!("{cmd:?} still running after {STEP:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        waiter.join().expect("waiter")
    }

    fn ok(&self, cmd: Command, input: &[u8]) -> String {
        let what = format!("{cmd:?}");
        let out = self.run(cmd, input);
        assert!(out.status.success(), "{what}: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Mails in INBOX and in Work (one flagged), in `~/Source`.
    fn fill_source(&self, u: &TestUser, i: usize) {
        let src = ["-u", &u.name, "-o", "mail_location=maildir:~/Source"];
        for n in 0..3 {
            let mail = format!(
                "From: a@example.org\r\nTo: {}@example.org\r\nSubject: mail {n} of user {i}\r\n\r\nbody {n}\r\n",
                u.name
            );
            self.ok(self.mr(&[&src[..], &["save"]].concat()), mail.as_bytes());
        }
        self.ok(self.mr(&[&src[..], &["mailbox", "create", "Work"]].concat()), b"");
        self.ok(self.mr(&[&src[..], &["save", "-m", "Work"]].concat()), b"Subject: work\r\n\r\nwork\r\n");
        self.ok(
            self.mr(&[&src[..], &["flags", "add", "\\Flagged $Label1", "mailbox", "INBOX", "uid", "2"]].concat()),
            b"",
        );
    }

    /// What a Maildir holds: every mail's mailbox, uid, guid and flags (without `\Recent`),
    /// and every mailbox's counters and GUID.
    fn listing(&self, u: &TestUser, location: &str) -> String {
        let loc = format!("mail_location=maildir:~/{location}");
        let base = ["-u", &u.name, "-o", &loc, "-f", "tab"];
        let mails = self.ok(self.mr(&[&base[..], &["fetch", "mailbox uid guid flags", "all"]].concat()), b"");
        let boxes = self
            .ok(self.mr(&[&base[..], &["mailbox", "status", "messages uidnext uidvalidity guid", "*"]].concat()), b"");
        // \Recent belongs to a session, not to the mail (Dovecot doesn't sync it either).
        let mails: Vec<String> = mails
            .lines()
            .map(|l| {
                l.split('\t')
                    .map(|f| f.split(' ').filter(|w| *w != "\\Recent").collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\t")
            })
            .collect();
        format!("{}\n\n{boxes}", mails.join("\n"))
    }

    /// `-o ssh_key=… -o ssh_known_hosts=…` (the harness's known_hosts unless given).
    fn ssh_opts(&self, known_hosts: Option<&Path>) -> Vec<String> {
        let kh = known_hosts.unwrap_or(&self.sshd.known_hosts);
        vec![
            "-o".into(),
            format!("ssh_key={}", self.keys.clients[0].display()),
            "-o".into(),
            format!("ssh_known_hosts={}", kh.display()),
        ]
    }

    fn dest(&self, kind: &str) -> String {
        format!("{kind}:root@127.0.0.1:{}", self.sshd.port)
    }

    /// `mailreplica -u USER -o mail_location=maildir:~/Source OPTS… COMMAND DEST`.
    fn sync_cmd(&self, u: &TestUser, opts: &[String], command: &[&str], dest: &str) -> Command {
        let mut args: Vec<&str> = vec!["-u", &u.name, "-o", "mail_location=maildir:~/Source"];
        args.extend(opts.iter().map(String::as_str));
        args.extend_from_slice(command);
        args.push(dest);
        self.mr(&args)
    }

    fn accepted_logins(&self) -> usize {
        self.sshd.log_text().matches("Accepted publickey").count()
    }
}

/// Every file and directory under `root` belongs to `uid`.
fn assert_owned_by(root: &Path, uid: u32) {
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(m.uid(), uid, "{} is owned by uid {}", p.display(), m.uid());
        seen += 1;
        if m.is_dir() {
            for e in fs::read_dir(&p).expect("read_dir").flatten() {
                stack.push(e.path());
            }
        }
    }
    assert!(seen > 5, "{} holds almost nothing", root.display());
}

#[test]
fn remoteprefix_backup_and_sync_into_the_wrapper_for_two_users() {
    let w = World::new("a", true, "");
    let opts = w.ssh_opts(None);
    let (alice, bob) = (&w.users[0], &w.users[1]);
    // alice: a backup; bob: a two-way sync. Each lands in that user's own ~/Maildir.
    w.ok(w.sync_cmd(alice, &opts, &["backup"], &w.dest("remoteprefix")), b"");
    w.ok(w.sync_cmd(bob, &opts, &["sync"], &w.dest("remoteprefix")), b"");
    for u in [alice, bob] {
        let source = w.listing(u, "Source");
        assert!(source.contains("\\Flagged $Label1") && source.contains("Work"), "{source}");
        assert_eq!(w.listing(u, "Maildir"), source, "replica of {}", u.name);
        assert_owned_by(&u.home.join("Maildir"), u.uid);
    }
    let log = w.sb.log_text();
    assert!(
        log.contains(&format!("user=\"{}\"", alice.name)) && log.contains(&format!("user=\"{}\"", bob.name)),
        "{log}"
    );
    // Changes on both sides, then an incremental two-way sync with a saved state.
    w.ok(w.sync_cmd(alice, &opts, &["sync", "-s", ""], &w.dest("remoteprefix")), b"");
    w.ok(
        w.mr(&["-u", &alice.name, "-o", "mail_location=maildir:~/Maildir", "save"]),
        b"Subject: on the replica\r\n\r\nr\r\n",
    );
    w.ok(
        w.mr(&["-u", &alice.name, "-o", "mail_location=maildir:~/Source", "save"]),
        b"Subject: on the source\r\n\r\ns\r\n",
    );
    let lines_before = w.listing(alice, "Source").lines().count();
    let state = w.ok(w.sync_cmd(alice, &opts, &["sync", "-s", ""], &w.dest("remoteprefix")), b"");
    assert!(!state.trim().is_empty(), "a state is printed");
    let source = w.listing(alice, "Source");
    assert_eq!(source.lines().count(), lines_before + 1, "the replica's new mail reached the source:\n{source}");
    assert_eq!(w.listing(alice, "Maildir"), source);
}

#[test]
fn remote_runs_dsync_remote_cmd_with_the_user() {
    // No forced command: sshd runs what we ask, `mailreplica -u USER dsync-server` as root.
    let w = World::new("r", false, "PermitRootLogin prohibit-password");
    let alice = &w.users[0];
    let mut opts = w.ssh_opts(None);
    let cmd = format!(
        "dsync_remote_cmd=ssh -l%{{login}} %{{host}} {} -c {} -o 'mail_location=maildir:~/Remote' -u %u dsync-server",
        mailreplica_bin().display(),
        w.config.display()
    );
    opts.extend(["-o".to_owned(), cmd]);
    w.ok(w.sync_cmd(alice, &opts, &["backup"], &w.dest("remote")), b"");
    assert_eq!(w.listing(alice, "Remote"), w.listing(alice, "Source"));
    assert_owned_by(&alice.home.join("Remote"), alice.uid);
}

/// Runs a sync that must be refused: non-zero exit, `want` in stderr, nothing logged in, the
/// wrapper never started, the replica untouched.
fn assert_refused_before_sending(w: &World, cmd: Command, want: &[&str]) -> String {
    let alice = &w.users[0];
    let before = snapshot(&alice.home);
    let logins = w.accepted_logins();
    let out = w.run(cmd, b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    eprintln!("refused ({:?}): {err}", out.status.code());
    for s in want {
        assert!(err.contains(s), "stderr lacks {s:?}:\n{err}");
    }
    assert_eq!(w.accepted_logins(), logins, "sshd accepted a login:\n{}", w.sshd.log_text());
    assert!(w.sb.log_text().is_empty(), "the wrapper ran: {}", w.sb.log_text());
    assert_eq!(snapshot(&alice.home), before, "the replica side changed");
    assert!(!alice.home.join("Maildir").exists());
    err
}

#[test]
fn host_key_and_key_file_refusals() {
    let w = World::new("k", true, "");
    let alice = &w.users[0];
    let dest = w.dest("remoteprefix");
    let host_line = fs::read_to_string(&w.sshd.known_hosts).expect("known_hosts");
    let host_line = host_line.trim();
    let name = format!("[127.0.0.1]:{}", w.sshd.port);
    let other_key = fs::read_to_string(w.keys.clients[0].with_extension("pub")).expect("pub");
    let other_key: Vec<&str> = other_key.split_whitespace().take(2).collect();
    let kh = |file: &str, text: &str| {
        let p = w.sb.dir.join(file);
        fs::write(&p, text).expect("write known_hosts");
        p
    };

    // Not listed at all (an empty file, then a missing one).
    for p in [kh("kh_empty", ""), w.sb.dir.join("kh_missing")] {
        let err = assert_refused_before_sending(
            &w,
            w.sync_cmd(alice, &w.ssh_opts(Some(&p)), &["backup"], &dest),
            &[&format!("the host key of {name} is not known"), "--accept-new-host-key", "SHA256:"],
        );
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(!w.sb.dir.join("kh_missing").exists());
    }

    // A different key of the same type: changed, even with --accept-new-host-key.
    let changed = kh("kh_changed", &format!("# pinned\n{name} {} {}\n", other_key[0], other_key[1]));
    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let cmd = w.sync_cmd(alice, &w.ssh_opts(Some(&changed)), &[&["backup"][..], extra].concat(), &dest);
        let err =
            assert_refused_before_sending(&w, cmd, &["HOST KEY CHANGED", &format!("{} line 2", changed.display())]);
        assert!(err.contains("man in the middle"), "{err}");
    }
    assert_eq!(fs::read_to_string(&changed).expect("read").lines().count(), 2, "accept-new must not add a line");

    // Listed, and revoked.
    let revoked = kh("kh_revoked", &format!("{host_line}\n@revoked * {}\n", host_line.split_once(' ').expect("key").1));
    assert_refused_before_sending(
        &w,
        w.sync_cmd(alice, &w.ssh_opts(Some(&revoked)), &["backup"], &dest),
        &["is revoked", &format!("{} line 2", revoked.display())],
    );

    // Only a @cert-authority line matches.
    let ca = kh("kh_ca", &format!("@cert-authority [127.0.0.1]:* {} {}\n", other_key[0], other_key[1]));
    assert_refused_before_sending(
        &w,
        w.sync_cmd(alice, &w.ssh_opts(Some(&ca)), &["backup"], &dest),
        &["certificate host keys are not supported"],
    );

    // A private key that group members can read: refused before connecting.
    let loose = w.keys.dir.join("loose_key");
    fs::copy(&w.keys.clients[0], &loose).expect("copy key");
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o640)).expect("chmod");
    let opts = vec![
        "-o".to_owned(),
        format!("ssh_key={}", loose.display()),
        "-o".to_owned(),
        format!("ssh_known_hosts={}", w.sshd.known_hosts.display()),
    ];
    let err = assert_refused_before_sending(
        &w,
        w.sync_cmd(alice, &opts, &["backup"], &dest),
        &[&format!("permissions 0640 for {} are too open", loose.display())],
    );
    assert!(!w.sshd.log_text().contains("Accepted"), "{err}");

    // A key the server doesn't know: auth refused, naming the key.
    let stranger = w.keys.dir.join("stranger");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .expect("keygen");
    assert!(st.success());
    let opts = vec![
        "-o".to_owned(),
        format!("ssh_key={}", stranger.display()),
        "-o".to_owned(),
        format!("ssh_known_hosts={}", w.sshd.known_hosts.display()),
    ];
    assert_refused_before_sending(
        &w,
        w.sync_cmd(alice, &opts, &["backup"], &dest),
        &["refused public-key authentication", &stranger.display().to_string()],
    );

    // Nothing listens: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let out =
        w.run(w.sync_cmd(alice, &w.ssh_opts(None), &["backup"], &format!("remoteprefix:root@127.0.0.1:{port}")), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("Connection refused"), "{err}");

    // Something listens but never speaks SSH: ssh_connect_timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let mut opts = w.ssh_opts(None);
    opts.extend(["-o".to_owned(), "ssh_connect_timeout=1".to_owned()]);
    let started = std::time::Instant::now();
    let out = w.run(w.sync_cmd(alice, &opts, &["backup"], &format!("remoteprefix:root@127.0.0.1:{port}")), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains(&format!("no SSH session with root@[127.0.0.1]:{port} within 1 s")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    drop(silent);
}

#[test]
fn accept_new_host_key_records_the_key_once() {
    let w = World::new("n", true, "");
    let (alice, bob) = (&w.users[0], &w.users[1]);
    let kh = w.sb.dir.join("fresh").join("known_hosts");
    let opts = w.ssh_opts(Some(&kh));
    let dest = w.dest("remoteprefix");
    let out = w.run(w.sync_cmd(alice, &opts, &["backup", "--accept-new-host-key"], &dest), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Permanently added"), "{err}");
    let written = fs::read_to_string(&kh).expect("known_hosts written");
    let host_pub = fs::read_to_string(w.keys.host.with_extension("pub")).expect("host pub");
    let host_key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    assert_eq!(written, format!("[127.0.0.1]:{} {} {}\n", w.sshd.port, host_key[0], host_key[1]));
    // Now it is known: no flag needed, and nothing is added again.
    w.ok(w.sync_cmd(bob, &opts, &["backup"], &dest), b"");
    w.ok(w.sync_cmd(alice, &opts, &["backup", "--accept-new-host-key"], &dest), b"");
    assert_eq!(fs::read_to_string(&kh).expect("read"), written);
    assert_eq!(w.listing(alice, "Maildir"), w.listing(alice, "Source"));
}

#[test]
fn a_user_the_wrapper_refuses_is_reported_with_exit_126() {
    let w = World::new("d", true, "");
    let carol = &w.users[2];
    let out = w.run(w.sync_cmd(carol, &w.ssh_opts(None), &["backup"], &w.dest("remoteprefix")), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains(&format!("the replica refused user {} (remote exit status 126)", carol.name)), "{err}");
    assert!(err.contains("mailreplica-wrapper: access denied"), "{err}");
    wait_log_line(&w.sb, &[": deny ", " reason=not-allowed ", &carol.name]);
    assert!(!carol.home.join("Maildir").exists());
}

#[test]
fn key_formats_passphrases_and_the_agent() {
    let w = World::new("f", true, "");
    let alice = &w.users[0];
    let dest = w.dest("remoteprefix");
    let keygen = |name: &str, args: &[&str]| {
        let p = w.keys.dir.join(name);
        let st =
            Command::new("ssh-keygen").args(["-q", "-C", name]).args(args).arg("-f").arg(&p).status().expect("keygen");
        assert!(st.success());
        p
    };
    let rsa_pem = keygen("rsa_pem", &["-t", "rsa", "-b", "3072", "-m", "PEM", "-N", ""]);
    let ed_pass = keygen("ed_pass", &["-t", "ed25519", "-N", "open sesame"]);
    let pass = w.keys.dir.join("passphrase");
    fs::write(&pass, "open sesame\n").expect("passphrase");
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).expect("chmod");
    // Replace root's authorized_keys line of this sshd with the new keys (sshd re-reads it).
    let pubs: String = [&rsa_pem, &ed_pass]
        .iter()
        .map(|k| {
            let p = fs::read_to_string(k.with_extension("pub")).expect("pub");
            format!("restrict,command=\"{WRAPPER} {}\" {}\n", w.sb.args("mx1").join(" "), p.trim())
        })
        .collect();
    fs::write(w.keys.dir.join("authorized_keys_f"), pubs).expect("authorized_keys");
    let kh = format!("ssh_known_hosts={}", w.sshd.known_hosts.display());
    let with = |extra: &[String]| {
        let mut o = vec!["-o".to_owned(), kh.clone()];
        o.extend_from_slice(extra);
        o
    };
    // RSA in PEM format.
    w.ok(w.sync_cmd(alice, &with(&["-o".into(), format!("ssh_key={}", rsa_pem.display())]), &["backup"], &dest), b"");
    // An encrypted key: without its passphrase a clear refusal, with the file it works.
    let key = format!("ssh_key={}", ed_pass.display());
    let out = w.run(w.sync_cmd(alice, &with(&["-o".into(), key.clone()]), &["backup"], &dest), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("is encrypted") && err.contains("ssh_key_passphrase_file"), "{err}");
    let pf = format!("ssh_key_passphrase_file={}", pass.display());
    w.ok(w.sync_cmd(alice, &with(&["-o".into(), key.clone(), "-o".into(), pf]), &["backup"], &dest), b"");
    // The same encrypted key, unlocked in ssh-agent instead.
    let sock = w.keys.dir.join("agent.sock");
    let agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent");
    let _agent = KillOnDrop(agent);
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // ssh-add asks for a passphrase only on a terminal: it gets a decrypted copy of the key.
    let plain = w.keys.dir.join("ed_plain");
    fs::copy(&ed_pass, &plain).expect("copy");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "open sesame", "-N", "", "-f"])
        .arg(&plain)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen -p");
    assert!(st.success());
    let add =
        Command::new("ssh-add").arg(&plain).env("SSH_AUTH_SOCK", &sock).stdin(Stdio::null()).output().expect("ssh-add");
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    // The key file is encrypted and no passphrase is configured: the agent stands in.
    let mut cmd = w.sync_cmd(alice, &with(&["-o".into(), key]), &["backup"], &dest);
    cmd.env("SSH_AUTH_SOCK", &sock);
    w.ok(cmd, b"");
    assert_eq!(w.listing(alice, "Maildir"), w.listing(alice, "Source"));
}

/// doveadm's `-f json` output (an array of objects with string values) as rows; panics on
/// anything else, so that a test also proves the output is well-formed JSON of that shape.
fn json_rows(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    fn string(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
        assert_eq!(it.next(), Some('"'), "a string");
        let mut s = String::new();
        loop {
            match it.next().expect("unterminated string") {
                '"' => return s,
                '\\' => match it.next().expect("escape") {
                    'n' => s.push('\n'),
                    'r' => s.push('\r'),
                    't' => s.push('\t'),
                    'b' => s.push('\x08'),
                    'f' => s.push('\x0c'),
                    'u' => {
                        let hex: String = (0..4).map(|_| it.next().expect("hex")).collect();
                        s.push(char::from_u32(u32::from_str_radix(&hex, 16).expect("hex")).expect("char"));
                    }
                    c @ ('"' | '\\' | '/') => s.push(c),
                    c => panic!("bad escape \\{c}"),
                },
                c => {
                    assert!(c >= ' ', "raw control character in a string");
                    s.push(c);
                }
            }
        }
    }
    let mut it = text.trim_end_matches('\n').chars().peekable();
    let mut rows = Vec::new();
    assert_eq!(it.next(), Some('['), "{text}");
    if it.peek() == Some(&']') {
        it.next();
    } else {
        loop {
            assert_eq!(it.next(), Some('{'), "{text}");
            let mut row = std::collections::BTreeMap::new();
            loop {
                let k = string(&mut it);
                assert_eq!(it.next(), Some(':'), "{text}");
                let v = string(&mut it);
                assert!(row.insert(k, v).is_none(), "duplicate key: {text}");
                match it.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    c => panic!("{c:?} in an object: {text}"),
                }
            }
            rows.push(row);
            match it.next() {
                Some(',') => continue,
                Some(']') => break,
                c => panic!("{c:?} in the array: {text}"),
            }
        }
    }
    assert_eq!(it.next(), None, "text after the array: {text}");
    rows
}

/// `-F FILE --parallel 2` for three users over ONE SSH connection into the wrapper: the two
/// the policy allows are replicated (each as their own uid), the third is reported as refused
/// (the wrapper's 126 → 77) without stopping the others; `-f json` lists all three.
#[test]
fn many_users_over_one_connection() {
    let w = World::new("m", true, "");
    let (alice, bob, carol) = (&w.users[0], &w.users[1], &w.users[2]);
    let dest = w.dest("remoteprefix");
    let opts = w.ssh_opts(None);
    let src = ["-o", "mail_location=maildir:~/Source"];
    let with = |extra: &[&str], command: &[&str]| {
        let mut args: Vec<&str> = src.to_vec();
        args.extend(opts.iter().map(String::as_str));
        args.extend_from_slice(extra);
        args.extend_from_slice(command);
        args.push(&dest);
        w.mr(&args)
    };

    // doveadm refuses -s with many users, and so do we: before connecting.
    for many in [&["-A"][..], &["-u", &alice.name, "-u", &bob.name][..]] {
        let out = w.run(with(many, &["backup", "-s", ""]), b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("-s can't be used with -A, -F or several -u"), "{err}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(w.accepted_logins(), 0);

    let list = w.sb.dir.join("users");
    fs::write(&list, format!("# users\n{}\n\n{}\n{}\n", alice.name, carol.name, bob.name)).expect("user list");
    let started = std::time::Instant::now();
    let out = w.run(with(&["-F", list.to_str().expect("path"), "--parallel", "2", "-f", "json"], &["backup"]), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("-F run took {:?}:\n{err}{stdout}", started.elapsed());
    assert_eq!(out.status.code(), Some(77), "{err}");
    let rows = json_rows(&stdout);
    let names: Vec<&str> = rows.iter().map(|r| r["user"].as_str()).collect();
    assert_eq!(names, [&alice.name, &carol.name, &bob.name], "in the order of the file");
    for r in &rows {
        for key in ["result", "code", "duration", "sent", "received", "error"] {
            assert!(r.contains_key(key), "{key} missing: {r:?}");
        }
        if r["user"] == carol.name {
            assert_eq!((r["result"].as_str(), r["code"].as_str()), ("failed", "77"), "{r:?}");
            assert!(r["error"].contains(&format!("the replica refused user {} (remote exit status 126)", carol.name)));
        } else {
            assert_eq!((r["result"].as_str(), r["code"].as_str(), r["error"].as_str()), ("ok", "0", ""), "{r:?}");
            assert!(r["sent"].parse::<u64>().expect("sent") > 100, "{r:?}");
            assert!(r["received"].parse::<u64>().expect("received") > 100, "{r:?}");
        }
    }
    // The human table on stderr, and the child's log attributed to its user.
    assert!(err.contains("user") && err.contains("result") && err.contains("duration"), "{err}");
    assert!(err.contains(&format!("mailreplica: {}: Error: ", carol.name)), "{err}");
    for u in [alice, bob] {
        let source = w.listing(u, "Source");
        assert!(source.contains("\\Flagged $Label1") && source.contains("Work"), "{source}");
        assert_eq!(w.listing(u, "Maildir"), source, "replica of {}", u.name);
        assert_owned_by(&u.home.join("Maildir"), u.uid);
    }
    assert!(!carol.home.join("Maildir").exists());
    wait_log_line(&w.sb, &[": deny ", " reason=not-allowed ", &carol.name]);
    assert_eq!(w.accepted_logins(), 1, "one SSH login for the whole run:\n{}", w.sshd.log_text());

    // Several -u, the two-way way, with nothing new: all succeed, one more login.
    let out = w.run(with(&["-u", &bob.name, "-u", &alice.name, "--parallel", "2"], &["sync"]), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(out.stdout.is_empty(), "no -f: nothing on stdout");
    assert_eq!(w.accepted_logins(), 2);
    for u in [alice, bob] {
        assert_eq!(w.listing(u, "Maildir"), w.listing(u, "Source"));
    }

    // One user with -f json and -s: the state is in the JSON, and works as a state.
    let out = w.run(with(&["-u", &alice.name, "-f", "json"], &["sync", "-s", ""]), b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = json_rows(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rows.len(), 1);
    let state = rows[0]["state"].clone();
    assert!(!state.is_empty(), "{rows:?}");
    let out = w.run(with(&["-u", &alice.name, "-f", "json"], &["sync", "-s", &state]), b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A server that allows one session per connection (MaxSessions 1) and --parallel 2: the
/// second user's channel is refused until the first is closed, then it goes through.
#[test]
fn many_users_within_the_servers_session_limit() {
    let w = World::new("s", true, "MaxSessions 1");
    let (alice, bob) = (&w.users[0], &w.users[1]);
    let mut args: Vec<String> = vec!["-o".into(), "mail_location=maildir:~/Source".into()];
    args.extend(w.ssh_opts(None));
    args.extend(["-u", &alice.name, "-u", &bob.name, "--parallel", "2", "-f", "json", "backup"].map(String::from));
    args.push(w.dest("remoteprefix"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.run(w.mr(&args), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let rows = json_rows(&String::from_utf8_lossy(&out.stdout));
    assert!(rows.iter().all(|r| r["result"] == "ok") && rows.len() == 2, "{rows:?}");
    for u in [alice, bob] {
        assert_eq!(w.listing(u, "Maildir"), w.listing(u, "Source"), "replica of {}", u.name);
    }
    assert_eq!(w.accepted_logins(), 1);
    // The limit was hit, and waited out.
    assert!(w.sshd.log_text().contains("no more sessions"), "{}", w.sshd.log_text());
}

/// The shared connection drops while one user's channel is open (the forced command kills
/// its sshd session process when asked for that user): that user fails, and the users after it
/// go over a new connection.
#[test]
fn many_users_survive_a_dropped_connection() {
    let script = |sb: &Sandbox, users: &[TestUser]| {
        let path = sb.dir.join("drop-for-carol.sh");
        let mark = sb.dir.join("dropped");
        let text = format!(
            "#!/bin/sh\n\
             # The first channel for the third user takes the whole SSH connection down.\n\
             IFS= read -r user\n\
             if [ \"$user\" = \"{carol}\" ] && [ ! -e {mark} ]; then\n\
             \x20 : > {mark}\n\
             \x20 p=$PPID\n\
             \x20 while [ \"$p\" -gt 1 ]; do\n\
             \x20   case $(cat /proc/$p/comm) in sshd*) kill -KILL \"$p\"; exit 1 ;; esac\n\
             \x20   p=$(cut -d' ' -f4 /proc/$p/stat)\n\
             \x20 done\n\
             \x20 exit 1\n\
             fi\n\
             {{ printf '%s\\n' \"$user\"; exec cat; }} | exec {WRAPPER} {args}\n",
            carol = users[2].name,
            mark = mark.display(),
            args = sb.args("mx1").join(" "),
        );
        fs::write(&path, text).expect("script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    };
    let w = World::with_command("d", Some(script), "");
    let (alice, bob, carol) = (&w.users[0], &w.users[1], &w.users[2]);
    let mut args: Vec<String> = vec!["-o".into(), "mail_location=maildir:~/Source".into()];
    args.extend(w.ssh_opts(None));
    args.extend(
        ["-u", &carol.name, "-u", &alice.name, "-u", &bob.name, "--parallel", "1", "-f", "json", "backup"]
            .map(String::from),
    );
    args.push(w.dest("remoteprefix"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.run(w.mr(&args), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(w.sb.dir.join("dropped").exists(), "the connection was never dropped:\n{err}");
    assert!(!out.status.success(), "carol's sync cannot have succeeded:\n{err}");
    let rows = json_rows(&String::from_utf8_lossy(&out.stdout));
    let result = |u: &TestUser| rows.iter().find(|r| r["user"] == u.name).map(|r| r["result"].clone());
    assert_eq!(result(carol).as_deref(), Some("failed"), "{rows:?}\n{err}");
    assert_eq!((result(alice).as_deref(), result(bob).as_deref()), (Some("ok"), Some("ok")), "{rows:?}\n{err}");
    assert!(err.contains("the SSH connection was lost; connecting again"), "{err}");
    for u in [alice, bob] {
        assert_eq!(w.listing(u, "Maildir"), w.listing(u, "Source"), "replica of {}", u.name);
    }
    assert_eq!(w.accepted_logins(), 2, "{}", w.sshd.log_text());
}

/// -F with destinations each child reaches itself: a local Maildir, and a command line run as
/// the user (a script that notes whether it inherited fd 5, then runs `mailreplica
/// dsync-server` on another Maildir). No SSH involved. mailreplica itself is started with an
/// fd 5 open (as a careless caller might leave one): no child may inherit it.
#[test]
fn many_users_to_local_and_command_destinations() {
    let w = World::new("l", true, "");
    let list = w.sb.dir.join("users");
    let names: Vec<&str> = w.users.iter().map(|u| u.name.as_str()).collect();
    fs::write(&list, names.join("\n")).expect("user list");
    let probe = w.sb.dir.join("probe.sh");
    fs::write(
        &probe,
        format!(
            "#!/bin/sh\nif [ -e /proc/$$/fd/5 ]; then echo leaked > \"$HOME/fd5\"; fi\n\
             exec {} -c {} -o 'mail_location=maildir:~/Command' dsync-server\n",
            mailreplica_bin().display(),
            w.config.display()
        ),
    )
    .expect("probe");
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).expect("chmod probe");
    // The probe sees an inherited fd 5 when there is one.
    let control = w.sb.dir.join("control");
    fs::create_dir(&control).expect("mkdir");
    let st = Command::new("/bin/sh")
        .args(["-c", "exec 5</etc/hostname; exec \"$0\"", probe.to_str().expect("path")])
        .env_clear()
        .env("HOME", &control)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("control");
    assert!(!st.success(), "dsync-server as root without -u must refuse");
    assert!(control.join("fd5").exists(), "the probe detects an inherited fd");

    let probe = probe.to_str().expect("path");
    for (dest, location) in [("maildir:~/Local", "Local"), (probe, "Command")] {
        let list = list.to_str().expect("path");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exec 5</etc/hostname; exec \"$0\" \"$@\""])
            .arg(mailreplica_bin())
            .arg("-c")
            .arg(&w.config)
            .args(["-o", "mail_location=maildir:~/Source", "-F", list, "--parallel", "3", "backup", dest])
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        let out = w.run(cmd, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{dest}: {err}");
        for u in &w.users {
            assert_eq!(w.listing(u, location), w.listing(u, "Source"), "{dest} for {}", u.name);
            assert_owned_by(&u.home.join(location), u.uid);
            assert!(!u.home.join("fd5").exists(), "{} inherited fd 5", u.name);
        }
        assert!(err.contains(&w.users[2].name), "the result table names every user: {err}");
    }

    // -A: every user of the userdb (here a passwd-file) within first_valid_uid..last_valid_uid;
    // the one below first_valid_uid is left out, not failed.
    let mut db: String = w
        .users
        .iter()
        .map(|u| format!("{}:x:{}:{}::{}:/usr/sbin/nologin\n", u.name, u.uid, u.gid, u.home.display()))
        .collect();
    db.push_str("lowuid:x:999:999::/nonexistent:/usr/sbin/nologin\n");
    let passwd = w.sb.dir.join("users.passwd");
    fs::write(&passwd, db).expect("passwd-file");
    let config = w.sb.dir.join("all.toml");
    fs::write(&config, format!("first_valid_uid = 1000\nuserdb = \"passwd-file:{}\"\n", passwd.display()))
        .expect("config");
    let mut cmd = Command::new(mailreplica_bin());
    cmd.arg("-c")
        .arg(&config)
        .args(["-o", "mail_location=maildir:~/Source", "-A", "-f", "json", "--parallel", "2"])
        .args(["backup", "maildir:~/All"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
    let out = w.run(cmd, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "-A: {err}");
    let rows = json_rows(&String::from_utf8_lossy(&out.stdout));
    let listed: Vec<&str> = rows.iter().map(|r| r["user"].as_str()).collect();
    assert_eq!(listed, names, "-A lists the userdb's users in its order, without lowuid");
    assert!(rows.iter().all(|r| r["result"] == "ok"), "{rows:?}");
    for u in &w.users {
        assert_eq!(w.listing(u, "All"), w.listing(u, "Source"), "-A for {}", u.name);
        assert_owned_by(&u.home.join("All"), u.uid);
    }
    assert_eq!(w.accepted_logins(), 0);
}
