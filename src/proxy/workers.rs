//! The data path's threads: one single-threaded runtime per worker, each with its own accept
//! socket per listener (`SO_REUSEPORT`) and its own upstream connection pools.
//!
//! Why not tokio's multi-thread scheduler: it wakes a parked worker for every task it queues and
//! lets tasks move between threads, so a request and the upstream connection that serves it
//! usually run on different threads, and each hop costs an eventfd write and a context switch.
//! Here a connection is accepted, served and relayed on one thread; the kernel spreads new
//! connections over the workers' sockets. The control side (discovery, health checks, the Raft
//! group, the admin server) runs on its own runtime and never on a worker.
//!
//! What workers share is stated in `config/README.md` ("Workers"): the config snapshot and all
//! resilience state are process-wide; the upstream pools and request-id generators are per worker.

use std::cell::Cell;
use std::future::Future;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How far ahead a worker always has a timer due.
///
/// tokio's time driver (1.54; tokio-rs/tokio#5207) wakes the I/O driver, an eventfd `write`,
/// whenever a timer is set to expire before the driver's next planned wake-up, even when the
/// timer is set on the driver's own thread while it runs tasks and so cannot be parked. With
/// no timer due sooner, each request's deadlines (the route timeout and the try's) cost two
/// `write`s and one extra `epoll_wait`: a third of the syscalls of a request at a moderate
/// rate. A timer that is always due within `TICK` keeps those deadlines (15 s by default)
/// after the next wake-up; an idle worker pays one wake-up per tick for it.
const TICK: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`TICK`] on the calling worker's runtime, forever.
async fn keep_time_ahead() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

thread_local! {
    /// The position of the worker this thread runs; `None` on every other thread.
    static POSITION: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The position (from 0) of the worker the calling thread runs, or `None` on a thread that is
/// not a worker's (the control runtime, or a program's own runtime serving in-process, whose
/// single ambient worker is position 0).
pub fn current() -> Option<usize> {
    POSITION.with(Cell::get)
}

/// Where connections are served: worker runtimes of their own, or the ambient runtime.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

/// A worker thread or its runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start worker {}: {source}", index + 1)]
pub struct StartError {
    index: usize,
    source: std::io::Error,
}

impl Workers {
    /// Starts `n` worker threads, each running a single-threaded runtime until [`Workers::stop`].
    pub fn start(n: usize) -> Result<Self, StartError> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for index in 0..n.max(1) {
            let fail = |source| StartError { index, source };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(fail)?;
            runtime.spawn(keep_time_ahead());
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("outrigger-w{}", index + 1))
                .spawn(move || {
                    POSITION.with(|p| p.set(Some(index)));
                    runtime.block_on(stop.cancelled());
                    // Dropping the runtime cancels what is left; shutdown has drained it.
                })
                .map_err(fail)?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            threads: Mutex::new(threads),
            stop,
        })
    }

    /// Serves on the runtime of the caller: one worker, position 0. For a proxy embedded in a
    /// program (the tests) that owns its runtime.
    pub fn ambient() -> Self {
        Self {
            handles: vec![Handle::current()],
            threads: Mutex::default(),
            stop: CancellationToken::new(),
        }
    }

    /// How many workers serve connections.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task(i)` on the worker at every position `i`.
    pub fn each<F, Fut>(&self, mut task: F)
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for (i, handle) in self.handles.iter().enumerate() {
            handle.spawn(task(i));
        }
    }

    /// Stops the worker threads and waits for them; call once serving has drained.
    pub fn stop(&self) {
        self.stop.cancel();
        // A worker cannot wait for itself: dropped there, the others end on their own.
        if current().is_some() {
            return;
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each worker runs its tasks on its own thread, which knows its position.
    #[test]
    fn every_worker_runs_on_its_own_thread() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.count(), 3);
        let (tx, rx) = std::sync::mpsc::channel();
        workers.each(|i| {
            let tx = tx.clone();
            async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send((i, current(), name)).unwrap();
            }
        });
        let mut seen: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (0, Some(0), Some("outrigger-w1".to_owned())),
                (1, Some(1), Some("outrigger-w2".to_owned())),
                (2, Some(2), Some("outrigger-w3".to_owned())),
            ]
        );
        assert_eq!(current(), None, "the test's own thread is no worker");
        workers.stop();
    }
}
