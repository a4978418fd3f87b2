//! The embedded Raft group with real processes: three `outrigger` sidecars form a group from
//! their configs alone, lose their leader to `kill -9` under a steady write load without losing
//! an acknowledged write, and the killed member catches up from its data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use support::pki::{self, Ca};
use support::{
    body, eventually, get, h1_client, h2_client, member_list, send, HttpClient, Process,
};

/// Polls `f` every 20 ms until it gives a value, for at most `within`.
async fn until<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..within.as_millis() / 20 {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A free loopback port that stays reserved while the member on it is killed and restarted.
fn free_port(ip: &str) -> u16 {
    support::ReservedPort::for_the_run(ip)
}

struct Member {
    id: u64,
    mesh: String,
    config: std::path::PathBuf,
    process: Option<Process>,
}

fn write_config(dir: &Path, id: u64, members: &[(u64, String)]) -> std::path::PathBuf {
    let me = members.iter().find(|(i, _)| *i == id).unwrap().1.clone();
    write_member_config(dir, id, &me, "voter", members)
}

fn write_member_config(
    dir: &Path,
    id: u64,
    me: &str,
    role: &str,
    members: &[(u64, String)],
) -> std::path::PathBuf {
    let list = member_list(members);
    let path = dir.join(format!("node{id}.yaml"));
    let data = dir.join(format!("data{id}"));
    std::fs::write(
        &path,
        format!(
            "admin:\n  address: 127.0.0.1:0\nmesh:\n  node_id: {id}\n  role: {role}\n  listen: {me}\n  data_dir: {}\n  members:\n{list}",
            data.display()
        ),
    )
    .unwrap();
    path
}

/// Starts three voter processes on 127.0.0.{ip_base + id} and waits for them to agree on a
/// leader; returns the members, the processes, and the leader with its term.
async fn start_group(dir: &Path, ip_base: u8) -> (Vec<(u64, String)>, Vec<Member>, (u64, u64)) {
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| {
            let ip = format!("127.0.0.{}", u64::from(ip_base) + i);
            (i, format!("{ip}:{}", free_port(&ip)))
        })
        .collect();
    let mut group: Vec<Member> = members
        .iter()
        .map(|(id, mesh)| Member {
            id: *id,
            mesh: mesh.clone(),
            config: write_config(dir, *id, &members),
            process: None,
        })
        .collect();
    for m in &mut group {
        m.process = Some(Process::start(&m.config));
    }
    let leader = until(Duration::from_secs(30), || agreed_leader(&group))
        .await
        .expect("the group elected no leader from its configs");
    (members, group, leader)
}

async fn mesh_status(p: &Process) -> Option<serde_json::Value> {
    let (status, _, text) = get(&h1_client(), &p.admin_url("/mesh")).await.ok()?;
    (status == StatusCode::OK).then(|| serde_json::from_str(&text).ok())?
}

/// The member every running member agrees leads, with its term.
async fn agreed_leader(members: &[Member]) -> Option<(u64, u64)> {
    let mut seen = BTreeSet::new();
    let mut leader_term = None;
    for m in members {
        let Some(p) = &m.process else { continue };
        let s = mesh_status(p).await?;
        let leader = s["leader"].as_u64()?;
        seen.insert(leader);
        if s["state"] == "leader" {
            leader_term = Some((leader, s["term"].as_u64()?));
        }
    }
    match (seen.len(), leader_term) {
        (1, Some(lt)) if seen.contains(&lt.0) => Some(lt),
        _ => None,
    }
}

/// POSTs to the mesh API at `addr`, following redirects to the leader.
async fn post(
    client: &HttpClient,
    addr: &str,
    path: &str,
    json: &str,
) -> Option<serde_json::Value> {
    let mut url = format!("http://{addr}{path}");
    for _ in 0..4 {
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .body(body(json.to_owned()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), send(client, req))
            .await
            .ok()?
            .ok()?;
        match resp.0 {
            StatusCode::OK => return serde_json::from_str(&resp.2).ok(),
            StatusCode::TEMPORARY_REDIRECT => {
                url = resp.1.get("location")?.to_str().ok()?.to_owned();
            }
            _ => return None,
        }
    }
    None
}

/// With `mesh.tls`, three members form their group over mutual TLS, a follower's admin port
/// reaches the leader through it, and the mesh port refuses a caller without a certificate the
/// mesh's CA signed (curl as the caller).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_group_forms_and_refuses_callers_without_a_mesh_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh ca");
    let ca_path = pki::write(dir.path(), "ca.pem", &ca.pem);
    let stranger = Ca::new("another ca");
    let members: Vec<(u64, String)> = (1..=3)
        .map(|i| {
            let ip = format!("127.0.0.{}", 60 + i);
            (i, format!("{ip}:{}", free_port(&ip)))
        })
        .collect();
    let mut group = Vec::new();
    for (id, addr) in &members {
        let ip = addr.rsplit_once(':').unwrap().0;
        let (cert, key) = pki::write_leaf(dir.path(), &format!("n{id}"), &ca.leaf(&[ip]));
        let config = write_config(dir.path(), *id, &members);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "  tls:\n    cert: {}\n    key: {}\n    ca: {}\n",
            cert.display(),
            key.display(),
            ca_path.display()
        ));
        std::fs::write(&config, text).unwrap();
        group.push(Member {
            id: *id,
            mesh: addr.clone(),
            process: Some(Process::start(&config)),
            config,
        });
    }
    let (leader, _) = until(Duration::from_secs(30), || agreed_leader(&group))
        .await
        .expect("the group elected no leader over mutual TLS");
    let follower = group
        .iter()
        .find(|m| m.id != leader)
        .and_then(|m| m.process.as_ref())
        .unwrap();
    let (code, _, text) = get(
        &h1_client(),
        &follower.admin_url("/registry?consistent=true"),
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::OK, "{text}");

    let url = format!("https://{}/v1/registry", members[0].1);
    // curl to the mesh port, presenting `identity` (certificate, key) if given.
    let curl = |identity: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&ca_path);
        if let Some((cert, key)) = identity {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd.arg(&url);
        async move { cmd.output().await.unwrap() }
    };
    let caller = pki::write_leaf(dir.path(), "caller", &ca.leaf(&["caller.mesh"]));
    let ok = curl(Some(caller)).await;
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("\"services\""),
        "{ok:?}"
    );
    let none = curl(None).await;
    assert!(
        !none.status.success(),
        "no client certificate was accepted: {none:?}"
    );
    let stranger = pki::write_leaf(dir.path(), "stranger", &stranger.leaf(&["stranger"]));
    let foreign = curl(Some(stranger)).await;
    assert!(
        !foreign.status.success(),
        "a foreign CA's certificate was accepted: {foreign:?}"
    );
    let plain = get(
        &h2_client(),
        &format!("http://{}/v1/registry", members[0].1),
    )
    .await;
    assert!(plain.is_err(), "cleartext was answered: {plain:?}");
}

/// POSTs to a sidecar's admin API over HTTP/1.1, as an operator's curl would.
async fn admin_post(p: &Process, path: &str, json: &str) -> Option<serde_json::Value> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(p.admin_url(path))
        .body(body(json.to_owned()))
        .unwrap();
    let (status, _, text) = tokio::time::timeout(Duration::from_secs(15), send(&h1_client(), req))
        .await
        .ok()?
        .ok()?;
    (status == StatusCode::OK).then(|| serde_json::from_str(&text).ok())?
}

async fn registry_ids(p: &Process) -> BTreeSet<String> {
    registry_ids_of(p, "load").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_kill_9_of_its_leader_without_losing_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut group, (leader, term)) = start_group(dir.path(), 10).await;

    // A steady write load through every member, recording what was acknowledged.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<String> = group.iter().map(|m| m.mesh.clone()).collect();
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let client = h2_client();
            let mut n = 0u64;
            // Bounded: stops when told, or after 2,000 attempts.
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                n += 1;
                let id = format!("w{n}");
                let reg = format!(
                    r#"{{"service":"load","id":"{id}","address":"10.1.0.1","port":80,"ttl_ms":600000}}"#
                );
                let addr = &addrs[n as usize % addrs.len()];
                match post(&client, addr, "/v1/registry/register", &reg).await {
                    Some(v) if v["result"] == "registered" => {
                        acked.lock().unwrap().insert(id);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    };
    let count = |acked: &Arc<Mutex<BTreeSet<String>>>| acked.lock().unwrap().len();
    assert!(
        eventually(Duration::from_secs(30), || async { count(&acked) >= 30 }).await,
        "writes were not acknowledged"
    );

    // kill -9 of the leader, mid-load.
    let killed = &mut group[leader as usize - 1];
    let mut process = killed.process.take().unwrap();
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    drop(process);
    let before = count(&acked);
    let (new_leader, _) = until(Duration::from_secs(30), || async {
        agreed_leader(&group).await.filter(|(_, t)| *t > term)
    })
    .await
    .expect("no new leader after the leader was killed");
    assert_ne!(new_leader, leader);
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&acked) >= before + 30
        })
        .await,
        "writes did not resume under the new leader"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged write is on the new leader and on the surviving follower.
    for m in group.iter().filter(|m| m.process.is_some()) {
        let p = m.process.as_ref().unwrap();
        let held = until(Duration::from_secs(20), || async {
            Some(registry_ids(p).await).filter(|h| acked.is_subset(h))
        })
        .await
        .unwrap_or_default();
        let lost: Vec<_> = acked.difference(&held).collect();
        assert!(
            lost.is_empty(),
            "member {} lost acknowledged writes {lost:?}",
            m.id
        );
    }

    // The killed member restarts from its data directory and catches up.
    let killed = &mut group[leader as usize - 1];
    killed.process = Some(Process::start(&killed.config));
    let p = killed.process.as_ref().unwrap();
    let held = until(Duration::from_secs(30), || async {
        Some(registry_ids(p).await).filter(|h| acked.is_subset(h))
    })
    .await
    .unwrap_or_default();
    let lost: Vec<_> = acked.difference(&held).collect();
    assert!(lost.is_empty(), "the restarted member is missing {lost:?}");
    let status = mesh_status(p).await.unwrap();
    assert_eq!(status["state"], "follower", "{status}");
    assert_eq!(status["leader"].as_u64(), Some(new_leader), "{status}");
}

/// A config whose sidecar is the single voter of its own group, with a `registry` cluster.
fn single_voter(mesh: &str, data: &Path, origin_route: bool) -> String {
    let listener = if origin_route {
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: api\n"
    } else {
        ""
    };
    format!(
        "{listener}clusters:\n  - name: api\n    registry: {{ service: api }}\nmesh:\n  node_id: 1\n  listen: {mesh}\n  data_dir: {}\n  members:\n    1: {mesh}\n",
        data.display()
    )
}

/// A `registry` cluster routes to the instances registered in the group, on a member (which
/// reads its own state) and on a `role: client` sidecar (which asks the members).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_cluster_routes_to_registered_instances() {
    let origin = support::Origin::start("registered").await;
    let data = tempfile::tempdir().unwrap();
    let mesh = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let member = support::Proxy::start(&single_voter(&mesh, data.path(), true)).await;
    let client_cfg = format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: api\nclusters:\n  - name: api\n    registry: {{ service: api }}\nmesh:\n  role: client\n  members:\n    1: {mesh}\n"
    );
    let client = support::Proxy::start(&client_cfg).await;

    // Nothing registered yet: no endpoint to route to.
    let (status, _, _) = get(&h1_client(), &member.url("in", "/")).await.unwrap();
    assert!(status.is_server_error(), "{status}");

    let reg = format!(
        r#"{{"service":"api","id":"o1","address":"127.0.0.1","port":{},"ttl_ms":600000}}"#,
        origin.addr.port()
    );
    let written = until(Duration::from_secs(20), || async {
        post(&h2_client(), &mesh, "/v1/registry/register", &reg).await
    })
    .await
    .expect("registration not accepted");
    assert_eq!(written["result"], "registered");

    for proxy in [&member, &client] {
        let served = eventually(Duration::from_secs(20), || async {
            matches!(get(&h1_client(), &proxy.url("in", "/")).await,
                Ok((StatusCode::OK, _, body)) if body.contains("registered"))
        })
        .await;
        assert!(
            served,
            "the registry cluster did not route to the registered instance"
        );
        let clusters = get(&h1_client(), &proxy.admin_url("/clusters"))
            .await
            .unwrap()
            .2;
        let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
        assert_eq!(
            clusters["clusters"][0]["discovery"], "registry",
            "{clusters}"
        );
    }
    let m = support::scrape(&member).await;
    assert_eq!(
        support::metric(&m, "outrigger_mesh_registered_instances"),
        1.0,
        "{m}"
    );
    assert_eq!(support::metric(&m, "outrigger_mesh_leader"), 1.0, "{m}");
    assert!(support::metric(&m, "outrigger_mesh_term") >= 1.0, "{m}");
    assert!(
        support::metric(&m, "outrigger_mesh_proposals_total{result=\"committed\"}") >= 1.0,
        "{m}"
    );
    assert!(
        support::metric(&m, "outrigger_mesh_commit_seconds_count") >= 1.0,
        "{m}"
    );
    let metrics = support::scrape(&client).await;
    let counted = metrics.lines().any(|l| {
        l.starts_with("outrigger_discovery_updates_total{")
            && l.contains("cluster=\"api\"")
            && l.contains("source=\"registry\"")
            && l.contains("result=\"ok\"")
    });
    assert!(counted, "{metrics}");
}

/// The instance ids of `service` in the registry as member `proxy` holds it.
async fn registered(proxy: &support::Proxy, service: &str) -> Vec<String> {
    let Ok((_, _, text)) = get(&h1_client(), &proxy.admin_url("/registry")).await else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["services"][service]["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A sidecar keeps its application registered while it passes its health check, takes it out
/// when the check fails, puts it back when it passes again, and deregisters it on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_registers_its_application_only_while_it_is_healthy() {
    let origin = support::Origin::start("app").await;
    let data = tempfile::tempdir().unwrap();
    let mesh = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let member = support::Proxy::start(&single_voter(&mesh, data.path(), false)).await;
    let sidecar = support::Proxy::start(&format!(
        "mesh:
  role: client
  members:
    1: {mesh}
  register:
    service: app
    id: app-1
    address: 127.0.0.1
    port: {}
    ttl: 3s
    health_check:
      path: /health
      interval: 100ms
      unhealthy_interval: 100ms
      healthy_threshold: 1
      unhealthy_threshold: 1
",
        origin.addr.port()
    ))
    .await;
    let within = Duration::from_secs(20);
    assert!(
        eventually(within, || async {
            registered(&member, "app").await == ["app-1"]
        })
        .await,
        "a healthy application was not registered"
    );
    origin.control.set_status(500);
    assert!(
        eventually(within, || async {
            registered(&member, "app").await.is_empty()
        })
        .await,
        "an application failing its check stayed registered"
    );
    origin.control.set_status(0);
    assert!(
        eventually(within, || async {
            registered(&member, "app").await == ["app-1"]
        })
        .await,
        "a recovered application was not registered again"
    );
    assert!(sidecar.app.shutdown().await);
    // Deregistered as the drain began, not left to expire: no wait beyond the API round trip.
    assert!(registered(&member, "app").await.is_empty());
}

/// With `check_address`, the check that gates a registration goes to the application itself
/// rather than to the address callers use (which may want a client certificate): the instance is
/// registered while the application passes, although nothing answers at `address:port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_check_goes_to_check_address() {
    let origin = support::Origin::start("app").await;
    let data = tempfile::tempdir().unwrap();
    let mesh = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let member = support::Proxy::start(&single_voter(&mesh, data.path(), false)).await;
    let nobody = free_port("127.0.0.1");
    let _sidecar = support::Proxy::start(&format!(
        "mesh:
  role: client
  members:
    1: {mesh}
  register:
    service: app
    id: app-1
    address: 127.0.0.1
    port: {nobody}
    ttl: 3s
    check_address: {}
    health_check:
      path: /health
      interval: 100ms
      unhealthy_interval: 100ms
      healthy_threshold: 1
      unhealthy_threshold: 1
",
        origin.addr
    ))
    .await;
    let within = Duration::from_secs(20);
    assert!(
        eventually(within, || async {
            registered(&member, "app").await == ["app-1"]
        })
        .await,
        "the application passing at check_address was not registered"
    );
    origin.control.set_status(500);
    assert!(
        eventually(within, || async {
            registered(&member, "app").await.is_empty()
        })
        .await,
        "an application failing at check_address stayed registered"
    );
}

/// A fourth sidecar joins as a learner through a follower's admin API (which hands the change to
/// the leader) and replicates the registry, is promoted to voter, and a voter is removed; the
/// group keeps taking writes throughout, and a follower's admin port answers linearizable reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_is_promoted_and_a_voter_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (members, voters, (leader, _)) = start_group(dir.path(), 20).await;
    let follower = voters
        .iter()
        .find(|m| m.id != leader)
        .and_then(|m| m.process.as_ref())
        .unwrap();
    let learner_addr = format!("127.0.0.24:{}", free_port("127.0.0.24"));
    let learner = Process::start(&write_member_config(
        dir.path(),
        4,
        &learner_addr,
        "learner",
        &members,
    ));
    let client = h2_client();
    let any = &members[0].1;
    let join = format!(r#"{{"id":4,"address":"{learner_addr}"}}"#);
    let joined = until(Duration::from_secs(30), || {
        admin_post(follower, "/mesh/members/learner", &join)
    })
    .await
    .expect("the learner was not added");
    assert_eq!(joined["learners"], serde_json::json!([4]), "{joined}");

    let reg = r#"{"service":"load","id":"x1","address":"10.1.0.1","port":80,"ttl_ms":600000}"#;
    until(Duration::from_secs(20), || {
        post(&client, any, "/v1/registry/register", reg)
    })
    .await
    .expect("write refused");
    let replicated = until(Duration::from_secs(20), || async {
        registry_ids(&learner).await.contains("x1").then_some(())
    })
    .await;
    assert!(
        replicated.is_some(),
        "the learner did not replicate the registry"
    );
    let status = mesh_status(&learner).await.unwrap();
    assert_eq!(status["state"], "learner", "{status}");
    let (code, _, text) = get(
        &h1_client(),
        &follower.admin_url("/registry/load?consistent=true"),
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::OK, "{text}");
    let read: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(read["consistent"], true, "{read}");
    assert_eq!(
        read["services"]["load"]["instances"][0]["id"], "x1",
        "{read}"
    );

    let promoted = until(Duration::from_secs(30), || {
        admin_post(follower, "/mesh/members/promote", r#"{"id":4}"#)
    })
    .await
    .expect("the learner was not promoted");
    assert_eq!(
        promoted["voters"],
        serde_json::json!([1, 2, 3, 4]),
        "{promoted}"
    );

    let removed = until(Duration::from_secs(30), || {
        admin_post(&learner, "/mesh/members/remove", r#"{"id":1}"#)
    })
    .await
    .expect("voter 1 was not removed");
    assert_eq!(removed["voters"], serde_json::json!([2, 3, 4]), "{removed}");

    let reg = r#"{"service":"load","id":"x2","address":"10.1.0.2","port":80,"ttl_ms":600000}"#;
    until(Duration::from_secs(30), || {
        post(&client, &learner_addr, "/v1/registry/register", reg)
    })
    .await
    .expect("the reshaped group took no write");
    let on_four = until(Duration::from_secs(20), || async {
        registry_ids(&learner).await.contains("x2").then_some(())
    })
    .await;
    assert!(
        on_four.is_some(),
        "the promoted member did not apply the write"
    );
}

/// Three instances register through their sidecars; a caller's `registry` cluster routes to
/// them; one instance's sidecar is killed with `kill -9` and leaves the caller's endpoint set
/// when its lease expires; then the group's leader is killed and no healthy instance expires.
/// The caller's GETs never fail throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_the_callers_endpoints_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (members, mut group, (leader, term)) = start_group(dir.path(), 40).await;
    let member_list = member_list(&members);

    // Three instances: an origin each, behind its own sidecar that registers it.
    let mut origins = Vec::new();
    let mut instances = Vec::new();
    for n in 1..=3 {
        let origin = support::Origin::start(&format!("instance-{n}")).await;
        let port = free_port("127.0.0.1");
        let path = dir.path().join(format!("instance{n}.yaml"));
        std::fs::write(
            &path,
            format!(
                "admin:\n  address: 127.0.0.1:0\nlisteners:\n  - name: in\n    address: 127.0.0.1:{port}\n    routes:\n      - name: all\n        cluster: local\nclusters:\n  - name: local\n    endpoints: [\"{}\"]\nmesh:\n  role: client\n  members:\n{member_list}  register:\n    service: api\n    id: instance-{n}\n    address: 127.0.0.1\n    port: {port}\n    ttl: 2s\n",
                origin.addr
            ),
        )
        .unwrap();
        instances.push(Some(Process::start(&path)));
        origins.push(origin);
    }
    let leader_process = group[leader as usize - 1].process.as_ref().unwrap();
    let all_registered = until(Duration::from_secs(30), || async {
        let ids = registry_ids_of(leader_process, "api").await;
        (ids.len() == 3).then_some(ids)
    })
    .await;
    assert!(
        all_registered.is_some(),
        "the three instances did not register"
    );

    let caller = support::Proxy::start(&format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        cluster: api\nclusters:\n  - name: api\n    registry: {{ service: api }}\nmesh:\n  role: client\n  members:\n{member_list}"
    ))
    .await;
    let endpoints = |proxy: &support::Proxy| {
        let url = proxy.admin_url("/clusters");
        async move {
            let text = get(&h1_client(), &url)
                .await
                .map(|r| r.2)
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            v["clusters"][0]["endpoints"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0)
        }
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            endpoints(&caller).await == 3
        })
        .await,
        "the caller did not learn the three instances"
    );

    // Steady GETs through the caller for the rest of the test, counting failures.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = caller.url("in", "/");
    let load = {
        let (stop, failed, served) = (stop.clone(), failed.clone(), served.clone());
        tokio::spawn(async move {
            let client = h1_client();
            // Bounded: at most 20,000 requests.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match get(&client, &url).await {
                    Ok((StatusCode::OK, _, _)) => served.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // kill -9 of instance 2's sidecar: its lease expires and it leaves the caller's set.
    let mut killed = instances[1].take().unwrap();
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            endpoints(&caller).await == 2
        })
        .await,
        "the killed instance stayed in the caller's endpoint set"
    );
    let left = registry_ids_of(leader_process, "api").await;
    assert_eq!(
        left,
        BTreeSet::from(["instance-1".to_owned(), "instance-3".to_owned()])
    );

    // kill -9 of the group's leader: a new leader grants fresh TTLs, no healthy instance expires.
    let mut gone = group[leader as usize - 1].process.take().unwrap();
    gone.child.kill().unwrap();
    gone.child.wait().unwrap();
    let (new_leader, _) = until(Duration::from_secs(30), || async {
        agreed_leader(&group).await.filter(|(_, t)| *t > term)
    })
    .await
    .expect("no new leader");
    let new_leader_process = group[new_leader as usize - 1].process.as_ref().unwrap();
    // 600 more requests at 5 ms or more apiece: over a TTL (2 s) under the new leader, whose
    // renewals keep both live instances registered.
    let before = served.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(30), || async {
            served.load(Ordering::Relaxed) >= before + 600
        })
        .await
    );
    let kept = registry_ids_of(new_leader_process, "api").await;
    assert_eq!(
        kept,
        BTreeSet::from(["instance-1".to_owned(), "instance-3".to_owned()])
    );
    assert_eq!(endpoints(&caller).await, 2);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "GETs failed at the caller"
    );
    assert!(served.load(Ordering::Relaxed) > 600);
}

async fn registry_ids_of(p: &Process, service: &str) -> BTreeSet<String> {
    let Ok((_, _, text)) = get(&h1_client(), &p.admin_url("/registry")).await else {
        return BTreeSet::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["services"][service]["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
