//! The control side: configuration, its reloads, and (later) discovery and the Raft group.

pub mod config;
