//! Dovecot's tab-escaping (`str_append_tabescaped`) for its TAB-separated text files (the
//! subscriptions file, the replicator's database): 0x01, TAB, CR and LF become 0x01 followed
//! by `1`, `t`, `r` and `n`, so that a field never holds a separator.

/// Escapes `s`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\x01' => out.push_str("\x011"),
            '\t' => out.push_str("\x01t"),
            '\r' => out.push_str("\x01r"),
            '\n' => out.push_str("\x01n"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes [`escape`] as Dovecot's `str_tabunescape` does: `\x010` is NUL, an unknown escape
/// gives its second character, a lone 0x01 at the end is dropped.
pub fn unescape_lenient(s: &str) -> String {
    unescape(s, false).unwrap_or_default()
}

/// Undoes [`escape`], refusing anything [`escape`] does not write.
pub fn unescape_strict(s: &str) -> Result<String, String> {
    unescape(s, true)
}

fn unescape(s: &str, strict: bool) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\x01' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('1') => out.push('\x01'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            other if strict => return Err(format!("bad escape \\x01{other:?}")),
            Some('0') => out.push('\0'),
            Some(o) => out.push(o),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_does_not_write() {
        let s = "a\tb\r\n\x01c";
        assert_eq!(escape(s), "a\x01tb\x01r\x01n\x011c");
        assert_eq!(unescape_strict(&escape(s)).unwrap(), s);
        assert_eq!(unescape_lenient(&escape(s)), s);
        assert!(unescape_strict("x\x01").is_err() && unescape_strict("\x01z").is_err());
        assert_eq!(unescape_lenient("\x010\x01z\x01"), "\0z");
    }
}
