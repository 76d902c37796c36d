//! Forwarding: each upstream's prefix to its base URL, with the request rewritten and the
//! response tapped only where metering needs it.

pub mod ask;
pub mod cost;
pub mod exchange;
pub mod pool;
pub mod rewrite;
pub mod route;
pub mod tap;
pub mod upstream;
pub mod websocket;

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

use crate::attribution;
use crate::client::Dialer;
use crate::config::{Config, InjectStreamUsage, Route};
use crate::error::ProxyError;
use crate::guard::{Guard, KeyRef};
use crate::key::{self, Identity};
use crate::meter::Meter;
use crate::metrics::{Metrics, Sample};
use crate::tasks::Tasks;
use crate::usage::{Extracted, Flavor, StreamUsage, sse};
use exchange::{CLIENT_CLOSED, Exchange, Origin};
use pool::Pools;
use rewrite::{ChatRequest, Spliced};
use tap::{Extraction, Outcome, Tap};

/// What llm-meter has learned of one upstream while running.
#[derive(Debug)]
pub struct UpstreamState {
    /// Its name and the usage shapes warned about, shared by every record of its requests.
    pub origin: Arc<Origin>,
    /// Whether it takes `stream_options` (`STREAM_OPTIONS_*`), learned in `auto` mode.
    stream_options: AtomicU8,
    /// Its connections, a pool per worker.
    pools: Pools,
}

const STREAM_OPTIONS_UNKNOWN: u8 = 0;
const STREAM_OPTIONS_ACCEPTED: u8 = 1;
const STREAM_OPTIONS_REJECTED: u8 = 2;

impl UpstreamState {
    /// The state of an upstream not yet heard from, with empty pools for `workers` workers.
    pub fn new(route: &Route, dialer: Dialer, workers: usize) -> Self {
        Self {
            origin: Arc::new(Origin::new(&route.name)),
            stream_options: AtomicU8::new(STREAM_OPTIONS_UNKNOWN),
            pools: Pools::new(dialer, workers),
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

/// What forwarding reads of the service's state, borrowed for one request.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The validated configuration.
    pub config: &'a Config,
    /// What is learned of each upstream, in the order of `config.routes`.
    pub upstreams: &'a [UpstreamState],
    /// Where requests are recorded.
    pub meter: &'a Arc<Meter>,
    /// Where requests are counted for `/metrics`.
    pub metrics: &'a Arc<Metrics>,
    /// Who is admitted.
    pub guard: &'a Arc<Guard>,
    /// The owner of drains.
    pub tasks: &'a Tasks,
    /// The OpenTelemetry exporter's queue, when export is on.
    pub spans: Option<&'a Arc<crate::otlp::Spans>>,
}

/// The handler of one upstream's prefix: forwards any method, meters the routes that report usage.
pub async fn forward(state: Context<'_>, upstream: usize, request: Request) -> Response {
    let (Some(route), Some(runtime)) = (
        state.config.routes.get(upstream),
        state.upstreams.get(upstream),
    ) else {
        return ProxyError::Internal.into_response();
    };
    let (mut parts, body) = request.into_parts();
    // Ours, not the provider's: removed before anything else, whatever happens next.
    let attribution = attribution::take(&mut parts.headers);
    let rest = upstream::rest_of(route, &parts.uri);
    let is_websocket = websocket::is_upgrade(&parts);
    let metered = route::classify(route.flavor, &parts.method, rest);
    let flavor = if is_websocket {
        route::classify_upgrade(route.flavor, rest)
    } else {
        metered.map(|m| m.flavor)
    };
    let request_model = metered.and_then(|m| m.path_model).map(str::to_owned);
    let is_stream_path = metered.is_some_and(|m| m.is_stream_path);
    let guard = state.guard;
    let (identity, key, source) = identify(guard, &parts);
    let attribution = match admit(guard, key, flavor.is_some(), attribution) {
        Ok(attribution) => attribution,
        Err(refused) => {
            tracing::info!(method = %parts.method, path = key::redact_path(&parts.uri), status = refused.status.as_u16(), key_id = identity.id, upstream = route.name, refused = refused.reason, "request");
            let shown = crate::metrics::key_label(&identity, key.is_some());
            let model = request_model
                .as_deref()
                .unwrap_or(crate::meter::UNKNOWN_MODEL);
            state
                .metrics
                .record(&Sample::refused(&route.name, model, shown, flavor));
            return refused.response;
        }
    };
    put_upstream_key(guard, key, source, &mut parts);
    let mut exchange = Exchange {
        meter: Arc::clone(state.meter),
        metrics: Arc::clone(state.metrics),
        guard: Arc::clone(guard),
        key,
        identity,
        attribution,
        upstream: Arc::clone(&runtime.origin),
        flavor,
        method: parts.method.clone(),
        path: key::redact_path(&parts.uri),
        request_model,
        request_body: None,
        is_streaming: is_stream_path,
        status: StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
        started: Instant::now(),
        upstream_latency: None,
        until_sent: None,
        error: None,
        is_done: false,
        tracer: state
            .spans
            .map(|spans| crate::otlp::Tracer::new(spans, &parts.headers)),
    };
    if is_websocket {
        return websocket::forward(&state, route, runtime, parts, exchange).await;
    }
    match send(&state, route, runtime, parts, body, &mut exchange).await {
        Ok(Answer::Tapped(parts, incoming, extraction)) => {
            exchange.status = parts.status;
            if let Extraction::Body { flavor, .. } = extraction
                && state.config.cost_header
                && parts.status.is_success()
            {
                let idle = state.config.idle_timeout;
                return cost::answer(parts, incoming, flavor, exchange, route, idle).await;
            }
            let tap = Tap::new(incoming, extraction, exchange, state.config, state.tasks);
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

/// A request turned away before it is forwarded: its answer, and what its log line says.
struct Refused {
    response: Response,
    status: StatusCode,
    reason: String,
}

impl Refused {
    /// Boxed: the refusal is the rare path, and a response is large to move around.
    fn new(answer: impl IntoResponse + std::fmt::Display) -> Box<Self> {
        let reason = answer.to_string();
        let response = answer.into_response();
        Box::new(Self {
            status: response.status(),
            response,
            reason,
        })
    }
}

/// Refuses a bad attribution header, adds a named key's default tags, and admits the caller
/// (budgets and rate limits on metered routes, the key alone on the others).
fn admit(
    guard: &Guard,
    key: Option<KeyRef>,
    is_metered: bool,
    attribution: Result<attribution::Attribution, ProxyError>,
) -> Result<attribution::Attribution, Box<Refused>> {
    let mut attribution = attribution.map_err(Refused::new)?;
    if let Some(named) = key {
        attribution.add_defaults(guard.tags(named));
    }
    let admitted = if is_metered {
        guard.admit(key)
    } else {
        guard.authenticate(key)
    };
    admitted.map_err(Refused::new)?;
    Ok(attribution)
}

/// A virtual key: the real key goes upstream, the client's never does.
fn put_upstream_key(
    guard: &Guard,
    key: Option<KeyRef>,
    source: Option<key::KeySource>,
    parts: &mut http::request::Parts,
) {
    if let (Some(named), Some(source)) = (key, source)
        && let Some(real) = guard.upstream_key(named)
    {
        key::replace(parts, source, real.expose());
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
    state: &Context<'_>,
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
    let uri = upstream::target_for(route, &parts.uri)?;
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
                    exchange.attribution.or_user(chat.user.as_deref());
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
        match learn_stream_options(state, route, runtime, response, retry, exchange).await? {
            Learned::Kept(kept) => response = kept,
            Learned::Resent(resent) => {
                strip_usage_chunk = false;
                response = resent;
            }
            Learned::Refused(whole) => return Ok(Answer::Whole(whole)),
        }
    }

    let (mut parts, incoming) = response.into_parts();
    upstream::strip_hop_by_hop(&mut parts.headers);
    let extraction = extraction_for(exchange.flavor, &mut parts.headers, strip_usage_chunk);
    Ok(Answer::Tapped(parts, incoming, extraction))
}

/// How a response's usage is read: from SSE events, a whole body, or not at all.
fn extraction_for(
    flavor: Option<Flavor>,
    headers: &mut http::HeaderMap,
    strip_usage_chunk: bool,
) -> Extraction {
    match flavor {
        None => Extraction::None,
        Some(flavor) if is_event_stream(headers) => {
            if strip_usage_chunk {
                // One chunk will be removed, so the upstream's length no longer holds.
                headers.remove(header::CONTENT_LENGTH);
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
    }
}

/// What the first answer to a request with an injected `stream_options` taught.
enum Learned {
    /// The upstream took it (or failed otherwise): the answer stands.
    Kept(http::Response<Incoming>),
    /// The upstream rejects `stream_options`: the request went again without it.
    Resent(http::Response<Incoming>),
    /// A 400 about something else, read whole to tell: handed on as it was.
    Refused(Response),
}

/// Learns from the first answer whether the upstream takes `stream_options` (`auto` mode), and
/// sends the request again without it when it does not.
async fn learn_stream_options(
    state: &Context<'_>,
    route: &Route,
    runtime: &UpstreamState,
    response: http::Response<Incoming>,
    retry: Retry,
    exchange: &mut Exchange,
) -> Result<Learned, ProxyError> {
    if response.status().is_success() {
        runtime
            .stream_options
            .store(STREAM_OPTIONS_ACCEPTED, Ordering::Relaxed);
    }
    if response.status() != StatusCode::BAD_REQUEST {
        return Ok(Learned::Kept(response));
    }
    let (mut parts, incoming) = response.into_parts();
    let rejection = read_rejection(incoming, state.config.idle_timeout).await;
    if memchr::memmem::find(&rejection, b"stream_options").is_none() {
        upstream::strip_hop_by_hop(&mut parts.headers);
        // The body is handed on whole now: its length is what was read.
        parts.headers.remove(header::CONTENT_LENGTH);
        return Ok(Learned::Refused(Response::from_parts(
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
    let mut again = Request::new(Body::from(retry.body));
    *again.method_mut() = retry.method;
    *again.uri_mut() = retry.uri;
    *again.headers_mut() = retry.headers;
    let resent = exchange_once(state, route, runtime, again, exchange).await?;
    Ok(Learned::Resent(resent))
}

/// One round trip to the upstream, bounded by the response timeout.
async fn exchange_once(
    state: &Context<'_>,
    route: &Route,
    runtime: &UpstreamState,
    request: Request,
    exchange: &mut Exchange,
) -> Result<http::Response<Incoming>, ProxyError> {
    let sent = Instant::now();
    exchange
        .until_sent
        .get_or_insert_with(|| sent.duration_since(exchange.started));
    let response = send_within(state.config, route, runtime, request).await?;
    exchange.upstream_latency = Some(sent.elapsed());
    Ok(response)
}

/// Sends one request through the upstream's pool, waiting for its head no longer than the
/// response timeout.
async fn send_within(
    config: &Config,
    route: &Route,
    runtime: &UpstreamState,
    request: Request,
) -> Result<http::Response<Incoming>, ProxyError> {
    tokio::time::timeout(config.response_timeout, runtime.pools.send(request))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout {
            upstream: route.upstream.to_string(),
            after: format!(
                "{} (response_timeout)",
                humantime::format_duration(config.response_timeout)
            ),
        })?
        .map_err(|e| upstream::classify_error(&e, config, &route.upstream))
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
/// goes silent for longer than `stall` in the middle of it. One timer watches the whole body,
/// re-armed only when it fires after progress, so a body's frames cost no timer work.
pub async fn read_body(body: Body, limit: usize, stall: Duration) -> Result<Bytes, ProxyError> {
    let frames = std::sync::atomic::AtomicU64::new(0);
    let read = async {
        let mut body = Limited::new(body, limit);
        let mut chunks = Vec::new();
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            frames.fetch_add(1, Ordering::Relaxed);
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        len += data.len();
                        chunks.push(data);
                    }
                }
                Err(err) if err.is::<LengthLimitError>() => {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                Err(err) => return Err(ProxyError::ClientBody(err.to_string())),
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
    };
    let stalled = async {
        loop {
            let seen = frames.load(Ordering::Relaxed);
            tokio::time::sleep(stall).await;
            if frames.load(Ordering::Relaxed) == seen {
                return;
            }
        }
    };
    tokio::select! {
        biased;
        read = read => read,
        () = stalled => Err(ProxyError::BodyStalled(
            humantime::format_duration(stall).to_string(),
        )),
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
