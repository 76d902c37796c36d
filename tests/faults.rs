//! Faults: upstream down, hanging, failing or cut; bad bodies; clients that leave. The proxy stays up.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Chunk, Mock, Proxy, Reply, chat_request, chat_stream, key_id};
use serde_json::{Value, json};

async fn error_body(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    body
}

#[tokio::test]
async fn unreachable_upstream_gives_502_with_an_openai_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let proxy = Proxy::start(&format!("http://127.0.0.1:{port}/v1")).await;
    let response = proxy
        .chat("sk-down-secret-1234567890", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(response.status(), 502);
    let body = error_body(response).await;
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!body.to_string().contains("sk-down-secret"));

    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["errors"], 1);
    assert_eq!(
        Proxy::model_of(&stats, &key_id("sk-down-secret-1234567890"), "gpt-4o")["requests"],
        1
    );
    // Still serving.
    assert_eq!(
        proxy
            .client
            .get(proxy.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn hanging_upstream_gives_504_after_the_response_timeout() {
    let mock = Mock::start(|_| Reply::Hang).await;
    let proxy = Proxy::start_with(&mock.url(), "response_timeout = \"300ms\"").await;
    let started = std::time::Instant::now();
    let response = proxy.chat("sk-hang", &chat_request("gpt-4o", true)).await;
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = error_body(response).await;
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(body["error"]["message"].as_str().unwrap().contains("300ms"));
    assert_eq!(proxy.stats_after(1).await["totals"]["errors"], 1);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged_and_count_as_errors() {
    for (status, retry_after) in [(500, None), (429, Some("7")), (400, None)] {
        let mock = Mock::start(move |_| Reply::Full {
            status,
            headers: [("content-type", "application/json".to_owned())]
                .into_iter()
                .chain(retry_after.map(|v| ("retry-after", v.to_owned())))
                .collect(),
            body: Bytes::from(
                json!({"error": {"message": "upstream says no", "type": "x", "code": status}})
                    .to_string(),
            ),
        })
        .await;
        let proxy = Proxy::start(&mock.url()).await;
        let response = proxy
            .chat("sk-err", &chat_request("gpt-4o", status == 429))
            .await;
        assert_eq!(response.status().as_u16(), status);
        if let Some(v) = retry_after {
            assert_eq!(response.headers()["retry-after"], v);
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["message"], "upstream says no");
        let stats = proxy.stats_after(1).await;
        let entry = Proxy::model_of(&stats, &key_id("sk-err"), "gpt-4o");
        assert_eq!(entry["requests"], 1, "{status}");
        assert_eq!(entry["errors"], 1, "{status}");
        assert_eq!(entry["total_tokens"], 0, "{status}");
    }
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_the_upstream() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "max_body_bytes = 1000").await;
    let mut big = chat_request("gpt-4o", false);
    big["messages"][0]["content"] = json!("x".repeat(2000));

    let response = proxy.chat("sk-big", &big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        error_body(response).await["error"]["code"],
        "request_too_large"
    );

    let response = proxy
        .client
        .post(proxy.url("/v1/files"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // No Content-Length: the limit is enforced while streaming.
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 100])));
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(mock.received().is_empty());

    let ok = proxy.chat("sk-big", &chat_request("gpt-4o", false)).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_client_leaving_mid_stream_affects_nothing_else() {
    let mock = Mock::start(|r: &common::Received| {
        if r.json()["model"] == "slow" {
            let events = chat_stream("slow", &["a", "b", "c"], Some((5, 3)));
            Reply::Stream {
                chunks: events
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| Chunk {
                        bytes: Bytes::from(e),
                        delay: Duration::from_millis(if i == 0 { 0 } else { 200 }),
                        gate: None,
                    })
                    .collect(),
                then_cut: false,
                then_hang: false,
            }
        } else {
            common::openai_like(r)
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;

    let mut response = proxy.chat("sk-leaver", &chat_request("slow", true)).await;
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);

    // The request is recorded (partial: no usage was seen), and others are served as before.
    let stats = proxy.stats_after(1).await;
    assert_eq!(
        Proxy::model_of(&stats, &key_id("sk-leaver"), "slow")["requests"],
        1
    );
    let again = proxy.chat("sk-stayer", &chat_request("gpt-4o", true)).await;
    assert_eq!(again.status(), 200);
    again.bytes().await.unwrap();
    assert_eq!(proxy.stats_after(2).await["totals"]["completion_tokens"], 3);
}

#[tokio::test]
async fn an_upstream_cut_mid_stream_is_an_error_the_client_sees() {
    let mock = Mock::start(|_| Reply::Stream {
        chunks: chat_stream("gpt-4o", &["a"], None)[..2]
            .iter()
            .map(|e| Chunk::now(e.clone()))
            .collect(),
        then_cut: true,
        then_hang: false,
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy.chat("sk-cut", &chat_request("gpt-4o", true)).await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["errors"], 1);
}

#[tokio::test]
async fn bogus_usage_and_non_json_bodies_pass_through_and_are_counted() {
    let bodies = [
        r#"{"model":"gpt-4o","usage":{"prompt_tokens":"ten","completion_tokens":-5}}"#,
        r#"{"model":"gpt-4o","usage":{"prompt_tokens":1e300,"completion_tokens":2}}"#,
        r#"{"model":["gpt-4o"],"usage":[]}"#,
        "<html>bad gateway page</html>",
        "",
    ];
    let mock = Mock::start(move |r: &common::Received| {
        let i = r.json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .parse::<usize>()
            .unwrap();
        Reply::Full {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(bodies[i]),
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    for (i, body) in bodies.iter().enumerate() {
        let mut request = chat_request("gpt-4o", false);
        request["messages"][0]["content"] = json!(i.to_string());
        let response = proxy.chat("sk-bogus", &request).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), *body);
    }
    let stats = proxy.stats_after(bodies.len() as u64).await;
    assert_eq!(stats["totals"]["requests"], bodies.len());
    // Only the one sane field of the two usage objects counts: the second body's
    // completion_tokens. The usage that is a list is no usage, and the two bodies that are not
    // JSON have none: those three are estimated (their prompts are counted by the tokenizer,
    // and they returned no text).
    assert_eq!(stats["totals"]["completion_tokens"], 2);
    assert_eq!(stats["totals"]["estimated_requests"], 3);
    assert!(stats["totals"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_truncated_stream_is_forwarded_as_is_and_counted() {
    let mock = Mock::start(|_| {
        let all = chat_stream("gpt-4o", &["a", "b"], Some((4, 2))).concat();
        Reply::sse(&[all[..all.len() / 2].to_owned()])
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let mut body = chat_request("gpt-4o", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = proxy.chat("sk-trunc", &body).await.text().await.unwrap();
    let all = chat_stream("gpt-4o", &["a", "b"], Some((4, 2))).concat();
    assert_eq!(text, all[..all.len() / 2]);
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["requests"], 1);
}

#[tokio::test]
async fn invalid_json_requests_are_forwarded_untouched() {
    let mock = Mock::start(|_| Reply::json(400, &json!({"error": {"message": "bad json"}}))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"stream\": true, oops")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        mock.last().body,
        Bytes::from_static(b"{\"stream\": true, oops")
    );
    assert_eq!(proxy.stats_after(1).await["totals"]["errors"], 1);
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_is_still_counted_and_not_an_error() {
    let mock = Mock::start(|_| Reply::Hang).await;
    let proxy = Proxy::start(&mock.url()).await;
    let gave_up = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth("sk-impatient")
        .json(&chat_request("gpt-4o", false))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err());
    // The upstream got the request and may bill it: it is counted, with its model.
    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id("sk-impatient"), "gpt-4o");
    assert_eq!(entry["requests"], 1);
    assert_eq!(entry["errors"], 0);
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test]
async fn an_https_upstream_that_fails_the_tls_handshake_gives_502() {
    // The mock speaks plain HTTP, so rustls's handshake with it fails.
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&format!("https://{}/v1", mock.addr)).await;
    let response = proxy.chat("sk-tls", &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 502);
    let body = error_body(response).await;
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("https://"),
        "{body}"
    );
}

#[tokio::test]
async fn connections_the_upstream_closes_after_answering_are_not_reused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers one request per connection, then closes it without saying so (no
    // `Connection: close`), as an upstream whose idle timeout has passed does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    #[expect(clippy::disallowed_methods, reason = "ends with the test's runtime")]
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // The request's head and its (small) JSON body.
            while !request.ends_with(b"}") {
                let n = tcp.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let body = common::chat_completion("gpt-4o", "hi", 7, 2).to_string();
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(answer.as_bytes()).await.unwrap();
            drop(tcp);
        }
    });
    let proxy = Proxy::start(&format!("http://{addr}/v1")).await;
    for _ in 0..5 {
        let response = proxy
            .chat("sk-closing", &chat_request("gpt-4o", false))
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        // Time for the close to arrive, as it would while a connection sits idle.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    let stats = proxy.stats_after(5).await;
    assert_eq!(stats["totals"]["errors"], 0);
    assert_eq!(stats["totals"]["completion_tokens"], 10);
}
