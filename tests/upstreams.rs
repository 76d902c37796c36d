//! Several upstreams: named ones from proxy.toml, each at its own prefix, counted apart in
//! `/stats` (`by_upstream`) and the ledger; and `inject_stream_usage` for servers that reject
//! `stream_options`.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use common::{Mock, Proxy, Received, Reply, chat_request, chat_stream, key_id, openai_like};
use serde_json::{Value, json};

const KEY: &str = "sk-upstreams-0123456789";

async fn post(proxy: &Proxy, path: &str, body: &Value) -> reqwest::Response {
    proxy
        .client
        .post(proxy.url(path))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_prefix_goes_to_its_upstream_and_is_counted_under_its_name() {
    let openai = Mock::openai().await;
    let local = Mock::openai().await;
    let router = Mock::openai().await;
    let toml = format!(
        "[upstreams.local]\nurl = \"{}\"\n[upstreams.openrouter]\nprefix = \"/or/api/v1\"\nurl = \"{}\"\n",
        local.url(),
        router.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&openai.url(), dir.path(), &toml).await;
    for path in [
        "/v1/chat/completions",
        "/local/v1/chat/completions",
        "/local/v1/chat/completions",
        "/or/api/v1/chat/completions",
    ] {
        let response = post(&proxy, path, &chat_request("gpt-4o", false)).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    assert_eq!(openai.received().len(), 1);
    assert_eq!(local.received().len(), 2);
    assert_eq!(local.last().path, "/v1/chat/completions");
    assert_eq!(router.received().len(), 1);

    let stats = proxy.stats_after(4).await;
    let by_upstream = &stats["by_upstream"];
    assert_eq!(by_upstream["openai"]["requests"], 1);
    assert_eq!(by_upstream["local"]["requests"], 2);
    assert_eq!(by_upstream["openrouter"]["requests"], 1);
    // The key's model entry sums every upstream.
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o");
    assert_eq!(entry["requests"], 4);
    assert_eq!(
        by_upstream["local"]["cost_nano_usd"].as_u64().unwrap() * 2,
        entry["cost_nano_usd"].as_u64().unwrap()
    );

    // History knows the upstream of every row.
    let usage = proxy.get_json("/usage?group_by=upstream").await;
    let rows: Vec<(String, u64)> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["upstream"].as_str().unwrap().to_owned(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("local".to_owned(), 2),
            ("openai".to_owned(), 1),
            ("openrouter".to_owned(), 1)
        ]
    );
    proxy.stop().await;

    // And a restart restores the per-upstream totals.
    let again = Proxy::start_persistent(&openai.url(), dir.path(), &toml).await;
    assert_eq!(again.stats().await["by_upstream"], stats["by_upstream"]);
    again.stop().await;
}

#[tokio::test]
async fn unmetered_routes_of_a_named_upstream_pass_through_uncounted() {
    let local = Mock::start(|r: &Received| match r.path.as_str() {
        "/v1/models" => Reply::json(200, &json!({"object": "list", "data": []})),
        _ => openai_like(r),
    })
    .await;
    let toml = format!("[upstreams.local]\nurl = \"{}\"\n", local.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let models = proxy
        .client
        .get(proxy.url("/local/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(
        models.json::<Value>().await.unwrap(),
        json!({"object": "list", "data": []})
    );
    post(
        &proxy,
        "/local/v1/chat/completions",
        &chat_request("m", false),
    )
    .await;
    assert_eq!(proxy.stats_after(1).await["totals"]["requests"], 1);
}

/// A server that answers 400 to any request with `stream_options`, as some
/// OpenAI-compatible servers do, and streams without usage otherwise.
fn rejects_stream_options(request: &Received) -> Reply {
    let body = request.json();
    if body.get("stream_options").is_some() {
        return Reply::json(
            400,
            &json!({"error": {"message": "Unknown parameter: 'stream_options'.",
                "type": "invalid_request_error", "param": "stream_options", "code": "unknown_parameter"}}),
        );
    }
    if body["model"] == "missing" {
        return Reply::json(
            400,
            &json!({"error": {"message": "model not found", "type": "invalid_request_error"}}),
        );
    }
    Reply::sse(&chat_stream(
        "llama-3.1-8b",
        &["Hello", ",", " world", "!"],
        None,
    ))
}

async fn stream_text(proxy: &Proxy, path: &str, body: &Value) -> (u16, String) {
    let response = post(proxy, path, body).await;
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn auto_retries_once_without_stream_options_then_stops_sending_it() {
    let local = Mock::start(rejects_stream_options).await;
    let toml = format!("[upstreams.local]\nurl = \"{}\"\n", local.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let request = chat_request("llama-3.1-8b", true);
    let expected = chat_stream("llama-3.1-8b", &["Hello", ",", " world", "!"], None).concat();

    let (status, text) = stream_text(&proxy, "/local/v1/chat/completions", &request).await;
    assert_eq!(
        (status, text.as_str()),
        (200, expected.as_str()),
        "the client never sees the 400"
    );
    let sent = local.received();
    assert_eq!(sent.len(), 2, "one rejected attempt, one retry");
    assert!(sent[0].json()["stream_options"]["include_usage"] == true);
    assert_eq!(
        sent[1].json(),
        request,
        "the retry is the client's own body"
    );

    // Remembered: the next stream goes out once, untouched.
    let (status, text) = stream_text(&proxy, "/local/v1/chat/completions", &request).await;
    assert_eq!((status, text), (200, expected));
    assert_eq!(local.received().len(), 3);
    assert_eq!(local.last().json(), request);

    // Metered by estimate: "Hello, world!" is 4 tokens each time.
    let stats = proxy.stats_after(2).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "llama-3.1-8b");
    assert_eq!(entry["requests"], 2);
    assert_eq!(entry["errors"], 0);
    assert_eq!(entry["estimated_requests"], 2);
    assert_eq!(entry["completion_tokens"], 8);
}

#[tokio::test]
async fn a_400_about_something_else_reaches_the_client_as_it_was() {
    let local = Mock::start(|r: &Received| {
        Reply::json(
            400,
            &json!({"error": {"message": format!("model {} not found", r.json()["model"]), "type": "invalid_request_error"}}),
        )
    })
    .await;
    let toml = format!("[upstreams.local]\nurl = \"{}\"\n", local.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let (status, text) = stream_text(
        &proxy,
        "/local/v1/chat/completions",
        &chat_request("nope", true),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"error": {"message": "model \"nope\" not found", "type": "invalid_request_error"}})
    );
    assert_eq!(local.received().len(), 1, "no retry");
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["errors"], 1);
}

#[tokio::test]
async fn never_sends_the_client_body_untouched_and_always_lets_the_400_through() {
    let local = Mock::start(rejects_stream_options).await;
    let toml = format!(
        "[upstreams.never]\nurl = \"{0}\"\ninject_stream_usage = \"never\"\n[upstreams.always]\nurl = \"{0}\"\ninject_stream_usage = \"always\"\n",
        local.url()
    );
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let request = chat_request("llama-3.1-8b", true);
    let (status, _) = stream_text(&proxy, "/never/v1/chat/completions", &request).await;
    assert_eq!(status, 200);
    assert_eq!(local.last().json(), request);
    let (status, text) = stream_text(&proxy, "/always/v1/chat/completions", &request).await;
    assert_eq!(status, 400);
    assert!(text.contains("stream_options"), "{text}");
    assert_eq!(local.received().len(), 2);
}
