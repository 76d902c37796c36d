//! Refusals: why a request is not forwarded, and the answer its client gets.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};

use super::budget::whose;
use super::period::Period;
use crate::error::Envelope;
use crate::money::NanoUsd;

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The key is not one of the named keys and `require_known_keys` is on.
    #[error("this API key is not one of the keys llm-meter is configured to accept")]
    UnknownKey,
    /// A budget of the key (or the global one) is spent.
    #[error(
        "the {} budget of {} is spent: {} of {}; it resets at {}",
        period.as_str(),
        whose(scope),
        spent,
        limit,
        resets_at.as_deref().unwrap_or("never (a total budget)")
    )]
    BudgetExceeded {
        /// The key name, or `global`.
        scope: String,
        /// Which budget.
        period: Period,
        /// The budget.
        limit: NanoUsd,
        /// What was spent in the period.
        spent: NanoUsd,
        /// When the period ends (RFC 3339); `None` for the total budget.
        resets_at: Option<String>,
    },
    /// A per-minute rate limit of the key is reached.
    #[error(
        "key {scope:?} is over its limit of {limit} {unit} per minute; retry after {} s",
        retry_after.as_secs_f64().ceil()
    )]
    RateLimited {
        /// The key name.
        scope: String,
        /// `requests` or `tokens`.
        unit: &'static str,
        /// The limit per minute.
        limit: u64,
        /// How long until a request would be admitted.
        retry_after: Duration,
    },
}

impl Refusal {
    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownKey => StatusCode::UNAUTHORIZED,
            Self::BudgetExceeded { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        // OpenAI's and Anthropic's SDKs retry a 429 unless told not to: a spent budget or a
        // refused key does not get better in a few seconds.
        let no_retry = (
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static("false"),
        );
        match &self {
            Self::UnknownKey => Envelope::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                &self,
            )
            .with_header(no_retry.0, no_retry.1),
            Self::BudgetExceeded {
                scope,
                period,
                limit,
                spent,
                resets_at,
            } => Envelope::new(
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exceeded",
                "budget_exceeded",
                &self,
            )
            .with_detail(
                "budget",
                serde_json::json!({"scope": scope, "period": period.as_str(),
                    "limit_usd": limit.as_usd(), "spent_usd": spent.as_usd(),
                    "resets_at": resets_at}),
            )
            .with_header(no_retry.0, no_retry.1),
            Self::RateLimited {
                unit,
                limit,
                retry_after,
                ..
            } => Envelope::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                &self,
            )
            .with_detail(
                "limit",
                serde_json::json!({"unit": unit, "per_minute": limit}),
            )
            .with_header(
                header::RETRY_AFTER,
                // Whole seconds, rounded up, at least one.
                HeaderValue::from(
                    (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1),
                ),
            ),
        }
        .into_response()
    }
}
