//! Anthropic Messages at `/anthropic/v1`: what an Anthropic SDK with
//! `ANTHROPIC_BASE_URL=http://localhost:8080/anthropic` sends is forwarded unchanged, and its
//! usage (cache reads and writes priced apart) is metered, plain and streamed.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Received, Reply, key_id};
use serde_json::{Value, json};

const KEY: &str = "sk-ant-api03-anthropic-test-0123456789";

/// A streamed message as the Messages API sends it: input and cache counts in
/// `message_start`, the final (cumulative) output count in `message_delta`.
fn message_stream(model: &str, output: u64) -> Vec<String> {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_s1", "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 4000, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", world!"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
        json!({"type": "message_stop"}),
    ];
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect()
}

fn message(model: &str) -> Value {
    json!({"id": "msg_p1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hi!"}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
                  "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0},
                  "output_tokens": 6, "service_tier": "standard"}})
}

/// Answers like Anthropic: messages (plain or streamed) and token counting.
fn anthropic(request: &Received) -> Reply {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let model = body["model"]
        .as_str()
        .unwrap_or("claude-sonnet-4-5")
        .to_owned();
    match request.path.as_str() {
        "/v1/messages/count_tokens" => Reply::json(200, &json!({"input_tokens": 2095})),
        "/v1/messages" if body["stream"] == json!(true) => {
            let events = message_stream(&model, 15).concat();
            // Tiny chunks: events arrive split at arbitrary points.
            let chunks = events
                .as_bytes()
                .chunks(7)
                .map(|c| Chunk::now(Bytes::copy_from_slice(c)))
                .collect();
            Reply::Stream {
                chunks,
                then_cut: false,
                then_hang: false,
            }
        }
        "/v1/messages" => Reply::json(200, &message(&model)),
        _ => Reply::json(
            404,
            &json!({"type": "error", "error": {"type": "not_found_error", "message": "no"}}),
        ),
    }
}

async fn start() -> (Mock, Proxy) {
    let mock = Mock::start(anthropic).await;
    let toml = format!("[upstreams.anthropic]\nurl = \"{}\"\n", mock.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    (mock, proxy)
}

async fn post(proxy: &Proxy, path: &str, body: &Value) -> reqwest::Response {
    proxy
        .client
        .post(proxy.url(path))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn request(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
        "system": "Be brief.", "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

#[tokio::test]
async fn plain_message_is_forwarded_unchanged_and_metered_with_cache_tokens() {
    let (mock, proxy) = start().await;
    let response = post(&proxy, "/anthropic/v1/messages", &request(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, message("claude-sonnet-4-5"));

    let received = mock.last();
    assert_eq!(received.path, "/v1/messages");
    assert_eq!(received.headers["x-api-key"], KEY);
    assert_eq!(received.headers["anthropic-version"], "2023-06-01");
    assert_eq!(
        received.headers["anthropic-beta"],
        "prompt-caching-2024-07-31"
    );
    assert_eq!(received.json(), request(false), "the body is not touched");

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "claude-sonnet-4-5");
    // Anthropic's input_tokens exclude the cache; prompt_tokens include both.
    assert_eq!(entry["prompt_tokens"], 12 + 100 + 2000);
    assert_eq!(entry["cached_tokens"], 2000);
    assert_eq!(entry["cache_write_tokens"], 100);
    assert_eq!(entry["completion_tokens"], 6);
    assert_eq!(entry["estimated_requests"], 0);
    // $3/M input, $0.30/M cache reads, $3.75/M cache writes, $15/M output:
    // 12×3 + 2000×0.3 + 100×3.75 + 6×15 = 36 + 600 + 375 + 90 = 1,101 millionths of a dollar.
    assert_eq!(entry["cost_nano_usd"], 1_101_000);
    assert_eq!(stats["by_upstream"]["anthropic"]["requests"], 1);
    assert!(stats["by_upstream"].get("openai").is_none(), "{stats}");
}

#[tokio::test]
async fn streamed_message_keeps_start_counts_and_the_last_cumulative_output() {
    let (_mock, proxy) = start().await;
    let response = post(&proxy, "/anthropic/v1/messages", &request(true)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(
        text,
        message_stream("claude-sonnet-4-5", 15).concat(),
        "byte for byte"
    );

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "claude-sonnet-4-5");
    assert_eq!(entry["prompt_tokens"], 25 + 1000 + 4000);
    assert_eq!(entry["cache_write_tokens"], 1000);
    assert_eq!(entry["cached_tokens"], 4000);
    assert_eq!(entry["completion_tokens"], 15);
    assert_eq!(entry["errors"], 0);
    // 25×3 + 4000×0.3 + 1000×3.75 + 15×15 = 75 + 1200 + 3750 + 225 = 5,250 millionths.
    assert_eq!(entry["cost_nano_usd"], 5_250_000);
}

#[tokio::test]
async fn a_bearer_key_identifies_the_caller_too() {
    let (_mock, proxy) = start().await;
    let response = proxy
        .client
        .post(proxy.url("/anthropic/v1/messages"))
        .bearer_auth(KEY)
        .json(&request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["keys"][0]["id"], key_id(KEY));
}

#[tokio::test]
async fn token_counting_and_other_routes_pass_through_unmetered() {
    let (mock, proxy) = start().await;
    let response = post(
        &proxy,
        "/anthropic/v1/messages/count_tokens",
        &request(false),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"input_tokens": 2095})
    );
    let models = proxy
        .client
        .get(proxy.url("/anthropic/v1/models"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 404, "the upstream's own answer");
    assert_eq!(mock.received().len(), 2);
    // One metered request afterwards shows the two before were not counted.
    post(&proxy, "/anthropic/v1/messages", &request(false)).await;
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["requests"], 1);
}

#[tokio::test]
async fn a_client_leaving_mid_stream_keeps_the_reported_input_and_estimates_the_output() {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = std::sync::Arc::clone(&gate);
    let mock = Mock::start(move |_| {
        let events = message_stream("claude-haiku-4-5", 99);
        let mut chunks: Vec<Chunk> = events[..5].iter().map(|e| Chunk::now(e.clone())).collect();
        // The rest (with the final count) waits for a gate that never opens.
        chunks.push(Chunk {
            gate: Some(std::sync::Arc::clone(&held)),
            ..Chunk::now(events[5..].concat())
        });
        Reply::Stream {
            chunks,
            then_cut: false,
            then_hang: false,
        }
    })
    .await;
    let toml = format!("[upstreams.anthropic]\nurl = \"{}\"\n", mock.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let mut body = request(true);
    body["model"] = json!("claude-haiku-4-5");
    let mut response = post(&proxy, "/anthropic/v1/messages", &body).await;
    let mut seen = String::new();
    while !seen.contains(", world!") {
        let chunk = response.chunk().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(response);

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "claude-haiku-4-5");
    // The provider's input counts from message_start; the output is what was streamed
    // ("Hello, world!": 4 tokens), not the provisional 1 nor the 99 never received.
    assert_eq!(entry["prompt_tokens"], 25 + 1000 + 4000);
    assert_eq!(entry["completion_tokens"], 4);
    assert_eq!(entry["estimated_requests"], 1);
    assert_eq!(entry["errors"], 0);
    drop(gate);
}
