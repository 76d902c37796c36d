//! `/metrics`: the Prometheus series equal `/stats` after plain, streaming, failed, refused,
//! estimated and unpriced requests; they follow the admin-token rule; label sets past
//! `metrics_max_series` fold into `other` with exact totals; keys never show; budgets, the
//! ledger and the histograms are there; `promtool check metrics` passes (when installed); and
//! the real binary serves them.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Binary, Mock, Proxy, Received, Reply, binary_command, chat_completion, openai_like};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::{Value, json};

const PLAIN: &str = "sk-plain-key-0123456789abcdef";
const AGENT: &str = "sk-agent-key-0123456789abcdef";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn sha256_hex(key: &str) -> String {
    llm_meter::key::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// OpenAI-like, except `broken` (a 500), `llama3.2` (no usage: estimated, and unpriced).
fn upstream(request: &Received) -> Reply {
    match request.json()["model"].as_str() {
        Some("broken") => Reply::json(500, &json!({"error": {"message": "boom"}})),
        Some("llama3.2") => {
            let mut body = chat_completion("llama3.2", "The quick brown fox.", 0, 0);
            body.as_object_mut().unwrap().remove("usage");
            Reply::json(200, &body)
        }
        _ => openai_like(request),
    }
}

/// A named key with a daily budget and two requests a minute; `extra` goes first.
fn agent_toml(extra: &str) -> String {
    format!(
        "{extra}\n[keys.agent-a]\nkey_sha256 = \"{}\"\ndaily_usd = 1.0\nrequests_per_minute = 2\n",
        sha256_hex(AGENT)
    )
}

async fn start(mock: &Mock, toml: &str, data_dir: Option<&std::path::Path>) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: data_dir.map(ToOwned::to_owned),
        no_persist: data_dir.is_none(),
        ..Flags::default()
    };
    Proxy::start_guarded(toml, flags, &[], Arc::new(ShiftedClock::default())).await
}

async fn chat(proxy: &Proxy, key: &str, model: &str, stream: bool) -> u16 {
    let body =
        json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    let response = proxy.chat(key, &body).await;
    let status = response.status().as_u16();
    response.bytes().await.unwrap();
    status
}

/// `/metrics` in the format `accept` asks for: (content type, text).
async fn scrape_as(proxy: &Proxy, accept: &str) -> (String, String) {
    let response = proxy
        .get("/metrics")
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The sum of the samples of `metric` whose labels include every (name, value) of `filter`.
fn sum(scrape: &Scrape, metric: &str, filter: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            Metric::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Metric::Summary(_) => panic!("no summaries here"),
        })
        .sum()
}

fn count(stats: &Value, field: &str) -> f64 {
    stats[field].as_f64().unwrap()
}

/// Every /stats counter of one (key, model) equals the series of the same labels.
fn assert_entry_equals(scrape: &Scrape, key: &str, model: &str, entry: &Value) {
    let labels = [("key", key), ("model", model)];
    let requests = |outcome| {
        sum(
            scrape,
            "llm_meter_requests_total",
            &[labels[0], labels[1], ("outcome", outcome)],
        )
    };
    let tokens = |kind| {
        sum(
            scrape,
            "llm_meter_tokens_total",
            &[labels[0], labels[1], ("type", kind)],
        )
    };
    let at = format!("{key}/{model}");
    assert_eq!(
        requests("ok") + requests("error"),
        count(entry, "requests"),
        "{at}"
    );
    assert_eq!(requests("error"), count(entry, "errors"), "{at}");
    assert_eq!(
        tokens("input") + tokens("cached_input") + tokens("cache_write"),
        count(entry, "prompt_tokens"),
        "{at}"
    );
    assert_eq!(tokens("output"), count(entry, "completion_tokens"), "{at}");
    assert_eq!(
        tokens("cached_input"),
        count(entry, "cached_tokens"),
        "{at}"
    );
    assert_eq!(
        tokens("reasoning"),
        count(entry, "reasoning_tokens"),
        "{at}"
    );
    assert_eq!(
        tokens("cache_write"),
        count(entry, "cache_write_tokens"),
        "{at}"
    );
    assert_eq!(
        tokens("cache_write_1h"),
        count(entry, "cache_write_1h_tokens"),
        "{at}"
    );
    let cost = sum(scrape, "llm_meter_cost_usd_total", &labels);
    assert!(
        (cost - count(entry, "cost_usd")).abs() < 1e-12,
        "{at}: {cost}"
    );
    for (metric, field) in [
        ("llm_meter_estimated_requests_total", "estimated_requests"),
        ("llm_meter_unpriced_requests_total", "unpriced_requests"),
    ] {
        assert_eq!(
            sum(scrape, metric, &labels),
            count(entry, field),
            "{at}: {metric}"
        );
    }
}

/// Polls until `/metrics` counts `n` metered requests (a record is counted just after the
/// meter has it) and the ledger has committed every row it has, then returns the scrape.
async fn scrape_after(proxy: &Proxy, n: u64) -> (String, Scrape) {
    for _ in 0..250 {
        let (_, text) = scrape_as(proxy, "text/plain").await;
        let scrape = parse(&text);
        let metered = sum(&scrape, "llm_meter_requests_total", &[("outcome", "ok")])
            + sum(&scrape, "llm_meter_requests_total", &[("outcome", "error")]);
        if metered >= n as f64 && sum(&scrape, "llm_meter_ledger_pending_rows", &[]) == 0.0 {
            return (text, scrape);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/metrics never counted {n} requests with the ledger settled");
}

#[tokio::test]
async fn metrics_equal_stats_after_a_mix_of_requests() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &agent_toml(""), Some(dir.path())).await;
    for (model, stream, status) in [
        ("gpt-4o", false, 200),
        ("gpt-4o", false, 200),
        ("gpt-4o", true, 200),
        ("gpt-4o-mini", true, 200),
        ("broken", false, 500),
        ("llama3.2", false, 200),
        ("my-local-llama", false, 200),
    ] {
        assert_eq!(chat(&proxy, PLAIN, model, stream).await, status, "{model}");
    }
    assert_eq!(chat(&proxy, AGENT, "gpt-4o", false).await, 200);
    assert_eq!(chat(&proxy, AGENT, "gpt-4o", true).await, 200);
    // Over its two requests a minute: refused at admission (before its body, and so its model,
    // is read), never metered in /stats.
    assert_eq!(chat(&proxy, AGENT, "gpt-4o", false).await, 429);

    let stats = proxy.stats_after(9).await;
    let (text, scrape) = scrape_after(&proxy, 9).await;
    let stats_now = proxy.stats().await;
    assert_eq!(stats_now["totals"], stats["totals"]);

    // Every (key, model) of /stats, and nothing else: the key shows as its name or its id.
    let mut seen = 0;
    for key in stats["keys"].as_array().unwrap() {
        let shown = if key["key"] == "agent-a" {
            "agent-a"
        } else {
            key["id"].as_str().unwrap()
        };
        for (model, entry) in key["models"].as_object().unwrap() {
            assert_entry_equals(&scrape, shown, model, entry);
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
    promtool_check(&text);
    for outcome in ["ok", "error"] {
        let by_outcome = sum(&scrape, "llm_meter_requests_total", &[("outcome", outcome)]);
        let expected = match outcome {
            "ok" => count(&stats["totals"], "requests") - count(&stats["totals"], "errors"),
            _ => count(&stats["totals"], "errors"),
        };
        assert_eq!(by_outcome, expected, "{outcome}");
    }
    let upstream_requests = sum(
        &scrape,
        "llm_meter_requests_total",
        &[("upstream", "openai")],
    ) - sum(
        &scrape,
        "llm_meter_requests_total",
        &[("upstream", "openai"), ("outcome", "refused")],
    );
    assert_eq!(
        upstream_requests,
        count(&stats["by_upstream"]["openai"], "requests")
    );
    assert_eq!(
        sum(
            &scrape,
            "llm_meter_requests_total",
            &[
                ("key", "agent-a"),
                ("model", "unknown"),
                ("outcome", "refused")
            ]
        ),
        1.0
    );
    assert_eq!(sum(&scrape, "llm_meter_estimated_requests_total", &[]), 1.0);
    assert_eq!(sum(&scrape, "llm_meter_unpriced_requests_total", &[]), 2.0);

    // Keys never show: neither the keys nor their redacted labels, only names and ids.
    let plain_label = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == common::key_id(PLAIN))
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for secret in [PLAIN, AGENT, &plain_label, &plain_label[..8]] {
        assert!(!text.contains(secret), "{secret} shows in /metrics");
    }

    // Budgets: the named key's daily one, as /stats shows it.
    let agent = stats_now["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "agent-a")
        .unwrap();
    let line = &agent["budget"][0];
    let budget = [("scope", "key"), ("key", "agent-a"), ("period", "daily")];
    assert_eq!(sum(&scrape, "llm_meter_budget_limit_usd", &budget), 1.0);
    let spent = sum(&scrape, "llm_meter_budget_spent_usd", &budget);
    assert!((spent - count(line, "spent_usd")).abs() < 1e-12, "{spent}");
    let remaining = sum(&scrape, "llm_meter_budget_remaining_usd", &budget);
    assert!(
        (remaining - count(line, "remaining_usd")).abs() < 1e-12,
        "{remaining}"
    );

    // The ledger: every row written, none lost.
    let ledger = &stats_now["ledger"];
    assert_eq!(
        sum(&scrape, "llm_meter_ledger_lost_rows_total", &[]),
        count(ledger, "lost_rows")
    );
    assert_eq!(
        sum(&scrape, "llm_meter_ledger_written_rows_total", &[]),
        9.0
    );
    assert_eq!(sum(&scrape, "llm_meter_ledger_failing", &[]), 0.0);

    // Histograms: one duration per metered request, token counts for the eight with usage
    // (the 500 had none), and the time added before each of the nine went upstream.
    let histogram = |name| sum(&scrape, name, &[]);
    assert_eq!(histogram("gen_ai_client_operation_duration_seconds"), 9.0);
    let chat = [
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "openai"),
    ];
    let durations = sum(&scrape, "gen_ai_client_operation_duration_seconds", &chat);
    assert_eq!(durations, 9.0);
    // The failed one carries the conventions' error.type: its status.
    let failed = [("gen_ai_request_model", "broken"), ("error_type", "500")];
    let failed = sum(&scrape, "gen_ai_client_operation_duration_seconds", &failed);
    assert_eq!(failed, 1.0);
    let typed = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "gen_ai_client_operation_duration_seconds")
        .filter(|s| s.labels.get("error_type").is_some())
        .count();
    assert_eq!(typed, 1, "only the failed request has an error_type");
    for kind in ["input", "output"] {
        let tokens = sum(
            &scrape,
            "gen_ai_client_token_usage",
            &[("gen_ai_token_type", kind)],
        );
        assert_eq!(tokens, 8.0, "{kind}");
    }
    let input_sum = sum(
        &scrape,
        "gen_ai_client_token_usage_sum",
        &[("gen_ai_token_type", "input")],
    );
    assert_eq!(input_sum, count(&stats["totals"], "prompt_tokens"));
    assert_eq!(histogram("llm_meter_added_latency_seconds"), 9.0);
    assert!(histogram("llm_meter_added_latency_seconds_sum") > 0.0);

    // A reset zeroes /stats, not the counters: they count since the process started.
    proxy.reset().await;
    let (_, again) = scrape_as(&proxy, "text/plain").await;
    assert_eq!(
        sum(&parse(&again), "llm_meter_requests_total", &[]),
        sum(&scrape, "llm_meter_requests_total", &[])
    );
    proxy.stop().await;
}

#[tokio::test]
async fn metrics_are_openmetrics_unless_plain_text_is_preferred() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "", None).await;
    assert_eq!(chat(&proxy, PLAIN, "gpt-4o", false).await, 200);
    proxy.stats_after(1).await;
    scrape_after(&proxy, 1).await;

    let (content_type, text) = scrape_as(&proxy, "*/*").await;
    assert_eq!(content_type, OPENMETRICS);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE llm_meter_requests counter\n"),
        "{text}"
    );
    assert!(text.contains("# UNIT llm_meter_cost_usd usd\n"), "{text}");
    assert!(
        text.contains("# HELP gen_ai_client_operation_duration_seconds "),
        "{text}"
    );
    let scrape = parse(&text);
    assert_eq!(
        sum(&scrape, "llm_meter_requests_total", &[("outcome", "ok")]),
        1.0
    );
    // No budget, no ledger: their families are left out.
    assert!(!text.contains("llm_meter_budget_"), "{text}");
    assert!(!text.contains("llm_meter_ledger_"), "{text}");

    let prometheus =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    assert_eq!(scrape_as(&proxy, prometheus).await.0, OPENMETRICS);
    let (content_type, text) = scrape_as(&proxy, "text/plain;version=0.0.4").await;
    assert_eq!(content_type, TEXT);
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE llm_meter_requests_total counter\n"),
        "{text}"
    );
    // The semantic conventions' bucket boundaries.
    let scrape = parse(&text);
    let bounds = |metric: &str| -> Vec<f64> {
        let sample = scrape.samples.iter().find(|s| s.metric == metric).unwrap();
        let Metric::Histogram(buckets) = &sample.value else {
            panic!("{metric} is no histogram")
        };
        buckets.iter().map(|b| b.less_than).collect()
    };
    let tokens: Vec<f64> = (0..14)
        .map(|i| 4f64.powi(i))
        .chain([f64::INFINITY])
        .collect();
    assert_eq!(bounds("gen_ai_client_token_usage"), tokens);
    let seconds: Vec<f64> = (0..14)
        .map(|i| 0.01 * 2f64.powi(i))
        .chain([f64::INFINITY])
        .collect();
    let durations = bounds("gen_ai_client_operation_duration_seconds");
    assert_eq!(durations.len(), seconds.len());
    for (got, want) in durations.iter().zip(&seconds) {
        assert!((got - want).abs() < 1e-9 || got == want, "{got} vs {want}");
    }
    promtool_check(&text);
    proxy.stop().await;
}

/// Runs `promtool check metrics` on `text` when promtool is installed.
fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("note: promtool is not installed; `promtool check metrics` skipped");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn metrics_need_the_admin_token_when_one_is_set() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "admin_token = \"t0ken-for-metrics\"\n", None).await;
    let url = proxy.url("/metrics");
    let without = proxy.client.get(&url).send().await.unwrap();
    assert_eq!(without.status(), 401);
    let wrong = proxy
        .client
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let with = proxy
        .client
        .get(&url)
        .bearer_auth("t0ken-for-metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200);
    proxy.stop().await;

    // Without a token, reads are open (as /stats is).
    let open = start(&mock, "", None).await;
    assert_eq!(
        open.client
            .get(open.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    open.stop().await;
}

#[tokio::test]
async fn label_sets_past_metrics_max_series_fold_into_other_with_exact_totals() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "metrics_max_series = 3\n", None).await;
    for i in 0..10 {
        assert_eq!(
            chat(&proxy, &format!("sk-random-key-{i:04}"), "gpt-4o", false).await,
            200
        );
    }
    // A model never seen before folds too, once the bound is reached.
    assert_eq!(
        chat(&proxy, "sk-random-key-0000", "gpt-4o-mini", false).await,
        200
    );
    let stats = proxy.stats_after(11).await;
    let (_, scrape) = scrape_after(&proxy, 11).await;
    let ok = [("outcome", "ok")];
    assert_eq!(sum(&scrape, "llm_meter_requests_total", &ok), 11.0);
    let other = [("key", "other"), ("model", "other"), ("outcome", "ok")];
    assert_eq!(sum(&scrape, "llm_meter_requests_total", &other), 8.0);
    let keys: std::collections::BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "llm_meter_requests_total")
        .filter_map(|s| s.labels.get("key"))
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let tokens = sum(&scrape, "llm_meter_tokens_total", &[("type", "input")]);
    assert_eq!(tokens, count(&stats["totals"], "prompt_tokens"));
    let cost = sum(&scrape, "llm_meter_cost_usd_total", &[]);
    assert!((cost - count(&stats["totals"], "cost_usd")).abs() < 1e-12);
    proxy.stop().await;
}

#[tokio::test]
async fn the_binary_serves_metrics() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &mock.url(),
        "--no-persist",
    ]);
    let binary = Binary::start(command);
    binary
        .chat_through(
            PLAIN,
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let mut text = String::new();
    for _ in 0..100 {
        let response = common::client()
            .get(binary.url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], OPENMETRICS);
        text = response.text().await.unwrap();
        if sum(
            &parse(&text),
            "llm_meter_requests_total",
            &[("outcome", "ok")],
        ) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scrape = parse(&text);
    let id = common::key_id(PLAIN);
    let labels = [
        ("key", id.as_str()),
        ("model", "gpt-4o"),
        ("upstream", "openai"),
    ];
    assert_eq!(
        sum(&scrape, "llm_meter_requests_total", &labels),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(&scrape, "llm_meter_tokens_total", &[("type", "output")]),
        3.0
    );
    assert_eq!(
        sum(&scrape, "gen_ai_client_operation_duration_seconds", &[]),
        1.0
    );
    let (ok, _, stderr) = binary.terminate();
    assert!(ok, "{stderr}");
}

#[test]
fn metrics_max_series_defaults_to_2000_and_takes_no_zero() {
    let flags = Flags {
        no_persist: true,
        ..Flags::default()
    };
    let load = |toml| llm_meter::Config::from_layers(Some(toml), None, &Default::default(), &flags);
    assert_eq!(load("").unwrap().metrics_max_series, 2_000);
    assert_eq!(
        load("metrics_max_series = 50").unwrap().metrics_max_series,
        50
    );
    let error = load("metrics_max_series = 0").unwrap_err().to_string();
    assert!(
        error.contains("metrics_max_series") && error.contains("at least 1"),
        "{error}"
    );
}
