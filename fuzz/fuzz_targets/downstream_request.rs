//! The downstream HTTP/1.1 server on raw bytes, behind the framing check: no panic, and the same
//! requests handed on and the same bytes written back however the input was split into writes
//! (the first byte picks).
#![no_main]

#[path = "../shared/downstream_request.rs"]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shared::run(data);
});
