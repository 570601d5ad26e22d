//! Command-line arguments, parsed by hand: they come only from root's `authorized_keys`
//! `command=` line (or from an admin running `--check`), never from the peer, and the root
//! phase stays small enough to read in one sitting (no clap on this path).
//!
//! ```text
//! mailreplica-wrapper --peer NAME [--policy PATH] [--auth-log PATH]
//! mailreplica-wrapper --check [--peer NAME] [--policy PATH] [--auth-log PATH] USER
//! ```

use std::ffi::OsString;
use std::path::PathBuf;

/// The policy file used without `--policy`.
pub(crate) const DEFAULT_POLICY: &str = "/etc/mailreplica/wrapper.toml";

/// What the wrapper was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Serve one replication session: read the username from fd 0.
    Serve {
        /// The peer this key belongs to.
        peer: String,
    },
    /// Print the decision for `user` (all peers, or one), without serving.
    Check {
        /// Only this peer.
        peer: Option<String>,
        /// The user to check.
        user: String,
    },
}

/// Parsed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Args {
    /// Serve or check.
    pub(crate) mode: Mode,
    /// The policy file.
    pub(crate) policy: PathBuf,
    /// Write the auth log to this file instead of syslog / the default file.
    pub(crate) auth_log: Option<PathBuf>,
}

/// A peer name: what `[peer.NAME]` in the policy and the log lines use.
pub(crate) fn valid_peer_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn absolute(opt: &str, v: String) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_absolute() { Ok(p) } else { Err(format!("{opt} needs an absolute path")) }
}

/// Parses `argv` (without the program name). Every option may appear once; anything unknown
/// is an error, so a typo in `authorized_keys` fails closed.
pub(crate) fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut peer = None;
    let mut policy = None;
    let mut auth_log = None;
    let mut check = false;
    let mut user = None;
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        let a = a.into_string().map_err(|_| "an argument is not UTF-8".to_owned())?;
        let mut value = |name: &str| -> Result<String, String> {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .into_string()
                .map_err(|_| format!("the value of {name} is not UTF-8"))
        };
        match a.as_str() {
            "--peer" if peer.is_none() => {
                let v = value("--peer")?;
                if !valid_peer_name(&v) {
                    return Err("--peer: 1-64 characters of A-Z a-z 0-9 _ - . not starting with -".to_owned());
                }
                peer = Some(v);
            }
            "--policy" if policy.is_none() => policy = Some(absolute("--policy", value("--policy")?)?),
            "--auth-log" if auth_log.is_none() => auth_log = Some(absolute("--auth-log", value("--auth-log")?)?),
            "--check" if !check => check = true,
            s if check && user.is_none() && !s.starts_with('-') => user = Some(a),
            s => return Err(format!("unexpected argument {:?}", crate::authlog::escape(s.as_bytes(), 64))),
        }
    }
    let mode = if check {
        Mode::Check { peer, user: user.ok_or("--check needs a USER")? }
    } else {
        Mode::Serve { peer: peer.ok_or("--peer NAME is required")? }
    };
    Ok(Args { mode, policy: policy.unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY)), auth_log })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The man page (wrapper/doc/mailreplica-wrapper.8) describes every option this parser
    /// takes and every key of the policy, so that it cannot drift from them.
    #[test]
    fn the_man_page_names_every_option_and_policy_key() {
        let page = include_str!("../doc/mailreplica-wrapper.8").replace("\\-", "-");
        let args = include_str!("args.rs");
        // The parser, not these tests (which try options it refuses).
        let args = &args[..args.find("#[cfg(test)]").unwrap()];
        let options: Vec<&str> = args
            .split('"')
            .filter(|w| {
                w.starts_with("--") && w.len() > 2 && w[2..].bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            })
            .collect();
        assert!(options.len() >= 4, "{options:?}");
        for o in options {
            assert!(page.contains(o), "the man page does not describe {o}");
        }
        let policy = include_str!("policy.rs");
        let raw = &policy[policy.find("struct RawPolicy").unwrap()..policy.find("/// What one peer may do").unwrap()];
        let mut keys = 0;
        for line in raw.lines() {
            let t = line.trim();
            if let Some((field, _)) = t.split_once(':')
                && !t.starts_with("//")
                && !t.starts_with('#')
                && field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && field != "peer"
            {
                keys += 1;
                assert!(page.contains(field), "the man page does not describe the policy key {field}");
            }
        }
        assert!(keys >= 10, "{keys} keys found");
    }

    fn p(a: &[&str]) -> Result<Args, String> {
        parse(a.iter().map(OsString::from))
    }

    #[test]
    fn serve_and_check() {
        let a = p(&["--peer", "mx1"]).unwrap();
        assert_eq!(a.mode, Mode::Serve { peer: "mx1".into() });
        assert_eq!(a.policy, PathBuf::from(DEFAULT_POLICY));
        let a = p(&["--peer", "mx1", "--policy", "/p.toml", "--auth-log", "/l"]).unwrap();
        assert_eq!(a.policy, PathBuf::from("/p.toml"));
        assert_eq!(a.auth_log, Some(PathBuf::from("/l")));
        let a = p(&["--check", "alice"]).unwrap();
        assert_eq!(a.mode, Mode::Check { peer: None, user: "alice".into() });
        let a = p(&["--check", "--peer", "b", "alice"]).unwrap();
        assert_eq!(a.mode, Mode::Check { peer: Some("b".into()), user: "alice".into() });
    }

    #[test]
    fn refusals() {
        for bad in [
            &[][..],
            &["--peer"],
            &["--peer", "-x"],
            &["--peer", "a b"],
            &["--peer", "a", "--peer", "b"],
            &["--peer", "a", "--policy", "rel"],
            &["--peer", "a", "extra"],
            &["--peer", "a", "--help"],
            &["--check"],
            &["--check", "a", "b"],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }
}
