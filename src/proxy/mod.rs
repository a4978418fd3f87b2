//! The data path, in request order: accept ([`listener`]), serve ([`http`], whose HTTP/1.1 side
//! is [`downstream`] and whose HTTP/2 streams run in their connection's task, [`streams`], or
//! [`tcp`]), route ([`router`]), run the resilience stack ([`stack`]), pick
//! an endpoint of the [`cluster`] ([`balance`], with [`outlier`] detection) and reach it through
//! its pooled client ([`connect`]; HTTP/1.1 is spoken by the request's own task, [`h1`], and idle
//! connections are kept in a [`pool`] on each endpoint). A request that switches protocols (a
//! WebSocket) becomes a [`tunnel`]. All of it runs on the [`workers`], one thread each, whose
//! timestamps come from the [`clock`] read once per wake-up of a connection.
//!
//! The data path reads control state only as immutable snapshots (route tables, endpoint sets)
//! and is never imported by the control side or by telemetry.

pub mod balance;
pub mod body;
pub mod clock;
pub mod cluster;
pub mod connect;
pub mod downstream;
pub mod endpoint;
pub mod framing;
pub mod h1;
pub mod http;
pub mod listener;
pub mod outlier;
pub mod pool;
pub mod resilience;
pub mod router;
pub mod stack;
pub mod streams;
pub mod tcp;
pub mod tunnel;
pub mod values;
pub mod workers;
