//! The control side: configuration and its reloads, discovery, health checking, and (later) the
//! embedded Raft group.

pub mod config;
pub mod discovery;
pub mod health;
pub mod mesh;
