//! `doveadm backup` against our `mailreplica dsync-server`, differentially: every scenario runs
//! twice from the same starting point, once with Dovecot's own `doveadm dsync-server` as the
//! slave and once with ours, and both must end the same way: the same mailboxes, identities,
//! UIDs, GUIDs, flags, subscriptions and bytes (as Dovecot reads them), the same exit code, and
//! the same session as the master saw it (see `common::dsync::Transcript`). Each run also
//! goes the other way round, our master (`mailreplica backup`) into Dovecot's slave, whose
//! replica must end as Dovecot's pair leaves its own.
//!
//! Layout of a test user's home:
//!
//! ```text
//!   ~/Maildir   the master (doveadm's side); for `backup -R` the destinations are ~/MD, ~/MO
//!   ~/SD        replica written by Dovecot's slave (the oracle)
//!   ~/SO        replica written by ours
//!   ~/SM        replica written by Dovecot's slave for our master
//!   ~/MM        for `backup -R`: the destination our master writes from Dovecot's source
//! ```

mod common;

use common::dsync::{DsyncRun, Slave, assert_same_transcripts, maildir_at};
use common::{TestUser, Tool, mail, mail_snapshot};

const MASTER: &str = "maildir:~/Maildir";

/// The replicas of a one-way scenario: Dovecot's and ours, and a third one that our master
/// (`mailreplica backup`) writes through Dovecot's slave, which must end as Dovecot's pair
/// leaves its replica.
struct Replicas<'a> {
    u: &'a TestUser,
    dv: String,
    ours: String,
    mine: String,
    /// Our master's last run into `mine`, for the checks that follow it.
    last_mine: std::cell::RefCell<Option<common::Output>>,
    /// The state our master printed last for `mine` (see `state_round`).
    mine_state: std::cell::RefCell<String>,
}

impl<'a> Replicas<'a> {
    fn new(u: &'a TestUser) -> Self {
        Self {
            u,
            dv: maildir_at("SD"),
            ours: maildir_at("SO"),
            mine: maildir_at("SM"),
            last_mine: Default::default(),
            mine_state: Default::default(),
        }
    }

    /// `mailreplica backup ARGS` from the master into `mine`, through Dovecot's slave.
    fn run_mine(&self, args: &[&str]) -> common::Output {
        let loc = format!("mail_location={MASTER}");
        let mut all = vec!["-o", &loc, "backup"];
        all.extend_from_slice(args);
        let slave = self.u.slave_command(Slave::Dovecot, &self.mine);
        all.push(&slave);
        self.u.mr(&all)
    }

    /// Our master's run must have ended as Dovecot's master did (`code`), its replica as
    /// Dovecot's; where Dovecot's replica lost changes, `mine` may have them (as the master).
    #[track_caller]
    fn check_mine(&self, code: Option<i32>, what: &str, dovecot_diverges: &[&str]) {
        let Some(m) = self.last_mine.borrow_mut().take() else { return };
        assert_eq!(m.code, code, "{what}: our master, Dovecot's slave: {}", m.describe());
        let what = format!("{what} (our master, Dovecot's slave)");
        let diverged = self.u.compare_with_oracle(MASTER, &self.dv, &self.mine, &what);
        assert!(
            diverged.iter().all(|d| dovecot_diverges.contains(&d.as_str())),
            "{what}: differs from Dovecot's pair in {diverged:?}"
        );
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
        self.check_mine(d.out.code, what, dovecot_diverges);
    }

    /// Both runs, without checks.
    fn run(&self, args: &[&str]) -> (DsyncRun, DsyncRun) {
        self.run_each(args, args)
    }

    /// Both runs with different arguments (each replica has its own saved state).
    fn run_each(&self, dv_args: &[&str], our_args: &[&str]) -> (DsyncRun, DsyncRun) {
        fn with<'s>(args: &[&'s str]) -> Vec<&'s str> {
            let mut all = vec!["backup"];
            all.extend_from_slice(args);
            all
        }
        let d = self.u.dsync(MASTER, &with(dv_args), Slave::Dovecot, &self.dv);
        let o = self.u.dsync(MASTER, &with(our_args), Slave::Ours, &self.ours);
        // (A saved state belongs to the replica it was printed for; `mine` keeps none.)
        if dv_args == our_args && !dv_args.contains(&"-s") {
            *self.last_mine.borrow_mut() = Some(self.run_mine(dv_args));
        }
        (d, o)
    }

    /// A second `backup ARGS` right after one must change nothing: no mail is requested or
    /// sent, and not one file of our replica changes. Our replica ends an import with the
    /// master's HIGHESTMODSEQ, so (unless `-f`) the master skips every mailbox and sends no
    /// change at all (with Dovecot's own slave it does not, see `Transcript::canonical`).
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
        // (Checked last, so that a replica that is wrong fails on its contents first. A full
        // sync, -f, exchanges every mailbox whatever its numbers.)
        if !args.contains(&"-f") {
            let t = &o.transcript;
            assert!(t.master_records("C ").is_empty(), "{what}: not skipped: {:#?}", t.lines());
        }
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

/// One saved-state round: `backup -s STATE` into both replicas (each with the state its own
/// last run printed), checked like every run. It must stay incremental: a state sync, a new
/// non-empty state, no mailbox answered as lost, no "retry with a full sync" (`DsyncRun::ok`
/// rejects every warning).
#[track_caller]
fn state_round(r: &Replicas<'_>, states: &mut (String, String), what: &str) -> (DsyncRun, DsyncRun) {
    let fresh = states.0.is_empty();
    let (d, o) = r.run_each(&["-s", &states.0], &["-s", &states.1]);
    r.check(&d, &o, what, &[]);
    for run in [&d, &o] {
        let t = &run.transcript;
        let kind = if states.0.is_empty() { "Changed" } else { "State" };
        assert!(t.master_records("H ").iter().all(|h| h.contains(kind)), "{what}: not a {kind} sync: {:#?}", t.lines());
        assert!(t.slave_records("B ").iter().all(|b| b.contains("lost=false")), "{what}: lost: {:#?}", t.lines());
        assert!(!run.state().is_empty(), "{what}: no state printed: {}", run.describe());
    }
    *states = (d.state(), o.state());
    // Our master into Dovecot's slave, with the state it printed for that replica (none when
    // the others start afresh): as incremental, and the replica as Dovecot's pair leaves it.
    if fresh {
        r.mine_state.borrow_mut().clear();
    }
    let before = r.mine_state.borrow().clone();
    let m = r.run_mine(&["-s", &before]);
    let text = m.text().trim().to_owned();
    assert!(
        m.success() && !text.is_empty() && !m.stderr.contains("retry with a full sync"),
        "{what}: our master, Dovecot's slave: {}",
        m.describe()
    );
    *r.mine_state.borrow_mut() = text;
    *r.last_mine.borrow_mut() = Some(m);
    r.check_mine(Some(0), what, &[]);
    (d, o)
}

#[test]
fn backup_with_saved_states_stays_incremental() {
    let u = TestUser::new();
    let r = Replicas::new(&u);
    let dv = |args: &[&str]| {
        u.dv_ok(args);
    };
    dv(&["mailbox", "create", "-s", "Archive", "Archive.2024", "Old"]);
    for i in 0..6 {
        u.save(Tool::Dovecot, "INBOX", &mail(&format!("inbox {i}")));
        u.save(Tool::Dovecot, "Archive.2024", &mail(&format!("archive {i}")));
    }
    u.save(Tool::Dovecot, "Old", &mail("old"));
    dv(&["flags", "add", "\\Seen $Junk", "mailbox", "INBOX", "uid", "1:3"]);
    let mut states = (String::new(), String::new());
    state_round(&r, &mut states, "backup -s '' into an empty account");

    // New mails, flag and keyword changes, expunges: only these travel.
    for i in 6..9 {
        u.save(Tool::Dovecot, "INBOX", &mail(&format!("inbox {i}")));
    }
    dv(&["flags", "remove", "$Junk", "mailbox", "INBOX", "uid", "2"]);
    dv(&["flags", "add", "\\Answered Work", "mailbox", "INBOX", "uid", "4"]);
    dv(&["flags", "add", "\\Flagged", "mailbox", "Archive.2024", "uid", "6"]);
    dv(&["expunge", "mailbox", "INBOX", "uid", "5"]);
    dv(&["expunge", "mailbox", "Archive.2024", "uid", "1:2"]);
    let (_, o) = state_round(&r, &mut states, "backup -s STATE after changes");
    let t = &o.transcript;
    let saves = t.master_records("C Save");
    assert_eq!(saves.len(), 3, "only the new mails are sent as saves: {:#?}", t.lines());
    assert_eq!(t.master_records("C Flag").len(), 3, "{:#?}", t.lines());
    assert_eq!(t.master_records("C Expunge").len(), 3, "{:#?}", t.lines());
    assert_eq!(t.master_records("M ").len(), 3, "{:#?}", t.lines());

    // Mailbox changes: a new one, a deleted one, a renamed one, subscriptions.
    dv(&["mailbox", "create", "-s", "New"]);
    u.save(Tool::Dovecot, "New", &mail("new box"));
    dv(&["mailbox", "delete", "Old"]);
    dv(&["mailbox", "rename", "Archive.2024", "Archive.2025"]);
    dv(&["mailbox", "unsubscribe", "Archive"]);
    u.save(Tool::Dovecot, "Archive.2025", &mail("after the rename"));
    state_round(&r, &mut states, "backup -s STATE after mailbox changes");

    // Nothing changed: nothing travels.
    let (d, o) = state_round(&r, &mut states, "backup -s STATE without changes");
    for run in [&d, &o] {
        let t = &run.transcript;
        assert!(t.master_records("C ").is_empty() && t.master_records("M ").is_empty(), "{:#?}", t.lines());
    }

    // A replica that lost its index (Dovecot's, or ours) no longer knows what changed since
    // the saved state: it must not pretend to, but answer that the mailbox is lost, so that
    // the master drops its state (and prints an empty one); the next run repairs everything.
    for f in ["dovecot.index", "dovecot.index.log", "dovecot.index.cache"] {
        let _ = std::fs::remove_file(u.home.join("SD/.Archive.2025").join(f));
    }
    std::fs::remove_file(u.home.join("SO/.Archive.2025/mailreplica-index")).expect("our index");
    for f in ["dovecot.index", "dovecot.index.log", "dovecot.index.cache"] {
        let _ = std::fs::remove_file(u.home.join("SM/.Archive.2025").join(f));
    }
    dv(&["flags", "add", "\\Seen", "mailbox", "Archive.2025", "all"]);
    let (d, o) = r.run_each(&["-s", &states.0], &["-s", &states.1]);
    let before = r.mine_state.borrow().clone();
    let m = r.run_mine(&["-s", &before]);
    assert_eq!(m.code, d.out.code, "lost index, our master: {}", m.describe());
    assert_eq!(m.text().trim(), "", "our master must forget its state: {}", m.describe());
    r.mine_state.borrow_mut().clear();
    assert_eq!(d.out.code, o.out.code, "lost index: exit codes differ:\n{}\n{}", d.describe(), o.describe());
    assert_same_transcripts(&d, &o, "lost index");
    for run in [&d, &o] {
        let t = &run.transcript;
        assert_eq!(t.slave_records("B ").iter().filter(|b| b.contains("lost=true")).count(), 1, "{:#?}", t.lines());
        assert_eq!(run.state(), "", "the master must forget its state: {}", run.describe());
    }
    states = (String::new(), String::new());
    state_round(&r, &mut states, "backup -s '' after a lost index");
    state_round(&r, &mut states, "backup -s STATE after that");
}

#[test]
fn backup_options_full_one_mailbox_and_excludes() {
    let u = TestUser::new();
    let r = Replicas::new(&u);
    let dv = |args: &[&str]| {
        u.dv_ok(args);
    };
    dv(&["mailbox", "create", "Archive", "Archive.2024", "Spam", "Work"]);
    for mb in ["INBOX", "Archive.2024", "Spam", "Work"] {
        for i in 0..2 {
            u.save(Tool::Dovecot, mb, &mail(&format!("{mb} {i}")));
        }
    }
    // -m: only INBOX (the tree still travels, mails only of INBOX).
    r.backup(&["-m", "INBOX"], "backup -m INBOX", &[]);
    // -x: everything but Spam and the Archive hierarchy.
    r.backup(&["-x", "Spam", "-x", "Archive*"], "backup -x Spam -x Archive*", &[]);
    dv(&["flags", "add", "\\Seen", "mailbox", "Work", "uid", "1"]);
    u.save(Tool::Dovecot, "Spam", &mail("more spam"));
    // Dovecot's replica of Work loses the flag change (its HIGHESTMODSEQ ran one ahead during
    // the import; see the first test); the full sync below repairs it.
    r.backup(&["-x", "Spam"], "backup -x Spam after changes", &["Work"]);
    // -f: a full sync of everything.
    r.backup(&["-f"], "backup -f", &[]);
    r.assert_noop(&["-f"], "repeated backup -f", &[]);
}

/// `backup -R`: doveadm's side is the destination and the slave is the source. Each slave
/// reads its own copy of one source Maildir (`cp -a`), changed the same way before each
/// round; the two destinations must end the same.
struct Reverse<'a> {
    u: &'a TestUser,
    /// The state our master printed last for `DEST_MINE`.
    mine_state: std::cell::RefCell<String>,
}

impl Reverse<'_> {
    const SRC_DV: &'static str = "maildir:~/SrcD";
    const SRC_OURS: &'static str = "maildir:~/SrcO";
    const DEST_DV: &'static str = "maildir:~/MD";
    const DEST_OURS: &'static str = "maildir:~/MO";
    /// Written by our master (`mailreplica backup -R`) from Dovecot's source through Dovecot's
    /// slave: it must end as `DEST_DV`, which Dovecot's pair wrote.
    const DEST_MINE: &'static str = "maildir:~/MM";

    fn src_dir(&self, slave: Slave) -> std::path::PathBuf {
        self.u.home.join(if slave == Slave::Dovecot { "SrcD" } else { "SrcO" })
    }

    /// Copies Dovecot's source to ours, as it is (the starting point of both).
    fn copy_source(&self) {
        let (from, to) = (self.src_dir(Slave::Dovecot), self.src_dir(Slave::Ours));
        let _ = std::fs::remove_dir_all(&to);
        let out = common::run(
            {
                let mut c = std::process::Command::new("cp");
                c.arg("-a").arg(&from).arg(&to);
                c
            },
            None,
        );
        assert!(out.success(), "cp -a: {}", out.describe());
    }

    /// `backup -R ARGS` into both destinations; the sources must be unchanged (a backup
    /// source only reads), the sessions the same, the destinations the same.
    #[track_caller]
    fn backup(&self, dv_args: &[&str], our_args: &[&str], what: &str) -> (DsyncRun, DsyncRun) {
        let v = self.u.view_at(Tool::Dovecot, Some(Self::SRC_DV));
        assert_eq!(v, self.u.view_at(Tool::Dovecot, Some(Self::SRC_OURS)), "{what}: the two sources differ");
        let src = self.src_dir(Slave::Ours);
        let before = mail_snapshot(&src);
        let with = |args: &[&str]| {
            let mut all: Vec<String> = vec!["backup".into(), "-R".into()];
            all.extend(args.iter().map(|a| (*a).to_owned()));
            all
        };
        let (a, b) = (with(dv_args), with(our_args));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        let d = self.u.dsync(Self::DEST_DV, &a, Slave::Dovecot, Self::SRC_DV);
        let o = self.u.dsync(Self::DEST_OURS, &b, Slave::Ours, Self::SRC_OURS);
        common::assert_mail_unchanged(&before, &src, &format!("{what}: our slave as the backup source"));
        d.ok();
        o.ok();
        assert_same_transcripts(&d, &o, what);
        self.u.checked_view(Self::SRC_OURS, true);
        let diverged = self.u.compare_with_oracle(Self::SRC_DV, Self::DEST_DV, Self::DEST_OURS, what);
        assert!(diverged.is_empty(), "{what}: Dovecot's destination diverged from its source in {diverged:?}");
        // Our master the same way; a state given is replaced by the one it printed for its
        // own destination.
        let stateful = dv_args.contains(&"-s");
        let mine_state = self.mine_state.borrow().clone();
        let args: Vec<&str> = match dv_args.iter().position(|a| *a == "-s") {
            Some(i) if dv_args.get(i + 1).is_some_and(|s| !s.is_empty()) => {
                let mut v = dv_args.to_vec();
                v[i + 1] = &mine_state;
                v
            }
            _ => dv_args.to_vec(),
        };
        {
            let loc = format!("mail_location={}", Self::DEST_MINE);
            let slave = self.u.slave_command(Slave::Dovecot, Self::SRC_DV);
            let mut all = vec!["-o", &loc, "backup", "-R"];
            all.extend_from_slice(&args);
            all.push(&slave);
            let m = self.u.mr(&all);
            assert!(
                m.success() && !m.stderr.contains("retry with a full sync"),
                "{what}: our master, Dovecot's slave: {}",
                m.describe()
            );
            if stateful {
                let printed = m.text().trim().to_owned();
                assert!(!printed.is_empty(), "{what}: our master printed no state: {}", m.describe());
                *self.mine_state.borrow_mut() = printed;
            }
            let what = format!("{what} (our master, Dovecot's slave)");
            let diverged = self.u.compare_with_oracle(Self::SRC_DV, Self::DEST_DV, Self::DEST_MINE, &what);
            assert!(diverged.is_empty(), "{what}: differs from Dovecot's pair in {diverged:?}");
        }
        (d, o)
    }

    /// Runs `tool ARGS` on the source of `slave`'s world: each world changes its own source
    /// with its own tool (Dovecot's with doveadm, ours with mailreplica), or both with doveadm.
    #[track_caller]
    fn change(&self, slave: Slave, tool: Tool, args: &[&str]) {
        let loc = if slave == Slave::Dovecot { Self::SRC_DV } else { Self::SRC_OURS };
        self.u.ok_at(tool, Some(loc), args);
    }

    /// The same change on both sources, each with its own tool.
    #[track_caller]
    fn change_both(&self, args: &[&str]) {
        self.change(Slave::Dovecot, Tool::Dovecot, args);
        self.change(Slave::Ours, Tool::Ours, args);
    }

    /// The same mail delivered into both sources (same file name, so the same GUID).
    fn deliver_both(&self, mailbox: &str, base: &str, body: &[u8]) {
        // One received date (the file's mtime) for both copies, even when the two deliveries
        // fall in different seconds: the sessions compared carry it.
        let received = std::time::SystemTime::now();
        for s in [Slave::Dovecot, Slave::Ours] {
            let root = self.src_dir(s);
            self.u.deliver(&root, mailbox, base, body);
            let dir = if mailbox == "INBOX" { root } else { root.join(format!(".{mailbox}")) };
            std::fs::File::options()
                .write(true)
                .open(dir.join("new").join(base))
                .and_then(|f| f.set_modified(received))
                .expect("set the received date");
        }
    }
}

#[test]
fn backup_reverse_from_our_maildir() {
    let u = TestUser::new();
    let r = Reverse { u: &u, mine_state: Default::default() };
    let src = Some(Reverse::SRC_DV);
    let dv = |args: &[&str]| {
        u.ok_at(Tool::Dovecot, src, args);
    };
    // The source, written by Dovecot, then copied for our slave.
    dv(&["mailbox", "create", "-s", "Archive", "Archive.2024", "Lists"]);
    for (i, m) in awkward_mails().into_iter().enumerate() {
        r.u.deliver(&r.src_dir(Slave::Dovecot), "INBOX", &format!("1700000000.M{i}P1.src"), &m);
    }
    for i in 0..3 {
        r.u.deliver(&r.src_dir(Slave::Dovecot), "Archive.2024", &format!("1700000100.M{i}P1.src"), &mail("a"));
    }
    dv(&["flags", "add", "\\Seen Work $Junk", "mailbox", "INBOX", "uid", "2:4"]);
    dv(&["flags", "add", "\\Flagged", "mailbox", "Archive.2024", "uid", "1"]);
    dv(&["mailbox", "unsubscribe", "Lists"]);
    r.copy_source();
    let (d, o) = r.backup(&["-s", ""], &["-s", ""], "backup -R into an empty Dovecot");
    let states = (d.state(), o.state());

    // Incremental: each source changed by its own tool.
    r.deliver_both("INBOX", "1700000200.M1P1.src", &mail("new one"));
    r.deliver_both("Archive.2024", "1700000200.M2P1.src", &mail("new two"));
    r.change_both(&["flags", "remove", "Work", "mailbox", "INBOX", "uid", "3"]);
    r.change_both(&["flags", "add", "\\Answered kw1", "mailbox", "INBOX", "uid", "5"]);
    r.change_both(&["expunge", "mailbox", "INBOX", "uid", "1"]);
    r.change_both(&["mailbox", "subscribe", "Lists"]);
    r.backup(&[], &[], "backup -R after changes made by each source's own tool");

    // Incremental with the saved states; this time Dovecot changes both sources.
    r.deliver_both("INBOX", "1700000300.M1P1.src", &mail("third"));
    for s in [Slave::Dovecot, Slave::Ours] {
        r.change(s, Tool::Dovecot, &["flags", "add", "\\Seen", "mailbox", "INBOX", "all"]);
        r.change(s, Tool::Dovecot, &["expunge", "mailbox", "Archive.2024", "uid", "2"]);
    }
    let (d, o) = r.backup(&["-s", &states.0], &["-s", &states.1], "backup -R -s STATE after changes by doveadm");
    for run in [&d, &o] {
        let t = &run.transcript;
        assert!(t.slave_records("B ").iter().all(|b| b.contains("lost=false")), "{:#?}", t.lines());
        assert_eq!(t.slave_records("M ").len(), 1, "only the new mail travels: {:#?}", t.lines());
    }
}

impl Replicas<'_> {
    /// Runs `tool ARGS` on each replica, Dovecot's with doveadm and ours with `ours` (our own
    /// tool, or doveadm too).
    #[track_caller]
    fn change_replicas(&self, ours: Tool, args: &[&str]) {
        self.u.ok_at(Tool::Dovecot, Some(&self.dv), args);
        self.u.ok_at(ours, Some(&self.ours), args);
        self.u.ok_at(Tool::Dovecot, Some(&self.mine), args);
    }

    /// A backup that both slaves must fail the same way (same exit code, same session as the
    /// master saw it, same replicas afterwards); returns both runs.
    #[track_caller]
    fn backup_fails(&self, what: &str) -> (DsyncRun, DsyncRun) {
        let (d, o) = self.run(&[]);
        assert!(!d.out.success(), "{what}: expected Dovecot's slave to fail: {}", d.describe());
        assert_eq!(o.out.code, d.out.code, "{what}: exit codes differ:\n{}\n{}", d.describe(), o.describe());
        assert_same_transcripts(&d, &o, what);
        self.u.checked_view(&self.ours, true);
        let diverged = self.u.compare_with_oracle(MASTER, &self.dv, &self.ours, what);
        assert!(diverged.is_empty(), "{what}: {diverged:?}");
        self.check_mine(d.out.code, what, &[]);
        (d, o)
    }
}

#[test]
fn destination_conflicts_are_resolved_as_dovecot_does() {
    let u = TestUser::new();
    let r = Replicas::new(&u);
    let dv = |args: &[&str]| {
        u.dv_ok(args);
    };
    dv(&["mailbox", "create", "Archive", "Box"]);
    for i in 0..3 {
        u.save(Tool::Dovecot, "INBOX", &mail(&format!("inbox {i}")));
        u.save(Tool::Dovecot, "Archive", &mail(&format!("archive {i}")));
        u.save(Tool::Dovecot, "Box", &mail(&format!("box {i}")));
    }
    r.backup(&[], "backup into empty replicas", &[]);

    // Flags changed and a mail expunged on the replicas, nothing on the master: a backup
    // puts the flags back and, finding a mail missing below its UIDNEXT, deletes the mailbox
    // and fails; the next run recreates it.
    r.change_replicas(Tool::Ours, &["flags", "add", "\\Seen kwx", "mailbox", "Archive", "uid", "1"]);
    r.change_replicas(Tool::Ours, &["expunge", "mailbox", "Box", "uid", "2"]);
    r.backup_fails("backup after a mail vanished on the replicas");
    r.backup(&[], "backup after the replicas deleted the damaged mailbox", &[]);

    // A replica mail at the UID the master uses for another mail.
    for (tool, loc) in [(Tool::Dovecot, &r.dv), (Tool::Ours, &r.ours), (Tool::Dovecot, &r.mine)] {
        u.ok_in(tool, &["-o", &format!("mail_location={loc}"), "save", "-m", "Archive"], &mail("replica only"));
    }
    u.save(Tool::Dovecot, "Archive", &mail("master's next"));
    r.backup_fails("backup with a UID conflict");
    r.backup(&[], "backup after the conflict", &[]);

    // A replica-only mail above the master's UIDNEXT: the replica's UIDNEXT is now above the
    // master's, so the mailbox tree sync deletes and recreates the mailbox in the same run.
    for (tool, loc) in [(Tool::Dovecot, &r.dv), (Tool::Ours, &r.ours), (Tool::Dovecot, &r.mine)] {
        u.ok_in(tool, &["-o", &format!("mail_location={loc}"), "save", "-m", "Box"], &mail("replica only"));
    }
    let (_, o) = r.backup(&[], "backup with a replica-only mail", &[]);
    assert!(
        o.transcript.slave_records("B ").iter().any(|b| b.contains("uidnext=1 messages=0")),
        "{:#?}",
        o.transcript.lines()
    );

    // A changed UIDVALIDITY on the replicas (Dovecot changes it on both).
    r.change_replicas(Tool::Dovecot, &["mailbox", "update", "--uid-validity", "12345", "Archive"]);
    r.backup(&[], "backup after the replica's UIDVALIDITY changed", &[]);
    r.assert_noop(&[], "and then nothing", &[]);
}

/// A replica that already has mail of its own: an INBOX with another GUID (which every
/// Maildir gets as soon as anything opens it) and a mailbox the source lacks. Dovecot's slave
/// cannot make this a backup: it wants to delete INBOX, cannot, and fails (exit 65) on every
/// run. Ours empties INBOX and gives it the source's identity (what deleting and recreating
/// it would do) and deletes the other mailbox: the replica becomes the source's copy.
#[test]
fn backup_over_a_replica_with_mail_of_its_own() {
    let u = TestUser::new();
    let r = Replicas::new(&u);
    for (tool, loc) in [(Tool::Dovecot, &r.dv), (Tool::Ours, &r.ours), (Tool::Dovecot, &r.mine)] {
        u.ok_at(tool, Some(loc), &["mailbox", "create", "-s", "Stale"]);
        for mb in ["INBOX", "Stale"] {
            u.ok_in(tool, &["-o", &format!("mail_location={loc}"), "save", "-m", mb], &mail("replica's own"));
        }
    }
    u.dv_ok(&["mailbox", "create", "Archive"]);
    for i in 0..3 {
        u.save(Tool::Dovecot, "INBOX", &mail(&format!("inbox {i}")));
        u.save(Tool::Dovecot, "Archive", &mail(&format!("archive {i}")));
    }
    u.dv_ok(&["flags", "add", "\\Seen", "mailbox", "INBOX", "uid", "2"]);
    let (d, o) = r.run(&[]);
    assert_eq!(d.out.code, Some(75), "Dovecot's slave was expected to fail: {}", d.describe());
    assert!(d.out.stderr.contains("INBOX can't be deleted"), "{}", d.describe());
    // Our master meets the same refusal from Dovecot's slave, and says so.
    let m = r.last_mine.borrow_mut().take().expect("our master ran");
    assert_eq!(m.code, Some(75), "{}", m.describe());
    assert!(m.stderr.contains("INBOX can't be deleted"), "{}", m.describe());
    o.ok();
    u.checked_view(&r.ours, true);
    let diverged = u.compare_with_oracle(MASTER, MASTER, &r.ours, "our replica against the master");
    assert!(diverged.is_empty(), "{diverged:?}");
    let root = u.home.join("SO");
    let before = mail_snapshot(&root);
    let o = u.dsync(MASTER, &["backup"], Slave::Ours, &r.ours);
    o.ok();
    common::assert_mail_unchanged(&before, &root, "a second backup");
    assert!(o.transcript.master_records("C ").is_empty(), "{:#?}", o.transcript.lines());
}
