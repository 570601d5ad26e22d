//! `dovecot-keywords`: which keyword each file-name letter `a`–`z` stands for.
//!
//! One `<index> <name>` line per keyword, index 0–25 for `a`–`z`. Letters are handed out
//! first-free and never renumbered, since renumbering would silently change the keywords of
//! every file already named with them. Writers hold the uidlist lock, write the new file as
//! `dovecot-keywords.lock`, and rename it over the old one with a strictly larger mtime,
//! because Dovecot re-reads the file only when its mtime (in seconds) changes.
//!
//! Keywords that find no free letter are kept in our own index instead ([`ExtraKeywords`]);
//! see `index.rs`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::filename::KeywordMask;
use super::fsutil::{self, Stamp};
use crate::fasthash::FastMap;
use crate::store::error::{IoContext, StoreResult};
use crate::store::{Keyword, MAX_MAILBOX_KEYWORDS, StoreError};

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

    /// The letter of one keyword without allocating: its own, or letter N itself for an
    /// `unknown-N` whose letter has no name.
    pub(crate) fn letter_of(&self, kw: &Keyword) -> Option<usize> {
        self.index_of(kw).or_else(|| unknown_index(kw).filter(|&i| self.names[i].is_none()))
    }

    /// Letters for `keywords`, giving free letters to new ones while any is left. Returns the
    /// mask, whether the map changed (and must be written before any file uses the new
    /// letters), and the positions in `keywords` of those that got no letter.
    pub(crate) fn assign(&mut self, keywords: &[Keyword]) -> (KeywordMask, bool, Vec<usize>) {
        let mut mask = 0;
        let mut changed = false;
        let mut left = Vec::new();
        for (pos, kw) in keywords.iter().enumerate() {
            let idx = match self.letter_of(kw) {
                Some(i) => i,
                None => match self.names.iter().position(Option::is_none) {
                    Some(free) => {
                        self.names[free] = Some(kw.clone());
                        changed = true;
                        free
                    }
                    None => {
                        left.push(pos);
                        continue;
                    }
                },
            };
            mask |= 1 << idx;
        }
        (mask, changed, left)
    }

    /// Looks keywords up without allocating; `None` if any has no letter.
    #[cfg(test)]
    pub(crate) fn existing_mask(&self, keywords: &[Keyword]) -> Option<KeywordMask> {
        let mut mask = 0;
        for kw in keywords {
            mask |= 1 << self.letter_of(kw)?;
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

/// Most keywords without a letter one mailbox may have: the mailbox-wide bound less the 26
/// letters.
pub(crate) const MAX_EXTRA_KEYWORDS: usize = MAX_MAILBOX_KEYWORDS - MAX_KEYWORDS;

/// The keywords of a mailbox that have no letter, each with a small number (its id) that the
/// index stores per mail. Ids are handed out in order and never reused or renumbered, like
/// Dovecot's own keyword list in its index; names match case-insensitively, as IMAP keywords do.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExtraKeywords {
    names: Vec<Keyword>,
    ids: FastMap<String, u16>,
}

impl ExtraKeywords {
    /// The table as the index stored it (ids = positions).
    pub(crate) fn from_names(names: Vec<Keyword>) -> Self {
        let mut ids = FastMap::default();
        for (i, k) in names.iter().enumerate() {
            // A name twice (only by hand) keeps its first id for lookups; both ids still read.
            ids.entry(k.as_str().to_ascii_lowercase()).or_insert(i as u16);
        }
        Self { names, ids }
    }

    /// Every name, by id.
    pub(crate) fn names(&self) -> &[Keyword] {
        &self.names
    }

    /// Number of ids handed out.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// The keyword of an id (ids come from this table, so every one has a name).
    pub(crate) fn name(&self, id: u16) -> Option<&Keyword> {
        self.names.get(usize::from(id))
    }

    /// The id of a keyword, if it has one.
    pub(crate) fn id_of(&self, kw: &Keyword) -> Option<u16> {
        self.ids.get(&kw.as_str().to_ascii_lowercase()).copied()
    }

    /// The id of a keyword, handing out a new one if needed.
    pub(crate) fn id_for(&mut self, kw: &Keyword) -> StoreResult<u16> {
        if let Some(id) = self.id_of(kw) {
            return Ok(id);
        }
        if self.names.len() >= MAX_EXTRA_KEYWORDS {
            return Err(StoreError::Limit(format!(
                "cannot add keyword {kw}: a mailbox holds at most {MAX_MAILBOX_KEYWORDS} distinct keywords \
                 ({MAX_KEYWORDS} named in Maildir file names, the rest in mailreplica-index)"
            )));
        }
        let id = self.names.len() as u16;
        self.names.push(kw.clone());
        self.ids.insert(kw.as_str().to_ascii_lowercase(), id);
        Ok(id)
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
        let (mask, changed, left) = m.assign(&[kw("$Junk"), kw("Work")]);
        assert_eq!((mask, changed, left), (0b11, true, vec![]));
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
        let (mask, _, _) = r.assign(&[kw("New")]);
        assert_eq!(mask, 0b1000);
        assert_eq!(r.keywords(0b100), vec![kw("unknown-2")]);
        assert_eq!(r.existing_mask(&[kw("unknown-2")]), Some(0b100));
    }

    #[test]
    fn letters_run_out_after_26() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = KeywordMap::read(dir.path()).unwrap();
        let many: Vec<Keyword> = (0..25).map(|i| kw(&format!("k{i}"))).collect();
        m.assign(&many);
        // Three new ones and an old one: one letter is left, the other two get none.
        let (mask, changed, left) = m.assign(&[kw("x1"), kw("K3"), kw("x2"), kw("x3")]);
        assert_eq!(mask, 1 << 25 | 1 << 3);
        assert!(changed);
        assert_eq!(left, [2, 3]);
        let (_, changed, left) = m.assign(&[kw("x2")]);
        assert_eq!((changed, left), (false, vec![0]));
    }

    #[test]
    fn extra_keywords_table() {
        let mut t = ExtraKeywords::from_names(vec![kw("a1"), kw("b2")]);
        assert_eq!(t.id_of(&kw("B2")), Some(1));
        assert_eq!(t.id_for(&kw("c3")).unwrap(), 2);
        assert_eq!(t.id_for(&kw("A1")).unwrap(), 0);
        assert_eq!(t.name(2), Some(&kw("c3")));
        assert_eq!(t.len(), 3);
        for i in 3..MAX_EXTRA_KEYWORDS {
            t.id_for(&kw(&format!("n{i}"))).unwrap();
        }
        match t.id_for(&kw("too-many")) {
            Err(StoreError::Limit(msg)) => assert!(msg.contains("too-many") && msg.contains("1024"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // Known names still resolve at the limit.
        assert_eq!(t.id_for(&kw("c3")).unwrap(), 2);
    }
}
