//! Benchmark (run by hand, as root, after `cargo build --release -p mailreplica-wrapper`):
//!
//! ```text
//! cargo run --release -p mailreplica-wrapper --example ssh_latency [RUNS]
//! ```
//!
//! Through a real sshd on 127.0.0.1, with one persistent SSH connection per key
//! (`ControlMaster`), so each run opens only a new session channel: that isolates "channel
//! open → ready to serve" from the key exchange. Compares:
//!
//! * mailreplica-wrapper: `ssh` start → the wrapper's `accept` auth-log line (written just
//!   before `serve::run`; microsecond UTC timestamp, same clock), and `ssh` start → `ssh` exit
//!   when the username is followed by EOF;
//! * the upstream shell wrapper `read username; exec doveadm dsync-server -u $username`:
//!   `ssh` start → the first byte of doveadm's dsync handshake at the client.
//!
//! Also the same without connection reuse (a full SSH handshake per run), and both commands
//! spawned directly without ssh. Prints medians.
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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wrapper_common::*;

fn micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// `2026-11-28T12:47:59.764449Z` → microseconds since the epoch.
fn parse_ts(s: &str) -> i64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().expect("timestamp digits");
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (hh, mm, ss, us) = (n(11, 13), n(14, 16), n(17, 19), n(20, 26));
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + us
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let sb = Sandbox::new();
    let user = TestUser::new(&sb);
    sb.write_policy(&format!("[peer.mx1]\nallow_users = [\"{}\"]\nmail_location = \"maildir:~/Maildir\"\n", user.name));

    // A private Dovecot (auth service only) for doveadm's userdb lookups.
    let drun = sb.dir.join("dovecot-run");
    fs::create_dir(&drun).expect("mkdir");
    let conf = sb.dir.join("dovecot.conf");
    fs::write(
        &conf,
        format!(
            "protocols =\nbase_dir = {}\nlog_path = {}\nssl = no\nmail_location = maildir:~/Maildir\n\
             first_valid_uid = 1000\npassdb {{\n  driver = passwd\n}}\nuserdb {{\n  driver = passwd\n}}\n",
            drun.display(),
            sb.dir.join("dovecot.log").display()
        ),
    )
    .expect("dovecot.conf");
    let dovecot = Command::new("dovecot")
        .args(["-F", "-c"])
        .arg(&conf)
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dovecot is missing (apt-get install dovecot-core)");
    let _dovecot = KillOnDrop(dovecot);
    let until = Instant::now() + Duration::from_secs(10);
    while !drun.join("auth-userdb").exists() {
        assert!(Instant::now() < until, "dovecot did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let upstream = sb.dir.join("upstream.sh");
    fs::write(
        &upstream,
        format!("#!/bin/sh\nread username\nexec doveadm -c {} dsync-server -u $username\n", conf.display()),
    )
    .expect("upstream.sh");
    fs::set_permissions(&upstream, fs::Permissions::from_mode(0o755)).expect("chmod");

    let keys = SshKeys::new(&sb, 2);
    let ak = format!(
        "restrict,command=\"{WRAPPER} {}\" {}\nrestrict,command=\"{}\" {}\n",
        sb.args("mx1").join(" "),
        keys.client_pub(0),
        upstream.display(),
        keys.client_pub(1)
    );
    let sshd = Sshd::start(&keys, "bench", &ak, "MaxSessions 100\nMaxStartups 100");

    let masters: Vec<(KillOnDrop, PathBuf)> = (0..2)
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
        c.args(["root@127.0.0.1", "x"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    };

    // Without ssh: what differs between the two is only what runs after sshd's fork.
    let (mut ours_direct, mut inside_direct, mut theirs_direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let before = sb.log_text().lines().count();
        let r = run(&sb.args("mx1"), &sshd_env(), format!("{}\n", user.name).as_bytes());
        assert_eq!(r.status().code(), Some(69), "{}", r.stderr());
        ours_direct.push(r.elapsed.as_secs_f64() * 1e3);
        let text = sb.log_text();
        let line = text.lines().skip(before).find(|l| l.contains(": accept ")).expect("accept line");
        let us = line.split(" pre_serve_us=").nth(1).and_then(|r| r.split(' ').next()).expect("pre_serve_us");
        inside_direct.push(us.parse::<f64>().expect("number") / 1e3);
        let start = Instant::now();
        let mut child = Command::new("/bin/sh")
            .arg(&upstream)
            .env_clear()
            .envs(sshd_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{}\n", user.name).as_bytes()).expect("write");
        let mut first = [0u8; 1];
        let n = child.stdout.as_mut().expect("stdout").read(&mut first).expect("read");
        theirs_direct.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(n, 1);
        drop(stdin);
        let _ = child.wait_with_output();
    }
    println!(
        "no ssh, spawned directly ({runs} runs each, median ms): wrapper spawn to exit after EOF {:.2} \
         (its own start-to-serve {:.2}) | upstream sh+doveadm spawn to first byte {:.2}",
        median(&mut ours_direct),
        median(&mut inside_direct),
        median(&mut theirs_direct)
    );

    for reuse in [true, false] {
        let (mut ours_serve, mut ours_exit, mut theirs_first) = (Vec::new(), Vec::new(), Vec::new());
        let mut inside = Vec::new();
        for _ in 0..runs {
            // Ours: username then EOF; serve step reached = the accept line.
            let before = sb.log_text().lines().count();
            let t0 = micros_now();
            let start = Instant::now();
            let mut child = session(0, reuse.then(|| masters[0].1.as_path())).spawn().expect("ssh");
            child.stdin.take().expect("stdin").write_all(format!("{}\n", user.name).as_bytes()).expect("write");
            let out = child.wait_with_output().expect("wait");
            ours_exit.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
            let text = sb.log_text();
            let line = text.lines().skip(before).find(|l| l.contains(": accept ")).expect("accept line");
            ours_serve.push((parse_ts(line) - t0) as f64 / 1e3);
            let us = line.split(" pre_serve_us=").nth(1).and_then(|r| r.split(' ').next()).expect("pre_serve_us");
            inside.push(us.parse::<f64>().expect("number") / 1e3);

            // Upstream: the first byte of doveadm's handshake at the client.
            let start = Instant::now();
            let mut child = session(1, reuse.then(|| masters[1].1.as_path())).spawn().expect("ssh");
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(format!("{}\n", user.name).as_bytes()).expect("write");
            let mut first = [0u8; 1];
            let n = child.stdout.as_mut().expect("stdout").read(&mut first).expect("read");
            theirs_first.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!((n, first[0]), (1, b'V'), "doveadm's handshake starts with VERSION");
            drop(stdin);
            let _ = child.wait_with_output();
        }
        println!(
            "{} ({runs} runs each, median ms): wrapper serve step {:.2} | wrapper ssh exit after EOF {:.2} | \
             upstream shell+doveadm first byte {:.2} | wrapper's own start-to-serve {:.2}",
            if reuse { "channel on an open connection" } else { "new connection per run" },
            median(&mut ours_serve),
            median(&mut ours_exit),
            median(&mut theirs_first),
            median(&mut inside)
        );
    }
    drop(masters);
}
