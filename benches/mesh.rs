//! The mesh group's write path and lease renewals, on this machine's disk.
//!
//! Three `outrigger` processes (the release binary: `cargo build --release` first, or set
//! `OUTRIGGER_BIN`) form a group on loopback with their stores in a temp directory on the real
//! disk, so every log append is fsync'd. Against the leader's mesh port (HTTP/2, as sidecars use
//! it) it measures:
//!
//! 1. commit latency of registrations offered open loop at 1,000 writes/s for 5 s: p50, p99, max;
//! 2. write throughput with batching: 256 writers in a closed loop for 5 s;
//! 3. lease renewals per second the leader sustains (one lease per call, 64 connections, closed
//!    loop, 5 s), and the leader's CPU while doing it (from /proc).
//!
//! Run: `cargo build --release && cargo bench --bench mesh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;

type Http = Client<HttpConnector, Full<Bytes>>;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU seconds of `pid` so far.
fn cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("OUTRIGGER_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/outrigger");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release` first",
        p.display()
    );
    p
}

async fn call(http: &Http, url: &str, body: String) -> (StatusCode, Bytes, Option<String>) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let loc = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            (status, b, loc)
        }
        Err(_) => (StatusCode::BAD_GATEWAY, Bytes::new(), None),
    }
}

fn registration(n: u64) -> String {
    format!(
        r#"{{"service":"bench","id":"i{n}","address":"10.0.{}.{}","port":80,"ttl_ms":600000}}"#,
        (n / 250) % 250,
        n % 250
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| {
            let ip = format!("127.0.0.{}", 50 + i);
            (i, format!("{ip}:{}", free_port(&ip)))
        })
        .collect();
    let list: String = members
        .iter()
        .map(|(i, a)| format!("    {i}: {a}\n"))
        .collect();
    let mut procs = Vec::new();
    for (id, addr) in &members {
        let cfg = dir.path().join(format!("n{id}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "admin:\n  address: 127.0.0.1:0\nmesh:\n  node_id: {id}\n  listen: {addr}\n  data_dir: {}\n  members:\n{list}",
                dir.path().join(format!("data{id}")).display()
            ),
        )
        .unwrap();
        let child = Command::new(binary())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.push(Proc(child));
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);

    // Find the leader by following a write's redirect.
    let mut leader_url = None;
    for _ in 0..500 {
        let url = format!("http://{}/v1/registry/register", members[0].1);
        let redirect = match call(&http, &url, registration(0)).await {
            (StatusCode::OK, _, _) => {
                leader_url = Some(url);
                None
            }
            (StatusCode::TEMPORARY_REDIRECT, _, to) => to,
            _ => None,
        };
        if let Some(to) = redirect {
            if call(&http, &to, registration(0)).await.0 == StatusCode::OK {
                leader_url = Some(to);
            }
        }
        if leader_url.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let register_url = leader_url.expect("no leader");
    let leader_addr = register_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let leader_pid = members
        .iter()
        .position(|(_, a)| *a == leader_addr)
        .map(|i| procs[i].0.id())
        .unwrap();
    println!("mesh bench: 3 voters, stores on {}", dir.path().display());

    // 1. Open loop at 1,000 writes/s for 5 s.
    let rate = 1000u64;
    let secs = 5u64;
    let mut set = JoinSet::new();
    let start = Instant::now();
    for n in 0..rate * secs {
        let due = start + Duration::from_micros(n * 1_000_000 / rate);
        tokio::time::sleep_until(due).await;
        let (http, url) = (http.clone(), register_url.clone());
        set.spawn(async move {
            let (status, _, _) = call(&http, &url, registration(1 + n)).await;
            // Measured from when the write was due, so a late start in the generator counts.
            (status, Instant::now() - due)
        });
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        let (status, d) = r.unwrap();
        if status == StatusCode::OK {
            latencies.push(d);
        } else {
            failed += 1;
        }
    }
    latencies.sort();
    println!(
        "commit latency at {rate} writes/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} ok, {failed} failed)",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        latencies.len()
    );

    // 2. Throughput with batching: 256 writers, closed loop.
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(100_000));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut set = JoinSet::new();
    for _ in 0..256 {
        let (http, url, done, next) = (
            http.clone(),
            register_url.clone(),
            done.clone(),
            next.clone(),
        );
        set.spawn(async move {
            while Instant::now() < until {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if call(&http, &url, registration(n)).await.0 == StatusCode::OK {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    println!(
        "write throughput, 256 writers: {:.0} fsync'd writes/s",
        done.load(Ordering::Relaxed) as f64 / secs as f64
    );

    // 3. Renewals: one lease per call against the leader.
    let renew_url = register_url.replace("/register", "/renew");
    let (status, body, _) = call(&http, &register_url, registration(1)).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let renewal = format!(
        r#"{{"leases":[{{"service":"bench","id":"i1","revision":{}}}]}}"#,
        v["revision"]
    );
    let renewed = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu(leader_pid);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut set = JoinSet::new();
    for _ in 0..64 {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // One connection per client, as sidecars have.
        let http: Http = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let (url, body, renewed) = (renew_url.clone(), renewal.clone(), renewed.clone());
        set.spawn(async move {
            while Instant::now() < until {
                if call(&http, &url, body.clone()).await.0 == StatusCode::OK {
                    renewed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let cpu_used = cpu(leader_pid) - cpu_before;
    println!(
        "lease renewals, 64 clients: {:.0}/s; leader CPU {:.2} cores ({:.1} µs per renewal)",
        renewed.load(Ordering::Relaxed) as f64 / secs as f64,
        cpu_used / secs as f64,
        cpu_used * 1e6 / renewed.load(Ordering::Relaxed).max(1) as f64
    );

    // 4. Expiry: an instance renews every TTL/3, as a sidecar does, then stops (a sidecar killed
    // with kill -9 stops the same way). How long after its last renewal does it leave the
    // registry? The design bound is the TTL plus one 100 ms expiry tick plus a commit.
    let ttl = Duration::from_secs(2);
    let read_url = register_url.replace("/register", "/expiry");
    let mut overshoot = Vec::new();
    for round in 0..5u64 {
        let id = format!("exp{round}");
        let reg = format!(
            r#"{{"service":"expiry","id":"{id}","address":"10.9.0.1","port":80,"ttl_ms":{}}}"#,
            ttl.as_millis()
        );
        let (status, body, _) = call(&http, &register_url, reg).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let renewal = format!(
            r#"{{"leases":[{{"service":"expiry","id":"{id}","revision":{}}}]}}"#,
            v["revision"]
        );
        let mut last = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(ttl / 3).await;
            assert_eq!(
                call(&http, &renew_url, renewal.clone()).await.0,
                StatusCode::OK
            );
            last = Instant::now();
        }
        loop {
            let req = Request::get(&read_url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = http.request(req).await.unwrap();
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            let present = v["services"]["expiry"]["instances"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["id"] == id.as_str()));
            if !present {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lived = Instant::now() - last;
        assert!(
            lived >= ttl,
            "a lease expired {lived:?} after its renewal, before its TTL"
        );
        overshoot.push(lived - ttl);
    }
    overshoot.sort();
    println!(
        "lease expiry after the last renewal, TTL {} s, 5 rounds: TTL + {:.0} ms median, TTL + {:.0} ms max",
        ttl.as_secs(),
        percentile(&overshoot, 50.0).as_secs_f64() * 1e3,
        overshoot.last().unwrap().as_secs_f64() * 1e3
    );
}
