//! OpenTelemetry export over OTLP/HTTP (protobuf): one span per metered request, named and
//! attributed as the GenAI semantic conventions say, and the `/metrics` series, pushed
//! periodically.
//!
//! The request path pays one `try_send` into a bounded queue (`Spans::push`), and nothing at
//! all when export is off. A background task owned by `tasks` batches the spans and posts them
//! with our own client (so the egress proxy settings apply); when the queue is full spans are
//! dropped and counted, and a failed export is dropped too, never retried into a growing
//! backlog. A collector that is down costs a warning at most once a minute.

pub mod encode;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use http::{Method, Request, Uri, header};
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::attribution::Attribution;
use crate::client::{self, Dialer};
use crate::config::otlp::Settings;
use crate::metrics::{Metrics, Operation};
use crate::money::NanoUsd;
use crate::tasks::Tasks;
use crate::usage::{Flavor, ServiceTier, Usage};
pub use trace::Parent;

/// Spans waiting for the exporter; past it new ones are dropped (and counted).
pub const QUEUE: usize = 2048;
/// Most spans in one export.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits in a batch that is not full.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Longest one export may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest time between two warnings about failed exports or dropped spans.
pub const WARN_EVERY: Duration = Duration::from_secs(60);
/// Log target of the export's warnings.
const LOG_TARGET: &str = "llm_meter::otlp";

/// One finished request, as its span tells it.
#[derive(Debug, Clone)]
pub struct Span {
    /// The client's `traceparent`, when it sent one: the span is then its child.
    pub parent: Option<Parent>,
    /// When the request arrived.
    pub start: SystemTime,
    /// From its arrival to the end of its response.
    pub duration: Duration,
    /// The route's flavor (`gen_ai.provider.name` follows from it).
    pub flavor: Flavor,
    /// The upstream's name (`llm_meter.upstream`).
    pub upstream: String,
    /// The model the request named, if any.
    pub request_model: Option<String>,
    /// The model the response named, if any.
    pub response_model: Option<String>,
    /// The provider's response id, if any.
    pub response_id: Option<String>,
    /// Its tokens, reported or estimated.
    pub usage: Option<Usage>,
    /// What it cost.
    pub cost: NanoUsd,
    /// Its model had a price.
    pub is_priced: bool,
    /// The named key's name, else the key's id: never more of the key.
    pub key: String,
    /// Its user, session and tags.
    pub attribution: Attribution,
    /// Its tokens were estimated.
    pub is_estimated: bool,
    /// Its response did not end (the client left, or the upstream cut it).
    pub is_partial: bool,
    /// It was streamed.
    pub is_streaming: bool,
    /// The status its client got.
    pub status: u16,
    /// Why it failed (`error.type`), when it did.
    pub error_type: Option<String>,
    /// The service tier its response reported.
    pub service_tier: ServiceTier,
}

impl Span {
    /// The GenAI operation of its route.
    pub fn operation(&self) -> Option<Operation> {
        Operation::of(self.flavor)
    }
}

/// The queue into the exporter: cheap to share, never waits.
#[derive(Debug)]
pub struct Spans {
    queue: mpsc::Sender<Span>,
    dropped: Arc<AtomicU64>,
}

impl Spans {
    /// Hands a span to the exporter, or drops (and counts) it when the queue is full.
    pub fn push(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far because the queue was full (or the exporter had stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Starts the exporter on `tasks` (posting through `dialer`) and returns its queue; `None`
/// outside a runtime, where nothing would run it.
pub fn start(
    settings: &Settings,
    dialer: Dialer,
    metrics: Arc<Metrics>,
    tasks: &Tasks,
) -> Option<Arc<Spans>> {
    let (queue, rx) = mpsc::channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let exporter = Exporter {
        traces: settings.url("traces")?,
        metrics_url: settings.url("metrics")?,
        settings: settings.clone(),
        dialer,
        metrics,
        started: SystemTime::now(),
        dropped: Arc::clone(&dropped),
        warned: None,
        failures: 0,
        dropped_warned: 0,
    };
    let owned = tasks.clone();
    let spawned = tasks.spawn(async move {
        tokio::select! {
            () = exporter.run(rx, &owned) => {}
            () = owned.stopping() => {
                tracing::warn!(target: LOG_TARGET, "grace period over: spans and metrics not yet exported are lost");
            }
        }
    });
    spawned.then(|| Arc::new(Spans { queue, dropped }))
}

/// The background exporter: batches spans, pushes metrics every interval.
struct Exporter {
    traces: Uri,
    metrics_url: Uri,
    settings: Settings,
    dialer: Dialer,
    metrics: Arc<Metrics>,
    /// The start of every cumulative series.
    started: SystemTime,
    dropped: Arc<AtomicU64>,
    /// When the last warning was logged.
    warned: Option<Instant>,
    /// Failed exports since the last warning.
    failures: u64,
    /// Dropped spans already told of.
    dropped_warned: u64,
}

impl Exporter {
    async fn run(mut self, mut rx: mpsc::Receiver<Span>, tasks: &Tasks) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let pushes_metrics = self.settings.metrics_interval.is_some();
        let interval = self
            .settings
            .metrics_interval
            .unwrap_or(Duration::from_secs(3600));
        let mut metrics = tokio::time::interval_at(Instant::now() + interval, interval);
        metrics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(BATCH_DELAY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tasks.closing() => break,
                received = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    if batch.len() >= MAX_BATCH {
                        self.export_spans(&mut batch).await;
                    }
                }
                _ = flush.tick() => self.export_spans(&mut batch).await,
                _ = metrics.tick(), if pushes_metrics => self.export_metrics().await,
            }
        }
        // Shutdown: what is queued, then the final totals.
        while let Ok(span) = rx.try_recv() {
            batch.push(span);
            if batch.len() >= MAX_BATCH {
                self.export_spans(&mut batch).await;
            }
        }
        self.export_spans(&mut batch).await;
        if pushes_metrics {
            self.export_metrics().await;
        }
    }

    async fn export_spans(&mut self, batch: &mut Vec<Span>) {
        self.warn_of_drops();
        if batch.is_empty() {
            return;
        }
        let request = encode::traces(&self.settings.resource, batch);
        batch.clear();
        let url = self.traces.clone();
        self.post(url, request.encode_to_vec(), "traces").await;
    }

    async fn export_metrics(&mut self) {
        let recorded = self.metrics.recorded();
        let request = encode::metrics(
            &self.settings.resource,
            &recorded,
            self.dropped.load(Ordering::Relaxed),
            (self.started, SystemTime::now()),
        );
        let url = self.metrics_url.clone();
        self.post(url, request.encode_to_vec(), "metrics").await;
    }

    /// Posts one export; a failure is dropped and warned of (at most once a minute).
    async fn post(&mut self, url: Uri, body: Vec<u8>, signal: &'static str) {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/x-protobuf");
        for (name, value) in &self.settings.headers {
            request = request.header(name, value);
        }
        let Ok(request) = request.body(Body::from(body)) else {
            return;
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, async {
            let response = client::send_once(&self.dialer, request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            // Read the (small) answer so the connection ends cleanly; its content is not needed.
            let _ = response.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", EXPORT_TIMEOUT.as_secs())));
        if let Err(error) = sent {
            self.failures += 1;
            if self.may_warn() {
                tracing::warn!(
                    target: LOG_TARGET,
                    collector = self.settings.endpoint.host().unwrap_or_default(),
                    signal,
                    error,
                    failed_exports = self.failures,
                    "OTLP export failed: dropped (warned at most once a minute)"
                );
                self.failures = 0;
            }
        }
    }

    /// Warns of spans dropped since the last warning (at most once a minute).
    fn warn_of_drops(&mut self) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_warned && self.may_warn() {
            tracing::warn!(
                target: LOG_TARGET,
                dropped_spans = dropped - self.dropped_warned,
                "OTLP span queue full: spans dropped (warned at most once a minute)"
            );
            self.dropped_warned = dropped;
        }
    }

    /// True (and the clock restarted) when no warning was logged in the last `WARN_EVERY`.
    fn may_warn(&mut self) -> bool {
        let now = Instant::now();
        if self.warned.is_some_and(|at| now < at + WARN_EVERY) {
            return false;
        }
        self.warned = Some(now);
        true
    }
}

/// What a request needs to become a span: the exporter's queue, and the client's trace.
#[derive(Debug, Clone)]
pub struct Tracer {
    /// Where the span goes.
    pub spans: Arc<Spans>,
    /// The client's span, from its `traceparent`.
    pub parent: Option<Parent>,
}

impl Tracer {
    /// The tracer of a request with these headers (read only: they are forwarded unchanged).
    pub fn new(spans: &Arc<Spans>, headers: &http::HeaderMap) -> Self {
        Self {
            spans: Arc::clone(spans),
            parent: Parent::from_headers(headers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> Span {
        Span {
            parent: None,
            start: SystemTime::now(),
            duration: Duration::from_millis(5),
            flavor: Flavor::OpenAiChat,
            upstream: "openai".into(),
            request_model: Some("gpt-4o".into()),
            response_model: None,
            response_id: None,
            usage: None,
            cost: NanoUsd(0),
            is_priced: true,
            key: "k".into(),
            attribution: Attribution::default(),
            is_estimated: false,
            is_partial: false,
            is_streaming: false,
            status: 200,
            error_type: None,
            service_tier: ServiceTier::Standard,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (queue, mut rx) = mpsc::channel(2);
        let spans = Spans {
            queue,
            dropped: Arc::default(),
        };
        for _ in 0..5 {
            spans.push(span());
        }
        assert_eq!(spans.dropped(), 3);
        assert!(rx.try_recv().is_ok());
        spans.push(span());
        assert_eq!(spans.dropped(), 3);
        drop(rx);
        spans.push(span());
        assert_eq!(spans.dropped(), 4, "an exporter that stopped drops too");
    }

    #[test]
    fn a_span_without_usage_has_no_token_attributes_and_a_failure_has_its_error_type() {
        let failed = Span {
            status: 429,
            error_type: Some("429".into()),
            ..span()
        };
        let encoded = encode::span_of(&failed);
        assert_eq!(encoded.name, "chat gpt-4o");
        assert!(
            !encoded
                .attributes
                .iter()
                .any(|kv| kv.key.starts_with("gen_ai.usage"))
        );
        assert!(encoded.attributes.iter().any(|kv| kv.key == "error.type"));
        assert_eq!(encoded.status.map(|s| s.code), Some(2));
    }
}
