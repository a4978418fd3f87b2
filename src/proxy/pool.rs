//! Idle HTTP/1.1 connections to upstream endpoints: kept on the endpoint itself, one list per
//! worker, and handed back by the response body the moment its last frame is read.
//!
//! Why not hyper-util's pool (HTTP/2 clusters still use it, for its shared multiplexed
//! connection): for every request it hashes the endpoint's scheme and authority to find the idle
//! list, under one lock shared by every endpoint, builds an absolute URI only to turn it back
//! into a path, and when the response has a body it spawns a task that waits for the connection
//! to become reusable. Here the balancer has already picked the endpoint, so the list is a field
//! away; the body that ends is the one that returns the connection; and a connection has no task
//! of its own ([`crate::proxy::h1`]): the only task is a sweeper per endpoint and worker while it
//! has idle connections, so that `pool.idle_timeout` closes them even when no request comes. A
//! connection the upstream closed while idle is noticed when it is next taken (its socket is
//! readable), and dropped then.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::clock;
use crate::proxy::endpoint::Endpoint;
use crate::proxy::h1::Conn;
use crate::proxy::workers;

/// How many idle connections an endpoint keeps per worker, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Idle connections kept per endpoint (on each worker); 0 keeps none.
    pub max_idle: usize,
    /// How long a connection may stay idle before it is closed.
    pub idle_timeout: Duration,
}

/// The idle connections of one endpoint, one list per worker: a request only ever takes a
/// connection whose task runs on its own thread.
#[derive(Debug)]
pub struct Idle {
    slots: Box<[Mutex<Slot>]>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Most recently parked last.
    conns: Vec<Parked>,
    /// Whether a sweeper task watches this list.
    sweeping: bool,
}

#[derive(Debug)]
struct Parked {
    conn: Conn,
    since: Instant,
}

impl Parked {
    /// Closed by the upstream, or idle for `idle_timeout` at `now`: to be dropped.
    fn stale(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) >= idle_timeout || self.conn.is_closed()
    }
}

/// Locks a list. A poisoned one only lost idle connections; what is left of it is still usable.
fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Idle {
    /// Empty lists for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            slots: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    /// The calling worker's list (the first one off the workers' threads).
    fn slot(&self) -> Option<(usize, MutexGuard<'_, Slot>)> {
        let at = workers::current().unwrap_or(0) % self.slots.len();
        Some((at, lock(self.slots.get(at)?)))
    }

    /// The most recently parked connection that can take a request now. Closed and expired
    /// ones are dropped on the way.
    pub fn take(&self, idle_timeout: Duration) -> Option<Conn> {
        let (_, mut slot) = self.slot()?;
        if slot.conns.is_empty() {
            return None;
        }
        let now = clock::now();
        while let Some(mut p) = slot.conns.pop() {
            if !p.stale(now, idle_timeout) {
                return Some(p.conn);
            }
        }
        None
    }
}

/// A connection on loan to one response: parked on its endpoint again when that response's
/// body has been read to its end (see [`crate::proxy::body::UpstreamBody`]).
#[derive(Debug)]
pub struct Loan {
    /// The endpoint the connection goes to.
    pub endpoint: Arc<Endpoint>,
    /// The connection.
    pub conn: Conn,
    /// The cluster's pool settings.
    pub settings: Settings,
}

impl Loan {
    /// Parks the connection on its endpoint, unless the endpoint keeps enough already; starts
    /// the list's sweeper if none watches it.
    pub fn give_back(self) {
        let Loan {
            endpoint,
            conn,
            settings,
        } = self;
        if settings.max_idle == 0 {
            return;
        }
        let Some((at, mut slot)) = endpoint.idle.slot() else {
            return;
        };
        if slot.conns.len() >= settings.max_idle {
            return;
        }
        slot.conns.push(Parked {
            conn,
            since: clock::now(),
        });
        if slot.sweeping {
            return;
        }
        // Off a runtime (never on the data path) the list is only trimmed by `take`.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            slot.sweeping = true;
            let weak = Arc::downgrade(&endpoint);
            rt.spawn(sweep(weak, at, settings.idle_timeout));
        }
    }
}

/// Closes the connections of one endpoint's list (on worker `at`) as they pass
/// `idle_timeout`, waking when the oldest is due; ends when the list is empty or the endpoint
/// is gone.
async fn sweep(endpoint: Weak<Endpoint>, at: usize, idle_timeout: Duration) {
    let mut due = Instant::now() + idle_timeout;
    loop {
        tokio::time::sleep_until(due).await;
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        let Some(slot) = endpoint.idle.slots.get(at) else {
            return;
        };
        let mut slot = lock(slot);
        let now = Instant::now();
        slot.conns.retain_mut(|p| !p.stale(now, idle_timeout));
        match slot.conns.iter().map(|p| p.since).min() {
            Some(oldest) => due = oldest + idle_timeout,
            None => {
                slot.sweeping = false;
                return;
            }
        }
    }
}
