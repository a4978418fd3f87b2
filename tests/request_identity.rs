//! A request keeps one identity across sidecars: `x-request-id` is made when missing (or
//! replaced on an edge listener), W3C trace context passes untouched, and both reach every
//! sidecar's access log. Two real proxy processes in a chain, curl as the client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Runs curl against `url` with `headers`; returns the body.
async fn curl(url: String, headers: &[&str]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("curl is installed"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn header<'a>(seen: &'a str, name: &str) -> Option<&'a str> {
    seen.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// Access-log lines of `proc` for `route`, once there are `n` of them.
async fn access_lines(proc: &Process, route: &str, n: usize) -> Vec<serde_json::Value> {
    let found = |p: &Process| {
        p.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access" && v["route"] == route)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(20), || async { found(proc).len() >= n }).await,
        "{n} access lines for {route}"
    );
    found(proc)
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && b"89ab".contains(&b[19])
        && s.chars()
            .filter(|c| *c != '-')
            .all(|c| c.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_and_trace_context_follow_the_request_across_sidecars() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    // The inner sidecar keeps callers' ids; the edge sidecar in front of it replaces them.
    let inner_cfg = dir.path().join("inner.yaml");
    std::fs::write(
        &inner_cfg,
        format!(
            "admin:\n  address: 127.0.0.1:0\naccess_log: true\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: inner\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [\"{}\"]\n",
            origin.addr
        ),
    )
    .unwrap();
    let inner = Process::start(&inner_cfg);
    let inner_addr = inner.listener("in").await.unwrap();
    let edge_cfg = dir.path().join("edge.yaml");
    std::fs::write(
        &edge_cfg,
        format!(
            "admin:\n  address: 127.0.0.1:0\naccess_log: true\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    request_id: replace\n    routes:\n      - name: edge\n        cluster: inner\nclusters:\n  - name: inner\n    endpoints: [\"{inner_addr}\"]\n"
        ),
    )
    .unwrap();
    let edge = Process::start(&edge_cfg);
    let edge_addr = edge.listener("in").await.unwrap();

    // Through both: the caller's id is replaced at the edge, the trace context is untouched.
    let seen = curl(
        format!("http://{edge_addr}/headers"),
        &[
            "x-request-id: forged-by-caller",
            &format!("traceparent: {TRACEPARENT}"),
            "tracestate: vendor=opaque",
        ],
    )
    .await;
    let id = header(&seen, "x-request-id").unwrap().to_owned();
    assert!(is_uuid_v4(&id), "a fresh UUID, not the caller's: {seen}");
    assert_eq!(header(&seen, "traceparent"), Some(TRACEPARENT));
    assert_eq!(header(&seen, "tracestate"), Some("vendor=opaque"));
    // Both sidecars log the same id and trace context for it.
    for (proc, route) in [(&edge, "edge"), (&inner, "inner")] {
        let lines = access_lines(proc, route, 1).await;
        assert_eq!(lines[0]["request_id"], id.as_str(), "{route}: {lines:?}");
        assert_eq!(lines[0]["traceparent"], TRACEPARENT, "{route}");
    }

    // Straight to the inner sidecar: a caller's id is kept; a request without one gets one.
    let seen = curl(
        format!("http://{inner_addr}/headers"),
        &["x-request-id: from-the-caller"],
    )
    .await;
    assert_eq!(header(&seen, "x-request-id"), Some("from-the-caller"));
    let seen = curl(format!("http://{inner_addr}/headers"), &[]).await;
    let made = header(&seen, "x-request-id").unwrap();
    assert!(is_uuid_v4(made) && made != id, "{seen}");
    assert!(header(&seen, "traceparent").is_none(), "none is invented");
    let lines = access_lines(&inner, "inner", 3).await;
    assert_eq!(lines[1]["request_id"], "from-the-caller");
    assert_eq!(lines[2]["request_id"], made);
    assert_eq!(lines[2]["traceparent"], "-");
}
