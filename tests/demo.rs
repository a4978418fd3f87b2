//! `outrigger demo`, run as a newcomer runs it (shortened): the proxy with the default policies
//! keeps callers at 99% or more while the one with every policy off shows the injected failures,
//! and a pipe gets plain text.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;

/// The success percentage on the summary line of `side`.
fn success(out: &str, side: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(side))
        .unwrap_or_else(|| panic!("no summary line for {side}:\n{out}"));
    let after = line.split("success").nth(1).unwrap();
    after
        .trim_start()
        .split('%')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Both proxies get the same load from the same misbehaving instances: the defaults save the
/// callers (≥ 99% success), the bare proxy passes the injected failures on (at least the 8.3%
/// of 503s and 3.3% of answers that outlast the caller, before the crash adds more).
#[test]
fn the_demo_shows_what_the_defaults_save() {
    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["demo", "--duration", "6s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let (off, on) = (
        success(&text, "policies off:"),
        success(&text, "outrigger defaults:"),
    );
    assert!(on >= 99.0, "the defaults keep callers at 99%: {on}");
    assert!(
        off <= 90.0,
        "the bare proxy shows the injected failures: {off}"
    );
    // Live rows, one per second, then the summary; no colour codes in a pipe.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.matches('%').count() == 2
        })
        .collect();
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert!(text.contains("one instance crashed"));
    assert!(!text.contains('\u{1b}'), "plain text in a pipe");
}
