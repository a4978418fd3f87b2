//! Fault injection, for users testing their own resilience: delay or abort a share of a route's
//! requests. An aborted request is answered with the configured status and reason
//! `fault_injected`; it never reaches the upstream.

use std::sync::Arc;

use futures_util::future::Either;

use crate::control::config::resilience::FaultConfig;
use crate::error::ProxyError;
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Inner, Mechanism, ResponseFuture};
use crate::rng::Rng;
use crate::telemetry::metrics::FaultMetrics;

/// A route's faults with their counters.
pub struct Faults {
    cfg: FaultConfig,
    metrics: Option<FaultMetrics>,
    rng: Rng,
}

impl Faults {
    /// Faults as configured.
    pub fn new(cfg: FaultConfig, metrics: Option<FaultMetrics>, rng: Rng) -> Self {
        Self { cfg, metrics, rng }
    }
}

/// Injects a route's faults.
pub type FaultLayer = ApplyLayer<Faults>;
/// See [`FaultLayer`].
pub type Fault<S> = Apply<Faults, S>;

impl Mechanism for Faults {
    type Future<S: Inner> = Either<S::Future, ResponseFuture>;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> Self::Future<S> {
        let f = self;
        if let Some((share, status)) = f.cfg.abort {
            if f.rng.f64() < share {
                if let Some(m) = &f.metrics {
                    m.aborted.inc();
                }
                return Either::Right(Box::pin(std::future::ready(Err(ProxyError::Fault(status)))));
            }
        }
        match f.cfg.delay {
            Some((share, delay)) if f.rng.f64() < share => {
                if let Some(m) = &f.metrics {
                    m.delayed.inc();
                }
                let mut inner = inner.clone();
                Either::Right(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    inner.call(call).await
                }))
            }
            _ => Either::Left(inner.call(call)),
        }
    }
}
