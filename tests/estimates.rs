//! Estimates when usage is missing: a 2xx response or stream without usage is counted by the
//! tokenizer and flagged; a client that leaves mid-stream gets a partial record of what it
//! received, or, in drain mode, the provider's exact usage.

#![expect(clippy::unwrap_used, reason = "stream-reading test helpers")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Received, Reply, chat_request, chat_stream, key_id};
use llm_meter::usage::estimate::count;
use serde_json::{Value, json};

const KEY: &str = "sk-estimates-0123456789";

/// Tokens of the harness's one-message chat prompt ("hi"): the text plus the chat framing.
fn hi_prompt(model: &str) -> u64 {
    count(model, "hi\n") + 6
}

#[tokio::test]
async fn a_plain_answer_without_usage_is_estimated_and_flagged() {
    let mock = Mock::start(|_: &Received| {
        Reply::json(
            200,
            &json!({"id": "cmpl-1", "object": "chat.completion", "model": "llama3.2",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}, "finish_reason": "stop"}]}),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let response = proxy.chat(KEY, &chat_request("llama3.2", false)).await;
    assert_eq!(response.status(), 200);

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "llama3.2");
    assert_eq!(entry["estimated_requests"], 1);
    assert_eq!(entry["prompt_tokens"], hi_prompt("llama3.2"));
    assert_eq!(entry["completion_tokens"], 10);
    assert_eq!(stats["totals"]["estimated_requests"], 1);
    let text = proxy.get_text("/stats?format=text").await;
    assert!(text.contains("(1 estimated)"), "{text}");

    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(rows[0]["estimated"], true);
    assert_eq!(rows[0]["partial"], false);
    proxy.stop().await;
}

#[tokio::test]
async fn embeddings_without_usage_count_their_input() {
    let mock = Mock::start(|_: &Received| {
        Reply::json(
            200,
            &json!({"object": "list", "model": "nomic-embed-text", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}),
        )
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy
        .client
        .post(proxy.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .json(&json!({"model": "nomic-embed-text", "input": ["hello world", "Hello, world!"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "nomic-embed-text");
    // Each input is counted with a separator: "hello world\nHello, world!\n".
    let expected = count("nomic-embed-text", "hello world\nHello, world!\n");
    assert_eq!(entry["prompt_tokens"], expected);
    assert_eq!(entry["completion_tokens"], 0);
    assert_eq!(entry["estimated_requests"], 1);
}

/// A stream that sends "Hello, world!" then waits `pause` before its end and its usage.
fn slow_stream(pause: Duration) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |request| {
        if request.json()["stream"] != true {
            return common::openai_like(request);
        }
        let events = chat_stream("gpt-4o", &["Hello", ",", " world", "!"], Some((9, 99)));
        let (first, rest) = events.split_at(5);
        let mut chunks: Vec<Chunk> = first.iter().map(|e| Chunk::now(e.clone())).collect();
        chunks.push(Chunk {
            delay: pause,
            ..Chunk::now(Bytes::from(rest.concat()))
        });
        Reply::Stream {
            chunks,
            then_cut: false,
            then_hang: false,
        }
    }
}

/// Reads a stream until "!" has arrived, then leaves.
async fn leave_after_the_text(proxy: &Proxy) {
    let mut response = proxy.chat(KEY, &chat_request("gpt-4o", true)).await;
    let mut seen = String::new();
    while !seen.contains("\"!\"") {
        let chunk = response.chunk().await.unwrap().expect("more of the stream");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(response);
}

#[tokio::test]
async fn a_client_leaving_mid_stream_gets_a_partial_estimate_and_the_proxy_keeps_serving() {
    let mock = Mock::start(slow_stream(Duration::from_secs(30))).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    leave_after_the_text(&proxy).await;

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o");
    // What the client received: the prompt estimated, "Hello, world!" is 4 tokens.
    assert_eq!(entry["completion_tokens"], 4);
    assert_eq!(entry["prompt_tokens"], hi_prompt("gpt-4o"));
    assert_eq!(entry["estimated_requests"], 1);
    assert_eq!(entry["errors"], 0);
    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(
        (rows[0]["partial"].clone(), rows[0]["estimated"].clone()),
        (json!(true), json!(true))
    );

    // Unaffected: the next request is served as usual.
    let response = proxy.chat(KEY, &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("Hello there!"));
    proxy.stop().await;
}

#[tokio::test]
async fn drain_mode_reads_the_stream_to_its_end_for_the_exact_usage() {
    let mock = Mock::start(slow_stream(Duration::from_millis(300))).await;
    let proxy = Proxy::start_with(&mock.url(), "on_client_disconnect = \"drain\"\n").await;
    leave_after_the_text(&proxy).await;

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o");
    // The provider's own count, from the usage chunk that came after the client left.
    assert_eq!(entry["prompt_tokens"], 9);
    assert_eq!(entry["completion_tokens"], 99);
    assert_eq!(entry["estimated_requests"], 0);
    assert_eq!(entry["errors"], 0);
}

#[tokio::test]
async fn drain_mode_gives_up_at_its_timeout_and_estimates() {
    let mock = Mock::start(slow_stream(Duration::from_secs(30))).await;
    let proxy = Proxy::start_with(
        &mock.url(),
        "on_client_disconnect = \"drain\"\ndrain_timeout = \"200ms\"\n",
    )
    .await;
    leave_after_the_text(&proxy).await;
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(KEY), "gpt-4o");
    assert_eq!(entry["completion_tokens"], 4);
    assert_eq!(entry["estimated_requests"], 1);
}

#[tokio::test]
async fn an_error_response_is_not_estimated() {
    let mock = Mock::start(|_: &Received| {
        Reply::json(
            500,
            &json!({"error": {"message": "boom", "type": "server_error"}}),
        )
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy.chat(KEY, &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 500);
    let stats = proxy.stats_after(1).await;
    let totals: &Value = &stats["totals"];
    assert_eq!(totals["estimated_requests"], 0);
    assert_eq!(totals["total_tokens"], 0);
    assert_eq!(totals["errors"], 1);
}
