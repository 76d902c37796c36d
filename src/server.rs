//! Serving: accept connections and spread them over worker threads, each a current-thread runtime
//! with its own upstream connection pool, so a request and its upstream connection never change
//! threads; on the shutdown signal, stop accepting and drain within the grace period.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::app::{AppState, router, upstream_of};
use crate::deferred::AfterResponse;
use crate::proxy;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker whose thread calls this: 0 outside the extra worker threads.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// Serves on `listener` until `shutdown` completes, then gives in-flight requests and streams
/// the configured grace period to finish.
///
/// The calling runtime is worker 0 and accepts; `config.threads - 1` more workers run on threads
/// of their own. Returns once every connection has finished or the grace period is over (the
/// extra workers' connections are then dropped, which records what their responses carried).
pub async fn run(
    mut listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let grace = state.config.shutdown_grace;
    let workers = Workers::start(state.config.threads)?;
    let app = App {
        router: router(state.clone()),
        state,
    };
    let graceful = GracefulShutdown::new();
    let accept = async {
        loop {
            let (tcp, _) = Listener::accept(&mut listener).await;
            // Small SSE events must leave at once, not wait for Nagle's algorithm.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY");
            }
            workers.serve(tcp, &app, graceful.watcher());
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
        () = keep_timers_cheap() => {}
    }
    drop(listener);
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over: closing the connections still open");
        }
    }
    workers.stop();
    Ok(())
}

/// Keeps a timer due within the second. Tokio wakes its timer driver whenever a new timer is due
/// before every other one; with this one always nearer, the per-request timeouts (minutes away)
/// are set without that wake-up, which otherwise costs a syscall and a thread hand-off per request.
async fn keep_timers_cheap() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

/// The runtimes connections are served on: the caller's (index 0) and one per extra thread.
struct Workers {
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
    fn start(threads: usize) -> io::Result<Self> {
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

    /// Serves `tcp` on the worker with the fewest open connections (the first of equals, so a
    /// single connection stays on the thread that accepted it).
    fn serve(&self, tcp: TcpStream, app: &App, watcher: Watcher) {
        let Some((index, worker)) = self
            .all
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = Open::count(&worker.open);
        let app = app.clone();
        if index == 0 {
            #[expect(
                clippy::disallowed_methods,
                reason = "tracked: the shutdown waits for every watched connection"
            )]
            tokio::spawn(connection(tcp, app, watcher, open));
            return;
        }
        // A socket belongs to the runtime that registered it: move it over as a plain one.
        match tcp.into_std() {
            Ok(tcp) => {
                worker.runtime.spawn(async move {
                    match TcpStream::from_std(tcp) {
                        Ok(tcp) => connection(tcp, app, watcher, open).await,
                        Err(err) => tracing::debug!(%err, "could not hand a connection over"),
                    }
                });
            }
            Err(err) => tracing::debug!(%err, "could not hand a connection over"),
        }
    }

    /// Stops the extra workers and waits for their threads.
    fn stop(self) {
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
struct Open(Arc<AtomicUsize>);

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

/// What a connection serves: requests under an upstream's prefix go straight to
/// `proxy::forward`, the rest to the router of our own endpoints.
#[derive(Clone)]
struct App {
    state: AppState,
    router: Router,
}

impl App {
    async fn call(self, request: http::Request<Incoming>) -> Response {
        match upstream_of(&self.state.config.routes, request.uri().path()) {
            Some(upstream) => proxy::forward(self.state, upstream, request.map(Body::new)).await,
            None => match TowerToHyperService::new(self.router).call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it or the shutdown asks it to.
async fn connection(tcp: TcpStream, app: App, watcher: Watcher, _open: Open) {
    let service = service_fn(move |request| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.call(request).await) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
    let served = std::pin::pin!(watcher.watch(conn));
    if let Err(err) = AfterResponse(served).await {
        tracing::trace!(%err, "connection ended with an error");
    }
}
