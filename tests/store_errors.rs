//! Bad input gets a clear error and changes nothing: damaged Dovecot files, files we cannot
//! read, odd file names, invalid mailbox names, a missing home, bad configuration. Where
//! Dovecot has an answer (keyword letters without a name, files without `,S=`), Dovecot is the
//! oracle. Every test runs as root with its own throw-away user (see `common`).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::{
    TestUser, Tool, assert_mail_unchanged, assert_tree_unchanged, mail_snapshot, read_uidlist, tree_snapshot,
};

/// Exit codes (doveadm's, from sysexits.h).
const EX_USAGE: i32 = 64;
const EX_DATAERR: i32 = 65;
const EX_TEMPFAIL: i32 = 75;
const EX_NOPERM: i32 = 77;
const EX_CONFIG: i32 = 78;

/// Asserts that stderr is one `mailreplica: Error:` line containing every one of `parts`,
/// and that no part of it repeats itself (an OS error printed twice reads like two errors).
#[track_caller]
fn assert_error(out: &common::Output, parts: &[&str]) {
    let line = out.stderr.trim_end();
    assert!(line.starts_with("mailreplica: Error: "), "expected an error: {}", out.describe());
    for p in parts {
        assert!(line.contains(p), "error does not mention {p:?}: {}", out.describe());
    }
    assert!(line.matches("(os error").count() <= 1, "the OS error is printed twice: {line}");
}

/// (uid, guid) rows of a mailbox as `tool` shows them.
fn uid_guids(u: &TestUser, tool: Tool, mailbox: &str) -> Vec<(u32, String)> {
    u.mails(tool, mailbox).into_iter().map(|[uid, guid, _]| (uid.parse().unwrap(), guid)).collect()
}

#[test]
fn damaged_uidlist_is_rebuilt_keeping_identity_and_uids() {
    // (mailbox, what to do to the uidlist's lines, UIDs that must not change)
    type Damage = fn(&[&str]) -> String;
    let cases: [(&str, Damage, &[u32]); 6] = [
        ("Empty", |_| String::new(), &[]),
        ("Garbage", |_| "\u{7f}ELF\u{1}\u{1}\n\u{0}\u{0}\u{0} binary junk\n\n".to_owned(), &[]),
        ("Duplicated", |l| format!("{}\n{}\n{}\n{}\n{}\n{}\n", l[0], l[1], l[2], l[3], l[2], l[4]), &[1, 2, 3, 4]),
        ("Swapped", |l| format!("{}\n{}\n{}\n{}\n{}\n", l[0], l[1], l[3], l[2], l[4]), &[1, 3, 4]),
        ("BadHeader", |l| format!("3 V0 N1\n{}\n", l[1..].join("\n")), &[1, 2, 3, 4]),
        ("BadRecord", |l| format!("{}\n{}\n2x{}\n{}\n{}\n", l[0], l[1], l[2], l[3], l[4]), &[1, 3, 4]),
    ];
    let u = TestUser::new();
    u.save(Tool::Ours, "INBOX", &common::mail("inbox"));
    for (mb, _, _) in &cases {
        u.mr_ok(&["mailbox", "create", mb]);
        for i in 0..4 {
            // Both tools write, so that both have looked at the mailbox (and Dovecot has its
            // index) before the damage.
            let tool = if i % 2 == 0 { Tool::Ours } else { Tool::Dovecot };
            u.save(tool, mb, &common::mail(&format!("{mb} {i}")));
        }
    }
    let before = u.assert_same_view();
    for (mb, damage, unchanged) in cases {
        let path = u.maildir().join(format!(".{mb}")).join("dovecot-uidlist");
        let good = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        u.write_file(&path, damage(&lines).as_bytes());
        // We look first (Dovecot, finding the file broken, would renumber every mail).
        let out = u.mr(&["-f", "tab", "fetch", "uid guid", "mailbox", mb, "all"]).ok();
        let warnings: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(warnings.len(), 1, "{mb}: one warning: {}", out.describe());
        assert!(
            warnings[0].contains(&path.display().to_string()) && warnings[0].contains("damaged uidlist rebuilt"),
            "{mb}: the warning names the file: {}",
            out.describe()
        );
        let old = before.mails_of(mb);
        let now = uid_guids(&u, Tool::Ours, mb);
        // No mail lost or doubled, same identity, unaffected UIDs unchanged, others above all.
        let mut g0: Vec<&str> = old.iter().map(|m| m[1].as_str()).collect();
        let mut g1: Vec<&str> = now.iter().map(|m| m.1.as_str()).collect();
        g0.sort_unstable();
        g1.sort_unstable();
        assert_eq!(g0, g1, "{mb}: mails");
        for (uid, guid) in &now {
            let was = old.iter().find(|m| m[1] == *guid).map(|m| m[0].parse::<u32>().unwrap());
            if unchanged.contains(&was.unwrap()) {
                assert_eq!(Some(*uid), was, "{mb}: {guid} changed its UID");
            } else {
                assert!(*uid > 4, "{mb}: {guid} got UID {uid}, which may have been handed out before");
            }
        }
        for u_ in unchanged {
            assert!(now.iter().any(|m| m.0 == *u_), "{mb}: UID {u_} is gone");
        }
        let status = u.status_all(Tool::Ours);
        assert_eq!(status[mb][2..], before.status[mb][2..], "{mb}: UIDVALIDITY, unseen, GUID");
        // The file is valid again for both tools, and they agree. (Dovecot's `mailbox status`
        // answers from its index until something syncs the mailbox: fetch first.)
        read_uidlist(&path);
        assert_eq!(uid_guids(&u, Tool::Dovecot, mb), now, "{mb}");
        let v = u.assert_same_view_ours_first();
        // New mails go above everything, through either tool.
        u.save(Tool::Dovecot, mb, &common::mail(&format!("{mb} after, Dovecot")));
        u.save(Tool::Ours, mb, &common::mail(&format!("{mb} after, ours")));
        let after = uid_guids(&u, Tool::Ours, mb);
        let top = v.mails_of(mb).iter().map(|m| m[0].parse::<u32>().unwrap()).max().unwrap();
        assert!(after.len() == 6 && after[4].0 > top && after[5].0 > after[4].0, "{mb}: {after:?}");
    }
    u.assert_same_view();
}

#[test]
fn torn_uidlist_tail_is_not_extended() {
    // A power loss during an append can leave a last line without LF. Readers ignore it; a
    // writer must not glue its own record onto it.
    let u = TestUser::new();
    u.save(Tool::Ours, "INBOX", &common::mail("one"));
    u.save(Tool::Ours, "INBOX", &common::mail("two"));
    let path = u.maildir().join("dovecot-uidlist");
    let mut data = fs::read(&path).unwrap();
    data.extend_from_slice(b"3 :1700000000.M1P1.torn,S=1");
    u.write_file(&path, &data);
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 2);
    let out = u.mr_in(&["save"], &common::mail("three")).ok();
    assert!(out.stderr.contains("partial line"), "the repair must be reported: {}", out.describe());
    // The new mail got UID 3 and its record names its own file.
    let ours = u.mails(Tool::Ours, "INBOX");
    assert_eq!(ours.iter().map(|m| m[0].as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
    let (_, records) = read_uidlist(&path);
    let names: Vec<(u32, String)> = ours.iter().map(|m| (m[0].parse().unwrap(), m[1].clone())).collect();
    assert_eq!(records, names, "uidlist records must match the mails");
    let v = u.assert_same_view_ours_first();
    assert_eq!(v.mails_of("INBOX"), ours.as_slice());
}

#[test]
fn keyword_letter_without_name_is_shown_like_dovecot() {
    let u = TestUser::new();
    for i in 0..3 {
        u.save(Tool::Ours, "INBOX", &common::mail(&format!("m{i}")));
    }
    u.mr_ok(&["flags", "add", "$A", "mailbox", "INBOX", "uid", "1"]);
    // UID 2 (still in new/, so its file name is its GUID) gets letter `c`, which
    // dovecot-keywords does not name.
    let two = u.mails(Tool::Ours, "INBOX")[1][1].clone();
    fs::rename(u.maildir().join("new").join(&two), u.maildir().join("cur").join(format!("{two}:2,Sc"))).unwrap();

    // We look first: the letter is shown as Dovecot shows it, with a warning.
    let out = u.mr(&["-f", "tab", "fetch", "uid flags", "mailbox", "INBOX", "all"]).ok();
    assert!(
        out.stderr.contains("without a name") && out.stderr.contains("letters=\"c\"") && !out.stderr.contains('\x1b'),
        "expected a plain-text warning naming letter c: {}",
        out.describe()
    );
    let ours = common::parse_tab(&out.text(), &["uid", "flags"]);
    assert_eq!(common::normalize_flags(&ours[1][1]), "\\Seen unknown-2");
    // New keywords must not take letter c: that would put them on UID 2. Dovecot reserves
    // the letter by writing `2 unknown-2` into dovecot-keywords; so must we.
    for kw in ["NewOne", "Another", "Third"] {
        u.mr(&["flags", "add", kw, "mailbox", "INBOX", "uid", "3"]).ok();
    }
    let kwfile = fs::read_to_string(u.maildir().join("dovecot-keywords")).unwrap();
    assert!(kwfile.contains("2 unknown-2\n"), "letter c must be reserved: {kwfile:?}");
    let v = u.assert_same_view_ours_first();
    assert_eq!(v.mails_of("INBOX")[1][2], "\\Seen unknown-2", "{v:?}");
    assert_eq!(v.mails_of("INBOX")[2][2], "Another NewOne Third", "{v:?}");
    // `unknown-2` can be removed by name, as in Dovecot.
    u.mr_ok(&["flags", "remove", "unknown-2", "mailbox", "INBOX", "uid", "2"]);
    let v = u.assert_same_view_ours_first();
    assert_eq!(v.mails_of("INBOX")[1][2], "\\Seen");

    // Dovecot looking first gives the same picture.
    u.mr_ok(&["mailbox", "create", "Other"]);
    u.save(Tool::Ours, "Other", &common::mail("o1"));
    u.mr_ok(&["flags", "add", "$B", "mailbox", "Other", "uid", "1"]);
    u.save(Tool::Ours, "Other", &common::mail("o2"));
    let two = u.mails(Tool::Ours, "Other")[1][1].clone();
    let dir = u.maildir().join(".Other");
    fs::rename(dir.join("new").join(&two), dir.join("cur").join(format!("{two}:2,bd"))).unwrap();
    let dv = u.mails(Tool::Dovecot, "Other");
    assert_eq!(dv[1][2], "unknown-1 unknown-3", "{dv:?}");
    let out = u.mr(&["-f", "tab", "fetch", "uid flags", "mailbox", "Other", "all"]).ok();
    let ours = common::parse_tab(&out.text(), &["uid", "flags"]);
    assert_eq!(common::normalize_flags(&ours[1][1]), "unknown-1 unknown-3");
}

#[test]
fn keywords_beyond_26_are_kept_and_bounded() {
    let u = TestUser::new();
    u.save(Tool::Ours, "INBOX", &common::mail("m"));
    u.save(Tool::Ours, "INBOX", &common::mail("n"));
    let kws: Vec<String> = (0..40).map(|i| format!("kw{i:02}")).collect();
    u.mr_ok(&["flags", "add", &kws.join(" "), "mailbox", "INBOX", "uid", "1"]);
    let all_40 = format!("\\Recent {}", kws.join(" "));
    let shown = |tool| u.mails(tool, "INBOX")[0][2].clone();
    assert_eq!(shown(Tool::Ours), common::normalize_flags(&all_40));
    // The first 26 have letters in the file name, so Dovecot sees those (and only those: it
    // keeps keywords beyond 26 only in its own index, as we keep them in ours).
    assert_eq!(shown(Tool::Dovecot), kws[..26].join(" "));
    let name = fs::read_dir(u.maildir().join("new"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().contains(":2,"));
    assert!(name.as_ref().is_some_and(|n| n.to_string_lossy().ends_with(":2,abcdefghijklmnopqrstuvwxyz")), "{name:?}");
    // Our index is kept between runs: all 40 again, also after Dovecot changed the mail.
    u.dv_ok(&["flags", "add", "\\Seen", "mailbox", "INBOX", "uid", "1"]);
    assert_eq!(shown(Tool::Ours), common::normalize_flags(&format!("\\Seen {}", kws.join(" "))));
    u.mr_ok(&["flags", "remove", "kw39 kw00", "mailbox", "INBOX", "uid", "1"]);
    assert_eq!(shown(Tool::Ours), common::normalize_flags(&format!("\\Seen {}", kws[1..39].join(" "))));

    // 1024 distinct keywords per mailbox, and a clear error beyond.
    let more: Vec<String> = (40..1024).map(|i| format!("kw{i:02}")).collect();
    u.mr_ok(&["flags", "add", &more.join(" "), "mailbox", "INBOX", "uid", "2"]);
    let before = mail_snapshot(&u.maildir());
    let out = u.mr(&["flags", "add", "OneTooMany", "mailbox", "INBOX", "all"]).expect_code(EX_DATAERR);
    assert_error(&out, &["OneTooMany", "1024"]);
    let out = u.mr(&["flags", "add", "bad(keyword", "mailbox", "INBOX", "all"]).expect_code(EX_DATAERR);
    assert_error(&out, &["bad(keyword"]);
    assert_mail_unchanged(&before, &u.maildir(), "refused keywords");
    // doveadm refuses the invalid keyword with the same code.
    u.doveadm(&["flags", "add", "bad(keyword", "mailbox", "INBOX", "all"]).expect_code(EX_DATAERR);
    assert_eq!(u.mails(Tool::Ours, "INBOX")[1][2].split(' ').count(), 984);
}

#[test]
fn unreadable_mail_file() {
    let u = TestUser::new();
    for i in 0..3 {
        u.save(Tool::Ours, "INBOX", &common::mail(&format!("m{i}")));
    }
    let mails = u.mails(Tool::Ours, "INBOX");
    let file = u.maildir().join("new").join(&mails[1][1]);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    let out = u.mr(&["fetch", "text", "mailbox", "INBOX", "uid", "2"]).expect_code(EX_NOPERM);
    assert_error(&out, &[&file.display().to_string(), "Permission denied"]);
    // doveadm fails too; neither tool's uid/guid/flags need the contents.
    assert!(!u.doveadm(&["fetch", "text", "mailbox", "INBOX", "uid", "2"]).success());
    assert_eq!(u.mails(Tool::Ours, "INBOX"), u.mails(Tool::Dovecot, "INBOX"));
    u.mr_ok(&["fetch", "size.physical size.virtual", "mailbox", "INBOX", "all"]);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    u.assert_same_bodies("INBOX");
}

#[test]
fn file_names_without_sizes() {
    let u = TestUser::new();
    u.save(Tool::Ours, "INBOX", &common::mail("first"));
    let root = u.maildir();
    // No ,S= and no ,W=; CRLF contents, so the virtual size must be computed from the bytes.
    u.write_file(&root.join("cur/1700000001.M1P1.nosizes:2,S"), b"Subject: a\r\n\r\nbody\r\nmore\n");
    // Only ,S=.
    u.write_file(&root.join("new/1700000002.M1P1.onlys,S=17"), b"Subject: b\n\nbody\n");
    // Only ,W=.
    u.write_file(&root.join("new/1700000003.M1P1.onlyw,W=20"), b"Subject: c\n\nbody\n");
    let v = u.assert_same_view_ours_first();
    let guids: Vec<&str> = v.mails_of("INBOX").iter().map(|m| m[1].as_str()).collect();
    assert_eq!(&guids[1..], ["1700000001.M1P1.nosizes", "1700000002.M1P1.onlys,S=17", "1700000003.M1P1.onlyw,W=20"]);
    u.assert_same_bodies("INBOX");
    let t = u.mr_ok(&["-f", "tab", "fetch", "uid size.physical size.virtual", "mailbox", "INBOX", "all"]);
    let rows = common::parse_tab(&t, &["uid", "size.physical", "size.virtual"]);
    // 25 bytes, one of the four LFs without a CR before it.
    assert_eq!(rows[1][1..], ["25", "26"]);
}

#[test]
fn mailbox_names_are_checked_like_dovecot() {
    // (location, names invalid in any use, names this layout cannot store as directories)
    for (loc, invalid, unstorable) in [
        ("maildir:~/Maildir", &["a/b", "..", "../x", "a..b", ".x", "a\tb"][..], &[][..]),
        ("maildir:~/Maildir:LAYOUT=fs", &["..", "../x", "a/../b", "a//b", "/x"][..], &["cur", "x/tmp"][..]),
    ] {
        let u = TestUser::with_location(loc);
        u.mr_ok(&["mailbox", "create", "Fine"]);
        let before = tree_snapshot(&u.home);
        for name in invalid.iter().chain(unstorable) {
            let mut commands = vec![
                vec!["mailbox", "create", name],
                vec!["mailbox", "rename", "Fine", name],
                vec!["mailbox", "delete", name],
                vec!["fetch", "uid", "mailbox", name, "all"],
            ];
            if invalid.contains(name) {
                commands.push(vec!["mailbox", "subscribe", name]);
            }
            let quoted = format!("{name:?}");
            for args in commands {
                let out = u.mr(&args).expect_code(EX_USAGE);
                assert_error(&out, &["invalid mailbox name", &quoted]);
            }
            let out = u.mr_in(&["save", "-m", name], &common::mail("x")).expect_code(EX_USAGE);
            assert_error(&out, &["invalid mailbox name"]);
        }
        assert_tree_unchanged(&before, &u.home, "refused mailbox names");
        // Dovecot refuses them as well.
        for name in invalid.iter().chain(unstorable) {
            assert!(!u.doveadm(&["mailbox", "create", name]).success(), "{loc}: Dovecot created {name:?}");
        }
        // With LAYOUT=fs, a level starting with `.` is an ordinary mailbox for Dovecot (an IMAP
        // client may create one): we must store and list it too, either way round.
        if u.separator() == '/' {
            u.mr_ok(&["mailbox", "create", ".ours", "Fine/.child"]);
            u.dv_ok(&["mailbox", "create", ".theirs"]);
            u.save(Tool::Dovecot, ".ours", &common::mail("a"));
            u.save(Tool::Ours, ".theirs", &common::mail("b"));
            let v = u.assert_same_view_ours_first();
            for mb in [".ours", ".theirs", "Fine/.child"] {
                assert!(v.mailboxes.iter().any(|m| m == mb), "{mb} not listed: {v:?}");
            }
        }
    }
}

#[test]
fn missing_home_creates_nothing() {
    let u = TestUser::new();
    fs::remove_dir(&u.home).unwrap();
    let before = tree_snapshot(u.tmp());
    for args in [&["mailbox", "list"][..], &["fetch", "uid", "mailbox", "INBOX", "all"], &["mailbox", "create", "X"]] {
        let out = u.mr(args).expect_code(EX_TEMPFAIL);
        assert_error(&out, &["home directory", &u.home.display().to_string(), "does not exist", &u.name]);
    }
    let out = u.mr_in(&["save"], &common::mail("x")).expect_code(EX_TEMPFAIL);
    assert_error(&out, &["home directory"]);
    assert!(!u.home.exists());
    assert_tree_unchanged(&before, u.tmp(), "commands for a user without a home");
}

#[test]
fn configuration_errors_name_file_line_and_key() {
    let u = TestUser::new();
    let conf = |name: &str, text: &str| {
        let p = u.tmp().join(name);
        fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let user = u.name.clone();
    let good = u.our_conf().display().to_string();
    let unknown = conf("unknown.toml", "first_valid_uid = 100\n\n# a comment\nmail_location_typo = \"maildir:~/M\"\n");
    let badval = conf("badval.toml", "first_valid_uid = \"many\"\n");
    let badloc = conf("badloc.toml", "mail_location = \"maildir:~/M:CONTROL=/x\"\n");
    let syntax = conf("syntax.toml", "first_valid_uid = = 1\n");
    let before = tree_snapshot(&u.home);
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["-c", &unknown],
            vec![format!("{unknown} line 4"), "mail_location_typo".into(), "unknown setting".into()],
        ),
        (vec!["-c", &badval], vec![format!("{badval} line 1"), "first_valid_uid".into()]),
        (vec!["-c", &badloc], vec![format!("{badloc} line 1"), "mail_location".into(), "CONTROL".into()]),
        (vec!["-c", &syntax], vec![syntax.clone(), "line 1".into()]),
        (vec!["-c", "/nonexistent/mailreplica.toml"], vec!["/nonexistent/mailreplica.toml".into()]),
        (
            vec!["-c", &good, "-o", "no_such_key=1"],
            vec!["-o no_such_key=1".into(), "unknown setting `no_such_key`".into()],
        ),
        (vec!["-c", &good, "-o", "first_valid_uid=abc"], vec!["first_valid_uid=abc".into(), "not a number".into()]),
        (vec!["-c", &good, "-o", "mail_location=mbox:~/mail"], vec!["mail_location".into(), "maildir".into()]),
        (vec!["-c", &good, "-o", "mail_max_lock_timeout=3 fortnights"], vec!["mail_max_lock_timeout".into()]),
        (vec!["-c", &good, "-o", "novalue"], vec!["-o novalue".into(), "key=value".into()]),
    ];
    for (opts, parts) in cases {
        let mut args: Vec<&str> = opts.clone();
        args.extend(["-u", &user, "mailbox", "list"]);
        let out = common::run(u.mr_raw_cmd(&args), None).expect_code(EX_CONFIG);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert_error(&out, &parts);
    }
    assert_tree_unchanged(&before, &u.home, "runs with a bad configuration");
}
