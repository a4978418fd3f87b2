//! The malformed-request corpus in `tests/smuggling/`: each file is sent over a raw socket, must
//! get its documented answer and a closed connection, must not reach the origin more often than
//! it says, and the proxy must serve a good request afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Case {
    name: String,
    expect: Vec<u16>,
    upstream: (usize, usize),
    /// Shut the sending side once the bytes are written.
    half_close: bool,
    bytes: Vec<u8>,
}

fn parse(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap();
    let (mut expect, mut upstream, mut half_close) = (None, None, false);
    let mut body = String::new();
    for line in text.lines() {
        if let Some(field) = line.strip_prefix("# ") {
            if let Some(v) = field.strip_prefix("expect: ") {
                expect = Some(v.split(' ').map(|s| s.parse().unwrap()).collect());
            } else if let Some(v) = field.strip_prefix("upstream: ") {
                upstream = Some(match v.split_once("..") {
                    Some((lo, hi)) => (lo.parse().unwrap(), hi.parse().unwrap()),
                    None => (v.parse().unwrap(), v.parse().unwrap()),
                });
            } else if let Some(v) = field.strip_prefix("half_close: ") {
                half_close = v.parse().unwrap();
            }
        } else {
            body.push_str(line);
        }
    }
    Case {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        expect: expect.expect("an `# expect:` line"),
        upstream: upstream.expect("an `# upstream:` line"),
        half_close,
        bytes: unescape(&body),
    }
}

fn unescape(s: &str) -> Vec<u8> {
    let (mut out, b) = (Vec::new(), s.as_bytes());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                other => panic!("unknown escape \\{}", other as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Status codes of the responses in `raw`, in order: each head is parsed and its
/// `content-length` body skipped.
fn statuses(mut raw: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let Some(code) = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3)?.parse().ok())
        else {
            break;
        };
        out.push(code);
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        raw = &raw[(end + 4 + len).min(raw.len())..];
    }
    out
}

#[tokio::test]
async fn every_malformed_request_gets_its_documented_answer() {
    let origin = Origin::start("app").await;
    let proxy = Proxy::start(&one_listener(
        "    header_read_timeout: 300ms\n    max_headers: 20\n    max_header_bytes: 8192\n",
        "      - name: limited\n        match: { prefix: /limited }\n        max_request_body_bytes: 1000\n        cluster: app\n",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smuggling");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} cases", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let case = parse(path);
        let hits = origin.hits();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&case.bytes).await.unwrap();
        if case.half_close {
            stream.shutdown().await.unwrap();
        }
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        let closed = matches!(read, Ok(Ok(_)));
        let got = statuses(&answer);
        // The origin counts a request when its handler starts; give a relayed one a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reached = origin.hits() - hits;
        let mut problems = Vec::new();
        if got != case.expect {
            problems.push(format!("statuses {got:?}, expected {:?}", case.expect));
        }
        if !closed {
            problems.push("the connection was not closed".into());
        }
        if reached < case.upstream.0 || reached > case.upstream.1 {
            problems.push(format!(
                "reached the origin {reached} times, expected {:?}",
                case.upstream
            ));
        }
        // A good request on a new connection succeeds: the process is up and unharmed.
        let (status, _, _) = get(&h1_client(), &proxy.url("in", "/after")).await.unwrap();
        if status != 200 {
            problems.push(format!("the next good request got {status}"));
        }
        eprintln!(
            "{:<36} {:?} closed={closed} upstream={reached}",
            case.name, got
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  answer: {:?}",
                case.name,
                problems.join("; "),
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let metrics = scrape(&proxy).await;
    assert!(
        metric(
            &metrics,
            "outrigger_requests_refused_total{listener=\"in\",reason=\"malformed\"}"
        ) >= 20.0
    );
    assert_eq!(
        metric(
            &metrics,
            "outrigger_requests_refused_total{listener=\"in\",reason=\"header_timeout\"}"
        ),
        1.0
    );
}
