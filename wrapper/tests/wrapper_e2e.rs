//! The upstream scenario, for real (issue 4): a sandboxed Dovecot 2.3 daemon on the sending
//! side runs `doveadm backup|sync -u USER remoteprefix:root@127.0.0.1` with `dsync_remote_cmd`
//! pointing ssh at a real OpenSSH sshd on 127.0.0.1, whose root `authorized_keys` line is
//! `restrict,command="mailreplica-wrapper --peer mx1 --policy … --auth-log …"`. doveadm writes
//! `USER\n` and then speaks dsync as the master; the wrapper reads the name, drops to that
//! user and serves dsync in-process as the slave.
//!
//! ```text
//!   Dovecot (sender, maildir:~/Maildir)               wrapper (replica, maildir:~/ReplicaMaildir)
//!   doveadm backup|sync -u alice ──ssh── sshd ──root── mailreplica-wrapper ──drop──► alice
//!                                                      (policy allows alice and bob, uid ranges)
//! ```
//!
//! Both ends are on this one host, so each user's replica lives in another Maildir of the same
//! home: the policy's `mail_location` is `maildir:~/ReplicaMaildir`, Dovecot's is
//! `maildir:~/Maildir`. The replica is then read with the sandboxed doveadm and
//! `-o mail_location=maildir:~/ReplicaMaildir`, and changed with both our `mailreplica` (alice)
//! and doveadm (bob) between the runs.
//!
//! The changes between the runs include the cases a two-way sync gets wrong most easily: new
//! mails on both sides of one mailbox (a UID conflict) and a mailbox where both sides changed
//! only flags (equal counters on both sides).

mod wrapper_common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wrapper_common::*;

/// Where the wrapper puts each user's replica.
const REPLICA: &str = "maildir:~/ReplicaMaildir";
/// Any single doveadm or mailreplica run.
const STEP: Duration = Duration::from_secs(120);

/// Fields drop in this order: users, sshd, Dovecot, then the sandbox directory.
struct Scenario {
    users: Vec<TestUser>,
    sshd: Sshd,
    dovecot: Dovecot,
    keys: SshKeys,
    sb: Sandbox,
}

/// Which tool changes the replica between runs.
#[derive(Clone, Copy, Debug)]
enum ReplicaTool {
    Mailreplica,
    Doveadm,
}

impl Scenario {
    fn new() -> Self {
        let sb = Sandbox::new();
        let users = vec![TestUser::new(&sb), TestUser::new(&sb)];
        assert_ne!(users[0].uid, users[1].uid, "two users with different uids");
        assert_ne!(users[0].gid, users[1].gid);
        sb.write_policy(&format!(
            "[peer.mx1]\nallow_users = [\"{}\", \"{}\"]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\n\
             mail_location = \"{REPLICA}\"\n",
            users[0].name, users[1].name
        ));
        let dovecot = Dovecot::start(&sb, "maildir:~/Maildir");
        let keys = SshKeys::new(&sb, 1);
        let ak = format!("restrict,command=\"{WRAPPER} {}\" {}\n", sb.args("mx1").join(" "), keys.client_pub(0));
        let sshd = Sshd::start(&keys, "e2e", &ak, "");
        // Our own configuration for `mailreplica -u`, independent of the system's.
        fs::write(sb.dir.join("mailreplica.toml"), "first_valid_uid = 1000\n").expect("mailreplica.toml");
        Self { users, sshd, dovecot, keys, sb }
    }

    /// `doveadm -c CONF [-o mail_location=<replica>] ARGS`.
    fn doveadm(&self, replica: bool, args: &[&str]) -> String {
        let mut c = self.dovecot.doveadm();
        if replica {
            c.args(["-o", &format!("mail_location={REPLICA}")]);
        }
        c.args(args);
        let shown = format!("{c:?}");
        let (status, out, err) = run_for(c, STEP);
        assert!(status.success(), "{shown}: {status}\n{out}\n{err}\ndovecot log:\n{}", self.dovecot.log_text());
        out
    }

    fn save(&self, replica: bool, user: &TestUser, mailbox: &str, subject: &str) {
        let mut c = self.dovecot.doveadm();
        if replica {
            c.args(["-o", &format!("mail_location={REPLICA}")]);
        }
        c.args(["save", "-u", &user.name, "-m", mailbox]);
        let mut live = Live::start(c);
        live.send(mail(user, subject));
        live.close_input();
        let (status, out, err) = live.finish(STEP);
        assert!(status.success(), "doveadm save: {status}\n{}\n{err}", String::from_utf8_lossy(&out));
    }

    /// `mailreplica -c … -u USER -o mail_location=<replica> ARGS` (as root; it drops to USER).
    fn mailreplica(&self, user: &TestUser, args: &[&str], input: Option<Vec<u8>>) {
        let mut c = Command::new(mailreplica_bin());
        c.arg("-c")
            .arg(self.sb.dir.join("mailreplica.toml"))
            .args(["-u", &user.name, "-o", &format!("mail_location={REPLICA}")])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("TZ", "UTC");
        let shown = format!("{c:?}");
        let mut live = Live::start(c);
        if let Some(i) = input {
            live.send(i);
        }
        live.close_input();
        let (status, out, err) = live.finish(STEP);
        assert!(status.success(), "{shown}: {status}\n{}\n{err}", String::from_utf8_lossy(&out));
    }

    /// A change on the replica, made with `tool`.
    fn replica_change(&self, tool: ReplicaTool, user: &TestUser, change: Change<'_>) {
        match (tool, change) {
            (ReplicaTool::Mailreplica, Change::Save(mailbox, subject)) => {
                self.mailreplica(user, &["save", "-m", mailbox], Some(mail(user, subject)))
            }
            (ReplicaTool::Mailreplica, Change::Args(args)) => self.mailreplica(user, args, None),
            (ReplicaTool::Doveadm, Change::Save(mailbox, subject)) => self.save(true, user, mailbox, subject),
            (ReplicaTool::Doveadm, Change::Args(args)) => {
                let (cmd, rest) = args.split_at(if args[0] == "mailbox" || args[0] == "flags" { 2 } else { 1 });
                let mut full: Vec<&str> = cmd.to_vec();
                full.extend(["-u", &user.name]);
                full.extend(rest);
                self.doveadm(true, &full);
            }
        }
    }

    /// `doveadm backup|sync -u USER remoteprefix:root@127.0.0.1` through sshd and the wrapper,
    /// with the `dsync_remote_cmd` of `deploy/dovecot-sender.conf.example` (Dovecot's own
    /// remote command after the ssh options: the peer's command, which the forced command
    /// ignores), pointed at this test's key, port and known_hosts.
    fn dsync(&self, verb: &str, user: &TestUser) {
        let remote_cmd = format!("dsync_remote_cmd={}", sender_remote_cmd())
            .replacen(
                "ssh ",
                &format!(
                    "ssh -F /dev/null -p {} -o UserKnownHostsFile={} ",
                    self.sshd.port,
                    self.sshd.known_hosts.display()
                ),
                1,
            )
            .replace("/root/.ssh/mailreplica_ed25519", &self.keys.clients[0].display().to_string());
        let before = self.sb.log_text().lines().count();
        let mut c = self.dovecot.doveadm();
        c.args(["-o", &remote_cmd, verb, "-u", &user.name, "remoteprefix:root@127.0.0.1"]);
        let (status, out, err) = run_for(c, STEP);
        assert!(
            status.success() && err.is_empty(),
            "doveadm {verb} -u {}: {status}\n{out}\n{err}\nauth log:\n{}\nsshd log:\n{}\ndovecot log:\n{}",
            user.name,
            self.sb.log_text(),
            self.sshd.log_text(),
            self.dovecot.log_text()
        );
        // Exactly one session, accepted for this user with its own ids; the peer's command
        // is only logged.
        let log = self.sb.log_text();
        let new: Vec<&str> = log.lines().skip(before).collect();
        assert_eq!(new.len(), 1, "{new:?}");
        for want in [
            ": accept peer=mx1 ".to_owned(),
            format!("user=\"{}\" uid={} gid={} groups={} ", user.name, user.uid, user.gid, user.gid),
            format!("maildir=\"{}\"", user.home.join("ReplicaMaildir").display()),
            " 127.0.0.1 ".to_owned(),
            format!("cmd=\"doveadm dsync-server -u{} -U\"", user.name),
        ] {
            assert!(new[0].contains(&want), "{want:?} missing: {}", new[0]);
        }
    }

    /// What a user's mail looks like on one side, as Dovecot reads it: every mailbox's GUID,
    /// UIDVALIDITY, UIDNEXT and count; every mail's mailbox, UID, GUID and flags (without
    /// `\Recent`, which belongs to a session); every body.
    fn view(&self, replica: bool, user: &TestUser) -> View {
        let status = self.doveadm(
            replica,
            &["-f", "tab", "mailbox", "status", "-u", &user.name, "guid uidvalidity uidnext messages", "*"],
        );
        let mails = self.doveadm(replica, &["-f", "tab", "fetch", "-u", &user.name, "mailbox uid guid flags", "all"]);
        let bodies = self.doveadm(replica, &["-f", "pager", "fetch", "-u", &user.name, "mailbox uid text", "all"]);
        View {
            mailboxes: status.lines().skip(1).map(str::to_owned).collect(),
            mails: mails.lines().skip(1).map(normalize_mail_row).collect(),
            bodies: bodies.split('\x0c').map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect(),
        }
    }

    /// Both sides of `user` show the same mail; returns it.
    fn assert_converged(&self, user: &TestUser, when: &str) -> View {
        let source = self.view(false, user);
        let replica = self.view(true, user);
        assert_eq!(source, replica, "{when}: source (left) and replica (right) differ for {}", user.name);
        source
    }
}

/// The value of `dsync_remote_cmd` in `deploy/dovecot-sender.conf.example`.
fn sender_remote_cmd() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dovecot-sender.conf.example");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value = text.lines().find_map(|l| l.strip_prefix("dsync_remote_cmd = ")).expect("a dsync_remote_cmd line");
    assert!(value.contains("/root/.ssh/mailreplica_ed25519") && value.starts_with("ssh "), "{value}");
    value.to_owned()
}

/// A change for [`Scenario::replica_change`]: a new mail, or a doveadm-style command line
/// (`flags add FLAGS SEARCH…`, `expunge SEARCH…`, `mailbox create NAME`).
#[derive(Clone, Copy)]
enum Change<'a> {
    Save(&'a str, &'a str),
    Args(&'a [&'a str]),
}

#[derive(Debug, PartialEq, Eq)]
struct View {
    mailboxes: BTreeSet<String>,
    mails: BTreeSet<String>,
    bodies: BTreeSet<String>,
}

impl View {
    fn has_body(&self, subject: &str) -> bool {
        self.bodies.iter().any(|b| b.contains(&format!("Subject: {subject}\n")))
    }

    /// The flags of the mail whose body has `subject`, via its mailbox and UID.
    fn flags_of(&self, subject: &str) -> String {
        let body = self.bodies.iter().find(|b| b.contains(&format!("Subject: {subject}\n"))).expect("mail by subject");
        let field = |k: &str| {
            body.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).map(str::to_owned).expect("pager field")
        };
        let (mailbox, uid) = (field("mailbox"), field("uid"));
        let row = self
            .mails
            .iter()
            .find(|m| m.starts_with(&format!("{mailbox}\t{uid}\t")))
            .unwrap_or_else(|| panic!("{mailbox} {uid} in {:?}", self.mails));
        row.rsplit('\t').next().unwrap_or("").to_owned()
    }
}

/// A small mail that names its user, so that a mix-up between users would show.
fn mail(user: &TestUser, subject: &str) -> Vec<u8> {
    format!(
        "From: {u}@example.org\nTo: {u}@example.org\nSubject: {subject}\nMessage-ID: <{subject}.{u}@example.org>\n\
         Date: Sat, 28 Nov 2026 12:00:00 +0000\n\n{subject} for {u}\n.leading dot line\n",
        u = user.name
    )
    .into_bytes()
}

/// `mailbox\tuid\tguid\tflags` with the flags sorted and without `\Recent` (which belongs to
/// a session; keywords may also be listed in another order on each side).
fn normalize_mail_row(row: &str) -> String {
    let mut fields: Vec<&str> = row.splitn(4, '\t').collect();
    let mut flags: Vec<&str> =
        fields.pop().unwrap_or("").split(' ').filter(|f| !f.is_empty() && *f != "\\Recent").collect();
    flags.sort_unstable();
    let flags = flags.join(" ");
    fields.push(&flags);
    fields.join("\t")
}

/// Every file and directory under `root` belongs to `uid`:`gid`; returns how many there are.
fn assert_owned_by(root: &Path, uid: u32, gid: u32) -> usize {
    let mut stack = vec![root.to_path_buf()];
    let mut n = 0;
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{} is owned by {}:{}", p.display(), m.uid(), m.gid());
        assert!(!m.file_type().is_symlink(), "{} is a symlink", p.display());
        n += 1;
        if m.is_dir() {
            stack.extend(fs::read_dir(&p).expect("read_dir").flatten().map(|e| e.path()));
        }
    }
    n
}

#[test]
fn dovecot_backup_then_two_way_sync_through_sshd_and_the_wrapper() {
    let sc = Scenario::new();
    let tools = [ReplicaTool::Mailreplica, ReplicaTool::Doveadm];

    // The source: different mailboxes and mails for each user.
    for (i, u) in sc.users.iter().enumerate() {
        sc.doveadm(false, &["mailbox", "create", "-u", &u.name, "Work", "Lists.rust"]);
        for (mailbox, subject) in [("INBOX", "first"), ("INBOX", "second"), ("INBOX", "third"), ("Work", "report")] {
            sc.save(false, u, mailbox, &format!("{subject} u{i}"));
        }
        sc.save(false, u, "Lists.rust", &format!("list u{i}"));
        sc.doveadm(false, &["flags", "add", "-u", &u.name, "\\Seen $Forwarded", "mailbox", "INBOX", "uid", "1"]);
        sc.doveadm(false, &["flags", "add", "-u", &u.name, "\\Answered", "mailbox", "Work", "uid", "1"]);
    }

    // 1. doveadm backup: the replica is made, file by file as the user.
    for (i, u) in sc.users.iter().enumerate() {
        assert!(!u.home.join("ReplicaMaildir").exists());
        sc.dsync("backup", u);
        let n = assert_owned_by(&u.home.join("ReplicaMaildir"), u.uid, u.gid);
        assert!(n > 10, "only {n} entries in the replica");
        let v = sc.assert_converged(u, "after backup");
        assert_eq!(v.mails.len(), 5, "{v:#?}");
        assert!(v.has_body(&format!("third u{i}")) && !v.has_body(&format!("third u{}", 1 - i)), "{v:#?}");
        assert!(v.mailboxes.iter().any(|m| m.starts_with("Lists.rust\t")), "{v:#?}");
        assert!(v.flags_of(&format!("first u{i}")).contains("$Forwarded"), "{v:#?}");
    }
    let log = sc.sshd.log_text();
    assert!(log.contains("Root login accepted for forced command"), "{log}");

    // 2. Changes on both sides, then doveadm sync (two-way). Both sides get a new mail in
    //    INBOX: the same UID on each side, a conflict the sync must resolve.
    for (i, u) in sc.users.iter().enumerate() {
        sc.save(false, u, "INBOX", &format!("new on source u{i}"));
        sc.doveadm(false, &["flags", "add", "-u", &u.name, "\\Flagged", "mailbox", "INBOX", "uid", "1"]);
        sc.replica_change(tools[i], u, Change::Save("INBOX", &format!("new on replica u{i}")));
        sc.replica_change(tools[i], u, Change::Args(&["expunge", "mailbox", "INBOX", "uid", "2"]));
        sc.dsync("sync", u);
        assert_owned_by(&u.home.join("ReplicaMaildir"), u.uid, u.gid);
        let v = sc.assert_converged(u, "after the first sync");
        assert!(v.has_body(&format!("new on source u{i}")), "source's new mail missing: {v:#?}");
        assert!(v.has_body(&format!("new on replica u{i}")), "replica's new mail missing: {v:#?}");
        assert!(!v.has_body(&format!("second u{i}")), "the replica's expunge was not applied: {v:#?}");
        assert!(v.flags_of(&format!("first u{i}")).contains("\\Flagged"), "{v:#?}");
        assert_eq!(v.mails.len(), 6, "{v:#?}");
    }

    // 3. The other way round: flags and a new mailbox on the replica, an expunge (in Work) and
    //    a flag removal on the source, so that INBOX only has flag changes on each side.
    for (i, u) in sc.users.iter().enumerate() {
        sc.replica_change(
            tools[i],
            u,
            Change::Args(&["flags", "add", "\\Answered $Label1", "mailbox", "INBOX", "uid", "3"]),
        );
        sc.replica_change(tools[i], u, Change::Args(&["mailbox", "create", "Archive"]));
        sc.replica_change(tools[i], u, Change::Save("Archive", &format!("archived u{i}")));
        sc.doveadm(false, &["expunge", "-u", &u.name, "mailbox", "Work", "uid", "1"]);
        sc.doveadm(false, &["flags", "remove", "-u", &u.name, "\\Seen", "mailbox", "INBOX", "uid", "1"]);
        sc.dsync("sync", u);
        assert_owned_by(&u.home.join("ReplicaMaildir"), u.uid, u.gid);
        let v = sc.assert_converged(u, "after the second sync");
        assert!(v.mailboxes.iter().any(|m| m.starts_with("Archive\t")), "{v:#?}");
        assert!(v.has_body(&format!("archived u{i}")), "{v:#?}");
        assert!(!v.has_body(&format!("report u{i}")), "the source's expunge was not applied: {v:#?}");
        assert!(v.flags_of(&format!("third u{i}")).contains("$Label1"), "{v:#?}");
        let first = v.flags_of(&format!("first u{i}"));
        assert!(!first.contains("\\Seen") && first.contains("\\Flagged"), "{first:?}");
    }

    // 4. Nothing changed: another sync changes nothing on either side.
    for u in &sc.users {
        let before = sc.assert_converged(u, "before the idle sync");
        sc.dsync("sync", u);
        assert_eq!(before, sc.assert_converged(u, "after the idle sync"), "an idle sync changed {}", u.name);
    }
}
