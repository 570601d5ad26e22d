//! Stale files in a mailbox's `tmp/`.
//!
//! A writer killed after creating its file in `tmp/` and before renaming it into `new/` or
//! `cur/` leaves the file there for good: 43 to 100 per SIGKILL of a dsync slave were observed.
//! Dovecot removes files in `tmp/` whose ctime is more than 36 hours old when it opens a
//! mailbox (`maildir_check_tmp` in `maildir-storage.c`, `MAILDIR_TMP_DELETE_SECS`, at most once
//! per `mail_temp_scan_interval`, a week by default). We apply the same age rule, and also
//! remove our own leftovers at once, whatever their age: files whose names our writers make
//! (`<secs>.M<usecs>P<pid>Q<n>.<host>` for mails and staged moves, `.dotlock.<pid>.<n>.<host>`
//! for lock contents) on this host, for a pid that no longer exists (`kill(pid, 0)` fails with
//! `ESRCH`). A file that may belong to a live writer is never touched: one of our names with a
//! live pid (another mailreplica process may be saving right now; an unrelated process that
//! reused the pid keeps it too, until the age rule applies to it), and any other name younger
//! than 36 hours. Directories are left alone, as Dovecot leaves them.
//!
//! Hostnames must differ between servers sharing a Maildir (Dovecot requires the same for its
//! locks); a pid is only meaningful on its own host, and, in containers, in its own pid
//! namespace.
//!
//! The scan costs one `readdir` of a directory that is normally empty; it runs once per handle,
//! before the handle's first write (see `MaildirMailbox::clean_tmp_once`).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::dotlock;
use super::filename::UniqueNames;
use crate::store::StoreError;
use crate::store::error::StoreResult;

/// Files older than this (by ctime) are removed whoever made them (Dovecot's
/// `MAILDIR_TMP_DELETE_SECS`).
pub(crate) const MAX_AGE: Duration = Duration::from_secs(36 * 60 * 60);

/// What one cleaning removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cleaned {
    /// Our own files of dead processes.
    pub(crate) dead_writers: usize,
    /// Files older than [`MAX_AGE`].
    pub(crate) old: usize,
}

/// True if no process with this pid exists (on this host, in our pid namespace).
fn pid_is_dead(pid: u32) -> bool {
    match i32::try_from(pid) {
        Ok(p) if p > 0 => kill(Pid::from_raw(p), None) == Err(Errno::ESRCH),
        _ => false,
    }
}

/// Removes stale files from `tmp` (see the module documentation). A missing `tmp` is fine.
pub(crate) fn clean(tmp: &Path, hostname: &str, names: &UniqueNames) -> StoreResult<Cleaned> {
    let rd = match fs::read_dir(tmp) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Cleaned::default()),
        Err(e) => return Err(StoreError::io("opendir", tmp, e)),
    };
    let me = std::process::id();
    let oldest_kept = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(MAX_AGE);
    let mut done = Cleaned::default();
    for e in rd {
        let e = e.map_err(|err| StoreError::io("readdir", tmp, err))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let owner = names.owner_pid(name).or_else(|| dotlock::temp_owner_pid(name, hostname));
        let path = e.path();
        let stale = match owner {
            // Our own pid: another handle of this very process may be writing it.
            Some(pid) if pid == me => false,
            Some(pid) if pid_is_dead(pid) => {
                done.dead_writers += 1;
                true
            }
            Some(_) => false,
            None => match fs::symlink_metadata(&path) {
                Ok(m) if !m.is_dir() && m.ctime() >= 0 && (m.ctime() as u64) < oldest_kept.as_secs() => {
                    done.old += 1;
                    true
                }
                Ok(_) => false,
                Err(err) if err.kind() == io::ErrorKind::NotFound => false,
                Err(err) => return Err(StoreError::io("stat", &path, err)),
            },
        };
        if stale {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::io("unlink", &path, err)),
            }
        }
    }
    if done != Cleaned::default() {
        tracing::info!(
            dir = %tmp.display(),
            dead_writers = done.dead_writers,
            older_than_36h = done.old,
            "removed stale files from tmp/"
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that no process has (above the kernel's pid_max).
    const DEAD: u32 = 2_147_483_646;

    // The 36-hour rule needs files with an old ctime, which only the kernel's clock sets: it is
    // tested in tests/store_concurrency.rs on a file system image whose inodes debugfs edits.
    #[test]
    fn removes_dead_writers_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path();
        let names = UniqueNames::new("h");
        let live_other = std::os::unix::process::parent_id(); // a live pid that is not ours
        let files = [
            (format!("1700000000.M1P{DEAD}Q0.h"), false),
            (format!(".dotlock.{DEAD}.3.h"), false),
            (format!("1700000000.M1P{live_other}Q0.h"), true),
            (names.next(), true),                            // our own pid
            (format!("1700000000.M1P{DEAD}Q0.other"), true), // another host's
            (format!("1700000000.M1P{DEAD}.h"), true),       // Dovecot's, young
            ("random".to_owned(), true),
        ];
        for (f, _) in &files {
            fs::write(tmp.join(f), b"x").unwrap();
        }
        fs::create_dir(tmp.join(format!("1700000000.M1P{DEAD}Q1.h"))).unwrap();
        let done = clean(tmp, "h", &names).unwrap();
        assert_eq!(done, Cleaned { dead_writers: 2, old: 0 });
        for (f, kept) in &files {
            assert_eq!(tmp.join(f).exists(), *kept, "{f}");
        }
        assert!(tmp.join(format!("1700000000.M1P{DEAD}Q1.h")).is_dir(), "directories are left alone");
        assert_eq!(clean(&tmp.join("missing"), "h", &names).unwrap(), Cleaned::default());
    }
}
