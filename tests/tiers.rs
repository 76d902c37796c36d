//! What providers bill apart: Anthropic's 1-hour cache writes are counted on their own (in
//! `/stats`, `/usage`, `/export` and `/metrics`, and again after a restart), and the service tier
//! a response names (OpenAI chat, plain and streamed; a Responses API stream) is exported with
//! its row.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::collections::HashMap;

use common::{Mock, Proxy, Received, Reply, chat_completion, chat_stream, json_lines, key_id};
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::{Value, json};

const KEY: &str = "sk-tiers-test-0123456789abcdef";
const CLAUDE: &str = "claude-sonnet-4-5";

/// Anthropic's usage of a message that wrote 100 tokens to the cache for 5 minutes and 200 for
/// an hour.
fn cache_writing_usage(output: u64) -> Value {
    json!({"input_tokens": 12, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": output, "service_tier": "standard"})
}

fn message() -> Value {
    json!({"id": "msg_p1", "type": "message", "role": "assistant", "model": CLAUDE,
        "content": [{"type": "text", "text": "Hi!"}], "stop_reason": "end_turn",
        "stop_sequence": null, "usage": cache_writing_usage(6)})
}

/// The same message streamed: the cache counts in `message_start`, the output in `message_delta`.
fn message_stream() -> Vec<String> {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_s1", "type": "message", "role": "assistant",
            "content": [], "model": CLAUDE, "stop_reason": null, "stop_sequence": null,
            "usage": cache_writing_usage(1)}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi!"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 6}}),
        json!({"type": "message_stop"}),
    ];
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

/// A Responses API stream whose `response.completed` says it was served at the flex tier.
fn flex_responses_stream() -> Vec<String> {
    [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_f","object":"response","status":"in_progress","model":"o4-mini","service_tier":"auto","output":[],"usage":null}}"#,
        r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hello"}"#,
        r#"{"type":"response.completed","sequence_number":2,"response":{"id":"resp_f","object":"response","status":"completed","model":"o4-mini-2025-04-16","service_tier":"flex","output":[],"usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":25}}}"#,
    ]
    .iter()
    .map(|data| {
        let event: Value = serde_json::from_str(data).unwrap();
        format!("event: {}\ndata: {data}\n\n", event["type"].as_str().unwrap())
    })
    .collect()
}

/// Answers like Anthropic (`/v1/messages`) and OpenAI: chat at the priority tier, plain and
/// streamed (every chunk names it, as OpenAI's do), and the Responses API at the flex tier.
fn upstream(request: &Received) -> Reply {
    let body = request.json();
    let is_stream = body["stream"] == json!(true);
    let model = body["model"].as_str().unwrap_or("gpt-4o").to_owned();
    match request.path.as_str() {
        "/v1/messages" if is_stream => Reply::sse(&message_stream()),
        "/v1/messages" => Reply::json(200, &message()),
        "/v1/responses" => Reply::sse(&flex_responses_stream()),
        "/v1/chat/completions" if is_stream => {
            let events = chat_stream(&model, &["Hi", "!"], Some((10, 2)));
            let tiered: Vec<String> = events
                .iter()
                .map(|e| {
                    e.replace(
                        r#""object":"chat.completion.chunk""#,
                        r#""object":"chat.completion.chunk","service_tier":"priority""#,
                    )
                })
                .collect();
            assert_ne!(tiered, events, "the chunks name their tier");
            Reply::sse(&tiered)
        }
        "/v1/chat/completions" => {
            let mut completion = chat_completion(&model, "Hi!", 10, 2);
            completion["service_tier"] = json!("priority");
            Reply::json(200, &completion)
        }
        other => Reply::json(404, &json!({"error": {"message": format!("no {other}")}})),
    }
}

async fn start(mock: &Mock, dir: &std::path::Path) -> Proxy {
    let toml = format!("[upstreams.anthropic]\nurl = \"{}\"\n", mock.url());
    Proxy::start_persistent(&mock.url(), dir, &toml).await
}

async fn post(proxy: &Proxy, path: &str, body: &Value) {
    let response = proxy
        .client
        .post(proxy.url(path))
        .bearer_auth(KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

/// One plain and one streamed message, each writing 300 tokens to the cache, 200 for an hour.
async fn send_messages(proxy: &Proxy) {
    for stream in [false, true] {
        let body = json!({"model": CLAUDE, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "Hello"}]});
        post(proxy, "/anthropic/v1/messages", &body).await;
    }
}

/// Each CSV row of an export as column name to cell (a quoted cell may hold commas; none here
/// holds a quote).
fn csv_rows(csv: &str) -> Vec<HashMap<String, String>> {
    let cells = |line: &str| -> Vec<String> {
        let mut cells = vec![String::new()];
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => cells.push(String::new()),
                c => cells.last_mut().unwrap().push(c),
            }
        }
        cells
    };
    let mut lines = csv.lines();
    let header = cells(lines.next().unwrap());
    lines
        .map(|line| header.iter().cloned().zip(cells(line)).collect())
        .collect()
}

fn tokens_of_type(scrape: &Scrape, kind: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "llm_meter_tokens_total" && s.labels.get("type") == Some(kind))
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Untyped(v) => v,
            _ => panic!("tokens are a counter"),
        })
        .sum()
}

#[tokio::test]
async fn one_hour_cache_writes_are_counted_apart_in_stats_usage_and_metrics() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, dir.path()).await;
    send_messages(&proxy).await;

    let stats = proxy.stats_after(2).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), CLAUDE);
    assert_eq!(entry["cache_write_tokens"], 600);
    assert_eq!(entry["cache_write_1h_tokens"], 400);
    // The 1-hour writes are among the cache writes, counted once in the prompt.
    assert_eq!(entry["prompt_tokens"], 2 * (12 + 300));
    for counts in [
        &stats["totals"],
        &stats["keys"][0],
        &stats["by_upstream"]["anthropic"],
    ] {
        assert_eq!(counts["cache_write_tokens"], 600, "{counts}");
        assert_eq!(counts["cache_write_1h_tokens"], 400, "{counts}");
    }

    let usage = proxy.get_json("/usage?group_by=model&since=1h").await;
    assert_eq!(usage["rows"][0]["model"], CLAUDE);
    assert_eq!(usage["rows"][0]["cache_write_1h_tokens"], 400);
    assert_eq!(usage["totals"]["cache_write_1h_tokens"], 400);

    let text = proxy.get_text("/metrics").await;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(tokens_of_type(&scrape, "cache_write"), 600.0);
    assert_eq!(tokens_of_type(&scrape, "cache_write_1h"), 400.0);
    proxy.stop().await;
}

#[tokio::test]
async fn one_hour_cache_writes_are_exported_per_row() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, dir.path()).await;
    send_messages(&proxy).await;
    proxy.stats_after(2).await;

    let rows = csv_rows(&proxy.get_text("/export?format=csv").await);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["cache_write_tokens"], "300");
        assert_eq!(row["cache_write_1h_tokens"], "200");
        assert_eq!(row["service_tier"], "standard");
        assert!(
            row["price"].starts_with("built-in 20")
                && row["price"].ends_with(": claude-sonnet-4-5"),
            "{}",
            row["price"]
        );
    }
    let lines = json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["cache_write_tokens"], 300);
        assert_eq!(line["cache_write_1h_tokens"], 200);
        assert_eq!(line["service_tier"], "standard");
        assert_eq!(line["price"], rows[0]["price"].as_str());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn one_hour_cache_writes_are_restored_after_a_restart() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, dir.path()).await;
    send_messages(&proxy).await;
    let before = common::totals_of(proxy.stats_after(2).await);
    proxy.stop().await;

    let proxy = start(&mock, dir.path()).await;
    let after = common::totals_of(proxy.stats().await);
    assert_eq!(after, before);
    assert_eq!(after["totals"]["cache_write_1h_tokens"], 400);
    assert_eq!(
        after["by_upstream"]["anthropic"]["cache_write_1h_tokens"],
        400
    );
    // And the restored count goes on counting.
    send_messages(&proxy).await;
    let stats = proxy.stats_after(4).await;
    assert_eq!(stats["totals"]["cache_write_1h_tokens"], 800);
    proxy.stop().await;
}

#[tokio::test]
async fn the_service_tier_a_response_names_is_exported_with_its_row() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, dir.path()).await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "o4-mini", "stream": true, "service_tier": "flex", "input": "hi"}),
        ),
    ] {
        post(&proxy, path, &body).await;
    }
    proxy.stats_after(3).await;

    let lines = json_lines(&proxy.get_text("/export?format=jsonl").await);
    let tiers: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["model"].as_str().unwrap(),
                l["service_tier"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        [
            ("gpt-4o", "priority"),
            ("gpt-4o-mini", "priority"),
            ("o4-mini-2025-04-16", "flex"),
        ]
    );
    let rows = csv_rows(&proxy.get_text("/export?format=csv").await);
    let tiers: Vec<&str> = rows.iter().map(|r| r["service_tier"].as_str()).collect();
    assert_eq!(tiers, ["priority", "priority", "flex"]);
    proxy.stop().await;
}
