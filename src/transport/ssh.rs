//! The embedded SSH client (russh): one connection, strictly verified and authenticated,
//! carrying exec channels whose data is handed to blocking code as a `Read` + `Write` pair.
//!
//! ```text
//!   SshConnection::connect      no thread is started: TCP, key exchange, host key check
//!     (current-thread runtime,  against known_hosts (refused before anything else is sent),
//!      driven by the caller)    public-key auth with the key file(s), then ssh-agent
//!   SshConnection::exec         starts the "ssh-io" thread that drives the connection from
//!                               then on, opens a session channel and execs the command
//!
//!   ChannelWriter ──Vec<u8> chunks (≤ 8 queued)──► writer task ─ data_bytes ─► channel
//!   ChannelReader ◄──Bytes (≤ 32 queued)────────── pump task ◄─ Data / stderr / Eof /
//!   ChannelEnd    ◄──exit status, signal, stderr── (after Close)   ExitStatus / Close
//! ```
//!
//! Because `connect` starts no thread, a root process can connect with root's key and then
//! drop its privileges for good (which refuses to run with a second thread alive) before the
//! first `exec`. Memory is bounded by the two queues plus russh's per-channel buffer; the pump
//! keeps draining the channel even when nobody reads any more, so a slow or finished reader
//! never stalls the connection, and it keeps going after the remote's EOF until Close, since
//! OpenSSH sends the exit status between the two.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, Preferred};
use tokio::sync::{mpsc, oneshot};

use super::keys::{self, KeyError};
use super::known_hosts::{self, KnownHosts, Verdict, describe, lookup_name};

/// Reader-side queue: chunks of channel data between the pump task and [`ChannelReader`].
const READ_QUEUE: usize = 32;
/// Writer-side queue: chunks between [`ChannelWriter`] and the writer task.
const WRITE_QUEUE: usize = 8;
/// At most this much of the remote's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;

/// Knobs that trade memory for throughput; the defaults are what `examples/ssh_throughput.rs`
/// found fastest on a 2-core machine against OpenSSH 9.2 (see BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The channel window we grant the server.
    pub window_size: u32,
    /// The largest packet we accept (≤ 65535).
    pub maximum_packet_size: u32,
    /// russh's per-channel message buffer.
    pub channel_buffer_size: usize,
    /// Bytes [`ChannelWriter`] collects before handing them to the connection.
    pub write_chunk: usize,
    /// Ciphers, most preferred first.
    pub ciphers: Vec<russh::cipher::Name>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            window_size: 16 << 20,
            maximum_packet_size: 65535,
            channel_buffer_size: 64,
            write_chunk: 128 << 10,
            ciphers: vec![
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_128_CTR,
            ],
        }
    }
}

/// Everything a connection needs.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login name on the server.
    pub user: String,
    /// The private key file; `None`: `id_ed25519` and `id_rsa` in [`SshSettings::ssh_dir`],
    /// those that exist.
    pub key_file: Option<PathBuf>,
    /// A file holding the key's passphrase (first line).
    pub passphrase_file: Option<PathBuf>,
    /// The running user's `~/.ssh` (for the default key files).
    pub ssh_dir: PathBuf,
    /// The known_hosts file.
    pub known_hosts: PathBuf,
    /// Trust a host that the file doesn't list at all, and append its key to the file
    /// (OpenSSH's `StrictHostKeyChecking=accept-new`).
    pub accept_new_host_key: bool,
    /// Also offer ssh-agent's keys (when `SSH_AUTH_SOCK` is set).
    pub use_agent: bool,
    /// Time allowed to connect, check the host key and log in.
    pub connect_timeout: Duration,
    /// Send a keepalive after this long without traffic from the server; the connection is
    /// given up after three unanswered ones.
    pub keepalive_interval: Duration,
    /// Close the connection after this long without any traffic at all.
    pub inactivity_timeout: Duration,
    /// Performance knobs.
    pub tuning: Tuning,
}

impl SshSettings {
    /// Settings with the defaults: the running user's `~/.ssh/known_hosts` and keys, agent
    /// allowed, 30 s to connect, keepalives every 15 s.
    pub fn new(host: &str, port: u16, user: &str) -> Self {
        let ssh_dir = default_ssh_dir();
        Self {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            key_file: None,
            passphrase_file: None,
            known_hosts: ssh_dir.join("known_hosts"),
            ssh_dir,
            accept_new_host_key: false,
            use_agent: true,
            connect_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(15),
            inactivity_timeout: Duration::from_secs(600),
            tuning: Tuning::default(),
        }
    }

    /// `user@host` or `user@[host]:port`, for messages.
    pub fn label(&self) -> String {
        format!("{}@{}", self.user, lookup_name(&self.host, self.port))
    }
}

/// The `~/.ssh` of the user this process runs as (its passwd entry, not `$HOME`, which
/// `sudo` may have kept from the caller); `$HOME/.ssh` if there is no entry.
pub fn default_ssh_dir() -> PathBuf {
    let home = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".ssh")
}

/// Why the server's host key was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostKeyError {
    /// The host is not in the known_hosts file.
    #[error(
        "the host key of {name} is not known: {offered} is not in {}. Check that fingerprint \
         with the server's admin (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub there), then \
         add it with `ssh-keyscan -p {port} {host} >> {}`, or run once with \
         --accept-new-host-key to trust and record it",
        path.display(),
        path.display()
    )]
    Unknown {
        /// `host` or `[host]:port`.
        name: String,
        /// Host name.
        host: String,
        /// Port.
        port: u16,
        /// Type and fingerprint of the key the server offered.
        offered: String,
        /// The known_hosts file.
        path: PathBuf,
    },
    /// A different key of the same type is listed: maybe a man in the middle.
    #[error(
        "HOST KEY CHANGED for {name}: the server offered {offered}, but {} line {line} lists \
         a different key of that type. Someone could be intercepting the connection (man in the \
         middle), or the host key was replaced; if you know it was, remove line {line} and add \
         the new key",
        path.display()
    )]
    Changed {
        /// `host` or `[host]:port`.
        name: String,
        /// Type and fingerprint of the key the server offered.
        offered: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The line with the other key.
        line: usize,
    },
    /// The key is marked `@revoked`.
    #[error("the host key of {name}, {offered}, is revoked (@revoked in {} line {line})", path.display())]
    Revoked {
        /// `host` or `[host]:port`.
        name: String,
        /// Type and fingerprint of the key the server offered.
        offered: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The `@revoked` line.
        line: usize,
    },
    /// The host is listed only with other key types.
    #[error(
        "{name} is listed in {} only with other key types ({} on line(s) {}), and the server \
         offered {offered}; add its {offered_type} key only if you know it is genuine",
        path.display(),
        types.join(", "),
        lines.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
    )]
    OtherTypes {
        /// `host` or `[host]:port`.
        name: String,
        /// Type and fingerprint of the key the server offered.
        offered: String,
        /// Its type name.
        offered_type: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The lines that list the host.
        lines: Vec<usize>,
        /// Their key types.
        types: Vec<String>,
    },
    /// Only `@cert-authority` lines match.
    #[error(
        "certificate host keys are not supported: only the @cert-authority line {line} of {} \
         matches {name}; list the host's own key ({offered}) instead",
        path.display()
    )]
    CertAuthorityOnly {
        /// `host` or `[host]:port`.
        name: String,
        /// Type and fingerprint of the key the server offered.
        offered: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The `@cert-authority` line.
        line: usize,
    },
    /// The server presented a certificate (we never ask for one).
    #[error("{name} presented a host certificate; certificate host keys are not supported")]
    Certificate {
        /// `host` or `[host]:port`.
        name: String,
    },
    /// A later key exchange presented another key than the first.
    #[error("{name} changed its host key during the connection")]
    ChangedDuringConnection {
        /// `host` or `[host]:port`.
        name: String,
    },
}

/// Why an SSH connection or channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The host name did not resolve.
    #[error("can't resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// TCP connect failed (refused, unreachable, …).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Every address tried.
        addr: String,
        /// The last error.
        source: io::Error,
    },
    /// Connecting, the key exchange or the login took too long.
    #[error("no SSH session with {target} within {} s (ssh_connect_timeout)", timeout.as_secs())]
    ConnectTimeout {
        /// `user@host`.
        target: String,
        /// The limit.
        timeout: Duration,
    },
    /// The known_hosts file exists but can't be read.
    #[error("reading {}: {source}", path.display())]
    KnownHostsRead {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The new host key could not be recorded.
    #[error("adding the host key to {}: {source}", path.display())]
    KnownHostsWrite {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The server's host key was refused.
    #[error(transparent)]
    HostKey(Box<HostKeyError>),
    /// A key file can't be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Nothing to authenticate with.
    #[error(
        "no private key to log in with: set ssh_key, create {0}/id_ed25519, or run ssh-agent and set SSH_AUTH_SOCK"
    )]
    NoIdentity(String),
    /// The server accepted none of our keys.
    #[error("{target} refused public-key authentication; tried {}", tried.join("; "))]
    AuthRefused {
        /// `user@host`.
        target: String,
        /// Each key offered (file or agent, type and fingerprint), and agent problems.
        tried: Vec<String>,
    },
    /// The server refused the exec request.
    #[error("{target} refused to run {command:?} (exec request denied)")]
    ExecRefused {
        /// `user@host`.
        target: String,
        /// The command.
        command: String,
    },
    /// An SSH protocol failure, with where it happened.
    #[error("SSH with {target}: {source}")]
    Protocol {
        /// `user@host`.
        target: String,
        /// russh's error.
        source: russh::Error,
    },
    /// A russh error before it is given its context (the handler's error type needs it).
    #[error("SSH: {0}")]
    Russh(#[from] russh::Error),
    /// The I/O thread could not be started.
    #[error("starting the SSH I/O thread: {0}")]
    Thread(io::Error),
}

impl From<HostKeyError> for SshError {
    fn from(e: HostKeyError) -> Self {
        Self::HostKey(Box::new(e))
    }
}

impl SshError {
    /// The server refused to open a channel (OpenSSH does when `MaxSessions` channels are
    /// open on the connection already): worth trying again once one has closed.
    pub fn is_channel_refused(&self) -> bool {
        matches!(self, Self::Protocol { source: russh::Error::ChannelOpenFailure(_), .. })
    }

    /// The connection itself is gone (the server or the network dropped it, or it timed out):
    /// a new connection may succeed where a new channel on this one cannot.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Self::Protocol {
                source: russh::Error::Disconnect
                    | russh::Error::HUP
                    | russh::Error::SendError
                    | russh::Error::IO(_)
                    | russh::Error::KeepaliveTimeout
                    | russh::Error::InactivityTimeout,
                ..
            }
        )
    }

    fn with_target(self, target: &str) -> Self {
        match self {
            Self::Russh(source) => Self::Protocol { target: target.to_owned(), source },
            e => e,
        }
    }
}

/// The host key check, run by russh during every key exchange.
struct Verifier {
    known: KnownHosts,
    host: String,
    port: u16,
    accept_new: bool,
    /// The key accepted in the first key exchange; later ones must present the same.
    pinned: Arc<Mutex<Option<(PublicKey, bool)>>>,
}

impl client::Handler for Verifier {
    type Error = SshError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, SshError> {
        let name = lookup_name(&self.host, self.port);
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Err(HostKeyError::Certificate { name }.into());
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, _)) = pinned.as_ref() {
            return if k.key_data() == key.key_data() {
                Ok(true)
            } else {
                Err(HostKeyError::ChangedDuringConnection { name }.into())
            };
        }
        let offered = describe(key);
        let path = self.known.path().to_path_buf();
        let verdict = self.known.check(&self.host, self.port, key);
        let err: HostKeyError = match verdict {
            Verdict::Trusted { line } => {
                tracing::debug!("host key of {name} ({offered}) found in {} line {line}", path.display());
                *pinned = Some((key.clone(), false));
                return Ok(true);
            }
            Verdict::Unknown if self.accept_new => {
                *pinned = Some((key.clone(), true));
                return Ok(true);
            }
            Verdict::Unknown => HostKeyError::Unknown { name, host: self.host.clone(), port: self.port, offered, path },
            Verdict::Changed { line } => HostKeyError::Changed { name, offered, path, line },
            Verdict::Revoked { line } => HostKeyError::Revoked { name, offered, path, line },
            Verdict::OtherTypes { lines, types } => {
                let offered_type = key.algorithm().as_str().to_owned();
                HostKeyError::OtherTypes { name, offered, offered_type, path, lines, types }
            }
            Verdict::CertAuthorityOnly { line } => HostKeyError::CertAuthorityOnly { name, offered, path, line },
        };
        Err(err.into())
    }
}

/// A private key loaded from a file.
struct FileIdentity {
    path: PathBuf,
    key: Arc<PrivateKey>,
}

/// The key files to offer: the configured one, or the default ones that exist. An encrypted
/// key without a passphrase is an error unless the agent can stand in for it.
fn load_identities(s: &SshSettings, agent: bool) -> Result<(Vec<FileIdentity>, Vec<String>), SshError> {
    let pass = s.passphrase_file.as_deref().map(keys::read_passphrase).transpose()?;
    let files: Vec<PathBuf> = match &s.key_file {
        Some(p) => vec![p.clone()],
        None => ["id_ed25519", "id_rsa"].iter().map(|n| s.ssh_dir.join(n)).filter(|p| p.exists()).collect(),
    };
    let mut ids = Vec::new();
    let mut notes = Vec::new();
    for path in files {
        match keys::load_private_key(&path, pass.as_ref()) {
            Ok(key) => ids.push(FileIdentity { path, key: Arc::new(key) }),
            Err(e @ KeyError::Encrypted { .. }) if agent => {
                tracing::info!("{e}; trying ssh-agent's keys instead");
                notes.push(format!("{} (encrypted, no passphrase)", path.display()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if ids.is_empty() && !agent {
        return Err(SshError::NoIdentity(s.ssh_dir.display().to_string()));
    }
    Ok((ids, notes))
}

fn client_config(s: &SshSettings, known: &KnownHosts) -> client::Config {
    // Host key types the file lists for this host come first, as OpenSSH orders them.
    let mut key: Vec<Algorithm> = known.known_algorithms(&s.host, s.port);
    for a in Preferred::DEFAULT.key.iter() {
        if !key.contains(a) {
            key.push(a.clone());
        }
    }
    let t = &s.tuning;
    client::Config {
        window_size: t.window_size,
        maximum_packet_size: t.maximum_packet_size.min(65535),
        channel_buffer_size: t.channel_buffer_size,
        keepalive_interval: Some(s.keepalive_interval),
        keepalive_max: 3,
        inactivity_timeout: Some(s.inactivity_timeout),
        nodelay: true,
        preferred: Preferred { key: Cow::Owned(key), cipher: Cow::Owned(t.ciphers.clone()), ..Preferred::DEFAULT },
        ..Default::default()
    }
}

async fn tcp_connect(addrs: &[SocketAddr]) -> Result<tokio::net::TcpStream, SshError> {
    let mut last = None;
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let addr = addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(", ");
    Err(SshError::Connect { addr, source: last.unwrap_or_else(|| io::Error::other("no address")) })
}

async fn authenticate(
    h: &mut Handle<Verifier>,
    s: &SshSettings,
    files: &[FileIdentity],
    mut tried: Vec<String>,
    agent: bool,
) -> Result<(), SshError> {
    let rsa_hash = h.best_supported_rsa_hash().await?.flatten();
    for id in files {
        let key = PrivateKeyWithHashAlg::new(Arc::clone(&id.key), rsa_hash);
        if h.authenticate_publickey(s.user.as_str(), key).await?.success() {
            tracing::debug!("logged in to {} with {}", s.label(), id.path.display());
            return Ok(());
        }
        tried.push(format!("{} ({})", id.path.display(), describe(id.key.public_key())));
    }
    if agent {
        match AgentClient::connect_env().await {
            Err(e) => tried.push(format!("ssh-agent (can't connect: {e})")),
            Ok(mut client) => {
                let ids = match client.request_identities().await {
                    Ok(ids) => ids,
                    Err(e) => {
                        tried.push(format!("ssh-agent (can't list keys: {e})"));
                        Vec::new()
                    }
                };
                if ids.is_empty() {
                    tried.push("ssh-agent (no keys)".to_owned());
                }
                for id in ids {
                    let public = id.public_key().into_owned();
                    let what = format!("ssh-agent key {}", describe(&public));
                    match h.authenticate_publickey_with(s.user.as_str(), public, rsa_hash, &mut client).await {
                        Ok(r) if r.success() => {
                            tracing::debug!("logged in to {} with {what}", s.label());
                            return Ok(());
                        }
                        Ok(_) => tried.push(what),
                        Err(e) => tried.push(format!("{what} (the agent failed: {e})")),
                    }
                }
            }
        }
    }
    Err(SshError::AuthRefused { target: s.label(), tried })
}

/// An authenticated SSH connection.
pub struct SshConnection {
    rt: Arc<tokio::runtime::Runtime>,
    handle: Option<Handle<Verifier>>,
    label: String,
    driver: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
    write_chunk: usize,
}

impl std::fmt::Debug for SshConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConnection").field("target", &self.label).finish_non_exhaustive()
    }
}

impl SshConnection {
    /// Connects, checks the host key, logs in. Starts no thread: the caller's thread drives
    /// the connection until the first [`SshConnection::exec`].
    pub fn connect(s: &SshSettings) -> Result<Self, SshError> {
        let label = s.label();
        let agent = s.use_agent && std::env::var_os("SSH_AUTH_SOCK").is_some_and(|v| !v.is_empty());
        // Everything local first: keys (and their modes), known_hosts, the address.
        let (files, notes) = load_identities(s, agent)?;
        let known = KnownHosts::load(&s.known_hosts)
            .map_err(|source| SshError::KnownHostsRead { path: s.known_hosts.clone(), source })?;
        for w in &known.warnings {
            tracing::warn!("{w}");
        }
        let config = Arc::new(client_config(s, &known));
        let addrs: Vec<SocketAddr> = (s.host.as_str(), s.port)
            .to_socket_addrs()
            .map_err(|source| SshError::Resolve { host: s.host.clone(), source })?
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(SshError::Thread)?;
        let pinned = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            known,
            host: s.host.clone(),
            port: s.port,
            accept_new: s.accept_new_host_key,
            pinned: Arc::clone(&pinned),
        };
        let session = async {
            let tcp = tcp_connect(&addrs).await?;
            let mut h = client::connect_stream(config, tcp, verifier).await?;
            // The key exchange is over and the host proved it holds the key: record a new one
            // now, as OpenSSH does, before logging in.
            let pinned_key = pinned.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some((key, true)) = pinned_key {
                let line = known_hosts::entry_line(&s.host, s.port, &key);
                known_hosts::append(&s.known_hosts, &line)
                    .map_err(|source| SshError::KnownHostsWrite { path: s.known_hosts.clone(), source })?;
                tracing::warn!(
                    "Permanently added '{}' ({}) to {}",
                    lookup_name(&s.host, s.port),
                    describe(&key),
                    s.known_hosts.display()
                );
            }
            authenticate(&mut h, s, &files, notes, agent).await?;
            Ok::<_, SshError>(h)
        };
        let handle = rt
            .block_on(async { tokio::time::timeout(s.connect_timeout, session).await })
            .map_err(|_| SshError::ConnectTimeout { target: label.clone(), timeout: s.connect_timeout })?
            .map_err(|e| e.with_target(&label))?;
        Ok(Self {
            rt: Arc::new(rt),
            handle: Some(handle),
            label,
            driver: None,
            write_chunk: s.tuning.write_chunk.max(1024),
        })
    }

    /// `user@host` or `user@[host]:port`.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn start_driver(&mut self) -> Result<(), SshError> {
        if self.driver.is_some() {
            return Ok(());
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let rt = Arc::clone(&self.rt);
        let thread = std::thread::Builder::new()
            .name("ssh-io".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })
            .map_err(SshError::Thread)?;
        self.driver = Some((stop, thread));
        Ok(())
    }

    /// Opens a session channel and runs `command` on it (the server's forced command, if any,
    /// runs instead). From the first call on, one thread drives the connection.
    pub fn exec(&mut self, command: &str) -> Result<SshChannel, SshError> {
        self.exec_tagged(command, None)
    }

    /// [`SshConnection::exec`], with the channel's log lines and errors (the remote's stderr,
    /// a lost channel) naming `tag` after the connection, e.g. the user a channel syncs when
    /// many share the connection.
    pub fn exec_tagged(&mut self, command: &str, tag: Option<&str>) -> Result<SshChannel, SshError> {
        self.start_driver()?;
        let label = match tag {
            Some(t) => format!("{} [{t}]", self.label),
            None => self.label.clone(),
        };
        let Some(handle) = self.handle.as_ref() else {
            return Err(SshError::Protocol { target: label, source: russh::Error::Disconnect });
        };
        let rt = self.rt.handle().clone();
        let ch = rt
            .block_on(async {
                let ch = handle.channel_open_session().await?;
                ch.exec(true, command).await?;
                Ok::<_, russh::Error>(ch)
            })
            .map_err(|source| SshError::Protocol { target: label.clone(), source })?;
        let (read_half, write_half) = ch.split();
        let (data_tx, data_rx) = mpsc::channel(READ_QUEUE);
        let (end_tx, end_rx) = oneshot::channel();
        rt.spawn(pump(read_half, data_tx, end_tx, label.clone(), command.to_owned()));
        let (out_tx, out_rx) = mpsc::channel(WRITE_QUEUE);
        let failed = Arc::new(Mutex::new(None));
        rt.spawn(write_task(write_half, out_rx, Arc::clone(&failed)));
        Ok(SshChannel {
            reader: ChannelReader { rx: data_rx, cur: Bytes::new(), done: false, pending: None },
            writer: ChannelWriter {
                tx: Some(out_tx),
                buf: Vec::with_capacity(self.write_chunk),
                chunk: self.write_chunk,
                failed,
            },
            end: ChannelEnd { rx: end_rx, rt, label },
        })
    }

    /// True once the connection has ended (the server hung up, the network dropped it, a
    /// keepalive or inactivity timeout fired): no new channel can be opened on it.
    pub fn is_closed(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_closed())
    }

    /// Says goodbye to the server and stops the I/O thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            let bye = async {
                let _ = tokio::time::timeout(Duration::from_secs(5), h.disconnect(Disconnect::ByApplication, "", "en"))
                    .await;
            };
            if self.driver.is_some() {
                self.rt.handle().block_on(bye);
            } else {
                self.rt.block_on(bye);
            }
        }
        if let Some((stop, thread)) = self.driver.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for SshConnection {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One exec channel: its data as a blocking reader and writer, and how it ended.
#[derive(Debug)]
pub struct SshChannel {
    /// The command's stdout.
    pub reader: ChannelReader,
    /// The command's stdin; dropping it (or [`ChannelWriter::close`]) sends EOF.
    pub writer: ChannelWriter,
    /// The exit status, once the channel closed.
    pub end: ChannelEnd,
}

/// How the remote command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteEnd {
    /// Its exit status, if the server sent one.
    pub exit_status: Option<u32>,
    /// The signal that killed it (`TERM`, …), with sshd's message.
    pub exit_signal: Option<String>,
    /// The last lines it wrote on stderr (each was also logged as it came).
    pub stderr_tail: String,
    /// The server refused the exec request.
    pub exec_refused: bool,
    /// The server sent EOF on the command's stdout.
    pub eof: bool,
    /// The channel was closed properly (false: the connection was lost).
    pub closed: bool,
}

impl RemoteEnd {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// `exit status 126`, `killed by signal KILL`, `no exit status (connection lost)`, …
    pub fn describe(&self) -> String {
        match (&self.exit_status, &self.exit_signal) {
            (Some(s), _) => format!("exit status {s}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) if self.exec_refused => "exec request refused".to_owned(),
            (None, None) if !self.closed => "no exit status (the connection was lost)".to_owned(),
            (None, None) => "no exit status".to_owned(),
        }
    }
}

/// Waits for the channel to close.
#[derive(Debug)]
pub struct ChannelEnd {
    rx: oneshot::Receiver<RemoteEnd>,
    rt: tokio::runtime::Handle,
    label: String,
}

impl ChannelEnd {
    /// Waits up to `timeout` for the server to close the channel (the exit status comes just
    /// before that); `None` if it didn't.
    pub fn wait(self, timeout: Duration) -> Option<RemoteEnd> {
        let rx = self.rx;
        match self.rt.block_on(async { tokio::time::timeout(timeout, rx).await }) {
            Ok(Ok(end)) => Some(end),
            Ok(Err(_)) => Some(RemoteEnd::default()),
            Err(_) => {
                tracing::warn!("{}: the remote command did not finish within {} s", self.label, timeout.as_secs());
                None
            }
        }
    }
}

fn lost(label: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, format!("the SSH channel to {label} closed without EOF"))
}

/// Reads the channel until Close, whoever still listens: data to the reader (until it is
/// gone), stderr to the log, the exit status to [`ChannelEnd`].
async fn pump(
    mut rx: ChannelReadHalf,
    data: mpsc::Sender<io::Result<Bytes>>,
    end: oneshot::Sender<RemoteEnd>,
    label: String,
    command: String,
) {
    let mut out = RemoteEnd::default();
    let mut data = Some(data);
    let mut exec_answered = false;
    let mut stderr = Stderr { label: &label, line: Vec::new(), tail: String::new() };
    while let Some(msg) = rx.wait().await {
        match msg {
            ChannelMsg::Data { data: bytes } => {
                if let Some(tx) = &data
                    && tx.send(Ok(bytes)).await.is_err()
                {
                    // The reader is gone: keep draining so the connection never stalls.
                    data = None;
                }
            }
            ChannelMsg::ExtendedData { data: bytes, ext: 1 } => stderr.push(&bytes),
            ChannelMsg::Eof => {
                out.eof = true;
                data = None;
            }
            ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, .. } => {
                let mut s = format!("{signal_name:?}");
                if core_dumped {
                    s.push_str(" (core dumped)");
                }
                if !error_message.is_empty() {
                    s.push_str(": ");
                    s.push_str(&error_message);
                }
                out.exit_signal = Some(s);
            }
            ChannelMsg::Success if !exec_answered => exec_answered = true,
            ChannelMsg::Failure if !exec_answered => {
                out.exec_refused = true;
                if let Some(tx) = data.take() {
                    let e = io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{label} refused to run {command:?} (exec request denied)"),
                    );
                    let _ = tx.send(Err(e)).await;
                }
                break;
            }
            ChannelMsg::Close => {
                out.closed = true;
                break;
            }
            _ => {}
        }
    }
    stderr.finish();
    out.stderr_tail = stderr.tail;
    if !out.eof
        && let Some(tx) = data.take()
    {
        let _ = tx.send(Err(lost(&label))).await;
    }
    let _ = end.send(out);
}

/// The remote's stderr, logged line by line, the last lines kept.
struct Stderr<'a> {
    label: &'a str,
    line: Vec<u8>,
    tail: String,
}

impl Stderr<'_> {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.line.len() >= 1024 {
                self.emit();
            }
            if b != b'\n' {
                self.line.push(b);
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).trim_end().to_owned();
        self.line.clear();
        if text.is_empty() {
            return;
        }
        tracing::warn!("{}: {}", self.label, text.escape_debug());
        if !self.tail.is_empty() {
            self.tail.push('\n');
        }
        self.tail.push_str(&text);
        if self.tail.len() > STDERR_TAIL {
            let mut cut = self.tail.len() - STDERR_TAIL;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.drain(..cut);
        }
    }

    fn finish(&mut self) {
        self.emit();
    }
}

async fn write_task(
    tx: ChannelWriteHalf<client::Msg>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    failed: Arc<Mutex<Option<String>>>,
) {
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = tx.data_bytes(chunk).await {
            *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            return;
        }
    }
    // The writer was dropped or closed: everything it wrote is queued, then EOF.
    let _ = tx.eof().await;
}

/// The remote command's stdout, as a blocking reader (for a thread outside the runtime).
/// `Ok(0)` after the server's EOF; an error if the channel ended without one.
#[derive(Debug)]
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    done: bool,
    pending: Option<io::Error>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        loop {
            if !self.cur.is_empty() {
                let k = self.cur.len().min(buf.len() - n);
                let chunk = self.cur.split_to(k);
                buf[n..n + k].copy_from_slice(&chunk);
                n += k;
                if n == buf.len() {
                    return Ok(n);
                }
            }
            if let Some(e) = self.pending.take() {
                if n > 0 {
                    self.pending = Some(e);
                    return Ok(n);
                }
                return Err(e);
            }
            if self.done {
                return Ok(n);
            }
            // Wait only when there is nothing to return yet; otherwise take what is there.
            let next = if n == 0 {
                self.rx.blocking_recv()
            } else {
                match self.rx.try_recv() {
                    Ok(x) => Some(x),
                    Err(mpsc::error::TryRecvError::Empty) => return Ok(n),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    self.done = true;
                    self.pending = Some(e);
                }
                None => self.done = true,
            }
        }
    }
}

/// The remote command's stdin, as a blocking writer (for a thread outside the runtime).
/// Writes are collected into chunks; `flush` sends what is collected; dropping it sends the
/// rest, then EOF.
#[derive(Debug)]
pub struct ChannelWriter {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
    failed: Arc<Mutex<Option<String>>>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        let sent = match &self.tx {
            Some(tx) => tx.blocking_send(chunk).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        let why = self.failed.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("the SSH channel is closed{}", why.map(|w| format!(": {w}")).unwrap_or_default()),
        ))
    }

    /// Sends what is collected, then EOF.
    pub fn close(mut self) -> io::Result<()> {
        let r = self.send_buf();
        self.tx = None;
        r
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tx.is_none() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the SSH channel writer is closed"));
        }
        let k = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..k]);
        if self.buf.len() >= self.chunk {
            self.send_buf()?;
        }
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send_buf();
    }
}

/// The remote command line: `template` with `%u`/`%{user}`, `%{login}`, `%{host}` and `%%`
/// expanded, the user name quoted for the remote shell. A Dovecot-style value that starts
/// with `ssh` (`ssh -l%{login} %{host} doveadm dsync-server -u%u -U`) keeps only what follows
/// the host word: the embedded client is the `ssh` part.
pub fn remote_command(template: &str, user: &str, login: &str, host: &str) -> String {
    let words: Vec<&str> = template.split_whitespace().collect();
    let words: &[&str] = match words.first() {
        Some(&"ssh") => match words.iter().position(|w| w.contains("%{host}") || *w == "%h") {
            Some(i) => &words[i + 1..],
            None => &words[1..],
        },
        _ => &words,
    };
    let joined = words.join(" ");
    let mut out = String::new();
    let mut rest = joined.as_str();
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let (value, skip) = if rest.starts_with("{user}") {
            (shell_quote(user), 6)
        } else if rest.starts_with("{login}") {
            (shell_quote(login), 7)
        } else if rest.starts_with("{host}") {
            (shell_quote(host), 6)
        } else if rest.starts_with('u') {
            (shell_quote(user), 1)
        } else if rest.starts_with('%') {
            ("%".to_owned(), 1)
        } else {
            ("%".to_owned(), 0)
        };
        out.push_str(&value);
        rest = &rest[skip..];
    }
    out.push_str(rest);
    out
}

/// `word` as one word for a POSIX shell: unchanged when it is plainly safe, else in single
/// quotes.
fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+@=:,/".contains(&b)) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The known_hosts path as given, or the running user's default.
pub fn known_hosts_or_default(path: Option<&Path>) -> PathBuf {
    path.map_or_else(|| default_ssh_dir().join("known_hosts"), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_commands() {
        assert_eq!(
            remote_command("doveadm dsync-server -u%u -U", "alice", "root", "h"),
            "doveadm dsync-server -ualice -U"
        );
        assert_eq!(
            remote_command("ssh -l%{login} %{host} doveadm dsync-server -u%u -U", "alice", "root", "h"),
            "doveadm dsync-server -ualice -U"
        );
        assert_eq!(remote_command("x -u %{user} 100%%", "a b", "", ""), "x -u 'a b' 100%");
        assert_eq!(remote_command("x %u", "it's", "", ""), "x 'it'\\''s'");
        assert_eq!(remote_command("x %q", "a", "", ""), "x %q");
    }

    #[test]
    fn remote_end_descriptions() {
        let mut e = RemoteEnd { exit_status: Some(126), closed: true, ..Default::default() };
        assert_eq!(e.describe(), "exit status 126");
        assert!(!e.success());
        e.exit_status = None;
        e.exit_signal = Some("KILL".into());
        assert_eq!(e.describe(), "killed by signal KILL");
        assert_eq!(RemoteEnd::default().describe(), "no exit status (the connection was lost)");
    }
}
