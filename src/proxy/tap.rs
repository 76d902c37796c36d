//! The response body wrapper: hands every byte to the client as it arrives and, on the side, to the usage extractor.
//!
//! It finishes exactly once: at the end of the upstream body, on an upstream error or idle
//! timeout, or when dropped because the client went away.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::Exchange;
use crate::usage::{Extracted, openai_chat, sse};

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
        /// The chunks so far (reference-counted, not copied).
        chunks: Vec<Bytes>,
        /// Their total length.
        len: usize,
    },
    /// An SSE chat stream.
    Stream {
        /// Splits the bytes into events.
        framer: sse::Framer,
        /// Reads usage from the events.
        chat: openai_chat::Stream,
        /// Hide the usage-only chunk: llm-meter asked for it, the client did not.
        strip_usage_chunk: bool,
    },
    /// Past a cap: bytes pass through, and what was learned before stays for the record.
    GaveUp(Extracted),
}

impl Extraction {
    /// What was extracted by the time the body ended.
    fn finish(self) -> Extracted {
        match self {
            Self::None => Extracted::default(),
            Self::Body { chunks, .. } => match chunks.as_slice() {
                [] => openai_chat::parse_body(b""),
                [one] => openai_chat::parse_body(one),
                many => openai_chat::parse_body(&many.concat()),
            },
            Self::Stream { chat, .. } => chat.finish(),
            Self::GaveUp(extracted) => extracted,
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

/// The response body handed to the client.
pub struct Tap {
    inner: Incoming,
    extraction: Extraction,
    /// Events ready for the client (filtering mode only).
    ready: VecDeque<Bytes>,
    exchange: Option<Exchange>,
    is_ended: bool,
    /// The output is re-framed, so the upstream's length no longer applies.
    is_filtering: bool,
    idle_timeout: Duration,
    last_activity: Instant,
    /// Armed lazily and re-armed only when it fires, so a busy stream costs no timer work per chunk.
    idle: Option<Pin<Box<Sleep>>>,
}

impl Tap {
    /// Wraps an upstream body; `exchange` is completed (recorded and logged) when the body finishes.
    pub fn new(
        inner: Incoming,
        extraction: Extraction,
        exchange: Exchange,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            is_filtering: extraction.is_filtering(),
            extraction,
            ready: VecDeque::new(),
            exchange: Some(exchange),
            is_ended: false,
            idle_timeout,
            last_activity: Instant::now(),
            idle: None,
        }
    }

    /// Takes one data chunk; returns what goes to the client now (in filtering mode, events go to `ready`).
    fn on_data(&mut self, data: Bytes) -> Option<Bytes> {
        match &mut self.extraction {
            Extraction::None | Extraction::GaveUp(_) => Some(data),
            Extraction::Body { chunks, len } => {
                *len += data.len();
                if *len <= BODY_CAP {
                    chunks.push(data.clone());
                } else {
                    tracing::warn!(cap = BODY_CAP, "response body too large to read usage from");
                    self.extraction = Extraction::GaveUp(Extracted::default());
                }
                Some(data)
            }
            Extraction::Stream {
                framer,
                chat,
                strip_usage_chunk,
            } => {
                let ready = &mut self.ready;
                let strip = *strip_usage_chunk;
                let fed = framer.feed(&data, |event| {
                    let kind = chat.on_event(&event);
                    if strip && kind != openai_chat::Event::UsageOnly {
                        ready.push_back(event);
                    }
                });
                if fed.is_err() {
                    tracing::warn!(
                        cap = sse::DEFAULT_EVENT_CAP,
                        "SSE event too large: usage of this stream is not read"
                    );
                    if strip {
                        ready.push_back(framer.take_rest());
                    }
                    let so_far = std::mem::replace(&mut self.extraction, Extraction::None).finish();
                    self.extraction = Extraction::GaveUp(so_far);
                    return (!strip).then_some(data);
                }
                (!strip).then_some(data)
            }
        }
    }

    /// Finishes at end of stream: hands a filtering stream's unfinished tail on, then records.
    fn on_end(&mut self) {
        if let Extraction::Stream {
            framer,
            strip_usage_chunk: true,
            ..
        } = &mut self.extraction
        {
            if !framer.is_empty() {
                self.ready.push_back(framer.take_rest());
            }
        }
        self.is_ended = true;
        self.finish(Outcome::Complete);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(exchange) = self.exchange.take() {
            let extraction = std::mem::replace(&mut self.extraction, Extraction::None);
            exchange.complete(&extraction.finish(), outcome);
        }
    }

    /// Upstream has nothing new: wait, unless it has been silent for the whole idle timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let deadline = self.last_activity + self.idle_timeout;
            let sleep = self
                .idle
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() < deadline {
                sleep.as_mut().reset(deadline);
            }
            ready!(sleep.as_mut().poll(cx));
            if Instant::now() >= self.last_activity + self.idle_timeout {
                self.finish(Outcome::UpstreamFailed);
                let err = format!(
                    "upstream sent nothing for {} (idle_timeout)",
                    humantime::format_duration(self.idle_timeout)
                );
                return Poll::Ready(Some(Err(err.into())));
            }
        }
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            if this.is_ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return this.poll_idle(cx),
                Poll::Ready(Some(Ok(frame))) => {
                    this.last_activity = Instant::now();
                    match frame.into_data() {
                        Ok(data) => {
                            if let Some(out) = this.on_data(data) {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.finish(Outcome::UpstreamFailed);
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(None) => this.on_end(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once it has been seen, so the record is made before the client is done.
        self.is_ended && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_filtering {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let outcome = if self.inner.is_end_stream() {
            Outcome::Complete
        } else {
            Outcome::ClientGone
        };
        self.finish(outcome);
    }
}
