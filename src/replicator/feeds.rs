//! Change feeds from Dovecot 2.3's `replication` plugin, served in place of its aggregator:
//! the FIFO `replication-notify-fifo` (`USER TAB low|high`, no answer) and the socket
//! `replication-notify` (the same, plus `USER TAB sync`, answered `+`/`-` once the user's next
//! sync ended: what `replication_sync_timeout` waits for).
//!
//! Both are written by mail processes running as every mail user, so they are created mode
//! 0666 by default (Dovecot's documentation asks the same of its aggregator's). Anyone on the
//! host can therefore ask for a user's sync; that costs a sync, never data, and a burst
//! coalesces. A `sync` request on the socket is only honoured from root or from the uid that
//! owns the user's mail (its peer credentials say who wrote it), since it holds a connection
//! and a waiter.
//!
//! Every line is bounded ([`MAX_LINE`]); an overlong line is skipped to its end.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::protocol::{MAX_LINE, parse_notification};
use super::queue::Priority;
use super::service::Service;

/// Most connections served at once on one socket; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// A connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(60);
/// The longest a `sync` request waits for its answer (the plugin gives up sooner: its own
/// `replication_sync_timeout`).
const SYNC_WAIT: Duration = Duration::from_secs(600);

/// A line, or what came instead.
pub(crate) enum Line {
    /// A complete line (without its LF), as UTF-8 (invalid bytes replaced).
    Text(String),
    /// A line longer than the limit (skipped to its end).
    TooLong,
    /// End of input.
    Eof,
}

/// Reads one LF-terminated line of at most `max` bytes; a longer one is read to its end and
/// dropped. A last line without LF counts as a line.
pub(crate) fn read_line(r: &mut impl BufRead, max: usize, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::Eof
            } else {
                Line::Text(String::from_utf8_lossy(buf).into_owned())
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Text(String::from_utf8_lossy(buf).into_owned()) });
        }
    }
}

/// Makes a FIFO at `path` with `mode` (a FIFO already there is reused; any other file there
/// is an error, not removed).
pub fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a FIFO (not removed)"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(io::Error::from)?;
        }
        Err(e) => return Err(e),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Listens on a Unix socket at `path` with `mode`: a stale socket there (nobody answers on
/// it) is replaced; one that answers means another replicator runs, an error; any other file
/// there is an error, not removed.
pub fn bind_socket(path: &Path, mode: u32) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening on it"));
            }
            fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket (not removed)"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Reads the FIFO at `path` for ever (a thread of its own). It is opened read-write, so the
/// last writer closing it is not an end.
pub fn serve_fifo(path: &Path, service: &Arc<Service>) -> io::Result<()> {
    let f = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
    let mut r = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut r, MAX_LINE, &mut buf)? {
            Line::Eof => return Ok(()),
            Line::TooLong => tracing::warn!("{}: overlong line skipped", path.display()),
            Line::Text(line) => match parse_notification(&line) {
                // Nobody waits on a FIFO: a sync request there is a high one.
                Ok((user, p)) => {
                    service.notify(&user, p.min(Priority::High));
                }
                Err(e) => tracing::warn!("{}: {e}: {line:?}", path.display()),
            },
        }
    }
}

/// Accepts connections on the plugin's socket for ever.
pub fn serve_notify_socket(listener: UnixListener, service: Arc<Service>) {
    serve_connections(listener, "replication-notify", service, notify_connection);
}

/// Accepts connections on `listener` for ever, each served by `handle` in a thread of its own,
/// at most [`MAX_CONNECTIONS`] at once (more are closed at once).
pub(crate) fn serve_connections(
    listener: UnixListener,
    what: &'static str,
    service: Arc<Service>,
    handle: fn(UnixStream, &Service) -> io::Result<()>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("{what}: too many connections, one refused");
            continue;
        }
        let (service, live2) = (Arc::clone(&service), Arc::clone(&live));
        let spawned = std::thread::Builder::new().name(what.into()).spawn(move || {
            if let Err(e) = handle(conn, &service) {
                tracing::debug!("{what} connection: {e}");
            }
            live2.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The uid of the process at the other end of `conn`.
pub(crate) fn peer_uid(conn: &UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.uid())
}

fn notify_connection(conn: UnixStream, service: &Service) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    let uid = peer_uid(&conn);
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut buf = Vec::new();
    loop {
        let line = match read_line(&mut r, MAX_LINE, &mut buf)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                tracing::warn!("replication-notify: overlong line skipped");
                continue;
            }
            Line::Text(l) => l,
        };
        let (user, priority) = match parse_notification(&line) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("replication-notify: {e}: {line:?}");
                return Ok(());
            }
        };
        if priority != Priority::Sync {
            service.notify(&user, priority);
            continue;
        }
        let may = uid == Some(0) || (uid.is_some() && uid == service.directory().uid_of(&user));
        let ok = if may {
            service.notify_sync(&user).recv_timeout(SYNC_WAIT).unwrap_or(false)
        } else {
            tracing::warn!("replication-notify: uid {uid:?} may not wait for {user:?}'s sync; queued as high");
            service.notify(&user, Priority::High);
            false
        };
        out.write_all(if ok { b"+\n" } else { b"-\n" })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut r = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, max, &mut buf).unwrap() {
                Line::Eof => return out,
                Line::TooLong => out.push("<too long>".into()),
                Line::Text(t) => out.push(t),
            }
        }
    }

    #[test]
    fn lines_are_bounded_and_an_overlong_one_is_skipped_whole() {
        assert_eq!(lines(b"alice\thigh\nbob\tlow\n", 16), ["alice\thigh", "bob\tlow"]);
        assert_eq!(lines(b"0123456789abcdefXYZ\nok\n", 16), ["<too long>", "ok"]);
        assert_eq!(lines(b"last", 16), ["last"]);
        assert_eq!(lines(b"\n\n", 16), ["", ""]);
        assert_eq!(lines(b"0123456789abcdefXYZ", 16), ["<too long>"]);
    }

    #[test]
    fn a_socket_file_in_use_is_not_taken_over_and_other_files_are_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let l = bind_socket(&p, 0o600).unwrap();
        assert_eq!(bind_socket(&p, 0o600).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(l);
        bind_socket(&p, 0o600).expect("a stale socket is replaced");
        let f = dir.path().join("plain");
        fs::write(&f, "keep").unwrap();
        assert!(bind_socket(&f, 0o600).is_err());
        assert!(make_fifo(&f, 0o666).is_err());
        assert_eq!(fs::read_to_string(&f).unwrap(), "keep");
        let fifo = dir.path().join("fifo");
        make_fifo(&fifo, 0o666).unwrap();
        make_fifo(&fifo, 0o622).expect("reused");
        assert_eq!(fs::metadata(&fifo).unwrap().permissions().mode() & 0o777, 0o622);
    }
}
