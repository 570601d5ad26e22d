//! Arbitrary bytes, fed to the dsync wire decoder in arbitrary chunks, never panic.
//!
//! The first input byte steers the run: bit 0 puts a valid greeting in front (so the fuzzer
//! reaches record and body decoding at once), the rest picks the body chunk limit and the
//! sequence of feed sizes. Errors are fine; panics, hangs and unbounded memory are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailreplica::dsync::wire::{Decoder, DecoderLimits, Encoder, decode_state};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let mut input = Vec::new();
    if seed & 1 == 1 {
        Encoder::new().greeting(&mut input);
    }
    input.extend_from_slice(rest);

    let limits = DecoderLimits { max_line_len: 4096, max_body_chunk: 1 + usize::from(seed >> 1) % 64 };
    let mut decoder = Decoder::with_limits(limits);
    let mut step = seed;
    let mut pos = 0;
    while pos < input.len() {
        let n = 1 + usize::from(step) % 17;
        step = step.wrapping_mul(31).wrapping_add(7);
        let end = (pos + n).min(input.len());
        decoder.feed(input.get(pos..end).unwrap_or_default());
        pos = end;
        loop {
            match decoder.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.buffered() <= limits.max_line_len + 17);
    }
    decoder.feed_eof();
    while let Ok(Some(_)) = decoder.next() {}

    let _ = decode_state(&String::from_utf8_lossy(rest));
});
