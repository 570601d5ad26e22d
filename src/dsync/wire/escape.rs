//! Dovecot's tab-escaping (`lib/strescape.c`), the one quoting scheme of the dsync wire.
//!
//! Values are separated by TAB, so a value escapes the four bytes that could break a line or
//! a field with the escape byte 0x01: 0x01 → `01 '1'`, TAB → `01 't'`, CR → `01 'r'`,
//! LF → `01 'n'` (and NUL → `01 '0'`, which only the byte-string variant needs). Nothing else
//! is escaped: 8-bit bytes and 0x02 pass through.
//!
//! Unescaping maps `01 x` back for `x` in `0 1 t r n`, maps `01` followed by any other byte to
//! that byte, and drops a lone `01` at the end. Splitting happens on every literal TAB *before*
//! unescaping (an escaped TAB contains no 0x09), and an empty input splits into **zero**
//! fields, not one empty field. Nested lists (mailbox names, keyword changes, cache fields…)
//! are escaped once for the inner list and once more as a field, so an inner TAB travels as
//! `01 't'` and an inner 0x01 as `01 '1'`.

/// The escape byte.
const ESC: u8 = 0x01;

/// Append `value` to `out`, tab-escaped.
pub fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let code = match b {
            0x00 => b'0',
            ESC => b'1',
            b'\t' => b't',
            b'\r' => b'r',
            b'\n' => b'n',
            _ => continue,
        };
        out.extend_from_slice(value.get(start..i).unwrap_or_default());
        out.push(ESC);
        out.push(code);
        start = i + 1;
    }
    out.extend_from_slice(value.get(start..).unwrap_or_default());
}

/// `value`, tab-escaped.
pub fn escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    escape_into(&mut out, value);
    out
}

/// Undo [`escape`] the way Dovecot's `str_append_tabunescaped` does: unknown escapes yield the
/// escaped byte itself, a trailing lone 0x01 is dropped.
pub fn unescape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        if b != ESC {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'0') => out.push(0x00),
            Some(b'1') => out.push(ESC),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(&other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Split a TAB-separated list of tab-escaped values (`p_strsplit_tabescaped`): split on every
/// TAB, then unescape each part. Empty input gives no parts at all.
pub fn split_tabescaped(list: &[u8]) -> Vec<Vec<u8>> {
    if list.is_empty() {
        return Vec::new();
    }
    list.split(|&b| b == b'\t').map(unescape).collect()
}

/// Join values into a TAB-separated list, each tab-escaped: the inverse of
/// [`split_tabescaped`] for any non-empty list (an empty list and a list of one empty value
/// both become the empty string, which splits into the empty list).
pub fn join_tabescaped<I, V>(values: I) -> Vec<u8>
where
    I: IntoIterator<Item = V>,
    V: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        escape_into(&mut out, v.as_ref());
    }
    out
}

/// Cut a byte string at its first NUL, as Dovecot's C strings do. Dovecot reads every line and
/// every unescaped value as a C string, so a NUL (raw, or unescaped from `01 '0'`) silently
/// ends it; the decoder applies the same cut so it sees exactly what Dovecot sees.
pub(crate) fn c_string(mut value: Vec<u8>) -> Vec<u8> {
    if let Some(nul) = value.iter().position(|&b| b == 0) {
        value.truncate(nul);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_the_four_bytes_and_nul() {
        assert_eq!(escape(b"a\x01b\tc\rd\ne\x00f"), b"a\x011b\x01tc\x01rd\x01ne\x010f");
        assert_eq!(escape(b"plain \x02\xff"), b"plain \x02\xff");
        assert_eq!(escape(b""), b"");
    }

    #[test]
    fn unescapes_known_unknown_and_trailing() {
        assert_eq!(unescape(b"a\x011b\x01tc\x01rd\x01ne\x010f"), b"a\x01b\tc\rd\ne\x00f");
        // Unknown escape: the byte itself.
        assert_eq!(unescape(b"\x01x\x01\x02"), b"x\x02");
        // Trailing lone escape byte is dropped.
        assert_eq!(unescape(b"abc\x01"), b"abc");
        assert_eq!(unescape(b"\x01"), b"");
        // Escaped escape followed by a letter.
        assert_eq!(unescape(b"\x01\x01t"), b"\x01t");
    }

    #[test]
    fn split_empty_is_zero_fields() {
        assert!(split_tabescaped(b"").is_empty());
        assert_eq!(split_tabescaped(b"\t"), vec![b"".to_vec(), b"".to_vec()]);
        assert_eq!(split_tabescaped(b"a\tb\x01tc\t"), vec![b"a".to_vec(), b"b\tc".to_vec(), b"".to_vec()]);
    }

    #[test]
    fn split_happens_before_unescape() {
        // An escape byte right before a real TAB: the TAB still separates, the lone 0x01 at the
        // end of the first part is dropped.
        assert_eq!(split_tabescaped(b"a\x01\tb"), vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn nested_name_from_capture() {
        // raw4.log: `NTab<01>1tName…`: one component "Tab<TAB>Name".
        let field = unescape(b"Tab\x011tName");
        assert_eq!(field, b"Tab\x01tName");
        assert_eq!(split_tabescaped(&field), vec![b"Tab\tName".to_vec()]);
        // `NArchive<01>t2024`: two components.
        assert_eq!(split_tabescaped(&unescape(b"Archive\x01t2024")), vec![b"Archive".to_vec(), b"2024".to_vec()]);
    }

    #[test]
    fn join_split_round_trip() {
        let values: Vec<&[u8]> = vec![b"x", b"", b"t\tab", b"\x01\r\n"];
        let joined = join_tabescaped(&values);
        assert_eq!(split_tabescaped(&joined), values);
    }

    #[test]
    fn c_string_cuts_at_nul() {
        assert_eq!(c_string(b"ab\x00cd".to_vec()), b"ab");
        assert_eq!(c_string(b"abcd".to_vec()), b"abcd");
    }
}
