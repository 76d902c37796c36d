//! Pricing: configured and built-in prices, snapshots, unpriced models.

mod common;

use common::{Mock, Proxy, Reply, chat_completion, chat_request};

const PRICES: &str = r#"
[pricing."house-model"]
input_per_million = 3.0
output_per_million = 15.0
cached_input_per_million = 0.3
"#;

fn fixed_usage(prompt: u64, completion: u64) -> impl Fn(&common::Received) -> Reply {
    move |r: &common::Received| {
        let model = r.json()["model"].as_str().expect("a model").to_owned();
        Reply::json(200, &chat_completion(&model, "x", prompt, completion))
    }
}

#[tokio::test]
async fn configured_price_gives_the_worked_costs() {
    let mock = Mock::start(fixed_usage(1_000_000, 1_000_000)).await;
    let proxy = Proxy::start_with(&mock.url(), PRICES).await;
    proxy
        .chat_through("sk-price", &chat_request("house-model", false))
        .await;
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["cost_usd"], 18.0);
    assert_eq!(stats["totals"]["cost_nano_usd"], 18_000_000_000u64);

    let mock = Mock::start(fixed_usage(1_000, 200)).await;
    let proxy = Proxy::start_with(&mock.url(), PRICES).await;
    proxy
        .chat_through("sk-price", &chat_request("house-model", false))
        .await;
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["cost_usd"], 0.006);
}

#[tokio::test]
async fn cached_tokens_are_billed_at_the_cached_price() {
    let mock = Mock::start(|_| {
        let mut body = chat_completion("house-model", "x", 1_000, 0);
        body["usage"]["prompt_tokens_details"]["cached_tokens"] = 800.into();
        Reply::json(200, &body)
    })
    .await;
    let proxy = Proxy::start_with(&mock.url(), PRICES).await;
    proxy
        .chat_through("sk-cache", &chat_request("house-model", false))
        .await;
    let stats = proxy.stats_after(1).await;
    // 200 x $3/M + 800 x $0.30/M = $0.00084
    assert_eq!(stats["totals"]["cost_nano_usd"], 840_000);
    assert_eq!(stats["totals"]["cached_tokens"], 800);
    assert_eq!(stats["totals"]["prompt_tokens"], 1_000);
}

#[tokio::test]
async fn dated_snapshots_are_priced_as_their_base_model() {
    let mock = Mock::start(fixed_usage(1_000_000, 0)).await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .chat_through("sk-snap", &chat_request("gpt-4o-2024-08-06", false))
        .await;
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["cost_usd"], 2.5);
    assert_eq!(
        stats["keys"][0]["models"]["gpt-4o-2024-08-06"]["unpriced_requests"],
        0
    );
}

#[tokio::test]
async fn unpriced_models_count_tokens_and_are_flagged_not_free() {
    let mock = Mock::start(fixed_usage(50, 5)).await;
    let proxy = Proxy::start(&mock.url()).await;
    for _ in 0..2 {
        proxy
            .chat_through("sk-unpriced", &chat_request("my-local-llama", false))
            .await;
    }
    let stats = proxy.stats_after(2).await;
    let entry = &stats["keys"][0]["models"]["my-local-llama"];
    assert_eq!(entry["prompt_tokens"], 100);
    assert_eq!(entry["cost_usd"], 0.0);
    assert_eq!(entry["unpriced_requests"], 2);
    assert_eq!(stats["totals"]["unpriced_requests"], 2);
    let text = proxy.get_text("/stats?format=text").await;
    assert!(
        text.contains("cost: unknown (2 unpriced requests)"),
        "{text}"
    );
}
