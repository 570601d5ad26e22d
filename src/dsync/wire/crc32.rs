//! CRC-32 (IEEE 802.3 / zlib polynomial), for the state string's checksum.
//!
//! Dovecot's `crc32_data` is zlib's `crc32(0, data, len)`: reflected polynomial 0xEDB88320,
//! initial value and final XOR 0xFFFFFFFF. Twenty lines do not justify a dependency.

/// The byte-wise lookup table, built at compile time.
const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The CRC-32 of `data`.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        let idx = usize::from((crc as u8) ^ b);
        TABLE.get(idx).copied().unwrap_or(0) ^ (crc >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn known_answers() {
        assert_eq!(crc32(b""), 0);
        // The standard check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }
}
