//! One member of the mesh group: its store, its Raft, its mesh port, put together.
//!
//! A fresh group forms from configuration alone: every voter that starts with an empty store
//! proposes the same initial membership (the configured voters), which openraft makes safe when
//! several do it at once (they write the identical first entry); a member that has already voted
//! or holds a log is told "not allowed", which here means "already formed" and is fine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{Config, Raft, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::network::{Connect, Network};
use super::store::{self, State};
use super::types::{Member, Mesh, NodeId};
use crate::tasks::Tasks;

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
}

impl Node {
    /// Starts a member: opens its store, starts Raft, serves the mesh port on `socket`, and
    /// proposes the initial membership if the store is empty and this member is a voter.
    pub async fn start<C: Connect>(
        settings: &Settings,
        socket: TcpListener,
        connect: C,
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
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| StartError::DataDir {
            path: settings.data_dir.clone(),
            source,
        })?;
        let (log, machine) = store::open(&settings.data_dir).await?;
        let state = machine.subscribe();
        let network = Network::new(connect, settings.heartbeat);
        let raft = Raft::new(settings.node_id, Arc::new(config), network, log, machine).await?;
        let server = raft.clone();
        let serving = tasks.clone();
        tasks.spawn("mesh_server", super::server::serve(socket, server, serving));
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
        Ok(Node { raft, state })
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
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut sockets = Vec::new();
        let mut voters = BTreeMap::new();
        for id in 1..=3u64 {
            let s = TcpListener::bind("127.0.0.1:0").await.unwrap();
            voters.insert(id, s.local_addr().unwrap().to_string());
            sockets.push(s);
        }
        let mut nodes = Vec::new();
        let mut scopes = Vec::new();
        let root = Tasks::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let settings = Settings {
                node_id: i as u64 + 1,
                data_dir: dirs[i].path().to_owned(),
                voters: voters.clone(),
                heartbeat: Duration::from_millis(50),
                election: (Duration::from_millis(300), Duration::from_millis(600)),
                snapshot_every: 1000,
            };
            let scope = root.child();
            nodes.push(Some(
                Node::start(&settings, socket, Tcp, scope.tasks())
                    .await
                    .unwrap(),
            ));
            scopes.push(Some(scope));
        }
        let first = leader(&nodes).await;
        let l = nodes[first as usize - 1].as_ref().unwrap();
        let written = l.raft.client_write(registration("a")).await.unwrap();
        assert_eq!(written.log_id.leader_id.node_id, first);
        applied_everywhere(&nodes, "a").await;

        // The leader stops: its Raft and its mesh port go away.
        let gone = nodes[first as usize - 1].take().unwrap();
        gone.raft.shutdown().await.unwrap();
        scopes[first as usize - 1].take();
        let second = leader(&nodes).await;
        assert_ne!(second, first);
        let l = nodes[second as usize - 1].as_ref().unwrap();
        assert_eq!(
            l.raft.metrics().borrow().state,
            ServerState::Leader,
            "the new leader knows it leads"
        );
        l.raft.client_write(registration("b")).await.unwrap();
        applied_everywhere(&nodes, "b").await;
        applied_everywhere(&nodes, "a").await;
        for n in nodes.iter().flatten() {
            n.raft.shutdown().await.unwrap();
        }
    }
}
