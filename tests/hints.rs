//! Shared failure hints across real sidecar processes: one sidecar finds an endpoint dead and the
//! others, told through the mesh group, probe it and eject it before sending it a request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::path::Path;
use std::time::Duration;

use support::{eventually, get, h1_client, member_list, metric, Origin, Process, ReservedPort};

const WAIT: Duration = Duration::from_secs(30);

fn config(
    dir: &Path,
    n: u64,
    members: &[(u64, String)],
    endpoints: &str,
    hints: bool,
) -> std::path::PathBuf {
    let list = member_list(members);
    let path = dir.join(format!("s{n}.yaml"));
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: app\nclusters:\n  - name: app\n    endpoints: [{endpoints}]\nmesh:\n  node_id: {n}\n  listen: {}\n  data_dir: {}\n  failure_hints: {hints}\n  members:\n{list}",
            members[n as usize - 1].1,
            dir.join(format!("data{n}")).display()
        ),
    )
    .unwrap();
    path
}

async fn scrape(p: &Process) -> String {
    get(&h1_client(), &p.admin_url("/metrics"))
        .await
        .map(|(_, _, t)| t)
        .unwrap_or_default()
}

async fn hints(p: &Process, event: &str) -> f64 {
    metric(
        &scrape(p).await,
        &format!("outrigger_failure_hints_total{{event=\"{event}\"}}"),
    )
}

/// Three sidecars (the group's voters), the same two endpoints each; one endpoint's port is
/// reserved but nothing listens on it, as after a kill. Only the first sidecar sends requests:
/// the others must learn of the dead endpoint from its hint, probe it and eject it.
async fn run(hints_on: bool) -> (Vec<Process>, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let alive = Origin::start("alive").await;
    let dead = ReservedPort::for_the_run("127.0.0.1");
    let dead_addr: std::net::SocketAddr = format!("127.0.0.1:{dead}").parse().unwrap();
    let endpoints = format!("\"{}\", \"{dead_addr}\"", alive.addr);
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| {
            (
                i,
                format!("127.0.0.1:{}", ReservedPort::for_the_run("127.0.0.1")),
            )
        })
        .collect();
    let sidecars: Vec<Process> = (1..=3)
        .map(|n| Process::start(&config(dir.path(), n, &members, &endpoints, hints_on)))
        .collect();
    // The first sidecar's requests find the dead endpoint (retries cover every failed try).
    let url = format!("http://{}/", sidecars[0].listener("in").await.unwrap());
    assert!(
        eventually(WAIT, || async {
            for _ in 0..10 {
                let (s, _, _) = get(&h1_client(), &url).await.unwrap();
                assert_eq!(s, 200, "a retry covers the dead endpoint");
            }
            metric(
                &scrape(&sidecars[0]).await,
                "outrigger_upstream_connect_errors_total{cluster=\"app\"}",
            ) >= 1.0
        })
        .await
    );
    std::mem::forget(dir);
    (sidecars, dead_addr)
}

fn endpoint_state(clusters: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(clusters).unwrap();
    v["clusters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "app"))
        .and_then(|c| c["endpoints"].as_array())
        .and_then(|e| e.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_found_by_one_sidecar_is_ejected_by_the_others_without_a_request() {
    let (sidecars, dead) = run(true).await;
    assert!(
        eventually(WAIT, || async { hints(&sidecars[0], "sent").await >= 1.0 }).await,
        "the sidecar that found the endpoint dead published a hint"
    );
    for other in &sidecars[1..] {
        assert!(
            eventually(WAIT, || async {
                hints(other, "received").await >= 1.0 && hints(other, "acted_on").await >= 1.0
            })
            .await,
            "every other sidecar received the hint and acted on it"
        );
        // Its own probe agreed: the endpoint is ejected there, and no request of its own failed
        // (it sent none).
        assert!(
            eventually(WAIT, || async {
                let body = get(&h1_client(), &other.admin_url("/clusters"))
                    .await
                    .unwrap()
                    .2;
                endpoint_state(&body, dead)["ejected"] == true
            })
            .await,
            "the probe ejected the dead endpoint"
        );
        let text = scrape(other).await;
        println!(
            "a sidecar that sent nothing to the dead endpoint: hints received {}, acted on {}",
            metric(&text, "outrigger_failure_hints_total{event=\"received\"}"),
            metric(&text, "outrigger_failure_hints_total{event=\"acted_on\"}")
        );
        assert_eq!(
            metric(
                &text,
                "outrigger_upstream_connect_errors_total{cluster=\"app\"}"
            ),
            0.0,
            "no request of its own went to the dead endpoint"
        );
        assert_eq!(
            metric(&text, "outrigger_outlier_ejections_total{cluster=\"app\"}"),
            1.0,
            "the ejection is its own, from its probe"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hints_off_nothing_is_sent_and_the_others_keep_the_endpoint() {
    let (sidecars, dead) = run(false).await;
    // Give a hint, were one sent, time to travel: the first sidecar keeps serving meanwhile.
    let url = format!("http://{}/", sidecars[0].listener("in").await.unwrap());
    for _ in 0..20 {
        get(&h1_client(), &url).await.unwrap();
    }
    assert_eq!(hints(&sidecars[0], "sent").await, 0.0);
    for other in &sidecars[1..] {
        assert_eq!(hints(other, "received").await, 0.0);
        let body = get(&h1_client(), &other.admin_url("/clusters"))
            .await
            .unwrap()
            .2;
        assert_eq!(
            endpoint_state(&body, dead)["ejected"],
            false,
            "only its own evidence could eject it, and it sent nothing"
        );
    }
}
