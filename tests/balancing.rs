//! Load balancing, active health checks and outlier ejection end to end: real origins, real
//! endpoint processes killed and restarted, the proxy in between.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use support::*;

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

/// A generous deadline for an event the test waits for: CI runs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_starves_a_much_slower_endpoint() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("slow").await,
    ];
    origins[0].control.set_delay(5);
    origins[1].control.set_delay(5);
    // A hundred times slower: a scheduling hiccup on a loaded machine cannot make a fast
    // endpoint look as slow as this one.
    origins[2].control.set_delay(500);
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
    // A fixed number of requests from 8 workers (closed loop): the share is a count, not a
    // rate over a wall-clock window.
    let (workers, each) = (8, 60);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                let (s, _, _) = get(&client, &url).await.unwrap();
                assert_eq!(s, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = workers * each;
    let hits: usize = origins.iter().map(Origin::hits).sum();
    assert_eq!(hits, total, "one try per request");
    let slow = origins[2].hits();
    let share = slow as f64 / total as f64;
    println!(
        "peak_ewma: {total} requests over 5/5/500 ms endpoints; the slow one got {slow} ({:.1}%)",
        share * 100.0
    );
    // It gets a few requests while it is unmeasured (an unmeasured endpoint costs as if it
    // answered in 1 ms), then almost none.
    assert!(slow >= 1, "an unmeasured endpoint gets tried");
    assert!(share < 0.10, "{slow} of {total}");
}

/// Sends `n` requests from `workers` closed-loop workers and returns how many each origin got.
async fn spread(url: &str, workers: usize, n: usize) -> HashMap<String, usize> {
    let client = h1_client();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut seen = HashMap::<String, usize>::new();
            for _ in 0..n / workers {
                let (s, h, _) = get(&client, &url).await.unwrap();
                assert_eq!(s, 200);
                *seen
                    .entry(h["x-origin"].to_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            seen
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_balancer_splits_by_weight_one_at_a_time_and_concurrently() {
    // Equal endpoints that take 5 ms per request, as a service doing some work would: loopback
    // scheduling noise is small against that.
    let (heavy, light) = (Origin::start("heavy").await, Origin::start("light").await);
    heavy.control.set_delay(5);
    light.control.set_delay(5);
    let balancers = [
        ("peak_ewma", ""),
        ("least_request", ""),
        ("round_robin", ""),
        ("random", ""),
        ("ring_hash", "    hash_on: header:x-user\n"),
        ("maglev", "    hash_on: header:x-user\n"),
    ];
    let mut routes = String::new();
    let mut clusters = String::new();
    for (b, extra) in balancers {
        routes.push_str(&format!(
            "      - name: {b}\n        match: {{ prefix: /{b} }}\n        cluster: {b}\n"
        ));
        clusters.push_str(&format!(
            "  - name: {b}\n    load_balancer: {b}\n{extra}    endpoints:\n      - {{ address: \"{}\", weight: 3 }}\n      - {{ address: \"{}\", weight: 1 }}\n",
            heavy.addr, light.addr
        ));
    }
    let proxy = Proxy::start(&format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n{routes}clusters:\n{clusters}"
    ))
    .await;
    // The balancers run side by side; each sends its own 400 + 400 requests.
    let mut runs = Vec::new();
    for (b, _) in balancers {
        // Without the hash header, the hashing balancers place each request at random.
        let url = proxy.url("in", &format!("/{b}"));
        runs.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for workers in [1, 8] {
                let got = spread(&url, workers, 400).await;
                let share = got.get("heavy").copied().unwrap_or(0) as f64 / 400.0;
                println!(
                    "{b:<14} {workers} at a time: {got:?} ({:.1}% heavy)",
                    share * 100.0
                );
                if (share - 0.75).abs() > 0.10 {
                    out.push(format!("{b}, {workers} at a time: {got:?}"));
                }
            }
            out
        }));
    }
    let mut failures = Vec::new();
    for run in runs {
        failures.extend(run.await.unwrap());
    }
    assert!(failures.is_empty(), "not 75% ± 10%: {failures:?}");
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
    // Ejections last 300 s: none can end while the test runs, however loaded the machine.
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
    outlier_detection: {{ consecutive_5xx: 3, max_ejection_percent: 25, base_ejection_time: 300s }}
  - name: app2
    endpoints: [{}, {}, {}]
    load_balancer: round_robin
    circuit_breaker: {{ enabled: false }}
    outlier_detection: {{ consecutive_5xx: 3, max_ejection_percent: 100, base_ejection_time: 300s }}
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
    let body = get(&client, &proxy.admin_url("/clusters")).await.unwrap().2;
    let c = cluster_json(&body);
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
    let app2 = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "app2")
            .unwrap()
            .clone()
    };
    let c2 = app2(&get(&client, &proxy.admin_url("/clusters")).await.unwrap().2);
    assert_eq!(c2["panic"], true, "{c2}");
    for o in &origins[..2] {
        assert_eq!(endpoint_field(&c2, o.addr, "ejected"), true, "{c2}");
    }
    // In panic mode every endpoint is a candidate again, the ejected ones included: round robin
    // gives each of the three exactly a third of the requests.
    let before: Vec<usize> = origins[..3].iter().map(Origin::hits).collect();
    let mut statuses = HashMap::new();
    for _ in 0..30 {
        let (status, _, _) = get(&client, &proxy.url("in", "/panic")).await.unwrap();
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    let got: Vec<usize> = origins[..3]
        .iter()
        .zip(&before)
        .map(|(o, b)| o.hits() - b)
        .collect();
    assert_eq!(
        got,
        [10, 10, 10],
        "panic mode balances over all endpoints, ejected or not"
    );
    assert_eq!(
        statuses,
        HashMap::from([(503, 20), (200, 10)]),
        "the two ejected endpoints still answer 503"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_process_leaves_and_rejoins_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello from python\n").unwrap();
    // The victim comes back on its own port: held for the whole test, not bound and released.
    let reserved = [(); 3].map(|()| ReservedPort::on("127.0.0.1"));
    let ports = reserved.each_ref().map(|r| r.port);
    let mut children = Children(
        ports
            .iter()
            .map(|p| python_origin(*p, dir.path()))
            .collect(),
    );
    for p in ports {
        wait_listening(p).await;
    }
    // How soon the checks notice (interval × thresholds) is the checker's timing, covered with
    // paused time in src/control/health.rs; here only the order of events is asserted. The
    // timeout is generous so that a slow answer on a loaded machine is not a failed check.
    // The first refused connection ejects the victim for five minutes, far past the test's
    // deadlines: it can only rejoin because its passing checks lift the ejection.
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
      interval: 200ms
      timeout: 5s
      jitter: 0s
      unhealthy_threshold: 2
      healthy_threshold: 2
    outlier_detection:
      consecutive_connect_failures: 1
      base_ejection_time: 300s
      max_ejection_time: 300s
",
        ports[0], ports[1], ports[2]
    ))
    .await;
    let url = proxy.url("in", "/");
    let admin = proxy.admin_url("/clusters");
    let victim: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let field = |admin: String, name: &'static str| async move {
        let body = get(&h1_client(), &admin).await.unwrap().2;
        endpoint_field(&cluster_json(&body), victim, name)
    };
    let health_is = |want: &'static str| {
        let admin = admin.clone();
        async move {
            eventually(WAIT, || {
                let a = admin.clone();
                async move { field(a, "health").await == want }
            })
            .await
        }
    };
    assert!(health_is("healthy").await, "the victim passes its checks");

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
    // The victim takes part in the load before it is killed.
    assert!(
        eventually(WAIT, || {
            let a = admin.clone();
            async move { field(a, "requests").await.as_u64().unwrap_or(0) >= 5 }
        })
        .await,
        "the victim gets traffic"
    );

    children.0[1].kill().unwrap();
    children.0[1].wait().unwrap();
    assert!(health_is("unhealthy").await, "the checks notice the kill");
    assert!(
        eventually(WAIT, || {
            let a = admin.clone();
            async move { field(a, "ejections").await.as_u64().unwrap_or(0) >= 1 }
        })
        .await,
        "the refused tries eject the victim"
    );

    children.0[1] = python_origin(ports[1], dir.path());
    wait_listening(ports[1]).await;
    assert!(health_is("healthy").await, "and the restart");
    // Back in the balancer: the restarted process serves some of the load again.
    let rejoined = field(admin.clone(), "requests").await.as_u64().unwrap();
    assert!(
        eventually(WAIT, || {
            let a = admin.clone();
            async move { field(a, "requests").await.as_u64().unwrap_or(0) >= rejoined + 5 }
        })
        .await,
        "the restarted endpoint gets traffic again, within its ejection time"
    );
    assert_eq!(field(admin.clone(), "ejected").await, false);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    drop(children);
    let (failed, total) = (
        failures.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed),
    );
    println!("health: killed endpoint left and rejoined; {total} GETs, {failed} failed");
    assert_eq!(
        failed, 0,
        "retries cover the window before the checks notice"
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
