//! Any body content, dot-encoded in arbitrary chunks, decodes to itself, and the decoder
//! consumes exactly the encoded bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailreplica::dsync::wire::{DotDecoder, DotEncoder};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, content)) = data.split_first() else { return };
    let mut wire = Vec::new();
    let mut encoder = DotEncoder::new();
    for piece in content.chunks(1 + usize::from(seed) % 13) {
        encoder.encode(piece, &mut wire);
    }
    encoder.finish(&mut wire);
    wire.extend_from_slice(b"next record\n");

    let mut decoder = DotDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    while !decoder.is_finished() {
        let end = (pos + 1 + usize::from(seed >> 4)).min(wire.len());
        let progress = decoder.decode(wire.get(pos..end).unwrap_or_default(), &mut out, 1 + usize::from(seed) % 7);
        pos += progress.consumed;
        assert!(pos < wire.len(), "terminator not found");
    }
    assert_eq!(out, content);
    assert_eq!(wire.get(pos..), Some(&b"next record\n"[..]));
});
