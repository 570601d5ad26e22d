//! Cross-module tests of the wire codec: real Dovecot sessions, known answers, error cases
//! and no-panic properties. Unit tests of single pieces live next to them.

pub(crate) mod captures;
mod known;
mod soup;

use super::{Decoder, DecoderLimits, Encoder, Event, Headers, WireError};

/// A tiny deterministic PRNG (xorshift64*), so property tests are reproducible without a
/// dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % (n.max(1) as u64)) as usize
    }

    pub(crate) fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// How to cut input into `feed` calls.
#[derive(Clone, Copy, Debug)]
pub(super) enum Chunking {
    Whole,
    Bytewise,
    Random(u64),
}

/// Feed `bytes` in the given chunking, draining events after each feed, then signal EOF.
pub(super) fn decode_with(
    bytes: &[u8],
    chunking: Chunking,
    limits: DecoderLimits,
) -> (Result<Vec<Event>, WireError>, Decoder) {
    let mut dec = Decoder::with_limits(limits);
    let mut events = Vec::new();
    let mut rng = Rng::new(match chunking {
        Chunking::Random(seed) => seed,
        _ => 1,
    });
    let mut pos = 0;
    let result = (|| {
        while pos < bytes.len() {
            let n = match chunking {
                Chunking::Whole => bytes.len(),
                Chunking::Bytewise => 1,
                Chunking::Random(_) => 1 + rng.below(40),
            };
            let end = (pos + n).min(bytes.len());
            dec.feed(bytes.get(pos..end).unwrap_or_default());
            pos = end;
            while let Some(event) = dec.next()? {
                events.push(event);
            }
        }
        dec.feed_eof();
        while let Some(event) = dec.next()? {
            events.push(event);
        }
        Ok(events)
    })();
    (result, dec)
}

/// Decode a whole stream that must be valid.
pub(super) fn decode_ok(bytes: &[u8], chunking: Chunking) -> (Vec<Event>, Headers) {
    let (events, dec) = decode_with(bytes, chunking, DecoderLimits::default());
    let events = events.unwrap_or_else(|e| panic!("decoding failed ({chunking:?}): {e}"));
    let headers = dec.peer_headers().cloned().unwrap_or_default();
    (events, headers)
}

/// Encode events again with the given encoder; body chunks are encoded as they came.
pub(super) fn encode_events(events: &[Event], enc: &mut Encoder) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        let r = match event {
            Event::Greeting { .. } => {
                enc.greeting(&mut out);
                Ok(())
            }
            Event::Record(record) => enc.record(record, &mut out),
            Event::EndOfList => enc.end_of_list(&mut out),
            Event::Done => enc.done(&mut out),
            Event::BodyChunk(chunk) => enc.body_chunk(chunk.declassify(), &mut out),
            Event::BodyEnd => enc.body_end(&mut out),
        };
        r.unwrap_or_else(|e| panic!("encoding {event:?} failed: {e}"));
    }
    out
}

/// Merge adjacent body chunks, so event lists compare independently of chunking.
pub(super) fn normalize(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for event in events {
        if let (Some(Event::BodyChunk(prev)), Event::BodyChunk(next)) = (out.last_mut(), &event) {
            let mut bytes = std::mem::take(prev).into_bytes();
            bytes.extend_from_slice(next.declassify());
            *prev = super::BodyChunk::new(bytes);
            continue;
        }
        out.push(event);
    }
    out
}
