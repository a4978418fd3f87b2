//! A proxy with several workers behaves as one: the kernel spreads connections over the
//! workers' sockets, every worker enforces the same resilience state, and a reload reaches them
//! all at once. Each test runs the real binary with `--workers 2`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;
use tokio::task::JoinSet;

const WAIT: Duration = Duration::from_secs(30);

fn start(config: &Path, workers: u16) -> Process {
    Process::start_with(Command::new(env!("CARGO_BIN_EXE_outrigger")).args([
        "run",
        "--config",
        config.to_str().unwrap(),
        "--log-format",
        "json",
        "--workers",
        &workers.to_string(),
    ]))
}

async fn metrics(p: &Process) -> String {
    get(&h1_client(), &p.admin_url("/metrics")).await.unwrap().2
}

/// Connections each worker accepted on `listener`.
fn per_worker(text: &str, listener: &str, workers: usize) -> Vec<f64> {
    (1..=workers)
        .map(|w| {
            metric(
                text,
                &format!(
                    "outrigger_worker_connections_total{{listener=\"{listener}\",worker=\"{w}\"}}"
                ),
            )
        })
        .collect()
}

/// `n` GETs at once, each on a connection of its own; their statuses and reasons.
async fn at_once(url: &str, n: usize) -> Vec<(u16, String)> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let url = url.to_owned();
        set.spawn(async move {
            // A client per request: no connection is shared, so each is accepted anew.
            let (status, headers, _) = get(&h1_client(), &url).await.unwrap();
            (status.as_u16(), reason(&headers).to_owned())
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// A cluster's bulkhead is one limit for the process: requests held on one worker's
/// connections fill it for the other worker too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_is_one_limit_across_workers() {
    let origin = Origin::start("slow").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        with_test_admin(&format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: slow
        timeout: 60s
        retry: {{ attempts: 1 }}
clusters:
  - name: slow
    endpoints: [{}]
    bulkhead: {{ max_concurrent: 4, max_pending: 0 }}
",
            origin.addr
        )),
    )
    .unwrap();
    let proxy = start(&path, 2);
    let addr = proxy.listener("in").await.unwrap();
    // Four requests the origin holds take the four slots.
    let mut held = JoinSet::new();
    for _ in 0..4 {
        let url = format!("http://{addr}/delay/60000");
        held.spawn(async move { get(&h1_client(), &url).await });
    }
    let active = "outrigger_bulkhead_active{name=\"slow\",scope=\"cluster\"}";
    assert!(
        eventually(WAIT, || async {
            metric(&metrics(&proxy).await, active) == 4.0
        })
        .await,
        "{}",
        metrics(&proxy).await
    );
    // Sixteen more, each on a new connection, whichever worker accepts it: all refused.
    let answers = at_once(&format!("http://{addr}/fast"), 16).await;
    assert!(
        answers
            .iter()
            .all(|(status, why)| *status == 503 && why == "bulkhead_full"),
        "{answers:?}"
    );
    // Both workers took connections (20 of them: all on one worker has odds of 2 in a million).
    let spread = per_worker(&metrics(&proxy).await, "in", 2);
    assert!(spread.iter().all(|&n| n > 0.0), "{spread:?}");
    assert_eq!(spread.iter().sum::<f64>(), 20.0, "{spread:?}");
    held.abort_all();
}

/// A reload is one switch for every worker: once the admin port reports the new version,
/// every new connection, on either worker, is served by the new routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_worker_at_once() {
    let (old, new) = (Origin::start("old").await, Origin::start("new").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    let config = |target: &str| {
        with_test_admin(&format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: {target}
clusters:
  - name: old
    endpoints: [{}]
  - name: new
    endpoints: [{}]
",
            old.addr, new.addr
        ))
    };
    std::fs::write(&path, config("old")).unwrap();
    let proxy = start(&path, 2);
    let addr = proxy.listener("in").await.unwrap();
    let url = format!("http://{addr}/");
    let who = |url: String| async move {
        let (_, headers, _) = get(&h1_client(), &url).await.unwrap();
        headers["x-origin"].to_str().unwrap().to_owned()
    };
    assert_eq!(who(url.clone()).await, "old");
    write_atomically(&path, &config("new"));
    let version = || async {
        let (_, _, body) = get(&h1_client(), &proxy.admin_url("/config"))
            .await
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"].as_u64()
    };
    assert!(
        eventually(WAIT, || async { version().await == Some(2) }).await,
        "the rewritten file was not applied"
    );
    let before = per_worker(&metrics(&proxy).await, "in", 2);
    let mut set = JoinSet::new();
    for _ in 0..32 {
        set.spawn(who(url.clone()));
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), "new", "a worker served the old routes");
    }
    let after = per_worker(&metrics(&proxy).await, "in", 2);
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "both workers took connections after the reload: {before:?} → {after:?}"
    );
    assert_eq!(old.hits(), 1);
    assert_eq!(new.hits(), 32);
}
