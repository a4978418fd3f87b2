//! The mesh group's Raft types: what its log carries and what applying an entry answers.
//!
//! One log entry carries a batch of operations, because openraft waits for each log flush before
//! the next append: coalescing the operations pending at a flush into one entry is what lets one
//! fsync serve many writers. Each operation names its kind, so later kinds of shared state
//! (cluster-wide rate limits, failure hints) join the same log without a new format.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use super::quota::Allocation;
use super::registry::{Change, Outcome};

/// A member's id in the mesh group (`mesh.node_id`).
pub type NodeId = u64;

/// A member as the group's membership records it: where its mesh port listens.
pub type Member = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The Raft type configuration of the mesh group.
    pub Mesh:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<Mesh>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry's payload: the operations proposed together, applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The operations, in the order they were proposed.
    pub ops: Vec<Op>,
}

/// One operation on the shared state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// A change to the service registry.
    Registry(Change),
    /// An allocation of mesh-wide rate-limit shares.
    Quota(Allocation),
}

/// What applying an entry did: one result per operation, in order (empty for Raft's own
/// blank and membership entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// One result per operation of the entry.
    pub results: Vec<Applied>,
}

/// The result of one operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Applied {
    /// What a registry change did.
    Registry(Outcome),
    /// How many shares an allocation changed.
    Quota {
        /// Shares set or removed.
        changed: usize,
    },
}

/// A log position: the term of the leader that wrote it and its index.
pub type LogId = openraft::LogId<NodeId>;

/// The membership as of a log position.
pub type Membership = openraft::StoredMembership<NodeId, Member>;

/// A storage failure, which stops the Raft node (openraft's rule).
pub type StorageError = openraft::StorageError<NodeId>;
