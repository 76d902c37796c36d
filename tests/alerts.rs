//! Alerts: each budget threshold fires once per period (log, `/alerts`, webhooks); anomalies
//! (a very large request, an hour over a 24th of the daily budget) are listed too; a webhook
//! that is down never slows requests nor the other webhooks; Slack and Discord get one line.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Mock, Proxy, Received, Reply, chat_completion};
use llm_meter::config::{Config, Flags};
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};

const KEY: &str = "sk-alerted-0123456789abcdef";

/// Every answer reports `max_tokens` prompt tokens of gpt-4o ($2.50 per million).
fn priced(request: &Received) -> Reply {
    let prompt = request.json()["max_tokens"].as_u64().unwrap_or(10);
    Reply::json(200, &chat_completion("gpt-4o", "ok", prompt, 0))
}

async fn start(mock: &Mock, toml: &str, clock: Arc<ShiftedClock>) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    Proxy::start_guarded(toml, flags, &[("ALERTED_KEY", KEY)], clock).await
}

async fn spend(proxy: &Proxy, usd: f64) -> u16 {
    let tokens = (usd / 2.5 * 1_000_000.0).round() as u64;
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-4o", "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn alerts(proxy: &Proxy) -> Vec<Value> {
    proxy.get_json("/alerts").await["alerts"]
        .as_array()
        .unwrap()
        .clone()
}

fn thresholds(alerts: &[Value]) -> Vec<u64> {
    let mut t: Vec<u64> = alerts
        .iter()
        .filter(|a| a["kind"] == "budget_threshold")
        .filter_map(|a| a["threshold_percent"].as_u64())
        .collect();
    t.reverse();
    t
}

#[tokio::test]
async fn each_threshold_fires_once_per_period_and_again_the_next() {
    let mock = Mock::start(priced).await;
    let clock = Arc::new(ShiftedClock::default());
    // Large requests are not what this test is about.
    let toml = "large_request_tokens = 10000000\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ndaily_usd = 10.0\n";
    let proxy = start(&mock, toml, Arc::clone(&clock)).await;
    // $3 steps: 30%, 60% (50 fires), 90% (80 fires), 120% (100 fires), then refused.
    for expected in [vec![], vec![50], vec![50, 80], vec![50, 80, 100]] {
        assert_eq!(spend(&proxy, 3.0).await, 200);
        let fired = alerts(&proxy).await;
        assert_eq!(thresholds(&fired), expected, "{fired:?}");
    }
    assert_eq!(spend(&proxy, 3.0).await, 429);
    let fired = alerts(&proxy).await;
    assert_eq!(thresholds(&fired), [50, 80, 100], "a refusal fires nothing");
    let newest = &fired[0];
    assert_eq!(newest["scope"], "alerted");
    assert_eq!(newest["period"], "daily");
    assert_eq!(newest["limit_usd"], 10.0);
    assert_eq!(newest["spent_usd"], 12.0);

    clock.advance(86_400);
    for _ in 0..2 {
        assert_eq!(spend(&proxy, 3.0).await, 200);
    }
    assert_eq!(thresholds(&alerts(&proxy).await), [50, 80, 100, 50]);
}

#[tokio::test]
async fn alerts_are_posted_to_the_webhook() {
    let hook = Mock::start(|_: &Received| Reply::json(200, &json!({"ok": true}))).await;
    let mock = Mock::start(priced).await;
    let toml = format!(
        "alert_webhook = \"{}/hook\"\nalert_thresholds = [100]\nlarge_request_tokens = 10000000\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ntotal_usd = 1.0\n",
        hook.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    assert_eq!(spend(&proxy, 1.5).await, 200);
    let mut posted = Vec::new();
    for _ in 0..200 {
        posted = hook.received();
        if !posted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].method, "POST");
    assert_eq!(posted[0].path, "/v1/hook");
    let alert = posted[0].json();
    assert_eq!(alert["kind"], "budget_threshold");
    assert_eq!(alert["scope"], "alerted");
    assert_eq!(alert["period"], "total");
    assert_eq!(alert["threshold_percent"], 100);
    assert_eq!(alert, alerts(&proxy).await[0]);
}

#[tokio::test]
async fn a_webhook_that_hangs_does_not_delay_requests() {
    let hook = Mock::start(|_: &Received| Reply::Hang).await;
    let mock = Mock::start(priced).await;
    let toml = format!(
        "alert_webhook = \"{}/hook\"\nalert_thresholds = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ndaily_usd = 100.0\n",
        hook.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(spend(&proxy, 1.0).await, 200);
    }
    // Ten alerts fired, the webhook answered none of them; the requests did not wait.
    assert_eq!(thresholds(&alerts(&proxy).await).len(), 10);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        hook.received().len(),
        1,
        "one attempt in progress, the others queued"
    );
}

#[tokio::test]
async fn a_very_large_request_and_a_fast_hour_are_anomalies() {
    let mock = Mock::start(priced).await;
    let toml = "large_request_tokens = 50000\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ndaily_usd = 24.0\n";
    let proxy = start(&mock, toml, Arc::new(ShiftedClock::default())).await;
    // 40,000 tokens ($0.10): neither anomaly.
    assert_eq!(spend(&proxy, 0.1).await, 200);
    assert!(alerts(&proxy).await.is_empty());
    // 400,000 tokens ($1.00): a large request, and an hour over $24 / 24.
    assert_eq!(spend(&proxy, 1.0).await, 200);
    let fired = alerts(&proxy).await;
    let kinds: Vec<&str> = fired.iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"large_request"), "{fired:?}");
    assert!(kinds.contains(&"hourly_spend"), "{fired:?}");
    let large = fired.iter().find(|a| a["kind"] == "large_request").unwrap();
    assert_eq!(large["prompt_tokens"], 400_000);
    assert_eq!(large["scope"], "alerted");
    // The hourly one fires once an hour.
    assert_eq!(spend(&proxy, 0.5).await, 200);
    let hourly = alerts(&proxy)
        .await
        .iter()
        .filter(|a| a["kind"] == "hourly_spend")
        .count();
    assert_eq!(hourly, 1);
}

#[tokio::test]
async fn a_failing_webhook_is_retried_with_backoff() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let hook = Mock::start(move |_: &Received| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < 2 {
            Reply::json(503, &json!({"error": "busy"}))
        } else {
            Reply::json(200, &json!({"ok": true}))
        }
    })
    .await;
    let mock = Mock::start(priced).await;
    let toml = format!(
        "alert_webhook = \"{}/hook\"\nalert_thresholds = [100]\nlarge_request_tokens = 10000000\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ntotal_usd = 1.0\n",
        hook.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    let started = Instant::now();
    assert_eq!(spend(&proxy, 1.5).await, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Attempts at 0 s, 1 s and 3 s: the third is answered 200.
    for _ in 0..100 {
        if hook.received().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let posted = hook.received();
    assert_eq!(posted.len(), 3);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(posted[0].body, posted[2].body, "the same alert each time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hook.received().len(), 3, "delivered: no more attempts");
}

#[tokio::test]
async fn alerts_queued_for_the_webhook_at_shutdown_are_delivered_before_it_ends() {
    // The webhook fails its first call: that alert waits a second for its retry, and the
    // alerts fired after it wait in the queue.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let hook = Mock::start(move |_: &Received| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::json(500, &json!({"error": "busy"}))
        } else {
            Reply::json(200, &json!({"ok": true}))
        }
    })
    .await;
    let mock = Mock::start(priced).await;
    let toml = format!(
        "alert_webhook = \"{}/hook\"\nalert_thresholds = [10, 20, 30]\nlarge_request_tokens = 10000000\n[keys.alerted]\nkey_env = \"ALERTED_KEY\"\ndaily_usd = 10.0\n",
        hook.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    assert_eq!(spend(&proxy, 3.0).await, 200);
    // Three thresholds, and the hour's spend over a 24th of the day's budget.
    let fired = alerts(&proxy).await.len();
    assert_eq!(fired, 4);
    let started = Instant::now();
    proxy.stop().await;
    // Nothing more is waited for: the stop itself delivered what was queued, the retry too.
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(hook.received().len(), fired + 1);
}

/// Waits (up to 2 s) until `hook` has received `n` requests, and returns what it received.
async fn posted_to(hook: &Mock, n: usize) -> Vec<Received> {
    for _ in 0..200 {
        if hook.received().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hook.received()
}

fn ok_hook(_: &Received) -> Reply {
    Reply::json(200, &json!({"ok": true}))
}

#[tokio::test]
async fn slack_discord_and_json_webhooks_each_get_the_alert_once_in_their_format() {
    let (slack, discord, own) = (
        Mock::start(ok_hook).await,
        Mock::start(ok_hook).await,
        Mock::start(ok_hook).await,
    );
    let mock = Mock::start(priced).await;
    let toml = format!(
        r#"
        alert_webhook = "{}/slack"
        alert_webhook_format = "slack"
        alert_thresholds = [80]
        large_request_tokens = 10000000
        [[alert_webhooks]]
        url = "{}/discord"
        format = "discord"
        [[alert_webhooks]]
        url = "{}/own"
        [keys.agent_a]
        key_env = "ALERTED_KEY"
        total_usd = 1.0
        "#,
        slack.url(),
        discord.url(),
        own.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    assert_eq!(spend(&proxy, 0.85).await, 200);
    let line = "llm-meter: key agent_a reached 80% of its total budget ($0.85 of $1.00)";

    let to_slack = posted_to(&slack, 1).await;
    assert_eq!(to_slack.len(), 1);
    assert_eq!(to_slack[0].path, "/v1/slack");
    assert_eq!(to_slack[0].json(), json!({"text": line}));

    let to_discord = posted_to(&discord, 1).await;
    assert_eq!(to_discord.len(), 1);
    assert_eq!(
        to_discord[0].json(),
        json!({
            "content": r"llm-meter: key agent\_a reached 80% of its total budget ($0.85 of $1.00)",
            "allowed_mentions": {"parse": []},
        })
    );

    let to_own = posted_to(&own, 1).await;
    assert_eq!(to_own.len(), 1);
    let alert = to_own[0].json();
    assert_eq!(alert, alerts(&proxy).await[0]);
    assert_eq!(alert["kind"], "budget_threshold");
    assert_eq!(alert["threshold_percent"], 80);
    assert_eq!(alert["message"], line.trim_start_matches("llm-meter: "));
    // Nothing of the key, in any body.
    for body in [&to_slack[0].body, &to_discord[0].body, &to_own[0].body] {
        let text = String::from_utf8_lossy(body);
        assert!(
            !text.contains("0123456789abcdef") && !text.contains("sk-"),
            "{text}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        [
            slack.received().len(),
            discord.received().len(),
            own.received().len()
        ],
        [1, 1, 1]
    );
}

#[tokio::test]
async fn a_webhook_that_hangs_does_not_hold_up_the_others() {
    let hung = Mock::start(|_: &Received| Reply::Hang).await;
    let slack = Mock::start(ok_hook).await;
    let mock = Mock::start(priced).await;
    let toml = format!(
        r#"
        alert_thresholds = [10, 20, 30]
        large_request_tokens = 10000000
        [[alert_webhooks]]
        url = "{}/hung"
        [[alert_webhooks]]
        url = "{}/slack"
        format = "slack"
        [keys.alerted]
        key_env = "ALERTED_KEY"
        total_usd = 10.0
        "#,
        hung.url(),
        slack.url()
    );
    let proxy = start(&mock, &toml, Arc::new(ShiftedClock::default())).await;
    assert_eq!(spend(&proxy, 3.5).await, 200);
    // Three thresholds: the hung webhook holds its first; Slack gets all three, in order.
    let to_slack = posted_to(&slack, 3).await;
    let lines: Vec<Value> = to_slack.iter().map(|r| r.json()["text"].clone()).collect();
    assert_eq!(
        lines,
        [10, 20, 30].map(|t| json!(format!(
            "llm-meter: key alerted reached {t}% of its total budget ($3.50 of $10.00)"
        )))
    );
    assert_eq!(hung.received().len(), 1, "one attempt in progress");
}

#[test]
fn a_webhook_format_that_does_not_exist_is_refused_naming_its_field() {
    let flags = Flags {
        no_persist: true,
        ..Flags::default()
    };
    let load = |toml: &str| {
        Config::from_layers(Some(toml), None, &Default::default(), &flags)
            .unwrap_err()
            .to_string()
    };
    let err = load("alert_webhook = \"https://hooks.example/a\"\nalert_webhook_format = \"teams\"");
    assert!(
        err.contains("`alert_webhook_format`") && err.contains("\"teams\""),
        "{err}"
    );
    assert!(err.contains("json, slack or discord"), "{err}");
    let err = load(
        "[[alert_webhooks]]\nurl = \"https://a.example\"\n[[alert_webhooks]]\nurl = \"https://b.example\"\nformat = \"mattermost\"",
    );
    assert!(err.contains("`alert_webhooks[1].format`"), "{err}");
}

#[tokio::test]
async fn the_binary_posts_a_crossed_budget_to_slack_as_one_line() {
    let slack = Mock::start(ok_hook).await;
    let mock = Mock::start(priced).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "alert_webhook = \"{}/slack\"\nalert_webhook_format = \"slack\"\nalert_thresholds = [50]\n\
             large_request_tokens = 10000000\n[keys.agent_a]\nkey_env = \"ALERTED_KEY\"\ntotal_usd = 1.0\n",
            slack.url()
        ),
    )
    .unwrap();
    let mut command = common::binary_command(dir.path());
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()])
        .env("ALERTED_KEY", KEY);
    let binary = common::Binary::start(command);
    // $0.60 of gpt-4o prompt: 240,000 tokens at $2.50 per million.
    let body = json!({"model": "gpt-4o", "max_tokens": 240_000, "messages": [{"role": "user", "content": "hi"}]});
    binary.chat_through(KEY, &body).await;
    let posted = posted_to(&slack, 1).await;
    assert_eq!(posted.len(), 1);
    assert_eq!(
        posted[0].json(),
        json!({"text": "llm-meter: key agent_a reached 50% of its total budget ($0.60 of $1.00)"})
    );
    let (_, stdout, stderr) = binary.terminate();
    assert!(!format!("{stdout}{stderr}").contains(KEY));
}
