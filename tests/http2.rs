//! HTTP/2 to upstreams: used when a TLS upstream offers it by ALPN, its requests multiplexed
//! on one connection per worker, metered exactly as over HTTP/1.1, plain and streaming, with the
//! same rules for cut streams; `http2 = false` keeps HTTP/1.1, and a plain-text upstream speaks
//! HTTP/2 only with `http2 = "prior-knowledge"`.

mod common;

use bytes::Bytes;
use common::{
    Chunk, H2_AND_HTTP1, HTTP1_ONLY, Mock, Proxy, Reply, TestCa, chat_request, chat_stream,
    openai_like, sse_data,
};

/// A TLS mock upstream under a test CA offering `alpn`, and the settings that trust it.
async fn tls_upstream(alpn: &[&[u8]], dir: &std::path::Path) -> (Mock, String) {
    let ca = TestCa::new("Test Root");
    let mock = Mock::start_tls(openai_like, ca.server(&["localhost"], alpn)).await;
    let toml = format!("threads = 1\nca_file = {:?}\n", ca.write(dir, "ca.pem"));
    (mock, toml)
}

#[tokio::test]
async fn an_upstream_that_offers_http2_gets_it_and_is_metered_exactly_plain_and_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, toml) = tls_upstream(H2_AND_HTTP1, dir.path()).await;
    let proxy = Proxy::start_with(&mock.url(), &toml).await;

    let plain = proxy
        .chat(
            "sk-h2-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", false),
        )
        .await;
    assert_eq!(plain.status(), 200);
    assert_eq!(
        plain.version(),
        reqwest::Version::HTTP_11,
        "the client's side stays HTTP/1.1"
    );
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3);

    let stream = proxy
        .chat("sk-h2-aaaaaaaaaaaaaaaa", &chat_request("gpt-4o-mini", true))
        .await;
    assert_eq!(stream.status(), 200);
    assert_eq!(
        sse_data(stream).await.last().map(String::as_str),
        Some("[DONE]")
    );

    let stats = proxy.stats_after(2).await;
    assert_eq!(stats["totals"]["prompt_tokens"], 22);
    assert_eq!(stats["totals"]["completion_tokens"], 6);
    let received = mock.received();
    assert!(
        received.iter().all(|r| r.version == http::Version::HTTP_2),
        "{received:?}"
    );
    assert_eq!(received[0].path, "/v1/chat/completions");
    assert_eq!(
        received[0].headers.get("host"),
        None,
        "HTTP/2 names the host in :authority"
    );
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, toml) = tls_upstream(H2_AND_HTTP1, dir.path()).await;
    let proxy = Proxy::start_with(&mock.url(), &toml).await;
    let requests = (0..40).map(|i| {
        let proxy = &proxy;
        async move {
            let response = proxy
                .chat(
                    "sk-h2-aaaaaaaaaaaaaaaa",
                    &chat_request("gpt-4o-mini", i % 2 == 0),
                )
                .await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
    });
    futures_util::future::join_all(requests).await;
    let stats = proxy.stats_after(40).await;
    assert_eq!(stats["totals"]["prompt_tokens"], 40 * 11);
    assert_eq!(stats["totals"]["completion_tokens"], 40 * 3);
    assert_eq!(mock.connections(), 1, "one worker, one HTTP/2 connection");
}

#[tokio::test]
async fn http2_false_keeps_http1_and_an_upstream_that_offers_only_http1_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let (offers_both, toml) = tls_upstream(H2_AND_HTTP1, dir.path()).await;
    let proxy = Proxy::start_with(
        &offers_both.url(),
        &format!("{toml}[upstreams.openai]\nhttp2 = false\n"),
    )
    .await;
    let response = proxy
        .chat("sk-h1-aaaaaaaaaaaaaaaa", &chat_request("gpt-4o-mini", true))
        .await;
    response.bytes().await.unwrap();
    assert_eq!(offers_both.last().version, http::Version::HTTP_11);

    let (only_http1, toml) = tls_upstream(HTTP1_ONLY, dir.path()).await;
    let proxy = Proxy::start_with(&only_http1.url(), &toml).await;
    for _ in 0..3 {
        let response = proxy
            .chat(
                "sk-h1-aaaaaaaaaaaaaaaa",
                &chat_request("gpt-4o-mini", false),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert_eq!(only_http1.last().version, http::Version::HTTP_11);
    assert_eq!(proxy.stats_after(3).await["totals"]["completion_tokens"], 9);
    assert_eq!(only_http1.connections(), 1, "kept alive and reused");
}

#[tokio::test]
async fn a_plain_text_upstream_speaks_http2_only_with_prior_knowledge() {
    let mock = Mock::start_h2c(openai_like).await;
    let proxy = Proxy::start_with(&mock.url(), "").await;
    proxy
        .chat(
            "sk-h2c-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", false),
        )
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(mock.last().version, http::Version::HTTP_11);

    let proxy = Proxy::start_with(
        &mock.url(),
        "[upstreams.openai]\nhttp2 = \"prior-knowledge\"\n",
    )
    .await;
    let response = proxy
        .chat(
            "sk-h2c-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", true),
        )
        .await;
    assert_eq!(
        sse_data(response).await.last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(mock.last().version, http::Version::HTTP_2);
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 3);
}

#[tokio::test]
async fn a_stream_cut_over_http2_is_an_error_recorded_from_what_was_seen() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Test Root");
    let events = chat_stream("gpt-4o", &["a", "b"], None);
    let mock = Mock::start_tls(
        move |_| Reply::Stream {
            chunks: events[..2]
                .iter()
                .map(|e| Chunk::now(Bytes::from(e.clone())))
                .collect(),
            then_cut: true,
            then_hang: false,
        },
        ca.server(&["localhost"], H2_AND_HTTP1),
    )
    .await;
    let toml = format!("ca_file = {:?}", ca.write(dir.path(), "ca.pem"));
    let proxy = Proxy::start_with(&mock.url(), &toml).await;
    let response = proxy
        .chat("sk-cut-aaaaaaaaaaaaaaaa", &chat_request("gpt-4o", true))
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the client sees the cut");
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["errors"], 1);
    assert_eq!(mock.last().version, http::Version::HTTP_2);
    // The connection survives a reset stream: the next request goes on it.
    let again = proxy
        .chat("sk-cut-aaaaaaaaaaaaaaaa", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(again.status(), 200);
}
