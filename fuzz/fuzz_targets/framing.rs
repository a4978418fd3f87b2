//! The HTTP/1 framing check on raw downstream bytes: no panic, and the verdict does not depend
//! on how the bytes were split into reads (the first byte picks the split point).
#![no_main]

#[path = "../shared/framing.rs"]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shared::run(data);
});
