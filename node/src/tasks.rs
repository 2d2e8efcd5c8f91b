//! Where every task of an agent runs, and how they all learn to stop.
//!
//! One [`Tasks`] per agent: listeners, per-connection tasks, the mesh and
//! catalog tasks, stream handlers and health checkers all run on its
//! tracker, so shutdown can wait for every one of them. Stopping has two
//! steps: *drain* (listeners stop accepting and ask open connections to
//! close once their requests are answered) and *stop* (whatever still runs
//! is ended where it waits).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The future `build` returns, boxed where it is built: the box is
/// allocated first and the future written into it, so a request's future of
/// several kilobytes is not built on the stack and then copied whole into
/// its box (`Box::pin(f())` copied it: 1.3 % of agent A's CPU on the h2c
/// path).
#[inline(always)]
pub fn boxed<F: Future>(build: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), build()))
}

/// The agent's task tracker and its two stop signals. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    drain: CancellationToken,
    stop: CancellationToken,
}

impl Tasks {
    /// A fresh set with nothing running.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` until it ends or the agent stops.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_until(task, self.stop.clone());
    }

    /// Runs `task` until it ends or `token` is cancelled (a child of the
    /// stop signal from [`Tasks::child_token`], so it ends with the agent
    /// too).
    pub fn spawn_until(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
        token: CancellationToken,
    ) {
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = token.cancelled() => {}
            }
        });
    }

    /// A token cancelled when the agent stops, or earlier by its holder.
    pub fn child_token(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Listeners stop accepting; open connections close once answered.
    pub fn begin_drain(&self) {
        self.drain.cancel();
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Resolves when draining begins.
    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.drain.cancelled()
    }

    /// Resolves when the agent stops.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Ends every task and waits up to `deadline` for them; returns how
    /// many were still running then.
    pub async fn stop_and_wait(&self, deadline: Duration) -> usize {
        self.drain.cancel();
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(deadline, self.tracker.wait()).await;
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_waiting_tasks_and_children() {
        let tasks = Tasks::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        let child = tasks.child_token();
        tasks.spawn_until(std::future::pending(), child.clone());
        assert!(!tasks.is_draining());
        assert_eq!(tasks.stop_and_wait(Duration::from_secs(5)).await, 0);
        assert!(
            rx.recv().await.is_none(),
            "the task ended and dropped its sender"
        );
        assert!(child.is_cancelled() && tasks.is_draining());
    }

    #[tokio::test]
    async fn a_child_token_stops_only_its_task() {
        let tasks = Tasks::new();
        let child = tasks.child_token();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn_until(
            async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            },
            child.clone(),
        );
        child.cancel();
        assert!(rx.recv().await.is_none());
        assert!(!tasks.is_draining(), "the agent goes on");
    }
}
