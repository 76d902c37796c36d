//! A 2xx answer whose usage is not a usage (`{}`, a list, a string, another provider's shape)
//! is estimated and flagged like one with no usage, on every route, plain and streamed; a
//! usage of zero counts stays a usage of zero.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use common::{Mock, Proxy, Received, Reply, key_id};
use serde_json::{Value, json};

const KEY: &str = "sk-usage-shapes-0123456789";

/// The routes under test, by the name that starts their models' names.
const ROUTES: [&str; 5] = ["chat", "embeddings", "responses", "anthropic", "gemini"];

/// `usage` values that are no usage on the route `route`, in the order models number them.
fn shapes(route: &str) -> [&'static str; 6] {
    // Each route gets the shape of another provider, which names none of its own counts.
    let foreign = match route {
        "chat" | "embeddings" => r#"{"input_tokens":5,"output_tokens":3}"#,
        _ => r#"{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}"#,
    };
    ["{}", "[]", "[5,3]", r#""12""#, "7", foreign]
}

/// The model a test case asks for: `ROUTE-SHAPE-MODE`; the mock reads the case back from it.
fn model(route: &str, shape: usize, is_stream: bool) -> String {
    let mode = if is_stream { "stream" } else { "plain" };
    format!("{route}-{shape}-{mode}")
}

/// The `usage` JSON a model of `model` answers with; `zero` gives a real usage of zero counts.
fn usage_of(model: &str) -> Value {
    let mut parts = model.split('-');
    let route = parts.next().unwrap();
    let shape = parts.next().unwrap();
    let text = if shape == "zero" {
        r#"{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#
    } else {
        shapes(route)[shape.parse::<usize>().unwrap()]
    };
    serde_json::from_str(text).unwrap()
}

fn sse(events: &[Value]) -> Reply {
    let events: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    Reply::sse(&events)
}

/// Answers every route with some text and the usage its model names.
fn upstream(request: &Received) -> Reply {
    if let Some(model) = request
        .path
        .strip_prefix("/v1/models/")
        .and_then(|rest| rest.split(':').next())
    {
        let chunk = json!({"candidates": [{"content": {"parts": [{"text": "Hello there!"}], "role": "model"}, "index": 0}],
            "usageMetadata": usage_of(model), "modelVersion": model});
        return if request.path.contains(":streamGenerateContent") {
            sse(&[chunk.clone(), chunk])
        } else {
            Reply::json(200, &chunk)
        };
    }
    let body = request.json();
    let model = body["model"].as_str().unwrap();
    let usage = usage_of(model);
    let is_stream = body["stream"] == json!(true);
    match (request.path.as_str(), is_stream) {
        ("/v1/chat/completions", false) => Reply::json(
            200,
            &json!({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
                "usage": usage}),
        ),
        ("/v1/chat/completions", true) => sse(&[
            json!({"id": "c", "model": model, "choices": [{"index": 0, "delta": {"content": "Hello there!"}}], "usage": null}),
            json!({"id": "c", "model": model, "choices": [], "usage": usage}),
        ]),
        ("/v1/embeddings", _) => Reply::json(
            200,
            &json!({"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "usage": usage}),
        ),
        ("/v1/responses", false) => Reply::json(
            200,
            &json!({"id": "resp_1", "object": "response", "status": "completed", "model": model,
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello there!"}]}],
                "usage": usage}),
        ),
        ("/v1/responses", true) => sse(&[
            json!({"type": "response.created", "response": {"id": "resp_1", "model": model, "output": [], "usage": null}}),
            json!({"type": "response.output_text.delta", "delta": "Hello there!"}),
            json!({"type": "response.completed", "response": {"id": "resp_1", "model": model, "output": [], "usage": usage}}),
        ]),
        ("/v1/messages", false) => Reply::json(
            200,
            &json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Hello there!"}], "usage": usage}),
        ),
        ("/v1/messages", true) => sse(&[
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "usage": usage}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello there!"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}),
            json!({"type": "message_stop"}),
        ]),
        (path, _) => panic!("the mock has no route {path}"),
    }
}

async fn start() -> (Mock, Proxy) {
    let mock = Mock::start(upstream).await;
    let toml = format!(
        "[upstreams.anthropic]\nurl = \"{0}\"\n\n[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"{0}\"\nflavor = \"gemini\"\n",
        mock.url()
    );
    let proxy = Proxy::start_with(&mock.url(), &toml).await;
    (mock, proxy)
}

/// Sends the request of `route` for `model` and reads the whole answer.
async fn send(proxy: &Proxy, route: &str, model: &str, is_stream: bool) {
    let messages = json!([{"role": "user", "content": "Say hello"}]);
    let (path, body) = match route {
        "chat" => (
            "/v1/chat/completions".to_owned(),
            json!({"model": model, "stream": is_stream, "messages": messages}),
        ),
        "embeddings" => (
            "/v1/embeddings".to_owned(),
            json!({"model": model, "input": "Say hello"}),
        ),
        "responses" => (
            "/v1/responses".to_owned(),
            json!({"model": model, "stream": is_stream, "input": "Say hello"}),
        ),
        "anthropic" => (
            "/anthropic/v1/messages".to_owned(),
            json!({"model": model, "stream": is_stream, "max_tokens": 64, "messages": messages}),
        ),
        "gemini" => {
            let method = if is_stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (
                format!("/gemini/v1beta/models/{model}:{method}"),
                json!({"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}),
            )
        }
        other => panic!("no route {other}"),
    };
    // Each provider's own way of sending the key.
    let request = proxy.client.post(proxy.url(&path)).json(&body);
    let request = match route {
        "anthropic" => request.header("x-api-key", KEY),
        "gemini" => request.header("x-goog-api-key", KEY),
        _ => request.bearer_auth(KEY),
    };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{model}");
    response.bytes().await.unwrap();
}

/// Every (route, shape, plain or streamed) case, as the model that names it.
fn cases() -> Vec<(&'static str, String, bool)> {
    let mut cases = Vec::new();
    for route in ROUTES {
        // Embeddings do not stream.
        let modes: &[bool] = if route == "embeddings" {
            &[false]
        } else {
            &[false, true]
        };
        for &is_stream in modes {
            for shape in 0..shapes(route).len() {
                cases.push((route, model(route, shape, is_stream), is_stream));
            }
        }
    }
    cases
}

#[tokio::test]
async fn a_usage_that_is_not_a_usage_is_estimated_and_flagged_on_every_route() {
    let (_mock, proxy) = start().await;
    let cases = cases();
    for (route, model, is_stream) in &cases {
        send(&proxy, route, model, *is_stream).await;
    }
    let stats = proxy.stats_after(cases.len() as u64).await;
    for (_, model, _) in &cases {
        let entry = Proxy::model_of(&stats, &key_id(KEY), model);
        assert_eq!(entry["requests"], 1, "{model}: {entry}");
        assert_eq!(entry["estimated_requests"], 1, "{model}: {entry}");
        // Counted by the tokenizer, not recorded as nothing.
        assert!(
            entry["prompt_tokens"].as_u64().unwrap() > 0,
            "{model}: {entry}"
        );
        assert_eq!(entry["errors"], 0, "{model}: {entry}");
    }
    assert_eq!(stats["totals"]["estimated_requests"], cases.len());
    proxy.stop().await;
}

#[tokio::test]
async fn a_usage_of_zero_counts_is_recorded_as_zero_not_estimated() {
    let (_mock, proxy) = start().await;
    send(&proxy, "chat", "chat-zero-plain", false).await;
    send(&proxy, "chat", "chat-zero-stream", true).await;
    let stats = proxy.stats_after(2).await;
    for model in ["chat-zero-plain", "chat-zero-stream"] {
        let entry = Proxy::model_of(&stats, &key_id(KEY), model);
        assert_eq!(entry["requests"], 1, "{model}: {entry}");
        assert_eq!(entry["estimated_requests"], 0, "{model}: {entry}");
        assert_eq!(entry["total_tokens"], 0, "{model}: {entry}");
    }
    proxy.stop().await;
}
