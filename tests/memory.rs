//! Memory stays bounded whatever keys and models clients send: keys past `max_tracked_keys` and
//! models past `max_models_per_key` count into `other` entries with exact totals, keys the
//! upstream refused count as `unauthenticated`, model names are cut, `/stats` can be paged, and
//! the ledger still has every key.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::time::Duration;

use common::{Binary, Mock, Proxy, Reply, binary_command, chat_request, key_id, openai_like};
use futures_util::StreamExt;
use serde_json::{Value, json};

const BOUNDED: &str = "max_tracked_keys = 20\nmax_models_per_key = 3\n";

async fn chat_as(proxy: &Proxy, key: &str, model: &str) -> u16 {
    proxy
        .chat(key, &chat_request(model, false))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn keys_and_models_past_their_bounds_count_into_other_with_exact_totals() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), BOUNDED).await;
    for i in 0..60 {
        assert_eq!(
            chat_as(&proxy, &format!("sk-random-key-{i:04}"), "gpt-4o").await,
            200
        );
    }
    for model in ["gpt-4o-mini", "gpt-4.1", "o3", "o4-mini", "gpt-5"] {
        assert_eq!(chat_as(&proxy, "sk-random-key-0000", model).await, 200);
    }
    let stats = proxy.stats_after(65).await;
    assert_eq!(stats["totals"]["requests"], 65);
    // Twenty keys of their own, and `other` for the forty more.
    assert_eq!(stats["keys_total"], 21);
    let keys = stats["keys"].as_array().unwrap();
    let other = keys.iter().find(|k| k["id"] == "other").unwrap();
    assert_eq!(other["requests"], 40);
    let sum: u64 = keys.iter().map(|k| k["requests"].as_u64().unwrap()).sum();
    assert_eq!(sum, 65);
    let first = keys
        .iter()
        .find(|k| k["id"] == key_id("sk-random-key-0000"))
        .unwrap();
    let models = first["models"].as_object().unwrap();
    // Three models of its own, and `other` for the three more.
    assert_eq!(models.len(), 4, "{models:?}");
    assert_eq!(models["other"]["requests"], 3);

    // The ledger still has every key.
    let usage = proxy.get_json("/usage?group_by=key").await;
    assert_eq!(usage["rows"].as_array().unwrap().len(), 60);
    proxy.stop().await;

    // A restart restores within the same bounds.
    let again = Proxy::start_persistent(&mock.url(), dir.path(), BOUNDED).await;
    let stats = again.stats().await;
    assert_eq!(stats["totals"]["requests"], 65);
    assert_eq!(stats["keys"].as_array().unwrap().len(), 21);
    again.stop().await;
}

#[tokio::test]
async fn keys_the_upstream_refused_count_as_one_unauthenticated_entry() {
    let mock = Mock::start(|request| {
        if request.headers["authorization"] == "Bearer sk-good-key-000000" {
            openai_like(request)
        } else {
            Reply::json(
                401,
                &json!({"error": {"message": "Incorrect API key provided"}}),
            )
        }
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    for i in 0..30 {
        assert_eq!(
            chat_as(&proxy, &format!("sk-bad-{i:04}"), "gpt-4o").await,
            401
        );
    }
    assert_eq!(chat_as(&proxy, "sk-good-key-000000", "gpt-4o").await, 200);
    let stats = proxy.stats_after(31).await;
    let ids: Vec<&str> = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"unauthenticated"));
    let refused = &stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "unauthenticated")
        .unwrap();
    assert_eq!(refused["requests"], 30);
    assert_eq!(refused["errors"], 30);
}

#[tokio::test]
async fn stats_can_be_paged_by_limit_and_by_key() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start(&mock.url()).await;
    for i in 0..8 {
        chat_as(&proxy, &format!("sk-paged-key-{i:04}"), "gpt-4o").await;
    }
    proxy.stats_after(8).await;
    let page = proxy.get_json("/stats?limit=3").await;
    assert_eq!(page["keys"].as_array().unwrap().len(), 3);
    assert_eq!(page["keys_total"], 8);
    assert_eq!(page["totals"]["requests"], 8);
    let id = key_id("sk-paged-key-0005");
    let one = proxy.get_json(&format!("/stats?key={id}")).await;
    assert_eq!(one["keys"].as_array().unwrap().len(), 1);
    assert_eq!(one["keys"][0]["id"], id.as_str());
    let bad = proxy
        .client
        .get(proxy.url("/stats?limit=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn a_huge_model_name_is_cut_in_records() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start(&mock.url()).await;
    let model = "m".repeat(200_000);
    assert_eq!(chat_as(&proxy, "sk-model-namer-0000", &model).await, 200);
    let stats = proxy.stats_after(1).await;
    let models = stats["keys"][0]["models"].as_object().unwrap();
    let name = models.keys().next().unwrap();
    assert_eq!(name.len(), 256);
}

/// Resident memory of a process, from /proc.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_thousand_distinct_keys_grow_the_binary_by_under_40_mb() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    let client = common::client();
    let url = binary.url("/v1/chat/completions");
    // Warm up: the first requests build the pools, the ledger and its buffers.
    for i in 0..200 {
        client
            .post(&url)
            .bearer_auth(format!("sk-warmup-{i}"))
            .json(&chat_request("gpt-4o", false))
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kb(binary.pid());
    let sent = futures_util::stream::iter(0..30_000)
        .map(|i| {
            let request = client
                .post(&url)
                .bearer_auth(format!("sk-distinct-{i:06}-0123456789"))
                .json(&chat_request("gpt-4o", false));
            async move { request.send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(16)
        .filter(|status| std::future::ready(*status == 200))
        .count()
        .await;
    assert_eq!(sent, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kb(binary.pid());
    let stats = client.get(binary.url("/stats")).send().await.unwrap();
    let stats = stats.bytes().await.unwrap();
    let parsed: Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(parsed["totals"]["requests"], 30_200);
    let grown_mb = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "RSS {before} kB -> {after} kB (+{grown_mb:.1} MB) after 30,000 keys; /stats {} bytes",
        stats.len()
    );
    assert!(grown_mb < 40.0, "RSS grew by {grown_mb:.1} MB");
    assert!(
        stats.len() < 8 * 1024 * 1024,
        "/stats is {} bytes",
        stats.len()
    );
}
