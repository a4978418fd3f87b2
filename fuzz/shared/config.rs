//! The config fuzz target's code, shared with `tests/fuzz_regressions.rs` so that a replayed
//! input runs exactly what the fuzzer ran.

/// Parses and validates one input as a config file. Returns `None` for input that is not UTF-8
/// (never parsed), else whether it was a valid config; any text gets a config or located errors,
/// never a panic.
pub fn run(data: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(data).ok()?;
    Some(outrigger::control::config::parse("fuzz.yaml", text).is_ok())
}
