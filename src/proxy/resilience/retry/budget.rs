//! Retry budgets: retries may add at most a share of the cluster's requests (20% by default) plus
//! a small floor per second.
//!
//! Why a budget and not only a maximum number of attempts? With three attempts per request, an
//! outage triples the load on a service that is already failing; a budget caps the extra load at
//! 20% whatever happens, so retries can never turn a failure into a retry storm (Envoy and Istio
//! leave budgets off by default; envoy#10869, istio#42065). Each cluster has one budget, shared by
//! every route that sends to it. The accounting is tower's [`TpsBudget`].

use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::control::config::resilience::BudgetConfig;

/// A cluster's retry budget.
pub struct RetryBudget {
    inner: TpsBudget,
}

impl RetryBudget {
    /// A budget with `cfg`'s share, floor and memory.
    pub fn new(cfg: &BudgetConfig) -> Self {
        Self {
            inner: TpsBudget::new(
                cfg.ttl.max(Duration::from_secs(1)),
                cfg.min_per_sec,
                cfg.ratio,
            ),
        }
    }

    /// Counts a request towards the budget.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_share_and_floor() {
        let b = RetryBudget::new(&BudgetConfig {
            ratio: 0.2,
            min_per_sec: 1,
            ttl: Duration::from_secs(10),
        });
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 20% of 1,000 plus the floor's reserve of 1/s over the 10 s memory.
        assert!((200..=211).contains(&retries), "{retries}");
    }
}
