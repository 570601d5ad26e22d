//! The replicator's line protocols, as Dovecot 2.3 speaks them, so that its `replication`
//! plugin and `doveadm replicator` talk to us unchanged:
//!
//! * the plugin's notifications, on the FIFO `replication-notify-fifo` and on the socket
//!   `replication-notify`: `USER TAB low|high|sync LF` (the socket answers a `sync` line with
//!   `+ LF` or `- LF` once the user's next sync ended);
//! * `replicator-doveadm` 1.0, the admin socket of `doveadm replicator`: a `VERSION` handshake,
//!   then `STATUS`, `STATUS-DSYNC`, `REPLICATE`, `ADD`, `REMOVE` and `NOTIFY` lines.
//!
//! Every field is tab-escaped. Lines come from anyone who may write to the socket or FIFO, so
//! each is bounded ([`MAX_LINE`]) and a user name must look like one ([`valid_user`]).

use super::queue::Priority;
use crate::tabescape::unescape_strict;

/// The longest line accepted, but for `NOTIFY` (a user name and a priority or a mask need
/// far less).
pub const MAX_LINE: usize = 4096;
/// The longest `NOTIFY` line (its last field is a dsync state, 44 bytes a mailbox in base64).
pub const MAX_NOTIFY_LINE: usize = 8 << 20;
/// The longest user name.
pub const MAX_USER: usize = 255;

/// The handshake a `doveadm replicator` client sends first.
pub const DOVEADM_CLIENT_HANDSHAKE: &str = "VERSION\treplicator-doveadm-client\t1\t0";
/// Our answer to it.
pub const DOVEADM_SERVER_HANDSHAKE: &str = "VERSION\treplicator-doveadm-server\t1\t0";

/// A line that is not what the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadLine(pub String);

fn bad(why: impl Into<String>) -> BadLine {
    BadLine(why.into())
}

/// A user name as Dovecot passes it: not empty, at most [`MAX_USER`] bytes, no control
/// characters (a name never reaches a path or a shell, but it reaches logs and status lines).
pub fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER && !user.chars().any(char::is_control)
}

fn user_field(raw: &str) -> Result<String, BadLine> {
    let user = unescape_strict(raw).map_err(bad)?;
    if !valid_user(&user) {
        return Err(bad(format!("not a user name: {user:?}")));
    }
    Ok(user)
}

/// One line of the plugin: who changed, and how urgently a sync is wanted. `Sync` is only
/// meaningful on the socket (the writer waits for the answer).
pub fn parse_notification(line: &str) -> Result<(String, Priority), BadLine> {
    let (user, prio) = line.split_once('\t').ok_or_else(|| bad("expected USER<TAB>PRIORITY"))?;
    let priority = match prio {
        "low" => Priority::Low,
        "high" => Priority::High,
        "sync" => Priority::Sync,
        p => return Err(bad(format!("unknown priority {p:?}"))),
    };
    Ok((user_field(user)?, priority))
}

/// A `replicator-doveadm` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `STATUS`: the overview; `STATUS TAB MASK`: the users matching MASK.
    Status(Option<String>),
    /// `STATUS-DSYNC`: the syncs running now.
    StatusDsync,
    /// `REPLICATE TAB PRIORITY TAB (f|) TAB MASK`: raise the users' priority (a plain name is
    /// added if unknown, a mask only matches users known); `f` forces a full sync.
    Replicate {
        /// The priority (`none` is allowed and only forces a full sync with `f`).
        priority: Priority,
        /// Force a full sync.
        full: bool,
        /// A user or a mask with `*` and `?`.
        mask: String,
    },
    /// `ADD TAB MASK`: add users (a mask is looked up in the userdb).
    Add(String),
    /// `REMOVE TAB USER`: forget a user.
    Remove(String),
    /// `NOTIFY TAB USER TAB (f|) TAB STATE`: another replicator synced this user.
    Notify {
        /// The user.
        user: String,
        /// It was a full sync.
        full: bool,
        /// The state it ended with.
        state: String,
    },
    /// Our own: `MR-STATUS TAB MASK`, the users with every field we keep (for
    /// `mailreplica replicator status`).
    StatusDetail(String),
}

/// Parses one request line (after the handshake).
pub fn parse_request(line: &str) -> Result<Request, BadLine> {
    let f: Vec<&str> = line.split('\t').collect();
    let field = |i: usize| unescape_strict(f[i]).map_err(bad);
    let want = |n: usize| {
        if f.len() == n { Ok(()) } else { Err(bad(format!("{}: {} fields, {n} wanted", f[0], f.len()))) }
    };
    let mask = |s: String| if s.is_empty() || s.len() > MAX_USER { Err(bad("bad user mask")) } else { Ok(s) };
    Ok(match f[0] {
        "STATUS" if f.len() == 1 => Request::Status(None),
        "STATUS" => {
            want(2)?;
            Request::Status(Some(mask(field(1)?)?))
        }
        "STATUS-DSYNC" => {
            want(1)?;
            Request::StatusDsync
        }
        "MR-STATUS" => {
            want(2)?;
            Request::StatusDetail(mask(field(1)?)?)
        }
        "REPLICATE" => {
            want(4)?;
            let priority = Priority::from_name(f[1]).ok_or_else(|| bad("Invalid priority"))?;
            Request::Replicate { priority, full: f[2] == "f", mask: mask(field(3)?)? }
        }
        "ADD" => {
            want(2)?;
            Request::Add(mask(field(1)?)?)
        }
        "REMOVE" => {
            want(2)?;
            Request::Remove(user_field(f[1])?)
        }
        "NOTIFY" => {
            want(4)?;
            Request::Notify { user: user_field(f[1])?, full: f[2] == "f", state: field(3)? }
        }
        other => return Err(bad(format!("Unknown command: {other}"))),
    })
}

/// True if `mask` has Dovecot's wildcards.
pub fn is_mask(mask: &str) -> bool {
    mask.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_as_the_plugin_writes_them() {
        assert_eq!(parse_notification("alice\thigh"), Ok(("alice".into(), Priority::High)));
        assert_eq!(parse_notification("bob\tsync"), Ok(("bob".into(), Priority::Sync)));
        assert_eq!(
            parse_notification("bj\u{f6}rn@example.org\tlow"),
            Ok(("bj\u{f6}rn@example.org".into(), Priority::Low))
        );
        // An escaped TAB is still a control character in a name.
        for bad in
            ["a\x01tb\tlow", "alice", "alice\tnone", "\thigh", "alice\thigh\textra", "a\x01xb\tlow", "a\x07\tlow"]
        {
            assert!(parse_notification(bad).is_err(), "{bad:?}");
        }
        assert!(parse_notification(&format!("{}\tlow", "x".repeat(256))).is_err());
    }

    #[test]
    fn doveadm_requests() {
        assert_eq!(parse_request("STATUS"), Ok(Request::Status(None)));
        assert_eq!(parse_request("STATUS\ta*"), Ok(Request::Status(Some("a*".into()))));
        assert_eq!(
            parse_request("REPLICATE\thigh\tf\talice"),
            Ok(Request::Replicate { priority: Priority::High, full: true, mask: "alice".into() })
        );
        assert_eq!(
            parse_request("REPLICATE\tlow\t\t*"),
            Ok(Request::Replicate { priority: Priority::Low, full: false, mask: "*".into() })
        );
        assert_eq!(parse_request("REPLICATE\turgent\t\tx"), Err(BadLine("Invalid priority".into())));
        assert_eq!(
            parse_request("NOTIFY\tbob\t\tAQAAAHm4+Jk="),
            Ok(Request::Notify { user: "bob".into(), full: false, state: "AQAAAHm4+Jk=".into() })
        );
        assert_eq!(parse_request("REMOVE\tbob"), Ok(Request::Remove("bob".into())));
        assert!(parse_request("BOGUS").is_err());
        assert!(parse_request("REMOVE").is_err());
        assert!(parse_request("ADD\t").is_err());
    }
}
