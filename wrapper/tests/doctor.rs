//! `mailreplica doctor` on a whole deployment built here (a sandboxed policy, a root key
//! forcing the wrapper, a real sshd configuration, the sending side's key and known_hosts):
//! it confirms the good setup, then names each fault an admin makes, one at a time.

mod wrapper_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use wrapper_common::*;

struct Setup {
    config: PathBuf,
    policy: PathBuf,
    authorized_keys: PathBuf,
    sshd_config: PathBuf,
    user: String,
}

impl Setup {
    /// `mailreplica doctor` with the setup's files; its exit code and what it printed.
    fn doctor(&self, sample_user: &str) -> (Option<i32>, String) {
        let out = Command::new(mailreplica_bin())
            .arg("-c")
            .arg(&self.config)
            .args(["doctor", "--sample-user", sample_user, "--policy"])
            .arg(&self.policy)
            .arg("--authorized-keys")
            .arg(&self.authorized_keys)
            .arg("--sshd-config")
            .arg(&self.sshd_config)
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .expect("mailreplica doctor");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    #[track_caller]
    fn fails_with(&self, what: &str, needle: &str) {
        let (code, text) = self.doctor(&self.user);
        assert_eq!(code, Some(78), "{what}: doctor must fail:\n{text}");
        assert!(text.contains(needle), "{what}: expected {needle:?} in:\n{text}");
        assert!(text.contains("1 problem found"), "{what}: exactly one problem:\n{text}");
    }
}

/// Changes `path`'s text for the length of `f`.
fn with_text(path: &Path, text: &str, f: impl FnOnce()) {
    let old = fs::read_to_string(path).expect("read");
    fs::write(path, text).expect("write");
    f();
    fs::write(path, old).expect("restore");
}

fn with_mode(path: &Path, mode: u32, f: impl FnOnce()) {
    let old = fs::metadata(path).expect("stat").permissions();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    f();
    fs::set_permissions(path, old).expect("restore");
}

#[test]
fn doctor_confirms_a_deployment_and_names_each_fault() {
    require_root();
    let sb = Sandbox::new();
    let user = TestUser::new(&sb);
    sb.write_policy(&format!(
        "[peer.mx1]\nallow_users = [\"{}\"]\nfirst_valid_uid = 1000\nlast_valid_uid = 60000\n\
         mail_location = \"maildir:~/Maildir\"\n",
        user.name
    ));
    // The wrapper where an admin installs it: root's, 0755.
    let sbin = sb.dir.join("sbin");
    fs::create_dir(&sbin).expect("sbin");
    let wrapper = sbin.join("mailreplica-wrapper");
    fs::copy(WRAPPER, &wrapper).expect("install the wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let keys = SshKeys::new(&sb, 1);
    let line = |options: &str, peer: &str| {
        format!(
            "{options}command=\"{} --peer {peer} --policy {}\" {}\n",
            wrapper.display(),
            sb.policy().display(),
            keys.client_pub(0)
        )
    };
    let sshd = Sshd::start(&keys, "doc", &line("restrict,", "mx1"), "");
    let state = sb.dir.join("state");
    fs::create_dir(&state).expect("state dir");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).expect("chmod");
    let config = sb.dir.join("mailreplica.toml");
    fs::write(
        &config,
        format!(
            "first_valid_uid = 1000\nssh_key = \"{}\"\nssh_known_hosts = \"{}\"\n\n[replicator]\n\
             destination = \"remoteprefix:root@127.0.0.1:{}\"\nstate_dir = \"{}\"\n",
            keys.clients[0].display(),
            sshd.known_hosts.display(),
            sshd.port,
            state.display()
        ),
    )
    .expect("mailreplica.toml");
    let s = Setup {
        config,
        policy: sb.policy(),
        authorized_keys: keys.dir.join("authorized_keys_doc"),
        sshd_config: keys.dir.join("sshd_config_doc"),
        user: user.name.clone(),
    };

    let (code, text) = s.doctor(&s.user);
    assert_eq!(code, Some(0), "a good deployment:\n{text}");
    assert!(text.contains("all checks hold") && text.contains("peer mx1"), "{text}");
    assert!(text.contains("forced-commands-only") && text.contains("names 127.0.0.1"), "{text}");

    // Each fault alone.
    with_mode(&s.policy, 0o666, || s.fails_with("a policy others can change", "group or others can change it"));
    with_text(&s.authorized_keys, &line("", "mx1"), || s.fails_with("a key without restrict", "no `restrict`"));
    with_text(&s.authorized_keys, &line("restrict,", "mx2"), || {
        s.fails_with("a peer the policy doesn't name", "peer mx2 has no [peer.mx2]")
    });
    let sshd_text = fs::read_to_string(&s.sshd_config).expect("sshd_config");
    with_text(&s.sshd_config, &format!("PermitRootLogin no\n{sshd_text}"), || {
        s.fails_with("root may not log in", "PermitRootLogin no")
    });
    with_mode(&keys.clients[0], 0o644, || s.fails_with("a key others can read", "SSH key"));
    with_text(&sshd.known_hosts, "", || s.fails_with("no known_hosts entry", "has no key for 127.0.0.1"));
    with_mode(&state, 0o777, || s.fails_with("a state_dir open to all", "state_dir"));
    let (code, text) = s.doctor("no-such-user-here");
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("user no-such-user-here: user no-such-user-here doesn't exist"), "{text}");
    // And everything holds again.
    assert_eq!(s.doctor(&s.user).0, Some(0));
}
