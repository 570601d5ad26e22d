//! doveadm's search queries, the subset the mail commands need:
//! `mailbox NAME`, `mailbox-guid GUID`, `all`, `uid SET`, a sequence set, `seen`/`unseen`,
//! `answered`, `flagged`, `deleted`, `draft` (and their `un` forms), `new`/`old`/`recent`,
//! `keyword KW`/`unkeyword KW`, `guid GUID`. All conditions must hold.

use anyhow::{Result, anyhow, bail};

use mailreplica::store::{Flags, Guid128, Keyword, MailRecord};

/// A set like `1:5,7,10:*`; `*` is the largest value present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NumSet(Vec<(u32, u32)>);

impl NumSet {
    fn parse(s: &str) -> Result<Self> {
        let mut v = Vec::new();
        for part in s.split(',') {
            let num = |x: &str| -> Result<u32> {
                if x == "*" {
                    Ok(u32::MAX)
                } else {
                    x.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| anyhow!("invalid number {x:?} in set {s:?}"))
                }
            };
            let (a, b) = match part.split_once(':') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(part)?;
                    (n, n)
                }
            };
            v.push((a.min(b), a.max(b)));
        }
        Ok(Self(v))
    }

    /// Membership, with `*` standing for `max`.
    fn contains(&self, n: u32, max: u32) -> bool {
        self.0.iter().any(|&(a, b)| {
            let a = if a == u32::MAX { max } else { a };
            let b = if b == u32::MAX { max } else { b };
            let (a, b) = (a.min(b), a.max(b));
            n >= a && n <= b
        })
    }

    fn looks_like(s: &str) -> bool {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == ':' || c == ',' || c == '*')
    }
}

#[derive(Debug, Clone)]
enum Cond {
    All,
    Uid(NumSet),
    Seq(NumSet),
    Flag(Flags, bool),
    Recent(bool),
    Keyword(Keyword, bool),
    Guid(String),
}

/// A parsed query.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    /// Mailbox name patterns (`*` and `%` wildcards); empty = every mailbox.
    pub(crate) mailboxes: Vec<String>,
    pub(crate) mailbox_guids: Vec<Guid128>,
    conds: Vec<Cond>,
}

impl Query {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut q = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut arg = |what: &str| it.next().cloned().ok_or_else(|| anyhow!("search key `{a}` needs {what}"));
            match a.to_ascii_lowercase().as_str() {
                "mailbox" => q.mailboxes.push(arg("a mailbox name")?),
                "mailbox-guid" => {
                    let g = arg("a GUID")?;
                    q.mailbox_guids.push(g.parse().map_err(|_| anyhow!("invalid mailbox GUID {g:?}"))?);
                }
                "all" => q.conds.push(Cond::All),
                "uid" => q.conds.push(Cond::Uid(NumSet::parse(&arg("a UID set")?)?)),
                "guid" => q.conds.push(Cond::Guid(arg("a GUID")?)),
                "seen" => q.conds.push(Cond::Flag(Flags::SEEN, true)),
                "unseen" => q.conds.push(Cond::Flag(Flags::SEEN, false)),
                "answered" => q.conds.push(Cond::Flag(Flags::ANSWERED, true)),
                "unanswered" => q.conds.push(Cond::Flag(Flags::ANSWERED, false)),
                "flagged" => q.conds.push(Cond::Flag(Flags::FLAGGED, true)),
                "unflagged" => q.conds.push(Cond::Flag(Flags::FLAGGED, false)),
                "deleted" => q.conds.push(Cond::Flag(Flags::DELETED, true)),
                "undeleted" => q.conds.push(Cond::Flag(Flags::DELETED, false)),
                "draft" => q.conds.push(Cond::Flag(Flags::DRAFT, true)),
                "undraft" => q.conds.push(Cond::Flag(Flags::DRAFT, false)),
                "recent" | "new" => q.conds.push(Cond::Recent(true)),
                "old" => q.conds.push(Cond::Recent(false)),
                "keyword" => q.conds.push(Cond::Keyword(Keyword::new(&arg("a keyword")?)?, true)),
                "unkeyword" => q.conds.push(Cond::Keyword(Keyword::new(&arg("a keyword")?)?, false)),
                _ if NumSet::looks_like(a) => q.conds.push(Cond::Seq(NumSet::parse(a)?)),
                _ => bail!("unknown search key {a:?}"),
            }
        }
        Ok(q)
    }

    /// True if the query says something about the mails themselves (`all` counts), not only
    /// which mailboxes to look in.
    pub(crate) fn has_conditions(&self) -> bool {
        !self.conds.is_empty()
    }

    /// Does mail `m`, the `seq`-th of `count` in a mailbox whose highest UID is `max_uid`, match?
    pub(crate) fn matches(&self, m: &MailRecord, seq: u32, count: u32, max_uid: u32) -> bool {
        self.conds.iter().all(|c| match c {
            Cond::All => true,
            Cond::Uid(s) => s.contains(m.uid.get(), max_uid),
            Cond::Seq(s) => s.contains(seq, count),
            Cond::Flag(f, want) => m.flags.contains(*f) == *want,
            Cond::Recent(want) => m.recent == *want,
            Cond::Keyword(k, want) => m.keywords.iter().any(|x| x.as_str().eq_ignore_ascii_case(k.as_str())) == *want,
            Cond::Guid(g) => m.guid.as_str() == g,
        })
    }
}

/// IMAP LIST-style pattern match: `*` matches anything, `%` anything but the separator.
/// `INBOX` is matched case-insensitively.
pub(crate) fn mailbox_match(pattern: &str, name: &str, sep: char) -> bool {
    fn go(p: &[char], n: &[char], sep: char) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..], sep)),
            Some('%') => {
                for i in 0..=n.len() {
                    if go(&p[1..], &n[i..], sep) {
                        return true;
                    }
                    if i < n.len() && n[i] == sep {
                        break;
                    }
                }
                false
            }
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..], sep),
        }
    }
    let fold = |s: &str| -> Vec<char> {
        if s.len() >= 5 && s[..5].eq_ignore_ascii_case("INBOX") && (s.len() == 5 || s[5..].starts_with(sep)) {
            format!("INBOX{}", &s[5..]).chars().collect()
        } else {
            s.chars().collect()
        }
    };
    go(&fold(pattern), &fold(name), sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets() {
        let s = NumSet::parse("1:3,7,10:*").unwrap();
        assert!(s.contains(2, 20) && s.contains(7, 20) && s.contains(15, 20));
        assert!(!s.contains(5, 20));
        assert!(NumSet::parse("0").is_err());
        assert!(NumSet::parse("a").is_err());
    }

    #[test]
    fn patterns() {
        assert!(mailbox_match("*", "A.B", '.'));
        assert!(mailbox_match("A%", "Abc", '.'));
        assert!(!mailbox_match("A%", "A.B", '.'));
        assert!(mailbox_match("inbox", "INBOX", '.'));
        assert!(mailbox_match("Archive.*", "Archive.2024", '.'));
        assert!(!mailbox_match("Archive", "archive", '.'));
    }

    #[test]
    fn query() {
        let q = Query::parse(&["mailbox".into(), "INBOX".into(), "uid".into(), "1:2".into(), "seen".into()]).unwrap();
        assert_eq!(q.mailboxes, ["INBOX"]);
        assert!(q.has_conditions());
        assert!(!Query::parse(&["mailbox".into(), "INBOX".into()]).unwrap().has_conditions());
        assert!(Query::parse(&["mailbox".into(), "INBOX".into(), "all".into()]).unwrap().has_conditions());
        assert!(Query::parse(&["bogus".into()]).is_err());
        assert!(Query::parse(&["uid".into()]).is_err());
    }
}
