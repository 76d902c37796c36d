//! Upstream connections: keep-alive HTTP/1.1 connections to one upstream, one pool per worker
//! thread, opened on demand through the TLS connector and reused as soon as they are idle.
//!
//! A worker's requests only ever use its own pool, so a request and the connection task that
//! carries it run on the same thread; the pool's lock is never contended.

use std::future::poll_fn;
use std::time::Instant;

use axum::body::Body;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use tower_service::Service;

use crate::client::{Connector, IDLE_TIMEOUT};
use crate::config::Upstream;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (DNS, TCP, TLS, or the connect timeout).
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed on an open connection (or the request body failed while sent).
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One upstream's connections: a pool per worker.
pub struct Pools {
    /// `scheme://authority/`, what the connector dials.
    origin: Uri,
    connector: Connector,
    by_worker: Box<[Pool]>,
}

/// One worker's connections to the upstream, busy and idle.
#[derive(Default)]
struct Pool {
    conns: Mutex<Vec<Conn>>,
}

struct Conn {
    sender: SendRequest<Body>,
    /// When a request was last sent on it.
    used: Instant,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("origin", &self.origin)
            .field("workers", &self.by_worker.len())
            .finish_non_exhaustive()
    }
}

impl Pools {
    /// Empty pools for `upstream`, one per worker.
    pub fn new(upstream: &Upstream, connector: Connector, workers: usize) -> Self {
        let origin = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        Self {
            origin,
            connector,
            by_worker: (0..workers.max(1)).map(|_| Pool::default()).collect(),
        }
    }

    /// Sends `request` (its URI in origin form, its `Host` set) on an idle connection of the
    /// calling worker, or on a new one, and returns the response head.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let pool = self
            .by_worker
            .get(crate::worker::index())
            .unwrap_or(&self.by_worker[0]);
        loop {
            let (mut sender, reused) = match pool.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            // The request is queued on the connection at once; the connection goes back to
            // the pool now and is taken again once its task has read this response whole.
            let response = sender.try_send_request(request);
            pool.put(sender, Instant::now());
            match response.await {
                Ok(response) => return Ok(response),
                Err(mut err) => match err.take_message() {
                    // A pooled connection the upstream closed while it was idle: the request
                    // was not sent, so it can go on another.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// Opens a fresh connection of its own, never pooled (a WebSocket upgrade takes it over):
    /// TCP, then TLS for `https`, through the same connector as pooled ones.
    pub async fn open_http1(
        &self,
    ) -> Result<impl hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)
    }

    /// Opens a connection and starts its task on the calling worker.
    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        #[expect(
            clippy::disallowed_methods,
            reason = "the task ends with its connection: when the upstream or the pool closes it"
        )]
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }
}

impl Pool {
    /// The most recently used idle connection; drops closed and long-idle ones on the way.
    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.sender.is_closed());
        let now = Instant::now();
        while let Some(i) = conns.iter().rposition(|c| c.sender.is_ready()) {
            let conn = conns.swap_remove(i);
            if now.saturating_duration_since(conn.used) < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Pools a connection a request was last sent on at `used`.
    fn put(&self, sender: SendRequest<Body>, used: Instant) {
        self.conns.lock().push(Conn { sender, used });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use std::time::Duration;

    /// An idle, ready connection over an in-memory pipe, and the pipe's other end (dropping it
    /// closes the connection).
    async fn idle_connection() -> (SendRequest<Body>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        #[expect(clippy::disallowed_methods, reason = "ends with the test")]
        tokio::spawn(connection);
        poll_fn(|cx| sender.poll_ready(cx)).await.unwrap();
        (sender, theirs)
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_until_it_has_idled_too_long() {
        let pool = Pool::default();
        assert!(pool.take_idle().is_none());
        let (sender, _upstream) = idle_connection().await;
        pool.put(sender, Instant::now());
        let sender = pool.take_idle().expect("the idle connection");
        assert!(pool.take_idle().is_none(), "taken, so no longer pooled");

        let long_ago = Instant::now()
            .checked_sub(IDLE_TIMEOUT + Duration::from_secs(1))
            .unwrap();
        pool.put(sender, long_ago);
        assert!(pool.take_idle().is_none());
        assert!(pool.conns.lock().is_empty(), "dropped, which closes it");
    }

    #[tokio::test]
    async fn the_most_recently_used_idle_connection_is_taken_first() {
        let pool = Pool::default();
        let earlier = Instant::now().checked_sub(Duration::from_secs(5)).unwrap();
        let (first, _first_upstream) = idle_connection().await;
        let (second, _second_upstream) = idle_connection().await;
        pool.put(first, earlier);
        pool.put(second, Instant::now());
        pool.take_idle().unwrap();
        assert_eq!(pool.conns.lock().len(), 1);
        assert_eq!(pool.conns.lock()[0].used, earlier);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_dropped_not_taken() {
        let pool = Pool::default();
        let (sender, upstream) = idle_connection().await;
        pool.put(sender, Instant::now());
        drop(upstream);
        for _ in 0..100 {
            if pool.conns.lock()[0].sender.is_closed() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(pool.take_idle().is_none());
        assert!(pool.conns.lock().is_empty());
    }
}
