//! Alerts: budget thresholds crossed, anomalies and unpriced models, each one a warning log
//! line, an entry in `/alerts`, and a POST to each configured webhook (as JSON, or one line for
//! Slack or Discord), made by a background task per webhook that retries with backoff and never
//! holds up a request or another webhook.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use http::{Request, header};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::client::Dialer;
use crate::config::alerts::{Webhook, WebhookFormat};
use crate::tasks::Tasks;

/// Alerts kept for `/alerts`, newest first.
const RECENT: usize = 200;
/// Alerts waiting for one webhook; past it new ones are not sent (they are still logged and listed).
const WEBHOOK_QUEUE: usize = 1_000;
/// Attempts per alert, and the wait before the first retry (doubled each time).
const ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest one webhook attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One alert, as `/alerts` lists it and the webhook receives it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    /// When it fired (RFC 3339).
    pub at: String,
    /// `budget_threshold`, `large_request`, `hourly_spend`, `unpriced_model` or `unpriced_audio`.
    pub kind: &'static str,
    /// The key name, or `global`; the model, for an unpriced one.
    pub scope: String,
    /// The upstream the request went to (unpriced models: a price may be the upstream's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// `daily`, `monthly`, `total` (budget alerts), `hourly` (spend anomaly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<&'static str>,
    /// The threshold crossed, in percent of the budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_percent: Option<u32>,
    /// The budget (or the limit the anomaly is measured against), USD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_usd: Option<f64>,
    /// The spend in the period (or the hour), USD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_usd: Option<f64>,
    /// Prompt tokens of the request (large-request anomaly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// One line for people.
    pub message: String,
    /// What makes it the same alert on another replica (`budget_threshold/agent/daily/…/80`):
    /// with a shared ledger, only the replica that claims it first sends it. `None` for alerts
    /// of one request, which only one replica sees.
    #[serde(skip)]
    pub dedupe: Option<String>,
}

impl Alert {
    /// An alert with only its time, kind, scope and message; the figures are added by the caller.
    pub fn new(at: jiff::Timestamp, kind: &'static str, scope: &str, message: String) -> Self {
        Self {
            at: at.to_string(),
            kind,
            scope: scope.to_owned(),
            upstream: None,
            period: None,
            threshold_percent: None,
            limit_usd: None,
            spent_usd: None,
            prompt_tokens: None,
            message,
            dedupe: None,
        }
    }

    /// The alert in one line for a chat: `llm-meter: ` and its message.
    pub fn line(&self) -> String {
        format!("llm-meter: {}", self.message)
    }

    /// The body posted to a webhook of `format`.
    pub fn to_body(&self, format: WebhookFormat) -> Result<Vec<u8>, serde_json::Error> {
        match format {
            WebhookFormat::Json => serde_json::to_vec(self),
            WebhookFormat::Slack => serde_json::to_vec(&json!({"text": slack_text(&self.line())})),
            // No mention in the line may ping anyone.
            WebhookFormat::Discord => serde_json::to_vec(&json!({
                "content": discord_text(&self.line()),
                "allowed_mentions": {"parse": []},
            })),
        }
    }
}

/// How an alert's message names a scope: `key agent-a`, or `all keys together`.
pub(super) fn subject(scope: &str) -> String {
    if scope == super::budget::GLOBAL {
        "all keys together".to_owned()
    } else {
        format!("key {scope}")
    }
}

/// Text as Slack reads it: `&`, `<` and `>` are its control characters
/// (<https://api.slack.com/reference/surfaces/formatting#escaping>).
fn slack_text(line: &str) -> String {
    line.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text as Discord reads it: markdown characters (a key named `a_b_c`) are shown as written.
fn discord_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if matches!(c, '\\' | '*' | '_' | '~' | '`' | '|' | '<' | '>' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where alerts go.
pub struct Alerts {
    recent: Mutex<VecDeque<Alert>>,
    /// One queue per webhook (by its host, for logs), so that a slow one holds up none of the
    /// others.
    webhooks: Vec<(String, mpsc::Sender<Alert>)>,
    /// With a shared ledger: where alerts another replica may also fire go to be claimed
    /// first (`deliver` sends those claimed).
    gate: std::sync::OnceLock<Box<dyn Fn(Alert) + Send + Sync>>,
}

impl Alerts {
    /// Alerts without a webhook.
    pub fn new() -> Self {
        Self {
            recent: Mutex::new(VecDeque::new()),
            webhooks: Vec::new(),
            gate: std::sync::OnceLock::new(),
        }
    }

    /// Alerts that are also POSTed to each webhook (with the dialer that reaches it) by a task
    /// of its own that `tasks` owns, on the current runtime (when there is none, as in a
    /// command that serves nothing, the webhooks are off). At shutdown each task delivers what
    /// is queued, within the grace period.
    pub fn with_webhooks(webhooks: Vec<(Webhook, Dialer)>, tasks: &Tasks) -> Self {
        let webhooks = webhooks
            .into_iter()
            .filter_map(|(webhook, client)| {
                let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
                let owned = tasks.clone();
                let host = webhook.url.host().unwrap_or_default().to_owned();
                let named = host.clone();
                tasks
                    .spawn(async move {
                        tokio::select! {
                            () = deliver(webhook, client, rx, &owned) => {}
                            () = owned.stopping() => {
                                tracing::warn!(
                                    webhook = named,
                                    "grace period over: queued alerts not delivered"
                                );
                            }
                        }
                    })
                    .then_some((host, tx))
            })
            .collect();
        Self {
            recent: Mutex::new(VecDeque::new()),
            webhooks,
            gate: std::sync::OnceLock::new(),
        }
    }

    /// Sends alerts that other replicas may fire too through `gate`, which claims each in the
    /// shared ledger and delivers it only when this replica's claim wins. Set once.
    pub fn set_gate(&self, gate: Box<dyn Fn(Alert) + Send + Sync>) {
        if self.gate.set(gate).is_err() {
            tracing::warn!("the alert gate is set already");
        }
    }

    /// Fires an alert: logged, listed, and handed to the webhook task without waiting (or, with
    /// a shared ledger, to the gate that claims it first).
    pub fn fire(&self, alert: Alert) {
        match self.gate.get() {
            Some(gate) if alert.dedupe.is_some() => gate(alert),
            _ => self.deliver(alert),
        }
    }

    /// Logs, lists and sends an alert.
    pub fn deliver(&self, alert: Alert) {
        tracing::warn!(
            kind = alert.kind,
            scope = alert.scope,
            upstream = alert.upstream.as_deref(),
            period = alert.period,
            threshold_percent = alert.threshold_percent,
            "alert: {}",
            alert.message
        );
        for (host, webhook) in &self.webhooks {
            if webhook.try_send(alert.clone()).is_err() {
                tracing::warn!(
                    webhook = host,
                    "alert webhook is behind: this alert is not sent to it"
                );
            }
        }
        let mut recent = self.recent.lock();
        recent.push_front(alert);
        recent.truncate(RECENT);
    }

    /// The recent alerts, newest first.
    pub fn recent(&self) -> Vec<Alert> {
        self.recent.lock().iter().cloned().collect()
    }
}

impl Default for Alerts {
    fn default() -> Self {
        Self::new()
    }
}

/// Posts each alert to the webhook, in order, retrying with backoff; once shutdown begins,
/// posts what is queued and ends. Logs name the webhook's host only: a webhook's path is often
/// its secret.
async fn deliver(
    webhook: Webhook,
    client: Dialer,
    mut alerts: mpsc::Receiver<Alert>,
    tasks: &Tasks,
) {
    let Webhook { url, format } = webhook;
    let host = url.host().unwrap_or_default().to_owned();
    loop {
        let alert = tokio::select! {
            biased;
            alert = alerts.recv() => alert,
            () = tasks.closing() => alerts.try_recv().ok(),
        };
        let Some(alert) = alert else { return };
        let Ok(body) = alert.to_body(format) else {
            continue;
        };
        let mut wait = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            let request = Request::post(url.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::USER_AGENT, "llm-meter")
                .body(Body::from(body.clone()));
            let Ok(request) = request else { break };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, crate::client::send_once(&client, request))
                .await
            {
                Ok(Ok(response)) if response.status().is_success() => break,
                outcome => {
                    let reason = match outcome {
                        Ok(Ok(response)) => format!("status {}", response.status()),
                        Ok(Err(err)) => crate::error::chain(&err),
                        Err(_) => "timed out".to_owned(),
                    };
                    if attempt == ATTEMPTS {
                        tracing::warn!(
                            webhook = host,
                            attempts = ATTEMPTS,
                            reason,
                            "alert webhook failed: alert not delivered"
                        );
                    } else {
                        tracing::debug!(
                            webhook = host,
                            attempt,
                            reason,
                            "alert webhook failed: retrying"
                        );
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(scope: &str, message: &str) -> Alert {
        Alert {
            period: Some("daily"),
            threshold_percent: Some(80),
            limit_usd: Some(1.0),
            spent_usd: Some(0.8),
            ..Alert::new(
                jiff::Timestamp::UNIX_EPOCH,
                "budget_threshold",
                scope,
                message.to_owned(),
            )
        }
    }

    fn body(alert: &Alert, format: WebhookFormat) -> serde_json::Value {
        serde_json::from_slice(&alert.to_body(format).unwrap()).unwrap()
    }

    #[test]
    fn json_is_the_alert_and_chats_get_its_line() {
        let a = alert(
            "agent-a",
            "key agent-a reached 80% of its daily budget ($0.80 of $1.00)",
        );
        assert_eq!(
            body(&a, WebhookFormat::Json),
            serde_json::to_value(&a).unwrap()
        );
        let line = "llm-meter: key agent-a reached 80% of its daily budget ($0.80 of $1.00)";
        assert_eq!(body(&a, WebhookFormat::Slack), json!({"text": line}));
        assert_eq!(
            body(&a, WebhookFormat::Discord),
            json!({"content": line, "allowed_mentions": {"parse": []}})
        );
    }

    #[test]
    fn chat_lines_show_names_as_written() {
        let a = alert("a_b", "key a_b <x> & *y*");
        assert_eq!(
            body(&a, WebhookFormat::Slack)["text"],
            "llm-meter: key a_b &lt;x&gt; &amp; *y*"
        );
        assert_eq!(
            body(&a, WebhookFormat::Discord)["content"],
            r"llm-meter: key a\_b \<x\> & \*y\*"
        );
    }

    #[test]
    fn the_global_scope_is_all_keys_together() {
        assert_eq!(subject("global"), "all keys together");
        assert_eq!(subject("agent-a"), "key agent-a");
    }
}
