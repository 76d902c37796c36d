//! Work that follows a request's record but must not delay its response: done once the
//! connection poll that writes the response returns.
//!
//! A request is recorded when its response body ends, in the same poll of the connection that
//! writes the body's last bytes. The record stays there, so `/stats` and budgets count a request
//! by the time its client has the answer. What the record sets off (its log line, the wake-up of
//! the ledger writer) waits here until that poll returns. A client on the same machine is
//! usually woken on the worker's own CPU and runs only when the worker lets it, so a worker that
//! is not busy first yields: the client reads its answer, then the worker formats the line and
//! wakes the writers (the measurements are in docs/performance.md). A busy worker does not
//! yield: its CPU has other requests to serve, and a yield per response costs throughput.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A worker whose previous deferred work was longer ago than this is not busy, and yields
/// before this work. Under load a worker finishes a response every few tens of µs.
const QUIET: Duration = Duration::from_millis(1);

type Job = Box<dyn FnOnce()>;

thread_local! {
    /// Whether a connection is being polled on this thread by `AfterResponse`.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    /// What the requests that poll finished deferred, in order.
    static HELD: RefCell<Vec<Job>> = const { RefCell::new(Vec::new()) };
    /// When this thread last did deferred work.
    static LAST_DONE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `job` once the response being written on this thread has gone out, or at once when no
/// connection is being polled here (a record from a drain, a dropped connection, a test).
pub fn after_response(job: impl FnOnce() + 'static) {
    if HOLDING.get() {
        HELD.with_borrow_mut(|held| held.push(Box::new(job)));
    } else {
        job();
    }
}

/// Polls a connection, then does what the requests it finished in that poll deferred.
pub struct AfterResponse<F>(pub F);

impl<F: Future + Unpin> Future for AfterResponse<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Connections are not polled inside one another. A poll that panics leaves the flag
        // set; the next one on this thread clears it and does what was held meanwhile.
        HOLDING.set(true);
        let polled = Pin::new(&mut self.0).poll(cx);
        HOLDING.set(false);
        let mut jobs = HELD.take();
        if !jobs.is_empty() {
            let now = Instant::now();
            let last = LAST_DONE.replace(Some(now));
            if last.is_none_or(|last| now.duration_since(last) > QUIET) {
                std::thread::yield_now();
            }
            jobs.drain(..).for_each(|job| job());
            // Keep the list's capacity for the next poll.
            HELD.set(jobs);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::task::Waker;

    use super::*;

    /// Records into `log` what ran, in order.
    fn job(log: &Rc<RefCell<Vec<&'static str>>>, name: &'static str) -> impl FnOnce() + 'static {
        let log = Rc::clone(log);
        move || log.borrow_mut().push(name)
    }

    #[test]
    fn work_outside_a_connection_poll_is_done_at_once() {
        let log = Rc::new(RefCell::new(Vec::new()));
        after_response(job(&log, "line"));
        assert_eq!(*log.borrow(), ["line"]);
    }

    #[test]
    fn work_deferred_in_a_poll_is_done_in_order_when_the_poll_returns() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let inside = Rc::clone(&log);
        let mut connection = AfterResponse(std::future::poll_fn(move |_| {
            after_response(job(&inside, "wake"));
            after_response(job(&inside, "line"));
            inside.borrow_mut().push("response written");
            Poll::Ready(())
        }));
        let polled = Pin::new(&mut connection).poll(&mut Context::from_waker(Waker::noop()));
        assert!(polled.is_ready());
        assert_eq!(*log.borrow(), ["response written", "wake", "line"]);
        // And outside the poll again, at once.
        after_response(job(&log, "after"));
        assert_eq!(log.borrow().last(), Some(&"after"));
    }
}
