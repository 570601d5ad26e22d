//! `mailreplica replicator` end to end: real Dovecot 2.3 with its `replication` plugin on the
//! source, real OpenSSH sshd and `mailreplica-wrapper` in front of the replica.
//!
//! ```text
//!   dovecot-lda / imap / doveadm (Dovecot 2.3, maildir:~/Source, plugin `replication`)
//!      │ USER<TAB>high|low on replication-notify-fifo, USER<TAB>sync on replication-notify
//!      ▼
//!   mailreplica replicator ── one SSH connection ──► sshd ──root── mailreplica-wrapper --peer mx1
//!      (a child per sync, dropped to USER)                          ──drop──► USER (~/Maildir)
//! ```
//!
//! Shown here: every change (deliveries, IMAP flag changes, expunges, mailboxes, subscriptions)
//! reaches the replica, which then equals the source; a delivery with
//! `replication_sync_timeout` returns only once its mail is on the replica (the request that
//! crashed 2.3's replicator); the replica's sshd killed for a while (the queue backs off, keeps
//! each user's state, catches up); the service killed with SIGKILL amid syncs and started
//! again (no record lost or torn, nobody left unsynced); `doveadm replicator` and our
//! `replicate`/`replicator status` on the admin socket. Needs root, useradd, Dovecot 2.3 and
//! OpenSSH (`tests/run` installs them), and the workspace built first.

mod wrapper_common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wrapper_common::*;

/// An IMAP session's changes: flags, a keyword, an expunge, a new mailbox with a
/// subscription, a copy.
const IMAP_CHANGES: &[&str] = &[
    "SELECT INBOX",
    "STORE 1 +FLAGS (\\Flagged $Label1)",
    "STORE 2 +FLAGS (\\Seen \\Deleted)",
    "EXPUNGE",
    "CREATE Work",
    "SUBSCRIBE Work",
    "COPY 1 Work",
];

/// The longest any change may take to reach the replica here.
const CONVERGE: Duration = Duration::from_secs(60);

/// Who the source's users are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Users {
    /// Two Maildir users from the system's passwd.
    Plain,
    /// Three users from a passwd-file userdb (Dovecot's and ours): [0] Maildir; [1] sdbox
    /// (`userdb_mail`), which the replicator hands to `doveadm sync`; [2] Maildir with its own
    /// replica (`userdb_mail_replica=maildir:~/Replica`).
    Formats,
    /// Two Maildir users, and Dovecot 2.4.1 (from a Debian 13 root) on the source: no plugin.
    Dovecot24,
}

/// Fields drop in this order: the replicator, Dovecot, sshd, users, then the sandbox.
struct World {
    kind: Users,
    replicator: Option<KillOnDrop>,
    dovecot: Dovecot,
    sshd: Option<Sshd>,
    port: u16,
    users: Vec<TestUser>,
    keys: SshKeys,
    config: PathBuf,
    listing_config: PathBuf,
    service_log: PathBuf,
    sb: Sandbox,
}

impl World {
    /// With `plugin`, Dovecot's replication plugin is the change feed; without, our watcher.
    fn new(plugin: bool) -> Self {
        Self::with(plugin, Users::Plain)
    }

    fn with(plugin: bool, kind: Users) -> Self {
        require_root();
        let sb = Sandbox::new();
        let n = if kind == Users::Plain { 2 } else { 3 };
        let users: Vec<TestUser> = (0..n).map(|_| TestUser::new(&sb)).collect();
        assert_ne!(users[0].uid, users[1].uid);
        let names: Vec<String> = users.iter().map(|u| format!("\"{}\"", u.name)).collect();
        let names = names.join(", ");
        sb.write_policy(&format!(
            "[peer.mx1]\nallow_users = [{names}]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\n\
             mail_location = \"maildir:~/Maildir\"\n"
        ));
        // The Formats userdb, in Dovecot's passwd-file format, read by Dovecot and by us.
        let passwd_file = sb.dir.join("users.passwd");
        let line =
            |u: &TestUser, extra: &str| format!("{}:x:{}:{}::{}::{extra}\n", u.name, u.uid, u.gid, u.home.display());
        match kind {
            Users::Formats => {
                let text = line(&users[0], "")
                    + &line(&users[1], "userdb_mail=sdbox:~/sdbox")
                    + &line(&users[2], "userdb_mail_replica=maildir:~/Replica");
                fs::write(&passwd_file, text).expect("users.passwd");
            }
            Users::Dovecot24 => {
                assert!(!plugin, "Dovecot 2.4 has no replication plugin");
                fs::write(&passwd_file, line(&users[0], "") + &line(&users[1], "")).expect("users.passwd");
            }
            Users::Plain => {}
        }
        let keys = SshKeys::new(&sb, 1);
        let sshd = Sshd::start(&keys, "r", &Self::authorized_keys(&sb, &keys), "");
        let port = sshd.port;
        // The source: Dovecot with the plugin, whose FIFO and socket are ours (its own
        // aggregator's listeners are switched off with mode 0).
        let plugin_conf = "mail_plugins = $mail_plugins notify replication\n\
             plugin {\n  mail_replica = remoteprefix:replica\n  replication_sync_timeout = 20\n}\n\
             service aggregator {\n  fifo_listener replication-notify-fifo {\n    mode = 0\n  }\n\
               unix_listener replication-notify {\n    mode = 0\n  }\n}\n";
        let extra = if plugin { plugin_conf } else { "" };
        let dovecot = match kind {
            Users::Plain => Dovecot::start_with(&sb, "maildir:~/Source", extra),
            Users::Formats => {
                let userdb = format!("driver = passwd-file\n  args = {}", passwd_file.display());
                Dovecot::start_userdb(&sb, "maildir:~/Source", &userdb, extra)
            }
            Users::Dovecot24 => Dovecot::start24(&sb, "~/Source", &passwd_file),
        };
        let run = sb.dir.join("dovecot").join("run");
        let feed = if plugin {
            format!(
                "plugin_fifo = \"{run}/replication-notify-fifo\"\nplugin_socket = \"{run}/replication-notify\"\n",
                run = run.display()
            )
        } else if kind == Users::Dovecot24 {
            // (the other watcher test runs fanotify, which `auto` picks as root)
            "watch = true\nwatch_with = \"inotify\"\n".to_owned()
        } else {
            "watch = true\n".to_owned()
        };
        let formats = if kind == Users::Formats {
            format!("userdb = \"passwd-file:{}\"\n", passwd_file.display())
        } else {
            String::new()
        };
        let delegate = format!("doveadm = \"/usr/bin/doveadm -c {}\"\n", dovecot.conf.display());
        let config = sb.dir.join("mailreplica.toml");
        fs::write(
            &config,
            format!(
                "mail_location = \"maildir:~/Source\"\nfirst_valid_uid = 1000\nssh_key = \"{key}\"\n\
                 ssh_known_hosts = \"{kh}\"\n{formats}\n[replicator]\n\
                 destination = \"remoteprefix:root@127.0.0.1:{port}\"\nusers = [{names}]\n\
                 state_dir = \"{dir}/state\"\nadmin_socket = \"{dir}/replicator-doveadm\"\n\
                 {feed}{delegate}max_parallel = 2\nretry_min = \"1s\"\nretry_max = \"2s\"\nsync_timeout = 60\n",
                key = keys.clients[0].display(),
                kh = sshd.known_hosts.display(),
                dir = sb.dir.display(),
            ),
        )
        .expect("mailreplica.toml");
        // Listings read every Maildir with the system's passwd and a location given each time.
        let listing_config = sb.dir.join("listing.toml");
        fs::write(&listing_config, "mail_location = \"maildir:~/Source\"\nfirst_valid_uid = 1000\n")
            .expect("listing.toml");
        let service_log = sb.dir.join("replicator.log");
        let mut w = Self {
            kind,
            replicator: None,
            dovecot,
            sshd: Some(sshd),
            port,
            users,
            keys,
            config,
            listing_config,
            service_log,
            sb,
        };
        w.start_replicator();
        w
    }

    fn authorized_keys(sb: &Sandbox, keys: &SshKeys) -> String {
        format!("restrict,command=\"{WRAPPER} {}\" {}\n", sb.args("mx1").join(" "), keys.client_pub(0))
    }

    /// `mailreplica -c CONFIG ARGS…`.
    fn mr(&self, args: &[&str]) -> Command {
        let mut c = Command::new(mailreplica_bin());
        c.arg("-c").arg(&self.config).args(args).env_clear().env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        c
    }

    fn ok(&self, cmd: Command, input: &[u8]) -> String {
        let what = format!("{cmd:?}");
        let mut live = Live::start(cmd);
        live.send(input.to_vec());
        live.close_input();
        let (status, out, err) = live.finish(Duration::from_secs(120));
        assert!(status.success(), "{what}: {status:?}\n{err}");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn start_replicator(&mut self) {
        assert!(self.replicator.is_none());
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.service_log).expect("service log");
        let child = self
            .mr(&["replicator"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start the replicator");
        self.replicator = Some(KillOnDrop(child));
        let sock = self.sb.dir.join("replicator-doveadm");
        let until = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < until, "the replicator did not start:\n{}", self.log());
            if let Some(st) = self.replicator.as_mut().and_then(|c| c.0.try_wait().ok().flatten()) {
                panic!("the replicator exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.service_log).unwrap_or_default()
    }

    /// Delivers a mail to `u` through Dovecot's LDA (the plugin notifies us).
    fn deliver(&self, user: &str, subject: &str) {
        let mut c = self.dovecot.command("/usr/lib/dovecot/dovecot-lda");
        c.arg("-c").arg(&self.dovecot.conf).args(["-d", user, "-f", "sender@example.org"]);
        let mail = format!("From: sender@example.org\nTo: {user}@example.org\nSubject: {subject}\n\nbody\n");
        self.ok(c, mail.as_bytes());
    }

    /// Runs IMAP commands as `u` with Dovecot's own imap process (preauthenticated).
    fn imap(&self, user: &str, commands: &[&str]) -> String {
        let mut c = self.dovecot.doveadm();
        c.args(["exec", "imap", "-u", user]);
        let mut script: String = commands.iter().enumerate().map(|(i, c)| format!("t{i} {c}\r\n")).collect();
        script.push_str("z LOGOUT\r\n");
        let out = self.ok(c, script.as_bytes());
        for (i, command) in commands.iter().enumerate() {
            assert!(out.contains(&format!("t{i} OK")), "IMAP {command:?} failed:\n{out}");
        }
        out
    }

    fn doveadm(&self, args: &[&str]) {
        let mut c = self.dovecot.doveadm();
        c.args(args);
        self.ok(c, b"");
    }

    /// Mails (mailbox, uid, guid, flags without \Recent), mailbox counters and GUIDs, and
    /// subscriptions of `u`'s Maildir at `~/{location}`.
    fn listing(&self, user: &str, location: &str) -> String {
        let loc = format!("mail_location=maildir:~/{location}");
        let base = ["-c", self.listing_config.to_str().expect("path"), "-u", user, "-o", &loc, "-f", "tab"];
        let run = |extra: &[&str]| {
            let mut c = Command::new(mailreplica_bin());
            c.args([&base[..], extra].concat()).env_clear().env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
            self.ok(c, b"")
        };
        let mails: Vec<String> = run(&["fetch", "mailbox uid guid flags", "all"])
            .lines()
            .map(|l| l.replace("\\Recent", "").split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let boxes = run(&["mailbox", "status", "messages uidnext uidvalidity guid", "*"]);
        let subscribed = run(&["mailbox", "list", "-s"]);
        format!("{}\n\n{boxes}\n{subscribed}", mails.join("\n"))
    }

    /// The mails of an sdbox user, as Dovecot reads them: mailbox, uid, guid, then the flags
    /// sorted (the two implementations may order them differently).
    fn dovecot_mails(&self, user: &str) -> Vec<String> {
        self.dovecot_mails_with(user, &[])
    }

    /// [`World::dovecot_mails`] with more doveadm options (`-o mail_path=…`).
    fn dovecot_mails_with(&self, user: &str, options: &[&str]) -> Vec<String> {
        let mut c = self.dovecot.doveadm();
        c.args(options).args(["-f", "tab", "fetch", "-u", user, "mailbox uid guid flags", "all"]);
        let out = self.ok(c, b"");
        normalized_mails(&out)
    }

    /// User `i`'s source and replica, each as one text (equal once replicated).
    fn pair(&self, i: usize) -> (String, String) {
        let u = &self.users[i].name;
        match (self.kind, i) {
            (Users::Formats, 1) => {
                let replica = normalized_mails(self.listing(u, "Maildir").split("\n\n").next().unwrap_or_default());
                (self.dovecot_mails(u).join("\n"), replica.join("\n"))
            }
            (Users::Formats, 2) => (self.listing(u, "Source"), self.listing(u, "Replica")),
            _ => (self.listing(u, "Source"), self.listing(u, "Maildir")),
        }
    }

    /// Waits until every user's replica equals their source.
    fn converged(&self, what: &str) {
        let until = Instant::now() + CONVERGE;
        for (i, u) in self.users.iter().enumerate() {
            loop {
                let (source, replica) = self.pair(i);
                if source == replica {
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "{what}: {}'s replica differs\nsource:\n{source}\nreplica:\n{replica}\nservice log:\n{}",
                    u.name,
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn status_json(&self) -> String {
        self.ok(self.mr(&["-f", "json", "replicator", "status"]), b"")
    }

    /// A user's field in `replicator status -f json` (a crude reader: the values we look at
    /// hold no quotes).
    fn field(&self, user: &str, key: &str) -> String {
        let json = self.status_json();
        let obj = json.split('{').find(|o| o.contains(&format!("\"user\":\"{user}\""))).unwrap_or_else(|| {
            panic!("{user} not in the status: {json}");
        });
        let at = obj.find(&format!("\"{key}\":\"")).unwrap_or_else(|| panic!("no {key} in {obj}")) + key.len() + 4;
        obj[at..].split('"').next().unwrap_or_default().to_owned()
    }

    fn wait_for(&self, what: &str, cond: impl Fn() -> bool) {
        let until = Instant::now() + CONVERGE;
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}; service log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn state_files(&self) -> Vec<(String, String)> {
        let dir = self.sb.dir.join("state").join("users");
        let mut v: Vec<(String, String)> = fs::read_dir(&dir)
            .expect("state dir")
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read_to_string(e.path()).unwrap_or_default()))
            .collect();
        v.sort();
        v
    }
}

/// `fetch -f tab "mailbox uid guid flags"` output without its header, each line's flags
/// sorted and `\\Recent` left out, the lines sorted (mailboxes come in either order).
fn normalized_mails(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let (head, flags) = words.split_at(words.len().min(3));
            let mut flags: Vec<&str> = flags.iter().copied().filter(|f| *f != "\\Recent").collect();
            flags.sort_unstable();
            [head.join(" "), flags.join(" ")].join(" ")
        })
        .collect();
    v.sort();
    v
}

fn assert_no_errors_in(dovecot: &Dovecot) {
    let log = dovecot.log_text();
    let bad: Vec<&str> =
        log.lines().filter(|l| l.contains("Error") || l.contains("Panic") || l.contains("Fatal")).collect();
    assert!(bad.is_empty(), "Dovecot logged errors:\n{}", bad.join("\n"));
}

#[test]
fn the_replicator_follows_dovecots_plugin_through_sshd_and_the_wrapper_and_survives_faults() {
    let mut w = World::new(true);
    let (alice, bob) = (w.users[0].name.clone(), w.users[1].name.clone());
    let (alice, bob) = (alice.as_str(), bob.as_str());
    // At start both users are new: synced at once (empty Maildirs).
    w.wait_for("both first syncs", || [alice, bob].iter().all(|u| w.field(u, "last_success") != "0"));

    // Deliveries wait for their sync (replication_sync_timeout): right after the LDA returns,
    // the mail is on the replica, no polling. This is the request that crashed 2.3.
    for i in 0..3 {
        w.deliver(alice, &format!("alice {i}"));
        w.deliver(bob, &format!("bob {i}"));
    }
    for u in [alice, bob] {
        assert_eq!(w.listing(u, "Maildir"), w.listing(u, "Source"), "{u} right after delivery");
    }

    // IMAP: flags, a keyword, an expunge, a new mailbox with a subscription, a copy.
    w.imap(alice, IMAP_CHANGES);
    w.doveadm(&["mailbox", "create", "-u", bob, "Archive"]);
    w.doveadm(&["mailbox", "subscribe", "-u", bob, "Archive"]);
    w.doveadm(&["move", "-u", bob, "Archive", "mailbox", "INBOX", "uid", "1"]);
    w.converged("after IMAP and doveadm changes");
    let src = w.listing(alice, "Source");
    assert!(src.contains("\\Flagged $Label1") && src.contains("Work"), "{src}");
    assert_eq!(w.field(alice, "state"), "true");

    // doveadm replicator speaks to our admin socket.
    let mut c = w.dovecot.doveadm();
    c.args(["replicator", "status", "-a"]).arg(w.sb.dir.join("replicator-doveadm"));
    let overview = w.ok(c, b"");
    assert!(overview.contains("Total number of known users") && overview.contains('2'), "{overview}");
    let mut c = w.dovecot.doveadm();
    c.args(["replicator", "status", "-a"]).arg(w.sb.dir.join("replicator-doveadm")).arg("*");
    let users = w.ok(c, b"");
    assert!(users.contains(alice) && users.contains(bob), "{users}");

    // The replica goes away: its sshd and every connection it served.
    let sshd = w.sshd.take().expect("sshd");
    sshd.kill_all();
    assert_eq!(w.field(alice, "failures"), "0");
    // Without a replica the synchronous request fails; the plugin falls back to the FIFO.
    w.deliver(alice, "while the replica is down");
    w.wait_for("a failure", || w.field(alice, "failures") != "0");
    assert_eq!(w.field(alice, "state"), "true", "the last good state is kept");
    let errors = w.field(alice, "last_error");
    assert!(!errors.is_empty(), "the failure is shown");
    // Back on the same port: the backoff retries, the queue catches up.
    let ak = World::authorized_keys(&w.sb, &w.keys);
    w.sshd = Some(Sshd::start_on(&w.keys, "r2", &ak, "", Some(w.port)));
    // (the host key is the same, so known_hosts still holds)
    w.converged("after the replica came back");
    w.wait_for("failures cleared", || w.field(alice, "failures") == "0");

    // SIGKILL amid syncs: many changes queued for both users, the service killed while they
    // run, then started again.
    let running = |w: &World| {
        let log = w.log();
        log.matches("sync started").count() > log.matches("sync done").count() + log.matches("sync failed").count()
    };
    for i in 0..5 {
        w.doveadm(&["mailbox", "create", "-u", alice, &format!("Box{i}")]);
        w.doveadm(&["mailbox", "create", "-u", bob, &format!("Box{i}")]);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while !running(&w) {
        // A sync of the last changes starts within a second of them.
        assert!(Instant::now() < until, "no sync ran after the changes:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut killed = w.replicator.take().expect("running");
    killed.0.kill().expect("SIGKILL");
    let _ = killed.0.wait();
    drop(killed);
    for (name, text) in w.state_files() {
        assert!(name.ends_with(".user") || name.contains(".tmp."), "{name}");
        if name.ends_with(".user") {
            assert!(
                text.starts_with("v1\t") && text.ends_with('\n') && text.split('\t').count() == 10,
                "torn: {text:?}"
            );
        }
    }
    w.start_replicator();
    w.converged("after SIGKILL and a restart");
    assert!(w.state_files().iter().all(|(n, _)| n.ends_with(".user")), "leftovers removed");

    // `mailreplica replicate --full` forces a full sync; an unknown user is refused.
    let before = w.log().matches("sync started (full)").count();
    w.ok(w.mr(&["replicate", "--full", bob]), b"");
    w.wait_for("the forced full sync", || w.log().matches("sync started (full)").count() > before);
    let out = w.mr(&["replicate", "nosuchuser"]).output().expect("replicate");
    assert_eq!(out.status.code(), Some(67), "{}", String::from_utf8_lossy(&out.stderr));

    // A clean stop: SIGTERM, exit 0, its socket removed.
    let mut r = w.replicator.take().expect("running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.0.id() as i32), nix::sys::signal::SIGTERM).expect("SIGTERM");
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = r.0.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < until, "no clean stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", w.log());
    assert!(!Path::new(&w.sb.dir.join("replicator-doveadm")).exists());
    assert_no_errors_in(&w.dovecot);
    if std::env::var_os("MAILREPLICA_TEST_SHOW_LOG").is_some() {
        eprintln!("service log:\n{}\nDovecot log:\n{}", w.log(), w.dovecot.log_text());
    }
    let _ = std::io::stderr().flush();
}

#[test]
fn without_a_plugin_the_watcher_feeds_the_replicator() {
    let w = World::new(false);
    let (alice, bob) = (w.users[0].name.clone(), w.users[1].name.clone());
    let (alice, bob) = (alice.as_str(), bob.as_str());
    w.wait_for("both first syncs", || [alice, bob].iter().all(|u| w.field(u, "last_success") != "0"));
    let log_has = |needle: &str| w.log().contains(needle);
    assert!(log_has("Maildirs with fanotify"), "as root, `auto` watches with fanotify: {}", w.log());
    // Dovecot without any plugin: a delivery, an IMAP session, doveadm save.
    w.deliver(alice, "to alice");
    w.deliver(bob, "to bob");
    w.converged("deliveries seen by the watcher");
    w.imap(alice, &["SELECT INBOX", "STORE 1 +FLAGS (\\Answered $Work)", "CREATE Later", "SUBSCRIBE Later"]);
    let mut save = w.dovecot.doveadm();
    save.args(["save", "-u", bob, "-m", "INBOX"]);
    w.ok(save, b"Subject: saved by doveadm\n\nbody\n");
    w.converged("IMAP and doveadm save");
    // A mail written into a Maildir by hand, as any delivery agent does (as the user).
    let home = &w.users[1].home;
    let tmp = home.join("Source/tmp/1700000000.M1P1.byhand");
    fs::write(&tmp, "Subject: by hand\n\nbody\n").expect("write by hand");
    chown(&tmp, w.users[1].uid, w.users[1].gid);
    fs::rename(&tmp, home.join("Source/new/1700000000.M1P1.byhand")).expect("rename into new/");
    w.converged("a mail written by hand");
    let src = w.listing(alice, "Source");
    assert!(src.contains("\\Answered $Work") && src.contains("Later"), "{src}");
    // Our own writes cost at most one more sync each, not a loop: once converged, quiet.
    std::thread::sleep(Duration::from_secs(2));
    let count = || w.log().matches("sync started").count();
    let settled = count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(), settled, "syncs go on without changes:\n{}", w.log());
    assert_no_errors_in(&w.dovecot);
}

#[test]
fn sdbox_users_go_to_doveadm_sync_and_a_userdb_mail_replica_picks_the_destination() {
    let w = World::with(true, Users::Formats);
    let names: Vec<String> = w.users.iter().map(|u| u.name.clone()).collect();
    let (plain, sdbox, own) = (names[0].as_str(), names[1].as_str(), names[2].as_str());
    w.wait_for("every first sync", || names.iter().all(|u| w.field(u, "last_success") != "0"));
    assert!(w.log().contains("1 users' mail is in another format"), "{}", w.log());
    for (i, u) in names.iter().enumerate() {
        for n in 0..2 {
            w.deliver(u, &format!("mail {n} for user {i}"));
        }
    }
    // The sdbox user through IMAP: flags, a keyword, an expunge, a new mailbox, a copy.
    w.imap(
        sdbox,
        &[
            "SELECT INBOX",
            "STORE 1 +FLAGS (\\Flagged $Label1)",
            "APPEND INBOX {22+}\r\nSubject: appended\r\n\r\nx",
            "STORE 2 +FLAGS (\\Deleted)",
            "EXPUNGE",
            "CREATE Work",
            "COPY 1 Work",
        ],
    );
    w.converged("deliveries and IMAP changes");
    let src = w.dovecot_mails(sdbox).join("\n");
    assert!(src.contains("Work") && src.contains("$Label1") && src.lines().count() == 3, "{src}");
    assert!(w.users[1].home.join("sdbox").is_dir() && !w.users[1].home.join("Source").exists());
    // The user with their own replica got nothing at the configured destination.
    assert!(w.users[2].home.join("Replica").is_dir());
    assert!(!w.users[2].home.join("Maildir").exists(), "{own}'s mail went to the configured destination too");
    assert!(w.users[0].home.join("Maildir").is_dir(), "{plain}");
    // doveadm's state is kept, as ours is; a forced full sync goes to doveadm as -f.
    assert_eq!(w.field(sdbox, "state"), "true");
    assert_eq!(w.field(sdbox, "failures"), "0", "{}", w.log());
    let before = w.log().matches("sync started (full)").count();
    w.ok(w.mr(&["replicate", "--full", sdbox]), b"");
    w.wait_for("the forced full sync", || w.log().matches("sync started (full)").count() > before);
    w.deliver(sdbox, "after the full sync");
    w.converged("after a full sync of the sdbox user");
    assert_eq!(w.field(sdbox, "failures"), "0", "{}", w.log());
    assert_no_errors_in(&w.dovecot);
}

#[test]
fn dovecot_2_4_on_the_source_without_a_plugin_is_followed_by_the_watcher() {
    let w = World::with(false, Users::Dovecot24);
    let (alice, bob) = (w.users[0].name.clone(), w.users[1].name.clone());
    let (alice, bob) = (alice.as_str(), bob.as_str());
    w.wait_for("both first syncs", || [alice, bob].iter().all(|u| w.field(u, "last_success") != "0"));
    assert!(w.log().contains("users with inotify"), "{}", w.log());
    // Dovecot 2.4.1's LDA, IMAP and doveadm write the source; the watcher sees each change.
    for i in 0..3 {
        w.deliver(alice, &format!("alice {i}"));
        w.deliver(bob, &format!("bob {i}"));
    }
    w.converged("Dovecot 2.4.1's deliveries");
    w.imap(alice, IMAP_CHANGES);
    w.doveadm(&["mailbox", "create", "-u", bob, "Archive"]);
    w.doveadm(&["move", "-u", bob, "Archive", "mailbox", "INBOX", "uid", "1"]);
    let mut save = w.dovecot.doveadm();
    save.args(["save", "-u", bob, "-m", "INBOX"]);
    w.ok(save, b"Subject: saved by doveadm 2.4\n\nbody\n");
    w.converged("Dovecot 2.4.1's IMAP and doveadm changes");
    let src = w.listing(alice, "Source");
    assert!(src.contains("\\Flagged $Label1") && src.contains("Work"), "{src}");
    // Dovecot 2.4.1 reads each replica as it reads the source.
    for u in [alice, bob] {
        let source = w.dovecot_mails_with(u, &["-o", "mail_path=~/Source"]);
        let replica = w.dovecot_mails_with(u, &["-o", "mail_path=~/Maildir"]);
        assert!(source.len() >= 3, "{source:?}");
        assert_eq!(replica, source, "{u}: Dovecot 2.4.1 reads the replica differently");
    }
    assert_no_errors_in(&w.dovecot);
}

#[test]
fn import_takes_over_dovecot_2_3_replicator_db_and_refuses_a_bad_one_whole() {
    let dir = tempfile_dir();
    let config = dir.join("mailreplica.toml");
    fs::write(
        &config,
        format!(
            "[replicator]\ndestination = \"maildir:~/Replica\"\nstate_dir = \"{d}/state\"\n\
             admin_socket = \"{d}/admin\"\n",
            d = dir.display()
        ),
    )
    .expect("config");
    let mr = |args: &[&str]| {
        Command::new(mailreplica_bin()).arg("-c").arg(&config).args(args).output().expect("mailreplica")
    };
    // What 2.3.19 wrote at a clean stop (7 and 8 fields, tab-escaped names).
    let db = dir.join("replicator.db");
    fs::write(
        &db,
        "alice\t0\t1795866217\t1795866217\t1795866130\t0\tAQAAAHm4+Jk=\t1795866217\n\
         b\x01tob\t2\t1795866300\t1795866217\t1795866130\t1\tAQAAAHm4+Jk=\n",
    )
    .expect("db");
    let out = mr(&["replicator", "import", db.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 2 users"));
    let users = dir.join("state").join("users");
    let alice = fs::read_to_string(users.join(format!("{}.user", hex("alice")))).expect("alice's record");
    // Dovecot's eight fields, then ours: no full sync owed.
    assert_eq!(alice, "v1\talice\t0\t1795866217\t1795866217\t1795866130\t0\tAQAAAHm4+Jk=\t1795866217\t0\n");
    let bob = fs::read_to_string(users.join(format!("{}.user", hex("b\tob")))).expect("b\\tob's record");
    assert!(bob.starts_with("v1\tb\x01tob\t2\t") && bob.ends_with("\t1\tAQAAAHm4+Jk=\t0\t0\n"), "{bob:?}");
    // Again: our records are kept, not overwritten.
    let out = mr(&["replicator", "import", db.to_str().expect("path")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 already had a record"), "{out:?}");
    // A bad line stops the import with its number; nothing of the file is taken.
    let bad = dir.join("bad.db");
    fs::write(&bad, "carol\t0\t1\t1\t1\t0\tAQAAAHm4+Jk=\t1\ndave\tx\t1\t1\t1\t0\t\n").expect("bad db");
    let out = mr(&["replicator", "import", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{out:?}");
    assert!(!users.join(format!("{}.user", hex("carol"))).exists());
    let _ = fs::remove_dir_all(&dir);
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A fresh directory under /tmp (this test needs no users).
fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mr-import-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("tmp dir");
    d
}
