//! The auth log: one line per attempt, to syslog (facility `authpriv`) through `/dev/log` when
//! a syslog daemon listens there, else to a root-only file.
//!
//! The destination is chosen by root only: `--auth-log PATH` in the `authorized_keys`
//! `command=` line, or the defaults. Never by the environment, which the peer may influence.
//!
//! Everything that came from the peer is written through [`escape`]: a CR or LF in a username
//! must not forge a second log line (rsync CVE-2026-53788).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::trust;

/// The syslog socket.
const DEV_LOG: &str = "/dev/log";
/// The file used when no syslog daemon listens on `/dev/log` (as in containers).
pub(crate) const DEFAULT_FILE: &str = "/var/log/mailreplica-wrapper.log";
/// syslog facility `authpriv` (10) shifted into a PRI value.
const LOG_AUTHPRIV: u8 = 10 << 3;

/// How serious a line is (syslog severities).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Severity {
    /// A refusal.
    Warning = 4,
    /// A session that was accepted.
    Notice = 5,
}

#[derive(Debug)]
enum Sink {
    Syslog(UnixDatagram),
    File(File),
}

/// An open auth log.
#[derive(Debug)]
pub(crate) struct AuthLog {
    sink: Sink,
}

impl AuthLog {
    /// Opens the log: `explicit` (a file) when given, else syslog if `/dev/log` accepts a
    /// connection, else [`DEFAULT_FILE`]. Called while root, before any input is read, so that
    /// the refusal path never has to open anything.
    pub(crate) fn open(explicit: Option<&Path>) -> Result<Self, String> {
        if let Some(p) = explicit {
            return open_file(p).map(|f| Self { sink: Sink::File(f) });
        }
        if Path::new(DEV_LOG).exists() {
            let sock = UnixDatagram::unbound().and_then(|s| s.connect(DEV_LOG).map(|()| s));
            if let Ok(s) = sock {
                return Ok(Self { sink: Sink::Syslog(s) });
            }
        }
        open_file(Path::new(DEFAULT_FILE)).map(|f| Self { sink: Sink::File(f) })
    }

    /// Writes one line (`msg` must already be escaped; it must not contain a newline).
    pub(crate) fn write(&mut self, severity: Severity, msg: &str) -> io::Result<()> {
        let pid = std::process::id();
        match &mut self.sink {
            Sink::Syslog(s) => {
                // RFC 3164 without a timestamp: the daemon stamps it on receipt.
                let line = format!("<{}>mailreplica-wrapper[{pid}]: {msg}", LOG_AUTHPRIV | severity as u8);
                s.send(line.as_bytes()).map(|_| ())
            }
            Sink::File(f) => {
                // One write(2) per line, O_APPEND: concurrent wrappers never interleave.
                let line = format!("{} mailreplica-wrapper[{pid}]: {msg}\n", utc_now());
                f.write_all(line.as_bytes())
            }
        }
    }
}

/// Opens (creating 0600 if missing) an append-only log file as root. The directories above it
/// must be root's (no one else could plant a symlink or hard link there), the last component is
/// not followed, and the file must be a root-owned, single-link regular file no one else can read.
fn open_file(path: &Path) -> Result<File, String> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("{}: not a file path", path.display()));
    };
    if !path.is_absolute() {
        return Err(format!("{}: not an absolute path", path.display()));
    }
    let dir = trust::check_dir_chain(parent)?;
    let full = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&full)
        .map_err(|e| format!("{}: {e}", full.display()))?;
    let m = f.metadata().map_err(|e| format!("{}: {e}", full.display()))?;
    if !m.is_file() || m.uid() != 0 || m.nlink() != 1 || m.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: must be a root-owned regular file with one link and mode 0600 (uid {}, mode {:o}, links {})",
            full.display(),
            m.uid(),
            m.mode() & 0o7777,
            m.nlink()
        ));
    }
    Ok(f)
}

/// Escapes untrusted bytes for a log line: printable ASCII except `"` and `\` stays, everything
/// else becomes `\xNN`. At most `max` input bytes are shown; a longer input ends in `...`.
pub(crate) fn escape(bytes: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(bytes.len().min(max) + 8);
    for &b in bytes.iter().take(max) {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > max {
        out.push_str("...");
    }
    out
}

/// The current time as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (UTC, microseconds), without touching
/// the environment or `/etc/localtime`.
fn utc_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_quotes() {
        assert_eq!(escape(b"alice", 64), "alice");
        assert_eq!(escape(b"al\nice\r\x00\"\\\xff", 64), "al\\x0aice\\x0d\\x00\\x22\\x5c\\xff");
        assert_eq!(escape(b"abcdef", 3), "abc...");
    }

    #[test]
    fn time_format() {
        let t = utc_now();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
