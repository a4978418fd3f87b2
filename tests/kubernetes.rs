//! `examples/kubernetes/`: the manifests for running Outrigger as a native sidecar agree with the
//! config they ship and with the image. No cluster is needed: every YAML document is parsed, the
//! ConfigMap's config goes through the real `outrigger check`, and the Deployment and Service are
//! compared with it (mount path, probe ports, drain budget, security, the Service's target).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

/// Where the image's `OUTRIGGER_CONFIG` points, unless the container overrides it.
const IMAGE_CONFIG_PATH: &str = "/etc/outrigger/outrigger.yaml";
/// The image's non-root user and group.
const IMAGE_UID: u64 = 65532;
/// The config's `drain_timeout` when it has none.
const DEFAULT_DRAIN: &str = "10s";
/// Kubernetes' `terminationGracePeriodSeconds` when the pod has none.
const DEFAULT_GRACE_SECONDS: u64 = 30;

/// Every non-empty document of every `examples/kubernetes/*.yaml`, files in name order.
fn documents() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

/// The one object of this kind and name.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name}");
    found[0]
}

/// The text of the ConfigMap's `outrigger.yaml`.
fn config_text(docs: &[Value]) -> String {
    let data = &object(docs, "ConfigMap", "outrigger-config")["data"];
    data["outrigger.yaml"]
        .as_str()
        .expect("ConfigMap outrigger-config has data.outrigger.yaml")
        .to_owned()
}

/// The ConfigMap's config, parsed.
fn config(docs: &[Value]) -> Value {
    serde_yaml::from_str(&config_text(docs)).unwrap()
}

/// The `payments` Deployment's pod spec.
fn pod(docs: &[Value]) -> &Value {
    &object(docs, "Deployment", "payments")["spec"]["template"]["spec"]
}

/// Every container of the pod: init containers (sidecars among them) and regular ones.
fn all_containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |key| pod[key].as_sequence().into_iter().flatten())
}

/// The container running the Outrigger image, wherever it is.
fn sidecar(pod: &Value) -> &Value {
    let found: Vec<&Value> = all_containers(pod)
        .filter(|c| {
            let image = c["image"].as_str().unwrap_or_default();
            image.rsplit('/').next().unwrap().starts_with("outrigger")
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one container runs the outrigger image"
    );
    found[0]
}

/// The port number a probe or Service names: a number, or the name of a port of `container`.
fn port_number(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port is a number or a name");
    let ports = container["ports"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    ports
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{:?} has no port named {name}", container["name"]))
}

/// The IP and port of a config address such as `0.0.0.0:9901` or `[::]:9901`.
fn ip_and_port(address: &str) -> (IpAddr, u64) {
    let (ip, port) = address.rsplit_once(':').unwrap();
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    (ip.parse().unwrap(), port.parse().unwrap())
}

/// Runs `outrigger check` on `text` as a file; its exit code and output.
fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The ConfigMap's config passes `outrigger check`, and a broken copy of it does not.
#[test]
fn configmap_config_passes_outrigger_check() {
    let text = config_text(&documents());
    let (code, out) = check(&text);
    assert_eq!(
        code, 0,
        "outrigger check rejects the ConfigMap's config:\n{out}"
    );
    assert!(out.starts_with("ok: "), "{out}");

    let broken = text.replacen("drain_timeout:", "drain_timout:", 1);
    assert_ne!(broken, text, "the config sets drain_timeout");
    let (code, out) = check(&broken);
    assert_eq!(code, 1, "a broken copy passes the check:\n{out}");
    assert!(out.contains("drain_timout"), "{out}");
}

/// The sidecar mounts the ConfigMap as a directory (no subPath) where the image reads its config.
#[test]
fn sidecar_mounts_the_configmap_as_a_directory_where_the_image_reads() {
    let docs = documents();
    let pod = pod(&docs);
    let sidecar = sidecar(pod);
    // The path the proxy reads: `--config` in args, else OUTRIGGER_CONFIG, else the image's.
    let args: Vec<&str> = sidecar["args"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let path = args
        .iter()
        .position(|a| *a == "--config" || *a == "-c")
        .map(|i| args[i + 1])
        .or_else(|| {
            let mut env = sidecar["env"].as_sequence().into_iter().flatten();
            env.find(|e| e["name"] == "OUTRIGGER_CONFIG")
                .and_then(|e| e["value"].as_str())
        })
        .unwrap_or(IMAGE_CONFIG_PATH);
    let path = Path::new(path);
    let (folder, file) = (path.parent().unwrap(), path.file_name().unwrap());

    let mounts = sidecar["volumeMounts"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(folder))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", folder.display()));
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "a subPath mount never sees ConfigMap updates: {mount:?}"
    );
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    let volume = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume is declared");
    assert_eq!(
        volume["configMap"]["name"], "outrigger-config",
        "{volume:?}"
    );
    assert!(
        volume["configMap"]["items"].is_null(),
        "items would rename the file"
    );
    let key = file.to_str().unwrap();
    assert!(
        object(&docs, "ConfigMap", "outrigger-config")["data"][key].is_string(),
        "the ConfigMap has no key {key}, so {} would not exist",
        path.display()
    );
}

/// Liveness is /live and readiness /ready, on the port of the config's wildcard admin address.
#[test]
fn probes_reach_the_admin_port_on_live_and_ready() {
    let docs = documents();
    let address = config(&docs)["admin"]["address"]
        .as_str()
        .expect("the config sets admin.address (its default is loopback only)")
        .to_owned();
    let (ip, admin_port) = ip_and_port(&address);
    assert!(
        ip.is_unspecified(),
        "the kubelet cannot reach admin on {address}"
    );

    let sidecar = sidecar(pod(&docs));
    for (probe, path) in [
        ("livenessProbe", "/live"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/ready"),
    ] {
        let get = &sidecar[probe]["httpGet"];
        if probe == "startupProbe" && sidecar[probe].is_null() {
            continue;
        }
        assert_eq!(get["path"], path, "{probe}: {:?}", sidecar[probe]);
        assert_eq!(port_number(sidecar, &get["port"]), admin_port, "{probe}");
    }
}

/// The grace period outlasts every preStop sleep plus the config's drain_timeout.
#[test]
fn grace_period_covers_prestop_sleeps_and_drain() {
    let docs = documents();
    let pod = pod(&docs);
    // The app's preStop, then (once it exited) the sidecar's: the sleeps add up.
    let sleep_seconds = |c: &Value| c["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64();
    assert!(
        sleep_seconds(sidecar(pod)).is_some(),
        "the sidecar has a preStop sleep action"
    );
    let sleeps: u64 = all_containers(pod).filter_map(sleep_seconds).sum();
    let cfg = config(&docs);
    let drain = cfg["drain_timeout"].as_str().unwrap_or(DEFAULT_DRAIN);
    let drain = humantime::parse_duration(drain).unwrap().as_secs_f64();
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    assert!(
        grace as f64 > sleeps as f64 + drain,
        "terminationGracePeriodSeconds {grace} <= preStop sleeps {sleeps}s + drain_timeout {drain}s: \
         SIGKILL would cut the drain short"
    );
}

/// The sidecar is a native sidecar and runs as the non-root user 65532 without escalation.
#[test]
fn sidecar_is_native_and_unprivileged() {
    let docs = documents();
    let pod = pod(&docs);
    let sidecar = sidecar(pod);
    let init = pod["initContainers"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    assert!(
        init.contains(sidecar),
        "the sidecar is not in initContainers"
    );
    assert_eq!(sidecar["restartPolicy"], "Always", "not a native sidecar");

    // A container's own setting wins over the pod's.
    let setting = |key: &str| match &sidecar["securityContext"][key] {
        Value::Null => pod["securityContext"][key].clone(),
        v => v.clone(),
    };
    assert_eq!(setting("runAsNonRoot"), true);
    assert_eq!(setting("runAsUser").as_u64(), Some(IMAGE_UID));
    let context = &sidecar["securityContext"];
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["readOnlyRootFilesystem"], true);
    let dropped = context["capabilities"]["drop"].as_sequence().cloned();
    assert!(
        dropped.unwrap_or_default().contains(&Value::from("ALL")),
        "capabilities are not all dropped: {context:?}"
    );
}

/// The Service sends traffic to the sidecar's inbound listener, not to the app's port.
#[test]
fn service_targets_the_sidecar_inbound_listener() {
    let docs = documents();
    let cfg = config(&docs);
    let inbound: Vec<u64> = cfg["listeners"]
        .as_sequence()
        .expect("the config has listeners")
        .iter()
        .map(|l| ip_and_port(l["address"].as_str().unwrap()))
        .filter(|(ip, _)| ip.is_unspecified())
        .map(|(_, port)| port)
        .collect();
    assert_eq!(inbound.len(), 1, "one listener on a wildcard address");

    let pod = pod(&docs);
    let sidecar = sidecar(pod);
    let app_ports: Vec<u64> = pod["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();

    let service = object(&docs, "Service", "payments");
    let labels = &object(&docs, "Deployment", "payments")["spec"]["template"]["metadata"]["labels"];
    let selector = service["spec"]["selector"]
        .as_mapping()
        .expect("a selector");
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the Service selects no payments pod");
    }
    let ports = service["spec"]["ports"]
        .as_sequence()
        .expect("Service ports");
    for port in ports {
        let target = match &port["targetPort"] {
            Value::Null => port["port"].clone(),
            t => t.clone(),
        };
        let target = port_number(sidecar, &target);
        assert_eq!(target, inbound[0], "{port:?}");
        assert!(
            !app_ports.contains(&target),
            "{port:?} bypasses the sidecar"
        );
    }
}
