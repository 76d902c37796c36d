//! Worker threads: connections are spread over the workers, each worker keeps its own upstream
//! connections, every request is metered whichever worker served it, and shutdown drains them all.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Reply, chat_request, chat_stream, client, key_id};

/// Two client connections held open at once, each sending one plain request.
async fn two_open_connections(proxy: &Proxy) {
    let (first, second) = (client(), client());
    for c in [&first, &second] {
        let answer = c
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth("sk-workers")
            .json(&chat_request("gpt-4o", false))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
    }
    drop((first, second));
}

#[tokio::test]
async fn a_second_connection_is_served_by_another_worker_with_its_own_upstream_pool() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "threads = 2").await;
    two_open_connections(&proxy).await;
    // The first client connection is on worker 0, the second on worker 1, whose pool does not
    // hold worker 0's idle upstream connection.
    assert_eq!(mock.connections(), 2);
    assert_eq!(proxy.stats_after(2).await["totals"]["requests"], 2);
}

#[tokio::test]
async fn one_worker_shares_its_upstream_connection_between_client_connections() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "threads = 1").await;
    two_open_connections(&proxy).await;
    assert_eq!(mock.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_many_connections_over_three_workers_are_all_metered() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "threads = 3").await;
    let url = proxy.url("/v1/chat/completions");
    let mut clients = Vec::new();
    for n in 0..6 {
        let url = url.clone();
        #[expect(clippy::disallowed_methods, reason = "owned: joined below")]
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut streamed = 0;
            for i in 0..20 {
                let stream = (n + i) % 2 == 0;
                let answer = c
                    .post(&url)
                    .bearer_auth(format!("sk-client-{}", n % 2))
                    .json(&chat_request("gpt-4o", stream))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200);
                let body = answer.bytes().await.unwrap();
                if stream {
                    streamed += 1;
                    assert!(body.ends_with(b"data: [DONE]\n\n"));
                }
            }
            streamed
        }));
    }
    let mut streamed = 0;
    for c in clients {
        streamed += c.await.unwrap();
    }
    assert_eq!(streamed, 60);
    let stats = proxy.stats_after(120).await;
    assert_eq!(stats["totals"]["requests"], 120);
    assert_eq!(mock.received().len(), 120);
    assert!(mock.connections() >= 3, "each worker opened its own");
    let keys = stats["keys"].as_array().unwrap();
    for n in 0..2 {
        let id = key_id(&format!("sk-client-{n}"));
        let key = keys.iter().find(|k| k["id"] == id.as_str()).unwrap();
        assert_eq!(key["requests"], 60, "{stats}");
    }
    // The mock counts 11 prompt and 3 completion tokens for each, streamed or not.
    assert_eq!(stats["totals"]["prompt_tokens"], 120 * 11);
    assert_eq!(stats["totals"]["completion_tokens"], 120 * 3);
}

#[tokio::test]
async fn shutdown_waits_for_a_stream_on_another_worker_and_records_it() {
    let slow = |_: &common::Received| Reply::Stream {
        chunks: chat_stream("gpt-4o", &["a", "b", "c"], Some((5, 3)))
            .into_iter()
            .map(|e| Chunk {
                bytes: Bytes::from(e),
                delay: Duration::from_millis(100),
                gate: None,
            })
            .collect(),
        then_cut: false,
        then_hang: false,
    };
    let mock = Mock::start(slow).await;
    let proxy = Proxy::start_with(&mock.url(), "threads = 2").await;
    // Holding a connection open on worker 0 puts the stream's on worker 1.
    let idle = client();
    let healthy = idle.get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(healthy.status(), 200);
    let mut response = proxy.chat("sk-drain", &chat_request("gpt-4o", true)).await;
    response.chunk().await.unwrap().unwrap();
    let meter = std::sync::Arc::clone(&proxy.state.meter);

    #[expect(clippy::disallowed_methods, reason = "owned: awaited below")]
    let stopping = tokio::spawn(proxy.stop());
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meter.snapshot().totals.completion_tokens, 3);
}
