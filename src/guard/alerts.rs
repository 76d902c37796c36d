//! Alerts: budget thresholds crossed and anomalies, each one a warning log line, an entry in
//! `/alerts`, and (optionally) a webhook POST made by a background task that retries with
//! backoff and never holds up a request.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Uri, header};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::Dialer;
use crate::tasks::Tasks;

/// Alerts kept for `/alerts`, newest first.
const RECENT: usize = 200;
/// Alerts waiting for the webhook; past it new ones are not sent (they are still logged and listed).
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
    /// `budget_threshold`, `large_request` or `hourly_spend`.
    pub kind: &'static str,
    /// The key name, or `global`.
    pub scope: String,
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
}

impl Alert {
    /// An alert with only its time, kind, scope and message; the figures are added by the caller.
    pub fn new(at: jiff::Timestamp, kind: &'static str, scope: &str, message: String) -> Self {
        Self {
            at: at.to_string(),
            kind,
            scope: scope.to_owned(),
            period: None,
            threshold_percent: None,
            limit_usd: None,
            spent_usd: None,
            prompt_tokens: None,
            message,
        }
    }
}

/// Where alerts go.
pub struct Alerts {
    recent: Mutex<VecDeque<Alert>>,
    webhook: Option<mpsc::Sender<Alert>>,
}

impl Alerts {
    /// Alerts without a webhook.
    pub fn new() -> Self {
        Self {
            recent: Mutex::new(VecDeque::new()),
            webhook: None,
        }
    }

    /// Alerts that are also POSTed to `url` by a task that `tasks` owns, on the current runtime
    /// (when there is none, as in a command that serves nothing, the webhook is off). At
    /// shutdown the task delivers what is queued, within the grace period.
    pub fn with_webhook(url: Uri, client: Dialer, tasks: &Tasks) -> Self {
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        let owned = tasks.clone();
        let webhook = tasks
            .spawn(async move {
                tokio::select! {
                    () = deliver(url, client, rx, &owned) => {}
                    () = owned.stopping() => {
                        tracing::warn!("grace period over: queued alerts not delivered");
                    }
                }
            })
            .then_some(tx);
        Self {
            recent: Mutex::new(VecDeque::new()),
            webhook,
        }
    }

    /// Fires an alert: logged, listed, and handed to the webhook task without waiting.
    pub fn fire(&self, alert: Alert) {
        tracing::warn!(
            kind = alert.kind,
            scope = alert.scope,
            period = alert.period,
            threshold_percent = alert.threshold_percent,
            "alert: {}",
            alert.message
        );
        if let Some(webhook) = &self.webhook
            && webhook.try_send(alert.clone()).is_err()
        {
            tracing::warn!("alert webhook is behind: this alert is not sent");
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
/// posts what is queued and ends.
async fn deliver(url: Uri, client: Dialer, mut alerts: mpsc::Receiver<Alert>, tasks: &Tasks) {
    loop {
        let alert = tokio::select! {
            biased;
            alert = alerts.recv() => alert,
            () = tasks.closing() => alerts.try_recv().ok(),
        };
        let Some(alert) = alert else { return };
        let Ok(body) = serde_json::to_vec(&alert) else {
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
                            attempts = ATTEMPTS,
                            reason,
                            "alert webhook failed: alert not delivered"
                        );
                    } else {
                        tracing::debug!(attempt, reason, "alert webhook failed: retrying");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
    }
}
