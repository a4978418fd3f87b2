//! The embedded Raft group ("the mesh"): a few sidecars that hold the state the fleet must agree
//! on — first the service registry — so no external service (Consul, etcd, a control plane) is
//! needed.
//!
//! The consensus engine is openraft (pinned); this module supplies its storage, network and state
//! machine. Nothing on the request path waits on the group: the data path reads the state as
//! published after each applied batch, and a member that loses its disk stops voting rather than
//! risk the group's safety.

pub mod allowance;
pub mod checks;
pub mod client;
pub mod group;
pub mod hints;
pub mod leases;
pub mod network;
pub mod node;
pub mod quota;
pub mod registrar;
pub mod registry;
pub mod server;
#[cfg(test)]
mod sim;
pub mod store;
pub mod types;
