//! Root-trusted paths, checked like sshd's `StrictModes`: the file and every directory above it
//! must be owned by root and writable by nobody else. Only then may its content decide who gets
//! which uid: a policy file that a mail user (or anyone in a writable directory above it) could
//! replace would be a root hole.
//!
//! There is no exception for sticky directories such as `/tmp` (sshd makes none either).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The largest trusted file we read (policy, passwd-file): far above any real one, and it keeps
/// a mistake (a log file named as policy) from eating memory while root.
const MAX_TRUSTED_FILE: u64 = 4 << 20;

/// Checks that `dir` and all its ancestors are directories owned by root and not writable by
/// group or others. Returns the canonical path (symlinks in it resolved, each target checked).
pub(crate) fn check_dir_chain(dir: &Path) -> Result<PathBuf, String> {
    let canon = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    for d in canon.ancestors() {
        let m = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if !m.is_dir() {
            return Err(format!("{} is not a directory", d.display()));
        }
        if m.uid() != 0 {
            return Err(format!("directory {} is owned by uid {}, not root", d.display(), m.uid()));
        }
        if m.mode() & 0o022 != 0 {
            return Err(format!(
                "directory {} is writable by group or others (mode {:o})",
                d.display(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(canon)
}

/// Opens a root-trusted regular file for reading: absolute path, no symlink as the last
/// component, owned by root, not writable by group or others, every directory above it checked
/// by [`check_dir_chain`]. The checks are made on the opened descriptor (no race between check
/// and use).
pub(crate) fn open_trusted(path: &Path) -> Result<File, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("{} names no file", path.display()));
    };
    let parent = check_dir_chain(parent)?;
    let full = parent.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&full)
        .map_err(|e| format!("{}: {e}", full.display()))?;
    let m = f.metadata().map_err(|e| format!("{}: {e}", full.display()))?;
    if !m.is_file() {
        return Err(format!("{} is not a regular file", full.display()));
    }
    if m.uid() != 0 {
        return Err(format!("{} is owned by uid {}, not root", full.display(), m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by group or others (mode {:o})", full.display(), m.mode() & 0o7777));
    }
    Ok(f)
}

/// Reads a root-trusted file (see [`open_trusted`]) as UTF-8 text, at most 4 MiB.
pub(crate) fn read_trusted(path: &Path) -> Result<String, String> {
    let f = open_trusted(path)?;
    let mut text = String::new();
    f.take(MAX_TRUSTED_FILE + 1).read_to_string(&mut text).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_TRUSTED_FILE {
        return Err(format!("{} is larger than {MAX_TRUSTED_FILE} bytes", path.display()));
    }
    Ok(text)
}
