//! Outrigger: a service-mesh sidecar proxy focused on resiliency.

pub mod app;
pub mod control;
pub mod error;
pub mod proxy;
pub mod telemetry;
