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
//!    loop, 5 s), and the leader's CPU while doing it (from /proc);
//! 4. how long a lease outlives its last renewal;
//! 5. a fleet of 10,000 simulated sidecars (`OUTRIGGER_FLEET` to change it) for 20 s, each
//!    renewing its registry lease every 10 s and refreshing its share of a mesh-wide rate limit
//!    every second with a demand that wobbles, so shares are reallocated on every tick: the leader's CPU, commit p50/p99 (from its commit histogram), log entries
//!    per second, and the refresh and renewal latency the sidecars see.
//!
//! Run: `cargo build --release && cargo bench --bench mesh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
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

use common::{binary, free_port, Proc};

type Http = Client<HttpConnector, Full<Bytes>>;

/// User + system CPU seconds of `pid` so far.
fn cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
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
    let mut admins = Vec::new();
    for (id, addr) in &members {
        let cfg = dir.path().join(format!("n{id}.yaml"));
        let admin = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        admins.push(admin.clone());
        std::fs::write(
            &cfg,
            format!(
                "admin:\n  address: {admin}\nmesh:\n  node_id: {id}\n  listen: {addr}\n  data_dir: {}\n  members:\n{list}",
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
    let leader_index = members.iter().position(|(_, a)| *a == leader_addr).unwrap();
    let leader_pid = procs[leader_index].0.id();
    let leader_admin = admins[leader_index].clone();
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

    fleet(&register_url, leader_pid, &leader_admin).await;
}

/// The leader's commit histogram: (upper bound in seconds, cumulative count) per bucket.
async fn commit_histogram(admin: &str) -> Vec<(f64, f64)> {
    scrape(admin)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("outrigger_mesh_commit_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
        })
        .collect()
}

/// A percentile from the difference of two cumulative histograms, as the upper bound of the
/// bucket it falls in.
fn bucket_percentile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> f64 {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = diff.last().map_or(0.0, |(_, c)| *c);
    diff.iter()
        .find(|(_, c)| *c >= total * p / 100.0)
        .map_or(f64::NAN, |(le, _)| *le)
}

fn last_log_index(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("outrigger_mesh_last_log_index "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(admin: &str) -> String {
    let h1: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::get(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

/// Phase 5, the fleet: every simulated sidecar registers, then renews every 10 s and refreshes
/// its rate-limit share every second, phases spread evenly, on 32 connections.
async fn fleet(register_url: &str, leader_pid: u32, leader_admin: &str) {
    let clients: u64 = std::env::var("OUTRIGGER_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let secs = 20u64;
    let conns: Vec<Http> = (0..32)
        .map(|_| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector)
        })
        .collect();
    // Registration first (batched by the proposer), as a fleet that has been running.
    let mut set = JoinSet::new();
    for n in 0..clients {
        let (http, url) = (conns[(n % 32) as usize].clone(), register_url.to_owned());
        set.spawn(async move {
            let reg = format!(
                r#"{{"service":"fleet","id":"s{n}","address":"10.1.{}.{}","port":80,"ttl_ms":30000}}"#,
                (n / 250) % 250,
                n % 250
            );
            loop {
                let (status, body, _) = call(&http, &url, reg.clone()).await;
                if status == StatusCode::OK {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    return (n, v["revision"].as_u64().unwrap());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let mut revisions = vec![0; clients as usize];
    while let Some(r) = set.join_next().await {
        let (n, rev) = r.unwrap();
        revisions[n as usize] = rev;
    }
    let renew_url = register_url.replace("/v1/registry/register", "/v1/registry/renew");
    let refresh_url = register_url.replace("/v1/registry/register", "/v1/quota/refresh");

    let refreshes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let renewals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let hist_before = commit_histogram(leader_admin).await;
    let log_before = last_log_index(&scrape(leader_admin).await);
    let cpu_before = cpu(leader_pid);
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let mut set = JoinSet::new();
    for n in 0..clients {
        let http = conns[(n % 32) as usize].clone();
        let (renew_url, refresh_url) = (renew_url.clone(), refresh_url.clone());
        let (refreshes, renewals, failed) = (refreshes.clone(), renewals.clone(), failed.clone());
        let renewal = format!(
            r#"{{"leases":[{{"service":"fleet","id":"s{n}","revision":{}}}]}}"#,
            revisions[n as usize]
        );
        set.spawn(async move {
            // Each sidecar's second starts at its own offset, so the fleet's load is even.
            let offset = Duration::from_micros(n * 1_000_000 / clients);
            let mut holding = 0u64;
            let mut mine = Vec::new();
            let mut renewed = Vec::new();
            let mut k = 0u64;
            loop {
                let due = start + offset + Duration::from_secs(k);
                if due >= until {
                    break;
                }
                tokio::time::sleep_until(due).await;
                // Demand wobbles from second to second (0.5 to 1.5 requests/s), so the leader
                // reallocates on every tick: the heavy case, not the steady one.
                let offered = 0.5 + ((n * 7919 + k * 104_729) % 100) as f64 / 100.0;
                let body = format!(
                    r#"{{"client":"s{n}","holding":{holding},"limits":[{{"name":"fleet","rate":{clients},"offered":{offered}}}],"wait_ms":0}}"#
                );
                let (status, b, _) = call(&http, &refresh_url, body).await;
                if status == StatusCode::OK {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                    holding = v["index"].as_u64().unwrap_or(holding);
                    mine.push(Instant::now() - due);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                if k % 10 == n % 10 {
                    let at = Instant::now();
                    if call(&http, &renew_url, renewal.clone()).await.0 == StatusCode::OK {
                        renewed.push(Instant::now() - at);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                k += 1;
            }
            refreshes.lock().unwrap().extend(mine);
            renewals.lock().unwrap().extend(renewed);
        });
    }
    while set.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_used = cpu(leader_pid) - cpu_before;
    let hist_after = commit_histogram(leader_admin).await;
    let after = scrape(leader_admin).await;
    let entries = last_log_index(&after) - log_before;
    let mut refreshes = refreshes.lock().unwrap().clone();
    let mut renewals = renewals.lock().unwrap().clone();
    refreshes.sort();
    renewals.sort();
    println!(
        "fleet of {clients} sidecars for {secs} s: {} share refreshes ({:.0}/s), {} lease renewals, {} failed",
        refreshes.len(),
        refreshes.len() as f64 / elapsed,
        renewals.len(),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "  leader CPU {:.2} cores; {:.1} log entries/s; commit p50 <= {} ms, p99 <= {} ms (histogram buckets)",
        cpu_used / elapsed,
        entries / elapsed,
        bucket_percentile(&hist_before, &hist_after, 50.0) * 1e3,
        bucket_percentile(&hist_before, &hist_after, 99.0) * 1e3,
    );
    println!(
        "  refresh latency seen by the sidecars p50 {:.2} ms, p99 {:.2} ms; renewal p50 {:.2} ms, p99 {:.2} ms",
        percentile(&refreshes, 50.0).as_secs_f64() * 1e3,
        percentile(&refreshes, 99.0).as_secs_f64() * 1e3,
        percentile(&renewals, 50.0).as_secs_f64() * 1e3,
        percentile(&renewals, 99.0).as_secs_f64() * 1e3,
    );
}
