//! `deploy/`: the install script installs a root-owned 0755 binary and rejects a policy that
//! others could change or the wrapper cannot parse; the example policy, the sshd snippet and
//! the sending side's Dovecot snippet are valid as shipped.

mod wrapper_common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use wrapper_common::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn install(sb: &Sandbox, policy: &Path) -> Output {
    Command::new("bash")
        .arg(deploy("install-wrapper.sh"))
        .args(["--binary", WRAPPER, "--bindir"])
        .arg(sb.dir.join("sbin"))
        .arg("--policy")
        .arg(policy)
        .arg("--auth-log")
        .arg(sb.auth_log())
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .output()
        .expect("run install-wrapper.sh")
}

#[test]
fn install_script_installs_and_checks_the_policy() {
    let sb = Sandbox::new();
    let sbin = sb.dir.join("sbin");
    fs::create_dir(&sbin).expect("mkdir");
    fs::set_permissions(&sbin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let etc = sb.dir.join("etc");
    fs::create_dir(&etc).expect("mkdir");
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).expect("chmod");
    let policy = etc.join("wrapper.toml");
    fs::copy(deploy("wrapper.toml.example"), &policy).expect("copy example");
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o644)).expect("chmod");

    let out = install(&sb, &policy);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("accepted by the wrapper"), "{text}");
    let m = fs::metadata(sbin.join("mailreplica-wrapper")).expect("installed");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));

    fs::set_permissions(&policy, fs::Permissions::from_mode(0o664)).expect("chmod");
    let out = install(&sb, &policy);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by group or others"));

    fs::set_permissions(&policy, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(!install(&sb, &policy).status.success());
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).expect("chmod");

    fs::write(&policy, "[peer.mx1]\nallow_users = [\"a\"]\nmail_locaton = \"maildir:~/M\"\n").expect("typo");
    let out = install(&sb, &policy);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy-invalid"), "{out:?}");
}

#[test]
fn sshd_snippet_is_valid() {
    let sb = Sandbox::new();
    let keys = SshKeys::new(&sb, 0);
    let cfg = sb.dir.join("sshd_config");
    let snippet = fs::read_to_string(deploy("sshd_config.mailreplica-wrapper.conf")).expect("snippet");
    fs::write(&cfg, format!("HostKey {}\nPidFile none\nUsePAM no\n{snippet}", keys.host.display())).expect("write");
    if !Path::new("/run/sshd").exists() {
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
    }
    let out =
        Command::new("/usr/sbin/sshd").arg("-t").arg("-f").arg(&cfg).stdin(Stdio::null()).output().expect("sshd -t");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The effective settings for root, as sshd computes them.
    let out = Command::new("/usr/sbin/sshd")
        .args(["-T", "-C", "user=root,host=peer,addr=192.0.2.1", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("sshd -T");
    let eff = String::from_utf8_lossy(&out.stdout);
    for want in
        ["permitrootlogin forced-commands-only", "permituserenvironment no", "permittty no", "disableforwarding yes"]
    {
        assert!(eff.lines().any(|l| l == want), "{want} missing:\n{eff}");
    }
}

/// The sending side's snippet is valid Dovecot configuration as shipped (the e2e test runs its
/// `dsync_remote_cmd` for real, pointed at the test's key and port).
#[test]
fn sender_snippet_is_valid_dovecot_config() {
    require_dovecot();
    let sb = Sandbox::new();
    let conf = sb.dir.join("dovecot.conf");
    let snippet = fs::read_to_string(deploy("dovecot-sender.conf.example")).expect("snippet");
    fs::write(&conf, format!("ssl = no\nprotocols =\n{snippet}")).expect("write");
    let out = Command::new("doveconf")
        .arg("-c")
        .arg(&conf)
        .args(["-h", "dsync_remote_cmd"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .output()
        .expect("doveconf");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value = String::from_utf8_lossy(&out.stdout);
    assert!(value.starts_with("ssh -i /root/.ssh/mailreplica_ed25519 "), "{value}");
    assert!(value.trim_end().ends_with("-l%{login} %{host} doveadm dsync-server -u%u -U"), "{value}");
}
