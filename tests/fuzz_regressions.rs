//! Replays the fuzz seeds and every saved fuzz finding (`fuzz/seeds/`, `fuzz/regressions/`)
//! through the code the fuzz targets run (`fuzz/shared/`, compiled into this test too), so a
//! fixed crash stays fixed without a fuzzer installed. A missing or unreadable directory fails,
//! and so does a replay that finds fewer inputs than the seeds committed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "../fuzz/shared/config.rs"]
mod config_target;
#[path = "../fuzz/shared/downstream_request.rs"]
mod downstream_request_target;
#[path = "../fuzz/shared/framing.rs"]
mod framing_target;
#[path = "../fuzz/shared/route_match.rs"]
mod route_match_target;
#[path = "../fuzz/shared/upstream_response.rs"]
mod upstream_response_target;

use std::path::{Path, PathBuf};

/// The files of `fuzz/DIR/TARGET` (dot files such as `.keep` left out). Panics if the directory
/// is missing or cannot be read.
fn files(dir: &str, target: &str) -> Vec<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let entries =
        std::fs::read_dir(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .path()
        })
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

/// Seeds and regressions of `target`, with at least `min_seeds` seeds.
fn inputs(target: &str, min_seeds: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let seeds = files("seeds", target);
    assert!(
        seeds.len() >= min_seeds,
        "fuzz/seeds/{target} holds {} inputs, expected at least {min_seeds}",
        seeds.len()
    );
    seeds
        .into_iter()
        .chain(files("regressions", target))
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The target's check on every input, and on every split point of each input besides the one
/// its first byte picks.
#[test]
fn framing_verdicts_do_not_depend_on_how_bytes_are_split() {
    // Seeded from tests/smuggling: one input per case.
    let inputs = inputs("framing", 41);
    for (path, data) in &inputs {
        // Printed with the failure, if there is one.
        eprintln!("replaying {}", path.display());
        assert!(framing_target::run(data) || data.is_empty());
        if let Some((_, bytes)) = data.split_first() {
            for at in 0..=bytes.len() {
                framing_target::check_split(bytes, at);
            }
        }
    }
}

/// Every input parses without a panic, and the seeds (the shipped example configs) are valid.
#[test]
fn config_inputs_never_panic_and_the_seeds_are_valid() {
    let mut valid = 0;
    for (path, data) in inputs("config", 7) {
        let result = config_target::run(&data);
        if path.parent().unwrap().ends_with("seeds/config") {
            assert_eq!(result, Some(true), "{} is a valid config", path.display());
            valid += 1;
        }
    }
    assert!(valid >= 7);
}

/// Every input reaches a route, and each seed reaches the route it was written for: one seed per
/// kind of match, and one beside it that just misses and falls through to the catch-all.
#[test]
fn route_match_inputs_reach_the_routes_they_were_written_for() {
    let expected = [
        ("api-post", "api"),
        ("api-wrong-method", "rest"),
        ("basic", "api"),
        ("empty", "rest"),
        ("exact", "exact"),
        ("exact-longer-path", "rest"),
        ("garbage", "rest"),
        ("headers", "hdr"),
        ("headers-wrong-value", "rest"),
        ("host-bare-suffix", "rest"),
        ("host-header-with-port", "host"),
        ("host-wildcard", "host"),
        ("identity", "who"),
        ("identity-other-namespace", "rest"),
        ("users-regex", "users"),
        ("users-regex-not-digits", "rest"),
    ];
    let inputs = inputs("route_match", expected.len());
    let mut seen = Vec::new();
    for (path, data) in &inputs {
        let route = route_match_target::run(data);
        let seed = path.parent().unwrap().ends_with("seeds/route_match");
        if seed {
            let want = expected
                .iter()
                .find(|(n, _)| *n == name(path))
                .unwrap_or_else(|| panic!("seed {} has no expected route here", name(path)));
            assert_eq!(route.as_deref(), Some(want.1), "{}", path.display());
            seen.push(name(path));
        }
    }
    for (n, _) in expected {
        assert!(seen.iter().any(|s| s == n), "seed {n} is missing");
    }
}

/// The target's check on every input and every split point, and each seed read as it was
/// written to be: its status, whether it fails, and its body.
#[test]
fn upstream_responses_read_the_same_however_they_arrive() {
    let expected: [(&str, Option<u16>, bool, &[u8]); 14] = [
        ("01-length", Some(200), false, b"hello"),
        ("02-chunked-trailers", Some(200), false, b"hello"),
        ("03-chunked-no-trailers", Some(200), false, b"abc"),
        ("04-interim-100", Some(201), false, b"ok"),
        ("05-head", Some(200), false, b""),
        ("06-no-content", Some(204), false, b""),
        ("07-close-delimited", Some(200), false, b"until the end"),
        ("08-two-lengths", None, true, b""),
        ("09-length-and-chunked", Some(200), false, b"a"),
        ("10-bad-chunk-size", Some(200), true, b""),
        ("11-chunk-without-crlf", Some(200), true, b"ab"),
        ("12-switching", Some(101), false, b""),
        (
            "13-gzip-then-chunked",
            Some(200),
            false,
            b"\x1f\x8b\x08\x00",
        ),
        ("14-not-http", None, true, b""),
    ];
    let inputs = inputs("upstream_response", expected.len());
    for (path, data) in &inputs {
        eprintln!("replaying {}", path.display());
        assert!(upstream_response_target::run(data) || data.is_empty());
        let Some((first, bytes)) = data.split_first() else {
            continue;
        };
        let head = first & 0x80 != 0;
        for at in 0..=bytes.len() {
            upstream_response_target::check_split(bytes, head, at);
        }
        if path.parent().unwrap().ends_with("seeds/upstream_response") {
            let (_, status, failed, body) = expected
                .iter()
                .find(|(n, ..)| *n == name(path))
                .unwrap_or_else(|| panic!("seed {} has no expected reading here", name(path)));
            let got = upstream_response_target::read(&[bytes], head);
            assert_eq!(
                (got.status, got.failed, got.data.as_slice()),
                (*status, *failed, *body),
                "{}",
                path.display()
            );
        }
    }
}

/// The target's check on every input and every split point, and the target's own seeds served
/// as they were written to be: the statuses written back, in order.
#[test]
fn downstream_requests_are_served_the_same_however_they_arrive() {
    let expected: [(&str, &[u16]); 6] = [
        ("50-pipelined", &[200, 200, 200]),
        ("51-expect-continue", &[100, 200]),
        ("52-chunked-trailers-then-next", &[200, 200]),
        ("53-switch", &[101]),
        ("54-http10-keep-alive", &[200, 200]),
        ("55-cut-body", &[200]),
    ];
    let inputs = inputs("downstream_request", 47);
    let mut checked = 0;
    for (path, data) in &inputs {
        eprintln!("replaying {}", path.display());
        assert!(downstream_request_target::run(data) || data.is_empty());
        let Some((_, bytes)) = data.split_first() else {
            continue;
        };
        for at in 0..=bytes.len() {
            downstream_request_target::check_split(bytes, at);
        }
        if let Some((_, statuses)) = expected.iter().find(|(n, _)| *n == name(path)) {
            let served = downstream_request_target::serve(&[bytes]);
            assert_eq!(statuses_of(&served.out), *statuses, "{}", path.display());
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len(), "every expected seed was replayed");
}

/// The status codes of the HTTP/1.1 responses in `out`, in order.
fn statuses_of(out: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(out);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}
