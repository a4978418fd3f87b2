//! Replays the fuzz seeds and every saved fuzz finding (`fuzz/seeds/`, `fuzz/regressions/`)
//! through the same checks the fuzz targets make, so a fixed crash stays fixed without a
//! fuzzer installed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use outrigger::proxy::framing::Framing;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(
                entries
                    .map(|e| e.unwrap().path())
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.')),
            );
        }
    }
    files
}

#[test]
fn framing_verdicts_do_not_depend_on_how_bytes_are_split() {
    let files = inputs("framing");
    assert!(files.len() >= 30, "seeded from tests/smuggling");
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let Some((_, bytes)) = data.split_first() else {
            continue;
        };
        let whole = Framing::new().feed(bytes);
        for at in 0..=bytes.len() {
            let mut parts = Framing::new();
            let verdict = match parts.feed(&bytes[..at]) {
                (fine, Some(v)) => (fine, Some(v)),
                _ => {
                    let (fine, v) = parts.feed(&bytes[at..]);
                    (at + fine, v)
                }
            };
            assert_eq!(whole, verdict, "{} split at {at}", path.display());
        }
    }
}

#[test]
fn config_inputs_never_panic() {
    for path in inputs("config") {
        let data = std::fs::read(&path).unwrap();
        if let Ok(text) = std::str::from_utf8(&data) {
            let _ = outrigger::control::config::parse("fuzz.yaml", text);
        }
    }
}
