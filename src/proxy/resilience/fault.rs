//! Fault injection, for users testing their own resilience: delay or abort a share of a route's
//! requests. An aborted request is answered with the configured status and reason
//! `fault_injected`; it never reaches the upstream.

use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntCounter;
use tower::{Layer, Service};

use crate::control::config::resilience::FaultConfig;
use crate::error::ProxyError;
use crate::proxy::resilience::{Call, Response, ResponseFuture};

/// Counters of one route's injected faults.
#[derive(Clone)]
pub struct FaultMetrics {
    /// Requests delayed.
    pub delayed: IntCounter,
    /// Requests aborted.
    pub aborted: IntCounter,
}

/// A route's faults with their counters.
pub struct Faults {
    cfg: FaultConfig,
    metrics: Option<FaultMetrics>,
}

impl Faults {
    /// Faults as configured.
    pub fn new(cfg: FaultConfig, metrics: Option<FaultMetrics>) -> Self {
        Self { cfg, metrics }
    }
}

/// Injects a route's faults.
#[derive(Clone)]
pub struct FaultLayer {
    faults: Option<Arc<Faults>>,
}

impl FaultLayer {
    /// A layer injecting `faults` (`None`: none).
    pub fn new(faults: Option<Arc<Faults>>) -> Self {
        Self { faults }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            faults: self.faults.clone(),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    faults: Option<Arc<Faults>>,
}

impl<S> Service<Call> for Fault<S>
where
    S: Service<Call, Response = Response, Error = ProxyError, Future = ResponseFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> ResponseFuture {
        let Some(f) = &self.faults else {
            return self.inner.call(call);
        };
        if let Some((share, status)) = f.cfg.abort {
            if fastrand::f64() < share {
                if let Some(m) = &f.metrics {
                    m.aborted.inc();
                }
                return Box::pin(std::future::ready(Err(ProxyError::Fault(status))));
            }
        }
        match f.cfg.delay {
            Some((share, delay)) if fastrand::f64() < share => {
                if let Some(m) = &f.metrics {
                    m.delayed.inc();
                }
                let mut inner = self.inner.clone();
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    inner.call(call).await
                })
            }
            _ => self.inner.call(call),
        }
    }
}
