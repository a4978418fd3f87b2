//! A member at work: batching writes into log entries, keeping the lease clock while it leads,
//! and knowing how fresh its local state is.
//!
//! Writes queue on a bounded channel and a single proposer turns whatever is queued into one
//! entry, so while one entry is being made durable the next batch gathers: batches grow with load
//! and one fsync serves many writers. A full queue refuses at once (`Busy`) instead of stalling
//! the caller. A commit that takes longer than [`COMMIT_TIMEOUT`] is reported as of unknown
//! outcome: it may still commit, and every registry write is idempotent, so the caller retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{Raft, ServerState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::checks::CheckBoard;
use super::hints::Board;
use super::leases::{Leases, Renewal};
use super::quota::{milli, Allocator, Demand, Refresh, TICK};
use super::registry::{Change, Lease, Outcome};
use super::store::State;
use super::types::{Applied, Command, LogId, Mesh, NodeId, Op};
use crate::tasks::Tasks;
use crate::telemetry::metrics::mesh::{Families as MeshMetrics, Proposal};

/// Operations a proposer puts in one entry at most.
pub const MAX_BATCH: usize = 1024;
/// Writes that may wait for the proposer before new ones are refused.
pub const QUEUE: usize = 8192;
/// How long a write waits for its entry to commit before it is reported as unknown.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader looks for lapsed leases.
pub const LEASE_TICK: Duration = Duration::from_millis(100);

/// A write that committed: what it did and where it sits in the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    /// What applying the operation did.
    pub applied: Applied,
    /// The entry that carried it.
    pub log_id: LogId,
}

/// Why a write did not (yet) commit.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WriteError {
    /// This member does not lead; the leader, if known, with its mesh address.
    #[error("not the leader")]
    NotLeader(Option<(NodeId, String)>),
    /// The queue of pending writes is full.
    #[error("too many writes pending")]
    Busy,
    /// The write may or may not commit (a timeout, a leader change mid-commit).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The member has stopped.
    #[error("mesh member stopped: {0}")]
    Stopped(String),
}

type Pending = (Op, oneshot::Sender<Result<Written, WriteError>>);

/// Hands operations to the proposer.
#[derive(Clone, Debug)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    metrics: MeshMetrics,
}

impl Proposer {
    /// Queues `op` and waits for it to commit.
    pub async fn propose(&self, op: Op) -> Result<Written, WriteError> {
        let (tx, rx) = oneshot::channel();
        self.tx.try_send((op, tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.proposed(Proposal::Busy, 1);
                WriteError::Busy
            }
            mpsc::error::TrySendError::Closed(_) => WriteError::Stopped("proposer ended".into()),
        })?;
        rx.await
            .map_err(|_| WriteError::Stopped("proposer ended".into()))?
    }
}

/// When this member last heard from a leader that counted it in, for reporting staleness.
#[derive(Debug)]
pub struct Contact {
    origin: Instant,
    /// Milliseconds since `origin` of the last contact, plus one (0 = never).
    last: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Contact {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Contact {
    /// Records a contact now.
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Time since the last contact, if there was one.
    pub fn since(&self) -> Option<Duration> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

/// What a leader keeps in memory only, present while this member leads and has caught up with
/// the log: the lease table and the rate-limit allocator.
#[derive(Debug, Default)]
pub struct LeaderTables {
    leases: Mutex<Option<Leases>>,
    allocator: Mutex<Option<Allocator>>,
    /// Live failure hints (meaningful while leading; emptied at each new leadership).
    pub board: Board,
    /// Coordinated checking's rosters and verdicts (as the board).
    pub checks: CheckBoard,
}

impl LeaderTables {
    fn lock(&self) -> MutexGuard<'_, Option<Leases>> {
        // Nothing panics while holding this lock; a poisoned table is still whole.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocator(&self) -> MutexGuard<'_, Option<Allocator>> {
        // As above: the allocator is whole whatever happened to another holder.
        self.allocator.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a sidecar's rate-limit refresh; false while this member is not (yet) a leader
    /// with an allocator.
    pub fn refresh(&self, refresh: &Refresh) -> bool {
        let mut allocator = self.allocator();
        let Some(a) = allocator.as_mut() else {
            return false;
        };
        let demands = refresh
            .limits
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    Demand {
                        rate: milli(l.rate),
                        offered: milli(l.offered),
                    },
                )
            })
            .collect();
        a.refresh(&refresh.client, refresh.holding, demands, Instant::now());
        true
    }

    /// Sidecars the allocator heard from lately (0 when not leading).
    pub fn quota_clients(&self) -> usize {
        self.allocator().as_ref().map_or(0, Allocator::clients)
    }

    /// Renews each lease; `None` while this member is not (yet) a leader with a table.
    pub fn renew(&self, leases: &[Lease], state: &State) -> Option<Vec<Renewal>> {
        let now = Instant::now();
        let mut table = self.lock();
        let table = table.as_mut()?;
        Some(
            leases
                .iter()
                .map(|l| match table.renew(&l.service, &l.id, l.revision, now) {
                    Renewal::Unknown if registered(state, l) => {
                        // Applied but not yet seen by the lease task: start tracking it now.
                        table.track(l, ttl(state, l), now);
                        Renewal::Renewed
                    }
                    r => r,
                })
                .collect(),
        )
    }

    /// Number of leases tracked (0 when not leading).
    pub fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, Leases::len)
    }

    /// Whether no lease is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn registered(state: &State, l: &Lease) -> bool {
    state
        .registry
        .service(&l.service)
        .and_then(|s| s.instances.get(&l.id))
        .is_some_and(|i| i.revision == l.revision)
}

fn ttl(state: &State, l: &Lease) -> Duration {
    state
        .registry
        .service(&l.service)
        .and_then(|s| s.instances.get(&l.id))
        .map_or(Duration::ZERO, |i| {
            Duration::from_millis(i.registration.ttl_ms)
        })
}

/// Starts the proposer and the lease clock of a member.
pub fn start(
    raft: Raft<Mesh>,
    state: watch::Receiver<Arc<State>>,
    metrics: MeshMetrics,
    tasks: &Tasks,
) -> (Proposer, Arc<LeaderTables>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    tasks.spawn("mesh_proposer", propose(raft.clone(), rx, metrics.clone()));
    let table = Arc::new(LeaderTables::default());
    let proposer = Proposer {
        tx,
        metrics: metrics.clone(),
    };
    tasks.spawn(
        "mesh_allocations",
        allocation_clock(
            state.clone(),
            proposer.clone(),
            table.clone(),
            metrics.clone(),
        ),
    );
    tasks.spawn(
        "mesh_leases",
        lease_clock(
            raft,
            state,
            proposer.clone(),
            table.clone(),
            metrics,
            tasks.clone(),
        ),
    );
    (proposer, table)
}

async fn propose(raft: Raft<Mesh>, mut rx: mpsc::Receiver<Pending>, metrics: MeshMetrics) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (ops, waiters): (Vec<Op>, Vec<_>) = batch.drain(..).unzip();
        let started = Instant::now();
        let written =
            tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(Command { ops })).await;
        let result = match &written {
            Ok(Ok(_)) => {
                metrics.committed_in(started.elapsed().as_secs_f64());
                Proposal::Committed
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Proposal::NotLeader
            }
            Ok(Err(RaftError::Fatal(_))) => Proposal::Stopped,
            Ok(Err(_)) | Err(_) => Proposal::Unknown,
        };
        metrics.proposed(result, waiters.len());
        match written {
            Ok(Ok(resp)) => {
                let log_id = resp.log_id;
                let mut results = resp.data.results.into_iter();
                for w in waiters {
                    let r = match results.next() {
                        Some(applied) => Ok(Written { applied, log_id }),
                        None => Err(WriteError::Unknown("no result for the operation".into())),
                    };
                    let _ = w.send(r);
                }
            }
            Ok(Err(e)) => {
                let err = match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                        WriteError::NotLeader(f.leader_id.zip(f.leader_node.map(|n| n.addr)))
                    }
                    RaftError::APIError(e) => WriteError::Unknown(e.to_string()),
                    RaftError::Fatal(e) => WriteError::Stopped(e.to_string()),
                };
                for w in waiters {
                    let _ = w.send(Err(err.clone()));
                }
            }
            Err(_) => {
                for w in waiters {
                    let _ = w.send(Err(WriteError::Unknown(format!(
                        "not committed within {COMMIT_TIMEOUT:?}"
                    ))));
                }
            }
        }
    }
}

/// While this member leads with an allocator: every [`TICK`], commit the shares that changed,
/// for every limit and sidecar in one entry.
async fn allocation_clock(
    state: watch::Receiver<Arc<State>>,
    proposer: Proposer,
    table: Arc<LeaderTables>,
    metrics: MeshMetrics,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        table.checks.sweep(Instant::now());
        let quotas = state.borrow().quotas.clone();
        let Some(allocation) = table
            .allocator()
            .as_mut()
            .and_then(|a| a.tick(&quotas, Instant::now()))
        else {
            continue;
        };
        // Awaited: the next allocation starts from the state this one leaves.
        let written = proposer.propose(Op::Quota(allocation)).await;
        let mut allocator = table.allocator();
        let Some(a) = allocator.as_mut() else {
            continue;
        };
        match written {
            Ok(w) => {
                metrics.allocated();
                a.committed(w.log_id.index, Instant::now());
            }
            Err(WriteError::NotLeader(_) | WriteError::Busy | WriteError::Stopped(_)) => {
                // Not appended: its decreases never reach anyone.
                a.abandoned(Instant::now(), Duration::ZERO);
            }
            Err(WriteError::Unknown(_)) => a.abandoned(Instant::now(), COMMIT_TIMEOUT),
        }
    }
}

/// While this member leads: build the lease table once the log is applied, keep it in line
/// with the registry, and propose the expiry of lapsed leases.
async fn lease_clock(
    raft: Raft<Mesh>,
    mut state: watch::Receiver<Arc<State>>,
    proposer: Proposer,
    table: Arc<LeaderTables>,
    metrics: MeshMetrics,
    tasks: Tasks,
) {
    let mut raft_metrics = raft.metrics();
    let mut tick = tokio::time::interval(LEASE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_term = None;
    loop {
        let (leading, term) = {
            let m = raft_metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        if !leading {
            leading_term = None;
            *table.lock() = None;
            *table.allocator() = None;
        } else if leading_term != Some(term) {
            // Newly elected: the table starts once everything committed before is applied,
            // with a fresh TTL for every lease (no failover expires a lease early).
            *table.lock() = None;
            *table.allocator() = None;
            let caught_up = tokio::time::timeout(COMMIT_TIMEOUT, raft.ensure_linearizable()).await;
            if matches!(caught_up, Ok(Ok(_))) {
                let snapshot = state.borrow_and_update().clone();
                let mut leases = Leases::default();
                leases.reset(&snapshot.registry, Instant::now());
                tracing::info!(
                    term,
                    leases = leases.len(),
                    "mesh leader: lease clock started"
                );
                *table.lock() = Some(leases);
                *table.allocator() = Some(Allocator::new(Instant::now()));
                table.board.reset(term);
                table.checks.reset();
                leading_term = Some(term);
            }
        }
        tokio::select! {
            changed = raft_metrics.changed() => if changed.is_err() { return },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = state.borrow_and_update().clone();
                if let Some(leases) = table.lock().as_mut() {
                    leases.sync(&snapshot.registry, Instant::now());
                }
            }
            _ = tick.tick() => {
                let lapsed = match table.lock().as_mut() {
                    Some(leases) => leases.lapsed(Instant::now()),
                    None => Vec::new(),
                };
                if !lapsed.is_empty() {
                    let proposer = proposer.clone();
                    let table = table.clone();
                    let metrics = metrics.clone();
                    // Not awaited here: the clock keeps ticking while the expiry commits.
                    tasks.spawn("mesh_expiry", async move {
                        let op = Op::Registry(Change::Expire { leases: lapsed.clone() });
                        match proposer.propose(op).await {
                            Ok(Written { applied: Applied::Registry(Outcome::Expired { removed }), .. }) => {
                                metrics.expired(removed.len());
                                tracing::info!(expired = removed.len(), "mesh leases expired");
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "lease expiry not committed; will retry");
                                if let Some(leases) = table.lock().as_mut() {
                                    leases.retry(&lapsed);
                                }
                            }
                        }
                    });
                }
            }
        }
    }
}
