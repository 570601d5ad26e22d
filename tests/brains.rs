//! Two of our brains, master and slave, on in-memory stores: no root, no Dovecot, seconds.
//!
//! ```text
//!   MemoryStore A ── master brain ══ in-process pipe (records) ══ slave brain ── MemoryStore B
//!   MemoryStore A ── master brain ══ 64 KiB OS pipes (wire codec) ══ slave brain ── MemoryStore B
//! ```
//!
//! The in-process pipe is the fast path for the scenarios and the randomized rounds; the OS
//! pipes prove that the exchange interleaves: both sides send 100 MiB of new mail at once
//! through real 64 KiB pipes, which deadlocks any brain that sends everything before it
//! receives. The same scenarios run against real Dovecot in `sync_twoway.rs`; here the
//! expectations are what Dovecot's own pair does there (noted per test).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::time::{Duration, Instant};

use mailreplica::dsync::master::{Direction, MasterOptions, run_master, sync_stores};
use mailreplica::dsync::server::serve;
use mailreplica::store::memory::MemoryStore;
use mailreplica::store::{FlagOp, Flags, Keyword, MailStore, Mailbox, MailboxKind, MailboxName, SaveRequest, Uid};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One side as the tests compare it: mailboxes (name → GUID, UIDVALIDITY, mails as
/// (UID, GUID, flags, sorted keywords)), and subscriptions.
/// A mail as compared: UID, GUID, flag bits, sorted keywords.
type MailRow = (u32, String, u8, Vec<String>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    boxes: BTreeMap<String, (String, u32, Vec<MailRow>)>,
    subscriptions: BTreeSet<String>,
}

fn view(store: &mut MemoryStore) -> View {
    let mut boxes = BTreeMap::new();
    let mut subscriptions = BTreeSet::new();
    for info in store.list().expect("list") {
        if info.subscribed {
            subscriptions.insert(info.name.join('/'));
        }
        if info.kind != MailboxKind::Mailbox {
            continue;
        }
        let mb = store.open(&info.name).expect("open");
        let st = mb.status();
        let mails = mb
            .mails()
            .into_iter()
            .map(|m| {
                let mut kws: Vec<String> = m.keywords.iter().map(|k| k.as_str().to_owned()).collect();
                kws.sort();
                (m.uid.get(), m.guid.as_str().to_owned(), m.flags.bits(), kws)
            })
            .collect();
        boxes.insert(info.name.join('/'), (st.guid.to_string(), st.uid_validity, mails));
    }
    View { boxes, subscriptions }
}

fn name(s: &str) -> MailboxName {
    MailboxName::parse(s, '/').expect("mailbox name")
}

fn deliver(store: &mut MemoryStore, mailbox: &str, body: &[u8]) {
    let mut mb = store.open(&name(mailbox)).expect("open");
    mb.save(SaveRequest::default(), &mut &body[..]).expect("save");
    mb.commit().expect("commit");
}

fn sync(a: &mut MemoryStore, b: &mut MemoryStore, opts: &MasterOptions) -> mailreplica::dsync::master::MasterReport {
    sync_stores(a, b, opts, TIMEOUT).unwrap_or_else(|e| panic!("sync failed ({:?}): {e}", e.kind))
}

fn two_way() -> MasterOptions {
    MasterOptions::new("test")
}

#[test]
fn two_way_sync_converges_and_a_second_sync_changes_nothing() {
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    for i in 0..5 {
        deliver(&mut a, "INBOX", format!("Subject: a{i}\n\nbody\n").as_bytes());
    }
    a.create_mailbox(&name("Archive/2024"), None, None).unwrap();
    deliver(&mut a, "Archive/2024", b"Subject: old\n\nx\n");
    a.set_subscribed(&name("Archive/2024"), true).unwrap();
    for i in 0..3 {
        deliver(&mut b, "INBOX", format!("Subject: b{i}\n\nbody\n").as_bytes());
    }
    let r = sync(&mut a, &mut b, &two_way());
    assert_eq!(r.changes_during_sync, None);
    let (va, vb) = (view(&mut a), view(&mut b));
    assert_eq!(va, vb);
    assert_eq!(va.boxes["INBOX"].2.len(), 8, "{va:#?}");
    assert!(va.subscriptions.contains("Archive/2024"));
    // Nothing left to do: a second sync sends no mail.
    let r = sync(&mut a, &mut b, &two_way());
    assert_eq!((r.stats.mails_sent, r.stats.mails_received), (0, 0), "{r:?}");
    assert_eq!(view(&mut a), va);
    assert_eq!(view(&mut b), vb);
}

#[test]
fn backup_makes_the_remote_an_exact_copy_and_reverse_backup_the_other_way() {
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    for i in 0..4 {
        deliver(&mut a, "INBOX", format!("Subject: a{i}\n\nbody\n").as_bytes());
    }
    deliver(&mut b, "INBOX", b"Subject: only on b\n\nx\n");
    b.create_mailbox(&name("Junk"), None, None).unwrap();
    let mut opts = two_way();
    opts.direction = Direction::Backup;
    // A UID conflict in INBOX: the first backup empties the replica's INBOX (it cannot be
    // deleted), the second makes it a copy.
    let first = sync_stores(&mut a, &mut b, &opts, TIMEOUT);
    if first.is_err() {
        sync(&mut a, &mut b, &opts);
    }
    assert_eq!(view(&mut a), view(&mut b));
    assert!(!view(&mut b).boxes.contains_key("Junk"));

    let mut c = MemoryStore::new();
    opts.direction = Direction::BackupReverse;
    let first = sync_stores(&mut c, &mut a, &opts, TIMEOUT);
    if first.is_err() {
        sync(&mut c, &mut a, &opts);
    }
    assert_eq!(view(&mut c), view(&mut a));
}

#[test]
fn stateful_syncs_stay_incremental() {
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    for i in 0..10 {
        deliver(&mut a, "INBOX", format!("Subject: a{i}\n\nbody\n").as_bytes());
    }
    let mut opts = two_way();
    opts.state = Some(String::new());
    let r = sync(&mut a, &mut b, &opts);
    assert!(!r.state.is_empty(), "a state is reported");
    // A flag change and one new mail on each side.
    {
        let mut mb = a.open(&MailboxName::inbox()).unwrap();
        mb.change_flags(Uid::new(3).unwrap(), FlagOp::Add, Flags::SEEN, &[], 0).unwrap();
    }
    deliver(&mut a, "INBOX", b"Subject: new on a\n\nx\n");
    deliver(&mut b, "INBOX", b"Subject: new on b\n\nx\n");
    opts.state = Some(r.state);
    let r = sync(&mut a, &mut b, &opts);
    assert_eq!(view(&mut a), view(&mut b));
    // Only the two new mails moved, one each way.
    assert_eq!((r.stats.mails_sent, r.stats.mails_received), (1, 1), "{r:?}");
    assert!(!r.state.is_empty());
}

/// A pair of OS pipes (64 KiB kernel buffers) as the two directions of a connection.
fn os_pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (File::from(r), File::from(w))
}

#[test]
fn both_sides_send_100_mib_at_once_over_64_kib_pipes() {
    const MAILS: usize = 100;
    const SIZE: usize = 1 << 20;
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    let body = |who: &str, i: usize| {
        let mut v = format!("Subject: {who}{i}\n\n").into_bytes();
        v.resize(SIZE, b'x');
        v.push(b'\n');
        v
    };
    for i in 0..MAILS {
        deliver(&mut a, "INBOX", &body("a", i));
        deliver(&mut b, "INBOX", &body("b", i));
    }
    let (m_in, s_out) = os_pipe();
    let (s_in, m_out) = os_pipe();
    let start = Instant::now();
    let slave = {
        let mut b = b.clone();
        std::thread::spawn(move || serve(&mut b, s_in, s_out, "slave", TIMEOUT))
    };
    let r = run_master(&mut a, m_in, m_out, &two_way(), TIMEOUT).unwrap_or_else(|e| panic!("master: {e}"));
    let s = slave.join().expect("slave thread").unwrap_or_else(|e| panic!("slave: {e}"));
    assert_eq!(s.failed, None);
    assert_eq!((r.stats.mails_sent, r.stats.mails_received), (MAILS as u64, MAILS as u64));
    let (va, vb) = (view(&mut a), view(&mut b));
    assert_eq!(va, vb);
    assert_eq!(va.boxes["INBOX"].2.len(), 2 * MAILS);
    eprintln!("200 MiB two-way over 64 KiB pipes: {:?}", start.elapsed());
}

/// A master that sends for longer than the stall timeout to a slave that says nothing
/// meanwhile (in a backup the slave answers once it has everything) has not stalled: the
/// slave reads all along. A link slow enough here to take some 2.5 s under a 1 s timeout; a
/// 2,000,000-mail backup took longer than the 600 s default and failed, before the clock
/// counted from the last sign of life on either side rather than from the last read.
#[test]
fn a_backup_longer_than_the_timeout_to_a_quiet_slave_completes() {
    use std::io::{Read, Write};
    const MAILS: usize = 40;
    let t = Duration::from_secs(1);
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    for i in 0..MAILS {
        let mut v = format!("Subject: {i}\n\n").into_bytes();
        v.resize(100 << 10, b'y');
        v.push(b'\n');
        deliver(&mut a, "INBOX", &v);
    }
    let (m_in, s_out) = os_pipe();
    let (s_in, mut link_out) = os_pipe();
    let (mut link_in, m_out) = os_pipe();
    // The slow link from master to slave: 16 KiB every 10 ms.
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n @ 1..) = link_in.read(&mut buf) {
            std::thread::sleep(Duration::from_millis(10));
            if link_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let slave = {
        let mut b = b.clone();
        std::thread::spawn(move || serve(&mut b, s_in, s_out, "slave", t))
    };
    let mut opts = two_way();
    opts.direction = Direction::Backup;
    let r = run_master(&mut a, m_in, m_out, &opts, t).unwrap_or_else(|e| panic!("master: {e}"));
    let s = slave.join().expect("slave thread").unwrap_or_else(|e| panic!("slave: {e}"));
    assert!(start.elapsed() > 2 * t, "the link was too fast to show anything: {:?}", start.elapsed());
    assert_eq!(s.failed, None);
    assert_eq!(r.stats.mails_sent, MAILS as u64);
    assert_eq!(view(&mut a), view(&mut b));
}

#[test]
fn keywords_and_flags_travel_both_ways() {
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    deliver(&mut a, "INBOX", b"Subject: k\n\nx\n");
    {
        let mut mb = a.open(&MailboxName::inbox()).unwrap();
        let kws = [Keyword::new("$Label1").unwrap(), Keyword::new("todo").unwrap()];
        mb.change_flags(Uid::MIN, FlagOp::Add, Flags::FLAGGED | Flags::SEEN, &kws, 0).unwrap();
    }
    sync(&mut a, &mut b, &two_way());
    assert_eq!(view(&mut a), view(&mut b));
    {
        let mut mb = b.open(&MailboxName::inbox()).unwrap();
        mb.change_flags(Uid::MIN, FlagOp::Remove, Flags::FLAGGED, &[Keyword::new("todo").unwrap()], 0).unwrap();
    }
    sync(&mut a, &mut b, &two_way());
    let va = view(&mut a);
    assert_eq!(va, view(&mut b));
    assert_eq!(va.boxes["INBOX"].2[0].2, Flags::SEEN.bits());
    assert_eq!(va.boxes["INBOX"].2[0].3, vec!["$Label1".to_owned()]);
}

/// A tiny deterministic PRNG (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const BOXES: [&str; 4] = ["INBOX", "Work", "Work/Old", "Lists"];
const KEYWORDS: [&str; 3] = ["todo", "$Label1", "later"];

/// One random thing a user (or a delivery) does to a store; returns a description for the
/// failure message and, for deliveries, the marker of the new mail.
fn random_op(rng: &mut Rng, s: &mut MemoryStore, who: &str, n: usize) -> (String, Option<String>) {
    let existing: Vec<MailboxName> =
        s.list().expect("list").into_iter().filter(|i| i.kind == MailboxKind::Mailbox).map(|i| i.name).collect();
    let pick = |rng: &mut Rng| existing[rng.below(existing.len())].clone();
    match rng.below(12) {
        0..=3 => {
            let b = pick(rng);
            let marker = format!("{who}-{n}");
            let mut mb = s.open(&b).expect("open");
            mb.save(SaveRequest::default(), &mut format!("Subject: {marker}\n\n{marker}\n").as_bytes()).expect("save");
            mb.commit().expect("commit");
            (format!("deliver {marker} to {}", b.join('/')), Some(marker))
        }
        4..=6 => {
            let b = pick(rng);
            let mut mb = s.open(&b).expect("open");
            let mails = mb.mails();
            if mails.is_empty() {
                return ("nothing to flag".into(), None);
            }
            let m = &mails[rng.below(mails.len())];
            let op = [FlagOp::Add, FlagOp::Remove, FlagOp::Replace][rng.below(3)];
            let flags = Flags::from_bits_truncate((rng.next() & 0x1f) as u8);
            let kws: Vec<Keyword> =
                KEYWORDS.iter().filter(|_| rng.below(2) == 0).map(|k| Keyword::new(k).expect("keyword")).collect();
            mb.change_flags(m.uid, op, flags, &kws, 0).expect("flags");
            (format!("{op:?} {flags:?} {kws:?} on {}/{}", b.join('/'), m.uid), None)
        }
        7 => {
            let b = pick(rng);
            let mut mb = s.open(&b).expect("open");
            let mails = mb.mails();
            if mails.is_empty() {
                return ("nothing to expunge".into(), None);
            }
            let m = mails[rng.below(mails.len())].uid;
            mb.expunge(&[m]).expect("expunge");
            (format!("expunge {}/{m}", b.join('/')), None)
        }
        8 => {
            let b = name(BOXES[rng.below(BOXES.len())]);
            let r = s.create_mailbox(&b, None, None);
            (format!("create {} ({})", b.join('/'), if r.is_ok() { "ok" } else { "exists" }), None)
        }
        9 => {
            let b = name(BOXES[rng.below(BOXES.len())]);
            let on = rng.below(2) == 0;
            s.set_subscribed(&b, on).expect("subscribe");
            (format!("{} {}", if on { "subscribe" } else { "unsubscribe" }, b.join('/')), None)
        }
        10 => {
            let b = pick(rng);
            if b.is_inbox() {
                return ("not deleting INBOX".into(), None);
            }
            let r = s.delete_mailbox(&b);
            (format!("delete {} ({r:?})", b.join('/')), None)
        }
        _ => {
            let b = pick(rng);
            let to = name(&format!("Renamed{}", rng.below(3)));
            if b.is_inbox() || existing.contains(&to) {
                return ("no rename".into(), None);
            }
            let r = s.rename_mailbox(&b, &to);
            (format!("rename {} to {} ({r:?})", b.join('/'), to.join('/')), None)
        }
    }
}

/// Every mail marker on a side.
fn markers(s: &mut MemoryStore) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for info in s.list().expect("list") {
        if info.kind != MailboxKind::Mailbox {
            continue;
        }
        let mut mb = s.open(&info.name).expect("open");
        for m in mb.mails() {
            let mut body = String::new();
            std::io::Read::read_to_string(&mut mb.open_body(m.uid).expect("body"), &mut body).expect("read");
            if let Some(marker) = body.lines().last() {
                out.insert(marker.to_owned());
            }
        }
    }
    out
}

fn randomized_rounds(seed: u64, stateful: bool) {
    let mut rng = Rng(seed.max(1));
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    let opts = two_way();
    let mut state_a = stateful.then(String::new);
    let mut state_b = state_a.clone();
    let mut log: Vec<String> = Vec::new();
    let mut n = 0;
    for round in 0..25 {
        let before_a = markers(&mut a);
        let before_b = markers(&mut b);
        let mut touched = false;
        for _ in 0..rng.below(5) {
            n += 1;
            let (what, _) = random_op(&mut rng, &mut a, "a", n);
            touched |= what.starts_with("expunge") || what.starts_with("delete") || what.starts_with("rename");
            log.push(format!("round {round} master: {what}"));
        }
        for _ in 0..rng.below(5) {
            n += 1;
            let (what, _) = random_op(&mut rng, &mut b, "b", n);
            touched |= what.starts_with("expunge") || what.starts_with("delete") || what.starts_with("rename");
            log.push(format!("round {round} slave: {what}"));
        }
        let fail = |msg: String, log: &[String]| -> ! {
            panic!("seed {seed} (stateful: {stateful}), round {round}: {msg}\n{}", log.join("\n"));
        };
        // Up to three syncs to settle (a sync may report changes during the sync). With saved
        // states a master only syncs the mailboxes it changed, as Dovecot's replicator does:
        // then each side is the master of a sync in turn, each with its own state, as when
        // both servers run a replicator.
        let mut settled = false;
        for _ in 0..3 {
            let mut clean = true;
            for reverse in [false, true] {
                if reverse && !stateful {
                    continue;
                }
                let state = if reverse { &mut state_b } else { &mut state_a };
                let mut o = opts.clone();
                o.state = state.clone();
                let r = if reverse {
                    sync_stores(&mut b, &mut a, &o, TIMEOUT)
                } else {
                    sync_stores(&mut a, &mut b, &o, TIMEOUT)
                };
                match r {
                    Ok(r) => {
                        if stateful {
                            *state = Some(r.state.clone());
                        }
                        clean &= r.changes_during_sync.is_none() && !r.require_full_resync;
                    }
                    Err(e) => {
                        log.push(format!("round {round}: sync failed: {e}"));
                        clean = false;
                        if stateful {
                            *state = Some(String::new());
                        }
                    }
                }
            }
            if clean {
                settled = true;
                break;
            }
        }
        if !settled {
            fail("did not settle within three syncs".into(), &log);
        }
        let (mut va, mut vb) = (view(&mut a), view(&mut b));
        if va != vb {
            // Some conflicts (a subscription against a rename on the other side) take a second
            // sync, as with Dovecot's own pair.
            log.push(format!("round {round}: after one sync:\n{}", diff(&va, &vb)));
            let mut o = opts.clone();
            o.state = state_a.clone();
            if let Ok(r) = sync_stores(&mut a, &mut b, &o, TIMEOUT)
                && stateful
            {
                state_a = Some(r.state);
            }
            (va, vb) = (view(&mut a), view(&mut b));
        }
        if va != vb {
            fail(format!("the sides differ:\n{}", diff(&va, &vb)), &log);
        }
        // Without expunges, deletions or renames this round, nothing may have gone missing.
        if !touched {
            let after = markers(&mut a);
            let lost: Vec<&String> = before_a.union(&before_b).filter(|m| !after.contains(*m)).collect();
            if !lost.is_empty() {
                fail(format!("mails lost: {lost:?}"), &log);
            }
        }
        // No mail twice in one mailbox.
        for (boxname, (_, _, mails)) in &va.boxes {
            let guids: BTreeSet<&String> = mails.iter().map(|m| &m.1).collect();
            if guids.len() != mails.len() {
                fail(format!("a mail is duplicated in {boxname}"), &log);
            }
        }
    }
}

/// The mailboxes and subscriptions that differ, one line per mailbox and side.
fn diff(a: &View, b: &View) -> String {
    let line = |v: &View, k: &str| match v.boxes.get(k) {
        None => "(none)".to_owned(),
        Some((g, uv, mails)) => {
            let m: Vec<String> = mails
                .iter()
                .map(|(u, g, f, k)| format!("{u}:{}:{f:x}:{}", &g[..6.min(g.len())], k.join(",")))
                .collect();
            format!("{} {uv} [{}]", &g[..8], m.join(" "))
        }
    };
    let mut out = String::new();
    let names: BTreeSet<&String> = a.boxes.keys().chain(b.boxes.keys()).collect();
    for k in names {
        if a.boxes.get(k) != b.boxes.get(k) {
            out.push_str(&format!("{k}\n  master {}\n  slave  {}\n", line(a, k), line(b, k)));
        }
    }
    if a.subscriptions != b.subscriptions {
        out.push_str(&format!("subscriptions: master {:?} slave {:?}\n", a.subscriptions, b.subscriptions));
    }
    out
}

fn seeds() -> Vec<u64> {
    match std::env::var("MAILREPLICA_TEST_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
            vec![1, 2, 3, 4, 5, 6, 7, 8, now]
        }
    }
}

#[test]
fn randomized_rounds_stateless() {
    for seed in seeds() {
        randomized_rounds(seed, false);
    }
}

#[test]
fn randomized_rounds_stateful() {
    for seed in seeds() {
        randomized_rounds(seed, true);
    }
}

#[test]
fn a_subscription_follows_a_rename_made_on_the_other_side() {
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    a.create_mailbox(&name("Lists"), None, None).unwrap();
    sync(&mut a, &mut b, &two_way());
    a.rename_mailbox(&name("Lists"), &name("Renamed")).unwrap();
    b.set_subscribed(&name("Lists"), true).unwrap();
    sync(&mut a, &mut b, &two_way());
    let (va, vb) = (view(&mut a), view(&mut b));
    assert_eq!(va.subscriptions, vb.subscriptions, "{}", diff(&va, &vb));
    assert_eq!(va.subscriptions, BTreeSet::from(["Renamed".to_owned()]));
}

#[test]
fn a_special_use_selection_is_refused_and_nothing_changes() {
    // `-x '\Trash'` means "leave out the mailbox with the \Trash flag": this store keeps no
    // special-use flags, so syncing while ignoring it would send what was meant to stay.
    let mut a = MemoryStore::new();
    let mut b = MemoryStore::new();
    a.create_mailbox(&name("Trash"), None, None).unwrap();
    deliver(&mut a, "Trash", b"Subject: deleted\n\nx\n");
    deliver(&mut a, "INBOX", b"Subject: kept\n\nx\n");
    let before = view(&mut b);
    for (exclude, mailbox) in [(vec!["\\Trash".to_owned()], None), (vec![], Some("\\Trash".to_owned()))] {
        let mut opts = two_way();
        opts.exclude = exclude;
        opts.mailbox = mailbox;
        let e = sync_stores(&mut a, &mut b, &opts, TIMEOUT).expect_err("a special-use selection must be refused");
        assert!(e.to_string().contains("special use"), "{e}");
        assert_eq!(view(&mut b), before, "the refused sync changed the other side");
    }
}
