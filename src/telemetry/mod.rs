//! Telemetry: the metrics registry, the admin server and logging.

pub mod admin;
pub mod logging;
pub mod metrics;
