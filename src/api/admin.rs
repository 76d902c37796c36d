//! Named keys and alerts: `GET /admin/keys`, `PUT /admin/keys/NAME/budget`, `GET /alerts`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::AppState;
use crate::error::ProxyError;
use crate::guard::{AdminError, Budget};
use crate::money::NanoUsd;
use crate::proxy::read_body;

/// `GET /admin/keys`: every named key with its budgets, spend and limits, and the global budget.
pub async fn keys(State(state): State<AppState>) -> Response {
    Json(state.guard.view()).into_response()
}

/// The body of `PUT /admin/keys/NAME/budget`: USD per period; absent or `null` means no limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetChange {
    daily_usd: Option<f64>,
    monthly_usd: Option<f64>,
    total_usd: Option<f64>,
}

fn nano(field: &str, usd: Option<f64>) -> Result<Option<NanoUsd>, AdminError> {
    usd.map(|v| NanoUsd::from_usd(v).map_err(|e| AdminError::Invalid(format!("`{field}` {e}"))))
        .transpose()
}

/// Largest budget body read: three numbers need a few dozen bytes, and this leaves room for any
/// formatting while refusing a runaway upload.
pub const MAX_BUDGET_BODY_BYTES: usize = 64 * 1024;

/// Characters of a parser message answered: serde quotes a string of the wrong type whole.
const MAX_REASON_CHARS: usize = 160;

/// `reason`, cut to `MAX_REASON_CHARS` characters.
fn shortened(reason: &str) -> String {
    match reason.char_indices().nth(MAX_REASON_CHARS) {
        Some((end, _)) => format!("{}…", &reason[..end]),
        None => reason.to_owned(),
    }
}

/// `PUT /admin/keys/NAME/budget` (`NAME` may be `global`): replaces the budgets, at once and
/// for good (kept in `budgets.json` in the data directory). Requires the admin token.
pub async fn set_budget(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    // Budgets change for good: only with a token, checked by `api::access` before this.
    if state.config.admin_token.is_none() {
        return ProxyError::NoAdminToken.into_response();
    }
    // Past the limit, the OpenAI-style 413 (axum's `Bytes` extractor would answer in plain
    // text); a body that stalls gets 408, as on provider routes.
    let body = match read_body(body, MAX_BUDGET_BODY_BYTES, state.config.header_timeout).await {
        Ok(body) => body,
        Err(err) => return err.into_response(),
    };
    let change: BudgetChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(err) => {
            return ProxyError::BadQuery(format!(
                "expected {{\"daily_usd\": …, \"monthly_usd\": …, \"total_usd\": …}}: {}",
                shortened(&err.to_string())
            ))
            .into_response();
        }
    };
    let budget = (|| {
        Ok::<_, AdminError>(Budget {
            daily: nano("daily_usd", change.daily_usd)?,
            monthly: nano("monthly_usd", change.monthly_usd)?,
            total: nano("total_usd", change.total_usd)?,
        })
    })();
    // Saving writes a file, or the shared ledger's table: off the serving thread.
    let guard = std::sync::Arc::clone(&state.guard);
    let scope = name.clone();
    let saved = tokio::task::spawn_blocking(move || {
        budget.and_then(|budget| guard.set_budget(&scope, budget))
    })
    .await
    .unwrap_or_else(|err| {
        Err(AdminError::Save {
            path: "budgets".into(),
            reason: err.to_string(),
        })
    });
    match saved {
        Ok(()) => {
            tracing::info!(key = name, "budget changed");
            let view = state.guard.view();
            let changed = if name == "global" {
                serde_json::json!({"name": "global", "budget": view.global})
            } else {
                serde_json::to_value(view.keys.iter().find(|k| k.name == name)).unwrap_or_default()
            };
            Json(changed).into_response()
        }
        Err(AdminError::UnknownKey(name)) => ProxyError::UnknownKeyName(name).into_response(),
        Err(AdminError::Invalid(reason)) => ProxyError::BadQuery(reason).into_response(),
        Err(err @ AdminError::Save { .. }) => {
            tracing::error!(%err, "budget changed in memory only");
            ProxyError::BudgetNotSaved(err.to_string()).into_response()
        }
    }
}

/// `GET /alerts`: the recent alerts, newest first.
pub async fn alerts(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({"alerts": state.guard.alerts().recent()})).into_response()
}
