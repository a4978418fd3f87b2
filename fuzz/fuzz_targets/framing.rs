//! The HTTP/1 framing check on raw downstream bytes: no panic, and the verdict does not depend
//! on how the bytes were split into reads (the first byte picks the split point).
#![no_main]

use outrigger::proxy::framing::Framing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = Framing::new().feed(bytes);
    let at = usize::from(split) % (bytes.len() + 1);
    let mut parts = Framing::new();
    let first = parts.feed(&bytes[..at]);
    let split_verdict = match first {
        (fine, Some(v)) => (fine, Some(v)),
        _ => {
            let (fine, v) = parts.feed(&bytes[at..]);
            (at + fine, v)
        }
    };
    assert_eq!(whole, split_verdict, "split at {at}");
});
