//! The Debian package, as an admin meets it: built by `packaging/build-deb.sh`, checked by
//! lintian, installed with `apt install ./mailreplica_*.deb` into a clean Debian 12 root,
//! upgraded over an older build with an edited conffile, then removed and purged.
//!
//! Needs root, debootstrap's Debian 12 root (`tests/lab/debian-root.sh bookworm DIR man-db`,
//! which `tests/run` makes) and lintian; the release binaries built first (`tests/run` builds
//! the workspace before it tests). The root is entered per command with `unshare --mount` +
//! `chroot`, and left as it was found: the package is purged even when the test fails.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
            root.join("usr/bin/man").exists(),
            "no Debian 12 root with man-db at {r}: make it with `tests/lab/debian-root.sh bookworm {r} man-db` \
             (tests/run does)",
            r = root.display()
        );
        let debs = root.join(format!("tmp/mailreplica-package-test-{}", std::process::id()));
        fs::create_dir_all(&debs).expect("a directory for the packages in the root");
        let me = Self { root, debs };
        // A leftover of an earlier, killed run would make this one meaningless.
        me.purge();
        me
    }

    /// Runs `args` inside the root, with a clean environment.
    fn run(&self, args: &[&str]) -> Output {
        let script = "r=$1; shift; mount --rbind /dev \"$r/dev\" && mount -t proc proc \"$r/proc\" \
                      && exec chroot \"$r\" \"$@\"";
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&self.root)
            .args(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C"])
            .args(args)
            .output()
            .expect("run a command in the root")
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

    fn purge(&self) {
        let _ = self.run(&["dpkg", "--purge", "mailreplica"]);
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Every path in the root but what dpkg, apt, man-db and the kernel keep for themselves.
    fn files(&self) -> BTreeSet<String> {
        let skip = ["proc", "dev", "sys", "tmp", "var/lib/dpkg", "var/log", "var/cache", "run"];
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
