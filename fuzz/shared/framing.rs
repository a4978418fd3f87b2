//! The framing fuzz target's code, shared with `tests/fuzz_regressions.rs` so that a replayed
//! input runs exactly what the fuzzer ran.

use outrigger::proxy::framing::Framing;

/// Checks one input: the first byte picks where the rest is split into two reads, and the verdict
/// on the two reads must be the verdict on the whole. Panics if it is not. Returns whether there
/// was anything to check.
pub fn run(data: &[u8]) -> bool {
    let Some((&split, bytes)) = data.split_first() else {
        return false;
    };
    check_split(bytes, usize::from(split) % (bytes.len() + 1));
    true
}

/// The verdict on `bytes` fed whole equals the verdict on `bytes` fed in two reads split at `at`.
pub fn check_split(bytes: &[u8], at: usize) {
    let whole = Framing::new().feed(bytes);
    let mut parts = Framing::new();
    let split_verdict = match parts.feed(&bytes[..at]) {
        (fine, Some(v)) => (fine, Some(v)),
        _ => {
            let (fine, v) = parts.feed(&bytes[at..]);
            (at + fine, v)
        }
    };
    assert_eq!(whole, split_verdict, "split at {at}");
}
