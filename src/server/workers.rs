//! The worker threads: the caller's runtime is worker 0, each extra worker a current-thread
//! runtime on a thread of its own; a connection goes to the worker with the fewest open.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker whose thread calls this: 0 outside the extra worker threads.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// The runtimes connections are served on: the caller's (index 0) and one per extra thread.
pub struct Workers {
    all: Vec<Worker>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// Where a worker's connections are spawned, and how many it has open.
struct Worker {
    runtime: tokio::runtime::Handle,
    open: Arc<AtomicUsize>,
}

impl Workers {
    /// Worker 0 is the calling runtime; starts `threads - 1` more, each on a thread of its own.
    pub fn start(threads: usize) -> io::Result<Self> {
        let mut workers = Self {
            all: vec![Worker::on(tokio::runtime::Handle::current())],
            threads: Vec::new(),
        };
        for index in 1..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.all.push(Worker::on(runtime.handle().clone()));
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = keep_timers_cheap() => {}
                        }
                    });
                    // Dropping the runtime here drops the connections still open on it.
                })?;
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    /// Connections open on every worker.
    pub fn open(&self) -> usize {
        self.all
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .sum()
    }

    /// Serves `tcp` with `serve` on the worker with the fewest open connections (the first of
    /// equals, so a single connection stays on the thread that accepted it). The caller owns the
    /// task through what `serve` watches: the shutdown waits for it, and dropping a worker's
    /// runtime drops it.
    pub fn serve<F, S>(&self, tcp: TcpStream, serve: S)
    where
        S: FnOnce(TcpStream, Open) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some((index, worker)) = self
            .all
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = Open::count(&worker.open);
        if index == 0 {
            #[expect(
                clippy::disallowed_methods,
                reason = "tracked: the shutdown waits for every watched connection"
            )]
            tokio::spawn(serve(tcp, open));
            return;
        }
        // A socket belongs to the runtime that registered it: move it over as a plain one.
        match tcp.into_std() {
            Ok(tcp) => {
                #[expect(
                    clippy::disallowed_methods,
                    reason = "tracked: the shutdown waits for every watched connection, and the worker's runtime drops the rest"
                )]
                worker.runtime.spawn(async move {
                    match TcpStream::from_std(tcp) {
                        Ok(tcp) => serve(tcp, open).await,
                        Err(err) => tracing::debug!(%err, "could not hand a connection over"),
                    }
                });
            }
            Err(err) => tracing::debug!(%err, "could not hand a connection over"),
        }
    }

    /// Stops the extra workers and waits for their threads.
    pub fn stop(self) {
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

impl Worker {
    fn on(runtime: tokio::runtime::Handle) -> Self {
        Self {
            runtime,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// One open connection, counted while it lives.
pub struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a timer due within the second. Tokio wakes its timer driver whenever a new timer is due
/// before every other one; with this one always nearer, the per-request timeouts (minutes away)
/// are set without that wake-up, which otherwise costs a syscall and a thread hand-off per request.
pub async fn keep_timers_cheap() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}
