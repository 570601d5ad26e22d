//! `dovecot.mailbox.log`: Dovecot's log of mailbox-list changes, read by dsync to tell a
//! deleted mailbox from one the other side just created, and renames from new mailboxes.
//!
//! Fixed 24-byte records: type (1 byte), 3 bytes padding, a 16-byte GUID (the mailbox GUID for
//! deletes, else SHA-1/128 of the mailbox name) and a big-endian 32-bit Unix time. Writers append
//! whole records with `O_APPEND`; at 4 KiB the file is renamed to `dovecot.mailbox.log.2`, and
//! readers read `.2` first. We write the same records, so Dovecot's own dsync sees our deletes.
//! (Dovecot 2.3's reader rejects type 6, `create-dir`, so we never write it.)

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::fsutil;
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Guid128, ListChange, ListChangeKind};

const NAME: &str = "dovecot.mailbox.log";
const ROTATED: &str = "dovecot.mailbox.log.2";
const ROTATE_SIZE: u64 = 4096;
const RECORD: usize = 24;

fn kind_code(k: ListChangeKind) -> u8 {
    match k {
        ListChangeKind::DeleteMailbox => 1,
        ListChangeKind::DeleteDir => 2,
        ListChangeKind::Rename => 3,
        ListChangeKind::Subscribe => 4,
        ListChangeKind::Unsubscribe => 5,
        ListChangeKind::CreateDir => 6,
    }
}

fn kind_of(code: u8) -> Option<ListChangeKind> {
    Some(match code {
        1 => ListChangeKind::DeleteMailbox,
        2 => ListChangeKind::DeleteDir,
        3 => ListChangeKind::Rename,
        4 => ListChangeKind::Subscribe,
        5 => ListChangeKind::Unsubscribe,
        6 => ListChangeKind::CreateDir,
        _ => return None,
    })
}

/// Reads every record of both log files. A record with an unknown type ends that file's
/// records (Dovecot stops there too); a trailing partial record is ignored.
pub(crate) fn read(root: &Path) -> StoreResult<Vec<ListChange>> {
    let mut out = Vec::new();
    for name in [ROTATED, NAME] {
        let path = root.join(name);
        let Some(data) = fsutil::read_optional(&path)? else {
            continue;
        };
        for rec in data.chunks_exact(RECORD) {
            let Some(kind) = kind_of(rec[0]) else {
                tracing::warn!(file = %path.display(), "corrupted record in mailbox log; ignoring the rest");
                break;
            };
            let mut guid = [0u8; 16];
            guid.copy_from_slice(&rec[4..20]);
            let time = u32::from_be_bytes([rec[20], rec[21], rec[22], rec[23]]);
            out.push(ListChange { kind, guid: Guid128(guid), time: i64::from(time) });
        }
    }
    Ok(out)
}

/// Appends one record, rotating the log when it has grown past 4 KiB.
pub(crate) fn append(root: &Path, change: ListChange) -> StoreResult<()> {
    if change.guid.is_empty() || change.kind == ListChangeKind::CreateDir {
        return Ok(());
    }
    let path = root.join(NAME);
    let mut rec = [0u8; RECORD];
    rec[0] = kind_code(change.kind);
    rec[4..20].copy_from_slice(&change.guid.0);
    rec[20..24].copy_from_slice(&(change.time.clamp(0, i64::from(u32::MAX)) as u32).to_be_bytes());
    let mut f = OpenOptions::new().append(true).create(true).mode(0o600).open(&path).ctx("open", &path)?;
    f.write_all(&rec).ctx("write", &path)?;
    let size = f.metadata().ctx("fstat", &path)?.len();
    if size >= ROTATE_SIZE {
        fs::rename(&path, root.join(ROTATED)).ctx("rename", &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_rotate_read() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..200u32 {
            let mut g = [0u8; 16];
            g[0] = 1;
            g[15] = i as u8;
            append(
                dir.path(),
                ListChange { kind: ListChangeKind::DeleteMailbox, guid: Guid128(g), time: i64::from(i) },
            )
            .unwrap();
        }
        let all = read(dir.path()).unwrap();
        // 4096 / 24 = 170.67: the first 171 records were rotated away once, then overwritten
        // by nothing; everything since the last rotation is still readable.
        assert!(dir.path().join(ROTATED).exists());
        assert_eq!(all.last().unwrap().time, 199);
        assert_eq!(all.len(), 200);
    }
}
