//! Coordinated active health checks across real sidecar processes: five sidecars (three of them
//! the group's voters), the same twenty endpoints each, one probe per endpoint per interval for
//! the whole fleet; and a killed prober whose endpoint then dies is still detected.
//!
//! Each sidecar's check sends its own `Host` (`s1` … `s5`), so the endpoints, which count every
//! probe by that header, tell who probes what. Intervals are counted in ticks, not read from a
//! clock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::{get, h1_client, member_list, Process, ReservedPort};
use tokio::net::TcpListener;

/// Probes counted per endpoint, by the prober's `Host`.
type Probes = Arc<Mutex<Vec<HashMap<String, u64>>>>;

/// An endpoint that counts probes by `Host`, stopped (its port refusing) when its task ends.
fn endpoint(i: usize, listener: TcpListener, probes: Probes) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    *probes.lock().unwrap()[i].entry(host).or_default() += 1;
                    async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("ok")))) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

fn config(
    dir: &Path,
    n: usize,
    members: &[(u64, String)],
    endpoints: &[SocketAddr],
) -> std::path::PathBuf {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    let mesh = if n <= 3 {
        format!(
            "mesh:\n  node_id: {n}\n  listen: {}\n  data_dir: {}\n  members:\n{}",
            members[n - 1].1,
            dir.join(format!("data{n}")).display(),
            member_list(members)
        )
    } else {
        format!(
            "mesh:\n  role: client\n  members:\n{}",
            member_list(members)
        )
    };
    let path = dir.join(format!("s{n}.yaml"));
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n    health_check: {{ path: /health, host: s{n}, interval: 1s, jitter: 100ms, unhealthy_threshold: 2, healthy_threshold: 1, coordinated: true }}\n{mesh}",
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

/// The health `sidecar` shows for `addr` on `/clusters`.
async fn health(sidecar: &Process, addr: SocketAddr) -> String {
    let body = get(&h1_client(), &sidecar.admin_url("/clusters"))
        .await
        .map(|(_, _, b)| b)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["clusters"][0]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["address"] == addr.to_string()))
        .and_then(|e| e["health"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Probes per endpoint over the next `intervals` check intervals (1 s each, in 100 ms ticks).
async fn count(probes: &Probes, intervals: u32) -> Vec<HashMap<String, u64>> {
    let before = probes.lock().unwrap().clone();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..=intervals * 10 {
        tick.tick().await;
    }
    let after = probes.lock().unwrap().clone();
    after
        .iter()
        .zip(&before)
        .map(|(a, b)| {
            a.iter()
                .map(|(h, n)| (h.clone(), n - b.get(h).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_endpoints_get_one_probe_per_interval_from_five_sidecars_and_a_dead_probers_endpoint_is_still_caught(
) {
    let dir = tempfile::tempdir().unwrap();
    let probes: Probes = Arc::new(Mutex::new(vec![HashMap::new(); 20]));
    let mut endpoints = Vec::new();
    let mut servers = Vec::new();
    for i in 0..20 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        endpoints.push(listener.local_addr().unwrap());
        servers.push(endpoint(i, listener, probes.clone()));
    }
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| {
            (
                i,
                format!("127.0.0.1:{}", ReservedPort::for_the_run("127.0.0.1")),
            )
        })
        .collect();
    let mut sidecars: Vec<Option<Process>> = (1..=5)
        .map(|n| Some(Process::start(&config(dir.path(), n, &members, &endpoints))))
        .collect();

    // Settled: every endpoint is probed by exactly one sidecar over two intervals.
    let mut settled = None;
    for _ in 0..30 {
        let window = count(&probes, 2).await;
        if window.iter().all(|p| p.len() == 1) {
            settled = Some(window);
            break;
        }
    }
    let settled = settled.expect("the fleet never settled on one prober per endpoint");
    let per_sidecar: HashMap<&str, usize> = settled.iter().fold(HashMap::new(), |mut m, p| {
        *m.entry(p.keys().next().unwrap().as_str()).or_default() += 1;
        m
    });
    println!("probers: {per_sidecar:?}");

    let window = count(&probes, 5).await;
    let total: u64 = window.iter().flat_map(|p| p.values()).sum();
    let most = window
        .iter()
        .map(|p| p.values().sum::<u64>())
        .max()
        .unwrap();
    println!(
        "5 sidecars, 20 endpoints, 5 intervals: {total} probes = {:.2} per endpoint per interval (uncoordinated: 5); at most {most} for one endpoint",
        total as f64 / 100.0
    );
    assert!(
        window.iter().all(|p| p.len() == 1),
        "one prober per endpoint: {window:?}"
    );
    assert!(
        most <= 2 * 5 + 1,
        "no endpoint was probed more than about twice per interval"
    );
    for (i, p) in window.iter().enumerate() {
        assert!(!p.is_empty(), "endpoint {i} was not probed: {window:?}");
    }

    // Kill a client sidecar (s4 or s5) that probes something, then one endpoint it probed.
    let (victim_host, victim_endpoint) = (4..=5)
        .find_map(|n| {
            let host = format!("s{n}");
            window
                .iter()
                .position(|p| p.contains_key(&host))
                .map(|i| (n, i))
        })
        .expect("a client sidecar probes at least one of twenty endpoints");
    let mut prober = sidecars[victim_host - 1].take().unwrap();
    prober.child.kill().unwrap();
    prober.child.wait().unwrap();
    servers[victim_endpoint].abort();
    let dead = endpoints[victim_endpoint];
    // Counted in 100 ms ticks until every live sidecar sees it unhealthy; printed, not
    // asserted (the timing is the checker's and the roster's, each tested with paused time).
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ticks = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let mut all = true;
        for s in sidecars.iter().flatten() {
            all &= health(s, dead).await == "unhealthy";
        }
        if all {
            break;
        }
        assert!(ticks < 300, "the dead endpoint was never found unhealthy");
    }
    println!(
        "s{victim_host} (the prober of {dead}) killed, then {dead} stopped: every live sidecar saw it unhealthy after {:.1} s (interval 1 s, unhealthy_threshold 2: the bound is 2 intervals + 2 x 1 s = 4 s)",
        ticks as f64 / 10.0
    );
    // The other endpoints are still probed once per interval by the four left.
    let window = count(&probes, 3).await;
    for (i, p) in window.iter().enumerate() {
        if i != victim_endpoint {
            assert_eq!(p.len(), 1, "endpoint {i}: {p:?}");
        }
    }
}
