//! The command line, pinned against doveadm: output formats byte for byte where our formatter
//! claims parity (`tab`, `flow`, `pager`, `json`), and exit codes. Every test runs as root with
//! its own throw-away user (see `common`).

mod common;

use std::fs;
use std::time::{Duration, SystemTime};

use common::{TestUser, Tool};

/// A small mailbox with what makes formatters sweat: flags and keywords, an empty flag list,
/// CRLF input, a tab, quotes, backslashes, control characters and UTF-8 in the text, a mail
/// without trailing LF, fixed received dates.
fn small_mailbox(u: &TestUser) {
    let mails: [&[u8]; 4] = [
        b"Subject: one\n\nplain body\n",
        b"Subject: \"two\" \\ tab\there\r\nX-Ctl: a\x01b\x7f\r\n\r\n\xc3\xa9t\xc3\xa9 \xe2\x82\xac\r\n",
        b"Subject: three\n\nno newline at the end",
        b"",
    ];
    for m in mails {
        u.save(Tool::Ours, "INBOX", m);
    }
    u.mr_ok(&["flags", "add", "\\Seen \\Answered $Label1 Work", "mailbox", "INBOX", "uid", "2"]);
    u.mr_ok(&["flags", "add", "\\Flagged", "mailbox", "INBOX", "uid", "3"]);
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for sub in ["new", "cur"] {
        for e in fs::read_dir(u.maildir().join(sub)).unwrap() {
            fs::File::options().write(true).open(e.unwrap().path()).unwrap().set_modified(when).unwrap();
        }
    }
}

#[test]
fn output_formats_match_doveadm_byte_for_byte() {
    let u = TestUser::new();
    small_mailbox(&u);
    // Dovecot looks first, so that its \Recent bookkeeping is settled for both.
    u.dv_ok(&["fetch", "uid", "mailbox", "INBOX", "all"]);
    let commands: &[&[&str]] = &[
        &["fetch", "uid guid flags size.physical size.virtual date.received date.saved", "mailbox", "INBOX", "all"],
        &["fetch", "uid flags text", "mailbox", "INBOX", "all"],
        &["fetch", "text uid", "mailbox", "INBOX", "uid", "2:3"],
        &["fetch", "hdr", "mailbox", "INBOX", "uid", "2"],
        &["fetch", "body", "mailbox", "INBOX", "uid", "2"],
        &["fetch", "uid flags", "mailbox", "INBOX", "seen"],
        &["fetch", "uid", "mailbox", "INBOX", "uid", "100"],
        &["mailbox", "status", "messages uidnext uidvalidity unseen guid vsize firstsaved", "INBOX"],
        &["mailbox", "status", "guid firstsaved messages", "INBOX"],
        &["mailbox", "status", "all", "INBOX"],
        &["mailbox", "list"],
    ];
    let mut compared = 0;
    for format in ["tab", "flow", "pager", "json"] {
        for cmd in commands {
            if cmd[..2] == ["mailbox", "status"] && cmd[2] == "all" {
                // `all` includes highestmodseq and recent, which the tools count differently.
                continue;
            }
            let mut args = vec!["-f", format];
            args.extend_from_slice(cmd);
            let dv = u.doveadm(&args).ok();
            common::assert_quiet_dovecot(&dv);
            let ours = u.mr(&args).ok();
            assert!(
                dv.stdout == ours.stdout,
                "-f {format} {cmd:?} differs\n--- doveadm ---\n{:?}\n--- ours ---\n{:?}",
                String::from_utf8_lossy(&dv.stdout),
                String::from_utf8_lossy(&ours.stdout)
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 40);
    // `table` makes no byte-for-byte claim (doveadm pads by its own rules), but it prints a
    // header and every value.
    let t = u.mr_ok(&["-f", "table", "fetch", "uid guid flags", "mailbox", "INBOX", "all"]);
    let mut lines = t.lines();
    assert!(lines.next().unwrap().split_whitespace().eq(["uid", "guid", "flags"]), "{t}");
    for [uid, guid, _] in u.mails(Tool::Ours, "INBOX") {
        assert!(lines.next().unwrap().starts_with(&format!("{uid:<3} {guid}")), "{t}");
    }
    // The status columns `all` stands for; `firstsaved` of an empty mailbox.
    let ours = u.mr_ok(&["-f", "tab", "mailbox", "status", "all", "INBOX"]);
    let dv = u.dv_ok(&["-f", "tab", "mailbox", "status", "all", "INBOX"]);
    assert_eq!(ours.lines().next(), dv.lines().next());
    u.mr_ok(&["mailbox", "create", "Empty"]);
    let args = ["-f", "tab", "mailbox", "status", "messages firstsaved", "Empty"];
    assert_eq!(u.mr_ok(&args), u.dv_ok(&args));
}

/// (arguments, stdin, our exit code, doveadm's when both must agree).
type Case = (&'static [&'static str], Option<&'static [u8]>, i32, Option<i32>);

#[test]
fn exit_codes_match_doveadm() {
    let u = TestUser::new();
    u.mr_ok(&["mailbox", "create", "Existing", "Other"]);
    u.save(Tool::Ours, "INBOX", &common::mail("keep me"));
    let cases: &[Case] = &[
        (&["mailbox", "status", "messages", "Nope"], None, 68, Some(68)),
        (&["mailbox", "rename", "Nope", "X"], None, 68, Some(68)),
        (&["mailbox", "delete", "Nope"], None, 68, Some(68)),
        (&["save", "-m", "Nope"], Some(b"Subject: x\n\nx\n"), 68, Some(68)),
        (&["mailbox", "create", "INBOX"], None, 65, Some(65)),
        (&["mailbox", "create", "Existing"], None, 65, Some(65)),
        (&["mailbox", "rename", "Other", "Existing"], None, 65, Some(65)),
        (&["mailbox", "create", "a/b"], None, 64, Some(64)),
        (&["mailbox", "status", "bogus", "INBOX"], None, 64, Some(64)),
        (&["flags", "add", "bad(kw", "mailbox", "INBOX", "all"], None, 65, Some(65)),
        // doveadm's safety net: expunge needs more than a mailbox.
        (&["expunge", "mailbox", "INBOX"], None, 64, Some(64)),
        (&["mailbox", "subscribe", "Nope"], None, 0, Some(0)),
        (&["fetch", "uid", "mailbox", "INBOX", "uid", "99"], None, 0, Some(0)),
        // Where we differ on purpose. doveadm exits 75 after an internal i_fatal() for an
        // unknown field, search key or system flag; these are usage errors.
        (&["fetch", "bogus", "mailbox", "INBOX", "all"], None, 64, None),
        (&["fetch", "uid", "bogus"], None, 64, None),
        (&["flags", "add", "\\Bogus", "mailbox", "INBOX", "all"], None, 64, None),
        // doveadm prints nothing and exits 0 for a search in a mailbox that does not exist.
        (&["fetch", "uid", "mailbox", "Nope", "all"], None, 68, None),
        (&["no-such-command"], None, 64, None),
    ];
    for (args, stdin, ours, dv) in cases {
        let out = match stdin {
            Some(s) => u.mr_in(args, s),
            None => u.mr(args),
        };
        assert_eq!(out.code, Some(*ours), "ours: {}", out.describe());
        assert!(!out.stdout.starts_with(b"\x1b"), "{}", out.describe());
        if let Some(code) = dv {
            let out = match stdin {
                Some(s) => u.doveadm_in(args, s),
                None => u.doveadm(args),
            };
            assert_eq!(out.code, Some(*code), "doveadm: {}", out.describe());
        }
    }
    // Nothing above lost a mail.
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 1);
    u.assert_same_view();
    // Deleting INBOX is refused by both; Dovecot empties it first (a Dovecot quirk), we don't.
    u.mr(&["mailbox", "delete", "INBOX"]).expect_code(65);
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 1);

    // An unknown user: 67.
    let out = common::run(
        u.mr_raw_cmd(&["-c", &u.our_conf().display().to_string(), "-u", "nosuchuser", "mailbox", "list"]),
        None,
    );
    assert_eq!(out.code, Some(67), "{}", out.describe());
    assert!(out.stderr.contains("nosuchuser"), "{}", out.describe());
    // A lock held by another host for longer than we may wait: 75, naming the lock.
    let lock = u.maildir().join("dovecot-uidlist.lock");
    u.write_file(&lock, b"1:another-host");
    let out = u.mr_in(&["-o", "mail_max_lock_timeout=1s", "save"], b"Subject: x\n\nx\n");
    assert_eq!(out.code, Some(75), "{}", out.describe());
    assert!(out.stderr.contains(&lock.display().to_string()), "{}", out.describe());
    fs::remove_file(&lock).unwrap();
    assert_eq!(u.mails(Tool::Ours, "INBOX").len(), 1, "the timed-out save must leave nothing behind");
}
