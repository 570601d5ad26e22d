//! Where log lines go: stderr, for both binaries. stdout is the dsync protocol (or a command's
//! output), and `doveadm` passes a remote's stderr on to its own log, so stderr is the one
//! place a message reaches the admin on either end.

/// Logs to stderr at `level` (`MAILREPLICA_LOG` overrides it), without timestamps (the
/// receiving log adds its own) and in colour only on a terminal. A second call does nothing.
pub fn init_stderr(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MAILREPLICA_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}
