//! `mailreplica-wrapper`: the root-owned SSH forced command that lets a peer replicate the
//! mail of the users the policy allows it, and nothing else.
//!
//! ```text
//! sshd (root, authorized_keys: restrict,command="mailreplica-wrapper --peer mx1")
//!  │ fd 0 = "alice\n" + dsync stream
//!  ▼
//! A  root, before input   uid 0 ×3 · fds 0-2 sane, ≥3 closed · umask 077 · no core, not dumpable
//!                         · deadline armed · args · auth log open · env checked, then replaced
//!                         · policy read (root-owned, StrictModes-like)
//! B  root, input          username read byte by byte to LF from raw fd 0 (cap, deadline)
//!                         · grammar · lookup · exact name · never uid/gid 0 · ranges · allow-list
//!                         · groups · lock file opened in the root-owned lock dir
//! C  the drop             caps (ambient, inheritable, bounding) · setgroups · setresgid
//!                         · setresuid · no_new_privs · proven (setuid(0) fails, Cap* 0, NNP 1)
//!                         = mailreplica::privdrop, the drop `mailreplica -u USER` makes as root
//! D  the user             home opened O_NOFOLLOW, owner/mode checked, fchdir · per-user flock
//!                         · Maildir settings · env HOME/USER/LOGNAME · auth log closed
//!  ▼
//! serve::run              dsync in-process on the same fd 0 / fd 1 (mailreplica::dsync::server)
//! ```
//!
//! Every refusal takes one path ([`refuse`]): exit 126, the single stderr line
//! `mailreplica-wrapper: access denied`, nothing on stdout, at least one second after start,
//! and the real reason, escaped, in the auth log. Design and threat model:
//! `shared/security/WRAPPER-SECURITY.md`; this file follows its §2 order.
//!
//! The only `unsafe` code is in `sys.rs`, and the library's `sys` for the drop's capability calls.
#![deny(unsafe_code)]

mod args;
mod authlog;
mod authz;
mod demote;
mod environ;
mod home;
mod lock;
mod policy;
mod refusal;
mod serve;
mod sys;
mod trust;
mod username;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mailreplica::store::maildir::MaildirSettings;
use mailreplica::userdb::Userdb;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::stat::{Mode, umask};

use crate::args::{Args, Mode as RunMode};
use crate::authlog::{AuthLog, Severity, escape};
use crate::policy::{LoadError, PeerRule, Policy};
use crate::refusal::{Reason, Refusal};
use crate::username::{Grammar, ReadFailure, Username};

/// Everything before serving (username read, lookups, lock wait) must finish within this.
pub(crate) const PRE_SERVE_DEADLINE: Duration = Duration::from_secs(10);
/// `alarm(2)` backstop: kills the process (default SIGALRM action) if something the soft
/// deadline cannot interrupt hangs, e.g. an NSS lookup (LDAP, sssd) inside the root phase.
const HARD_DEADLINE_SECS: u32 = 13;
/// Every refusal takes at least this long from start, so timing tells nothing about the reason.
pub(crate) const MIN_REFUSAL: Duration = Duration::from_secs(1);
/// The only thing a refused peer sees (besides the exit status).
const DENIED_LINE: &str = "mailreplica-wrapper: access denied";
/// Exit status of every refusal.
const EXIT_DENIED: u8 = 126;
/// Longest prefix of peer-controlled bytes written to the log.
const LOG_MAX: usize = 64;

/// What the refusal path and the log lines need; filled in as the phases learn it.
struct Ctx {
    start: Instant,
    log: Option<AuthLog>,
    check: bool,
    peer: String,
    requested: String,
    conn: String,
    cmd: String,
}

impl Ctx {
    /// One auth-log line: `ACTION peer=… user="…" DETAILS conn="…" cmd_len=N cmd="…"`.
    fn log(&mut self, severity: Severity, action: &str, details: &str) {
        let line = format!(
            "{action} peer={} user=\"{}\" {details} conn=\"{}\" {}",
            self.peer, self.requested, self.conn, self.cmd
        );
        if let Some(log) = &mut self.log {
            // Nothing else can be done if the log cannot be written; the decision stands.
            let _ = log.write(severity, &line);
        }
    }
}

fn main() -> ExitCode {
    let mut ctx = Ctx {
        start: Instant::now(),
        log: None,
        check: false,
        peer: "-".to_owned(),
        requested: String::new(),
        conn: String::new(),
        cmd: String::new(),
    };
    match run(&mut ctx) {
        Ok(code) => code,
        Err(refusal) => refuse(ctx, refusal),
    }
}

/// The one exit path for every refusal.
fn refuse(mut ctx: Ctx, r: Refusal) -> ExitCode {
    if ctx.log.is_none() {
        ctx.log = AuthLog::open(None).ok();
    }
    let detail = escape(r.detail.as_bytes(), 400);
    ctx.log(Severity::Warning, "deny", &format!("reason={} detail=\"{detail}\"", r.reason.code()));
    if ctx.check {
        println!("peer {} user \"{}\": deny reason={} ({detail})", ctx.peer, ctx.requested, r.reason.code());
        return ExitCode::from(1);
    }
    let spent = ctx.start.elapsed();
    if spent < MIN_REFUSAL {
        std::thread::sleep(MIN_REFUSAL - spent);
    }
    // Not eprintln!: a peer that closed stderr must not turn the refusal into a panic.
    let _ = writeln!(std::io::stderr(), "{DENIED_LINE}");
    ExitCode::from(EXIT_DENIED)
}

fn setup(what: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::Setup, format!("{what}: {e}"))
}

/// Phase A, then the mode's own phases.
fn run(ctx: &mut Ctx) -> Result<ExitCode, Refusal> {
    let ids = nix::unistd::getresuid().map_err(|e| setup("getresuid", e))?;
    if [ids.real, ids.effective, ids.saved].iter().any(|u| !u.is_root()) {
        return Err(Refusal::new(Reason::NotRoot, format!("uids {} {} {}", ids.real, ids.effective, ids.saved)));
    }
    sys::ensure_std_fds().map_err(|e| setup("fds 0-2", e))?;
    sys::close_fds_from_3().map_err(|e| setup("close_range", e))?;
    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| setup("RLIMIT_CORE", e))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| setup("PR_SET_DUMPABLE", e))?;
    sys::arm_sigalrm_default().map_err(|e| setup("SIGALRM", e))?;
    nix::unistd::alarm::set(HARD_DEADLINE_SECS);

    let args = args::parse(std::env::args_os().skip(1));
    if let Ok(Args { mode: RunMode::Check { .. }, .. }) = &args {
        ctx.check = true;
    }
    let explicit_log = args.as_ref().ok().and_then(|a| a.auth_log.clone());
    ctx.log = Some(AuthLog::open(explicit_log.as_deref()).map_err(|e| setup("auth log", e))?);
    let env_bytes = |k: &str| std::env::var_os(k).map(|v| v.into_encoded_bytes()).unwrap_or_default();
    ctx.conn = escape(&env_bytes("SSH_CONNECTION"), LOG_MAX);
    let cmd = env_bytes("SSH_ORIGINAL_COMMAND");
    ctx.cmd = format!("cmd_len={} cmd=\"{}\"", cmd.len(), escape(&cmd, LOG_MAX));
    let bad_env = environ::poisoned(std::env::vars_os());
    if !bad_env.is_empty() {
        return Err(Refusal::new(Reason::PoisonedEnv, format!("environment has {}", bad_env.join(","))));
    }
    sys::clear_env();
    sys::set_env("PATH", "/usr/bin:/bin");

    let args = args.map_err(|e| Refusal::new(Reason::BadArguments, e))?;
    let policy = Policy::load(&args.policy).map_err(|e| match e {
        LoadError::Untrusted(d) => Refusal::new(Reason::PolicyUntrusted, d),
        LoadError::Invalid(d) => Refusal::new(Reason::PolicyInvalid, d),
    })?;
    match args.mode {
        RunMode::Serve { peer } => {
            ctx.peer = peer;
            serve_session(ctx, &policy)
        }
        RunMode::Check { peer: Some(peer), user } => {
            ctx.peer = peer;
            ctx.requested = escape(user.as_bytes(), LOG_MAX);
            check_one(ctx, &policy, user.as_bytes())
        }
        RunMode::Check { peer: None, user } => {
            ctx.requested = escape(user.as_bytes(), LOG_MAX);
            Ok(check_all(&policy, user.as_bytes()))
        }
    }
}

fn rule_for<'p>(policy: &'p Policy, peer: &str) -> Result<&'p PeerRule, Refusal> {
    policy.peers.get(peer).ok_or_else(|| Refusal::new(Reason::NoPeerRule, "no [peer] rule for this peer"))
}

fn grammar(rule: &PeerRule) -> Grammar {
    match rule.userdb {
        Userdb::PasswdFile(_) => Grammar::SystemOrVirtual,
        _ => Grammar::System,
    }
}

/// Phases B to D for a real session, then the hand-off.
fn serve_session(ctx: &mut Ctx, policy: &Policy) -> Result<ExitCode, Refusal> {
    let deadline = ctx.start + PRE_SERVE_DEADLINE;
    let rule = rule_for(policy, &ctx.peer)?;

    // B: the username, from raw fd 0, never past its LF.
    let raw = match username::read_line(sys::stdin_fd(), deadline) {
        Ok(line) => line,
        Err((why, partial)) => {
            ctx.requested = escape(&partial, LOG_MAX);
            let reason = match why {
                ReadFailure::Timeout => Reason::ReadTimeout,
                ReadFailure::TooLong => Reason::LineTooLong,
                ReadFailure::Eof => Reason::EofBeforeNewline,
                ReadFailure::Io(_) => Reason::ReadError,
            };
            return Err(Refusal::new(reason, format!("{why:?} after {} bytes", partial.len())));
        }
    };
    ctx.requested = escape(&raw, LOG_MAX);
    let name = Username::parse(&raw, grammar(rule))
        .ok_or_else(|| Refusal::new(Reason::BadName, format!("{} bytes, not a valid name", raw.len())))?;
    let acct = authz::decide(rule, &name)?;
    let lock_fd = lock::prepare(&policy.lock_dir, &name)?;

    // C: the drop.
    let me = demote::drop_to(&acct)?;

    // D: the user.
    let home = home::enter(&acct, &me)?;
    let wait = policy.lock_wait.min(deadline.saturating_duration_since(Instant::now()));
    let lock = lock::acquire(lock_fd, wait, &me)?;
    let defaults = MaildirSettings::new(&acct.home);
    let settings = rule
        .mail_location
        .expand(name.as_str(), &acct.home, &defaults.hostname, defaults.lock_wait)
        .map_err(|e| Refusal::new(Reason::MailLocation, e.to_string()))?;
    sys::set_env("HOME", &acct.home);
    sys::set_env("USER", name.as_str());
    sys::set_env("LOGNAME", name.as_str());
    nix::unistd::alarm::cancel();
    let maildir = escape(settings.root.as_os_str().as_encoded_bytes(), 200);
    let spent = ctx.start.elapsed().as_micros();
    ctx.log(Severity::Notice, "accept", &format!("{} maildir=\"{maildir}\" pre_serve_us={spent}", me.evidence()));
    // The served process must not be able to write to the root-only log file.
    ctx.log = None;

    Ok(serve::run(serve::Session {
        peer: ctx.peer.clone(),
        user: name.as_str().to_owned(),
        settings,
        input: sys::stdin_fd(),
        lock,
        home,
        unprivileged: me,
    }))
}

/// `--check --peer NAME USER`: the same phases as a session (including the real drop and the
/// home check, so the proof is honest), printed to stdout instead of serving.
fn check_one(ctx: &mut Ctx, policy: &Policy, user: &[u8]) -> Result<ExitCode, Refusal> {
    let rule = rule_for(policy, &ctx.peer)?;
    let name = Username::parse(user, grammar(rule))
        .ok_or_else(|| Refusal::new(Reason::BadName, format!("{} bytes, not a valid name", user.len())))?;
    let acct = authz::decide(rule, &name)?;
    let me = demote::drop_to(&acct)?;
    let _home = home::enter(&acct, &me)?;
    let defaults = MaildirSettings::new(&acct.home);
    let settings = rule
        .mail_location
        .expand(name.as_str(), &acct.home, &defaults.hostname, defaults.lock_wait)
        .map_err(|e| Refusal::new(Reason::MailLocation, e.to_string()))?;
    ctx.log(Severity::Notice, "check-allow", me.evidence());
    println!("peer {} user \"{}\": allow", ctx.peer, name.as_str());
    println!("  home {} (owner and mode ok)", acct.home.display());
    println!("  maildir {}", settings.root.display());
    println!("  drop verified: {}", me.evidence());
    Ok(ExitCode::SUCCESS)
}

/// `--check USER`: the policy decision for every peer (no drop: one process can drop once).
fn check_all(policy: &Policy, user: &[u8]) -> ExitCode {
    let shown = escape(user, LOG_MAX);
    let mut any = false;
    if policy.peers.is_empty() {
        println!("no [peer] rules: every peer is denied");
    }
    for (peer, rule) in &policy.peers {
        let decision = Username::parse(user, grammar(rule))
            .ok_or_else(|| Refusal::new(Reason::BadName, "not a valid name"))
            .and_then(|n| authz::decide(rule, &n));
        match decision {
            Ok(a) => {
                any = true;
                let groups: Vec<String> = a.groups.iter().map(u32::to_string).collect();
                println!(
                    "peer {peer} user \"{shown}\": allow uid={} gid={} groups={} home={}",
                    a.uid,
                    a.gid,
                    groups.join(","),
                    a.home.display()
                );
            }
            Err(r) => println!(
                "peer {peer} user \"{shown}\": deny reason={} ({})",
                r.reason.code(),
                escape(r.detail.as_bytes(), 400)
            ),
        }
    }
    if any { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
