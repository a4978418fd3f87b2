//! Config parsing and validation: any text gets a config or located errors, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = outrigger::control::config::parse("fuzz.yaml", text);
    }
});
