//! How the sync engine scales with the size of one mailbox, without any disk: N mails in one
//! mailbox of an in-memory store, backed up by our master into our slave (in-process), then a
//! two-way sync after 1% changed on each side. Time and the process's peak RSS.
//!
//! ```sh
//! cargo run --release --example brain_scaling -- 200000 400000
//! ```
//! Linear code takes about twice as long for twice the mails.

use std::time::{Duration, Instant};

use mailreplica::dsync::master::{Direction, MasterOptions, sync_stores};
use mailreplica::store::memory::MemoryStore;
use mailreplica::store::{FlagOp, Flags, MailStore, Mailbox, MailboxName, SaveRequest, Uid};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let sizes: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![50_000, 100_000, 200_000] } else { sizes };
    for n in sizes {
        let mut a = MemoryStore::new();
        let mut b = MemoryStore::new();
        {
            let mut mb = a.open(&MailboxName::inbox()).expect("open");
            for i in 0..n {
                let body = format!("Subject: mail {i}\n\nbody\n");
                mb.save(SaveRequest::default(), &mut body.as_bytes()).expect("save");
                if i % 1000 == 999 {
                    mb.commit().expect("commit");
                }
            }
            mb.commit().expect("commit");
        }
        let mut opts = MasterOptions::new("bench");
        opts.direction = Direction::Backup;
        let t = Instant::now();
        sync_stores(&mut a, &mut b, &opts, Duration::from_secs(600)).expect("backup");
        let initial = t.elapsed();
        // 1% changed on each side: flags on A, new mails on B.
        {
            let mut mb = a.open(&MailboxName::inbox()).expect("open");
            for uid in (1..=n).step_by(100) {
                mb.change_flags(Uid::new(uid).expect("uid"), FlagOp::Add, Flags::SEEN, &[], 0).expect("flags");
            }
            let mut mb = b.open(&MailboxName::inbox()).expect("open");
            for i in 0..n / 100 {
                let body = format!("Subject: new on b {i}\n\nbody\n");
                mb.save(SaveRequest::default(), &mut body.as_bytes()).expect("save");
            }
            mb.commit().expect("commit");
        }
        let t = Instant::now();
        sync_stores(&mut a, &mut b, &MasterOptions::new("bench"), Duration::from_secs(600)).expect("sync");
        let changes = t.elapsed();
        println!(
            "{n:>8} mails: initial backup {:>7.2} s, 1% two-way {:>6.2} s, peak RSS {} MiB",
            initial.as_secs_f64(),
            changes.as_secs_f64(),
            peak_rss_kib() / 1024
        );
    }
}
