//! The attack table of WRAPPER-SECURITY §6, row by row, against the real binary as root with
//! real users; and the served process's privileges as the kernel reports them.
//!
//! Every refused case: exit 126, exactly `mailreplica-wrapper: access denied` on stderr,
//! nothing on stdout, at least one second, no file of any user touched, and the reason code in
//! the auth log line of that very pid. Every accepted case is served for real: the process
//! answers as a dsync slave (`VERSION\tdsync\t3\t5`, its headers and handshake), and a scripted
//! master session sent after the username runs to a clean end (`F`, `X`, exit 0).

mod wrapper_common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use mailreplica::dsync::wire::{Event, Record};
use wrapper_common::*;

fn policy_for(users: &[&str]) -> String {
    let list: Vec<String> = users.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[peer.mx1]\nallow_users = [{}]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\nmail_location = \"maildir:~/Maildir\"\n",
        list.join(", ")
    )
}

fn line(name: &str) -> Vec<u8> {
    format!("{name}\n").into_bytes()
}

/// Asserts a whole, clean dsync session: exit 0, the slave's side of it on stdout, and
/// nothing on stderr.
fn assert_served(r: &Run) {
    assert_eq!(r.status().code(), Some(0), "the served session failed; stderr: {}", r.stderr());
    assert_full_server_session(&r.out.stdout);
    assert_eq!(r.stderr(), "", "stderr of a clean session");
}

/// Runs a session that should be accepted: the username and, in the same write, a whole
/// master session (no mailboxes); the served process must answer as a dsync slave and end
/// cleanly.
fn served_with(args: &[String], env: &[(String, String)], name: &str) -> Run {
    let mut input = line(name);
    input.extend_from_slice(&MasterSession::new(0, 0).all());
    let r = run(args, env, &input);
    assert_served(&r);
    r
}

fn served(sb: &Sandbox, name: &str) -> Run {
    served_with(&sb.args("mx1"), &sshd_env(), name)
}

/// How long a served process may take to answer (the machine is shared and loaded).
const ANSWER: Duration = Duration::from_secs(20);

/// The served process has sent its greeting and handshake (so its reader and writer threads
/// run).
fn is_handshake(e: &Event) -> bool {
    matches!(e, Event::Record(Record::Handshake(_)))
}

/// The served process has sent its deletion log, the last record of its tree, which it only
/// sends after it parsed the master's handshake.
fn is_tree_sent(e: &Event) -> bool {
    matches!(e, Event::Record(Record::MailboxDeletes(_)))
}

// Rows 1 and 2: root by name and by a uid-0 alias, even though both are allow-listed.
#[test]
fn root_and_uid0_alias_are_refused_by_uid() {
    let sb = Sandbox::new();
    let alias = TestUser::with(&sb, UserSpec { dup_uid: Some(0), no_home: true, ..Default::default() });
    assert_eq!(alias.uid, 0);
    sb.write_policy(&policy_for(&["root", &alias.name]));
    let before = snapshot(&sb.dir.join("home"));
    let r = run(&sb.args("mx1"), &sshd_env(), b"root\n");
    assert_refused(&sb, &r, "forbidden-uid");
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&alias.name));
    assert_refused(&sb, &r, "forbidden-uid");
    assert_eq!(before, snapshot(&sb.dir.join("home")));
}

// Row 3: primary gid 0; and supplementary groups never survive the drop unless the policy
// names them (tested in `served_process_is_fully_unprivileged`).
#[test]
fn primary_gid_zero_is_refused() {
    let sb = Sandbox::new();
    let u = TestUser::with(&sb, UserSpec { gid: Some(0), ..Default::default() });
    sb.write_policy(&policy_for(&[&u.name]));
    let before = snapshot(&u.home);
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "forbidden-gid");
    assert_eq!(before, snapshot(&u.home));
}

// Row 4: uids outside the range: a system account, `nobody`, and a normal user above a
// lowered `last_valid_uid`.
#[test]
fn uids_out_of_range_are_refused() {
    let sb = Sandbox::new();
    let sys = TestUser::with(&sb, UserSpec { system: true, ..Default::default() });
    assert!(sys.uid < 1000);
    let normal = TestUser::new(&sb);
    sb.write_policy(&format!(
        "[peer.mx1]\nallow_users = [\"{}\", \"nobody\", \"{}\"]\nfirst_valid_uid = 1000\nlast_valid_uid = {}\n\
         mail_location = \"maildir:~/Maildir\"\n",
        sys.name,
        normal.name,
        normal.uid - 1
    ));
    let before = snapshot(&sb.dir.join("home"));
    for name in [sys.name.as_str(), "nobody", normal.name.as_str()] {
        let r = run(&sb.args("mx1"), &sshd_env(), &line(name));
        assert_refused(&sb, &r, "uid-out-of-range");
    }
    assert_eq!(before, snapshot(&sb.dir.join("home")));
}

// Rows 5 and 6: not on this peer's list (but on another peer's), an unknown peer, and a user
// that does not exist: the same answer each time.
#[test]
fn not_allowed_for_this_peer_and_nonexistent() {
    let sb = Sandbox::new();
    let a = TestUser::new(&sb);
    let b = TestUser::new(&sb);
    sb.write_policy(&format!(
        "{}\n[peer.mx2]\nallow_users = [\"{}\"]\nmail_location = \"maildir:~/Maildir\"\n",
        policy_for(&[&a.name]),
        b.name
    ));
    let before = snapshot(&sb.dir.join("home"));
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&b.name));
    assert_refused(&sb, &r, "not-allowed");
    let r = run(&sb.args("mx3"), &sshd_env(), &line(&a.name));
    assert_refused(&sb, &r, "no-peer-rule");
    let r = run(&sb.args("mx1"), &sshd_env(), b"mrwnosuchuser\n");
    assert_refused(&sb, &r, "no-such-user");
    // The peer's own command cannot pick another peer (row 18).
    let mut env = sshd_env();
    env.push(("SSH_ORIGINAL_COMMAND".into(), "--peer mx2".into()));
    let r = run(&sb.args("mx1"), &env, &line(&b.name));
    assert_refused(&sb, &r, "not-allowed");
    assert_eq!(before, snapshot(&sb.dir.join("home")));
    // While the user allowed for mx2 is served through mx2.
    served_with(&sb.args("mx2"), &sshd_env(), &b.name);
}

// Rows 7-10, 12, 13, 15, 17: grammar refusals before any lookup.
#[test]
fn bad_names_are_refused_by_grammar() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name, "alice"]));
    let upper = u.name.to_uppercase();
    let cases: Vec<Vec<u8>> = [
        "../x",
        "a/b",
        ".",
        "..",
        "/root",
        "-u",
        "--help",
        "+",
        "-root",
        "+@grp",
        "0",
        "1000",
        "-1",
        "4294967295",
        upper.as_str(),
        "alice@DOMAIN",
        "alice@example.com",
        "",
        " alice",
        "alice ",
        "\u{430}lice",
        "alice$",
    ]
    .iter()
    .map(|s| line(s))
    .chain([
        b"ali\0ce\n".to_vec(),
        b"alice\r\n".to_vec(),
        b"al\x1bice\n".to_vec(),
        b"al\tice\n".to_vec(),
        format!("{}\r\n", u.name).into_bytes(),
        b"alice\xff\n".to_vec(),
    ])
    .collect();
    let before = snapshot(&sb.dir.join("home"));
    // Run them concurrently: each takes the one-second minimum.
    let handles: Vec<_> = cases
        .into_iter()
        .map(|input| {
            let args = sb.args("mx1");
            std::thread::spawn(move || (input.clone(), run(&args, &sshd_env(), &input)))
        })
        .collect();
    for h in handles {
        let (input, r) = h.join().expect("thread");
        assert_refused(&sb, &r, "bad-name");
        let l = sb.log_line(r.pid).expect("log line");
        assert!(!l.contains('\r') && !l.contains('\0') && !l.contains('\x1b'), "raw bytes in log for {input:?}: {l:?}");
    }
    assert_eq!(before, snapshot(&sb.dir.join("home")));
}

// Rows 11, 14, 15: an over-long line (1 MiB, no LF), no newline then EOF, immediate EOF.
#[test]
fn framing_refusals() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    let start = Instant::now();
    let r = run(&sb.args("mx1"), &sshd_env(), &vec![b'a'; 1 << 20]);
    assert_refused(&sb, &r, "line-too-long");
    assert!(start.elapsed() < Duration::from_secs(5), "the cap must stop reading at once");
    let r = run(&sb.args("mx1"), &sshd_env(), u.name.as_bytes());
    assert_refused(&sb, &r, "eof-before-newline");
    let r = run(&sb.args("mx1"), &sshd_env(), b"");
    assert_refused(&sb, &r, "eof-before-newline");
    assert!(!u.home.join("Maildir").exists());
}

// Row 16: one byte every 5 s; the single deadline (10 s) ends it.
#[test]
fn slow_sender_hits_the_deadline() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    let start = Instant::now();
    let mut child = spawn(&sb.args("mx1"), &sshd_env());
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let name = u.name.clone();
    let writer = std::thread::spawn(move || {
        for b in format!("{name}\n").bytes() {
            if stdin.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(5));
        }
    });
    let out = child.wait_with_output().expect("wait");
    let elapsed = start.elapsed();
    writer.join().expect("writer");
    let r = Run { pid, out, elapsed };
    assert_refused(&sb, &r, "read-timeout");
    assert!(elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(14), "{elapsed:?}");
}

// Row 19: a poisoned environment (sshd's `environment=` or `AcceptEnv`), detected and refused.
#[test]
fn poisoned_environment_is_refused() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libc.so.6 to preload");
    let before = snapshot(&u.home);
    for (k, v) in [
        ("LD_PRELOAD", libc),
        ("LD_LIBRARY_PATH", "/nonexistent"),
        ("GLIBC_TUNABLES", "glibc.malloc.check=0"),
        ("BASH_ENV", "/tmp/x"),
        ("IFS", "x"),
        ("LC_ALL", "../../../tmp/x"),
    ] {
        let mut env = sshd_env();
        env.push((k.into(), v.into()));
        let r = run(&sb.args("mx1"), &env, &line(&u.name));
        assert_refused(&sb, &r, "poisoned-env");
        assert!(sb.log_line(r.pid).unwrap_or_default().contains(k), "log names {k}");
    }
    assert_eq!(before, snapshot(&u.home));
    // A harmless locale passes.
    let mut env = sshd_env();
    env.push(("LANG".into(), "C.UTF-8".into()));
    served_with(&sb.args("mx1"), &env, &u.name);
}

// Row 18: SSH_ORIGINAL_COMMAND is ignored (no shell, no options from it) and logged escaped.
#[test]
fn original_command_is_ignored_and_logged_escaped() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    let marker = sb.dir.join("pwned");
    let mut env = sshd_env();
    // Within the 64 bytes the log shows: an escape sequence, a newline, a command substitution.
    let cmd = format!("\x1b[2Jx;\n$(touch {}) --peer mx2; touch {}", marker.display(), marker.display());
    env.push(("SSH_ORIGINAL_COMMAND".into(), cmd.clone()));
    let r = served_with(&sb.args("mx1"), &env, &u.name);
    assert!(!marker.exists());
    let l = sb.log_line(r.pid).expect("log");
    assert!(l.contains(" peer=mx1 "), "{l}");
    assert!(l.contains(&format!("cmd_len={}", cmd.len())), "{l}");
    assert!(l.contains("cmd=\"\\x1b[2Jx;\\x0a$(touch "), "escaped: {l}");
    assert_eq!(sb.log_text().lines().filter(|x| x.contains(&format!("[{}]", r.pid))).count(), 1);
}

// Rows 21, 22: symlinked home, home owned by someone else, group- or world-writable home.
#[test]
fn bad_homes_are_refused() {
    let sb = Sandbox::new();
    let link = TestUser::with(&sb, UserSpec { no_home: true, ..Default::default() });
    let other = TestUser::new(&sb);
    let rootowned = TestUser::with(&sb, UserSpec { no_home: true, ..Default::default() });
    let gw = TestUser::new(&sb);
    let ww = TestUser::new(&sb);
    // link's home is a symlink to a directory it owns, elsewhere.
    let target = sb.dir.join("elsewhere");
    fs::create_dir(&target).expect("mkdir");
    chown(&target, link.uid, link.gid);
    std::os::unix::fs::symlink(&target, &link.home).expect("symlink");
    // rootowned's home belongs to root; another user's home is no better.
    fs::create_dir(&rootowned.home).expect("mkdir");
    fs::set_permissions(&gw.home, fs::Permissions::from_mode(0o770)).expect("chmod");
    fs::set_permissions(&ww.home, fs::Permissions::from_mode(0o777)).expect("chmod");
    sb.write_policy(&policy_for(&[&link.name, &other.name, &rootowned.name, &gw.name, &ww.name]));
    let before = snapshot(&sb.dir);
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&link.name));
    assert_refused(&sb, &r, "home-symlink");
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&rootowned.name));
    assert_refused(&sb, &r, "home-owner");
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&gw.name));
    assert_refused(&sb, &r, "home-mode");
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&ww.name));
    assert_refused(&sb, &r, "home-mode");
    // Nothing but the auth log and the (root-owned) lock files changed.
    let after = snapshot(&sb.dir);
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, m)| before.get(*p) != Some(m))
        .map(|(p, _)| p.clone())
        .filter(|p| !p.starts_with(sb.dir.join("locks")) && *p != sb.auth_log() && *p != sb.dir)
        .collect();
    assert!(changed.is_empty(), "refused sessions changed {changed:?}");
    // The healthy user next to them is served.
    served(&sb, &other.name);
}

// The policy file and the directories above it must be root's alone.
#[test]
fn untrusted_policy_is_refused() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    served(&sb, &u.name);
    // Group-writable file.
    fs::set_permissions(sb.policy(), fs::Permissions::from_mode(0o664)).expect("chmod");
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "policy-untrusted");
    // Owned by the user.
    fs::set_permissions(sb.policy(), fs::Permissions::from_mode(0o644)).expect("chmod");
    chown(&sb.policy(), u.uid, u.gid);
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "policy-untrusted");
    chown(&sb.policy(), 0, 0);
    // In a world-writable (sticky) directory, and in a group-writable one.
    let d = sb.dir.join("etc");
    fs::create_dir(&d).expect("mkdir");
    fs::copy(sb.policy(), d.join("wrapper.toml")).expect("copy");
    let mut args = sb.args("mx1");
    args[3] = d.join("wrapper.toml").display().to_string();
    for mode in [0o1777, 0o775] {
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).expect("chmod");
        let r = run(&args, &sshd_env(), &line(&u.name));
        assert_refused(&sb, &r, "policy-untrusted");
    }
    // A symlink to a good policy is not followed.
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::remove_file(d.join("wrapper.toml")).expect("rm");
    std::os::unix::fs::symlink(sb.policy(), d.join("wrapper.toml")).expect("symlink");
    let r = run(&args, &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "policy-untrusted");
    // A missing policy, and one with a typo in a key, are refused too.
    args[3] = sb.dir.join("missing.toml").display().to_string();
    let r = run(&args, &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "policy-untrusted");
    sb.write_policy(&policy_for(&[&u.name]).replace("allow_users", "allow_user"));
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "policy-invalid");
}

// Inside the served process: ids on all four fields, only the allowed groups (the user's own
// supplementary group is dropped, the policy's extra group kept), no capabilities in any set,
// NoNewPrivs, umask 077, no core dumps, cwd = home, only the expected descriptors, for every
// thread (the dsync server's reader and writer threads included, checked while the server
// waits for the master's greeting); and the wrapper's own proof (setuid(0) etc. failing) in
// the auth log.
#[test]
fn served_process_is_fully_unprivileged() {
    let sb = Sandbox::new();
    let supp = TestGroup::new();
    let extra = TestGroup::new();
    let u = TestUser::with(&sb, UserSpec { groups: vec![supp.name.clone()], ..Default::default() });
    sb.write_policy(&format!("{}extra_groups = [\"{}\"]\n", policy_for(&[&u.name]), extra.name));
    // A root-only file leaked to the wrapper as an inheritable fd (row 26).
    let secret = sb.dir.join("root-only");
    fs::write(&secret, "secret").expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let leaked = fs::File::open(&secret).expect("open");
    nix::fcntl::fcntl(&leaked, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).expect("clear CLOEXEC");
    let mut live = Live::from_child(spawn(&sb.args("mx1"), &sshd_env()));
    drop(leaked);
    let pid = live.pid;
    live.send(line(&u.name));
    let accept = sb.wait_accept(pid);
    for proof in ["setuid(0)=EPERM", "seteuid(0)=EPERM", "setgid(0)=EPERM", "setegid(0)=EPERM", "setgroups([0])=EPERM"]
    {
        assert!(accept.contains(proof), "{proof} missing: {accept}");
    }
    // The server answers at once with its greeting and handshake, then waits for the master's.
    live.wait_event("the server's handshake", ANSWER, is_handshake);
    assert!(live.out.starts_with(VERSION_LINE), "{}", live.out.escape_ascii());
    assert_server_threads(pid);
    assert_dropped(pid, u.uid, u.gid, &[u.gid, extra.gid]);
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core line");
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert_eq!(fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"), u.home);
    let mut targets = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").flatten() {
        let t = fs::read_link(e.path()).expect("fd link");
        assert_ne!(t, secret, "the leaked root-only fd survived");
        targets.push((e.file_name().to_string_lossy().into_owned(), t));
    }
    // 0-2, the server's duplicates of 0 and 1, the home, the lock; nothing else.
    let lock = sb.dir.join("locks").join(format!("{}.lock", u.name));
    let std_pipes: Vec<_> =
        targets.iter().filter(|(fd, _)| ["0", "1", "2"].contains(&fd.as_str())).map(|(_, t)| t.clone()).collect();
    for (fd, t) in &targets {
        assert!(
            std_pipes.contains(t) || *t == lock || *t == u.home,
            "fd {fd} -> {t:?}: neither a pipe to the peer, the user's lock, nor the home; all: {targets:?}"
        );
    }
    assert!(targets.iter().any(|(_, t)| *t == lock), "{targets:?}");
    assert!(!targets.iter().any(|(_, t)| *t == sb.auth_log()), "the auth log must be closed: {targets:?}");
    // Control for `bytes_after_the_newline_reach_the_server`: without the master's greeting
    // the server sends no tree.
    live.collect_for(Duration::from_millis(500));
    assert!(!decode_server_output(&live.out).iter().any(is_tree_sent), "tree sent before the master's handshake");
    live.send(MasterSession::new(0, 0).all());
    let (status, out, err) = live.finish(ANSWER);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    assert_eq!(err, "");
}

// The wrapper never reads past the username's LF: a master greeting sent in the same write as
// the username reaches the server intact, which proves it by answering with its mailbox tree
// (sent only after it parsed the master's handshake); whole sessions of a few KiB and of about
// 1 MiB after the username run to a clean end and create exactly the mailboxes they announce.
// As a control, the same stream missing its first byte is rejected by the server.
#[test]
fn bytes_after_the_newline_reach_the_server() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name]));
    let maildir = u.home.join("Maildir");

    // The greeting and handshake only, in the username's write; the rest once the server
    // has answered with its tree.
    let session = MasterSession::new(3, 0);
    let mut live = Live::from_child(spawn(&sb.args("mx1"), &sshd_env()));
    let mut first = line(&u.name);
    first.extend_from_slice(&session.greeting);
    live.send(first);
    live.wait_event("the server's tree (after the master's handshake)", ANSWER, is_tree_sent);
    live.send(session.rest.clone());
    let (status, out, err) = live.finish(ANSWER);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    session.assert_created_in(&maildir, u.uid);

    // Whole sessions in the username's write: ~4 KiB (50 mailboxes), ~1 MiB (a deletion log
    // of 22 000 entries: one line just under the decoder's 1 MiB line limit).
    for (boxes, deletions, min_len) in [(50, 0, 4 << 10), (20, 22_000, 900 << 10)] {
        let session = MasterSession::new(boxes, deletions);
        let mut input = line(&u.name);
        input.extend_from_slice(&session.all());
        assert!(input.len() >= min_len, "{} bytes", input.len());
        let r = run(&sb.args("mx1"), &sshd_env(), &input);
        assert_served(&r);
        session.assert_created_in(&maildir, u.uid);
    }

    // Control: one byte short, the stream is not dsync any more, and the server says so.
    let mut input = line(&u.name);
    input.extend_from_slice(&MasterSession::new(0, 0).all()[1..]);
    let r = run(&sb.args("mx1"), &sshd_env(), &input);
    assert_eq!(r.status().code(), Some(75), "{}", r.stderr());
    assert!(r.stderr().contains("invalid input from the remote"), "{}", r.stderr());
}

// Row 27: two sessions of one user never run at once: the second waits `lock_wait_secs`, then
// is refused; the first one, still waiting for its master, then completes; once it ends, a new
// one is served.
#[test]
fn one_session_per_user() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    let v = TestUser::new(&sb);
    sb.write_policy(&policy_for(&[&u.name, &v.name]));
    let mut first = Live::from_child(spawn(&sb.args("mx1"), &sshd_env()));
    first.send(line(&u.name));
    sb.wait_accept(first.pid);
    first.wait_event("the server's handshake", ANSWER, is_handshake);
    let start = Instant::now();
    let r = run(&sb.args("mx1"), &sshd_env(), &line(&u.name));
    assert_refused(&sb, &r, "lock-busy");
    assert!(start.elapsed() >= Duration::from_secs(2), "waited {:?}", start.elapsed());
    // Another user is not blocked.
    served(&sb, &v.name);
    first.send(MasterSession::new(1, 0).all());
    let (status, out, err) = first.finish(ANSWER);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    served(&sb, &u.name);
}

// Virtual users from a root-owned Dovecot passwd-file: `local@domain` is accepted only there,
// mapped to the file's uid; a passwd-file others could write is refused.
#[test]
fn virtual_users_from_a_trusted_passwd_file() {
    let sb = Sandbox::new();
    let vmail = TestUser::new(&sb);
    let vhome = sb.dir.join("vmail-alice");
    fs::create_dir(&vhome).expect("mkdir");
    chown(&vhome, vmail.uid, vmail.gid);
    fs::set_permissions(&vhome, fs::Permissions::from_mode(0o700)).expect("chmod");
    // The virtual users' mail root, owned by the vmail user. The store creates the Maildir
    // itself but not missing parents (Dovecot would), so the domain directory exists already.
    let vroot = sb.dir.join("vmail");
    fs::create_dir_all(vroot.join("example.com")).expect("mkdir");
    chown(&vroot, vmail.uid, vmail.gid);
    chown(&vroot.join("example.com"), vmail.uid, vmail.gid);
    let users = sb.dir.join("users");
    fs::write(
        &users,
        format!(
            "alice@example.com:{{PLAIN}}x:{}:{}::{}::\nroot@example.com:x:0:0::/root::\n",
            vmail.uid,
            vmail.gid,
            vhome.display()
        ),
    )
    .expect("write users");
    fs::set_permissions(&users, fs::Permissions::from_mode(0o640)).expect("chmod");
    sb.write_policy(&format!(
        "[peer.mx1]\nallow_users = [\"alice@example.com\", \"root@example.com\"]\n\
         mail_location = \"maildir:{}/%d/%n\"\nuserdb = \"passwd-file:{}\"\n",
        vroot.display(),
        users.display()
    ));
    let mut live = Live::from_child(spawn(&sb.args("mx1"), &sshd_env()));
    let pid = live.pid;
    live.send(b"alice@example.com\n".to_vec());
    let accept = sb.wait_accept(pid);
    let maildir = vroot.join("example.com").join("alice");
    assert!(accept.contains(&format!("maildir=\"{}\"", maildir.display())), "{accept}");
    live.wait_event("the server's handshake", ANSWER, is_handshake);
    assert_server_threads(pid);
    assert_dropped(pid, vmail.uid, vmail.gid, &[vmail.gid]);
    let session = MasterSession::new(1, 0);
    live.send(session.all());
    let (status, out, err) = live.finish(ANSWER);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    session.assert_created_in(&maildir, vmail.uid);
    let r = run(&sb.args("mx1"), &sshd_env(), b"root@example.com\n");
    assert_refused(&sb, &r, "forbidden-uid");
    let r = run(&sb.args("mx1"), &sshd_env(), b"Alice@example.com\n");
    assert_refused(&sb, &r, "bad-name");
    fs::set_permissions(&users, fs::Permissions::from_mode(0o664)).expect("chmod");
    let r = run(&sb.args("mx1"), &sshd_env(), b"alice@example.com\n");
    assert_refused(&sb, &r, "lookup-failed");
}

// `--check`: the decision and reason for one user, with the real drop behind the answer.
#[test]
fn check_mode_prints_the_decision() {
    let sb = Sandbox::new();
    let u = TestUser::new(&sb);
    sb.write_policy(&format!(
        "{}\n[peer.mx2]\nallow_users = []\nmail_location = \"maildir:~/Maildir\"\n",
        policy_for(&[&u.name])
    ));
    let check = |extra: &[&str]| {
        let mut args = vec![
            "--check".to_owned(),
            "--policy".to_owned(),
            sb.policy().display().to_string(),
            "--auth-log".to_owned(),
            sb.auth_log().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(WRAPPER).args(&args).env_clear().env("PATH", "/usr/bin:/bin").output().expect("run --check")
    };
    let out = check(&["--peer", "mx1", &u.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": allow") && text.contains("setuid(0)=EPERM") && text.contains("nnp=1"), "{text}");
    let out = check(&[&u.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("peer mx1 user \"{}\": allow uid={}", u.name, u.uid)), "{text}");
    assert!(text.contains("peer mx2") && text.contains("deny reason=not-allowed"), "{text}");
    let out = check(&["--peer", "mx1", "root"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deny reason=forbidden-uid"));
    // Not root: refused before anything else.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", WRAPPER, "--check", &u.name])
        .env_clear()
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(126));
    assert_eq!(String::from_utf8_lossy(&out.stderr), DENIED);
}
