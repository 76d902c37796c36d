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

/// The built-in table's entry `entry`, as the repository's data/prices.json has it.
fn listed(entry: &str) -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/prices.json");
    let text = std::fs::read_to_string(path).expect("data/prices.json is in the repository");
    let mut table: serde_json::Value = serde_json::from_str(&text).expect("it is JSON");
    table["models"][entry].take()
}

/// The built-in table's rates of `entry` in USD per token: (input, output).
fn listed_rates(entry: &str) -> (f64, f64) {
    let model = listed(entry);
    (
        model["input_cost_per_token"]
            .as_f64()
            .expect("an input rate"),
        model["output_cost_per_token"].as_f64().unwrap_or(0.0),
    )
}

/// Nano-dollars of 100,000 tokens each way at `rates` (USD per token): under every
/// long-context threshold.
fn hundred_thousand_each_way(rates: (f64, f64)) -> u64 {
    ((rates.0 + rates.1) * 1e14).round() as u64
}

#[tokio::test]
async fn the_names_users_meet_are_priced_out_of_the_box_at_the_files_price() {
    let mock = Mock::start(fixed_usage(100_000, 100_000)).await;
    let proxy = Proxy::start(&mock.url()).await;
    let names = [
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),
        ("deepseek-chat", "deepseek-chat"),
        ("mistral-large-latest", "mistral/mistral-large-latest"),
        ("gpt-5-codex", "gpt-5-codex"),
        (
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
        ),
        (
            "claude-sonnet-4-5@20250929",
            "vertex_ai/claude-sonnet-4-5@20250929",
        ),
        // A dated snapshot the file does not list, and retired names it keeps only elsewhere.
        ("gpt-5-codex-2025-09-15", "gpt-5-codex"),
        ("claude-3-5-sonnet", "vertex_ai/claude-3-5-sonnet"),
        ("anthropic/claude-3.5-sonnet", "vertex_ai/claude-3-5-sonnet"),
    ];
    for (name, _) in names {
        proxy
            .chat_through("sk-names", &chat_request(name, false))
            .await;
    }
    let stats = proxy.stats_after(names.len() as u64).await;
    for (name, entry) in names {
        let model = &stats["keys"][0]["models"][name];
        assert_eq!(model["unpriced_requests"], 0, "{name}");
        let expected = hundred_thousand_each_way(listed_rates(entry));
        assert!(expected > 0, "{entry}");
        assert_eq!(model["cost_nano_usd"], expected, "{name} priced as {entry}");
    }
    assert_eq!(stats["totals"]["unpriced_requests"], 0);
}

#[tokio::test]
async fn a_long_gemini_prompt_is_billed_whole_at_its_long_context_rate() {
    let mock = Mock::start(|_: &common::Received| {
        Reply::json(
            200,
            &serde_json::json!({
                "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 250_000, "candidatesTokenCount": 1_000, "totalTokenCount": 251_000},
                "modelVersion": "gemini-2.5-pro"
            }),
        )
    })
    .await;
    let toml = format!(
        "[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"{}\"\nflavor = \"gemini\"\n",
        mock.url()
    );
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let response = proxy
        .client
        .post(proxy.url("/gemini/v1beta/models/gemini-2.5-pro:generateContent"))
        .header("x-goog-api-key", "AIzaSy-long-context-test")
        .json(&serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "long"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = proxy.stats_after(1).await;
    let entry = listed("gemini-2.5-pro");
    let rate = |field: &str| entry[field].as_f64().unwrap();
    let long = 250_000.0 * rate("input_cost_per_token_above_200k_tokens")
        + 1_000.0 * rate("output_cost_per_token_above_200k_tokens");
    let short = 250_000.0 * rate("input_cost_per_token") + 1_000.0 * rate("output_cost_per_token");
    assert!(long > short);
    assert_eq!(
        stats["totals"]["cost_nano_usd"],
        (long * 1e9).round() as u64,
        "the whole request at the long-context rates"
    );
}

#[tokio::test]
async fn aliases_and_an_upstreams_multiplier_and_own_prices_apply() {
    let mock = Mock::start(fixed_usage(1_000_000, 0)).await;
    let toml = r#"
[models]
alias = { "my-gpt4o-deploy" = "gpt-4o" }
[upstreams.openai]
pricing_multiplier = 2.0
[upstreams.openai.pricing."house-exact"]
input_per_million = 1.0
output_per_million = 1.0
"#;
    let proxy = Proxy::start_with(&mock.url(), toml).await;
    for model in ["my-gpt4o-deploy", "house-exact"] {
        proxy
            .chat_through("sk-alias", &chat_request(model, false))
            .await;
    }
    let stats = proxy.stats_after(2).await;
    let models = &stats["keys"][0]["models"];
    let gpt4o_input = listed_rates("gpt-4o").0;
    assert_eq!(
        models["my-gpt4o-deploy"]["cost_nano_usd"],
        (2.0 * gpt4o_input * 1e15).round() as u64,
        "the alias's entry, times the upstream's multiplier"
    );
    assert_eq!(
        models["house-exact"]["cost_nano_usd"], 1_000_000_000,
        "the upstream's own price, exact"
    );
}

#[tokio::test]
async fn a_dated_price_applies_from_its_date_on() {
    let mock = Mock::start(fixed_usage(1_000_000, 0)).await;
    let toml = r#"
[[pricing."house-dated"]]
input_per_million = 1.0
output_per_million = 1.0
since = 2020-01-01
[[pricing."house-dated"]]
input_per_million = 7.0
output_per_million = 7.0
since = 2999-01-01
[[pricing."gpt-4o"]]
input_per_million = 100.0
output_per_million = 100.0
since = 2999-01-01
"#;
    let proxy = Proxy::start_with(&mock.url(), toml).await;
    for model in ["house-dated", "gpt-4o"] {
        proxy
            .chat_through("sk-dated", &chat_request(model, false))
            .await;
    }
    let stats = proxy.stats_after(2).await;
    let models = &stats["keys"][0]["models"];
    assert_eq!(models["house-dated"]["cost_nano_usd"], 1_000_000_000);
    // Not yet in force: the built-in price still applies.
    assert_eq!(
        models["gpt-4o"]["cost_nano_usd"],
        (listed_rates("gpt-4o").0 * 1e15).round() as u64
    );
}

#[tokio::test]
async fn an_anthropic_one_hour_cache_write_is_billed_at_its_own_rate() {
    let mock = Mock::start(|_: &common::Received| {
        Reply::json(
            200,
            &serde_json::json!({"id": "msg_1h", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 300,
                    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
                    "cache_read_input_tokens": 0, "output_tokens": 10}}),
        )
    })
    .await;
    let toml = format!("[upstreams.anthropic]\nurl = \"{}\"\n", mock.url());
    let proxy = Proxy::start_with("http://127.0.0.1:9/v1", &toml).await;
    let response = proxy
        .client
        .post(proxy.url("/anthropic/v1/messages"))
        .header("x-api-key", "sk-ant-one-hour")
        .header("anthropic-version", "2023-06-01")
        .json(
            &serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = proxy.stats_after(1).await;
    let entry = listed("claude-sonnet-4-5");
    let rate = |field: &str| entry[field].as_f64().expect(field);
    let one_hour = rate("cache_creation_input_token_cost_above_1hr");
    assert!(one_hour > rate("cache_creation_input_token_cost"));
    let expected = 10.0 * rate("input_cost_per_token")
        + 100.0 * rate("cache_creation_input_token_cost")
        + 200.0 * one_hour
        + 10.0 * rate("output_cost_per_token");
    assert_eq!(
        stats["totals"]["cost_nano_usd"],
        (expected * 1e9).round() as u64
    );
    assert_eq!(stats["totals"]["cache_write_tokens"], 300);
    assert_eq!(stats["totals"]["cache_write_1h_tokens"], 200);
}

#[tokio::test]
async fn a_response_in_the_priority_tier_is_billed_at_its_rates() {
    let mock = Mock::start(|r: &common::Received| {
        let model = r.json()["model"].as_str().expect("a model").to_owned();
        let mut body = chat_completion(&model, "x", 1_000_000, 0);
        body["service_tier"] = "priority".into();
        Reply::json(200, &body)
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    proxy
        .chat_through("sk-priority", &chat_request("gpt-4o", false))
        .await;
    let stats = proxy.stats_after(1).await;
    let priority = listed("gpt-4o")["input_cost_per_token_priority"]
        .as_f64()
        .expect("gpt-4o has a priority rate");
    assert!(priority > listed_rates("gpt-4o").0);
    assert_eq!(
        stats["totals"]["cost_nano_usd"],
        (priority * 1e15).round() as u64
    );
}
