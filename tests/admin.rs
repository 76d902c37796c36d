//! `/admin/keys`: named keys with their budgets and spend; budgets changed at run time with the
//! admin token, kept across restarts.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;

use common::{Mock, Proxy, chat_request, openai_like};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};

const KEY: &str = "sk-admin-test-0123456789";
const TOKEN: &str = "admin-secret-token";

fn toml(admin: bool) -> String {
    let admin = if admin {
        format!("admin_token = \"{TOKEN}\"\n")
    } else {
        String::new()
    };
    format!(
        "{admin}[keys.worker]\nkey_env = \"WORKER_KEY\"\ndaily_usd = 5.0\nrequests_per_minute = 100\n"
    )
}

async fn start(mock: &Mock, toml: &str, dir: &std::path::Path) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: Some(dir.to_owned()),
        ..Flags::default()
    };
    Proxy::start_guarded(
        toml,
        flags,
        &[("WORKER_KEY", KEY)],
        Arc::new(ShiftedClock::default()),
    )
    .await
}

async fn put(proxy: &Proxy, name: &str, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = proxy
        .client
        .put(proxy.url(&format!("/admin/keys/{name}/budget")))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn keys_are_listed_and_budgets_changed_for_good() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &toml(true), dir.path()).await;
    proxy.chat(KEY, &chat_request("gpt-4o", false)).await;
    proxy.stats_after(1).await;

    let listed = proxy
        .client
        .get(proxy.url("/admin/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    let worker = &listed["keys"][0];
    assert_eq!(worker["name"], "worker");
    assert_eq!(worker["virtual"], false);
    assert_eq!(worker["requests_per_minute"], 100);
    assert_eq!(worker["budget"][0]["limit_usd"], 5.0);
    assert!(worker["budget"][0]["spent_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(listed["timezone"], "UTC");

    let changed = put(
        &proxy,
        "worker",
        Some(TOKEN),
        &json!({"daily_usd": 2.5, "total_usd": 100}),
    )
    .await;
    assert_eq!(changed.status(), 200);
    let changed: Value = changed.json().await.unwrap();
    let periods: Vec<(&str, f64)> = changed["budget"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["period"].as_str().unwrap(),
                b["limit_usd"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(periods, [("daily", 2.5), ("total", 100.0)]);
    assert_eq!(
        put(&proxy, "global", Some(TOKEN), &json!({"monthly_usd": 50}))
            .await
            .status(),
        200
    );
    proxy.stop().await;

    // Kept across a restart, over proxy.toml's value.
    let proxy = start(&mock, &toml(true), dir.path()).await;
    let stats = proxy.stats().await;
    assert_eq!(stats["keys"][0]["budget"][0]["limit_usd"], 2.5);
    assert_eq!(stats["budget"]["lines"][0]["period"], "monthly");
    proxy.stop().await;
}

#[tokio::test]
async fn changes_need_the_admin_token_and_valid_values() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &toml(true), dir.path()).await;
    let body = json!({"daily_usd": 1});
    assert_eq!(put(&proxy, "worker", None, &body).await.status(), 401);
    assert_eq!(
        put(&proxy, "worker", Some("wrong"), &body).await.status(),
        401
    );
    let listed = proxy
        .client
        .get(proxy.url("/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 401);
    let unknown = put(&proxy, "nobody", Some(TOKEN), &body).await;
    assert_eq!(unknown.status(), 404);
    let negative = put(&proxy, "worker", Some(TOKEN), &json!({"daily_usd": -1})).await;
    assert_eq!(negative.status(), 400);
    let weekly = put(&proxy, "worker", Some(TOKEN), &json!({"weekly_usd": 1})).await;
    assert_eq!(weekly.status(), 400);
    let error: Value = weekly.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("weekly_usd"),
        "{error}"
    );
    proxy.stop().await;

    // Without an admin token configured, budgets cannot be changed at run time at all.
    let dir = tempfile::tempdir().unwrap();
    let open = start(&mock, &toml(false), dir.path()).await;
    let refused = put(&open, "worker", None, &body).await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LLM_METER_ADMIN_TOKEN")
    );
    assert_eq!(
        open.client
            .get(open.url("/admin/keys"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    open.stop().await;
}

/// The error message of a refused change.
async fn refusal(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn budgets_from_a_nano_dollar_to_the_largest_amount_are_accepted() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &toml(true), dir.path()).await;
    for usd in [1e-9, 1e10, 18_446_744_073.709_55] {
        let changed = put(&proxy, "worker", Some(TOKEN), &json!({"total_usd": usd})).await;
        assert_eq!(changed.status(), 200, "{usd}");
        let changed: Value = changed.json().await.unwrap();
        assert_eq!(
            changed["budget"][0]["limit_usd"].as_f64(),
            Some(usd),
            "{usd}"
        );
    }
    // A request under the largest budget is served, and its budget line renders.
    let response = proxy.chat(KEY, &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 200);
    proxy.stats_after(1).await;
    let text = proxy.get_text("/stats?format=text").await;
    assert!(text.contains("of $18446744073.71"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn budgets_that_round_to_zero_or_overflow_are_refused_with_a_short_message() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &toml(true), dir.path()).await;
    let message =
        refusal(put(&proxy, "worker", Some(TOKEN), &json!({"daily_usd": 1e-12})).await).await;
    assert!(message.contains("`daily_usd`"), "{message}");
    assert!(message.contains("would round to $0"), "{message}");
    let message =
        refusal(put(&proxy, "worker", Some(TOKEN), &json!({"total_usd": 1.9e10})).await).await;
    assert!(
        message.contains("at most $18446744073.709551615"),
        "{message}"
    );
    let message =
        refusal(put(&proxy, "worker", Some(TOKEN), &json!({"total_usd": 1e308})).await).await;
    assert!(message.ends_with("got 1e308"), "{message}");
    assert!(message.len() < 120, "{message}");
    // A value of the wrong type is not quoted back whole either.
    let long = "9".repeat(10_000);
    let message =
        refusal(put(&proxy, "worker", Some(TOKEN), &json!({"daily_usd": long})).await).await;
    assert!(message.len() < 400, "{} bytes", message.len());
    // Nothing was changed.
    let keys: Value = proxy.get_json("/admin/keys").await;
    assert_eq!(keys["keys"][0]["budget"][0]["limit_usd"], 5.0);
    proxy.stop().await;
}

#[tokio::test]
async fn an_oversized_budget_body_gets_the_json_413() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&mock, &toml(true), dir.path()).await;
    let padding = " ".repeat(llm_meter::api::admin::MAX_BUDGET_BODY_BYTES);
    let response = proxy
        .client
        .put(proxy.url("/admin/keys/worker/budget"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(format!("{{\"daily_usd\": 1{padding}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    proxy.stop().await;
}

#[test]
fn the_start_says_which_budgets_a_runtime_change_overrides() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(
        dir.path().join("data").join("budgets.json"),
        r#"{"worker": {"daily": 3000000000, "monthly": null, "total": null}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!("listen = \"127.0.0.1:0\"\n{}", toml(false)),
    )
    .unwrap();
    let mut command = common::binary_command(dir.path());
    command.env("WORKER_KEY", KEY);
    let (ok, _, stderr) = common::Binary::start(command).terminate();
    assert!(ok, "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("wins over proxy.toml"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(said[0].contains("scope=\"worker\""), "{}", said[0]);
    assert!(said[0].contains("period=\"daily\""), "{}", said[0]);
    assert!(said[0].contains("configured=\"$5.00\""), "{}", said[0]);
    assert!(said[0].contains("in_force=\"$3.00\""), "{}", said[0]);
}
