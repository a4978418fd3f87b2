//! The compose mesh of `docker/compose.yaml`, for real: the images of `docker/build.sh`, sidecars
//! sharing their apps' network namespaces, mutual TLS between them, the Raft group and the
//! registry, and what operators do to containers: kill, stop, disconnect, edit the mounted config.
//!
//! These need a Docker engine and the images, so they are `#[ignore]`d in a plain `cargo test`;
//! `.ci/run` builds the images and runs them (`cargo test --test containers -- --ignored`), or
//! says loudly that it could not. Each test brings up its own compose project from a copy of
//! `docker/` in a temporary folder, with a fresh demo PKI, and takes it down when it ends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::*;

/// Deadline of every wait: far above what any step takes on a loaded machine.
const WAIT: Duration = Duration::from_secs(90);
/// The instances of the mesh: (instance, service).
const INSTANCES: [(&str, &str); 4] = [("a-1", "a"), ("b-1", "b"), ("b-2", "b"), ("c-1", "c")];
/// The Raft voters, by node id order.
const VOTERS: [&str; 3] = ["a-1", "b-1", "c-1"];

/// One compose project: the mesh, in its own folder, taken down on drop.
struct Mesh {
    dir: tempfile::TempDir,
    project: String,
    /// Published ports, looked up once: `docker-compose port` takes a while.
    ports: Mutex<std::collections::HashMap<(String, u16), SocketAddr>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to its end; its output, whatever the exit status.
fn run(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command that must succeed; its stdout.
fn ok(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let out = run(program, args, dir);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Mesh {
    /// Brings the mesh up and waits until every instance is registered and a request crosses it.
    async fn up(name: &str) -> Mesh {
        let images = run(
            "docker",
            &[
                "image",
                "inspect",
                "outrigger:dev",
                "outrigger-mesh-app:dev",
            ],
            None,
        );
        assert!(
            images.status.success(),
            "the images are missing: run `bash docker/build.sh` first"
        );
        let dir = tempfile::tempdir().unwrap();
        for file in ["compose.yaml", "prometheus.yml"] {
            std::fs::copy(root().join("docker").join(file), dir.path().join(file)).unwrap();
        }
        for (instance, _) in INSTANCES {
            let to = dir.path().join("mesh").join(instance);
            std::fs::create_dir_all(&to).unwrap();
            std::fs::copy(
                root()
                    .join("docker/mesh")
                    .join(instance)
                    .join("outrigger.yaml"),
                to.join("outrigger.yaml"),
            )
            .unwrap();
        }
        let pki = root().join("docker/mesh/pki.sh");
        ok(
            "bash",
            &[
                pki.to_str().unwrap(),
                dir.path().join("mesh").to_str().unwrap(),
            ],
            None,
        );
        let project = format!("outrigger-{name}-{}", std::process::id());
        let mesh = Mesh {
            dir,
            project,
            ports: Mutex::default(),
        };
        let compose = mesh.clone_args();
        tokio::task::spawn_blocking(move || {
            let mut args: Vec<&str> = compose.iter().map(String::as_str).collect();
            args.extend(["up", "-d", "--quiet-pull"]);
            ok("docker-compose", &args, None);
        })
        .await
        .unwrap();
        let registered = eventually(WAIT, || async {
            let Some(registry) = mesh.admin_json("a-1", "/registry").await else {
                return false;
            };
            INSTANCES.iter().all(|(instance, service)| {
                registry["services"][service]["instances"]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|i| i["id"] == *instance))
            })
        })
        .await;
        assert!(registered, "every instance registered:\n{}", mesh.logs());
        let crossing = eventually(WAIT, || async {
            matches!(mesh.get("a-1", "/chain").await, Ok((StatusCode::OK, _)))
        })
        .await;
        assert!(crossing, "a request crosses the mesh:\n{}", mesh.logs());
        mesh
    }

    /// `docker-compose -p PROJECT -f FILE` as owned strings.
    fn clone_args(&self) -> Vec<String> {
        let file = self.dir.path().join("compose.yaml");
        vec![
            "-p".into(),
            self.project.clone(),
            "-f".into(),
            file.to_str().unwrap().into(),
        ]
    }

    /// Runs `docker-compose ARGS` on this project (blocking; short commands only).
    fn compose(&self, args: &[&str]) -> String {
        let base = self.clone_args();
        let mut all: Vec<&str> = base.iter().map(String::as_str).collect();
        all.extend(args);
        ok("docker-compose", &all, None)
    }

    /// Like `compose`, off the async runtime, for commands that wait (stop, kill).
    async fn compose_wait(&self, args: &[&str]) -> String {
        let mut all = self.clone_args();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        tokio::task::spawn_blocking(move || {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            ok("docker-compose", &all, None)
        })
        .await
        .unwrap()
    }

    /// The container name of a compose service.
    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// Where the host reaches a published port of an instance.
    fn port(&self, instance: &str, port: u16) -> SocketAddr {
        let key = (instance.to_owned(), port);
        if let Some(addr) = self.ports.lock().unwrap().get(&key) {
            return *addr;
        }
        let addr = self
            .compose(&["port", instance, &port.to_string()])
            .trim()
            .parse()
            .unwrap();
        self.ports.lock().unwrap().insert(key, addr);
        addr
    }

    /// GET on an instance's app: status and body.
    async fn get(&self, instance: &str, path: &str) -> Result<(StatusCode, String), String> {
        let url = format!("http://{}{path}", self.port(instance, 8080));
        get(&h1_client(), &url).await.map(|(s, _, b)| (s, b))
    }

    /// GET on an instance's sidecar admin port: status and body.
    async fn admin(&self, instance: &str, path: &str) -> Result<(StatusCode, String), String> {
        let url = format!("http://{}{path}", self.port(instance, 9901));
        get(&h1_client(), &url).await.map(|(s, _, b)| (s, b))
    }

    /// An admin JSON answer, when it is a 200.
    async fn admin_json(&self, instance: &str, path: &str) -> Option<serde_json::Value> {
        match self.admin(instance, path).await {
            Ok((StatusCode::OK, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The voter that leads, as every reachable voter in `among` sees it, if they agree.
    async fn leader(&self, among: &[&str]) -> Option<String> {
        let mut seen = Vec::new();
        for voter in among {
            let mesh = self.admin_json(voter, "/mesh").await?;
            seen.push(mesh["leader"].as_u64()?);
        }
        let first = *seen.first()?;
        let leader = VOTERS[(first as usize).checked_sub(1)?];
        (seen.iter().all(|l| *l == first) && among.contains(&leader)).then(|| leader.to_owned())
    }

    /// Every container's log, for failure messages.
    fn logs(&self) -> String {
        let base = self.clone_args();
        let mut all: Vec<&str> = base.iter().map(String::as_str).collect();
        all.extend(["logs", "--no-color", "--tail", "40"]);
        let out = run("docker-compose", &all, None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let base = self.clone_args();
        let mut all: Vec<&str> = base.iter().map(String::as_str).collect();
        all.extend(["down", "-v", "-t", "1", "--remove-orphans"]);
        let _ = run("docker-compose", &all, None);
    }
}

/// Requests sent in a loop by a few callers until told to stop; every failure is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    paths: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `callers` loops of `GET url`.
    fn start(url: String, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let tasks = (0..callers)
            .map(|_| {
                let (stop, ok, failures, paths) =
                    (stop.clone(), ok.clone(), failures.clone(), paths.clone());
                let url = url.clone();
                tokio::spawn(async move {
                    let client = h1_client();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&client, &url).await {
                            Ok((StatusCode::OK, _, body)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *paths.lock().unwrap().entry(body).or_default() += 1;
                            }
                            other => failures.lock().unwrap().push(format!("{other:?}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            paths,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests succeeded (or one failed).
    async fn run_for(&self, more: u64) {
        let target = self.ok() + more;
        let done = eventually(WAIT, || async {
            self.ok() >= target || !self.failures.lock().unwrap().is_empty()
        })
        .await;
        assert!(done, "the load stalled at {} answers", self.ok());
    }

    /// Stops the callers: (answered, failures, bodies seen with their counts).
    async fn finish(self) -> (u64, Vec<String>, Vec<(String, u64)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let paths = self.paths.lock().unwrap().clone().into_iter().collect();
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, paths)
    }
}

/// The compose mesh's Prometheus scrape config is valid (promtool, as Prometheus would load it)
/// and scrapes every sidecar's admin port. Needs no Docker engine.
#[test]
fn the_scrape_config_passes_promtool_and_names_every_sidecar() {
    let file = root().join("docker/prometheus.yml");
    let out = run(
        "promtool",
        &["check", "config", file.to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "promtool (Debian's `prometheus`; .ci/run installs it): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    for (instance, _) in INSTANCES {
        assert!(
            text.contains(&format!("{instance}.data:9901")),
            "{instance}"
        );
    }
}

/// Scenario 1: a request goes app → sidecar → sidecar → app across three services, balanced over
/// both instances of `b`, with mutual TLS between the sidecars; the image is small, non-root,
/// healthy by its own probe, and trusts the system's CA roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the images of docker/build.sh: .ci/run runs it"]
async fn requests_cross_the_mesh_between_sidecars_over_mutual_tls() {
    let image: serde_json::Value =
        serde_json::from_str(&ok("docker", &["image", "inspect", "outrigger:dev"], None)).unwrap();
    let size = image[0]["Size"].as_u64().unwrap();
    let config = &image[0]["Config"];
    println!("image outrigger:dev: {:.1} MB", size as f64 / 1e6);
    assert!(size < 30_000_000, "the image is under 30 MB: {size}");
    assert_eq!(config["User"], "65532:65532", "runs as non-root");
    assert_eq!(config["Healthcheck"]["Test"][1], "/outrigger");

    let mesh = Mesh::up("cross").await;
    let load = Load::start(format!("http://{}/chain", mesh.port("a-1", 8080)), 2);
    load.run_for(100).await;
    let (answered, failures, paths) = load.finish().await;
    println!("cross: {answered} answered, paths {paths:?}");
    assert_eq!(failures, Vec::<String>::new());
    let names: Vec<&str> = paths.iter().map(|(p, _)| p.trim_end()).collect();
    assert_eq!(
        names,
        ["a-1 -> b-1 -> c-1", "a-1 -> b-2 -> c-1"],
        "both instances of b serve"
    );

    // The calls into b's sidecars were TLS handshakes that presented a mesh certificate...
    let (_, metrics) = mesh.admin("b-1", "/metrics").await.unwrap();
    let series = "outrigger_tls_handshakes_total{listener=\"inbound\",result=\"ok\"}";
    assert!(metric(&metrics, series) >= 1.0, "{series} in\n{metrics}");
    // ...and the inbound listener serves nobody without one: plain HTTP gets no answer.
    let inbound = format!("http://{}/chain", mesh.port("b-1", 15006));
    let plain = get(&h1_client(), &inbound).await;
    assert!(
        plain.is_err(),
        "plain HTTP into the mesh is refused: {plain:?}"
    );
    let failed = "outrigger_tls_handshakes_total{listener=\"inbound\",result=\"failed\"}";
    let (_, metrics) = mesh.admin("b-1", "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, failed),
        1.0,
        "counted as a failed handshake"
    );

    // The callers of c share a mesh-wide limit: both hold a leased share, none fell back.
    // (The limit is split once the leader has heard from both.)
    let shares = |m: &str| {
        (
            metric(m, "outrigger_mesh_rate_limit_share{limit=\"to-c\"}"),
            metric(m, "outrigger_mesh_rate_limit_fallback{limit=\"to-c\"}"),
        )
    };
    let split = eventually(WAIT, || async {
        let mut held = true;
        for instance in ["b-1", "b-2"] {
            let (_, m) = mesh.admin(instance, "/metrics").await.unwrap();
            let (share, fallback) = shares(&m);
            held &= share > 0.0 && share < 2000.0 && fallback == 0.0;
        }
        held
    })
    .await;
    assert!(split, "both callers of c hold a share of the limit");
    for instance in ["b-1", "b-2"] {
        let (_, metrics) = mesh.admin(instance, "/metrics").await.unwrap();
        let (share, _) = shares(&metrics);
        println!("cross: {instance} holds a share of {share:.0}/s of 2000/s");
        // Once a share is held, a steady group never lets the grant lapse (the first refresh,
        // sent while the group was still electing, may). Watched over four more refreshes, two
        // grant periods.
        let service = format!("{instance}-sidecar");
        let lapses = || {
            mesh.compose(&["logs", "--no-color", &service])
                .matches("no share of the mesh-wide rate limits")
                .count()
        };
        let refreshes = |m: &str| {
            metric(
                m,
                "outrigger_mesh_rate_limit_refreshes_total{result=\"ok\"}",
            )
        };
        let (before, from) = (lapses(), refreshes(&metrics));
        let watched = eventually(WAIT, || async {
            let (_, m) = mesh.admin(instance, "/metrics").await.unwrap();
            refreshes(&m) >= from + 4.0
        })
        .await;
        assert!(watched, "{instance} keeps refreshing");
        assert_eq!(lapses(), before, "a healthy group never lets a grant lapse");
    }

    // Every sidecar reports healthy through the image's HEALTHCHECK (`outrigger probe`).
    for (instance, _) in INSTANCES {
        let container = mesh.container(&format!("{instance}-sidecar"));
        let healthy = eventually(WAIT, || async {
            ok(
                "docker",
                &["inspect", "-f", "{{.State.Health.Status}}", &container],
                None,
            )
            .trim()
                == "healthy"
        })
        .await;
        assert!(healthy, "{container} becomes healthy");
    }

    // The image trusts the system's CA roots: a cluster with TLS and no `ca` is accepted.
    let tls = mesh.dir.path().join("roots");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(
        tls.join("outrigger.yaml"),
        "listeners:\n  - name: out\n    address: 127.0.0.1:15001\n    routes:\n      - name: api\n        cluster: api\nclusters:\n  - name: api\n    endpoints: [example.com:443]\n    tls: {}\n",
    )
    .unwrap();
    let volume = format!("{}:/cfg:ro", tls.display());
    let checked = ok(
        "docker",
        &[
            "run",
            "--rm",
            "-v",
            &volume,
            "outrigger:dev",
            "check",
            "--config",
            "/cfg/outrigger.yaml",
        ],
        None,
    );
    assert!(checked.starts_with("ok:"), "{checked}");
}

/// Scenario 4: editing the config file in the folder mounted into a sidecar reloads it inside
/// the container: a route added for service `c` serves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the images of docker/build.sh: .ci/run runs it"]
async fn an_edit_of_the_mounted_config_is_reloaded_inside_the_container() {
    let mesh = Mesh::up("reload").await;
    let before = mesh.get("a-1", "/call/c").await.unwrap();
    assert_eq!(
        before.0,
        StatusCode::NOT_FOUND,
        "no route to c yet: {before:?}"
    );

    let path = mesh.dir.path().join("mesh/a-1/outrigger.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text
        .replace(
            "        cluster: b\n",
            "        cluster: b\n      - name: to-c\n        match: { host: c }\n        cluster: c\n",
        )
        .replace(
            "\nmesh:",
            "  - name: c\n    registry: { service: c }\n    tls: { ca: pki/ca.pem, cert: pki/cert.pem, key: pki/key.pem, server_name: c.mesh }\n\nmesh:",
        );
    assert_ne!(edited, text);
    // As editors save: a new file renamed over the old one.
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();

    let mut polls = 0u32;
    let served = eventually(WAIT, || {
        polls += 1;
        async { matches!(mesh.get("a-1", "/call/c").await, Ok((StatusCode::OK, ref b)) if b.trim_end() == "c-1") }
    })
    .await;
    assert!(served, "the new route serves:\n{}", mesh.logs());
    // How long the reload took, from the file's mtime to the sidecar's log line (one clock).
    let logs = mesh.compose(&["logs", "--no-color", "a-1-sidecar"]);
    let reloaded = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.split_once("| ")?.1).ok())
        .find(|v| v["message"] == "config reloaded")
        .expect("the sidecar logged the reload");
    let at = humantime::parse_rfc3339(reloaded["timestamp"].as_str().unwrap()).unwrap();
    let took = at.duration_since(written).unwrap_or_default();
    println!("reload: logged {took:?} after the write; served after {polls} polls");
}

/// Scenario 2: `docker kill` of one instance of `b` under load: its callers retry on the other
/// instance and fail no request, until the registry drops the dead one (lease expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the images of docker/build.sh: .ci/run runs it"]
async fn killing_an_upstream_instance_under_load_fails_no_request() {
    let mesh = Mesh::up("kill").await;
    let load = Load::start(format!("http://{}/chain", mesh.port("a-1", 8080)), 4);
    load.run_for(100).await;
    let at_kill = load.ok();
    mesh.compose_wait(&["kill", "b-2"]).await;
    // Until the registry has let the dead instance go (its lease ran out), and a while after.
    let gone = eventually(WAIT, || async {
        mesh.admin_json("a-1", "/registry")
            .await
            .and_then(|r| {
                r["services"]["b"]["instances"]
                    .as_array()
                    .map(|l| l.len() == 1)
            })
            .unwrap_or(false)
    })
    .await;
    assert!(gone, "the killed instance leaves the registry");
    load.run_for(100).await;
    let (answered, failures, paths) = load.finish().await;
    println!(
        "kill: {answered} answered ({} after the kill), {} failed, paths {paths:?}",
        answered - at_kill,
        failures.len()
    );
    assert_eq!(failures, Vec::<String>::new(), "no request failed");
}

/// Scenario 5: `docker stop` of a sidecar under load: it leaves the registry, drains and exits
/// 0, and its callers fail no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the images of docker/build.sh: .ci/run runs it"]
async fn stopping_a_sidecar_under_load_drains_it_without_a_failed_request() {
    let mesh = Mesh::up("stop").await;
    let load = Load::start(format!("http://{}/chain", mesh.port("a-1", 8080)), 4);
    load.run_for(100).await;
    let at_stop = load.ok();
    mesh.compose_wait(&["stop", "-t", "15", "b-1-sidecar"])
        .await;
    let container = mesh.container("b-1-sidecar");
    let exit = ok(
        "docker",
        &["inspect", "-f", "{{.State.ExitCode}}", &container],
        None,
    );
    load.run_for(200).await;
    let (answered, failures, paths) = load.finish().await;
    println!(
        "stop: exit {}; {answered} answered ({} after the stop), {} failed, paths {paths:?}",
        exit.trim(),
        answered - at_stop,
        failures.len()
    );
    assert_eq!(exit.trim(), "0", "the sidecar drained and exited 0");
    assert_eq!(failures, Vec::<String>::new(), "no request failed");
    let (_, logs) = ((), mesh.compose(&["logs", "--no-color", "b-1-sidecar"]));
    assert!(
        logs.contains("\"drained\":true"),
        "drained in time:\n{logs}"
    );
}

/// Scenario 3: a Raft member cut off by `docker network disconnect` (a real partition) while
/// the majority keeps writing; the cut-off sidecar keeps routing on what it knew and catches up
/// when reconnected; then `docker kill` of the leader: the others elect a new one and the
/// registry stays readable and writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the images of docker/build.sh: .ci/run runs it"]
async fn the_raft_group_survives_a_partition_and_the_death_of_its_leader() {
    let mesh = Mesh::up("raft").await;
    let leader = eventually_value(|| mesh.leader(&VOTERS)).await;
    // Cut off a member that routes (a-1 calls b, b-1 calls c), not the leader.
    let cut = ["b-1", "a-1"].into_iter().find(|v| *v != leader).unwrap();
    let network = format!("{}_raft", mesh.project);
    ok(
        "docker",
        &["network", "disconnect", &network, &mesh.container(cut)],
        None,
    );
    // A write on the majority side: b-2's sidecar stops and deregisters it.
    mesh.compose_wait(&["stop", "-t", "15", "b-2-sidecar"])
        .await;
    let majority: Vec<&str> = VOTERS.iter().copied().filter(|v| *v != cut).collect();
    // (The cut-off member cannot renew its own lease either: the majority lets it expire, as it
    // would for a crashed one.)
    let written = eventually(WAIT, || async {
        match mesh.admin(majority[0], "/registry/b?consistent=true").await {
            Ok((StatusCode::OK, body)) => !body.contains("\"id\":\"b-2\""),
            _ => false,
        }
    })
    .await;
    assert!(
        written,
        "the majority commits the deregistration:\n{}",
        mesh.logs()
    );
    // The cut-off member still holds the old set, and keeps routing on it.
    let (_, stale) = mesh.admin(cut, "/registry").await.unwrap();
    assert!(
        stale.contains("\"id\": \"b-2\""),
        "the cut-off member cannot have heard of the write: {stale}"
    );
    let refused = mesh
        .admin(cut, "/registry/b?consistent=true")
        .await
        .unwrap();
    assert_ne!(
        refused.0,
        StatusCode::OK,
        "no linearizable read without a quorum"
    );
    for _ in 0..20 {
        let (status, body) = mesh.get(cut, "/chain").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{cut} routes while cut off: {body}");
    }
    // Reconnected, it catches up.
    ok(
        "docker",
        &[
            "network",
            "connect",
            "--alias",
            &format!("{cut}.raft"),
            &network,
            &mesh.container(cut),
        ],
        None,
    );
    let caught_up = eventually(WAIT, || async {
        mesh.admin_json(cut, "/registry")
            .await
            .and_then(|r| {
                r["services"]["b"]["instances"]
                    .as_array()
                    .map(|l| l.len() == 1)
            })
            .unwrap_or(false)
    })
    .await;
    assert!(
        caught_up,
        "the reconnected member catches up:\n{}",
        mesh.logs()
    );

    // The leader dies.
    let leader = eventually_value(|| mesh.leader(&VOTERS)).await;
    let survivors: Vec<&str> = VOTERS.iter().copied().filter(|v| *v != leader).collect();
    mesh.compose_wait(&["kill", &format!("{leader}-sidecar")])
        .await;
    let container = mesh.container(&format!("{leader}-sidecar"));
    let killed_at = ok(
        "docker",
        &["inspect", "-f", "{{.State.FinishedAt}}", &container],
        None,
    );
    let new_leader = eventually_value(|| mesh.leader(&survivors)).await;
    // Failover time: from the kill to the new leader's first act (one clock: the engine's).
    let logs = mesh.compose(&["logs", "--no-color", &format!("{new_leader}-sidecar")]);
    let killed_at = humantime::parse_rfc3339(killed_at.trim()).ok();
    let elected = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.split_once("| ")?.1).ok())
        .filter(|v| v["message"] == "mesh leader: lease clock started")
        .filter_map(|v| humantime::parse_rfc3339(v["timestamp"].as_str()?).ok())
        .next_back();
    if let (Some(k), Some(e)) = (killed_at, elected) {
        println!(
            "raft: {new_leader} leads {:?} after the kill of {leader}",
            e.duration_since(k).unwrap_or_default()
        );
    } else {
        println!("raft: {new_leader} leads after the kill of {leader}");
    }
    // Readable and writable: b-2 comes back and registers through the new leader.
    mesh.compose_wait(&["start", "b-2-sidecar"]).await;
    let registered = eventually(WAIT, || async {
        matches!(
            mesh.admin(&new_leader, "/registry/b?consistent=true").await,
            Ok((StatusCode::OK, b)) if b.contains("\"id\":\"b-2\"")
        )
    })
    .await;
    assert!(
        registered,
        "the group takes writes after the failover:\n{}",
        mesh.logs()
    );
    // The killed member restarts from its store, rejoins under the new leader and catches up;
    // then a request crosses the whole mesh again (its app had no sidecar meanwhile).
    mesh.compose_wait(&["start", &format!("{leader}-sidecar")])
        .await;
    let rejoined = eventually(WAIT, || async {
        let Some(m) = mesh.admin_json(&leader, "/mesh").await else {
            return false;
        };
        let held = mesh.admin(&leader, "/registry").await;
        m["leader"].as_u64().map(|l| VOTERS[l as usize - 1]) == Some(new_leader.as_str())
            && matches!(held, Ok((StatusCode::OK, r)) if r.contains("\"id\": \"b-2\""))
    })
    .await;
    assert!(
        rejoined,
        "the restarted member rejoins and catches up:\n{}",
        mesh.logs()
    );
    let load = Load::start(format!("http://{}/chain", mesh.port("a-1", 8080)), 2);
    load.run_for(50).await;
    let (answered, failures, paths) = load.finish().await;
    println!("raft: after the rejoin {answered} answered, paths {paths:?}");
    assert_eq!(failures, Vec::<String>::new(), "{answered} answered");
}

/// Polls `f` every 50 ms until it gives a value (for at most about `WAIT`).
async fn eventually_value<F, Fut, T>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..WAIT.as_millis() / 50 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the value never came");
}
