//! How the Maildir store's per-mail costs grow with the mailbox: the work a dsync import does
//! to one mailbox, at several sizes. Each step should cost the same per mail at every size;
//! a step whose time per mail grows with the size is quadratic. Not a test (timings belong
//! here, not in assertions).
//!
//! ```text
//! cargo run --release --example store_scaling -- DIR [N ...]     (default N: 50000 100000 200000)
//! cargo run --release --example store_scaling -- --rss import|open|scan DIR [N]
//! ```
//!
//! For each N, in a fresh Maildir under DIR (use a tmpfs such as /dev/shm to time the store's
//! own work rather than the disk's fsyncs):
//! 1. import: N saves with the peer's UID and GUID, a flag and sometimes keywords, committed
//!    every 100 mails as dsync does (`commit_msgs_interval`), `status()` after each commit;
//! 2. flags: one `change_flags` per mail;
//! 3. expunge: every other mail, one `expunge` call each;
//! 4. moves: 1 % of the mails given new UIDs (`stage_move`), committed every 100;
//! 5. reopen: the mailbox opened again from its index.
//!
//! The peak RSS after each step goes to stderr; since freed memory stays with the process, the
//! `--rss` forms measure one thing per process, on a Maildir DIR they keep: `import` (N mails
//! into a new Maildir at DIR, as a first full sync does, then close), `open` (open it from our
//! index and list every mail, as a sync does), `scan` (the same without our index: a rebuild).

use std::time::Instant;

/// Peak resident set size of this process so far, in MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

use mailreplica::store::maildir::{Maildir, MaildirSettings};
use mailreplica::store::{FlagOp, Flags, Keyword, MailGuid, MailStore, Mailbox, MailboxName, SaveRequest, Uid};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The GUID a master sends for mail `i`: by default what a Maildir master sends (its file's
/// base name, which then becomes ours too), with `STORE_SCALING_GUIDS=hex` what a dbox master
/// sends (32 hex digits, which our uidlist and index then carry beside our own file name).
fn guid(i: u32, body: &str) -> Res<MailGuid> {
    if std::env::var("STORE_SCALING_GUIDS").is_ok_and(|v| v == "hex") {
        return Ok(MailGuid::new(&format!("{i:032x}"))?);
    }
    let lfs = body.bytes().filter(|&b| b == b'\n').count();
    let size = body.len();
    Ok(MailGuid::new(&format!("{}.M{i}P4242.master,S={size},W={}", 1_700_000_000 + i, size + lfs))?)
}

/// Imports `n` mails into INBOX as a dsync import does (see the module documentation).
fn import(mb: &mut impl Mailbox, n: u32) -> Res<()> {
    let kws = [Keyword::new("$Junk")?, Keyword::new("Work")?];
    mb.begin_import(None);
    for i in 1..=n {
        let body = format!("From: a@example.org\nSubject: mail {i}\nMessage-ID: <{i}@bench>\n\nbody of mail {i}\n");
        let req = SaveRequest {
            uid: Uid::new(i),
            guid: Some(guid(i, &body)?),
            flags: if i % 3 == 0 { Flags::SEEN } else { Flags::NONE },
            keywords: if i % 10 == 0 { kws.to_vec() } else { Vec::new() },
            received: Some(1_700_000_000 + i64::from(i)),
            min_modseq: u64::from(i),
        };
        mb.save(req, &mut body.as_bytes())?;
        if i % 100 == 0 {
            mb.commit()?;
            std::hint::black_box(mb.status());
        }
    }
    mb.commit()?;
    mb.sync_point()?;
    Ok(())
}

/// One measurement per process (see the module documentation).
fn rss(what: &str, dir: &str, n: u32) -> Res<()> {
    let inbox = MailboxName::inbox();
    let root = std::path::Path::new(dir);
    match what {
        "import" => {
            let mut store = Maildir::open(MaildirSettings::new(root))?;
            store.create_mailbox(&inbox, None, None)?;
            let mut mb = store.open(&inbox)?;
            import(&mut mb, n)?;
        }
        "open" | "scan" => {
            if what == "scan" {
                std::fs::remove_file(root.join("mailreplica-index"))?;
            }
            let mut store = Maildir::open(MaildirSettings::new(root))?;
            let mb = store.open(&inbox)?;
            println!("{what}: peak RSS {:.1} MiB with the mailbox open", peak_rss_mib());
            let mails = mb.mails();
            eprintln!("{} mails listed", mails.len());
        }
        _ => return Err(format!("--rss {what}: import, open or scan").into()),
    }
    println!(
        "{what}: peak RSS {:.1} MiB at the end (`open`, `scan`: with a copy of every mail's record)",
        peak_rss_mib()
    );
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: store_scaling DIR [N ...] | --rss import|open|scan DIR [N]")?;
    if dir == "--rss" {
        let what = args.next().ok_or("--rss what")?;
        let dir = args.next().ok_or("--rss what DIR")?;
        let n = args.next().map_or(Ok(200_000), |a| a.parse())?;
        return rss(&what, &dir, n);
    }
    let mut sizes: Vec<u32> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![50_000, 100_000, 200_000];
    }
    println!(
        "| mails | import | flags | expunge ½ | move 1 % | reopen | import µs/mail | flags µs/mail | expunge µs/mail |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let inbox = MailboxName::inbox();
    for n in sizes {
        let root = std::path::Path::new(&dir).join(format!("scaling-{n}-{}", std::process::id()));
        let mut store = Maildir::open(MaildirSettings::new(&root))?;
        store.create_mailbox(&inbox, None, None)?;
        let mut mb = store.open(&inbox)?;

        let t = Instant::now();
        import(&mut mb, n)?;
        let import = t.elapsed().as_secs_f64();
        eprintln!("{n}: peak RSS after the import {:.1} MiB", peak_rss_mib());

        let t = Instant::now();
        for i in 1..=n {
            mb.change_flags(Uid::new(i).ok_or("uid")?, FlagOp::Add, Flags::FLAGGED, &[], 0)?;
            std::hint::black_box(mb.status());
        }
        mb.sync_point()?;
        let flags = t.elapsed().as_secs_f64();
        eprintln!("{n}: peak RSS after the flag changes {:.1} MiB", peak_rss_mib());

        let t = Instant::now();
        for i in (1..=n).step_by(2) {
            mb.expunge(&[Uid::new(i).ok_or("uid")?])?;
            std::hint::black_box(mb.status());
        }
        mb.sync_point()?;
        let expunge = t.elapsed().as_secs_f64();
        eprintln!("{n}: peak RSS after the expunges {:.1} MiB", peak_rss_mib());

        let t = Instant::now();
        for (k, i) in (2..=n).step_by(200).enumerate() {
            let to = n + 1 + k as u32;
            mb.stage_move(Uid::new(i).ok_or("uid")?, Uid::new(to).ok_or("uid")?)?;
            if k % 100 == 99 {
                mb.commit()?;
            }
        }
        mb.commit()?;
        mb.sync_point()?;
        let moves = t.elapsed().as_secs_f64();
        let left = mb.status().messages;
        drop(mb);
        eprintln!("{n}: peak RSS after closing (index compaction) {:.1} MiB", peak_rss_mib());

        let t = Instant::now();
        let mb = store.open(&inbox)?;
        assert_eq!(mb.status().messages, left);
        let reopen = t.elapsed().as_secs_f64();
        drop(mb);
        eprintln!("{n}: peak RSS after reopening {:.1} MiB", peak_rss_mib());

        let us = |secs: f64, ops: u32| secs * 1e6 / f64::from(ops);
        println!(
            "| {n} | {import:.2} s | {flags:.2} s | {expunge:.2} s | {moves:.2} s | {reopen:.2} s | {:.1} | {:.1} | {:.1} |",
            us(import, n),
            us(flags, n),
            us(expunge, n / 2)
        );
        std::fs::remove_dir_all(&root)?;
    }
    Ok(())
}
