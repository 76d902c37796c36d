//! One connection's clock: a request head must be complete within `header_timeout` of its
//! first byte (of the connection's start, for the first), and a connection with no request in
//! flight is closed after `keepalive_timeout`, so half-sent requests and idle sockets cannot
//! hold connections forever.
//!
//! hyper's own `header_read_timeout` starts when the connection goes idle, so it cannot tell a
//! slow head from an idle keep-alive connection. Here the socket's reads say when a head began,
//! the service call says when it was complete, and the response body's end says when the
//! connection went idle again. A watchdog per connection wakes at least once per
//! `header_timeout` and then sleeps exactly to the deadline it sees, so nothing is signalled per
//! request: a request costs a few relaxed atomic stores.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The two timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Longest a request head may take from its first byte.
    pub header: Duration,
    /// Longest a connection may stay open with no request in flight.
    pub keepalive: Duration,
}

const WAITING_FOR_HEAD: u8 = 0;
const READING_HEAD: u8 = 1;
const BUSY: u8 = 2;
const IDLE: u8 = 3;

/// What a connection is doing, shared by its socket, its requests and its watchdog.
#[derive(Debug)]
pub struct Activity {
    phase: AtomicU8,
    /// Requests whose responses have not ended.
    open_requests: AtomicUsize,
    /// When the current phase times out, in milliseconds since `epoch`.
    deadline_ms: AtomicU64,
    epoch: Instant,
    timeouts: Timeouts,
}

impl Activity {
    /// A new connection: its first head is due within `header` of now.
    pub fn start(timeouts: Timeouts) -> Arc<Self> {
        let activity = Self {
            phase: AtomicU8::new(WAITING_FOR_HEAD),
            open_requests: AtomicUsize::new(0),
            deadline_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            timeouts,
        };
        activity.set_deadline(timeouts.header);
        Arc::new(activity)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn set_deadline(&self, after: Duration) {
        let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.deadline_ms
            .store(self.now_ms().saturating_add(after), Relaxed);
    }

    /// Bytes arrived: on an idle connection they start a head, whose clock starts now.
    fn on_bytes(&self) {
        if self.phase.load(Relaxed) == IDLE {
            self.phase.store(READING_HEAD, Relaxed);
            self.set_deadline(self.timeouts.header);
        }
    }

    /// A head is complete and its request is being served.
    pub fn request_started(self: &Arc<Self>) -> RequestInFlight {
        self.open_requests.fetch_add(1, Relaxed);
        self.phase.store(BUSY, Relaxed);
        RequestInFlight(Arc::clone(self))
    }

    /// Whether the connection is past its deadline, or the time to look again.
    fn check(&self) -> Option<Duration> {
        let phase = self.phase.load(Relaxed);
        let wake_within = self.timeouts.header.min(self.timeouts.keepalive);
        if phase == BUSY {
            return Some(wake_within);
        }
        let now = self.now_ms();
        let deadline = self.deadline_ms.load(Relaxed);
        if now >= deadline {
            return None;
        }
        Some(Duration::from_millis(deadline - now).min(wake_within))
    }

    /// Completes once the connection has timed out in its head or while idle.
    pub async fn expired(&self) -> &'static str {
        loop {
            match self.check() {
                Some(wait) => tokio::time::sleep(wait).await,
                None if self.phase.load(Relaxed) == IDLE => return "keepalive_timeout",
                None => return "header_timeout",
            }
        }
    }
}

/// Marks one request in flight; its response body carries it and drops it when it ends.
#[derive(Debug)]
pub struct RequestInFlight(Arc<Activity>);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        if self.0.open_requests.fetch_sub(1, Relaxed) == 1 {
            self.0.phase.store(IDLE, Relaxed);
            self.0.set_deadline(self.0.timeouts.keepalive);
        }
    }
}

/// A response body that marks its request finished when it ends or is dropped.
pub struct Tracked<B> {
    body: B,
    _request: RequestInFlight,
}

impl<B> Tracked<B> {
    /// Wraps `body` for the request `request`.
    pub fn new(body: B, request: RequestInFlight) -> Self {
        Self {
            body,
            _request: request,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket whose reads tell the connection's `Activity` when a head begins.
pub struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    /// Watches `tcp` for `activity`.
    pub fn new(tcp: TcpStream, activity: Arc<Activity>) -> Self {
        Self { tcp, activity }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_bytes();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        keepalive: Duration::from_secs(120),
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_expires_after_the_header_timeout() {
        let activity = Activity::start(TIMEOUTS);
        let started = Instant::now();
        assert_eq!(activity.expired().await, "header_timeout");
        assert_eq!(started.elapsed(), TIMEOUTS.header);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_never_expires_and_idleness_starts_when_it_ends() {
        let activity = Activity::start(TIMEOUTS);
        let request = activity.request_started();
        let waited = tokio::time::timeout(Duration::from_secs(3600), activity.expired()).await;
        assert!(waited.is_err(), "a busy connection expired");
        drop(request);
        let idle_since = Instant::now();
        assert_eq!(activity.expired().await, "keepalive_timeout");
        assert_eq!(idle_since.elapsed(), TIMEOUTS.keepalive);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_on_an_idle_connection_start_the_header_clock_once() {
        let activity = Activity::start(TIMEOUTS);
        drop(activity.request_started());
        tokio::time::sleep(Duration::from_secs(50)).await;
        activity.on_bytes();
        let head_since = Instant::now();
        // A byte every few seconds does not push the deadline back.
        let dripping = async {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                activity.on_bytes();
            }
        };
        tokio::select! {
            reason = activity.expired() => assert_eq!(reason, "header_timeout"),
            () = dripping => unreachable!(),
        }
        assert_eq!(head_since.elapsed(), TIMEOUTS.header);
    }
}
