//! `mailreplica relay USER DESTINATION [dsync-server]` (hidden): one user's dsync stream
//! between stdin/stdout and a `remote:`/`remoteprefix:` destination, over the embedded SSH
//! client.
//!
//! ```text
//!   mailreplica replicator
//!     └ doveadm sync -u USER -s STATE  mailreplica -c CONF relay USER remoteprefix:root@replica
//!         (an sdbox/mdbox user: Dovecot reads the mail, runs the master, and spawns the relay
//!          as root before it drops to USER, as it spawns its ssh)
//!         └ relay: root's key and our known_hosts ─► sshd ─► mailreplica-wrapper
//! ```
//!
//! So a delegated sync reaches the replica exactly as an in-process one does: same key, same
//! strict host key check, same `USER` line. The relay opens nothing a mail user controls (the
//! configuration, root's key and known_hosts only) and never touches mail.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::anyhow;
use mailreplica::config::Config;
use mailreplica::replicator::protocol::valid_user;
use mailreplica::transport::ssh::{self, SshChannel, SshConnection};

use super::sync::remote_settings;
use super::{Failure, exit};

/// Relays stdin/stdout to `destination` for `user` until both directions end, then exits as
/// the remote command did.
pub(crate) fn relay(config: &Config, user: &str, destination: &[String], timeout: u64) -> Result<(), Failure> {
    // doveadm appends `dsync-server` to a command destination.
    let words = match destination.split_last() {
        Some((last, rest)) if last == "dsync-server" => rest,
        _ => destination,
    };
    if !valid_user(user) {
        return Err(Failure::new(exit::USAGE, anyhow!("relay: {user:?} is not a user name")));
    }
    let Some(r) = remote_settings(config, words, false, timeout)? else {
        return Err(Failure::new(exit::USAGE, anyhow!("relay is for remote: and remoteprefix: destinations")));
    };
    let mut conn = SshConnection::connect(&r.settings)?;
    let label = conn.label().to_owned();
    let command = ssh::remote_command(&config.ssh.dsync_remote_cmd, user, &r.login, &r.host);
    let SshChannel { mut reader, mut writer, end } = conn.exec(&command)?;
    let io = |e: std::io::Error| Failure::new(exit::TEMPFAIL, anyhow!("relaying to {label}: {e}"));
    if r.prefix {
        writer.write_all(format!("{user}\n").as_bytes()).map_err(io)?;
    }
    // Up: our stdin to the channel, then EOF. Not joined: once the remote has finished, a
    // master that still holds its end open must not keep this process alive.
    std::thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).and_then(|()| writer.flush()).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = writer.close();
        })
        .map_err(io)?;
    // Down: the channel to our stdout, flushed as it comes (the master waits for replies).
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = reader.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()).map_err(io)?;
    }
    let end = end.wait(Duration::from_secs(timeout.clamp(1, 60)));
    conn.close();
    let Some(end) = end else { return Ok(()) };
    let stderr = if end.stderr_tail.is_empty() { String::new() } else { format!(": {}", end.stderr_tail) };
    if end.success() || end.exit_status.is_none() && end.exit_signal.is_none() && end.closed {
        Ok(())
    } else if end.exit_status == Some(126) {
        Err(Failure::new(
            exit::NOPERM,
            anyhow!("{label}: the replica refused user {user} (remote exit status 126){stderr}"),
        ))
    } else {
        let code = if end.exec_refused { exit::NOPERM } else { exit::TEMPFAIL };
        Err(Failure::new(code, anyhow!("{command:?} on {label} ended with {}{stderr}", end.describe())))
    }
}
