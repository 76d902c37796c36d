//! The responses inside one WebSocket: admitted as the client starts each one, recorded as each
//! completes (one record per response, not per connection), and recorded partial when the
//! connection ends before their completion.
//!
//! A response starts with the client's `response.create` (or, in a Realtime session whose
//! server detects turns, with the server's `response.created` alone) and ends with its terminal
//! event: `response.completed`, `.done`, `.failed` or `.incomplete` (Responses API), or
//! `response.done` (Realtime API). Responses are answered in the order they were asked for, so
//! events go to the oldest response still open.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;

use crate::guard::Refusal;
use crate::json;
use crate::proxy::exchange::Exchange;
use crate::proxy::tap::Outcome;
use crate::usage::estimate::{KEEP_CAP, Raw};
use crate::usage::{Extracted, Flavor, openai_realtime, openai_responses};

/// The client asks for a response.
const CREATE: &[u8] = b"response.create";
/// The server began a response.
const CREATED: &[u8] = b"response.created";
/// The server refused something the client sent.
const ERROR: &[u8] = b"error";

/// Most responses kept open at once: a client that asks for more without waiting for any is
/// refused (its records would otherwise grow without bound).
const MAX_OPEN: usize = 64;

/// What a message means for admission.
pub(super) enum Admission {
    /// Forward it.
    Pass,
    /// Refuse the response it starts, and close the WebSocket.
    Refuse(Refused),
}

/// Why a response may not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    /// The guard's answer: a spent budget, a rate limit, an unknown key.
    #[error(transparent)]
    Guard(#[from] Refusal),
    /// Too many responses asked for and not finished.
    #[error("more than {MAX_OPEN} responses open at once")]
    TooManyOpen,
}

/// One response in progress.
struct Turn {
    exchange: Exchange,
    /// The Responses API's events as the stream extractor reads them.
    reader: openai_responses::Stream,
    /// The server said `response.created`.
    is_created: bool,
    /// The server's messages so far (shared, not copied), framed as SSE for an estimate.
    kept: Vec<Bytes>,
    kept_len: usize,
}

/// The responses of one WebSocket, and the upgrade's own exchange (logged when it ends).
pub(super) struct Turns {
    upgrade: Exchange,
    flavor: Option<Flavor>,
    /// The session's model: the query's, the last `response.create`'s, or the session's.
    model: Option<String>,
    open: VecDeque<Turn>,
}

impl Turns {
    /// No response yet; `upgrade` is the exchange of the upgrade request, `flavor` how its
    /// messages report usage (`None`: relayed unmetered).
    pub(super) fn new(upgrade: Exchange, flavor: Option<Flavor>) -> Self {
        Self {
            model: upgrade.request_model.clone(),
            upgrade,
            flavor,
            open: VecDeque::new(),
        }
    }

    /// A text message of the client's, before it is forwarded: a `response.create` is
    /// admitted as a request (budgets, rate limits) and opens a response.
    pub(super) fn on_client(&mut self, text: &Bytes) -> Admission {
        let Some(flavor) = self.flavor else {
            return Admission::Pass;
        };
        let Some([kind, model]) = json::top_level(text, [b"type", b"model"]) else {
            return Admission::Pass;
        };
        if !is(kind, CREATE) {
            return Admission::Pass;
        }
        if let Err(refusal) = self.admit() {
            return Admission::Refuse(refusal);
        }
        if let Some(model) = model.and_then(|m| serde_json::from_slice::<String>(m).ok()) {
            self.model = Some(model);
        }
        // The Responses API's `response.create` is a create request's body: a prompt to
        // estimate from if the response never reports its usage.
        let body = (flavor == Flavor::OpenAiResponses).then(|| text.clone());
        self.begin(flavor, body);
        Admission::Pass
    }

    /// A budget, rate limit or key check before a response starts, and the bound on how many
    /// may be open at once.
    fn admit(&self) -> Result<(), Refused> {
        let admitted = if self.open.len() >= MAX_OPEN {
            Err(Refused::TooManyOpen)
        } else {
            self.upgrade
                .guard
                .admit(self.upgrade.key)
                .map_err(Refused::from)
        };
        if admitted.is_err() {
            self.upgrade
                .count_refused(self.flavor, self.model.as_deref());
        }
        admitted
    }

    fn begin(&mut self, flavor: Flavor, request_body: Option<Bytes>) {
        let upgrade = &self.upgrade;
        let exchange = Exchange {
            meter: Arc::clone(&upgrade.meter),
            metrics: Arc::clone(&upgrade.metrics),
            guard: Arc::clone(&upgrade.guard),
            key: upgrade.key,
            identity: upgrade.identity.clone(),
            attribution: upgrade.attribution.clone(),
            upstream: Arc::clone(&upgrade.upstream),
            flavor: Some(flavor),
            method: upgrade.method.clone(),
            path: upgrade.path.clone(),
            request_model: self.model.clone(),
            request_body,
            is_streaming: true,
            status: StatusCode::OK,
            started: Instant::now(),
            upstream_latency: None,
            until_sent: None,
            error: None,
            is_done: false,
            tracer: upgrade.tracer.clone(),
        };
        self.open.push_back(Turn {
            exchange,
            reader: openai_responses::Stream::default(),
            is_created: false,
            kept: Vec::new(),
            kept_len: 0,
        });
    }

    /// A text message of the upstream's, as it passes: starts, feeds or ends a response.
    /// A Realtime response the server started on its own is admitted here, already begun.
    pub(super) fn on_upstream(&mut self, text: &Bytes) -> Admission {
        let Some(flavor) = self.flavor else {
            return Admission::Pass;
        };
        let Some([kind]) = json::top_level(text, [b"type"]) else {
            return Admission::Pass;
        };
        let Some(kind) = kind else {
            return Admission::Pass;
        };
        let mut admission = Admission::Pass;
        if is(Some(kind), CREATED) {
            if !self.open.iter().any(|t| !t.is_created) {
                // Started by the server (a Realtime turn it detected): metered all the same.
                if let Err(refusal) = self.admit() {
                    admission = Admission::Refuse(refusal);
                }
                self.begin(flavor, None);
            }
            if let Some(turn) = self.open.iter_mut().find(|t| !t.is_created) {
                turn.is_created = true;
                turn.first_response(text);
            }
        } else if flavor == Flavor::OpenAiRealtime
            && (is(Some(kind), b"session.created") || is(Some(kind), b"session.updated"))
        {
            if let Some(model) = openai_realtime::session_model(text) {
                self.model = Some(model);
            }
        } else if is_terminal(flavor, kind) {
            if let Some(turn) = self.open.pop_front() {
                turn.complete(flavor, text);
            }
        } else if is(Some(kind), ERROR) {
            // An error before the response began: the server refused the `response.create`.
            if self.open.front().is_some_and(|t| !t.is_created)
                && let Some(turn) = self.open.pop_front()
            {
                turn.refused();
            }
        } else if let Some(turn) = self.open.front_mut() {
            turn.keep(text);
        }
        admission
    }

    /// The WebSocket has ended: the responses still open are recorded from what was seen,
    /// partial; then the upgrade's line is logged.
    pub(super) fn finish(mut self, outcome: Outcome, error: Option<String>) {
        for turn in self.open.drain(..) {
            turn.cut(outcome);
        }
        self.upgrade.error = error;
        self.upgrade
            .complete(Extracted::default(), None, Outcome::Complete);
    }

    /// The key id, for log lines.
    pub(super) fn key_id(&self) -> &str {
        &self.upgrade.identity.id
    }
}

impl Turn {
    /// `response.created`: its model and id, for a record even if the response is cut.
    fn first_response(&mut self, text: &Bytes) {
        self.reader.on_data(text);
        self.keep(text);
    }

    /// Keeps a message, as an SSE event, while under `KEEP_CAP` (references, not copies).
    fn keep(&mut self, text: &Bytes) {
        if self.kept_len < KEEP_CAP {
            self.kept_len += text.len();
            self.kept.push(Bytes::from_static(b"data: "));
            self.kept.push(text.clone());
            self.kept.push(Bytes::from_static(b"\n\n"));
        }
    }

    /// The terminal event: the usage it reports, recorded.
    fn complete(mut self, flavor: Flavor, text: &Bytes) {
        let mut extracted = match flavor {
            Flavor::OpenAiRealtime => openai_realtime::parse_event(text),
            _ => {
                self.reader.on_data(text);
                self.reader.finish()
            }
        };
        let raw = extracted.usage.is_none().then(|| Raw::Stream(self.kept));
        if extracted.model.is_none() {
            extracted.model = self.exchange.request_model.take();
        }
        self.exchange.complete(extracted, raw, Outcome::Complete);
    }

    /// Refused by the server before it began: an error, with no tokens.
    fn refused(mut self) {
        self.exchange.status = StatusCode::BAD_REQUEST;
        self.exchange.error = Some("the upstream refused the response.create".into());
        self.exchange
            .complete(Extracted::default(), None, Outcome::Complete);
    }

    /// Cut before its end: what was seen, flagged partial (estimated when no usage came).
    fn cut(mut self, outcome: Outcome) {
        let extracted = self.reader.finish();
        self.exchange
            .complete(extracted, Some(Raw::Stream(self.kept)), outcome);
    }
}

/// True when the raw JSON `value` is the string `expected`.
fn is(value: Option<&[u8]>, expected: &[u8]) -> bool {
    value.and_then(|v| v.strip_prefix(b"\"")?.strip_suffix(b"\"")) == Some(expected)
}

/// The events that end a response, per flavor.
fn is_terminal(flavor: Flavor, kind: &[u8]) -> bool {
    let kind = Some(kind);
    match flavor {
        Flavor::OpenAiRealtime => is(kind, b"response.done"),
        _ => [
            b"response.completed".as_slice(),
            b"response.done",
            b"response.failed",
            b"response.incomplete",
        ]
        .iter()
        .any(|end| is(kind, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_matched_as_whole_strings() {
        assert!(is(Some(b"\"response.create\""), CREATE));
        assert!(!is(Some(b"\"response.created\""), CREATE));
        assert!(!is(Some(b"response.create"), CREATE));
        assert!(!is(None, CREATE));
        assert!(is_terminal(
            Flavor::OpenAiResponses,
            b"\"response.completed\""
        ));
        assert!(is_terminal(Flavor::OpenAiResponses, b"\"response.failed\""));
        assert!(is_terminal(Flavor::OpenAiRealtime, b"\"response.done\""));
        assert!(!is_terminal(
            Flavor::OpenAiRealtime,
            b"\"response.completed\""
        ));
    }
}
