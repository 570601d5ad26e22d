//! IMAP's modified UTF-7 (RFC 3501 §5.1.3), which Dovecot uses for mailbox directory names
//! unless `mail_location` has `:UTF-8`.
//!
//! Printable ASCII stands for itself except `&`, which is written `&-`; every other run of
//! characters is UTF-16, base64-encoded with `,` instead of `/` and no padding, between `&`
//! and `-`.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

/// Encodes a UTF-8 name into modified UTF-7.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending: Vec<u16> = Vec::new();
    for c in s.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut pending);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut out, &mut pending);
    out
}

fn flush(out: &mut String, pending: &mut Vec<u16>) {
    if pending.is_empty() {
        return;
    }
    out.push('&');
    let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = [(v >> 18) & 63, (v >> 12) & 63, (v >> 6) & 63, v & 63];
        for &c in &chars[..n + 1] {
            out.push(char::from(ALPHABET[c as usize]));
        }
    }
    out.push('-');
    pending.clear();
}

/// A name that is not valid modified UTF-7.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid modified UTF-7 name {0:?}")]
pub struct BadMutf7(pub String);

/// Decodes a modified UTF-7 name into UTF-8.
pub fn decode(s: &str) -> Result<String, BadMutf7> {
    let bad = || BadMutf7(s.to_owned());
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let end = after.find('-').ok_or_else(bad)?;
        let b64 = &after[..end];
        if b64.is_empty() {
            out.push('&');
        } else {
            let mut bits: u32 = 0;
            let mut nbits = 0;
            let mut bytes = Vec::new();
            for c in b64.bytes() {
                let v = ALPHABET.iter().position(|&a| a == c).ok_or_else(bad)? as u32;
                bits = (bits << 6) | v;
                nbits += 6;
                if nbits >= 8 {
                    nbits -= 8;
                    bytes.push((bits >> nbits) as u8);
                    bits &= (1 << nbits) - 1;
                }
            }
            if bytes.len() % 2 != 0 || bits != 0 {
                return Err(bad());
            }
            let units: Vec<u16> = bytes.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])).collect();
            let text = String::from_utf16(&units).map_err(|_| bad())?;
            // Printable ASCII must not be encoded (RFC 3501), or the name is ambiguous.
            if text.chars().any(|c| (' '..='~').contains(&c)) {
                return Err(bad());
            }
            out.push_str(&text);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_example() {
        // Observed from Dovecot 2.3.19: `Ünïcødé` -> `&ANw-n&AO8-c&APg-d&AOk-`.
        assert_eq!(encode("Ünïcødé"), "&ANw-n&AO8-c&APg-d&AOk-");
        assert_eq!(decode("&ANw-n&AO8-c&APg-d&AOk-").unwrap(), "Ünïcødé");
    }

    #[test]
    fn ampersand_and_rfc_examples() {
        assert_eq!(encode("A&B"), "A&-B");
        assert_eq!(decode("A&-B").unwrap(), "A&B");
        assert_eq!(encode("~peter/mail/台北/日本語"), "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(decode("&U,BTFw-").unwrap(), "台北");
        assert_eq!(encode("😀"), "&2D3eAA-");
        assert_eq!(decode("&2D3eAA-").unwrap(), "😀");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["&", "&AB", "&!!-", "&AGE-"] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
