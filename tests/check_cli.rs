//! `outrigger check`: located errors with hints and exit 1 on bad files; exit 0 on every shipped
//! config and example.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;

#[path = "support/staged.rs"]
mod staged;

fn check(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn misspelled_field_is_reported_with_location_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "typo.yaml",
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: c\n        timout: 2s\nclusters:\n  - name: c\n    endpoints: [127.0.0.1:9]\n",
    );
    let (code, out) = check(&p);
    assert_eq!(code, 1);
    assert_eq!(
        out.trim(),
        format!(
            "{}:7:9: unknown field `timout` (hint: did you mean `timeout`?)",
            p.display()
        )
    );
}

#[test]
fn unknown_cluster_reference_is_reported_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "ref.yaml",
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: payments\n  - name: raw\n    address: 127.0.0.1:0\n    protocol: tcp\n    cluster: ledger\nclusters:\n  - name: payment\n    endpoints: [127.0.0.1:9]\n",
    );
    let (code, out) = check(&p);
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    let file = p.display().to_string();
    assert_eq!(
        lines,
        [
            format!("{file}:6:9: unknown cluster `payments` (hint: did you mean `payment`?)"),
            format!("{file}:10:5: unknown cluster `ledger`"),
        ]
    );
}

#[test]
fn a_mesh_member_config_says_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "member.yaml",
        "mesh:\n  node_id: 1\n  listen: 127.0.0.1:0\n  data_dir: /tmp/m1\n  members:\n    1: node1.mesh.internal:7946\n",
    );
    let (code, out) = check(&path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("note: mesh.node_id, data_dir"), "{out}");
    assert!(out.contains("restart it"), "{out}");
}

#[test]
fn unreadable_file_fails_clearly() {
    let (code, out) = check(Path::new("/nonexistent/outrigger.yaml"));
    assert_eq!(code, 1);
    assert!(
        out.starts_with("/nonexistent/outrigger.yaml: cannot read config:"),
        "{out}"
    );
}

#[test]
fn every_shipped_config_and_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Every YAML file shipped in config/ and examples/, each with its summary: a file added,
    // removed or no longer understood in full shows up here. A mesh member's summary ends with
    // the note on what needs a restart. An example whose certificates a script makes
    // (`NAME-pki.sh`) is checked in a copy beside the ones the script makes: see `staged`.
    macro_rules! member {
        ($summary:literal) => {
            concat!(
                $summary,
                "\nnote: mesh.node_id, data_dir, role, listen, members and timings take effect at start; a running sidecar keeps its config and logs an error on a reload that changes them: restart it instead"
            )
        };
    }
    let expected = [
        (
            "config/outrigger.yaml",
            "ok: 2 listeners, 1 routes, 1 clusters",
        ),
        (
            "examples/canary.yaml",
            "ok: 1 listeners, 2 routes, 2 clusters",
        ),
        (
            "examples/dns-srv.yaml",
            "ok: 1 listeners, 1 routes, 1 clusters",
        ),
        (
            "examples/gateway-cqrs.yaml",
            "ok: 1 listeners, 2 routes, 2 clusters",
        ),
        (
            "examples/grpc.yaml",
            "ok: 1 listeners, 1 routes, 1 clusters",
        ),
        (
            "examples/mesh-rate-limit.yaml",
            member!("ok: 1 listeners, 2 routes, 1 clusters"),
        ),
        (
            "examples/mtls.yaml",
            "ok: 2 listeners, 2 routes, 2 clusters",
        ),
        (
            "examples/quickstart.yaml",
            "ok: 2 listeners, 2 routes, 2 clusters",
        ),
        (
            "examples/registry.yaml",
            member!("ok: 2 listeners, 2 routes, 2 clusters"),
        ),
        (
            "examples/resilient.yaml",
            "ok: 1 listeners, 2 routes, 2 clusters",
        ),
        (
            "examples/sharded.yaml",
            "ok: 1 listeners, 2 routes, 4 clusters",
        ),
        ("examples/tcp.yaml", "ok: 1 listeners, 0 routes, 1 clusters"),
    ];
    let mut found = Vec::new();
    for dir in ["config", "examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let name = path.file_name().unwrap().to_str().unwrap();
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    found.sort();
    let names: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
    assert_eq!(found, names, "the shipped config files");
    let results: Vec<(i32, String)> = names
        .iter()
        .map(|name| {
            let (code, out) = check(&staged::staged(&root.join(name)).path);
            (code, out.trim().to_owned())
        })
        .collect();
    let want: Vec<(i32, String)> = expected
        .iter()
        .map(|(_, summary)| (0, (*summary).to_owned()))
        .collect();
    assert_eq!(results, want, "{names:?}");
}

#[test]
fn default_config_summary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = check(&root.join("config/outrigger.yaml"));
    assert_eq!(
        (code, out.trim()),
        (0, "ok: 2 listeners, 1 routes, 1 clusters")
    );
}
