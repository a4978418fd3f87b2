//! Hot reload over a real file: rewrites under load lose no request, invalid files and configs
//! that cannot be bound are rejected and counted while the old config serves, every way of
//! replacing a file is noticed, unchanged clusters keep their state, and removed listeners drain.
//!
//! Every wait is for an observable event (a route that serves, a reload counter, `/config`,
//! `/clusters`), with a generous deadline; nothing is timed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadline of every wait: far above what any step takes, even on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

fn route_config(a: &Origin, b: &Origin, generation: usize, extra_listener: bool) -> String {
    // Generation N adds route /gN (to prove it serves) and flips the steady route between a and b.
    let steady = if generation % 2 == 0 { "a" } else { "b" };
    let extra = if extra_listener {
        "  - name: extra\n    address: 127.0.0.1:0\n    routes:\n      - name: extra-all\n        cluster: a\n"
    } else {
        ""
    };
    format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: gen-{generation}
        match: {{ exact: /g{generation} }}
        cluster: a
      - name: steady
        match: {{ prefix: /steady }}
        cluster: {steady}
{extra}clusters:
  - name: a
    endpoints: [{}]
  - name: b
    endpoints: [{}]
",
        a.addr, b.addr
    )
}

/// A counter or gauge of a scrape, as an integer (0 if absent).
fn count(text: &str, series: &str) -> u64 {
    metric(text, series) as u64
}

const SUCCESS: &str = "outrigger_config_reloads_total{result=\"success\"}";
const FAILURE: &str = "outrigger_config_reloads_total{result=\"failure\"}";
const UNCHANGED: &str = "outrigger_config_reloads_total{result=\"unchanged\"}";
const VERSION: &str = "outrigger_config_version";

/// The admin `/config` document.
async fn config_json(proxy: &Proxy) -> serde_json::Value {
    let text = get(&h1_client(), &proxy.admin_url("/config"))
        .await
        .unwrap()
        .2;
    serde_json::from_str(&text).unwrap()
}

/// Steady load while the file is rewritten, in place and by rename, with one invalid version in
/// the middle: no request fails, every valid version is applied and serves, the invalid one is
/// counted. Each rewrite waits for its version to serve and for the load to have sent
/// `OUTRIGGER_SOAK_REQUESTS` more requests (default 100); `OUTRIGGER_SOAK_REWRITES` sets the
/// number of rewrites (default 8; the acceptance run used 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_under_load_fail_no_request() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let rewrites = env("OUTRIGGER_SOAK_REWRITES", 8) as usize;
    let per_rewrite = env("OUTRIGGER_SOAK_REQUESTS", 100);
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Arc::new(Proxy::start(&route_config(&a, &b, 0, false)).await);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let url = proxy.url("in", "/steady");
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                match get(&client, &url).await {
                    Ok((StatusCode::OK, _, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let served_more = |than: u64| {
        let ok = ok.clone();
        async move {
            eventually(WAIT, || async {
                ok.load(Ordering::Relaxed) >= than + per_rewrite
            })
            .await
        }
    };

    let invalid_at = rewrites / 2;
    let client = h1_client();
    let mut version = 1;
    for generation in 1..=rewrites {
        assert!(
            served_more(ok.load(Ordering::Relaxed)).await,
            "the load runs before rewrite {generation}"
        );
        if generation == invalid_at {
            proxy.write_config("listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: missing\n");
            let rejected = eventually(WAIT, || async {
                count(&scrape(&proxy).await, FAILURE) == 1
            })
            .await;
            assert!(rejected, "the invalid file is counted");
            let (status, _, _) = get(&client, &url).await.unwrap();
            assert_eq!(status, StatusCode::OK, "the previous config keeps serving");
            assert_eq!(count(&scrape(&proxy).await, VERSION), version);
            continue;
        }
        let text = route_config(&a, &b, generation, generation % 3 == 1);
        if generation % 2 == 0 {
            proxy.write_config(&text);
        } else {
            // In-place rewrite, as `kubectl cp` or a careless editor does.
            std::fs::write(&proxy.path, with_test_admin(&text)).unwrap();
        }
        version += 1;
        let new_path = format!("/g{generation}");
        let served = eventually(WAIT, || async {
            let Some(addr) = proxy.app.listener_addr("in") else {
                return false;
            };
            matches!(
                get(&client, &format!("http://{addr}{new_path}")).await,
                Ok((StatusCode::OK, _, _))
            )
        })
        .await;
        assert!(served, "route of generation {generation} serves");
        assert_eq!(count(&scrape(&proxy).await, VERSION), version);
        let extra = proxy.app.listener_addr("extra");
        assert_eq!(
            extra.is_some(),
            generation % 3 == 1,
            "extra listener follows the file"
        );
    }
    assert!(
        served_more(ok.load(Ordering::Relaxed)).await,
        "the load runs after the last rewrite"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let m = scrape(&proxy).await;
    let (successes, failures) = (count(&m, SUCCESS), count(&m, FAILURE));
    println!(
        "soak: {ok} ok, {failed} failed; {rewrites} rewrites: {successes} applied, {failures} rejected"
    );
    assert_eq!(failed, 0);
    assert_eq!(failures, 1);
    assert_eq!(successes as usize, rewrites - 1);
    assert_eq!(count(&m, VERSION), version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_is_rejected_with_location_and_old_config_stays() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&route_config(&a, &b, 0, false)).await;
    let client = h1_client();
    proxy.write_config("listeners:\n  - name: in\n    address: 127.0.0.1:0\n    protocl: http\n");
    let shown = eventually(WAIT, || async {
        let cfg = get(&client, &proxy.admin_url("/config")).await.unwrap().2;
        cfg.contains(":6:5: unknown field `protocl`")
    })
    .await;
    assert!(shown, "the /config page shows the located error");
    let cfg = config_json(&proxy).await;
    assert_eq!(cfg["version"], 1, "the running config did not change");
    assert!(cfg["last_reload_error"]
        .as_str()
        .unwrap()
        .contains("did you mean `protocol`?"));
    assert_eq!(count(&scrape(&proxy).await, FAILURE), 1);
    // Listed among the recent reloads, where it stays after a good reload clears the error.
    let recent = &cfg["recent_reloads"];
    assert_eq!(recent.as_array().unwrap().len(), 1, "{recent}");
    assert_eq!(recent[0]["result"], "rejected");
    assert!(recent[0]["error"].as_str().unwrap().contains("`protocl`"));
    proxy.write_config(&route_config(&a, &b, 100, false));
    assert!(eventually(WAIT, || async { config_json(&proxy).await["version"] == 2 }).await);
    let cfg = config_json(&proxy).await;
    assert!(cfg["last_reload_error"].is_null());
    let recent = &cfg["recent_reloads"];
    assert_eq!(
        (
            &recent[0]["result"],
            &recent[0]["version"],
            &recent[1]["result"]
        ),
        (&"applied".into(), &2.into(), &"rejected".into()),
        "newest first: {recent}"
    );
    let (status, headers, _) = get(&client, &proxy.url("in", "/steady")).await.unwrap();
    assert_eq!(
        (status, headers["x-origin"].to_str().unwrap()),
        (StatusCode::OK, "a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_noticed() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The layout kubelet writes for a mounted ConfigMap.
    std::fs::create_dir(root.join("..2026_11_23_v1")).unwrap();
    std::fs::write(
        root.join("..2026_11_23_v1/outrigger.yaml"),
        with_test_admin(&route_config(&a, &b, 0, false)),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_23_v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/outrigger.yaml", root.join("outrigger.yaml")).unwrap();
    let path = root.join("outrigger.yaml");
    let loaded = outrigger::control::config::load_file(&path).unwrap();
    let app = outrigger::app::App::start(loaded, Some(path))
        .await
        .unwrap();

    std::fs::create_dir(root.join("..2026_11_23_v2")).unwrap();
    std::fs::write(
        root.join("..2026_11_23_v2/outrigger.yaml"),
        with_test_admin(&route_config(&a, &b, 1, false)),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_23_v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_11_23_v1")).unwrap();

    let client = h1_client();
    let served = eventually(WAIT, || async {
        let url = format!("http://{}/steady", app.listener_addr("in").unwrap());
        matches!(get(&client, &url).await, Ok((_, h, _)) if h["x-origin"] == "b")
    })
    .await;
    assert!(served, "the swapped ConfigMap goes live");
    let metrics = get(&client, &format!("http://{}/metrics", app.admin_addr()))
        .await
        .unwrap()
        .2;
    assert_eq!(count(&metrics, VERSION), 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_moves_and_removal_close_the_old_socket() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&route_config(&a, &b, 0, true)).await;
    let old_extra = proxy.addr("extra");
    proxy.write_config(&route_config(&a, &b, 1, false));
    let gone = eventually(WAIT, || async {
        proxy.app.listener_addr("extra").is_none()
            && tokio::net::TcpStream::connect(old_extra).await.is_err()
    })
    .await;
    assert!(gone, "a removed listener stops accepting");
    let (status, _, _) = get(&h1_client(), &proxy.url("in", "/g1")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// After a reload the file is not read again until it changes: reading it raises inotify events
/// of its own, and a log written beside it raises others; neither is a change.
///
/// A quiet time of twice the watcher's 50 ms debounce separates each step from the next write
/// the watcher must see, so that the events a step raised would make a reload of their own (and
/// count as `unchanged`) instead of merging into the next one. Each step then ends with a write
/// the watcher does see, and the test waits for its reload: that is the sign that the watcher
/// has had every earlier event, and only then are the counters compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_neighbouring_files_do_not_cause_reloads() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&route_config(&a, &b, 0, false)).await;
    let reloads = |success: u64, unchanged: u64| {
        let proxy = &proxy;
        async move {
            eventually(WAIT, || async {
                let m = scrape(proxy).await;
                count(&m, SUCCESS) >= success && count(&m, UNCHANGED) >= unchanged
            })
            .await;
            let m = scrape(proxy).await;
            (count(&m, SUCCESS), count(&m, UNCHANGED))
        }
    };
    // Generation 1, applied: the reload read the file.
    proxy.write_config(&route_config(&a, &b, 1, false));
    assert_eq!(reloads(1, 0).await, (1, 0));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A neighbour written often, as a log file would be.
    let log = proxy.dir.path().join("outrigger.log");
    for i in 0..20 {
        std::fs::write(&log, format!("line {i}\n")).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The same text written again, in place: a change of the file, not of the config.
    std::fs::write(
        &proxy.path,
        with_test_admin(&route_config(&a, &b, 1, false)),
    )
    .unwrap();
    assert_eq!(
        reloads(1, 1).await,
        (1, 1),
        "only the rewrite of the config file itself was seen, once"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Generation 2: the watcher has seen everything before it once this serves.
    proxy.write_config(&route_config(&a, &b, 2, false));
    assert_eq!(
        reloads(2, 1).await,
        (2, 1),
        "no reload beyond the two rewrites: neither reading the file nor writing beside it counts"
    );
    let (status, _, _) = get(&h1_client(), &proxy.url("in", "/g2")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// A reload is all-or-nothing: a new file whose new listener cannot bind its address changes
/// nothing (routes, listeners and the version stay, the removed listener still serves), and says
/// why. Once the address is free, the next change of the file applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_a_listener_changes_nothing() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap();
    let first = format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - {{ name: steady, match: {{ prefix: /steady }}, cluster: a }}
  - name: side
    address: 127.0.0.1:0
    routes:
      - {{ name: side-all, cluster: a }}
clusters:
  - {{ name: a, endpoints: [\"{}\"] }}
  - {{ name: b, endpoints: [\"{}\"] }}
",
        a.addr, b.addr
    );
    // `in` sends /steady to b and gains /new, `side` goes, `extra` wants the taken address.
    let second = format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - {{ name: new, match: {{ prefix: /new }}, cluster: a }}
      - {{ name: steady, match: {{ prefix: /steady }}, cluster: b }}
  - name: extra
    address: {taken}
    routes:
      - {{ name: extra-all, cluster: b }}
clusters:
  - {{ name: a, endpoints: [\"{}\"] }}
  - {{ name: b, endpoints: [\"{}\"] }}
",
        a.addr, b.addr
    );
    let proxy = Proxy::start(&first).await;
    let (in_addr, side_addr) = (proxy.addr("in"), proxy.addr("side"));
    let client = h1_client();
    proxy.write_config(&second);
    assert!(
        eventually(WAIT, || async {
            count(&scrape(&proxy).await, FAILURE) == 1
        })
        .await,
        "the reload is attempted and rejected"
    );

    let cfg = config_json(&proxy).await;
    let error = cfg["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("cannot bind listener `extra` on {taken}")),
        "{error}"
    );
    assert_eq!(cfg["version"], 1);
    let names: Vec<&str> = cfg["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["in", "side"]);
    let m = scrape(&proxy).await;
    assert_eq!((count(&m, SUCCESS), count(&m, VERSION)), (0, 1));
    assert_eq!(proxy.app.listener_addr("in"), Some(in_addr));
    assert_eq!(proxy.app.listener_addr("side"), Some(side_addr));
    assert_eq!(proxy.app.listener_addr("extra"), None);
    // The old routes and the listener the file removed still serve.
    let (status, headers, _) = get(&client, &proxy.url("in", "/steady")).await.unwrap();
    assert_eq!((status, reason(&headers)), (StatusCode::OK, ""));
    assert_eq!(headers["x-origin"], "a");
    let (status, headers, _) = get(&client, &proxy.url("in", "/new")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::NOT_FOUND, "no_route")
    );
    let (status, _, _) = get(&client, &format!("http://{side_addr}/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // With the address free, the next change applies the same listeners and routes.
    drop(blocker);
    proxy.write_config(&format!("# the port is free now\n{second}"));
    assert!(
        eventually(WAIT, || async {
            count(&scrape(&proxy).await, SUCCESS) == 1
        })
        .await,
        "{}",
        config_json(&proxy).await
    );
    assert_eq!(proxy.app.listener_addr("extra"), Some(taken));
    assert_eq!(proxy.app.listener_addr("side"), None);
    let (_, headers, _) = get(&client, &proxy.url("in", "/steady")).await.unwrap();
    assert_eq!(headers["x-origin"], "b");
    assert!(config_json(&proxy).await["last_reload_error"].is_null());
}

/// `/clusters` entry of `cluster`.
async fn cluster_status(proxy: &Proxy, cluster: &str) -> serde_json::Value {
    let text = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .cloned()
        .unwrap_or_else(|| panic!("no cluster {cluster} in {text}"))
}

/// A reload that changes only routes keeps each unchanged cluster as it was: an open breaker
/// stays open, the retry budget keeps its balance, an ejected endpoint stays ejected with its
/// count, and an endpoint's health and request counters are kept. A cluster built afresh would
/// show `closed`, a fresh budget, no ejection, and `unchecked` (its first check hangs: the
/// checked origin stops answering before the reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_clusters_keep_their_state_across_a_reload() {
    let failing = Origin::start("failing").await;
    failing.control.set_status(503);
    let live = Origin::start("live").await;
    let checked = Origin::start("checked").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = |extra_route: &str| {
        format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
{extra_route}      - {{ name: broken, match: {{ prefix: /broken }}, cluster: broken, retry: {{ attempts: 1 }} }}
      - {{ name: budgeted, match: {{ prefix: /budgeted }}, cluster: budgeted, retry: {{ attempts: 2 }} }}
      - {{ name: ejecting, match: {{ prefix: /ejecting }}, cluster: ejecting }}
      - {{ name: checked, match: {{ prefix: /checked }}, cluster: checked }}
clusters:
  - name: broken
    endpoints: [\"{failing}\"]
    circuit_breaker: {{ consecutive_failures: 2, open_duration: 60s, max_open_duration: 60s }}
    outlier_detection: {{ enabled: false }}
  - name: budgeted
    endpoints: [\"{failing}\"]
    retry_budget: {{ percent: 50, min_per_sec: 0, ttl: 60s }}
    circuit_breaker: {{ enabled: false }}
    outlier_detection: {{ enabled: false }}
  - name: ejecting
    endpoints: [\"{live}\", \"{dead}\"]
    load_balancer: round_robin
    circuit_breaker: {{ enabled: false }}
    outlier_detection: {{ consecutive_connect_failures: 1, base_ejection_time: 60s, max_ejection_percent: 50 }}
  - name: checked
    endpoints: [\"{checked}\"]
    health_check: {{ path: /healthz, interval: 1h, timeout: 30s, jitter: 0s }}
  - name: other
    endpoints: [\"{live}\"]
",
            failing = failing.addr,
            live = live.addr,
            checked = checked.addr,
        )
    };
    let proxy = Proxy::start(&config("")).await;
    let client = h1_client();
    let url = |p: &str| proxy.url("in", p);
    let series = |name: &str, route: &str, extra: &str| {
        format!("{name}{{cluster=\"{route}\",listener=\"in\"{extra},route=\"{route}\"}}")
    };
    let retries = series("outrigger_retries_total", "budgeted", "");
    let budget_skips = series(
        "outrigger_retries_skipped_total",
        "budgeted",
        ",reason=\"budget\"",
    );

    // Breaker: two failures in a row open it for a minute.
    for _ in 0..2 {
        let (status, headers, _) = get(&client, &url("/broken")).await.unwrap();
        assert_eq!((status.as_u16(), reason(&headers)), (503, ""));
    }
    let (_, headers, _) = get(&client, &url("/broken")).await.unwrap();
    assert_eq!(reason(&headers), "circuit_open");
    // Budget: 50% of requests, no floor. The first request's retry finds half a retry saved.
    let (status, _, _) = get(&client, &url("/budgeted")).await.unwrap();
    assert_eq!(status, 503);
    let m = scrape(&proxy).await;
    assert_eq!((count(&m, &retries), count(&m, &budget_skips)), (0, 1));
    // Ejection: one connect failure ejects the dead endpoint for a minute.
    assert!(
        eventually(WAIT, || async {
            let (status, _, _) = get(&client, &url("/ejecting")).await.unwrap();
            assert_eq!(
                status, 200,
                "a connect failure is retried on the live endpoint"
            );
            let c = cluster_status(&proxy, "ejecting").await;
            c["endpoints"][1]["ejected"] == true
        })
        .await,
        "the dead endpoint is ejected"
    );
    // Health: the first check passes.
    assert!(
        eventually(WAIT, || async {
            cluster_status(&proxy, "checked").await["endpoints"][0]["health"] == "healthy"
        })
        .await
    );
    checked.control.set_delay(3_600_000);
    let before = [
        cluster_status(&proxy, "broken").await,
        cluster_status(&proxy, "ejecting").await,
        cluster_status(&proxy, "checked").await,
    ];
    assert_eq!(before[0]["circuit"], "open");
    assert_eq!(before[1]["endpoints"][1]["ejections"], 1);
    let live_requests = before[1]["endpoints"][0]["requests"].as_u64().unwrap();
    assert!(live_requests >= 1);

    // A reload that adds a route and changes no cluster.
    proxy.write_config(&config(
        "      - { name: fresh, match: { prefix: /fresh }, cluster: other }\n",
    ));
    assert!(
        eventually(WAIT, || async {
            matches!(
                get(&client, &url("/fresh")).await,
                Ok((StatusCode::OK, _, _))
            )
        })
        .await,
        "the new route serves"
    );
    assert_eq!(count(&scrape(&proxy).await, VERSION), 2);

    let broken = cluster_status(&proxy, "broken").await;
    assert_eq!(
        broken["circuit"], "open",
        "the breaker stays open: {broken}"
    );
    let (_, headers, _) = get(&client, &url("/broken")).await.unwrap();
    assert_eq!(reason(&headers), "circuit_open");
    let ejecting = cluster_status(&proxy, "ejecting").await;
    let (kept_live, kept_dead) = (&ejecting["endpoints"][0], &ejecting["endpoints"][1]);
    assert_eq!(kept_dead["ejected"], true, "{ejecting}");
    assert_eq!(kept_dead["ejections"], 1, "{ejecting}");
    assert_eq!(kept_live["requests"].as_u64(), Some(live_requests));
    let health = cluster_status(&proxy, "checked").await;
    assert_eq!(health["endpoints"][0]["health"], "healthy", "{health}");
    // The budget's saved half retry is still there: this request's half completes a retry.
    let (status, _, _) = get(&client, &url("/budgeted")).await.unwrap();
    assert_eq!(status, 503);
    let m = scrape(&proxy).await;
    assert_eq!(
        (count(&m, &retries), count(&m, &budget_skips)),
        (1, 1),
        "the retry budget kept its balance"
    );
}

/// A listener removed by a reload stops accepting at once, and its connections drain: a request
/// in flight on it completes, with `connection: close`, and then the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_drains_its_connections() {
    let origin = Origin::start("app").await;
    // The origin holds every request until the test lets one through.
    origin
        .control
        .capacity
        .set(tokio::sync::Semaphore::new(0))
        .unwrap();
    let config = |with_old: bool| {
        let old = if with_old {
            // No route timeout: the request waits at the origin as long as the test needs.
            "  - name: old\n    address: 127.0.0.1:0\n    routes:\n      - name: old-all\n        cluster: app\n        timeout: 0s\n"
        } else {
            ""
        };
        format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
{old}clusters:
  - name: app
    endpoints: [\"{}\"]
",
            origin.addr
        )
    };
    let proxy = Proxy::start(&config(true)).await;
    let old = proxy.addr("old");
    let mut held = TcpStream::connect(old).await.unwrap();
    held.write_all(b"GET /held HTTP/1.1\r\nHost: app\r\nx-held: 1\r\n\r\n")
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || async {
            origin.control.last_header("x-held").is_some()
        })
        .await,
        "the request reaches the origin"
    );

    proxy.write_config(&config(false));
    assert!(
        eventually(WAIT, || async { proxy.app.listener_addr("old").is_none() }).await,
        "the reload applies"
    );
    assert!(
        eventually(WAIT, || async { TcpStream::connect(old).await.is_err() }).await,
        "the removed listener refuses new connections"
    );

    origin.control.capacity.get().unwrap().add_permits(1);
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, held.read_to_end(&mut answer))
        .await
        .expect("the drained connection is closed after its response")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200 "), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.ends_with("app get /held"), "{answer}");
}

/// Series in a scrape (lines that are not comments).
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_renaming_reloads_leave_the_metrics_bounded() {
    let origin = Origin::start("app").await;
    let config = |i: usize| {
        // Each reload renames the route (a retry policy and a rate limit give it resilience
        // series too) and, every tenth, its cluster.
        format!(
            "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: route-{i}\n        match: {{ prefix: / }}\n        cluster: app-{}\n        rate_limit: {{ requests_per_second: 1000 }}\nclusters:\n  - name: app-{}\n    endpoints: [\"{}\"]\n",
            i / 10,
            i / 10,
            origin.addr
        )
    };
    let proxy = Proxy::start(&config(0)).await;
    let client = h1_client();
    let url = proxy.url("in", "/x");
    let mut early = 0;
    for i in 1..=1000 {
        std::fs::write(&proxy.path, with_test_admin(&config(i))).unwrap();
        // The watcher may have applied it first; either way it is live when this returns.
        proxy.app.reload(false).await;
        let (status, _, _) = get(&client, &url).await.unwrap();
        assert_eq!(status, 200, "reload {i}");
        if i == 20 {
            early = series(&scrape(&proxy).await);
        }
    }
    let text = scrape(&proxy).await;
    let last = series(&text);
    println!("metrics: {early} series after 20 renaming reloads, {last} after 1,000");
    assert!(
        last <= early,
        "{early} series after 20 reloads, {last} after 1,000"
    );
    assert!(text.contains("route=\"route-1000\""));
    assert!(
        !text.contains("route=\"route-999\""),
        "the renamed route's series are gone"
    );
    assert!(
        !text.contains("cluster=\"app-99\""),
        "the renamed cluster's series are gone"
    );
}
