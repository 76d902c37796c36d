//! Forwarding: requests reach the upstream as sent, responses reach the client as received.

mod common;

use bytes::Bytes;
use common::{Mock, Proxy, Received, Reply, chat_completion, chat_request};
use serde_json::{Value, json};

#[tokio::test]
async fn method_path_query_headers_and_body_reach_the_upstream() {
    let mock = Mock::start(|_| Reply::json(200, &json!({"ok": true}))).await;
    let proxy = Proxy::start(&mock.url()).await;

    let response = proxy
        .client
        .put(proxy.url("/v1/files/abc?purpose=batch&limit=2"))
        .header("authorization", "Bearer sk-forward-1234567890")
        .header("openai-organization", "org-1")
        .header("connection", "x-hop")
        .header("x-hop", "must not pass")
        .body("raw body bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let got = mock.last();
    assert_eq!(got.method, "PUT");
    assert_eq!(got.path, "/v1/files/abc?purpose=batch&limit=2");
    assert_eq!(got.body, Bytes::from_static(b"raw body bytes"));
    assert_eq!(got.headers["authorization"], "Bearer sk-forward-1234567890");
    assert_eq!(got.headers["openai-organization"], "org-1");
    assert!(got.headers.get("x-hop").is_none());
    assert_eq!(got.headers["host"], mock.addr.to_string());
}

#[tokio::test]
async fn plain_responses_reach_the_client_unchanged() {
    let body = chat_completion("gpt-4o", "exact bytes", 12, 4).to_string() + "\n";
    let reply_body = body.clone();
    let mock = Mock::start(move |_| Reply::Full {
        status: 201,
        headers: vec![
            ("content-type", "application/json; charset=utf-8".into()),
            ("x-request-id", "req-42".into()),
            ("openai-processing-ms", "17".into()),
        ],
        body: Bytes::from(reply_body.clone()),
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;

    let response = proxy.chat("sk-plain", &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    assert_eq!(response.headers()["openai-processing-ms"], "17");
    assert_eq!(
        response.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(response.headers()["content-length"], body.len().to_string());
    assert_eq!(response.text().await.unwrap(), body);
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["prompt_tokens"], 12);
}

#[tokio::test]
async fn metered_requests_ask_for_uncompressed_responses() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .header("accept-encoding", "gzip, br")
        .json(&chat_request("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_eq!(mock.last().headers["accept-encoding"], "identity");
}

#[tokio::test]
async fn other_routes_pass_through_unmetered() {
    let mock =
        Mock::start(|r: &Received| Reply::json(200, &json!({"object": "list", "path": r.path})))
            .await;
    let proxy = Proxy::start(&mock.url()).await;
    let models: Value = proxy.get_json("/v1/models").await;
    assert_eq!(models["path"], "/v1/models");
    let response = proxy
        .client
        .delete(proxy.url("/v1/files/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.stats().await["totals"]["requests"], 0);
}

#[tokio::test]
async fn large_non_chat_bodies_stream_through_intact() {
    let mock = Mock::start(|r: &Received| Reply::json(200, &json!({"len": r.body.len()}))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let payload: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response: Value = proxy
        .client
        .post(proxy.url("/v1/files"))
        .body(payload.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["len"], payload.len());
    assert_eq!(mock.last().body, Bytes::from(payload));
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    for _ in 0..20 {
        let response = proxy.chat("sk-pool", &chat_request("gpt-4o", false)).await;
        response.bytes().await.unwrap();
        let response = proxy.chat("sk-pool", &chat_request("gpt-4o", true)).await;
        response.bytes().await.unwrap();
    }
    assert_eq!(mock.received().len(), 40);
    assert_eq!(
        mock.connections(),
        1,
        "sequential requests share one upstream connection"
    );
}

#[tokio::test]
async fn upstream_base_path_is_kept() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&format!("http://{}/api/v1/", mock.addr)).await;
    proxy
        .chat_through("sk-base", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(mock.last().path, "/api/v1/chat/completions");
}

#[tokio::test]
async fn unknown_paths_get_an_openai_style_404() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = proxy
        .client
        .get(proxy.url("/v2/chat?key=secret-in-query"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_route");
    assert!(!body.to_string().contains("secret-in-query"));
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn request_model_is_used_when_the_response_names_none() {
    let mock = Mock::start(|_| {
        let mut body = chat_completion("x", "hi", 5, 1);
        body.as_object_mut().unwrap().remove("model");
        Reply::json(200, &body)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .chat_through("sk-model", &chat_request("gpt-4.1-mini", false))
        .await;
    let stats = proxy.stats_after(1).await;
    assert_eq!(
        stats["keys"][0]["models"]["gpt-4.1-mini"]["prompt_tokens"],
        5
    );
}
