//! Anthropic's own count of a Messages request's input (`POST /v1/messages/count_tokens`),
//! asked of the upstream the request would go to, with the client's key.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use crate::app::AppState;
use crate::proxy::ask::{AskError, ask};

/// The path under an Anthropic upstream's prefix.
const PATH: &str = "/messages/count_tokens";
/// Anthropic's key header.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The API version header Anthropic requires, passed on as the client gave it.
const VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// Beta features, passed on: some change what is counted (tools of a beta, MCP servers).
const BETA: HeaderName = HeaderName::from_static("anthropic-beta");
/// The version sent when the client names none.
const DEFAULT_VERSION: HeaderValue = HeaderValue::from_static("2023-06-01");
/// Largest answer read: `{"input_tokens": N}` is a few dozen bytes.
const ANSWER_CAP: usize = 64 * 1024;
/// Longest wait for the whole count: an estimate is asked before a request is sent, and the
/// tokenizer's count, at once, is worth more than the provider's after a long wait.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why the provider gave no count, as the answer's `input_tokens_source` says it (never with
/// the key, nor the provider's message, which may quote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The provider answered with this non-2xx status.
    Status(u16),
    /// The guard refuses the client's key (`require_known_keys`).
    KeyRefused,
    /// The upstream could not be reached, or gave no answer within the timeouts.
    Unreachable,
    /// The answer was not `{"input_tokens": N}`.
    Unreadable,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "{status}"),
            Self::KeyRefused => f.write_str("key refused"),
            Self::Unreachable => f.write_str("upstream unreachable"),
            Self::Unreadable => f.write_str("unreadable answer"),
        }
    }
}

/// True when the request to `/estimate` carries a provider key: `x-api-key`, or a bearer
/// `Authorization` that is not for llm-meter itself (with an admin token set, it is the token).
pub fn has_key(headers: &HeaderMap, has_admin_token: bool) -> bool {
    headers.contains_key(API_KEY) || (!has_admin_token && bearer(headers).is_some())
}

/// A bearer `Authorization` (a browser's cached Basic credentials are no provider key).
fn bearer(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers
        .get(header::AUTHORIZATION)
        .filter(|v| v.as_bytes().starts_with(b"Bearer "))
}

/// The count of `body` (a `count_tokens` body) by the upstream at index `upstream`, asked with
/// the key and the Anthropic headers of `headers`.
pub async fn count(
    state: &AppState,
    upstream: usize,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Result<u64, Failure> {
    let Some(route) = state.config.routes.get(upstream) else {
        return Err(Failure::Unreachable);
    };
    let mut request = http::Request::new(Bytes::from(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = format!("{}{PATH}", route.prefix)
        .parse()
        .map_err(|_| Failure::Unreachable)?;
    let sent = request.headers_mut();
    for name in [API_KEY, BETA] {
        if let Some(value) = headers.get(&name) {
            sent.insert(name, value.clone());
        }
    }
    if state.config.admin_token.is_none()
        && let Some(value) = bearer(headers)
    {
        sent.insert(header::AUTHORIZATION, value.clone());
    }
    sent.insert(
        VERSION,
        headers.get(VERSION).cloned().unwrap_or(DEFAULT_VERSION),
    );
    sent.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The answer is read here: it must come uncompressed.
    sent.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let counted = tokio::time::timeout(TIMEOUT, ask_and_read(state, upstream, request))
        .await
        .unwrap_or(Err(Failure::Unreachable));
    if let Err(failure) = &counted {
        tracing::warn!(upstream = route.name, reason = %failure, "count_tokens failed: the estimate counts with the tokenizer");
    }
    counted
}

async fn ask_and_read(
    state: &AppState,
    upstream: usize,
    request: http::Request<Bytes>,
) -> Result<u64, Failure> {
    let response = ask(&state.proxy(), upstream, request)
        .await
        .map_err(|err| match err {
            AskError::Refused(_) => Failure::KeyRefused,
            AskError::Failed(_) => Failure::Unreachable,
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(Failure::Status(status.as_u16()));
    }
    let body = Limited::new(response.into_body(), ANSWER_CAP)
        .collect()
        .await
        .map_err(|_| Failure::Unreadable)?
        .to_bytes();
    #[derive(Deserialize)]
    struct Counted {
        input_tokens: u64,
    }
    serde_json::from_slice::<Counted>(&body)
        .map(|c| c.input_tokens)
        .map_err(|_| Failure::Unreadable)
}
