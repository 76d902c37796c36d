//! The response body wrapper: hands every byte to the client as it arrives and, on the side, to the usage extractor.
//!
//! It finishes exactly once: at the end of the upstream body, on an upstream error or idle
//! timeout, or when dropped because the client went away. In that last case the upstream
//! connection is closed at once, or, with `on_client_disconnect = "drain"`, read to its end
//! (within `drain_timeout` and `DRAIN_MAX_BYTES`) by a task of its own, for the exact usage.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::Exchange;
use crate::config::{Config, DRAIN_MAX_BYTES, OnClientDisconnect};
use crate::tasks::Tasks;
use crate::usage::estimate::{KEEP_CAP, Raw};
use crate::usage::{Extracted, Flavor, StreamUsage, openai_chat, sse};

/// Largest plain response body kept for usage extraction; past it the usage is given up, not the response.
pub const BODY_CAP: usize = 16 * 1024 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the body ended, for the record and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream body ended normally.
    Complete,
    /// The upstream failed or went silent mid-body.
    UpstreamFailed,
    /// The client went away before the end.
    ClientGone,
}

/// What the tap does with the bytes on the side.
pub enum Extraction {
    /// Unmetered route: nothing.
    None,
    /// A plain JSON body: keep clones of its chunks until the end.
    Body {
        /// How to read it.
        flavor: Flavor,
        /// The chunks so far (reference-counted, not copied).
        chunks: Vec<Bytes>,
        /// Their total length.
        len: usize,
    },
    /// An SSE stream.
    Stream {
        /// Splits the bytes into events.
        framer: sse::Framer,
        /// Reads usage from the events.
        reader: StreamUsage,
        /// Hide the usage-only chunk: llm-meter asked for it, the client did not.
        strip_usage_chunk: bool,
        /// The stream's chunks (shared, not copied, up to `KEEP_CAP`), for an estimate if
        /// the stream ends without usage.
        kept: Vec<Bytes>,
        /// Their total length.
        kept_len: usize,
    },
    /// Past a cap: bytes pass through, and what was learned before stays for the record.
    GaveUp(Extracted),
}

impl Extraction {
    /// What was extracted by the time the body ended, and the bytes to estimate from when
    /// the usage is missing (or not final).
    fn finish(self) -> (Extracted, Option<Raw>) {
        match self {
            Self::None => (Extracted::default(), None),
            Self::Body { flavor, chunks, .. } => {
                let extracted = match chunks.as_slice() {
                    [] => flavor.parse_body(b""),
                    [one] => flavor.parse_body(one),
                    many => flavor.parse_body(&many.concat()),
                };
                let raw = extracted.usage.is_none().then_some(Raw::Body(chunks));
                (extracted, raw)
            }
            Self::Stream { reader, kept, .. } => {
                let extracted = reader.finish();
                let needs_text = extracted.usage.is_none() || extracted.is_output_provisional;
                (extracted, needs_text.then_some(Raw::Stream(kept)))
            }
            Self::GaveUp(extracted) => (extracted, None),
        }
    }

    /// Reads a chunk the client will not see (draining after it left).
    fn observe(&mut self, data: Bytes) {
        match self {
            Self::Body { chunks, len, .. } => {
                *len += data.len();
                if *len <= BODY_CAP {
                    chunks.push(data);
                }
            }
            Self::Stream {
                framer,
                reader,
                kept,
                kept_len,
                ..
            } => {
                let fed = framer.feed(&data, |event| {
                    reader.on_event(&event);
                });
                keep(kept, kept_len, data);
                if fed.is_err() {
                    let so_far = std::mem::replace(self, Self::None).finish().0;
                    *self = Self::GaveUp(so_far);
                }
            }
            Self::None | Self::GaveUp(_) => {}
        }
    }

    /// Event-aligned output: only when a chunk must be hidden from the client.
    fn is_filtering(&self) -> bool {
        matches!(
            self,
            Self::Stream {
                strip_usage_chunk: true,
                ..
            }
        )
    }
}

/// Most bytes of already-arrived stream data merged into one write to the client.
const BATCH_LIMIT: usize = 64 * 1024;

/// Most turns a batch gives the upstream connection to pass on more of what it has read.
const MAX_YIELDS: u32 = 32;

/// Turns in a row that bring nothing new before a held batch goes out.
const MAX_EMPTY_TURNS: u32 = 3;

/// Keeps a chunk for an estimate while under `KEEP_CAP` (a reference, not a copy).
fn keep(kept: &mut Vec<Bytes>, kept_len: &mut usize, data: Bytes) {
    if *kept_len < KEEP_CAP {
        *kept_len += data.len();
        kept.push(data);
    }
}

/// The response body handed to the client.
pub struct Tap {
    /// The upstream body; taken away only by a drain when the client has left.
    inner: Option<Incoming>,
    extraction: Extraction,
    /// Stream bytes ready for the client: events (filtering) or raw chunks.
    ready: VecDeque<Bytes>,
    ready_len: usize,
    exchange: Option<Exchange>,
    is_ended: bool,
    /// An SSE stream: whatever has already arrived goes out in one write.
    is_stream: bool,
    /// The output is re-framed, so the upstream's length no longer applies.
    is_filtering: bool,
    /// An upstream failure to report once the data before it has gone out.
    failure: Option<BoxError>,
    trailers: Option<Frame<Bytes>>,
    idle_timeout: Duration,
    /// Who owns a drain, when streams whose client left are drained.
    drains: Option<Tasks>,
    drain_timeout: Duration,
    last_activity: Instant,
    /// Armed lazily and re-armed only when it fires, so a busy stream costs no timer work per chunk.
    idle: Option<Pin<Box<Sleep>>>,
    /// Some data has gone to the client (the first is never held back).
    has_sent: bool,
    /// Turns given to the upstream connection while data waits, in the current batch.
    yields: u32,
    /// Turns in a row, in the current batch, that brought nothing new.
    empty_turns: u32,
}

type PollFrame = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl Tap {
    /// Wraps an upstream body; `exchange` is completed (recorded and logged) when the body finishes.
    pub fn new(
        inner: Incoming,
        extraction: Extraction,
        exchange: Exchange,
        config: &Config,
        tasks: &Tasks,
    ) -> Self {
        Self {
            inner: Some(inner),
            is_stream: matches!(extraction, Extraction::Stream { .. }),
            is_filtering: extraction.is_filtering(),
            extraction,
            ready: VecDeque::new(),
            ready_len: 0,
            exchange: Some(exchange),
            is_ended: false,
            failure: None,
            trailers: None,
            idle_timeout: config.idle_timeout,
            drains: (config.on_client_disconnect == OnClientDisconnect::Drain)
                .then(|| tasks.clone()),
            drain_timeout: config.drain_timeout,
            last_activity: Instant::now(),
            idle: None,
            has_sent: false,
            yields: 0,
            empty_turns: 0,
        }
    }

    /// Plain bodies: each upstream frame goes on as it is, a clone kept for the extractor.
    fn poll_plain(&mut self, cx: &mut Context<'_>) -> PollFrame {
        let Some(inner) = self.inner.as_mut().filter(|_| !self.is_ended) else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => self.poll_idle(cx),
            Poll::Ready(Some(Ok(frame))) => {
                self.last_activity = Instant::now();
                if let Some(data) = frame.data_ref() {
                    self.keep_for_extraction(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.finish(Outcome::UpstreamFailed);
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                self.is_ended = true;
                self.finish(Outcome::Complete);
                Poll::Ready(None)
            }
        }
    }

    fn keep_for_extraction(&mut self, data: &Bytes) {
        if let Extraction::Body { chunks, len, .. } = &mut self.extraction {
            *len += data.len();
            if *len <= BODY_CAP {
                chunks.push(data.clone());
            } else {
                tracing::warn!(cap = BODY_CAP, "response body too large to read usage from");
                self.extraction = Extraction::GaveUp(Extracted::default());
            }
        }
    }

    /// Streams: take in everything the upstream has already sent, then hand it on in one frame.
    /// Only what has arrived is merged, so no event waits for another to be sent; the client gets
    /// one write where the upstream's chunks would have cost one each.
    ///
    /// hyper's client passes an upstream body on one frame at a time, through a channel the
    /// connection task refills only when it runs. So once data is waiting, the stream gives that
    /// task turns (`yield`) before answering, until three in a row bring nothing (it takes two or
    /// three to pass a frame on; S3 in the load benchmark: 0.16 of direct with no turns, 0.26
    /// with two, 0.36 with three, no better with four): a burst of chunks read from the socket
    /// together leaves in one write instead of twenty, and a lone chunk waits only those empty
    /// turns (microseconds, no timer). The first data of a stream is never held back: time to first
    /// token is what users feel.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> PollFrame {
        let mut is_waiting = false;
        let mut has_new = false;
        while !self.is_ended
            && self.failure.is_none()
            && self.trailers.is_none()
            && self.ready_len < BATCH_LIMIT
        {
            let Some(inner) = self.inner.as_mut() else {
                break;
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => {
                    is_waiting = true;
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    self.last_activity = Instant::now();
                    has_new = true;
                    match frame.into_data() {
                        Ok(data) => self.on_stream_data(data),
                        Err(trailers) => self.trailers = Some(trailers),
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    self.finish(Outcome::UpstreamFailed);
                    self.failure = Some(err.into());
                }
                Poll::Ready(None) => self.on_stream_end(),
            }
        }
        if has_new {
            self.empty_turns = 0;
        } else if self.yields > 0 {
            self.empty_turns += 1;
        }
        if is_waiting
            && !self.ready.is_empty()
            && self.has_sent
            && self.yields < MAX_YIELDS
            && self.empty_turns < MAX_EMPTY_TURNS
        {
            self.yields += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(batch) = self.take_ready() {
            self.yields = 0;
            self.empty_turns = 0;
            self.has_sent = true;
            return Poll::Ready(Some(Ok(Frame::data(batch))));
        }
        if let Some(err) = self.failure.take() {
            return Poll::Ready(Some(Err(err)));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        if self.is_ended {
            return Poll::Ready(None);
        }
        debug_assert!(
            is_waiting,
            "the loop only stops early with something to return"
        );
        self.poll_idle(cx)
    }

    /// Frames one chunk of a stream: events go to `ready` (all but a hidden usage chunk when
    /// filtering; the raw chunk otherwise).
    fn on_stream_data(&mut self, data: Bytes) {
        let Extraction::Stream {
            framer,
            reader,
            strip_usage_chunk,
            kept,
            kept_len,
        } = &mut self.extraction
        else {
            // Gave up on extraction: pass through.
            self.push_ready(data);
            return;
        };
        let strip = *strip_usage_chunk;
        keep(kept, kept_len, data.clone());
        let (ready, ready_len) = (&mut self.ready, &mut self.ready_len);
        let fed = framer.feed(&data, |event| {
            let kind = reader.on_event(&event);
            if strip && kind != openai_chat::Event::UsageOnly {
                *ready_len += event.len();
                ready.push_back(event);
            }
        });
        if fed.is_err() {
            tracing::warn!(
                cap = sse::DEFAULT_EVENT_CAP,
                "SSE event too large: usage of this stream is not read"
            );
            let rest = framer.take_rest();
            let so_far = std::mem::replace(&mut self.extraction, Extraction::None)
                .finish()
                .0;
            self.extraction = Extraction::GaveUp(so_far);
            if strip {
                self.push_ready(rest);
                return;
            }
        }
        if !strip {
            self.push_ready(data);
        }
    }

    fn push_ready(&mut self, bytes: Bytes) {
        self.ready_len += bytes.len();
        self.ready.push_back(bytes);
    }

    /// Everything ready, as one frame: the chunk itself when there is one, else a joined copy.
    fn take_ready(&mut self) -> Option<Bytes> {
        let batch = match self.ready.len() {
            0 => return None,
            1 => self.ready.pop_front()?,
            _ => {
                let mut joined = BytesMut::with_capacity(self.ready_len);
                for part in self.ready.drain(..) {
                    joined.extend_from_slice(&part);
                }
                joined.freeze()
            }
        };
        self.ready_len = 0;
        Some(batch)
    }

    /// At the end of a stream: hand a filtering stream's unfinished tail on, then record.
    fn on_stream_end(&mut self) {
        if let Extraction::Stream {
            framer,
            strip_usage_chunk: true,
            ..
        } = &mut self.extraction
            && !framer.is_empty()
        {
            let rest = framer.take_rest();
            self.push_ready(rest);
        }
        self.is_ended = true;
        self.finish(Outcome::Complete);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(mut exchange) = self.exchange.take() {
            let (extracted, raw) =
                std::mem::replace(&mut self.extraction, Extraction::None).finish();
            exchange.complete(extracted, raw, outcome);
        }
    }

    /// Upstream has nothing new: wait, unless it has been silent for the whole idle timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> PollFrame {
        let first_deadline = self.last_activity + self.idle_timeout;
        let sleep = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(first_deadline)));
        loop {
            ready!(sleep.as_mut().poll(cx));
            // The timer is only moved when it fires: data since it was set means it fired early.
            let deadline = self.last_activity + self.idle_timeout;
            if Instant::now() < deadline {
                sleep.as_mut().reset(deadline);
                continue;
            }
            self.finish(Outcome::UpstreamFailed);
            let err = format!(
                "upstream sent nothing for {} (idle_timeout)",
                humantime::format_duration(self.idle_timeout)
            );
            return Poll::Ready(Some(Err(err.into())));
        }
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        let this = self.get_mut();
        if this.is_stream {
            this.poll_stream(cx)
        } else {
            this.poll_plain(cx)
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once it has been seen, so the record is made before the client is done.
        self.is_ended && self.ready.is_empty() && self.failure.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_filtering {
            SizeHint::default()
        } else {
            self.inner
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint)
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let is_whole = self.inner.as_ref().is_none_or(Body::is_end_stream);
        if is_whole {
            self.finish(Outcome::Complete);
            return;
        }
        let drains = !matches!(self.extraction, Extraction::None) && self.exchange.is_some();
        if let Some(tasks) = self.drains.take().filter(|_| drains)
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let parts = (self.exchange.take(), self.inner.take());
            if let (Some(exchange), Some(inner)) = parts {
                let extraction = std::mem::replace(&mut self.extraction, Extraction::None);
                let timeout = self.drain_timeout;
                let owner = tasks.clone();
                tasks.spawn(async move {
                    drain(inner, extraction, exchange, timeout, &owner).await;
                });
                return;
            }
        }
        self.finish(Outcome::ClientGone);
    }
}

/// Reads an upstream body whose client has left, to its end, within `timeout` and
/// `DRAIN_MAX_BYTES`, then records what it said. The record is flagged partial (the client did
/// not get it all); its usage is the provider's own when the end was reached.
async fn drain(
    mut inner: Incoming,
    mut extraction: Extraction,
    mut exchange: Exchange,
    timeout: Duration,
    tasks: &Tasks,
) {
    use http_body_util::BodyExt as _;
    let mut read = 0;
    let reading = async {
        while let Some(frame) = inner.frame().await {
            let Ok(frame) = frame else {
                return Outcome::UpstreamFailed;
            };
            if let Ok(data) = frame.into_data() {
                read += data.len();
                if read > DRAIN_MAX_BYTES {
                    tracing::warn!(
                        cap = DRAIN_MAX_BYTES,
                        "stopped draining a response: too long"
                    );
                    break;
                }
                extraction.observe(data);
            }
        }
        Outcome::ClientGone
    };
    // At the end of the shutdown's grace period, what was read is recorded.
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(timeout, reading) => outcome.unwrap_or(Outcome::ClientGone),
        () = tasks.stopping() => Outcome::ClientGone,
    };
    let (extracted, raw) = extraction.finish();
    exchange.complete(extracted, raw, outcome);
}
