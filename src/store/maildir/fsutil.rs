//! File-system helpers: change stamps, durable writes and directory fsyncs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::store::error::{IoContext, StoreResult};

/// What identifies a version of a file or directory: if any field differs, it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
}

impl Stamp {
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// Stamp of `path`, `None` if it does not exist.
    pub(crate) fn read(path: &Path) -> StoreResult<Option<Self>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(Self::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::store::StoreError::io("stat", path, e)),
        }
    }

    /// Encodes as `dev.ino.size.mtime` (for our index file).
    pub(crate) fn encode(stamp: Option<Self>) -> String {
        match stamp {
            Some(s) => format!("{}.{}.{}.{}", s.dev, s.ino, s.size, s.mtime_ns),
            None => "-".to_owned(),
        }
    }

    /// Decodes [`Stamp::encode`]; `Err` on garbage.
    pub(crate) fn decode(s: &str) -> Result<Option<Self>, ()> {
        if s == "-" {
            return Ok(None);
        }
        let mut it = s.split('.');
        let mut next = || it.next().ok_or(());
        let dev = next()?.parse().map_err(|_| ())?;
        let ino = next()?.parse().map_err(|_| ())?;
        let size = next()?.parse().map_err(|_| ())?;
        let mtime_ns = next()?.parse().map_err(|_| ())?;
        Ok(Some(Self { dev, ino, size, mtime_ns }))
    }
}

/// Syncs a directory so that renames and creations in it survive a crash.
pub(crate) fn fsync_dir(dir: &Path) -> StoreResult<()> {
    let f = File::open(dir).ctx("open", dir)?;
    f.sync_all().ctx("fsync", dir)
}

/// Writes `data` to `tmp` (mode 0600 adjusted by umask of the caller's choosing), fdatasyncs
/// it and renames it over `dest`. The directory is not synced; callers batch that.
pub(crate) fn replace_file(tmp: &Path, dest: &Path, data: &[u8], mode: u32) -> StoreResult<()> {
    replace_file_with(tmp, dest, mode, |f| f.write_all(data))
}

/// [`replace_file`] for contents written piece by piece by `fill` (which gets the open file),
/// so that a large file is never held in memory whole.
pub(crate) fn replace_file_with(
    tmp: &Path,
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> StoreResult<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(tmp).ctx("open", tmp)?;
    fill(&mut f).ctx("write", tmp)?;
    f.sync_data().ctx("fdatasync", tmp)?;
    drop(f);
    fs::rename(tmp, dest).ctx("rename", dest)
}

/// Sets a directory's mtime to now. Dovecot's Maildir sync re-reads `dovecot-uidlist` only
/// when `new/` or `cur/` changed (its quick check compares their mtimes with its index), so a
/// header-only change of the uidlist (a raised UIDNEXT) is announced this way.
pub(crate) fn touch_dir(dir: &Path) -> StoreResult<()> {
    let f = File::open(dir).ctx("open", dir)?;
    f.set_modified(std::time::SystemTime::now()).ctx("futimens", dir)
}

/// Reads a whole file, `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> StoreResult<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::store::StoreError::io("read", path, e)),
    }
}

/// The system's hostname, for lock files and unique names.
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".to_owned())
}
