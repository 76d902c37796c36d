//! WebSocket settings: how long a relayed WebSocket may stay silent or open, and the largest
//! message (or frame) it may carry.

use std::time::Duration;

use super::file::FileConfig;
use super::{ConfigError, invalid, parse_duration};

/// Default `websocket_idle_timeout`: a Codex turn or a Realtime session is silent for seconds
/// while a user thinks; five minutes, like `idle_timeout`, leaves room for that.
pub const DEFAULT_IDLE_TIMEOUT: &str = "5m";
/// Default `websocket_max_duration`: the longest session OpenAI's Realtime API allows (60 min).
pub const DEFAULT_MAX_DURATION: &str = "60m";
/// Default `websocket_max_message_bytes`: as large as `max_body_bytes`' default, since a
/// `response.create` carries what a request body would.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 32 * 1024 * 1024;

/// The limits of one relayed WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Longest time with no message either way; then both sides are closed (1001).
    pub idle_timeout: Duration,
    /// Longest a WebSocket stays open; then both sides are closed (1001).
    pub max_duration: Duration,
    /// Largest message (and frame) either side may send; past it both sides are closed (1009).
    pub max_message_bytes: usize,
}

/// The WebSocket settings, from the file or their defaults.
pub(super) fn settings(file: &FileConfig, file_name: &str) -> Result<Settings, ConfigError> {
    let duration = |field: &str, value: Option<&str>, default: &str| {
        parse_duration(value.unwrap_or(default)).map_err(|r| invalid(field, file_name, r))
    };
    let max_message_bytes = file
        .websocket_max_message_bytes
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
    let max_message_bytes = usize::try_from(max_message_bytes)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            invalid(
                "websocket_max_message_bytes",
                file_name,
                "must be a positive number of bytes",
            )
        })?;
    Ok(Settings {
        idle_timeout: duration(
            "websocket_idle_timeout",
            file.websocket_idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        )?,
        max_duration: duration(
            "websocket_max_duration",
            file.websocket_max_duration.as_deref(),
            DEFAULT_MAX_DURATION,
        )?,
        max_message_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::super::file::parse_file;
    use super::*;

    fn from(toml: &str) -> Result<Settings, ConfigError> {
        settings(&parse_file(toml, "proxy.toml").unwrap(), "proxy.toml")
    }

    #[test]
    fn defaults_apply_when_the_file_says_nothing() {
        let got = from("").unwrap();
        assert_eq!(got.idle_timeout, Duration::from_secs(300));
        assert_eq!(got.max_duration, Duration::from_secs(3600));
        assert_eq!(got.max_message_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn the_file_sets_each_limit() {
        let got = from(
            "websocket_idle_timeout = \"30s\"\nwebsocket_max_duration = \"2h\"\nwebsocket_max_message_bytes = 1024\n",
        )
        .unwrap();
        assert_eq!(got.idle_timeout, Duration::from_secs(30));
        assert_eq!(got.max_duration, Duration::from_secs(7200));
        assert_eq!(got.max_message_bytes, 1024);
    }

    #[test]
    fn zero_or_unreadable_limits_name_their_field() {
        for (toml, field) in [
            ("websocket_idle_timeout = \"0s\"", "websocket_idle_timeout"),
            (
                "websocket_max_duration = \"soon\"",
                "websocket_max_duration",
            ),
            (
                "websocket_max_message_bytes = 0",
                "websocket_max_message_bytes",
            ),
        ] {
            let err = from(toml).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
    }
}
