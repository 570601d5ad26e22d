//! Every key of `mailreplica.toml`, its default and what it means: the one description that
//! `mailreplica.toml(5)` is generated from (`mailreplica generate toml-man`), and the list the
//! tests hold the parser and the README to, so that none of them drifts.

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// The key as written in the file (`replicator.` keys in the `[replicator]` table).
    pub key: &'static str,
    /// The default, in words.
    pub default: &'static str,
    /// A valid value, as `-o KEY=VALUE` takes it (the tests set every key to it).
    pub example: &'static str,
    /// What it does.
    pub meaning: &'static str,
}

const fn k(key: &'static str, default: &'static str, example: &'static str, meaning: &'static str) -> KeyDoc {
    KeyDoc { key, default, example, meaning }
}

/// Every key, top level first, then the `[replicator]` table.
pub const KEYS: &[KeyDoc] = &[
    k(
        "mail_location",
        "maildir:~/Maildir",
        "maildir:~/Maildir:LAYOUT=fs",
        "Where each user's mail is, in Dovecot's syntax: maildir:PATH[:LAYOUT=fs][:INBOX=PATH][:INDEX=PATH][:UTF-8], \
         with ~, %u, %n, %d and %h. Another format (sdbox:, mdbox:) is accepted for the replicator, which hands \
         such users to doveadm sync; the other commands read Maildir only. A userdb mail field overrides it.",
    ),
    k(
        "userdb",
        "passwd",
        "passwd-file:/etc/dovecot/users",
        "Where users are looked up: passwd (the system's, through NSS) or passwd-file:/path (Dovecot's format, \
         whose userdb_mail and userdb_mail_replica fields override mail_location and the replicator's \
         destination). A passwd-file is read again when it changes.",
    ),
    k("first_valid_uid", "500", "1000", "The lowest UID whose mail may be touched."),
    k("last_valid_uid", "0 (no limit)", "60000", "The highest UID whose mail may be touched."),
    k("hostname", "the system's", "mx1", "The host name written into lock files and new mail file names."),
    k(
        "mail_max_lock_timeout",
        "0 (122 seconds, as Dovecot)",
        "30s",
        "The longest wait for a mailbox's dovecot-uidlist.lock.",
    ),
    k(
        "ssh_key",
        "~/.ssh/id_ed25519 and ~/.ssh/id_rsa of the running user (those that exist), then ssh-agent",
        "/etc/mailreplica/id_ed25519",
        "The private key for remote: and remoteprefix: destinations (ed25519 or RSA, OpenSSH or PEM format). \
         It must not be readable or writable by group or others.",
    ),
    k(
        "ssh_key_passphrase_file",
        "none",
        "/etc/mailreplica/passphrase",
        "A file whose first line is the key's passphrase (the same mode rule). Without it an encrypted key is \
         refused, unless ssh-agent (SSH_AUTH_SOCK) holds the key.",
    ),
    k(
        "ssh_known_hosts",
        "~/.ssh/known_hosts of the running user",
        "/etc/mailreplica/known_hosts",
        "The replica's host keys, in OpenSSH's format (hashed names, patterns, negation, [host]:port, @revoked). \
         There is no trust on first use unless --accept-new-host-key is given, which appends the key here.",
    ),
    k(
        "ssh_user",
        "root for remoteprefix:, the running user for remote:",
        "mirror",
        "The login when the destination names none.",
    ),
    k("ssh_port", "22", "2222", "The port when the destination names none."),
    k(
        "ssh_connect_timeout",
        "30s",
        "10s",
        "The time to connect, check the host key and log in (keepalives every 15 seconds after that).",
    ),
    k(
        "dsync_remote_cmd",
        "doveadm dsync-server -u%u -U",
        "mailreplica dsync-server -u%u",
        "The command the server runs (%u: the user, quoted for the shell). Dovecot's form \
         ssh -l%{login} %{host} CMD... is accepted and means CMD...",
    ),
    k(
        "replicator.destination",
        "none (required by the replicator)",
        "remoteprefix:root@replica.example.org",
        "Where the replicator syncs every user, two-way, with their saved state: any destination sync takes. \
         A user's userdb_mail_replica field overrides it.",
    ),
    k(
        "replicator.users",
        "every userdb user within the uid range",
        "alice, bob",
        "The users replicated; notifications for anyone else are ignored.",
    ),
    k(
        "replicator.state_dir",
        "/var/lib/mailreplica",
        "/var/lib/mailreplica",
        "One record per user (state, times, failures), each replaced atomically.",
    ),
    k("replicator.max_parallel", "4", "8", "Syncs at once (1 to 1000), at most one per user."),
    k("replicator.full_sync_interval", "24h", "12h", "Every user gets a full sync this often."),
    k(
        "replicator.retry_min",
        "30s",
        "10s",
        "The wait before the first retry after a failure; it doubles with each further failure, plus up to a \
         fifth of jitter.",
    ),
    k("replicator.retry_max", "1h", "30m", "No retry waits longer."),
    k("replicator.sync_timeout", "10m", "5m", "A sync whose stream stalls this long fails."),
    k(
        "replicator.admin_socket",
        "/run/mailreplica/replicator-doveadm",
        "/run/mailreplica/replicator-doveadm",
        "The socket replicate, replicator status and doveadm replicator -a PATH talk to (root only, 0600).",
    ),
    k(
        "replicator.plugin_fifo",
        "none (not served)",
        "/run/dovecot/replication-notify-fifo",
        "Serve Dovecot 2.3's replication-notify-fifo here (in Dovecot's base_dir).",
    ),
    k(
        "replicator.plugin_socket",
        "none (not served)",
        "/run/dovecot/replication-notify",
        "Serve Dovecot 2.3's replication-notify socket here; a synchronous request is honoured only from root \
         or the user's own uid.",
    ),
    k(
        "replicator.plugin_mode",
        "0666",
        "0660",
        "The mode of plugin_fifo and plugin_socket: every user's mail processes write to them.",
    ),
    k(
        "replicator.watch",
        "false",
        "true",
        "Watch every user's Maildir for changes (the feed without Dovecot's plugin); a queue overflow syncs \
         every user.",
    ),
    k(
        "replicator.watch_with",
        "auto",
        "inotify",
        "fanotify (one mark per filesystem; needs CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH), inotify (a watch per \
         directory, at most 20,000 a user), or auto (fanotify where it can start, else inotify).",
    ),
    k(
        "replicator.doveadm",
        "doveadm",
        "/usr/bin/doveadm -c /etc/dovecot/dovecot.conf",
        "The command line that syncs users whose mail is not Maildir (doveadm sync -u USER -s STATE).",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_documented_key_is_accepted() {
        for k in KEYS {
            let o = format!("{}={}", k.key, k.example);
            Config::load(None, std::slice::from_ref(&o)).unwrap_or_else(|e| panic!("{o}: {e}"));
        }
    }

    #[test]
    fn every_accepted_key_is_documented_and_in_the_readme() {
        // The keys the setters match on, read from their source.
        let src = include_str!("mod.rs");
        let setters = &src[src.find("fn set(").expect("set")..src.find("pub fn uid_allowed").expect("end")];
        let mut accepted: Vec<String> = Vec::new();
        let mut in_replicator = false;
        for line in setters.lines() {
            in_replicator |= line.contains("fn set_replicator");
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix('"')
                && let Some((key, tail)) = rest.split_once('"')
                && tail.trim_start().starts_with("=>")
            {
                accepted.push(if in_replicator { format!("replicator.{key}") } else { key.to_owned() });
            }
        }
        let mut documented: Vec<String> = KEYS.iter().map(|k| k.key.to_owned()).collect();
        accepted.sort();
        documented.sort();
        assert_eq!(accepted, documented, "the setters and KEYS name different keys");
        let readme = include_str!("../../README.md");
        for k in KEYS {
            let short = k.key.trim_start_matches("replicator.");
            assert!(readme.contains(&format!("`{short}`")), "README.md does not describe `{short}`");
        }
    }
}
