//! End to end through a real OpenSSH sshd on 127.0.0.1 (WRAPPER-SECURITY §5.3): root's
//! `authorized_keys` carries `restrict,command="mailreplica-wrapper --peer …"`, `ssh
//! root@127.0.0.1` reaches the wrapper, which drops to the user and serves dsync on the SSH
//! channel. (Real Dovecot as the sender through this path: `wrapper_e2e.rs`.)

mod wrapper_common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use mailreplica::dsync::wire::{Event, Record};
use wrapper_common::*;

/// How long the served process may take to answer through ssh on a loaded machine.
const ANSWER: Duration = Duration::from_secs(30);

fn command_line(sb: &Sandbox, peer: &str) -> String {
    format!("{WRAPPER} {}", sb.args(peer).join(" "))
}

fn setup() -> (Sandbox, TestUser, TestUser, SshKeys) {
    let sb = Sandbox::new();
    let alice = TestUser::new(&sb);
    let bob = TestUser::new(&sb);
    sb.write_policy(&format!(
        "[peer.mx1]\nallow_users = [\"{}\", \"root\"]\nmail_location = \"maildir:~/Maildir\"\n\n\
         [peer.mx2]\nallow_users = [\"{}\"]\nmail_location = \"maildir:~/Maildir\"\n",
        alice.name, bob.name
    ));
    let keys = SshKeys::new(&sb, 2);
    (sb, alice, bob, keys)
}

#[test]
fn forced_command_reaches_the_wrapper_which_drops_to_the_user() {
    let (sb, alice, _bob, keys) = setup();
    let ak = format!("restrict,command=\"{}\" {}\n", command_line(&sb, "mx1"), keys.client_pub(0));
    let sshd = Sshd::start(&keys, "a", &ak, "");
    let mut cmd = sshd.ssh(&keys.clients[0]);
    cmd.arg("root@127.0.0.1").arg("whatever the peer asks; rm -rf /");
    let mut live = Live::start(cmd);
    // The name and the master's greeting and handshake in one write, as doveadm does.
    let session = MasterSession::new(2, 0);
    let mut first = format!("{}\n", alice.name).into_bytes();
    first.extend_from_slice(&session.greeting);
    live.send(first);
    let accept = wait_log_line(&sb, &[": accept ", &format!("user=\"{}\"", alice.name)]);
    let pid = log_pid(&accept);
    assert!(accept.contains(&format!(" 127.0.0.1 {}\"", sshd.port)), "SSH_CONNECTION logged: {accept}");
    assert!(accept.contains("cmd=\"whatever the peer asks; rm -rf /\""), "{accept}");
    // Through the SSH channel: the server's greeting, then its tree, which it sends only
    // after it parsed the master's handshake that followed the username.
    live.wait_event("the server's tree", ANSWER, |e| matches!(e, Event::Record(Record::MailboxDeletes(_))));
    assert!(live.out.starts_with(VERSION_LINE), "{}", live.out.escape_ascii());
    // The served process, seen from outside while it waits for the rest of the stream: every
    // thread (main, dsync-read, dsync-write).
    assert_server_threads(pid);
    assert_dropped(pid, alice.uid, alice.gid, &[alice.gid]);
    live.send(session.rest.clone());
    let (status, out, err) = live.finish(ANSWER);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    session.assert_created_in(&alice.home.join("Maildir"), alice.uid);
    let log = sshd.log_text();
    assert!(log.contains("Root login accepted for forced command"), "{log}");
}

#[test]
fn refusals_through_ssh_look_uniform() {
    let (sb, _alice, bob, keys) = setup();
    let ak = format!("restrict,command=\"{}\" {}\n", command_line(&sb, "mx1"), keys.client_pub(0));
    let sshd = Sshd::start(&keys, "b", &ak, "");
    let marker = sb.dir.join("pwned");
    for (input, cmd, reason) in [
        ("root\n".to_owned(), "x".to_owned(), "forbidden-uid"),
        ("../etc\n".to_owned(), "x".to_owned(), "bad-name"),
        // Allowed for mx2 only; the peer's command cannot switch the peer or run anything.
        (format!("{}\n", bob.name), format!("x --peer mx2; touch {}", marker.display()), "not-allowed"),
    ] {
        let mut child = sshd
            .ssh(&keys.clients[0])
            .arg("root@127.0.0.1")
            .arg(&cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(126), "{input:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty());
        assert_eq!(String::from_utf8_lossy(&out.stderr), DENIED);
        wait_log_line(&sb, &[": deny ", &format!(" reason={reason} "), " peer=mx1 "]);
    }
    assert!(!marker.exists());
}

#[test]
fn restrict_denies_pty_and_forwarding() {
    let (sb, alice, _bob, keys) = setup();
    let ak = format!("restrict,command=\"{}\" {}\n", command_line(&sb, "mx1"), keys.client_pub(0));
    let sshd = Sshd::start(&keys, "c", &ak, "");
    // A pty is refused.
    let mut child = sshd
        .ssh(&keys.clients[0])
        .args(["-tt", "root@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh -tt");
    child.stdin.take().expect("stdin").write_all(format!("{}\n", alice.name).as_bytes()).expect("write");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PTY allocation request failed"), "{err}");
    assert!(!sshd.log_text().contains("Allocated pty"), "{}", sshd.log_text());
    // Remote forwarding is refused.
    let out = sshd
        .ssh(&keys.clients[0])
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:9", "root@127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .expect("ssh -R");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forwarding failed"), "{:?}", out);
    // Local forwarding: the tunnel listens on the client, but sshd refuses every channel.
    let lport = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let fwd = sshd
        .ssh(&keys.clients[0])
        .args(["-N", "-L", &format!("127.0.0.1:{lport}:127.0.0.1:{}", sshd.port)])
        .arg("root@127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh -L");
    let mut fwd = KillOnDrop(fwd);
    let mut conn = None;
    for _ in 0..250 {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", lport)) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = conn.expect("the local end of the tunnel never listened");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 64];
    // Through a working tunnel we would read sshd's banner; a refused channel is closed.
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "forwarded data arrived: {:?}", &buf);
    let _ = fwd.0.kill();
    let mut err = String::new();
    fwd.0.stderr.take().expect("stderr").read_to_string(&mut err).expect("read");
    let log = sshd.log_text();
    assert!(log.contains("refused local port forward"), "{err}\n{log}");
}

#[test]
fn environment_option_is_ignored_by_sshd_and_refused_by_the_wrapper() {
    let (sb, alice, _bob, keys) = setup();
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libc.so.6 to preload");
    let ak = format!(
        "environment=\"LD_PRELOAD={libc}\",restrict,command=\"{}\" {}\n",
        command_line(&sb, "mx1"),
        keys.client_pub(1)
    );
    let run_once = |sshd: &Sshd| {
        let mut cmd = sshd.ssh(&keys.clients[1]);
        cmd.arg("root@127.0.0.1");
        let live = Live::start(cmd);
        let mut input = format!("{}\n", alice.name).into_bytes();
        input.extend_from_slice(&MasterSession::new(0, 0).all());
        live.send(input);
        live.finish(ANSWER)
    };
    // As deployed (PermitUserEnvironment no): sshd drops the variable; the session is served.
    let sshd = Sshd::start(&keys, "d", &ak, "");
    let (status, out, err) = run_once(&sshd);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_full_server_session(&out);
    drop(sshd);
    // A misconfigured sshd passes it on: the wrapper refuses.
    let sshd = Sshd::start(&keys, "e", &ak, "PermitUserEnvironment yes");
    let (status, out, err) = run_once(&sshd);
    assert_eq!(status.code(), Some(126));
    assert_eq!(err, DENIED);
    assert!(out.is_empty());
    wait_log_line(&sb, &[": deny ", " reason=poisoned-env ", "LD_PRELOAD"]);
}
