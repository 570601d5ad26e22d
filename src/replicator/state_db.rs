//! The replicator's per-user records on disk, and the import of Dovecot 2.3's `replicator.db`.
//!
//! One file per user under `<state_dir>/users/`, named by the hex of the user name (any byte
//! may be in a name; none reaches a path unescaped). Each is replaced whole: written to a
//! temporary file, fsynced, renamed over the old one, and the directory fsynced, so a crash or
//! a power loss at any moment leaves the old record or the new one, never a torn one (2.3
//! rewrote one `replicator.db` in place every 15 minutes and lost everything since on a
//! crash). A leftover temporary file is ignored and removed at the next load.
//!
//! The format is Dovecot's `replicator.db` line with a version in front, so that the import
//! and our own records share one parser: `v1`, then the user, priority, last update, last
//! fast sync, last full sync, failed (0/1, or our count of failures), the dsync state and the
//! last success, TAB-separated and tab-escaped as Dovecot escapes them; then one field of ours,
//! which `replicator.db` does not have: 1 when the next sync must be a full one (a
//! `replicate --full` still owed survives a restart).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::queue::{Priority, UserRecord};
use crate::tabescape::{escape as tab_escape, unescape_strict as tab_unescape};

/// The most a record file may hold: a dsync state carries 44 bytes per mailbox, so this is
/// room for some 100,000 mailboxes. A larger file is refused, not read.
const MAX_RECORD: u64 = 8 << 20;
/// The most lines `replicator.db` may have.
const MAX_IMPORT_USERS: usize = 10_000_000;

/// A record or `replicator.db` that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The contents are not a record.
    #[error("{path}: line {line}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_owned(), source }
}

/// The records of one state directory.
pub struct StateDir {
    users: PathBuf,
}

impl StateDir {
    /// Opens (and creates, mode 0700) `<state_dir>/users`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let users = state_dir.join("users");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&users).map_err(io_err(&users))?;
        Ok(Self { users })
    }

    fn path_of(&self, user: &str) -> PathBuf {
        let hex: String = user.bytes().map(|b| format!("{b:02x}")).collect();
        self.users.join(format!("{hex}.user"))
    }

    /// Replaces `rec`'s file atomically and durably.
    pub fn save(&self, rec: &UserRecord) -> Result<(), StateError> {
        self.save_all(std::slice::from_ref(rec))
    }

    /// Replaces many records at once (an import): each file written and fsynced, then renamed into
    /// place, and the directory fsynced once for all of them.
    pub fn save_all(&self, recs: &[UserRecord]) -> Result<(), StateError> {
        for rec in recs {
            let path = self.path_of(&rec.user);
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let write = || -> io::Result<()> {
                let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
                f.write_all(encode(rec).as_bytes())?;
                f.sync_all()?;
                fs::rename(&tmp, &path)
            };
            write().map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err(&path)(e)
            })?;
        }
        fs::File::open(&self.users).and_then(|d| d.sync_all()).map_err(io_err(&self.users))
    }

    /// Removes a user's record (durably).
    pub fn remove(&self, user: &str) -> Result<(), StateError> {
        let path = self.path_of(user);
        match fs::remove_file(&path) {
            Ok(()) => fs::File::open(&self.users).and_then(|d| d.sync_all()).map_err(io_err(&self.users)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Removes the temporary files of saves whose writer died before the rename (a SIGKILL,
    /// a power loss): the service's first step. A file whose writer still runs (this process,
    /// or any live one, say a service started by mistake twice) is left alone: removing it
    /// would make that save fail.
    pub fn remove_leftovers(&self) -> Result<usize, StateError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.users).map_err(io_err(&self.users))? {
            let entry = entry.map_err(io_err(&self.users))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some((_, pid)) = name.rsplit_once(".tmp.") else { continue };
            let alive =
                pid.parse::<u32>().is_ok_and(|p| p == std::process::id() || Path::new(&format!("/proc/{p}")).exists());
            if !alive && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every record; temporary files are skipped (see [`StateDir::remove_leftovers`]). A
    /// record that cannot be read is an error naming it (the admin decides; it is not
    /// silently dropped).
    pub fn load(&self) -> Result<Vec<UserRecord>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.users).map_err(io_err(&self.users))? {
            let entry = entry.map_err(io_err(&self.users))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // A save in flight (or one whose writer died: see `remove_leftovers`).
            if name.contains(".tmp.") {
                continue;
            }
            if !name.ends_with(".user") {
                continue;
            }
            let meta = entry.metadata().map_err(io_err(&path))?;
            if meta.len() > MAX_RECORD {
                return Err(StateError::Corrupt { path, line: 1, why: format!("{} bytes: too large", meta.len()) });
            }
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            let line = text.strip_suffix('\n').unwrap_or(&text);
            let rec = line
                .strip_prefix("v1\t")
                .ok_or_else(|| "not a v1 record".to_owned())
                .and_then(|l| parse_fields(l, true))
                .map_err(|why| StateError::Corrupt { path: path.clone(), line: 1, why })?;
            if self.path_of(&rec.user) != path {
                return Err(StateError::Corrupt { path, line: 1, why: format!("holds user {:?}", rec.user) });
            }
            out.push(rec);
        }
        out.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(out)
    }
}

/// Our record file's text for `rec`.
fn encode(rec: &UserRecord) -> String {
    format!(
        "v1\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
        tab_escape(&rec.user),
        rec.priority as u32,
        rec.last_update,
        rec.last_fast_sync,
        rec.last_full_sync,
        rec.failures,
        tab_escape(&rec.state),
        rec.last_success,
        u8::from(rec.force_full)
    )
}

/// Reads Dovecot 2.3's `replicator.db` (`replicator_queue_import`): one user per line,
/// at least 7 fields, the 8th (last successful sync) optional. Dovecot stops at the first
/// bad line; so do we, with its number, and nothing is imported then.
pub fn import_replicator_db(path: &Path, text: &str) -> Result<Vec<UserRecord>, StateError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if out.len() == MAX_IMPORT_USERS {
            return Err(StateError::Corrupt { path: path.to_owned(), line: i + 1, why: "too many users".into() });
        }
        let mut rec =
            parse_fields(line, false).map_err(|why| StateError::Corrupt { path: path.to_owned(), line: i + 1, why })?;
        // 2.3's sixth field is a flag (whose failed syncs also threw the state away).
        rec.failures = rec.failures.min(1);
        out.push(rec);
    }
    Ok(out)
}

/// One record's fields; `ours` allows the ninth field (the owed full sync), which
/// `replicator.db` never has.
fn parse_fields(line: &str, ours: bool) -> Result<UserRecord, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let most = if ours { 9 } else { 8 };
    if f.len() < 7 || f.len() > most {
        return Err(format!("{} fields, 7 to {most} wanted", f.len()));
    }
    let num = |i: usize, what: &str| f[i].parse::<u64>().map_err(|_| format!("{what} {:?} is not a number", f[i]));
    let user = tab_unescape(f[0])?;
    if user.is_empty() {
        return Err("empty user name".into());
    }
    let priority = u32::try_from(num(1, "priority")?)
        .ok()
        .and_then(Priority::from_number)
        .ok_or_else(|| format!("priority {:?} is not 0-3", f[1]))?;
    Ok(UserRecord {
        user,
        priority,
        last_update: num(2, "last update")?,
        last_fast_sync: num(3, "last fast sync")?,
        last_full_sync: num(4, "last full sync")?,
        failures: u32::try_from(num(5, "failed")?).map_err(|_| format!("failed {:?} is too large", f[5]))?,
        force_full: match f.get(8) {
            None | Some(&"0") => false,
            Some(&"1") => true,
            Some(x) => return Err(format!("full sync owed {x:?} is not 0 or 1")),
        },
        state: tab_unescape(f[6])?,
        last_success: if f.len() >= 8 { num(7, "last successful sync")? } else { 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_leftovers_of_dead_writers_are_removed_and_loading_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let users = dir.path().join("users");
        let dead = users.join("616c696365.user.tmp.99999999");
        let mine = users.join(format!("626f62.user.tmp.{}", std::process::id()));
        fs::write(&dead, "v1\thalf").unwrap();
        fs::write(&mine, "v1\tbeing written").unwrap();
        assert!(sd.load().unwrap().is_empty());
        assert!(dead.exists() && mine.exists(), "loading (say, a poller) must not break a save in flight");
        assert_eq!(sd.remove_leftovers().unwrap(), 1);
        assert!(!dead.exists() && mine.exists());
    }

    #[test]
    fn dovecots_replicator_db_imports() {
        // The sample a clean stop of Dovecot 2.3.19's replicator wrote, and a 7-field line
        // of an older one, and a failed user whose state 2.3 threw away.
        let text = "bob\t0\t1795866217\t1795866217\t1795866130\t0\tAQAAAKsF\t1795866217\n\
                    a\x01tb\t2\t10\t9\t8\t0\tS\x01n\n\
                    carol\t1\t5\t4\t3\t1\t\t2\n";
        let recs = import_replicator_db(Path::new("replicator.db"), text).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(
            recs[0],
            UserRecord {
                user: "bob".into(),
                priority: Priority::None,
                last_update: 1_795_866_217,
                last_fast_sync: 1_795_866_217,
                last_full_sync: 1_795_866_130,
                last_success: 1_795_866_217,
                failures: 0,
                force_full: false,
                state: "AQAAAKsF".into(),
            }
        );
        assert_eq!((recs[1].user.as_str(), recs[1].priority, recs[1].state.as_str()), ("a\tb", Priority::High, "S\n"));
        assert_eq!(recs[1].last_success, 0);
        assert!(recs[2].failures == 1 && recs[2].state.is_empty() && recs[2].last_success == 2);
    }

    #[test]
    fn a_bad_line_imports_nothing_and_says_where() {
        for (bad, why) in [
            ("u\t0\t1\t2\t3\t0\n", "6 fields"),
            ("u\t9\t1\t2\t3\t0\ts\n", "priority"),
            ("u\t0\tx\t2\t3\t0\ts\n", "last update"),
            ("u\t0\t1\t2\t3\t0\ts\x01x\n", "bad escape"),
            ("\t0\t1\t2\t3\t0\ts\n", "empty user"),
            ("u\t0\t1\t2\t3\t0\ts\t4\t1\n", "9 fields"),
        ] {
            let text = format!("ok\t0\t1\t2\t3\t0\ts\n{bad}");
            let e = import_replicator_db(Path::new("db"), &text).unwrap_err().to_string();
            assert!(e.starts_with("db: line 2: ") && e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn records_round_trip_and_replace_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let odd = "../we\tird/\x01user\n";
        let mut rec = UserRecord {
            user: odd.into(),
            priority: Priority::Sync,
            last_update: 1,
            last_fast_sync: 2,
            last_full_sync: 3,
            last_success: 4,
            failures: 7,
            force_full: false,
            state: "AQAA\tx".into(),
        };
        sd.save(&rec).unwrap();
        sd.save(&UserRecord { user: "bob".into(), ..Default::default() }).unwrap();
        assert_eq!(sd.load().unwrap()[0], rec, "sorted by name: '.' before 'b'");
        rec.state = "newer".into();
        rec.force_full = true;
        sd.save(&rec).unwrap();
        let all = sd.load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].state, "newer");
        assert!(all[0].force_full, "an owed full sync is kept");
        assert!(!all[1].force_full);
        // A record written before the ninth field existed still loads.
        fs::write(sd.path_of("carol"), "v1\tcarol\t0\t1\t2\t3\t0\ts\t4\n").unwrap();
        assert!(sd.load().unwrap().iter().any(|r| r.user == "carol" && !r.force_full && r.last_success == 4));
        fs::remove_file(sd.path_of("carol")).unwrap();
        // Every file is inside users/, named by hex: nothing of the name reaches a path.
        for e in fs::read_dir(dir.path().join("users")).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(n.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.' || b.is_ascii_lowercase()), "{n}");
        }
        sd.remove("bob").unwrap();
        sd.remove("bob").unwrap();
        assert_eq!(sd.load().unwrap(), [rec]);
    }

    #[test]
    fn a_crash_leaves_old_or_new_and_torn_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let rec = UserRecord { user: "alice".into(), state: "good".into(), ..Default::default() };
        sd.save(&rec).unwrap();
        // A crash between the write and the rename leaves a temporary file (its writer, here a
        // pid above any pid_max, is gone): ignored, and removed at the next start.
        let tmp = sd.path_of("alice").with_extension("tmp.99999999");
        fs::write(&tmp, "v1\tali").unwrap();
        assert_eq!(sd.load().unwrap(), [rec]);
        assert_eq!(sd.remove_leftovers().unwrap(), 1);
        assert!(!tmp.exists());
        // A record damaged by other hands is an error naming the file, not a silent loss.
        fs::write(sd.path_of("alice"), "v1\talice\t0\n").unwrap();
        let e = sd.load().unwrap_err().to_string();
        assert!(e.contains(&sd.path_of("alice").display().to_string()) && e.contains("fields"), "{e}");
        // A record under another user's name is refused.
        fs::write(sd.path_of("alice"), encode(&UserRecord { user: "mallory".into(), ..Default::default() })).unwrap();
        assert!(sd.load().unwrap_err().to_string().contains("mallory"));
    }
}
