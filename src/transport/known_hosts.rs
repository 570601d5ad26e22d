//! Host keys checked against an OpenSSH `known_hosts` file, with OpenSSH's rules (sshd(8)
//! "SSH_KNOWN_HOSTS FILE FORMAT", `hostfile.c`, `match.c`):
//!
//! ```text
//!   [@revoked|@cert-authority] PATTERNS KEYTYPE BASE64 [COMMENT]
//!   PATTERNS = a,b,!c     comma list, `*` and `?` wildcards, `!` negation wins, case-insensitive
//!              |1|SALT|HASH   a hashed name: HMAC-SHA1(key = SALT, data = name), base64
//!   name     = host, or [host]:port when the port is not 22
//! ```
//!
//! Fields are split on any white space; a line that can't be parsed is skipped with a warning
//! (OpenSSH does the same), never fatal. `@revoked` refuses its key for the hosts it matches,
//! whatever else the file says. `@cert-authority` lines can't vouch for anything here (we
//! don't accept host certificates), so a host that only such a line knows gets its own
//! refusal rather than "unknown host". (`russh`'s own checker splits on single spaces,
//! ignores markers and patterns; see CRATES.md.)

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_encoding::base64::{Base64, Encoding};
use russh::keys::{Algorithm, HashAlg, PublicKey};

/// What a line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// A plain host key.
    None,
    /// `@revoked`: this key must never be accepted for these hosts.
    Revoked,
    /// `@cert-authority`: a CA for host certificates (not supported here).
    CertAuthority,
}

/// One parsed line.
#[derive(Debug, Clone)]
struct Entry {
    /// 1-based line number.
    line: usize,
    marker: Marker,
    hosts: String,
    key: PublicKey,
}

/// A parsed known_hosts file.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
    /// Lines that were skipped, and why (`path line N: …`).
    pub warnings: Vec<String>,
}

/// The outcome of checking a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A plain entry for this host lists exactly this key.
    Trusted {
        /// The line.
        line: usize,
    },
    /// An `@revoked` entry for this host lists this key.
    Revoked {
        /// The line.
        line: usize,
    },
    /// Entries for this host list a different key of the same type, and none this key.
    Changed {
        /// The first such line.
        line: usize,
    },
    /// The host is listed only with keys of other types.
    OtherTypes {
        /// Those lines.
        lines: Vec<usize>,
        /// Their key types.
        types: Vec<String>,
    },
    /// Only `@cert-authority` lines match the host.
    CertAuthorityOnly {
        /// The first such line.
        line: usize,
    },
    /// Nothing in the file matches the host.
    Unknown,
}

/// The name a host is looked up by: `host`, or `[host]:port` when the port is not 22.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_owned() } else { format!("[{host}]:{port}") }
}

/// `ED25519 SHA256:…`, as OpenSSH shows a key.
pub fn describe(key: &PublicKey) -> String {
    let kind = match key.algorithm() {
        Algorithm::Ed25519 => "ED25519".to_owned(),
        Algorithm::Rsa { .. } => "RSA".to_owned(),
        Algorithm::Ecdsa { .. } => "ECDSA".to_owned(),
        a => a.as_str().to_owned(),
    };
    format!("{kind} {}", key.fingerprint(HashAlg::Sha256))
}

/// The key type name of a key (`ssh-ed25519`, `ssh-rsa`, …) as known_hosts spells it.
fn type_name(key: &PublicKey) -> String {
    match key.algorithm() {
        // An RSA key's line always says `ssh-rsa`, whatever hash signs with it.
        Algorithm::Rsa { .. } => "ssh-rsa".to_owned(),
        a => a.as_str().to_owned(),
    }
}

impl KnownHosts {
    /// An empty file (what a missing file is).
    pub fn empty(path: &Path) -> Self {
        Self { path: path.to_path_buf(), entries: Vec::new(), warnings: Vec::new() }
    }

    /// Reads and parses `path`; a file that doesn't exist is empty.
    pub fn load(path: &Path) -> io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => Ok(Self::parse(&String::from_utf8_lossy(&bytes), path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::empty(path)),
            Err(e) => Err(e),
        }
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the text of a known_hosts file (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Self {
        let mut me = Self::empty(path);
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Ok((marker, hosts, key)) => me.entries.push(Entry { line: n, marker, hosts, key }),
                Err(why) => me.warnings.push(format!("{} line {n}: {why}; line ignored", path.display())),
            }
        }
        me
    }

    fn for_host<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| host_matches(name, &e.hosts))
    }

    /// Checks `key` for `host` on `port`.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let name = lookup_name(host, port);
        let same_key = |e: &Entry| e.key.key_data() == key.key_data();
        let same_type = |e: &Entry| e.key.key_data().algorithm() == key.key_data().algorithm();
        let mut trusted = None;
        let mut changed = None;
        let mut others: Vec<&Entry> = Vec::new();
        let mut ca = None;
        for e in self.for_host(&name) {
            match e.marker {
                // A revoked key is refused whatever else the file says about it.
                Marker::Revoked if same_key(e) => return Verdict::Revoked { line: e.line },
                Marker::Revoked => {}
                Marker::CertAuthority => {
                    ca.get_or_insert(e.line);
                }
                Marker::None if same_key(e) => {
                    trusted.get_or_insert(e.line);
                }
                Marker::None if same_type(e) => {
                    changed.get_or_insert(e.line);
                }
                Marker::None => others.push(e),
            }
        }
        if let Some(line) = trusted {
            return Verdict::Trusted { line };
        }
        if let Some(line) = changed {
            return Verdict::Changed { line };
        }
        if !others.is_empty() {
            let mut types: Vec<String> = others.iter().map(|e| type_name(&e.key)).collect();
            types.dedup();
            return Verdict::OtherTypes { lines: others.iter().map(|e| e.line).collect(), types };
        }
        match ca {
            Some(line) => Verdict::CertAuthorityOnly { line },
            None => Verdict::Unknown,
        }
    }

    /// The key algorithms listed (plainly, not revoked) for `host` on `port`, in file order:
    /// what to offer first in the key exchange, as OpenSSH does, so that a host known by its
    /// RSA key is not asked for an Ed25519 key nobody pinned.
    pub fn known_algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let name = lookup_name(host, port);
        let mut out: Vec<Algorithm> = Vec::new();
        for e in self.for_host(&name).filter(|e| e.marker == Marker::None) {
            let algs = match e.key.algorithm() {
                Algorithm::Rsa { .. } => vec![
                    Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
                    Algorithm::Rsa { hash: Some(HashAlg::Sha256) },
                    Algorithm::Rsa { hash: None },
                ],
                a => vec![a],
            };
            for a in algs {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out
    }
}

fn parse_line(line: &str) -> Result<(Marker, String, PublicKey), String> {
    let mut words = line.split_whitespace();
    let mut first = words.next().ok_or("empty line")?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return Err(format!("unknown marker {m}")),
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = words.next().ok_or("no host patterns after the marker")?;
    }
    let hosts = first.to_owned();
    let kind = words.next().ok_or("no key type")?;
    let data = words.next().ok_or("no key")?;
    let blob = Base64::decode_vec(data).map_err(|_| "the key is not valid base64".to_owned())?;
    let key = PublicKey::from_bytes(&blob).map_err(|e| format!("can't parse the {kind} key: {e}"))?;
    let blob_kind = type_name(&key);
    if blob_kind != kind {
        return Err(format!("the line says {kind} but the key is {blob_kind}"));
    }
    if hosts.split(',').any(|p| p.starts_with("|1|") && decode_hashed(p).is_none()) {
        return Err("a hashed host name that is not |1|SALT|HASH".to_owned());
    }
    Ok((marker, hosts, key))
}

/// `|1|SALT|HASH` → (salt, hash).
fn decode_hashed(p: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let rest = p.strip_prefix("|1|")?;
    let (salt, hash) = rest.split_once('|')?;
    let salt = Base64::decode_vec(salt).ok()?;
    let hash = Base64::decode_vec(hash).ok()?;
    (hash.len() == 20).then_some((salt, hash))
}

fn hashed_matches(name: &str, salt: &[u8], hash: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<sha1_hmac::Sha1>::new_from_slice(salt) else { return false };
    mac.update(name.as_bytes());
    mac.verify_slice(hash).is_ok()
}

/// OpenSSH's `match_hostname`: true if some pattern of the comma list matches `name` and no
/// negated one does (a negated match rules the line out, whatever comes before or after).
pub fn host_matches(name: &str, patterns: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let mut matched = false;
    for p in patterns.split(',') {
        if p.starts_with("|1|") {
            if let Some((salt, hash)) = decode_hashed(p) {
                // Hashed names are hashed as written in lower case by ssh-keygen -H and ssh.
                matched |= hashed_matches(&name, &salt, &hash);
            }
            continue;
        }
        let (negated, pat) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p),
        };
        if glob(name.as_bytes(), pat.to_ascii_lowercase().as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `*` (any run) and `?` (any one byte) wildcards, OpenSSH's `match_pattern`.
fn glob(s: &[u8], p: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                si += 1;
                pi += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

/// The line `--accept-new-host-key` appends: `name keytype base64`, as OpenSSH writes it with
/// `HashKnownHosts no`.
pub fn entry_line(host: &str, port: u16, key: &PublicKey) -> String {
    let mut line = lookup_name(host, port);
    let blob = key.to_bytes().unwrap_or_default();
    let _ = write!(line, " {} {}", type_name(key), Base64::encode_string(&blob));
    line
}

/// Appends `line` to the file at `path` in one write (creating the file, mode 0644 before
/// the umask, and its directory, 0700, when missing), after a newline if the file doesn't end
/// with one.
pub fn append(path: &Path, line: &str) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        fs::DirBuilder::new().mode(0o700).create(dir)?;
    }
    let needs_newline = match fs::read(path) {
        Ok(b) => b.last().is_some_and(|&c| c != b'\n'),
        Err(_) => false,
    };
    let mut text = String::new();
    if needs_newline {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    let mut f = fs::OpenOptions::new().append(true).create(true).mode(0o644).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two ed25519 keys and one RSA key, from ssh-keygen.
    const K1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIENLejfoEIWVXEEDe5FujGvG/FXArzRvrxJ2rszMTTMO";
    const K2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHciY7oiKejALly1YZe0Rlq3XDYjOLvT3fZC/SDSqJ81";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDMiZ/ReM0HQBn/5leReShoKg5T4RzhXru2crwKRB5Oa6OPq1+eD51OrzUORXwtdbYg+7JLcPhCA6Xof0NyEKEPa2vnqWtJtVGZ6LcrlaBKjxSWGVzH9piHIn6RzF8NEKbxHRv8/+4qAzD2r4gbuCAdLFQflcWYuwNsMXeO3Vbbsw==";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn kh(text: &str) -> KnownHosts {
        KnownHosts::parse(text, Path::new("kh"))
    }

    #[test]
    fn plain_names_and_ports() {
        let f = kh(&format!("replica.example.org {K1}\n[127.0.0.1]:2222 {K2}\n"));
        assert_eq!(f.check("replica.example.org", 22, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("REPLICA.example.org", 22, &key(K1)), Verdict::Trusted { line: 1 });
        // The port is part of the name: port 22 doesn't match `[…]:2222`, and the reverse.
        assert_eq!(f.check("replica.example.org", 2222, &key(K1)), Verdict::Unknown);
        assert_eq!(f.check("127.0.0.1", 2222, &key(K2)), Verdict::Trusted { line: 2 });
        assert_eq!(f.check("127.0.0.1", 22, &key(K2)), Verdict::Unknown);
        assert_eq!(f.check("127.0.0.1", 2222, &key(K1)), Verdict::Changed { line: 2 });
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    }

    #[test]
    fn white_space_and_comments() {
        let f = kh(&format!("  # a comment\n\n\treplica\t\t{}   and a comment\n", K1.replace(' ', "\t ")));
        assert_eq!(f.check("replica", 22, &key(K1)), Verdict::Trusted { line: 3 });
    }

    #[test]
    fn hashed_names() {
        // `ssh-keygen -H` output for "replica.example.org" and "[127.0.0.1]:2222":
        // salt and HMAC-SHA1(salt, name), computed here with the same primitives.
        let make = |name: &str, salt: &[u8]| {
            let mut mac = Hmac::<sha1_hmac::Sha1>::new_from_slice(salt).unwrap();
            mac.update(name.as_bytes());
            let hash = mac.finalize().into_bytes();
            format!("|1|{}|{}", Base64::encode_string(salt), Base64::encode_string(&hash))
        };
        let h1 = make("replica.example.org", b"0123456789abcdefghij");
        let h2 = make("[127.0.0.1]:2222", b"saltsaltsaltsaltsalt");
        let f = kh(&format!("{h1} {K1}\n{h2} {K2}\n"));
        assert_eq!(f.check("replica.example.org", 22, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("other.example.org", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(f.check("127.0.0.1", 2222, &key(K2)), Verdict::Trusted { line: 2 });
        assert_eq!(f.check("127.0.0.1", 2222, &key(K1)), Verdict::Changed { line: 2 });
        // Known answers: `ssh-keygen -H` of "localhost" and of "[127.0.0.1]:2222".
        let f = kh(&format!(
            "|1|SREjkEvLoIda8Uy96a7UlqY31mg=|lE0k/JZL18nfjqgUYZTeVvpJ9Kc= {K1}\n\
             |1|dDRyaweMrPrST3l3C7tI5qVWEZI=|+wVngVavOTOBV1Sc6gr+LOvUFEw= {K2}\n"
        ));
        assert_eq!(f.check("localhost", 22, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("127.0.0.1", 2222, &key(K2)), Verdict::Trusted { line: 2 });
        assert_eq!(f.check("127.0.0.1", 22, &key(K2)), Verdict::Unknown);
        // Garbage hashes are bad lines, not matches.
        let f = kh(&format!("|1|nothash {K1}\n"));
        assert_eq!(f.check("localhost", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(f.warnings.len(), 1);
    }

    #[test]
    fn patterns_and_negation() {
        let f = kh(&format!("*.example.org,!bad.example.org,10.0.0.? {K1}\n"));
        assert_eq!(f.check("mx1.example.org", 22, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("bad.example.org", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(f.check("example.org", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(f.check("10.0.0.7", 22, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("10.0.0.17", 22, &key(K1)), Verdict::Unknown);
        // Negation wins wherever it stands.
        let f = kh(&format!("!bad.example.org,*.example.org {K1}\n"));
        assert_eq!(f.check("bad.example.org", 22, &key(K1)), Verdict::Unknown);
        // A negation alone matches nothing.
        let f = kh(&format!("!bad.example.org {K1}\n"));
        assert_eq!(f.check("good.example.org", 22, &key(K1)), Verdict::Unknown);
        // Ports with patterns.
        let f = kh(&format!("[*.example.org]:2222 {K1}\n"));
        assert_eq!(f.check("mx.example.org", 2222, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(f.check("mx.example.org", 22, &key(K1)), Verdict::Unknown);
        assert!(glob(b"abc", b"a*c") && glob(b"ac", b"a*c") && glob(b"abbbc", b"a*b*c") && !glob(b"abd", b"a*c"));
        assert!(glob(b"", b"*") && !glob(b"", b"?") && glob(b"x", b"?") && glob(b"a.b.c", b"*.c"));
    }

    #[test]
    fn revoked_wins() {
        let f = kh(&format!("replica {K1}\n@revoked replica {K1}\n"));
        assert_eq!(f.check("replica", 22, &key(K1)), Verdict::Revoked { line: 2 });
        let f = kh(&format!("@revoked * {K1}\nreplica {K2}\n"));
        assert_eq!(f.check("replica", 22, &key(K1)), Verdict::Revoked { line: 1 });
        assert_eq!(f.check("replica", 22, &key(K2)), Verdict::Trusted { line: 2 });
        // A revoked line for other hosts doesn't apply.
        let f = kh(&format!("@revoked other {K1}\nreplica {K1}\n"));
        assert_eq!(f.check("replica", 22, &key(K1)), Verdict::Trusted { line: 2 });
    }

    #[test]
    fn cert_authority() {
        let f = kh(&format!("@cert-authority *.example.org {K2}\n"));
        assert_eq!(f.check("mx.example.org", 22, &key(K1)), Verdict::CertAuthorityOnly { line: 1 });
        // A plain entry takes precedence.
        let f = kh(&format!("@cert-authority *.example.org {K2}\nmx.example.org {K1}\n"));
        assert_eq!(f.check("mx.example.org", 22, &key(K1)), Verdict::Trusted { line: 2 });
        assert_eq!(f.check("other.org", 22, &key(K1)), Verdict::Unknown);
    }

    #[test]
    fn other_key_types() {
        let f = kh(&format!("replica {RSA}\n"));
        assert_eq!(
            f.check("replica", 22, &key(K1)),
            Verdict::OtherTypes { lines: vec![1], types: vec!["ssh-rsa".to_owned()] }
        );
        assert_eq!(f.known_algorithms("replica", 22)[0], Algorithm::Rsa { hash: Some(HashAlg::Sha512) });
        assert_eq!(f.check("replica", 22, &key(RSA)), Verdict::Trusted { line: 1 });
    }

    #[test]
    fn bad_lines_are_skipped_with_a_warning() {
        let text = format!(
            "replica\n@bogus replica {K1}\nreplica ssh-ed25519 !!!notbase64\nreplica ssh-rsa {}\n\
             @revoked\nreplica ssh-foo AAAA\nreplica {K1}\n",
            K1.split(' ').nth(1).unwrap()
        );
        let f = kh(&text);
        assert_eq!(f.check("replica", 22, &key(K1)), Verdict::Trusted { line: 7 });
        assert_eq!(f.warnings.len(), 6, "{:#?}", f.warnings);
        assert!(f.warnings[0].starts_with("kh line 1: "), "{}", f.warnings[0]);
        assert!(f.warnings[3].contains("says ssh-rsa but the key is ssh-ed25519"), "{}", f.warnings[3]);
    }

    #[test]
    fn entry_lines_round_trip() {
        let line = entry_line("127.0.0.1", 2222, &key(K1));
        assert_eq!(line, format!("[127.0.0.1]:2222 {K1}"));
        assert_eq!(kh(&line).check("127.0.0.1", 2222, &key(K1)), Verdict::Trusted { line: 1 });
        assert_eq!(entry_line("replica", 22, &key(RSA)), format!("replica {RSA}"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("known_hosts");
        append(&p, "a ssh-ed25519 X").unwrap();
        fs::write(&p, "no newline").unwrap();
        append(&p, "b").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "no newline\nb\n");
    }

    #[test]
    fn missing_file_is_empty() {
        let f = KnownHosts::load(Path::new("/nonexistent/known_hosts")).unwrap();
        assert_eq!(f.check("x", 22, &key(K1)), Verdict::Unknown);
    }
}
