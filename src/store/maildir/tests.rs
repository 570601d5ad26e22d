//! The Maildir store through the [`MailStore`] and [`Mailbox`] traits, on a temporary
//! directory (no Dovecot needed; the interop tests under `tests/` check the files against it).

use std::fs;
use std::path::{Path, PathBuf};

use super::{Maildir, MaildirSettings, index, uidlist};
use crate::store::{
    Change, FlagOp, Flags, Keyword, MAX_MAILBOX_KEYWORDS, MAX_UID, MailStore, Mailbox, MailboxName, MailboxUpdate,
    SaveRequest, StoreError, Uid,
};

fn store(root: &Path) -> Maildir {
    let mut s = MaildirSettings::new(root.join("Maildir"));
    s.hostname = "testhost".to_owned();
    Maildir::open(s).unwrap()
}

fn inbox() -> MailboxName {
    MailboxName::inbox()
}

fn kw(s: &str) -> Keyword {
    Keyword::new(s).unwrap()
}

fn uid(u: u32) -> Uid {
    Uid::new(u).unwrap()
}

/// Saves `n` mails into INBOX through one handle, committing once.
fn save_n(st: &mut Maildir, n: usize) {
    let mut mb = st.open(&inbox()).unwrap();
    for i in 0..n {
        let body = format!("Subject: m{i}\n\nbody {i}\n");
        mb.save(SaveRequest::default(), &mut body.as_bytes()).unwrap();
    }
    mb.commit().unwrap();
    mb.sync_point().unwrap();
}

fn maildir(root: &Path) -> PathBuf {
    root.join("Maildir")
}

fn uids(mb: &impl Mailbox) -> Vec<u32> {
    mb.mails().iter().map(|m| m.uid.get()).collect()
}

// ------------------------------------------------------------------------------------------
// 1. History lost

#[test]
fn a_rebuilt_index_restarts_low_and_marks_the_history_lost() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    st.create_mailbox(&inbox(), None, None).unwrap();
    {
        // A fresh mailbox has no history to lose.
        let mb = st.open(&inbox()).unwrap();
        assert!(!mb.status().history_lost);
    }
    save_n(&mut st, 3);
    {
        let mut mb = st.open(&inbox()).unwrap();
        for u in 1..=3 {
            mb.change_flags(uid(u), FlagOp::Add, Flags::SEEN, &[], 0).unwrap();
        }
        let s = mb.status();
        assert!(!s.history_lost);
        assert!(s.highest_modseq >= 4);
        assert!(mb.changes_since(2).is_some());
    }
    let before = st.open(&inbox()).unwrap().status();
    fs::remove_file(maildir(root.path()).join(index::NAME)).unwrap();
    let mut mb = st.open(&inbox()).unwrap();
    let s = mb.status();
    assert!(s.history_lost);
    // As Dovecot's own fresh index: HIGHESTMODSEQ 2, every mail at 2.
    assert_eq!(s.highest_modseq, 2);
    assert!(mb.mails().iter().all(|m| m.modseq == 2));
    assert_eq!((s.uid_validity, s.guid, s.uid_next), (before.uid_validity, before.guid, before.uid_next));
    // Any saved state is refused, even one whose modseq lies above the new floor.
    for since in [1, 2, 3, before.highest_modseq, u64::MAX] {
        assert!(mb.changes_since(since).is_none(), "{since}");
    }
    assert_eq!(mb.changes_since(0), Some(vec![]));
    // New changes carry on from there, and the flag survives reopening until cleared.
    mb.change_flags(uid(1), FlagOp::Add, Flags::FLAGGED, &[], 0).unwrap();
    assert_eq!(mb.status().highest_modseq, 3);
    assert!(mb.changes_since(2).is_none());
    mb.sync_point().unwrap();
    drop(mb);
    let mut mb = st.open(&inbox()).unwrap();
    assert!(mb.status().history_lost);
    mb.update(&MailboxUpdate { clear_history_lost: true, ..Default::default() }).unwrap();
    assert!(!mb.status().history_lost);
    assert_eq!(mb.changes_since(2).unwrap().len(), 1);
    assert!(mb.changes_since(1).is_none(), "below the floor");
    mb.sync_point().unwrap();
    drop(mb);
    let mb = st.open(&inbox()).unwrap();
    assert!(!mb.status().history_lost);
    assert_eq!(mb.status().highest_modseq, 3);
}

#[test]
fn an_empty_mailbox_without_an_index_has_modseq_1() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    let name = MailboxName::parse("Box", '.').unwrap();
    st.create_mailbox(&name, None, None).unwrap();
    let s = st.open(&name).unwrap().status();
    assert_eq!((s.highest_modseq, s.history_lost), (1, false));
    // Mails that were expunged: UIDNEXT shows there was a history, which is lost.
    {
        let mut mb = st.open(&name).unwrap();
        mb.save(SaveRequest::default(), &mut &b"x\n"[..]).unwrap();
        mb.commit().unwrap();
        mb.expunge(&[uid(1)]).unwrap();
        mb.sync_point().unwrap();
    }
    fs::remove_file(st.mailbox_dir(&name).unwrap().join(index::NAME)).unwrap();
    let s = st.open(&name).unwrap().status();
    assert_eq!((s.highest_modseq, s.history_lost, s.messages), (1, true, 0));
}

// ------------------------------------------------------------------------------------------
// 2. Keywords beyond 26

#[test]
fn forty_keywords_on_one_mail_survive_reopening() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 2);
    let kws: Vec<Keyword> = (0..40).map(|i| kw(&format!("kw{i:02}"))).collect();
    let mut mb = st.open(&inbox()).unwrap();
    let h0 = mb.status().highest_modseq;
    mb.change_flags(uid(1), FlagOp::Add, Flags::SEEN, &kws, 0).unwrap();
    // A save with keywords beyond the letters too: order given, the named ones first.
    let mixed = vec![kw("zz-extra"), kw("kw03"), kw("kw35")];
    mb.save(SaveRequest { keywords: mixed, ..Default::default() }, &mut &b"y\n"[..]).unwrap();
    mb.commit().unwrap();
    mb.sync_point().unwrap();
    let check = |mb: &dyn Fn(u32) -> Vec<Keyword>| {
        assert_eq!(mb(1), kws, "letters in dovecot-keywords order, then the rest as added");
        assert_eq!(mb(3), vec![kw("kw03"), kw("zz-extra"), kw("kw35")]);
    };
    check(&|u| mb.mail(uid(u)).unwrap().keywords);
    // The change log has all 40.
    let ch = mb.changes_since(h0).unwrap();
    assert!(matches!(&ch[0], Change::Flags { keywords_added, .. } if *keywords_added == kws));
    drop(mb);
    let mb = st.open(&inbox()).unwrap();
    check(&|u| mb.mail(uid(u)).unwrap().keywords);
    // The 26 named ones are in the file name, where Dovecot sees them.
    let file = ["new", "cur"]
        .iter()
        .flat_map(|d| fs::read_dir(maildir(root.path()).join(d)).unwrap().flatten())
        .map(|e| e.file_name().into_string().unwrap())
        .find(|n| n.contains(":2,S"))
        .unwrap();
    assert!(file.ends_with(":2,Sabcdefghijklmnopqrstuvwxyz"), "{file}");
    let kwfile = fs::read_to_string(maildir(root.path()).join("dovecot-keywords")).unwrap();
    assert_eq!(kwfile.lines().count(), 26);
    assert!(kwfile.contains("25 kw25\n") && !kwfile.contains("kw26"));
}

#[test]
fn extra_keywords_change_like_any_other() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 1);
    let named: Vec<Keyword> = (0..26).map(|i| kw(&format!("n{i}"))).collect();
    let mut mb = st.open(&inbox()).unwrap();
    mb.change_flags(uid(1), FlagOp::Add, Flags::NONE, &named, 0).unwrap();
    let h = mb.status().highest_modseq;
    let dir = maildir(root.path());
    let name_before: Vec<_> = fs::read_dir(dir.join("cur")).unwrap().flatten().map(|e| e.file_name()).collect();
    // Only keywords without a letter: no rename, but a change with its own modseq.
    mb.change_flags(uid(1), FlagOp::Add, Flags::NONE, &[kw("x1"), kw("X1"), kw("x2")], 0).unwrap();
    let name_after: Vec<_> = fs::read_dir(dir.join("cur")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(name_before, name_after);
    let m = mb.mail(uid(1)).unwrap();
    assert_eq!(m.modseq, h + 1);
    assert_eq!(&m.keywords[26..], [kw("x1"), kw("x2")]);
    // Adding one again changes nothing, and (as in Dovecot's index) logs nothing.
    mb.change_flags(uid(1), FlagOp::Add, Flags::NONE, &[kw("X2")], 0).unwrap();
    assert_eq!(mb.status().highest_modseq, h + 1);
    mb.change_flags(uid(1), FlagOp::Remove, Flags::NONE, &[kw("x1"), kw("n0"), kw("never-used")], 0).unwrap();
    let m = mb.mail(uid(1)).unwrap();
    assert_eq!(m.keywords.len(), 26);
    assert!(!m.keywords.contains(&kw("x1")) && !m.keywords.contains(&kw("n0")));
    let ch = mb.changes_since(h).unwrap();
    assert!(matches!(&ch[0], Change::Flags { keywords_added, .. } if *keywords_added == [kw("x1"), kw("x2")]));
    assert!(
        matches!(&ch[1], Change::Flags { keywords_removed, .. } if *keywords_removed == [kw("n0"), kw("x1")]),
        "{ch:?}"
    );
    mb.change_flags(uid(1), FlagOp::Replace, Flags::SEEN, &[kw("x3"), kw("n5")], 0).unwrap();
    assert_eq!(mb.mail(uid(1)).unwrap().keywords, [kw("n5"), kw("x3")]);
    // A moved mail keeps them.
    mb.stage_move(uid(1), uid(10)).unwrap();
    mb.commit().unwrap();
    assert_eq!(mb.mail(uid(10)).unwrap().keywords, [kw("n5"), kw("x3")]);
    mb.sync_point().unwrap();
    drop(mb);
    let mb = st.open(&inbox()).unwrap();
    assert_eq!(mb.mail(uid(10)).unwrap().keywords, [kw("n5"), kw("x3")]);
}

#[test]
fn at_most_1024_keywords_per_mailbox() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 1);
    let mut mb = st.open(&inbox()).unwrap();
    let all: Vec<Keyword> = (0..MAX_MAILBOX_KEYWORDS).map(|i| kw(&format!("k{i}"))).collect();
    mb.change_flags(uid(1), FlagOp::Add, Flags::NONE, &all, 0).unwrap();
    assert_eq!(mb.mail(uid(1)).unwrap().keywords.len(), MAX_MAILBOX_KEYWORDS);
    let before = mb.mail(uid(1)).unwrap();
    match mb.change_flags(uid(1), FlagOp::Add, Flags::NONE, &[kw("one-too-many")], 0) {
        Err(StoreError::Limit(m)) => assert!(m.contains("one-too-many") && m.contains("1024"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A save over the limit saves nothing.
    mb.save(SaveRequest { keywords: vec![kw("another")], ..Default::default() }, &mut &b"z\n"[..]).unwrap();
    assert!(matches!(mb.commit(), Err(StoreError::Limit(_))));
    assert_eq!(mb.mail(uid(1)).unwrap(), before);
    assert_eq!(uids(&mb), [1]);
    assert_eq!(fs::read_dir(maildir(root.path()).join("tmp")).unwrap().count(), 0);
    mb.sync_point().unwrap();
    drop(mb);
    assert_eq!(st.open(&inbox()).unwrap().mail(uid(1)).unwrap().keywords, before.keywords);
}

// ------------------------------------------------------------------------------------------
// 4. Damaged uidlists

/// Writes `lines` (after a header taken from the current file) as the uidlist.
fn write_uidlist(dir: &Path, f: impl FnOnce(&str, Vec<String>) -> String) {
    let path = dir.join(uidlist::NAME);
    let text = fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_owned();
    fs::write(&path, f(&header, lines.map(str::to_owned).collect())).unwrap();
}

fn guids(mb: &impl Mailbox) -> Vec<(u32, String)> {
    mb.mails().iter().map(|m| (m.uid.get(), m.guid.to_string())).collect()
}

#[test]
fn damaged_uidlists_are_rebuilt_keeping_what_can_be_kept() {
    type Damage = fn(&str, Vec<String>) -> String;
    let cases: [(&str, Damage, &[u32]); 5] = [
        // UIDs that must be unchanged afterwards.
        ("a duplicated line", |h, l| format!("{h}\n{}\n{}\n{}\n{}\n{}\n", l[0], l[1], l[2], l[1], l[3]), &[1, 2, 3, 4]),
        ("two swapped lines", |h, l| format!("{h}\n{}\n{}\n{}\n{}\n", l[0], l[2], l[1], l[3]), &[1, 3, 4]),
        ("a stray high UID", |h, l| format!("{h}\n{}\n9{}\n{}\n{}\n", l[0], l[1], l[2], l[3]), &[1, 3, 4]),
        ("garbage bytes", |_, _| "\u{1}\u{2}garbage\n\u{ff}\n".to_owned(), &[]),
        ("an empty file", |_, _| String::new(), &[]),
    ];
    for (what, damage, unchanged) in cases {
        let root = tempfile::tempdir().unwrap();
        let mut st = store(root.path());
        save_n(&mut st, 4);
        let before = guids(&st.open(&inbox()).unwrap());
        let status = st.open(&inbox()).unwrap().status();
        let dir = maildir(root.path());
        write_uidlist(&dir, damage);
        let mb = st.open(&inbox()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let after = guids(&mb);
        let s = mb.status();
        // Same identity (from the header, or else from our index), no mail lost or doubled.
        assert_eq!((s.uid_validity, s.guid), (status.uid_validity, status.guid), "{what}");
        let mut g1: Vec<&String> = before.iter().map(|x| &x.1).collect();
        let mut g2: Vec<&String> = after.iter().map(|x| &x.1).collect();
        g1.sort();
        g2.sort();
        assert_eq!(g1, g2, "{what}: mails");
        for u in unchanged {
            assert_eq!(after.iter().find(|x| x.0 == *u), before.iter().find(|x| x.0 == *u), "{what}: UID {u}");
        }
        // UIDs that had to change went above everything seen: none reused.
        let highest_seen = if what == "a stray high UID" { 92 } else { 4 };
        for (u, g) in &after {
            if !before.contains(&(*u, g.clone())) {
                assert!(*u > highest_seen, "{what}: {u} {g}");
            }
        }
        assert!(s.uid_next > after.iter().map(|x| x.0).max().unwrap(), "{what}");
        // The file is valid again, and nothing changes on the next look.
        uidlist::Uidlist::read(&dir).unwrap().unwrap();
        drop(mb);
        assert_eq!(guids(&st.open(&inbox()).unwrap()), after, "{what}: stable");
    }
}

#[test]
fn a_uidlist_damaged_while_open_is_repaired_at_commit() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 2);
    let mut mb = st.open(&inbox()).unwrap();
    let dir = maildir(root.path());
    write_uidlist(&dir, |h, l| format!("{h}\n{}\n{}\n{}\n", l[0], l[1], l[0]));
    mb.save(SaveRequest::default(), &mut &b"new\n"[..]).unwrap();
    let saved = mb.commit().unwrap();
    assert_eq!(saved[0].uid.get(), 3);
    let list = uidlist::Uidlist::read(&dir).unwrap().unwrap();
    assert_eq!(list.records.iter().map(|r| r.uid).collect::<Vec<_>>(), [1, 2, 3]);
}

/// A UIDNEXT raised without a new mail (the peer saved and expunged one) changes only the
/// uidlist's header; Dovecot's index re-reads the uidlist only when `cur/` or `new/` changed,
/// so `cur/`'s mtime is moved along; the mailbox reopens with the new UIDNEXT.
#[test]
fn raised_uidnext_is_announced_to_dovecot() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 1);
    let dir = maildir(root.path());
    let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    fs::File::open(dir.join("cur")).unwrap().set_modified(long_ago).unwrap();
    let mut mb = st.open(&inbox()).unwrap();
    mb.update(&MailboxUpdate { min_next_uid: Some(7), ..Default::default() }).unwrap();
    mb.sync_point().unwrap();
    drop(mb);
    assert!(fs::metadata(dir.join("cur")).unwrap().modified().unwrap() > long_ago);
    let list = fs::read_to_string(dir.join(uidlist::NAME)).unwrap();
    assert!(list.starts_with("3 V"));
    assert!(list.lines().next().unwrap().contains(" N7 "));
    let mb = st.open(&inbox()).unwrap();
    assert_eq!(mb.status().uid_next, 7);
}

// ------------------------------------------------------------------------------------------
// 6. The UID limit

#[test]
fn uid_4294967295_is_never_handed_out() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 1);
    let dir = maildir(root.path());
    let mut mb = st.open(&inbox()).unwrap();
    let list_before = fs::read(dir.join(uidlist::NAME)).unwrap();
    match mb.update(&MailboxUpdate { min_next_uid: Some(u32::MAX), min_highest_modseq: Some(99), ..Default::default() })
    {
        Err(StoreError::NotPossible(m)) => assert!(m.contains("4294967295") && m.contains("4294967294"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(dir.join(uidlist::NAME)).unwrap(), list_before, "nothing changed");
    assert_ne!(mb.status().highest_modseq, 99);
    // The highest UID can be used once.
    mb.update(&MailboxUpdate { min_next_uid: Some(MAX_UID), ..Default::default() }).unwrap();
    mb.save(SaveRequest::default(), &mut &b"last\n"[..]).unwrap();
    assert_eq!(mb.commit().unwrap()[0].uid.get(), MAX_UID);
    assert_eq!(mb.status().uid_next, u32::MAX);
    let files = |d: &str| fs::read_dir(dir.join(d)).unwrap().count();
    let (new_before, list_before) = (files("new"), fs::read(dir.join(uidlist::NAME)).unwrap());
    for req in [SaveRequest::default(), SaveRequest { uid: Some(uid(u32::MAX)), ..Default::default() }] {
        mb.save(req, &mut &b"one too many\n"[..]).unwrap();
        match mb.commit() {
            Err(StoreError::Limit(m)) => assert!(m.contains("UID space exhausted"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(files("new"), new_before);
        assert_eq!(files("tmp"), 0);
        assert_eq!(fs::read(dir.join(uidlist::NAME)).unwrap(), list_before);
    }
    mb.stage_move(uid(MAX_UID), uid(MAX_UID)).unwrap();
    assert!(matches!(mb.commit(), Err(StoreError::Limit(_))));
    assert_eq!(uids(&mb), [1, MAX_UID]);
    drop(mb);
    // Dovecot's reader accepts the file (no UID 4294967295 in it), and so do we.
    let list = uidlist::Uidlist::read(&dir).unwrap().unwrap();
    assert_eq!(list.records.last().unwrap().uid, MAX_UID);
    assert_eq!(uids(&st.open(&inbox()).unwrap()), [1, MAX_UID]);
}

// ------------------------------------------------------------------------------------------
// 7. Expunges and counters

#[test]
fn counters_and_lookups_stay_right_through_many_changes() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    save_n(&mut st, 300);
    let mut mb = st.open(&inbox()).unwrap();
    // Expunge one at a time (marked, then swept in bulk), flag others, move some.
    for u in (1..=300).step_by(3) {
        mb.expunge(&[uid(u)]).unwrap();
    }
    mb.expunge(&[uid(1), uid(999)]).unwrap(); // already gone, never there
    for u in (2..=300).step_by(3) {
        mb.change_flags(uid(u), FlagOp::Add, Flags::SEEN, &[], 0).unwrap();
    }
    for u in [3, 6, 9] {
        mb.stage_move(uid(u), uid(400 + u)).unwrap();
    }
    mb.commit().unwrap();
    let check = |mb: &dyn Mailbox| {
        let mails = mb.mails();
        let s = mb.status();
        assert_eq!(s.messages as usize, mails.len());
        assert_eq!(s.unseen as usize, mails.iter().filter(|m| !m.flags.contains(Flags::SEEN)).count());
        assert_eq!(s.recent as usize, mails.iter().filter(|m| m.recent).count());
        assert!(mails.windows(2).all(|w| w[0].uid < w[1].uid));
        for m in &mails {
            assert_eq!(mb.mail(m.uid).as_ref(), Some(m));
        }
        assert!(mb.mail(uid(1)).is_none() && mb.mail(uid(3)).is_none());
        mails.len()
    };
    assert_eq!(check(&mb), 200);
    assert_eq!(mb.status().unseen, 100);
    mb.sync_point().unwrap();
    drop(mb);
    assert_eq!(check(&st.open(&inbox()).unwrap()), 200);
    // Saving a GUID that is in use gets a fresh file name, and one that is free keeps it.
    let mut mb = st.open(&inbox()).unwrap();
    let taken = mb.mail(uid(12)).unwrap().guid; // no flags: still new/<its GUID>
    let body = fs::read(maildir(root.path()).join("new").join(taken.as_str())).unwrap();
    mb.save(SaveRequest { guid: Some(taken.clone()), ..Default::default() }, &mut &body[..]).unwrap();
    let saved = mb.commit().unwrap();
    assert_eq!(saved[0].guid, taken);
    let names: Vec<String> = fs::read_dir(maildir(root.path()).join("new"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.iter().filter(|n| n.starts_with(taken.as_str())).count(), 1, "{names:?}");
}

#[test]
fn names_freed_by_renames_and_expunges_are_reclaimed_and_every_mail_still_opens() {
    let root = tempfile::tempdir().unwrap();
    let mut st = store(root.path());
    st.create_mailbox(&inbox(), None, None).unwrap();
    save_n(&mut st, 500);
    let mut mb = st.open(&inbox()).unwrap();
    // The unit tests move every list into a file at once (crate::spill): so does this one.
    assert!(mb.lists_in_files());
    // 500 mails × 80 renames leave about 2 MiB of old names behind, many times the live
    // ones: the handle compacts them at its sync points and must still find every file.
    let cycle = [Flags::SEEN, Flags::FLAGGED, Flags::ANSWERED, Flags::DRAFT];
    for round in 0..80 {
        let f = cycle[round % cycle.len()];
        for u in uids(&mb) {
            mb.change_flags(uid(u), FlagOp::Replace, f, &[], 0).unwrap();
        }
        if round % 10 == 9 {
            mb.expunge(&[uid(round as u32 + 1)]).unwrap();
        }
        mb.sync_point().unwrap();
    }
    // Without compaction the buffer would hold all 40,000 names (about 2 MiB); with it, the
    // live ones and at most 1 MiB of garbage.
    assert!(mb.names_held() < 1280 * 1024, "old names were reclaimed: {} bytes held", mb.names_held());
    let last = cycle[79 % cycle.len()];
    let left = uids(&mb);
    assert_eq!(left.len(), 492);
    for &u in &left {
        let mut body = String::new();
        std::io::Read::read_to_string(&mut mb.open_body(uid(u)).unwrap(), &mut body).unwrap();
        assert_eq!(body, format!("Subject: m{}\n\nbody {}\n", u - 1, u - 1));
        assert_eq!(mb.mail(uid(u)).unwrap().flags, last);
    }
    drop(mb);
    let mb = st.open(&inbox()).unwrap();
    assert_eq!(uids(&mb), left);
    assert!(mb.mails().iter().all(|m| m.flags == last));
    assert!(mb.lists_in_files());
}

#[test]
fn files_without_uids_are_listed_in_chunks_in_dovecots_order() {
    // A Maildir no Dovecot has seen: 20,000 files in cur/ (more than two chunks of appends),
    // no uidlist. Then 9,000 more delivered to new/ with the uidlist in place.
    let root = tempfile::tempdir().unwrap();
    let md = maildir(root.path());
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(md.join(sub)).unwrap();
    }
    let name = |i: u32| format!("{}.M{i}P1.gen,S=5", 1_700_000_000 + i);
    for i in 1..=20_000u32 {
        fs::write(md.join("cur").join(format!("{}:2,S", name(i))), "mail\n").unwrap();
    }
    let mut st = store(root.path());
    let check = |st: &mut Maildir, n: u32| {
        let mb = st.open(&inbox()).unwrap();
        assert_eq!(uids(&mb), (1..=n).collect::<Vec<_>>());
        let list = uidlist::Uidlist::read(&md).unwrap().unwrap();
        assert_eq!(list.records.len(), n as usize);
        for (r, i) in list.records.iter().zip(1..) {
            assert_eq!((r.uid, r.base.as_str()), (i, name(i).as_str()), "UIDs follow the names' order");
        }
        assert_eq!(list.next_uid(), n + 1);
    };
    check(&mut st, 20_000);
    for i in 20_001..=29_000u32 {
        fs::write(md.join("new").join(name(i)), "mail\n").unwrap();
    }
    check(&mut st, 29_000);
}
