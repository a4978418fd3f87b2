//! A check on the tests themselves: no test reads the wall clock or sleeps for long. Timing
//! belongs in paused-time unit tests; an end-to-end test waits for an observable event (a metric,
//! `/clusters`, a log line) with `support::eventually`, never for a fixed time.
//!
//! Every `.rs` file under `tests/` (but `tests/support/`, which implements the waiting, and this
//! file, which names the patterns) is scanned with comments left out, and each of these is
//! reported as `FILE:LINE`:
//! - `Instant::now` and `.elapsed()`;
//! - a `sleep(...)` (tokio's or `std::thread`'s) longer than 100 ms, one in seconds, or one whose
//!   duration is not a literal `Duration::from_millis(N)` (or `_micros`, `_nanos`), since a
//!   computed duration can be anything. A call may span lines.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

/// Longest sleep allowed in a test, in nanoseconds.
const MAX_SLEEP_NS: u128 = 100_000_000;

#[test]
fn no_test_reads_the_clock_or_sleeps_long() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let own = root.join("hygiene.rs");
    files.retain(|f| *f != own && !f.starts_with(root.join("support")));
    files.sort();
    assert!(files.len() >= 10, "found only {files:?}");
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let shown = file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap();
        for (line, what) in violations(&text) {
            problems.push(format!("{}:{line}: {what}", shown.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "tests must wait for events, not time (see the top of tests/hygiene.rs):\n{}",
        problems.join("\n")
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every violation in a Rust source, as (line, description), in order.
fn violations(source: &str) -> Vec<(usize, String)> {
    let code = without_comments(source);
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    for (pattern, what) in [
        (r"\bInstant\s*::\s*now\b", "reads the clock (Instant::now)"),
        (r"\.\s*elapsed\s*\(", "measures elapsed time (.elapsed())"),
    ] {
        for m in regex::Regex::new(pattern).unwrap().find_iter(&code) {
            found.push((line_of(m.start()), what.to_owned()));
        }
    }
    for m in regex::Regex::new(r"\bsleep\s*\(").unwrap().find_iter(&code) {
        let argument = call_argument(&code[m.end()..]);
        if let Some(problem) = sleep_problem(&argument) {
            found.push((line_of(m.start()), problem));
        }
    }
    found.sort();
    found
}

/// What is wrong with a sleep of `argument`, if anything.
fn sleep_problem(argument: &str) -> Option<String> {
    // Without spaces and the trailing commas of a call split over lines.
    let compact: String = argument.chars().filter(|c| !c.is_whitespace()).collect();
    let compact = compact.replace(",)", ")");
    let compact = compact.trim_end_matches(',');
    if compact == "Duration::ZERO" {
        return None;
    }
    let literal = regex::Regex::new(
        r"^(?:(?:std::)?(?:time::)?Duration::)?from_(secs|millis|micros|nanos)\(([0-9][0-9_]*)(?:u64|u32)?\)$",
    )
    .unwrap();
    let Some(c) = literal.captures(compact) else {
        return Some(format!(
            "sleeps for `{compact}`: not a literal duration (wait for an event instead)"
        ));
    };
    let n: u128 = c[2].replace('_', "").parse().unwrap();
    let ns = match &c[1] {
        "secs" => n * 1_000_000_000,
        "millis" => n * 1_000_000,
        "micros" => n * 1_000,
        _ => n,
    };
    (&c[1] == "secs" || ns > MAX_SLEEP_NS)
        .then(|| format!("sleeps for `{compact}`: longer than 100 ms or in seconds"))
}

/// The text between the opening parenthesis already consumed and its matching close.
fn call_argument(after_open: &str) -> String {
    let mut depth = 1;
    for (i, c) in after_open.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return after_open[..i].to_owned();
                }
            }
            _ => {}
        }
    }
    after_open.to_owned()
}

/// `source` with line and block comments replaced by spaces (newlines kept, so line numbers
/// hold). String and character literals are kept, and a `//` inside one is not a comment.
fn without_comments(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if let Some(end) = raw_string_end(&chars, i) {
            out.extend(&chars[i..end]);
            i = end;
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
            out.extend(&chars[start..i]);
        } else if c == '\'' {
            // A character literal ('x', '\n', '\'', '"'), or else a lifetime.
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&j| chars[j] == '\'' && j > i + 2)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            let stop = end.map_or(i + 1, |e| e + 1);
            out.extend(&chars[i..stop]);
            i = stop;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// If a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) starts at `i`, the index just past it.
fn raw_string_end(chars: &[char], i: usize) -> Option<usize> {
    if chars[i] != 'r' {
        return None;
    }
    let before = i.checked_sub(1).map(|j| chars[j]);
    let starts_token = match before {
        None => true,
        Some('b') => i < 2 || !is_ident(chars[i - 2]),
        Some(p) => !is_ident(p),
    };
    if !starts_token {
        return None;
    }
    let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
    let open = i + 1 + hashes;
    if chars.get(open) != Some(&'"') {
        return None;
    }
    let mut j = open + 1;
    while j < chars.len() {
        if chars[j] == '"'
            && chars[j + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(chars.len())
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The check itself: it finds what it must (across lines, in every spelling) and nothing else.
#[test]
fn the_check_finds_injected_violations_and_only_those() {
    let source = r##"
use std::time::Duration;
// A comment may say Instant::now() or sleep(Duration::from_secs(5)): it is not code.
/* Nor is a block: thread::sleep(Duration::from_millis(500)); /* nested */ .elapsed() */
async fn ok() {
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::thread::sleep(Duration::from_millis(20));
    tokio::time::sleep(Duration::ZERO).await;
    let url = "http://localhost//x"; let c = '"'; let l: &'static str = "'";
    let raw = r#"a "quoted" // not a comment"#;
}
async fn bad() {
    let t = tokio::time::Instant::now();
    let took = t.elapsed();
    tokio::time::sleep(
        Duration::from_millis(
            250,
        ),
    )
    .await;
    std::thread::sleep(std::time::Duration::from_secs(1));
    tokio::time::sleep(gap).await;
    tokio::time::sleep(Duration::from_micros(200_000)).await;
    let s = std::time::Instant :: now ();
}
"##;
    let found = violations(source);
    let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [13, 14, 15, 21, 22, 23, 24], "{found:#?}");
    assert!(found[2].1.contains("from_millis(250)"), "{found:#?}");
    assert!(found[4].1.contains("not a literal"), "{found:#?}");
    assert!(violations("sleep(Duration::from_millis(101))").len() == 1);
    assert!(violations("sleep(Duration::from_millis(1_00))").is_empty());
}
