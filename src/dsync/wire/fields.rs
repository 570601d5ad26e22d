//! Field-level reading and writing of one record line (Dovecot's `dsync-serializer.c` and
//! `dsync-deserializer.c`), plus the number formats of the wire.
//!
//! A record line is the type byte, then the values of the sender's header keys in header order,
//! each tab-escaped, joined by TAB. An unset key is the single byte 0x02, trailing unset keys
//! are left out entirely, a set value that starts with 0x02 gets one more 0x02 in front, and a
//! boolean is "present (empty)" or "absent". Decoding reverses this after splitting and
//! unescaping: exactly `<02>` is absent, a longer value starting with 0x02 loses that byte.

use super::error::{Malformation, WireError};
use super::escape::{c_string, escape_into, split_tabescaped};
use super::header::{ItemHeader, ItemType, spec};
use super::types::{Guid128, Text};

/// The "unset" marker (`NULL_CHR`).
const NULL_CHR: u8 = 0x02;

/// Parse an unsigned decimal the way Dovecot's `str_to_uintmax` does: at least one digit,
/// digits only (leading zeros allowed), no sign, no overflow.
pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Parse a signed decimal (`str_to_intmax`, used for times): an optional `-`, then digits.
pub(crate) fn parse_signed(s: &[u8]) -> Option<i64> {
    match s.strip_prefix(b"-") {
        Some(digits) => 0i64.checked_sub_unsigned(parse_decimal(digits)?),
        None => i64::try_from(parse_decimal(s)?).ok(),
    }
}

/// Parse unsigned hex (`str_to_uintmax_hex`): at least one digit, either case, no prefix.
pub(crate) fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(16)?;
        if n > u64::MAX >> 4 {
            return None;
        }
        Some((n << 4) | u64::from(digit))
    })
}

/// The values of one received record line, looked up by the peer's header.
pub(crate) struct FieldReader<'h> {
    item: ItemType,
    header: &'h ItemHeader,
    values: Vec<Option<Vec<u8>>>,
}

impl<'h> FieldReader<'h> {
    /// Split `rest` (the line after the type byte) and check the type's required fields.
    pub(crate) fn new(item: ItemType, header: &'h ItemHeader, rest: &[u8]) -> Result<Self, WireError> {
        let values = split_tabescaped(rest)
            .into_iter()
            .map(|v| {
                let v = c_string(v);
                match v.split_first() {
                    Some((&NULL_CHR, [])) => None,
                    Some((&NULL_CHR, tail)) => Some(tail.to_vec()),
                    _ => Some(v),
                }
            })
            .collect();
        let reader = Self { item, header, values };
        if let Some(key) = item.required_keys().iter().find(|k| reader.get(k).is_none()) {
            return Err(reader.error(key, Malformation::MissingRequiredField));
        }
        Ok(reader)
    }

    /// An error about `key` of this record.
    pub(crate) fn error(&self, key: &'static str, problem: Malformation) -> WireError {
        WireError::malformed(Some(self.item), Some(key), problem)
    }

    /// The value of `key`, or `None` when the header lacks the key or the value is absent.
    pub(crate) fn get(&self, key: &str) -> Option<&[u8]> {
        debug_assert!(known_key(self.item, key), "{}: unknown key {key}", self.item);
        let idx = self.header.position(key)?;
        self.values.get(idx)?.as_deref()
    }

    /// The value of a required key (checked present in [`FieldReader::new`]).
    pub(crate) fn required(&self, key: &'static str) -> Result<&[u8], WireError> {
        self.get(key).ok_or_else(|| self.error(key, Malformation::MissingRequiredField))
    }

    /// A boolean: true when present, whatever the value.
    pub(crate) fn flag(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A text value.
    pub(crate) fn text(&self, key: &'static str) -> Option<Text> {
        // Values were cut at NUL above, so they are valid `Text`.
        self.get(key).map(Text::from_wire)
    }

    fn number<T>(&self, key: &'static str, parse: impl Fn(&[u8]) -> Option<T>) -> Result<Option<T>, WireError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse(v)
                .map(Some)
                .ok_or_else(|| self.error(key, Malformation::InvalidNumber(String::from_utf8_lossy(v).into_owned()))),
        }
    }

    /// An unsigned 32-bit decimal (`str_to_uint32`).
    pub(crate) fn dec_u32(&self, key: &'static str) -> Result<Option<u32>, WireError> {
        self.number(key, |v| parse_decimal(v).and_then(|n| u32::try_from(n).ok()))
    }

    /// An unsigned 64-bit decimal (`str_to_uint64`, `str_to_uoff`).
    pub(crate) fn dec_u64(&self, key: &'static str) -> Result<Option<u64>, WireError> {
        self.number(key, parse_decimal)
    }

    /// A signed decimal time (`str_to_time`).
    pub(crate) fn time(&self, key: &'static str) -> Result<Option<i64>, WireError> {
        self.number(key, parse_signed)
    }

    /// A signed 32-bit decimal (`str_to_int`).
    pub(crate) fn dec_i32(&self, key: &'static str) -> Result<Option<i32>, WireError> {
        self.number(key, |v| parse_signed(v).and_then(|n| i32::try_from(n).ok()))
    }

    /// A hex byte (the flag masks; Dovecot rejects values above 0xff).
    pub(crate) fn hex_u8(&self, key: &'static str) -> Result<Option<u8>, WireError> {
        self.number(key, |v| parse_hex(v).and_then(|n| u8::try_from(n).ok()))
    }

    /// An unsigned 64-bit hex number.
    pub(crate) fn hex_u64(&self, key: &'static str) -> Result<Option<u64>, WireError> {
        self.number(key, parse_hex)
    }

    /// A GUID (32 hex digits, either case, as `guid_128_from_string` accepts).
    pub(crate) fn guid(&self, key: &'static str) -> Result<Option<Guid128>, WireError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => Guid128::parse_hex(v)
                .map(Some)
                .ok_or_else(|| self.error(key, Malformation::InvalidGuid(String::from_utf8_lossy(v).into_owned()))),
        }
    }
}

/// True when `key` is one of Dovecot's keys for `item` (a guard against typos in our code).
fn known_key(item: ItemType, key: &str) -> bool {
    spec(item).is_some_and(|s| s.required.iter().chain(s.optional).any(|k| *k == key))
}

/// Collects the values of one record to send, placed by the encoding header.
pub(crate) struct FieldWriter<'h> {
    item: ItemType,
    header: &'h ItemHeader,
    values: Vec<Option<Vec<u8>>>,
}

impl<'h> FieldWriter<'h> {
    /// A writer for one record of `item`, laid out by `header`.
    pub(crate) fn new(item: ItemType, header: &'h ItemHeader) -> Self {
        Self { item, header, values: vec![None; header.len()] }
    }

    /// Set `key` to `value`. A key the encoding header does not declare is left out: the
    /// peer could not read it anyway. (With our own header every key exists.)
    pub(crate) fn set(&mut self, key: &'static str, value: impl AsRef<[u8]>) {
        debug_assert!(known_key(self.item, key), "{}: unknown key {key}", self.item);
        if let Some(slot) = self.header.position(key).and_then(|idx| self.values.get_mut(idx)) {
            *slot = Some(value.as_ref().to_vec());
        }
    }

    /// Set a boolean: present and empty when true, unset when false.
    pub(crate) fn flag(&mut self, key: &'static str, on: bool) {
        if on {
            self.set(key, b"");
        }
    }

    /// Set a decimal number.
    pub(crate) fn dec(&mut self, key: &'static str, n: impl std::fmt::Display) {
        self.set(key, n.to_string());
    }

    /// Set a decimal number unless it is zero (most senders skip zeros).
    pub(crate) fn dec_nonzero(&mut self, key: &'static str, n: u64) {
        if n != 0 {
            self.dec(key, n);
        }
    }

    /// Set a lowercase hex number unless it is zero.
    pub(crate) fn hex_nonzero(&mut self, key: &'static str, n: u64) {
        if n != 0 {
            self.set(key, format!("{n:x}"));
        }
    }

    /// Set a value if there is one.
    pub(crate) fn opt(&mut self, key: &'static str, value: Option<impl AsRef<[u8]>>) {
        if let Some(v) = value {
            self.set(key, v);
        }
    }

    /// Append the values (not the type byte, not the LF) to `out`.
    pub(crate) fn finish_fields(self, out: &mut Vec<u8>) {
        let count = self.values.iter().rposition(Option::is_some).map_or(0, |last| last + 1);
        for (i, value) in self.values.iter().take(count).enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            match value {
                None => out.push(NULL_CHR),
                Some(v) => {
                    if v.first() == Some(&NULL_CHR) {
                        out.push(NULL_CHR);
                    }
                    escape_into(out, v);
                }
            }
        }
    }

    /// Append the whole record line (type byte, values, LF) to `out`.
    pub(crate) fn finish_line(self, out: &mut Vec<u8>) {
        out.push(self.item.as_byte());
        self.finish_fields(out);
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_like_dovecot() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"007"), Some(7));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        for bad in [&b""[..], b"+1", b"-1", b"1a", b" 1", b"0x10"] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn signed_like_dovecot() {
        assert_eq!(parse_signed(b"-5"), Some(-5));
        assert_eq!(parse_signed(b"1795863048"), Some(1_795_863_048));
        assert_eq!(parse_signed(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_signed(b"9223372036854775808"), None);
        assert_eq!(parse_signed(b"-"), None);
        assert_eq!(parse_signed(b"+5"), None);
    }

    #[test]
    fn hex_like_dovecot() {
        assert_eq!(parse_hex(b"2a"), Some(0x2a));
        assert_eq!(parse_hex(b"2A"), Some(0x2a));
        assert_eq!(parse_hex(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex(b"10000000000000000"), None);
        assert_eq!(parse_hex(b""), None);
        assert_eq!(parse_hex(b"0x1"), None);
    }

    #[test]
    fn writer_omits_trailing_and_marks_unset() {
        let header = ItemHeader::dovecot(ItemType::MAIL_CHANGE).unwrap();
        let mut w = FieldWriter::new(ItemType::MAIL_CHANGE, &header);
        w.set("type", "f");
        w.dec("uid", 1);
        w.set("guid", "g");
        w.dec_nonzero("modseq", 7);
        w.hex_nonzero("add_flags", 1);
        w.hex_nonzero("final_flags", 0x29);
        let mut out = Vec::new();
        w.finish_line(&mut out);
        assert_eq!(out, b"Cf\t1\tg\t\x02\t7\t\x02\t1\t\x02\t29\n");
    }

    #[test]
    fn writer_doubles_leading_null_chr_and_escapes() {
        let header = ItemHeader::dovecot(ItemType::MAIL_REQUEST).unwrap();
        let mut w = FieldWriter::new(ItemType::MAIL_REQUEST, &header);
        w.set("guid", b"\x02x\ty");
        let mut out = Vec::new();
        w.finish_line(&mut out);
        assert_eq!(out, b"R\x02\x02x\x01ty\n");
        let r = FieldReader::new(ItemType::MAIL_REQUEST, &header, &out[1..out.len() - 1]).unwrap();
        assert_eq!(r.get("guid"), Some(&b"\x02x\ty"[..]));
        assert_eq!(r.get("uid"), None);
    }

    #[test]
    fn reader_by_peer_header_and_required() {
        // The peer's header has another order and an unknown key.
        let header = ItemHeader::new(["uid", "whatever", "type"]);
        let r = FieldReader::new(ItemType::MAIL_CHANGE, &header, b"5\tzzz\ts").unwrap();
        assert_eq!(r.get("type"), Some(&b"s"[..]));
        assert_eq!(r.dec_u32("uid").unwrap(), Some(5));
        assert_eq!(r.get("guid"), None);
        // A required value that is absent or cut off.
        assert!(FieldReader::new(ItemType::MAIL_CHANGE, &header, b"5\tzzz\t\x02").is_err());
        assert!(FieldReader::new(ItemType::MAIL_CHANGE, &header, b"5").is_err());
        // An empty required value is present.
        assert!(FieldReader::new(ItemType::MAIL_CHANGE, &header, b"5\t\t").is_ok());
    }

    #[test]
    fn reader_nul_cuts_value_like_c_strings() {
        let header = ItemHeader::dovecot(ItemType::MAIL_REQUEST).unwrap();
        let r = FieldReader::new(ItemType::MAIL_REQUEST, &header, b"ab\x010cd\t\x010\x02").unwrap();
        assert_eq!(r.get("guid"), Some(&b"ab"[..]));
        // "\x02" after the cut is gone: the value is the empty string, not absent.
        assert_eq!(r.get("uid"), Some(&b""[..]));
    }
}
