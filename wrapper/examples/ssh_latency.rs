//! Benchmark (run by hand, as root, after `cargo build --release --workspace`):
//!
//! ```text
//! cargo run --release -p mailreplica-wrapper --example ssh_latency [RUNS]
//! ```
//!
//! Time to the first dsync byte answered, for the two forced commands a receiving server can
//! put in root's `authorized_keys`, on the same sshd (127.0.0.1), for the same user and Maildir:
//!
//! * `mailreplica-wrapper --peer mx1 …` (reads the name, checks, drops, serves dsync
//!   in-process);
//! * the upstream shell wrapper `read username; exec doveadm dsync-server -u "$username"`
//!   (with `-c` pointing at a private Dovecot daemon, which doveadm needs for `-u`).
//!
//! For each run the client writes `USER\n` (what `doveadm … remoteprefix:` sends first) and
//! the clock stops when the first byte of the server's `VERSION` line arrives; then the client
//! closes its side and waits for the session to end (both servers exit on EOF). Three ways:
//!
//! * a new session channel on an open SSH connection (`ControlMaster`): `ssh -S` start → first
//!   byte, i.e. channel open, sshd's session setup, root's shell running the forced command,
//!   the command itself, and the byte's way back;
//! * a new SSH connection per run (key exchange and authentication included);
//! * no ssh: the forced command spawned directly with sshd's environment, spawn → first byte.
//!
//! The two commands alternate run by run. Over ssh, a third key whose forced command is just
//! `echo VERSION` gives the floor: what sshd, root's shell and the ssh client cost by
//! themselves. Prints the median, 10th and 90th percentile of each.
//!
//! The release profile aborts on panic, so a failed run skips the destructors: its sshd,
//! Dovecot and ssh control masters (all under `/run/mailreplica-wrapper-tests/PIDxN/`) must then
//! be stopped by hand; the next test run deletes its user and directory.
#![allow(missing_docs)]

#[path = "../tests/wrapper_common/mod.rs"]
mod wrapper_common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrapper_common::*;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (median, 10th percentile, 90th percentile).
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

/// The runs are paired (the commands alternate), so load that drifts during the benchmark
/// hits both alike: the median of the per-pair differences, and how often the wrapper won.
fn paired(ours: &[f64], theirs: &[f64]) -> String {
    let mut d: Vec<f64> = ours.iter().zip(theirs).map(|(o, t)| t - o).collect();
    let wins = d.iter().filter(|x| **x > 0.0).count();
    let (m, p10, p90) = stats(&mut d);
    format!(
        "upstream minus wrapper, per pair: median {m:.2} (p10 {p10:.2}, p90 {p90:.2}); wrapper faster in {wins}/{}",
        d.len()
    )
}

fn show(label: &str, v: &mut [f64]) -> String {
    let (m, p10, p90) = stats(v);
    format!("{label} {m:.2} (p10 {p10:.2}, p90 {p90:.2})")
}

/// Starts `cmd` (stdin/stdout piped, stderr discarded), writes `USER\n`, and returns the time
/// from just before the spawn to the first byte on stdout; then closes stdin and waits.
fn first_byte(mut cmd: Command, user: &str) -> Duration {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(format!("{user}\n").as_bytes()).expect("write the username");
    let mut first = [0u8; 1];
    let n = child.stdout.as_mut().expect("stdout").read(&mut first).expect("read");
    let t = start.elapsed();
    assert_eq!((n, first[0]), (1, b'V'), "{cmd:?}: a dsync server starts with VERSION");
    drop(stdin);
    let mut rest = Vec::new();
    let _ = child.stdout.as_mut().expect("stdout").read_to_end(&mut rest);
    let _ = child.wait();
    t
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let sb = Sandbox::new();
    let user = TestUser::new(&sb);
    sb.write_policy(&format!("[peer.mx1]\nallow_users = [\"{}\"]\nmail_location = \"maildir:~/Maildir\"\n", user.name));
    let dovecot = Dovecot::start(&sb, "maildir:~/Maildir");
    // The same small Maildir for both servers.
    for i in 0..10 {
        let mut save = dovecot.doveadm();
        save.args(["save", "-u", &user.name]);
        let mut live = Live::start(save);
        live.send(format!("Subject: mail {i}\n\nbody {i}\n").into_bytes());
        live.close_input();
        let (status, _, err) = live.finish(Duration::from_secs(60));
        assert!(status.success(), "doveadm save: {err}");
    }

    let upstream = sb.dir.join("upstream.sh");
    fs::write(
        &upstream,
        format!("#!/bin/sh\nread username\nexec doveadm -c {} dsync-server -u \"$username\"\n", dovecot.conf.display()),
    )
    .expect("upstream.sh");
    fs::set_permissions(&upstream, fs::Permissions::from_mode(0o755)).expect("chmod");

    let keys = SshKeys::new(&sb, 3);
    let ak = format!(
        "restrict,command=\"{WRAPPER} {}\" {}\nrestrict,command=\"{}\" {}\nrestrict,command=\"echo VERSION\" {}\n",
        sb.args("mx1").join(" "),
        keys.client_pub(0),
        upstream.display(),
        keys.client_pub(1),
        keys.client_pub(2)
    );
    let sshd = Sshd::start(&keys, "bench", &ak, "MaxSessions 100\nMaxStartups 100");

    let masters: Vec<(KillOnDrop, PathBuf)> = (0..3)
        .map(|i| {
            let ctl = keys.dir.join(format!("ctl{i}"));
            let m = sshd
                .ssh(&keys.clients[i])
                .args(["-N", "-o", "ControlMaster=yes", "-S"])
                .arg(&ctl)
                .arg("root@127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ssh master");
            let until = Instant::now() + Duration::from_secs(10);
            while !ctl.exists() {
                assert!(Instant::now() < until, "control master did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            (KillOnDrop(m), ctl)
        })
        .collect();

    let session = |key: usize, ctl: Option<&Path>| {
        let mut c = sshd.ssh(&keys.clients[key]);
        if let Some(ctl) = ctl {
            c.args(["-o", "ControlMaster=no", "-S"]).arg(ctl);
        }
        c.args(["root@127.0.0.1", "x"]);
        c
    };
    let direct_wrapper = || {
        let mut c = Command::new(WRAPPER);
        c.args(sb.args("mx1")).env_clear().envs(sshd_env());
        c
    };
    let direct_upstream = || {
        let mut c = Command::new("/bin/sh");
        c.arg(&upstream).env_clear().envs(sshd_env());
        c
    };

    // Warm-up: page cache, Dovecot's auth process, sshd.
    for _ in 0..3 {
        first_byte(direct_wrapper(), &user.name);
        first_byte(direct_upstream(), &user.name);
        first_byte(session(0, Some(&masters[0].1)), &user.name);
        first_byte(session(1, Some(&masters[1].1)), &user.name);
        first_byte(session(2, Some(&masters[2].1)), &user.name);
    }

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(ms(first_byte(direct_wrapper(), &user.name)));
        theirs.push(ms(first_byte(direct_upstream(), &user.name)));
    }
    let diff = paired(&ours, &theirs);
    println!(
        "no ssh, spawn -> first byte ({runs} runs each, ms): {} | {} | {diff}",
        show("mailreplica-wrapper", &mut ours),
        show("upstream sh + doveadm dsync-server", &mut theirs)
    );
    for reuse in [true, false] {
        let (mut ours, mut theirs, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        let ctl = |i: usize| reuse.then(|| masters[i].1.as_path());
        for _ in 0..runs {
            ours.push(ms(first_byte(session(0, ctl(0)), &user.name)));
            theirs.push(ms(first_byte(session(1, ctl(1)), &user.name)));
            floor.push(ms(first_byte(session(2, ctl(2)), &user.name)));
        }
        let diff = paired(&ours, &theirs);
        println!(
            "{}, ssh start -> first byte ({runs} runs each, ms): {} | {} | {} | {diff}",
            if reuse { "new channel on an open connection" } else { "new connection per run" },
            show("mailreplica-wrapper", &mut ours),
            show("upstream sh + doveadm dsync-server", &mut theirs),
            show("floor (echo VERSION)", &mut floor)
        );
    }
    // The wrapper's own time from its first instruction to the serve step (auth log).
    let mut inside: Vec<f64> = sb
        .log_text()
        .lines()
        .filter_map(|l| l.split(" pre_serve_us=").nth(1)?.split(' ').next()?.parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    println!("{}", show("wrapper start -> serve step, all sessions (ms):", &mut inside));
    drop(masters);
}
