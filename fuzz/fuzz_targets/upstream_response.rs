//! The HTTP/1.1 reader of upstream responses on raw bytes: no panic, a body never longer than its
//! input, and the same reading however the bytes were split into reads (the first byte picks).
#![no_main]

#[path = "../shared/upstream_response.rs"]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shared::run(data);
});
