//! The `mesh:` section: this sidecar's place in the embedded Raft group.
//!
//! Named `mesh`, not `cluster`, because `clusters:` already means groups of upstream endpoints.
//! Settings that shape the group's identity and disk (`node_id`, `data_dir`, `role`) take effect at
//! start only; a reload that changes them is refused with the reason, and `check` says the same.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tls::{ClientTlsConfig, RawClientTls, RawServerTls, ServerTlsConfig};
use super::upstream::{HealthCheckConfig, RawHealthCheck};
use super::validate::Validator;
use crate::control::mesh::registry::{host_port, Registration};

/// Leader heartbeat period when the config names none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(50);
/// Shortest election timeout when the config names none (the longest is twice this).
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(300);
/// Applied entries between snapshots when the config names none.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;

/// The `mesh:` block as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMesh {
    /// This member's id, unique in the group (voters and learners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// `voter` (default), `learner` or `client`.
    #[serde(default)]
    pub role: Role,
    /// Address the mesh port binds, e.g. `0.0.0.0:7946`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Address other members reach this one at (default: `listen`, which must then not be a
    /// wildcard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Directory holding the member's store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// The voters of the group, id to mesh address (`host:port`).
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
    /// Leader heartbeat period, e.g. `50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// A follower that hears no leader for between this and twice this starts an election.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election_timeout: Option<String>,
    /// Applied entries between snapshots; older log entries are then purged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_every: Option<u64>,
    /// Register the local application in the registry while it is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<RawRegister>,
    /// Mutual TLS on the mesh port and for every call to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawMeshTls>,
    /// Share failure hints (ejections, open endpoint breakers) with the fleet (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_hints: Option<bool>,
}

/// The `mesh.register` block: how this sidecar's application appears in the registry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegister {
    /// The service the application belongs to.
    pub service: String,
    /// The instance id (default: `SERVICE-ADDRESS:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The address callers reach the application at (normally this sidecar's inbound listener).
    pub address: String,
    /// The port callers reach the application at.
    pub port: u16,
    /// Lease TTL: the instance leaves the registry this long after its last renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Load-balancing weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Labels returned with the instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The check the application must pass to stay registered (as a cluster's `health_check`),
    /// run against `address:port`; without it the application is registered while the sidecar
    /// runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    /// Where `health_check` is sent instead of `address:port`: the application itself when
    /// callers reach it through a listener the check cannot pass (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_address: Option<String>,
}

/// Lease TTL of a self-registration when the config names none.
pub const DEFAULT_REGISTER_TTL: Duration = Duration::from_secs(10);

/// The validated `mesh.register` block.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterConfig {
    /// What is registered.
    pub registration: Registration,
    /// The check that gates it, if any.
    pub health_check: Option<HealthCheckConfig>,
    /// `host:port` the check is sent to (default: the registration's `address:port`).
    pub check_target: String,
}

/// What part a sidecar plays in the group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the log and votes: 3 or 5 of these make the group.
    #[default]
    Voter,
    /// Holds a replica of the log for local reads, does not vote.
    Learner,
    /// Holds no log: talks to the members (most sidecars).
    Client,
}

/// The validated `mesh:` block.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// This member's id (`None` for a client that gave none).
    pub node_id: Option<u64>,
    /// Voter, learner or client.
    pub role: Role,
    /// Where the mesh port binds (members only).
    pub listen: Option<SocketAddr>,
    /// Where other members reach this one (members only).
    pub advertise: Option<String>,
    /// The member's store directory (members only).
    pub data_dir: Option<PathBuf>,
    /// The voters, id to mesh address.
    pub members: BTreeMap<u64, String>,
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Shortest election timeout; the longest is twice this.
    pub election_timeout: Duration,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
    /// Self-registration, if set.
    pub register: Option<RegisterConfig>,
    /// Mutual TLS on the mesh port and for every call to it, if set.
    pub tls: Option<MeshTls>,
    /// Whether this sidecar publishes and takes failure hints.
    pub failure_hints: bool,
}

/// `mesh.tls`, as written: one certificate serves this sidecar as a member (server) and as a
/// caller (client); one CA signs every mesh certificate.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshTls {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key of `cert`.
    pub key: String,
    /// PEM bundle of the CA that signs the mesh's certificates; peers without one are refused.
    pub ca: String,
    /// Name checked on members' certificates instead of the host of their address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Identities (SAN URI or DNS name) allowed to call this member; any certificate the CA
    /// signed when empty. A trailing `*` matches a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_identities: Vec<String>,
}

/// The validated `mesh.tls`: the server side of the mesh port and the client side of calls.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshTls {
    /// Terminating on the mesh port, client certificates required.
    pub server: ServerTlsConfig,
    /// Calling members, presenting the same certificate.
    pub client: ClientTlsConfig,
}

impl Validator {
    /// Loads `mesh.tls` both ways; the client side first, so a bad CA is reported as `ca`.
    fn mesh_tls(&mut self, t: &RawMeshTls) -> Option<MeshTls> {
        let client = self.client_tls(
            "mesh.tls",
            &RawClientTls {
                ca: Some(t.ca.clone()),
                server_name: t.server_name.clone(),
                cert: Some(t.cert.clone()),
                key: Some(t.key.clone()),
            },
        )?;
        let server = self.server_tls(
            "mesh.tls",
            &RawServerTls {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: Some(t.ca.clone()),
                allowed_identities: t.allowed_identities.clone(),
            },
        )?;
        Some(MeshTls { server, client })
    }

    pub(super) fn mesh(&mut self, raw: &RawMesh) -> Option<MeshConfig> {
        let before = self.problems.len();
        let member = raw.role != Role::Client;
        let heartbeat = self
            .duration("mesh.heartbeat", raw.heartbeat.as_deref())
            .unwrap_or(DEFAULT_HEARTBEAT);
        let election_timeout = self
            .duration("mesh.election_timeout", raw.election_timeout.as_deref())
            .unwrap_or(DEFAULT_ELECTION_TIMEOUT);
        if heartbeat.is_zero() {
            self.problem(
                "mesh.heartbeat".into(),
                "`heartbeat` must be above 0".into(),
            );
        }
        if election_timeout < 3 * heartbeat {
            self.problem_with_hint(
                "mesh.election_timeout".into(),
                format!(
                    "`election_timeout` ({election_timeout:?}) must be at least 3 heartbeats ({:?})",
                    3 * heartbeat
                ),
                Some("followers would start elections between two heartbeats".into()),
            );
        }
        let snapshot_every = raw.snapshot_every.unwrap_or(DEFAULT_SNAPSHOT_EVERY);
        if snapshot_every == 0 {
            self.problem(
                "mesh.snapshot_every".into(),
                "`snapshot_every` must be at least 1".into(),
            );
        }
        if raw.members.is_empty() {
            self.problem_with_hint(
                "mesh.members".into(),
                "the group needs its voters listed".into(),
                Some("list 3 or 5 voters as `id: host:port`".into()),
            );
        }
        for (id, addr) in &raw.members {
            if *id == 0 {
                self.problem("mesh.members".into(), "member id 0 is reserved".into());
            }
            if !valid_host_port(addr) {
                self.problem_with_hint(
                    format!("mesh.members.{id}"),
                    format!("invalid mesh address `{addr}`"),
                    Some("write a host and a port, e.g. `10.0.0.5:7946`".into()),
                );
            }
        }
        let listen = match (&raw.listen, member) {
            (Some(l), _) => self.mesh_socket_addr("mesh.listen", l),
            (None, true) => {
                self.problem(
                    "mesh.listen".into(),
                    "a voter or learner needs the address its mesh port binds".into(),
                );
                None
            }
            (None, false) => None,
        };
        let node_id = raw.node_id;
        if member {
            match node_id {
                None => self.problem(
                    "mesh.node_id".into(),
                    "a voter or learner needs a `node_id`".into(),
                ),
                Some(0) => self.problem("mesh.node_id".into(), "node id 0 is reserved".into()),
                Some(id) => {
                    let listed = raw.members.contains_key(&id);
                    if raw.role == Role::Voter && !listed {
                        self.problem_with_hint(
                            "mesh.node_id".into(),
                            format!("voter {id} is not in `mesh.members`"),
                            Some("add it to `members`, or make it `role: learner`".into()),
                        );
                    }
                    if raw.role == Role::Learner && listed {
                        self.problem_with_hint(
                            "mesh.role".into(),
                            format!("node {id} is listed as a voter in `mesh.members`"),
                            Some("a learner joins through the admin API".into()),
                        );
                    }
                }
            }
            if raw.data_dir.is_none() {
                self.problem(
                    "mesh.data_dir".into(),
                    "a voter or learner needs a `data_dir` for its store".into(),
                );
            }
        }
        let advertise = match (&raw.advertise, listen, member) {
            (Some(a), _, _) => {
                if !valid_host_port(a) {
                    self.problem(
                        "mesh.advertise".into(),
                        format!("invalid mesh address `{a}`"),
                    );
                }
                Some(a.clone())
            }
            (None, Some(l), true) if l.ip().is_unspecified() => {
                self.problem_with_hint(
                    "mesh.advertise".into(),
                    format!("`listen` is the wildcard {l}: other members need a reachable address"),
                    Some("set `advertise` to this host's address and the mesh port".into()),
                );
                None
            }
            (None, Some(l), true) => Some(l.to_string()),
            _ => None,
        };
        let register = raw.register.as_ref().and_then(|r| self.register(r));
        let tls = raw.tls.as_ref().and_then(|t| self.mesh_tls(t));
        if self.problems.len() > before {
            return None;
        }
        Some(MeshConfig {
            node_id,
            role: raw.role,
            listen,
            advertise,
            data_dir: raw.data_dir.as_deref().map(|p| self.path(p)),
            members: raw.members.clone(),
            heartbeat,
            election_timeout,
            snapshot_every,
            register,
            tls,
            failure_hints: raw.failure_hints.unwrap_or(true),
        })
    }

    fn register(&mut self, r: &RawRegister) -> Option<RegisterConfig> {
        let before = self.problems.len();
        if r.service.is_empty() {
            self.problem(
                "mesh.register.service".into(),
                "the service name is empty".into(),
            );
        }
        if r.address.is_empty() {
            self.problem(
                "mesh.register.address".into(),
                "the address is empty".into(),
            );
        }
        if r.port == 0 {
            self.problem(
                "mesh.register.port".into(),
                "the port must be above 0".into(),
            );
        }
        let ttl = self
            .duration("mesh.register.ttl", r.ttl.as_deref())
            .unwrap_or(DEFAULT_REGISTER_TTL);
        if ttl < Duration::from_secs(1) {
            self.problem_with_hint(
                "mesh.register.ttl".into(),
                "`ttl` must be at least 1s".into(),
                Some("renewals go every third of the TTL; a shorter one floods the leader".into()),
            );
        }
        let weight = r.weight.unwrap_or(1);
        if weight == 0 {
            self.problem(
                "mesh.register.weight".into(),
                "`weight` must be at least 1".into(),
            );
        }
        let health_check = r
            .health_check
            .as_ref()
            .and_then(|h| self.health_check("mesh.register.health_check", h));
        if let Some(a) = &r.check_address {
            if !valid_host_port(a) {
                self.problem_with_hint(
                    "mesh.register.check_address".into(),
                    format!("invalid check address `{a}`"),
                    Some("write a host and a port, e.g. `127.0.0.1:8080`".into()),
                );
            } else if r.health_check.is_none() {
                self.problem_with_hint(
                    "mesh.register.check_address".into(),
                    "`check_address` without a `health_check` checks nothing".into(),
                    Some("add `health_check`, or remove `check_address`".into()),
                );
            }
        }
        if self.problems.len() > before {
            return None;
        }
        Some(RegisterConfig {
            registration: Registration {
                service: r.service.clone(),
                id: r
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", r.service, host_port(&r.address, r.port))),
                address: r.address.clone(),
                port: r.port,
                weight,
                metadata: r.metadata.clone(),
                ttl_ms: ttl.as_millis() as u64,
            },
            health_check,
            check_target: r
                .check_address
                .clone()
                .unwrap_or_else(|| host_port(&r.address, r.port)),
        })
    }

    fn mesh_socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem_with_hint(
                    path.to_owned(),
                    format!("invalid socket address `{text}`"),
                    Some("write an IP and a port, e.g. `0.0.0.0:7946`".into()),
                );
                None
            }
        }
    }
}

/// `host:port` with a non-empty host and a valid port.
fn valid_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse("t.yaml", text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
        }
    }

    const VOTER: &str = "mesh:
  node_id: 1
  listen: 127.0.0.1:7946
  data_dir: /var/lib/outrigger
  members:
    1: 127.0.0.1:7946
    2: 127.0.0.2:7946
    3: 127.0.0.3:7946
";

    #[test]
    fn a_voter_takes_the_defaults_and_advertises_its_listen_address() {
        let m = parse("t.yaml", VOTER).unwrap().config.mesh.unwrap();
        assert_eq!(m.role, Role::Voter);
        assert_eq!(m.node_id, Some(1));
        assert_eq!(m.advertise.as_deref(), Some("127.0.0.1:7946"));
        assert_eq!(m.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(m.election_timeout, DEFAULT_ELECTION_TIMEOUT);
        assert_eq!(m.snapshot_every, DEFAULT_SNAPSHOT_EVERY);
        assert_eq!(m.members.len(), 3);
    }

    #[test]
    fn a_voter_missing_from_members_is_located() {
        let text = VOTER.replace("node_id: 1", "node_id: 4");
        assert_eq!(
            errors(&text),
            ["t.yaml:2:3: voter 4 is not in `mesh.members` (hint: add it to `members`, or make it `role: learner`)"]
        );
    }

    #[test]
    fn an_election_timeout_too_close_to_the_heartbeat_is_refused() {
        let text = format!("{VOTER}  heartbeat: 100ms\n  election_timeout: 200ms\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "t.yaml:10:3: `election_timeout` (200ms) must be at least 3 heartbeats"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn a_wildcard_listen_needs_an_advertised_address() {
        let text = VOTER.replace("listen: 127.0.0.1:7946", "listen: 0.0.0.0:7946");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("other members need a reachable address"),
            "{errs:?}"
        );
        let text = text.replace("mesh:\n", "mesh:\n  advertise: 10.0.0.5:7946\n");
        assert_eq!(errors(&text), Vec::<String>::new());
    }

    #[test]
    fn a_client_needs_only_the_members() {
        let text = "mesh:\n  role: client\n  members:\n    1: 127.0.0.1:7946\n";
        let m = parse("t.yaml", text).unwrap().config.mesh.unwrap();
        assert_eq!(m.role, Role::Client);
        assert_eq!(m.listen, None);
        assert_eq!(m.data_dir, None);
        assert_eq!(
            errors("mesh:\n  role: client\n"),
            ["t.yaml:1:1: the group needs its voters listed (hint: list 3 or 5 voters as `id: host:port`)"]
        );
    }

    #[test]
    fn a_bad_member_address_names_its_id() {
        let text = VOTER.replace("2: 127.0.0.2:7946", "2: nowhere");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("t.yaml:7:5: invalid mesh address `nowhere`"),
            "{errs:?}"
        );
    }
}
