//! Supervised background tasks: every task the proxy starts runs on one tracker under a
//! cancellation token, so shutdown can stop them in a stated order and wait until each has ended.
//!
//! A [`Tasks`] is a tracker plus a token. [`Tasks::child`] makes a scope whose token is a child of
//! its parent's: a cluster or a listener owns one, and when it is dropped (a reload removed it)
//! the scope's [`Scope`] guard cancels every task it started, while a shutdown cancels them all
//! from the root. Each task logs when it starts and ends, at debug level, under its name.

use std::future::Future;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// Where background tasks are spawned: a tracker shared by the whole process and the token that
/// stops this group of them.
#[derive(Clone, Debug)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

/// A group of tasks that ends when this value is dropped (or its parent is cancelled).
#[derive(Debug)]
pub struct Scope {
    tasks: Tasks,
    _guard: DropGuard,
}

impl Tasks {
    /// A root with its own tracker and token.
    pub fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            token: CancellationToken::new(),
        }
    }

    /// A group under this one, stopped when the returned scope is dropped or this group stops.
    pub fn child(&self) -> Scope {
        let token = self.token.child_token();
        Scope {
            _guard: token.clone().drop_guard(),
            tasks: Tasks {
                tracker: self.tracker.clone(),
                token,
            },
        }
    }

    /// Runs `task` until it finishes or this group is cancelled.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        tracing::debug!(task = name, "task started");
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = token.cancelled() => {}
            }
            tracing::debug!(task = name, "task ended");
        });
    }

    /// The token that stops this group; long-running loops may watch it themselves.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Cancels every task of this group and its children.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// How many tasks are still running on the shared tracker (every group, not only this one).
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every task on the shared tracker has ended; call after [`Tasks::cancel`] on
    /// the root, or it waits for tasks that were never told to stop.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Scope {
    /// The group's spawner.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn dropping_a_scope_stops_its_tasks_and_cancel_stops_all() {
        let root = Tasks::new();
        let scope = root.child();
        scope.tasks().spawn("forever", std::future::pending::<()>());
        root.spawn("forever too", std::future::pending::<()>());
        tokio::task::yield_now().await;
        assert_eq!(root.running(), 2);
        drop(scope);
        tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while root.running() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        root.cancel();
        root.wait().await;
        assert_eq!(root.running(), 0);
    }
}
