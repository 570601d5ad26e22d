//! Our `dsync-server` against peers that are hostile or merely unusual: huge UIDs, counters
//! at the edge of their range, absurdly deep mailbox names, a peer that goes quiet or stops
//! reading. Each case once broke the slave (memory, a mailbox broken for good, a stack
//! overflow, a session and its locks held forever); each must now end with a clear error, the
//! mailbox as it was, and memory and time bounded.
//!
//! The streams are either real (`doveadm backup` as the master) or built record by record
//! with the library's own encoder, playing a master that sends exactly what the test needs.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::dsync::{Slave, maildir_at};
use common::*;
use mailreplica::dsync::wire::{
    Encoder, Existence, Guid128 as WireGuid, Handshake, HierarchySep, Mailbox, MailboxDeletes, MailboxNode,
    MailboxPath, Record, SyncType, Text,
};
use mailreplica::store::Guid128;

const MASTER: &str = "maildir:~/Master";

/// A master's side of a session, built with our encoder.
struct Stream {
    enc: Encoder,
    out: Vec<u8>,
}

impl Stream {
    /// The greeting and a master handshake: `doveadm backup` (`backup_recv` for the slave) or
    /// `doveadm sync`.
    fn master(backup: bool) -> Self {
        let mut s = Self { enc: Encoder::new(), out: Vec::new() };
        s.enc.greeting(&mut s.out);
        let h = Handshake {
            hostname: Text::try_from("hostile").expect("text"),
            sync_type: Some(SyncType::Changed),
            send_mail_requests: true,
            backup_recv: backup,
            import_commit_msgs_interval: std::num::NonZeroU32::new(100),
            hashed_headers: Some(vec![Text::try_from("Date").expect("text"), Text::default()]),
            alt_char: std::num::NonZeroU8::new(b'_'),
            ..Default::default()
        };
        s.rec(Record::from(h));
        s
    }

    fn rec(&mut self, r: Record) {
        self.enc.record(&r, &mut self.out).expect("encode");
    }

    fn eol(&mut self) {
        self.enc.end_of_list(&mut self.out).expect("encode");
    }

    /// One mailbox node, `.`, and no deletions.
    fn tree(&mut self, parts: &[&str], guid: Guid128, uid_validity: u32, uid_next: u32) {
        let name = MailboxPath::new(parts.iter().map(|p| Text::try_from(*p).expect("text")).collect()).expect("path");
        self.rec(Record::MailboxNode(MailboxNode {
            name,
            existence: Existence::Exists,
            mailbox_guid: Some(WireGuid::from_bytes(guid.0)),
            uid_validity,
            uid_next,
            last_renamed_or_created: 0,
            subscribed: false,
            last_subscription_change: 0,
        }));
        self.eol();
        self.rec(Record::MailboxDeletes(MailboxDeletes {
            hierarchy_sep: HierarchySep::new(b'.').expect("sep"),
            escape_char: std::num::NonZeroU8::new(b'%'),
            mailboxes: vec![],
            dirs: vec![],
            unsubscribes: vec![],
        }));
    }

    fn mailbox(&mut self, guid: Guid128, uid_validity: u32, uid_next: u32, messages: u32, hms: u64) {
        self.rec(Record::Mailbox(Mailbox {
            mailbox_guid: WireGuid::from_bytes(guid.0),
            uid_validity,
            uid_next,
            messages_count: messages,
            first_recent_uid: 1,
            highest_modseq: hms,
            highest_pvt_modseq: 0,
            mailbox_lost: false,
            mailbox_ignore: false,
            cache_fields: vec![],
            have_guids: true,
            have_save_guids: true,
            have_only_guid128: false,
        }));
    }
}

fn inbox_identity(u: &TestUser, location: &str) -> (Guid128, u32) {
    let out = u.ok_at(Tool::Dovecot, Some(location), &["-f", "tab", "mailbox", "status", "uidvalidity guid", "INBOX"]);
    let row = parse_tab(&out, &["mailbox", "uidvalidity", "guid"]);
    let guid: Guid128 = row[0][2].parse().expect("GUID");
    (guid, row[0][1].parse().expect("UIDVALIDITY"))
}

/// `mailreplica dsync-server` on `location` with `input`, and its stall timeout.
fn serve(u: &TestUser, location: &str, input: &[u8], timeout_secs: u32) -> Output {
    let loc = format!("mail_location={location}");
    u.mr_in(&["-o", &loc, "dsync-server", "-T", &timeout_secs.to_string()], input)
}

#[test]
fn a_mail_at_uid_300000000_costs_no_memory() {
    let u = TestUser::new();
    let master = MASTER;
    save_at(&u, Tool::Dovecot, master, &mail("near"));
    u.ok_at(Tool::Dovecot, Some(master), &["mailbox", "update", "--min-next-uid", "300000000", "INBOX"]);
    save_at(&u, Tool::Dovecot, master, &mail("far away"));
    let mails = u.mails_at(Tool::Dovecot, Some(master), "INBOX");
    assert_eq!(mails.last().map(|m| m[0].as_str()), Some("300000000"), "{mails:?}");
    // The slave runs under /usr/bin/time, which reports its peak RSS (the slave runs as the
    // user: the report goes to the user's home).
    let rss_file = u.home.join("rss");
    let slave_cmd = format!(
        "/usr/bin/time -f %M -o {} {}",
        rss_file.display(),
        u.slave_command(Slave::Ours, &maildir_at("Replica"))
    );
    let start = Instant::now();
    let out = u.doveadm(&["-o", &format!("mail_location={master}"), "backup", &slave_cmd]);
    let took = start.elapsed();
    assert!(out.success(), "{}", out.describe());
    let rss_kib: u64 =
        std::fs::read_to_string(&rss_file).expect("rss").trim().lines().last().unwrap_or("0").parse().expect("KiB");
    assert!(rss_kib < 64 * 1024, "our slave peaked at {rss_kib} KiB for one mail at UID 300000000");
    assert!(took < Duration::from_secs(30), "the backup took {took:?}");
    let diverged = u.compare_with_oracle(master, master, &maildir_at("Replica"), "UID 300000000");
    assert!(diverged.is_empty(), "{diverged:?}");
}

#[test]
fn a_peer_uidnext_that_would_exhaust_the_uid_space_is_refused() {
    let u = TestUser::new();
    let replica = "maildir:~/Replica";
    save_at(&u, Tool::Ours, replica, &mail("existing"));
    let (guid, uv) = inbox_identity(&u, replica);
    let before = mail_snapshot(&u.home.join("Replica"));
    let mut s = Stream::master(true);
    s.tree(&["INBOX"], guid, uv, u32::MAX);
    s.mailbox(guid, uv, u32::MAX, 1, 5);
    let out = serve(&u, replica, &s.out, 10);
    assert!(!out.success(), "accepted UIDNEXT 4294967295: {}", out.describe());
    assert!(out.stderr.contains("4294967295") && out.stderr.contains("UID"), "{}", out.describe());
    assert_mail_unchanged(&before, &u.home.join("Replica"), "after UIDNEXT 4294967295");
    // The mailbox stays readable by both tools, and takes new mail.
    save_at(&u, Tool::Dovecot, replica, &mail("after"));
    let dv = u.view_at(Tool::Dovecot, Some(replica));
    assert_views_equal(&dv, &u.view_at(Tool::Ours, Some(replica)));
}

#[test]
fn a_mailbox_name_20000_levels_deep_is_refused_without_a_crash() {
    let u = TestUser::new();
    let deep: Vec<String> = (0..20_000).map(|i| format!("l{}", i % 10)).collect();
    let deep: Vec<&str> = deep.iter().map(String::as_str).collect();
    let mut s = Stream::master(false);
    s.tree(&deep, Guid128::generate(), 1, 1);
    let out = serve(&u, &u.location, &s.out, 10);
    assert!(!out.success());
    assert!(out.signal.is_none(), "killed by a signal: {}", out.describe());
    assert!(out.stderr.contains("hierarchy levels") && !out.stderr.contains("overflow"), "{}", out.describe());
}

#[test]
fn a_quiet_peer_and_a_peer_that_stops_reading_end_the_session_and_free_the_mailbox() {
    let u = TestUser::new();
    let replica = "maildir:~/Replica";
    // Enough mail that the slave's answers overflow a pipe and its send queue: 20,000 mails,
    // written as files (an MDA's deliveries) and listed once by doveadm.
    let new = u.home.join("Replica").join("new");
    save_at(&u, Tool::Dovecot, replica, &mail("first"));
    for i in 0..20_000 {
        u.write_file(&new.join(format!("1700000000.M{i}P1.host,S=30,W=31")), b"Subject: filler\n\nbody text\n\n\n");
    }
    let (guid, uv) = inbox_identity(&u, replica);

    // 1. A peer that says hello and then nothing: the read stalls.
    let mut quiet = u.mr_cmd(&["-o", &format!("mail_location={replica}"), "dsync-server", "-T", "2"]);
    quiet.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = quiet.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&Stream::master(false).out).expect("hello");
    let status = wait_for(&mut child, Duration::from_secs(20));
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(!status.success() && status.signal().is_none(), "{status:?}");
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(err.contains("stalled"), "{err}");
    drop(stdin);

    // 2. A two-way master that asks for everything and then never reads: the writes stall.
    let mut s = Stream::master(false);
    s.tree(&["INBOX"], guid, uv, 20_002);
    s.mailbox(guid, uv, 20_002, 0, 1);
    s.eol(); // attributes
    s.eol(); // changes: none, so the slave exports all of its mails
    let mut stuck = u.mr_cmd(&["-o", &format!("mail_location={replica}"), "dsync-server", "-T", "2"]);
    stuck.env("MAILREPLICA_LOG", "trace");
    stuck.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = stuck.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&s.out).expect("records");
    let _stdout_never_read = child.stdout.take();
    let status = wait_for(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    eprintln!("{err}");
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    assert!(!status.success() && status.signal().is_none(), "{status:?}");
    assert!(err.contains("stalled"), "{err}");
    drop(stdin);

    // The mailbox is free: a real backup into it succeeds right away.
    let run = u.dsync(MASTER, &["backup"], Slave::Ours, replica);
    run.ok();
}

/// Waits for a child without reading its pipes; kills it and panics after `limit`.
fn wait_for(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the slave was still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Saves `body` into INBOX of the Maildir at `location` with `tool`.
fn save_at(u: &TestUser, tool: Tool, location: &str, body: &[u8]) {
    let loc = format!("mail_location={location}");
    u.run_in(tool, &["-o", &loc, "save"], body).ok();
}

#[test]
fn a_backup_into_a_replica_whose_inbox_holds_a_conflicting_mail_converges() {
    let u = TestUser::new();
    let replica = maildir_at("Replica");
    for i in 0..3 {
        save_at(&u, Tool::Dovecot, MASTER, &mail(&format!("source {i}")));
    }
    u.dsync(MASTER, &["backup"], Slave::Ours, &replica).ok();
    // A mail saved on the replica only takes the UID that the source's next mail has.
    save_at(&u, Tool::Ours, &replica, &mail("only on the replica"));
    save_at(&u, Tool::Dovecot, MASTER, &mail("source 3"));
    // Dovecot's slave fails here for good ("INBOX can't be deleted"). Ours empties INBOX,
    // says so, and the next backup makes it a copy of the source.
    let first = u.dsync(MASTER, &["backup"], Slave::Ours, &replica);
    if !first.out.success() {
        let said = &first.out.stderr;
        assert!(said.contains("INBOX") && !said.contains("was deleted"), "{}", first.describe());
    }
    let second = u.dsync(MASTER, &["backup"], Slave::Ours, &replica);
    second.ok();
    let diverged = u.compare_with_oracle(MASTER, MASTER, &replica, "INBOX conflict");
    assert!(diverged.is_empty(), "{diverged:?}");
    // And it stays converged.
    u.dsync(MASTER, &["backup"], Slave::Ours, &replica).ok();
}
