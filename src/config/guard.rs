//! The guard's settings: named keys, budgets, alert thresholds, validated from `[keys.NAME]`,
//! `[budget]` and the alert options; the guard acts on them.

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::Secret;
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
    /// Where alerts are POSTed, if anywhere.
    pub webhook: Option<http::Uri>,
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
            webhook: None,
            large_request_tokens: DEFAULT_LARGE_REQUEST_TOKENS,
        }
    }
}
