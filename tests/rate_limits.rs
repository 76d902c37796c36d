//! Per-minute limits of a named key: requests and recorded tokens, 429 with `Retry-After`.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;

use common::{Mock, Proxy, Received, Reply, chat_completion};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};

const KEY: &str = "sk-limited-0123456789abcdef";

async fn start(mock: &Mock, limits: &str, clock: Arc<ShiftedClock>) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    let toml = format!("[keys.limited]\nkey_env = \"LIMITED_KEY\"\n{limits}");
    Proxy::start_guarded(&toml, flags, &[("LIMITED_KEY", KEY)], clock).await
}

/// Every answer reports `max_tokens` prompt tokens.
fn tokens_from_request(request: &Received) -> Reply {
    let prompt = request.json()["max_tokens"].as_u64().unwrap_or(10);
    Reply::json(200, &chat_completion("gpt-4o-mini", "ok", prompt, 0))
}

async fn chat(proxy: &Proxy, tokens: u64) -> reqwest::Response {
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn requests_per_minute_burst_then_refill() {
    let mock = Mock::start(tokens_from_request).await;
    let clock = Arc::new(ShiftedClock::default());
    let proxy = start(&mock, "requests_per_minute = 3\n", Arc::clone(&clock)).await;
    for _ in 0..3 {
        assert_eq!(chat(&proxy, 10).await.status(), 200);
    }
    let refused = chat(&proxy, 10).await;
    assert_eq!(refused.status(), 429);
    // One request back every 20 s.
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry_after), "{retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(
        body["error"]["limit"],
        json!({"unit": "requests", "per_minute": 3})
    );
    assert_eq!(mock.received().len(), 3);
    clock.advance(20);
    assert_eq!(chat(&proxy, 10).await.status(), 200);
    assert_eq!(chat(&proxy, 10).await.status(), 429);
}

#[tokio::test]
async fn tokens_per_minute_count_the_usage_recorded() {
    let mock = Mock::start(tokens_from_request).await;
    let clock = Arc::new(ShiftedClock::default());
    let proxy = start(&mock, "tokens_per_minute = 1000\n", Arc::clone(&clock)).await;
    // Admitted with its allowance intact, this request uses 1,500 tokens: 500 in debt.
    assert_eq!(chat(&proxy, 1_500).await.status(), 200);
    proxy.stats_after(1).await;
    let refused = chat(&proxy, 10).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 500 tokens of debt at 1,000 a minute: 30 s.
    assert!((30..=31).contains(&retry_after), "{retry_after}");
    clock.advance(31);
    assert_eq!(chat(&proxy, 10).await.status(), 200);
}

#[tokio::test]
async fn other_keys_are_not_limited() {
    let mock = Mock::start(tokens_from_request).await;
    let proxy = start(
        &mock,
        "requests_per_minute = 1\n",
        Arc::new(ShiftedClock::default()),
    )
    .await;
    assert_eq!(chat(&proxy, 10).await.status(), 200);
    assert_eq!(chat(&proxy, 10).await.status(), 429);
    for _ in 0..3 {
        let other = proxy
            .chat(
                "sk-unlimited-000000000",
                &common::chat_request("gpt-4o-mini", false),
            )
            .await;
        assert_eq!(other.status(), 200);
    }
}
