//! The request path's clock: one reading per wake-up of a connection's task.
//!
//! A request takes a dozen timestamps on its way (its start and deadline, the try's start and
//! round trip, the breakers' and balancers' windows, the pool's idle marks), and each
//! `Instant::now()` is a `clock_gettime`. Inside a connection's task they are taken a few
//! microseconds apart, far below any timeout or latency they feed, so the task shares one
//! reading among all of them between two wake-ups, as HAProxy and nginx refresh their clock
//! once per event-loop turn. Outside such a wake-up [`now`] reads the clock itself.
//!
//! It reads tokio's clock, so a test that pauses time sees the paused instant here too.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

/// What the running task knows of the time.
#[derive(Clone, Copy)]
enum Shared {
    /// Not inside a [`Turn`]: every [`now`] reads the clock.
    Off,
    /// Inside a [`Turn`] that has not needed the time yet.
    Unread,
    /// Inside a [`Turn`]: the reading every [`now`] returns until it ends.
    Read(Instant),
}

thread_local! {
    static SHARED: Cell<Shared> = const { Cell::new(Shared::Off) };
}

/// The current instant: the reading of the running [`Turn`], taken at its first use, or a
/// fresh one outside of a turn.
pub fn now() -> Instant {
    SHARED.with(|s| match s.get() {
        Shared::Read(t) => t,
        Shared::Unread => {
            let t = Instant::now();
            s.set(Shared::Read(t));
            t
        }
        Shared::Off => Instant::now(),
    })
}

/// One wake-up of a connection's task: while it lives, [`now`] on this thread returns one
/// reading. Hold it only across one synchronous poll, never across an `.await`.
#[must_use = "the shared reading ends when the turn is dropped"]
pub struct Turn {
    outer: Shared,
}

impl Turn {
    /// Starts a turn; the clock is read when [`now`] is first called in it.
    pub fn start() -> Self {
        Self {
            outer: SHARED.with(|s| s.replace(Shared::Unread)),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        SHARED.with(|s| s.set(self.outer));
    }
}

pin_project_lite::pin_project! {
    /// A future polled inside a [`Turn`]: for a request that may have a task of its own (an
    /// HTTP/2 stream served by hyper-util's reader), so that its timestamps share one reading
    /// per wake-up as a connection's do. Polled inside a running turn (a stream in its
    /// connection's task), it shares that turn's reading rather than taking another.
    pub struct Turned<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Turned<F> {
    /// `inner`, polled under a turn.
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for Turned<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let in_turn = SHARED.with(|s| !matches!(s.get(), Shared::Off));
        let _turn = (!in_turn).then(Turn::start);
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_turn_shares_one_reading_and_time_moves_between_turns() {
        let before = now();
        tokio::time::advance(Duration::from_millis(5)).await;
        // Outside a turn every call reads the (paused) clock.
        assert_eq!(now() - before, Duration::from_millis(5));
        let turn = Turn::start();
        let first = now();
        tokio::time::advance(Duration::from_millis(7)).await;
        assert_eq!(now(), first, "one reading for the whole turn");
        drop(turn);
        assert_eq!(now() - first, Duration::from_millis(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turned_future_shares_a_running_turn_and_makes_one_outside() {
        // The future is ready at its first poll, so each await is one poll of it.
        let seen = || Turned::new(async { now() });
        let outer = Turn::start();
        let t = now();
        tokio::time::advance(Duration::from_millis(4)).await;
        assert_eq!(seen().await, t, "inside a turn: the turn's reading");
        drop(outer);
        assert_eq!(
            seen().await - t,
            Duration::from_millis(4),
            "outside: a reading of its own"
        );
        // Its own turn ended with its poll.
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(now() - t, Duration::from_millis(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_nested_turn_gives_back_the_outer_reading() {
        let outer = Turn::start();
        let t = now();
        tokio::time::advance(Duration::from_millis(3)).await;
        {
            let _inner = Turn::start();
            assert_eq!(now() - t, Duration::from_millis(3));
        }
        assert_eq!(now(), t);
        drop(outer);
        assert_eq!(now() - t, Duration::from_millis(3));
    }
}
