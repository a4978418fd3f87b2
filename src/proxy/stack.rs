//! The one place the order of the resilience layers is decided.
//!
//! Outermost first, per route target:
//!
//! 1. fault injection — a test fault behaves like the network, so everything below still applies;
//! 2. rate limit — the cheapest refusal comes first;
//! 3. load shedding (the listener's adaptive limit) — measures the whole request's latency;
//! 4. route bulkhead;
//! 5. route timeout — sets the deadline that covers every try and every wait below;
//! 6. retry and hedging — each try below is one attempt;
//! 7. cluster circuit breaker — an open circuit fails fast, before queueing, and it sees the
//!    per-try timeouts below as failures;
//! 8. per-try timeout (the upstream layer enforces the same instant, for endpoint breakers);
//! 9. cluster bulkhead;
//! 10. the upstream: endpoint choice (skipping open endpoint breakers), deadline propagation,
//!     the pooled client.

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::control::config::RouteConfig;
use crate::control::mesh::allowance::Allowances;
use crate::proxy::cluster::Cluster;
use crate::proxy::connect::Upstream;
use crate::proxy::resilience::breaker::{Breaker, BreakerLayer};
use crate::proxy::resilience::bulkhead::{Bulkhead, BulkheadLayer, BulkheadService};
use crate::proxy::resilience::fault::{Fault, FaultLayer, Faults};
use crate::proxy::resilience::load_shed::{Limiter, LoadShed, LoadShedLayer};
use crate::proxy::resilience::rate_limit::{RateLimit, RateLimitLayer, RateLimiter};
use crate::proxy::resilience::retry::{Retry, RetryLayer, RetryPolicy};
use crate::proxy::resilience::timeout::{
    PerTryTimeout, PerTryTimeoutLayer, RouteDeadline, RouteTimeout, RouteTimeoutLayer, TryDeadline,
};
use crate::rng::Rng;
use crate::telemetry::metrics::Metrics;

/// The full stack of one route target, as a concrete type: no boxing of services.
pub type RouteStack = Fault<
    RateLimit<
        LoadShed<
            BulkheadService<RouteTimeout<Retry<Breaker<PerTryTimeout<BulkheadService<Upstream>>>>>>,
        >,
    >,
>;

/// Route-level state shared by the targets of one route.
pub struct RouteShared {
    /// The route's faults.
    pub faults: Option<Arc<Faults>>,
    /// The route's rate limiter.
    pub limiter: Option<Arc<RateLimiter>>,
    /// The route's own bulkhead.
    pub bulkhead: Option<Arc<Bulkhead>>,
}

impl RouteShared {
    /// Whether two versions of a route would build the same route-level state.
    pub fn same(a: &RouteConfig, b: &RouteConfig) -> bool {
        a.rate_limit == b.rate_limit && a.bulkhead == b.bulkhead && a.fault == b.fault
    }

    /// Builds the route-level state of `route` on `listener`; faults and rate-limit hashing
    /// draw from `rng`, and a mesh-wide rate limit takes its share from `allowances`.
    pub fn new(
        listener: &str,
        route: &RouteConfig,
        metrics: &Metrics,
        rng: &Rng,
        allowances: Option<&Allowances>,
    ) -> Self {
        let m = &metrics.resilience;
        Self {
            faults: route.fault.clone().map(|f| {
                Arc::new(Faults::new(
                    f,
                    Some(m.fault(listener, &route.name)),
                    rng.fork(),
                ))
            }),
            limiter: route.rate_limit.as_ref().map(|r| {
                Arc::new(RateLimiter::new(
                    r,
                    Some(m.rate_limit(listener, &route.name)),
                    rng.u64(),
                    allowances.and_then(|a| a.get(r)),
                ))
            }),
            bulkhead: route.bulkhead.as_ref().map(|b| {
                Arc::new(Bulkhead::new(
                    b,
                    Some(metrics.resilience.route_bulkhead(&route.name)),
                ))
            }),
        }
    }
}

/// Builds the stack for sending `route`'s requests to `cluster`.
pub fn build(
    listener: &str,
    route: &RouteConfig,
    shared: &RouteShared,
    cluster: &Arc<Cluster>,
    shed: Option<Arc<Limiter>>,
    metrics: &Metrics,
    rng: &Rng,
) -> RouteStack {
    let policy = Arc::new(RetryPolicy::new(
        route.retry.clone(),
        cluster.budget.clone(),
        cluster.latency.clone(),
        Some(
            metrics
                .resilience
                .retry(listener, &route.name, cluster.name()),
        ),
        rng.fork(),
    ));
    ServiceBuilder::new()
        .layer(FaultLayer::new(shared.faults.clone()))
        .layer(RateLimitLayer::new(shared.limiter.clone()))
        .layer(LoadShedLayer::new(shed))
        .layer(BulkheadLayer::new(shared.bulkhead.clone()))
        .layer(RouteTimeoutLayer::new(Some(Arc::new(RouteDeadline::new(
            route.timeout,
        )))))
        .layer(RetryLayer::new(policy))
        .layer(BreakerLayer::new(cluster.breaker.clone()))
        .layer(PerTryTimeoutLayer::new(Some(Arc::new(TryDeadline::new(
            route.retry.per_try_timeout,
        )))))
        .layer(BulkheadLayer::new(Some(cluster.bulkhead.clone())))
        .service(Upstream::new(cluster.clone()))
}
