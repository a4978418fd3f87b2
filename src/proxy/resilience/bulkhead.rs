//! Bulkheads: a cap on the requests in flight to a cluster (or through a route), with a bounded
//! queue and a queue timeout, so that one slow dependency cannot take the capacity that others
//! need. Each cluster also has its own connection pool (see [`crate::proxy::connect`]).
//!
//! A request that finds the cap reached waits in the queue; if the queue is full, or the wait
//! exceeds `queue_timeout`, it is refused with 503 `bulkhead_full`. The slot is held until the
//! response headers arrive.

use std::borrow::Borrow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::sync::Semaphore;

use crate::control::config::resilience::BulkheadConfig;
use crate::error::ProxyError;
use crate::proxy::resilience::{
    Apply, ApplyLayer, Call, Inner, Mechanism, Response, ResponseFuture,
};
use crate::telemetry::metrics::BulkheadMetrics;

/// The shared state of one bulkhead.
pub struct Bulkhead {
    slots: Arc<Semaphore>,
    pending: AtomicU32,
    max_pending: u32,
    queue_timeout: Duration,
    metrics: Option<BulkheadMetrics>,
}

impl Bulkhead {
    /// A bulkhead with `cfg`'s limits.
    pub fn new(cfg: &BulkheadConfig, metrics: Option<BulkheadMetrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(cfg.max_concurrent as usize)),
            pending: AtomicU32::new(0),
            max_pending: cfg.max_pending,
            queue_timeout: cfg.queue_timeout,
            metrics,
        }
    }

    /// A slot if one is free now.
    fn try_acquire(self: &Arc<Self>) -> Option<Slot<Arc<Bulkhead>>> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Slot::new(permit, self.clone()))
    }

    /// Waits for a slot, within the queue's bounds.
    pub async fn acquire(&self) -> Result<Slot<&Bulkhead>, ProxyError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let queued = self
                    .pending
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.max_pending).then_some(n + 1)
                    });
                if queued.is_err() || self.queue_timeout.is_zero() {
                    if queued.is_ok() {
                        self.pending.fetch_sub(1, Ordering::AcqRel);
                    }
                    return Err(ProxyError::BulkheadFull);
                }
                let _left = Dequeue(self);
                if let Some(m) = &self.metrics {
                    m.queued.inc();
                }
                tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .ok_or(ProxyError::BulkheadFull)?
            }
        };
        Ok(Slot::new(permit, self))
    }
}

struct Dequeue<'a>(&'a Bulkhead);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.0.metrics {
            m.queued.dec();
        }
    }
}

/// A held slot of the bulkhead `B` points to; dropping it frees the slot.
pub struct Slot<B: Borrow<Bulkhead>> {
    _permit: tokio::sync::OwnedSemaphorePermit,
    bulkhead: B,
}

impl<B: Borrow<Bulkhead>> Slot<B> {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, bulkhead: B) -> Self {
        if let Some(m) = &bulkhead.borrow().metrics {
            m.active.inc();
        }
        Self {
            _permit: permit,
            bulkhead,
        }
    }
}

impl<B: Borrow<Bulkhead>> Drop for Slot<B> {
    fn drop(&mut self) {
        if let Some(m) = &self.bulkhead.borrow().metrics {
            m.active.dec();
        }
    }
}

/// Puts a bulkhead in front of the inner service.
pub type BulkheadLayer = ApplyLayer<Bulkhead>;
/// See [`BulkheadLayer`].
pub type BulkheadService<S> = Apply<Bulkhead, S>;

impl Mechanism for Bulkhead {
    type Future<S: Inner> = Either<Slotted<S::Future>, ResponseFuture>;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> Self::Future<S> {
        // A free slot, the usual case, sends the call on at once; only a wait is boxed.
        if let Some(slot) = self.try_acquire() {
            return Either::Left(Slotted {
                inner: inner.call(call),
                slot: Some(slot),
            });
        }
        let (bulkhead, mut inner) = (self.clone(), inner.clone());
        Either::Right(Box::pin(async move {
            let _slot = bulkhead.acquire().await?;
            inner.call(call).await
        }))
    }
}

pin_project! {
    /// A call holding a slot until its response headers arrive.
    pub struct Slotted<F> {
        #[pin]
        inner: F,
        slot: Option<Slot<Arc<Bulkhead>>>,
    }
}

impl<F: Future<Output = Result<Response, ProxyError>>> Future for Slotted<F> {
    type Output = Result<Response, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        this.slot.take();
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_then_refuse() {
        let b = Bulkhead::new(
            &BulkheadConfig {
                max_concurrent: 1,
                max_pending: 1,
                queue_timeout: Duration::from_millis(100),
            },
            None,
        );
        let held = b.acquire().await.unwrap();
        // One may queue; a second is refused at once.
        let (waiter, refused) = tokio::join!(b.acquire(), async {
            tokio::task::yield_now().await;
            b.acquire().await.err()
        });
        assert!(matches!(refused, Some(ProxyError::BulkheadFull)));
        assert!(
            matches!(waiter, Err(ProxyError::BulkheadFull)),
            "queue timeout while held"
        );
        drop(held);
        let got = b.acquire().await;
        assert!(got.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_is_refused_when_its_queue_timeout_passes() {
        let b = Bulkhead::new(
            &BulkheadConfig {
                max_concurrent: 1,
                max_pending: 1,
                queue_timeout: Duration::from_millis(100),
            },
            None,
        );
        let _held = b.acquire().await.unwrap();
        let start = tokio::time::Instant::now();
        assert!(matches!(b.acquire().await, Err(ProxyError::BulkheadFull)));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // With no queue, the refusal is immediate.
        let b = Bulkhead::new(
            &BulkheadConfig {
                max_concurrent: 1,
                max_pending: 0,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let _held = b.acquire().await.unwrap();
        assert!(matches!(b.acquire().await, Err(ProxyError::BulkheadFull)));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_gets_the_freed_slot() {
        let b = Arc::new(Bulkhead::new(
            &BulkheadConfig {
                max_concurrent: 1,
                max_pending: 4,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        ));
        let held = b.acquire().await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire().await.is_ok() });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
