//! Configuration: `/etc/mailreplica/mailreplica.toml` (or `-c FILE`) plus `-o key=value`
//! overrides, with Dovecot's setting names where the meaning is the same.
//!
//! Parsing has no side effects beyond reading the file: every key is checked against the
//! table of known settings, and an unknown key or a bad value is an error that names the file,
//! the line and the key (or the `-o` argument).

mod keys;
mod mail_location;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use keys::{KEYS, KeyDoc};
pub use mail_location::{MailLocation, MailLocationError, expand as expand_path};

use crate::userdb::Userdb;

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/mailreplica/mailreplica.toml";

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where mail lives, in Dovecot's syntax (`maildir:~/Maildir[:LAYOUT=fs][:INBOX=…]`).
    pub mail_location: MailLocation,
    /// Where users come from.
    pub userdb: Userdb,
    /// Lowest UID allowed to own mail (Dovecot's `first_valid_uid`).
    pub first_valid_uid: u32,
    /// Highest UID allowed to own mail; 0 = no limit (Dovecot's `last_valid_uid`).
    pub last_valid_uid: u32,
    /// Host name used in lock files, new file names and the dsync handshake.
    pub hostname: Option<String>,
    /// Longest wait for a mailbox lock (Dovecot's `mail_max_lock_timeout`; 0 = Dovecot's default
    /// of 122 seconds).
    pub mail_max_lock_timeout: Duration,
    /// The SSH client's settings (`remote:` and `remoteprefix:` destinations).
    pub ssh: SshConfig,
    /// The `[replicator]` table.
    pub replicator: ReplicatorConfig,
}

/// The `[replicator]` table: `mailreplica replicator`'s settings (`-o replicator.KEY=VALUE`
/// overrides one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatorConfig {
    /// `destination`: where every user is synced to, any destination `sync` takes.
    pub destination: Option<String>,
    /// `users`: the users replicated (absent: every userdb user within
    /// first_valid_uid..last_valid_uid).
    pub users: Option<Vec<String>>,
    /// `state_dir`: where the per-user records live.
    pub state_dir: PathBuf,
    /// `max_parallel`: syncs at once.
    pub max_parallel: u32,
    /// `full_sync_interval`: every user gets a full sync this often.
    pub full_sync_interval: Duration,
    /// `retry_min`: the first retry after a failure waits this long; each further one doubles.
    pub retry_min: Duration,
    /// `retry_max`: no retry waits longer.
    pub retry_max: Duration,
    /// `sync_timeout`: a sync whose stream stalls this long fails (`sync -T`).
    pub sync_timeout: Duration,
    /// `admin_socket`: the `replicator-doveadm` socket (`doveadm replicator -a PATH`, and our
    /// `replicate` and `replicator status`).
    pub admin_socket: PathBuf,
    /// `plugin_fifo`: serve Dovecot 2.3's `replication-notify-fifo` here (absent: not served).
    pub plugin_fifo: Option<PathBuf>,
    /// `plugin_socket`: serve Dovecot 2.3's `replication-notify` socket here (absent: not served).
    pub plugin_socket: Option<PathBuf>,
    /// `plugin_mode`: the mode of those two (mail processes of every user write to them).
    pub plugin_mode: u32,
    /// `watch`: watch every user's Maildir (the change feed without a plugin).
    pub watch: bool,
    /// `watch_with`: `auto` (fanotify where possible, else inotify), `fanotify` or `inotify`.
    pub watch_with: crate::replicator::watcher::Method,
    /// `doveadm`: the command line (words) that syncs users whose mail is in a format our
    /// store does not read (sdbox, mdbox, …): `doveadm sync` is run with it.
    pub doveadm: Vec<String>,
}

impl Default for ReplicatorConfig {
    fn default() -> Self {
        Self {
            destination: None,
            users: None,
            state_dir: PathBuf::from("/var/lib/mailreplica"),
            max_parallel: 4,
            full_sync_interval: Duration::from_secs(24 * 3600),
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            sync_timeout: Duration::from_secs(600),
            admin_socket: PathBuf::from("/run/mailreplica/replicator-doveadm"),
            plugin_fifo: None,
            plugin_socket: None,
            plugin_mode: 0o666,
            watch: false,
            watch_with: crate::replicator::watcher::Method::Auto,
            doveadm: vec!["doveadm".to_owned()],
        }
    }
}

/// Settings of the embedded SSH client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    /// `ssh_key`: the private key file (default: `~/.ssh/id_ed25519` and `~/.ssh/id_rsa` of the
    /// running user, those that exist, then ssh-agent).
    pub key: Option<PathBuf>,
    /// `ssh_key_passphrase_file`: a file whose first line is the key's passphrase.
    pub key_passphrase_file: Option<PathBuf>,
    /// `ssh_known_hosts`: the known_hosts file (default: the running user's
    /// `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// `ssh_user`: the login when the destination names none (default: `root` for
    /// `remoteprefix:`, the running user for `remote:`).
    pub user: Option<String>,
    /// `ssh_port`: the port when the destination names none.
    pub port: u16,
    /// `ssh_connect_timeout`: time to connect, check the host key and log in.
    pub connect_timeout: Duration,
    /// `dsync_remote_cmd`: the command run on the server (`%u` is the user). A Dovecot-style
    /// value starting with `ssh … %{host}` is accepted: what follows the host is the command.
    pub dsync_remote_cmd: String,
}

/// The remote command doveadm runs by default (its `dsync_remote_cmd` without the `ssh` part).
pub const DEFAULT_DSYNC_REMOTE_CMD: &str = "doveadm dsync-server -u%u -U";

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            key: None,
            key_passphrase_file: None,
            known_hosts: None,
            user: None,
            port: 22,
            connect_timeout: Duration::from_secs(30),
            dsync_remote_cmd: DEFAULT_DSYNC_REMOTE_CMD.to_owned(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mail_location: MailLocation::parse("maildir:~/Maildir").expect("the default is valid"),
            userdb: Userdb::Passwd,
            first_valid_uid: 500,
            last_valid_uid: 0,
            hostname: None,
            mail_max_lock_timeout: Duration::ZERO,
            ssh: SshConfig::default(),
            replicator: ReplicatorConfig::default(),
        }
    }
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a configuration file.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// A `-o key=value` argument.
    Override(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line } => write!(f, "{} line {line}", path.display()),
            Self::Override(arg) => write!(f, "-o {arg}"),
        }
    }
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (it names the line and column).
        message: String,
    },
    /// A key that is not a setting.
    #[error("{origin}: unknown setting `{key}`")]
    UnknownKey {
        /// Where.
        origin: Origin,
        /// The key.
        key: String,
    },
    /// A value that does not fit the setting.
    #[error("{origin}: bad value for `{key}`: {reason}")]
    BadValue {
        /// Where.
        origin: Origin,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A `-o` argument without `=`.
    #[error("-o {0}: expected key=value")]
    BadOverride(String),
}

/// A setting's value before it is interpreted: TOML gives typed values, `-o` gives text.
enum Raw<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl Raw<'_> {
    fn string(&self) -> Result<String, String> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Ok(s.clone()),
            Raw::Toml(v) => Err(format!("expected a string, got {}", v.type_str())),
            Raw::Text(s) => Ok((*s).to_owned()),
        }
    }

    fn u32(&self) -> Result<u32, String> {
        match self {
            Raw::Toml(toml::Value::Integer(i)) => u32::try_from(*i).map_err(|_| format!("{i} is out of range")),
            Raw::Toml(v) => Err(format!("expected an integer, got {}", v.type_str())),
            Raw::Text(s) => s.trim().parse().map_err(|_| format!("{s:?} is not a number")),
        }
    }

    /// An absolute path.
    fn path(&self) -> Result<PathBuf, String> {
        let s = self.string()?;
        let p = PathBuf::from(&s);
        if !p.is_absolute() {
            return Err(format!("{s:?} is not an absolute path"));
        }
        Ok(p)
    }

    /// A list of strings (TOML array; `-o`: comma-separated).
    fn strings(&self) -> Result<Vec<String>, String> {
        match self {
            Raw::Toml(toml::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| format!("expected strings, got {}", v.type_str())))
                .collect(),
            Raw::Toml(v) => Err(format!("expected an array of strings, got {}", v.type_str())),
            Raw::Text(s) => Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()),
        }
    }

    fn bool(&self) -> Result<bool, String> {
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Toml(v) => Err(format!("expected true or false, got {}", v.type_str())),
            Raw::Text("true" | "yes") => Ok(true),
            Raw::Text("false" | "no") => Ok(false),
            Raw::Text(s) => Err(format!("{s:?} is not true or false")),
        }
    }

    /// A file mode, as an octal string (`"0666"`).
    fn mode(&self) -> Result<u32, String> {
        let s = self.string()?;
        u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("{s:?} is not an octal file mode like \"0666\""))
    }

    fn duration(&self) -> Result<Duration, String> {
        match self {
            Raw::Toml(toml::Value::Integer(i)) => {
                u64::try_from(*i).map(Duration::from_secs).map_err(|_| format!("{i} is out of range"))
            }
            Raw::Toml(toml::Value::String(s)) => parse_duration(s),
            Raw::Toml(v) => Err(format!("expected seconds or a duration string, got {}", v.type_str())),
            Raw::Text(s) => parse_duration(s),
        }
    }
}

/// Parses `30`, `30s`, `30 secs`, `5 mins`, `1h` (Dovecot's time units).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
    let mult = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86400,
        u => return Err(format!("unknown time unit {u:?}")),
    };
    Ok(Duration::from_secs(n * mult))
}

impl Config {
    /// Loads the configuration: `path` if given (it must exist), else the default file if it
    /// exists, else the defaults; then applies the `-o` overrides in order.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
        };
        if let Some(file) = file {
            let text =
                std::fs::read_to_string(&file).map_err(|e| ConfigError::Read { path: file.clone(), source: e })?;
            cfg.apply_toml(&text, &file)?;
        }
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            cfg.set(k.trim(), Raw::Text(v), Origin::Override(o.clone()))?;
        }
        Ok(cfg)
    }

    /// Applies the settings of a TOML document.
    pub fn apply_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: path.to_path_buf(), message: e.to_string() })?;
        let line_of = |offset: usize| text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1;
        for (k, v) in &table {
            let origin = Origin::File { path: path.to_path_buf(), line: line_of(k.span().start) };
            if let ("replicator", toml::Value::Table(t)) = (k.get_ref().as_str(), v.get_ref()) {
                // The table's keys, each with the line that sets it (the first after the
                // table's header that starts with the key).
                let from = k.span().start;
                for (key, value) in t {
                    let at = text[from..]
                        .split_inclusive('\n')
                        .scan(from, |pos, l| {
                            let here = *pos;
                            *pos += l.len();
                            Some((here, l))
                        })
                        .find(|(_, l)| {
                            l.trim_start().strip_prefix(key.as_str()).is_some_and(|r| r.trim_start().starts_with('='))
                        })
                        .map_or(from, |(p, _)| p);
                    let origin = Origin::File { path: path.to_path_buf(), line: line_of(at) };
                    self.set(&format!("replicator.{key}"), Raw::Toml(value), origin)?;
                }
                continue;
            }
            self.set(k.get_ref(), Raw::Toml(v.get_ref()), origin)?;
        }
        Ok(())
    }

    fn set(&mut self, key: &str, raw: Raw<'_>, origin: Origin) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::BadValue { origin: origin.clone(), key: key.to_owned(), reason };
        match key {
            "mail_location" => {
                // Another format loads (the replicator hands its users to doveadm sync); our
                // store refuses it when it is opened.
                self.mail_location =
                    MailLocation::parse_any(&raw.string().map_err(bad)?).map_err(|e| bad(e.to_string()))?;
            }
            "userdb" => self.userdb = Userdb::parse(&raw.string().map_err(bad)?).map_err(bad)?,
            "first_valid_uid" => self.first_valid_uid = raw.u32().map_err(bad)?,
            "last_valid_uid" => self.last_valid_uid = raw.u32().map_err(bad)?,
            "hostname" => {
                let h = raw.string().map_err(bad)?;
                if h.is_empty() || h.contains(['/', ' ', '\t', '\n', ':']) {
                    return Err(bad("must be a plain host name".to_owned()));
                }
                self.hostname = Some(h);
            }
            "mail_max_lock_timeout" => self.mail_max_lock_timeout = raw.duration().map_err(bad)?,
            "ssh_key" => self.ssh.key = Some(raw.path().map_err(bad)?),
            "ssh_key_passphrase_file" => self.ssh.key_passphrase_file = Some(raw.path().map_err(bad)?),
            "ssh_known_hosts" => self.ssh.known_hosts = Some(raw.path().map_err(bad)?),
            "ssh_user" => {
                let u = raw.string().map_err(bad)?;
                if u.is_empty() || u.contains(|c: char| c.is_whitespace() || c.is_control() || c == '@') {
                    return Err(bad("must be a plain login name".to_owned()));
                }
                self.ssh.user = Some(u);
            }
            "ssh_port" => {
                let p = raw.u32().map_err(bad)?;
                self.ssh.port =
                    u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| bad(format!("{p} is not a port")))?;
            }
            "ssh_connect_timeout" => {
                let d = raw.duration().map_err(bad)?;
                if d.is_zero() {
                    return Err(bad("must be at least 1 second".to_owned()));
                }
                self.ssh.connect_timeout = d;
            }
            "dsync_remote_cmd" => {
                let c = raw.string().map_err(bad)?;
                if c.trim().is_empty() {
                    return Err(bad("must not be empty".to_owned()));
                }
                self.ssh.dsync_remote_cmd = c;
            }
            k if let Some(rk) = k.strip_prefix("replicator.") => {
                if !self.set_replicator(rk, &raw).map_err(bad)? {
                    return Err(ConfigError::UnknownKey { origin: origin.clone(), key: key.to_owned() });
                }
            }
            _ => {
                return Err(ConfigError::UnknownKey { origin, key: key.to_owned() });
            }
        }
        Ok(())
    }

    /// Sets a key of the `[replicator]` table; false if there is no such key.
    fn set_replicator(&mut self, key: &str, raw: &Raw<'_>) -> Result<bool, String> {
        let r = &mut self.replicator;
        let at_least_a_second =
            |d: Duration| if d.is_zero() { Err("must be at least 1 second".to_owned()) } else { Ok(d) };
        match key {
            "destination" => {
                let d = raw.string()?;
                if d.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                r.destination = Some(d);
            }
            "users" => {
                let users = raw.strings()?;
                if let Some(u) = users.iter().find(|u| !crate::replicator::protocol::valid_user(u)) {
                    return Err(format!("{u:?} is not a user name"));
                }
                r.users = Some(users);
            }
            "state_dir" => r.state_dir = raw.path()?,
            "max_parallel" => {
                r.max_parallel = raw
                    .u32()
                    .and_then(|n| if (1..=1000).contains(&n) { Ok(n) } else { Err(format!("{n} is not 1..1000")) })?;
            }
            "full_sync_interval" => r.full_sync_interval = at_least_a_second(raw.duration()?)?,
            "retry_min" => r.retry_min = at_least_a_second(raw.duration()?)?,
            "retry_max" => r.retry_max = at_least_a_second(raw.duration()?)?,
            "sync_timeout" => r.sync_timeout = at_least_a_second(raw.duration()?)?,
            "admin_socket" => r.admin_socket = raw.path()?,
            "plugin_fifo" => r.plugin_fifo = Some(raw.path()?),
            "plugin_socket" => r.plugin_socket = Some(raw.path()?),
            "plugin_mode" => r.plugin_mode = raw.mode()?,
            "watch" => r.watch = raw.bool()?,
            "watch_with" => {
                let v = raw.string()?;
                r.watch_with = crate::replicator::watcher::Method::parse(&v)
                    .ok_or_else(|| format!("{v:?} is not auto, fanotify or inotify"))?;
            }
            "doveadm" => {
                let words: Vec<String> = raw.string()?.split_whitespace().map(str::to_owned).collect();
                if words.is_empty() {
                    return Err("must not be empty".into());
                }
                r.doveadm = words;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// True if `uid` may own mail under `first_valid_uid`/`last_valid_uid`.
    pub fn uid_allowed(&self, uid: u32) -> bool {
        uid >= self.first_valid_uid && (self.last_valid_uid == 0 || uid <= self.last_valid_uid)
    }

    /// How long to wait for a mailbox lock.
    pub fn lock_wait(&self) -> Duration {
        if self.mail_max_lock_timeout.is_zero() { Duration::from_secs(122) } else { self.mail_max_lock_timeout }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_overrides() {
        let mut c = Config::default();
        c.apply_toml("mail_location = \"maildir:~/M:LAYOUT=fs\"\nfirst_valid_uid = 1000\n", Path::new("x.toml"))
            .unwrap();
        assert_eq!(c.first_valid_uid, 1000);
        assert!(c.uid_allowed(1000) && !c.uid_allowed(999));
        let err = c.apply_toml("\n\nbogus = 1\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(err.to_string(), "x.toml line 3: unknown setting `bogus`");
        let err = c.apply_toml("first_valid_uid = \"x\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().starts_with("x.toml line 1: bad value for `first_valid_uid`"), "{err}");
        let err = c.apply_toml("mail_location = \"maildir:~/M:CONTROL=/x\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("mail_location"), "{err}");
        c.apply_toml("mail_location = \"mdbox:~/mdbox\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.mail_location.foreign.as_deref(), Some("mdbox"));
        assert!(matches!(c.apply_toml("a = = 1", Path::new("x.toml")), Err(ConfigError::Syntax { .. })));
    }

    #[test]
    fn override_errors() {
        let e = Config::load(Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "").unwrap();
        let e = Config::load(Some(&f), &["first_valid_uid=abc".into()]).unwrap_err();
        assert_eq!(e.to_string(), "-o first_valid_uid=abc: bad value for `first_valid_uid`: \"abc\" is not a number");
        let e = Config::load(Some(&f), &["nokey".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::BadOverride(_)));
        let c = Config::load(Some(&f), &["mail_max_lock_timeout=5 mins".into()]).unwrap();
        assert_eq!(c.lock_wait(), Duration::from_secs(300));
    }

    #[test]
    fn the_replicator_table() {
        let mut c = Config::default();
        assert_eq!(c.replicator.max_parallel, 4);
        c.apply_toml(
            "first_valid_uid = 1000\n\n[replicator]\ndestination = \"remoteprefix:root@replica\"\n\
             users = [\"alice\", \"bob\"]\nmax_parallel = 2\nfull_sync_interval = \"12h\"\n\
             plugin_fifo = \"/run/dovecot/replication-notify-fifo\"\nplugin_mode = \"0660\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let r = &c.replicator;
        assert_eq!(r.destination.as_deref(), Some("remoteprefix:root@replica"));
        assert_eq!(r.users.as_deref(), Some(&["alice".to_owned(), "bob".to_owned()][..]));
        assert_eq!((r.max_parallel, r.full_sync_interval), (2, Duration::from_secs(12 * 3600)));
        assert_eq!((r.plugin_mode, r.plugin_socket.as_deref()), (0o660, None));
        let e = c.apply_toml("[replicator]\n\nmax_parallel = 0\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(e.to_string(), "x.toml line 3: bad value for `replicator.max_parallel`: 0 is not 1..1000");
        let e = c.apply_toml("[replicator]\nbogus = 1\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(e.to_string(), "x.toml line 2: unknown setting `replicator.bogus`");
        let e = c.apply_toml("[replicator]\nusers = [\"a\\tb\"]\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("not a user name"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "").unwrap();
        let c =
            Config::load(Some(&f), &["replicator.users=alice, bob".into(), "replicator.retry_min=5s".into()]).unwrap();
        assert_eq!(c.replicator.users.map(|u| u.len()), Some(2));
        assert_eq!(c.replicator.retry_min, Duration::from_secs(5));
    }

    #[test]
    fn ssh_settings() {
        let mut c = Config::default();
        assert_eq!(c.ssh.port, 22);
        assert_eq!(c.ssh.dsync_remote_cmd, DEFAULT_DSYNC_REMOTE_CMD);
        c.apply_toml(
            "ssh_key = \"/etc/mailreplica/id_ed25519\"\nssh_port = 2222\nssh_connect_timeout = \"1 min\"\n\
             ssh_user = \"vmail\"\nssh_known_hosts = \"/etc/mailreplica/known_hosts\"\n\
             dsync_remote_cmd = \"mailreplica dsync-server -u%u\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.ssh.key.as_deref(), Some(Path::new("/etc/mailreplica/id_ed25519")));
        assert_eq!((c.ssh.port, c.ssh.connect_timeout), (2222, Duration::from_secs(60)));
        assert_eq!(c.ssh.user.as_deref(), Some("vmail"));
        let e = c.apply_toml("ssh_key = \"relative/key\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        let e = c.apply_toml("ssh_port = 70000\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("not a port"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "").unwrap();
        let c = Config::load(Some(&f), &["ssh_key_passphrase_file=/root/pass".into(), "ssh_port=22".into()]).unwrap();
        assert_eq!(c.ssh.key_passphrase_file.as_deref(), Some(Path::new("/root/pass")));
    }
}
