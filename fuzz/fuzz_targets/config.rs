//! Config parsing and validation: any text gets a config or located errors, never a panic.
#![no_main]

#[path = "../shared/config.rs"]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = shared::run(data);
});
