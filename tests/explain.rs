//! `outrigger explain`, run as users run it: the derived figures for every shipped config, the
//! JSON form against `config/explain.schema.json`, and one purpose-built config per trap.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/staged.rs"]
mod staged;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `outrigger explain ARGS`: exit code and stdout.
fn explain(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .arg("explain")
        .args(args)
        .env_remove("OUTRIGGER_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The JSON report of `path`, checked against the schema.
fn report(path: &Path) -> serde_json::Value {
    let (code, out) = explain(&["--config", path.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0, "{}: {out}", path.display());
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("config/explain.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    value
}

/// The shipped configs: the default and every example.
fn shipped() -> Vec<PathBuf> {
    let mut files = vec![root().join("config/outrigger.yaml")];
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every shipped config explains with a worst-case latency and amplification per route, as JSON
/// that passes the schema and as text that says the same, and none of them sets off a trap. An
/// example whose certificates a script makes is explained in a copy beside them (`staged`).
#[test]
fn every_shipped_config_gets_its_figures_and_no_warning() {
    for shipped in shipped() {
        let staged = staged::staged(&shipped);
        let path = &staged.path;
        let value = report(path);
        let routes = value["routes"].as_array().unwrap();
        for r in routes {
            let d = &r["derived"];
            assert!(d["max_amplification"].as_f64().unwrap() >= 1.0);
            assert!(d["worst_case_latency"].as_str().is_some());
        }
        assert_eq!(
            value["warnings"],
            serde_json::json!([]),
            "{}",
            path.display()
        );
        let (code, text) = explain(&["--config", path.to_str().unwrap()]);
        assert_eq!(code, 0);
        assert_eq!(
            text.matches("worst latency").count(),
            routes.len(),
            "{text}"
        );
        assert_eq!(text.matches("amplification").count(), routes.len());
        assert!(text.ends_with("no warnings\n"), "{text}");
    }
}

/// The figures for the default policy: a route timeout bounds the wait; three tries at most, or
/// 1.2× over an outage thanks to the 20% budget; with a per-try timeout the tries add up.
#[test]
fn the_figures_follow_from_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    routes:\n      - name: plain\n        cluster: api\n        timeout: 2s\n      - name: tries\n        match: { prefix: /t }\n        cluster: api\n        timeout: 10s\n        retry: { attempts: 3, per_try_timeout: 1s, retry_on: [connect-failure, reset] }\n      - name: open\n        match: { prefix: /o }\n        cluster: api\n        timeout: 0s\nclusters:\n  - name: api\n    endpoints: [127.0.0.1:9]\n",
    );
    let value = report(&path);
    let route = |name: &str| {
        value["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == name)
            .unwrap()
            .clone()
    };
    let plain = route("plain");
    assert_eq!(plain["derived"]["worst_case_latency_ms"], 2000);
    assert_eq!(plain["derived"]["max_amplification"], 3.0);
    assert_eq!(plain["derived"]["budget_amplification"], 1.2);
    assert_eq!(plain["derived"]["budget_floor_per_sec"], 10);
    // 3 tries of 1 s, and waits of at most 25 ms then 50 ms: no status retried, no Retry-After.
    let tries = route("tries");
    assert_eq!(tries["derived"]["worst_case_latency_ms"], 3075);
    let open = route("open");
    assert_eq!(
        open["derived"]["worst_case_latency_ms"],
        serde_json::Value::Null
    );
    // One route only.
    let (code, text) = explain(&["--config", path.to_str().unwrap(), "--route", "tries"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("route out/tries\n"), "{text}");
    assert!(!text.contains("out/plain"));
    let (code, text) = explain(&["--config", path.to_str().unwrap(), "--route", "nope"]);
    assert_eq!((code, text.trim()), (1, "no HTTP route is named `nope`"));
}

fn write(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("outrigger.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The traps found in `yaml`, as (trap, at).
fn traps(yaml: &str) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let value = report(&write(dir.path(), yaml));
    let (_, text) = explain(&[
        "--config",
        dir.path().join("outrigger.yaml").to_str().unwrap(),
    ]);
    let found: Vec<(String, String)> = value["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert!(!w["fix"].as_str().unwrap().is_empty());
            // The text form shows each warning with its fix.
            assert!(text.contains(w["fix"].as_str().unwrap()), "{text}");
            (
                w["trap"].as_str().unwrap().to_owned(),
                w["at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    found
}

fn one_route(route: &str, cluster: &str) -> String {
    format!(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: api\n{route}clusters:\n  - name: api\n    endpoints: [127.0.0.1:9]\n{cluster}"
    )
}

/// A per-try timeout as long as the route timeout leaves no time for a retry.
#[test]
fn trap_per_try_timeout_not_below_the_route_timeout() {
    let found = traps(&one_route(
        "        timeout: 2s\n        retry: { per_try_timeout: 2s }\n",
        "",
    ));
    assert_eq!(
        found,
        [("per_try_timeout_not_below_timeout".into(), "out/r".into())]
    );
}

/// Retrying non-idempotent methods after they reached the upstream.
#[test]
fn trap_retries_on_non_idempotent_methods() {
    let found = traps(&one_route("        retry: { non_idempotent: true }\n", ""));
    assert_eq!(found, [("retries_non_idempotent".into(), "out/r".into())]);
}

/// A breaker that needs more calls in its window than the route's rate limit lets through.
#[test]
fn trap_breaker_minimum_calls_unreachable() {
    let found = traps(&one_route(
        "        rate_limit: { requests_per_second: 1, burst: 1 }\n",
        "    circuit_breaker: { window_duration: 10s, minimum_calls: 50 }\n",
    ));
    assert_eq!(
        found,
        [(
            "breaker_minimum_calls_unreachable".into(),
            "out/r, cluster api".into()
        )]
    );
}

/// A bulkhead that admits more requests than the pool keeps connections.
#[test]
fn trap_bulkhead_larger_than_the_pool() {
    let found = traps(&one_route(
        "",
        "    bulkhead: { max_concurrent: 200 }\n    pool: { max_idle_per_endpoint: 50 }\n",
    ));
    assert_eq!(
        found,
        [("bulkhead_exceeds_pool".into(), "cluster api".into())]
    );
}

/// Hedging where the retry budget no longer caps the extra load.
#[test]
fn trap_hedging_without_a_budget() {
    let found = traps(&one_route(
        "        hedge: { after: 50ms }\n",
        "    retry_budget: { percent: 200 }\n",
    ));
    assert_eq!(
        found,
        [("hedge_without_budget".into(), "out/r, cluster api".into())]
    );
}

/// Health checks that notice a dead endpoint only after its ejection has ended.
#[test]
fn trap_checks_slower_than_the_ejection() {
    let found = traps(&one_route(
        "",
        "    health_check: { interval: 10s, unhealthy_threshold: 3 }\n    outlier_detection: { base_ejection_time: 5s }\n",
    ));
    assert_eq!(
        found,
        [("checks_slower_than_ejection".into(), "cluster api".into())]
    );
}

/// A route that an earlier, broader route always takes first.
#[test]
fn trap_a_route_shadowed_by_an_earlier_one() {
    let found = traps(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    routes:\n      - name: api\n        match: { prefix: /api }\n        cluster: api\n      - name: users\n        match: { prefix: /api/users, methods: [GET] }\n        cluster: api\n      - name: other-host\n        match: { prefix: /api/users, host: admin.example }\n        cluster: api\nclusters:\n  - name: api\n    endpoints: [127.0.0.1:9]\n",
    );
    // `other-host` is shadowed too: the first route matches any host.
    assert_eq!(
        found,
        [
            ("route_shadowed".into(), "out/users".into()),
            ("route_shadowed".into(), "out/other-host".into())
        ]
    );
    // Not shadowed: the earlier route is narrower.
    let found = traps(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    routes:\n      - name: users\n        match: { prefix: /api/users, methods: [GET] }\n        cluster: api\n      - name: api\n        match: { prefix: /api }\n        cluster: api\nclusters:\n  - name: api\n    endpoints: [127.0.0.1:9]\n",
    );
    assert_eq!(found, []);
}
