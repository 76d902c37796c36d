//! Refusals: why a request is not forwarded, and the answer its client gets.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::budget::whose;
use super::period::Period;
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
        let message = format!("llm-meter: {self}");
        let (status, body, retry_after) = match &self {
            Self::UnknownKey => (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                    "code": "invalid_api_key", "param": null}}),
                None,
            ),
            Self::BudgetExceeded {
                scope,
                period,
                limit,
                spent,
                resets_at,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": {"message": message, "type": "budget_exceeded",
                    "code": "budget_exceeded", "param": null,
                    "budget": {"scope": scope, "period": period.as_str(),
                        "limit_usd": limit.as_usd(), "spent_usd": spent.as_usd(),
                        "resets_at": resets_at}}}),
                None,
            ),
            Self::RateLimited {
                unit,
                limit,
                retry_after,
                ..
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": {"message": message, "type": "rate_limit_exceeded",
                    "code": "rate_limit_exceeded", "param": null,
                    "limit": {"unit": unit, "per_minute": limit}}}),
                Some(retry_after.as_secs_f64().ceil().max(1.0)),
            ),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        match retry_after {
            Some(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
            }
            // OpenAI's and Anthropic's SDKs retry a 429 unless told not to: a spent budget
            // or a refused key does not get better in a few seconds.
            None => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        response
    }
}
