//! Our writer and Dovecot's at the same time, and our writer killed at random points: nothing
//! acknowledged is lost, no partial mail becomes visible, no UID is ever reused or given out
//! twice, and both tools agree afterwards. Every test runs as root with its own throw-away user
//! (see `common`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Output, Proc, Rng, TestUser, Tool, read_uidlist};

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
    // New saves after all this still work for both.
    u.save(Tool::Ours, "INBOX", &common::mail("after ours"));
    u.save(Tool::Dovecot, "INBOX", &common::mail("after dovecot"));
    history.record("ours after the end", &uid_guid(&u, Tool::Ours));
    history.record("dovecot after the end", &uid_guid(&u, Tool::Dovecot));
    eprintln!("{killed} of {ITERATIONS} saves killed, {} mails acknowledged", acked.len());
}
