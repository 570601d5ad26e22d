//! Bad input from the peer: `mailreplica dsync-server` fed crafted bytes on stdin must end
//! with a clear error on stderr and a non-zero exit, leave nothing half-written visible in
//! the Maildir (every file in `new/` and `cur/` a complete mail, every `dovecot-uidlist`
//! well-formed, Dovecot reading it without a complaint), and the next real `doveadm backup`
//! into it must succeed and make it a copy of the master.
//!
//! The crafted streams are edits of a real one: what `doveadm backup` sent to Dovecot's own
//! slave when backing up this test's master into an empty Maildir. Replayed unchanged into
//! our slave, that stream is a complete, successful backup (checked first, so that every
//! failure below is caused by the edit and nothing else).

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use common::dsync::{Slave, maildir_at, split_rawlog};
use common::{Output, TestUser, Tool, mail, read_uidlist};

const MASTER: &str = "maildir:~/Maildir";

/// A master with a few mailboxes and mails (one large enough to span many reads), and the
/// bytes `doveadm backup` sends when backing it up into an empty Maildir.
fn setup() -> (TestUser, Vec<u8>, HashSet<Vec<u8>>) {
    let u = TestUser::new();
    u.dv_ok(&["mailbox", "create", "Archive", "Archive.2024"]);
    let mut bodies = Vec::new();
    for i in 0..4 {
        bodies.push(("INBOX", mail(&format!("inbox {i}"))));
        bodies.push(("Archive.2024", mail(&format!("archive {i}"))));
    }
    let mut big = b"Subject: big\n\n".to_vec();
    while big.len() < 1 << 20 {
        big.extend_from_slice(b"a line of a large mail that spans many reads of the slave\n.dot\n");
    }
    bodies.push(("INBOX", big));
    for (mb, body) in &bodies {
        u.save(Tool::Dovecot, mb, body);
    }
    u.dv_ok(&["flags", "add", "\\Seen kw", "mailbox", "INBOX", "uid", "2"]);
    let run = u.dsync(MASTER, &["backup"], Slave::Dovecot, &maildir_at("Reference"));
    run.ok();
    let raw = fs::read(&run.rawlog).expect("raw log");
    let (sent, _) = split_rawlog(&raw);
    assert!(sent.starts_with(b"VERSION\tdsync\t3\t5\n"), "odd master stream: {:?}", &sent[..40]);
    (u, sent, bodies.into_iter().map(|(_, b)| b).collect())
}

/// Runs our slave on the Maildir `~/DIR` with `input` on stdin (as doveadm runs it: as root
/// with `-u USER`, which drops to the user).
fn serve(u: &TestUser, dir: &str, input: &[u8]) -> Output {
    let loc = format!("mail_location={}", maildir_at(dir));
    u.mr_in(&["-o", &loc, "dsync-server"], input)
}

/// The position just after the first line at or after `from` that starts with `prefix`.
fn after_line(stream: &[u8], from: usize, prefix: &[u8]) -> usize {
    let start = line_start(stream, from, prefix);
    start + stream[start..].iter().position(|&b| b == b'\n').expect("a complete line") + 1
}

/// The position of the first line at or after `from` (a line start) that starts with
/// `prefix`.
fn line_start(stream: &[u8], from: usize, prefix: &[u8]) -> usize {
    let mut pos = from;
    loop {
        if stream[pos..].starts_with(prefix) {
            return pos;
        }
        pos += stream[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or_else(|| panic!("no line starting with {:?} in the stream", String::from_utf8_lossy(prefix)))
            + 1;
    }
}

/// Every mailbox directory of the Maildir++ root `root` must be consistent: a well-formed
/// uidlist (if any), nothing in `new/` or `cur/` but complete mails of the master, each
/// listed in the uidlist, and nothing left in `tmp/`.
#[track_caller]
fn assert_nothing_half_written(root: &Path, bodies: &HashSet<Vec<u8>>, what: &str) {
    if !root.exists() {
        return;
    }
    let mut dirs = vec![root.to_path_buf()];
    for e in fs::read_dir(root).expect("read_dir").flatten() {
        if e.file_name().to_string_lossy().starts_with('.') && e.path().is_dir() {
            dirs.push(e.path());
        }
    }
    for dir in dirs {
        let uidlist = dir.join("dovecot-uidlist");
        let listed: HashSet<String> = if uidlist.exists() {
            read_uidlist(&uidlist).1.into_iter().map(|(_, name)| name).collect()
        } else {
            HashSet::new()
        };
        // A mail being written when the input broke off is removed, not left in tmp/.
        if let Ok(rd) = fs::read_dir(dir.join("tmp")) {
            let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "{what}: left in {}/tmp: {left:?}", dir.display());
        }
        for sub in ["new", "cur"] {
            let Ok(rd) = fs::read_dir(dir.join(sub)) else { continue };
            for f in rd.flatten() {
                let data = fs::read(f.path()).expect("read mail");
                assert!(
                    bodies.contains(&data),
                    "{what}: {} is not a complete mail of the master ({} bytes)",
                    f.path().display(),
                    data.len()
                );
                let name = f.file_name().to_string_lossy().into_owned();
                let base = name.split(':').next().unwrap_or_default().to_owned();
                assert!(
                    listed.contains(&base),
                    "{what}: {} is not in {} ({listed:?})",
                    f.path().display(),
                    uidlist.display()
                );
            }
        }
    }
}

/// One crafted stream: our slave must fail clearly and leave a consistent Maildir, which
/// Dovecot reads without complaint and the next real backup repairs. Dovecot's own slave,
/// given the same bytes, must fail too (so the input is bad by Dovecot's rules, not ours).
#[track_caller]
fn assert_rejected(u: &TestUser, dir: &str, input: &[u8], bodies: &HashSet<Vec<u8>>, what: &str, says: &str) {
    let loc = format!("mail_location={}", maildir_at(&format!("{dir}-dovecot")));
    let dv = u.doveadm_in(&["-o", &loc, "dsync-server"], input);
    assert!(!dv.success() && dv.signal.is_none(), "{what}: Dovecot's slave did not fail cleanly: {}", dv.describe());
    let out = serve(u, dir, input);
    assert!(!out.success(), "{what}: our slave accepted it: {}", out.describe());
    assert!(out.signal.is_none(), "{what}: killed by a signal: {}", out.describe());
    assert!(
        out.stderr.contains("mailreplica: Error:") && out.stderr.contains(says) && !out.stderr.contains("panicked"),
        "{what}: expected an error saying {says:?}: {}",
        out.describe()
    );
    let root = u.home.join(dir);
    assert_nothing_half_written(&root, bodies, what);
    let loc = maildir_at(dir);
    if root.exists() {
        // Dovecot reads what was left without a complaint. It reads a copy: reading gives an
        // unused INBOX an identity of its own, and the repair below is to start from what our
        // slave left.
        let probe = format!("{dir}-probe");
        let mut cp = std::process::Command::new("cp");
        cp.arg("-a").arg(&root).arg(u.home.join(&probe));
        assert!(common::run(cp, None).success(), "cp -a {}", root.display());
        u.view_at(Tool::Dovecot, Some(&maildir_at(&probe)));
        fs::remove_dir_all(u.home.join(&probe)).expect("rm probe");
    }
    let run = u.dsync(MASTER, &["backup"], Slave::Ours, &loc);
    run.ok();
    let diverged = u.compare_with_oracle(MASTER, MASTER, &loc, &format!("{what}, then a real backup"));
    assert!(diverged.is_empty(), "{what}: {diverged:?}");
}

#[test]
fn bad_input_from_the_peer_is_rejected_cleanly() {
    let (u, stream, bodies) = setup();

    // The unchanged stream is a complete backup.
    let out = serve(&u, "Replay", &stream);
    assert!(out.success(), "the replayed stream failed: {}", out.describe());
    let diverged = u.compare_with_oracle(MASTER, MASTER, &maildir_at("Replay"), "replayed stream");
    assert!(diverged.is_empty(), "{diverged:?}");

    let edit = |at: usize, cut: usize, insert: &[u8]| {
        let mut v = stream[..at].to_vec();
        v.extend_from_slice(insert);
        v.extend_from_slice(&stream[at + cut..]);
        v
    };
    // Records, not the header block (whose lines also start with the record letters): the
    // master's handshake record follows the header block's end, its tree ends with `D`.
    let handshake = after_line(&stream, 0, b".\n");
    let records = after_line(&stream, handshake, b"D");
    let first_b = line_start(&stream, records, b"B");
    let first_c = after_line(&stream, records, b"Cs\t");
    let body = line_start(&stream, records, b"Subject: big");

    // Wrong protocol version.
    let v = edit(0, "VERSION\tdsync\t3\t5".len(), b"VERSION\tdsync\t4\t0");
    assert_rejected(&u, "Version", &v, &bodies, "wrong VERSION", "version");
    // A record of a type that does not exist, where a mailbox is due.
    let v = edit(first_b, 0, b"Zunknown\trecord\n");
    assert_rejected(&u, "Unknown", &v, &bodies, "unknown record type", "unknown record type");
    // A mailbox record without its (required) UIDVALIDITY.
    let b_line = &stream[first_b..after_line(&stream, first_b, b"B")];
    let tab = first_b + b_line.iter().position(|&b| b == b'\t').expect("fields") + 1;
    let uv_len = stream[tab..].iter().position(|&b| b == b'\t').expect("more fields");
    let v = edit(tab, uv_len, b"\x02");
    assert_rejected(&u, "Missing", &v, &bodies, "missing required field", "uid_validity");
    // The stream ends in the middle of the master's change list.
    assert_rejected(&u, "Truncated", &stream[..first_c], &bodies, "truncated stream", "closed the connection");
    // Garbage after the handshake.
    let mut v = stream[..after_line(&stream, handshake, b"H")].to_vec();
    v.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    assert_rejected(&u, "Garbage", &v, &bodies, "garbage bytes", "");
    // EOF in the middle of a mail body (the large one, after other mails were sent).
    assert_rejected(&u, "MidBody", &stream[..body + 300_000], &bodies, "EOF in a body", "input ended inside a mail");
}
