//! HTTP/2 streams served inside their connection's task rather than as tasks of their own.
//!
//! hyper's HTTP/2 server hands each stream's future to an executor. With tokio's, every stream
//! becomes a task: allocated with its whole state, queued through the worker's scheduler on each
//! wake-up, and written over twice when it completes. Here the executor leaves the stream in a
//! list that its connection's future, which is the one polling hyper when streams start, moves
//! into a set it polls itself: a stream costs a box and a slot in the set, it wakes its
//! connection's task, and its timestamps share that task's clock reading
//! ([`clock::Turn`](crate::proxy::clock::Turn)). A connection's task ends once its streams have.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The streams started while a [`Served`] connection is polled on this thread.
    static STARTED: RefCell<Option<Vec<Stream>>> = const { RefCell::new(None) };
}

/// The HTTP/2 server's executor: a future started while a [`Served`] connection is polled joins
/// that connection's set; one started anywhere else (hyper starts none) becomes a task.
#[derive(Clone, Copy, Debug, Default)]
pub struct InTask;

impl<F> hyper::rt::Executor<F> for InTask
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut fut: Option<Stream> = Some(Box::pin(fut));
        STARTED.with(|started| {
            if let Some(list) = started.borrow_mut().as_mut() {
                list.extend(fut.take());
            }
        });
        if let Some(f) = fut {
            tokio::spawn(f);
        }
    }
}

pin_project! {
    /// A connection served with [`InTask`], and the streams it started; `O` is what the
    /// connection ends with.
    pub struct Served<C, O> {
        #[pin]
        conn: C,
        streams: FuturesUnordered<Stream>,
        // The list lent to `STARTED` on each poll, kept so that no poll allocates one.
        spare: Vec<Stream>,
        ended: Option<O>,
    }
}

impl<C, O> Served<C, O> {
    /// Serves `conn`, whose executor is [`InTask`].
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            streams: FuturesUnordered::new(),
            spare: Vec::new(),
            ended: None,
        }
    }

    /// The connection itself (to ask it to shut down gracefully).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().conn
    }
}

impl<C: Future<Output = O>, O> Future for Served<C, O> {
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let mut this = self.project();
        if this.ended.is_none() {
            let lent = std::mem::take(this.spare);
            let outer = STARTED.with(|s| s.replace(Some(lent)));
            let polled = this.conn.as_mut().poll(cx);
            if let Some(mut started) = STARTED.with(|s| s.replace(outer)) {
                this.streams.extend(started.drain(..));
                *this.spare = started;
            }
            if let Poll::Ready(out) = polled {
                *this.ended = Some(out);
            }
        }
        // Every stream that is ready; the set returns `Pending` (and wakes the task) once it
        // has polled each of them, so one busy stream cannot hold the thread.
        while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
        if this.streams.is_empty() {
            if let Some(out) = this.ended.take() {
                return Poll::Ready(out);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A connection that starts `n` streams on its first poll, each counting itself done
    /// after one `yield`, and ends at once.
    struct Starts {
        n: usize,
        done: Arc<AtomicUsize>,
    }

    impl Future for Starts {
        type Output = &'static str;

        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            for _ in 0..std::mem::take(&mut self.n) {
                let done = self.done.clone();
                InTask.execute(async move {
                    tokio::task::yield_now().await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            Poll::Ready("ended")
        }
    }

    #[tokio::test]
    async fn a_connection_ends_after_the_streams_it_started() {
        let done = Arc::new(AtomicUsize::new(0));
        let served = Served::new(Starts {
            n: 3,
            done: done.clone(),
        });
        // Polled on this task only: nothing else runs the streams.
        let out = tokio::task::unconstrained(served).await;
        assert_eq!(out, "ended");
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_future_started_outside_a_connection_becomes_a_task() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        InTask.execute(async move {
            let _ = tx.send(7);
        });
        assert_eq!(rx.await.ok(), Some(7));
    }
}
