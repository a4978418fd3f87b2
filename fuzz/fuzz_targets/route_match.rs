//! Route matching on arbitrary requests (method, target, identity and headers from the input)
//! against a table with every kind of match: no panic, and every request reaches a real route.
#![no_main]

#[path = "../shared/route_match.rs"]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = shared::run(data);
});
