//! The `mailreplica` command line: doveadm's spelling, options and output formats, so that an
//! admin's runbooks and diffs against doveadm keep working.
//!
//! This is the binary's own code, not the library's: argument parsing, output formats, exit
//! codes and `anyhow` end here; everything it acts on is `mailreplica::…`.
//!
//! Parsing is two-stage: clap turns argv into [`Cli`] without side effects; [`Session`] then
//! reads the configuration, looks the user up, drops root privileges for `-u USER`, and only
//! after that opens the mail store.

mod output;

mod doctor;
mod fleet;
mod generate;
mod mail;
mod relay;
mod replicator;
mod search;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};

use mailreplica::config::Config;
use mailreplica::copy::CopyError;
use mailreplica::privdrop::{self, Target};
use mailreplica::store::StoreError;
use mailreplica::store::maildir::{Maildir, MaildirSettings};
use mailreplica::transport::ssh::SshError;
use mailreplica::userdb::UserdbError;
pub(crate) use output::Format;

/// Exit codes, as doveadm uses them (sysexits.h).
pub(crate) mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// Bad command line.
    pub(crate) const USAGE: u8 = 64;
    /// Bad data, or the operation is not possible (doveadm's NOTPOSSIBLE).
    pub(crate) const DATAERR: u8 = 65;
    /// No such user.
    pub(crate) const NOUSER: u8 = 67;
    /// A mailbox or mail was not found (doveadm's NOTFOUND).
    pub(crate) const NOTFOUND: u8 = 68;
    /// Configuration error.
    pub(crate) const CONFIG: u8 = 78;
    /// Temporary failure: I/O, locks, damaged files.
    pub(crate) const TEMPFAIL: u8 = 75;
    /// Permission denied.
    pub(crate) const NOPERM: u8 = 77;
}

/// What `--version` says: ours, and the dsync protocol version spoken.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (dsync protocol 3.5: Dovecot 2.3 and 2.4)");

/// `mailreplica`: replicate Dovecot Maildirs with Dovecot's dsync protocol, and inspect them
/// with doveadm's mail commands.
#[derive(Debug, Parser)]
#[command(name = "mailreplica", version = VERSION, about, max_term_width = 100)]
pub(crate) struct Cli {
    /// Configuration file [default: /etc/mailreplica/mailreplica.toml if it exists].
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Override a setting (repeatable).
    #[arg(short = 'o', global = true, value_name = "KEY=VALUE")]
    pub(crate) overrides: Vec<String>,
    /// Act on this user's mail; as root, drop to the user first. `sync` and `backup` take it
    /// more than once (each user in their own process, see `--parallel`).
    #[arg(short = 'u', long = "user", global = true, value_name = "USER", action = clap::ArgAction::Append)]
    pub(crate) users: Vec<String>,
    /// `sync`/`backup`: every user of the userdb whose uid is within
    /// first_valid_uid..last_valid_uid, each in their own process (see --parallel).
    #[arg(short = 'A', global = true)]
    pub(crate) all_users: bool,
    /// `sync`/`backup`: the users listed in FILE, one per line (blank lines and `#` comments
    /// are skipped).
    #[arg(short = 'F', global = true, value_name = "FILE")]
    pub(crate) user_file: Option<PathBuf>,
    /// `sync`/`backup` with many users (-A, -F, several -u): this many at a time.
    #[arg(long = "parallel", global = true, value_name = "N", default_value_t = 1)]
    pub(crate) parallel: usize,
    /// Output format.
    #[arg(short = 'f', long = "format", global = true, value_enum, value_name = "FORMAT")]
    pub(crate) format: Option<Format>,
    /// Debug logging (to stderr).
    #[arg(short = 'D', global = true)]
    pub(crate) debug: bool,
    /// Verbose logging (to stderr).
    #[arg(short = 'v', global = true)]
    pub(crate) verbose: bool,
    /// The command.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Mailbox management.
    Mailbox {
        /// Sub-command.
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// Save a mail read from stdin.
    Save {
        /// Mailbox to save into.
        #[arg(short = 'm', value_name = "MAILBOX", default_value = "INBOX")]
        mailbox: String,
    },
    /// Print fields of the mails matching a search query.
    Fetch {
        /// Space-separated fields: uid guid flags modseq seq mailbox mailbox-guid size.physical
        /// size.virtual date.received date.saved text hdr body.
        fields: String,
        /// Search query, e.g. `mailbox INBOX uid 1:10`.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        search: Vec<String>,
    },
    /// Change flags of the mails matching a search query.
    Flags {
        /// How to change them.
        #[command(subcommand)]
        command: FlagsCommand,
    },
    /// Expunge the mails matching a search query.
    Expunge {
        /// Search query.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        search: Vec<String>,
    },
    /// Look users up in the userdb; masks with `*` or `?` list matching names.
    User {
        /// User names or masks.
        #[arg(default_value = "*")]
        masks: Vec<String>,
    },
    /// Serve the dsync protocol on stdin/stdout as the slave (what `doveadm sync|backup`
    /// runs on the remote side). A trailing `dsync-server` word, which doveadm appends to
    /// command destinations, is ignored.
    #[command(name = "dsync-server")]
    DsyncServer {
        /// I/O timeout in seconds (doveadm's `-T`).
        #[arg(short = 'T', value_name = "SECS", default_value_t = 600)]
        timeout: u64,
        /// Accepted for doveadm compatibility (notify the replicator); no effect.
        #[arg(short = 'U')]
        notify: bool,
        /// Ignored trailing words (doveadm appends `dsync-server`).
        #[arg(hide = true, allow_hyphen_values = true, trailing_var_arg = true)]
        extra: Vec<String>,
    },
    /// Make the destination an exact copy of this user's mail (`-R`: the other way round).
    Backup(sync::SyncArgs),
    /// Two-way sync with the destination: both sides' changes go both ways.
    Sync(sync::SyncArgs),
    /// Continuous replication of every configured user (the `[replicator]` table): the
    /// service in the foreground, or its status.
    Replicator {
        /// What to do (default: run the service).
        #[command(subcommand)]
        command: Option<replicator::ReplicatorCommand>,
    },
    /// Ask the running replicator to sync users soon (`doveadm replicator replicate`).
    Replicate {
        /// A full sync (doveadm's `-f`, which is our global `-f FORMAT`).
        #[arg(long = "full", visible_alias = "full-sync")]
        full: bool,
        /// How soon: none (only with --full), low or high.
        #[arg(short = 'p', long = "priority", value_name = "PRIORITY", default_value = "high")]
        priority: String,
        /// Users (a mask with `*` or `?` matches the users the replicator knows).
        #[arg(required = true, value_name = "USER")]
        names: Vec<String>,
    },
    /// Check this host's deployment (sending and receiving side) and say what is wrong;
    /// exit 0 only when every check holds.
    Doctor(doctor::DoctorArgs),
    /// Print a man page or a shell completion script on stdout (for packagers).
    Generate {
        /// Which one.
        #[arg(value_enum)]
        what: generate::What,
    },
    /// Internal: one user's dsync stream between stdin/stdout and a remote: destination (the
    /// command the replicator gives `doveadm sync` for users in another mail format).
    #[command(hide = true)]
    Relay {
        /// I/O timeout in seconds.
        #[arg(short = 'T', default_value_t = 600)]
        timeout: u64,
        /// The user (for remoteprefix:'s first line and %u).
        user: String,
        /// The destination; a trailing `dsync-server` (doveadm appends it) is ignored.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        destination: Vec<String>,
    },
}

/// `mailbox` sub-commands.
#[derive(Debug, Subcommand)]
pub(crate) enum MailboxCommand {
    /// List mailboxes.
    List {
        /// Only subscribed mailboxes.
        #[arg(short = 's')]
        subscribed: bool,
        /// Name masks (`*`, `%`).
        masks: Vec<String>,
    },
    /// Print mailbox status fields.
    Status {
        /// Space-separated: all messages recent uidnext uidvalidity unseen highestmodseq vsize guid
        /// firstsaved.
        fields: String,
        /// Name masks.
        #[arg(required = true)]
        masks: Vec<String>,
    },
    /// Create mailboxes.
    Create {
        /// Also subscribe.
        #[arg(short = 's')]
        subscribe: bool,
        /// Mailbox GUID to use (one mailbox only).
        #[arg(short = 'g', value_name = "GUID")]
        guid: Option<String>,
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete mailboxes.
    Delete {
        /// Also unsubscribe.
        #[arg(short = 's')]
        unsubscribe: bool,
        /// Delete children too.
        #[arg(short = 'r')]
        recursive: bool,
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Rename a mailbox (and its children).
    Rename {
        /// Move the subscription too.
        #[arg(short = 's')]
        subscriptions: bool,
        /// Old name.
        old: String,
        /// New name.
        new: String,
    },
    /// Change a mailbox's GUID, UIDVALIDITY or raise its counters (doveadm's `mailbox update`).
    Update {
        /// New mailbox GUID.
        #[arg(long = "mailbox-guid", value_name = "GUID")]
        mailbox_guid: Option<String>,
        /// New UIDVALIDITY.
        #[arg(long = "uid-validity", value_name = "N")]
        uid_validity: Option<u32>,
        /// Raise UIDNEXT to at least N.
        #[arg(long = "min-next-uid", value_name = "N")]
        min_next_uid: Option<u32>,
        /// Raise the first recent UID to at least N.
        #[arg(long = "min-first-recent-uid", value_name = "N")]
        min_first_recent_uid: Option<u32>,
        /// Raise HIGHESTMODSEQ to at least N.
        #[arg(long = "min-highest-modseq", value_name = "N")]
        min_highest_modseq: Option<u64>,
        /// The mailbox.
        name: String,
    },
    /// Subscribe to mailboxes.
    Subscribe {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Unsubscribe from mailboxes.
    Unsubscribe {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `flags` sub-commands.
#[derive(Debug, Subcommand)]
pub(crate) enum FlagsCommand {
    /// Add flags.
    Add {
        /// Space-separated flags and keywords, e.g. `\Seen $Junk`.
        flags: String,
        /// Search query.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        search: Vec<String>,
    },
    /// Remove flags.
    Remove {
        /// Flags.
        flags: String,
        /// Search query.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        search: Vec<String>,
    },
    /// Replace all flags.
    Replace {
        /// Flags.
        flags: String,
        /// Search query.
        #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
        search: Vec<String>,
    },
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Exit code.
    pub(crate) code: u8,
    /// What went wrong.
    pub(crate) error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        Self { code: classify(&error), error }
    }
}

impl Failure {
    /// A failure with an explicit code.
    pub(crate) fn new(code: u8, error: anyhow::Error) -> Self {
        Self { code, error }
    }

    /// An exit code that needs no error message (its reason was logged already).
    pub(crate) fn quiet(code: u8) -> Self {
        Self { code, error: anyhow!(QuietExit) }
    }
}

/// The marker of [`Failure::quiet`].
#[derive(Debug, thiserror::Error)]
#[error("(reported above)")]
pub(crate) struct QuietExit;

/// Maps an error to doveadm's exit code by what it is, walking the cause chain.
pub(crate) fn classify(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return store_code(s);
        }
        // A copy's store errors are its own variant (transparent: same text, same code).
        if let Some(c) = cause.downcast_ref::<CopyError>() {
            return match c {
                CopyError::Store(s) => store_code(s),
                _ => exit::TEMPFAIL,
            };
        }
        if cause.downcast_ref::<mailreplica::store::types::BadMailboxName>().is_some() {
            return exit::USAGE;
        }
        if cause.downcast_ref::<mailreplica::store::types::BadKeyword>().is_some() {
            return exit::DATAERR;
        }
        if cause.downcast_ref::<mailreplica::config::ConfigError>().is_some() {
            return exit::CONFIG;
        }
        if cause.downcast_ref::<UserdbError>().is_some() {
            return exit::TEMPFAIL;
        }
        if let Some(e) = cause.downcast_ref::<SshError>() {
            return ssh_code(e);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return exit::NOPERM;
        }
    }
    exit::TEMPFAIL
}

/// The exit code for an SSH failure: refusals that need an admin are permission errors, a
/// key file that can't be used is a configuration error, the network is temporary.
fn ssh_code(e: &SshError) -> u8 {
    match e {
        SshError::HostKey(_) | SshError::AuthRefused { .. } | SshError::ExecRefused { .. } => exit::NOPERM,
        SshError::Key(_) | SshError::NoIdentity(_) | SshError::KnownHostsRead { .. } => exit::CONFIG,
        _ => exit::TEMPFAIL,
    }
}

/// doveadm's exit code for a store error.
fn store_code(s: &StoreError) -> u8 {
    match s {
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => exit::NOPERM,
        StoreError::MailboxNotFound(_) | StoreError::MailNotFound(_) => exit::NOTFOUND,
        // doveadm: an invalid mailbox name is a usage error.
        StoreError::BadName(_) => exit::USAGE,
        StoreError::MailboxExists(_)
        | StoreError::NotPossible(_)
        | StoreError::BadKeyword(_)
        | StoreError::BadGuid(_)
        | StoreError::Limit(_) => exit::DATAERR,
        _ => exit::TEMPFAIL,
    }
}

/// Who we act for, with the configuration that applies.
#[derive(Debug)]
pub(crate) struct Session {
    /// Effective configuration.
    pub(crate) config: Config,
    /// User name.
    pub(crate) user: String,
    /// Home directory.
    pub(crate) home: PathBuf,
    /// The user's own `mail` setting from the userdb, if any.
    pub(crate) userdb_mail: Option<String>,
}

/// Looks `name` up and checks that mail may be handled for it: a uid within
/// `first_valid_uid..last_valid_uid`, and neither uid nor gid one that must never be dropped to.
pub(crate) fn allowed_user(config: &Config, name: &str) -> Result<mailreplica::userdb::UserEntry, Failure> {
    let entry =
        config.userdb.lookup(name)?.ok_or_else(|| Failure::new(exit::NOUSER, anyhow!("user {name} doesn't exist")))?;
    if !config.uid_allowed(entry.uid) || privdrop::forbidden_id(entry.uid) {
        return Err(Failure::new(
            exit::NOPERM,
            anyhow!(
                "user {name} has uid {}, outside first_valid_uid={}..last_valid_uid={}",
                entry.uid,
                config.first_valid_uid,
                config.last_valid_uid
            ),
        ));
    }
    if privdrop::forbidden_id(entry.gid) {
        return Err(Failure::new(exit::NOPERM, anyhow!("user {name} has primary gid {}", entry.gid)));
    }
    Ok(entry)
}

/// `entry`'s mail location: the userdb's own `mail` field, else the configured one. Another
/// format than Maildir is returned as foreign (see [`mailreplica::config::MailLocation::parse_any`]).
pub(crate) fn user_location(
    config: &Config,
    entry: &mailreplica::userdb::UserEntry,
) -> Result<mailreplica::config::MailLocation, Failure> {
    match entry.mail_location() {
        Some(l) => mailreplica::config::MailLocation::parse_any(l)
            .map_err(|e| Failure::new(exit::CONFIG, anyhow!("user {}: the userdb's mail field: {e}", entry.name))),
        None => Ok(config.mail_location.clone()),
    }
}

impl Session {
    /// Becomes the mail user (dropping root for `-u USER`), with the configuration read.
    pub(crate) fn establish(cli: &Cli, config: Config) -> Result<Self, Failure> {
        let euid = nix::unistd::geteuid().as_raw();
        match cli.users.first() {
            Some(name) => {
                let entry = allowed_user(&config, name)?;
                if euid == 0 {
                    // The wrapper's drop, with the user's primary group only: root's groups
                    // must not survive, and the userdb names no others.
                    let me = Target::new(entry.uid, entry.gid, &[])
                        .and_then(|target| privdrop::drop_to(&target))
                        .with_context(|| format!("dropping privileges to {name}"))?;
                    tracing::debug!("dropped privileges for good: {}", me.evidence());
                } else if euid != entry.uid {
                    return Err(Failure::new(exit::NOPERM, anyhow!("-u {name}: only root can act for another user")));
                }
                Ok(Self {
                    config,
                    user: entry.name.clone(),
                    home: entry.home.clone(),
                    userdb_mail: entry.mail_location().map(str::to_owned),
                })
            }
            None => {
                let pw = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten();
                let user = std::env::var("USER")
                    .ok()
                    .filter(|u| !u.is_empty())
                    .or_else(|| pw.as_ref().map(|p| p.name.clone()));
                let home = std::env::var_os("HOME").map(PathBuf::from).or_else(|| pw.as_ref().map(|p| p.dir.clone()));
                let (Some(user), Some(home)) = (user, home) else {
                    return Err(Failure::new(exit::NOUSER, anyhow!("can't tell who the current user is; use -u USER")));
                };
                if euid == 0 {
                    tracing::warn!("running as root without -u: files created now will belong to root");
                }
                Ok(Self { config, user, home, userdb_mail: None })
            }
        }
    }

    /// Settings of a Maildir location (the configured one when `location` is `None`).
    pub(crate) fn maildir_settings(&self, location: Option<&str>) -> Result<MaildirSettings, Failure> {
        let loc = match location.or(self.userdb_mail.as_deref()) {
            Some(s) => {
                mailreplica::config::MailLocation::parse_any(s).map_err(|e| Failure::new(exit::CONFIG, e.into()))?
            }
            None => self.config.mail_location.clone(),
        };
        let hostname = self.config.hostname.clone().unwrap_or_else(hostname);
        loc.expand(&self.user, &self.home, &hostname, self.config.lock_wait())
            .map_err(|e| Failure::new(exit::CONFIG, e.into()))
    }

    /// Opens the user's mail store.
    pub(crate) fn store(&self) -> Result<Maildir, Failure> {
        let settings = self.maildir_settings(None)?;
        if !self.home.is_dir() {
            return Err(Failure::new(
                exit::TEMPFAIL,
                anyhow!("home directory {} of user {} does not exist", self.home.display(), self.user),
            ));
        }
        Ok(Maildir::open(settings).with_context(|| format!("opening the mail store of {}", self.user))?)
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".to_owned())
}

fn init_logging(cli: &Cli) {
    // The service logs what it does (to the journal); a command, only what went wrong.
    let service =
        matches!(cli.command, Command::Replicator { command: None | Some(replicator::ReplicatorCommand::Run) });
    let default = if cli.debug {
        "debug"
    } else if cli.verbose || service {
        "info"
    } else {
        "warn"
    };
    mailreplica::logging::init_stderr(default);
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> Result<(), Failure> {
    init_logging(&cli);
    if let Command::Generate { what } = &cli.command {
        return generate::generate(*what);
    }
    if let Command::Doctor(a) = &cli.command {
        if !cli.users.is_empty() {
            return Err(Failure::new(exit::USAGE, anyhow!("doctor takes no -u (see --sample-user)")));
        }
        return doctor::doctor(cli.config.as_deref(), &cli.overrides, a);
    }
    let sync_args = match &cli.command {
        Command::Backup(a) => Some((sync::Mode::Backup, a)),
        Command::Sync(a) => Some((sync::Mode::Sync, a)),
        _ => None,
    };
    let fleet_sync = sync_args.is_some_and(|(_, a)| !a.report);
    if cli.users.len() > 1 && !fleet_sync {
        return Err(Failure::new(exit::USAGE, anyhow!("-u USER more than once is for sync and backup only")));
    }
    if (cli.all_users || cli.user_file.is_some() || cli.parallel != 1) && !fleet_sync {
        return Err(Failure::new(exit::USAGE, anyhow!("-A, -F and --parallel are for sync and backup only")));
    }
    if matches!(cli.command, Command::DsyncServer { .. }) && cli.users.is_empty() && nix::unistd::geteuid().is_root() {
        return Err(Failure::new(
            exit::NOPERM,
            anyhow!("dsync-server as root needs -u USER (it never touches mail as root)"),
        ));
    }
    let config = Config::load(cli.config.as_deref(), &cli.overrides)?;
    match &cli.command {
        Command::Replicator { command } if cli.users.is_empty() => {
            return replicator::replicator(&cli, config, command.as_ref());
        }
        Command::Replicate { full, priority, names } if cli.users.is_empty() => {
            return replicator::replicate(&config, *full, priority, names);
        }
        Command::Replicator { .. } | Command::Replicate { .. } => {
            return Err(Failure::new(exit::USAGE, anyhow!("replicator and replicate take no -u")));
        }
        // As the invoking user (root, from doveadm before its drop): root's key, no mail.
        Command::Relay { timeout, user, destination } if cli.users.is_empty() => {
            return relay::relay(&config, user, destination, *timeout);
        }
        Command::Relay { .. } => return Err(Failure::new(exit::USAGE, anyhow!("relay takes no -u"))),
        _ => {}
    }
    if let Some((mode, a)) = sync_args
        && fleet::wanted(&cli, a)
    {
        // Many users (or results as data): this process stays as it is and runs one child
        // per user, which drops to that user.
        return fleet::run(&cli, config, mode, a);
    }
    // A remote destination is connected to first, as the invoking user (root's SSH key and
    // known_hosts), before `-u` drops privileges: doveadm starts its ssh before the drop too.
    // The connection starts no thread until it is used, so the drop still finds one thread.
    let remote = match &cli.command {
        Command::Backup(a) | Command::Sync(a) => sync::connect_remote(&config, a)?,
        _ => None,
    };
    let session = Session::establish(&cli, config)?;
    match &cli.command {
        Command::Mailbox { command } => mail::mailbox(&session, cli.format, command),
        Command::Save { mailbox } => mail::save(&session, mailbox),
        Command::Fetch { fields, search } => mail::fetch(&session, cli.format, fields, search),
        Command::Flags { command } => mail::flags(&session, command),
        Command::Expunge { search } => mail::expunge(&session, search),
        Command::User { masks } => mail::user(&session, cli.format, masks),
        Command::Backup(a) => sync::run(&session, sync::Mode::Backup, a, remote),
        Command::Sync(a) => sync::run(&session, sync::Mode::Sync, a, remote),
        Command::DsyncServer { timeout, extra, .. } => dsync_server(&session, *timeout, extra),
        Command::Replicator { .. }
        | Command::Replicate { .. }
        | Command::Relay { .. }
        | Command::Generate { .. }
        | Command::Doctor(_) => Err(Failure::new(exit::USAGE, anyhow!("replicator, replicate and relay take no -u"))),
    }
}

/// `dsync-server`: the slave on stdin/stdout.
fn dsync_server(session: &Session, timeout: u64, extra: &[String]) -> Result<(), Failure> {
    if let Some(w) = extra.iter().find(|w| w.as_str() != "dsync-server") {
        return Err(Failure::new(exit::USAGE, anyhow!("dsync-server: unexpected argument {w:?}")));
    }
    let mut store = session.store()?;
    let hostname = session.config.hostname.clone().unwrap_or_else(hostname);
    let outcome =
        mailreplica::dsync::server::serve_stdio(&mut store, &hostname, std::time::Duration::from_secs(timeout.max(1)))
            .with_context(|| format!("dsync-server for {}", session.user))?;
    if let Some(f) = outcome.failed {
        return Err(Failure::new(exit::TEMPFAIL, anyhow!("dsync failed: {f}")));
    }
    Ok(())
}

/// An error and its causes on one line, `outer: inner: …`, leaving out a cause whose text
/// the line already ends with (an I/O error that names its OS error would otherwise print it
/// twice).
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.is_empty() {
            out = s;
        } else if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
    }
    out
}

/// The process entry point: parse, run, report, exit.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A child of `fleet` reports every failure on stdout, for its parent, and nothing on stderr.
    let report_mode = matches!(&cli.command, Command::Backup(a) | Command::Sync(a) if a.report);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if report_mode => {
            if f.error.downcast_ref::<QuietExit>().is_none() {
                sync::write_report(&mailreplica::fleet::Report {
                    code: f.code,
                    error: Some(error_text(&f.error)),
                    ..Default::default()
                });
            }
            ExitCode::from(f.code)
        }
        Err(f) => {
            // A closed stdout (e.g. `| head`) is not an error worth a message.
            let broken_pipe = f.error.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            if f.error.downcast_ref::<QuietExit>().is_some() {
                return ExitCode::from(f.code);
            }
            eprintln!("mailreplica: Error: {}", error_text(&f.error));
            ExitCode::from(f.code)
        }
    }
}
