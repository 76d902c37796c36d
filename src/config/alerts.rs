//! Where alerts are posted: `alert_webhook` (with `alert_webhook_format`) for one webhook,
//! `[[alert_webhooks]]` tables for several; each is validated into a `Webhook`.

use super::file::WebhookEntry;
use super::{ConfigError, invalid};

/// How an alert is written for a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// The alert's fields, as `/alerts` lists them.
    #[default]
    Json,
    /// `{"text": …}`: one line, as Slack's incoming webhooks take it.
    Slack,
    /// `{"content": …}`: one line, as Discord's webhooks take it.
    Discord,
}

impl WebhookFormat {
    /// The names `format` takes, for messages.
    pub const NAMES: &str = "json, slack or discord";

    /// Parses `json`, `slack` or `discord`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Self::Json),
            "slack" => Some(Self::Slack),
            "discord" => Some(Self::Discord),
            _ => None,
        }
    }
}

/// One webhook alerts are POSTed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Where (http or https).
    pub url: http::Uri,
    /// How the alert is written.
    pub format: WebhookFormat,
}

/// The webhooks of the file: `alert_webhook` first (in `alert_webhook_format`), then each
/// `[[alert_webhooks]]` table in order. The same URL may appear once.
pub(super) fn webhooks(
    single: Option<&str>,
    single_format: Option<&str>,
    tables: &[WebhookEntry],
    name: &str,
) -> Result<Vec<Webhook>, ConfigError> {
    let mut out: Vec<Webhook> = Vec::new();
    match (single, single_format) {
        (Some(url), format) => out.push(Webhook {
            url: url_of(url, "alert_webhook", name)?,
            format: format_of(format, "alert_webhook_format", name)?,
        }),
        (None, Some(_)) => {
            return Err(invalid(
                "alert_webhook_format",
                name,
                "is the format of alert_webhook, which is not set (each [[alert_webhooks]] table takes its own format)",
            ));
        }
        (None, None) => {}
    }
    for (i, table) in tables.iter().enumerate() {
        let field = |part: &str| format!("alert_webhooks[{i}].{part}");
        let url = table
            .url
            .as_deref()
            .ok_or_else(|| invalid(&field("url"), name, "is missing"))?;
        let hook = Webhook {
            url: url_of(url, &field("url"), name)?,
            format: format_of(table.format.as_deref(), &field("format"), name)?,
        };
        if out.iter().any(|h| h.url == hook.url) {
            return Err(invalid(
                &field("url"),
                name,
                "is given twice: each webhook would get every alert twice",
            ));
        }
        out.push(hook);
    }
    Ok(out)
}

fn url_of(url: &str, field: &str, name: &str) -> Result<http::Uri, ConfigError> {
    url.parse()
        .ok()
        .filter(|u: &http::Uri| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
        })
        .ok_or_else(|| invalid(field, name, "must be an http(s) URL"))
}

fn format_of(format: Option<&str>, field: &str, name: &str) -> Result<WebhookFormat, ConfigError> {
    match format {
        None => Ok(WebhookFormat::default()),
        Some(format) => WebhookFormat::parse(format).ok_or_else(|| {
            invalid(
                field,
                name,
                format!("{format:?} is not a format: use {}", WebhookFormat::NAMES),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags};

    fn load(file: &str) -> Result<Vec<Webhook>, ConfigError> {
        let flags = Flags {
            no_persist: true,
            ..Flags::default()
        };
        Config::from_layers(Some(file), None, &Default::default(), &flags).map(|c| c.guard.webhooks)
    }

    fn hook(url: &str, format: WebhookFormat) -> Webhook {
        Webhook {
            url: url.parse().unwrap(),
            format,
        }
    }

    #[test]
    fn one_webhook_is_json_unless_a_format_is_given() {
        assert_eq!(
            load("alert_webhook = \"https://hooks.example.com/a\"").unwrap(),
            [hook("https://hooks.example.com/a", WebhookFormat::Json)]
        );
        assert_eq!(
            load("alert_webhook = \"https://hooks.example.com/a\"\nalert_webhook_format = \"discord\"")
                .unwrap(),
            [hook("https://hooks.example.com/a", WebhookFormat::Discord)]
        );
        assert!(load("").unwrap().is_empty());
    }

    #[test]
    fn several_webhooks_each_have_their_format_after_the_single_one() {
        let hooks = load(
            r#"
            alert_webhook = "https://one.example/a"
            [[alert_webhooks]]
            url = "https://hooks.slack.com/services/T/B/X"
            format = "slack"
            [[alert_webhooks]]
            url = "http://127.0.0.1:9000/alerts"
            "#,
        )
        .unwrap();
        assert_eq!(
            hooks,
            [
                hook("https://one.example/a", WebhookFormat::Json),
                hook(
                    "https://hooks.slack.com/services/T/B/X",
                    WebhookFormat::Slack
                ),
                hook("http://127.0.0.1:9000/alerts", WebhookFormat::Json),
            ]
        );
    }

    #[test]
    fn bad_webhooks_name_their_field() {
        for (file, expected) in [
            (
                "alert_webhook = \"https://a.example\"\nalert_webhook_format = \"teams\"",
                "`alert_webhook_format`",
            ),
            ("alert_webhook_format = \"slack\"", "`alert_webhook_format`"),
            (
                "[[alert_webhooks]]\nurl = \"https://a.example\"\nformat = \"Slack\"",
                "`alert_webhooks[0].format`",
            ),
            (
                "[[alert_webhooks]]\nurl = \"https://a.example\"\n[[alert_webhooks]]\nurl = \"ftp://b\"",
                "`alert_webhooks[1].url`",
            ),
            (
                "[[alert_webhooks]]\nformat = \"json\"",
                "`alert_webhooks[0].url`",
            ),
            (
                "alert_webhook = \"https://a.example/x\"\n[[alert_webhooks]]\nurl = \"https://a.example/x\"",
                "given twice",
            ),
            (
                "[[alert_webhooks]]\nurl = \"https://a.example\"\nchannel = \"#ops\"",
                "channel",
            ),
        ] {
            let message = load(file).unwrap_err().to_string();
            assert!(message.contains(expected), "{file:?}: {message}");
        }
    }
}
