//! Keys and privacy: callers are told apart by key, and a full key never shows in /stats or logs.

mod common;

use common::{Binary, Mock, Proxy, Reply, binary_command, chat_request, key_id};
use serde_json::json;

const SECRET: &str = "sk-proj-SECRETabcdefghijklmnopqrstuvwxyz0123456789";
const PROMPT: &str = "PRIVATE-PROMPT-TEXT";

/// The longest run of a key that a label may show is 8 + 4 characters; any 10 in the middle are secret.
fn secret_middle() -> &'static str {
    &SECRET[10..30]
}

#[tokio::test]
async fn the_full_key_never_appears_in_stats() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .chat_through(SECRET, &chat_request("gpt-4o", false))
        .await;
    proxy
        .chat_through(SECRET, &chat_request("gpt-4o", true))
        .await;
    let stats = proxy.stats_after(2).await.to_string();
    let text = proxy.get_text("/stats?format=text").await;
    for view in [&stats, &text] {
        assert!(!view.contains(secret_middle()), "{view}");
        assert!(view.contains("sk-proj-…6789"), "{view}");
        assert!(view.contains(&key_id(SECRET)), "{view}");
    }
}

#[tokio::test]
async fn each_key_source_is_told_apart_and_keyless_calls_are_anonymous() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let url = proxy.url("/v1/chat/completions");
    let body = chat_request("gpt-4o", false);
    let c = &proxy.client;
    c.post(&url)
        .bearer_auth("key-bearer-000000000000")
        .json(&body)
        .send()
        .await
        .unwrap();
    c.post(&url)
        .header("x-api-key", "key-xapi-00000000000000")
        .json(&body)
        .send()
        .await
        .unwrap();
    c.post(&url)
        .header("api-key", "key-azure-0000000000000")
        .json(&body)
        .send()
        .await
        .unwrap();
    c.post(&url).json(&body).send().await.unwrap();
    let stats = proxy.stats_after(4).await;
    let mut ids: Vec<String> = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![
        key_id("key-bearer-000000000000"),
        key_id("key-xapi-00000000000000"),
        key_id("key-azure-0000000000000"),
        "anonymous".to_owned(),
    ];
    expected.sort();
    assert_eq!(ids, expected);
    // The client's key went upstream unchanged.
    assert_eq!(
        mock.received()[0].headers["authorization"],
        "Bearer key-bearer-000000000000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_key_and_bodies_never_appear_in_logs_even_at_trace_level() {
    let mock = Mock::start(|r: &common::Received| {
        if r.path.starts_with("/v1/fail") {
            Reply::json(500, &json!({"error": {"message": "boom"}}))
        } else {
            common::openai_like(r)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut logs = String::new();
    for (upstream, format) in [
        (mock.url(), "text"),
        ("http://127.0.0.1:9/v1".to_owned(), "json"),
    ] {
        let mut command = binary_command(dir.path());
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &upstream,
                "--log-format",
                format,
            ])
            .env("RUST_LOG", "trace")
            .env("LLM_METER_ANTHROPIC_UPSTREAM", &upstream);
        let binary = Binary::start(command);
        let client = common::client();
        let mut body = chat_request("gpt-4o", false);
        body["messages"][0]["content"] = json!(PROMPT);
        for stream in [false, true] {
            body["stream"] = json!(stream);
            client
                .post(binary.url("/v1/chat/completions"))
                .bearer_auth(SECRET)
                .json(&body)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
        client
            .post(binary.url("/v1/chat/completions"))
            .header("x-api-key", SECRET)
            .json(&body)
            .send()
            .await
            .unwrap();
        body["stream"] = json!(false);
        client
            .post(binary.url("/anthropic/v1/messages"))
            .header("x-api-key", SECRET)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        client
            .get(binary.url(&format!("/v1/models?key={SECRET}")))
            .send()
            .await
            .unwrap();
        client
            .post(binary.url("/v1/fail"))
            .bearer_auth(SECRET)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        client
            .post(binary.url("/stats/reset"))
            .bearer_auth(SECRET)
            .send()
            .await
            .unwrap();
        let (ok, _, stderr) = binary.terminate();
        assert!(ok);
        logs.push_str(&stderr);
    }
    // The logs are there, at trace level, with the key's id ...
    assert!(logs.contains(&key_id(SECRET)), "{logs}");
    assert!(logs.contains("key=REDACTED"), "{logs}");
    assert!(logs.lines().count() > 20, "{logs}");
    // ... and nothing secret.
    assert!(!logs.contains(secret_middle()), "key leaked into logs");
    assert!(!logs.contains(PROMPT), "body leaked into logs");
}
