//! Upstream connections: keep-alive connections to one upstream, one pool per worker thread,
//! opened on demand through the upstream's dialer and reused as soon as they are idle; an
//! HTTP/2 connection carries all of its worker's requests at once.
//!
//! A worker's requests only ever use its own pool, so a request and the connection task that
//! carries it run on the same thread; the pool's lock is never contended.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;

use crate::client::{Dialer, IDLE_TIMEOUT, Protocol, Stream};

/// Why a request got no response from the upstream (the client's, shared with webhooks).
pub use crate::client::SendError;

/// How often an HTTP/2 connection with requests in flight is pinged, and how long a ping may
/// go unanswered before the connection counts as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

const SPEAKS_UNKNOWN: u8 = 0;
const SPEAKS_HTTP2: u8 = 1;
const SPEAKS_HTTP1: u8 = 2;

/// One upstream's connections: a pool per worker.
#[derive(Debug)]
pub struct Pools {
    dialer: Dialer,
    by_worker: Box<[Pool]>,
    /// What the upstream answered the last ALPN offer with (`SPEAKS_*`).
    speaks: AtomicU8,
}

/// One worker's connections to the upstream, busy and idle.
#[derive(Default)]
struct Pool {
    conns: Mutex<Vec<Conn>>,
    /// Held while a connection that may turn out HTTP/2 is opened, so that requests arriving
    /// together share it instead of each opening one.
    opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("conns", &self.conns.lock().len())
            .finish()
    }
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_ready(),
            Self::Http2(s) => s.is_ready(),
        }
    }
}

struct Conn {
    sender: Sender,
    /// When a request was last sent on it.
    used: Instant,
}

impl Pools {
    /// Empty pools for the upstream `dialer` reaches, one per worker.
    pub fn new(dialer: Dialer, workers: usize) -> Self {
        Self {
            dialer,
            by_worker: (0..workers.max(1)).map(|_| Pool::default()).collect(),
            speaks: AtomicU8::new(SPEAKS_UNKNOWN),
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
            let (sender, reused) = match pool.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect(pool).await?, false),
            };
            let sent = match sender {
                Sender::Http1(mut sender) => {
                    self.dialer.address(&mut request, Protocol::Http1);
                    // The request is queued on the connection at once; the connection goes
                    // back to the pool now and is taken again once its task has read this
                    // response whole.
                    let response = sender.try_send_request(request);
                    pool.put(Sender::Http1(sender), Instant::now());
                    response.await
                }
                // Pooled already: it stays there while in use.
                Sender::Http2(mut sender) => {
                    self.dialer.address(&mut request, Protocol::Http2);
                    sender.try_send_request(request).await.map(|mut response| {
                        // What the client gets is HTTP/1.1, whatever the upstream spoke.
                        *response.version_mut() = Version::HTTP_11;
                        response
                    })
                }
            };
            match sent {
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

    /// Opens a connection for the calling worker's `pool` and starts its task on the worker.
    async fn connect(&self, pool: &Pool) -> Result<Sender, SendError> {
        let _turn =
            if self.dialer.may_multiplex() && self.speaks.load(Ordering::Relaxed) != SPEAKS_HTTP1 {
                let turn = pool.opening.lock().await;
                // Someone else's turn may have opened an HTTP/2 connection meanwhile.
                if let Some(sender) = pool.take_idle() {
                    return Ok(sender);
                }
                Some(turn)
            } else {
                None
            };
        let dialed = self.dialer.dial(false).await?;
        let sender = match dialed.protocol {
            Protocol::Http1 => {
                if self.dialer.may_multiplex() {
                    self.speaks.store(SPEAKS_HTTP1, Ordering::Relaxed);
                }
                Sender::Http1(http1_handshake(dialed.io).await?)
            }
            Protocol::Http2 => {
                self.speaks.store(SPEAKS_HTTP2, Ordering::Relaxed);
                let shared = http2_handshake(dialed.io).await?;
                pool.put(Sender::Http2(shared.clone()), Instant::now());
                Sender::Http2(shared)
            }
        };
        Ok(sender)
    }

    /// A new connection for a protocol upgrade (a WebSocket): HTTP/1.1, never pooled.
    pub async fn open_http1(&self) -> Result<TokioIo<Stream>, SendError> {
        Ok(self.dialer.dial(true).await?.io)
    }
}

async fn http1_handshake(io: TokioIo<Stream>) -> Result<http1::SendRequest<Body>, SendError> {
    let (sender, connection) = http1::handshake(io).await?;
    drive(connection);
    Ok(sender)
}

async fn http2_handshake(io: TokioIo<Stream>) -> Result<http2::SendRequest<Body>, SendError> {
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .handshake(io)
        .await?;
    drive(connection);
    Ok(sender)
}

/// Runs a connection's task on the calling worker.
fn drive(connection: impl Future<Output = Result<(), hyper::Error>> + Send + 'static) {
    #[expect(
        clippy::disallowed_methods,
        reason = "the task ends with its connection: when the upstream or the pool closes it"
    )]
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "upstream connection closed with an error");
        }
    });
}

impl Pool {
    /// An HTTP/2 connection (shared, so it stays pooled), else the most recently used idle
    /// HTTP/1.1 one; drops closed and long-idle ones on the way.
    fn take_idle(&self) -> Option<Sender> {
        let mut conns = self.conns.lock();
        conns.retain(|c| !c.sender.is_closed());
        let now = Instant::now();
        while let Some(i) = conns.iter().rposition(|c| c.sender.is_ready()) {
            if now.saturating_duration_since(conns[i].used) >= IDLE_TIMEOUT {
                conns.swap_remove(i);
                continue;
            }
            if let Sender::Http2(shared) = &conns[i].sender {
                let shared = shared.clone();
                conns[i].used = now;
                return Some(Sender::Http2(shared));
            }
            return Some(conns.swap_remove(i).sender);
        }
        None
    }

    /// Pools a connection a request was last sent on at `used`.
    fn put(&self, sender: Sender, used: Instant) {
        self.conns.lock().push(Conn { sender, used });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// An idle, ready connection over an in-memory pipe, and the pipe's other end (dropping it
    /// closes the connection).
    async fn idle_connection() -> (Sender, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        #[expect(clippy::disallowed_methods, reason = "ends with the test")]
        tokio::spawn(connection);
        poll_fn(|cx| sender.poll_ready(cx)).await.unwrap();
        (Sender::Http1(sender), theirs)
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
