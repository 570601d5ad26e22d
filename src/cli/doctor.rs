//! `mailreplica doctor`: checks what a deployment needs on this host and says in plain words
//! what is wrong. Exit 0 only when every check holds.
//!
//! ```text
//!   sending side (a [replicator] destination, or --destination):
//!     the configuration loads · the SSH key loads (mode, format, passphrase) · known_hosts
//!     names the replica · state_dir is root's and not open to others · --user: the user's
//!     mail location resolves
//!   receiving side (the policy file exists, or --policy):
//!     the policy is root's and nobody else can change it (nor its directories) · each
//!     authorized_keys line forcing mailreplica-wrapper: `restrict`, an absolute path to a
//!     root-owned wrapper, `--peer NAME` with a [peer.NAME] table · sshd -T: PermitRootLogin
//!     lets that key in
//! ```
//!
//! Read-only: nothing is created, changed or connected to.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::anyhow;
use clap::Args;
use mailreplica::config::Config;
use mailreplica::transport::keys;
use mailreplica::transport::known_hosts::KnownHosts;

use super::sync::remote_settings;
use super::{Failure, error_text, exit};

/// `doctor` options.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Check the sending side for this destination (default: [replicator] destination).
    #[arg(long, value_name = "DEST")]
    destination: Option<String>,
    /// A sample user whose mail location must resolve.
    #[arg(long = "sample-user", value_name = "USER")]
    sample_user: Option<String>,
    /// The wrapper's policy (receiving side).
    #[arg(long, value_name = "FILE", default_value = "/etc/mailreplica/wrapper.toml")]
    policy: PathBuf,
    /// root's authorized_keys (receiving side).
    #[arg(long = "authorized-keys", value_name = "FILE", default_value = "/root/.ssh/authorized_keys")]
    authorized_keys: PathBuf,
    /// sshd's configuration (receiving side), as `sshd -T -f FILE` reads it.
    #[arg(long = "sshd-config", value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
    sshd_config: PathBuf,
}

/// The checks' findings.
#[derive(Default)]
struct Report {
    text: String,
    problems: usize,
}

impl Report {
    fn ok(&mut self, what: impl AsRef<str>) {
        let _ = writeln!(self.text, "  ok    {}", what.as_ref());
    }
    fn bad(&mut self, what: impl AsRef<str>) {
        self.problems += 1;
        let _ = writeln!(self.text, "  FAIL  {}", what.as_ref());
    }
    fn note(&mut self, what: impl AsRef<str>) {
        let _ = writeln!(self.text, "  note  {}", what.as_ref());
    }
    fn section(&mut self, title: &str) {
        let _ = writeln!(self.text, "{title}");
    }
}

/// `mode` as `0644`.
fn octal(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// A root-owned file (or directory) nobody else can change, in directories nobody else can
/// change, up to `/`: what a root process may trust.
fn root_controlled(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.uid() != 0 {
        return Err(format!("{} is owned by uid {}, not root", path.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} has mode {}: group or others can change it", path.display(), octal(meta.mode())));
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        let m = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let sticky = m.mode() & 0o1000 != 0;
        if m.uid() != 0 || (m.mode() & 0o022 != 0 && !sticky) {
            return Err(format!(
                "its directory {} (uid {}, mode {}) can be changed by someone else than root",
                d.display(),
                m.uid(),
                octal(m.mode())
            ));
        }
        dir = d.parent();
    }
    Ok(format!("root:{} {}", meta.gid(), octal(meta.mode())))
}

pub(crate) fn doctor(config_path: Option<&Path>, overrides: &[String], a: &DoctorArgs) -> Result<(), Failure> {
    let mut r = Report::default();
    let config_file = config_path.map_or_else(|| PathBuf::from(mailreplica::config::DEFAULT_PATH), Path::to_path_buf);
    let config = Config::load(config_path, overrides);
    let destination =
        a.destination.clone().or_else(|| config.as_ref().ok().and_then(|c| c.replicator.destination.clone()));
    let sender = destination.is_some() || config_path.is_some() || a.sample_user.is_some();
    let replica = a.policy.exists() || a.authorized_keys.exists();
    if !sender && !replica {
        r.bad(format!(
            "nothing to check: no [replicator] destination in {} (or --destination), and no policy {}",
            config_file.display(),
            a.policy.display()
        ));
    }
    if sender {
        r.section("sending side");
        match &config {
            Ok(c) => {
                r.ok(format!("configuration {} loads", config_file.display()));
                sending(&mut r, c, destination.as_deref(), a);
            }
            Err(e) => r.bad(format!("configuration {}: {e}", config_file.display())),
        }
    }
    if replica {
        r.section("receiving side");
        receiving(&mut r, a);
    }
    eprint!("{}", r.text);
    if r.problems == 0 {
        eprintln!("all checks hold");
        Ok(())
    } else {
        let s = if r.problems == 1 { "" } else { "s" };
        Err(Failure::new(exit::CONFIG, anyhow!("{} problem{s} found", r.problems)))
    }
}

fn sending(r: &mut Report, config: &Config, destination: Option<&str>, a: &DoctorArgs) {
    if let Some(dest) = destination {
        let words: Vec<String> = dest.split_whitespace().map(str::to_owned).collect();
        match remote_settings(config, &words, false, 60) {
            Ok(Some(rs)) => {
                let s = &rs.settings;
                let passphrase = match &s.passphrase_file {
                    Some(p) => match keys::read_passphrase(p) {
                        Ok(pp) => Some(pp),
                        Err(e) => {
                            r.bad(format!("ssh_key_passphrase_file: {e}"));
                            None
                        }
                    },
                    None => None,
                };
                let candidates: Vec<PathBuf> = match &s.key_file {
                    Some(k) => vec![k.clone()],
                    None => ["id_ed25519", "id_rsa"].iter().map(|n| s.ssh_dir.join(n)).filter(|p| p.exists()).collect(),
                };
                if candidates.is_empty() {
                    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
                        r.note("no key file: ssh-agent's keys will be offered");
                    } else {
                        r.bad(format!("no SSH key: set ssh_key, or create {}/id_ed25519", s.ssh_dir.display()));
                    }
                }
                for k in candidates {
                    match keys::load_private_key(&k, passphrase.as_ref()) {
                        Ok(_) => r.ok(format!("SSH key {} loads (mode and format)", k.display())),
                        Err(e) => r.bad(format!("SSH key: {e}")),
                    }
                }
                match KnownHosts::load(&s.known_hosts) {
                    Ok(kh) if !kh.known_algorithms(&s.host, s.port).is_empty() => {
                        r.ok(format!("{} names {}:{}", s.known_hosts.display(), s.host, s.port));
                    }
                    Ok(_) => r.bad(format!(
                        "{} has no key for {}:{}: add the replica's host key (ssh-keyscan -p {} {}, checked by hand), \
                         or connect once with --accept-new-host-key",
                        s.known_hosts.display(),
                        s.host,
                        s.port,
                        s.port,
                        s.host
                    )),
                    Err(e) => r.bad(format!("known_hosts {}: {e}", s.known_hosts.display())),
                }
            }
            Ok(None) => r.ok(format!("destination {dest} needs no SSH")),
            Err(f) => r.bad(format!("destination {dest}: {}", error_text(&f.error))),
        }
    }
    let state = &config.replicator.state_dir;
    match std::fs::metadata(state) {
        Ok(m) if m.uid() == 0 && m.mode() & 0o022 == 0 => {
            r.ok(format!("state_dir {} is root's ({})", state.display(), octal(m.mode())));
        }
        Ok(m) => r.bad(format!(
            "state_dir {} is uid {} mode {}: make it root's and not writable by others",
            state.display(),
            m.uid(),
            octal(m.mode())
        )),
        Err(_) if state.parent().is_some_and(Path::is_dir) => {
            r.note(format!("state_dir {} does not exist yet; the replicator makes it", state.display()));
        }
        Err(e) => r.bad(format!("state_dir {}: {e}", state.display())),
    }
    if let Some(user) = &a.sample_user {
        match super::allowed_user(config, user) {
            Err(f) => r.bad(format!("user {user}: {}", error_text(&f.error))),
            Ok(entry) => {
                let location = super::user_location(config, &entry).map_err(|f| error_text(&f.error));
                let hostname = config.hostname.clone().unwrap_or_else(super::hostname);
                match location.and_then(|l| {
                    if let Some(d) = &l.foreign {
                        return Err(format!("{d}: synced through doveadm sync ([replicator] doveadm)"));
                    }
                    l.expand(&entry.name, &entry.home, &hostname, config.lock_wait()).map_err(|e| e.to_string())
                }) {
                    Ok(s) if s.root.is_dir() => r.ok(format!("user {user}: mail at {}", s.root.display())),
                    Ok(s) if s.root.parent().is_some_and(Path::is_dir) => {
                        r.note(format!(
                            "user {user}: {} does not exist yet (made at the first sync)",
                            s.root.display()
                        ));
                    }
                    Ok(s) => r.bad(format!("user {user}: neither {} nor its directory exists", s.root.display())),
                    Err(e) if e.contains("doveadm sync") => r.note(format!("user {user}: {e}")),
                    Err(e) => r.bad(format!("user {user}: mail_location: {e}")),
                }
            }
        }
    }
}

fn receiving(r: &mut Report, a: &DoctorArgs) {
    // The policy: root's, unchangeable by anyone else, and its peers.
    // (Its peers are read even when it is not trusted, so that one fault is one finding.)
    let trust = root_controlled(&a.policy);
    let parsed = std::fs::read_to_string(&a.policy)
        .map_err(|e| e.to_string())
        .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()));
    let peers: Vec<String> = parsed
        .as_ref()
        .ok()
        .and_then(|t| t.get("peer"))
        .and_then(|p| p.as_table())
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    match (trust, parsed) {
        (Err(e), _) => r.bad(format!("policy {}: {e} (the wrapper refuses every session)", a.policy.display())),
        (Ok(_), Err(e)) => r.bad(format!("policy {}: {e}", a.policy.display())),
        (Ok(how), Ok(_)) if peers.is_empty() => {
            r.bad(format!("policy {} ({how}) names no [peer.NAME]: every session is refused", a.policy.display()));
        }
        (Ok(how), Ok(_)) => r.ok(format!("policy {} ({how}), peers: {}", a.policy.display(), peers.join(", "))),
    }
    // authorized_keys: every line that forces the wrapper.
    match std::fs::read_to_string(&a.authorized_keys) {
        Err(e) => r.bad(format!("{}: {e}", a.authorized_keys.display())),
        Ok(text) => {
            let mut found = 0;
            for (i, line) in text.lines().enumerate() {
                let Some(at) = line.find("command=\"") else { continue };
                let rest = &line[at + 9..];
                let Some(end) = rest.find('"') else { continue };
                let command = &rest[..end];
                if !command.contains("mailreplica-wrapper") {
                    continue;
                }
                found += 1;
                let what = format!("{} line {}", a.authorized_keys.display(), i + 1);
                let options = &line[..at];
                if !options.split(',').any(|o| o.trim() == "restrict") && !line[at..].contains(",restrict") {
                    r.bad(format!("{what}: no `restrict` option (it keeps the key from forwarding and PTYs)"));
                }
                let words: Vec<&str> = command.split_whitespace().collect();
                let program = Path::new(words.first().copied().unwrap_or_default());
                if !program.is_absolute() {
                    r.bad(format!("{what}: the command {program:?} is not an absolute path"));
                } else {
                    match root_controlled(program) {
                        Ok(_) if std::fs::metadata(program).is_ok_and(|m| m.mode() & 0o111 != 0) => {}
                        Ok(_) => r.bad(format!("{what}: {} is not executable", program.display())),
                        Err(e) => r.bad(format!("{what}: {e}")),
                    }
                }
                match words.iter().position(|w| *w == "--peer").and_then(|p| words.get(p + 1)) {
                    None => r.bad(format!("{what}: no `--peer NAME`")),
                    Some(p) if !peers.iter().any(|x| x == p) => {
                        r.bad(format!("{what}: peer {p} has no [peer.{p}] table in {}", a.policy.display()));
                    }
                    Some(p) => r.ok(format!("{what}: restricted key forcing {} for peer {p}", program.display())),
                }
            }
            if found == 0 {
                r.bad(format!("{}: no key forces mailreplica-wrapper (command=\"…\")", a.authorized_keys.display()));
            }
        }
    }
    // sshd: does it let root in with that key?
    let out = Command::new("sshd")
        .arg("-T")
        .arg("-f")
        .arg(&a.sshd_config)
        .args(["-C", "user=root,host=localhost,addr=127.0.0.1"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output();
    match out {
        Err(e) => r.bad(format!("running sshd -T: {e}")),
        Ok(o) if !o.status.success() => {
            r.bad(format!("sshd -T -f {}: {}", a.sshd_config.display(), String::from_utf8_lossy(&o.stderr).trim()))
        }
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let value = text.lines().find_map(|l| l.strip_prefix("permitrootlogin ")).unwrap_or("?").trim().to_owned();
            match value.as_str() {
                "forced-commands-only" => r.ok("sshd: PermitRootLogin forced-commands-only"),
                "prohibit-password" | "without-password" => r.ok(format!(
                    "sshd: PermitRootLogin {value} (forced-commands-only would also refuse root keys without a command)"
                )),
                "yes" => r.bad("sshd: PermitRootLogin yes lets root log in with a password: use forced-commands-only"),
                other => {
                    r.bad(format!("sshd: PermitRootLogin {other}: root's key can't log in; use forced-commands-only"))
                }
            }
        }
    }
}
