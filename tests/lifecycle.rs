//! The real process: signals (SIGTERM drains, SIGHUP reloads), the environment variable, and a
//! live metrics scrape checked by promtool.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::*;

fn write_config(dir: &std::path::Path, origin: &Origin, drain: &str) -> std::path::PathBuf {
    let path = dir.join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\ndrain_timeout: {drain}\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n",
            origin.addr
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_in_flight_request_and_exits_zero() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Process::start(&write_config(dir.path(), &origin, "5s"));
    let addr = proc.listener("in").await.unwrap();

    // Slow requests that are certainly in flight when the signal arrives...
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let url = format!("http://{addr}/delay/400");
            tokio::spawn(async move { get(&h1_client(), &url).await })
        })
        .collect();
    // ...and keep-alive load that is sending requests at the moment of the signal.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, lost) = (stop.clone(), ok.clone(), lost.clone());
            let url = format!("http://{addr}/fast");
            tokio::spawn(async move {
                let client = h1_client();
                while !stop.load(Ordering::Relaxed) {
                    let req = http::Request::get(&url).body(empty()).unwrap();
                    match client.request(req).await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        // Refused after the listener closed: never in flight, not a loss.
                        Err(e) if e.is_connect() => break,
                        other => {
                            eprintln!("lost: {other:?}");
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            origin.hits() >= 16 + 50
        })
        .await
    );

    let signalled = std::time::Instant::now();
    proc.signal("TERM");
    let ready_url = proc.admin_url("/ready");
    let draining = eventually(Duration::from_secs(2), || async {
        matches!(
            get(&h1_client(), &ready_url).await,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _))
        )
    })
    .await;
    assert!(draining, "/ready answers 503 while draining");

    for r in slow {
        let (status, _, body) = r.await.unwrap().expect("in-flight request completes");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "app delayed 400"));
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = proc.wait_exit(Duration::from_secs(5));
        (s, signalled.elapsed())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (exit, took) = status;
    println!(
        "sigterm: exit {exit:?} after {} ms; {} fast requests ok, {} lost",
        took.as_millis(),
        ok.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed)
    );
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "exits 0 within drain_timeout"
    );
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "no request sent before the close failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_env_var_names_the_config() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &origin, "1s");
    let proc = Process::start_with(
        Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args(["run", "--log-format", "json"])
            .env("OUTRIGGER_CONFIG", &path),
    );
    let addr = proc.listener("in").await.unwrap();
    let (status, _, _) = get(&h1_client(), &format!("http://{addr}/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    proc.signal("HUP");
    let metrics_url = proc.admin_url("/metrics");
    let reloaded = eventually(Duration::from_secs(3), || async {
        let m = get(&h1_client(), &metrics_url)
            .await
            .map(|r| r.2)
            .unwrap_or_default();
        m.contains("outrigger_config_reloads_total{result=\"success\"} 1")
    })
    .await;
    assert!(reloaded, "SIGHUP forces a reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_count_is_set_from_the_command_line_or_environment() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &origin, "1s");
    let proc = Process::start_with(
        Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args([
                "run",
                "--log-format",
                "json",
                "--config",
                path.to_str().unwrap(),
            ])
            .env("OUTRIGGER_WORKERS", "1"),
    );
    let addr = proc.listener("in").await.unwrap();
    let (status, _, _) = get(&h1_client(), &format!("http://{addr}/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let threads = std::fs::read_dir(format!("/proc/{}/task", proc.child.id()))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("tokio-rt-worker"))
        })
        .count();
    assert_eq!(threads, 1, "one runtime worker");

    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["run", "--workers", "0", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_scrape_passes_promtool() {
    let origin = Origin::start("app").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: dead\n        match: {{ prefix: /dead }}\n        cluster: dead\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n  - name: dead\n    endpoints: [{dead}]\n",
        origin.addr
    ))
    .await;
    let client = h1_client();
    for path in ["/a", "/status/404", "/status/500", "/dead"] {
        get(&client, &proxy.url("in", path)).await.unwrap();
    }
    let (status, headers, scrape) = get(&client, &proxy.admin_url("/metrics")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    for family in [
        "outrigger_requests_total",
        "outrigger_request_duration_seconds_bucket",
        "outrigger_upstream_connect_errors_total",
        "outrigger_open_connections",
        "outrigger_config_reloads_total",
        "outrigger_build_info",
    ] {
        assert!(scrape.contains(family), "{family} missing from\n{scrape}");
    }
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}
