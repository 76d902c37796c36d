//! The shipped proxy.toml documents every option, and every documented example is valid.

use std::collections::HashMap;
use std::path::Path;

use llm_meter::config::alerts::WebhookFormat;
use llm_meter::config::{Config, Flags};

fn shipped() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml"))
        .expect("proxy.toml at the root")
}

/// The environment of a login: HOME (the default data directory), and the keys the examples
/// name (key_env, upstream_key_env).
fn login_env() -> HashMap<String, String> {
    HashMap::from([
        ("HOME".to_owned(), "/home/ada".to_owned()),
        ("AGENT_A_KEY".to_owned(), "sk-agent-a-example".to_owned()),
        ("OPENAI_API_KEY".to_owned(), "sk-real-example".to_owned()),
    ])
}

#[test]
fn shipped_file_is_valid_as_is() {
    let config =
        Config::from_layers(Some(&shipped()), None, &login_env(), &Flags::default()).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert!(config.ledger.is_some());
}

#[test]
fn every_commented_example_is_valid_when_uncommented() {
    let uncommented: String = shipped()
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                rest
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    for field in [
        "listen",
        "upstream",
        "admin_token",
        "log_format",
        "threads",
        "max_body_bytes",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "shutdown_grace",
        "data_dir",
        "persist",
        "flush_interval",
        "max_pending_rows",
        "on_client_disconnect",
        "drain_timeout",
        "url",
        "prefix",
        "flavor",
        "inject_stream_usage",
        "require_known_keys",
        "budget_timezone",
        "alert_thresholds",
        "alert_webhook",
        "alert_webhook_format",
        "format",
        "large_request_tokens",
        "daily_usd",
        "monthly_usd",
        "total_usd",
        "key_env",
        "key_sha256",
        "upstream_key_env",
        "tokens_per_minute",
        "requests_per_minute",
        "input_per_million",
        "output_per_million",
        "cached_input_per_million",
        "cache_write_per_million",
        "cache_write_1h_per_million",
        "since",
        "pricing_file",
        "alias",
        "pricing_multiplier",
    ] {
        assert!(
            uncommented
                .lines()
                .any(|l| l.starts_with(&format!("{field} = "))),
            "{field} is not documented"
        );
    }
    let config =
        Config::from_layers(Some(&uncommented), None, &login_env(), &Flags::default()).unwrap();
    assert_eq!(config.admin_token.unwrap().expose(), "change-me");
    let ledger = config.ledger.unwrap();
    assert_eq!(ledger.dir, Path::new("/var/lib/llm-meter"));
    assert!(config.pricing.prices.contains_key("my-fine-tune"));
    assert_eq!(config.pricing.aliases["my-gpt4o-deploy"], "gpt-4o");
    assert_eq!(
        config.pricing.upstreams["openrouter"].multiplier_ppm,
        Some(1_050_000)
    );
    assert!(config.routes.iter().any(|r| r.name == "gemini"));
    let agent = &config.guard.keys[0];
    assert_eq!(agent.name, "agent-a");
    assert!(agent.upstream_key.is_some());
    assert!(config.guard.global.daily.is_some());
    let formats: Vec<_> = config.guard.webhooks.iter().map(|w| w.format).collect();
    assert_eq!(
        formats,
        [
            WebhookFormat::Json,
            WebhookFormat::Slack,
            WebhookFormat::Discord
        ]
    );
}
