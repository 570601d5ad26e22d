//! The saved sync state string (`doveadm sync -s <state>`, `dsync-mailbox-state.c`).
//!
//! The master prints it after a run and takes it back for the next incremental run; the slave
//! never sees it. Format: standard padded base64 of
//!
//! ```text
//! 01 00 00 00                         header: major 1, minor 0, two zero bytes
//! n × 44 bytes, one per mailbox:      GUID (16 bytes), then little-endian
//!                                     u32 last_uidvalidity, u32 last_common_uid,
//!                                     u64 last_common_modseq, u64 last_common_pvt_modseq,
//!                                     u32 last_messages_count
//! u32 LE CRC-32 of everything before it
//! ```
//!
//! Dovecot also accepts the old v0 format (no header, 40-byte records, CRC) by treating it as
//! an empty state (forcing a full sync), and so do we. Dovecot does not look at the header
//! bytes at all; we refuse a major version other than 1, unless the data is a valid v0 state
//! (a 10-mailbox v0 state has exactly the size of a v1 state).

use super::base64;
use super::crc32::crc32;
use super::error::{StateProblem, WireError};
use super::record::MailboxState;
use super::types::Guid128;

/// Bytes per mailbox in the v1 format.
const RECORD_LEN: usize = 16 + 4 + 4 + 8 + 8 + 4;
/// Bytes per mailbox in the v0 format.
const V0_RECORD_LEN: usize = 16 + 4 + 4 + 8 + 8;
/// The v1 header.
const HEADER: [u8; 4] = [1, 0, 0, 0];

/// Encode per-mailbox states into a state string. `changes_during_sync` is not stored.
pub fn encode_state(states: &[MailboxState]) -> String {
    let mut buf = Vec::with_capacity(8 + states.len() * RECORD_LEN);
    buf.extend_from_slice(&HEADER);
    for s in states {
        buf.extend_from_slice(&s.mailbox_guid.to_bytes());
        buf.extend_from_slice(&s.last_uidvalidity.to_le_bytes());
        buf.extend_from_slice(&s.last_common_uid.to_le_bytes());
        buf.extend_from_slice(&s.last_common_modseq.to_le_bytes());
        buf.extend_from_slice(&s.last_common_pvt_modseq.to_le_bytes());
        buf.extend_from_slice(&s.last_messages_count.to_le_bytes());
    }
    let crc = crc32(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    base64::encode(&buf)
}

/// Decode a state string into per-mailbox states, in the order they were written.
///
/// An empty result means "no usable state" (a full sync): the v0 format and its empty form
/// (`AAAAAA==`) decode to it, as in Dovecot.
pub fn decode_state(text: &str) -> Result<Vec<MailboxState>, WireError> {
    let bad = |p| WireError::BadState(p);
    let data = base64::decode(text).ok_or(bad(StateProblem::Base64))?;
    if data == [0, 0, 0, 0] {
        return Ok(Vec::new());
    }
    if data.len() < 8 {
        return Err(bad(StateProblem::TooShort));
    }
    let (body, crc) = data.split_at(data.len() - 4);
    let crc_ok = crc == crc32(body).to_le_bytes();
    let problem = if (data.len() - 8) % RECORD_LEN != 0 {
        Some(StateProblem::BadLength)
    } else if !crc_ok {
        Some(StateProblem::CrcMismatch)
    } else {
        body.first().filter(|&&major| major != 1).map(|&major| StateProblem::UnsupportedVersion(major))
    };
    if let Some(problem) = problem {
        // Like Dovecot: a valid v0 state is silently taken as empty.
        return if body.len() % V0_RECORD_LEN == 0 && crc_ok { Ok(Vec::new()) } else { Err(bad(problem)) };
    }
    Ok(body.get(HEADER.len()..).unwrap_or_default().chunks_exact(RECORD_LEN).map(decode_record).collect())
}

fn decode_record(r: &[u8]) -> MailboxState {
    let u32_at = |at: usize| r.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
    let u64_at = |at: usize| r.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    let guid: [u8; 16] = r.get(..16).and_then(|b| b.try_into().ok()).unwrap_or_default();
    MailboxState {
        mailbox_guid: Guid128::from_bytes(guid),
        last_uidvalidity: u32_at(16),
        last_common_uid: u32_at(20),
        last_common_modseq: u64_at(24),
        last_common_pvt_modseq: u64_at(32),
        last_messages_count: u32_at(40),
        changes_during_sync: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE2: &str = include_str!("testdata/state2.txt");

    fn guid(s: &str) -> Guid128 {
        Guid128::parse_hex(s.as_bytes()).unwrap()
    }

    #[test]
    fn spec_example_decodes_to_documented_values() {
        let states = decode_state("AQAAANQqBRYIsgprxjoAAIPsw3UIsgprAwAAAAcAAAAAAAAAAAAAAAAAAAACAAAAEaGLDA==").unwrap();
        assert_eq!(
            states,
            vec![MailboxState {
                mailbox_guid: guid("d42a051608b20a6bc63a000083ecc375"),
                last_uidvalidity: 1_795_863_048,
                last_common_uid: 3,
                last_common_modseq: 7,
                last_common_pvt_modseq: 0,
                last_messages_count: 2,
                changes_during_sync: false,
            }]
        );
        assert_eq!(STATE2.trim(), "AQAAANQqBRYIsgprxjoAAIPsw3UIsgprAwAAAAcAAAAAAAAAAAAAAAAAAAACAAAAEaGLDA==");
        // The CRC in the example is zlib's crc32 of the first 48 bytes.
        let raw = base64::decode(STATE2.trim()).unwrap();
        assert_eq!(raw.get(48..), Some(&0x0c8b_a111u32.to_le_bytes()[..]));
    }

    #[test]
    fn captured_states_round_trip() {
        for text in [
            include_str!("testdata/state1.txt"),
            include_str!("testdata/state2.txt"),
            include_str!("testdata/state3.txt"),
        ] {
            let states = decode_state(text).unwrap();
            assert!(!states.is_empty());
            assert_eq!(encode_state(&states), text.trim());
        }
        assert_eq!(decode_state(include_str!("testdata/state3.txt")).unwrap().len(), 3);
    }

    #[test]
    fn empty_state() {
        let text = encode_state(&[]);
        assert_eq!(decode_state(&text), Ok(vec![]));
        // v0 empty state: four zero bytes.
        assert_eq!(decode_state("AAAAAA=="), Ok(vec![]));
    }

    #[test]
    fn refuses_damage() {
        let good = STATE2.trim();
        let mut raw = base64::decode(good).unwrap();
        assert_eq!(decode_state("not base64!"), Err(WireError::BadState(StateProblem::Base64)));
        assert_eq!(decode_state(&base64::encode(&[1, 0, 0])), Err(WireError::BadState(StateProblem::TooShort)));
        assert_eq!(
            decode_state(&base64::encode(raw.get(..raw.len() - 1).unwrap())),
            Err(WireError::BadState(StateProblem::BadLength))
        );
        if let Some(b) = raw.get_mut(20) {
            *b ^= 1;
        }
        assert_eq!(decode_state(&base64::encode(&raw)), Err(WireError::BadState(StateProblem::CrcMismatch)));
    }

    #[test]
    fn refuses_other_major_version_unless_v0() {
        let mut buf = vec![2, 0, 0, 0];
        buf.extend_from_slice(&[7; RECORD_LEN]);
        let crc = crc32(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_state(&base64::encode(&buf)), Err(WireError::BadState(StateProblem::UnsupportedVersion(2))));
    }

    #[test]
    fn v0_state_is_empty() {
        // Two v0 records (40 bytes each) and a CRC: valid v0, taken as empty.
        let mut buf = vec![9u8; 2 * V0_RECORD_LEN];
        let crc = crc32(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_state(&base64::encode(&buf)), Ok(vec![]));
        // Ten v0 records have the size of a v1 state with one record more than zero; the
        // first GUID byte (here 9) is no valid major version, so we fall back to v0 as well.
        let mut buf = vec![9u8; 10 * V0_RECORD_LEN];
        let crc = crc32(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        assert_eq!((buf.len() - 8) % RECORD_LEN, 0);
        assert_eq!(decode_state(&base64::encode(&buf)), Ok(vec![]));
    }
}
