//! Budgets: a named key (or all keys) over its budget gets a 429 with a clear body before any
//! upstream call; the next period admits again; spend survives a restart; thresholds alert once.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Chunk, Mock, Proxy, Received, Reply, chat_completion, key_id};
use llm_meter::config::Flags;
use llm_meter::guard::period::{Clock, ShiftedClock};
use serde_json::{Value, json};

const AGENT_A: &str = "sk-agent-a-0123456789abcdef";
const AGENT_B: &str = "sk-agent-b-0123456789abcdef";

/// Answers every chat with `max_tokens` prompt tokens of gpt-4o: 100,000 tokens cost $0.25.
fn priced_by_max_tokens(request: &Received) -> Reply {
    let body = request.json();
    let prompt = body["max_tokens"].as_u64().unwrap_or(10);
    Reply::json(200, &chat_completion("gpt-4o", "ok", prompt, 0))
}

fn sha256_hex(key: &str) -> String {
    llm_meter::key::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Two named keys, agent-a with a $1 daily budget; `extra` goes first (top-level settings).
fn two_agents(extra: &str) -> String {
    format!(
        "{extra}\n[keys.agent-a]\nkey_sha256 = \"{}\"\ndaily_usd = 1.0\n[keys.agent-b]\nkey_sha256 = \"{}\"\n",
        sha256_hex(AGENT_A),
        sha256_hex(AGENT_B)
    )
}

async fn start(mock: &Mock, toml: &str, clock: Arc<ShiftedClock>) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    Proxy::start_guarded(toml, flags, &[], clock).await
}

/// A chat costing `usd` (in steps of $0.25 per 100,000 prompt tokens of gpt-4o).
async fn spend(proxy: &Proxy, key: &str, usd: f64) -> reqwest::Response {
    let tokens = (usd / 2.5 * 1_000_000.0).round() as u64;
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o", "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_key_over_its_daily_budget_gets_a_429_before_any_upstream_call() {
    let mock = Mock::start(priced_by_max_tokens).await;
    let clock = Arc::new(ShiftedClock::default());
    let proxy = start(&mock, &two_agents(""), Arc::clone(&clock)).await;
    for _ in 0..4 {
        assert_eq!(spend(&proxy, AGENT_A, 0.25).await.status(), 200);
    }
    let refused = spend(&proxy, AGENT_A, 0.25).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let body: Value = refused.json().await.unwrap();
    let tomorrow = clock
        .now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date()
        .tomorrow()
        .unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": format!("llm-meter: the daily budget of key \"agent-a\" is spent: $1.00 of $1.00; it resets at {tomorrow}T00:00:00Z"),
            "type": "budget_exceeded", "code": "budget_exceeded", "param": null,
            "budget": {"scope": "agent-a", "period": "daily", "limit_usd": 1.0, "spent_usd": 1.0,
                       "resets_at": format!("{tomorrow}T00:00:00Z")}}})
    );
    assert_eq!(
        mock.received().len(),
        4,
        "the refused request never reached the upstream"
    );

    // Another agent's key keeps working, and /stats shows both, the first with its budget spent.
    assert_eq!(spend(&proxy, AGENT_B, 0.25).await.status(), 200);
    let stats = proxy.stats_after(5).await;
    let keys = stats["keys"].as_array().unwrap();
    let a = keys.iter().find(|k| k["key"] == "agent-a").unwrap();
    let b = keys.iter().find(|k| k["key"] == "agent-b").unwrap();
    assert_eq!(a["id"], key_id(AGENT_A));
    assert_eq!(a["cost_usd"], 1.0);
    assert_eq!(
        a["budget"],
        json!([{"period": "daily", "limit_usd": 1.0, "spent_usd": 1.0, "remaining_usd": 0.0,
                "resets_at": format!("{tomorrow}T00:00:00Z")}])
    );
    assert_eq!(b["cost_usd"], 0.25);
    assert!(b.get("budget").is_none(), "no budget, no budget field: {b}");
    let text = proxy.get_text("/stats?format=text").await;
    assert!(text.contains("budget left: daily $0.00 of $1.00"), "{text}");

    // The next day admits again.
    clock.advance(86_400);
    assert_eq!(spend(&proxy, AGENT_A, 0.25).await.status(), 200);
}

#[tokio::test]
async fn the_global_budget_stops_every_key() {
    let mock = Mock::start(priced_by_max_tokens).await;
    let toml = two_agents("[budget]\nmonthly_usd = 0.5\n");
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    assert_eq!(spend(&proxy, AGENT_B, 0.25).await.status(), 200);
    assert_eq!(
        spend(&proxy, "sk-someone-else-000000", 0.25).await.status(),
        200
    );
    let refused = spend(&proxy, AGENT_A, 0.01).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["budget"]["scope"], "global");
    assert_eq!(body["error"]["budget"]["period"], "monthly");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the monthly budget of all keys is spent"),
        "{body}"
    );
    let stats = proxy.stats().await;
    assert_eq!(stats["budget"]["lines"][0]["spent_usd"], 0.5);
}

#[tokio::test]
async fn spend_survives_a_restart() {
    let mock = Mock::start(priced_by_max_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = two_agents("");
    let flags = || Flags {
        upstream: Some(mock.url()),
        data_dir: Some(dir.path().to_owned()),
        ..Flags::default()
    };
    let proxy = Proxy::start_guarded(&toml, flags(), &[], Arc::new(ShiftedClock::default())).await;
    for _ in 0..3 {
        assert_eq!(spend(&proxy, AGENT_A, 0.25).await.status(), 200);
    }
    proxy.stats_after(3).await;
    proxy.stop().await;

    let proxy = Proxy::start_guarded(&toml, flags(), &[], Arc::new(ShiftedClock::default())).await;
    let keys = proxy.get_json("/admin/keys").await;
    assert_eq!(keys["keys"][0]["budget"][0]["spent_usd"], 0.75);
    assert_eq!(spend(&proxy, AGENT_A, 0.25).await.status(), 200);
    assert_eq!(spend(&proxy, AGENT_A, 0.25).await.status(), 429);
    // The 50% alert fired before the restart; after it, only 80% and 100% are new.
    let alerts = proxy.get_json("/alerts").await;
    let thresholds: Vec<u64> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["threshold_percent"].as_u64())
        .collect();
    assert_eq!(thresholds, [100, 80]);
    proxy.stop().await;
}

#[tokio::test]
async fn requests_in_flight_when_the_line_is_crossed_complete_and_count() {
    // Streams whose usage (and so their record) comes 300 ms after their first chunk.
    let mock = Mock::start(|r: &Received| {
        let prompt = r.json()["max_tokens"].as_u64().unwrap_or(10);
        let events = common::chat_stream("gpt-4o", &["ok"], Some((prompt, 0)));
        let (first, rest) = events.split_at(2);
        let mut chunks: Vec<Chunk> = first.iter().map(|e| Chunk::now(e.clone())).collect();
        chunks.push(Chunk {
            delay: Duration::from_millis(300),
            ..Chunk::now(rest.concat())
        });
        Reply::Stream {
            chunks,
            then_cut: false,
            then_hang: false,
        }
    })
    .await;
    let proxy = start(&mock, &two_agents(""), Arc::new(ShiftedClock::default())).await;
    let stream = |proxy: &Proxy| {
        let request = proxy
            .client
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth(AGENT_A)
            .json(
                &json!({"model": "gpt-4o", "stream": true, "max_tokens": 100_000,
                "messages": [{"role": "user", "content": "hi"}]}),
            );
        async move { request.send().await.unwrap() }
    };
    for _ in 0..3 {
        stream(&proxy).await.text().await.unwrap();
    }
    // $0.75 recorded: four streams sent together are all admitted (nothing is reserved for
    // requests in flight), all answered, and all counted, ending $0.75 over the budget.
    let together: Vec<_> = (0..4).map(|_| stream(&proxy)).collect();
    let responses = futures_util::future::join_all(together).await;
    for response in responses {
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    let stats = proxy.stats_after(7).await;
    assert_eq!(stats["keys"][0]["budget"][0]["spent_usd"], 1.75);
    // Once recorded, the spend is over the line: the next is refused, and never sent.
    assert_eq!(stream(&proxy).await.status(), 429);
    assert_eq!(mock.received().len(), 7);
}

#[tokio::test]
async fn unknown_keys_are_refused_when_only_named_keys_are_accepted() {
    let mock = Mock::start(priced_by_max_tokens).await;
    let proxy = start(
        &mock,
        &two_agents("require_known_keys = true\n"),
        Arc::new(ShiftedClock::default()),
    )
    .await;
    let unknown = spend(&proxy, "sk-stranger-0000000000", 0.01).await;
    assert_eq!(unknown.status(), 401);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let anonymous = proxy
        .client
        .get(proxy.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401, "unmetered routes too");
    assert_eq!(spend(&proxy, AGENT_B, 0.01).await.status(), 200);
    assert_eq!(mock.received().len(), 1);
}
