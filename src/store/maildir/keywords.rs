//! `dovecot-keywords`: which keyword each file-name letter `a`–`z` stands for.
//!
//! One `<index> <name>` line per keyword, index 0–25 for `a`–`z`. Letters are handed out
//! first-free and never renumbered, since renumbering would silently change the keywords of
//! every file already named with them. Writers hold the uidlist lock, write the new file as
//! `dovecot-keywords.lock`, and rename it over the old one with a strictly larger mtime,
//! because Dovecot re-reads the file only when its mtime (in seconds) changes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::filename::KeywordMask;
use super::fsutil::{self, Stamp};
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Keyword, StoreError};

/// File name of the keyword map.
pub(crate) const NAME: &str = "dovecot-keywords";
/// The Maildir file-name limit: one letter per keyword.
pub(crate) const MAX_KEYWORDS: usize = 26;

/// The letter → keyword map of one mailbox.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeywordMap {
    names: [Option<Keyword>; MAX_KEYWORDS],
    pub(crate) stamp: Option<Stamp>,
    mtime_secs: i64,
}

impl KeywordMap {
    /// Reads `<dir>/dovecot-keywords`; a missing file is an empty map. Malformed lines are
    /// skipped, as Dovecot skips them.
    pub(crate) fn read(dir: &Path) -> StoreResult<Self> {
        let path = dir.join(NAME);
        let stamp = Stamp::read(&path)?;
        let mut map = Self { stamp, ..Self::default() };
        map.mtime_secs = stamp.map_or(0, |s| (s.mtime_ns / 1_000_000_000) as i64);
        let Some(data) = fsutil::read_optional(&path)? else {
            return Ok(map);
        };
        for line in String::from_utf8_lossy(&data).lines() {
            let Some((idx, name)) = line.split_once(' ') else {
                continue;
            };
            let Ok(idx) = idx.parse::<usize>() else {
                continue;
            };
            let Ok(kw) = Keyword::new(name) else { continue };
            if idx >= MAX_KEYWORDS || map.index_of(&kw).is_some() {
                continue;
            }
            map.names[idx] = Some(kw);
        }
        Ok(map)
    }

    /// Letter index of a keyword (case-insensitive, as Dovecot looks them up).
    pub(crate) fn index_of(&self, kw: &Keyword) -> Option<usize> {
        self.names.iter().position(|n| n.as_ref().is_some_and(|n| n.as_str().eq_ignore_ascii_case(kw.as_str())))
    }

    /// Keywords of a letter mask, in letter order. Letters without a name become
    /// `unknown-<index>`, as Dovecot names them.
    pub(crate) fn keywords(&self, mask: KeywordMask) -> Vec<Keyword> {
        (0..MAX_KEYWORDS)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| match &self.names[i] {
                Some(k) => k.clone(),
                None => Keyword::new(&format!("unknown-{i}")).expect("valid keyword"),
            })
            .collect()
    }

    /// Letters in `mask` that have no name.
    pub(crate) fn unnamed(&self, mask: KeywordMask) -> KeywordMask {
        (0..MAX_KEYWORDS).filter(|&i| mask & (1 << i) != 0 && self.names[i].is_none()).fold(0, |m, i| m | (1 << i))
    }

    /// Names every letter of `used` that has no name `unknown-<index>`, as Dovecot does when it
    /// meets such a letter in a file name. Once the map is written, the letter is reserved and
    /// is never handed to a new keyword (which would silently put that keyword on every file
    /// that already carries the letter).
    pub(crate) fn reserve(&mut self, used: KeywordMask) {
        for i in 0..MAX_KEYWORDS {
            if used & (1 << i) != 0 && self.names[i].is_none() {
                self.names[i] = Some(Keyword::new(&format!("unknown-{i}")).expect("valid keyword"));
            }
        }
    }

    /// The mask for `keywords`, allocating letters for new ones. Returns the mask and whether
    /// the map changed (and must be written before any file uses the new letters).
    pub(crate) fn mask_for(&mut self, keywords: &[Keyword]) -> StoreResult<(KeywordMask, bool)> {
        let mut mask = 0;
        let mut changed = false;
        for kw in keywords {
            let idx = if let Some(i) = self.index_of(kw) {
                i
            } else if let Some(i) = unknown_index(kw).filter(|&i| self.names[i].is_none()) {
                i // `unknown-N` stands for letter N itself
            } else {
                let free = self.names.iter().position(Option::is_none).ok_or_else(|| {
                    StoreError::Limit(format!(
                        "cannot add keyword {kw}: a Maildir holds at most {MAX_KEYWORDS} keywords per mailbox"
                    ))
                })?;
                self.names[free] = Some(kw.clone());
                changed = true;
                free
            };
            mask |= 1 << idx;
        }
        Ok((mask, changed))
    }

    /// Looks keywords up without allocating; `None` if any has no letter.
    pub(crate) fn existing_mask(&self, keywords: &[Keyword]) -> Option<KeywordMask> {
        let mut mask = 0;
        for kw in keywords {
            let idx = self.index_of(kw).or_else(|| unknown_index(kw).filter(|&i| self.names[i].is_none()))?;
            mask |= 1 << idx;
        }
        Some(mask)
    }

    /// Writes the map (caller holds the uidlist lock).
    pub(crate) fn write(&mut self, dir: &Path) -> StoreResult<()> {
        let path = dir.join(NAME);
        let lock: PathBuf = dir.join(format!("{NAME}.lock"));
        let mut data = String::new();
        for (i, n) in self.names.iter().enumerate() {
            if let Some(n) = n {
                data.push_str(&format!("{i} {n}\n"));
            }
        }
        // We hold the uidlist lock, so any keywords lock file is a leftover.
        match fs::remove_file(&lock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("unlink", &lock, e)),
        }
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&lock).ctx("open", &lock)?;
        f.write_all(data.as_bytes()).ctx("write", &lock)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let mtime = if now <= self.mtime_secs { self.mtime_secs + 1 } else { now };
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime as u64)).ctx("futimens", &lock)?;
        f.sync_all().ctx("fsync", &lock)?;
        drop(f);
        fs::rename(&lock, &path).ctx("rename", &path)?;
        self.mtime_secs = mtime;
        self.stamp = Stamp::read(&path)?;
        Ok(())
    }
}

/// `unknown-N` → N, the name Dovecot gives a letter whose keyword was lost.
fn unknown_index(kw: &Keyword) -> Option<usize> {
    kw.as_str().strip_prefix("unknown-")?.parse().ok().filter(|&i| i < MAX_KEYWORDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kw(s: &str) -> Keyword {
        Keyword::new(s).unwrap()
    }

    #[test]
    fn allocate_write_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = KeywordMap::read(dir.path()).unwrap();
        let (mask, changed) = m.mask_for(&[kw("$Junk"), kw("Work")]).unwrap();
        assert_eq!((mask, changed), (0b11, true));
        m.write(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(NAME)).unwrap(), "0 $Junk\n1 Work\n");
        let m2 = KeywordMask::from(0b10u8);
        let r = KeywordMap::read(dir.path()).unwrap();
        assert_eq!(r.keywords(m2), vec![kw("Work")]);
        assert_eq!(r.existing_mask(&[kw("$junk")]), Some(1));
        assert_eq!(r.keywords(0b100), vec![kw("unknown-2")]);
        assert_eq!(r.unnamed(0b111), 0b100);
        // A used letter without a name is reserved, not handed out again.
        let mut r = r;
        r.reserve(0b100);
        let (mask, _) = r.mask_for(&[kw("New")]).unwrap();
        assert_eq!(mask, 0b1000);
        assert_eq!(r.keywords(0b100), vec![kw("unknown-2")]);
        assert_eq!(r.existing_mask(&[kw("unknown-2")]), Some(0b100));
    }

    #[test]
    fn limit_of_26() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = KeywordMap::read(dir.path()).unwrap();
        let many: Vec<Keyword> = (0..26).map(|i| kw(&format!("k{i}"))).collect();
        m.mask_for(&many).unwrap();
        assert!(matches!(m.mask_for(&[kw("one-more")]), Err(StoreError::Limit(_))));
    }
}
