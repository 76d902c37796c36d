//! The OTLP messages: a batch of spans (`ExportTraceServiceRequest`) and the recorded series as
//! cumulative sums and histograms (`ExportMetricsServiceRequest`), the same numbers `/metrics`
//! shows under OpenTelemetry's names.

use std::collections::BTreeMap;
use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram as OtlpHistogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span, status};

use super::{Span, trace};
use crate::metrics::series::{
    DURATION_BOUNDS, Histogram, OVERHEAD_BOUNDS, TOKEN_BOUNDS, TOKEN_TYPES, Totals,
};
use crate::metrics::{Operation, Recorded};
use crate::usage::Flavor;

/// The instrumentation scope of everything exported.
const SCOPE: &str = "llm-meter";
/// The outcomes of `llm_meter.requests`, in the order of `Totals::requests`.
const OUTCOMES: [&str; 3] = ["ok", "error", "refused"];

/// `gen_ai.provider.name` of a flavor (the semantic conventions' well-known values).
pub fn provider(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::OpenAiChat
        | Flavor::OpenAiCompletions
        | Flavor::OpenAiEmbeddings
        | Flavor::OpenAiResponses
        | Flavor::OpenAiRealtime => "openai",
        Flavor::AnthropicMessages => "anthropic",
        Flavor::Gemini => "gcp.gemini",
    }
}

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: u64) -> KeyValue {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn double(key: &str, value: f64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::DoubleValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn boolean(key: &str, value: bool) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::BoolValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn resource(attributes: &[(String, String)]) -> Resource {
    Resource {
        attributes: attributes
            .iter()
            .map(|(k, v)| string(k, v.as_str()))
            .collect(),
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..InstrumentationScope::default()
    }
}

/// Nanoseconds since the Unix epoch.
fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[expect(
    clippy::cast_precision_loss,
    reason = "dollars are shown as floats; nano-dollar totals stay exact in /stats"
)]
fn usd(nano: u64) -> f64 {
    nano as f64 / 1e9
}

/// One batch of spans.
pub fn traces(
    resource_attributes: &[(String, String)],
    spans: &[Span],
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource(resource_attributes)),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans: spans.iter().map(span_of).collect(),
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

/// The span of one request: `{operation} {model}`, kind client, the GenAI attributes and ours.
pub fn span_of(span: &Span) -> opentelemetry_proto::tonic::trace::v1::Span {
    let operation = span.operation().map_or("chat", Operation::as_str);
    let request_model = span
        .request_model
        .as_deref()
        .or(span.response_model.as_deref());
    let name = match request_model {
        Some(model) => format!("{operation} {model}"),
        None => operation.to_owned(),
    };
    let (trace_id, parent_span_id, flags, trace_state) = match &span.parent {
        Some(parent) => (
            parent.trace_id,
            parent.span_id.to_vec(),
            parent.flags,
            parent.state.clone().unwrap_or_default(),
        ),
        None => (trace::trace_id(), Vec::new(), 1, String::new()),
    };
    let start = unix_nanos(span.start);
    let end = start.saturating_add(u64::try_from(span.duration.as_nanos()).unwrap_or(u64::MAX));
    let status = match &span.error_type {
        Some(kind) => Status {
            code: status::StatusCode::Error as i32,
            message: kind.clone(),
        },
        None => Status::default(),
    };
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: trace_id.to_vec(),
        span_id: trace::span_id().to_vec(),
        trace_state,
        parent_span_id,
        flags: u32::from(flags),
        name,
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes: attributes(span, operation, request_model),
        status: Some(status),
        ..Default::default()
    }
}

fn attributes(span: &Span, operation: &str, request_model: Option<&str>) -> Vec<KeyValue> {
    let mut out = vec![
        string("gen_ai.operation.name", operation),
        string("gen_ai.provider.name", super::encode::provider(span.flavor)),
        string("llm_meter.upstream", span.upstream.as_str()),
    ];
    if let Some(model) = request_model {
        out.push(string("gen_ai.request.model", model));
    }
    if let Some(model) = &span.response_model {
        out.push(string("gen_ai.response.model", model.as_str()));
    }
    if let Some(id) = &span.response_id {
        out.push(string("gen_ai.response.id", id.as_str()));
    }
    if let Some(usage) = span.usage {
        out.push(int("gen_ai.usage.input_tokens", usage.prompt_tokens()));
        out.push(int("gen_ai.usage.output_tokens", usage.output_tokens));
        out.push(int(
            "gen_ai.usage.cache_read.input_tokens",
            usage.cached_input_tokens,
        ));
        out.push(int(
            "gen_ai.usage.cache_creation.input_tokens",
            usage.cache_write_tokens,
        ));
        out.push(int(
            "llm_meter.usage.reasoning_tokens",
            usage.reasoning_tokens,
        ));
        out.push(int(
            "llm_meter.usage.cache_write_1h_tokens",
            usage.cache_write_1h_tokens,
        ));
    }
    out.push(string("llm_meter.service_tier", span.service_tier.as_str()));
    out.push(double("llm_meter.cost_usd", usd(span.cost.0)));
    out.push(boolean("llm_meter.priced", span.is_priced));
    out.push(string("llm_meter.key", span.key.as_str()));
    if let Some(user) = &span.attribution.user {
        out.push(string("llm_meter.user", user.as_str()));
    }
    if let Some(session) = &span.attribution.session {
        out.push(string("llm_meter.session", session.as_str()));
    }
    for (name, value) in &span.attribution.tags {
        out.push(string(&format!("llm_meter.tags.{name}"), value.as_str()));
    }
    out.push(boolean("llm_meter.estimated", span.is_estimated));
    out.push(boolean("llm_meter.partial", span.is_partial));
    out.push(boolean("llm_meter.stream", span.is_streaming));
    out.push(int("http.response.status_code", u64::from(span.status)));
    if let Some(kind) = &span.error_type {
        out.push(string("error.type", kind.as_str()));
    }
    out
}

/// The recorded series at `now`, cumulative since `start`, and the spans dropped so far.
pub fn metrics(
    resource_attributes: &[(String, String)],
    recorded: &Recorded,
    dropped_spans: u64,
    (start, now): (SystemTime, SystemTime),
) -> ExportMetricsServiceRequest {
    let times = (unix_nanos(start), unix_nanos(now));
    let mut out = counters(recorded, times);
    out.extend(histograms(recorded, times));
    out.push(sum(
        "llm_meter.otlp.dropped_spans",
        "Spans dropped because the export queue was full.",
        "{span}",
        vec![point(Vec::new(), times, as_int(dropped_spans))],
    ));
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource(resource_attributes)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics: out,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

fn point(
    attributes: Vec<KeyValue>,
    (start, now): (u64, u64),
    value: number_data_point::Value,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(value),
        ..NumberDataPoint::default()
    }
}

fn sum(name: &str, description: &str, unit: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Metric::default()
    }
}

fn as_int(n: u64) -> number_data_point::Value {
    number_data_point::Value::AsInt(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The counters per (upstream, model, key), the operation summed away, as `/metrics` has them.
fn counters(recorded: &Recorded, times: (u64, u64)) -> Vec<Metric> {
    let mut by_series: BTreeMap<(&str, &str, &str), Totals> = BTreeMap::new();
    for (labels, totals) in &recorded.series {
        by_series
            .entry((&*labels.upstream, &*labels.model, &*labels.key))
            .or_default()
            .merge(totals);
    }
    let labels = |(upstream, model, key): (&str, &str, &str)| {
        vec![
            string("upstream", upstream),
            string("model", model),
            string("key", key),
        ]
    };
    let (mut requests, mut tokens, mut cost, mut estimated, mut unpriced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&series, totals) in &by_series {
        for (outcome, n) in OUTCOMES.iter().zip(totals.requests) {
            let mut set = labels(series);
            set.push(string("outcome", *outcome));
            requests.push(point(set, times, as_int(n)));
        }
        for (kind, n) in TOKEN_TYPES.iter().zip(totals.tokens) {
            let mut set = labels(series);
            set.push(string("type", *kind));
            tokens.push(point(set, times, as_int(n)));
        }
        let usd = number_data_point::Value::AsDouble(usd(totals.cost_nano_usd));
        cost.push(point(labels(series), times, usd));
        estimated.push(point(labels(series), times, as_int(totals.estimated)));
        unpriced.push(point(labels(series), times, as_int(totals.unpriced)));
    }
    vec![
        sum(
            "llm_meter.requests",
            "Requests, by outcome: ok, error or refused.",
            "{request}",
            requests,
        ),
        sum(
            "llm_meter.tokens",
            "Tokens, by type: input, cached_input, cache_write, output, reasoning (a part of output), cache_write_1h (a part of cache_write).",
            "{token}",
            tokens,
        ),
        sum("llm_meter.cost_usd", "Cost in USD.", "USD", cost),
        sum(
            "llm_meter.estimated_requests",
            "Requests whose tokens were counted by a tokenizer: the provider reported none.",
            "{request}",
            estimated,
        ),
        sum(
            "llm_meter.unpriced_requests",
            "Requests whose model has no price.",
            "{request}",
            unpriced,
        ),
    ]
}

fn histogram_point(
    attributes: Vec<KeyValue>,
    (start, now): (u64, u64),
    histogram: &Histogram,
    bounds: &[f64; 14],
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: histogram.count(),
        sum: Some(histogram.sum),
        bucket_counts: histogram.counts.to_vec(),
        explicit_bounds: bounds.to_vec(),
        ..HistogramDataPoint::default()
    }
}

fn histogram(name: &str, description: &str, unit: &str, points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Histogram(OtlpHistogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Metric::default()
    }
}

/// The added latency, and the two GenAI histograms by model and provider (the upstream's name,
/// as in `/metrics`), the key summed away.
fn histograms(recorded: &Recorded, times: (u64, u64)) -> Vec<Metric> {
    let added = histogram_point(Vec::new(), times, &recorded.overhead, &OVERHEAD_BOUNDS);
    let mut tokens: BTreeMap<_, [Histogram; 2]> = BTreeMap::new();
    let mut durations: BTreeMap<_, Histogram> = BTreeMap::new();
    for (l, t) in &recorded.series {
        let entry = tokens
            .entry((l.operation, &*l.model, &*l.upstream))
            .or_default();
        entry[0].merge(&t.input);
        entry[1].merge(&t.output);
        let failed = t.failed.iter().map(|(code, h)| (Some(*code), h));
        for (error_type, h) in std::iter::once((None, &t.duration)).chain(failed) {
            let key = (l.operation, &*l.model, &*l.upstream, error_type);
            durations.entry(key).or_default().merge(h);
        }
    }
    let genai = |operation: Option<Operation>, model: &str, provider: &str| {
        let mut set = Vec::with_capacity(5);
        if let Some(operation) = operation {
            set.push(string("gen_ai.operation.name", operation.as_str()));
        }
        set.push(string("gen_ai.request.model", model));
        set.push(string("gen_ai.provider.name", provider));
        set
    };
    let mut token_points = Vec::new();
    for ((operation, model, provider), [input, output]) in &tokens {
        for (kind, h) in [("input", input), ("output", output)] {
            let mut set = genai(*operation, model, provider);
            set.push(string("gen_ai.token.type", kind));
            token_points.push(histogram_point(set, times, h, &TOKEN_BOUNDS));
        }
    }
    let mut duration_points = Vec::new();
    for ((operation, model, provider, error_type), h) in &durations {
        if h.count() == 0 {
            continue;
        }
        let mut set = genai(*operation, model, provider);
        match error_type {
            Some(0) => set.push(string("error.type", "_OTHER")),
            Some(code) => set.push(string("error.type", code.to_string())),
            None => {}
        }
        duration_points.push(histogram_point(set, times, h, &DURATION_BOUNDS));
    }
    vec![
        histogram(
            "llm_meter.added_latency",
            "Time llm-meter adds before a request can start upstream.",
            "s",
            vec![added],
        ),
        histogram(
            "gen_ai.client.token.usage",
            "Tokens used per request, by token type.",
            "{token}",
            token_points,
        ),
        histogram(
            "gen_ai.client.operation.duration",
            "Duration of GenAI operations.",
            "s",
            duration_points,
        ),
    ]
}
