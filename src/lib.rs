//! Outrigger: a service-mesh sidecar proxy focused on resiliency.
//!
//! Modules import one way: [`demo`] (the built-in show) → [`app`] (the composition root) → [`proxy`] (the data path) →
//! [`control`] (config, discovery, health) → the neutral [`tls`] and [`watch`] → [`telemetry`]
//! → [`error`], [`tasks`] and [`rng`]. `tests/architecture.rs` checks it.

pub mod app;
pub mod control;
pub mod demo;
pub mod error;
pub mod proxy;
pub mod rng;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod watch;
