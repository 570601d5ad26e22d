//! Arbitrary records after a valid greeting and handshake, fed to a brain (slave or master,
//! picked by the first byte) on the in-memory store: it may fail, but never panic, hang, or
//! grow without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailreplica::dsync::wire::{Encoder, Handshake, Record, Text};
use mailreplica::store::memory::MemoryStore;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let mut input = Vec::new();
    let mut enc = Encoder::new();
    enc.greeting(&mut input);
    let hello = Handshake {
        hostname: Text::try_from("peer").unwrap_or_default(),
        hashed_headers: Some(vec![]),
        send_mail_requests: seed & 2 != 0,
        backup_recv: seed & 4 != 0,
        ..Default::default()
    };
    let _ = enc.record(&Record::from(hello), &mut input);
    input.extend_from_slice(rest);
    let mut store = MemoryStore::new();
    let _ = mailreplica::dsync::server::run_on_fixed_input(&mut store, &input, seed & 1 == 1, 0);
});
