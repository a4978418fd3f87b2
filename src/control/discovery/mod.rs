//! Discovery: where a cluster's endpoints come from, published as a stream of endpoint sets.
//!
//! A [`Discovery`] source yields whole endpoint sets. [`start`] follows one on a supervised task
//! and publishes each set on a `watch` channel: the data path's cluster and the health checker
//! both subscribe, and neither is known here. A source that fails or answers nothing leaves the
//! last published set in place, so a resolver hiccup never empties a cluster. `static` clusters
//! are one more source whose only answer is ready at once (so a static cluster has its endpoints
//! before its listener takes a connection); `dns` clusters follow A/AAAA or SRV records
//! ([`dns`]); `registry` clusters follow a service in the shared registry of the embedded Raft
//! group ([`registry`]). Each answer is counted in
//! `outrigger_discovery_updates_total{cluster,source,result}`.

pub mod dns;
pub mod registry;

use std::future::Future;
use std::sync::Arc;

use http::uri::Authority;
use tokio::sync::watch;

use crate::control::config::upstream::Discovery as Source;
use crate::rng::Rng;
use crate::tasks::Tasks;
use crate::telemetry::metrics::{DiscoveryMetrics, Lookup, Metrics};

/// One endpoint as a source names it: its address and relative weight.
pub type Target = (Authority, u32);

/// The endpoint set a cluster should balance over, as last published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The source kind: `static`, `dns` or `registry`.
    pub source: &'static str,
    /// The endpoints, in the source's order.
    pub list: Arc<[Target]>,
}

/// The receiving side of a cluster's endpoint sets.
pub type Subscription = watch::Receiver<Endpoints>;

/// One answer of a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The endpoints now, with weights, sorted.
    Endpoints(Vec<Target>),
    /// The source answered with no endpoints; the last set stays.
    Empty,
    /// The source failed; the last set stays.
    Failed(String),
}

/// A source of endpoint sets for one cluster.
pub trait Discovery: Send + 'static {
    /// The source kind, the `source` label of its metrics.
    fn kind(&self) -> &'static str;

    /// An answer available without waiting, if the source has one (a static list).
    fn ready(&mut self) -> Option<Update> {
        None
    }

    /// Waits until the next answer is due and returns it; `None` ends the stream.
    fn next(&mut self) -> impl Future<Output = Option<Update>> + Send;
}

/// The endpoints written in the config: one answer, at once.
pub struct Static(Option<Vec<Target>>);

impl Static {
    /// A source for `list`.
    pub fn new(list: Vec<Target>) -> Self {
        Self(Some(list))
    }
}

impl Discovery for Static {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn ready(&mut self) -> Option<Update> {
        self.0.take().map(|list| {
            if list.is_empty() {
                Update::Empty
            } else {
                Update::Endpoints(list)
            }
        })
    }

    async fn next(&mut self) -> Option<Update> {
        None
    }
}

/// Starts following `cluster`'s discovery source `source`: an immediate answer is published
/// before this returns, later ones by a task on `tasks` (a static list needs none).
pub fn start(
    cluster: &str,
    source: &Source,
    registry: Option<&registry::Registry>,
    metrics: &Metrics,
    rng: &Rng,
    tasks: &Tasks,
) -> Subscription {
    match source {
        Source::Static(list) => {
            let list = list
                .iter()
                .map(|e| (e.authority.clone(), e.weight))
                .collect();
            once(cluster, Static::new(list), metrics)
        }
        Source::Dns(cfg) => {
            let dns = dns::DnsDiscovery::new(cfg.clone(), rng.fork(), metrics.control.dns(cluster));
            publish(cluster, dns, metrics, tasks)
        }
        Source::Registry { service } => match registry {
            Some(r) => publish(cluster, r.watch(service), metrics, tasks),
            // Validation requires a `mesh:` section for a registry cluster; without one the
            // cluster simply has no endpoints.
            None => once(cluster, Static::new(Vec::new()), metrics),
        },
    }
}

/// Publishes the one answer a source has at once and closes the channel: subscribers keep that
/// set, and no task runs for it.
pub fn once<D: Discovery>(cluster: &str, mut source: D, metrics: &Metrics) -> Subscription {
    let kind = source.kind();
    let m = metrics.control.discovery(cluster, kind);
    let (tx, rx) = watch::channel(Endpoints {
        source: kind,
        list: Arc::from(Vec::new()),
    });
    if let Some(update) = source.ready() {
        apply(&tx, cluster, kind, &m, update);
    }
    rx
}

/// Publishes `source`'s answers for `cluster`: what it has at once now, the rest from a task.
pub fn publish<D: Discovery>(
    cluster: &str,
    mut source: D,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Subscription {
    let kind = source.kind();
    let m = metrics.control.discovery(cluster, kind);
    let (tx, rx) = watch::channel(Endpoints {
        source: kind,
        list: Arc::from(Vec::new()),
    });
    let cluster: Arc<str> = cluster.into();
    if let Some(update) = source.ready() {
        apply(&tx, &cluster, kind, &m, update);
    }
    tasks.spawn("discovery", async move {
        while let Some(update) = source.next().await {
            apply(&tx, &cluster, kind, &m, update);
            if tx.is_closed() {
                return;
            }
        }
        // The sender stays until the task is cancelled, so subscribers keep the last set and
        // a finished source is not mistaken for a vanished cluster.
        tx.closed().await;
    });
    rx
}

fn apply(
    tx: &watch::Sender<Endpoints>,
    cluster: &str,
    kind: &'static str,
    m: &DiscoveryMetrics,
    update: Update,
) {
    match update {
        Update::Endpoints(list) => {
            m.count(Lookup::Ok);
            let changed = tx.send_if_modified(|current| {
                if *current.list == *list {
                    return false;
                }
                current.list = Arc::from(list);
                true
            });
            if changed {
                tracing::info!(
                    cluster,
                    endpoints = tx.borrow().list.len(),
                    source = kind,
                    "endpoints changed"
                );
            }
        }
        Update::Empty => {
            m.count(Lookup::Empty);
            tracing::warn!(
                cluster,
                source = kind,
                "discovery answered no endpoints; keeping the last ones"
            );
        }
        Update::Failed(e) => {
            m.count(Lookup::Failed);
            tracing::warn!(cluster, source = kind, error = %e, "discovery failed; keeping the last endpoints");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that answers what the test sends it, and ends when the test hangs up.
    struct Scripted(tokio::sync::mpsc::UnboundedReceiver<Update>);

    impl Discovery for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }

        async fn next(&mut self) -> Option<Update> {
            self.0.recv().await
        }
    }

    fn target(port: u16, weight: u32) -> Target {
        (format!("127.0.0.1:{port}").parse().unwrap(), weight)
    }

    /// Yields until `done` holds (the task has processed what was sent).
    async fn until(done: impl Fn() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn failures_and_empty_answers_keep_the_last_set() {
        let metrics = Metrics::new().unwrap();
        let tasks = Tasks::new();
        let (tx, script) = tokio::sync::mpsc::unbounded_channel();
        let mut rx = publish("c", Scripted(script), &metrics, &tasks);
        let m = metrics.control.discovery("c", "scripted");
        tx.send(Update::Endpoints(vec![target(1, 1)])).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(&*rx.borrow_and_update().list, &[target(1, 1)]);
        tx.send(Update::Failed("boom".into())).unwrap();
        tx.send(Update::Empty).unwrap();
        until(|| m.failed.get() == 1 && m.empty.get() == 1).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a failure or an empty answer publishes nothing"
        );
        assert_eq!(&*rx.borrow().list, &[target(1, 1)]);
        tx.send(Update::Endpoints(vec![target(1, 1)])).unwrap();
        until(|| m.ok.get() == 2).await;
        assert!(
            !rx.has_changed().unwrap(),
            "the same set is not published again"
        );
        tx.send(Update::Endpoints(vec![target(1, 1), target(2, 3)]))
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(&*rx.borrow().list, &[target(1, 1), target(2, 3)]);
        drop(tx);
        assert_eq!(
            rx.borrow().list.len(),
            2,
            "an ended source leaves its last set"
        );
        tasks.cancel();
        tasks.wait().await;
        assert_eq!(tasks.running(), 0);
    }

    #[tokio::test]
    async fn a_static_list_is_there_before_start_returns() {
        let metrics = Metrics::new().unwrap();
        let tasks = Tasks::new();
        let mut rx = once("s", Static::new(vec![target(9, 2)]), &metrics);
        assert_eq!(&*rx.borrow_and_update().list, &[target(9, 2)]);
        assert_eq!(rx.borrow().source, "static");
        assert!(rx.changed().await.is_err(), "nothing more will come");
        assert_eq!(&*rx.borrow().list, &[target(9, 2)], "the set stays");
        assert_eq!(tasks.running(), 0);
    }
}
