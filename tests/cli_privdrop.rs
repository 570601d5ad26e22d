//! `mailreplica -u USER` as root drops privileges with the wrapper's own drop
//! (`mailreplica::privdrop`) and ends in the same proven state. Checked from outside, the way
//! the wrapper's "served process is fully unprivileged" test does it: a `dsync-server` that
//! waits for its master's greeting is inspected through `/proc/PID/task/*/status`, every
//! thread of it, the server's reader and writer threads included.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::TestUser;

/// The first line a dsync server sends, at once, without waiting for the master.
const VERSION_LINE: &[u8] = b"VERSION\tdsync\t3\t5\n";
/// How long the server may take to start and answer.
const ANSWER: Duration = Duration::from_secs(20);

/// Kills and reaps the server if the test fails before it ends it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(|v| v.trim().to_owned())
}

/// `comm` of every thread of `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

#[test]
fn dsync_server_with_u_as_root_is_fully_unprivileged() {
    let u = TestUser::new();
    let mut cmd = u.mr_cmd(&["dsync-server"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut server = KillOnDrop(cmd.spawn().expect("start mailreplica"));
    let pid = server.0.id();
    // The root it was started as had supplementary groups of its own; none may survive.
    let root_groups = fs::read_to_string("/proc/self/status").ok().and_then(|s| status_field(&s, "Groups"));

    let mut stdout = server.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < VERSION_LINE.len() {
        let left = ANSWER.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(chunk) => out.extend(chunk),
            Err(e) => panic!("no greeting from the server within {ANSWER:?} ({e}); got {:?}", out.escape_ascii()),
        }
    }
    assert!(out.starts_with(VERSION_LINE), "the server's first line: {}", out.escape_ascii());

    // The server now waits for the master, with its reader and writer threads started after
    // the drop; wait until they show, so that they are checked too.
    let names = loop {
        let names = thread_names(pid);
        if names.iter().any(|n| n == "dsync-read") && names.iter().any(|n| n == "dsync-write") {
            break names;
        }
        assert!(start.elapsed() < ANSWER, "the server's threads never appeared: {names:?}");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(names.len() >= 3, "threads of {pid}: {names:?}");

    let mut files = vec![format!("/proc/{pid}/status")];
    for e in fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        files.push(e.path().join("status").display().to_string());
    }
    let four = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    for f in &files {
        let st = fs::read_to_string(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(status_field(&st, "Uid"), Some(four(u.uid)), "{f}");
        assert_eq!(status_field(&st, "Gid"), Some(four(u.gid)), "{f}");
        assert_eq!(status_field(&st, "Groups"), Some(u.gid.to_string()), "{f} (root had {root_groups:?})");
        for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&st, k).as_deref(), Some("0000000000000000"), "{k} in {f}");
        }
        assert_eq!(status_field(&st, "NoNewPrivs").as_deref(), Some("1"), "{f}");
    }
    // Not dumpable: the kernel makes the process's private /proc files (all but the
    // world-readable directories) root's although the process is the user's, so the user can
    // neither ptrace it nor read its memory or environment.
    for f in ["environ", "mem", "fd"] {
        let path = format!("/proc/{pid}/{f}");
        assert_eq!(fs::metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}")).uid(), 0, "{path}");
    }

    // End of input before the master's greeting ends the session, as it does for Dovecot's.
    drop(server.0.stdin.take());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.0.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < ANSWER, "the server did not end at end of input");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
}
