//! The user's dsync lock, `~/.dovecot-sync.lock`, as Dovecot's `dsync_brain_lock` takes it
//! when a sync asks for one (`doveadm sync -l SECS`): an `fcntl` write lock on a file in the
//! home directory, so that two syncs of one user (ours or Dovecot's) never run at once.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, fcntl};

use crate::store::StoreError;
use crate::store::error::{IoContext, StoreResult};

/// The lock file's name in the home directory (Dovecot's `DSYNC_LOCK_FILENAME`).
pub(crate) const NAME: &str = ".dovecot-sync.lock";

/// A held lock; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub(crate) struct SyncLock {
    path: PathBuf,
    _file: File,
}

impl Drop for SyncLock {
    fn drop(&mut self) {
        // Unlinked before it is unlocked (by closing), as Dovecot does: a waiter that then gets
        // the lock notices the file is gone and starts over.
        let _ = fs::remove_file(&self.path);
    }
}

fn try_lock(file: &File) -> io::Result<bool> {
    let fl =
        libc::flock { l_type: libc::F_WRLCK as i16, l_whence: libc::SEEK_SET as i16, l_start: 0, l_len: 0, l_pid: 0 };
    match fcntl(file.as_fd(), FcntlArg::F_SETLK(&fl)) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Takes the lock in `home`, waiting up to `timeout`.
pub(crate) fn lock(home: &Path, timeout: Duration) -> StoreResult<SyncLock> {
    let path = home.join(NAME);
    let start = Instant::now();
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ctx("open", &path)?;
        if try_lock(&file).ctx("fcntl(F_SETLK)", &path)? {
            // The previous holder may have unlinked the file just before we locked it.
            let ours = file.metadata().ctx("fstat", &path)?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(SyncLock { path, _file: file });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("stat", &path, e)),
            }
            continue;
        }
        if start.elapsed() >= timeout {
            return Err(StoreError::LockTimeout { path, secs: timeout.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
