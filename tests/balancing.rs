//! Load balancing, active health checks and outlier ejection end to end: real origins, real
//! endpoint processes killed and restarted, the proxy in between.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use support::*;
use tokio::time::Instant;

fn cluster_json(body: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["clusters"][0].clone()
}

fn endpoint_field(cluster: &serde_json::Value, addr: SocketAddr, field: &str) -> serde_json::Value {
    cluster["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .map(|e| e[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_starves_a_ten_times_slower_endpoint() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("slow").await,
    ];
    origins[0].control.set_delay(5);
    origins[1].control.set_delay(5);
    origins[2].control.set_delay(50);
    let eps: Vec<String> = origins.iter().map(|o| o.addr.to_string()).collect();
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [{}]
",
        eps.join(", ")
    ))
    .await;
    let url = proxy.url("in", "/");
    let client = h1_client();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url, stop, total) = (client.clone(), url.clone(), stop.clone(), total.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _, _)) = get(&client, &url).await {
                    assert_eq!(s, 200);
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let total = total.load(Ordering::Relaxed);
    let slow = origins[2].hits();
    let share = slow as f64 / total as f64;
    println!("peak_ewma: {total} requests in 5 s over 5/5/50 ms endpoints; the slow one got {slow} ({:.1}%)", share * 100.0);
    assert!(share < 0.10, "{share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_keys_on_their_endpoint() {
    let origins: Vec<Origin> = futures_util::future::join_all(
        (0..5).map(|i| async move { Origin::start(&format!("o{i}")).await }),
    )
    .await;
    let eps: Vec<String> = origins.iter().map(|o| o.addr.to_string()).collect();
    for (balancer, hash_on, key_header) in [
        ("ring_hash", "header:x-user", "x-user"),
        ("maglev", "cookie:session", "cookie"),
    ] {
        let proxy = Proxy::start(&format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [{}]
    load_balancer: {balancer}
    hash_on: \"{hash_on}\"
",
            eps.join(", ")
        ))
        .await;
        let client = h1_client();
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut used = std::collections::HashSet::new();
        for round in 0..3 {
            for k in 0..100 {
                let value = if key_header == "cookie" {
                    format!("theme=dark; session=s{k}")
                } else {
                    format!("user-{k}")
                };
                let req = Request::get(proxy.url("in", "/"))
                    .header(key_header, value.as_str())
                    .body(empty())
                    .unwrap();
                let (_, headers, _) = send(&client, req).await.unwrap();
                let origin = headers["x-origin"].to_str().unwrap().to_owned();
                used.insert(origin.clone());
                match owner.get(&value) {
                    Some(o) => {
                        assert_eq!(o, &origin, "{balancer}: key {value} moved in round {round}")
                    }
                    None => {
                        owner.insert(value, origin);
                    }
                }
            }
        }
        assert!(
            used.len() >= 4,
            "{balancer}: keys spread over the endpoints: {used:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outliers_are_ejected_within_the_percentage_and_panic_mode_engages() {
    let origins: Vec<Origin> = futures_util::future::join_all(
        (0..4).map(|i| async move { Origin::start(&format!("o{i}")).await }),
    )
    .await;
    origins[0].control.set_status(503);
    origins[1].control.set_status(503);
    let eps: Vec<String> = origins.iter().map(|o| o.addr.to_string()).collect();
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: panic
        match: {{ prefix: /panic }}
        cluster: app2
        retry: {{ attempts: 1 }}
      - name: all
        cluster: app
        retry: {{ attempts: 1 }}
clusters:
  - name: app
    endpoints: [{}]
    load_balancer: round_robin
    circuit_breaker: {{ enabled: false }}
    outlier_detection: {{ consecutive_5xx: 3, max_ejection_percent: 25, base_ejection_time: 10s }}
  - name: app2
    endpoints: [{}, {}, {}]
    load_balancer: round_robin
    circuit_breaker: {{ enabled: false }}
    outlier_detection: {{ consecutive_5xx: 3, max_ejection_percent: 100, base_ejection_time: 10s }}
",
        eps.join(", "),
        eps[0],
        eps[1],
        eps[2]
    ))
    .await;
    let client = h1_client();
    for _ in 0..40 {
        get(&client, &proxy.url("in", "/x")).await.unwrap();
    }
    let m = scrape(&proxy).await;
    let ejected = metric(&m, "outrigger_endpoints{cluster=\"app\",state=\"ejected\"}");
    println!("outlier: 2 of 4 endpoints always 503, max_ejection_percent 25: {ejected} ejected");
    assert_eq!(
        ejected, 1.0,
        "25% of 4 endpoints: one may be ejected, not two"
    );
    let c = cluster_json(&get(&client, &proxy.admin_url("/clusters")).await.unwrap().2);
    let flags: Vec<bool> = [origins[0].addr, origins[1].addr]
        .iter()
        .map(|a| endpoint_field(&c, *a, "ejected") == true)
        .collect();
    assert_eq!(flags.iter().filter(|f| **f).count(), 1, "{c}");

    // Two of three ejected (allowed at 100%): only one in three is available, under the 50%
    // panic threshold, so the cluster balances over all three again.
    for _ in 0..40 {
        get(&client, &proxy.url("in", "/panic")).await.unwrap();
    }
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_endpoints{cluster=\"app2\",state=\"ejected\"}"
        ),
        2.0
    );
    assert_eq!(metric(&m, "outrigger_cluster_panic{cluster=\"app2\"}"), 1.0);
    let before = origins[0].hits();
    for _ in 0..30 {
        get(&client, &proxy.url("in", "/panic")).await.unwrap();
    }
    assert!(
        origins[0].hits() > before,
        "in panic mode ejected endpoints get traffic again"
    );
}

/// Python's `http.server` on a port: a real endpoint process to kill. Its listen backlog is
/// raised from socketserver's 5, which can drop a connection even under this light load.
fn python_origin(port: u16, dir: &std::path::Path) -> Child {
    let script = "import http.server as h, sys\n\
                  h.ThreadingHTTPServer.request_queue_size = 256\n\
                  h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')";
    Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 is installed by .ci/run")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_listening(port: u16) {
    assert!(
        eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await,
        "python origin on {port} did not start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_process_leaves_and_rejoins_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello from python\n").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut children: Vec<Child> = ports
        .iter()
        .map(|p| python_origin(*p, dir.path()))
        .collect();
    for p in ports {
        wait_listening(p).await;
    }
    let (interval, unhealthy, healthy, timeout) = (200u64, 2u64, 2u64, 100u64);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: py
clusters:
  - name: py
    endpoints: [127.0.0.1:{}, 127.0.0.1:{}, 127.0.0.1:{}]
    health_check:
      path: /
      interval: {interval}ms
      timeout: {timeout}ms
      jitter: 0s
      unhealthy_threshold: {unhealthy}
      healthy_threshold: {healthy}
",
        ports[0], ports[1], ports[2]
    ))
    .await;
    let url = proxy.url("in", "/");
    let admin = proxy.admin_url("/clusters");
    let victim: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let health = |admin: String| async move {
        let body = get(&h1_client(), &admin).await.unwrap().2;
        endpoint_field(&cluster_json(&body), victim, "health")
    };
    assert!(
        eventually(Duration::from_secs(3), || {
            let a = admin.clone();
            async move { health(a).await == "healthy" }
        })
        .await
    );

    // Load throughout: every GET must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (url, stop, failures, done) =
            (url.clone(), stop.clone(), failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                match get(&client, &url).await {
                    Ok((s, _, body)) if s == 200 && body.contains("hello from python") => {}
                    other => {
                        eprintln!("failed: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    children[1].kill().unwrap();
    children[1].wait().unwrap();
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || {
            let a = admin.clone();
            async move { health(a).await == "unhealthy" }
        })
        .await
    );
    let out_after = killed.elapsed();

    children[1] = python_origin(ports[1], dir.path());
    wait_listening(ports[1]).await;
    let restarted = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || {
            let a = admin.clone();
            async move { health(a).await == "healthy" }
        })
        .await
    );
    let back_after = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (failed, total) = (
        failures.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed),
    );
    println!(
        "health: killed endpoint marked unhealthy after {out_after:?} (bound {} ms), back {back_after:?} after restart (bound {} ms); {total} GETs, {failed} failed",
        interval * unhealthy + timeout,
        interval * healthy
    );
    assert_eq!(
        failed, 0,
        "retries cover the window before the checks notice"
    );
    // One check period of slack for where in its cycle the kill landed.
    assert!(
        out_after <= Duration::from_millis(interval * (unhealthy + 1) + timeout),
        "{out_after:?}"
    );
    assert!(
        back_after <= Duration::from_millis(interval * (healthy + 1)),
        "{back_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_routes_send_each_key_to_its_shard() {
    let shards = [
        Origin::start("s0").await,
        Origin::start("s1").await,
        Origin::start("s2").await,
    ];
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: by-range
        match: {{ prefix: /users }}
        partition:
          key: path
          ranges:
            - {{ below: /users/h, cluster: s0 }}
            - {{ below: /users/p, cluster: s1 }}
            - {{ cluster: s2 }}
      - name: by-tenant
        partition:
          key: header:x-tenant
          clusters: [s0, s1, s2]
clusters:
  - name: s0
    endpoints: [{}]
  - name: s1
    endpoints: [{}]
  - name: s2
    endpoints: [{}]
",
        shards[0].addr, shards[1].addr, shards[2].addr
    ))
    .await;
    let client = h1_client();
    for (path, shard) in [
        ("/users/alice", "s0"),
        ("/users/mallory", "s1"),
        ("/users/zoe", "s2"),
        ("/users/h", "s1"),
    ] {
        let (_, headers, _) = get(&client, &proxy.url("in", path)).await.unwrap();
        assert_eq!(headers["x-origin"], shard, "{path}");
    }
    let mut owner = HashMap::new();
    let mut used = std::collections::HashSet::new();
    for round in 0..2 {
        for t in 0..60 {
            let req = Request::get(proxy.url("in", "/orders"))
                .header("x-tenant", format!("tenant-{t}"))
                .body(empty())
                .unwrap();
            let (_, headers, _) = send(&client, req).await.unwrap();
            let shard = headers["x-origin"].to_str().unwrap().to_owned();
            used.insert(shard.clone());
            let first = owner.entry(t).or_insert_with(|| shard.clone());
            assert_eq!(*first, shard, "tenant-{t} moved in round {round}");
        }
    }
    assert_eq!(used.len(), 3, "tenants spread over every shard");
    let (status, headers, _) = get(&client, &proxy.url("in", "/orders")).await.unwrap();
    assert_eq!(
        (status.as_u16(), reason(&headers)),
        (404, "no_route"),
        "no key, no shard"
    );
}
