//! The incoming side: bytes in, [`Event`]s out, frame first and parse second.
//!
//! ```text
//!  feed(&[u8]) ──► buffer ──► framing ──┬─ VERSION line ─► header lines ─► "." ─► Event::Greeting
//!                                       ├─ record line ──► Record::decode (peer's headers) ─► Event::Record
//!                                       │                    └─ M/A with `stream`: switch to body mode
//!                                       ├─ "." ─► Event::EndOfList      "X…" ─► Event::Done
//!                                       └─ body mode: DotDecoder ─► Event::BodyChunk … Event::BodyEnd
//! ```
//!
//! Lines are bounded by [`DecoderLimits::max_line_len`]; a longer line is an error as soon as
//! that many bytes are buffered without an LF, so a hostile peer cannot make us buffer without
//! end. Bodies are never buffered whole: each [`Decoder::next`] call turns the bytes at hand
//! into at most [`DecoderLimits::max_body_chunk`] bytes of content. Fed in chunks of at most
//! N bytes and drained until `Ok(None)` after each feed, the decoder holds at most N bytes plus
//! one partial line.
//!
//! After any error the decoder is failed for good (Dovecot stops the connection too).

use super::dot::DotDecoder;
use super::error::{Inside, Limited, LineNo, Misuse, WireError};
use super::escape::c_string;
use super::header::{Headers, parse_version_line};
use super::record::Record;
use super::types::BodyChunk;

/// Hard limits of the [`Decoder`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DecoderLimits {
    /// The longest accepted line in bytes, without its LF. Records are short in practice (the
    /// longest are `B` with many cache fields and `C` with many keywords).
    pub max_line_len: usize,
    /// The most content bytes one [`Event::BodyChunk`] carries.
    pub max_body_chunk: usize,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self { max_line_len: 1 << 20, max_body_chunk: 64 << 10 }
    }
}

/// One thing the peer sent.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// The VERSION line and header block are complete; records follow. The peer's headers
    /// are kept inside the decoder ([`Decoder::peer_headers`]).
    Greeting {
        /// The peer's protocol minor version (features depend on it, e.g. `A` needs ≥ 1).
        minor: u32,
    },
    /// A record. If [`Record::has_body`], body events follow before the next record.
    Record(Record),
    /// A `.` line: the end of the current list.
    EndOfList,
    /// An `X` line: the peer is closing. Everything after it is ignored.
    Done,
    /// A piece of the current body's content (never empty).
    BodyChunk(BodyChunk),
    /// The current body is complete.
    BodyEnd,
}

#[derive(Clone, Debug)]
enum Mode {
    Version,
    Headers {
        minor: u32,
    },
    Lines,
    Body(DotDecoder),
    /// The body's terminator was read together with its last chunk; `BodyEnd` is due.
    BodyEnded,
    Done,
}

/// The incoming half of a dsync connection. See the module documentation.
#[derive(Clone, Debug)]
pub struct Decoder {
    limits: DecoderLimits,
    buf: Vec<u8>,
    pos: usize,
    mode: Mode,
    minor: Option<u32>,
    headers: Headers,
    /// LFs consumed so far: the current line is `lf_count + 1`.
    lf_count: u64,
    eof: bool,
    failed: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder expecting the peer's VERSION line, with default limits.
    pub fn new() -> Self {
        Self::with_limits(DecoderLimits::default())
    }

    /// A decoder with the given limits.
    pub fn with_limits(limits: DecoderLimits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            pos: 0,
            mode: Mode::Version,
            minor: None,
            headers: Headers::empty(),
            lf_count: 0,
            eof: false,
            failed: false,
        }
    }

    /// Hand the decoder bytes received from the peer (any chunking).
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.failed && !matches!(self.mode, Mode::Done) {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Tell the decoder the peer closed its side. Afterwards [`Decoder::next`] reports an
    /// error if the input stopped inside the greeting, a line or a body.
    pub fn feed_eof(&mut self) {
        self.eof = true;
    }

    /// The peer's minor version, once its VERSION line was read.
    pub fn peer_minor(&self) -> Option<u32> {
        self.minor
    }

    /// The peer's headers, once the greeting is complete.
    pub fn peer_headers(&self) -> Option<&Headers> {
        matches!(self.mode, Mode::Lines | Mode::Body(_) | Mode::BodyEnded | Mode::Done).then_some(&self.headers)
    }

    /// True after the peer's `X` line.
    pub fn is_done(&self) -> bool {
        matches!(self.mode, Mode::Done)
    }

    /// True while a body is being read.
    pub fn in_body(&self) -> bool {
        matches!(self.mode, Mode::Body(_) | Mode::BodyEnded)
    }

    /// Bytes fed but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next event, `Ok(None)` when more input is needed (or, after [`Decoder::feed_eof`]
    /// or `X`, when the input ended cleanly).
    #[allow(clippy::should_implement_trait, reason = "not an Iterator: None means 'feed me', not 'finished'")]
    pub fn next(&mut self) -> Result<Option<Event>, WireError> {
        if self.failed {
            return Err(WireError::Misuse(Misuse::DecoderFailed));
        }
        let result = self.step();
        if result.is_err() {
            self.failed = true;
            self.buf = Vec::new();
            self.pos = 0;
        }
        result
    }

    fn step(&mut self) -> Result<Option<Event>, WireError> {
        loop {
            match &mut self.mode {
                Mode::Done => {
                    self.buf.clear();
                    self.pos = 0;
                    return Ok(None);
                }
                Mode::BodyEnded => {
                    self.mode = Mode::Lines;
                    return Ok(Some(Event::BodyEnd));
                }
                Mode::Body(dot) => {
                    let input = self.buf.get(self.pos..).unwrap_or_default();
                    let mut out = Vec::new();
                    let progress = dot.decode(input, &mut out, self.limits.max_body_chunk);
                    let used = input.get(..progress.consumed).unwrap_or_default();
                    self.lf_count += used.iter().filter(|&&b| b == b'\n').count() as u64;
                    self.consume(progress.consumed);
                    if progress.finished {
                        self.mode = if out.is_empty() { Mode::Lines } else { Mode::BodyEnded };
                        return Ok(Some(if out.is_empty() {
                            Event::BodyEnd
                        } else {
                            Event::BodyChunk(BodyChunk::new(out))
                        }));
                    }
                    if !out.is_empty() {
                        return Ok(Some(Event::BodyChunk(BodyChunk::new(out))));
                    }
                    if self.eof {
                        return Err(self.truncated(Inside::Body));
                    }
                    return Ok(None);
                }
                Mode::Version | Mode::Headers { .. } | Mode::Lines => {
                    let line_no = self.lf_count + 1;
                    let Some(line) = self.take_line().map_err(|e| e.at_line(line_no))? else {
                        if self.eof {
                            if !matches!(self.mode, Mode::Lines) {
                                return Err(self.truncated(Inside::Greeting));
                            }
                            if self.buffered() > 0 {
                                return Err(self.truncated(Inside::Line));
                            }
                        }
                        return Ok(None);
                    };
                    if let Some(event) = self.handle_line(&line).map_err(|e| e.at_line(line_no))? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    fn truncated(&self, inside: Inside) -> WireError {
        WireError::Truncated { at: LineNo(Some(self.lf_count + 1)), inside }
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 << 10 && self.pos * 2 >= self.buf.len() {
            // Compact only when the consumed part dominates, so draining stays linear.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Take one complete line (without LF and a CR before it, cut at NUL like Dovecot's C
    /// strings), or `None` if no complete line is buffered.
    fn take_line(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let input = self.buf.get(self.pos..).unwrap_or_default();
        let too_long =
            WireError::LimitExceeded { at: LineNo(None), what: Limited::Line, limit: self.limits.max_line_len };
        let Some(len) = input.iter().position(|&b| b == b'\n') else {
            return if input.len() > self.limits.max_line_len { Err(too_long) } else { Ok(None) };
        };
        if len > self.limits.max_line_len {
            return Err(too_long);
        }
        let mut line = input.get(..len).unwrap_or_default();
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let line = c_string(line.to_vec());
        self.lf_count += 1;
        self.consume(len + 1);
        Ok(Some(line))
    }

    fn handle_line(&mut self, line: &[u8]) -> Result<Option<Event>, WireError> {
        match self.mode {
            Mode::Version => {
                let minor = parse_version_line(line)?;
                self.minor = Some(minor);
                self.mode = Mode::Headers { minor };
                Ok(None)
            }
            Mode::Headers { minor } => {
                if line == b"." {
                    self.headers.check_complete(minor)?;
                    self.mode = Mode::Lines;
                    return Ok(Some(Event::Greeting { minor }));
                }
                self.headers.accept_line(line)?;
                Ok(None)
            }
            _ => {
                if line == b"." {
                    return Ok(Some(Event::EndOfList));
                }
                if line.first() == Some(&b'X') {
                    self.mode = Mode::Done;
                    return Ok(Some(Event::Done));
                }
                let record = Record::decode(line, &self.headers, self.minor.unwrap_or(0))?;
                if record.has_body() {
                    self.mode = Mode::Body(DotDecoder::new());
                }
                Ok(Some(Event::Record(record)))
            }
        }
    }
}
