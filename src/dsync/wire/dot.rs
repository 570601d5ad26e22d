//! Dot-stuffed bodies (SMTP DATA style): how `M` and `A` records carry their content.
//!
//! **Sending** ([`DotEncoder`]): the content goes out as-is except that a `.` at the start of
//! a line gets a second `.` in front, and the end is always `CR LF . CR LF`, even after a final
//! LF. We also stuff a `.` that is the very first byte of the content: upstream 2.3.19.1 did
//! not (its `value_output_last` starts at 0), which let mail content inject protocol lines
//! (CVE-2026-33606); Debian's fixed 2.3.19.1 does, and both fixed and unfixed readers treat the
//! stream start as a line start, so stuffing it is right for every peer.
//!
//! **Receiving** ([`DotDecoder`]): a byte-for-byte re-statement of the state machine of
//! Dovecot 2.3.19's `lib-mail/istream-dot.c` as dsync uses it (`send_last_lf = FALSE`):
//!
//! * the stream starts "after a line break" that is not part of the content;
//! * `[CR]LF .` followed by `[CR]LF` ends the stream, and that `[CR]LF` before the dot is
//!   **not** content (so `LF . LF`, `LF . CR LF`, `CR LF . LF`, `CR LF . CR LF` and, at the
//!   very start, `. LF` / `. CR LF` are all terminators);
//! * `[CR]LF .` followed by anything else drops the dot (un-stuffing, so `..` reads as `.`);
//! * a bare CR not followed by LF is content.
//!
//! One quirk is kept on purpose, because a Dovecot replica stores the same bytes: after
//! `[CR]LF . CR` followed by a byte other than LF, Dovecot emits the line break, drops that
//! byte, and treats the CR as pending with the *previous* line break's "had CR" bit (so for an
//! LF-only line break the CR is lost too). A conforming sender never produces that sequence
//! (it would stuff the dot); only an unfixed 2.3.19 sender does, for content starting `.` CR.
//!
//! Both directions are incremental: feed any chunking, down to one byte at a time, and the
//! output is the same.

/// Where the reader is in the pattern `[CR] LF . [CR] LF`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Inside a line.
    Normal,
    /// Saw CR.
    Cr,
    /// Saw `[CR]LF` (a line start; also the state at stream start).
    LineStart,
    /// Saw `[CR]LF .`.
    Dot,
    /// Saw `[CR]LF . CR`.
    DotCr,
}

/// The result of one [`DotDecoder::decode`] call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DotProgress {
    /// How many input bytes were consumed.
    pub consumed: usize,
    /// The terminating `.` line was consumed: the body is complete.
    pub finished: bool,
}

/// Incremental reader of one dot-stuffed body. See the module documentation.
#[derive(Clone, Debug)]
pub struct DotDecoder {
    state: State,
    /// The pending line break had no CR (`state_no_cr`).
    no_cr: bool,
    /// The pending "line break" is the stream start, which has no LF either (`state_no_lf`).
    no_lf: bool,
    finished: bool,
}

impl Default for DotDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DotDecoder {
    /// A reader at the start of a body.
    pub fn new() -> Self {
        Self { state: State::LineStart, no_cr: true, no_lf: true, finished: false }
    }

    /// True once the terminating `.` line was read.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Emit the held-back line break (Dovecot's `flush_dot_state`) and leave the pattern.
    fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.no_cr {
            out.push(b'\r');
        }
        if self.no_lf {
            self.no_lf = false;
        } else if matches!(self.state, State::LineStart | State::Dot | State::DotCr) {
            out.push(b'\n');
        }
        // After `[CR]LF . CR` + other byte, Dovecot goes back to "CR seen".
        self.state = if self.state == State::DotCr { State::Cr } else { State::Normal };
    }

    /// Decode from `input`, appending content to `out`, until the input is used up, the body
    /// ends, or `out` has grown by at least `max_out` bytes (one step may add up to two
    /// bytes beyond; pass a `max_out` of at least 1). Returns how far it got.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>, max_out: usize) -> DotProgress {
        let limit = out.len().saturating_add(max_out.max(1));
        let mut consumed = 0;
        while let Some(rest) = input.get(consumed..).filter(|r| !r.is_empty()) {
            if self.finished || out.len() >= limit {
                break;
            }
            if self.state == State::Normal {
                // Fast path: copy the run of ordinary bytes up to the next CR or LF at once.
                let room = limit - out.len();
                let window = rest.get(..room.min(rest.len())).unwrap_or_default();
                let run = window.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(window.len());
                if run > 0 {
                    out.extend_from_slice(window.get(..run).unwrap_or_default());
                    consumed += run;
                    continue;
                }
            }
            let Some(&b) = rest.first() else { break };
            consumed += 1;
            match self.state {
                State::Normal => {}
                State::Cr => {
                    if b == b'\n' {
                        self.state = State::LineStart;
                        continue;
                    }
                    self.flush(out);
                }
                State::LineStart => {
                    if b == b'.' {
                        self.state = State::Dot;
                        continue;
                    }
                    self.flush(out);
                }
                State::Dot => match b {
                    b'\r' => {
                        self.state = State::DotCr;
                        continue;
                    }
                    b'\n' => {
                        self.finished = true;
                        break;
                    }
                    // Un-stuffing: the dot is dropped, the byte is read normally below.
                    _ => self.flush(out),
                },
                State::DotCr => {
                    if b == b'\n' {
                        self.finished = true;
                        break;
                    }
                    // Dovecot's quirk: this byte is consumed without being looked at.
                    self.flush(out);
                }
            }
            if self.state == State::Normal {
                match b {
                    b'\r' => {
                        self.state = State::Cr;
                        self.no_cr = false;
                    }
                    b'\n' => {
                        self.state = State::LineStart;
                        self.no_cr = true;
                    }
                    _ => out.push(b),
                }
            }
        }
        DotProgress { consumed, finished: self.finished }
    }
}

/// Incremental writer of one dot-stuffed body. See the module documentation.
#[derive(Clone, Debug)]
pub struct DotEncoder {
    at_line_start: bool,
}

impl Default for DotEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DotEncoder {
    /// A writer at the start of a body (which counts as a line start).
    pub fn new() -> Self {
        Self { at_line_start: true }
    }

    /// Append `chunk` to `out`, stuffing a dot in front of every line-leading dot.
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for segment in chunk.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start && segment.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(segment);
            self.at_line_start = segment.last() == Some(&b'\n');
        }
    }

    /// Append the terminator `CR LF . CR LF`. The CRLF is never content for the reader, so it
    /// is right whether or not the content ended in a line break (or in a bare CR).
    pub fn finish(self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n.\r\n");
    }
}

/// Encode a whole body in one go (a convenience over [`DotEncoder`]).
pub fn encode_body(content: &[u8], out: &mut Vec<u8>) {
    let mut enc = DotEncoder::new();
    enc.encode(content, out);
    enc.finish(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode a whole wire body; returns the content and the number of bytes consumed, or
    /// `None` if the body did not end.
    fn decode_all(wire: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        let p = d.decode(wire, &mut out, usize::MAX);
        p.finished.then_some((out, p.consumed))
    }

    /// Decode one byte at a time with a tiny output budget.
    fn decode_bytewise(wire: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < wire.len() {
            let p = d.decode(wire.get(pos..=pos)?, &mut out, 1);
            pos += p.consumed;
            if p.finished {
                return Some((out, pos));
            }
        }
        None
    }

    #[test]
    fn known_answers() {
        let cases: &[(&[u8], &[u8])] = &[
            // The four terminators and the start-of-stream ones.
            (b"abc\n.\n", b"abc"),
            (b"abc\n.\r\n", b"abc"),
            (b"abc\r\n.\n", b"abc"),
            (b"abc\r\n.\r\n", b"abc"),
            (b".\n", b""),
            (b".\r\n", b""),
            (b"\r\n.\r\n", b""),
            // What Dovecot sends: the CRLF before the dot is never content.
            (b"Hello one.\n..dot line\n\r\n.\r\n", b"Hello one.\n.dot line\n"),
            (b"\n\r\n.\r\n", b"\n"),
            (b"\r\n\r\n.\r\n", b"\r\n"),
            // A body ending in a bare CR, and one without a final line break.
            (b"a\r\r\n.\r\n", b"a\r"),
            (b"no newline\r\n.\r\n", b"no newline"),
            // Un-stuffing: `..` is `.`, `...two` is `..two`, a leading dot at the start.
            (b"a\n..\n...two\n\r\n.\r\n", b"a\n.\n..two\n"),
            (b"..starts with dot\nX\r\n.\r\n", b".starts with dot\nX"),
            // An unstuffed dot (from a non-conforming sender) is dropped, as Dovecot does.
            (b".x\r\n.\r\n", b"x"),
            (b"a\n.b\r\n.\r\n", b"a\nb"),
            // A bare CR in the middle is content; CR CR LF keeps the first CR.
            (b"a\rb\r\r\nc\r\n.\r\n", b"a\rb\r\r\nc"),
            (b"a\r.b\r\n.\r\n", b"a\r.b"),
        ];
        for (wire, content) in cases {
            let (out, consumed) = decode_all(wire).unwrap_or_else(|| panic!("no end: {:?}", wire.escape_ascii()));
            assert_eq!(out, *content, "wire {:?}", wire.escape_ascii().to_string());
            assert_eq!(consumed, wire.len());
            assert_eq!(decode_bytewise(wire), Some((content.to_vec(), wire.len())));
        }
    }

    #[test]
    fn dovecot_quirk_after_dot_cr() {
        // `LF . CR x`: the line break is emitted, `x` is dropped, and the CR survives only if
        // the line break had one. This mirrors istream-dot.c, see the module docs.
        assert_eq!(decode_all(b"a\r\n.\rxy\r\n.\r\n").map(|r| r.0), Some(b"a\r\n\ry".to_vec()));
        assert_eq!(decode_all(b"a\n.\rxy\r\n.\r\n").map(|r| r.0), Some(b"a\ny".to_vec()));
        assert_eq!(decode_all(b".\rxy\r\n.\r\n").map(|r| r.0), Some(b"y".to_vec()));
        assert_eq!(decode_bytewise(b".\rxy\r\n.\r\n").map(|r| r.0), Some(b"y".to_vec()));
    }

    #[test]
    fn stops_at_terminator_and_leaves_the_rest() {
        let wire = b"body\r\n.\r\nM\tnext\n";
        let (out, consumed) = decode_all(wire).unwrap();
        assert_eq!(out, b"body");
        assert_eq!(wire.get(consumed..), Some(&b"M\tnext\n"[..]));
    }

    #[test]
    fn unterminated_is_not_finished() {
        assert_eq!(decode_all(b"abc\n"), None);
        assert_eq!(decode_all(b"abc\r\n."), None);
        assert_eq!(decode_all(b""), None);
    }

    #[test]
    fn output_budget_is_respected() {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        let p = d.decode(b"abcdefgh\r\n.\r\n", &mut out, 3);
        assert_eq!((p.consumed, p.finished, out.as_slice()), (3, false, &b"abc"[..]));
    }

    #[test]
    fn encoder_stuffs_first_byte_and_every_line_start() {
        let mut out = Vec::new();
        encode_body(b".starts with dot\nX: y\n\nbody\n.\n..two\n", &mut out);
        assert_eq!(out, b"..starts with dot\nX: y\n\nbody\n..\n...two\n\r\n.\r\n");
        out.clear();
        encode_body(b"", &mut out);
        assert_eq!(out, b"\r\n.\r\n");
        // A dot after a bare CR is not at a line start.
        out.clear();
        encode_body(b"a\r.b\r\n.c", &mut out);
        assert_eq!(out, b"a\r.b\r\n..c\r\n.\r\n");
    }

    #[test]
    fn encoder_is_chunking_independent() {
        let content = b".a\n.\n\r\n.\r\n\n..\r.x";
        let mut whole = Vec::new();
        encode_body(content, &mut whole);
        let mut enc = DotEncoder::new();
        let mut pieces = Vec::new();
        for b in content {
            enc.encode(std::slice::from_ref(b), &mut pieces);
        }
        enc.finish(&mut pieces);
        assert_eq!(whole, pieces);
    }

    /// A literal, byte-at-a-time transcription of `i_stream_dot_read`'s loop (with an output
    /// buffer that is never full), to check the real decoder and its fast path against.
    fn reference(wire: &[u8]) -> (Vec<u8>, bool, usize) {
        let (mut state, mut no_cr, mut no_lf) = (2u8, true, true);
        let mut out = Vec::new();
        let flush = |state: &mut u8, no_cr: bool, no_lf: &mut bool, out: &mut Vec<u8>| {
            if !no_cr {
                out.push(b'\r');
            }
            if *no_lf {
                *no_lf = false;
            } else if *state > 1 {
                out.push(b'\n');
            }
            *state = if *state != 4 { 0 } else { 1 };
        };
        for (i, &c) in wire.iter().enumerate() {
            match state {
                1 if c == b'\n' => state = 2,
                1 => flush(&mut state, no_cr, &mut no_lf, &mut out),
                2 if c == b'.' => state = 3,
                2 => flush(&mut state, no_cr, &mut no_lf, &mut out),
                3 if c == b'\r' => state = 4,
                3 | 4 if c == b'\n' => return (out, true, i + 1),
                3 | 4 => flush(&mut state, no_cr, &mut no_lf, &mut out),
                _ => {}
            }
            if state == 0 {
                match c {
                    b'\r' => {
                        state = 1;
                        no_cr = false;
                    }
                    b'\n' => {
                        state = 2;
                        no_cr = true;
                    }
                    _ => out.push(c),
                }
            }
        }
        (out, false, wire.len())
    }

    #[test]
    fn matches_a_literal_transcription_of_istream_dot() {
        let alphabet = [b'.', b'\r', b'\n', b'x'];
        for len in 0..=8u32 {
            for mut n in 0..4usize.pow(len) {
                let mut wire = Vec::new();
                for _ in 0..len {
                    wire.extend(alphabet.get(n % 4));
                    n /= 4;
                }
                let (want, want_done, want_used) = reference(&wire);
                // Whole, with a small budget in pieces, and byte by byte.
                for budget in [usize::MAX, 2, 1] {
                    let mut d = DotDecoder::new();
                    let mut out = Vec::new();
                    let mut used = 0;
                    let mut done = false;
                    while used < wire.len() && !done {
                        let end = if budget == 1 { used + 1 } else { wire.len() };
                        let p = d.decode(wire.get(used..end).unwrap_or_default(), &mut out, budget);
                        used += p.consumed;
                        done = p.finished;
                    }
                    assert_eq!(
                        (&out, done, used),
                        (&want, want_done, want_used),
                        "{:?} budget {budget}",
                        wire.escape_ascii()
                    );
                }
            }
        }
    }

    #[test]
    fn round_trip_every_short_content() {
        // Every content of up to 6 bytes over the interesting alphabet survives
        // encode-then-decode, whole and byte by byte.
        let alphabet = [b'.', b'\r', b'\n', b'x'];
        for len in 0..=6u32 {
            for mut n in 0..4usize.pow(len) {
                let mut content = Vec::new();
                for _ in 0..len {
                    content.extend(alphabet.get(n % 4));
                    n /= 4;
                }
                let mut wire = Vec::new();
                encode_body(&content, &mut wire);
                assert_eq!(decode_all(&wire), Some((content.clone(), wire.len())), "{:?}", content.escape_ascii());
                assert_eq!(decode_bytewise(&wire), Some((content.clone(), wire.len())));
            }
        }
    }
}
