//! The guard's settings: named keys, budgets, alert thresholds, validated from `[keys.NAME]`,
//! `[budget]` and the alert options; the guard acts on them.

use std::collections::{BTreeMap, HashMap};

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::alerts::Webhook;
use super::file::{BudgetEntry, KeyEntry, WebhookEntry};
use super::{ConfigError, Secret, invalid, is_plain_name};
use crate::money::NanoUsd;

/// Default alert thresholds, in percent of each budget.
pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];
/// Default prompt size of one request that is reported as an anomaly.
pub const DEFAULT_LARGE_REQUEST_TOKENS: u64 = 8_000;
/// USD budgets of one scope; `None` where there is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Per calendar day.
    pub daily: Option<NanoUsd>,
    /// Per calendar month.
    pub monthly: Option<NanoUsd>,
    /// In total.
    pub total: Option<NanoUsd>,
}

/// A `[keys.NAME]` entry, validated.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// The readable name shown in `/stats`.
    pub name: String,
    /// SHA-256 of the client key it matches.
    pub digest: [u8; 32],
    /// The key sent upstream in place of the client's (a virtual key), if any.
    pub upstream_key: Option<Secret>,
    /// Its budgets.
    pub budget: Budget,
    /// Tokens per minute (usage recorded), if limited.
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute, if limited.
    pub requests_per_minute: Option<u64>,
    /// Tags every request with this key carries unless its `X-LLM-Meter-Tags` names them.
    pub tags: crate::attribution::Tags,
}

/// Everything the guard is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The named keys.
    pub keys: Vec<KeySettings>,
    /// The budget of all keys together.
    pub global: Budget,
    /// Refuse (401) keys that are not named.
    pub require_known_keys: bool,
    /// The time zone of daily and monthly budgets.
    pub timezone: TimeZone,
    /// Alert thresholds in percent, ascending.
    pub thresholds: Vec<u32>,
    /// Where alerts are POSTed, each webhook in its format.
    pub webhooks: Vec<Webhook>,
    /// A request with more prompt tokens than this is reported as an anomaly.
    pub large_request_tokens: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            global: Budget::default(),
            require_known_keys: false,
            timezone: TimeZone::UTC,
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
            webhooks: Vec::new(),
            large_request_tokens: DEFAULT_LARGE_REQUEST_TOKENS,
        }
    }
}

/// The guard's part of the file, taken out before the rest is consumed.
pub(super) struct GuardFile {
    pub(super) require_known_keys: Option<bool>,
    pub(super) budget_timezone: Option<String>,
    pub(super) alert_thresholds: Option<Vec<u32>>,
    pub(super) alert_webhook: Option<String>,
    pub(super) alert_webhook_format: Option<String>,
    pub(super) alert_webhooks: Vec<WebhookEntry>,
    pub(super) large_request_tokens: Option<u64>,
    pub(super) budget: BudgetEntry,
    pub(super) keys: BTreeMap<String, KeyEntry>,
}

/// Validates named keys, budgets, rate limits and alert settings; every error names its field.
impl GuardFile {
    /// Takes the guard's part out of the file.
    pub(super) fn take(file: &mut super::file::FileConfig) -> Self {
        Self {
            require_known_keys: file.require_known_keys,
            budget_timezone: file.budget_timezone.take(),
            alert_thresholds: file.alert_thresholds.take(),
            alert_webhook: file.alert_webhook.take(),
            alert_webhook_format: file.alert_webhook_format.take(),
            alert_webhooks: std::mem::take(&mut file.alert_webhooks),
            large_request_tokens: file.large_request_tokens,
            budget: file.budget.take().unwrap_or_default(),
            keys: std::mem::take(&mut file.keys),
        }
    }
}

pub(super) fn settings(
    file: &GuardFile,
    env: &HashMap<String, String>,
    name: &str,
) -> Result<Settings, ConfigError> {
    let mut settings = Settings {
        require_known_keys: file.require_known_keys.unwrap_or(false),
        global: budget_of(
            "budget",
            [
                file.budget.daily_usd,
                file.budget.monthly_usd,
                file.budget.total_usd,
            ],
            name,
        )?,
        ..Settings::default()
    };
    if let Some(zone) = &file.budget_timezone {
        settings.timezone = jiff::tz::TimeZone::get(zone).map_err(|_| {
            invalid(
                "budget_timezone",
                name,
                format!(
                    "unknown time zone {zone:?} (IANA names such as \"Europe/Paris\", or \"UTC\")"
                ),
            )
        })?;
    }
    if let Some(thresholds) = &file.alert_thresholds {
        if thresholds.is_empty() || thresholds.iter().any(|t| !(1..=100).contains(t)) {
            return Err(invalid(
                "alert_thresholds",
                name,
                "must be percentages from 1 to 100, such as [50, 80, 100]",
            ));
        }
        let mut sorted = thresholds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        settings.thresholds = sorted;
    }
    settings.webhooks = super::alerts::webhooks(
        file.alert_webhook.as_deref(),
        file.alert_webhook_format.as_deref(),
        &file.alert_webhooks,
        name,
    )?;
    if let Some(tokens) = file.large_request_tokens {
        if tokens == 0 {
            return Err(invalid("large_request_tokens", name, "must be at least 1"));
        }
        settings.large_request_tokens = tokens;
    }
    for (key_name, entry) in &file.keys {
        let key = key_settings(key_name, entry, &settings.keys, env, name)?;
        settings.keys.push(key);
    }
    Ok(settings)
}

/// One `[keys.NAME]` table, validated; `earlier` are the keys before it (a key may be named once).
fn key_settings(
    key_name: &str,
    entry: &KeyEntry,
    earlier: &[KeySettings],
    env: &HashMap<String, String>,
    name: &str,
) -> Result<KeySettings, ConfigError> {
    let field = |part: &str| format!("keys.{key_name}.{part}");
    if !is_plain_name(key_name) || key_name == "global" {
        return Err(invalid(
            &format!("keys.{key_name}"),
            name,
            "a name may only have letters, digits, '-' and '_' (and is not \"global\")",
        ));
    }
    let from_env = |part: &str, var: &str| {
        env.get(var)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                invalid(
                    &field(part),
                    name,
                    format!("environment variable {var} is not set"),
                )
            })
    };
    let digest = match (&entry.key_env, &entry.key_sha256) {
        (Some(var), None) => crate::key::digest(from_env("key_env", var)?.as_bytes()),
        (None, Some(hex)) => parse_sha256(hex).ok_or_else(|| {
            invalid(
                &field("key_sha256"),
                name,
                "must be 64 hexadecimal digits (sha256sum of the key)",
            )
        })?,
        _ => {
            return Err(invalid(
                &field("key_env"),
                name,
                "give exactly one of key_env (the variable holding the key) and key_sha256",
            ));
        }
    };
    if let Some(other) = earlier.iter().find(|k| k.digest == digest) {
        return Err(invalid(
            &field("key_env"),
            name,
            format!("the same key as keys.{}", other.name),
        ));
    }
    let upstream_key = match &entry.upstream_key_env {
        Some(var) => Some(Secret(from_env("upstream_key_env", var)?)),
        None => None,
    };
    let per_minute = |part: &str, value: Option<u64>| match value {
        Some(0) => Err(invalid(&field(part), name, "must be at least 1")),
        other => Ok(other),
    };
    Ok(KeySettings {
        name: key_name.to_owned(),
        digest,
        upstream_key,
        budget: budget_of(
            &format!("keys.{key_name}"),
            [entry.daily_usd, entry.monthly_usd, entry.total_usd],
            name,
        )?,
        tokens_per_minute: per_minute("tokens_per_minute", entry.tokens_per_minute)?,
        requests_per_minute: per_minute("requests_per_minute", entry.requests_per_minute)?,
        tags: default_tags(entry.tags.as_ref(), &field("tags"), name)?,
    })
}

/// A key's default tags, held to the rules of the `X-LLM-Meter-Tags` header.
fn default_tags(
    tags: Option<&BTreeMap<String, String>>,
    field: &str,
    name: &str,
) -> Result<crate::attribution::Tags, ConfigError> {
    use crate::attribution::{MAX_TAGS, check_tag_name, check_tag_value};
    let Some(tags) = tags else {
        return Ok(crate::attribution::Tags::new());
    };
    if tags.len() > MAX_TAGS {
        return Err(invalid(field, name, format!("at most {MAX_TAGS} tags")));
    }
    for (tag, value) in tags {
        check_tag_name(tag)
            .and_then(|()| check_tag_value(tag, value))
            .map_err(|reason| invalid(field, name, reason))?;
    }
    Ok(tags.clone())
}

/// Budgets in USD (daily, monthly, total) to nano-dollars; each must be at least a nano-dollar
/// and at most `NanoUsd::MAX`.
fn budget_of(table: &str, usd: [Option<f64>; 3], name: &str) -> Result<Budget, ConfigError> {
    let mut out = [None; 3];
    for ((slot, value), period) in out.iter_mut().zip(usd).zip(["daily", "monthly", "total"]) {
        let Some(value) = value else { continue };
        *slot = Some(
            NanoUsd::from_usd(value)
                .map_err(|e| invalid(&format!("{table}.{period}_usd"), name, e.to_string()))?,
        );
    }
    let [daily, monthly, total] = out;
    Ok(Budget {
        daily,
        monthly,
        total,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags, env};

    fn load(file: &str) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = [
            (env::HOME, "/home/ada"),
            ("AGENT_KEY", "sk-agent-0000"),
            ("REAL_KEY", "sk-real-1111"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        Config::from_layers(Some(file), None, &env, &Flags::default())
    }

    #[test]
    fn named_keys_budgets_and_alerts_are_read() {
        let c = load(
            r#"
            require_known_keys = true
            budget_timezone = "America/New_York"
            alert_thresholds = [90, 25, 90]
            alert_webhook = "https://hooks.example.com/llm"
            large_request_tokens = 20000
            [budget]
            monthly_usd = 200
            [keys.agent]
            key_env = "AGENT_KEY"
            upstream_key_env = "REAL_KEY"
            daily_usd = 1.5
            tokens_per_minute = 30000
            tags = { team = "search", "cost.center" = "42" }
            [keys.other]
            key_sha256 = "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824"
            "#,
        )
        .unwrap();
        let g = &c.guard;
        assert!(g.require_known_keys);
        assert_eq!(g.timezone.iana_name(), Some("America/New_York"));
        assert_eq!(g.thresholds, [25, 90]);
        assert_eq!(g.large_request_tokens, 20_000);
        assert_eq!(g.global.monthly, Some(NanoUsd(200_000_000_000)));
        let agent = &g.keys[0];
        assert_eq!(agent.digest, crate::key::digest(b"sk-agent-0000"));
        assert_eq!(
            agent.upstream_key.as_ref().map(Secret::expose),
            Some("sk-real-1111")
        );
        assert_eq!(agent.budget.daily, Some(NanoUsd(1_500_000_000)));
        assert_eq!(agent.tokens_per_minute, Some(30_000));
        assert_eq!(agent.tags["team"], "search");
        assert_eq!(agent.tags["cost.center"], "42");
        assert!(g.keys[1].tags.is_empty());
        // sha256("hello"), written in capitals.
        assert_eq!(g.keys[1].digest, crate::key::digest(b"hello"));
    }

    #[test]
    fn a_budget_of_billions_of_dollars_is_a_budget() {
        let c = load("[budget]\ntotal_usd = 1e10").unwrap();
        assert_eq!(
            c.guard.global.total,
            Some(NanoUsd(10_000_000_000_000_000_000))
        );
    }

    #[test]
    fn budgets_that_cannot_be_met_refuse_to_start_with_the_field_named() {
        for (file, expected) in [
            ("[budget]\ndaily_usd = -1", "`budget.daily_usd`"),
            ("[budget]\ndaily_usd = 0", "`budget.daily_usd`"),
            ("[budget]\ndaily_usd = 1e-12", "would round to $0"),
            ("[budget]\ndaily_usd = 1e308", "got 1e308"),
            ("[budget]\nweekly_usd = 5", "weekly_usd"),
            ("budget_timezone = \"Mars/Olympus\"", "`budget_timezone`"),
            ("alert_thresholds = [0, 50]", "`alert_thresholds`"),
            ("alert_thresholds = [150]", "`alert_thresholds`"),
            ("alert_webhook = \"ftp://x\"", "`alert_webhook`"),
            ("large_request_tokens = 0", "`large_request_tokens`"),
            ("[keys.a]\ndaily_usd = 1", "`keys.a.key_env`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nkey_sha256 = \"00\"",
                "`keys.a.key_env`",
            ),
            ("[keys.a]\nkey_env = \"NOT_SET\"", "NOT_SET is not set"),
            ("[keys.a]\nkey_sha256 = \"xyz\"", "`keys.a.key_sha256`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nupstream_key_env = \"NOPE\"",
                "`keys.a.upstream_key_env`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nrequests_per_minute = 0",
                "`keys.a.requests_per_minute`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nmonthly_usd = nan",
                "`keys.a.monthly_usd`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\n[keys.b]\nkey_env = \"AGENT_KEY\"",
                "the same key as keys.a",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\ntags = { Team = \"x\" }",
                "`keys.a.tags`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\ntags = { team = \"\" }",
                "`keys.a.tags`",
            ),
            ("[keys.global]\nkey_env = \"AGENT_KEY\"", "`keys.global`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nhourly_usd = 1",
                "hourly_usd",
            ),
        ] {
            let message = load(file).unwrap_err().to_string();
            assert!(message.contains(expected), "{file:?}: {message}");
        }
    }
}
