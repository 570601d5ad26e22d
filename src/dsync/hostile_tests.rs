//! A brain on the in-memory store fed hostile input, deterministically: the corpus of the
//! `brain` fuzz target (every recorded Dovecot stream, in both roles) plus thousands of
//! mutations of it with a fixed seed. Any panic aborts the test binary; any hang fails the
//! session (the fixed input has no more to give); every run must end in an `Ok` or an error.

use super::server::run_on_fixed_input;
use super::wire::tests::Rng;
use super::wire::tests::captures::all_directions;
use crate::store::memory::MemoryStore;

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            break;
        }
        let at = rng.below(v.len());
        match rng.below(7) {
            0 => v[at] = rng.next_u64() as u8,
            1 => v.truncate(at),
            2 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                // Repeat a stretch: duplicated records, lists that never end.
                let end = (at + 1 + rng.below(200)).min(v.len());
                let piece = v[at..end].to_vec();
                for _ in 0..1 + rng.below(50) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            4 => {
                let digits = format!("{}", [0u64, 1, 4294967294, 4294967295, u64::MAX][rng.below(5)]);
                v.splice(at..at, digits.bytes());
            }
            5 => v.insert(at, [b'\t', b'\n', b'.', 1, 2][rng.below(5)]),
            _ => {
                let other = (at + rng.below(300)).min(v.len() - 1);
                v.swap(at, other);
            }
        }
    }
    v
}

#[test]
fn recorded_streams_and_their_mutations_never_panic_or_hang() {
    let corpus: Vec<Vec<u8>> = all_directions().into_iter().map(|d| d.bytes).collect();
    let mut rng = Rng::new(0x5eed_b4a1);
    let mut ok = 0;
    let mut runs = 0;
    for round in 0..3000 {
        let base = &corpus[round % corpus.len()];
        let input = if round < corpus.len() * 2 { base.clone() } else { mutate(&mut rng, base) };
        let master = round % 2 == 1;
        let mut store = MemoryStore::new();
        let (result, _) = run_on_fixed_input(&mut store, &input, master, 0);
        runs += 1;
        if result.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(runs, 3000);
    // The unmutated master streams are complete sessions for a slave.
    assert!(ok > 0, "not one session completed");
}
