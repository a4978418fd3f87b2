//! What shared failure hints save the fleet when an endpoint dies.
//!
//! Five sidecars (three of them the mesh group's voters, two `role: client`), each with the same
//! cluster of four endpoints (real `python3 -m http.server` processes) and the same open-loop
//! load. One endpoint is killed with `kill -9`; from then on every try any sidecar sends to it
//! fails. The benchmark counts those failed tries across the fleet
//! (`outrigger_upstream_connect_errors_total`, summed over the sidecars) for 5 s after the kill,
//! once with `failure_hints: true` and once with `false`, each on a fresh group, and prints both.
//!
//! Run: `cargo build --release && cargo bench --bench hints` (or set `OUTRIGGER_BIN`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;

use common::{binary, free_port, Proc};

type Http = Client<HttpConnector, Empty<Bytes>>;

fn python_origin(port: u16, dir: &Path) -> Proc {
    let script = "import http.server as h, sys\n\
                  h.ThreadingHTTPServer.request_queue_size = 256\n\
                  h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')";
    Proc(
        Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    )
}

async fn get(http: &Http, url: &str) -> Option<(u16, String)> {
    let resp = http
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One run: returns the failed tries to the killed endpoint across the fleet, the requests the
/// callers saw fail, and the hints the fleet acted on.
async fn run(hints: bool) -> (f64, u64, f64) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello\n").unwrap();
    let ports: Vec<u16> = (0..4).map(|_| free_port("127.0.0.1")).collect();
    let mut origins: Vec<Option<Proc>> = ports
        .iter()
        .map(|p| Some(python_origin(*p, dir.path())))
        .collect();
    let endpoints: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| (i, format!("127.0.0.1:{}", free_port("127.0.0.1"))))
        .collect();
    let list: String = members
        .iter()
        .map(|(i, a)| format!("    {i}: {a}\n"))
        .collect();
    let mut sidecars = Vec::new();
    let mut urls = Vec::new();
    let mut admins = Vec::new();
    for n in 1..=5u64 {
        let (admin, listen) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        let mesh = if n <= 3 {
            format!(
                "mesh:\n  node_id: {n}\n  listen: {}\n  data_dir: {}\n  failure_hints: {hints}\n  members:\n{list}",
                members[n as usize - 1].1,
                dir.path().join(format!("data{n}")).display()
            )
        } else {
            format!("mesh:\n  role: client\n  failure_hints: {hints}\n  members:\n{list}")
        };
        let cfg = dir.path().join(format!("s{n}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "admin:\n  address: 127.0.0.1:{admin}\nlisteners:\n  - name: in\n    address: 127.0.0.1:{listen}\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n{mesh}",
                endpoints.join(", ")
            ),
        )
        .unwrap();
        sidecars.push(Proc(
            Command::new(binary())
                .args(["run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        urls.push(format!("http://127.0.0.1:{listen}/"));
        admins.push(format!("http://127.0.0.1:{admin}/metrics"));
    }
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    // Every endpoint listening (a refusal while one starts would be a hint of its own).
    for p in &ports {
        while tokio::net::TcpStream::connect(("127.0.0.1", *p))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every sidecar serving, and the group formed (its leader answers the sidecars' refreshes).
    for u in urls.iter().chain(&admins) {
        while get(&http, u).await.map_or(true, |(s, _)| s != 200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    while {
        let mut refreshed = true;
        for a in &admins {
            let text = get(&http, a).await.map(|(_, t)| t).unwrap_or_default();
            refreshed &= metric(
                &text,
                "outrigger_mesh_rate_limit_refreshes_total{result=\"ok\"}",
            ) > 0.0
                || !hints;
        }
        !refreshed
    } {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same load on every sidecar: 40 requests/s each, open loop.
    let (rate, warm, after) = (40u64, Duration::from_secs(2), Duration::from_secs(5));
    let start = Instant::now();
    let kill_at = start + warm;
    let end = kill_at + after;
    let mut load = JoinSet::new();
    for url in &urls {
        let (http, url) = (http.clone(), url.clone());
        load.spawn(async move {
            let mut failed = 0u64;
            let mut sent = JoinSet::new();
            let mut k = 0;
            loop {
                let due = start + Duration::from_micros(k * 1_000_000 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let (http, url) = (http.clone(), url.clone());
                sent.spawn(async move { get(&http, &url).await.is_some_and(|(s, _)| s == 200) });
                k += 1;
            }
            while let Some(ok) = sent.join_next().await {
                failed += u64::from(!ok.unwrap());
            }
            failed
        });
    }
    tokio::time::sleep_until(kill_at).await;
    let scrape = |admins: Vec<String>, http: Http| async move {
        let mut errors = 0.0;
        let mut acted = 0.0;
        for a in &admins {
            let text = get(&http, a).await.map(|(_, t)| t).unwrap_or_default();
            errors += metric(
                &text,
                "outrigger_upstream_connect_errors_total{cluster=\"app\"}",
            );
            acted += metric(&text, "outrigger_failure_hints_total{event=\"acted_on\"}");
        }
        (errors, acted)
    };
    let (before, _) = scrape(admins.clone(), http.clone()).await;
    // kill -9 of one endpoint process.
    if let Some(mut victim) = origins[0].take() {
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
    }
    let mut failed = 0;
    while let Some(f) = load.join_next().await {
        failed += f.unwrap();
    }
    let (after_errors, acted) = scrape(admins.clone(), http.clone()).await;
    drop(origins);
    (after_errors - before, failed, acted)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = 3;
    let mut on = Vec::new();
    let mut off = Vec::new();
    for _ in 0..rounds {
        off.push(run(false).await);
        on.push(run(true).await);
    }
    let show = |name: &str, v: &[(f64, u64, f64)]| {
        for (tries, failed, acted) in v {
            println!(
                "hints {name}: {tries:.0} failed tries to the killed endpoint across 5 sidecars, {failed} requests failed at the callers, {acted:.0} hints acted on"
            );
        }
    };
    show("off", &off);
    show("on", &on);
    let mean = |v: &[(f64, u64, f64)]| v.iter().map(|r| r.0).sum::<f64>() / v.len() as f64;
    println!(
        "failed tries to the killed endpoint, mean of {rounds}: {:.1} with hints off, {:.1} with hints on ({:.1}x fewer)",
        mean(&off),
        mean(&on),
        mean(&off) / mean(&on).max(1.0)
    );
}
