//! One request's exchange: what its record and its log line need, gathered while it is
//! forwarded, and the record itself (estimated first, off the response's path, when the
//! provider reported no usage), made once when the response ends or is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};

use super::tap::Outcome;
use crate::attribution::Attribution;
use crate::guard::{Guard, KeyRef, unpriced};
use crate::key::Identity;
use crate::meter::{Meter, Priced, Record, UNKNOWN_MODEL};
use crate::metrics::{Metrics, Operation, Outcome as MetricsOutcome, Sample, key_label};
use crate::otlp::{Span, Tracer};
use crate::usage::estimate::{self, Raw};
use crate::usage::{Extracted, Flavor, Usage};

/// An upstream as the records of its requests know it: its name, and the (field, problem)
/// pairs of unusable usage it has sent that were warned about (a bounded set: both are static
/// strings of the extractors). One shared reference per request carries both.
#[derive(Debug)]
pub struct Origin {
    /// The upstream's name, as records and logs give it.
    pub name: Box<str>,
    warned: parking_lot::Mutex<std::collections::HashSet<(&'static str, &'static str)>>,
}

impl Origin {
    /// The origin of the requests to the upstream named `name`, nothing warned yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            warned: parking_lot::Mutex::default(),
        }
    }
}

/// Longest model name kept in records and logs: a client may name any model it likes.
pub const MAX_MODEL_LEN: usize = 256;

/// `model`, cut to `MAX_MODEL_LEN` bytes at a character boundary.
fn capped_model(mut model: String) -> String {
    model.truncate(crate::usage::floor_char_boundary(&model, MAX_MODEL_LEN));
    model
}

/// One request on its way through: what the record and the log line need once it finishes.
pub struct Exchange {
    pub(super) meter: Arc<Meter>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) guard: Arc<Guard>,
    /// The named key it came with, if any.
    pub(super) key: Option<KeyRef>,
    pub(super) identity: Identity,
    /// The user, session and tags the request named (and its key's default tags).
    pub(super) attribution: Attribution,
    pub(super) upstream: Arc<Origin>,
    pub(super) flavor: Option<Flavor>,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) request_model: Option<String>,
    /// The request body of a metered route (shared, not copied), for an estimate if needed.
    pub(super) request_body: Option<Bytes>,
    pub(super) is_streaming: bool,
    pub(super) status: StatusCode,
    pub(super) started: Instant,
    /// Until the upstream's response headers; `None` when there was no response.
    pub(super) upstream_latency: Option<Duration>,
    /// From its arrival to its first sending upstream: the time llm-meter added before it.
    pub(super) until_sent: Option<Duration>,
    pub(super) error: Option<String>,
    pub(super) is_done: bool,
    /// Where its span goes, when OpenTelemetry export is on.
    pub(super) tracer: Option<Tracer>,
}

/// Status logged for a request whose client left before any response (nginx's convention).
pub(super) const CLIENT_CLOSED: u16 = 499;

/// The target of request log lines: the same as the refusals' in `proxy`, so one filter
/// (`RUST_LOG=llm_meter::proxy=info`) shows every request however it ended.
const LOG_TARGET: &str = "llm_meter::proxy";

/// Everything a record and its log line need, owned, so it can be finished on another thread.
struct Finished {
    meter: Arc<Meter>,
    metrics: Arc<Metrics>,
    guard: Arc<Guard>,
    key: Option<KeyRef>,
    identity: Identity,
    attribution: Attribution,
    upstream: Arc<Origin>,
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
    until_sent: Option<Duration>,
    error: Option<String>,
    is_error: bool,
    is_whole: bool,
    outcome: &'static str,
    /// What its span needs besides the record, when OpenTelemetry export is on.
    traced: Option<Traced>,
}

/// A request's span in the making: what the record does not keep.
struct Traced {
    tracer: Tracer,
    start: SystemTime,
    request_model: Option<String>,
    response_model: Option<String>,
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

    /// Counts the request in the metrics.
    fn count(&self, priced: &Priced, is_estimated: bool) {
        self.metrics.record(&Sample {
            upstream: &self.upstream.name,
            model: &self.model,
            key: key_label(&self.identity, self.key.is_some()),
            operation: Operation::of(self.flavor),
            outcome: if self.is_error {
                MetricsOutcome::Error
            } else {
                MetricsOutcome::Ok
            },
            status: self.status.as_u16(),
            usage: self.extracted.usage,
            cost: priced.cost,
            is_unpriced: !priced.is_priced,
            is_estimated,
            duration: Some(self.duration),
            overhead: self.until_sent,
        });
    }

    /// Hands the request's span to the exporter (one queue push), when export is on.
    fn trace(&mut self, priced: &Priced, is_estimated: bool) {
        let Some(traced) = self.traced.take() else {
            return;
        };
        let code = self.status.as_u16();
        let error_type = self.is_error.then(|| {
            if code >= 400 && code != CLIENT_CLOSED {
                code.to_string()
            } else {
                self.outcome.to_owned()
            }
        });
        traced.tracer.spans.push(Span {
            parent: traced.tracer.parent,
            start: traced.start,
            duration: self.duration,
            flavor: self.flavor,
            upstream: self.upstream.name.to_string(),
            request_model: traced.request_model,
            response_model: traced.response_model,
            response_id: self.extracted.response_id.clone(),
            usage: self.extracted.usage,
            cost: priced.cost,
            is_priced: priced.is_priced,
            key: key_label(&self.identity, self.key.is_some()).to_owned(),
            attribution: self.attribution.clone(),
            is_estimated,
            is_partial: !self.is_whole,
            is_streaming: self.is_streaming,
            status: code,
            error_type,
            service_tier: self.extracted.service_tier,
        });
    }

    /// Alerts (through the guard, once per model and UTC day) that the request had no price:
    /// its model's, or, for a priced model, its audio tokens'.
    fn alert_unpriced(&self) {
        let has_audio = self.extracted.audio.total_tokens() > 0;
        let part = if has_audio && self.meter.has_price(&self.upstream.name, &self.model) {
            unpriced::Part::Audio
        } else {
            unpriced::Part::Model
        };
        self.guard
            .on_unpriced(&self.upstream.name, &self.model, part);
    }

    /// Records the request and writes its one log line (after the response when recorded while
    /// hyper serves it: see `deferred`). Returns what it cost.
    fn record(mut self, is_estimated: bool) -> Priced {
        let key_id = self.identity.id.as_str();
        let model = self.model.as_str();
        if self.extracted.usage.is_none() && !self.is_error && self.is_whole {
            tracing::warn!(
                target: LOG_TARGET,
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
            upstream: &self.upstream.name,
            audio: self.extracted.audio,
            service_tier: self.extracted.service_tier,
            attribution: &self.attribution,
        });
        self.count(&priced, is_estimated);
        self.trace(&priced, is_estimated);
        if !priced.is_priced {
            self.alert_unpriced();
        }
        let usage = self.extracted.usage.unwrap_or_default();
        self.guard.on_record(
            self.key,
            &self.identity.label,
            priced.cost,
            usage.prompt_tokens(),
            usage.total_tokens(),
        );
        if !tracing::enabled!(tracing::Level::INFO) {
            return priced;
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
        let price = priced.source.clone();
        // The closure owns what the line needs, so the line can wait for the response.
        crate::deferred::after_response(move || {
            tracing::info!(
                target: LOG_TARGET,
                method = %method,
                path,
                status = status.as_u16(),
                key_id = identity.id,
                upstream = &*upstream.name,
                model,
                stream = is_streaming,
                tokens_in = usage.prompt_tokens(),
                tokens_out = usage.output_tokens,
                estimated = is_estimated,
                cost_usd = priced.cost.as_usd(),
                priced = priced.is_priced,
                price = price.as_deref(),
                upstream_ms = millis(upstream_latency.unwrap_or_default()),
                duration_ms = millis(duration),
                outcome,
                error,
                "request"
            );
        });
        priced
    }
}

impl Exchange {
    /// Counts a request of this exchange's caller refused at admission, in the metrics.
    pub(super) fn count_refused(&self, flavor: Option<Flavor>, model: Option<&str>) {
        let key = key_label(&self.identity, self.key.is_some());
        let model = model.unwrap_or(UNKNOWN_MODEL);
        let refused = Sample::refused(&self.upstream.name, model, key, flavor);
        self.metrics.record(&refused);
    }

    /// What the span of this request needs, when OpenTelemetry export is on: its start on the
    /// wall clock, and the models the request and the response named.
    fn traced(&mut self, extracted: &Extracted) -> Option<Traced> {
        self.tracer.take().map(|tracer| Traced {
            tracer,
            start: SystemTime::now()
                .checked_sub(self.started.elapsed())
                .unwrap_or_else(SystemTime::now),
            request_model: self.request_model.clone().map(capped_model),
            response_model: extracted.model.clone().map(capped_model),
        })
    }

    /// Records the request (metered routes) and writes its one log line. A 2xx response that
    /// reported no usage (or a stream cut before its final count) is estimated first, on a
    /// blocking thread, so neither this response nor any other waits for the tokenizer.
    /// Returns what the request cost when it was recorded at once (metered, not estimated).
    pub fn complete(
        &mut self,
        mut extracted: Extracted,
        raw: Option<Raw>,
        outcome: Outcome,
    ) -> Option<Priced> {
        if std::mem::replace(&mut self.is_done, true) {
            return None;
        }
        for warning in &extracted.warnings {
            if self
                .upstream
                .warned
                .lock()
                .insert((warning.field, warning.problem))
            {
                tracing::warn!(
                    target: LOG_TARGET,
                    key_id = self.identity.id,
                    upstream = &*self.upstream.name,
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
            tracing::info!(target: LOG_TARGET, method = %self.method, path = self.path, status = self.status.as_u16(), key_id, upstream = &*self.upstream.name, upstream_ms, duration_ms, outcome, error = self.error, "request");
            return None;
        };
        let traced = self.traced(&extracted);
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
            metrics: Arc::clone(&self.metrics),
            guard: Arc::clone(&self.guard),
            key: self.key,
            identity: std::mem::replace(&mut self.identity, Identity::anonymous()),
            attribution: std::mem::take(&mut self.attribution),
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
            until_sent: self.until_sent,
            error: self.error.take(),
            is_error,
            is_whole,
            outcome,
            traced,
        };
        if !needs_estimate {
            return Some(finished.record(false));
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
        None
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
