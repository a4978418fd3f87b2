//! The data path, in request order: accept ([`listener`]), serve ([`http`] or [`tcp`]), route
//! ([`router`]), pick an endpoint ([`balance`]) and reach it through a pooled client ([`connect`]).

pub mod balance;
pub mod body;
pub mod connect;
pub mod endpoint;
pub mod framing;
pub mod http;
pub mod listener;
pub mod resilience;
pub mod router;
pub mod stack;
pub mod tcp;
pub mod tls;
