//! Two-way `doveadm sync` with us as the slave, checked differentially against Dovecot's
//! own slave.
//!
//! Every scenario runs twice in one user's home, from the same starting point:
//!
//! ```text
//!   run D:  doveadm sync  (master ~/A)  <->  doveadm dsync-server      (slave ~/B)
//!   run M:  doveadm sync  (master ~/A2) <->  mailreplica dsync-server  (slave ~/S)
//! ```
//!
//! The same operations are applied to both runs (on the master with doveadm, on the slave
//! with the slave's own tool), then both sync. The final mailboxes of run M must equal those
//! of run D, side for side: names, subscriptions, mailbox GUIDs and UIDVALIDITY, UIDs, mail
//! GUIDs, flags and keywords. Operations are deterministic so that this holds: mails are
//! delivered as files with fixed names (the name is the GUID), mailboxes are created with
//! fixed GUIDs and UIDVALIDITY. A second sync must then change nothing on either side.
//!
//! Then, in this order: the cases where Dovecot 2.3.19 itself does not converge (and ours
//! must), UIDNEXT after a mail saved and expunged, flags changed on both sides after an
//! imported change, a replica whose Maildir Dovecot made, subscriptions of a mailbox renamed
//! on the other side, and the randomized rounds (both runs, every operation).

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

/// Which tool serves the slave side of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slave {
    Dovecot,
    Ours,
}

/// Which side of a pair an operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Master,
    Slave,
}

/// How the runs sync: without a state (every sync compares everything) or with the state
/// string `doveadm sync -s` prints, passed to the next sync (as the replicator does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stateless,
    Stateful,
}

/// One master/slave pair of Maildirs in the test user's home.
struct Pair<'a> {
    u: &'a TestUser,
    master: &'static str,
    slave: &'static str,
    kind: Slave,
    mode: Mode,
    /// The state the last sync printed (stateful mode).
    state: &'a RefCell<String>,
    /// Where views note what doveadm warned about instead of failing (see
    /// [`Runs::lenient_views`]).
    view_warnings: Option<&'a RefCell<Vec<String>>>,
    /// `sync` or `backup` (see [`Runs::verb`]).
    verb: &'static str,
}

/// What one side shows: the common harness's [`View`] without the modseq-dependent parts.
type SideView = View;

impl<'a> Pair<'a> {
    fn dovecot(u: &'a TestUser, mode: Mode, state: &'a RefCell<String>) -> Self {
        Self { u, master: "A", slave: "B", kind: Slave::Dovecot, mode, state, view_warnings: None, verb: "sync" }
    }

    fn ours(u: &'a TestUser, mode: Mode, state: &'a RefCell<String>) -> Self {
        Self { u, master: "A2", slave: "S", kind: Slave::Ours, mode, state, view_warnings: None, verb: "sync" }
    }

    fn loc(&self, side: Side) -> &'static str {
        match side {
            Side::Master => self.master,
            Side::Slave => self.slave,
        }
    }

    fn dir(&self, side: Side) -> PathBuf {
        self.u.tmp().join("home").join(self.loc(side))
    }

    fn tool(&self, side: Side) -> Tool {
        match (side, self.kind) {
            (Side::Slave, Slave::Ours) if !our_master() => Tool::Ours,
            _ => Tool::Dovecot,
        }
    }

    /// `TOOL -o mail_location=maildir:~/LOC ARGS` for `side`.
    fn run(&self, side: Side, args: &[&str]) -> Output {
        let loc = format!("mail_location=maildir:~/{}", self.loc(side));
        let mut all = vec!["-o", &loc];
        all.extend_from_slice(args);
        self.u.run(self.tool(side), &all)
    }

    #[track_caller]
    fn ok(&self, side: Side, args: &[&str]) -> String {
        self.run(side, args).ok().text()
    }

    /// The slave command doveadm starts (it runs as the user, with the user's environment).
    fn slave_command(&self) -> String {
        match self.kind {
            Slave::Ours if !our_master() => format!(
                "{}{} -c {} -o mail_location=maildir:~/{} dsync-server",
                // MAILREPLICA_TEST_SLAVE_LOG=debug: our slave's log (in doveadm's stderr).
                std::env::var("MAILREPLICA_TEST_SLAVE_LOG")
                    .map(|l| format!("env MAILREPLICA_LOG={l} "))
                    .unwrap_or_default(),
                MAILREPLICA,
                self.u.our_conf().display(),
                self.slave
            ),
            _ => format!(
                "{}{} -c {} -o mail_location=maildir:~/{} dsync-server",
                require_doveadm().display(),
                // MAILREPLICA_TEST_SLAVE_LOG (any value): Dovecot's slave logs with -D.
                if std::env::var_os("MAILREPLICA_TEST_SLAVE_LOG").is_some() { " -D" } else { "" },
                self.u.dovecot_conf().display(),
                self.slave
            ),
        }
    }

    /// `doveadm sync [-s STATE] [EXTRA] SLAVE-COMMAND` on the master; in stateful mode the
    /// printed state is kept for the next sync.
    fn sync_with(&self, extra: &[&str]) -> Output {
        let out = self.sync_unchecked(extra);
        if self.kind == Slave::Ours {
            assert_master_content(&out);
        }
        out
    }

    /// [`Pair::sync_with`] without looking at what the master logged.
    fn sync_unchecked(&self, extra: &[&str]) -> Output {
        let loc = format!("mail_location=maildir:~/{}", self.master);
        let cmd = self.slave_command();
        let state = self.state.borrow().clone();
        let mut args = vec!["-o", &loc, self.verb];
        if self.mode == Mode::Stateful {
            args.extend(["-s", &state]);
        }
        args.extend_from_slice(extra);
        if self.kind == Slave::Ours && our_master() {
            // Our master, Dovecot's slave: the same command line, with `mailreplica -u USER`
            // in place of doveadm on the master's side.
            args.push(&cmd);
            let out = self.u.mr(&args);
            if self.mode == Mode::Stateful {
                let new = out.text().trim().to_owned();
                assert!(!new.contains('\n'), "odd state printed: {}", out.describe());
                *self.state.borrow_mut() = new;
            }
            return out;
        }
        // MAILREPLICA_TEST_RAWLOG=DIR keeps a raw log of every sync there (doveadm -r).
        let rawlog = std::env::var("MAILREPLICA_TEST_RAWLOG").ok().map(|dir| {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{dir}/{}-{:?}-{n:03}.log", self.u.name, self.kind)
        });
        if let Some(r) = &rawlog {
            args.extend(["-r", r.as_str()]);
        }
        args.push(&cmd);
        let out = self.u.doveadm(&args);
        // doveadm always prints the new state, empty when the next sync must be a full one
        // (after a failure, or when the slave asked for a full resync).
        if self.mode == Mode::Stateful {
            let new = out.text().trim().to_owned();
            assert!(!new.contains('\n'), "odd state printed: {}", out.describe());
            *self.state.borrow_mut() = new;
        }
        out
    }

    /// `doveadm sync` whose slave command runs behind `tests/.../inject.sh`: just before the
    /// first mail change record reaches the slave, `inject` (a shell script) runs.
    fn sync_injecting(&self, inject: &Path) -> Output {
        let wrapper = self.u.tmp().join("inject.sh");
        if !wrapper.exists() {
            fs::write(&wrapper, INJECT_SH).expect("write inject.sh");
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let loc = format!("mail_location=maildir:~/{}", self.master);
        let cmd = format!("{} {} {}", wrapper.display(), inject.display(), self.slave_command());
        let state = self.state.borrow().clone();
        let mut args = vec!["-o", &loc, "sync"];
        if self.mode == Mode::Stateful {
            args.extend(["-s", &state]);
        }
        args.push(&cmd);
        let out = if self.kind == Slave::Ours && our_master() { self.u.mr(&args) } else { self.u.doveadm(&args) };
        if self.mode == Mode::Stateful {
            *self.state.borrow_mut() = out.text().trim().to_owned();
        }
        out
    }

    /// A sync that must succeed (exit 0).
    #[track_caller]
    fn sync(&self) -> Output {
        let out = self.sync_with(&[]);
        assert!(out.success(), "{:?} run: sync failed: {}", self.kind, out.describe());
        out
    }

    // ---- operations ----------------------------------------------------------------

    fn mailbox_dir(&self, side: Side, mailbox: &str) -> PathBuf {
        if mailbox == "INBOX" { self.dir(side) } else { self.dir(side).join(format!(".{mailbox}")) }
    }

    /// Delivers a mail as an MDA does: a file named `name` (which becomes its GUID) in the
    /// mailbox's `new/`.
    fn deliver(&self, side: Side, mailbox: &str, name: &str) {
        let new = self.mailbox_dir(side, mailbox).join("new");
        assert!(new.is_dir(), "{:?} {side:?}: no mailbox directory {}", self.kind, new.display());
        let path = new.join(name);
        self.u.write_file(&path, &mail(name));
    }

    /// Creates a mailbox with a fixed GUID and UIDVALIDITY (INBOX always exists: it only
    /// gets them).
    /// Like [`Pair::deliver`], with a received date (the file's mtime) and `pad` bytes of
    /// extra body.
    fn deliver_dated(&self, side: Side, mailbox: &str, name: &str, received: i64, pad: usize) {
        let path = self.mailbox_dir(side, mailbox).join("new").join(name);
        let mut text = mail(name);
        text.extend(std::iter::repeat_n(b'x', pad));
        text.push(b'\n');
        self.u.write_file(&path, &text);
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(received as u64);
        fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(when)).expect("set mtime");
    }

    fn create(&self, side: Side, mailbox: &str, guid: &str, uidvalidity: u32) {
        let v = uidvalidity.to_string();
        if mailbox == "INBOX" {
            self.ok(side, &["mailbox", "update", "--mailbox-guid", guid, "--uid-validity", &v, mailbox]);
        } else {
            self.ok(side, &["mailbox", "create", "-g", guid, mailbox]);
            self.ok(side, &["mailbox", "update", "--uid-validity", &v, mailbox]);
        }
    }

    /// The UID of the mail with GUID `guid` in `mailbox`.
    #[track_caller]
    fn uid_of(&self, side: Side, mailbox: &str, guid: &str) -> String {
        let t = self.ok(side, &["-f", "tab", "fetch", "uid", "mailbox", mailbox, "guid", guid]);
        let rows = parse_tab(&t, &["uid"]);
        assert_eq!(rows.len(), 1, "{:?} {side:?}: {guid} in {mailbox}: {t:?}", self.kind);
        rows[0][0].clone()
    }

    fn flags(&self, side: Side, op: &str, flags: &str, mailbox: &str, guid: &str) {
        let uid = self.uid_of(side, mailbox, guid);
        self.ok(side, &["flags", op, flags, "mailbox", mailbox, "uid", &uid]);
    }

    fn expunge(&self, side: Side, mailbox: &str, guid: &str) {
        let uid = self.uid_of(side, mailbox, guid);
        self.ok(side, &["expunge", "mailbox", mailbox, "uid", &uid]);
    }

    fn mailbox_cmd(&self, side: Side, args: &[&str]) {
        let mut all = vec!["mailbox"];
        all.extend_from_slice(args);
        self.ok(side, &all);
    }

    /// Raises HIGHESTMODSEQ of every master mailbox by one, so that a stateful sync does not
    /// skip it (see [`Runs::sync_and_compare`]).
    fn touch_master_mailboxes(&self) {
        // The HIGHESTMODSEQ the master compares is its own index's: with our master that is
        // ours, which Dovecot's `mailbox update` does not touch (Dovecot's changes to mails,
        // made in the files, we see).
        let tool = if self.kind == Slave::Ours && our_master() { Tool::Ours } else { self.tool(Side::Master) };
        let loc = format!("mail_location=maildir:~/{}", self.loc(Side::Master));
        let run = |args: &[&str]| {
            let mut all = vec!["-o", loc.as_str()];
            all.extend_from_slice(args);
            self.u.run(tool, &all).ok().text()
        };
        let t = run(&["-f", "tab", "mailbox", "status", "highestmodseq", "*"]);
        for row in parse_tab(&t, &["mailbox", "highestmodseq"]) {
            let next = (row[1].parse::<u64>().expect("modseq") + 1).to_string();
            run(&["mailbox", "update", "--min-highest-modseq", &next, &row[0]]);
        }
    }

    // ---- the mailbox-list change log's clock ---------------------------------------

    /// Where `side`'s `dovecot.mailbox.log` ends now (see [`Pair::list_log_stamp`]).
    fn list_log_mark(&self, side: Side) -> u64 {
        fs::metadata(self.dir(side).join("dovecot.mailbox.log")).map_or(0, |m| m.len())
    }

    /// Gives every record written to `side`'s `dovecot.mailbox.log` since `mark` the time
    /// `t`. dsync decides renames, deletions and subscription conflicts by these timestamps
    /// (whole seconds): stamping them makes the decisions the same in both runs, however the
    /// runs' commands fall on second boundaries. (Both tools write the same 24-byte records,
    /// time big-endian in the last 4 bytes; at 4 KiB the file moves to `.2`.)
    fn list_log_stamp(&self, side: Side, mark: u64, t: u32) {
        let root = self.dir(side);
        let main = root.join("dovecot.mailbox.log");
        let restamp = |path: &Path, from: u64| {
            let Ok(mut data) = fs::read(path) else { return };
            let mut changed = false;
            let mut i = from as usize;
            while i + 24 <= data.len() {
                data[i + 20..i + 24].copy_from_slice(&t.to_be_bytes());
                changed = true;
                i += 24;
            }
            if changed {
                // In place: the file keeps its owner and mode.
                let mut f = fs::OpenOptions::new().write(true).open(path).expect("open mailbox log");
                std::io::Write::write_all(&mut f, &data).expect("rewrite mailbox log");
            }
        };
        if self.list_log_mark(side) >= mark {
            restamp(&main, mark);
        } else {
            // Rotated: the old file with the new records at its end is `.2` now.
            restamp(&root.join("dovecot.mailbox.log.2"), mark);
            restamp(&main, 0);
        }
    }

    /// [`Pair::apply`] at the virtual time `t` (see [`Pair::list_log_stamp`]).
    fn apply_at(&self, side: Side, op: &Op, t: u32) {
        let mark = self.list_log_mark(side);
        self.apply(side, op);
        self.list_log_stamp(side, mark, t);
    }

    /// [`Pair::sync_unchecked`] at the virtual time `t`: what the sync writes to either
    /// side's mailbox-list log gets that time.
    fn sync_at(&self, extra: &[&str], t: u32) -> Output {
        let marks = (self.list_log_mark(Side::Master), self.list_log_mark(Side::Slave));
        let out = self.sync_unchecked(extra);
        self.list_log_stamp(Side::Master, marks.0, t);
        self.list_log_stamp(Side::Slave, marks.1, t);
        out
    }

    // ---- observation ---------------------------------------------------------------

    /// Everything the side's own tool shows.
    fn view(&self, side: Side) -> SideView {
        let tool = self.tool(side);
        let loc = format!("mail_location=maildir:~/{}", self.loc(side));
        let run = |args: &[&str]| {
            let mut all = vec!["-o", &loc];
            all.extend_from_slice(args);
            if let Some(w) = self.view_warnings.filter(|_| tool == Tool::Dovecot) {
                let out = self.u.run(tool, &all);
                let lines: Vec<String> = out.stderr.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
                let ghosts = !out.success()
                    && out.code == Some(68)
                    && !lines.is_empty()
                    && lines.iter().all(|l| is_dovecot_list_index_ghost(&self.dir(side), l));
                let out = if ghosts { out } else { out.ok() };
                for line in lines {
                    let note = if ghosts { GHOST } else { "" };
                    w.borrow_mut().push(format!("{note}{side:?}: {line}"));
                }
                return out.text();
            }
            self.u.ok(tool, &all)
        };
        let status_text = run(&["-f", "tab", "mailbox", "status", "messages uidnext uidvalidity unseen guid", "*"]);
        let status: BTreeMap<String, Vec<String>> =
            parse_tab(&status_text, &["mailbox", "messages", "uidnext", "uidvalidity", "unseen", "guid"])
                .into_iter()
                .map(|mut r| (r.remove(0), r))
                .collect();
        let mut mails = BTreeMap::new();
        for m in status.keys() {
            let t = run(&["-f", "tab", "fetch", "uid guid flags", "mailbox", m, "all"]);
            let rows: Vec<[String; 3]> = parse_tab(&t, &["uid", "guid", "flags"])
                .into_iter()
                .map(|r| [r[0].clone(), r[1].clone(), normalize_flags(&r[2])])
                .collect();
            mails.insert(m.clone(), rows);
        }
        View {
            mailboxes: sorted_lines(&run(&["mailbox", "list"])),
            subscriptions: sorted_lines(&run(&["mailbox", "list", "-s"])),
            status,
            mails,
        }
    }

    /// Names of every mail file on `side` (mailbox dir + name, `new/` and `cur/` alike, an
    /// empty `:2,` ignored): equal sets before and after a sync mean no mail was saved,
    /// expunged, moved or re-flagged.
    fn mail_files(&self, side: Side) -> BTreeSet<String> {
        let root = self.dir(side);
        let mut out = BTreeSet::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    if name.starts_with('.') || d == root {
                        stack.push(p);
                    }
                } else if matches!(d.file_name().and_then(|n| n.to_str()), Some("cur" | "new")) {
                    let mbox = d.parent().and_then(|m| m.strip_prefix(&root).ok()).map(Path::to_path_buf);
                    let name = name.strip_suffix(":2,").unwrap_or(&name).to_owned();
                    out.insert(format!("{}/{name}", mbox.unwrap_or_default().display()));
                }
            }
        }
        out
    }
}

/// Both runs of one scenario.
struct Runs {
    u: TestUser,
    mode: Mode,
    states: [RefCell<String>; 2],
    /// Extra `doveadm sync` options for every sync of the scenario (e.g. `-1`).
    sync_args: Vec<&'static str>,
    /// Dovecot's own pair cannot do the second sync of a scenario (its master panics);
    /// only ours is checked then.
    dovecot_second_sync_broken: bool,
    /// Views note doveadm's warnings (one list per run) instead of failing: after a
    /// UIDVALIDITY change Dovecot's Maildir code warns about mails it meets again
    /// ("Expunged message reappeared"), in both runs alike.
    lenient_views: Option<[RefCell<Vec<String>>; 2]>,
    /// `sync` (two-way), or `backup` (the slave becomes a copy of the master).
    verb: &'static str,
}

impl Runs {
    fn new(mode: Mode) -> Self {
        require_root_and_doveadm();
        let u = TestUser::new();
        // Only the masters exist beforehand: a slave Maildir that already exists has an INBOX
        // of its own, which is a different scenario (see `inbox_created_on_both_sides`).
        for loc in ["A", "A2"] {
            let d = u.tmp().join("home").join(loc);
            fs::create_dir(&d).expect("mkdir maildir");
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).expect("chmod");
            u.chown(&d);
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir(d.join(sub)).expect("mkdir");
                u.chown(&d.join(sub));
            }
        }
        Self {
            u,
            mode,
            states: Default::default(),
            sync_args: Vec::new(),
            dovecot_second_sync_broken: false,
            lenient_views: None,
            verb: "sync",
        }
    }

    fn pairs(&self) -> [Pair<'_>; 2] {
        let [mut d, mut m] =
            [Pair::dovecot(&self.u, self.mode, &self.states[0]), Pair::ours(&self.u, self.mode, &self.states[1])];
        if let Some([wd, wm]) = &self.lenient_views {
            d.view_warnings = Some(wd);
            m.view_warnings = Some(wm);
        }
        (d.verb, m.verb) = (self.verb, self.verb);
        [d, m]
    }

    /// Applies `f` to both pairs.
    fn both(&self, f: impl Fn(&Pair<'_>)) {
        for p in self.pairs() {
            f(&p);
        }
    }

    /// Syncs both pairs, then checks: our pair shows exactly what Dovecot's shows on each
    /// side, and a second sync changes nothing. With a state both pairs must also have
    /// converged (master and slave equal); without one Dovecot leaves some conflicts (an
    /// expunge against a flag change) unresolved, and we must leave exactly the same.
    ///
    /// With a state, a Dovecot master syncs only the mailboxes whose own status differs from
    /// the state (slave-only changes wait for the master's next change there; that is how
    /// Dovecot's replication works, each side pushing its own changes). Which mailboxes
    /// that is depends on modseq bookkeeping that differs between the two slaves, so before
    /// a stateful sync every master mailbox's HIGHESTMODSEQ is raised: the master then syncs
    /// all of them, incrementally from the state, which is what this test compares.
    ///
    /// A sync that fails the way Dovecot's does (exit 75 after a UIDVALIDITY change during a
    /// stateful sync, exit 2 for changes during the sync) is retried, in both runs alike.
    #[track_caller]
    fn sync_and_compare(&self, what: &str) -> View {
        let [d, m] = self.pairs();
        let runs_d = self.sync_until_done(&d, what);
        let runs_m = self.sync_until_done(&m, what);
        assert!(runs_m <= runs_d, "{what}: our run needed {runs_m} syncs to succeed, Dovecot's own pair {runs_d}");
        let dm = d.view(Side::Master);
        let ds = d.view(Side::Slave);
        // (A one-way sync leaves the slave's own changes on the slave alone, and filters leave
        // the mails they exclude where they are.)
        // (A stateful backup leaves the slave's own changes to mails the master did not change
        // since the state, in Dovecot's pair alike; a stateless one reverts them.)
        let converges = matches!((self.verb, self.mode), ("sync", Mode::Stateful) | ("backup", Mode::Stateless));
        if converges && self.sync_args.is_empty() {
            assert_views_equal_labeled(
                &dm,
                &ds,
                &format!("{what}: Dovecot's own pair did not converge (master, slave)"),
            );
        }
        let mm = m.view(Side::Master);
        let ms = m.view(Side::Slave);
        assert_views_equal_labeled(&dm, &mm, &format!("{what}: masters differ (Dovecot's run, our run)"));
        assert_views_equal_labeled(&ds, &ms, &format!("{what}: slaves differ (Dovecot's slave, ours)"));
        self.assert_second_sync_is_noop(what);
        dm
    }

    /// [`Runs::sync_and_compare`] without the second sync: that one would move a stateful
    /// run's last common modseq past what this sync imported.
    #[track_caller]
    fn sync_once_and_compare(&self, what: &str) -> View {
        let [d, m] = self.pairs();
        let runs_d = self.sync_until_done(&d, what);
        let runs_m = self.sync_until_done(&m, what);
        assert!(runs_m <= runs_d, "{what}: our run needed {runs_m} syncs to succeed, Dovecot's own pair {runs_d}");
        let dm = d.view(Side::Master);
        assert_views_equal_labeled(
            &dm,
            &m.view(Side::Master),
            &format!("{what}: masters differ (Dovecot's run, our run)"),
        );
        assert_views_equal_labeled(
            &d.view(Side::Slave),
            &m.view(Side::Slave),
            &format!("{what}: slaves differ (Dovecot's slave, ours)"),
        );
        dm
    }

    /// Syncs `p` until a sync succeeds (at most 3 times): a sync that fails the way Dovecot's
    /// may (exit 75 after a UIDVALIDITY change during a stateful sync, exit 2 for a desync;
    /// both print an empty state, so the next sync is a full one) is retried. Returns how
    /// many syncs it took.
    #[track_caller]
    fn sync_until_done(&self, p: &Pair<'_>, what: &str) -> usize {
        let mut last = None;
        for attempt in 1..=3 {
            if self.mode == Mode::Stateful {
                p.touch_master_mailboxes();
            }
            let out = p.sync_with(&self.sync_args);
            match out.code {
                Some(0) => return attempt,
                Some(2 | 75) => last = Some(out),
                _ => panic!("{what}: {:?} run: sync failed: {}", p.kind, out.describe()),
            }
        }
        let last = last.expect("three failed syncs");
        panic!("{what}: {:?} run: three syncs in a row failed; the last: {}", p.kind, last.describe());
    }

    /// A second sync of both pairs leaves every mail file where it is. (Dovecot's own pair
    /// sometimes needs one more sync first, after its index was reset by a UIDVALIDITY
    /// change; ours may need as many as Dovecot's, never more.)
    #[track_caller]
    fn assert_second_sync_is_noop(&self, what: &str) {
        let mut counts = Vec::new();
        for p in self.pairs() {
            if p.kind == Slave::Dovecot && self.dovecot_second_sync_broken {
                counts.push(usize::MAX);
                continue;
            }
            let before = (p.mail_files(Side::Master), p.mail_files(Side::Slave));
            let vm = p.view(Side::Master);
            let vs = p.view(Side::Slave);
            counts.push(self.sync_until_done(&p, &format!("{what}, second sync")));
            let after = (p.mail_files(Side::Master), p.mail_files(Side::Slave));
            if self.sync_args.iter().any(|a| ["-I", "-O", "-t"].contains(a)) {
                // With a filter, each side gives a mail it keeps to itself a new UID on every
                // sync when the other side's UIDNEXT has passed it (the importer's rule, in
                // Dovecot's pair alike). No mail comes or goes.
                assert_eq!(all_guids(&vm), all_guids(&p.view(Side::Master)), "{what}: the master lost or gained mails");
                assert_eq!(all_guids(&vs), all_guids(&p.view(Side::Slave)), "{what}: the slave lost or gained mails");
            } else {
                assert_eq!(before.0, after.0, "{what}: {:?} run: second sync changed master files", p.kind);
                assert_eq!(before.1, after.1, "{what}: {:?} run: second sync changed slave files", p.kind);
                assert_views_equal_labeled(
                    &vm,
                    &p.view(Side::Master),
                    &format!("{what}: second sync changed the master"),
                );
                assert_views_equal_labeled(
                    &vs,
                    &p.view(Side::Slave),
                    &format!("{what}: second sync changed the slave"),
                );
            }
        }
        assert!(counts[1] <= counts[0], "{what}: our second sync needed {} runs, Dovecot's {}", counts[1], counts[0]);
    }

    /// Our slave, read by Dovecot: doveadm must see there what our own tool sees.
    #[track_caller]
    fn assert_dovecot_reads_our_slave(&self) {
        let [_, m] = self.pairs();
        let ours = m.view(Side::Slave);
        let as_dovecot = Pair { kind: Slave::Dovecot, ..m }.view(Side::Slave);
        assert_views_equal_labeled(&as_dovecot, &ours, "our slave: doveadm's view vs ours");
    }
}

/// The Dovecot master of a run with our slave must never log an error about its own
/// storage (say, "Transaction log modseq tracking is corrupted") or panic: whatever we send
/// must be something it handles as from its own slave.
#[track_caller]
/// `MAILREPLICA_TEST_OUR_MASTER=1`: "our" pair is our master (`mailreplica sync`) with
/// Dovecot's `dsync-server` as the slave, instead of Dovecot's master with our slave. The
/// test `every_scenario_with_our_master` runs this whole file so.
fn our_master() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MAILREPLICA_TEST_OUR_MASTER").is_some_and(|v| v == "1"))
}

fn assert_master_content(out: &Output) {
    if let Some(line) = master_complaints(out).first() {
        panic!("the Dovecot master complained: {line}\n{}", out.describe());
    }
}

/// The lines in which the Dovecot master of a sync complained about its own storage or
/// panicked (see [`assert_master_content`]).
fn master_complaints(out: &Output) -> Vec<String> {
    // (Lines from our slave itself, passed on by doveadm, start with "mailreplica:".)
    out.stderr
        .lines()
        .filter(|l| !l.starts_with("mailreplica:"))
        .filter(|line| {
            ["Panic:", "Fatal:"].iter().any(|b| line.contains(b))
                || (line.contains("Error:")
                    && !line.contains("Remote command returned error")
                    && !line.contains("Remote dsync failed"))
        })
        .map(str::to_owned)
        .collect()
}

#[track_caller]
fn assert_views_equal_labeled(a: &View, b: &View, what: &str) {
    if a == b {
        return;
    }
    let r = std::panic::catch_unwind(|| assert_views_equal(a, b));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        panic!("{what}:\n{}", msg.replacen("Dovecot and mailreplica disagree:", "(left, right):", 1));
    }
}

/// Mailbox GUIDs for tests: fixed, distinct, comparable.
fn mguid(n: u8) -> String {
    format!("{:02x}00000000000000000000000000000{:x}", n, n % 16)
}

/// A common starting point: INBOX with three mails, `Work` with two, all synced once.
/// The masters' common starting content: INBOX with three mails, Work with two, both
/// subscribed.
fn seed_masters(r: &Runs) {
    r.both(|p| {
        p.create(Side::Master, "INBOX", &mguid(1), 1000);
        p.create(Side::Master, "Work", &mguid(2), 2000);
        p.mailbox_cmd(Side::Master, &["subscribe", "INBOX", "Work"]);
        for i in 1..=3 {
            p.deliver(Side::Master, "INBOX", &format!("1700000000.M{i}P1.seed"));
        }
        for i in 1..=2 {
            p.deliver(Side::Master, "Work", &format!("1700000001.M{i}P1.seed"));
        }
    });
}

fn seeded(mode: Mode) -> Runs {
    let r = Runs::new(mode);
    seed_masters(&r);
    r.sync_and_compare("initial sync");
    r
}

/// Like [`seeded`], but our run's slave Maildir was made by Dovecot: the initial sync of both
/// runs goes to Dovecot's own `dsync-server`, and only later syncs of our run go to ours. This
/// is a replica migrated from Dovecot's replication (or restored from a copy): our store meets
/// a Maildir with mails it has never indexed, and its modseqs start at `unix_time << 20`
/// (see `index::rebuild_modseq_base`). With a state, both runs start the next sync without
/// one (a new replicator state after the switch).
fn seeded_by_dovecot(mode: Mode) -> Runs {
    let r = Runs::new(mode);
    seed_masters(&r);
    let [d, m] = r.pairs();
    let as_dovecot = Pair { kind: Slave::Dovecot, ..m };
    for p in [&d, &as_dovecot] {
        p.sync();
    }
    assert_views_equal_labeled(&d.view(Side::Master), &m.view(Side::Master), "seeded by Dovecot: masters");
    assert_views_equal_labeled(&d.view(Side::Slave), &m.view(Side::Slave), "seeded by Dovecot: slaves");
    for s in &r.states {
        s.borrow_mut().clear();
    }
    r
}

const IN1: &str = "1700000000.M1P1.seed";
const IN2: &str = "1700000000.M2P1.seed";
const IN3: &str = "1700000000.M3P1.seed";
const WK1: &str = "1700000001.M1P1.seed";

/// Each scenario runs without and with a sync state.
macro_rules! scenario {
    ($name:ident) => {
        mod $name {
            #[test]
            fn stateless() {
                super::$name(super::Mode::Stateless);
            }
            #[test]
            fn stateful() {
                super::$name(super::Mode::Stateful);
            }
        }
    };
}

scenario!(initial_sync_into_an_empty_slave);
scenario!(new_mails_on_both_sides_with_colliding_uids);
scenario!(flags_and_keywords_changed_on_both_sides);
scenario!(expunged_on_one_side_flagged_on_the_other);
scenario!(renamed_on_one_side_deleted_on_the_other);
scenario!(subtree_deleted_and_subscriptions_changed);
scenario!(uidvalidity_changed_on_one_side);
scenario!(one_way_sync_keeps_the_slaves_own_changes);
scenario!(changes_during_the_sync);
scenario!(filters_by_date_size_and_flag);
scenario!(backup_undoes_the_slaves_own_changes);
scenario!(backup_over_a_slave_that_changed_its_mailboxes);

fn initial_sync_into_an_empty_slave(mode: Mode) {
    let r = seeded(mode);
    r.assert_dovecot_reads_our_slave();
}

fn new_mails_on_both_sides_with_colliding_uids(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.deliver(Side::Master, "INBOX", "1700000100.M1P1.master");
        p.deliver(Side::Master, "INBOX", "1700000100.M2P1.master");
        p.deliver(Side::Slave, "INBOX", "1700000100.M3P1.slave");
        p.deliver(Side::Slave, "INBOX", "1700000100.M4P1.slave");
        p.deliver(Side::Slave, "INBOX", "1700000100.M5P1.slave");
        // The same mail (same file name, so the same GUID) on both sides.
        p.deliver(Side::Master, "Work", "1700000100.M6P1.both");
        p.deliver(Side::Slave, "Work", "1700000100.M6P1.both");
        p.deliver(Side::Slave, "Work", "1700000100.M7P1.slave");
    });
    let v = r.sync_and_compare("new mails on both sides");
    assert_eq!(v.mails_of("INBOX").len(), 8);
    assert_eq!(v.mails_of("Work").len(), 4, "the mail delivered to both sides is there once");
    r.assert_dovecot_reads_our_slave();
}

fn flags_and_keywords_changed_on_both_sides(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        // The same flag changed differently on both sides.
        p.flags(Side::Master, "add", "\\Seen", "INBOX", IN1);
        p.flags(Side::Slave, "add", "\\Flagged", "INBOX", IN1);
        p.flags(Side::Master, "add", "\\Answered $Label1", "INBOX", IN2);
    });
    r.sync_and_compare("flags, round 1");
    r.both(|p| {
        p.flags(Side::Master, "remove", "\\Seen", "INBOX", IN1);
        p.flags(Side::Slave, "add", "\\Seen \\Draft", "INBOX", IN1);
        // A keyword added on one side and removed on the other.
        p.flags(Side::Master, "add", "$Label2", "INBOX", IN2);
        p.flags(Side::Slave, "remove", "$Label1", "INBOX", IN2);
        p.flags(Side::Slave, "add", "$Junk", "INBOX", IN3);
    });
    r.sync_and_compare("flags, round 2");
}

fn expunged_on_one_side_flagged_on_the_other(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.expunge(Side::Master, "INBOX", IN1);
        p.flags(Side::Slave, "add", "\\Flagged", "INBOX", IN1);
        p.flags(Side::Master, "add", "\\Seen", "INBOX", IN2);
        p.expunge(Side::Slave, "INBOX", IN2);
        p.expunge(Side::Slave, "Work", WK1);
        // Without it both INBOXes would show equal counters, and Dovecot's master would not
        // sync INBOX at all (see `one_new_mail_on_each_side`).
        p.deliver(Side::Slave, "INBOX", "1700000150.M1P1.slave");
    });
    let v = r.sync_and_compare("expunge vs flag");
    assert_eq!(v.mails_of("INBOX").len(), 2, "expunges win over flag changes");
}

fn renamed_on_one_side_deleted_on_the_other(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.create(Side::Master, "Old", &mguid(6), 6000);
        p.create(Side::Master, "Gone", &mguid(7), 7000);
        p.deliver(Side::Master, "Old", "1700000300.M1P1.old");
    });
    r.sync_and_compare("set up");
    r.both(|p| {
        p.mailbox_cmd(Side::Master, &["rename", "Old", "New"]);
        p.mailbox_cmd(Side::Slave, &["delete", "Gone"]);
        p.mailbox_cmd(Side::Master, &["rename", "Gone", "Gone2"]);
    });
    r.sync_and_compare("rename vs delete");
}

fn subtree_deleted_and_subscriptions_changed(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.create(Side::Master, "Tree", &mguid(8), 8000);
        p.create(Side::Master, "Tree.Sub", &mguid(9), 9000);
        p.create(Side::Master, "Tree.Sub.Leaf", &mguid(10), 10000);
        p.deliver(Side::Master, "Tree.Sub.Leaf", "1700000400.M1P1.leaf");
        p.mailbox_cmd(Side::Master, &["subscribe", "Tree", "Tree.Sub"]);
    });
    r.sync_and_compare("set up");
    r.both(|p| {
        p.mailbox_cmd(Side::Slave, &["delete", "-r", "Tree"]);
        p.mailbox_cmd(Side::Slave, &["unsubscribe", "Tree.Sub", "Work"]);
        p.mailbox_cmd(Side::Master, &["subscribe", "Work"]);
    });
    r.sync_and_compare("subtree deleted");
}

fn one_way_sync_keeps_the_slaves_own_changes(mode: Mode) {
    // `doveadm sync -1`: the master's changes go to the slave, the slave's own changes stay
    // where they are and nothing comes back.
    let mut r = seeded(mode);
    r.sync_args = vec!["-1"];
    r.both(|p| {
        p.deliver(Side::Master, "INBOX", "1700000900.M1P1.master");
        p.flags(Side::Master, "add", "\\Seen", "INBOX", IN1);
        p.deliver(Side::Slave, "INBOX", "1700000900.M2P1.slave");
        // A second one, so that the two INBOXes' counters differ (with equal counters
        // Dovecot's master would skip INBOX; see `one_new_mail_on_each_side`).
        p.deliver(Side::Slave, "INBOX", "1700000900.M3P1.slave");
        p.flags(Side::Slave, "add", "\\Flagged", "INBOX", IN2);
        p.expunge(Side::Slave, "Work", WK1);
        p.create(Side::Slave, "OnlyHere", &mguid(12), 12000);
    });
    r.sync_and_compare("one-way sync");
}

/// Like [`seeded`], but every sync of the scenario is a `backup`.
fn seeded_backup(mode: Mode) -> Runs {
    let mut r = Runs::new(mode);
    r.verb = "backup";
    seed_masters(&r);
    r.sync_and_compare("initial backup");
    r
}

/// `backup`: whatever the slave did since the last one, it ends a copy of the master. Its own
/// new mail, flag changes and expunges are undone; the master's changes arrive.
fn backup_undoes_the_slaves_own_changes(mode: Mode) {
    let r = seeded_backup(mode);
    r.both(|p| {
        p.deliver(Side::Master, "INBOX", "1700003000.M1P1.master");
        p.flags(Side::Master, "add", "\\Seen $Label1", "INBOX", IN1);
        p.expunge(Side::Master, "Work", WK1);
        // (A new mail or an expunge in the slave's INBOX makes Dovecot's own backup fail: it
        // would delete INBOX to recreate it. In another mailbox it does so.)
        p.flags(Side::Slave, "add", "\\Flagged $Label2", "INBOX", IN2);
        p.flags(Side::Slave, "remove", "$Label1", "INBOX", IN1);
        p.deliver(Side::Slave, "Work", "1700003000.M2P1.slave");
        p.expunge(Side::Slave, "Work", "1700000001.M2P1.seed");
        // A mail the slave has and the master gets too, under different UIDs.
        p.deliver(Side::Slave, "Work", "1700003000.M3P1.both");
        p.deliver(Side::Master, "Work", "1700003000.M4P1.master");
        p.deliver(Side::Master, "Work", "1700003000.M3P1.both");
    });
    let v = r.sync_and_compare("backup over the slave's own changes");
    assert_eq!(v.mails_of("INBOX").len(), 4, "the master's three and its new one");
    assert_eq!(v.mails_of("Work").len(), 3, "the master's three, not the slave's own");
    r.both(|p| {
        p.flags(Side::Slave, "add", "\\Answered", "INBOX", IN1);
        p.expunge(Side::Slave, "Work", "1700003000.M4P1.master");
    });
    r.sync_and_compare("backup after changes on the slave only");
}

/// `backup` over a slave whose mailboxes changed: a mailbox of its own goes, a renamed one
/// gets the master's name back, subscriptions follow the master, and a mailbox new on the
/// master arrives.
fn backup_over_a_slave_that_changed_its_mailboxes(mode: Mode) {
    let r = seeded_backup(mode);
    r.both(|p| {
        p.create(Side::Slave, "OnlyHere", &mguid(30), 30000);
        p.deliver(Side::Slave, "OnlyHere", "1700003100.M1P1.only");
        p.mailbox_cmd(Side::Slave, &["rename", "Work", "Elsewhere"]);
        p.mailbox_cmd(Side::Slave, &["unsubscribe", "INBOX"]);
        p.mailbox_cmd(Side::Slave, &["subscribe", "OnlyHere"]);
        p.create(Side::Master, "Fresh", &mguid(31), 31000);
        p.deliver(Side::Master, "Fresh", "1700003100.M2P1.fresh");
        p.mailbox_cmd(Side::Master, &["subscribe", "Fresh"]);
    });
    let v = r.sync_and_compare("backup over a slave with mailboxes of its own");
    assert!(!v.status.contains_key("OnlyHere") && !v.status.contains_key("Elsewhere"), "{:?}", v.status.keys());
    r.both(|p| {
        p.mailbox_cmd(Side::Slave, &["delete", "Fresh"]);
        p.mailbox_cmd(Side::Master, &["rename", "Work", "Work2"]);
    });
    r.sync_and_compare("backup after the slave deleted a mailbox and the master renamed one");
}

/// States between doveadm and us, on the same master Maildir (Dovecot's slave in both runs):
/// a state `doveadm sync -s` printed makes `mailreplica sync -s` exchange only what changed
/// since (no "retry with a full sync"), once our index of the Maildir has synced; a state we
/// printed makes `doveadm sync -s` do the same (Dovecot's index counts modseqs apart from ours,
/// so our state names a point of each, see `dsync/saved_state.rs`). The Maildirs end as
/// Dovecot's own pair leaves them, round after round.
#[test]
fn states_interchange_with_doveadm() {
    let r = Runs::new(Mode::Stateful);
    let [d, m] = r.pairs();
    let m = Pair { kind: Slave::Dovecot, ..m };
    for p in [&d, &m] {
        p.create(Side::Master, "INBOX", &mguid(1), 1000);
        p.create(Side::Master, "Work", &mguid(2), 2000);
        for name in [IN1, IN2, IN3] {
            p.deliver(Side::Master, "INBOX", name);
        }
        p.deliver(Side::Master, "Work", WK1);
    }
    d.sync();
    let loc = format!("mail_location=maildir:~/{}", m.master);
    let slave = m.slave_command();
    // Our run starts with our master: our index of the Maildir has synced once.
    let out = m.u.mr(&["-o", &loc, "sync", "-s", "", &slave]);
    assert!(out.success(), "the first sync: {}", out.describe());
    *m.state.borrow_mut() = out.text().trim().to_owned();
    let change = |p: &Pair<'_>, tag: &str| {
        p.deliver(Side::Master, "INBOX", &format!("1700004000.M1P1.{tag}master"));
        p.flags(Side::Master, "add", &format!("$M{tag}"), "INBOX", IN1);
        p.deliver(Side::Master, "Work", &format!("1700004000.M2P1.{tag}master"));
        p.deliver(Side::Slave, "INBOX", &format!("1700004000.M3P1.{tag}slave"));
        p.flags(Side::Slave, "add", &format!("$S{tag}"), "INBOX", IN2);
    };
    let compare = |what: &str| {
        for p in [&d, &m] {
            assert_views_equal_labeled(&p.view(Side::Master), &p.view(Side::Slave), &format!("{what}: not converged"));
        }
        assert_views_equal_labeled(&d.view(Side::Master), &m.view(Side::Master), &format!("{what}: masters differ"));
    };
    let clean = |out: &Output, what: &str| {
        assert!(out.success(), "{what}: {}", out.describe());
        assert!(
            !out.stderr.contains("retry with a full sync") && !out.stderr.contains("Error:"),
            "{what}: not a clean stateful sync: {}",
            out.describe()
        );
        let new = out.text().trim().to_owned();
        assert!(!new.is_empty() && !new.contains('\n'), "{what}: odd state: {}", out.describe());
        *m.state.borrow_mut() = new;
    };
    for round in 1..=3 {
        // doveadm on our master Maildir, with the state our last run printed. After the
        // round's changes, Dovecot's index of the master jumps past the point our index had
        // (as an import of high modseqs moves it): then doveadm trusts a state of ours that
        // names that point and skips Dovecot's changes below it, without any error.
        change(&d, &format!("a{round}"));
        change(&m, &format!("a{round}"));
        let past = (round * 100_000 + 20_000).to_string();
        for mailbox in ["INBOX", "Work"] {
            m.u.dv_ok(&["-o", &loc, "mailbox", "update", "--min-highest-modseq", &past, mailbox]);
        }
        d.sync();
        let state = m.state.borrow().clone();
        let mails: usize = m.view(Side::Master).mails.values().map(Vec::len).sum();
        let rawlog = m.u.home.join(format!("raw-{round}.log"));
        let raw = rawlog.display().to_string();
        let out = m.u.doveadm(&["-D", "-o", &loc, "sync", "-r", &raw, "-s", &state, &slave]);
        let what = format!("round {round}: doveadm sync -s STATE");
        // Incremental, not a comparison of everything: doveadm sends fewer change records
        // than the master had mails (a full comparison sends one for every mail).
        let sent = dsync::Transcript::from_rawlog(&fs::read(&rawlog).unwrap_or_default());
        let changes = sent.master_records("C ").len();
        assert!(
            changes > 0 && changes < mails,
            "{what}: doveadm sent {changes} change records for {mails} mails: {:#?}",
            sent.lines()
        );
        // Our state names a point of Dovecot's own numbering for each mailbox, which doveadm
        // finds and uses (`clean`: no "retry with a full sync"); the changes Dovecot counted
        // after it reach the slave (`compare`).
        let imported = out.stderr.split("Exported mailbox states").next().unwrap_or_default();
        for guid in [mguid(1), mguid(2)] {
            assert!(
                imported.contains(&format!("Mailbox {guid} state:")),
                "{what}: doveadm found no state for mailbox {guid} in ours: {}",
                out.describe()
            );
        }
        clean(&out, &what);
        compare(&what);
        // Ours, with the state doveadm just printed. Our index of the master Maildir and the
        // slave's count far ahead of Dovecot's index of that Maildir first (as when ours
        // counts many changes that Dovecot, scanning later, sees as one): our common point
        // then lies far above the changes Dovecot counts next. Given that point, doveadm
        // would skip them.
        let high = (round * 100_000 + 50_000).to_string();
        for mailbox in ["INBOX", "Work"] {
            for p in [&d, &m] {
                p.mailbox_cmd(Side::Slave, &["update", "--min-highest-modseq", &high, mailbox]);
            }
            m.u.mr_ok(&["-o", &loc, "mailbox", "update", "--min-highest-modseq", &high, mailbox]);
        }
        change(&d, &format!("b{round}"));
        change(&m, &format!("b{round}"));
        d.sync();
        let state = m.state.borrow().clone();
        let mut c = m.u.mr_cmd(&["-o", &loc, "sync", "-s", &state, &slave]);
        c.env("MAILREPLICA_LOG", "debug");
        let out = common::run(c, None);
        let what = format!("round {round}: mailreplica sync -s DOVEADM-STATE");
        assert!(
            out.stderr.lines().any(|l| l.contains("incremental:") && l.contains("mailbox=INBOX")),
            "{what}: INBOX was not synced incrementally: {}",
            out.describe()
        );
        clean(&out, &what);
        compare(&what);
    }
}

/// Passes the master's stream to the slave command; just before the first mail change record
/// (`Cs`, `Cf`, `Ce`: the mailbox exchange has begun) reaches the slave, runs the script given
/// as the first argument. doveadm hands its own settings to command destinations in the
/// environment (`DOVECONF_ENV`); a Dovecot slave behind this script must read its `-c` file
/// instead. Our stdout is closed once the slave has it, so that the master sees the slave's
/// end.
const INJECT_SH: &str = r#"#!/bin/sh
inject=$1; shift
unset DOVECONF_ENV
dir=$(mktemp -d) || exit 1
mkfifo "$dir/in" || exit 1
"$@" < "$dir/in" &
child=$!
exec 1>/dev/null
exec 3>"$dir/in"
done=0
while IFS= read -r line; do
    if [ $done = 0 ]; then
        case "$line" in
            Cs"	"*|Cf"	"*|Ce"	"*) sh "$inject" >/dev/null 2>&1 </dev/null; done=1 ;;
        esac
    fi
    printf '%s\n' "$line" >&3 || break
done
exec 3>&-
wait $child
status=$?
rm -rf "$dir"
exit $status
"#;

fn filters_by_date_size_and_flag(mode: Mode) {
    // doveadm sync -I (maximum size), -O (flag): mails outside stay where they are, on both
    // sides. Each option gets its own round. (`-t` is `sync_since_with_our_slave`.)
    let mut r = seeded(mode);
    let rounds: [(&[&'static str], &str); 2] = [(&["-I", "2k"], "i"), (&["-O", "\\Flagged"], "o")];
    for (args, tag) in rounds {
        r.sync_args = args.to_vec();
        r.both(|p| {
            for (side, who) in [(Side::Master, "m"), (Side::Slave, "s")] {
                let old = format!("1700002000.M1P1.{tag}{who}old");
                let new = format!("1700002000.M2P1.{tag}{who}new");
                let big = format!("1700002000.M3P1.{tag}{who}big");
                p.deliver_dated(side, "INBOX", &old, 1_500_000_000, 0);
                p.deliver_dated(side, "INBOX", &new, 1_700_000_000, 0);
                p.deliver_dated(side, "INBOX", &big, 1_700_000_000, 5000);
                p.flags(side, "add", "\\Flagged", "INBOX", &new);
            }
            // One more on the slave, so that the counters differ (see
            // `one_new_mail_on_each_side`).
            p.deliver_dated(Side::Slave, "INBOX", &format!("1700002000.M4P1.{tag}sextra"), 1_700_000_000, 0);
        });
        r.sync_and_compare(&format!("sync {}", args.join(" ")));
    }
}

#[test]
fn sync_since_with_our_slave() {
    // `doveadm sync -t`: Dovecot 2.3.19 cannot be the reference here, its master panics
    // against its own slave ("assertion failed: (change->received_timestamp > 0)" in
    // dsync_mailbox_import_want_change) once mails it keeps to itself are involved. With our
    // slave: mails received before the time stay on their side, later ones are synced, and
    // the master never lacks a received date from us.
    let r = seeded(Mode::Stateless);
    let [_, m] = r.pairs();
    for (side, who) in [(Side::Master, "m"), (Side::Slave, "s")] {
        m.deliver_dated(side, "INBOX", &format!("1700003000.M1P1.{who}old"), 1_500_000_000, 0);
        m.deliver_dated(side, "INBOX", &format!("1700003000.M2P1.{who}new"), 1_700_000_000, 0);
    }
    m.deliver_dated(Side::Slave, "Work", "1700003000.M3P1.snew", 1_700_000_000, 0);
    for round in 1..=2 {
        let out = m.sync_with(&["-t", "1600000000"]);
        assert!(out.success(), "round {round}: {}", out.describe());
        let (vm, vs) = (all_guids(&m.view(Side::Master)), all_guids(&m.view(Side::Slave)));
        for g in ["1700003000.M2P1.mnew", "1700003000.M2P1.snew", "1700003000.M3P1.snew", "1700003000.M1P1.mold"] {
            assert!(vm.contains(g), "round {round}: master lacks {g}");
        }
        for g in ["1700003000.M2P1.mnew", "1700003000.M2P1.snew", "1700003000.M3P1.snew", "1700003000.M1P1.sold"] {
            assert!(vs.contains(g), "round {round}: slave lacks {g}");
        }
        assert!(!vm.contains("1700003000.M1P1.sold"), "round {round}: the slave's old mail reached the master");
        assert!(!vs.contains("1700003000.M1P1.mold"), "round {round}: the master's old mail reached the slave");
    }
}

#[test]
fn repeated_stateful_syncs_leave_the_master_sound() {
    // The replicator's pattern: sync with the state of the last sync, again and again. After
    // an initial sync that imported mail on both sides, later syncs must settle to skipping
    // everything, and the Dovecot master must never find its own transaction log odd (a
    // HIGHESTMODSEQ raised far past its own changes makes it report "modseq tracking is
    // corrupted").
    let r = seeded(Mode::Stateful);
    let [_, m] = r.pairs();
    m.deliver(Side::Master, "INBOX", "1700004000.M1P1.master");
    m.deliver(Side::Slave, "Work", "1700004000.M2P1.slave");
    m.touch_master_mailboxes();
    m.sync();
    let mut files = (m.mail_files(Side::Master), m.mail_files(Side::Slave));
    for round in 1..=4 {
        m.sync();
        let now = (m.mail_files(Side::Master), m.mail_files(Side::Slave));
        assert_eq!(files, now, "stateful sync {round} after the last change changed files");
        files = now;
    }
    m.deliver(Side::Master, "Work", "1700004000.M3P1.master");
    m.sync();
    assert!(all_guids(&m.view(Side::Slave)).contains("1700004000.M3P1.master"));
}

#[test]
fn sync_until_is_refused_like_dovecot() {
    // Dovecot 2.3.19's master sends `-e`'s time as the `-t` one (0 when there is none); its
    // own slave refuses such a handshake, and so do we: a sync that cannot honour the
    // option must not run without it.
    let r = seeded(Mode::Stateless);
    for p in r.pairs() {
        if p.kind == Slave::Ours && our_master() {
            // Our master sends `-e` as the handshake's `sync_until_timestamp`, which
            // Dovecot's slave honours: only mails received before that time are synced, in
            // both directions.
            p.deliver_dated(Side::Master, "INBOX", "1500000000.M1P1.old", 1_500_000_000, 0);
            p.deliver_dated(Side::Master, "INBOX", "1700000950.M1P1.new", 1_700_000_950, 0);
            p.deliver_dated(Side::Slave, "INBOX", "1500000001.M1P1.old", 1_500_000_001, 0);
            p.deliver_dated(Side::Slave, "INBOX", "1700000951.M1P1.new", 1_700_000_951, 0);
            let out = p.sync_with(&["-e", "1600000000"]);
            assert!(out.success(), "our master with -e: {}", out.describe());
            for side in [Side::Master, Side::Slave] {
                let v = p.view(side);
                let guids: BTreeSet<&str> = v.mails_of("INBOX").iter().map(|m| m[1].as_str()).collect();
                for old in ["1500000000.M1P1.old", "1500000001.M1P1.old"] {
                    assert!(guids.contains(old), "{side:?}: {old} (received before -e) was not synced: {guids:?}");
                }
                let (mine, theirs) = match side {
                    Side::Master => ("1700000950.M1P1.new", "1700000951.M1P1.new"),
                    Side::Slave => ("1700000951.M1P1.new", "1700000950.M1P1.new"),
                };
                assert!(guids.contains(mine), "{side:?}: its own {mine} is gone");
                assert!(!guids.contains(theirs), "{side:?}: {theirs} (received after -e) was synced");
            }
            continue;
        }
        let before = (p.mail_files(Side::Master), p.mail_files(Side::Slave));
        let out = p.sync_with(&["-e", "1600000000"]);
        assert!(!out.success(), "{:?} run: a sync with -e succeeded: {}", p.kind, out.describe());
        assert_eq!(before, (p.mail_files(Side::Master), p.mail_files(Side::Slave)), "a refused sync changed mails");
    }
}

const INJECTED: &str = "1700001000.M3P1.injected";

fn mail_text(name: &str) -> Vec<u8> {
    mail(name)
}

fn changes_during_the_sync(mode: Mode) {
    // A delivery to the slave (by Dovecot, as an MDA there would) while the slave imports
    // the master's new mails takes the UID the master's mail should get. Dovecot reports
    // that with exit code 2; the next sync repairs it; nothing is lost.
    let r = seeded(mode);
    let mut codes = Vec::new();
    for p in r.pairs() {
        p.deliver(Side::Master, "INBOX", "1700001000.M1P1.master");
        p.deliver(Side::Master, "INBOX", "1700001000.M2P1.master");
        // The delivery: a file with a fixed name (so the same GUID in both runs) that Dovecot
        // then gives a UID at once, as its LDA would.
        let mail = r.u.tmp().join("injected.eml");
        fs::write(&mail, mail_text(INJECTED)).expect("write mail");
        let script = r.u.tmp().join(format!("inject-{}.sh", p.slave));
        fs::write(
            &script,
            format!(
                "cp {mail} {dir}/new/{INJECTED} && {doveadm} -c {conf} -o mail_location=maildir:~/{slave} mailbox status uidnext INBOX\n",
                mail = mail.display(),
                dir = p.dir(Side::Slave).display(),
                doveadm = require_doveadm().display(),
                conf = r.u.dovecot_conf().display(),
                slave = p.slave,
            ),
        )
        .expect("write inject script");
        if mode == Mode::Stateful {
            p.touch_master_mailboxes();
        }
        let out = p.sync_injecting(&script);
        codes.push(out.code);
        assert!(
            out.code == Some(2) && out.stderr.contains("desync"),
            "{:?} run: a change during the sync must be reported with exit code 2: {}",
            p.kind,
            out.describe()
        );
    }
    assert_eq!(codes[0], codes[1]);
    // Dovecot's own pair repairs this with duplicates of the mail delivered during the sync
    // (three copies under two GUIDs in our runs of 2.3.19); ours must not. The copies are
    // made by Dovecot's slave (it saves its conflicting mail again), so our master with
    // Dovecot's slave ends as Dovecot's pair does: nothing lost, converged, duplicates kept.
    let [_, m] = r.pairs();
    let dovecot_slave = our_master();
    let v = converges(
        &m,
        &[IN1, IN2, IN3, "1700001000.M1P1.master", "1700001000.M2P1.master", INJECTED],
        "the sync after a change during the sync",
        dovecot_slave,
    );
    let inbox: Vec<&str> = v.mails_of("INBOX").iter().map(|m| m[1].as_str()).collect();
    if !dovecot_slave {
        assert_eq!(inbox.len(), 6, "3 seeded, 2 from the master, 1 delivered during the sync: {inbox:?}");
    }
}

fn uidvalidity_changed_on_one_side(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.mailbox_cmd(Side::Slave, &["update", "--uid-validity", "5555", "Work"]);
        p.deliver(Side::Master, "Work", "1700000500.M1P1.master");
    });
    r.sync_and_compare("UIDVALIDITY changed on the slave");
    r.both(|p| {
        p.mailbox_cmd(Side::Master, &["update", "--uid-validity", "7777", "INBOX"]);
        p.deliver(Side::Slave, "INBOX", "1700000500.M2P1.slave");
    });
    r.sync_and_compare("UIDVALIDITY changed on the master");
}

// ------------------------------------------------------------------------------------------
// Where Dovecot 2.3.19 does not converge, and we must.
//
// Each case is first reproduced with Dovecot at both ends (so that the test shows the case is
// real, and notices when a Dovecot upgrade fixes it), then run with our slave against the
// same Dovecot master: within a few syncs both sides must be equal, every mail that either
// side had must still be there, and one more sync must change nothing.

/// How many syncs we allow ourselves to converge.
const CONVERGE_WITHIN: usize = 3;

/// The installed Dovecot's version, e.g. (2, 3, 19) (`dovecot --version`, same package as
/// doveadm).
fn dovecot_version() -> (u32, u32, u32) {
    let dovecot = require_doveadm().with_file_name("../sbin/dovecot");
    let dovecot = if dovecot.exists() { dovecot } else { PathBuf::from("/usr/sbin/dovecot") };
    let mut c = std::process::Command::new(&dovecot);
    c.arg("--version");
    let text = run(c, None).ok().text();
    let mut nums = text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

/// Dovecot's own pair fails to converge in `syncs` syncs (checked on the Dovecot versions
/// known to have the bug; newer ones are only reported).
#[track_caller]
fn assert_dovecot_does_not_converge(p: &Pair<'_>, syncs: usize, what: &str) {
    let mut stuck = true;
    let mut log = String::new();
    for _ in 0..syncs {
        let out = p.sync_with(&[]);
        log.push_str(&out.stderr);
        if out.success() && p.view(Side::Master) == p.view(Side::Slave) {
            stuck = false;
            break;
        }
    }
    let v = dovecot_version();
    if v < (2, 3, 20) {
        assert!(
            stuck,
            "{what}: Dovecot {v:?} at both ends converged, although 2.3.19 is known not to; \
             this test no longer shows what it claims"
        );
    } else if !stuck {
        eprintln!("{what}: Dovecot {v:?} at both ends converges (fixed upstream); our check still runs");
    }
    let _ = log;
}

/// Syncs our pair until it converges (exit 0, both sides equal), at most
/// [`CONVERGE_WITHIN`] times; then checks that every GUID in `must_have` is on both sides
/// and that one more sync changes no file. Returns the final view.
#[track_caller]
fn assert_ours_converges(p: &Pair<'_>, must_have: &[&str], what: &str) -> View {
    converges(p, must_have, what, false)
}

/// [`assert_ours_converges`], or with `dups_ok` allowing a mail to be twice in a mailbox (what
/// Dovecot's own slave leaves in some cases, so also with our master and Dovecot's slave).
#[track_caller]
fn converges(p: &Pair<'_>, must_have: &[&str], what: &str, dups_ok: bool) -> View {
    let mut history = String::new();
    for n in 1..=CONVERGE_WITHIN {
        if p.mode == Mode::Stateful {
            // See `Runs::sync_and_compare`: the master then syncs every mailbox.
            p.touch_master_mailboxes();
        }
        let out = p.sync_with(&[]);
        history.push_str(&format!("sync {n}: exit {:?}\n{}", out.code, out.stderr));
        if !(out.success() || out.code == Some(2)) {
            panic!("{what}: sync {n} failed: {}\n{history}", out.describe());
        }
        let (vm, vs) = (p.view(Side::Master), p.view(Side::Slave));
        if out.success() && vm == vs {
            for (mbox, mails) in &vm.mails {
                let mut seen = BTreeSet::new();
                for m in mails {
                    assert!(seen.insert(&m[1]) || dups_ok, "{what}: {} is twice in {mbox}: {mails:#?}", m[1]);
                }
            }
            for side in [&vm, &vs] {
                let all: BTreeSet<&str> = side.mails.values().flatten().map(|m| m[1].as_str()).collect();
                for g in must_have {
                    assert!(all.contains(g), "{what}: mail {g} was lost: {side:#?}");
                }
            }
            let files = (p.mail_files(Side::Master), p.mail_files(Side::Slave));
            let again = p.sync();
            assert!(again.stderr.is_empty(), "{what}: the sync after convergence complained: {}", again.describe());
            assert_eq!(files, (p.mail_files(Side::Master), p.mail_files(Side::Slave)), "{what}: not a no-op");
            return vm;
        }
    }
    let (vm, vs) = (p.view(Side::Master), p.view(Side::Slave));
    assert_views_equal_labeled(&vm, &vs, &format!("{what}: no convergence in {CONVERGE_WITHIN} syncs\n{history}"));
    panic!("{what}: the last sync did not succeed\n{history}");
}

#[test]
fn same_mailbox_created_on_both_sides() {
    let r = seeded(Mode::Stateless);
    r.both(|p| {
        p.create(Side::Master, "Projects", &mguid(3), 3000);
        p.create(Side::Slave, "Projects", &mguid(4), 4000);
        p.deliver(Side::Master, "Projects", "1700000200.M1P1.master");
        p.deliver(Side::Slave, "Projects", "1700000200.M2P1.slave");
    });
    let [d, m] = r.pairs();
    assert_dovecot_does_not_converge(&d, 4, "same mailbox created on both sides");
    let v = assert_ours_converges(
        &m,
        &["1700000200.M1P1.master", "1700000200.M2P1.slave", IN1, WK1],
        "same mailbox created on both sides",
    );
    assert_eq!(v.mails_of("Projects").len(), 2);
}

#[test]
fn same_mailbox_created_on_both_sides_with_equal_counters() {
    // Created in the same second (the same UIDVALIDITY), one mail each: every number the
    // master compares to decide whether a mailbox needs a sync is equal on both sides.
    let r = seeded(Mode::Stateless);
    r.both(|p| {
        p.create(Side::Master, "Projects", &mguid(3), 3000);
        p.create(Side::Slave, "Projects", &mguid(4), 3000);
        p.deliver(Side::Master, "Projects", "1700000200.M1P1.master");
        p.deliver(Side::Slave, "Projects", "1700000200.M2P1.slave");
    });
    let [_, m] = r.pairs();
    let v =
        assert_ours_converges(&m, &["1700000200.M1P1.master", "1700000200.M2P1.slave"], "same mailbox, equal counters");
    assert_eq!(v.mails_of("Projects").len(), 2);
}

#[test]
fn inbox_created_on_both_sides() {
    // The replica got a delivery before it was ever synced: both INBOXes exist, with
    // different GUIDs.
    let r = Runs::new(Mode::Stateless);
    r.both(|p| {
        p.deliver(Side::Master, "INBOX", "1700000600.M1P1.master");
        for d in ["cur", "new", "tmp"] {
            let dir = p.dir(Side::Slave).join(d);
            fs::create_dir_all(&dir).expect("mkdir");
            r.u.chown(&dir);
        }
        r.u.chown(&p.dir(Side::Slave));
        p.deliver(Side::Slave, "INBOX", "1700000600.M2P1.slave");
        // Both tools give the INBOX a GUID when they first open it.
        p.ok(Side::Master, &["mailbox", "status", "guid", "INBOX"]);
        p.ok(Side::Slave, &["mailbox", "status", "guid", "INBOX"]);
    });
    let [d, m] = r.pairs();
    assert_dovecot_does_not_converge(&d, 4, "INBOX created on both sides");
    let v =
        assert_ours_converges(&m, &["1700000600.M1P1.master", "1700000600.M2P1.slave"], "INBOX created on both sides");
    assert_eq!(v.mails_of("INBOX").len(), 2);
}

#[test]
fn mailbox_renamed_differently_on_both_sides() {
    let r = seeded(Mode::Stateless);
    r.both(|p| {
        p.create(Side::Master, "Drafts2", &mguid(11), 11000);
        p.deliver(Side::Master, "Drafts2", "1700000700.M1P1.drafts");
    });
    r.sync_and_compare("set up");
    r.both(|p| {
        p.mailbox_cmd(Side::Master, &["rename", "Drafts2", "Entwuerfe"]);
        p.mailbox_cmd(Side::Slave, &["rename", "Drafts2", "Brouillons"]);
        p.deliver(Side::Master, "Entwuerfe", "1700000700.M2P1.master");
        p.deliver(Side::Slave, "Brouillons", "1700000700.M3P1.slave");
    });
    let [d, m] = r.pairs();
    assert_dovecot_does_not_converge(&d, 3, "renamed differently on both sides");
    let v = assert_ours_converges(
        &m,
        &["1700000700.M1P1.drafts", "1700000700.M2P1.master", "1700000700.M3P1.slave"],
        "renamed differently on both sides",
    );
    let names: Vec<&String> =
        v.mailboxes.iter().filter(|n| ["Entwuerfe", "Brouillons", "Drafts2"].contains(&n.as_str())).collect();
    assert_eq!(names.len(), 1, "the renamed mailbox has one name: {:?}", v.mailboxes);
}

#[test]
fn one_new_mail_on_each_side() {
    // After a sync both sides show the same counters; one new mail on each side moves them
    // alike (UIDNEXT, message count, HIGHESTMODSEQ), and Dovecot's master, comparing only
    // counters, never syncs the mailbox: UID 4 is a different mail on each side for good.
    let r = seeded(Mode::Stateless);
    let [d, m] = r.pairs();
    for p in [&d, &m] {
        // Once more, so that both sides' HIGHESTMODSEQ settle on the same value.
        p.sync();
        p.deliver(Side::Master, "INBOX", "1700000800.M1P1.master");
        p.deliver(Side::Slave, "INBOX", "1700000800.M2P1.slave");
    }
    assert_dovecot_does_not_converge(&d, 3, "one new mail on each side");
    let v = assert_ours_converges(
        &m,
        &["1700000800.M1P1.master", "1700000800.M2P1.slave", IN1, IN2, IN3],
        "one new mail on each side",
    );
    assert_eq!(v.mails_of("INBOX").len(), 5);
}

// ------------------------------------------------------------------------------------------
// UIDNEXT: a mail saved and expunged before the sync leaves a gap that the replica must keep
// (after a failover it must not hand out the same UID again under the same UIDVALIDITY).

impl Pair<'_> {
    /// Delivers a mail, lets the side's tool give it a UID, and expunges it: UIDNEXT moves
    /// on, the mail is gone.
    fn deliver_and_expunge(&self, side: Side, mailbox: &str, name: &str) {
        self.deliver(side, mailbox, name);
        self.expunge(side, mailbox, name);
    }
}

scenario!(uidnext_after_save_and_expunge);
scenario!(uidnext_of_a_new_inbox_after_save_and_expunge);

/// On the master, in a new mailbox, an existing one and INBOX: one mail saved and expunged.
/// (These paths, and a new INBOX below, `backup`, `sync -1` and `-f` into a new replica, and
/// stateful syncs without raising the master's HIGHESTMODSEQ first, all end at the master's
/// UIDNEXT on this commit.)
fn uidnext_after_save_and_expunge(mode: Mode) {
    let r = seeded(mode);
    r.both(|p| {
        p.create(Side::Master, "Fresh", &mguid(20), 20000);
        p.deliver_and_expunge(Side::Master, "Fresh", "1700005000.M1P1.gone");
        p.deliver_and_expunge(Side::Master, "Work", "1700005000.M2P1.gone");
        p.deliver_and_expunge(Side::Master, "INBOX", "1700005000.M3P1.gone");
    });
    let v = r.sync_and_compare("one mail saved and expunged in a new mailbox, an existing one and INBOX");
    assert_eq!(
        (v.status["Fresh"][1].as_str(), v.status["Work"][1].as_str(), v.status["INBOX"][1].as_str()),
        ("2", "4", "5")
    );
}

fn uidnext_of_a_new_inbox_after_save_and_expunge(mode: Mode) {
    let r = Runs::new(mode);
    r.both(|p| {
        p.create(Side::Master, "INBOX", &mguid(1), 1000);
        p.deliver_and_expunge(Side::Master, "INBOX", "1700005000.M4P1.gone");
    });
    r.sync_and_compare("new INBOX, one mail saved and expunged");
}

// ------------------------------------------------------------------------------------------
// Flags changed on both sides of the same mail between two syncs.
//
// dsync merges flag by flag what each side changed since the last common modseq
// (`dsync-mailbox-import.c`: merge_flags, merge_keywords); a side's own changes come from its
// transaction log (`dsync-transaction-log-scan.c`), which skips the changes dsync itself made
// (records of `MAILBOX_TRANSACTION_FLAG_SYNC` transactions). A flag the previous sync imported
// is therefore no change of the importing side: when the other side later removes it, the
// removal wins in Dovecot's pair even where the importing side's mail has the higher modseq.

scenario!(flags_changed_again_after_an_imported_change);

fn flags_changed_again_after_an_imported_change(mode: Mode) {
    let r = seeded(mode);
    flags_after_an_imported_change(&r, "fresh replica");
}

/// The same in a replica whose Maildir Dovecot made (so our modseqs there start at
/// `unix_time << 20`): the result must not depend on it.
#[test]
fn flags_changed_again_after_an_imported_change_in_a_migrated_replica() {
    let r = seeded_by_dovecot(Mode::Stateless);
    flags_after_an_imported_change(&r, "migrated replica");
}

fn flags_after_an_imported_change(r: &Runs, what: &str) {
    // The master sets \Draft; the sync gives it to the slave.
    r.both(|p| p.flags(Side::Master, "add", "\\Draft", "INBOX", IN1));
    r.sync_once_and_compare(&format!("{what}: \\Draft from the master"));
    // Then the master takes \Draft back and sets \Flagged, while the slave's user sets five
    // other flags, one at a time (so that the slave's mail ends with the higher modseq).
    // Nobody on the slave touched \Draft: Dovecot's pair drops it.
    r.both(|p| {
        p.flags(Side::Master, "remove", "\\Draft", "INBOX", IN1);
        p.flags(Side::Master, "add", "\\Flagged", "INBOX", IN1);
        for f in ["todo", "\\Seen", "\\Answered", "$Label1", "$Label2"] {
            p.flags(Side::Slave, "add", f, "INBOX", IN1);
        }
    });
    let v = r.sync_and_compare(&format!("{what}: \\Draft removed on the master, other flags set on the slave"));
    assert_eq!(v.mails_of("INBOX")[0][2], "\\Answered \\Flagged \\Seen $Label1 $Label2 todo");
}

#[test]
fn uidvalidity_changed_on_one_side_flags_changed_on_the_other() {
    // The master changes Work's UIDVALIDITY and gets a new mail (so it has more mails and its
    // UIDVALIDITY wins), while the slave's user sets a keyword on a mail there. Dovecot's
    // slave, taking the new UIDVALIDITY, rebuilds its index and forgets its own change: its
    // pair ends without the keyword. Ours keeps the user's change (better than Dovecot);
    // both sides must agree on it.
    let r = seeded(Mode::Stateless);
    r.both(|p| {
        p.mailbox_cmd(Side::Master, &["update", "--uid-validity", "40002", "Work"]);
        p.deliver(Side::Master, "Work", "1710000000.M1P1.m");
        p.flags(Side::Slave, "add", "$Label1", "Work", WK1);
    });
    let [d, m] = r.pairs();
    d.sync();
    let dv = d.view(Side::Master);
    assert_eq!(dv, d.view(Side::Slave), "Dovecot's own pair converges here");
    if dovecot_version() < (2, 3, 20) {
        assert_eq!(dv.mails_of("Work")[0][2], "", "Dovecot 2.3.19's pair is known to lose the keyword");
    }
    let v = assert_ours_converges(&m, &[WK1, "1710000000.M1P1.m"], "UIDVALIDITY vs keyword");
    assert_eq!(v.mails_of("Work")[0][2], "$Label1", "the slave's keyword was lost: {v:#?}");
    assert_eq!(v.status["Work"][2], "40002");
}

// ------------------------------------------------------------------------------------------
// A replica whose Maildir Dovecot made: our store meets mails it has never indexed and gives
// them modseqs from `unix_time << 20` (`index::rebuild_modseq_base`), far above the master's.

#[test]
fn stateful_syncs_of_a_migrated_replica() {
    // The replicator's pattern (`-s` with the last state) after switching a replica from
    // Dovecot's dsync-server to ours: every sync must succeed, as with Dovecot's slave. The
    // state's last common modseq is the smaller of the two sides' (the master's), which lies
    // below everything our rebuilt change log holds; a slave that takes it for its own
    // answers "Modseq N no longer in transaction log", and the next sync is a full one,
    // again and again.
    let r = seeded_by_dovecot(Mode::Stateful);
    r.sync_and_compare("first stateful sync after the migration");
    for round in 1..=2 {
        r.both(|p| {
            p.deliver(Side::Master, "INBOX", &format!("1700006000.M{round}P1.master"));
            p.flags(Side::Slave, "add", "\\Seen", "Work", WK1);
        });
        r.sync_and_compare(&format!("stateful sync {round} after the migration"));
    }
}

// ------------------------------------------------------------------------------------------
// Subscriptions of a mailbox renamed on the other side.
//
// The tree merge (Dovecot's `dsync-mailbox-tree-sync.c`, our `tree_sync.rs`) renames a node
// together with its subscription state, but the rename of the storage does not touch the
// subscriptions file: the side that applies the rename keeps the old name subscribed and
// never subscribes the new one. Dovecot's own pair then shows different subscriptions after
// the first sync; the second sync subscribes both names on both sides, the old one no longer
// a mailbox. Ours must end, within two syncs, with the same list on both sides, holding the
// mailbox's new name and not the stale old one.

/// Both runs: `Proj` created and synced, then `ops`, then syncs. The mailbox-list log gets
/// fixed times (see [`Pair::list_log_stamp`]): the operations happen a second apart, each
/// sync a second later.
fn subscription_and_rename(ops: &[(Side, Op)], what: &str) {
    let r = seeded(Mode::Stateless);
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as u32 + 100;
    r.both(|p| p.apply_at(Side::Master, &Op::Create { name: "Proj".into(), guid: mguid(30), uid_validity: 30000 }, t0));
    for p in r.pairs() {
        assert!(p.sync_at(&[], t0 + 1).success());
    }
    for (i, (side, op)) in ops.iter().enumerate() {
        r.both(|p| p.apply_at(*side, op, t0 + 10 + i as u32));
    }
    let [d, m] = r.pairs();
    // Dovecot's pair: different lists after one sync, both names after the second.
    let mut lists = Vec::new();
    for n in 0..2 {
        assert!(d.sync_at(&[], t0 + 20 + n).success());
        lists.push((d.view(Side::Master).subscriptions, d.view(Side::Slave).subscriptions));
    }
    if dovecot_version() < (2, 3, 20) {
        assert_ne!(lists[0].0, lists[0].1, "{what}: Dovecot's pair agreed after one sync: {lists:?}");
        let both: Vec<String> = ["INBOX", "Proj", "Proj2", "Work"].map(String::from).to_vec();
        assert_eq!(lists[1], (both.clone(), both), "{what}: Dovecot 2.3.19's pair ends with both names");
    }
    // Ours: the same list on both sides within two syncs, with the new name only.
    let mut history = String::new();
    for n in 0..2 {
        let out = m.sync_at(&[], t0 + 20 + n);
        assert!(out.success(), "{what}: {}", out.describe());
        let (vm, vs) = (m.view(Side::Master).subscriptions, m.view(Side::Slave).subscriptions);
        history.push_str(&format!("after sync {}: master {vm:?}, slave {vs:?}\n", n + 1));
    }
    let (vm, vs) = (m.view(Side::Master), m.view(Side::Slave));
    assert_eq!(vm.subscriptions, vs.subscriptions, "{what}: subscriptions differ after two syncs\n{history}");
    assert!(vm.subscriptions.contains(&"Proj2".to_owned()), "{what}: the new name is not subscribed\n{history}");
    assert!(!vm.subscriptions.contains(&"Proj".to_owned()), "{what}: the old name is still subscribed\n{history}");
    assert_views_equal_labeled(&vm, &vs, &format!("{what}: after two syncs"));
}

#[test]
fn subscribed_on_the_master_renamed_on_the_slave() {
    subscription_and_rename(
        &[
            (Side::Master, Op::Subscribe { name: "Proj".into() }),
            (Side::Slave, Op::Rename { from: "Proj".into(), to: "Proj2".into(), subs: false }),
        ],
        "subscribed on the master, renamed on the slave",
    );
}

#[test]
fn renamed_on_the_master_subscribed_on_the_slave() {
    subscription_and_rename(
        &[
            (Side::Master, Op::Rename { from: "Proj".into(), to: "Proj2".into(), subs: false }),
            (Side::Slave, Op::Subscribe { name: "Proj".into() }),
        ],
        "renamed on the master, subscribed on the slave",
    );
}

#[test]
fn renamed_and_subscribed_on_the_master_subscribed_on_the_slave() {
    subscription_and_rename(
        &[
            (Side::Master, Op::Rename { from: "Proj".into(), to: "Proj2".into(), subs: false }),
            (Side::Master, Op::Subscribe { name: "Proj2".into() }),
            (Side::Slave, Op::Subscribe { name: "Proj".into() }),
        ],
        "renamed and subscribed on the master, the old name subscribed on the slave",
    );
}

// ------------------------------------------------------------------------------------------
// Randomized: rounds of random changes on both sides, each followed by syncs, in both runs.
//
// Each round draws operations for the master and then for the slave from everything a user
// (or an MDA, or an admin) can do to a Maildir: deliveries, a delivery expunged again before
// the sync, flag and keyword changes (also on a mail the other side changed in the same
// round), expunges, mailbox create (with a fixed GUID and UIDVALIDITY, so that both runs
// agree), rename and delete (with and without `-s`), subscribe and unsubscribe (of
// mailboxes, of names that are no mailboxes, of a mailbox the other side is renaming or
// deleting), and UIDVALIDITY changes. The operations are drawn against our run and replayed
// on Dovecot's, which starts every round in the same state.
//
// Then both runs sync until they converge (at most `CONVERGE_WITHIN` syncs):
// * ours must always converge, lose no mail that was not expunged or deleted, invent none,
//   and a further sync must change nothing;
// * where Dovecot's own pair converges, ours must end exactly where it ends, in no more
//   syncs. Where it does not (equal counters on both sides, the same name created on both
//   sides, ...: see the section above), only our convergence is checked.
//
// A divergence from Dovecot's result is recorded and the rounds go on without Dovecot's run
// (whose state now differs); the test fails at the end with every divergence and the
// operations that led to it. A seed is printed first; `MAILREPLICA_TEST_SEED=N` replays it
// in `randomized_rounds_new_seed`.

/// One random round's bookkeeping: which mails must exist afterwards.
struct Model {
    /// GUIDs that must be on both sides after the round's sync.
    must_exist: BTreeSet<String>,
    /// GUIDs that may be gone after the round (expunged, or in a deleted mailbox).
    may_vanish: BTreeSet<String>,
    /// A mailbox changed UIDVALIDITY in the round. A Dovecot store that adopts the other
    /// side's UIDVALIDITY during a sync forgets the GUIDs its uidlist kept for mails whose
    /// file names differ (mails dsync saved there): they come back as new mails named by their
    /// files, next to the originals ("Expunged message reappeared, giving a new UID"). Dovecot's
    /// own pair does the same (checked by hand with Dovecot 2.3.19: a replica filled by
    /// `doveadm sync`, its UIDVALIDITY lowered, synced again by either master).
    uidvalidity_changed: bool,
    /// GUIDs already twice in one mailbox before the round (left so by both pairs, see
    /// `randomized`): not a finding of this round.
    already_twice: BTreeSet<String>,
    /// Dovecot's own pair still lives the same history, so a round's result can be judged
    /// against it. A UIDVALIDITY change can only be judged so (Dovecot's store upsets itself
    /// then, see above): once that pair is left behind, none is made.
    judged_by_dovecot: bool,
}

/// A file name Dovecot gives a mail it saves on this machine
/// (`<secs>.M<usecs>P<pid>.<hostname>[,S=<size>,W=<vsize>]`), which is the mail's GUID when
/// its uidlist keeps none. Ours have a `Q<n>` after the pid, and the test's deliveries name
/// other hosts.
fn is_dovecot_save_name(g: &str) -> bool {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host =
        HOST.get_or_init(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default());
    let base = g.split(',').next().unwrap_or_default();
    let mut parts = base.splitn(3, '.');
    let (secs, unique, name) = (parts.next(), parts.next(), parts.next());
    secs.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        && unique.is_some_and(|u| u.starts_with('M') && u.contains('P') && !u.contains('Q'))
        && name.is_some_and(|n| !host.trim().is_empty() && n == host.trim())
}

impl Model {
    /// Why a converged view is not an acceptable end of the round: a mail twice in one
    /// mailbox, a mail lost that was neither expunged nor in a deleted mailbox, or a mail
    /// that nobody saved.
    fn broken(&self, v: &View) -> Option<String> {
        let resaved = |g: &str| self.uidvalidity_changed && is_dovecot_save_name(g);
        for (mbox, mails) in &v.mails {
            let mut seen = BTreeSet::new();
            for x in mails {
                if !seen.insert(&x[1]) && !self.already_twice.contains(&x[1]) {
                    return Some(format!("{} is twice in {mbox}: {mails:#?}", x[1]));
                }
            }
        }
        let now = all_guids(v);
        if let Some(g) = self.must_exist.iter().find(|g| !self.may_vanish.contains(*g) && !now.contains(*g)) {
            return Some(format!("mail {g} was lost: {v:#?}"));
        }
        if let Some(g) = now.iter().find(|g| !self.must_exist.contains(*g) && !resaved(g)) {
            return Some(format!("unknown mail {g} appeared: {v:#?}"));
        }
        None
    }
}

const FLAGS: &[&str] = &["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Label1", "$Label2", "kwA", "todo"];
const NAMES: &[&str] = &["Archive", "Lists", "Projects", "Receipts", "Old", "Travel", "Later", "Archive.2024"];
/// Names that are never created: subscribing one subscribes a name without a mailbox.
const GHOSTS: &[&str] = &["Ghost", "Lists.Ghost", "Shared"];

fn pick<'v, T>(rng: &mut Rng, v: &'v [T]) -> Option<&'v T> {
    if v.is_empty() { None } else { Some(&v[rng.below(v.len() as u64) as usize]) }
}

/// The GUIDs that are twice in one mailbox of `v`.
fn twice(v: &View) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for mails in v.mails.values() {
        let mut seen = BTreeSet::new();
        for x in mails {
            if !seen.insert(&x[1]) {
                out.insert(x[1].clone());
            }
        }
    }
    out
}

/// Marks a view warning that is Dovecot's list-index quirk, not a finding about the Maildir.
const GHOST: &str = "ghost: ";

/// Whether `line` (doveadm's stderr) is Dovecot's list index showing a mailbox that is gone:
/// deleted behind Dovecot's back (by our master, as by any other writer), then a child of it
/// appeared before Dovecot looked again (see
/// `interop_store::dovecots_list_index_keeps_a_mailbox_deleted_behind_its_back_once_a_child_appears`).
/// Only when the Maildir++ directory of the name is really gone and a child's is there.
fn is_dovecot_list_index_ghost(root: &Path, line: &str) -> bool {
    let Some(rest) = line.split("Error: Mailbox ").nth(1) else { return false };
    let Some((name, why)) = rest.split_once(": ") else { return false };
    if why != format!("Failed to lookup mailbox status: Mailbox doesn't exist: {name}") {
        return false;
    }
    let child = format!(".{name}.");
    !root.join(format!(".{name}")).exists()
        && fs::read_dir(root)
            .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&child))))
}

/// One operation of a random round, replayable on either run.
#[derive(Debug, Clone)]
enum Op {
    Deliver {
        mailbox: String,
        name: String,
    },
    /// Delivered, given a UID, expunged: UIDNEXT moves on, nothing else remains.
    DeliverAndExpunge {
        mailbox: String,
        name: String,
    },
    Flags {
        how: &'static str,
        flags: String,
        mailbox: String,
        guid: String,
    },
    Expunge {
        mailbox: String,
        guid: String,
    },
    Create {
        name: String,
        guid: String,
        uid_validity: u32,
    },
    /// `mailbox rename [-s]`: with `-s` the subscription moves along.
    Rename {
        from: String,
        to: String,
        subs: bool,
    },
    /// `mailbox delete [-s]`: with `-s` the name is unsubscribed too.
    Delete {
        name: String,
        unsub: bool,
    },
    Subscribe {
        name: String,
    },
    Unsubscribe {
        name: String,
    },
    UidValidity {
        mailbox: String,
        value: u32,
    },
}

impl Pair<'_> {
    fn apply(&self, side: Side, op: &Op) {
        match op {
            Op::Deliver { mailbox, name } => self.deliver(side, mailbox, name),
            Op::DeliverAndExpunge { mailbox, name } => self.deliver_and_expunge(side, mailbox, name),
            Op::Flags { how, flags, mailbox, guid } => self.flags(side, how, flags, mailbox, guid),
            Op::Expunge { mailbox, guid } => self.expunge(side, mailbox, guid),
            Op::Create { name, guid, uid_validity } => self.create(side, name, guid, *uid_validity),
            Op::Rename { from, to, subs } => {
                let mut args = vec!["rename"];
                if *subs {
                    args.push("-s");
                }
                args.extend([from.as_str(), to.as_str()]);
                self.mailbox_cmd(side, &args);
            }
            Op::Delete { name, unsub } => {
                let mut args = vec!["delete"];
                if *unsub {
                    args.push("-s");
                }
                args.push(name);
                self.mailbox_cmd(side, &args);
            }
            Op::Subscribe { name } => self.mailbox_cmd(side, &["subscribe", name]),
            Op::Unsubscribe { name } => self.mailbox_cmd(side, &["unsubscribe", name]),
            Op::UidValidity { mailbox, value } => {
                self.mailbox_cmd(side, &["update", "--uid-validity", &value.to_string(), mailbox])
            }
        }
    }

    /// The UID of `guid` in `mailbox`, if it is there.
    fn uid_of_opt(&self, side: Side, mailbox: &str, guid: &str) -> Option<String> {
        let out = self.run(side, &["-f", "tab", "fetch", "uid", "mailbox", mailbox, "guid", guid]);
        if !out.success() {
            return None;
        }
        parse_tab(&out.text(), &["uid"]).into_iter().next().map(|r| r[0].clone())
    }
}

/// What one side did in a round, for the other side's choices and the checks.
#[derive(Default)]
struct Done {
    /// Mailboxes used (deliveries, flags, renames, UIDVALIDITY); `deleted:NAME` for deletions.
    touched: BTreeSet<String>,
    /// Mailboxes renamed (old names) or deleted.
    renamed_or_deleted: Vec<String>,
    /// Mails whose flags changed (GUIDs).
    flagged: Vec<String>,
    /// A UIDVALIDITY changed.
    uidvalidity: bool,
}

/// Draws up to `n` operations for one side and applies them to `p` (our run). `view` is what
/// the side showed before; `other` is what the other side did this round (nothing for the
/// master, which goes first).
#[allow(clippy::too_many_arguments)]
fn random_ops(
    rng: &mut Rng,
    p: &Pair<'_>,
    side: Side,
    view: &View,
    n: u64,
    counter: &mut u32,
    model: &mut Model,
    done: &mut Done,
    other: &Done,
    recent: &[String],
    clock: &mut u32,
    ops: &mut Vec<(Side, Op, u32)>,
    log: &mut String,
) {
    // Mailboxes the other side deleted are left alone (a deletion racing a delivery loses
    // the delivery by design; that is not what this test is about).
    let mut boxes: Vec<String> =
        view.status.keys().filter(|b| !other.touched.contains(&format!("deleted:{b}"))).cloned().collect();
    // Every name in use on this side (also those left alone), for creates and renames.
    let mut names: BTreeSet<String> = view.mailboxes.iter().cloned().collect();
    let mut subs: BTreeSet<String> = view.subscriptions.iter().cloned().collect();
    let who = if side == Side::Master { "m" } else { "s" };
    let mut apply = |op: Op, t: u32, log: &mut String| {
        // (Also printed at once: a failure inside an operation or a view shows what led to it.)
        eprintln!("{side:?} @{t}: {op:?}");
        p.apply_at(side, &op, t);
        log.push_str(&format!("{side:?} @{t}: {op:?}\n"));
        ops.push((side, op, t));
    };
    // A GUID twice in a mailbox (see `Model::already_twice`) cannot name one mail.
    let dup = twice(view);
    for _ in 0..n {
        // Most operations happen a second after the one before, some in the same second.
        if rng.below(4) != 0 {
            *clock += 1;
        }
        let t = *clock;
        let mbox = pick(rng, &boxes).cloned().unwrap_or_else(|| "INBOX".to_owned());
        let mails: Vec<String> = view
            .mails
            .get(&mbox)
            .map(|m| m.iter().map(|r| r[1].clone()).filter(|g| !dup.contains(g)).collect())
            .unwrap_or_default();
        let present = |g: &String| p.uid_of_opt(side, &mbox, g).is_some();
        let has_children = |b: &str| names.iter().any(|n| n.starts_with(&format!("{b}.")));
        match rng.below(100) {
            0..=24 => {
                *counter += 1;
                let name = format!("1710000000.M{counter}P{}.{who}", rng.below(1000));
                model.must_exist.insert(name.clone());
                done.touched.insert(mbox.clone());
                apply(Op::Deliver { mailbox: mbox, name }, t, log);
            }
            25..=29 => {
                *counter += 1;
                let name = format!("1710000000.M{counter}P{}.{who}x", rng.below(1000));
                done.touched.insert(mbox.clone());
                apply(Op::DeliverAndExpunge { mailbox: mbox, name }, t, log);
            }
            30..=59 => {
                // A mail the other side changed in this round, one changed in the round
                // before (so that one side changes what the last sync imported), or any;
                // one flag or keyword added or removed, or all of them replaced; sometimes
                // several changes in a row (so that this side's modseq runs ahead).
                let located = |g: &String| {
                    view.mails
                        .iter()
                        .find(|(b, ms)| boxes.contains(*b) && ms.iter().any(|m| &m[1] == g))
                        .map(|(b, _)| (b.clone(), g.clone()))
                };
                let pool: &[String] = match rng.below(3) {
                    0 => &other.flagged,
                    1 => recent,
                    _ => &[],
                };
                let target = pick(rng, pool)
                    .and_then(located)
                    .or_else(|| pick(rng, &mails).map(|g| (mbox.clone(), g.clone())))
                    .filter(|(b, g)| p.uid_of_opt(side, b, g).is_some());
                if let Some((b, g)) = target {
                    let burst = if rng.below(3) == 0 { 2 + rng.below(2) } else { 1 };
                    for i in 0..burst {
                        let how = ["add", "remove", "add", "remove", "replace"][rng.below(5) as usize];
                        let mut flags = pick(rng, FLAGS).copied().unwrap_or("\\Seen").to_owned();
                        if how == "replace" || rng.below(4) == 0 {
                            let f2 = pick(rng, FLAGS).copied().unwrap_or("\\Seen");
                            if f2 != flags {
                                flags = format!("{flags} {f2}");
                            }
                        }
                        done.touched.insert(b.clone());
                        done.flagged.push(g.clone());
                        apply(Op::Flags { how, flags, mailbox: b.clone(), guid: g.clone() }, t + i as u32, log);
                    }
                    *clock += burst as u32 - 1;
                }
            }
            60..=69 => {
                if let Some(g) = pick(rng, &mails).cloned().filter(|g| present(g)) {
                    model.may_vanish.insert(g.clone());
                    done.touched.insert(mbox.clone());
                    apply(Op::Expunge { mailbox: mbox, guid: g }, t, log);
                }
            }
            70..=75 => {
                let name = pick(rng, NAMES).copied().unwrap_or("Archive").to_owned();
                if !names.contains(&name) {
                    *counter += 1;
                    let guid = format!("5eed{:04x}{:024x}", *counter, *counter);
                    boxes.push(name.clone());
                    names.insert(name.clone());
                    apply(Op::Create { name, guid, uid_validity: 30000 + *counter }, t, log);
                }
            }
            76..=80 => {
                let to = pick(rng, NAMES).copied().unwrap_or("Archive").to_owned();
                if mbox != "INBOX"
                    && !names.contains(&to)
                    && !other.touched.contains(&mbox)
                    && !has_children(&mbox)
                    && !to.starts_with(&format!("{mbox}."))
                {
                    let subs_too = rng.below(3) == 0;
                    if subs_too && subs.remove(&mbox) {
                        subs.insert(to.clone());
                    }
                    boxes.retain(|b| *b != mbox);
                    boxes.push(to.clone());
                    names.remove(&mbox);
                    names.insert(to.clone());
                    done.touched.insert(mbox.clone());
                    done.touched.insert(to.clone());
                    done.renamed_or_deleted.push(mbox.clone());
                    apply(Op::Rename { from: mbox, to, subs: subs_too }, t, log);
                }
            }
            81..=84 => {
                if mbox != "INBOX"
                    && !other.touched.contains(&mbox)
                    && !done.touched.contains(&mbox)
                    && !has_children(&mbox)
                {
                    let unsub = rng.below(3) == 0;
                    if unsub {
                        subs.remove(&mbox);
                    }
                    model.may_vanish.extend(mails.iter().cloned());
                    boxes.retain(|b| *b != mbox);
                    names.remove(&mbox);
                    done.touched.insert(mbox.clone());
                    done.touched.insert(format!("deleted:{mbox}"));
                    done.renamed_or_deleted.push(mbox.clone());
                    apply(Op::Delete { name: mbox, unsub }, t, log);
                }
            }
            85..=90 => {
                // A mailbox, a name that is none, or one the other side renames or deletes.
                let name = match rng.below(3) {
                    0 => pick(rng, GHOSTS).copied().unwrap_or("Ghost").to_owned(),
                    1 => pick(rng, &other.renamed_or_deleted).cloned().unwrap_or(mbox),
                    _ => mbox,
                };
                if subs.insert(name.clone()) {
                    apply(Op::Subscribe { name }, t, log);
                }
            }
            91..=95 => {
                let list: Vec<String> = subs.iter().cloned().collect();
                if let Some(name) = pick(rng, &list).cloned() {
                    subs.remove(&name);
                    apply(Op::Unsubscribe { name }, t, log);
                }
            }
            _ => {
                // The replica's admin changes a UIDVALIDITY, of a mailbox nobody else uses in
                // this round, to a lower value: the master keeps its own (the higher one, at
                // equal message counts) and the slave takes it back. (Not on the master, nor
                // so that the master must take the slave's: a Dovecot master whose Maildir
                // changes UIDVALIDITY rebuilds its index, meets its mails again under new
                // UIDs and duplicates them, with Dovecot's own slave too. Not with a state
                // either: that makes the Dovecot master reset its transaction log, and its
                // next stateful sync of the mailbox fails whichever slave it talks to. See
                // `uidvalidity_changed_on_one_side` for the rest.)
                let current: u32 = view.status.get(&mbox).and_then(|st| st[2].parse().ok()).unwrap_or(0);
                if side == Side::Slave
                    && p.mode == Mode::Stateless
                    && model.judged_by_dovecot
                    && current > 100
                    && !other.touched.contains(&mbox)
                    && !done.touched.contains(&mbox)
                {
                    *counter += 1;
                    done.touched.insert(mbox.clone());
                    done.uidvalidity = true;
                    // Nothing more happens to it on this side in this round.
                    boxes.retain(|b| *b != mbox);
                    let value = current - 1 - *counter % 50;
                    apply(Op::UidValidity { mailbox: mbox, value }, t, log);
                }
            }
        }
    }
}

/// `v` without flags and keywords (and the unseen counts that follow from them).
/// The two results differ only in that Dovecot's keeps subscriptions of names that are no
/// mailboxes (left behind by a rename), and ours has no subscription Dovecot's lacks.
fn only_stale_subscriptions_differ(dovecot: &View, ours: &View) -> bool {
    let mut d = dovecot.clone();
    d.subscriptions.retain(|s| ours.subscriptions.contains(s));
    let stale = dovecot
        .subscriptions
        .iter()
        .filter(|s| !ours.subscriptions.contains(s))
        .all(|s| !dovecot.mailboxes.contains(s));
    stale && d == *ours
}

/// Whether the two results differ only in the flags of mails whose flags both sides changed
/// in the round (and so in the unseen counts). dsync settles such a conflict by comparing the
/// two sides' modseqs of the mail; our Maildir store does not number every transaction exactly
/// as Dovecot's index does, so after some rounds the same conflict can fall the other way.
/// Each result is one side's own choice, and both sides agree on it.
fn only_conflicting_flags_differ(dovecot: &View, ours: &View, conflicts: &BTreeSet<String>) -> bool {
    if conflicts.is_empty() {
        return false;
    }
    let mask = |v: &View| {
        let mut v = v.clone();
        for st in v.status.values_mut() {
            st[3].clear();
        }
        for m in v.mails.values_mut().flatten() {
            if conflicts.contains(&m[1]) {
                m[2].clear();
            }
        }
        v
    };
    mask(dovecot) == mask(ours)
}

fn without_flags(v: &View) -> View {
    let mut v = v.clone();
    for st in v.status.values_mut() {
        st[3].clear();
    }
    for mails in v.mails.values_mut() {
        for m in mails {
            m[2].clear();
        }
    }
    v
}

/// Whether `a` and `b` hold the same mailboxes, subscriptions and mails (GUID and flags)
/// once the mails Dovecot re-saved under their file names (see `Model`) are left out, UIDs
/// and counters aside, and there are such mails: each pair's Dovecot names its own files, and
/// our store, which keeps the GUIDs, makes no such copies.
fn same_but_dovecot_resaves(a: &View, b: &View) -> bool {
    let kept = |v: &View| -> BTreeMap<String, BTreeSet<(String, String)>> {
        v.mails
            .iter()
            .map(|(name, mails)| {
                let set = mails
                    .iter()
                    .filter(|m| !is_dovecot_save_name(&m[1]))
                    .map(|m| (m[1].clone(), m[2].clone()))
                    .collect();
                (name.clone(), set)
            })
            .collect()
    };
    let resaved = |v: &View| v.mails.values().flatten().any(|m| is_dovecot_save_name(&m[1]));
    (resaved(a) || resaved(b)) && a.mailboxes == b.mailboxes && a.subscriptions == b.subscriptions && kept(a) == kept(b)
}

/// Whether `a` and `b` differ only in their mails' UIDs (and so in UIDNEXT): the same
/// mailboxes, subscriptions, UIDVALIDITYs and mails by GUID, with the same flags.
///
/// After a UIDVALIDITY change a Dovecot 2.3 slave may give the mails of that mailbox new UIDs,
/// which the next sync gives the master's copies too. Dovecot means to keep them (its uidlist
/// keeps every record under the new UIDVALIDITY, and two `doveadm mailbox update` runs do keep
/// them): the dsync session resets the slave's index (`index_storage_mailbox_update` calls
/// `mail_index_reset`), its later syncs in that session trust the Maildir header it keeps in
/// memory (`maildir_sync_quick_check`) and never read the uidlist back unless a save does, the
/// import raises UIDNEXT to the master's, and the next open meets the uidlist's mails below
/// it as expunged mails that reappeared (`maildir_handle_uid_insertion`). Ours keeps them.
fn only_uids_differ(a: &View, b: &View) -> bool {
    let strip = |v: &View| {
        let mut v = v.clone();
        for st in v.status.values_mut() {
            st[1].clear();
        }
        for mails in v.mails.values_mut() {
            for m in mails.iter_mut() {
                m[0].clear();
            }
            mails.sort();
        }
        v
    };
    strip(a) == strip(b)
}

fn all_guids(v: &View) -> BTreeSet<String> {
    v.mails.values().flatten().map(|m| m[1].clone()).collect()
}

/// How one run's syncs of a round went.
struct Converged {
    /// What the master logged about its own storage (see [`master_complaints`]).
    complaints: Vec<String>,
    /// The sync (1-based) after which master and slave were equal, if any.
    after: Option<usize>,
    /// The final views (master, slave).
    views: (View, View),
    history: String,
}

/// Syncs `p` until master and slave are equal (at most [`CONVERGE_WITHIN`] syncs). Exit
/// codes 2 (changes during the sync) and, in a round that changed a UIDVALIDITY, 75 are
/// retried by the next sync, as in [`Runs::sync_until_done`]; others fail the test for our
/// run and end the attempt for Dovecot's.
fn sync_until_converged(p: &Pair<'_>, uidvalidity_changed: bool, t: u32, what: &str) -> Converged {
    let mut history = String::new();
    let mut complaints = Vec::new();
    for n in 1..=CONVERGE_WITHIN {
        if p.mode == Mode::Stateful {
            p.touch_master_mailboxes();
        }
        let out = p.sync_at(&[], t + n as u32 - 1);
        complaints.extend(master_complaints(&out));
        history.push_str(&format!("{:?} sync {n}: exit {:?}\n{}", p.kind, out.code, out.stderr));
        let retry = out.code == Some(2) || (uidvalidity_changed && out.code == Some(75));
        if !(out.success() || retry) {
            if p.kind == Slave::Ours {
                panic!("{what}: sync {n} failed: {}\n{history}", out.describe());
            }
            break;
        }
        let views = (p.view(Side::Master), p.view(Side::Slave));
        if out.success() && views.0 == views.1 {
            return Converged { complaints, after: Some(n), views, history };
        }
        if let Some(diff) = views_diff(&views.0, &views.1) {
            history.push_str(&format!("after sync {n} (\"Dovecot\" = master, \"ours\" = slave):\n{diff}\n"));
        }
    }
    Converged { complaints, after: None, views: (p.view(Side::Master), p.view(Side::Slave)), history }
}

fn randomized(seed: u64, rounds: usize, mode: Mode) {
    eprintln!("randomized two-way sync ({mode:?}): seed {seed} (replay with MAILREPLICA_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mut r = seeded(mode);
    r.lenient_views = Some(Default::default());
    let [d, m] = r.pairs();
    // The virtual clock of mailbox-list changes (see `Pair::list_log_stamp`), after the
    // seeding's real times.
    let mut clock =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as u32 + 1000;
    let mut counter = 0;
    let mut log = String::new();
    // Dovecot's run takes part while it is in the same state as ours.
    let mut dovecot_in_step = true;
    // Mails whose flags changed in the last round.
    let mut recent: Vec<String> = Vec::new();
    // What both sides of our run show: after a round they are equal, and the check that
    // one more sync changes nothing makes the view still current at the next round.
    let mut current = m.view(Side::Master);
    let mut divergences: Vec<String> = Vec::new();
    for round in 1..=rounds {
        let before = current.clone();
        let mut model = Model {
            must_exist: all_guids(&before),
            may_vanish: BTreeSet::new(),
            uidvalidity_changed: false,
            already_twice: twice(&before),
            judged_by_dovecot: dovecot_in_step,
        };
        let (mut done_m, mut done_s) = (Done::default(), Done::default());
        let mut ops = Vec::new();
        log.push_str(&format!("-- round {round}\n"));
        eprintln!("-- round {round}");
        let (nm, ns) = (rng.below(8), rng.below(8));
        random_ops(
            &mut rng,
            &m,
            Side::Master,
            &before,
            nm,
            &mut counter,
            &mut model,
            &mut done_m,
            &Done::default(),
            &recent,
            &mut clock,
            &mut ops,
            &mut log,
        );
        let slave_before = current.clone();
        random_ops(
            &mut rng,
            &m,
            Side::Slave,
            &slave_before,
            ns,
            &mut counter,
            &mut model,
            &mut done_s,
            &done_m,
            &recent,
            &mut clock,
            &mut ops,
            &mut log,
        );
        if dovecot_in_step {
            for (side, op, t) in &ops {
                d.apply_at(*side, op, *t);
            }
        }
        let what = format!("seed {seed}, round {round}\n{log}");
        let uidvalidity = done_m.uidvalidity || done_s.uidvalidity;
        model.uidvalidity_changed = uidvalidity;
        let conflicts: BTreeSet<String> =
            done_m.flagged.iter().filter(|g| done_s.flagged.contains(g)).cloned().collect();
        recent = done_m.flagged.iter().chain(&done_s.flagged).cloned().collect();
        let sync_time = clock + 1;
        clock += 10;
        let ours = sync_until_converged(&m, uidvalidity, sync_time, &what);
        let theirs = dovecot_in_step.then(|| sync_until_converged(&d, uidvalidity, sync_time, &what));
        if let Some(line) = ours.complaints.first() {
            // Ours must never make the master complain, unless Dovecot's own slave made it
            // complain alike (the operations alone upset Dovecot).
            let alike = theirs.as_ref().is_some_and(|t| !t.complaints.is_empty());
            assert!(
                alike,
                "{what}: the Dovecot master complained (not with Dovecot's slave): {line}\n{}",
                ours.history
            );
            log.push_str(&format!("   (the Dovecot master complained in both runs: {line})\n"));
        }
        let Some(ours_after) = ours.after else {
            let (vm, vs) = &ours.views;
            assert_views_equal_labeled(
                vm,
                vs,
                &format!("{what}: no convergence in {CONVERGE_WITHIN} syncs\n{}", ours.history),
            );
            panic!("{what}: the last sync did not succeed\n{}", ours.history);
        };
        if let Some(why) = model.broken(&ours.views.0) {
            // Acceptable only where Dovecot's own pair, in the same state, ends broken too
            // (a UIDVALIDITY adopted by a Dovecot store upsets it, see `Model`).
            let theirs_broken = theirs.as_ref().filter(|t| t.after.is_some()).and_then(|t| model.broken(&t.views.0));
            let Some(theirs_why) = theirs_broken else {
                panic!("{what}: {why}\n{}", ours.history);
            };
            let first = |s: &str| s.lines().next().unwrap_or_default().to_owned();
            log.push_str(&format!(
                "   (both pairs ended broken alike: ours {}; Dovecot's {})\n",
                first(&why),
                first(&theirs_why)
            ));
        }
        // One more sync changes nothing, and nobody complains.
        let files = (m.mail_files(Side::Master), m.mail_files(Side::Slave));
        if mode == Mode::Stateful {
            m.touch_master_mailboxes();
        }
        let again = m.sync_at(&[], sync_time + CONVERGE_WITHIN as u32);
        assert!(again.success(), "{what}: the sync after convergence failed: {}", again.describe());
        assert!(again.stderr.is_empty(), "{what}: the sync after convergence complained: {}", again.describe());
        assert_eq!(files, (m.mail_files(Side::Master), m.mail_files(Side::Slave)), "{what}: not a no-op");
        // Dovecot's pair lives the same history: a flag conflict is decided by comparing the
        // two sides' modseqs, so one sync more on one pair only would decide later rounds
        // differently for that reason alone.
        if let Some(Converged { after: Some(_), .. }) = &theirs {
            if mode == Mode::Stateful {
                d.touch_master_mailboxes();
            }
            let _ = d.sync_at(&[], sync_time + CONVERGE_WITHIN as u32);
        }
        current = ours.views.0.clone();
        let mut warned: Vec<String> = r.lenient_views.as_ref().map(|[_, w]| w.take()).unwrap_or_default();
        for g in warned.iter().filter(|w| w.starts_with(GHOST)) {
            log.push_str(&format!("   (Dovecot's list index keeps a mailbox our master deleted: {g})\n"));
        }
        warned.retain(|w| !w.starts_with(GHOST));
        if !warned.is_empty() {
            // Only a UIDVALIDITY change makes Dovecot meet mails again; anything else is ours.
            assert!(uidvalidity, "{what}: doveadm warned about our run's Maildirs:\n{}", warned.join("\n"));
            log.push_str(&format!("   (doveadm warned, after a UIDVALIDITY change: {})\n", warned[0]));
        }
        if let Some([w, _]) = &r.lenient_views {
            w.take();
        }
        match theirs {
            None => {}
            Some(Converged { after: None, .. }) => {
                log.push_str("   (Dovecot's own pair did not converge; going on without it)\n");
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. }) if model.broken(&views.0).is_some() => {
                let why = model.broken(&views.0).unwrap_or_default();
                log.push_str(&format!(
                    "   (Dovecot's own pair converged to a broken result: {}; going on without it)\n",
                    why.lines().next().unwrap_or_default()
                ));
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if uidvalidity && views.0 != ours.views.0 && same_but_dovecot_resaves(&views.0, &ours.views.0) =>
            {
                log.push_str(
                    "   (after a UIDVALIDITY change a Dovecot store re-saved mails without their GUIDs, each \
                     pair's under file names of its own; going on without it)\n",
                );
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if uidvalidity && views.0 != ours.views.0 && only_uids_differ(&views.0, &ours.views.0) =>
            {
                log.push_str(
                    "   (after a UIDVALIDITY change Dovecot's slave gave its mails new UIDs, which Dovecot does \
                     not mean to (see `only_uids_differ`); ours kept them; going on without it)\n",
                );
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if uidvalidity
                    && views.0 != ours.views.0
                    && without_flags(&views.0) == without_flags(&ours.views.0) =>
            {
                // See `uidvalidity_changed_on_one_side_flags_changed_on_the_other`.
                log.push_str(
                    "   (after a UIDVALIDITY change Dovecot's pair lost flag changes that ours kept; going on \
                     without it)\n",
                );
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if uidvalidity
                    && views.0 != ours.views.0
                    && same_but_dovecot_resaves(&without_flags(&views.0), &without_flags(&ours.views.0)) =>
            {
                // The two before at once (seed 1796440009367393999, round 9: a mailbox the
                // master had renamed and whose UIDVALIDITY the slave then changed): Dovecot's
                // pair re-saved its mails under new names and gave the originals flags from
                // before the last sync; ours kept its mails and their flags.
                log.push_str(
                    "   (after a UIDVALIDITY change a Dovecot store re-saved mails without their GUIDs and \
                     Dovecot's pair lost flag changes that ours kept; going on without it)\n",
                );
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if views.0 != ours.views.0 && only_stale_subscriptions_differ(&views.0, &ours.views.0) =>
            {
                // See `subscribed_on_the_master_renamed_on_the_slave`: Dovecot's pair keeps
                // a subscription under a name its rename left; ours moves it along.
                log.push_str(
                    "   (Dovecot's pair kept a subscription of a renamed mailbox's old name, ours moved it; going \
                     on without it)\n",
                );
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(_), views, .. })
                if views.0 != ours.views.0 && only_conflicting_flags_differ(&views.0, &ours.views.0, &conflicts) =>
            {
                log.push_str(&format!(
                    "   (a flag conflict on {} mail(s) changed on both sides fell the other way in Dovecot's pair; \
                     going on without it)\n",
                    conflicts.len()
                ));
                dovecot_in_step = false;
            }
            Some(Converged { after: Some(theirs_after), views, history, .. })
                if views.0 != ours.views.0 || ours_after > theirs_after =>
            {
                let diff = views_diff(&views.0, &ours.views.0).unwrap_or_default();
                divergences.push(format!(
                    "seed {seed}, round {round}: both pairs converged ({theirs_after} syncs for Dovecot's pair, \
                     {ours_after} for ours), to different results (\"Dovecot\" = Dovecot's pair)\n{diff}\n{log}\n\
                     {history}{}",
                    ours.history
                ));
                eprintln!("DIVERGED: {}", divergences.last().map_or("", String::as_str));
                log.push_str("   (DIVERGED from Dovecot's pair; going on without it)\n");
                dovecot_in_step = false;
            }
            Some(_) => {}
        }
    }
    eprintln!("{log}");
    assert!(divergences.is_empty(), "ours and Dovecot's pair diverged:\n{}", divergences.join("\n\n"));
}

/// Rounds per randomized test: each round syncs both runs two to four times; with ten the
/// whole file takes 70 to 120 s on two cores (it took about 55 s before the randomized tests
/// ran Dovecot's pair too).
const RANDOM_ROUNDS: usize = 10;

#[test]
fn randomized_rounds_fixed_seed() {
    randomized(0x5eed_2026, RANDOM_ROUNDS, Mode::Stateless);
}

#[test]
fn randomized_rounds_with_state() {
    randomized(0x5eed_2027, RANDOM_ROUNDS, Mode::Stateful);
}

#[test]
fn randomized_rounds_new_seed() {
    let seed =
        std::env::var("MAILREPLICA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(Rng::seed_from_time);
    let mode = if std::env::var_os("MAILREPLICA_TEST_STATEFUL").is_some() { Mode::Stateful } else { Mode::Stateless };
    randomized(seed, RANDOM_ROUNDS, mode);
}

/// Every scenario of this file again, with our master (`mailreplica -u USER sync`) and
/// Dovecot's own `dsync-server` as the slave in place of Dovecot's master with our slave: the
/// replicas must be what Dovecot's pair makes, and Dovecot's slave must not complain.
///
/// The scenarios in [`NOT_YET_WITH_OUR_MASTER`] do not give Dovecot's results with our master
/// yet (open work of the issue "The sending side…"); they are left out by name, so that each
/// one that starts to pass is noticed when it is taken off the list.
#[test]
fn every_scenario_with_our_master() {
    let exe = std::env::current_exe().expect("the test binary");
    let mut args = vec!["--test-threads", "2", "--skip", "every_scenario_with_our_master"];
    for name in NOT_YET_WITH_OUR_MASTER {
        args.extend(["--skip", name]);
    }
    let out = std::process::Command::new(exe)
        .env("MAILREPLICA_TEST_OUR_MASTER", "1")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "with our master:\n{text}");
    assert!(text.contains("test result: ok"), "with our master, no test ran:\n{text}");
}

/// Scenarios whose result with our master still differs from Dovecot's pair (or that fail):
/// see [`every_scenario_with_our_master`].
const NOT_YET_WITH_OUR_MASTER: &[&str] = &[
    // Empty: every scenario, the new-seed randomized rounds included, runs with our master.
];
