//! `ProxyError` and its single mapping to a status and an OpenAI-style JSON error body.

use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};

/// What went wrong while serving one request, classified by who caused it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent a body over the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client's body could not be read (it went away or sent bad framing).
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    /// The request's path has no canonical form we accept.
    #[error("invalid path: {0}")]
    BadPath(#[from] crate::path::PathError),
    /// The request has no `Host` header, or more than one.
    #[error("invalid request: {0}")]
    BadHost(&'static str),
    /// An attribution header (`X-LLM-Meter-Tags`, `-User`, `-Session`) has a bad value.
    #[error("invalid {header} header: {reason}")]
    BadAttribution {
        /// The header, as documented.
        header: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A change to our own state asked by a peer that is not on loopback, with no admin token set.
    #[error(
        "changes are taken from loopback only while no admin token is set (admin_token, or LLM_METER_ADMIN_TOKEN)"
    )]
    NotLoopback,
    /// The client stopped sending its request body for longer than `header_timeout`.
    #[error("the request body stalled for longer than {0}")]
    BodyStalled(String),
    /// A query parameter of our own endpoints is invalid.
    #[error("{0}")]
    BadQuery(String),
    /// A request given to `/estimate` cannot be estimated (not JSON, or no metered route).
    #[error("cannot estimate this request: {0}")]
    CannotEstimate(String),
    /// The admin endpoint was called without the right admin token.
    #[error("this endpoint requires `Authorization: Bearer <admin_token>`")]
    Unauthorized,
    /// A change that needs the admin token, on a server that has none.
    #[error(
        "set an admin token (admin_token, or LLM_METER_ADMIN_TOKEN) to change budgets at run time"
    )]
    NoAdminToken,
    /// No named key has this name.
    #[error("no key is named {0:?} in the configuration (or \"global\")")]
    UnknownKeyName(String),
    /// No route matches the path.
    #[error("no route for {0}; LLM traffic goes to /v1/..., stats to /stats")]
    NotFound(String),
    /// The upstream could not be reached or failed before sending response headers.
    #[error("upstream {upstream} is unreachable: {reason}")]
    UpstreamUnreachable {
        /// The upstream base URL (never carries a key).
        upstream: String,
        /// The cause, from the connection error chain.
        reason: String,
    },
    /// The upstream did not connect or answer within the configured time.
    #[error("upstream {upstream} did not answer within {after}")]
    UpstreamTimeout {
        /// The upstream base URL.
        upstream: String,
        /// The timeout that elapsed, human readable.
        after: String,
    },
    /// The egress proxy could not be reached, or refused the tunnel to the upstream.
    #[error("egress proxy {proxy} failed on the way to {upstream}: {reason}")]
    EgressProxyFailed {
        /// The proxy, without credentials.
        proxy: String,
        /// The upstream base URL.
        upstream: String,
        /// What the proxy did.
        reason: String,
    },
    /// No tunnel through the egress proxy within the connect timeout.
    #[error("egress proxy {proxy} gave no connection to {upstream} within {after}")]
    EgressProxyTimeout {
        /// The proxy, without credentials.
        proxy: String,
        /// The upstream base URL.
        upstream: String,
        /// The timeout that elapsed, human readable.
        after: String,
    },
    /// History was asked of a server that keeps no ledger.
    #[error(
        "history needs the ledger, and this llm-meter runs with persistence off (--no-persist)"
    )]
    NoLedger,
    /// The ledger could not be read.
    #[error("the ledger cannot be read: {0}")]
    LedgerUnavailable(String),
    /// A budget was changed in memory but could not be written to `budgets.json`.
    #[error("the budget is changed until the next restart, but {0}")]
    BudgetNotSaved(String),
    /// A connection past `max_connections`, refused before any request is read.
    #[error("too many connections")]
    TooManyConnections,
    /// A bug or resource problem of our own; details go to the log, not the client.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    /// Status, OpenAI error `type` and `code` for this error: the one place that decides them.
    /// The type follows from the status: the client's fault, the upstream's, or ours.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        let (status, code) = match self {
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
            Self::ClientBody(_) => (StatusCode::BAD_REQUEST, "bad_request_body"),
            Self::BadPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            Self::BadHost(_) => (StatusCode::BAD_REQUEST, "invalid_host"),
            Self::BadAttribution { .. } => (StatusCode::BAD_REQUEST, "invalid_attribution_header"),
            Self::NotLoopback => (StatusCode::FORBIDDEN, "loopback_only"),
            Self::BodyStalled(_) => (StatusCode::REQUEST_TIMEOUT, "request_body_timeout"),
            Self::BadQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            Self::CannotEstimate(_) => (StatusCode::BAD_REQUEST, "cannot_estimate"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "invalid_admin_token"),
            Self::NoAdminToken => (StatusCode::FORBIDDEN, "admin_token_not_configured"),
            Self::UnknownKeyName(_) => (StatusCode::NOT_FOUND, "unknown_key_name"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "unknown_route"),
            Self::UpstreamUnreachable { .. } => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            Self::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::EgressProxyFailed { .. } => (StatusCode::BAD_GATEWAY, "egress_proxy_failed"),
            Self::EgressProxyTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "egress_proxy_timeout")
            }
            Self::NoLedger => (StatusCode::BAD_REQUEST, "persistence_disabled"),
            Self::LedgerUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable"),
            Self::BudgetNotSaved(_) => (StatusCode::INTERNAL_SERVER_ERROR, "budget_not_saved"),
            Self::TooManyConnections => (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        let kind = match status {
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => "upstream_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        (status, kind, code)
    }

    /// This error's answer, to send or to write out whole.
    pub fn envelope(&self) -> Envelope {
        let (status, kind, code) = self.classify();
        let envelope = Envelope::new(status, kind, code, self);
        match self {
            // A 401 names its scheme (RFC 9110 §11.6.1): a browser then asks for the token,
            // as the password, and sends it with the dashboard's requests.
            Self::Unauthorized => envelope.with_header(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"llm-meter\", charset=\"UTF-8\""),
            ),
            _ => envelope,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.classify().0
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.envelope().into_response()
    }
}

/// The one shape every error answer of llm-meter has, OpenAI's:
/// `{"error": {"message", "type", "code", "param", ...}}`, with `llm-meter: ` before the message
/// so a client can tell our errors from the provider's. `ProxyError` and the guard's refusals
/// each classify themselves in one exhaustive `match`, and answer through this.
#[derive(Debug)]
pub struct Envelope {
    status: StatusCode,
    body: serde_json::Map<String, serde_json::Value>,
    headers: Vec<(header::HeaderName, header::HeaderValue)>,
}

impl Envelope {
    /// An error answer with this status, OpenAI `type` and `code`, and `message`.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: &dyn std::fmt::Display,
    ) -> Self {
        let mut body = serde_json::Map::new();
        body.insert("message".into(), format!("llm-meter: {message}").into());
        body.insert("type".into(), kind.into());
        body.insert("code".into(), code.into());
        body.insert("param".into(), serde_json::Value::Null);
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }

    /// Adds a field beside `message` (the budget a refusal is about, the limit it hit).
    pub fn with_detail(mut self, name: &'static str, value: serde_json::Value) -> Self {
        self.body.insert(name.into(), value);
        self
    }

    /// Adds a response header (`Retry-After`, `x-should-retry`).
    pub fn with_header(mut self, name: header::HeaderName, value: header::HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl Envelope {
    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The answer's JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.body }).to_string()
    }
}

impl IntoResponse for Envelope {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

/// A value given by a user (a flag, a query parameter, a setting) that is not one of those
/// accepted; the message says what is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl From<String> for InvalidValue {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for InvalidValue {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

impl From<InvalidValue> for String {
    fn from(invalid: InvalidValue) -> Self {
        invalid.0
    }
}

/// Renders an error and its whole source chain on one line (`a: b: c`), skipping repeats.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_render_the_openai_shape() {
        let response = ProxyError::UpstreamTimeout {
            upstream: "http://127.0.0.1:9".into(),
            after: "10s".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "upstream_error");
        assert_eq!(json["error"]["code"], "upstream_timeout");
        assert!(json["error"]["message"].as_str().unwrap().contains("10s"));
    }
}
