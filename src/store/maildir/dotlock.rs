//! Dovecot's dotlock protocol (`lib/file-dotlock.c`), used for `dovecot-uidlist.lock`,
//! `dovecot-keywords.lock` and `subscriptions.lock`.
//!
//! A lock is a file created with `O_EXCL` that holds `<pid>:<hostname>`. A waiter overrides
//! it when the holder is a dead process on this host (checked once the lock is older than
//! 2 s), or when neither the lock nor the file it protects has changed for the stale timeout.
//! Unlocking removes the file only if it is still ours (same inode).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
#[cfg(test)]
use std::time::SystemTime;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::fsutil::Stamp;
use crate::store::StoreError;
use crate::store::error::StoreResult;

/// How long a holder may leave the lock unchanged before others take it over
/// (`MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT`).
pub(crate) const STALE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for a lock by default (Dovecot: 120 + 2 s).
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(122);
/// A lock younger than this is never checked for a dead holder.
const PID_CHECK_AGE: Duration = Duration::from_secs(2);

/// A held dotlock; released on drop.
#[derive(Debug)]
pub(crate) struct Dotlock {
    path: PathBuf,
    dev: u64,
    ino: u64,
    released: bool,
}

impl Dotlock {
    /// Takes the lock `<protected>.lock`, waiting up to `wait` (zero = try once).
    pub(crate) fn acquire(protected: &Path, hostname: &str, wait: Duration) -> StoreResult<Self> {
        let mut name = protected.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let path = protected.with_file_name(name);
        let start = Instant::now();
        let content = format!("{}:{}", std::process::id(), hostname);
        let mut delay = Duration::from_millis(2);
        // What we last saw of the lock and the protected file, and since when it is unchanged.
        let mut seen: Option<(Option<Stamp>, Option<Stamp>)> = None;
        let mut unchanged_since = Instant::now();
        loop {
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(mut f) => {
                    let meta = f.metadata().map_err(|e| StoreError::io("fstat", &path, e))?;
                    let lock = Self { path: path.clone(), dev: meta.dev(), ino: meta.ino(), released: false };
                    f.write_all(content.as_bytes()).map_err(|e| StoreError::io("write", &path, e))?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("open", &path, e)),
            }
            // Someone holds it. Is the holder dead, or the lock stale?
            let lock_stamp = Stamp::read(&path)?;
            let file_stamp = Stamp::read(protected)?;
            let now_seen = (lock_stamp, file_stamp);
            if seen != Some(now_seen) {
                seen = Some(now_seen);
                unchanged_since = Instant::now();
            }
            if lock_stamp.is_some() {
                let override_it = holder_is_dead(&path, hostname) || unchanged_since.elapsed() >= STALE_TIMEOUT;
                if override_it {
                    tracing::warn!(lock = %path.display(), "overriding stale lock");
                    remove_if_same(&path, lock_stamp)?;
                    continue;
                }
            } else {
                continue; // vanished between open and stat: retry at once
            }
            if start.elapsed() >= wait {
                return Err(StoreError::LockTimeout { path, secs: wait.as_secs() });
            }
            let left = wait.saturating_sub(start.elapsed());
            sleep(delay.min(left));
            delay = (delay * 3 / 2).min(Duration::from_millis(200));
        }
    }

    /// Path of the lock file.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock if it is still ours.
    pub(crate) fn release(mut self) -> StoreResult<()> {
        self.released = true;
        self.unlink()
    }

    fn unlink(&self) -> StoreResult<()> {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                fs::remove_file(&self.path).map_err(|e| StoreError::io("unlink", &self.path, e))
            }
            Ok(_) => {
                tracing::warn!(lock = %self.path.display(), "our dotlock was overridden by another process");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(lock = %self.path.display(), "our dotlock was deleted by another process");
                Ok(())
            }
            Err(e) => Err(StoreError::io("stat", &self.path, e)),
        }
    }
}

impl Drop for Dotlock {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.unlink()
        {
            tracing::error!("releasing lock: {e}");
        }
    }
}

/// True if the lock names a process on this host that no longer exists, and is old enough
/// that it cannot be one still being written.
fn holder_is_dead(path: &Path, hostname: &str) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    let old_enough = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= PID_CHECK_AGE);
    if !old_enough {
        return false;
    }
    let Ok(content) = fs::read_to_string(path) else {
        return false;
    };
    let Some((pid, host)) = content.trim_end().split_once(':') else {
        return false;
    };
    if host != hostname {
        return false;
    }
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if pid <= 0 || pid == std::process::id() as i32 {
        // Our own pid may be another handle of this very process: never take that over.
        return false;
    }
    kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

/// Unlinks the lock file if it is still the one we judged stale.
fn remove_if_same(path: &Path, stamp: Option<Stamp>) -> StoreResult<()> {
    if Stamp::read(path)? == stamp {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("unlink", path, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dovecot-uidlist");
        let a = Dotlock::acquire(&p, "h", Duration::ZERO).unwrap();
        assert_eq!(fs::read_to_string(a.path()).unwrap(), format!("{}:h", std::process::id()));
        assert!(matches!(Dotlock::acquire(&p, "h", Duration::from_millis(30)), Err(StoreError::LockTimeout { .. })));
        a.release().unwrap();
        assert!(!dir.path().join("dovecot-uidlist.lock").exists());
        let _b = Dotlock::acquire(&p, "h", Duration::ZERO).unwrap();
    }

    #[test]
    fn dead_holder_on_this_host_is_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dovecot-uidlist");
        let lock = dir.path().join("dovecot-uidlist.lock");
        // A pid that cannot exist (above pid_max), written long ago.
        fs::write(&lock, "2147483646:h").unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        fs::File::options().write(true).open(&lock).unwrap().set_modified(old).unwrap();
        let _l = Dotlock::acquire(&p, "h", Duration::from_millis(100)).unwrap();
        // A lock from another host is not overridden early.
        drop(_l);
        fs::write(&lock, "1:otherhost").unwrap();
        fs::File::options().write(true).open(&lock).unwrap().set_modified(old).unwrap();
        assert!(Dotlock::acquire(&p, "h", Duration::from_millis(50)).is_err());
    }
}
