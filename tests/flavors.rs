//! OpenAI routes beyond chat: the Responses API (plain and streamed), embeddings and legacy
//! completions are metered, each with its own usage shape, and recorded with its flavor.

mod common;

use common::{Mock, Proxy, Received, Reply, chat_stream, key_id, openai_like};
use serde_json::{Value, json};

const KEY: &str = "sk-proj-flavors-0123456789";

/// Responses API events as OpenAI sends them; usage only in `response.completed`.
fn responses_stream() -> Vec<String> {
    [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response","status":"in_progress","model":"gpt-4.1-mini","output":[],"usage":null}}"#,
        r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hello"}"#,
        r#"{"type":"response.completed","sequence_number":2,"response":{"id":"resp_9","object":"response","status":"completed","model":"gpt-4.1-mini-2025-04-14","output":[],"usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":100},"output_tokens":40,"output_tokens_details":{"reasoning_tokens":25},"total_tokens":160}}}"#,
    ]
    .iter()
    .map(|data| {
        let kind: Value = serde_json::from_str(data).expect("fixture JSON");
        let kind = kind["type"].as_str().expect("a typed event");
        format!("event: {kind}\ndata: {data}\n\n")
    })
    .collect()
}

/// Answers like OpenAI on every route these tests use.
fn openai_routes(request: &Received) -> Reply {
    let body = request.json();
    match request.path.as_str() {
        "/v1/responses" if body["stream"] == json!(true) => Reply::sse(&responses_stream()),
        "/v1/responses" => Reply::json(
            200,
            &json!({"id": "resp_8", "object": "response", "status": "completed",
                "model": "gpt-4.1-2025-04-14", "output": [],
                "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 6},
                          "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 12},
                          "total_tokens": 123}}),
        ),
        "/v1/embeddings" => Reply::json(
            200,
            &json!({"object": "list", "model": "text-embedding-3-small",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
        ),
        "/v1/completions" if body["stream"] == json!(true) => {
            let with_usage = body["stream_options"]["include_usage"] == json!(true);
            Reply::sse(&chat_stream(
                "gpt-3.5-turbo-instruct",
                &["Once", " upon"],
                with_usage.then_some((5, 2)),
            ))
        }
        _ => openai_like(request),
    }
}

async fn post(proxy: &Proxy, path: &str, body: &Value) -> String {
    let response = proxy
        .client
        .post(proxy.url(path))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(response.status(), 200);
    response.text().await.expect("a whole body")
}

#[tokio::test]
async fn responses_api_is_metered_plain_and_streamed_with_the_stream_untouched() {
    let mock = Mock::start(openai_routes).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;

    post(
        &proxy,
        "/v1/responses",
        &json!({"model": "gpt-4.1", "input": "hi"}),
    )
    .await;
    let request = json!({"model": "gpt-4.1-mini", "input": "hi", "stream": true});
    let streamed = post(&proxy, "/v1/responses", &request).await;
    // Usage comes with every Responses stream: nothing is asked for, nothing is hidden.
    assert_eq!(streamed, responses_stream().concat());
    assert_eq!(mock.last().json(), request);

    let stats = proxy.stats_after(2).await;
    let plain = Proxy::model_of(&stats, &key_id(KEY), "gpt-4.1-2025-04-14");
    assert_eq!(plain["prompt_tokens"], 36);
    assert_eq!(plain["cached_tokens"], 6);
    assert_eq!(plain["completion_tokens"], 87);
    assert_eq!(plain["reasoning_tokens"], 12);
    // gpt-4.1: 30 x $2 + 6 x $0.50 + 87 x $8 per million.
    assert_eq!(plain["cost_nano_usd"], 30 * 2_000 + 6 * 500 + 87 * 8_000);
    let stream = Proxy::model_of(&stats, &key_id(KEY), "gpt-4.1-mini-2025-04-14");
    assert_eq!(stream["prompt_tokens"], 120);
    assert_eq!(stream["cached_tokens"], 100);
    assert_eq!(stream["completion_tokens"], 40);
    assert_eq!(stream["reasoning_tokens"], 25);

    let rows = proxy.get_text("/export?format=jsonl").await;
    let rows = common::json_lines(&rows);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["flavor"] == "openai_responses"));
    assert_eq!(rows[0]["response_id"], "resp_8");
    assert_eq!(rows[1]["response_id"], "resp_9");
    assert_eq!(rows[1]["streamed"], true);
    proxy.stop().await;
}

#[tokio::test]
async fn embeddings_are_metered_from_prompt_tokens() {
    let mock = Mock::start(openai_routes).await;
    let proxy = Proxy::start(&mock.url()).await;
    let answer = post(
        &proxy,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "hello world"}),
    )
    .await;
    assert!(answer.contains("\"embedding\""));
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "text-embedding-3-small");
    assert_eq!(entry["prompt_tokens"], 8);
    assert_eq!(entry["completion_tokens"], 0);
    // $0.02 per million.
    assert_eq!(entry["cost_nano_usd"], 160);
    assert_eq!(entry["unpriced_requests"], 0);
}

#[tokio::test]
async fn legacy_completions_streams_get_usage_asked_for_and_hidden_like_chat() {
    let mock = Mock::start(openai_routes).await;
    let proxy = Proxy::start(&mock.url()).await;
    let text = post(
        &proxy,
        "/v1/completions",
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "stream": true}),
    )
    .await;
    assert_eq!(mock.last().json()["stream_options"]["include_usage"], true);
    assert!(!text.contains("\"usage\":{"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-3.5-turbo-instruct");
    assert_eq!(entry["prompt_tokens"], 5);
    assert_eq!(entry["completion_tokens"], 2);
}
