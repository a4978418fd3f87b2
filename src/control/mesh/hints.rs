//! Shared failure hints: when a sidecar ejects an endpoint or opens its breaker, the others that
//! send to it hear of it within a round trip and treat it as a prior, never as a verdict.
//!
//! Hints ride on the share refresh every sidecar already long-polls the leader with: a sidecar
//! sends the hints it publishes, and the answer carries every live hint from the others. The
//! leader keeps them in memory only: they are advice that expires in seconds, so a new leader
//! starting with none costs only the head start they give, and they never touch the log.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::telemetry::metrics::mesh::Families as MeshMetrics;

/// Live hints the leader keeps at most: the oldest go first.
pub const MAX_HINTS: usize = 4096;
/// The longest a hint lives, whatever its publisher asked.
pub const MAX_TTL: Duration = Duration::from_secs(300);

/// A hint as its publisher sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The endpoint, `host:port` as the publisher dials it.
    pub endpoint: String,
    /// Why: `ejected` or `breaker_open`.
    pub reason: String,
    /// How long the publisher keeps it out, in milliseconds.
    pub ttl_ms: u64,
}

/// A hint as the others receive it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// The leader's sequence number: a sidecar acts on each hint once.
    pub id: u64,
    /// What was reported.
    #[serde(flatten)]
    pub report: Report,
    /// Milliseconds it still has to live when answered.
    pub left_ms: u64,
    /// The sidecar that published it.
    pub from: String,
}

#[derive(Debug)]
struct Live {
    id: u64,
    report: Report,
    from: String,
    until: Instant,
}

/// The leader's live hints, with a version watchers wait on.
#[derive(Debug)]
pub struct Board {
    live: Mutex<VecDeque<Live>>,
    version: watch::Sender<u64>,
    /// The term of the leader that keeps the board: versions are only comparable within it.
    epoch: AtomicU64,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            live: Mutex::new(VecDeque::new()),
            version: watch::channel(0).0,
            epoch: AtomicU64::new(0),
        }
    }
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Live>> {
        // Nothing panics while holding this lock; a poisoned board is still whole.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the board for a new leadership in `term`.
    pub fn reset(&self, term: u64) {
        self.lock().clear();
        self.epoch.store(term, Ordering::Relaxed);
    }

    /// The term the board's versions belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Posts `reports` from sidecar `from` at `now`; returns how many were new.
    pub fn post(&self, from: &str, reports: &[Report], now: Instant) -> usize {
        if reports.is_empty() {
            return 0;
        }
        let mut live = self.lock();
        let mut next = *self.version.borrow();
        for r in reports {
            next += 1;
            let ttl = Duration::from_millis(r.ttl_ms).min(MAX_TTL);
            live.push_back(Live {
                id: next,
                report: r.clone(),
                from: from.to_owned(),
                until: now + ttl,
            });
            if live.len() > MAX_HINTS {
                live.pop_front();
            }
        }
        self.version.send_replace(next);
        reports.len()
    }

    /// The live hints newer than `seen` that `client` did not publish, and the version.
    pub fn since(&self, client: &str, seen: u64, now: Instant) -> (Vec<Hint>, u64) {
        let mut live = self.lock();
        live.retain(|h| h.until > now);
        let version = *self.version.borrow();
        let hints = live
            .iter()
            .filter(|h| h.id > seen && h.from != client)
            .map(|h| Hint {
                id: h.id,
                report: h.report.clone(),
                left_ms: h.until.duration_since(now).as_millis() as u64,
                from: h.from.clone(),
            })
            .collect();
        (hints, version)
    }

    /// Waits for a hint newer than `seen`.
    pub async fn newer_than(&self, seen: u64) {
        let mut rx = self.version.subscribe();
        let _ = rx.wait_for(|v| *v > seen).await;
    }
}

/// Counters of the hints a sidecar sent, received, acted on, and overrode with its own evidence.
#[derive(Clone, Debug)]
pub struct HintCounters {
    /// Hints this sidecar published.
    pub sent: IntCounter,
    /// Hints received from the group.
    pub received: IntCounter,
    /// Received hints that named one of this sidecar's endpoints and changed its balancing.
    pub acted_on: IntCounter,
    /// Hints lifted early because this sidecar's own requests to the endpoint succeeded.
    pub overridden: IntCounter,
}

/// A sidecar's side of the hints: the data path drops what it publishes here, the refresh task
/// sends it and hands what it receives to the composition root, which applies it to clusters.
#[derive(Debug)]
pub struct Exchange {
    outbox: Mutex<Vec<Report>>,
    wake: Notify,
    inbox: mpsc::Sender<Vec<Hint>>,
    /// The hint counters.
    pub counters: HintCounters,
}

/// Batches of received hints that may wait for the composition root before new ones are
/// dropped (a hint is advice: dropping one under a flood loses nothing that matters).
const INBOX: usize = 64;
/// Published hints kept for the next refresh at most.
const OUTBOX: usize = 256;

impl Exchange {
    /// An exchange counting in `metrics`, and the receiver of the hints it takes in.
    pub fn new(metrics: &MeshMetrics) -> (Arc<Exchange>, mpsc::Receiver<Vec<Hint>>) {
        let (inbox, rx) = mpsc::channel(INBOX);
        let exchange = Exchange {
            outbox: Mutex::new(Vec::new()),
            wake: Notify::new(),
            inbox,
            counters: HintCounters {
                sent: metrics.hint("sent"),
                received: metrics.hint("received"),
                acted_on: metrics.hint("acted_on"),
                overridden: metrics.hint("overridden"),
            },
        };
        (Arc::new(exchange), rx)
    }

    fn outbox(&self) -> MutexGuard<'_, Vec<Report>> {
        // Nothing panics while holding this lock; a poisoned outbox is still whole.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a hint (from the data path, on an ejection or an opened breaker: rare, so a
    /// short lock is fine); the refresh task sends it at once.
    pub fn publish(&self, report: Report) {
        let mut out = self.outbox();
        if out.len() < OUTBOX {
            out.push(report);
            self.counters.sent.inc();
        }
        drop(out);
        self.wake.notify_one();
    }

    /// Takes what waits to be sent.
    pub fn take(&self) -> Vec<Report> {
        std::mem::take(&mut *self.outbox())
    }

    /// Waits until something is published.
    pub async fn published(&self) {
        self.wake.notified().await
    }

    /// Hands received hints on.
    pub fn deliver(&self, hints: Vec<Hint>) {
        if hints.is_empty() {
            return;
        }
        self.counters.received.inc_by(hints.len() as u64);
        let _ = self.inbox.try_send(hints);
    }

    /// Puts reports back whose sending failed.
    pub fn unsent(&self, mut reports: Vec<Report>) {
        let mut out = self.outbox();
        reports.append(&mut out);
        reports.truncate(OUTBOX);
        *out = reports;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(endpoint: &str, ttl_ms: u64) -> Report {
        Report {
            endpoint: endpoint.into(),
            reason: "ejected".into(),
            ttl_ms,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hints_reach_the_others_once_and_expire() {
        let b = Board::default();
        let t0 = Instant::now();
        assert_eq!(b.post("a", &[report("10.0.0.1:80", 1000)], t0), 1);
        let (mine, v) = b.since("a", 0, t0);
        assert!(
            mine.is_empty(),
            "a publisher does not get its own hint back"
        );
        let (hints, v2) = b.since("b", 0, t0);
        assert_eq!(v, v2);
        assert_eq!(hints.len(), 1);
        assert_eq!(hints[0].left_ms, 1000);
        assert_eq!(hints[0].from, "a");
        assert!(b.since("b", v2, t0).0.is_empty(), "nothing newer");
        let (later, _) = b.since("c", 0, t0 + Duration::from_millis(600));
        assert_eq!(later[0].left_ms, 400);
        assert!(b.since("c", 0, t0 + Duration::from_secs(1)).0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_on_a_new_hint() {
        let b = std::sync::Arc::new(Board::default());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.newer_than(0).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        b.post("a", &[report("10.0.0.1:80", 1000)], Instant::now());
        waiter.await.unwrap();
    }
}
