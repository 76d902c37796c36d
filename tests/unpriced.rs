//! Unpriced is loud: the first request of a model no price covers raises an alert (a log line,
//! `/alerts`, each webhook), once per model and UTC day; text views write its cost as unknown,
//! never `$0.00`.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Binary, Mock, Proxy, Received, Reply, binary_command, chat_request, key_id, openai_like,
};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};

const UNPRICED: &str = "no-such-model-xyz";
const OTHER_UNPRICED: &str = "another-model-xyz";
const ONLY_UNPRICED_KEY: &str = "sk-unpriced-only-00000000000";
const MIXED_KEY: &str = "sk-mixed-models-000000000000";

async fn start(mock: &Mock, hook: &Mock, clock: Arc<ShiftedClock>) -> Proxy {
    let toml = format!("alert_webhook = \"{}/hook\"\n", hook.url());
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    Proxy::start_guarded(&toml, flags, &[], clock).await
}

/// The alerts, once there are `n` of them (an alert fires just after its request is counted).
async fn alerts(proxy: &Proxy, n: usize) -> Vec<Value> {
    let mut fired = Vec::new();
    for _ in 0..500 {
        fired = proxy.get_json("/alerts").await["alerts"]
            .as_array()
            .unwrap()
            .clone();
        if fired.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fired
}

/// The webhook's posts, once there are `n` of them (the webhook task posts in the background).
async fn posts(hook: &Mock, n: usize) -> Vec<Value> {
    for _ in 0..500 {
        let posted = hook.received();
        if posted.len() >= n {
            return posted.iter().map(Received::json).collect();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the webhook got {} posts, not {n}", hook.received().len());
}

fn scopes(alerts: &[Value]) -> Vec<&str> {
    alerts
        .iter()
        .map(|a| a["scope"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn an_unpriced_model_alerts_once_a_day_in_alerts_and_on_the_webhook() {
    let mock = Mock::start(openai_like).await;
    let hook = Mock::start(|_: &Received| Reply::json(200, &json!({"ok": true}))).await;
    let clock = Arc::new(ShiftedClock::default());
    let proxy = start(&mock, &hook, Arc::clone(&clock)).await;

    proxy
        .chat_through(ONLY_UNPRICED_KEY, &chat_request(UNPRICED, false))
        .await;
    let fired = alerts(&proxy, 1).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    let alert = &fired[0];
    assert_eq!(alert["kind"], "unpriced_model");
    assert_eq!(alert["scope"], UNPRICED);
    assert_eq!(alert["upstream"], "openai");
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.starts_with("model \"no-such-model-xyz\" (upstream \"openai\") has no price"),
        "{message}"
    );
    assert!(
        message.contains("[pricing.\"no-such-model-xyz\"] in proxy.toml"),
        "{message}"
    );
    assert_eq!(&posts(&hook, 1).await, std::slice::from_ref(alert));

    // The same model again, streamed, and a priced one: no alert. Another unpriced model: one.
    proxy
        .chat_through(ONLY_UNPRICED_KEY, &chat_request(UNPRICED, true))
        .await;
    proxy
        .chat_through(MIXED_KEY, &chat_request("gpt-4o", false))
        .await;
    proxy
        .chat_through(MIXED_KEY, &chat_request(OTHER_UNPRICED, false))
        .await;
    proxy.stats_after(4).await;
    let fired = alerts(&proxy, 2).await;
    assert_eq!(scopes(&fired), [OTHER_UNPRICED, UNPRICED], "{fired:?}");
    assert_eq!(scopes(&posts(&hook, 2).await), [UNPRICED, OTHER_UNPRICED]);

    // The next UTC day, the first request alerts again.
    clock.advance(86_400);
    proxy
        .chat_through(ONLY_UNPRICED_KEY, &chat_request(UNPRICED, false))
        .await;
    let fired = alerts(&proxy, 3).await;
    assert_eq!(scopes(&fired), [UNPRICED, OTHER_UNPRICED, UNPRICED]);
    posts(&hook, 3).await;
    // Nothing more comes late: the repeat of the first day raised none.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(alerts(&proxy, 0).await.len(), 3);
    assert_eq!(hook.received().len(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn stats_text_writes_unpriced_spend_as_unknown_not_zero() {
    let mock = Mock::start(openai_like).await;
    let proxy = Proxy::start(&mock.url()).await;
    for _ in 0..2 {
        proxy
            .chat_through(ONLY_UNPRICED_KEY, &chat_request(UNPRICED, false))
            .await;
    }
    proxy
        .chat_through(MIXED_KEY, &chat_request("gpt-4o", false))
        .await;
    proxy
        .chat_through(MIXED_KEY, &chat_request(UNPRICED, false))
        .await;
    proxy.stats_after(4).await;
    let text = proxy.get_text("/stats?format=text").await;
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line for {start}: {text}"))
            .to_owned()
    };
    let key = |key: &str| format!("sk-…0000 [{}]", key_id(key));
    assert!(
        line(&key(ONLY_UNPRICED_KEY)).ends_with("| cost: unknown (2 unpriced requests)"),
        "{text}"
    );
    // gpt-4o: 11 in × $2.50/M + 3 out × $10/M = $0.0000575.
    assert!(
        line(&key(MIXED_KEY)).ends_with("| cost: $0.0000575 + unknown (1 unpriced request)"),
        "{text}"
    );
    assert!(
        line("total since ").ends_with("| cost: $0.0000575 + unknown (3 unpriced requests)"),
        "{text}"
    );
    assert!(!text.contains("$0.00 "), "{text}");
    assert!(!text.ends_with("$0.00\n"), "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_one_line_per_unpriced_model_and_reports_its_cost_as_unknown() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()]);
    let binary = Binary::start(command);
    for _ in 0..2 {
        binary
            .chat_through(ONLY_UNPRICED_KEY, &chat_request(UNPRICED, false))
            .await;
    }
    binary
        .chat_through(MIXED_KEY, &chat_request("gpt-4o", false))
        .await;
    binary
        .chat_through(MIXED_KEY, &chat_request(OTHER_UNPRICED, false))
        .await;
    for _ in 0..500 {
        if binary.get_json("/alerts").await["alerts"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, stdout, stderr) = binary.terminate();
    assert!(
        stdout.contains("| cost: $0.0000575 + unknown (3 unpriced requests)"),
        "{stdout}"
    );
    // One warning per unpriced model: the alert's (the request lines name it too, at info).
    let warned: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(UNPRICED))
        .collect();
    assert_eq!(warned.len(), 1, "{stderr}");
    assert!(warned[0].contains("has no price"), "{}", warned[0]);

    let report = binary_command(dir.path())
        .args(["report", "--period", "all", "--by", "model"])
        .output()
        .unwrap();
    let report = String::from_utf8(report.stdout).unwrap();
    let cost_of = |label: &str| {
        let row = report
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no row for {label}: {report}"));
        row.rsplit(' ').next().unwrap().to_owned()
    };
    assert_eq!(cost_of(UNPRICED), "unknown", "{report}");
    assert_eq!(cost_of(OTHER_UNPRICED), "unknown", "{report}");
    assert_eq!(cost_of("gpt-4o"), "$0.0000575", "{report}");
    assert_eq!(cost_of("TOTAL"), "$0.0000575+?", "{report}");
    assert!(
        report.ends_with(
            "\n3 requests were to models without a price: their tokens are counted, their cost is not (COST: unknown, or +? after the part that is known)\n"
        ),
        "{report}"
    );
}
