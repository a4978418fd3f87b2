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

/// Deadline of every wait: far above what any step takes, even on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// The process's log lines, once the line saying it stopped is among them (the reader thread may
/// still be draining stderr for a moment after the exit).
fn logs_until_stopped(proc: &Process) -> Vec<String> {
    for _ in 0..1500 {
        let logs = proc.logs.lock().unwrap().clone();
        if logs.iter().any(|l| l.contains("outrigger stopped")) {
            return logs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the process never logged its stop: {:#?}",
        proc.logs.lock().unwrap()
    );
}

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

/// SIGTERM: `/ready` turns 503, requests in flight finish (they are held at their origin until
/// the test has seen the drain begin), keep-alive load loses nothing, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_in_flight_request_and_exits_zero() {
    let origin = Origin::start("app").await;
    let held = Origin::start("held").await;
    // The held origin answers nothing until the test lets the requests through.
    held.control
        .capacity
        .set(tokio::sync::Semaphore::new(0))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\ndrain_timeout: 60s\naccess_log: true\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: held\n        match: {{ prefix: /held }}\n        cluster: held\n        timeout: 0s\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n  - name: held\n    endpoints: [{}]\n",
            origin.addr, held.addr
        ),
    )
    .unwrap();
    let mut proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let metrics_url = proc.admin_url("/metrics");

    // Requests that are certainly in flight when the signal arrives...
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let url = format!("http://{addr}/held");
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
                            // Counted, and checked against the access log below.
                            eprintln!("failed: {other:?}");
                            lost.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    let in_flight = "outrigger_bulkhead_active{name=\"held\",scope=\"cluster\"}";
    assert!(
        eventually(WAIT, || async {
            let m = get(&h1_client(), &metrics_url)
                .await
                .map(|r| r.2)
                .unwrap_or_default();
            metric(&m, in_flight) == 16.0 && origin.hits() >= 50
        })
        .await,
        "the held requests are in flight and the load runs"
    );

    proc.signal("TERM");
    let ready_url = proc.admin_url("/ready");
    let draining = eventually(WAIT, || async {
        matches!(
            get(&h1_client(), &ready_url).await,
            Ok((StatusCode::SERVICE_UNAVAILABLE, _, _))
        )
    })
    .await;
    assert!(draining, "/ready answers 503 while draining");
    held.control.capacity.get().unwrap().add_permits(16);

    for r in slow {
        let (status, _, body) = r.await.unwrap().expect("in-flight request completes");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "held GET /held"));
    }
    let logs = proc.logs.clone();
    let exit = tokio::task::spawn_blocking(move || {
        let exit = proc.wait_exit(WAIT);
        drop(proc);
        exit
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // Every fast request the proxy took is in its access log, and each one reached the client.
    let taken = logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["route"] == "all")
        .count() as u64;
    let (ok, lost) = (ok.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    println!("sigterm: exit {exit:?}; {taken} fast requests taken, {ok} answered, {lost} failed");
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exits 0 once drained");
    assert!(ok >= 50, "the load ran");
    assert_eq!(taken, ok, "every request the proxy took was answered");
    assert_eq!(lost, 0, "no request on a load connection failed");
}

/// When `drain_timeout` runs out with a request still in flight (its origin never answers and
/// the route has no timeout), the proxy stops waiting, says so, and exits 0; the request gets no
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_the_wait_for_requests_still_in_flight() {
    // An origin that reads requests and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let received = Arc::new(tokio::sync::Notify::new());
    let notify = received.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut s, _)) = silent.accept().await {
            let notify = notify.clone();
            open.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    notify.notify_one();
                }
            }));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\ndrain_timeout: 1s\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: silent\n        timeout: 0s\n        retry: {{ attempts: 1 }}\nclusters:\n  - name: silent\n    endpoints: [{silent_addr}]\n"
        ),
    )
    .unwrap();
    let mut proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let request = tokio::spawn(async move { get(&h1_client(), &format!("http://{addr}/x")).await });
    tokio::time::timeout(WAIT, received.notified())
        .await
        .expect("the request reaches the origin");

    proc.signal("TERM");
    let exit = tokio::task::spawn_blocking(move || {
        let exit = proc.wait_exit(WAIT);
        (exit, proc)
    })
    .await
    .unwrap();
    let (exit, proc) = exit;
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "the process exits after the drain timeout: {exit:?}, {:#?}",
        proc.logs.lock().unwrap()
    );
    let answer = tokio::time::timeout(WAIT, request)
        .await
        .expect("the client learns the connection ended")
        .unwrap();
    assert!(answer.is_err(), "no answer came: {answer:?}");

    let logs = logs_until_stopped(&proc);
    let position = |message: &str| {
        logs.iter()
            .position(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["message"] == message)
            })
            .unwrap_or_else(|| panic!("no `{message}` in {logs:#?}"))
    };
    let (draining, gave_up, stopped) = (
        position("draining"),
        position("drain timeout reached with connections still open"),
        position("outrigger stopped"),
    );
    assert!(draining < gave_up && gave_up < stopped, "{logs:#?}");
    let gave_up: serde_json::Value = serde_json::from_str(&logs[gave_up]).unwrap();
    assert!(gave_up["left"].as_u64() >= Some(1), "{gave_up}");
    let stopped: serde_json::Value = serde_json::from_str(&logs[stopped]).unwrap();
    assert_eq!(stopped["drained"], false, "{stopped}");
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
    let reloaded = eventually(WAIT, || async {
        let m = get(&h1_client(), &metrics_url)
            .await
            .map(|r| r.2)
            .unwrap_or_default();
        m.contains("outrigger_config_reloads_total{result=\"success\"} 1")
    })
    .await;
    let mut proc = proc;
    assert!(
        reloaded,
        "SIGHUP forces a reload; process exit: {:?}; logs: {:#?}",
        proc.child.try_wait(),
        proc.logs.lock().unwrap()
    );
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
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proc.child.id()))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    let workers = names
        .iter()
        .filter(|n| n.starts_with("outrigger-w"))
        .count();
    assert_eq!(workers, 1, "one worker thread: {names:?}");
    // The control side has its own single thread: no multi-threaded pool besides the worker.
    assert!(
        !names.iter().any(|n| n.starts_with("tokio-rt-worker")),
        "{names:?}"
    );

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

/// Names of the tasks the process reported as started and ended (debug logs of `tasks.rs`), in
/// log order, and the position of the last line.
fn task_events(logs: &[String]) -> Vec<(String, String)> {
    logs.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let what = v["message"].as_str()?.to_owned();
            let task = v["task"].as_str()?.to_owned();
            what.starts_with("task ").then_some((what, task))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_background_task_before_the_process_exits() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("test ca");
    let (cert, key) = pki::write_leaf(dir.path(), "server", &ca.leaf(&["127.0.0.1"]));
    // A DNS server that never answers: the DNS source keeps retrying until it is stopped.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\ndrain_timeout: 2s\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {} }}\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n    health_check: {{ protocol: tcp, interval: 50ms, timeout: 50ms, jitter: 0s }}\n  - name: names\n    dns: {{ name: app.test.internal, port: 80, resolver: \"{}\", min_refresh: 50ms }}\n",
            cert.display(),
            key.display(),
            origin.addr,
            silent.local_addr().unwrap(),
        ),
    )
    .unwrap();
    let mut proc = Process::start_with(
        Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info,outrigger::tasks=debug"),
    );
    // Let the health check pass once and the admin server take a connection.
    let health = proc.admin_url("/metrics");
    let checked = eventually(WAIT, || async {
        let m = get(&h1_client(), &health)
            .await
            .map(|r| r.2)
            .unwrap_or_default();
        m.contains("outrigger_health_checks_total{cluster=\"app\",result=\"passed\"}")
    })
    .await;
    assert!(checked, "the health check ran");

    proc.signal("TERM");
    assert_eq!(proc.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    let logs = logs_until_stopped(&proc);
    let events = task_events(&logs);
    let started: Vec<&str> = events
        .iter()
        .filter(|(w, _)| w == "task started")
        .map(|(_, t)| t.as_str())
        .collect();
    for kind in [
        "admin",
        "admin_connection",
        "config_watch",
        "tls_watch",
        "discovery",
        "health_supervisor",
        "health_check",
        "cluster_follow",
    ] {
        assert!(
            started.contains(&kind),
            "no `{kind}` task started: {events:?}"
        );
    }
    for kind in started.iter().collect::<std::collections::BTreeSet<_>>() {
        let count = |what: &str| {
            events
                .iter()
                .filter(|(w, t)| w == what && t == *kind)
                .count()
        };
        assert_eq!(
            count("task started"),
            count("task ended"),
            "every `{kind}` task ended: {events:?}"
        );
    }
    let stopped = logs
        .iter()
        .position(|l| l.contains("outrigger stopped"))
        .expect("the process logs its stop");
    let last_end = logs
        .iter()
        .rposition(|l| l.contains("\"task ended\""))
        .unwrap();
    assert!(
        last_end < stopped,
        "tasks end before the process says it stopped"
    );
    let summaries: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "background tasks ended")
        .collect();
    assert_eq!(summaries.len(), 2, "control, then admin: {summaries:?}");
    assert_eq!(summaries[0]["group"], "control");
    assert_eq!(summaries[1]["group"], "admin");
    assert!(summaries.iter().all(|s| s["left"] == 0), "{summaries:?}");
}

/// Every answer the proxy gives is one access-log line and one count in
/// `outrigger_requests_total`, its own refusals included: no route, a rate limit, an open circuit,
/// a forbidden identity-free route and a refused request form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_are_logged_and_counted_like_relayed_answers() {
    let origin = Origin::start("app").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\naccess_log: true\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: limited\n        match: {{ prefix: /limited }}\n        cluster: app\n        rate_limit: {{ requests_per_second: 0.1, burst: 1 }}\n      - name: broken\n        match: {{ prefix: /broken }}\n        cluster: dead\n        retry: {{ attempts: 1 }}\n      - name: app\n        match: {{ prefix: /app }}\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n  - name: dead\n    endpoints: [{dead}]\n    circuit_breaker: {{ consecutive_failures: 2 }}\n    outlier_detection: {{ enabled: false }}\n",
            origin.addr
        ),
    )
    .unwrap();
    let proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let client = h1_client();
    let url = |p: &str| format!("http://{addr}{p}");
    let reason = |h: &http::HeaderMap| {
        h.get("x-outrigger-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (s, h, _) = get(&client, &url("/nowhere")).await.unwrap();
    assert_eq!((s.as_u16(), reason(&h).as_str()), (404, "no_route"));
    assert_eq!(get(&client, &url("/limited")).await.unwrap().0, 200);
    let (s, h, _) = get(&client, &url("/limited")).await.unwrap();
    assert_eq!((s.as_u16(), reason(&h).as_str()), (429, "rate_limited"));
    let mut broken = Vec::new();
    for _ in 0..3 {
        let (s, h, _) = get(&client, &url("/broken")).await.unwrap();
        broken.push((s.as_u16(), reason(&h)));
    }
    assert_eq!(broken[2], (503, "circuit_open".to_owned()), "{broken:?}");
    assert_eq!(get(&client, &url("/app")).await.unwrap().0, 200);

    let m = get(&client, &proc.admin_url("/metrics")).await.unwrap().2;
    for (series, n) in [
        (
            "{class=\"4xx\",cluster=\"-\",listener=\"in\",route=\"-\"}",
            1.0,
        ),
        (
            "{class=\"2xx\",cluster=\"app\",listener=\"in\",route=\"limited\"}",
            1.0,
        ),
        (
            "{class=\"4xx\",cluster=\"app\",listener=\"in\",route=\"limited\"}",
            1.0,
        ),
        (
            "{class=\"5xx\",cluster=\"dead\",listener=\"in\",route=\"broken\"}",
            3.0,
        ),
        (
            "{class=\"2xx\",cluster=\"app\",listener=\"in\",route=\"app\"}",
            1.0,
        ),
    ] {
        assert_eq!(
            metric(&m, &format!("outrigger_requests_total{series}")),
            n,
            "{series}"
        );
    }
    // Every answer has its access line, with the route, cluster and reason.
    let access = |route: &str, status: u64, why: &str| {
        let logs = proc.logs.lock().unwrap().clone();
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["target"] == "access"
                    && v["route"] == route
                    && v["status"] == status
                    && v["reason"] == why
            })
            .count()
    };
    let logged = eventually(WAIT, || async {
        access("-", 404, "no_route") == 1
            && access("limited", 429, "rate_limited") == 1
            && access("limited", 200, "-") == 1
            && access("broken", 503, "circuit_open") >= 1
            && access("broken", 503, "upstream_connect") >= 1
            && access("app", 200, "-") == 1
    })
    .await;
    assert!(logged, "{:#?}", proc.logs.lock().unwrap());
}

/// A draining TCP listener closes its quiet connections instead of holding the drain to its
/// timeout; a connection in the middle of an exchange finishes it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_drain_once_quiet() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (echo, _task) = tcp_echo().await;
    let proxy = Proxy::start(&format!(
        "drain_timeout: 120s\nlisteners:\n  - name: db\n    address: 127.0.0.1:0\n    protocol: tcp\n    cluster: db\nclusters:\n  - name: db\n    endpoints: [\"{echo}\"]\n"
    ))
    .await;
    let addr = proxy.addr("db");
    // Two clients that made an exchange and then fall silent.
    let mut quiet = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        quiet.push(s);
    }
    // The drain ends well inside its two minutes: it reports that everything drained.
    let drained = tokio::time::timeout(Duration::from_secs(30), proxy.app.shutdown())
        .await
        .expect("quiet TCP connections do not hold the drain to its timeout");
    assert!(drained);
    for mut s in quiet {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed without a byte: {rest:?}");
    }
}

/// Connections that race the listener's close at SIGTERM are served or refused, never reset.
/// Closing a listening socket resets the connections the kernel completed but the process never
/// accepted; the listener stops new handshakes first and serves the rest. Clients open a fresh
/// connection per request, so connects are in flight at the moment the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_racing_the_listeners_close_are_served_or_refused_never_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &origin, "5s");
    let mut proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load: Vec<_> = (0..32)
        .map(|_| {
            let (stop, ok, refused, failures) =
                (stop.clone(), ok.clone(), refused.clone(), failures.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        break;
                    };
                    let mut answer = Vec::new();
                    let sent = async {
                        s.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                            .await?;
                        s.read_to_end(&mut answer).await
                    }
                    .await;
                    match sent {
                        Ok(_) if answer.starts_with(b"HTTP/1.1 200") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("{other:?}: {:?}", String::from_utf8_lossy(&answer))),
                    }
                }
            })
        })
        .collect();
    assert!(eventually(WAIT, || async { origin.hits() >= 200 }).await);
    proc.signal("TERM");
    let exit = tokio::task::spawn_blocking(move || proc.wait_exit(WAIT))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    println!("close race: {ok} answered, {refused} refused");
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exits 0 once drained");
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "no connection was reset"
    );
    assert_eq!(refused, 32, "every client ends on a refused connect");
}

/// `outrigger probe`, the image's HEALTHCHECK: it finds the admin server from the config (a
/// wildcard address is asked on loopback), exits 0 with the status line while the proxy is
/// ready, and 1 with the reason when the answer is not a 200 or nobody answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_readiness_for_container_health_checks() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let port = ReservedPort::for_the_run("127.0.0.1");
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 0.0.0.0:{port}\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{}]\n",
            origin.addr
        ),
    )
    .unwrap();
    let probe = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .arg("probe")
            .args(args)
            .env("OUTRIGGER_CONFIG", &path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let mut proc = Process::start(&path);
    assert_eq!(proc.admin.port(), port);
    assert_eq!(probe(&[]), (Some(0), "HTTP/1.1 200 OK".to_owned()));
    assert_eq!(
        probe(&["--path", "/nowhere"]),
        (Some(1), "HTTP/1.1 404 Not Found".to_owned())
    );
    proc.signal("KILL");
    proc.wait_exit(WAIT);
    let (code, said) = probe(&[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.starts_with(&format!("probe: http://127.0.0.1:{port}/ready: ")),
        "{said}"
    );
    // A config that cannot be read is said, not guessed around.
    std::fs::write(&path, "listeners: [").unwrap();
    let (code, said) = probe(&[]);
    assert_eq!(code, Some(1));
    assert!(said.contains("pass --admin"), "{said}");
}

/// The `GLIBC_TUNABLES` the running process has, read as an operator would, from `/proc`.
fn tunables_of(proc: &Process) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{}/environ", proc.child.id())).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("GLIBC_TUNABLES=").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_raises_glibcs_thread_cache_unless_the_operator_tuned_glibc() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &origin, "1s");
    let run = |tunables: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrigger"));
        cmd.args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .env_remove("GLIBC_TUNABLES");
        if let Some(t) = tunables {
            cmd.env("GLIBC_TUNABLES", t);
        }
        Process::start_with(&mut cmd)
    };

    // Run again in place: the same process, serving, with the cache raised.
    let tuned = run(None);
    assert_eq!(
        tunables_of(&tuned).as_deref(),
        Some("glibc.malloc.tcache_count=256")
    );
    let addr = tuned.listener("in").await.unwrap();
    let (status, _, _) = get(&h1_client(), &format!("http://{addr}/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // An operator's own setting, even an empty one, is left as it is.
    for own in ["glibc.malloc.arena_max=2", ""] {
        let untouched = run(Some(own));
        assert_eq!(tunables_of(&untouched).as_deref(), Some(own));
    }
}
