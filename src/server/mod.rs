//! Serving: accept connections (up to `max_connections`) and spread them over worker threads,
//! each a current-thread runtime with its own upstream connection pool, so a request and its
//! upstream connection never change threads; decide every request on its canonical path; on the
//! shutdown signal, stop accepting and drain within the grace period.

pub mod limits;
pub mod watch;
pub mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use http::{Version, header};
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch as signal;

use crate::api;
use crate::api::router;
use crate::app::{AppState, upstream_of};
use crate::deferred::AfterResponse;
use crate::error::ProxyError;
use crate::path;
use crate::proxy;
use limits::Refusals;
use watch::{Activity, Timeouts, Tracked, Watched};
use workers::{Open, Workers};

/// Where connections come from.
pub struct Listeners {
    /// The main port: provider routes, and our own endpoints unless `admin` is given.
    pub main: TcpListener,
    /// A port of its own for our own endpoints (`admin_listen`): the main port then serves
    /// provider routes (and `/healthz`) only.
    pub admin: Option<TcpListener>,
    /// Treats every connection as coming from this address, whatever its socket says. Tests
    /// use it to stand in a peer that is not on loopback; `None` in service.
    pub peer_as: Option<SocketAddr>,
}

impl Listeners {
    /// One port for everything, peers as their sockets say.
    pub fn one(main: TcpListener) -> Self {
        Self {
            main,
            admin: None,
            peer_as: None,
        }
    }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    /// Provider routes and our own endpoints.
    All,
    /// Provider routes and `/healthz` (the main port when `admin_listen` is set).
    Provider,
    /// Our own endpoints only (`admin_listen`).
    Own,
}

/// How often at most a connection refused past the limit is logged.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Serves on `listener` until `shutdown` completes, then gives in-flight requests and streams
/// the configured grace period to finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    run_with(Listeners::one(listener), state, shutdown).await
}

/// `run` on the given listeners.
///
/// The calling runtime is worker 0 and accepts; `config.threads - 1` more workers run on threads
/// of their own. Returns once every connection has finished or the grace period is over (the
/// extra workers' connections are then dropped, which records what their responses carried).
pub async fn run_with(
    listeners: Listeners,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let config = &state.config;
    let grace = config.shutdown_grace;
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| limits::default_max_connections(limits::current_descriptor_limit()));
    tracing::info!(max_connections, "accepting connections");
    let timeouts = Timeouts {
        header: config.header_timeout,
        keepalive: config.keepalive_timeout,
    };
    let workers = Workers::start(config.threads)?;
    let router = router(state.clone());
    let Listeners {
        main: mut main_listener,
        admin: mut admin_listener,
        peer_as,
    } = listeners;
    let main_surface = if admin_listener.is_some() {
        Surface::Provider
    } else {
        Surface::All
    };
    // Tells connections to finish (hyper-util's `GracefulShutdown` cannot watch a connection
    // that may upgrade); the shutdown waits until every connection has dropped its receiver.
    let (graceful, draining) = signal::channel(());
    let refusals = Refusals::new(REFUSAL_WARNING_INTERVAL);
    let accept = async {
        loop {
            let ((tcp, peer), surface) = tokio::select! {
                accepted = Listener::accept(&mut main_listener) => (accepted, main_surface),
                accepted = accept_on(admin_listener.as_mut()) => (accepted, Surface::Own),
            };
            if workers.open() >= max_connections {
                refuse(&tcp);
                refusals.refused(max_connections);
                continue;
            }
            // Small SSE events must leave at once, not wait for Nagle's algorithm.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY");
            }
            let app = App {
                state: state.clone(),
                router: router.clone(),
                surface,
                peer: peer_as.unwrap_or(peer),
            };
            let watcher = draining.clone();
            workers.serve(tcp, move |tcp, open| {
                connection(tcp, app, watcher, open, timeouts)
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
        () = workers::keep_timers_cheap() => {}
    }
    drop(main_listener);
    drop(admin_listener);
    tracing::info!(grace = %humantime::format_duration(grace), "shutting down: finishing in-flight requests");
    let deadline = tokio::time::Instant::now() + grace;
    tokio::select! {
        () = async {
            let _ = graceful.send(());
            drop(draining);
            graceful.closed().await;
        } => {}
        () = tokio::time::sleep_until(deadline) => {
            tracing::warn!("grace period over: closing the connections still open");
        }
    }
    // Drains and alert deliveries get what is left of the grace period (at least a moment).
    let tasks_deadline = deadline.max(tokio::time::Instant::now() + crate::tasks::MIN_FINISH);
    state.tasks.finish(tasks_deadline).await;
    workers.stop();
    Ok(())
}

/// Accepts on the admin listener when there is one; never completes otherwise.
async fn accept_on(listener: Option<&mut TcpListener>) -> (TcpStream, SocketAddr) {
    match listener {
        Some(listener) => Listener::accept(listener).await,
        None => std::future::pending().await,
    }
}

/// What a connection past the limit is told before it is closed (best effort, never waited
/// for): `ProxyError::TooManyConnections`'s answer, written out whole once.
static REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let envelope = ProxyError::TooManyConnections.envelope();
    let body = envelope.body();
    let status = envelope.status();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default(),
        body.len()
    )
    .into_bytes()
});

fn refuse(tcp: &TcpStream) {
    let _ = tcp.try_write(&REFUSAL);
}

/// What a connection serves, and who is at its other end.
#[derive(Clone)]
struct App {
    state: AppState,
    router: Router,
    surface: Surface,
    peer: SocketAddr,
}

impl App {
    /// Decides a request on its canonical path: under an upstream's prefix it goes straight to
    /// `proxy::forward`, anything else to the router of our own endpoints, behind their access
    /// rule.
    async fn call(self, mut request: http::Request<Incoming>) -> Response {
        if let Err(err) = check_host(&request) {
            return err.into_response();
        }
        let routes = &self.state.config.routes;
        let canonical = match path::canonicalize(
            request.uri().path(),
            &routes.iter().map(|r| r.prefix.as_str()),
        ) {
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Ok(std::borrow::Cow::Owned(canonical)) => Some(canonical),
            Err(err) => return ProxyError::BadPath(err).into_response(),
        };
        if let Some(canonical) = canonical {
            match with_path(request.uri(), &canonical) {
                Some(uri) => *request.uri_mut() = uri,
                None => {
                    return ProxyError::BadPath(path::PathError::MalformedEscape).into_response();
                }
            }
        }
        let path = request.uri().path();
        match (upstream_of(routes, path), self.surface) {
            (Some(upstream), Surface::All | Surface::Provider) => {
                proxy::forward(self.state.proxy(), upstream, request.map(Body::new)).await
            }
            (None, Surface::Provider) if path != api::HEALTHZ => {
                proxy::not_found(request.map(Body::new)).await
            }
            (Some(_), Surface::Own) => proxy::not_found(request.map(Body::new)).await,
            _ => {
                if let Err(refusal) = api::access(
                    &self.state,
                    request.method(),
                    path,
                    request.headers(),
                    self.peer,
                ) {
                    return refusal.into_response();
                }
                match TowerToHyperService::new(self.router).call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        }
    }
}

/// An HTTP/1.1 request names its host exactly once (RFC 9112 §3.2); none may name it twice.
fn check_host<B>(request: &http::Request<B>) -> Result<(), ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(ProxyError::BadHost("more than one Host header")),
        (None, None) if request.version() == Version::HTTP_11 => {
            Err(ProxyError::BadHost("no Host header"))
        }
        _ => Ok(()),
    }
}

/// `uri` with its path replaced by `path` (its query kept, scheme and authority dropped: the
/// upstream's are set when forwarding).
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    http::Uri::try_from(path_and_query).ok()
}

/// Serves HTTP/1.1 on one connection until the client closes it, the shutdown asks it to, or
/// it times out in a request head or while idle.
///
/// A request that asks for an upgrade gets a `Handoff`; when forwarding accepted the upgrade,
/// the connection's HTTP part ends with the 101, and its WebSocket relay runs here, still
/// counted as an open connection, and tracked by `tasks` so that shutdown waits for it.
async fn connection(
    tcp: TcpStream,
    app: App,
    mut shutdown: signal::Receiver<()>,
    _open: Open,
    timeouts: Timeouts,
) {
    let activity = Activity::start(timeouts);
    let requests = Arc::clone(&activity);
    let handoff = proxy::websocket::Handoff::new();
    let upgrades = handoff.clone();
    let tasks = app.state.tasks.clone();
    let service = service_fn(move |mut request: http::Request<Incoming>| {
        let app = app.clone();
        let in_flight = requests.request_started();
        if request.headers().contains_key(header::UPGRADE) {
            request.extensions_mut().insert(upgrades.clone());
        }
        async move {
            let response = app.call(request).await;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    });
    let io = TokioIo::new(Watched::new(tcp, Arc::clone(&activity)));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut is_finishing = false;
    loop {
        tokio::select! {
            biased;
            served = AfterResponse(conn.as_mut()) => {
                if let Err(err) = served {
                    tracing::trace!(%err, "connection ended with an error");
                }
                break;
            }
            _ = shutdown.changed(), if !is_finishing => {
                // Finish the request in flight, if any, then close.
                conn.as_mut().graceful_shutdown();
                is_finishing = true;
            }
            reason = activity.expired() => {
                tracing::debug!(reason, "closed a connection that timed out");
                break;
            }
        }
    }
    drop(shutdown);
    if let Some(relay) = handoff.take() {
        tasks.track(relay).await;
    }
}
