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

/// The verdict on `bytes` fed whole equals the verdict on `bytes` fed in two reads split at `at`,
/// and the verdict on `bytes` fed one byte at a time, which never takes the check's paths for
/// whole lines: those must decide exactly as the byte-wise one does.
pub fn check_split(bytes: &[u8], at: usize) {
    let mut all = Framing::new();
    let whole = all.feed(bytes);
    let mut single = Framing::new();
    let mut by_byte = (bytes.len(), None);
    for (i, b) in bytes.iter().enumerate() {
        if let (_, Some(v)) = single.feed(std::slice::from_ref(b)) {
            by_byte = (i, Some(v));
            break;
        }
    }
    assert_eq!(whole, by_byte, "one byte at a time");
    if whole.1.is_none() {
        assert_eq!(
            all.in_head(),
            single.in_head(),
            "in a head, one byte at a time"
        );
    }
    assert_eq!(
        all.head_start(),
        single.head_start(),
        "head start, one byte at a time"
    );
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
