//! OpenTelemetry export: an OTLP/HTTP receiver started by the test decodes what llm-meter
//! pushes: one span per metered request with the GenAI attributes, its exact tokens and cost;
//! a client's `traceparent` makes it a child; the metrics equal `/stats`; `otlp_headers` reach
//! the collector; and a collector that is down leaves requests unaffected, with one warning.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Binary, Mock, Proxy, binary_command, key_id, openai_like};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use serde_json::{Value, json};

const KEY: &str = "sk-otlp-test-key-0123456789abcdef";

/// What the receiver got: each export's path, headers and body.
#[derive(Default)]
struct Got {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    headers: Vec<http::HeaderMap>,
}

/// An OTLP/HTTP receiver on loopback.
struct Collector {
    addr: SocketAddr,
    got: Arc<Mutex<Got>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Got::default()));
        let shared = Arc::clone(&got);
        #[expect(clippy::disallowed_methods, reason = "lives as long as the test")]
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let got = Arc::clone(&shared);
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let got = Arc::clone(&got);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let mut got = got.lock();
                        got.headers.push(parts.headers.clone());
                        assert_eq!(parts.headers["content-type"], "application/x-protobuf");
                        match parts.uri.path() {
                            "/v1/traces" => got
                                .traces
                                .push(ExportTraceServiceRequest::decode(body).unwrap()),
                            "/v1/metrics" => got
                                .metrics
                                .push(ExportMetricsServiceRequest::decode(body).unwrap()),
                            other => panic!("unexpected path {other}"),
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                #[expect(clippy::disallowed_methods, reason = "one connection of the test's")]
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock();
        got.traces
            .iter()
            .flat_map(|t| &t.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// Waits until `n` spans have arrived.
    async fn wait_for_spans(&self, n: usize) -> Vec<Span> {
        for _ in 0..200 {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{n} spans never arrived; got {}", self.spans().len());
    }

    /// The last metrics export, once one counts `requests` requests.
    async fn metrics_counting(&self, requests: i64) -> Vec<Metric> {
        for _ in 0..200 {
            let last = self.got.lock().metrics.last().cloned();
            if let Some(last) = last {
                let metrics: Vec<Metric> = last
                    .resource_metrics
                    .iter()
                    .flat_map(|r| &r.scope_metrics)
                    .flat_map(|s| s.metrics.clone())
                    .collect();
                if int_sum(&metrics, "llm_meter.requests", &[]) == requests {
                    return metrics;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no metrics export counted {requests} requests");
    }
}

fn value(attributes: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|AnyValue { value }| value)
}

fn text(attributes: &[KeyValue], key: &str) -> String {
    match value(attributes, key) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("{key} is {other:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> i64 {
    match value(attributes, key) {
        Some(any_value::Value::IntValue(n)) => n,
        other => panic!("{key} is {other:?}"),
    }
}

fn double(attributes: &[KeyValue], key: &str) -> f64 {
    match value(attributes, key) {
        Some(any_value::Value::DoubleValue(n)) => n,
        other => panic!("{key} is {other:?}"),
    }
}

fn flag(attributes: &[KeyValue], key: &str) -> bool {
    match value(attributes, key) {
        Some(any_value::Value::BoolValue(b)) => b,
        other => panic!("{key} is {other:?}"),
    }
}

fn has(attributes: &[KeyValue], wanted: &[(&str, &str)]) -> bool {
    wanted
        .iter()
        .all(|(k, v)| value(attributes, k) == Some(any_value::Value::StringValue((*v).into())))
}

/// The sum of an integer counter's points whose attributes include `wanted`.
fn int_sum(metrics: &[Metric], name: &str, wanted: &[(&str, &str)]) -> i64 {
    let Some(metric::Data::Sum(sum)) = metrics
        .iter()
        .find(|m| m.name == name)
        .and_then(|m| m.data.clone())
    else {
        return -1;
    };
    sum.data_points
        .iter()
        .filter(|p| has(&p.attributes, wanted))
        .map(|p| match p.value {
            Some(number_data_point::Value::AsInt(n)) => n,
            _ => 0,
        })
        .sum()
}

fn double_sum(metrics: &[Metric], name: &str) -> f64 {
    let Some(metric::Data::Sum(sum)) = metrics
        .iter()
        .find(|m| m.name == name)
        .and_then(|m| m.data.clone())
    else {
        return -1.0;
    };
    sum.data_points
        .iter()
        .map(|p| match p.value {
            Some(number_data_point::Value::AsDouble(n)) => n,
            _ => 0.0,
        })
        .sum()
}

fn toml(collector: &str, extra: &str) -> String {
    format!("otlp_endpoint = \"{collector}\"\notlp_metrics_interval = \"200ms\"\n{extra}")
}

#[tokio::test]
async fn each_metered_request_becomes_a_genai_span_with_exact_tokens_and_cost() {
    let mock = Mock::start(openai_like).await;
    let collector = Collector::start().await;
    let proxy = Proxy::start_with(&mock.url(), &toml(&collector.url(), "")).await;
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-llm-meter-user", "alice")
        .header("x-llm-meter-session", "run-7")
        .header("x-llm-meter-tags", "team=search")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let spans = collector.wait_for_spans(1).await;
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "chat gpt-4o");
    assert_eq!(span.kind, 3, "client");
    assert_eq!(span.trace_id.len(), 16);
    assert!(span.parent_span_id.is_empty());
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
    let a = &span.attributes;
    assert_eq!(text(a, "gen_ai.operation.name"), "chat");
    assert_eq!(text(a, "gen_ai.provider.name"), "openai");
    assert_eq!(text(a, "llm_meter.upstream"), "openai");
    assert_eq!(text(a, "gen_ai.request.model"), "gpt-4o");
    assert_eq!(text(a, "gen_ai.response.model"), "gpt-4o");
    assert!(!text(a, "gen_ai.response.id").is_empty());
    let stats = proxy.stats().await;
    let id = key_id(KEY);
    let entry = Proxy::model_of(&stats, &id, "gpt-4o");
    assert_eq!(int(a, "gen_ai.usage.input_tokens"), 11);
    assert_eq!(int(a, "gen_ai.usage.output_tokens"), 3);
    assert_eq!(
        json!(int(a, "gen_ai.usage.input_tokens")),
        entry["prompt_tokens"]
    );
    assert_eq!(
        json!(int(a, "gen_ai.usage.output_tokens")),
        entry["completion_tokens"]
    );
    let cost = double(a, "llm_meter.cost_usd");
    assert!(cost > 0.0);
    assert!(
        (cost * 1e9 - entry["cost_nano_usd"].as_f64().unwrap()).abs() < 0.5,
        "{cost} vs {entry}"
    );
    assert_eq!(text(a, "llm_meter.key"), id);
    assert_eq!(text(a, "llm_meter.user"), "alice");
    assert_eq!(text(a, "llm_meter.session"), "run-7");
    assert_eq!(text(a, "llm_meter.tags.team"), "search");
    assert!(!flag(a, "llm_meter.estimated"));
    assert!(!flag(a, "llm_meter.partial"));
    assert_eq!(text(a, "llm_meter.service_tier"), "standard");
    assert_eq!(int(a, "llm_meter.usage.cache_write_1h_tokens"), 0);
    assert!(value(a, "error.type").is_none());
    assert!(!format!("{span:?}").contains(KEY));
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_traceparent_makes_our_span_its_child_and_passes_through_unchanged() {
    let mock = Mock::start(openai_like).await;
    let collector = Collector::start().await;
    let proxy = Proxy::start_with(&mock.url(), &toml(&collector.url(), "")).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("traceparent", parent)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap();
    assert_eq!(mock.last().headers["traceparent"], parent);
    // A failed request: status error, with its error type.
    let failed = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 400);
    failed.bytes().await.unwrap();
    let spans = collector.wait_for_spans(2).await;
    let child = spans.iter().find(|s| !s.parent_span_id.is_empty()).unwrap();
    assert_eq!(hex(&child.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&child.parent_span_id), "00f067aa0ba902b7");
    assert_ne!(hex(&child.span_id), "00f067aa0ba902b7");
    let error = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    assert_eq!(error.status.as_ref().unwrap().code, 2, "error");
    assert_eq!(text(&error.attributes, "error.type"), "400");
    assert!(
        mock.received()
            .iter()
            .all(|r| r.headers.get("traceparent").is_none_or(|v| v == parent))
    );
    assert!(
        mock.received()[1].headers.get("traceparent").is_none(),
        "nothing new upstream"
    );
    proxy.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn metrics_arrive_with_the_totals_of_stats_and_the_configured_headers() {
    let mock = Mock::start(openai_like).await;
    let collector = Collector::start().await;
    let extra = "otlp_headers = { authorization = \"Basic bGY6c2VjcmV0\", x-scope-orgid = \"t1\" }";
    let proxy = Proxy::start_with(&mock.url(), &toml(&collector.url(), extra)).await;
    for (model, stream) in [("gpt-4o", false), ("gpt-4o", true), ("gpt-4o-mini", false)] {
        let response = proxy
            .client
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        response.bytes().await.unwrap();
    }
    let metrics = collector.metrics_counting(3).await;
    let stats = proxy.stats().await;
    let totals = &stats["totals"];
    assert_eq!(
        json!(int_sum(
            &metrics,
            "llm_meter.requests",
            &[("outcome", "ok")]
        )),
        totals["requests"]
    );
    let prompt: i64 = ["input", "cached_input", "cache_write"]
        .iter()
        .map(|kind| int_sum(&metrics, "llm_meter.tokens", &[("type", kind)]))
        .sum();
    assert_eq!(json!(prompt), totals["prompt_tokens"]);
    assert_eq!(
        json!(int_sum(&metrics, "llm_meter.tokens", &[("type", "output")])),
        totals["completion_tokens"]
    );
    let cost = double_sum(&metrics, "llm_meter.cost_usd");
    assert!(
        (cost * 1e9 - totals["cost_nano_usd"].as_f64().unwrap()).abs() < 0.5,
        "{cost} vs {totals}"
    );
    for name in [
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
    ] {
        let metric = metrics.iter().find(|m| m.name == name).unwrap();
        let Some(metric::Data::Histogram(h)) = &metric.data else {
            panic!("{name} is no histogram");
        };
        let count: u64 = h.data_points.iter().map(|p| p.count).sum();
        assert_eq!(count, if name.contains("token") { 6 } else { 3 }, "{name}");
    }
    {
        let got = collector.got.lock();
        assert!(
            got.headers
                .iter()
                .all(|h| h["authorization"] == "Basic bGY6c2VjcmV0" && h["x-scope-orgid"] == "t1")
        );
        let service = got.metrics[0].resource_metrics[0].resource.clone().unwrap();
        assert_eq!(text(&service.attributes, "service.name"), "llm-meter");
    }
    proxy.stop().await;
}

// Several threads: the binary's final export at shutdown needs the collector while the test
// waits for the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_and_a_collector_that_is_down_costs_one_warning() {
    let mock = Mock::start(openai_like).await;
    let collector = Collector::start().await;
    // A port that nothing listens on.
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down_addr = down.local_addr().unwrap();
    drop(down);
    let mut binaries = Vec::new();
    for endpoint in [collector.url(), format!("http://{down_addr}")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("proxy.toml"), toml(&endpoint, "")).unwrap();
        let mut command = binary_command(dir.path());
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
            "--no-persist",
        ]);
        binaries.push((Binary::start(command), dir));
    }
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    for (binary, _) in &binaries {
        for _ in 0..3 {
            let answer: Value =
                serde_json::from_slice(&binary.chat_through(KEY, &body).await).unwrap();
            assert_eq!(answer["usage"]["completion_tokens"], 3);
        }
    }
    let spans = collector.wait_for_spans(3).await;
    assert!(spans.iter().all(|s| s.name == "chat gpt-4o"));
    collector.metrics_counting(3).await;
    // Several failed exports (spans each second, metrics every 200 ms) meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut binaries = binaries.into_iter();
    let (up, _dir) = binaries.next().unwrap();
    let (ok, _, stderr) = up.terminate();
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("OTLP export failed"), "{stderr}");
    let (down, _dir) = binaries.next().unwrap();
    let stats = down.get_json("/stats").await;
    assert_eq!(stats["totals"]["requests"], 3);
    let (ok, _, stderr) = down.terminate();
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("OTLP export failed").count(), 1, "{stderr}");
}
