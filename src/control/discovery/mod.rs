//! Discovery: where a cluster's endpoints come from, as a stream of endpoint sets.
//!
//! A [`Discovery`] yields whole endpoint sets; the cluster swaps each in (keeping the state of
//! endpoints that stay) and keeps its last set when a source fails or answers nothing, so a
//! resolver hiccup never empties a cluster. `static` clusters are set once from the config; `dns`
//! clusters follow A/AAAA or SRV records ([`dns`]); `registry` clusters will follow a service in
//! the shared registry of the embedded Raft group, through [`Registry`].

pub mod dns;

use std::future::Future;
use std::sync::{Arc, Weak};

use http::uri::Authority;

use crate::control::config::upstream::Discovery as Source;
use crate::proxy::connect::Cluster;

/// One answer of a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The endpoints now, with weights, sorted.
    Endpoints(Vec<(Authority, u32)>),
    /// The source answered with no endpoints; the last set stays.
    Empty,
    /// The source failed; the last set stays.
    Failed(String),
}

/// A source of endpoint sets for one cluster.
pub trait Discovery: Send + 'static {
    /// Waits until the next answer is due and returns it; `None` ends the stream.
    fn next(&mut self) -> impl Future<Output = Option<Update>> + Send;
}

/// The shared service registry, as the embedded Raft group will provide it: each named service
/// becomes a discovery source.
pub trait Registry: Send + Sync + 'static {
    /// The source type for one service.
    type Watch: Discovery;
    /// Watches `service`.
    fn watch(&self, service: &str) -> Self::Watch;
}

/// Starts following `cluster`'s discovery source, if it has a dynamic one.
pub fn spawn(cluster: &Arc<Cluster>) {
    match &cluster.config.upstream.discovery {
        Source::Static(_) => {}
        Source::Dns(cfg) => {
            let source = dns::DnsDiscovery::new(cfg.clone());
            tokio::spawn(follow(Arc::downgrade(cluster), source, "dns"));
        }
    }
}

/// Applies a source's answers to a cluster until either ends.
pub async fn follow<D: Discovery>(cluster: Weak<Cluster>, mut source: D, kind: &'static str) {
    while let Some(update) = source.next().await {
        let Some(c) = cluster.upgrade() else { return };
        match update {
            Update::Endpoints(list) => {
                c.metrics.dns[0].inc();
                if c.set_endpoints(&list, kind) {
                    tracing::info!(cluster = %c.name(), endpoints = list.len(), source = kind, "endpoints changed");
                }
            }
            Update::Empty => {
                c.metrics.dns[2].inc();
                tracing::warn!(cluster = %c.name(), source = kind, "discovery answered no endpoints; keeping the last ones");
            }
            Update::Failed(e) => {
                c.metrics.dns[1].inc();
                tracing::warn!(cluster = %c.name(), source = kind, error = %e, "discovery failed; keeping the last endpoints");
            }
        }
    }
}
