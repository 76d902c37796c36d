//! Our own endpoints: `/stats`, `/stats/reset`, `/healthz`, history, admin, the dashboard,
//! estimates; provider endpoints live in `proxy`.

pub mod admin;
pub mod dashboard;
pub mod estimate;
pub mod export;
pub mod history;
pub mod prices;
pub mod remote;
pub mod report;
pub mod reprice;
pub mod stats;

pub use remote::probe_health;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use http::{HeaderMap, Method, header};
use serde::Deserialize;

use crate::app::AppState;
use crate::error::ProxyError;
use crate::metrics::exposition::{Format, Scrape};

/// `?format=&since=&until=&limit=&key=` of `/stats`.
#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    format: Option<String>,
    /// Shows only the N most expensive keys (the totals still count every key).
    limit: Option<String>,
    /// Shows only the key with this id or label.
    key: Option<String>,
    /// `all`: every replica's totals, read from the shared ledger; `replica` (the default):
    /// this process's.
    scope: Option<String>,
    #[serde(flatten)]
    range: history::RangeQuery,
}

/// `GET /stats`: totals per key and model, as JSON or (`?format=text`) one line per key; the
/// current period's from memory, or any range's (`?since=&until=`) from the ledger.
pub async fn show(State(state): State<AppState>, Query(query): Query<StatsQuery>) -> Response {
    if !matches!(query.format.as_deref(), None | Some("json" | "text")) {
        return ProxyError::BadQuery("format must be json or text".into()).into_response();
    }
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => {
            return ProxyError::BadQuery("limit must be a whole number".into()).into_response();
        }
    };
    let is_all = match query.scope.as_deref() {
        None | Some("replica") => false,
        Some("all") => true,
        Some(_) => {
            return ProxyError::BadQuery("scope must be all or replica".into()).into_response();
        }
    };
    if is_all && state.meter.ledger().and_then(|l| l.db()).is_none() {
        return ProxyError::BadQuery(
            "scope=all reads the ledger replicas share: start llm-meter with ledger_url".into(),
        )
        .into_response();
    }
    let (mut snapshot, until, ledger) = if query.range.is_given() || is_all {
        let range = match query.range.parse() {
            Ok(range) => range,
            Err(err) => return err.into_response(),
        };
        match history::read(&state, move |reader| reader.totals(range)).await {
            // Every replica's totals up to now: the budgets and ledger state still apply.
            Ok(snapshot) if is_all && !query.range.is_given() => {
                (snapshot, None, state.meter.ledger().map(|l| l.health()))
            }
            Ok(snapshot) => (
                snapshot,
                Some(range.until.unwrap_or_else(time::OffsetDateTime::now_utc)),
                None,
            ),
            Err(err) => return err.into_response(),
        }
    } else {
        (
            state.meter.snapshot(),
            None,
            state.meter.ledger().map(|l| l.health()),
        )
    };
    let keys_total = snapshot.keys.len();
    if let Some(key) = &query.key {
        snapshot
            .keys
            .retain(|k| k.identity.id == *key || k.identity.label == *key);
    }
    if let Some(limit) = limit {
        snapshot.keys.truncate(limit);
    }
    // Budgets are about now: shown with the live totals, not with a history range.
    let budgets = until.is_none().then(|| state.guard.view());
    match query.format.as_deref() {
        None | Some("json") => Json(
            stats::StatsView::new(&snapshot)
                .keys_total(keys_total)
                .until(until)
                .ledger(ledger.as_ref())
                .shared(state.cluster.as_ref().map(|c| c.status()))
                .budgets(budgets.as_ref()),
        )
        .into_response(),
        Some("text") => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            stats::text(&snapshot, budgets.as_ref()),
        )
            .into_response(),
        Some(_) => ProxyError::BadQuery("format must be json or text".into()).into_response(),
    }
}

/// Our own endpoints; anything else that is under no upstream's prefix gets a 404.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/stats", get(show))
        .route("/stats/reset", post(reset))
        .route("/usage", get(history::usage))
        .route("/export", get(history::export))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(estimate::PATH, post(estimate::answer))
        .route("/estimate/{*provider_path}", post(estimate::answer))
        .route("/alerts", get(admin::alerts))
        .route("/admin/keys", get(admin::keys))
        .route("/admin/keys/{name}/budget", put(admin::set_budget))
        .route("/", get(dashboard::page))
        .route(dashboard::SCRIPT, get(dashboard::script))
        .route(dashboard::STYLE, get(dashboard::style))
        .route(dashboard::ICON, get(dashboard::icon))
        .fallback(crate::proxy::not_found)
        .with_state(state)
}

/// Why `llm-meter report` or `export` failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Persistence is off: there is no ledger to read.
    #[error(
        "persistence is off (persist = false or LLM_METER_PERSIST=false): there is no ledger to {0}"
    )]
    NoLedger(&'static str),
    /// An option's value is not one it takes.
    #[error("{option}: {reason}")]
    BadOption {
        /// The option, as typed (`--since`).
        option: &'static str,
        /// What is wrong with its value.
        reason: crate::error::InvalidValue,
    },
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] crate::meter::ledger::LedgerError),
    /// The output could not be written.
    #[error("export failed: {0}")]
    Write(#[from] std::io::Error),
    /// The JSON could not be rendered.
    #[error("cannot render the report: {0}")]
    Json(#[from] serde_json::Error),
    /// A price file named in the settings cannot be used.
    #[error(transparent)]
    PriceFile(#[from] crate::meter::pricing::load::LoadError),
    /// The price map could not be downloaded, checked or saved.
    #[error("{0}")]
    Prices(String),
    /// A file the command reads could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file, as given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The request given to `estimate` cannot be estimated.
    #[error("cannot estimate: {0}")]
    Estimate(String),
}

/// The path of the health check, open to every peer on every listener.
pub const HEALTHZ: &str = "/healthz";

/// Who may call our own endpoints: with an admin token set, every one but `/healthz` needs it
/// (reads included: the meter shows who spends what); without one, reads are open and changes
/// are taken from loopback peers only. One rule for every endpoint, those added later too.
/// `POST /estimate` is a read: it changes nothing.
///
/// The token comes as `Authorization: Bearer <token>`; reads also take it as the password of
/// `Authorization: Basic` (any user name), which is how a browser shows the dashboard: the 401
/// asks for it, and the browser sends it again with the page's own requests. Changes take the
/// bearer form only, as a browser never adds that to a request another site makes it send.
pub fn access(
    state: &AppState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    if path == HEALTHZ {
        return Ok(());
    }
    let is_read =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) || is_estimate(path);
    if let Some(token) = &state.config.admin_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| given_token(v.as_bytes(), is_read));
        return if given.is_some_and(|g| constant_time_eq(&g, token.expose().as_bytes())) {
            Ok(())
        } else {
            tracing::warn!(%peer, path, "refused a call: missing or wrong admin token");
            Err(ProxyError::Unauthorized)
        };
    }
    if is_read || is_loopback(peer) {
        Ok(())
    } else {
        tracing::warn!(%peer, path, "refused a change from a peer off loopback: no admin token is set");
        Err(ProxyError::NotLoopback)
    }
}

/// True for `/estimate` and the paths under it: posted, but changing nothing, so a read.
fn is_estimate(path: &str) -> bool {
    path.strip_prefix(estimate::PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The token in an `Authorization` value: a bearer token, or (for reads) a Basic password.
fn given_token(value: &[u8], is_read: bool) -> Option<Vec<u8>> {
    if let Some(bearer) = value.strip_prefix(b"Bearer ") {
        return Some(bearer.to_vec());
    }
    let basic = value.strip_prefix(b"Basic ").filter(|_| is_read)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// True for 127.0.0.0/8 and ::1, IPv4-mapped ones included.
pub fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `POST /stats/reset`: zeroes the totals and answers with those of the period it closed.
pub async fn reset(State(state): State<AppState>) -> Response {
    let closed = state.meter.reset();
    tracing::info!(
        requests = closed.totals.requests,
        cost_usd = closed.totals.cost.as_usd(),
        "stats reset"
    );
    Json(stats::StatsView::new(&closed)).into_response()
}

/// `GET /metrics`: the Prometheus series, as OpenMetrics or (when the scraper prefers it)
/// Prometheus text.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let health = state.meter.ledger().map(|l| l.health());
    let scrape = Scrape::new(
        state.metrics.recorded(),
        &state.guard.view(),
        health.as_ref(),
    );
    match scrape.encode(format) {
        Ok(text) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Err(_) => ProxyError::Internal.into_response(),
    }
}

/// `GET /healthz`: 200 while the server accepts requests.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Compares secrets in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_are_the_v4_and_v6_loopback_ranges_only() {
        for (peer, expected) in [
            ("127.0.0.1:1", true),
            ("127.8.9.10:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("10.0.0.2:1", false),
            ("172.17.0.1:1", false),
            ("[::ffff:10.0.0.2]:1", false),
            ("[fe80::1]:1", false),
            ("0.0.0.0:1", false),
        ] {
            assert_eq!(is_loopback(peer.parse().unwrap()), expected, "{peer}");
        }
    }

    #[test]
    fn the_token_is_a_bearer_or_for_reads_a_basic_password() {
        let basic = |pair: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        assert_eq!(given_token(b"Bearer s3cret", false).unwrap(), b"s3cret");
        let admin = basic("admin:s3:cret");
        assert_eq!(given_token(admin.as_bytes(), true).unwrap(), b"s3:cret");
        assert_eq!(
            given_token(basic(":s3cret").as_bytes(), true).unwrap(),
            b"s3cret"
        );
        assert_eq!(
            given_token(admin.as_bytes(), false),
            None,
            "changes take bearer only"
        );
        assert_eq!(given_token(basic("no colon").as_bytes(), true), None);
        assert_eq!(given_token(b"Basic !!!", true), None);
        assert_eq!(given_token(b"s3cret", true), None);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
