//! The stats API: totals per key and model, text view, reset, health, exact under concurrency.

mod common;

use common::{Mock, Proxy, chat_request, key_id};
use serde_json::{Value, json};

#[tokio::test]
async fn stats_json_has_totals_keys_and_models() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let fresh = proxy.stats().await;
    assert_eq!(fresh["totals"]["requests"], 0);
    assert_eq!(fresh["keys"], json!([]));
    assert!(time_is_rfc3339(&fresh["since"]));

    proxy
        .chat_through(
            "sk-alpha-00000000000000000001",
            &chat_request("gpt-4o", false),
        )
        .await;
    proxy
        .chat_through(
            "sk-alpha-00000000000000000001",
            &chat_request("gpt-4o-mini", true),
        )
        .await;
    proxy
        .chat_through(
            "sk-beta-000000000000000000002",
            &chat_request("gpt-4o", false),
        )
        .await;
    let stats = proxy.stats_after(3).await;

    assert_eq!(stats["totals"]["requests"], 3);
    assert_eq!(stats["totals"]["prompt_tokens"], 33);
    assert_eq!(stats["totals"]["completion_tokens"], 9);
    assert_eq!(stats["totals"]["total_tokens"], 42);
    let keys = stats["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let alpha = keys
        .iter()
        .find(|k| k["id"] == key_id("sk-alpha-00000000000000000001"))
        .unwrap();
    assert_eq!(alpha["key"], "sk-…0001");
    assert_eq!(alpha["requests"], 2);
    let models = alpha["models"].as_object().unwrap();
    assert_eq!(models.len(), 2);
    for field in [
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_requests",
    ] {
        assert!(models["gpt-4o"].get(field).is_some(), "missing {field}");
        assert!(alpha.get(field).is_some(), "missing {field} on key");
        assert!(
            stats["totals"].get(field).is_some(),
            "missing {field} in totals"
        );
    }
    // gpt-4o: 11 x $2.50/M + 3 x $10/M = $0.0000575
    assert_eq!(models["gpt-4o"]["cost_nano_usd"], 57_500);
    assert_eq!(models["gpt-4o"]["cost_usd"], 0.0000575);
}

fn time_is_rfc3339(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

#[tokio::test]
async fn stats_text_has_one_line_per_key_and_the_totals() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    for key in ["sk-text-one-000000000000000", "sk-text-two-000000000000000"] {
        proxy
            .chat_through(key, &chat_request("gpt-4o", false))
            .await;
    }
    proxy.stats_after(2).await;
    let text = proxy.get_text("/stats?format=text").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines[..2] {
        assert!(line.starts_with("sk-text-…0000 ["), "{line}");
        assert!(
            line.ends_with("1 request, 0 errors | tokens: 11 in + 3 out | cost: $0.0000575"),
            "{line}"
        );
    }
    assert!(lines[2].starts_with("total since "), "{}", lines[2]);
    assert!(
        lines[2].ends_with("2 requests, 0 errors | tokens: 22 in + 6 out | cost: $0.000115"),
        "{}",
        lines[2]
    );

    let bad = proxy
        .client
        .get(proxy.url("/stats?format=xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn reset_zeroes_the_totals_and_returns_the_closed_period() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .chat_through("sk-reset", &chat_request("gpt-4o", false))
        .await;
    let before = proxy.stats_after(1).await;

    let closed = proxy.reset().await;
    assert_eq!(closed["totals"]["requests"], 1);
    let after = proxy.stats().await;
    assert_eq!(after["totals"]["requests"], 0);
    assert_eq!(after["keys"], json!([]));
    assert!(after["since"].as_str() >= before["since"].as_str());
}

#[tokio::test]
async fn reset_requires_the_admin_token_when_one_is_configured() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "admin_token = \"admin-secret-token\"").await;
    proxy
        .chat_through("sk-guarded", &chat_request("gpt-4o", false))
        .await;
    proxy.stats_after(1).await;

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("admin-secret-token"),
        Some("Bearer admin-secret-tokenX"),
    ] {
        let mut request = proxy.client.post(proxy.url("/stats/reset"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_admin_token");
    }
    assert_eq!(proxy.stats().await["totals"]["requests"], 1);

    let ok = proxy
        .client
        .post(proxy.url("/stats/reset"))
        .bearer_auth("admin-secret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(proxy.stats().await["totals"]["requests"], 0);
}

#[tokio::test]
async fn healthz_answers_ok() {
    let proxy = Proxy::start("http://127.0.0.1:9/v1").await;
    let response = proxy
        .client
        .get(proxy.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_over_ten_keys_give_exact_totals() {
    let mock = Mock::openai().await;
    let proxy = std::sync::Arc::new(Proxy::start(&mock.url()).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let proxy = std::sync::Arc::clone(&proxy);
        tasks.spawn(async move {
            let key = format!("sk-load-key-{:02}-000000000000", i % 10);
            let model = if i % 3 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
            let body = chat_request(model, i % 2 == 0);
            let response = proxy.chat(&key, &body).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let stats = proxy.stats_after(1000).await;
    assert_eq!(stats["totals"]["requests"], 1000);
    assert_eq!(stats["totals"]["errors"], 0);
    assert_eq!(stats["totals"]["prompt_tokens"], 11_000);
    assert_eq!(stats["totals"]["completion_tokens"], 3_000);
    let keys = stats["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 10);
    for key in keys {
        assert_eq!(key["requests"], 100);
        assert_eq!(key["prompt_tokens"], 1_100);
    }
    // 334 gpt-4o requests at 57,500 n$ and 666 gpt-4o-mini at 11 x 150 + 3 x 600 = 3,450 n$.
    assert_eq!(stats["totals"]["cost_nano_usd"], 334 * 57_500 + 666 * 3_450);
}
