//! Graceful shutdown: in-flight streams finish within the grace period; past it, the server stops anyway.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Reply, chat_request, chat_stream};

fn slow_stream(delay: Duration, hang: bool) -> impl Fn(&common::Received) -> Reply {
    move |_| Reply::Stream {
        chunks: chat_stream("gpt-4o", &["a", "b", "c"], Some((5, 3)))
            .into_iter()
            .map(|e| Chunk {
                bytes: Bytes::from(e),
                delay,
                gate: None,
            })
            .collect(),
        then_cut: false,
        then_hang: hang,
    }
}

#[tokio::test]
async fn in_flight_streams_finish_after_the_shutdown_signal() {
    let mock = Mock::start(slow_stream(Duration::from_millis(100), false)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut response = proxy.chat("sk-drain", &chat_request("gpt-4o", true)).await;
    let first = response.chunk().await.unwrap().unwrap();
    let meter = std::sync::Arc::clone(&proxy.state.meter);

    #[expect(clippy::disallowed_methods, reason = "owned: awaited below")]
    let stopping = tokio::spawn(proxy.stop());
    let mut rest = first.to_vec();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8(rest)
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meter.snapshot().totals.completion_tokens, 3);
}

#[tokio::test]
async fn shutdown_does_not_wait_past_the_grace_period() {
    let mock = Mock::start(slow_stream(Duration::ZERO, true)).await;
    let proxy = Proxy::start_with(&mock.url(), "shutdown_grace = \"300ms\"").await;
    let mut response = proxy.chat("sk-stuck", &chat_request("gpt-4o", true)).await;
    response.chunk().await.unwrap();

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.stop())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}
