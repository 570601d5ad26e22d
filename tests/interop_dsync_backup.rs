//! `doveadm backup` against our `mailreplica dsync-server`, differentially: every scenario runs
//! twice from the same starting point, once with Dovecot's own `doveadm dsync-server` as the
//! slave and once with ours, and both must end the same way: the same mailboxes, identities,
//! UIDs, GUIDs, flags, subscriptions and bytes (as Dovecot reads them), the same exit code, and
//! the same session as the master saw it (see `common::dsync::Transcript`).
//!
//! Layout of a test user's home:
//!
//! ```text
//!   ~/Maildir   the master (doveadm's side); for `backup -R` the destinations are ~/MD, ~/MO
//!   ~/SD        replica written by Dovecot's slave (the oracle)
//!   ~/SO        replica written by ours
//! ```

mod common;

use common::dsync::{DsyncRun, Slave, assert_same_transcripts, maildir_at};
use common::{TestUser, Tool, mail, mail_snapshot};

const MASTER: &str = "maildir:~/Maildir";

/// The two replicas of a one-way scenario: Dovecot's and ours.
struct Replicas<'a> {
    u: &'a TestUser,
    dv: String,
    ours: String,
}

impl<'a> Replicas<'a> {
    fn new(u: &'a TestUser) -> Self {
        Self { u, dv: maildir_at("SD"), ours: maildir_at("SO") }
    }

    /// `doveadm backup ARGS` into both replicas; both must succeed quietly and the master must
    /// have seen the same session. Then both replicas must hold the same (and our replica must
    /// read the same with our tool as with Dovecot). Returns both runs.
    /// Where Dovecot's own replica lost a change that ours kept, the master is the
    /// reference; `dovecot_diverges` names those mailboxes (see `compare_with_oracle`).
    #[track_caller]
    fn backup(&self, args: &[&str], what: &str, dovecot_diverges: &[&str]) -> (DsyncRun, DsyncRun) {
        let (d, o) = self.run(args);
        self.check(&d, &o, what, dovecot_diverges);
        (d, o)
    }

    /// The checks of [`Replicas::backup`] on two finished runs.
    #[track_caller]
    fn check(&self, d: &DsyncRun, o: &DsyncRun, what: &str, dovecot_diverges: &[&str]) {
        d.ok();
        o.ok();
        assert_same_transcripts(d, o, what);
        // Our replica reads the same with our tool as with Dovecot.
        self.u.checked_view(&self.ours, true);
        let diverged = self.u.compare_with_oracle(MASTER, &self.dv, &self.ours, what);
        assert_eq!(diverged, dovecot_diverges, "{what}: where Dovecot's replica lost changes that ours kept");
    }

    /// Both runs, without checks.
    fn run(&self, args: &[&str]) -> (DsyncRun, DsyncRun) {
        let mut all = vec!["backup"];
        all.extend_from_slice(args);
        let d = self.u.dsync(MASTER, &all, Slave::Dovecot, &self.dv);
        let o = self.u.dsync(MASTER, &all, Slave::Ours, &self.ours);
        (d, o)
    }

    /// A second `backup ARGS` right after one must change nothing: no mail is requested or
    /// sent, and not one file of our replica changes. Our replica ends an import with the
    /// master's HIGHESTMODSEQ, so the master skips every mailbox and sends no change at all
    /// (Dovecot's own slave does not, see `Transcript::canonical`).
    #[track_caller]
    fn assert_noop(&self, args: &[&str], what: &str, dovecot_diverges: &[&str]) {
        let root = self.u.home.join("SO");
        let before = mail_snapshot(&root);
        let (d, o) = self.run(args);
        common::assert_mail_unchanged(&before, &root, what);
        self.check(&d, &o, what, dovecot_diverges);
        for run in [&d, &o] {
            let t = &run.transcript;
            assert!(
                t.master_records("M ").is_empty() && t.slave_records("R ").is_empty(),
                "{what}: the repeated backup moved mail: {:#?}",
                t.lines()
            );
        }
        // (Checked last, so that a replica that is wrong fails on its contents first.)
        assert!(o.transcript.master_records("C ").is_empty(), "{what}: not skipped: {:#?}", o.transcript.lines());
    }
}

/// Mails of every awkward shape for the wire: dot-stuffing at the start and inside, the
/// terminator sequence inside, empty, 8-bit and NUL bytes.
fn awkward_mails() -> Vec<Vec<u8>> {
    vec![
        mail("plain"),
        b".starts with a dot\nSubject: dot\n\nbody\n".to_vec(),
        b"Subject: dot body\n\n.\n..\n.leading dot line\nend\n".to_vec(),
        b"Subject: terminator inside\r\n\r\nline\r\n.\r\nafter the dot line\r\n".to_vec(),
        b".\r\n".to_vec(),
        Vec::new(),
        b"Subject: 8bit\nContent-Type: text/plain; charset=latin1\n\nGr\xfc\xdfe \xe2\x82\xac \xff\n".to_vec(),
        b"Subject: nul\n\na\0b\0\0c\n\0".to_vec(),
        b"Subject: no final newline\n\nlast line".to_vec(),
        b"Subject: lone CR\r\n\r\nends in CR\r".to_vec(),
    ]
}

/// The 26 keywords a Maildir can name.
fn keywords() -> Vec<String> {
    let mut v = vec!["$Junk".to_owned(), "$Forwarded".to_owned(), "Work".to_owned()];
    v.extend((v.len()..26).map(|i| format!("kw{i:02}")));
    v
}

#[test]
fn backup_into_empty_then_incremental_changes() {
    let u = TestUser::new();
    let r = Replicas::new(&u);
    let dv = |args: &[&str]| {
        u.dv_ok(args);
    };
    // Round 1: a tree with hierarchy and subscriptions, mails of every shape, flags.
    dv(&["mailbox", "create", "-s", "Archive", "Archive.2024", "Lists", "Lists.rust", "Trash"]);
    dv(&["mailbox", "unsubscribe", "Archive"]);
    for m in awkward_mails() {
        u.save(Tool::Dovecot, "INBOX", &m);
    }
    for i in 0..3 {
        u.save(Tool::Dovecot, "Archive.2024", &mail(&format!("archived {i}")));
        u.save(Tool::Dovecot, "Lists.rust", &mail(&format!("list {i}")));
    }
    u.save(Tool::Dovecot, "Trash", &mail("trash"));
    dv(&["flags", "add", "\\Seen", "mailbox", "INBOX", "uid", "1:4"]);
    dv(&["flags", "add", "\\Answered \\Flagged $Junk Work", "mailbox", "INBOX", "uid", "2"]);
    dv(&["flags", "add", "\\Deleted \\Draft", "mailbox", "Archive.2024", "uid", "3"]);
    r.backup(&[], "backup into an empty account", &[]);
    r.assert_noop(&[], "repeated backup", &[]);

    // Round 2: new mails (one of 20 MiB), flag and keyword changes up to 26 keywords,
    // expunges, a new mailbox, subscription changes.
    for i in 0..3 {
        u.save(Tool::Dovecot, "INBOX", &mail(&format!("new {i}")));
    }
    let mut big = b"Subject: 20 MiB\n\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ 20 MiB of text .\n";
    while big.len() < 20 << 20 {
        big.extend_from_slice(line);
        big.extend_from_slice(b".dot at line start\r\n");
    }
    u.save(Tool::Dovecot, "Archive.2024", &big);
    dv(&["flags", "add", &keywords().join(" "), "mailbox", "INBOX", "uid", "5"]);
    dv(&["flags", "remove", "\\Seen", "mailbox", "INBOX", "uid", "1"]);
    dv(&["flags", "replace", "\\Draft kw10", "mailbox", "INBOX", "uid", "2"]);
    dv(&["flags", "add", "\\Seen Work", "mailbox", "Lists.rust", "all"]);
    dv(&["expunge", "mailbox", "INBOX", "uid", "3"]);
    dv(&["expunge", "mailbox", "Archive.2024", "uid", "1"]);
    dv(&["mailbox", "create", "New", "New.Sub"]);
    u.save(Tool::Dovecot, "New.Sub", &mail("in a new child"));
    dv(&["mailbox", "subscribe", "New.Sub", "Archive"]);
    dv(&["mailbox", "unsubscribe", "Lists"]);
    // Dovecot's slave ends an import with a HIGHESTMODSEQ above the master's (for Lists.rust
    // 6 against 4). The flag change below takes the master to 6 as well: every number in the
    // two `B` records is then equal, the master skips the mailbox, and Dovecot's replica
    // never gets the flags. Ours ends at the master's 4 and gets them.
    let lost_by_dovecot = ["Lists.rust"];
    r.backup(&[], "backup after new mails, flag changes, expunges and a new mailbox", &lost_by_dovecot);
    r.assert_noop(&[], "repeated backup after changes", &lost_by_dovecot);

    // Round 3: a deleted mailbox, a renamed one (with a child), and changes in the renamed.
    // Two flag changes take INBOX's HIGHESTMODSEQ two steps up and change nothing else that
    // the `B` record shows: a replica whose HIGHESTMODSEQ ran ahead during its import would
    // now look unchanged to the master, which would skip INBOX.
    dv(&["mailbox", "delete", "Trash"]);
    dv(&["flags", "add", "\\Flagged", "mailbox", "INBOX", "uid", "4"]);
    dv(&["flags", "add", "Work", "mailbox", "INBOX", "uid", "6"]);
    dv(&["mailbox", "rename", "-s", "Lists", "Groups"]);
    u.save(Tool::Dovecot, "Groups.rust", &mail("after the rename"));
    dv(&["flags", "remove", "Work", "mailbox", "Groups.rust", "uid", "2"]);
    r.backup(&[], "backup after a delete and a rename", &[]);
    r.assert_noop(&[], "repeated backup after a rename", &[]);
}
