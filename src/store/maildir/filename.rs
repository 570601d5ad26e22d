//! Maildir file names: `<base>[,S=<size>][,W=<vsize>][:2,<flags>]`.
//!
//! The base name (everything before the first `:`) identifies the file for its whole life and
//! is the mail's GUID unless the uidlist overrides it. The info part after the last `:` holds
//! the flags when it starts with `2,`: `D F R S T` are system flags, `a`–`z` keyword letters,
//! anything else is kept untouched.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::Flags;

/// Keyword letters present in a file name, as a bit mask (bit 0 = `a`).
pub(crate) type KeywordMask = u32;

/// The base name: everything up to the first `:`.
#[inline]
pub(crate) fn base(name: &str) -> &str {
    // A plain byte search: this runs several times per mail on every scan, and names are
    // short, where `split_once`'s general searcher costs more than the search itself.
    match name.bytes().position(|b| b == b':') {
        Some(i) => &name[..i],
        None => name,
    }
}

/// Flags and keyword letters from a file name, with Dovecot's reading rules: the info after
/// the last `:` counts only if it starts with `2,`, and stops at the next `,`.
pub(crate) fn parse_flags(name: &str) -> (Flags, KeywordMask) {
    let mut flags = Flags::NONE;
    let mut kw: KeywordMask = 0;
    let Some(info) = info_flags(name) else {
        return (flags, kw);
    };
    for c in info.bytes() {
        match c {
            b'R' => flags |= Flags::ANSWERED,
            b'S' => flags |= Flags::SEEN,
            b'T' => flags |= Flags::DELETED,
            b'D' => flags |= Flags::DRAFT,
            b'F' => flags |= Flags::FLAGGED,
            b'a'..=b'z' => kw |= 1 << (c - b'a'),
            _ => {}
        }
    }
    (flags, kw)
}

/// The flag letters of the `:2,` info, if there is one.
fn info_flags(name: &str) -> Option<&str> {
    let info = &name[name.bytes().rposition(|b| b == b':')? + 1..];
    let letters = info.strip_prefix("2,")?;
    Some(letters.split_once(',').map_or(letters, |(f, _)| f))
}

/// The file name with its flags replaced, exactly as Dovecot rewrites it
/// (`maildir_filename_flags_full_set`): known letters are re-emitted in ASCII order between the
/// unknown letters, which stay where they were, and any further `,`-separated flag sets are kept.
pub(crate) fn with_flags(name: &str, flags: Flags, keywords: KeywordMask) -> String {
    let (stem, old) = match name.rsplit_once(':') {
        Some((stem, info)) => (stem, info.strip_prefix("2,").unwrap_or("")),
        None => (name, ""),
    };
    let mut out = String::with_capacity(name.len() + 8);
    out.push_str(stem);
    out.push_str(":2,");
    let known = |c: u8| matches!(c, b'D' | b'F' | b'R' | b'S' | b'T' | b'a'..=b'z');
    let mut left = flags.stored();
    let mut kw_left = keywords;
    let bytes = old.as_bytes();
    let mut i = 0;
    loop {
        while i < bytes.len() && known(bytes[i]) {
            i += 1;
        }
        let next: u16 = if i >= bytes.len() || bytes[i] == b',' { 256 } else { u16::from(bytes[i]) };
        for (flag, letter) in [
            (Flags::DRAFT, b'D'),
            (Flags::FLAGGED, b'F'),
            (Flags::ANSWERED, b'R'),
            (Flags::SEEN, b'S'),
            (Flags::DELETED, b'T'),
        ] {
            if left.contains(flag) && next > u16::from(letter) {
                out.push(char::from(letter));
                left = left & !flag;
            }
        }
        if kw_left != 0 && next > u16::from(b'a') {
            for bit in 0..26 {
                if kw_left & (1 << bit) != 0 {
                    out.push(char::from(b'a' + bit as u8));
                }
            }
            kw_left = 0;
        }
        if i >= bytes.len() || bytes[i] == b',' {
            break;
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    if i < bytes.len() {
        out.push_str(&old[i..]);
    }
    out
}

/// The value of a `,S=` or `,W=` field in the base name.
pub(crate) fn size_field(name: &str, key: u8) -> Option<u64> {
    let b = base(name).as_bytes();
    let mut i = 0;
    while i + 3 <= b.len() {
        if b[i] == b',' && b[i + 1] == key && b[i + 2] == b'=' {
            let digits = &b[i + 3..];
            let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
            let end = digits.get(n).copied();
            if n > 0 && matches!(end, None | Some(b',') | Some(b':')) {
                return std::str::from_utf8(&digits[..n]).ok()?.parse().ok();
            }
        }
        i += 1;
    }
    None
}

/// True if `name` may be used as a Maildir file name: non-empty, no `/`, no `:` (which would
/// start the info part), no leading `.`, no control characters, and short enough for any
/// file system once flags are appended.
pub(crate) fn valid_base(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.bytes().any(|b| b == b'/' || b == b':' || b < b' ' || b == 0x7f)
}

/// Dovecot's order for assigning UIDs to new files (`maildir_filename_sort_cmp`): by the
/// leading seconds, then by the `M<usecs>` part, then by the rest of the base name.
///
/// Dovecot compares a name with an `M<usecs>` part and one without, in the same second, by
/// the rest alone, which is not a total order (`1.M5Pa`, `1.Pm`, `1.M3Pz` would each come
/// before the next and the last before the first): its `qsort` then gives some order, and
/// Rust's sort may panic. Here such a pair puts the name with the part first, which makes
/// the order total and keeps Dovecot's for every set of names where its own is one. Names
/// that differ only in how their seconds are written come in the order of their base names.
pub(crate) fn sort_cmp(a: &str, b: &str) -> Ordering {
    let (sa, ra) = split_secs(a);
    let (sb, rb) = split_secs(b);
    sa.cmp(&sb)
        .then_with(|| match (usecs(ra), usecs(rb)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| base(ra).cmp(base(rb)))
        .then_with(|| base(a).cmp(base(b)))
}

/// The seconds and microseconds [`sort_cmp`] orders by, when the name has both: two names
/// whose keys differ compare as their keys do. `None` for a name without an `M<usecs>` part,
/// which only [`sort_cmp`] itself can place.
pub(crate) fn sort_key(name: &str) -> Option<(u64, u64)> {
    let (secs, rest) = split_secs(name);
    Some((secs, usecs(rest)?))
}

fn split_secs(s: &str) -> (u64, &str) {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    let secs = s[..n].bytes().fold(0u64, |acc, d| acc.wrapping_mul(10).wrapping_add(u64::from(d - b'0')));
    (secs, &s[n..])
}

fn usecs(s: &str) -> Option<u64> {
    let rest = s.strip_prefix('.')?;
    let field = rest.split(['.', ':']).next()?;
    let pos = field.find('M')?;
    let digits = &field[pos + 1..];
    let n = digits.bytes().take_while(u8::is_ascii_digit).count();
    Some(digits[..n].parse().unwrap_or(0))
}

/// Generates unique base names `<secs>.M<usecs>P<pid>Q<n>.<host>` (Dovecot's scheme plus a
/// per-process counter), never repeating within a process.
#[derive(Debug)]
pub(crate) struct UniqueNames {
    host: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl UniqueNames {
    /// `hostname` is escaped as the Maildir spec asks (`/` → `\057`, `:` → `\072`).
    pub(crate) fn new(hostname: &str) -> Self {
        let mut host = String::with_capacity(hostname.len());
        for c in hostname.chars() {
            match c {
                '/' => host.push_str("\\057"),
                ':' => host.push_str("\\072"),
                c if c.is_control() || c == ' ' || c == ',' => host.push('_'),
                c => host.push(c),
            }
        }
        if host.is_empty() {
            host.push_str("localhost");
        }
        Self { host }
    }

    /// A new unique base name (without size fields).
    pub(crate) fn next(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let n = COUNTER.fetch_add(1, AtomicOrdering::Relaxed);
        format!("{}.M{}P{}Q{}.{}", now.as_secs(), now.subsec_micros(), std::process::id(), n, self.host)
    }

    /// The pid in a name that [`UniqueNames::next`] made on this host (exactly that shape, with
    /// nothing after the host: files in `tmp/` have no size fields yet); `None` for any other
    /// name, including Dovecot's own, which have no `Q` part.
    pub(crate) fn owner_pid(&self, name: &str) -> Option<u32> {
        fn digits(s: &str) -> Option<(&str, &str)> {
            let n = s.bytes().take_while(u8::is_ascii_digit).count();
            (n > 0).then(|| s.split_at(n))
        }
        let (_, rest) = digits(name)?;
        let (_, rest) = digits(rest.strip_prefix(".M")?)?;
        let (pid, rest) = digits(rest.strip_prefix('P')?)?;
        let (_, rest) = digits(rest.strip_prefix('Q')?)?;
        (rest.strip_prefix('.')? == self.host).then_some(())?;
        pid.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_roundtrip_like_dovecot() {
        let (f, kw) = parse_flags("1.M1P1.vm,S=76,W=82:2,Sa");
        assert_eq!(f, Flags::SEEN);
        assert_eq!(kw, 1);
        // Observed in Dovecot: `:2,SP` plus \Answered \Draft becomes `:2,DPRS`.
        let n = with_flags("x:2,SP", Flags::SEEN | Flags::ANSWERED | Flags::DRAFT, 0);
        assert_eq!(n, "x:2,DPRS");
        assert_eq!(with_flags("x,S=1", Flags::NONE, 0), "x,S=1:2,");
        assert_eq!(with_flags("x:2,S,extra", Flags::FLAGGED, 0b101), "x:2,Fac,extra");
        assert_eq!(with_flags("x:2,Sa", Flags::SEEN, 0b10), "x:2,Sb");
    }

    #[test]
    fn non_v2_info_has_no_flags() {
        assert_eq!(parse_flags("x:1,S"), (Flags::NONE, 0));
    }

    #[test]
    fn sizes() {
        assert_eq!(size_field("1.M1P1.vm,S=76,W=82:2,S", b'S'), Some(76));
        assert_eq!(size_field("1.M1P1.vm,S=76,W=82:2,S", b'W'), Some(82));
        assert_eq!(size_field("1.M1P1.vm", b'S'), None);
        assert_eq!(size_field("1.M1P1.vm,S=7x", b'S'), None);
    }

    #[test]
    fn dovecot_sort_order() {
        let mut v = vec!["2.M5P1.h", "1.M20P1.h", "1.M3P9.h", "1.M3P1.h"];
        v.sort_by(|a, b| sort_cmp(a, b));
        assert_eq!(v, ["1.M3P1.h", "1.M3P9.h", "1.M20P1.h", "2.M5P1.h"]);
    }

    #[test]
    fn where_sort_keys_differ_they_order_as_dovecot_does() {
        let names = [
            "1700000000.M5P1.h",
            "1700000000.M40P1.h:2,S",
            "1700000000.M40P2.h",
            "1700000000.P1.h",
            "1700000001.M1P1.h",
            "999.M999999P1.h",
            "99999999999999999999999.M1P1.h",
            "1700000000.M99999999999999999999999P1.h",
            "abc",
            "1700000000",
            "1700000000.M.h",
        ];
        for a in names {
            for b in names {
                if let (Some(ka), Some(kb)) = (sort_key(a), sort_key(b))
                    && ka != kb
                {
                    assert_eq!(ka.cmp(&kb), sort_cmp(a, b), "{a} vs {b}");
                }
            }
        }
        assert_eq!(sort_key("1700000000.M40P2.h"), Some((1_700_000_000, 40)));
        assert_eq!(sort_key("1700000000.P1.h"), None);
    }

    #[test]
    fn the_order_of_new_files_is_total() {
        let names = [
            "1.M5Pa.h",
            "1.Pm.h",
            "1.M3Pz.h",
            "01.M3Pz.h",
            "1.M3Pz.h:2,S",
            "1",
            "x",
            "2.M1.h",
            "1.M.h",
            "1.M10000000000000000000000.h",
        ];
        for a in names {
            assert_eq!(sort_cmp(a, a), Ordering::Equal);
            for b in names {
                assert_eq!(sort_cmp(a, b), sort_cmp(b, a).reverse(), "{a} vs {b}");
                if sort_cmp(a, b) == Ordering::Equal {
                    assert_eq!(base(a), base(b), "only one file can be equal to another");
                }
                for c in names {
                    if sort_cmp(a, b).is_lt() && sort_cmp(b, c).is_lt() {
                        assert!(sort_cmp(a, c).is_lt(), "{a} < {b} < {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn owner_of_our_names() {
        let u = UniqueNames::new("mx1");
        let name = u.next();
        assert_eq!(u.owner_pid(&name), Some(std::process::id()));
        assert_eq!(u.owner_pid("1700000000.M12P345Q6.mx1"), Some(345));
        for other in [
            "1700000000.M12P345Q6.mx2",         // another host
            "1700000000.M12P345Q6.mx1,S=5,W=6", // not a tmp/ name
            "1700000000.M12P345.mx1",           // Dovecot's
            "1700000000.M12P345Q6.mx1.x",
            "x1700000000.M12P345Q6.mx1",
            ".dotlock.1.2.mx1",
        ] {
            assert_eq!(u.owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn unique_names_differ() {
        let u = UniqueNames::new("mx:1/a");
        let a = u.next();
        let b = u.next();
        assert_ne!(a, b);
        assert!(a.ends_with(".mx\\0721\\057a"));
        assert!(valid_base(&a));
    }
}
