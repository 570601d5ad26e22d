//! `dovecot-uidvalidity`: the per-user counter that hands out UIDVALIDITY values to new
//! mailboxes, compatible with Dovecot's `mailbox-uidvalidity.c`.
//!
//! The main file holds the current value as 8 hex digits; an empty marker file
//! `dovecot-uidvalidity.<hex>` is renamed to the next value, which makes the increment atomic
//! between processes without a lock. The first value is the current time.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::StoreError;
use crate::store::error::StoreResult;

const NAME: &str = "dovecot-uidvalidity";
const RETRIES: usize = 10;

fn now32() -> u32 {
    let s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as u32;
    s.max(1)
}

/// Returns the next UIDVALIDITY for a new mailbox under `root`.
pub(crate) fn next(root: &Path) -> StoreResult<u32> {
    let path = root.join(NAME);
    if let Ok(text) = fs::read_to_string(&path)
        && let Ok(cur) = u32::from_str_radix(text.trim(), 16)
        && cur != 0
        && let Some(v) = rename_marker(root, cur)?
    {
        write_value(&path, v)?;
        return Ok(v);
    }
    rescan(root, &path)
}

/// Renames the marker `.<cur>` to `.<cur+1>`, trying a few values in case of races.
fn rename_marker(root: &Path, mut cur: u32) -> StoreResult<Option<u32>> {
    for _ in 0..RETRIES {
        let src = root.join(format!("{NAME}.{cur:08x}"));
        cur = cur.wrapping_add(1).max(1);
        let dst = root.join(format!("{NAME}.{cur:08x}"));
        match fs::rename(&src, &dst) {
            Ok(()) => return Ok(Some(cur)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io("rename", &dst, e)),
        }
    }
    Ok(None)
}

/// The slow path: find the marker by listing the directory, or start a new counter.
fn rescan(root: &Path, path: &Path) -> StoreResult<u32> {
    let prefix = format!("{NAME}.");
    let (mut min, mut max) = (u32::MAX, 0u32);
    let entries = fs::read_dir(root).map_err(|e| StoreError::io("opendir", root, e))?;
    for e in entries {
        let e = e.map_err(|e| StoreError::io("readdir", root, e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_prefix(&prefix)
            && let Ok(v) = u32::from_str_radix(hex, 16)
        {
            min = min.min(v);
            max = max.max(v);
        }
    }
    if max == 0 {
        let mut v = now32();
        for _ in 0..RETRIES {
            let marker = root.join(format!("{NAME}.{v:08x}"));
            match OpenOptions::new().write(true).create_new(true).mode(0o444).open(&marker) {
                Ok(_) => {
                    write_value(path, v)?;
                    return Ok(v);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => v = v.wrapping_add(1).max(1),
                Err(e) => return Err(StoreError::io("open", &marker, e)),
            }
        }
        return Ok(v);
    }
    if min != max {
        let _ = fs::remove_file(root.join(format!("{NAME}.{min:08x}")));
    }
    match rename_marker(root, max)? {
        Some(v) => {
            write_value(path, v)?;
            Ok(v)
        }
        None => Ok(now32()),
    }
}

fn write_value(path: &Path, v: u32) -> StoreResult<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    f.write_all(format!("{v:08x}").as_bytes()).map_err(|e| StoreError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_like_dovecot() {
        let dir = tempfile::tempdir().unwrap();
        let a = next(dir.path()).unwrap();
        let b = next(dir.path()).unwrap();
        let c = next(dir.path()).unwrap();
        assert_eq!((b, c), (a + 1, a + 2));
        assert_eq!(fs::read_to_string(dir.path().join(NAME)).unwrap(), format!("{c:08x}"));
        assert!(dir.path().join(format!("{NAME}.{c:08x}")).exists());
        // Main file lost: the marker still carries the count.
        fs::remove_file(dir.path().join(NAME)).unwrap();
        assert_eq!(next(dir.path()).unwrap(), c + 1);
    }
}
