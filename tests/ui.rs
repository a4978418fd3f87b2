//! The live admin page `/ui`, loaded by a real browser (headless Chromium, Debian's `chromium`
//! package; `.ci/run` installs it) against a running proxy whose breaker the test opened and one
//! of whose endpoints it had ejected.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Headless Chromium on `url`, with the page's console on stderr: (DOM after the page's script
/// ran for `virtual_ms` of virtual time, console lines).
fn chromium(
    url: &str,
    virtual_ms: u32,
    screenshot: Option<&std::path::Path>,
) -> (String, Vec<String>) {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1400",
        "--enable-logging=stderr",
        "--log-level=0",
        &format!("--virtual-time-budget={virtual_ms}"),
    ]);
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .output()
        .expect("chromium is installed (Debian package `chromium`; .ci/run installs it)");
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// The page shows the breaker the test opened and the endpoint it ejected, keeps a cluster of
/// 200 endpoints collapsed, logs nothing to the console, and renders to a screenshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_an_open_breaker_and_an_ejected_endpoint() {
    // Two endpoints that refuse every connection (reserved, never listening).
    let dead = [
        ReservedPort::for_the_run("127.0.0.1"),
        ReservedPort::for_the_run("127.0.0.1"),
    ];
    let origin = Origin::start("big").await;
    let many: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "127.0.{}.{}:{}",
                1 + i / 200,
                1 + i % 200,
                origin.addr.port()
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n    load_shed: {{}}\n    routes:\n      - name: big\n        match: {{ prefix: /big }}\n        cluster: big\n      - name: api\n        cluster: app\n        rate_limit: {{ requests_per_second: 1000 }}\nclusters:\n  - name: app\n    endpoints: [127.0.0.1:{}, 127.0.0.1:{}]\n    circuit_breaker: {{ minimum_calls: 5 }}\n    outlier_detection: {{ consecutive_connect_failures: 2, max_ejection_percent: 50 }}\n  - name: big\n    endpoints: [{}]\n",
            dead[0],
            dead[1],
            many.join(", ")
        ),
    )
    .unwrap();
    let proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let client = h1_client();
    let clusters = proc.admin_url("/clusters");
    let broken = eventually(WAIT, || async {
        let _ = get(&client, &format!("http://{addr}/api")).await;
        let (_, _, body) = get(&client, &clusters).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let app = &v["clusters"][0];
        app["circuit"] == "open"
            && app["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["ejected"] == true)
    })
    .await;
    assert!(broken, "the breaker opened and an endpoint was ejected");

    let url = proc.admin_url("/ui");
    let (dom, console) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&url, 5000, None)
    })
    .await
    .unwrap();
    assert_eq!(console, Vec::<String>::new(), "the page logs nothing");
    assert!(dom.contains("data-polled="), "the page polled: {dom}");
    let app = dom
        .split("<details")
        .find(|d| d.contains("data-cluster=\"app\""))
        .expect("the cluster app is shown");
    assert!(app.contains("data-circuit=\"open\""), "{app}");
    assert!(app.contains("data-ejected=\"true\""), "{app}");
    assert!(app.contains("data-ejected=\"false\""), "{app}");
    // 200 endpoints: listed, but collapsed until the operator opens or filters them.
    let big = dom
        .split("<details")
        .find(|d| d.contains("data-cluster=\"big\""))
        .unwrap();
    let head = &big[..big.find('>').unwrap()];
    assert!(
        !head.contains("open"),
        "a big cluster starts collapsed: {head}"
    );
    assert_eq!(big.matches("data-endpoint=\"127.").count(), 200);
    // The index page leads to it.
    let (_, _, index) = get(&client, &proc.admin_url("/")).await.unwrap();
    assert!(index.contains("href=/ui"));

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || chromium(&url, 5000, Some(&shot))
    })
    .await
    .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot at {}", shot.display());
    println!("ui: screenshot at {}", shot.display());
}
