//! The username line: read from raw fd 0 one byte at a time up to the first LF (never past it:
//! the dsync stream follows in the same packet and belongs to the server), under one absolute
//! deadline and a length cap, then checked against a strict grammar before any lookup.
//!
//! Grammars (WRAPPER-SECURITY §3, §7.3), ASCII only:
//!
//! ```text
//! system user   ^[a-z_][a-z0-9_-]{0,31}$
//! virtual user  local@domain, at most 255 bytes, only with a passwd-file userdb:
//!               local  = [a-z0-9_] [a-z0-9._+-]*        (no leading . or -)
//!               domain = label ( "." label )*, label = [a-z0-9] ([a-z0-9-]* [a-z0-9])?
//!               and no ".." anywhere
//! ```

use std::os::fd::BorrowedFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The longest line accepted, without its LF (the longest virtual name).
pub(crate) const MAX_LINE: usize = 255;

/// Why no username line could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// The deadline passed before the LF.
    Timeout,
    /// More than [`MAX_LINE`] bytes without an LF.
    TooLong,
    /// End of input before the LF (a partial line is never a username).
    Eof,
    /// `read`/`poll` failed.
    Io(Errno),
}

/// Reads one LF-terminated line from `fd` without reading a byte past the LF. Returns the
/// line without its LF, or the failure and the bytes read so far (for the log).
pub(crate) fn read_line(fd: BorrowedFd<'_>, deadline: Instant) -> Result<Vec<u8>, (ReadFailure, Vec<u8>)> {
    let mut line = Vec::with_capacity(64);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((ReadFailure::Timeout, line));
        }
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue, // re-check the deadline
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err((ReadFailure::Io(e), line)),
        }
        let mut byte = [0u8; 1];
        match nix::unistd::read(fd, &mut byte) {
            Ok(0) => return Err((ReadFailure::Eof, line)),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_LINE {
                    return Err((ReadFailure::TooLong, line));
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err((ReadFailure::Io(e), line)),
        }
    }
}

/// Which grammars a name may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grammar {
    /// System users only.
    System,
    /// System users and `local@domain` (a passwd-file userdb).
    SystemOrVirtual,
}

/// A username that passed the grammar: safe to log, to hand to NSS and to use as a lock-file
/// name (no `/`, no NUL, no leading `.` or `-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Username(String);

impl Username {
    /// Checks `raw` against `grammar`.
    pub(crate) fn parse(raw: &[u8], grammar: Grammar) -> Option<Self> {
        let ok = is_system(raw) || (grammar == Grammar::SystemOrVirtual && is_virtual(raw));
        // The grammars are ASCII-only, so this conversion cannot fail once `ok` holds.
        ok.then(|| std::str::from_utf8(raw).ok().map(|s| Self(s.to_owned()))).flatten()
    }

    /// The name.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// `^[a-z_][a-z0-9_-]{0,31}$`
fn is_system(s: &[u8]) -> bool {
    match s.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_lowercase() || *first == b'_')
                && rest.len() <= 31
                && rest.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        }
        None => false,
    }
}

fn is_virtual(s: &[u8]) -> bool {
    if s.len() > MAX_LINE || s.windows(2).any(|w| w == b"..") {
        return false;
    }
    let mut parts = s.splitn(2, |&b| b == b'@');
    let (Some(local), Some(domain)) = (parts.next(), parts.next()) else {
        return false;
    };
    let local_ok = match local.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_lowercase() || first.is_ascii_digit() || *first == b'_')
                && rest
                    .iter()
                    .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'+' | b'-'))
        }
        None => false,
    };
    let label_ok = |l: &[u8]| {
        !l.is_empty()
            && l.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with(b"-")
            && !l.ends_with(b"-")
    };
    local_ok && domain.split(|&b| b == b'.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_grammar() {
        for ok in ["alice", "_x", "a-b_c9", "a2345678901234567890123456789012"] {
            assert!(Username::parse(ok.as_bytes(), Grammar::System).is_some(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/root",
            "-u",
            "--help",
            "+",
            "-root",
            "+@grp",
            "0",
            "1000",
            "-1",
            "4294967295",
            "Alice",
            "alice@example.com",
            "ali\0ce",
            "alice\r",
            "al\x1bice",
            "al ice",
            "alice$",
            "\u{430}lice",
            "a23456789012345678901234567890123",
        ] {
            assert!(Username::parse(bad.as_bytes(), Grammar::System).is_none(), "{bad:?}");
            assert!(Username::parse(bad.as_bytes(), Grammar::SystemOrVirtual).is_none() || bad.contains('@'));
        }
    }

    #[test]
    fn virtual_grammar() {
        for ok in ["alice@example.com", "a.b+tag@mail.example.org", "1000@x", "alice"] {
            assert!(Username::parse(ok.as_bytes(), Grammar::SystemOrVirtual).is_some(), "{ok}");
        }
        assert!(Username::parse(b"alice@example.com", Grammar::System).is_none());
        for bad in [
            "@example.com",
            "alice@",
            ".a@x",
            "-a@x",
            "a..b@x",
            "a@x..y",
            "a@-x",
            "a@x-",
            "a@b@c",
            "a/b@x",
            "a@x/y",
            "Alice@x",
            "a@EXAMPLE.com",
            "a@x.",
            "a b@x",
        ] {
            assert!(Username::parse(bad.as_bytes(), Grammar::SystemOrVirtual).is_none(), "{bad:?}");
        }
        let long = format!("{}@x", "a".repeat(254));
        assert!(Username::parse(long.as_bytes(), Grammar::SystemOrVirtual).is_none());
    }

    #[test]
    fn reads_exactly_one_line() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let (mut r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"alice\nXYZ").unwrap();
        drop(w);
        let line = read_line(r.as_fd(), Instant::now() + std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(line, b"alice");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"XYZ");
    }

    #[test]
    fn read_failures() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let soon = || Instant::now() + std::time::Duration::from_millis(300);
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"alice").unwrap();
        assert_eq!(read_line(r.as_fd(), soon()).unwrap_err(), (ReadFailure::Timeout, b"alice".to_vec()));
        drop(w);
        assert_eq!(read_line(r.as_fd(), soon()).unwrap_err().0, ReadFailure::Eof);
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(&[b'a'; 1000]).unwrap();
        let (why, got) = read_line(r.as_fd(), soon()).unwrap_err();
        assert_eq!((why, got.len()), (ReadFailure::TooLong, MAX_LINE + 1));
    }
}
