//! Deleting a mailbox, or emptying INBOX, without losing a mail that arrives meanwhile.
//!
//! The contract ([`crate::store::MailStore::delete_mailbox`]): only mails that were in the
//! mailbox when we looked under its write lock are deleted. We wait for `dovecot-uidlist.lock`
//! like any writer (so a `doveadm save` holding it finishes first, and its lock file is never
//! pulled from under it), note the base names in `new/` and `cur/` and the uidlist's stamp, and
//! move the mail directories out of sight in one step. Writers that wait for the lock cannot
//! add mails meanwhile; a Dovecot delivery that does not get the lock still renames its file
//! into `new/`, so we look again where the directories went: a base name we had not seen, or a
//! changed uidlist, means a mail arrived, and everything is moved back and the deletion is
//! refused with [`StoreError::ChangedDuringDelete`] (Dovecot's "New mails were added to mailbox
//! during deletion"). After the move every writer works by path and finds nothing, so nothing
//! new can land where the directories went, except from a delivery that had looked them up
//! just before (a `rename` already past its path lookup): removal looks once more and removes
//! nothing if a stranger is there, deletes only the names it saw, and a directory that is not
//! empty afterwards is put back too. In that last case the seen mails already removed stay
//! removed, as asked (Dovecot's deletion expunges before it gives up, too); each is logged.
//!
//! Where the directories go follows Dovecot. Maildir++: the mailbox directory is renamed to
//! `..DOVECOT-TRASHED` in the root, or into `..DOVECOT-TRASHED/<host>.<pid>.<random>` when that
//! exists (`mailbox_list_delete_maildir_via_trash`); Dovecot's mailbox listing skips that name,
//! and removes it once its mtime is an hour old, so we touch the mailbox directory's mtime
//! before moving it. `LAYOUT=fs` (where a mailbox's directory also holds its children) is
//! deleted in place by Dovecot; we move `cur/` then `new/` into a hidden directory inside the
//! mailbox's own `tmp/`, which no listing shows and no `tmp/` cleaner removes (both skip
//! directories), and a mailbox without `cur/` does not exist for either tool.
//!
//! What was seen is kept as 64-bit hashes of the base names, keyed at random for each
//! deletion, in a sorted list that moves into a file once large ([`crate::runs::sort_pairs`],
//! [`FencedList`]): eight bytes a mail, not a set of names (which took some 140 bytes a mail
//! with its listings, 140 MiB to delete a mailbox of a million). The directories are read as
//! streams, never listed whole. A name that arrived is taken for a seen one only if its hash
//! equals one of the `n` seen names' hashes: with random keys, a chance of about `n / 2^64`
//! for each arrival (one in 18 trillion for a million mails), whatever the names.

use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::dotlock::Dotlock;
use super::filename;
use super::fsutil::{self, Stamp};
use super::uidlist;
use crate::fenced::{FencedList, split};
use crate::runs;
use crate::spill;
use crate::store::StoreError;
use crate::store::error::{IoContext, StoreResult};

/// Dovecot's trash directory for Maildir++ (`..` + `MAILBOX_LIST_MAILDIR_TRASH_DIR_NAME`).
pub(crate) const MAILDIRPP_TRASH: &str = "..DOVECOT-TRASHED";

/// What a mailbox held when we looked.
#[derive(Debug)]
pub(crate) struct Seen {
    /// The keyed hashes of the base names, sorted.
    bases: FencedList,
    keys: RandomState,
    uidlist: Option<Stamp>,
}

impl Seen {
    /// Base names in `mail_dir/new` and `mail_dir/cur` (missing directories are empty), and
    /// the stamp of `list_dir/dovecot-uidlist`. A large list moves into a file of `scratch`,
    /// which must not be a directory the deletion moves or removes.
    pub(crate) fn read(mail_dir: &Path, list_dir: &Path, scratch: &Path) -> StoreResult<Self> {
        let keys = RandomState::new();
        let mut failed = None;
        let hashes =
            Names::open(&mail_dir.join("new"))?.chain(Names::open(&mail_dir.join("cur"))?).map_while(|n| match n {
                Ok(name) => Some(split(keys.hash_one(filename::base(&name)))),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            });
        let sorted = runs::sort_pairs(spill::dir(scratch), hashes).ctx("sort the names of", mail_dir)?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Self { bases: FencedList::new(sorted), keys, uidlist: Stamp::read(&list_dir.join(uidlist::NAME))? })
    }

    /// Number of mails seen.
    pub(crate) fn len(&self) -> usize {
        self.bases.len()
    }

    /// True if a mail with this file name was seen (under any flags, in `new/` or `cur/`).
    fn has(&self, name: &str) -> bool {
        self.bases.contains(split(self.keys.hash_one(filename::base(name))))
    }

    /// True if `mail_dir` and `list_dir` hold nothing that was not seen here (the same
    /// uidlist, and no base name that was not seen).
    fn covers(&self, mail_dir: &Path, list_dir: &Path) -> StoreResult<bool> {
        Ok(!has_stranger(mail_dir, self)? && Stamp::read(&list_dir.join(uidlist::NAME))? == self.uidlist)
    }
}

/// The file names in a directory, without dot files, read as they come (none if the
/// directory does not exist). Names that are not UTF-8 are not mails to us and are skipped:
/// they stay, and keep the directory from being removed.
struct Names {
    dir: PathBuf,
    rd: Option<fs::ReadDir>,
}

impl Names {
    fn open(dir: &Path) -> StoreResult<Self> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("opendir", dir, e)),
        };
        Ok(Self { dir: dir.to_path_buf(), rd })
    }
}

impl Iterator for Names {
    type Item = StoreResult<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.rd.as_mut()?.next()? {
                Err(e) => {
                    self.rd = None;
                    return Some(Err(StoreError::io("readdir", &self.dir, e)));
                }
                Ok(e) => {
                    if let Ok(name) = e.file_name().into_string()
                        && !name.starts_with('.')
                    {
                        return Some(Ok(name));
                    }
                }
            }
        }
    }
}

/// Unlinks `dir/name`; a name already gone is not an error (a seen mail renamed meanwhile is
/// found by the next walk).
fn unlink(dir: &Path, name: &str) -> StoreResult<bool> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("unlink", dir.join(name), e)),
    }
}

/// `<host>.<pid>.<16 hex digits>`, as Dovecot names entries under its trash directory.
fn unique_name(hostname: &str) -> String {
    let mut r = [0u8; 8];
    crate::sys::random_bytes(&mut r);
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}.{}.{hex}", hostname.replace('/', "_"), std::process::id())
}

/// `rename` that never replaces an existing name.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), Errno> {
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
}

/// Moves `from` back to `to`; an empty directory that appeared at `to` meanwhile (created by
/// a process that found the mailbox half gone) is removed first.
fn move_back(from: &Path, to: &Path) -> StoreResult<()> {
    match rename_noreplace(from, to) {
        Err(Errno::EEXIST) if fs::remove_dir(to).is_ok() => {
            rename_noreplace(from, to).map_err(|e| StoreError::io("rename", from, io::Error::from(e)))
        }
        r => r.map_err(|e| StoreError::io("rename", from, io::Error::from(e))),
    }
}

/// Where a mailbox's mails went while it is being deleted.
#[derive(Debug)]
enum Moved {
    /// Maildir++: the whole directory, lock file included.
    Whole { home: PathBuf, trash: PathBuf },
    /// `LAYOUT=fs`: `cur/` and `new/` (those that existed) into `holder`.
    Parts { home: PathBuf, holder: PathBuf, subs: Vec<&'static str> },
}

impl Moved {
    /// The directory that now holds `new/` and `cur/`.
    fn mail_dir(&self) -> &Path {
        match self {
            Self::Whole { trash, .. } => trash,
            Self::Parts { holder, .. } => holder,
        }
    }

    /// The directory that now holds `dovecot-uidlist`.
    fn list_dir(&self) -> &Path {
        match self {
            Self::Whole { trash, .. } => trash,
            Self::Parts { home, .. } => home,
        }
    }

    /// Puts everything back where it was.
    fn restore(&self) -> StoreResult<()> {
        match self {
            Self::Whole { home, trash } => {
                // A process that still had the mailbox open may have recreated its directory
                // for index files meanwhile; without cur/ and new/ it holds no mail.
                if !home.join("cur").exists() && !home.join("new").exists() && home.is_dir() {
                    remove_dir_all_if_exists(home)?;
                }
                move_back(trash, home)
            }
            Self::Parts { home, holder, subs } => {
                for sub in subs.iter().rev() {
                    move_back(&holder.join(sub), &home.join(sub))?;
                }
                let _ = fs::remove_dir(holder);
                Ok(())
            }
        }
    }
}

/// Moves a Maildir++ mailbox directory to Dovecot's trash name in `root`.
fn move_to_trash(root: &Path, dir: &Path, hostname: &str) -> StoreResult<Moved> {
    // Dovecot's listing removes a trash directory whose mtime is an hour old: ours must look new.
    File::open(dir).ctx("open", dir)?.set_modified(SystemTime::now()).ctx("futimens", dir)?;
    let trash = root.join(MAILDIRPP_TRASH);
    for _ in 0..5 {
        match rename_noreplace(dir, &trash) {
            Ok(()) => return Ok(Moved::Whole { home: dir.to_path_buf(), trash }),
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => {}
            Err(e) => return Err(StoreError::io("rename", dir, io::Error::from(e))),
        }
        // Another deletion is in progress there, or one died: go below it, as Dovecot does.
        let below = trash.join(unique_name(hostname));
        match rename_noreplace(dir, &below) {
            Ok(()) => return Ok(Moved::Whole { home: dir.to_path_buf(), trash: below }),
            Err(Errno::ENOENT) if dir.exists() => continue, // the trash directory just went away
            Err(e) => return Err(StoreError::io("rename", dir, io::Error::from(e))),
        }
    }
    Err(StoreError::io("rename", dir, io::Error::other(format!("{} keeps changing", trash.display()))))
}

/// Moves `cur/` and then `new/` of a `LAYOUT=fs` mailbox into a hidden directory in its `tmp/`.
fn move_parts(dir: &Path, hostname: &str) -> StoreResult<Moved> {
    let tmp = dir.join("tmp");
    match fs::create_dir(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::io("mkdir", tmp, e)),
    }
    let holder = tmp.join(format!(".mailreplica-deleting.{}", unique_name(hostname)));
    fs::create_dir(&holder).ctx("mkdir", &holder)?;
    let mut moved = Moved::Parts { home: dir.to_path_buf(), holder: holder.clone(), subs: Vec::new() };
    for sub in ["cur", "new"] {
        match rename_noreplace(&dir.join(sub), &holder.join(sub)) {
            Ok(()) => {
                if let Moved::Parts { subs, .. } = &mut moved {
                    subs.push(sub);
                }
            }
            Err(Errno::ENOENT) => {}
            Err(e) => {
                let err = StoreError::io("rename", dir.join(sub), io::Error::from(e));
                moved.restore()?;
                return Err(err);
            }
        }
    }
    Ok(moved)
}

/// How many times the removal walks the directories before it gives up on emptying them
/// (a walk may miss a seen mail renamed during it, and the next one finds it).
const REMOVAL_WALKS: usize = 3;

/// Removes the mails `seen` holds from `mail_dir`'s `new/` and `cur/`, then those directories.
/// Returns false if anything else is there: having removed nothing if it was there when the
/// removal started, or only seen mails if it appeared during it (a delivery that had looked up
/// the directories before they moved can still rename its file into them). Each removed mail
/// is logged at trace level (`vname`), so that what went is known either way.
fn remove_seen_mails(mail_dir: &Path, seen: &Seen, vname: &str) -> StoreResult<bool> {
    for _ in 0..REMOVAL_WALKS {
        // A stranger anywhere: nothing (more) is removed.
        if has_stranger(mail_dir, seen)? {
            return Ok(false);
        }
        let mut emptied = true;
        for sub in ["new", "cur"] {
            let d = mail_dir.join(sub);
            for name in Names::open(&d)? {
                let name = name?;
                // One that arrived after the check above stays, and keeps the directory.
                if seen.has(&name) && unlink(&d, &name)? {
                    tracing::trace!(mailbox = vname, mail = %filename::base(&name), "deleted mail");
                }
            }
            // Dot files are never mails (no tool reads them as such); they must not keep the
            // directory from going.
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_name().as_encoded_bytes().starts_with(b".") && e.file_type().is_ok_and(|t| t.is_file()) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Something that arrived after the check, or a seen mail the walk missed.
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => emptied = false,
                Err(e) => return Err(StoreError::io("rmdir", &d, e)),
            }
        }
        if emptied {
            return Ok(true);
        }
    }
    Ok(false)
}

/// True if `mail_dir`'s `new/` or `cur/` holds a name `seen` does not.
fn has_stranger(mail_dir: &Path, seen: &Seen) -> StoreResult<bool> {
    for sub in ["new", "cur"] {
        for name in Names::open(&mail_dir.join(sub))? {
            if !seen.has(&name?) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn remove_dir_all_if_exists(path: &Path) -> StoreResult<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("rmdir", path, e)),
    }
}

/// Settings the deletion needs from the store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) hostname: &'a str,
    pub(crate) lock_wait: Duration,
    /// The name for messages.
    pub(crate) vname: &'a str,
}

/// Deletes the mailbox in `dir` (see the module documentation). `fs_layout`: its directory
/// also holds its children (`LAYOUT=fs`); else it is a Maildir++ mailbox under `root`.
/// `committed` runs once the deletion can no longer be refused (to log it); it returns
/// whether the mailbox's own directory was removed too (always for Maildir++; for `LAYOUT=fs`
/// only when it has no children).
pub(crate) fn delete_mailbox(
    root: &Path,
    dir: &Path,
    fs_layout: bool,
    env: Env<'_>,
    committed: impl FnOnce() -> StoreResult<()>,
) -> StoreResult<bool> {
    let lock = Dotlock::acquire(&dir.join(uidlist::NAME), env.hostname, env.lock_wait)?;
    // The root stays where it is while the mailbox's directories move.
    let seen = Seen::read(dir, dir, root)?;
    let moved = if fs_layout { move_parts(dir, env.hostname)? } else { move_to_trash(root, dir, env.hostname)? };
    let refuse = |moved: &Moved, lock: Dotlock, what: &str| -> StoreResult<bool> {
        tracing::warn!(mailbox = env.vname, "{what} while the mailbox was being deleted: kept it");
        if let Err(e) = moved.restore() {
            tracing::error!(
                mailbox = env.vname,
                "could not move the mailbox back from {}, where its mails now are: {e}",
                moved.mail_dir().display()
            );
            return Err(e);
        }
        lock.release()?; // back at its place
        Err(StoreError::ChangedDuringDelete(env.vname.to_owned()))
    };
    if !seen.covers(moved.mail_dir(), moved.list_dir())? {
        return refuse(&moved, lock, "new mails arrived");
    }
    if !remove_seen_mails(moved.mail_dir(), &seen, env.vname)? {
        return refuse(&moved, lock, "a file appeared");
    }
    tracing::debug!(mailbox = env.vname, mails = seen.len(), "deleted mailbox");
    committed()?;
    match moved {
        Moved::Whole { trash, .. } => {
            remove_dir_all_if_exists(&trash)?;
            lock.forget(); // it was inside
            // Our own trash entry is gone; the trash directory itself goes if it is empty.
            let _ = fs::remove_dir(root.join(MAILDIRPP_TRASH));
            fsutil::fsync_dir(root)?;
            Ok(true)
        }
        Moved::Parts { home, .. } => {
            // tmp/ (our holder is in it) and every file of the mailbox but the lock.
            remove_dir_all_if_exists(&home.join("tmp"))?;
            let lock_name = format!("{}.lock", uidlist::NAME);
            for e in fs::read_dir(&home).ctx("opendir", &home)? {
                let e = e.ctx("readdir", &home)?;
                if e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() != lock_name.as_str() {
                    match fs::remove_file(e.path()) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(err) => return Err(StoreError::io("unlink", e.path(), err)),
                    }
                }
            }
            lock.release()?;
            let removed = fs::remove_dir(&home).is_ok(); // not if it has children
            if let Some(parent) = home.parent() {
                fsutil::fsync_dir(parent)?;
            }
            Ok(removed)
        }
    }
}

/// Empties INBOX in `dir`: removes the mails seen under the lock, then, unless others arrived
/// meanwhile, the files that give it its identity (`forget`: uidlist, keywords, our index).
pub(crate) fn clear_mailbox(dir: &Path, forget: &[&str], env: Env<'_>) -> StoreResult<()> {
    let lock = Dotlock::acquire(&dir.join(uidlist::NAME), env.hostname, env.lock_wait)?;
    let seen = Seen::read(dir, dir, dir)?;
    // Twice: the second walk finds seen mails renamed (a flag change, new/ to cur/) while the
    // first removed the others.
    for _ in 0..2 {
        for sub in ["new", "cur"] {
            let d = dir.join(sub);
            for name in Names::open(&d)? {
                let name = name?;
                if seen.has(&name) {
                    unlink(&d, &name)?;
                } // else it arrived after we looked: kept
            }
        }
    }
    for sub in ["new", "cur"] {
        fsutil::fsync_dir(&dir.join(sub))?;
    }
    let mut arrived = false;
    for sub in ["new", "cur"] {
        arrived |= Names::open(&dir.join(sub))?.next().transpose()?.is_some();
    }
    if arrived || Stamp::read(&dir.join(uidlist::NAME))? != seen.uidlist {
        tracing::warn!(mailbox = env.vname, "new mails arrived while the mailbox was being emptied: kept them");
        lock.release()?;
        return Err(StoreError::ChangedDuringDelete(env.vname.to_owned()));
    }
    for f in forget {
        match fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("unlink", dir.join(f), e)),
        }
    }
    fsutil::fsync_dir(dir)?;
    lock.release()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(root: &Path, name: &str, mails: &[&str]) -> PathBuf {
        let dir = root.join(name);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        fs::write(dir.join(uidlist::NAME), "3 V1 N1 G42d01a2e9bb20a6b6454000083ecc375\n").unwrap();
        for m in mails {
            fs::write(dir.join("cur").join(m), b"x").unwrap();
        }
        dir
    }

    fn env() -> Env<'static> {
        Env { hostname: "h", lock_wait: Duration::from_secs(5), vname: "Box" }
    }

    #[test]
    fn maildirpp_delete_and_trash_below_an_existing_one() {
        let root = tempfile::tempdir().unwrap();
        // A trash directory left by someone else: we go below it and leave it be.
        fs::create_dir_all(root.path().join(MAILDIRPP_TRASH).join("leftover")).unwrap();
        let dir = mailbox(root.path(), ".Box", &["1.M1P1.h:2,S", "2.M1P1.h"]);
        let mut logged = false;
        assert!(
            delete_mailbox(root.path(), &dir, false, env(), || {
                logged = true;
                Ok(())
            })
            .unwrap()
        );
        assert!(logged);
        assert!(!dir.exists());
        let trash: Vec<_> = fs::read_dir(root.path().join(MAILDIRPP_TRASH)).unwrap().flatten().collect();
        assert_eq!(trash.len(), 1, "only the leftover remains");
    }

    #[test]
    fn dot_files_do_not_block_a_deletion() {
        let root = tempfile::tempdir().unwrap();
        let dir = mailbox(root.path(), ".Box", &["1.M1P1.h:2,S"]);
        fs::write(dir.join("cur/.hidden"), b"x").unwrap();
        delete_mailbox(root.path(), &dir, false, env(), || Ok(())).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn fs_layout_keeps_children_and_the_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = mailbox(root.path(), "Box", &["1.M1P1.h:2,S"]);
        mailbox(&dir, "Child", &["3.M1P1.h"]);
        assert!(!delete_mailbox(root.path(), &dir, true, env(), || Ok(())).unwrap());
        assert!(dir.join("Child/cur/3.M1P1.h").exists());
        for gone in ["cur", "new", "tmp", uidlist::NAME, "dovecot-uidlist.lock"] {
            assert!(!dir.join(gone).exists(), "{gone}");
        }
    }

    #[test]
    fn an_unseen_file_in_the_moved_directory_restores_everything() {
        let root = tempfile::tempdir().unwrap();
        let dir = mailbox(root.path(), ".Box", &["1.M1P1.h:2,S"]);
        let seen = Seen::read(&dir, &dir, root.path()).unwrap();
        let moved = move_to_trash(root.path(), &dir, "h").unwrap();
        // A mail that came in just before the move (into cur/, behind the seen one there).
        fs::write(moved.mail_dir().join("cur/9.M1P1.h:2,"), b"late").unwrap();
        assert!(!seen.covers(moved.mail_dir(), moved.list_dir()).unwrap());
        assert!(!remove_seen_mails(moved.mail_dir(), &seen, "Box").unwrap());
        assert!(moved.mail_dir().join("cur/1.M1P1.h:2,S").exists(), "nothing goes when a stranger is there");
        moved.restore().unwrap();
        assert!(dir.join("cur/9.M1P1.h:2,").exists());
        assert!(dir.join("cur/1.M1P1.h:2,S").exists());
        assert!(dir.join(uidlist::NAME).exists());
        // fs layout: parts move and come back.
        let dir = mailbox(root.path(), "Fs", &["1.M1P1.h"]);
        let moved = move_parts(&dir, "h").unwrap();
        assert!(!dir.join("cur").exists() && !dir.join("new").exists());
        fs::create_dir(dir.join("new")).unwrap(); // recreated empty by someone meanwhile
        moved.restore().unwrap();
        assert!(dir.join("cur/1.M1P1.h").exists());
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    }

    /// Enough mails for several sorted pieces and fenced blocks (the unit tests' spill
    /// threshold is 0: the seen hashes are in a file).
    #[test]
    fn a_large_mailbox_goes_and_one_stranger_keeps_it_whole() {
        let root = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..5000).map(|i| format!("{}.M{i}P7.h,S=1:2,{}", 1_700_000_000 + i, "S")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let dir = mailbox(root.path(), ".Big", &refs);
        // Renamed after it was seen (new flags): still the same mail, and removed.
        let seen = Seen::read(&dir, &dir, root.path()).unwrap();
        assert_eq!(seen.len(), 5000);
        fs::rename(dir.join("cur").join(&names[17]), dir.join("cur/1700000017.M17P7.h,S=1:2,FS")).unwrap();
        assert!(seen.has("1700000017.M17P7.h,S=1:2,FS"));
        assert!(!seen.has("1700000017.M17P8.h,S=1:2,S"));
        let moved = move_to_trash(root.path(), &dir, "h").unwrap();
        assert!(seen.covers(moved.mail_dir(), moved.list_dir()).unwrap());
        assert!(remove_seen_mails(moved.mail_dir(), &seen, "Big").unwrap());
        assert!(!moved.mail_dir().join("cur").exists());
        moved.restore().unwrap();

        // The same again with one name nobody saw, deep in the list: nothing goes.
        let dir = mailbox(root.path(), ".Big2", &refs);
        let seen = Seen::read(&dir, &dir, root.path()).unwrap();
        let moved = move_to_trash(root.path(), &dir, "h").unwrap();
        fs::write(moved.mail_dir().join("new/1700002500.M99999P7.h"), b"late").unwrap();
        assert!(!seen.covers(moved.mail_dir(), moved.list_dir()).unwrap());
        assert!(!remove_seen_mails(moved.mail_dir(), &seen, "Big2").unwrap());
        assert_eq!(Names::open(&moved.mail_dir().join("cur")).unwrap().count(), 5000);
        moved.restore().unwrap();
        assert!(dir.join("new/1700002500.M99999P7.h").exists());
        // Looked at under the lock, the late mail is one of those seen: now everything goes.
        assert!(delete_mailbox(root.path(), &dir, false, env(), || Ok(())).unwrap());
        assert!(!dir.exists());
    }

    #[test]
    fn clear_removes_mails_and_identity() {
        let root = tempfile::tempdir().unwrap();
        let dir = mailbox(root.path(), "INBOX", &["1.M1P1.h:2,S", "2.M1P1.h:2,"]);
        clear_mailbox(&dir, &[uidlist::NAME], env()).unwrap();
        assert!(!dir.join(uidlist::NAME).exists());
        assert_eq!(Names::open(&dir.join("cur")).unwrap().count(), 0);
    }
}
