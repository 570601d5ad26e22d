//! The Debian package, as an admin meets it: built by `packaging/build-deb.sh`, checked by
//! lintian, installed with `apt install ./mailreplica_*.deb` into a clean Debian 12 root,
//! upgraded over an older build with an edited conffile, then removed and purged.
//!
//! Needs root, debootstrap's Debian 12 root (`tests/lab/debian-root.sh bookworm DIR man-db`,
//! which `tests/run` makes) and lintian; the release binaries built first (`tests/run` builds
//! the workspace before it tests). The root is entered per command with `unshare --mount` +
//! `chroot`, and left as it was found: the package is purged even when the test fails.
//!
//! The README's deployment, followed literally in that root (one host playing both sides:
//! the sender's mail in `~/Source`, the replica's in `~/Maildir`): install the package, edit
//! the two files, add one `authorized_keys` line, `mailreplica doctor`, then replicate a user
//! through the root's own OpenSSH sshd into `mailreplica-wrapper`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests share one root: one at a time.
static ROOT: Mutex<()> = Mutex::new(());

fn roots() -> PathBuf {
    std::env::var_os("MAILREPLICA_TEST_ROOTS")
        .map_or_else(|| PathBuf::from("/var/lib/mailreplica-tests"), PathBuf::from)
}

/// The clean Debian 12 root, and the package's files put into it for the test.
struct Bookworm {
    root: PathBuf,
    /// Inside the root: where the test's .deb files are.
    debs: PathBuf,
}

impl Bookworm {
    fn open() -> Self {
        assert!(nix::unistd::geteuid().is_root(), "the package test installs into a chroot: run it as root");
        let root = roots().join("bookworm");
        assert!(
            root.join("usr/bin/man").exists() && root.join("usr/sbin/sshd").exists(),
            "no Debian 12 root with man-db and openssh-server at {r}: make it with \
             `tests/lab/debian-root.sh bookworm {r} man-db,openssh-server` (tests/run does)",
            r = root.display()
        );
        let debs = root.join(format!("tmp/mailreplica-package-test-{}", std::process::id()));
        fs::create_dir_all(&debs).expect("a directory for the packages in the root");
        let me = Self { root, debs };
        // A leftover of an earlier, killed run would make this one meaningless.
        me.purge();
        me
    }

    /// `args` inside the root, with a clean environment (not started).
    fn command(&self, args: &[&str]) -> Command {
        let script = "r=$1; shift; mount --rbind /dev \"$r/dev\" && mount -t proc proc \"$r/proc\" \
                      && exec chroot \"$r\" \"$@\"";
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&self.root)
            .args(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C"])
            .args(args);
        c
    }

    /// Runs `args` inside the root.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().expect("run a command in the root")
    }

    /// Runs `args` inside the root with `input` on its stdin; panics unless it succeeds.
    #[track_caller]
    fn ok_with_input(&self, args: &[&str], input: &[u8]) -> String {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run a command in the root");
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{args:?} in the root: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} in the root: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The package purged, and what an admin (a test) added next to it removed.
    fn purge(&self) {
        let _ = self.run(&["dpkg", "--purge", "mailreplica"]);
        let _ = self.run(&["rm", "-rf", "/etc/mailreplica"]);
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Every path in the root but what dpkg, apt, man-db and the kernel keep for themselves.
    fn files(&self) -> BTreeSet<String> {
        // The package managers' own records (apt writes `extended_states` and `lists/auxfiles`
        // at its first local install in a fresh root) are not the package's files.
        let skip = ["proc", "dev", "sys", "tmp", "var/lib/dpkg", "var/lib/apt", "var/log", "var/cache", "run"];
        let mut out = BTreeSet::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read the root").flatten() {
                let p = e.path();
                let rel = p.strip_prefix(&self.root).expect("in the root").to_string_lossy().into_owned();
                if skip.iter().any(|s| rel == *s || rel.starts_with(&format!("{s}/"))) {
                    continue;
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                }
                out.insert(rel);
            }
        }
        out
    }
}

impl Drop for Bookworm {
    fn drop(&mut self) {
        self.purge();
        let _ = fs::remove_dir_all(&self.debs);
    }
}

/// Builds the package from the release binaries, as `version`.
fn build(version: &str, out: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("packaging/build-deb.sh"))
        .arg(out)
        .env("MAILREPLICA_DEB_PREBUILT", "1")
        .env("MAILREPLICA_DEB_VERSION", version)
        .output()
        .expect("packaging/build-deb.sh");
    assert!(o.status.success(), "build-deb.sh: {}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn mode_owner(p: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn the_package_installs_upgrades_and_purges_cleanly_and_lintian_finds_no_error() {
    let _one = ROOT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let bw = Bookworm::open();
    let before = bw.files();
    let old = build("0.0.1~test1", &bw.debs);
    let new = build(env!("CARGO_PKG_VERSION"), &bw.debs);

    // lintian: no error and no warning (the README lists the informational tags and why).
    let l = Command::new("lintian").arg(&new).output().expect("lintian (tests/run installs it)");
    let text = String::from_utf8_lossy(&l.stdout);
    let bad: Vec<&str> = text.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(bad.is_empty(), "lintian:\n{}", bad.join("\n"));

    // An older build first, as an upgrade meets it.
    let inside = |deb: &Path| format!("/{}", deb.strip_prefix(&bw.root).expect("in the root").display());
    let installed = || bw.ok(&["dpkg-query", "-W", "-f", "${Version}", "mailreplica"]);
    bw.ok(&["apt-get", "install", "-y", &inside(&old)]);
    assert_eq!(installed(), "0.0.1~test1");
    // The admin edits a conffile and adds a file of their own.
    let policy = bw.path("/etc/mailreplica/wrapper.toml");
    let mut edited = fs::read_to_string(&policy).expect("wrapper.toml");
    edited.push_str("\n# edited by the admin\n");
    fs::write(&policy, &edited).expect("edit wrapper.toml");
    fs::write(bw.path("/etc/mailreplica/known_hosts"), "replica ssh-ed25519 AAAA\n").expect("admin's file");

    bw.ok(&["apt-get", "install", "-y", &inside(&new)]);
    assert_eq!(installed(), env!("CARGO_PKG_VERSION"), "upgraded");
    assert_eq!(fs::read_to_string(&policy).expect("wrapper.toml"), edited, "the upgrade kept the admin's edit");
    let version = bw.ok(&["mailreplica", "--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")) && version.contains("dsync protocol 3.5"), "{version}");

    // The files, their owners and modes.
    for (p, mode) in [
        ("/usr/bin/mailreplica", 0o755),
        ("/usr/sbin/mailreplica-wrapper", 0o755),
        ("/etc/mailreplica/mailreplica.toml", 0o644),
        ("/etc/mailreplica/wrapper.toml", 0o644),
        ("/lib/systemd/system/mailreplica-replicator.service", 0o644),
        ("/usr/share/man/man1/mailreplica.1.gz", 0o644),
        ("/usr/share/man/man5/mailreplica.toml.5.gz", 0o644),
        ("/usr/share/man/man8/mailreplica-wrapper.8.gz", 0o644),
        ("/usr/share/bash-completion/completions/mailreplica", 0o644),
        ("/usr/share/zsh/vendor-completions/_mailreplica", 0o644),
        ("/usr/share/fish/vendor_completions.d/mailreplica.fish", 0o644),
        ("/usr/share/doc/mailreplica/examples/mailreplica.toml.example", 0o644),
        ("/usr/share/doc/mailreplica/copyright", 0o644),
    ] {
        assert_eq!(mode_owner(&bw.path(p)), (mode, 0, 0), "{p}: mode and owner");
    }
    for page in ["mailreplica", "mailreplica.toml", "mailreplica-wrapper"] {
        let w = bw.ok(&["man", "-w", page]);
        assert!(w.trim().ends_with(".gz"), "man -w {page}: {w}");
    }
    let manpage = bw.ok(&["man", "5", "mailreplica.toml"]);
    assert!(manpage.contains("full_sync_interval") && manpage.contains("ssh_known_hosts"), "{manpage}");
    // Safe defaults: the policy refuses everyone, the replicator has nowhere to go.
    let check = bw.run(&["mailreplica-wrapper", "--check", "root"]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let rep = bw.run(&["mailreplica", "replicator"]);
    assert_eq!(rep.status.code(), Some(78), "{rep:?}");
    assert!(String::from_utf8_lossy(&rep.stderr).contains("destination is not set"), "{rep:?}");
    // The service is installed, not enabled.
    assert!(!bw.path("/etc/systemd/system/multi-user.target.wants/mailreplica-replicator.service").exists());

    // What the service would have made.
    fs::create_dir_all(bw.path("/var/lib/mailreplica/users")).expect("state dir");
    fs::write(bw.path("/var/lib/mailreplica/users/616c696365.user"), "v1\n").expect("a record");

    // remove keeps the configuration; purge removes all but what the admin made.
    bw.ok(&["apt-get", "remove", "-y", "mailreplica"]);
    assert!(!bw.path("/usr/bin/mailreplica").exists() && policy.exists());
    bw.ok(&["apt-get", "purge", "-y", "mailreplica"]);
    let after = bw.files();
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    assert_eq!(
        (added, removed),
        (vec![&"etc/mailreplica".to_owned(), &"etc/mailreplica/known_hosts".to_owned()], vec![]),
        "after the purge only the admin's own file (and its directory) is left"
    );
}

/// What the walk-through adds to the root besides the package, undone even on failure.
struct Walk<'a> {
    bw: &'a Bookworm,
    user: &'static str,
    sshd: Option<Child>,
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.bw.run(&["userdel", "-r", self.user]);
        let _ = self.bw.run(&["rm", "-rf", "/root/.ssh", "/etc/ssh/sshd_config.d/mailreplica-wrapper.conf"]);
        self.bw.purge();
        let _ = self.bw.run(&["rm", "-f", "/var/log/mailreplica-wrapper.log"]);
    }
}

#[test]
fn the_readme_deployment_from_the_package_replicates_a_user_through_sshd() {
    let _one = ROOT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let bw = Bookworm::open();
    let deb = build(env!("CARGO_PKG_VERSION"), &bw.debs);
    let deb_inside = format!("/{}", deb.strip_prefix(&bw.root).expect("in the root").display());
    let mut walk = Walk { bw: &bw, user: "mrwalk", sshd: None };
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();

    // 1. Install the package.
    bw.ok(&["apt-get", "install", "-y", &deb_inside]);
    // A mail user with mail on the sending side (~/Source here).
    bw.ok(&["useradd", "-m", "-s", "/usr/sbin/nologin", walk.user]);
    for i in 0..3 {
        let mail = format!("From: a@example.org\nSubject: walk {i}\n\nbody {i}\n");
        bw.ok_with_input(
            &["mailreplica", "-u", walk.user, "-o", "mail_location=maildir:~/Source", "save"],
            mail.as_bytes(),
        );
    }
    // 2. Edit the two files: the replica's policy, the sender's configuration.
    let policy = bw.path("/etc/mailreplica/wrapper.toml");
    let mut text = fs::read_to_string(&policy).expect("wrapper.toml");
    text.push_str(&format!(
        "\n[peer.mx1]\nallow_users = [\"{}\"]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\n\
         mail_location = \"maildir:~/Maildir\"\n",
        walk.user
    ));
    fs::write(&policy, text).expect("edit wrapper.toml");
    bw.ok(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@mx1", "-f", "/etc/mailreplica/id_ed25519"]);
    let host_key = fs::read_to_string(bw.path("/etc/ssh/ssh_host_ed25519_key.pub")).expect("the root's host key");
    fs::write(bw.path("/etc/mailreplica/known_hosts"), format!("[127.0.0.1]:{port} {}", host_key.trim()) + "\n")
        .expect("known_hosts");
    let config = bw.path("/etc/mailreplica/mailreplica.toml");
    let text = fs::read_to_string(&config).expect("mailreplica.toml");
    let edited = text
        .replace("mail_location = \"maildir:~/Maildir\"", "mail_location = \"maildir:~/Source\"")
        .replace("# ssh_key = ", "ssh_key = ")
        .replace("# ssh_known_hosts = ", "ssh_known_hosts = ")
        .replace(
            "# destination = \"remoteprefix:root@replica.example.org\"",
            &format!("destination = \"remoteprefix:root@127.0.0.1:{port}\""),
        );
    assert_ne!(edited, text);
    fs::write(&config, edited).expect("edit mailreplica.toml");
    // 3. One authorized_keys line (and the sshd snippet from the examples).
    let client_pub = fs::read_to_string(bw.path("/etc/mailreplica/id_ed25519.pub")).expect("pub");
    fs::create_dir_all(bw.path("/root/.ssh")).expect(".ssh");
    fs::set_permissions(bw.path("/root/.ssh"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::write(
        bw.path("/root/.ssh/authorized_keys"),
        format!("restrict,command=\"/usr/sbin/mailreplica-wrapper --peer mx1\" {}", client_pub.trim()) + "\n",
    )
    .expect("authorized_keys");
    bw.ok(&[
        "cp",
        "/usr/share/doc/mailreplica/examples/sshd_config.mailreplica-wrapper.conf",
        "/etc/ssh/sshd_config.d/mailreplica-wrapper.conf",
    ]);
    // The root's own sshd, on a free port of this host's loopback.
    fs::create_dir_all(bw.path("/run/sshd")).expect("/run/sshd");
    let log = bw.debs.join("sshd.log");
    let logf = fs::File::create(&log).expect("sshd log");
    let port_s = port.to_string();
    walk.sshd = Some(
        bw.command(&["/usr/sbin/sshd", "-D", "-e", "-p", &port_s, "-o", "ListenAddress=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("start sshd in the root"),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&log).unwrap_or_default().contains("Server listening") {
        assert!(Instant::now() < until, "sshd did not start: {}", fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }

    // 4. doctor confirms it.
    let out = bw.run(&["mailreplica", "doctor", "--sample-user", walk.user]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "doctor:\n{said}");
    assert!(said.contains("all checks hold") && said.contains("peer mx1"), "{said}");

    // 5. Replicate the user through sshd and the wrapper.
    let dest = format!("remoteprefix:root@127.0.0.1:{port}");
    bw.ok(&["mailreplica", "-u", walk.user, "backup", &dest]);
    let list = |loc: &str| {
        bw.ok(&[
            "mailreplica",
            "-u",
            walk.user,
            "-o",
            &format!("mail_location=maildir:~/{loc}"),
            "-f",
            "tab",
            "fetch",
            "guid flags",
            "all",
        ])
    };
    let (source, replica) = (list("Source"), list("Maildir"));
    assert_eq!(source.lines().count(), 4, "a header and three mails: {source}");
    assert_eq!(replica, source, "the replica equals the source");
    let auth = fs::read_to_string(bw.path("/var/log/mailreplica-wrapper.log")).unwrap_or_default();
    assert!(auth.contains("peer=mx1") || auth.contains("mx1"), "the wrapper logged the session: {auth}");
}
