//! Forwarding: each upstream's prefix to its base URL, with the request rewritten and the
//! response tapped only where metering needs it.

pub mod pool;
pub mod rewrite;
pub mod route;
pub mod tap;
pub mod upstream;

/// Canonical paths, decided on before a request reaches a route.
pub use crate::path;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::config::{InjectStreamUsage, Route};
use crate::error::ProxyError;
use crate::guard::{Guard, KeyRef};
use crate::key::{self, Identity};
use crate::meter::{Meter, Record, UNKNOWN_MODEL};
use crate::usage::estimate::{self, Raw};
use crate::usage::{Extracted, Flavor, StreamUsage, Usage, sse};
use pool::Pools;
use rewrite::{ChatRequest, Spliced};
use tap::{Extraction, Outcome, Tap};
use upstream::Connector;

/// What llm-meter has learned of one upstream while running.
#[derive(Debug)]
pub struct UpstreamState {
    /// Its name, shared by every record of its requests.
    pub name: Arc<str>,
    /// Whether it takes `stream_options` (`STREAM_OPTIONS_*`), learned in `auto` mode.
    stream_options: AtomicU8,
    /// Its connections, a pool per worker.
    pools: Pools,
    /// The shapes of unusable usage it has sent, each warned about once.
    warned: Arc<Warned>,
}

/// (field, problem) pairs already warned about for one upstream: a bounded set, since both are
/// static strings of the extractors.
pub type Warned = parking_lot::Mutex<std::collections::HashSet<(&'static str, &'static str)>>;

/// Longest model name kept in records and logs: a client may name any model it likes.
pub const MAX_MODEL_LEN: usize = 256;

/// `model`, cut to `MAX_MODEL_LEN` bytes at a character boundary.
fn capped_model(mut model: String) -> String {
    if model.len() > MAX_MODEL_LEN {
        let mut end = MAX_MODEL_LEN;
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        model.truncate(end);
    }
    model
}

const STREAM_OPTIONS_UNKNOWN: u8 = 0;
const STREAM_OPTIONS_ACCEPTED: u8 = 1;
const STREAM_OPTIONS_REJECTED: u8 = 2;

impl UpstreamState {
    /// The state of an upstream not yet heard from, with empty pools for `workers` workers.
    pub fn new(route: &Route, connector: Connector, workers: usize) -> Self {
        Self {
            name: Arc::from(route.name.as_str()),
            stream_options: AtomicU8::new(STREAM_OPTIONS_UNKNOWN),
            pools: Pools::new(&route.upstream, connector, workers),
            warned: Arc::default(),
        }
    }

    /// Whether to add `stream_options.include_usage` to a streaming request that lacks it.
    fn injects(&self, mode: InjectStreamUsage) -> bool {
        match mode {
            InjectStreamUsage::Always => true,
            InjectStreamUsage::Never => false,
            InjectStreamUsage::Auto => {
                self.stream_options.load(Ordering::Relaxed) != STREAM_OPTIONS_REJECTED
            }
        }
    }

    /// True while a rejection of the injected option must still be watched for.
    fn is_unproven(&self, mode: InjectStreamUsage) -> bool {
        mode == InjectStreamUsage::Auto
            && self.stream_options.load(Ordering::Relaxed) == STREAM_OPTIONS_UNKNOWN
    }
}

/// One request on its way through: what the record and the log line need once it finishes.
pub struct Exchange {
    meter: Arc<Meter>,
    guard: Arc<Guard>,
    /// The named key it came with, if any.
    key: Option<KeyRef>,
    identity: Identity,
    upstream: Arc<str>,
    /// What the upstream's unusable usage shapes have been warned about.
    warned: Arc<Warned>,
    flavor: Option<Flavor>,
    method: Method,
    path: String,
    request_model: Option<String>,
    /// The request body of a metered route (shared, not copied), for an estimate if needed.
    request_body: Option<Bytes>,
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

/// Everything a record and its log line need, owned, so it can be finished on another thread.
struct Finished {
    meter: Arc<Meter>,
    guard: Arc<Guard>,
    key: Option<KeyRef>,
    identity: Identity,
    upstream: Arc<str>,
    flavor: Flavor,
    method: Method,
    path: String,
    model: String,
    extracted: Extracted,
    is_streaming: bool,
    status: StatusCode,
    /// From the request's arrival to its end (not to its record, which an estimate delays).
    duration: Duration,
    upstream_latency: Option<Duration>,
    error: Option<String>,
    is_error: bool,
    is_whole: bool,
    outcome: &'static str,
}

impl Finished {
    /// Counts the missing tokens with the tokenizer: the prompt from the request (unless the
    /// provider already reported it), the output from the text the client received.
    fn estimate(&mut self, request: Option<&[u8]>, raw: Option<&Raw>) {
        let counted = estimate::estimate(self.flavor, &self.model, request, raw);
        let usage = match self.extracted.usage {
            // A cut Anthropic stream: the input counts are the provider's, the output is not final.
            Some(reported) => Usage {
                output_tokens: reported.output_tokens.max(counted.output_tokens),
                ..reported
            },
            None => counted,
        };
        self.extracted.usage = Some(usage);
    }

    /// Records the request and writes its one log line (after the response when recorded while
    /// hyper serves it: see `deferred`).
    fn record(self, is_estimated: bool) {
        let key_id = self.identity.id.as_str();
        let model = self.model.as_str();
        if self.extracted.usage.is_none() && !self.is_error && self.is_whole {
            tracing::warn!(
                key_id,
                model,
                flavor = self.flavor.as_str(),
                "response carried no usage: request counted with 0 tokens"
            );
        }
        let priced = self.meter.record(&Record {
            identity: &self.identity,
            model,
            usage: self.extracted.usage,
            is_error: self.is_error,
            flavor: self.flavor,
            status: self.status.as_u16(),
            is_streaming: self.is_streaming,
            upstream_latency: self.upstream_latency,
            response_id: self.extracted.response_id.as_deref(),
            is_partial: !self.is_whole,
            is_estimated,
            upstream: &self.upstream,
        });
        let usage = self.extracted.usage.unwrap_or_default();
        self.guard.on_record(
            self.key,
            &self.identity.label,
            priced.cost,
            usage.prompt_tokens(),
            usage.total_tokens(),
        );
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let Self {
            method,
            path,
            identity,
            upstream,
            model,
            is_streaming,
            status,
            upstream_latency,
            duration,
            outcome,
            error,
            ..
        } = self;
        // The closure owns what the line needs, so the line can wait for the response.
        crate::deferred::after_response(move || {
            tracing::info!(
                method = %method,
                path,
                status = status.as_u16(),
                key_id = identity.id,
                upstream = &*upstream,
                model,
                stream = is_streaming,
                tokens_in = usage.prompt_tokens(),
                tokens_out = usage.output_tokens,
                estimated = is_estimated,
                cost_usd = priced.cost.as_usd(),
                priced = priced.is_priced,
                upstream_ms = millis(upstream_latency.unwrap_or_default()),
                duration_ms = millis(duration),
                outcome,
                error,
                "request"
            );
        });
    }
}

impl Exchange {
    /// Records the request (metered routes) and writes its one log line. A 2xx response that
    /// reported no usage (or a stream cut before its final count) is estimated first, on a
    /// blocking thread, so neither this response nor any other waits for the tokenizer.
    pub fn complete(&mut self, mut extracted: Extracted, raw: Option<Raw>, outcome: Outcome) {
        if std::mem::replace(&mut self.is_done, true) {
            return;
        }
        for warning in &extracted.warnings {
            if self.warned.lock().insert((warning.field, warning.problem)) {
                tracing::warn!(
                    key_id = self.identity.id,
                    upstream = &*self.upstream,
                    field = warning.field,
                    problem = warning.problem,
                    "ignored a usage field (warned once per upstream and shape)"
                );
            }
        }
        // The provider did not know the key: not worth an entry of its own (bounded memory).
        if matches!(self.status.as_u16(), 401 | 403) && self.key.is_none() {
            self.identity = Identity::unauthenticated();
        }
        let key_id = self.identity.id.as_str();
        let is_error = outcome == Outcome::UpstreamFailed
            || !(self.status.is_success() || self.status.as_u16() == CLIENT_CLOSED);
        let is_whole = outcome == Outcome::Complete;
        let outcome = match outcome {
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::ClientGone => "client_gone",
        };
        let Some(flavor) = self.flavor else {
            let duration_ms = millis(self.started.elapsed());
            let upstream_ms = millis(self.upstream_latency.unwrap_or_default());
            tracing::info!(method = %self.method, path = self.path, status = self.status.as_u16(), key_id, upstream = &*self.upstream, upstream_ms, duration_ms, outcome, error = self.error, "request");
            return;
        };
        let model = capped_model(
            extracted
                .model
                .take()
                .or_else(|| self.request_model.take())
                .unwrap_or_else(|| UNKNOWN_MODEL.to_owned()),
        );
        let needs_estimate = self.status.is_success()
            && (extracted.usage.is_none() || extracted.is_output_provisional);
        let mut finished = Finished {
            meter: Arc::clone(&self.meter),
            guard: Arc::clone(&self.guard),
            key: self.key,
            identity: std::mem::replace(&mut self.identity, Identity::anonymous()),
            upstream: Arc::clone(&self.upstream),
            flavor,
            method: self.method.clone(),
            path: std::mem::take(&mut self.path),
            model,
            extracted,
            is_streaming: self.is_streaming,
            status: self.status,
            duration: self.started.elapsed(),
            upstream_latency: self.upstream_latency,
            error: self.error.take(),
            is_error,
            is_whole,
            outcome,
        };
        if !needs_estimate {
            finished.record(false);
            return;
        }
        let request = self.request_body.take();
        let job = move || {
            finished.estimate(request.as_deref(), raw.as_ref());
            finished.record(true);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let guard = self.meter.begin_estimate();
                runtime.spawn_blocking(move || {
                    job();
                    drop(guard);
                });
            }
            Err(_) => job(),
        }
    }
}

/// A request whose handler is dropped before any response (the client left while the upstream
/// was still answering) is still recorded: the provider may bill it.
impl Drop for Exchange {
    fn drop(&mut self) {
        self.complete(Extracted::default(), None, Outcome::ClientGone);
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

/// The handler of one upstream's prefix: forwards any method, meters the routes that report usage.
pub async fn forward(state: AppState, upstream: usize, request: Request) -> Response {
    let (Some(route), Some(runtime)) = (
        state.config.routes.get(upstream),
        state.upstreams.get(upstream),
    ) else {
        return ProxyError::Internal.into_response();
    };
    let (mut parts, body) = request.into_parts();
    let rest = parts
        .uri
        .path()
        .strip_prefix(route.prefix.as_str())
        .unwrap_or_default();
    let metered = route::classify(route.flavor, &parts.method, rest);
    let flavor = metered.map(|m| m.flavor);
    let request_model = metered.and_then(|m| m.path_model).map(str::to_owned);
    let is_stream_path = metered.is_some_and(|m| m.is_stream_path);
    let guard = &state.guard;
    let (identity, key, source) = identify(guard, &parts);
    let admitted = if flavor.is_some() {
        guard.admit(key)
    } else {
        guard.authenticate(key)
    };
    if let Err(refusal) = admitted {
        tracing::info!(method = %parts.method, path = key::redact_path(&parts.uri), status = refusal.status().as_u16(), key_id = identity.id, upstream = route.name, refused = %refusal, "request");
        return refusal.into_response();
    }
    // A virtual key: the real key goes upstream, the client's never does.
    if let (Some(named), Some(source)) = (key, source)
        && let Some(real) = guard.upstream_key(named)
    {
        key::replace(&mut parts, source, real.expose());
    }
    let mut exchange = Exchange {
        meter: Arc::clone(&state.meter),
        guard: Arc::clone(guard),
        key,
        identity,
        upstream: Arc::clone(&runtime.name),
        warned: Arc::clone(&runtime.warned),
        flavor,
        method: parts.method.clone(),
        path: key::redact_path(&parts.uri),
        request_model,
        request_body: None,
        is_streaming: is_stream_path,
        status: StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
        started: Instant::now(),
        upstream_latency: None,
        error: None,
        is_done: false,
    };
    match send(&state, route, runtime, parts, body, &mut exchange).await {
        Ok(Answer::Tapped(parts, incoming, extraction)) => {
            exchange.status = parts.status;
            let tap = Tap::new(incoming, extraction, exchange, &state.config, &state.tasks);
            Response::from_parts(parts, Body::new(tap))
        }
        Ok(Answer::Whole(response)) => {
            exchange.status = response.status();
            exchange.complete(Extracted::default(), None, Outcome::Complete);
            response
        }
        Err(err) => {
            exchange.status = err.status();
            exchange.error = Some(err.to_string());
            exchange.complete(Extracted::default(), None, Outcome::Complete);
            err.into_response()
        }
    }
}

/// Who is calling: the caller's identity, its named key if it has one, and where its key was.
fn identify(
    guard: &Guard,
    parts: &http::request::Parts,
) -> (Identity, Option<KeyRef>, Option<key::KeySource>) {
    match key::find(&parts.headers, parts.uri.query()) {
        None => (Identity::anonymous(), None, None),
        // Only with named keys is the full hash worth comparing; it then also gives the id.
        Some((raw, source)) if guard.has_keys() => {
            let digest = key::digest(raw);
            match guard.find(&digest) {
                Some(named) => (
                    Identity::named(&digest, guard.name(named)),
                    Some(named),
                    Some(source),
                ),
                None => (Identity::from_digest(&digest, raw), None, Some(source)),
            }
        }
        Some((raw, source)) => (Identity::from_key(raw), None, Some(source)),
    }
}

/// What the upstream answered.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per request; boxing would allocate on every request"
)]
enum Answer {
    /// A response whose body is handed on through a tap.
    Tapped(http::response::Parts, Incoming, Extraction),
    /// A response already read whole (an error we had to look at), handed on as it was.
    Whole(Response),
}

/// A request as first sent, to send again without the injected `stream_options`.
struct Retry {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Largest error body read to see whether the upstream rejected `stream_options`.
const REJECTION_CAP: usize = 64 * 1024;

/// Sends the request upstream and prepares the response's tap.
async fn send(
    state: &AppState,
    route: &Route,
    runtime: &UpstreamState,
    mut parts: http::request::Parts,
    body: Body,
    exchange: &mut Exchange,
) -> Result<Answer, ProxyError> {
    let config = &state.config;
    let limit = config.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let rest = parts
        .uri
        .path()
        .strip_prefix(route.prefix.as_str())
        .unwrap_or_default();
    let uri = upstream::target_uri(&route.upstream, rest, parts.uri.query())?;
    upstream::strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::HOST, route.upstream.host.clone());
    // We send the whole body at once; the upstream must not wait for a 100 Continue.
    parts.headers.remove(header::EXPECT);

    let mut strip_usage_chunk = false;
    let mut retry = None;
    let body = match exchange.flavor {
        Some(flavor) => {
            // Usage must be readable: ask for an uncompressed response on metered routes.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            let bytes = read_body(body, limit, config.header_timeout).await?;
            exchange.request_body = Some(bytes.clone());
            let asks_usage =
                flavor.needs_stream_usage_asked() && runtime.injects(route.inject_stream_usage);
            match ChatRequest::inspect(&bytes, asks_usage) {
                Some(chat) => {
                    if chat.model.is_some() {
                        exchange.request_model.clone_from(&chat.model);
                    }
                    exchange.is_streaming |= chat.is_streaming;
                    strip_usage_chunk = chat.needs_usage_injected();
                    if strip_usage_chunk && runtime.is_unproven(route.inject_stream_usage) {
                        retry = Some(Retry {
                            method: parts.method.clone(),
                            uri: uri.clone(),
                            headers: parts.headers.clone(),
                            body: bytes.clone(),
                        });
                    }
                    let spliced = Spliced::new(chat.rewrite(bytes));
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(spliced.len()));
                    Body::new(spliced)
                }
                None => Body::from(bytes),
            }
        }
        None => Body::new(Limited::new(body, limit)),
    };

    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let mut response = exchange_once(
        state,
        route,
        runtime,
        Request::from_parts(parts, body),
        exchange,
    )
    .await?;
    if let Some(retry) = retry {
        if response.status() == StatusCode::BAD_REQUEST {
            let (mut parts, incoming) = response.into_parts();
            let rejection = read_rejection(incoming, config.idle_timeout).await;
            if memchr::memmem::find(&rejection, b"stream_options").is_none() {
                upstream::strip_hop_by_hop(&mut parts.headers);
                // The body is handed on whole now: its length is what was read.
                parts.headers.remove(header::CONTENT_LENGTH);
                return Ok(Answer::Whole(Response::from_parts(
                    parts,
                    Body::from(rejection),
                )));
            }
            runtime
                .stream_options
                .store(STREAM_OPTIONS_REJECTED, Ordering::Relaxed);
            tracing::warn!(
                upstream = route.name,
                "upstream rejects stream_options: sending streams without it from now on and estimating their usage"
            );
            strip_usage_chunk = false;
            let mut again = Request::new(Body::from(retry.body));
            *again.method_mut() = retry.method;
            *again.uri_mut() = retry.uri;
            *again.headers_mut() = retry.headers;
            response = exchange_once(state, route, runtime, again, exchange).await?;
        } else if response.status().is_success() {
            runtime
                .stream_options
                .store(STREAM_OPTIONS_ACCEPTED, Ordering::Relaxed);
        }
    }

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
                kept: Vec::new(),
                kept_len: 0,
            }
        }
        Some(flavor) => Extraction::Body {
            flavor,
            chunks: Vec::new(),
            len: 0,
        },
    };
    Ok(Answer::Tapped(parts, incoming, extraction))
}

/// One round trip to the upstream, bounded by the response timeout.
async fn exchange_once(
    state: &AppState,
    route: &Route,
    runtime: &UpstreamState,
    request: Request,
    exchange: &mut Exchange,
) -> Result<http::Response<Incoming>, ProxyError> {
    let config = &state.config;
    let sent = Instant::now();
    let response = tokio::time::timeout(config.response_timeout, runtime.pools.send(request))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout {
            upstream: route.upstream.to_string(),
            after: format!(
                "{} (response_timeout)",
                humantime::format_duration(config.response_timeout)
            ),
        })?
        .map_err(|e| upstream::classify_error(&e, config, &route.upstream))?;
    exchange.upstream_latency = Some(sent.elapsed());
    Ok(response)
}

/// Reads an error body to look into it (bounded in size and time); what could not be read is left out.
async fn read_rejection(body: Incoming, timeout: Duration) -> Bytes {
    let read = Limited::new(body, REJECTION_CAP).collect();
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    }
}

/// Reads a body that must be inspected whole, refusing it past the limit, or when the client
/// goes silent for longer than `stall` in the middle of it.
async fn read_body(body: Body, limit: usize, stall: Duration) -> Result<Bytes, ProxyError> {
    let mut body = Limited::new(body, limit);
    let mut chunks = Vec::new();
    let mut len = 0;
    loop {
        let frame = tokio::time::timeout(stall, body.frame())
            .await
            .map_err(|_| ProxyError::BodyStalled(humantime::format_duration(stall).to_string()))?;
        match frame {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    chunks.push(data);
                }
            }
            Some(Err(err)) if err.is::<LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            Some(Err(err)) => return Err(ProxyError::ClientBody(err.to_string())),
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut whole = Vec::with_capacity(len);
            chunks.iter().for_each(|c| whole.extend_from_slice(c));
            Bytes::from(whole)
        }
    })
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
