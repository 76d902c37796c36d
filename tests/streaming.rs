//! Streaming chat completions: usage is read from the stream, asked for when missing, and hidden again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Reply, chat_request, chat_stream, key_id, sse_data};
use serde_json::{Value, json};
use tokio::sync::Notify;

#[tokio::test]
async fn streaming_usage_is_recorded_when_client_did_not_ask() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;

    let response = proxy
        .chat(
            "sk-stream-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", true),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(response).await;

    // Upstream was asked for usage ...
    assert_eq!(
        mock.last().json()["stream_options"],
        json!({"include_usage": true})
    );
    // ... and the client does not see the usage-only chunk it did not ask for.
    let expected: Vec<String> =
        chat_stream("gpt-4o-mini", &["Hello", " there", "!"], Some((11, 3)))
            .into_iter()
            .filter(|e| !e.contains("\"choices\":[]"))
            .map(|e| e.trim_start_matches("data: ").trim_end().to_owned())
            .collect();
    assert_eq!(events, expected);
    assert_eq!(events.last().unwrap(), "[DONE]");

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id("sk-stream-aaaaaaaaaaaaaaaa"), "gpt-4o-mini");
    assert_eq!(entry["prompt_tokens"], 11);
    assert_eq!(entry["completion_tokens"], 3);
    assert_eq!(entry["total_tokens"], 14);
    assert_eq!(entry["errors"], 0);
}

#[tokio::test]
async fn client_that_asked_for_usage_gets_the_stream_byte_for_byte() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut body = chat_request("gpt-4o", true);
    body["stream_options"] = json!({"include_usage": true});

    let via_proxy = proxy.chat_through("sk-asked", &body).await;
    let sent_upstream = mock.last().body;
    let direct = common::client()
        .post(format!("{}/chat/completions", mock.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    assert_eq!(via_proxy, direct);
    assert!(String::from_utf8_lossy(&via_proxy).contains("\"choices\":[]"));
    // The request body went upstream untouched.
    assert_eq!(
        sent_upstream,
        Bytes::from(serde_json::to_vec(&body).unwrap())
    );
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["prompt_tokens"], 11);
}

#[tokio::test]
async fn client_that_turned_usage_off_is_metered_but_sees_no_usage_chunk() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut body = chat_request("gpt-4o", true);
    body["stream_options"] = json!({"include_usage": false});

    let events = sse_data(proxy.chat("sk-off", &body).await).await;
    assert!(
        events.iter().all(|e| !e.contains("\"choices\":[]")),
        "{events:?}"
    );
    assert_eq!(mock.last().json()["stream_options"]["include_usage"], true);
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 3);
}

#[tokio::test]
async fn first_event_reaches_client_before_upstream_sends_the_second() {
    let gate = Arc::new(Notify::new());
    let events = chat_stream("gpt-4o", &["one", "two"], Some((5, 2)));
    let first = events[0].clone();
    let rest: Vec<String> = events[1..].to_vec();
    let gate_for_mock = Arc::clone(&gate);
    let mock = Mock::start(move |_| {
        let mut chunks = vec![Chunk::now(first.clone())];
        chunks.push(Chunk {
            bytes: Bytes::from(rest.concat()),
            delay: Duration::ZERO,
            gate: Some(Arc::clone(&gate_for_mock)),
        });
        Reply::Stream {
            chunks,
            then_cut: false,
            then_hang: false,
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;

    let mut response = proxy.chat("sk-live", &chat_request("gpt-4o", true)).await;
    let head = tokio::time::timeout(Duration::from_secs(5), response.chunk())
        .await
        .expect("first event arrives while upstream still holds the rest")
        .unwrap()
        .unwrap();
    assert_eq!(head, Bytes::from(events[0].clone()));

    gate.notify_one();
    let mut tail = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        tail.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8(tail)
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 2);
}

#[tokio::test]
async fn every_event_reaches_client_before_upstream_sends_the_next() {
    // Later chunks go through the batching that merges bursts; a lone one must not wait there.
    let events = chat_stream("gpt-4o", &["one", "two", "three", "four"], Some((5, 4)));
    let gates: Vec<Arc<Notify>> = events.iter().map(|_| Arc::new(Notify::new())).collect();
    let (script_events, script_gates) = (events.clone(), gates.clone());
    let mock = Mock::start(move |_| Reply::Stream {
        chunks: script_events
            .iter()
            .zip(&script_gates)
            .enumerate()
            .map(|(i, (event, gate))| Chunk {
                bytes: Bytes::from(event.clone()),
                delay: Duration::ZERO,
                gate: (i > 0).then(|| Arc::clone(gate)),
            })
            .collect(),
        then_cut: false,
        then_hang: false,
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut body = chat_request("gpt-4o", true);
    body["stream_options"] = json!({"include_usage": true});

    let mut response = proxy.chat("sk-live", &body).await;
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            gates[i].notify_one();
        }
        let mut got = Vec::new();
        while got.len() < event.len() {
            let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
                .await
                .unwrap_or_else(|_| panic!("event {i} arrives while upstream holds the next"))
                .unwrap()
                .expect("the stream is not over");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, event.as_bytes(), "event {i}");
    }
    assert!(response.chunk().await.unwrap().is_none());
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 4);
}

/// Sends `events` split into pieces of `size` bytes, each its own write.
fn split_stream(events: &[String], size: usize) -> Reply {
    let all = events.concat().into_bytes();
    Reply::Stream {
        chunks: all
            .chunks(size)
            .map(|c| Chunk::now(Bytes::copy_from_slice(c)))
            .collect(),
        then_cut: false,
        then_hang: false,
    }
}

#[tokio::test]
async fn any_chunking_of_the_stream_gives_the_same_events_and_usage() {
    for size in [1, 2, 3, 7, 16, 61, 4096] {
        let mock = Mock::start(move |r: &common::Received| {
            let asked = r.json()["stream_options"]["include_usage"] == json!(true);
            split_stream(
                &chat_stream("gpt-4o", &["a", "b", "c"], asked.then_some((8, 3))),
                size,
            )
        })
        .await;
        let proxy = Proxy::start(&mock.url()).await;
        let events = sse_data(proxy.chat("sk-split", &chat_request("gpt-4o", true)).await).await;
        assert_eq!(events.len(), 6, "chunks of {size}: {events:?}");
        assert!(
            events
                .iter()
                .all(|e| e == "[DONE]" || serde_json::from_str::<Value>(e).is_ok())
        );
        let stats = proxy.stats_after(1).await;
        assert_eq!(stats["totals"]["prompt_tokens"], 8, "chunks of {size}");
        assert_eq!(stats["totals"]["completion_tokens"], 3, "chunks of {size}");
    }
}

#[tokio::test]
async fn crlf_framed_streams_are_understood() {
    let mock = Mock::start(|_| {
        let events: Vec<String> = chat_stream("gpt-4o", &["x"], Some((4, 1)))
            .into_iter()
            .map(|e| e.replace("\n\n", "\r\n\r\n"))
            .collect();
        split_stream(&events, 5)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let text = proxy
        .chat("sk-crlf", &chat_request("gpt-4o", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"choices\":[]"));
    assert!(text.ends_with("data: [DONE]\r\n\r\n"));
    assert_eq!(proxy.stats_after(1).await["totals"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn stream_without_any_usage_is_estimated_from_its_text() {
    let words = ["Hello", ",", " world", "!"];
    let mock = Mock::start(move |_| Reply::sse(&chat_stream("local-llama", &words, None))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let events = sse_data(
        proxy
            .chat("sk-none", &chat_request("local-llama", true))
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id("sk-none"), "local-llama");
    assert_eq!(entry["requests"], 1);
    assert_eq!(entry["estimated_requests"], 1);
    // "Hello, world!" is 4 tokens; the prompt is its one message "hi" with the chat framing
    // (3 tokens per message, 3 to prime the reply).
    assert_eq!(entry["completion_tokens"], 4);
    let hi = llm_meter::usage::estimate::count("local-llama", "hi\n");
    assert_eq!(entry["prompt_tokens"], hi + 6);
    assert_eq!(entry["errors"], 0);
}

#[tokio::test]
async fn a_stream_still_sending_tokens_never_trips_the_idle_timeout() {
    let mock = Mock::start(|_| {
        let events = chat_stream(
            "gpt-4o",
            &["a", "b", "c", "d", "e", "f", "g", "h"],
            Some((3, 8)),
        );
        Reply::Stream {
            chunks: events
                .into_iter()
                .map(|e| Chunk {
                    bytes: Bytes::from(e),
                    delay: Duration::from_millis(60),
                    gate: None,
                })
                .collect(),
            then_cut: false,
            then_hang: false,
        }
    })
    .await;
    // The whole stream takes ~0.7 s, far longer than the 200 ms idle timeout.
    let proxy = Proxy::start_with(
        &mock.url(),
        "idle_timeout = \"200ms\"\nresponse_timeout = \"200ms\"",
    )
    .await;
    let events = sse_data(proxy.chat("sk-slow", &chat_request("gpt-4o", true)).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["completion_tokens"], 8);
    assert_eq!(stats["totals"]["errors"], 0);
}

#[tokio::test]
async fn an_upstream_gone_silent_mid_stream_is_cut_and_counted_as_an_error() {
    let mock = Mock::start(|_| Reply::Stream {
        chunks: chat_stream("gpt-4o", &["a"], None)[..2]
            .iter()
            .map(|e| Chunk::now(e.clone()))
            .collect(),
        then_cut: false,
        then_hang: true,
    })
    .await;
    let proxy = Proxy::start_with(&mock.url(), "idle_timeout = \"300ms\"").await;
    let response = proxy.chat("sk-silent", &chat_request("gpt-4o", true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.text().await.is_err(),
        "the client sees the stream end abnormally"
    );
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["errors"], 1);
    let entry = Proxy::model_of(&stats, &key_id("sk-silent"), "gpt-4o");
    assert_eq!(entry["requests"], 1);
}
