//! One member of the mesh group: its store, its Raft, its mesh port, put together.
//!
//! A fresh group forms from configuration alone: every voter that starts with an empty store
//! proposes the same initial membership (the configured voters), which openraft makes safe when
//! several do it at once (they write the identical first entry); a member that has already voted
//! or holds a log is told "not allowed", which here means "already formed" and is fine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{Config, Raft, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::group::{self, Contact, LeaderTables, Proposer};
use super::network::{Connect, Network};
use super::server::{self, Context};
use super::store::{self, State};
use super::types::{Member, Mesh, NodeId};
use crate::tasks::Tasks;
use crate::telemetry::metrics::mesh::Families as MeshMetrics;
use crate::tls::ServerTls;

/// What a member needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This member's id.
    pub node_id: NodeId,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The voters of a fresh group, by id, with their mesh addresses.
    pub voters: BTreeMap<NodeId, String>,
    /// How often the leader heartbeats; also the timeout of a replication call.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a time drawn from this range starts an election.
    pub election: (Duration, Duration),
    /// Entries applied between snapshots (after which older log entries are purged).
    pub snapshot_every: u64,
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The timing settings are inconsistent.
    #[error("mesh timing: {0}")]
    Config(#[from] openraft::ConfigError),
    /// The data directory could not be created.
    #[error("mesh data_dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened or read.
    #[error("mesh store: {0}")]
    Store(#[from] openraft::StorageError<NodeId>),
    /// openraft refused to start.
    #[error("mesh raft: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
}

/// A running member.
#[derive(Clone)]
pub struct Node {
    /// The member's Raft handle.
    pub raft: Raft<Mesh>,
    /// The applied state, republished after every applied batch.
    pub state: watch::Receiver<Arc<State>>,
    /// Where this member's writes go.
    pub proposer: Proposer,
    /// The lease table while this member leads.
    pub leases: Arc<LeaderTables>,
    /// When a leader last counted this member in.
    pub contact: Arc<Contact>,
    /// The commit index as last polled from the Raft core (openraft's metrics leave it out).
    pub committed: Arc<AtomicU64>,
}

impl Node {
    /// Starts a member: opens its store, starts Raft, serves the mesh port on `socket`, and
    /// proposes the initial membership if the store is empty and this member is a voter.
    pub async fn start<C: Connect>(
        settings: &Settings,
        socket: TcpListener,
        tls: Option<Arc<ServerTls>>,
        connect: C,
        metrics: MeshMetrics,
        tasks: &Tasks,
    ) -> Result<Node, StartError> {
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| StartError::DataDir {
            path: settings.data_dir.clone(),
            source,
        })?;
        let (log, machine) = store::open(&settings.data_dir).await?;
        let node = Node::run(settings, log, machine, connect, metrics, tasks).await?;
        tasks.spawn(
            "mesh_server",
            server::serve(socket, node.context(), tasks.clone(), tls),
        );
        node.initialize(settings).await?;
        Ok(node)
    }

    /// Starts Raft on an opened store without serving it: the caller routes the mesh port's
    /// connections to [`server::connection`] with [`Node::context`] (the simulation does, over
    /// its simulated network), then calls [`Node::initialize`].
    pub async fn run<C: Connect>(
        settings: &Settings,
        log: store::LogStore,
        machine: store::StateMachine,
        connect: C,
        metrics: MeshMetrics,
        tasks: &Tasks,
    ) -> Result<Node, StartError> {
        let config = Config {
            cluster_name: "outrigger".into(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: settings.election.0.as_millis() as u64,
            election_timeout_max: settings.election.1.as_millis() as u64,
            // A replication call is bounded by the heartbeat; a snapshot chunk may take longer.
            install_snapshot_timeout: (settings.election.0.as_millis() as u64).max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.snapshot_every.min(1000),
            purge_batch_size: 64,
            ..Default::default()
        }
        .validate()?;
        let state = machine.subscribe();
        let network = Network::new(connect, settings.heartbeat);
        let raft = Raft::new(settings.node_id, Arc::new(config), network, log, machine).await?;
        let (proposer, leases) = group::start(raft.clone(), state.clone(), metrics.clone(), tasks);
        let committed = Arc::new(AtomicU64::new(0));
        tasks.spawn(
            "mesh_metrics",
            report(
                raft.clone(),
                state.clone(),
                leases.clone(),
                committed.clone(),
                metrics,
            ),
        );
        Ok(Node {
            raft,
            state,
            proposer,
            leases,
            contact: Arc::new(Contact::default()),
            committed,
        })
    }

    /// What the mesh port's handlers need.
    pub fn context(&self) -> Context {
        Context {
            raft: self.raft.clone(),
            state: self.state.clone(),
            proposer: self.proposer.clone(),
            leases: self.leases.clone(),
            contact: self.contact.clone(),
        }
    }

    /// Proposes the configured voters as the initial membership if this member is one of them
    /// and its store is empty; a member of a formed group is told "not allowed", which is fine.
    pub async fn initialize(&self, settings: &Settings) -> Result<(), StartError> {
        let raft = &self.raft;
        if settings.voters.contains_key(&settings.node_id) {
            let members: BTreeMap<NodeId, Member> = settings
                .voters
                .iter()
                .map(|(id, addr)| (*id, Member::new(addr)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = settings.node_id, "mesh group initialized"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::debug!(node = settings.node_id, "mesh group already formed")
                }
                Err(RaftError::APIError(e)) => {
                    tracing::warn!(node = settings.node_id, error = %e, "mesh group not initialized")
                }
                Err(RaftError::Fatal(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// How often the commit index gauge is refreshed.
const COMMIT_POLL: Duration = Duration::from_secs(1);

/// Keeps the mesh gauges in line with the member's Raft state and registry.
async fn report(
    raft: Raft<Mesh>,
    mut state: watch::Receiver<Arc<State>>,
    leases: Arc<LeaderTables>,
    committed: Arc<AtomicU64>,
    metrics: MeshMetrics,
) {
    let mut raft_metrics = raft.metrics();
    let mut snapshot = None;
    let mut commit_poll = tokio::time::interval(COMMIT_POLL);
    commit_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        {
            let m = raft_metrics.borrow_and_update();
            metrics.raft(
                m.current_term,
                m.current_leader,
                m.last_log_index.unwrap_or(0),
                m.last_applied.map_or(0, |l| l.index),
            );
            if m.snapshot != snapshot {
                if m.snapshot.is_some() {
                    metrics.snapshot();
                }
                snapshot = m.snapshot;
            }
        }
        let instances = state.borrow_and_update().registry.instance_count();
        metrics.registry(instances, leases.len());
        tokio::select! {
            changed = raft_metrics.changed() => if changed.is_err() { return },
            changed = state.changed() => if changed.is_err() { return },
            _ = commit_poll.tick() => {
                // openraft's metrics leave the commit index out, so ask the core. Not on every
                // metrics change: the core republishes its metrics after each message it
                // handles, this one included, and the two would chase each other.
                let asked = raft.with_raft_state(|s| s.committed.map_or(0, |c| c.index));
                if let Ok(index) = asked.await {
                    committed.store(index, Ordering::Relaxed);
                    metrics.committed(index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::ServerState;

    use super::*;
    use crate::control::mesh::network::Tcp;
    use crate::control::mesh::registry::{Change, Registration};
    use crate::control::mesh::types::{Command, Op};

    fn registration(id: &str) -> Command {
        Command {
            ops: vec![Op::Registry(Change::Register(Registration {
                service: "api".into(),
                id: id.into(),
                address: "10.0.0.1".into(),
                port: 80,
                weight: 1,
                metadata: BTreeMap::new(),
                ttl_ms: 10_000,
            }))],
        }
    }

    /// Waits until one member leads and every running member follows it.
    async fn leader(nodes: &[Option<Node>]) -> NodeId {
        for _ in 0..2000 {
            let leaders: Vec<NodeId> = nodes
                .iter()
                .flatten()
                .filter(|n| n.raft.metrics().borrow().state == ServerState::Leader)
                .map(|n| n.raft.metrics().borrow().id)
                .collect();
            if let [l] = leaders[..] {
                if nodes
                    .iter()
                    .flatten()
                    .all(|n| n.raft.metrics().borrow().current_leader == Some(l))
                {
                    return l;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no leader within 20 s");
    }

    async fn applied_everywhere(nodes: &[Option<Node>], id: &str) {
        for n in nodes.iter().flatten() {
            let mut rx = n.state.clone();
            tokio::time::timeout(
                Duration::from_secs(20),
                rx.wait_for(|s| {
                    s.registry
                        .service("api")
                        .is_some_and(|a| a.instances.contains_key(id))
                }),
            )
            .await
            .unwrap()
            .unwrap();
        }
    }

    /// Three members on loopback form a group from their settings alone, replicate a
    /// registration, elect a new leader when the leader stops, and keep what was committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_members_form_a_group_and_survive_the_loss_of_the_leader() {
        let mut g = group(3).await;
        let first = leader(&g.nodes).await;
        let l = g.nodes[first as usize - 1].as_ref().unwrap();
        let written = l.raft.client_write(registration("a")).await.unwrap();
        assert_eq!(written.log_id.leader_id.node_id, first);
        applied_everywhere(&g.nodes, "a").await;

        // The leader stops: its Raft and its mesh port go away.
        g.stop(first).await;
        let second = leader(&g.nodes).await;
        assert_ne!(second, first);
        let l = g.nodes[second as usize - 1].as_ref().unwrap();
        assert_eq!(
            l.raft.metrics().borrow().state,
            ServerState::Leader,
            "the new leader knows it leads"
        );
        l.raft.client_write(registration("b")).await.unwrap();
        applied_everywhere(&g.nodes, "b").await;
        applied_everywhere(&g.nodes, "a").await;
        for id in 1..=3 {
            g.stop(id).await;
        }
    }

    type Http = hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >;

    fn http() -> Http {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http()
    }

    /// Calls the registry API at `addr`, following a redirect to the leader.
    async fn call(
        client: &Http,
        addr: &str,
        method: http::Method,
        path: &str,
        body: &str,
    ) -> (http::StatusCode, serde_json::Value) {
        let mut url = format!("http://{addr}{path}");
        for _ in 0..5 {
            let req = http::Request::builder()
                .method(method.clone())
                .uri(&url)
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_owned(),
                )))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            if status == http::StatusCode::TEMPORARY_REDIRECT {
                url = resp.headers()[http::header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_owned();
                continue;
            }
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            });
            return (status, value);
        }
        panic!("redirect loop at {url}");
    }

    struct Group {
        nodes: Vec<Option<Node>>,
        addrs: Vec<String>,
        scopes: Vec<Option<crate::tasks::Scope>>,
        _dirs: Vec<tempfile::TempDir>,
    }

    async fn group(n: u64) -> Group {
        group_with(n, 1000).await
    }

    async fn group_with(n: u64, snapshot_every: u64) -> Group {
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut sockets = Vec::new();
        let mut voters = BTreeMap::new();
        for id in 1..=n {
            let s = TcpListener::bind("127.0.0.1:0").await.unwrap();
            voters.insert(id, s.local_addr().unwrap().to_string());
            sockets.push(s);
        }
        let root = Tasks::new();
        let mut nodes = Vec::new();
        let mut scopes = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let settings = Settings {
                node_id: i as u64 + 1,
                data_dir: dirs[i].path().to_owned(),
                voters: voters.clone(),
                heartbeat: Duration::from_millis(50),
                election: (Duration::from_millis(300), Duration::from_millis(600)),
                snapshot_every,
            };
            let scope = root.child();
            nodes.push(Some(
                Node::start(
                    &settings,
                    socket,
                    None,
                    Tcp::default(),
                    crate::telemetry::metrics::Metrics::new().unwrap().mesh,
                    scope.tasks(),
                )
                .await
                .unwrap(),
            ));
            scopes.push(Some(scope));
        }
        Group {
            nodes,
            addrs: voters.into_values().collect(),
            scopes,
            _dirs: dirs,
        }
    }

    impl Group {
        async fn stop(&mut self, id: NodeId) {
            let i = id as usize - 1;
            if let Some(n) = self.nodes[i].take() {
                n.raft.shutdown().await.unwrap();
            }
            self.scopes[i].take();
        }
    }

    const REGISTER: &str =
        r#"{"service":"api","id":"a","address":"10.0.0.7","port":8080,"ttl_ms":1500}"#;

    /// A write sent to a follower is redirected to the leader; a lease nobody renews expires
    /// and a blocking read sees it go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unrenewed_lease_expires_and_a_blocking_read_sees_it() {
        let mut g = group(3).await;
        let first = leader(&g.nodes).await;
        let follower = (1..=3).find(|i| *i != first).unwrap();
        let client = http();
        let (status, reg) = call(
            &client,
            &g.addrs[follower as usize - 1],
            http::Method::POST,
            "/v1/registry/register",
            REGISTER,
        )
        .await;
        assert_eq!(status, 200, "{reg}");
        assert_eq!(reg["result"], "registered");
        let revision = reg["revision"].as_u64().unwrap();
        assert_eq!(reg["index"].as_u64().unwrap(), revision);

        // A local read on the follower sees it once applied there, with its position.
        let (_, read) = call(
            &client,
            &g.addrs[follower as usize - 1],
            http::Method::GET,
            &format!("/v1/registry/api?index={}&wait=10s", revision - 1),
            "",
        )
        .await;
        assert_eq!(read["services"]["api"]["instances"][0]["port"], 8080);
        assert_eq!(read["consistent"], false);
        let modified = read["services"]["api"]["modified"].as_u64().unwrap();
        assert_eq!(modified, revision);

        // Nobody renews: the next change to the service is the expiry.
        let (_, read) = call(
            &client,
            &g.addrs[follower as usize - 1],
            http::Method::GET,
            &format!("/v1/registry/api?index={modified}&wait=20s"),
            "",
        )
        .await;
        assert_eq!(
            read["services"]["api"]["instances"],
            serde_json::json!([]),
            "{read}"
        );
        assert!(read["services"]["api"]["modified"].as_u64().unwrap() > modified);
        g.stop(1).await;
        g.stop(2).await;
        g.stop(3).await;
    }

    /// A lease kept alive across a leader failover is not expired by the new leader, and a
    /// linearizable read on the new leader sees it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failover_expires_no_renewed_lease() {
        let mut g = group(3).await;
        let first = leader(&g.nodes).await;
        let client = http();
        let addr = |g: &Group, id: NodeId| g.addrs[id as usize - 1].clone();
        let (status, reg) = call(
            &client,
            &addr(&g, first),
            http::Method::POST,
            "/v1/registry/register",
            REGISTER,
        )
        .await;
        assert_eq!(status, 200, "{reg}");
        let revision = reg["revision"].as_u64().unwrap();
        let renewal =
            format!(r#"{{"leases":[{{"service":"api","id":"a","revision":{revision}}}]}}"#);

        g.stop(first).await;
        let second = leader(&g.nodes).await;
        // Renew through any live member for three TTLs; every renewal lands somewhere.
        let live = (1..=3).find(|i| *i != first).unwrap();
        let mut renewed = 0;
        for _ in 0..45 {
            let (status, body) = call(
                &client,
                &addr(&g, live),
                http::Method::POST,
                "/v1/registry/renew",
                &renewal,
            )
            .await;
            match status.as_u16() {
                200 => {
                    assert_eq!(body["results"][0], "renewed", "{body}");
                    renewed += 1;
                }
                503 => {} // the new leader is catching up
                other => panic!("renewal answered {other}: {body}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(renewed > 0, "no renewal was answered");
        let (status, read) = call(
            &client,
            &addr(&g, second),
            http::Method::GET,
            "/v1/registry/api?consistent=true",
            "",
        )
        .await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["consistent"], true);
        assert_eq!(
            read["services"]["api"]["instances"][0]["revision"].as_u64(),
            Some(revision),
            "{read}"
        );
        for id in 1..=3 {
            g.stop(id).await;
        }
    }

    /// Snapshots are taken every `snapshot_every` applied entries and the log before them is
    /// purged on every member, so the log on disk stays bounded however many writes come.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_purge_the_log_so_it_stays_bounded() {
        let mut g = group_with(3, 40).await;
        let first = leader(&g.nodes).await;
        let l = g.nodes[first as usize - 1].as_ref().unwrap();
        for i in 0..400 {
            l.raft
                .client_write(registration(&format!("i{i}")))
                .await
                .unwrap();
        }
        for n in g.nodes.iter().flatten() {
            let m = n
                .raft
                .wait(Some(Duration::from_secs(20)))
                .metrics(
                    |m| {
                        let last = m.last_log_index.unwrap_or(0);
                        let purged = m.purged.map_or(0, |p| p.index);
                        m.snapshot.is_some() && last >= 400 && last - purged <= 40 + 40 + 64
                    },
                    "snapshot taken and log purged",
                )
                .await
                .unwrap();
            // Kept: at most one snapshot interval, the entries kept for laggards, and one
            // purge batch.
            let (last, purged) = (m.last_log_index.unwrap(), m.purged.unwrap().index);
            assert!(last - purged <= 144, "{last} - {purged}");
        }
        // Everything is still there for readers.
        let state = g.nodes[first as usize - 1]
            .as_ref()
            .unwrap()
            .state
            .borrow()
            .clone();
        assert_eq!(state.registry.instance_count(), 400);
        for id in 1..=3 {
            g.stop(id).await;
        }
    }
}
