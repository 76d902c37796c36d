//! The raw shape of `proxy.toml`, as serde reads it: every field optional, unknown fields
//! rejected; validation is the sections' job.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use super::pricing::{ModelsEntry, PriceEntries};

/// The raw shape of `proxy.toml`: every field optional, unknown fields rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) header_timeout: Option<String>,
    pub(super) keepalive_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_tracked_keys: Option<usize>,
    pub(super) max_models_per_key: Option<usize>,
    pub(super) metrics_max_series: Option<usize>,
    pub(super) upstream: Option<String>,
    pub(super) admin_token: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) threads: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) persist: Option<bool>,
    pub(super) ledger_url: Option<String>,
    pub(super) flush_interval: Option<String>,
    pub(super) max_pending_rows: Option<usize>,
    pub(super) on_client_disconnect: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) proxy: Option<String>,
    pub(super) no_proxy: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) tls_roots: Option<String>,
    pub(super) websocket_idle_timeout: Option<String>,
    pub(super) websocket_max_duration: Option<String>,
    pub(super) websocket_max_message_bytes: Option<u64>,
    pub(super) cost_header: Option<bool>,
    pub(super) otlp_endpoint: Option<String>,
    pub(super) otlp_headers: Option<BTreeMap<String, String>>,
    pub(super) otlp_metrics_interval: Option<String>,
    #[serde(default)]
    pub(super) pricing: BTreeMap<String, PriceEntries>,
    pub(super) pricing_file: Option<PathBuf>,
    pub(super) models: Option<ModelsEntry>,
    #[serde(default)]
    pub(super) upstreams: BTreeMap<String, UpstreamEntry>,
    pub(super) require_known_keys: Option<bool>,
    pub(super) budget_timezone: Option<String>,
    pub(super) alert_thresholds: Option<Vec<u32>>,
    pub(super) alert_webhook: Option<String>,
    pub(super) alert_webhook_format: Option<String>,
    #[serde(default)]
    pub(super) alert_webhooks: Vec<WebhookEntry>,
    pub(super) large_request_tokens: Option<u64>,
    pub(super) budget: Option<BudgetEntry>,
    #[serde(default)]
    pub(super) keys: BTreeMap<String, KeyEntry>,
}

/// `[budget]`: the budget of all keys together, USD.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BudgetEntry {
    pub(super) daily_usd: Option<f64>,
    pub(super) monthly_usd: Option<f64>,
    pub(super) total_usd: Option<f64>,
}

/// One `[[alert_webhooks]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookEntry {
    pub(super) url: Option<String>,
    pub(super) format: Option<String>,
}

/// One `[keys.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyEntry {
    pub(super) key_env: Option<String>,
    pub(super) key_sha256: Option<String>,
    pub(super) upstream_key_env: Option<String>,
    pub(super) daily_usd: Option<f64>,
    pub(super) monthly_usd: Option<f64>,
    pub(super) total_usd: Option<f64>,
    pub(super) tokens_per_minute: Option<u64>,
    pub(super) requests_per_minute: Option<u64>,
    pub(super) tags: Option<BTreeMap<String, String>>,
}

/// One `[upstreams.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamEntry {
    pub(super) prefix: Option<String>,
    pub(super) url: Option<String>,
    pub(super) flavor: Option<String>,
    pub(super) inject_stream_usage: Option<String>,
    pub(super) proxy: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) http2: Option<Http2Entry>,
    pub(super) pricing_multiplier: Option<f64>,
    #[serde(default)]
    pub(super) pricing: BTreeMap<String, PriceEntries>,
}

/// `http2 = true | false | "prior-knowledge"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Http2Entry {
    /// `true` (when offered) or `false` (never).
    Switch(bool),
    /// `"prior-knowledge"`, or another word that is refused.
    Word(String),
}

/// Parses TOML, turning the parser's multi-line report into `file line N: `field`: message`.
pub(super) fn parse_file(text: &str, name: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|span| span.start.min(text.len()));
        let mut message = e.message().trim().replace('\n', " ");
        if let Some(field) = start.and_then(|at| field_at(text, at))
            && !message.contains(&field)
        {
            message = format!("`{field}`: {message}");
        }
        ConfigError::Parse {
            path: match start {
                Some(at) => format!("{name} line {}", text[..at].matches('\n').count() + 1),
                None => name.to_owned(),
            },
            message,
        }
    })
}

/// The dotted name of the `key = value` line containing `offset`, under its `[table]` header.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}
