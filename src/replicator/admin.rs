//! The admin socket: Dovecot 2.3's `replicator-doveadm` protocol, so that `doveadm replicator
//! status|dsync-status|replicate|add|remove` (with `-a PATH`) keep working, and so that our own
//! `mailreplica replicate` and `mailreplica replicator status` talk to the service the same
//! way. The socket is root's (mode 0600 by default): whoever can write to it can make the
//! replicator sync or forget any user.

use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use super::feeds::{Line, read_line, serve_connections};
use super::protocol::{
    DOVEADM_CLIENT_HANDSHAKE, DOVEADM_SERVER_HANDSHAKE, MAX_NOTIFY_LINE, Request, is_mask, parse_request,
};
use super::queue::Priority;
use super::service::{Service, now};
use crate::tabescape::escape;
use crate::userdb::wildcard_match;

const IDLE: Duration = Duration::from_secs(300);

/// Accepts admin connections for ever, each in a thread of its own.
pub fn serve(listener: UnixListener, service: Arc<Service>) {
    serve_connections(listener, "replicator-doveadm", service, connection);
}

fn connection(conn: UnixStream, service: &Service) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    let mut out = BufWriter::with_capacity(64 * 1024, conn.try_clone()?);
    let mut r = BufReader::new(conn);
    let mut buf = Vec::new();
    match read_line(&mut r, 256, &mut buf)? {
        Line::Text(h) if handshake_ok(&h) => {}
        // A probe (`systemctl status`-like checks connect and leave).
        Line::Eof => return Ok(()),
        _ => {
            tracing::warn!("replicator-doveadm: a client without the handshake was closed");
            return Ok(());
        }
    }
    out.write_all(format!("{DOVEADM_SERVER_HANDSHAKE}\n").as_bytes())?;
    out.flush()?;
    loop {
        let line = match read_line(&mut r, MAX_NOTIFY_LINE, &mut buf)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                tracing::warn!("replicator-doveadm: overlong line; connection closed");
                return Ok(());
            }
            Line::Text(l) => l,
        };
        match parse_request(&line) {
            Ok(req) => answer(service, req, &mut out)?,
            Err(e) => {
                // As Dovecot: an unknown command closes the connection (after saying why).
                tracing::warn!("replicator-doveadm: {e}");
                out.write_all(format!("-{e}\n").as_bytes())?;
                out.flush()?;
                return Ok(());
            }
        }
    }
}

/// `VERSION TAB replicator-doveadm-client TAB 1 TAB <minor>`.
fn handshake_ok(line: &str) -> bool {
    let base = DOVEADM_CLIENT_HANDSHAKE.rsplit_once('\t').map_or(DOVEADM_CLIENT_HANDSHAKE, |(b, _)| b);
    line.rsplit_once('\t').is_some_and(|(b, minor)| b == base && minor.parse::<u32>().is_ok())
}

/// The reply to one request, in Dovecot's form.
fn answer(service: &Service, req: Request, out: &mut impl Write) -> io::Result<()> {
    let short: String = match req {
        Request::Status(None) => {
            let o = service.overview();
            format!(
                "Queued 'sync' requests\t{}\nQueued 'high' requests\t{}\nQueued 'low' requests\t{}\n\
                 Queued 'failed' requests\t{}\nQueued 'full resync' requests\t{}\n\
                 Waiting 'failed' requests\t{}\nTotal number of known users\t{}\n\n",
                o.queued[0], o.queued[1], o.queued[2], o.queued_failed, o.queued_full, o.waiting_failed, o.users
            )
        }
        Request::Status(Some(mask)) => {
            let t = now();
            for u in service.users(&mask) {
                let r = &u.record;
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    escape(&r.user),
                    r.priority.name(),
                    r.last_fast_sync,
                    r.last_full_sync,
                    u8::from(r.failures > 0),
                    r.last_success,
                    u.next_due.saturating_sub(t)
                )?;
            }
            "\n".into()
        }
        Request::StatusDetail(mask) => {
            // Ours: every field, for `mailreplica replicator status`.
            for u in service.users(&mask) {
                let r = &u.record;
                let (err_at, err) = u.last_error.map_or((0, String::new()), |(t, e)| (t, e));
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    escape(&r.user),
                    r.priority.name(),
                    u8::from(u.running),
                    r.last_update,
                    r.last_fast_sync,
                    r.last_full_sync,
                    r.last_success,
                    r.failures,
                    u8::from(u.has_state),
                    u8::from(r.force_full),
                    u.next_due,
                    err_at,
                    escape(&err)
                )?;
            }
            "\n".into()
        }
        Request::StatusDsync => {
            for r in service.running() {
                writeln!(out, "{}\t{}\tWaiting for dsync to finish", escape(&r.user), r.kind)?;
            }
            "\n".into()
        }
        Request::Replicate { priority, full, mask } => {
            let users = if is_mask(&mask) { service.known_matching(&mask) } else { vec![mask] };
            format!("+{}\n", service.replicate(&users, priority, full))
        }
        Request::Add(mask) => {
            if is_mask(&mask) {
                match service.directory().list() {
                    Ok(all) => {
                        let matching: Vec<&String> = all.iter().filter(|u| wildcard_match(&mask, u)).collect();
                        service.replicate(&matching, Priority::None, false);
                        "+\n".into()
                    }
                    Err(e) => format!("-{}\n", e.replace('\n', " ")),
                }
            } else if service.add(&mask) {
                "+\n".into()
            } else {
                "-User not allowed\n".into()
            }
        }
        Request::Remove(user) => {
            if service.remove(&user) {
                "+\n".into()
            } else {
                "-User not found\n".into()
            }
        }
        Request::Notify { user, full, state: _ } => {
            service.synced_elsewhere(&user, full);
            "+\n".into()
        }
    };
    out.write_all(short.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes() {
        assert!(handshake_ok("VERSION\treplicator-doveadm-client\t1\t0"));
        assert!(handshake_ok("VERSION\treplicator-doveadm-client\t1\t3"));
        assert!(!handshake_ok("VERSION\treplicator-doveadm-client\t2\t0"));
        assert!(!handshake_ok("VERSION\treplicator-notify\t1\t0"));
        assert!(!handshake_ok("STATUS"));
    }
}
