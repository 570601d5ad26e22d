//! `mailreplica replicator` (the service, in the foreground), `replicator status`,
//! `replicator import`, and `mailreplica replicate`.
//!
//! ```text
//!   mailreplica replicator                         (root; systemd Type=notify)
//!     [replicator] destination, users, state_dir, max_parallel, full_sync_interval, …
//!     feeds:  plugin_fifo / plugin_socket (Dovecot 2.3's replication plugin), admin_socket
//!             (doveadm replicator -a PATH; mailreplica replicate)
//!     queue → up to max_parallel syncs, each: a child `mailreplica -u USER sync -s STATE [-f]`
//!             that drops to USER, its stream over one channel of the destination's shared
//!             SSH connection (as `sync -A` runs them), or to a `maildir:` or command
//!             destination itself
//!           · the destination: the user's own `mail_replica` from the userdb, or `destination`
//!           · mail in another format (sdbox, mdbox: the userdb's `mail`, or mail_location):
//!             `doveadm sync -u USER -s STATE [-f]`, to a remote through `mailreplica relay`
//!     records: state_dir/users/*.user, each saved atomically as it changes
//! ```
//!
//! SIGTERM or SIGINT stops starting syncs and waits for the running ones (each is bounded by
//! `sync_timeout`); a second one exits at once. Either way no record is lost: each was saved
//! when it changed, and a sync cut short leaves the last good state and the user still owed.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Subcommand;
use mailreplica::config::Config;
use mailreplica::fleet::Counters;
use mailreplica::replicator::protocol::{DOVEADM_CLIENT_HANDSHAKE, DOVEADM_SERVER_HANDSHAKE, valid_user};
use mailreplica::replicator::queue::{Job, Policy, Priority};
use mailreplica::replicator::service::{Directory, Service, Settings, SyncResult, Syncer, now};
use mailreplica::replicator::state_db::{StateDir, import_replicator_db};
use mailreplica::replicator::{admin, feeds};
use mailreplica::tabescape::{escape, unescape_lenient};
use nix::sys::signal::{SigSet, Signal};

use super::fleet::{ChildTemplate, Shared, UserResult, sync_delegated, sync_user};
use super::output::{Cell, Column, Printer};
use super::sync::{Mode, SyncArgs, remote_settings};
use super::{Cli, Failure, Format, exit};

/// `replicator` sub-commands.
#[derive(Debug, Subcommand)]
pub(crate) enum ReplicatorCommand {
    /// Run the service in the foreground (the default).
    Run,
    /// The queue and every user's replication, from the running service.
    Status {
        /// Only users matching this mask (`*`, `?`).
        #[arg(default_value = "*")]
        mask: String,
    },
    /// Import Dovecot 2.3's replicator.db into state_dir (with the service stopped), so that
    /// a migrating site keeps its users' states.
    Import {
        /// The replicator.db file (e.g. /var/lib/dovecot/replicator.db).
        file: std::path::PathBuf,
    },
}

/// `mailreplica replicator [run|status|import]`.
pub(crate) fn replicator(cli: &Cli, config: Config, command: Option<&ReplicatorCommand>) -> Result<(), Failure> {
    match command {
        None | Some(ReplicatorCommand::Run) => run(cli, config),
        Some(ReplicatorCommand::Status { mask }) => status(&config, mask, cli.format.unwrap_or(Format::Table)),
        Some(ReplicatorCommand::Import { file }) => import(&config, file),
    }
}

/// Which users this replicator serves: the `users` list, or every userdb user within the
/// uid range.
struct UserDirectory {
    config: Config,
    only: Option<HashSet<String>>,
}

impl Directory for UserDirectory {
    fn allowed(&self, user: &str) -> bool {
        valid_user(user)
            && self.only.as_ref().is_none_or(|o| o.contains(user))
            && super::allowed_user(&self.config, user).is_ok()
    }

    fn list(&self) -> Result<Vec<String>, String> {
        if let Some(users) = &self.config.replicator.users {
            return Ok(users.clone());
        }
        let all = self.config.userdb.list().map_err(|e| e.to_string())?;
        Ok(all
            .into_iter()
            .filter(|u| {
                self.config.uid_allowed(u.uid)
                    && !mailreplica::privdrop::forbidden_id(u.uid)
                    && !mailreplica::privdrop::forbidden_id(u.gid)
                    && valid_user(&u.name)
            })
            .map(|u| u.name)
            .collect())
    }

    fn uid_of(&self, user: &str) -> Option<u32> {
        self.config.userdb.lookup(user).ok().flatten().map(|e| e.uid)
    }
}

/// Where syncs go: one route per destination (the configured one, and each user's own
/// `mail_replica` from the userdb), each with its SSH connection, made when first needed and
/// remade when it drops.
struct Route {
    template: ChildTemplate,
    shared: Option<Shared>,
    words: Vec<String>,
    /// When a sync over it last ended (or it was made).
    last_used: Mutex<Instant>,
}

/// A user's own destination (not the configured one) that no sync used for this long is
/// forgotten and its SSH connection closed; the next sync there connects again.
const ROUTE_IDLE: Duration = Duration::from_secs(600);

/// The routes in `routes` that nobody holds (a running sync holds its route) and that were last
/// used `idle` or longer before `now`, except `keep`.
fn idle_routes<T>(
    routes: &HashMap<String, Arc<T>>,
    keep: &str,
    now: Instant,
    idle: Duration,
    last_used: impl Fn(&T) -> Instant,
) -> Vec<String> {
    routes
        .iter()
        .filter(|(d, r)| {
            d.as_str() != keep && Arc::strong_count(r) == 1 && now.saturating_duration_since(last_used(r)) >= idle
        })
        .map(|(d, _)| d.clone())
        .collect()
}

/// How many malloc arenas the service's threads share (see [`mailreplica::sys::limit_malloc_arenas`]).
const MALLOC_ARENAS: i32 = 2;

/// At most this many distinct destinations (a userdb can name one per user; each holds an SSH
/// connection).
const MAX_ROUTES: usize = 256;

/// Runs each sync as `sync -A` runs a user: a child process that drops to the user; or, for
/// a user whose mail is in a format our store does not read, `doveadm sync`.
struct ChildSyncer {
    config: Config,
    /// The children's command line, to which each route sets its destination.
    template: ChildTemplate,
    default_destination: String,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// This binary, for `doveadm sync`'s command destination (`relay`).
    exe: PathBuf,
    wait: Duration,
}

impl ChildSyncer {
    fn route(&self, destination: &str) -> Result<Arc<Route>, Failure> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let last = |r: &Route| *r.last_used.lock().unwrap_or_else(PoisonError::into_inner);
        for d in idle_routes(&routes, &self.default_destination, Instant::now(), ROUTE_IDLE, last) {
            if let Some(conn) = routes.remove(&d).and_then(|r| r.shared.as_ref()?.conn.lock().ok()?.take()) {
                tracing::info!("closing the idle SSH connection to {d}");
                conn.close();
            }
        }
        if let Some(r) = routes.get(destination) {
            return Ok(Arc::clone(r));
        }
        if routes.len() >= MAX_ROUTES {
            return Err(Failure::new(
                exit::CONFIG,
                anyhow!(
                    "more than {MAX_ROUTES} different destinations (userdb mail_replica); {destination} is not served"
                ),
            ));
        }
        let words: Vec<String> = destination.split_whitespace().map(str::to_owned).collect();
        let remote = remote_settings(&self.config, &words, false, self.wait.as_secs())?;
        let route = Arc::new(Route {
            template: self.template.with_destination(&words, remote.is_some()),
            shared: remote.map(|r| Shared {
                conn: Mutex::new(None),
                settings: r.settings,
                prefix: r.prefix,
                login: r.login,
                host: r.host,
            }),
            words,
            last_used: Mutex::new(Instant::now()),
        });
        if destination != self.default_destination {
            tracing::info!("a user's own destination (userdb mail_replica): {destination}");
        }
        routes.insert(destination.to_owned(), Arc::clone(&route));
        Ok(route)
    }
}

/// A sync's result as the queue takes it.
fn outcome(r: &UserResult, old_state: &str) -> SyncResult {
    let why = || r.message.clone().unwrap_or_else(|| format!("exit code {}", r.code));
    match r.code {
        exit::OK | 2 => SyncResult::Done {
            // A sync that printed no state (it always does with -s) keeps the old one.
            state: r.state.clone().unwrap_or_else(|| old_state.to_owned()),
            changed: r.code == 2,
        },
        exit::NOUSER => SyncResult::Gone(why()),
        _ => SyncResult::Failed(why()),
    }
}

impl Syncer for ChildSyncer {
    fn sync(&self, job: &Job) -> SyncResult {
        let refused = |f: Failure| {
            let r = UserResult::refused(&job.user, &f);
            outcome(&r, &job.state)
        };
        let entry = match super::allowed_user(&self.config, &job.user) {
            Ok(e) => e,
            Err(f) => return refused(f),
        };
        let location = match super::user_location(&self.config, &entry) {
            Ok(l) => l,
            Err(f) => return refused(f),
        };
        let route = match self.route(entry.mail_replica().unwrap_or(&self.default_destination)) {
            Ok(r) => r,
            Err(f) => return refused(f),
        };
        let counters = Arc::new(Counters::default());
        let log: Arc<dyn Fn(&str) + Send + Sync> = {
            let user = job.user.clone();
            Arc::new(move |line: &str| tracing::info!(user = %user, "{}", line.trim_start()))
        };
        let r = if location.foreign.is_some() {
            // Dovecot reads this mail; a remote destination is reached through our relay.
            let relay = route.shared.is_some().then_some(self.exe.as_path());
            let cmd = route.template.delegated(
                &self.config.replicator.doveadm,
                relay,
                job,
                self.wait.as_secs(),
                &route.words,
            );
            sync_delegated(&cmd, &entry.name, &counters, log)
        } else {
            let mut extra: Vec<OsString> = vec!["-s".into(), job.state.clone().into()];
            if job.full {
                extra.push("-f".into());
            }
            sync_user(
                &self.config,
                &route.template,
                route.shared.as_ref(),
                &job.user,
                &extra,
                &counters,
                log,
                self.wait,
            )
        };
        *route.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        outcome(&r, &job.state)
    }
}

/// The service.
fn run(cli: &Cli, config: Config) -> Result<(), Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::new(exit::NOPERM, anyhow!("the replicator runs as root (each sync drops to its user)")));
    }
    let rc = config.replicator.clone();
    let destination = rc.destination.clone().ok_or_else(|| {
        Failure::new(exit::CONFIG, anyhow!("[replicator] destination is not set in the configuration"))
    })?;
    // Before any thread: the signals are taken by one thread that waits for them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    if !mailreplica::sys::limit_malloc_arenas(MALLOC_ARENAS) {
        tracing::debug!("malloc did not take M_ARENA_MAX");
    }
    mailreplica::sys::cloexec_from(3).context("marking inherited file descriptors close-on-exec")?;

    let directory = Arc::new(UserDirectory {
        only: rc.users.as_ref().map(|u| u.iter().cloned().collect()),
        config: config.clone(),
    });
    let users = directory.list().map_err(|e| Failure::new(exit::TEMPFAIL, anyhow!("listing the users: {e}")))?;
    let words: Vec<String> = destination.split_whitespace().map(str::to_owned).collect();
    let timeout = rc.sync_timeout.as_secs();
    let args = SyncArgs {
        reverse: false,
        one_way: false,
        full: false,
        state: None,
        mailbox: None,
        exclude: Vec::new(),
        since: None,
        until: None,
        max_size: None,
        flag: None,
        lock_timeout: None,
        purge: false,
        timeout,
        accept_new_host_key: false,
        report: false,
        destination: words,
    };
    let template = ChildTemplate::new(cli, Mode::Sync, &args, false)?;
    // The watcher's directories, while the configuration is at hand.
    let roots: Vec<(String, Vec<std::path::PathBuf>)> = if rc.watch {
        users.iter().filter_map(|u| maildir_roots(&config, u).map(|r| (u.clone(), r))).collect()
    } else {
        Vec::new()
    };
    let foreign = users.iter().filter(|u| delegated(&config, u)).count();
    if foreign > 0 {
        tracing::info!(
            "{foreign} users' mail is in another format than Maildir: doveadm sync ({}) syncs them{}",
            rc.doveadm.join(" "),
            if rc.watch { ", and the watcher does not see their changes" } else { "" }
        );
    }
    let syncer = Arc::new(ChildSyncer {
        exe: std::env::current_exe().context("finding this program's path")?,
        routes: Mutex::new(HashMap::new()),
        default_destination: destination.clone(),
        config,
        template,
        wait: rc.sync_timeout,
    });
    // The configured destination is checked now: a wrong one stops the service at start.
    syncer.route(&destination)?;
    let states = StateDir::open(&rc.state_dir).with_context(|| "opening the state directory".to_owned())?;
    let settings = Settings {
        max_parallel: rc.max_parallel as usize,
        policy: Policy {
            full_sync_interval: rc.full_sync_interval.as_secs(),
            retry_base: rc.retry_min.as_secs(),
            retry_max: rc.retry_max.as_secs().max(rc.retry_min.as_secs()),
        },
    };
    let service = Service::new(settings, states, &users, syncer, directory).context("loading the saved records")?;

    // The watcher starts before any socket exists: if it can't, nothing is left behind.
    let feed = if rc.watch {
        Some(
            mailreplica::replicator::watcher::Feed::start(&roots, rc.watch_with)
                .context("starting the Maildir watcher")?,
        )
    } else {
        None
    };
    // The feeds. Sockets are made last, so that nobody talks to a service not ready.
    let mut made: Vec<std::path::PathBuf> = Vec::new();
    if let Some(parent) = rc.admin_socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = feeds::bind_socket(&rc.admin_socket, 0o600)
        .with_context(|| format!("admin socket {}", rc.admin_socket.display()))?;
    made.push(rc.admin_socket.clone());
    spawn("admin", {
        let s = Arc::clone(&service);
        move || admin::serve(listener, s)
    })?;
    if let Some(p) = &rc.plugin_socket {
        let l = feeds::bind_socket(p, rc.plugin_mode).with_context(|| format!("plugin socket {}", p.display()))?;
        made.push(p.clone());
        let s = Arc::clone(&service);
        spawn("notify-socket", move || feeds::serve_notify_socket(l, s))?;
    }
    if let Some(p) = &rc.plugin_fifo {
        feeds::make_fifo(p, rc.plugin_mode).with_context(|| format!("plugin FIFO {}", p.display()))?;
        let (s, path) = (Arc::clone(&service), p.clone());
        spawn("notify-fifo", move || {
            if let Err(e) = feeds::serve_fifo(&path, &s) {
                tracing::error!("{}: {e}; this feed is stopped", path.display());
            }
        })?;
    }
    if let Some(feed) = feed {
        let s = Arc::clone(&service);
        spawn("watcher", move || {
            if let Err(e) = feed.run(|u, p| {
                s.notify(u, p);
            }) {
                tracing::error!("the Maildir watcher stopped: {e}");
            }
        })?;
    }
    spawn("signals", {
        let s = Arc::clone(&service);
        move || loop {
            match signals.wait() {
                Ok(Signal::SIGHUP) => {
                    tracing::warn!("SIGHUP: the configuration is read at start only; restart to apply it")
                }
                Ok(sig) if s.stopping() => {
                    tracing::warn!("{sig}: stopping now, without waiting for the running syncs");
                    std::process::exit(0);
                }
                Ok(sig) => {
                    tracing::info!("{sig}: stopping once the running syncs end");
                    s.stop();
                }
                Err(e) => {
                    tracing::error!("waiting for signals: {e}");
                    return;
                }
            }
        }
    })?;
    tracing::info!(
        "replicating {} users to {destination}, {} at a time; admin socket {}",
        users.len(),
        rc.max_parallel,
        rc.admin_socket.display()
    );
    sd_notify("READY=1");
    service.run();
    sd_notify("STOPPING=1");
    for p in made {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Whether `user`'s mail is in a format `doveadm sync` syncs for us.
fn delegated(config: &Config, user: &str) -> bool {
    config.userdb.lookup(user).ok().flatten().map_or(config.mail_location.foreign.is_some(), |e| {
        super::user_location(config, &e).is_ok_and(|l| l.foreign.is_some())
    })
}

/// The directories of `user`'s Maildir (its root, and INBOX if elsewhere), for the watcher.
fn maildir_roots(config: &Config, user: &str) -> Option<Vec<std::path::PathBuf>> {
    let entry = super::allowed_user(config, user).ok()?;
    let location = super::user_location(config, &entry).ok()?;
    let hostname = config.hostname.clone().unwrap_or_else(super::hostname);
    let settings = location.expand(&entry.name, &entry.home, &hostname, config.lock_wait()).ok()?;
    Some(std::iter::once(settings.root).chain(settings.inbox).collect())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Failure> {
    std::thread::Builder::new().name(name.into()).spawn(f).with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}

/// Tells systemd (`Type=notify`) how the service stands, if it runs under systemd.
fn sd_notify(what: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(Path::new(&path)),
    };
    let sent = UnixDatagram::unbound().and_then(|s| addr.and_then(|a| s.send_to_addr(what.as_bytes(), &a)));
    if let Err(e) = sent {
        tracing::warn!("telling systemd {what}: {e}");
    }
}

/// A connection to the running service's admin socket.
struct Admin {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Admin {
    fn connect(config: &Config) -> Result<Self, Failure> {
        let path = &config.replicator.admin_socket;
        let s = UnixStream::connect(path).with_context(|| {
            format!("connecting to the replicator at {} (is `mailreplica replicator` running?)", path.display())
        })?;
        s.set_read_timeout(Some(Duration::from_secs(30))).context("socket timeout")?;
        let mut a = Self { out: s.try_clone().context("socket")?, input: BufReader::new(s) };
        a.send(DOVEADM_CLIENT_HANDSHAKE)?;
        let h = a.line()?;
        if h != DOVEADM_SERVER_HANDSHAKE {
            return Err(Failure::new(exit::TEMPFAIL, anyhow!("{}: unexpected handshake {h:?}", path.display())));
        }
        Ok(a)
    }

    fn send(&mut self, line: &str) -> Result<(), Failure> {
        self.out.write_all(format!("{line}\n").as_bytes()).context("writing to the replicator")?;
        Ok(())
    }

    fn line(&mut self) -> Result<String, Failure> {
        let mut l = String::new();
        if self.input.read_line(&mut l).context("reading from the replicator")? == 0 {
            return Err(Failure::new(exit::TEMPFAIL, anyhow!("the replicator closed the connection")));
        }
        Ok(l.trim_end_matches('\n').to_owned())
    }

    /// Lines up to the empty one.
    fn block(&mut self) -> Result<Vec<String>, Failure> {
        let mut v = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                return Ok(v);
            }
            if let Some(e) = l.strip_prefix('-') {
                return Err(Failure::new(exit::TEMPFAIL, anyhow!("the replicator says: {e}")));
            }
            v.push(l);
        }
    }
}

/// `mailreplica replicate [-f] [-p PRIORITY] USER…`.
pub(crate) fn replicate(config: &Config, full: bool, priority: &str, users: &[String]) -> Result<(), Failure> {
    let p = Priority::from_name(priority)
        .filter(|p| *p != Priority::Sync)
        .ok_or_else(|| Failure::new(exit::USAGE, anyhow!("-p {priority}: use none, low or high")))?;
    let mut admin = Admin::connect(config)?;
    let mut refused = Vec::new();
    for u in users {
        admin.send(&format!("REPLICATE\t{}\t{}\t{}", p.name(), if full { "f" } else { "" }, escape(u)))?;
        let reply = admin.line()?;
        let n: usize = reply
            .strip_prefix('+')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Failure::new(exit::TEMPFAIL, anyhow!("the replicator answered {reply:?}")))?;
        if n == 0 {
            refused.push(u.as_str());
        } else {
            eprintln!("{u}: {n} user{} queued", if n == 1 { "" } else { "s" });
        }
    }
    if !refused.is_empty() {
        return Err(Failure::new(
            exit::NOUSER,
            anyhow!("not replicated by this replicator (not in its users, or no such user): {}", refused.join(", ")),
        ));
    }
    Ok(())
}

fn ago(now: u64, t: u64) -> String {
    if t == 0 { "-".into() } else { format!("{} ago", span(now.saturating_sub(t))) }
}

fn span(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `mailreplica replicator status [MASK]`.
fn status(config: &Config, mask: &str, format: Format) -> Result<(), Failure> {
    let mut admin = Admin::connect(config)?;
    admin.send("STATUS")?;
    let overview = admin.block()?;
    admin.send("STATUS-DSYNC")?;
    let running = admin.block()?.len();
    admin.send(&format!("MR-STATUS\t{}", escape(mask)))?;
    let rows = admin.block()?;
    let t = now();
    let human = format == Format::Table;
    let mut out = std::io::stdout().lock();
    if human {
        for l in &overview {
            let (k, v) = l.split_once('\t').unwrap_or((l, ""));
            writeln!(out, "{k:<32}{v}").context("writing")?;
        }
        writeln!(out, "{:<32}{running}\n", "Syncs running").context("writing")?;
    }
    let titles = [
        "user",
        "priority",
        "running",
        "last_success",
        "last_sync",
        "last_full_sync",
        "failures",
        "next_sync",
        "state",
        "lag",
        "last_error",
    ];
    let mut p = Printer::new(format, titles.iter().map(|t| Column::new(*t)).collect(), &mut out);
    for row in rows {
        let f: Vec<&str> = row.split('\t').collect();
        if f.len() != 13 {
            return Err(Failure::new(exit::TEMPFAIL, anyhow!("the replicator sent a bad status line: {row:?}")));
        }
        let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        let (last_update, last_fast, last_full, last_success, next) = (n(3), n(4), n(5), n(6), n(10));
        let running = f[2] == "1";
        // How long a change has waited for its sync: since the last notification still
        // pending (or being synced now).
        let lag = if (f[1] != "none" || running) && last_update > 0 { t.saturating_sub(last_update) } else { 0 };
        let cells: Vec<String> = if human {
            vec![
                unescape_lenient(f[0]),
                f[1].to_owned(),
                if running { "yes".into() } else { "-".into() },
                ago(t, last_success),
                ago(t, last_fast),
                ago(t, last_full),
                f[7].to_owned(),
                if running {
                    "now".into()
                } else if next <= t {
                    "due".into()
                } else {
                    format!("in {}", span(next - t))
                },
                if f[8] == "1" { "kept".into() } else { "none".into() },
                if lag > 0 { span(lag) } else { "-".into() },
                unescape_lenient(f[12]).replace('\n', " "),
            ]
        } else {
            vec![
                unescape_lenient(f[0]),
                f[1].to_owned(),
                running.to_string(),
                last_success.to_string(),
                last_fast.to_string(),
                last_full.to_string(),
                f[7].to_owned(),
                next.to_string(),
                (f[8] == "1").to_string(),
                lag.to_string(),
                unescape_lenient(f[12]),
            ]
        };
        p.row(&cells.into_iter().map(Cell::Text).collect::<Vec<_>>()).context("writing")?;
    }
    p.finish().context("writing")?;
    if format == Format::Json {
        writeln!(out).context("writing")?;
    }
    Ok(())
}

/// `mailreplica replicator import FILE`.
fn import(config: &Config, file: &Path) -> Result<(), Failure> {
    if UnixStream::connect(&config.replicator.admin_socket).is_ok() {
        return Err(Failure::new(exit::TEMPFAIL, anyhow!("the replicator is running: stop it before an import")));
    }
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    if meta.len() > 4 << 30 {
        return Err(Failure::new(exit::DATAERR, anyhow!("{}: {} bytes is too large", file.display(), meta.len())));
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let records = import_replicator_db(file, &text).map_err(|e| Failure::new(exit::DATAERR, e.into()))?;
    let states = StateDir::open(&config.replicator.state_dir).context("opening the state directory")?;
    let have: HashSet<String> =
        states.load().context("reading the state directory")?.into_iter().map(|r| r.user).collect();
    let total = records.len();
    let new: Vec<_> = records.into_iter().filter(|r| !have.contains(&r.user)).collect();
    let (saved, kept) = (new.len(), total - new.len());
    states.save_all(&new).context("saving the records")?;
    eprintln!(
        "imported {saved} users from {} into {}; {kept} already had a record of ours and kept it",
        file.display(),
        config.replicator.state_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unheld_routes_idle_long_enough_are_closed_and_never_the_configured_one() {
        let t0 = Instant::now();
        let at = |secs: u64| Arc::new(t0 + Duration::from_secs(secs));
        let mut routes: HashMap<String, Arc<Instant>> = HashMap::new();
        routes.insert("default".into(), at(0));
        routes.insert("old".into(), at(0));
        routes.insert("recent".into(), at(590));
        routes.insert("busy".into(), at(0));
        let _running_sync = Arc::clone(&routes["busy"]);
        let now = t0 + Duration::from_secs(600);
        let idle = idle_routes(&routes, "default", now, ROUTE_IDLE, |t| *t);
        assert_eq!(idle, ["old"]);
        assert!(idle_routes(&routes, "default", t0, ROUTE_IDLE, |t| *t).is_empty());
    }
}
