//! Dovecot's dotlock protocol (`lib/file-dotlock.c`), used for `dovecot-uidlist.lock`,
//! `dovecot-keywords.lock` and `subscriptions.lock`.
//!
//! A lock is a file that holds `<pid>:<hostname>`. We create it the way Dovecot does with
//! `dotlock_use_excl = no`: the content goes into a temporary file first, which is then
//! hard-linked to the lock's name, so that a lock never exists without its content (see
//! [`create_lock`]). A waiter overrides it when the holder is a dead process on this host
//! (checked once the lock is older than 2 s), or when neither the lock nor the file it protects
//! has changed for the stale timeout. Unlocking removes the file only if it is still ours
//! (same inode).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
            if let Some((dev, ino)) = create_lock(&path, &content, hostname)? {
                return Ok(Self { path, dev, ino, released: false });
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

    /// Gives the lock up without unlinking it: for a holder that has just removed the whole
    /// directory the lock file was in (deleting a mailbox), so there is nothing left to unlink.
    pub(crate) fn forget(mut self) {
        self.released = true;
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

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Start of the names of [`create_lock`]'s temporary files.
const TEMP_PREFIX: &str = ".dotlock.";

/// The pid in the name of a temporary file [`create_lock`] made on this host; `None` for any
/// other name. A process killed between creating it and removing it leaves it behind.
pub(crate) fn temp_owner_pid(name: &str, hostname: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (pid, rest) = rest.split_once('.')?;
    let (n, host) = rest.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(n) || host != hostname.replace('/', "_") {
        return None;
    }
    pid.parse().ok()
}

/// Creates the lock file `path` holding `content`, atomically: `Ok(Some((dev, ino)))` if we
/// now hold it, `Ok(None)` if it already exists.
///
/// The content is written to a temporary file first, which is then hard-linked to the lock's
/// name (`link` fails with `EEXIST` when the lock is taken). Creating the lock with `O_EXCL`
/// and then writing into it leaves an empty lock when the process dies in between, or when the
/// machine loses power before the content reaches the disk; nobody can tell whose an empty
/// lock is, so Dovecot and we both wait out the 2-minute stale timeout before taking it over.
/// The temporary file lives in the mailbox's `tmp/` (Dovecot deletes anything stale there),
/// or next to the lock under a dot name if there is no `tmp/` or it is on another file system.
fn create_lock(path: &Path, content: &str, hostname: &str) -> StoreResult<Option<(u64, u64)>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp_name = format!("{TEMP_PREFIX}{}.{n}.{}", std::process::id(), hostname.replace('/', "_"));
    let tmp_dir = dir.join("tmp");
    let mut candidates = vec![dir.join(&temp_name)];
    if fs::symlink_metadata(&tmp_dir).is_ok_and(|m| m.is_dir()) {
        candidates.insert(0, tmp_dir.join(&temp_name));
    }
    for temp in &candidates {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp)
            .map_err(|e| StoreError::io("open", temp, e))?;
        let written = f.write_all(content.as_bytes()).and_then(|()| f.metadata());
        drop(f);
        let meta = match written {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_file(temp);
                return Err(StoreError::io("write", temp, e));
            }
        };
        let linked = fs::hard_link(temp, path);
        let _ = fs::remove_file(temp);
        match linked {
            Ok(()) => return Ok(Some((meta.dev(), meta.ino()))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => continue,
            Err(e) => return Err(StoreError::io("link", path, e)),
        }
    }
    Err(StoreError::io("link", path, io::Error::from(io::ErrorKind::CrossesDevices)))
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
    fn lock_is_never_empty_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        let p = dir.path().join("dovecot-uidlist");
        let a = Dotlock::acquire(&p, "h", Duration::ZERO).unwrap();
        let meta = fs::metadata(a.path()).unwrap();
        assert_eq!(meta.nlink(), 1, "the temporary name must be gone");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!((meta.dev(), meta.ino()), (a.dev, a.ino));
        a.release().unwrap();
        // Without tmp/, the temporary file goes next to the lock and is removed as well.
        let other = tempfile::tempdir().unwrap();
        let b = Dotlock::acquire(&other.path().join("subscriptions"), "h", Duration::ZERO).unwrap();
        assert_eq!(fs::read_dir(other.path()).unwrap().count(), 1);
        b.release().unwrap();
    }

    #[test]
    fn temp_names_name_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        // The name create_lock makes (it removes the file at once; rebuild the name here).
        let name = format!("{TEMP_PREFIX}{}.7.my_host", std::process::id());
        assert_eq!(temp_owner_pid(&name, "my/host"), Some(std::process::id()));
        assert_eq!(temp_owner_pid(".dotlock.12.3.other", "my/host"), None);
        assert_eq!(temp_owner_pid(".dotlock.x.3.my_host", "my/host"), None);
        assert_eq!(temp_owner_pid("1700000000.M1P12Q3.my_host", "my/host"), None);
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
