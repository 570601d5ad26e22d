//! The `subscriptions` file at the root of the mail store.
//!
//! Version 2 (what Dovecot writes): a `V<TAB>2` line and an empty line, then one name per line
//! with hierarchy levels separated by TAB, each level tab-escaped and in storage form (modified
//! UTF-7 unless the store uses UTF-8 names). Version 1 files hold one name per line with the
//! hierarchy separator; they are read, and rewritten as version 2 on the next change. Writers
//! hold `subscriptions.lock` and replace the file atomically.

use std::path::Path;
use std::time::Duration;

use super::dotlock::Dotlock;
use super::fsutil;
use crate::store::error::StoreResult;
use crate::store::{MailboxName, mutf7};
use crate::tabescape::{escape as tabescape, unescape_lenient as tabunescape};

const NAME: &str = "subscriptions";
const HEADER: &str = "V\t2\n\n";

/// How names are stored on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NameCodec {
    pub(crate) sep: char,
    pub(crate) utf8: bool,
}

impl NameCodec {
    fn encode(&self, level: &str) -> String {
        if self.utf8 { level.to_owned() } else { mutf7::encode(level) }
    }

    fn decode(&self, level: &str) -> Option<String> {
        if self.utf8 { Some(level.to_owned()) } else { mutf7::decode(level).ok() }
    }
}

fn encode_line(name: &MailboxName, codec: NameCodec) -> String {
    name.components().iter().map(|c| tabescape(&codec.encode(c))).collect::<Vec<_>>().join("\t")
}

/// Reads the subscribed names. Lines that do not decode to a valid name are skipped with a
/// warning (they can only have been written by something else).
pub(crate) fn read(root: &Path, codec: NameCodec) -> StoreResult<Vec<MailboxName>> {
    let path = root.join(NAME);
    let Some(data) = fsutil::read_optional(&path)? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&data);
    let (v2, body) = match text.strip_prefix(HEADER) {
        Some(rest) => (true, rest),
        None => (false, &text[..]),
    };
    let mut out = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        let levels: Option<Vec<String>> = if v2 {
            line.split('\t').map(|l| codec.decode(&tabunescape(l))).collect()
        } else {
            line.split(codec.sep).map(|l| codec.decode(l)).collect()
        };
        match levels.map(MailboxName::from_components) {
            Some(Ok(n)) => out.push(n),
            _ => tracing::warn!(file = %path.display(), line, "skipping an invalid subscription"),
        }
    }
    Ok(out)
}

/// Subscribes or unsubscribes `name`. Returns whether the file changed.
pub(crate) fn set(
    root: &Path,
    hostname: &str,
    codec: NameCodec,
    name: &MailboxName,
    subscribed: bool,
) -> StoreResult<bool> {
    let path = root.join(NAME);
    let lock = Dotlock::acquire(&path, hostname, Duration::from_secs(120))?;
    let current = fsutil::read_optional(&path)?;
    let text = current.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
    let (v2, body) = match text.strip_prefix(HEADER) {
        Some(rest) => (true, rest.to_owned()),
        None => (current.is_none(), text.to_string()),
    };
    let wanted = encode_line(name, codec);
    let mut out = String::from(HEADER);
    let mut found = false;
    let mut changed = !v2;
    for line in body.lines().filter(|l| !l.is_empty()) {
        // Version 1 lines are converted to version 2 as we go.
        let line =
            if v2 { line.to_owned() } else { line.split(codec.sep).map(tabescape).collect::<Vec<_>>().join("\t") };
        if line == wanted {
            found = true;
            if !subscribed {
                changed = true;
                continue;
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    if subscribed && !found {
        out.push_str(&wanted);
        out.push('\n');
        changed = true;
    }
    if changed {
        fsutil::replace_file(&root.join("subscriptions.tmp"), &path, out.as_bytes(), 0o600)?;
    }
    lock.release()?;
    Ok(changed && (found != subscribed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_format() {
        let dir = tempfile::tempdir().unwrap();
        let c = NameCodec { sep: '.', utf8: false };
        let a = MailboxName::parse("Foo.Bar", '.').unwrap();
        let u = MailboxName::parse("Ünïcødé", '.').unwrap();
        assert!(set(dir.path(), "h", c, &a, true).unwrap());
        assert!(set(dir.path(), "h", c, &u, true).unwrap());
        assert!(!set(dir.path(), "h", c, &u, true).unwrap());
        // Byte for byte what Dovecot 2.3.19 wrote for the same two subscriptions.
        assert_eq!(
            std::fs::read_to_string(dir.path().join(NAME)).unwrap(),
            "V\t2\n\nFoo\tBar\n&ANw-n&AO8-c&APg-d&AOk-\n"
        );
        assert_eq!(read(dir.path(), c).unwrap(), vec![a.clone(), u]);
        assert!(set(dir.path(), "h", c, &a, false).unwrap());
        assert_eq!(read(dir.path(), c).unwrap().len(), 1);
    }

    #[test]
    fn version1_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NAME), "INBOX\nA.B\n").unwrap();
        let c = NameCodec { sep: '.', utf8: false };
        let names = read(dir.path(), c).unwrap();
        assert_eq!(names[1].components(), ["A", "B"]);
    }
}
