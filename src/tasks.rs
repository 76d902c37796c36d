//! The background tasks the service owns (alert deliveries, drains of streams whose client
//! left): spawned through one tracker, told to finish at shutdown, and awaited within the
//! grace period, so nothing they would record or send is lost when the process stops.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Owner of background tasks; cheap to clone (every clone owns the same tasks).
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    /// Shutdown has begun: finish what is queued, take nothing new.
    closing: CancellationToken,
    /// The grace period is over: stop now, recording what you have.
    stopping: CancellationToken,
}

impl Tasks {
    /// An owner with no tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` on the current runtime (or not at all outside one: `false`), owned here.
    pub fn spawn<F>(&self, task: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(self.tracker.spawn_on(task, &runtime));
                true
            }
            Err(_) => false,
        }
    }

    /// `task`, counted among the tasks shutdown waits for while the caller runs it where it is
    /// (a relayed WebSocket runs on the task of its client connection).
    pub fn track<F: Future>(&self, task: F) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.tracker.track_future(task)
    }

    /// Completes when shutdown begins: a task that serves a queue finishes what is queued.
    pub async fn closing(&self) {
        self.closing.cancelled().await;
    }

    /// Completes when the grace period is over: a task stops at once, recording what it has.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// Tells the tasks that shutdown has begun and waits for them until `deadline`; then tells
    /// those still running to stop, and gives them `MIN_FINISH` more. Returns whether all ended.
    pub async fn finish(&self, deadline: Instant) -> bool {
        self.closing.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            tasks = self.tracker.len(),
            "grace period over: stopping the background tasks still running"
        );
        self.stopping.cancel();
        tokio::time::timeout(MIN_FINISH, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// True when no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// The shortest time background tasks get at shutdown, even when the grace period is spent.
pub const MIN_FINISH: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finish_waits_for_tasks_that_end_when_shutdown_begins() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let owned = tasks.clone();
        assert!(tasks.spawn(async move {
            owned.closing().await;
            let _ = tx.send("flushed");
        }));
        assert_eq!(tasks.len(), 1);
        assert!(tasks.finish(Instant::now() + Duration::from_secs(5)).await);
        assert_eq!(rx.await.unwrap(), "flushed");
        assert!(tasks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_still_running_at_the_deadline_are_told_to_stop() {
        let tasks = Tasks::new();
        let owned = tasks.clone();
        let started = Instant::now();
        tasks.spawn(async move { owned.stopping().await });
        assert!(tasks.finish(started + Duration::from_secs(2)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_never_ends_is_given_up_after_the_deadline_and_min_finish() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending());
        let started = Instant::now();
        assert!(!tasks.finish(started + Duration::from_secs(2)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(2) + MIN_FINISH);
    }

    #[test]
    fn nothing_is_spawned_outside_a_runtime() {
        assert!(!Tasks::new().spawn(async {}));
    }
}
