//! The mesh group's durable store: the Raft log, the vote, the committed position and the latest
//! snapshot in one redb file, and the state machine that applies the log in memory.
//!
//! What is durable is what Raft needs to be safe: log appends, truncations, purges and the vote
//! are committed with `Durability::Immediate` (an fsync) before openraft is told they are done.
//! The state machine itself lives in memory and is rebuilt at start from the latest snapshot plus
//! the committed log that follows it, so applying an entry never touches the disk.
//!
//! redb is synchronous: every transaction runs on tokio's blocking pool so that a slow disk stalls
//! only the Raft group, never request handling. A storage error is returned to openraft, which
//! stops this member (a member that cannot trust its disk must not vote); the rest of the group
//! carries on. The deterministic simulation opens the store on an in-memory disk that outlives
//! its simulated crashes, with transactions run inline ([`open_inline`]).

// openraft's storage traits fix `StorageError` (a large enum) as the error type of every method,
// so the helpers that build it return it unboxed too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::quota::Quotas;
use super::registry::Registry;
use super::types::{Applied, LogId, Member, Membership, Mesh, NodeId, Op, Reply, StorageError};

type Entry = openraft::Entry<Mesh>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

/// The file under `mesh.data_dir` that holds the store.
pub const FILE: &str = "mesh.redb";

/// Opens (or creates) the store in `dir` and returns its two halves, which openraft drives
/// from different tasks.
pub async fn open(dir: &Path) -> Result<(LogStore, StateMachine), StorageError> {
    let path = dir.join(FILE);
    let db = match tokio::task::spawn_blocking(move || Database::create(&path)).await {
        Ok(db) => db.map_err(|e| io(ErrorSubject::Store, ErrorVerb::Read, e))?,
        Err(e) => return Err(joined(e)),
    };
    init(Disk {
        db: Arc::new(db),
        inline: false,
    })
    .await
}

/// Opens (or creates) the store on `backend` with every transaction run on the calling task:
/// the deterministic simulation keeps each member's "disk" in memory across simulated crashes,
/// and must not hand work to threads it does not schedule.
pub async fn open_inline(
    backend: impl redb::StorageBackend,
) -> Result<(LogStore, StateMachine), StorageError> {
    let db = Database::builder()
        .create_with_backend(backend)
        .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Read, e))?;
    init(Disk {
        db: Arc::new(db),
        inline: true,
    })
    .await
}

async fn init(disk: Disk) -> Result<(LogStore, StateMachine), StorageError> {
    disk.run(|db| {
        let txn = db
            .begin_write()
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?;
        {
            // Read transactions fail on a table that was never created.
            txn.open_table(LOG)
                .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?;
            txn.open_table(META)
                .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?;
        }
        txn.commit()
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))
    })
    .await?;
    let log = LogStore { disk: disk.clone() };
    let machine = StateMachine::load(disk).await?;
    Ok((log, machine))
}

/// The database, and where its transactions run.
#[derive(Clone, Debug)]
struct Disk {
    db: Arc<Database>,
    /// On the calling task rather than tokio's blocking pool (the simulation's in-memory disk).
    inline: bool,
}

impl Disk {
    /// Runs a redb transaction, on the blocking pool unless the disk is inline.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        if self.inline {
            return f(&self.db);
        }
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(result) => result,
            Err(e) => Err(joined(e)),
        }
    }
}

fn joined(e: tokio::task::JoinError) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, AnyError::new(&e)).into()
}

fn io(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl Into<redb::Error>) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e.into())).into()
}

fn decode<T: for<'de> Deserialize<'de>>(
    subject: ErrorSubject<NodeId>,
    bytes: &[u8],
) -> Result<T, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StorageIOError::new(subject, ErrorVerb::Read, AnyError::new(&e)).into())
}

fn encode<T: Serialize>(subject: ErrorSubject<NodeId>, value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value)
        .map_err(|e| StorageIOError::new(subject, ErrorVerb::Write, AnyError::new(&e)).into())
}

fn read_meta<T: for<'de> Deserialize<'de>>(
    db: &Database,
    key: &'static str,
    subject: ErrorSubject<NodeId>,
) -> Result<Option<T>, StorageError> {
    read_raw(db, key, subject.clone())?
        .map(|bytes| decode(subject, &bytes))
        .transpose()
}

fn read_raw(
    db: &Database,
    key: &'static str,
    subject: ErrorSubject<NodeId>,
) -> Result<Option<Vec<u8>>, StorageError> {
    let txn = db
        .begin_read()
        .map_err(|e| io(subject.clone(), ErrorVerb::Read, e))?;
    let table = txn
        .open_table(META)
        .map_err(|e| io(subject.clone(), ErrorVerb::Read, e))?;
    let value = table
        .get(key)
        .map_err(|e| io(subject, ErrorVerb::Read, e))?;
    Ok(value.map(|v| v.value().to_vec()))
}

fn write_meta(
    db: &Database,
    key: &'static str,
    bytes: &[u8],
    durability: Durability,
    subject: ErrorSubject<NodeId>,
) -> Result<(), StorageError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
    txn.set_durability(durability)
        .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
    {
        let mut table = txn
            .open_table(META)
            .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
        table
            .insert(key, bytes)
            .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
    }
    txn.commit().map_err(|e| io(subject, ErrorVerb::Write, e))
}

/// The Raft log, vote and committed position; also the reader replication tasks use.
#[derive(Clone, Debug)]
pub struct LogStore {
    disk: Disk,
}

impl RaftLogReader<Mesh> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        self.disk
            .run(move |db| {
                let subject = || ErrorSubject::Logs;
                let txn = db
                    .begin_read()
                    .map_err(|e| io(subject(), ErrorVerb::Read, e))?;
                let table = txn
                    .open_table(LOG)
                    .map_err(|e| io(subject(), ErrorVerb::Read, e))?;
                let iter = table
                    .range::<u64>((start, end))
                    .map_err(|e| io(subject(), ErrorVerb::Read, e))?;
                let mut out = Vec::new();
                for item in iter {
                    let (_, v) = item.map_err(|e| io(subject(), ErrorVerb::Read, e))?;
                    out.push(decode(subject(), v.value())?);
                }
                Ok(out)
            })
            .await
    }
}

impl RaftLogStorage<Mesh> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<Mesh>, StorageError> {
        self.disk
            .run(move |db| {
                let purged: Option<LogId> = read_meta(db, PURGED, ErrorSubject::Logs)?;
                let txn = db
                    .begin_read()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let table = txn
                    .open_table(LOG)
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let last = table
                    .last()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let last = match last {
                    Some((_, v)) => Some(decode::<Entry>(ErrorSubject::Logs, v.value())?.log_id),
                    None => purged,
                };
                Ok(LogState {
                    last_purged_log_id: purged,
                    last_log_id: last,
                })
            })
            .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = encode(ErrorSubject::Vote, vote)?;
        self.disk
            .run(move |db| write_meta(db, VOTE, &bytes, Durability::Immediate, ErrorSubject::Vote))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.disk
            .run(move |db| read_meta(db, VOTE, ErrorSubject::Vote))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(ErrorSubject::Store, &committed)?;
        // Not worth an fsync of its own: the next append makes it durable, and a committed
        // position that is behind after a crash only means less is re-applied at start.
        self.disk
            .run(move |db| write_meta(db, COMMITTED, &bytes, Durability::None, ErrorSubject::Store))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.disk
            .run(move |db| {
                Ok(read_meta::<Option<LogId>>(db, COMMITTED, ErrorSubject::Store)?.flatten())
            })
            .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<Mesh>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for entry in entries {
            rows.push((
                entry.log_id.index,
                encode(ErrorSubject::Log(entry.log_id), &entry)?,
            ));
        }
        let written = self
            .disk
            .run(move |db| {
                let txn = db
                    .begin_write()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
                {
                    let mut table = txn
                        .open_table(LOG)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
                    for (index, bytes) in &rows {
                        table
                            .insert(index, bytes.as_slice())
                            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
                    }
                }
                txn.commit()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))
            })
            .await;
        // openraft waits for the callback; it must hear about a failure too.
        match &written {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        written
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.disk
            .run(move |db| {
                let txn = db
                    .begin_write()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                {
                    let mut table = txn
                        .open_table(LOG)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                    table
                        .retain_in(log_id.index.., |_, _| false)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                }
                txn.commit()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = encode(ErrorSubject::Logs, &log_id)?;
        self.disk
            .run(move |db| {
                let txn = db
                    .begin_write()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                {
                    // One transaction: the purge mark and the deletion land together or not at all.
                    let mut meta = txn
                        .open_table(META)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                    meta.insert(PURGED, bytes.as_slice())
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                    let mut table = txn
                        .open_table(LOG)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                    table
                        .retain_in(..=log_id.index, |_, _| false)
                        .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
                }
                txn.commit()
                    .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))
            })
            .await
    }
}

/// What the state machine has applied: the registry, and where in the log it stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// The last log position applied.
    pub applied: Option<LogId>,
    /// The membership as of the last membership entry applied.
    pub membership: Membership,
    /// The service registry.
    pub registry: Registry,
    /// Shares of the mesh-wide rate limits.
    pub quotas: Quotas,
}

/// The snapshot's payload; the membership and position travel in openraft's metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    registry: Registry,
    /// Absent from snapshots taken before mesh-wide rate limits existed.
    #[serde(default)]
    quotas: Quotas,
}

/// The state machine: applies committed entries in memory and publishes each applied state as
/// an immutable copy that readers take without a lock on the apply path.
#[derive(Clone, Debug)]
pub struct StateMachine {
    disk: Disk,
    state: Arc<Mutex<State>>,
    published: Arc<watch::Sender<Arc<State>>>,
    builds: Arc<AtomicU64>,
}

impl StateMachine {
    async fn load(disk: Disk) -> Result<StateMachine, StorageError> {
        let snapshot = stored_snapshot(&disk).await?;
        let state = match snapshot {
            Some((meta, data)) => restore(&meta, &data)?,
            None => State::default(),
        };
        let (published, _) = watch::channel(Arc::new(state.clone()));
        Ok(StateMachine {
            disk,
            state: Arc::new(Mutex::new(state)),
            published: Arc::new(published),
            builds: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The applied state as of the last applied batch, updated after every batch.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.published.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Apply never panics while holding the lock, so a poisoned lock still holds a whole
        // state: take it rather than stop the member.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &State) {
        self.published.send_replace(Arc::new(state.clone()));
    }
}

/// The current snapshot's metadata and data, if one was stored.
async fn stored_snapshot(
    disk: &Disk,
) -> Result<Option<(SnapshotMeta<NodeId, Member>, Vec<u8>)>, StorageError> {
    disk.run(move |db| {
        let meta = read_meta(db, SNAPSHOT_META, ErrorSubject::Snapshot(None))?;
        let data = read_raw(db, SNAPSHOT_DATA, ErrorSubject::Snapshot(None))?;
        Ok(meta.zip(data))
    })
    .await
}

fn restore(meta: &SnapshotMeta<NodeId, Member>, data: &[u8]) -> Result<State, StorageError> {
    let body: SnapshotBody = decode(ErrorSubject::Snapshot(Some(meta.signature())), data)?;
    Ok(State {
        applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        registry: body.registry,
        quotas: body.quotas,
    })
}

impl RaftSnapshotBuilder<Mesh> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<Mesh>, StorageError> {
        // Apply runs concurrently with this: take a consistent copy and let it go on.
        let state = self.lock().clone();
        let build = self.builds.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match state.applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, build),
            None => format!("0-0-{build}"),
        };
        let meta = SnapshotMeta {
            last_log_id: state.applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        let data = encode(
            ErrorSubject::Snapshot(Some(meta.signature())),
            &SnapshotBody {
                registry: state.registry,
                quotas: state.quotas,
            },
        )?;
        save_snapshot(&self.disk, meta.clone(), data.clone()).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Stores `meta` and `data` as the current snapshot unless a newer one is already there (an
/// installed snapshot can land while a build is running; the current one never goes back).
async fn save_snapshot(
    disk: &Disk,
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let subject = ErrorSubject::Snapshot(Some(meta.signature()));
    let meta_bytes = encode(subject.clone(), &meta)?;
    disk.run(move |db| {
        let txn = db
            .begin_write()
            .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
        {
            let mut table = txn
                .open_table(META)
                .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
            let stored = table
                .get(SNAPSHOT_META)
                .map_err(|e| io(subject.clone(), ErrorVerb::Read, e))?
                .map(|v| decode::<SnapshotMeta<NodeId, Member>>(subject.clone(), v.value()))
                .transpose()?;
            if stored.is_some_and(|s| s.last_log_id > meta.last_log_id) {
                return Ok(());
            }
            table
                .insert(SNAPSHOT_META, meta_bytes.as_slice())
                .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
            table
                .insert(SNAPSHOT_DATA, data.as_slice())
                .map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
        }
        txn.commit().map_err(|e| io(subject, ErrorVerb::Write, e))
    })
    .await
}

impl RaftStateMachine<Mesh> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let state = self.lock();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut state = self.lock();
        for entry in entries {
            state.applied = Some(entry.log_id);
            let mut reply = Reply::default();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => {
                    for op in &command.ops {
                        reply.results.push(match op {
                            Op::Registry(change) => {
                                Applied::Registry(state.registry.apply(entry.log_id.index, change))
                            }
                            Op::Quota(allocation) => Applied::Quota {
                                changed: state.quotas.apply(entry.log_id.index, allocation),
                            },
                        });
                    }
                }
                EntryPayload::Membership(m) => {
                    state.membership = Membership::new(Some(entry.log_id), m);
                }
            }
            replies.push(reply);
        }
        self.publish(&state);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let restored = restore(meta, &data)?;
        save_snapshot(&self.disk, meta.clone(), data).await?;
        let mut state = self.lock();
        *state = restored;
        self.publish(&state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Mesh>>, StorageError> {
        Ok(stored_snapshot(&self.disk)
            .await?
            .map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use tempfile::TempDir;

    use super::*;

    struct Fresh;

    impl StoreBuilder<Mesh, LogStore, StateMachine, TempDir> for Fresh {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
            let dir = TempDir::new().map_err(|e| {
                StorageError::from(StorageIOError::new(
                    ErrorSubject::Store,
                    ErrorVerb::Write,
                    AnyError::new(&e),
                ))
            })?;
            let (log, machine) = open(dir.path()).await?;
            Ok((dir, log, machine))
        }
    }

    /// openraft's conformance suite: the contract every storage implementation must keep.
    #[test]
    fn the_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
        Suite::test_all(Fresh)
    }
}
