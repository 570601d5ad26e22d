//! Our writer and Dovecot's at the same time, and our writer killed at random points: nothing
//! acknowledged is lost, no partial mail becomes visible, no UID is ever reused or given out
//! twice, and both tools agree afterwards. What killed writers leave in `tmp/` is cleaned up,
//! and a mailbox deleted while Dovecot delivers into it loses no delivered mail. Every test
//! runs as root with its own throw-away user (see `common`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Output, Proc, Rng, TestUser, Tool, read_uidlist};

/// Names in `dir` that our writer makes (`<secs>.M<usecs>P<pid>Q<n>.<host>`), with their pid.
fn our_tmp_files(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        let Some((_, rest)) = name.split_once(".M") else { continue };
        let Some((_, rest)) = rest.split_once('P') else { continue };
        let Some((pid, rest)) = rest.split_once('Q') else { continue };
        if rest.contains('.')
            && let Ok(pid) = pid.parse()
        {
            out.push((name.clone(), pid));
        }
    }
    out
}

/// Every (UID → GUID) pair seen so far; a UID seen again with another GUID is a reused UID.
#[derive(Default)]
struct UidHistory(Mutex<BTreeMap<u32, (String, String)>>);

impl UidHistory {
    /// Records what one `fetch 'uid guid'` showed (`who` names the tool and moment).
    #[track_caller]
    fn record(&self, who: &str, rows: &[Vec<String>]) {
        let mut seen = self.0.lock().unwrap();
        for r in rows {
            let uid: u32 = r[0].parse().unwrap();
            match seen.get(&uid) {
                Some((g, first)) => {
                    assert_eq!(g, &r[1], "UID {uid} was {g} (seen by {first}) and is now {} (seen by {who})", r[1])
                }
                None => {
                    seen.insert(uid, (r[1].clone(), who.to_owned()));
                }
            }
        }
        let guids: std::collections::HashSet<&String> = rows.iter().map(|r| &r[1]).collect();
        assert_eq!(guids.len(), rows.len(), "{who}: one GUID under two UIDs: {rows:?}");
    }
}

fn uid_guid(u: &TestUser, tool: Tool) -> Vec<Vec<String>> {
    // Waiting out a dead process's lock takes two seconds; anything near a minute is a stall
    // (an empty lock file would cost Dovecot its two-minute stale timeout).
    let cmd = u.cmd(tool, &["-f", "tab", "fetch", "uid guid", "mailbox", "INBOX", "all"]);
    let out = Proc::spawn(cmd, None).wait_timeout(Duration::from_secs(30)).ok();
    if tool == Tool::Dovecot {
        common::assert_quiet_dovecot(&out);
    }
    let rows = common::parse_tab(&out.text(), &["uid", "guid"]);
    let uids: Vec<u32> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(uids.windows(2).all(|w| w[0] < w[1]), "{tool:?}: UIDs not ascending: {uids:?}");
    rows
}

/// How many times each marker occurs as a `Subject:` in the texts of all mails, as `tool`
/// reads them.
fn subject_counts(u: &TestUser, tool: Tool) -> HashMap<String, usize> {
    let out = u.run(tool, &["-f", "tab", "fetch", "text", "mailbox", "INBOX", "all"]).ok();
    let mut counts = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(m) = line.strip_prefix("Subject: ") {
            *counts.entry(m.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn concurrent_writers_lose_nothing() {
    const OURS: usize = 3;
    const DOVECOT: usize = 2;
    const EACH: usize = 40;
    let u = Arc::new(TestUser::new());
    // The mailbox exists before the storm (so that creating INBOX is not part of it).
    u.save(Tool::Dovecot, "INBOX", &common::mail("seed"));
    let history = Arc::new(UidHistory::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (tool, n) in [(Tool::Ours, OURS), (Tool::Dovecot, DOVECOT)] {
        for t in 0..n {
            let u = Arc::clone(&u);
            writers.push(thread::spawn(move || {
                let mut outs: Vec<Output> = Vec::new();
                for i in 0..EACH {
                    let marker = format!("{tool:?}-{t}-{i}");
                    outs.push(u.run_in(tool, &["save"], &common::mail(&marker)));
                }
                outs
            }));
        }
    }
    // Readers of both kinds during the storm: their syncs assign UIDs to mails the writers
    // left without one, and what they see must never contradict itself.
    let mut readers = Vec::new();
    for tool in [Tool::Ours, Tool::Dovecot] {
        let (u, history, done) = (Arc::clone(&u), Arc::clone(&history), Arc::clone(&done));
        readers.push(thread::spawn(move || {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                history.record(&format!("{tool:?} reader #{n}"), &uid_guid(&u, tool));
                n += 1;
            }
            n
        }));
    }
    // Join every thread before looking at any result: a panic propagated while other threads
    // still hold the user would skip its cleanup.
    let written: Vec<_> = writers.into_iter().map(thread::JoinHandle::join).collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let read: Vec<_> = readers.into_iter().map(thread::JoinHandle::join).collect();
    for w in written {
        for out in w.unwrap_or_else(|p| std::panic::resume_unwind(p)) {
            assert!(out.success(), "a save failed: {}", out.describe());
            assert!(
                !out.stderr.contains("Error") && !out.stderr.contains("Warning") && !out.stderr.contains("WARN"),
                "a save complained: {}",
                out.describe()
            );
        }
    }
    for r in read {
        assert!(r.unwrap_or_else(|p| std::panic::resume_unwind(p)) > 0, "a reader never ran");
    }

    let total = 1 + (OURS + DOVECOT) * EACH;
    for tool in [Tool::Ours, Tool::Dovecot, Tool::Ours] {
        let rows = uid_guid(&u, tool);
        history.record(&format!("{tool:?} at the end"), &rows);
        assert_eq!(rows.len(), total, "{tool:?} sees {} mails, {total} were saved", rows.len());
    }
    for tool in [Tool::Ours, Tool::Dovecot] {
        let counts = subject_counts(&u, tool);
        assert_eq!(counts.len(), total, "{tool:?}: distinct mails");
        assert!(counts.values().all(|&c| c == 1), "{tool:?}: a mail is there twice: {counts:?}");
    }
    let (_, records) = read_uidlist(&u.maildir().join("dovecot-uidlist"));
    assert!(records.len() >= total);
    u.assert_same_view();
    u.assert_same_view_ours_first();
}

/// A mail of about `size` bytes whose Subject is `marker` (LF line ends, so the stored file is
/// byte for byte the input).
fn big_mail(marker: &str, size: usize, rng: &mut Rng) -> Vec<u8> {
    let mut m = format!("Subject: {marker}\nMessage-ID: <{marker}@crash>\n\n").into_bytes();
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = rng.bytes(size);
    for chunk in raw.chunks(76) {
        m.extend(chunk.iter().map(|b| ALPHA[usize::from(b & 63)]));
        m.push(b'\n');
    }
    m
}

#[test]
fn sigkill_during_save_loses_nothing_acknowledged() {
    const ITERATIONS: usize = 48;
    let seed = Rng::seed_from_time();
    eprintln!("sigkill test seed: {seed}");
    let mut rng = Rng::new(seed);
    let u = TestUser::new();
    let mut mails: HashMap<String, Vec<u8>> = HashMap::new();
    let mut acked: Vec<String> = Vec::new();
    mails.insert("first".to_owned(), common::mail("first"));
    u.save(Tool::Ours, "INBOX", &mails["first"]);
    acked.push("first".to_owned());
    let history = UidHistory::default();

    // How long one save of a big mail takes, to spread the kills over its whole life.
    let mut took = Vec::new();
    for i in 0..3 {
        let marker = format!("calibrate-{i}");
        let m = big_mail(&marker, 2_000_000, &mut rng);
        let start = Instant::now();
        u.mr_ok_in(&["save"], &m);
        took.push(start.elapsed());
        mails.insert(marker.clone(), m);
        acked.push(marker);
    }
    took.sort();
    // Kill after a delay drawn from [0, span); span adapts so that about half the saves are
    // killed, which spreads the kills over a save's whole life even when the disk's speed
    // changes during the test.
    let calibrated = took[1].as_micros() as u64 * 3 / 2 + 1;
    let mut span = calibrated;

    let mut killed = 0;
    for i in 0..ITERATIONS {
        let marker = format!("crash-{i}");
        let m = big_mail(&marker, 500_000 + rng.below(1_500_000) as usize, &mut rng);
        let mut p = Proc::spawn(u.mr_cmd(&["save"]), Some(m.clone()));
        mails.insert(marker.clone(), m);
        thread::sleep(Duration::from_micros(rng.below(span)));
        let finished_before_kill = p.finished();
        p.kill();
        let out = p.wait();
        // A lock the killed process left behind must say whose it is, or every later writer
        // (Dovecot included) waits two minutes before taking it over.
        if let Ok(content) = fs::read_to_string(u.maildir().join("dovecot-uidlist.lock")) {
            assert!(content.contains(':'), "#{i}: a lock without its holder: {content:?} (seed {seed})");
        }
        if out.success() {
            acked.push(marker);
            span = (span * 4 / 5).max(100);
        } else {
            // (Capped: a save that waits out a dead process's lock is slow for a reason that
            // says nothing about how long saves take.)
            span = (span * 6 / 5 + 1).min(calibrated * 2);
            assert!(!finished_before_kill, "a save failed by itself: {}", out.describe());
            assert_eq!(out.signal, Some(9), "{}", out.describe());
            killed += 1;
        }
        // Now and then, other writers and readers in between.
        match i % 4 {
            0 => history.record(&format!("ours after #{i}"), &uid_guid(&u, Tool::Ours)),
            1 => {
                let marker = format!("dovecot-{i}");
                let m = common::mail(&marker);
                let out = Proc::spawn(u.doveadm_cmd(&["save"]), Some(m.clone())).wait_timeout(Duration::from_secs(30));
                assert!(out.success(), "{}", out.describe());
                mails.insert(marker.clone(), m);
                acked.push(marker);
            }
            2 => history.record(&format!("dovecot after #{i}"), &uid_guid(&u, Tool::Dovecot)),
            _ => {}
        }
    }
    assert!(killed >= ITERATIONS / 4, "only {killed} of {ITERATIONS} saves were killed: the kills came too late");
    assert!(acked.len() > 4 + ITERATIONS / 4, "too few saves finished ({acked:?}): the kills came too early");

    // The mailbox opens, and every file visible in new/ or cur/ is a complete mail.
    let ours = uid_guid(&u, Tool::Ours);
    history.record("ours at the end", &ours);
    for sub in ["new", "cur"] {
        for e in fs::read_dir(u.maildir().join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let data = fs::read(e.path()).unwrap();
            let text = String::from_utf8_lossy(&data);
            let marker = text
                .lines()
                .take_while(|l| !l.is_empty())
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_else(|| panic!("{sub}/{name} has no Subject: a partial mail? {} bytes", data.len()));
            let whole = &mails[marker];
            assert!(data == *whole, "{sub}/{name} holds {} of the {} bytes of {marker}", data.len(), whole.len());
            let s: usize = name.split(",S=").nth(1).unwrap().split([',', ':']).next().unwrap().parse().unwrap();
            assert_eq!(s, data.len(), "{sub}/{name}: ,S= does not match");
        }
    }
    // Every acknowledged mail is there exactly once; killed ones at most once.
    let counts = subject_counts(&u, Tool::Ours);
    for m in &acked {
        assert_eq!(counts.get(m), Some(&1), "acknowledged mail {m} (seed {seed})");
    }
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    // Dovecot agrees, assigns no UID twice, and finds nothing to repair.
    let dv = uid_guid(&u, Tool::Dovecot);
    history.record("dovecot at the end", &dv);
    u.assert_same_view();
    let (header, records) = read_uidlist(&u.maildir().join("dovecot-uidlist"));
    let max = records.last().map_or(0, |r| r.0);
    let status = &u.status_all(Tool::Ours)["INBOX"];
    assert!(status[1].parse::<u32>().unwrap() > max, "uidnext {} <= last UID {max} ({header})", status[1]);
    // New saves after all this still work for both; ours first clears tmp/ of every file the
    // killed writers left (none of them is alive now).
    let left = our_tmp_files(&u.maildir().join("tmp"));
    u.save(Tool::Ours, "INBOX", &common::mail("after ours"));
    assert_eq!(our_tmp_files(&u.maildir().join("tmp")), [], "{} files were left before", left.len());
    eprintln!("{} files of killed writers were in tmp/ before the last save", left.len());
    u.save(Tool::Dovecot, "INBOX", &common::mail("after dovecot"));
    history.record("ours after the end", &uid_guid(&u, Tool::Ours));
    history.record("dovecot after the end", &uid_guid(&u, Tool::Dovecot));
    eprintln!("{killed} of {ITERATIONS} saves killed, {} mails acknowledged", acked.len());
}

/// A `mailreplica save` that has written the start of a mail into `tmp/` and waits for the rest.
struct StalledSave {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl StalledSave {
    /// Starts `mailreplica save -m MAILBOX`, feeds it `head` and waits until its file is in
    /// `tmp_dir`. Returns it and the name of that file.
    fn start(u: &TestUser, mailbox: &str, head: &[u8], tmp_dir: &Path) -> (Self, String) {
        let mut cmd: Command = u.mr_cmd(&["save", "-m", mailbox]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start mailreplica save");
        let stdin = child.stdin.take();
        // From here on, Drop kills and reaps it, also if the test fails.
        let mut me = Self { child, stdin };
        let w = me.stdin.as_mut().expect("piped");
        w.write_all(head).unwrap();
        w.flush().unwrap();
        let pid = me.pid();
        let start = Instant::now();
        loop {
            if let Some((name, _)) = our_tmp_files(tmp_dir).into_iter().find(|(_, p)| *p == pid) {
                return (me, name);
            }
            assert!(start.elapsed() < Duration::from_secs(30), "the save never created its file in tmp/");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends the rest and waits for success.
    fn finish(mut self, rest: &[u8]) {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(rest).unwrap();
        drop(stdin);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the stalled save failed: {status}");
    }
}

impl Drop for StalledSave {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tmp_is_cleared_of_dead_writers_files_only() {
    let u = TestUser::new();
    u.save(Tool::Ours, "INBOX", &common::mail("first"));
    u.mr_ok(&["mailbox", "create", "Other"]);
    let tmp = u.maildir().join("tmp");
    let mut rng = Rng::new(Rng::seed_from_time());
    let body = big_mail("stalled", 200_000, &mut rng);
    let (head, rest) = body.split_at(1000);
    // A writer killed in the middle of a mail leaves its file behind; the next writer removes
    // it before writing its own.
    let (w, first) = StalledSave::start(&u, "INBOX", head, &tmp);
    w.kill();
    assert!(tmp.join(&first).exists());
    let (w, second) = StalledSave::start(&u, "INBOX", head, &tmp);
    assert!(!tmp.join(&first).exists(), "{first} of a dead writer is still there");
    w.kill();
    assert!(tmp.join(&second).exists());
    // A live writer of ours (saving into another mailbox, so that it does not hold INBOX's
    // lock) with a file of its name in INBOX's tmp/, and a young file of someone else.
    let (live, _) = StalledSave::start(&u, "Other", head, &u.maildir().join(".Other/tmp"));
    let host = second.split_once('Q').unwrap().1.split_once('.').unwrap().1.to_owned();
    let live_name = format!("1700000000.M1P{}Q0.{host}", live.pid());
    let young = "1700000000.M1P1.dovecot-host".to_owned();
    for n in [&live_name, &young] {
        u.write_file(&tmp.join(n), b"partial");
    }
    // A read does not clean; the next write does.
    u.mr_ok(&["fetch", "uid", "mailbox", "INBOX", "all"]);
    assert!(tmp.join(&second).exists());
    u.save(Tool::Ours, "INBOX", &common::mail("second"));
    assert!(!tmp.join(&second).exists(), "{second} of a dead writer is still there");
    assert!(tmp.join(&live_name).exists(), "a live writer's file was removed");
    assert!(tmp.join(&young).exists(), "a young foreign file was removed");
    live.finish(rest);
    assert_eq!(u.mails(Tool::Ours, "Other").len(), 1);
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 2);
    u.assert_same_view();
}

/// A loop-mounted ext4 image, unmounted on drop (before the test user's directory goes).
struct LoopMount {
    image: PathBuf,
    dir: PathBuf,
}

impl LoopMount {
    fn new(image: PathBuf, dir: PathBuf) -> Self {
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(Command::new("truncate").args(["-s", "32M"]).arg(&image));
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        fs::create_dir_all(&dir).unwrap();
        let m = Self { image, dir };
        m.mount();
        m
    }

    fn mount(&self) {
        let out = Command::new("mount").args(["-o", "loop"]).arg(&self.image).arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "mount -o loop failed (the test needs loop devices and ext4): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn umount(&self) {
        let out = Command::new("umount").arg(&self.dir).output().unwrap();
        assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Sets the ctime of `path` (relative to the file system's root), which only the kernel's
    /// clock can set otherwise. The file system must be unmounted.
    fn set_ctime(&self, path: &str, ctime: SystemTime) {
        let secs = ctime.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let stamp = Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y%m%d%H%M%S"]).output().unwrap();
        let stamp = String::from_utf8(stamp.stdout).unwrap();
        let req = format!("set_inode_field {path} ctime {}", stamp.trim());
        let out = Command::new("debugfs").args(["-w", "-R", &req]).arg(&self.image).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains(": "), "debugfs {req}: {err}");
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

#[test]
fn tmp_files_older_than_36_hours_are_removed_as_dovecot_does() {
    assert!(common::which_tool("debugfs"), "debugfs (package e2fsprogs) is needed to age a file's ctime");
    let u = TestUser::new();
    let m = LoopMount::new(u.tmp().join("maildir.img"), u.maildir());
    u.chown(&u.maildir());
    u.save(Tool::Ours, "INBOX", &common::mail("first"));
    let tmp = u.maildir().join("tmp");
    for n in ["old-foreign", "young-foreign"] {
        u.write_file(&tmp.join(n), b"left behind");
    }
    m.umount();
    let now = SystemTime::now();
    m.set_ctime("/tmp/old-foreign", now - Duration::from_secs(37 * 3600));
    m.set_ctime("/tmp/young-foreign", now - Duration::from_secs(3600));
    m.mount();
    u.save(Tool::Ours, "INBOX", &common::mail("second"));
    assert!(!tmp.join("old-foreign").exists(), "a file of 37 hours is still there");
    assert!(tmp.join("young-foreign").exists(), "a file of one hour was removed");
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 2);
    u.assert_same_view();
}

/// What one `doveadm save` of the delete test did.
struct Delivery {
    marker: String,
    pid: u32,
    out: Output,
}

#[test]
fn delete_never_loses_a_concurrent_delivery() {
    const ROUNDS: usize = 6;
    const SAVERS: usize = 4;
    const FILLER: usize = 5000;
    let u = Arc::new(TestUser::new());
    let mut refused = 0;
    for round in 0..ROUNDS {
        u.mr_ok(&["mailbox", "create", "Box"]);
        u.save(Tool::Dovecot, "Box", &common::mail(&format!("r{round} seed")));
        // Thousands of mails in cur/, so that looking at the mailbox takes a while and
        // deliveries into new/ can land between our look and the move (a refusal).
        let cur = u.maildir().join(".Box/cur");
        for i in 0..FILLER {
            u.write_file(&cur.join(format!("1600000000.M{i}P1.filler:2,S")), b"Subject: filler\n\nx\n");
        }
        u.mr_ok(&["fetch", "uid", "mailbox", "Box", "1"]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let savers: Vec<_> = (0..SAVERS)
            .map(|t| {
                let (u, stop) = (Arc::clone(&u), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut done = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let marker = format!("r{round} t{t} #{i}");
                        let p = Proc::spawn(u.doveadm_cmd(&["save", "-m", "Box"]), Some(common::mail(&marker)));
                        let pid = p.pid() as u32;
                        done.push(Delivery { marker, pid, out: p.wait() });
                        i += 1;
                    }
                    done
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(150 + 40 * round as u64));
        let mut cmd = u.mr_cmd(&["mailbox", "delete", "Box"]);
        cmd.env("MAILREPLICA_LOG", "mailreplica::store::maildir::delete=trace");
        let del = Proc::spawn(cmd, None).wait();
        thread::sleep(Duration::from_millis(100));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let deliveries: Vec<Delivery> =
            savers.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect();
        let ok: Vec<&Delivery> = deliveries.iter().filter(|d| d.out.success()).collect();
        for d in &deliveries {
            // The old failure: our deletion pulled the lock file from under a save.
            for bad in ["dotlock", "overridden"] {
                assert!(!d.out.stderr.contains(bad), "round {round}: a save lost its lock: {}", d.out.describe());
            }
        }
        assert!(ok.len() > SAVERS, "round {round}: too few deliveries succeeded to test anything");
        // The mails the deletion removed, each logged as it went: Dovecot names a delivery's
        // file `<secs>.M<usecs>P<pid>.<host>`.
        let deleted: HashSet<u32> = del
            .stderr
            .lines()
            .filter(|l| l.contains("deleted mail"))
            .filter_map(|l| l.split_once(" mail=")?.1.split_once(".M")?.1.split_once('P')?.1.split_once('.'))
            .filter_map(|(pid, _)| pid.parse().ok())
            .collect();
        if del.success() {
            // Every delivery that succeeded was seen, and deleted, by the deletion.
            for d in &ok {
                assert!(
                    deleted.contains(&d.pid),
                    "round {round}: delivery {:?} (pid {}) succeeded, but was not among the mails the deletion saw\n{}",
                    d.marker,
                    d.pid,
                    del.describe()
                );
            }
            assert!(!u.mailbox_list(Tool::Dovecot).contains(&"Box".to_owned()), "round {round}");
            assert!(!u.maildir().join(".Box").exists(), "round {round}");
        } else {
            refused += 1;
            assert_eq!(del.code, Some(75), "round {round}: {}", del.describe());
            assert!(
                del.stderr.contains("new mails were added to mailbox Box during deletion"),
                "round {round}: {}",
                del.describe()
            );
            // Kept: every delivery that succeeded is there, unless the deletion had seen it and
            // removed it before a late one showed up (what was asked for; Dovecot's deletion
            // expunges too before it gives up), and both tools agree.
            let text = u.ok(Tool::Ours, &["-f", "tab", "fetch", "text", "mailbox", "Box", "all"]);
            let subjects: HashSet<&str> = text.lines().filter_map(|l| l.strip_prefix("Subject: ")).collect();
            for d in &ok {
                assert!(
                    subjects.contains(d.marker.as_str()) || deleted.contains(&d.pid),
                    "round {round}: {} (pid {}) is lost\n{}",
                    d.marker,
                    d.pid,
                    del.describe()
                );
            }
            u.assert_same_view();
            u.mr_ok(&["mailbox", "delete", "Box"]);
        }
        assert!(!u.maildir().join("..DOVECOT-TRASHED").exists(), "round {round}: trash left behind");
    }
    eprintln!("{refused} of {ROUNDS} deletions were refused because mails arrived");
}
