//! Forwarding: `/v1/*` to the upstream, with the request rewritten and the response tapped only where metering needs it.

pub mod rewrite;
pub mod route;
pub mod tap;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::error::ProxyError;
use crate::key::{self, Identity};
use crate::meter::{Meter, Record, UNKNOWN_MODEL};
use crate::usage::{Extracted, Flavor, StreamUsage, sse};
use rewrite::{ChatRequest, Spliced};
use tap::{Extraction, Outcome, Tap};

/// Our own prefix, stripped before the rest of the path is appended to the upstream base.
pub const PREFIX: &str = "/v1";

/// One request on its way through: what the record and the log line need once it finishes.
pub struct Exchange {
    meter: Arc<Meter>,
    identity: Identity,
    flavor: Option<Flavor>,
    method: Method,
    path: String,
    request_model: Option<String>,
    is_streaming: bool,
    status: StatusCode,
    started: Instant,
    /// Until the upstream's response headers; `None` when there was no response.
    upstream_latency: Option<Duration>,
    error: Option<String>,
    is_done: bool,
}

/// Status logged for a request whose client left before any response (nginx's convention).
const CLIENT_CLOSED: u16 = 499;

impl Exchange {
    /// Records the request (metered routes) and writes its one log line.
    pub fn complete(&mut self, extracted: &Extracted, outcome: Outcome) {
        if std::mem::replace(&mut self.is_done, true) {
            return;
        }
        let key_id = self.identity.id.as_str();
        for warning in &extracted.warnings {
            tracing::warn!(
                key_id,
                field = warning.field,
                problem = warning.problem,
                "ignored a usage field"
            );
        }
        let duration_ms = millis(self.started.elapsed());
        let upstream_ms = millis(self.upstream_latency.unwrap_or_default());
        let is_error = outcome == Outcome::UpstreamFailed
            || !(self.status.is_success() || self.status.as_u16() == CLIENT_CLOSED);
        let is_whole = outcome == Outcome::Complete;
        let outcome = match outcome {
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::ClientGone => "client_gone",
        };
        let Some(flavor) = self.flavor else {
            tracing::info!(method = %self.method, path = self.path, status = self.status.as_u16(), key_id, upstream_ms, duration_ms, outcome, error = self.error, "request");
            return;
        };
        let model = extracted
            .model
            .as_deref()
            .or(self.request_model.as_deref())
            .unwrap_or(UNKNOWN_MODEL);
        if extracted.usage.is_none() && !is_error && is_whole {
            tracing::warn!(
                key_id,
                model,
                ?flavor,
                "response carried no usage: request counted with 0 tokens"
            );
        }
        let priced = self.meter.record(&Record {
            identity: &self.identity,
            model,
            usage: extracted.usage,
            is_error,
            flavor,
            status: self.status.as_u16(),
            is_streaming: self.is_streaming,
            upstream_latency: self.upstream_latency,
            response_id: extracted.response_id.as_deref(),
            is_partial: !is_whole,
        });
        let usage = extracted.usage.unwrap_or_default();
        tracing::info!(
            method = %self.method,
            path = self.path,
            status = self.status.as_u16(),
            key_id,
            model,
            stream = self.is_streaming,
            tokens_in = usage.prompt_tokens(),
            tokens_out = usage.output_tokens,
            cost_usd = priced.cost.as_usd(),
            priced = priced.is_priced,
            upstream_ms,
            duration_ms,
            outcome,
            error = self.error,
            "request"
        );
    }
}

/// A request whose handler is dropped before any response (the client left while the upstream
/// was still answering) is still recorded: the provider may bill it.
impl Drop for Exchange {
    fn drop(&mut self) {
        self.complete(&Extracted::default(), Outcome::ClientGone);
    }
}

/// Milliseconds to the microsecond, so logs show `0.085`, not `0.08509000000000001`.
#[expect(
    clippy::cast_precision_loss,
    reason = "durations under 2^52 µs are exact"
)]
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// The `/v1/*` handler: forwards any method, meters the routes that report usage.
pub async fn forward(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let rest = parts.uri.path().strip_prefix(PREFIX).unwrap_or_default();
    let flavor = route::classify(&parts.method, rest);
    let mut exchange = Exchange {
        meter: Arc::clone(&state.meter),
        identity: Identity::from_headers(&parts.headers),
        flavor,
        method: parts.method.clone(),
        path: key::redact_path(&parts.uri),
        request_model: None,
        is_streaming: false,
        status: StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
        started: Instant::now(),
        upstream_latency: None,
        error: None,
        is_done: false,
    };
    match send(&state, parts, body, &mut exchange).await {
        Ok((parts, incoming, extraction)) => {
            exchange.status = parts.status;
            let tap = Tap::new(incoming, extraction, exchange, state.config.idle_timeout);
            Response::from_parts(parts, Body::new(tap))
        }
        Err(err) => {
            exchange.status = err.status();
            exchange.error = Some(err.to_string());
            exchange.complete(&Extracted::default(), Outcome::Complete);
            err.into_response()
        }
    }
}

/// Sends the request upstream and prepares the response's tap.
async fn send(
    state: &AppState,
    mut parts: http::request::Parts,
    body: Body,
    exchange: &mut Exchange,
) -> Result<(http::response::Parts, Incoming, Extraction), ProxyError> {
    let config = &state.config;
    let limit = config.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let rest = parts.uri.path().strip_prefix(PREFIX).unwrap_or_default();
    let uri = upstream::target_uri(&config.upstream, rest, parts.uri.query())?;
    upstream::strip_hop_by_hop(&mut parts.headers);
    // We send the whole body at once; the upstream must not wait for a 100 Continue.
    parts.headers.remove(header::EXPECT);

    let mut strip_usage_chunk = false;
    let body = if exchange.flavor.is_some() {
        // Usage must be readable: ask for an uncompressed response on metered routes.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let bytes = read_body(body, limit).await?;
        let asks_usage = exchange
            .flavor
            .is_some_and(Flavor::needs_stream_usage_asked);
        match ChatRequest::inspect(&bytes, asks_usage) {
            Some(chat) => {
                exchange.request_model.clone_from(&chat.model);
                exchange.is_streaming = chat.is_streaming;
                strip_usage_chunk = chat.needs_usage_injected();
                let spliced = Spliced::new(chat.rewrite(bytes));
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(spliced.len()));
                Body::new(spliced)
            }
            None => Body::from(bytes),
        }
    } else {
        Body::new(Limited::new(body, limit))
    };

    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, body);
    let sent = Instant::now();
    let response = tokio::time::timeout(config.response_timeout, state.client.request(request))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout {
            upstream: config.upstream.to_string(),
            after: format!(
                "{} (response_timeout)",
                humantime::format_duration(config.response_timeout)
            ),
        })?
        .map_err(|e| upstream::classify_error(&e, config))?;
    exchange.upstream_latency = Some(sent.elapsed());

    let (mut parts, incoming) = response.into_parts();
    upstream::strip_hop_by_hop(&mut parts.headers);
    let extraction = match exchange.flavor {
        None => Extraction::None,
        Some(flavor) if is_event_stream(&parts.headers) => {
            if strip_usage_chunk {
                // One chunk will be removed, so the upstream's length no longer holds.
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            Extraction::Stream {
                framer: sse::Framer::new(sse::DEFAULT_EVENT_CAP),
                reader: StreamUsage::new(flavor),
                strip_usage_chunk,
            }
        }
        Some(flavor) => Extraction::Body {
            flavor,
            chunks: Vec::new(),
            len: 0,
        },
    };
    Ok((parts, incoming, extraction))
}

/// Reads a body that must be inspected whole, refusing it past the limit.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ProxyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(err) => Err(ProxyError::ClientBody(err.to_string())),
    }
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Answers paths outside every route with an OpenAI-style 404.
pub async fn not_found(request: Request) -> Response {
    ProxyError::NotFound(key::redact_path(request.uri())).into_response()
}
