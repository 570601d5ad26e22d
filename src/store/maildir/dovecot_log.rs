//! Dovecot's modseqs for a Maildir mailbox, read from its transaction log.
//!
//! Dovecot and mailreplica each keep an index of the same Maildir, each with modseqs of its
//! own. A sync state (`-s`) carries one modseq per mailbox, the last common point, which each
//! end looks up in its own index; a state that `doveadm sync` printed names a point in
//! Dovecot's numbering. It is safe in ours only if every change we record after that sync
//! gets a modseq above it, so our HIGHESTMODSEQ is never left below Dovecot's (see
//! [`super::mailbox`]). The other way, a state we print for doveadm must name a point of
//! Dovecot's up to which every change Dovecot counted was in the files we synced: `applied`
//! below (see `dsync::saved_state`).
//!
//! Dovecot's HIGHESTMODSEQ is where its transaction log `dovecot.index.log` ends: the file's
//! initial modseq, plus one for every record that changes mails visibly, or the value a modseq
//! update record sets (Dovecot's `mail_transaction_update_modseq`). Only that file is read,
//! and only for these numbers; nothing of Dovecot's is ever written.

use std::fs;
use std::path::Path;

use crate::store::Modseq;

/// The transaction log's name in a mailbox's Dovecot index directory.
pub(crate) const LOG_NAME: &str = "dovecot.index.log";

/// What Dovecot's log of one mailbox says about its modseqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogModseqs {
    /// Dovecot's HIGHESTMODSEQ: where the log ends.
    pub(crate) highest: Modseq,
    /// The highest modseq whose changes are all in the Maildir's files already. A flag change
    /// or expunge that a Dovecot process commits reaches its log first and the files only at
    /// its next sync of the mailbox; the log marks how far those syncs got (the index header's
    /// `log_file_tail_offset`, set by header-update records). Everything counted up to that
    /// point is on disk, so a scan of the files begun after this was read sees all of it.
    pub(crate) applied: Modseq,
}

/// Dovecot's modseqs for the mailbox whose Dovecot index lives in `dir`; `None` when there is
/// no log there that we can read (none, unreadable, another format or byte order); zeros
/// when Dovecot does not count modseqs there yet.
pub(crate) fn read(dir: &Path) -> Option<LogModseqs> {
    // The log is rotated at about 1 MiB; a larger one is not Dovecot's usual and is not read.
    const MAX_LOG: u64 = 64 << 20;
    let path = dir.join(LOG_NAME);
    let meta = fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > MAX_LOG {
        return None;
    }
    parse(&fs::read(&path).ok()?)
}

// Record types (`enum mail_transaction_type`).
const EXPUNGE: u32 = 0x1;
const APPEND: u32 = 0x2;
const FLAG_UPDATE: u32 = 0x4;
const HEADER_UPDATE: u32 = 0x20;
const EXT_INTRO: u32 = 0x40;
const KEYWORD_UPDATE: u32 = 0x400;
const KEYWORD_RESET: u32 = 0x800;
const EXPUNGE_GUID: u32 = 0x2000;
const MODSEQ_UPDATE: u32 = 0x8000;
const ATTRIBUTE_UPDATE: u32 = 0x10_0000;
const TYPE_MASK: u32 = 0x0fff_ffff;
const EXPUNGE_PROT: u32 = 0xcd90;
const EXTERNAL: u32 = 0x1000_0000;
/// \Answered \Flagged \Deleted \Seen \Draft: a flag update touching none of them (and not
/// forcing a modseq) is internal and, from log version 1.3 on, counts for nothing.
const VISIBLE_FLAGS: u8 = 0x1f;
/// `mail_transaction_log_header.compat_flags`: the file was written little-endian.
const COMPAT_LITTLE_ENDIAN: u8 = 0x01;

/// The log's modseqs, from its bytes. A record cut short at the end (being written, or left
/// by a crash) ends the reading there, as it ends Dovecot's.
fn parse(data: &[u8]) -> Option<LogModseqs> {
    let u16_at = |p: usize| u16::from_le_bytes([data[p], data[p + 1]]);
    if data.len() < 24 || data[0] != 1 {
        return None;
    }
    let version = u16::from(data[0]) << 8 | u16::from(data[1]);
    let hdr_size = usize::from(u16_at(2));
    if hdr_size < 24 || hdr_size > data.len() {
        return None;
    }
    if version >= 0x102 && hdr_size > 32 && data[32] & COMPAT_LITTLE_ENDIAN == 0 {
        return None;
    }
    let initial = if hdr_size >= 32 { le_u64(&data[24..32]) } else { 0 };
    // First pass: the highest modseq, and how far the Maildir is synced (Dovecot's
    // `log_file_track_sync`). The tail starts unknown (Dovecot takes it from its main index,
    // which is not read here); that only places `applied` lower.
    let mut highest = initial;
    let mut tail = 0usize;
    let mut last_set_tail = 0usize;
    let mut records_end = hdr_size;
    for (pos, kind, body) in Records::new(data, hdr_size) {
        let end = pos + 8 + body.len();
        records_end = end;
        update(kind, body, &mut highest, version);
        if kind & EXTERNAL == 0 {
            // A change not synced to the Maildir yet: the tail stays before it.
            continue;
        }
        if kind & TYPE_MASK == HEADER_UPDATE
            && let Some(t) = tail_update(body)
        {
            let t = t as usize;
            // Shrinking and impossible values are ignored, as Dovecot ignores them.
            if t >= last_set_tail && t <= end {
                last_set_tail = t;
                tail = tail.max(t);
            }
            continue;
        }
        // A record of Dovecot's own syncing has nothing to apply to the Maildir: a tail
        // right before it moves past it.
        if tail == pos {
            tail = end;
        }
    }
    // Second pass: the modseq where the tail lies. Usually, with nothing pending, that is the
    // end (a sync's last record moves the tail past itself), and no pass is needed.
    if tail >= records_end {
        return Some(LogModseqs { highest, applied: highest });
    }
    let mut applied = initial;
    for (pos, kind, body) in Records::new(data, hdr_size) {
        if pos + 8 + body.len() > tail {
            break;
        }
        update(kind, body, &mut applied, version);
    }
    Some(LogModseqs { highest, applied })
}

/// The log's records after its header: (offset, type, body).
struct Records<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Records<'a> {
    fn new(data: &'a [u8], start: usize) -> Self {
        Self { data, pos: start }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = (usize, u32, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (data, pos) = (self.data, self.pos);
        if data.len() - pos < 8 {
            return None;
        }
        let size = offset_to_u32(u32::from_be_bytes(data[pos..pos + 4].try_into().ok()?)) as usize;
        if size < 8 || size > data.len() - pos {
            return None;
        }
        self.pos = pos + size;
        Some((pos, le_u32(&data[pos + 4..pos + 8]), &data[pos + 8..pos + size]))
    }
}

/// The tail offset a header-update record sets, if its first update covers that field
/// (`struct mail_transaction_header_update`: offset, size, then the bytes, written over
/// `struct mail_index_header`, whose `log_file_tail_offset` is at byte 64). Dovecot looks at
/// the record's first update only.
fn tail_update(body: &[u8]) -> Option<u32> {
    const TAIL_FIELD: usize = 64;
    let offset = usize::from(u16::from_le_bytes([*body.first()?, *body.get(1)?]));
    let size = usize::from(u16::from_le_bytes([*body.get(2)?, *body.get(3)?]));
    let bytes = body.get(4..4 + size)?;
    if offset > TAIL_FIELD || offset + size < TAIL_FIELD + 4 {
        return None;
    }
    Some(le_u32(&bytes[TAIL_FIELD - offset..]))
}

/// A record's size as the log stores it (`mail_index_offset_to_uint32`): four bytes of seven
/// bits each, the high bit set in every byte, counting 4-byte units. 0 if malformed.
fn offset_to_u32(v: u32) -> u32 {
    if v & 0x8080_8080 != 0x8080_8080 {
        return 0;
    }
    ((v & 0x7f) | ((v & 0x7f00) >> 8 << 7) | ((v & 0x7f_0000) >> 16 << 14) | ((v & 0x7f00_0000) >> 24 << 21)) << 2
}

/// What one record does to the modseq (Dovecot's `mail_transaction_update_modseq`).
fn update(kind: u32, body: &[u8], modseq: &mut Modseq, version: u16) {
    let t = kind & TYPE_MASK;
    if *modseq == 0 {
        // Not counting yet: only the introduction of the modseq extension starts it.
        if t == EXT_INTRO && body.len() >= 20 {
            let name_len = usize::from(u16::from_le_bytes([body[18], body[19]]));
            if body.get(20..20 + name_len) == Some(b"modseq".as_slice()) {
                *modseq = 1;
            }
        }
        return;
    }
    // (Saturating: the log is the user's own file, and may claim any value.)
    let step = match t {
        // Expunges count once they are done (external), not when requested.
        _ if t == EXPUNGE | EXPUNGE_PROT || t == EXPUNGE_GUID | EXPUNGE_PROT => u64::from(kind & EXTERNAL != 0),
        APPEND | KEYWORD_UPDATE | KEYWORD_RESET | ATTRIBUTE_UPDATE => 1,
        // struct mail_transaction_flag_update: uid1, uid2, add, remove, modseq_inc, pad.
        FLAG_UPDATE => u64::from(
            version < 0x103 || body.chunks_exact(12).any(|r| (r[8] | r[9]) & VISIBLE_FLAGS != 0 || r[10] != 0),
        ),
        MODSEQ_UPDATE => {
            // struct mail_transaction_modseq_update: uid, modseq low and high halves.
            for r in body.chunks_exact(12) {
                let m = u64::from(le_u32(&r[4..8])) | u64::from(le_u32(&r[8..12])) << 32;
                *modseq = (*modseq).max(m);
            }
            0
        }
        _ => 0,
    };
    *modseq = modseq.saturating_add(step);
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from(le_u32(&b[0..4])) | u64::from(le_u32(&b[4..8])) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn highest(data: &[u8]) -> Option<Modseq> {
        parse(data).map(|m| m.highest)
    }

    fn to_offset(n: u32) -> u32 {
        let o = n >> 2;
        0x8080_8080
            | (o & 0x7f)
            | ((o & 0x3f80) >> 7 << 8)
            | ((o & 0x1f_c000) >> 14 << 16)
            | ((o & 0x0fe0_0000) >> 21 << 24)
    }

    /// A log header of version 1.3 with `initial` as its initial modseq.
    fn header(initial: u64) -> Vec<u8> {
        let mut h = vec![1u8, 3];
        h.extend(40u16.to_le_bytes());
        h.extend([0u8; 20]);
        h.extend(initial.to_le_bytes());
        h.push(COMPAT_LITTLE_ENDIAN);
        h.extend([0u8; 7]);
        h
    }

    fn record(log: &mut Vec<u8>, kind: u32, body: &[u8]) {
        let padded = body.len().div_ceil(4) * 4;
        log.extend(to_offset(8 + padded as u32).to_be_bytes());
        log.extend(kind.to_le_bytes());
        log.extend(body);
        log.extend(std::iter::repeat_n(0u8, padded - body.len()));
    }

    fn flag_update(add: u8, remove: u8, inc: u8) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(1u32.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend([add, remove, inc, 0]);
        b
    }

    #[test]
    fn sizes_decode_as_dovecot_encodes_them() {
        for n in [8u32, 12, 124, 128, 4096, 65_532, 1 << 20, (1 << 30) - 4] {
            assert_eq!(offset_to_u32(to_offset(n)), n);
        }
        assert_eq!(offset_to_u32(0x0000_0010), 0, "high bits missing");
    }

    #[test]
    fn counts_as_dovecot_does() {
        let mut log = header(10);
        record(&mut log, APPEND, &[0; 16]); // 11
        record(&mut log, FLAG_UPDATE, &flag_update(0x08, 0, 0)); // \Seen: 12
        record(&mut log, FLAG_UPDATE, &flag_update(0x40, 0, 0)); // internal only: no change
        record(&mut log, FLAG_UPDATE, &flag_update(0, 0, 1)); // forced modseq: 13
        record(&mut log, EXPUNGE_GUID | EXPUNGE_PROT, &[0; 20]); // a request: no change
        record(&mut log, EXPUNGE_GUID | EXPUNGE_PROT | EXTERNAL, &[0; 20]); // 14
        record(&mut log, KEYWORD_UPDATE, &[0; 12]); // 15
        record(&mut log, HEADER_UPDATE, &[0; 8]); // a header update: no change
        assert_eq!(highest(&log), Some(15));
        let mut up = Vec::new();
        up.extend(0u32.to_le_bytes());
        up.extend(7u32.to_le_bytes());
        up.extend(1u32.to_le_bytes());
        record(&mut log, MODSEQ_UPDATE, &up);
        assert_eq!(highest(&log), Some((1 << 32) + 7));
        // A record cut short ends the log.
        let mut cut = header(10);
        record(&mut cut, APPEND, &[0; 16]);
        record(&mut cut, APPEND, &[0; 16]);
        cut.truncate(cut.len() - 4);
        assert_eq!(highest(&cut), Some(11));
        // A log claiming the largest modseq stays there.
        let mut top = header(u64::MAX);
        record(&mut top, APPEND, &[0; 16]);
        assert_eq!(highest(&top), Some(u64::MAX));
    }

    #[test]
    fn counting_starts_with_the_modseq_extension() {
        let mut log = header(0);
        record(&mut log, APPEND, &[0; 16]);
        assert_eq!(highest(&log), Some(0));
        let mut intro = vec![0u8; 18];
        intro.extend(6u16.to_le_bytes());
        intro.extend(b"modseq");
        record(&mut log, EXT_INTRO, &intro);
        record(&mut log, APPEND, &[0; 16]);
        assert_eq!(highest(&log), Some(2));
    }

    #[test]
    fn other_formats_are_not_read() {
        assert_eq!(parse(b""), None);
        let mut v2 = header(5);
        v2[0] = 2;
        assert_eq!(parse(&v2), None);
        let mut big_endian = header(5);
        big_endian[32] = 0;
        assert_eq!(parse(&big_endian), None);
        let mut short = header(5);
        short[2] = 200;
        assert_eq!(parse(&short), None);
    }

    /// A header update setting the index's `log_file_tail_offset`.
    fn tail_at(log: &mut Vec<u8>, tail: u32) {
        let mut b = Vec::new();
        b.extend(64u16.to_le_bytes());
        b.extend(4u16.to_le_bytes());
        b.extend(tail.to_le_bytes());
        record(log, HEADER_UPDATE | EXTERNAL, &b);
    }

    #[test]
    fn applied_ends_where_dovecots_maildir_sync_got() {
        let mut log = header(10);
        record(&mut log, APPEND, &[0; 16]); // 11
        let after_append = log.len() as u32;
        record(&mut log, FLAG_UPDATE, &flag_update(0x08, 0, 0)); // 12, not in the files yet
        tail_at(&mut log, after_append);
        assert_eq!(parse(&log), Some(LogModseqs { highest: 12, applied: 11 }));
        // The sync applies the flag change: its own records, and a tail past them.
        record(&mut log, FLAG_UPDATE | EXTERNAL, &flag_update(0x08, 0, 0)); // 13
        let end = log.len() as u32 + 16;
        tail_at(&mut log, end);
        assert_eq!(parse(&log), Some(LogModseqs { highest: 13, applied: 13 }));
        // A shrinking tail is ignored; a synced tail moves past Dovecot's own records.
        tail_at(&mut log, after_append);
        record(&mut log, EXPUNGE_GUID | EXPUNGE_PROT | EXTERNAL, &[0; 20]); // 14
        assert_eq!(parse(&log), Some(LogModseqs { highest: 14, applied: 13 }));
        let mut synced = header(10);
        record(&mut synced, APPEND, &[0; 16]); // 11
        let end = synced.len() as u32 + 16;
        tail_at(&mut synced, end);
        record(&mut synced, EXPUNGE_GUID | EXPUNGE_PROT | EXTERNAL, &[0; 20]); // 12, tail follows
        record(&mut synced, KEYWORD_UPDATE, &[0; 12]); // 13, pending
        assert_eq!(parse(&synced), Some(LogModseqs { highest: 13, applied: 12 }));
        // A tail past the record that sets it is impossible, and ignored.
        let mut bad = header(10);
        record(&mut bad, APPEND, &[0; 16]);
        tail_at(&mut bad, 4096);
        assert_eq!(parse(&bad), Some(LogModseqs { highest: 11, applied: 10 }));
        // No tail at all: nothing is known to be in the files beyond the log's start.
        let mut none = header(10);
        record(&mut none, APPEND | EXTERNAL, &[0; 16]);
        assert_eq!(parse(&none), Some(LogModseqs { highest: 11, applied: 10 }));
    }
}
