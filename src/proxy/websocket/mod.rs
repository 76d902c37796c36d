//! WebSocket passthrough: an `Upgrade: websocket` request forwarded as an upgrade on a fresh
//! upstream connection, then its messages relayed both ways and each response inside it metered.
//!
//! The upgrade goes through the same identification, admission, key replacement and canonical
//! path as any request (`proxy::forward` does those, then calls `forward` here). The upstream
//! gets the client's handshake headers but `Sec-WebSocket-Extensions`, so no compression is
//! negotiated and every message stays readable. A non-101 answer goes back as a normal
//! response. After a 101, forwarding cannot run the relay itself (hyper writes the 101 only
//! once the handler has returned): it leaves the relay in the connection's `Handoff`, and the
//! server runs it on that connection's task once the 101 is out, so an open WebSocket still
//! counts as an open connection.

mod relay;
mod turns;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use hyper::upgrade::OnUpgrade;

use super::exchange::Exchange;
use super::tap::{Extraction, Tap};
use super::{Context, UpstreamState, upstream};
use crate::config::Route;
use crate::error::ProxyError;

/// The relay of one upgraded connection, for its connection's task to run.
pub type Relay = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where forwarding leaves the relay of an upgrade it accepted, for the server to run on the
/// client connection's own task once the 101 has gone out. The server puts one in the
/// extensions of each request that asks for an upgrade.
#[derive(Clone, Default)]
pub struct Handoff(Arc<parking_lot::Mutex<Option<Relay>>>);

impl Handoff {
    /// An empty handoff.
    pub fn new() -> Self {
        Self::default()
    }

    /// The relay left here, if any (taken once).
    pub fn take(&self) -> Option<Relay> {
        self.0.lock().take()
    }

    fn put(&self, relay: Relay) {
        *self.0.lock() = Some(relay);
    }
}

/// `Sec-WebSocket-Extensions`: never forwarded, so that no extension (permessage-deflate)
/// makes messages unreadable to the meter.
const EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");

/// True when a header's comma-separated tokens include `token` (case ignored).
fn has_token(headers: &http::HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True for an HTTP/1.1 GET that asks to switch to the WebSocket protocol (RFC 6455 §4.1).
pub fn is_upgrade(parts: &http::request::Parts) -> bool {
    parts.method == Method::GET
        && parts.version == http::Version::HTTP_11
        && has_token(&parts.headers, &header::UPGRADE, "websocket")
        && has_token(&parts.headers, &header::CONNECTION, "upgrade")
}

/// Forwards an admitted upgrade request (its key already replaced) to the upstream and answers
/// the client as the upstream did; after a 101, leaves the relay to the server. `exchange`
/// carries the flavor the messages are metered as; it logs the upgrade itself, unmetered.
pub async fn forward(
    state: &Context<'_>,
    route: &Route,
    runtime: &UpstreamState,
    mut parts: http::request::Parts,
    mut exchange: Exchange,
) -> Response {
    let flavor = exchange.flavor.take();
    let (Some(on_client), Some(handoff)) = (
        parts.extensions.remove::<OnUpgrade>(),
        parts.extensions.remove::<Handoff>(),
    ) else {
        return fail(&mut exchange, ProxyError::Internal);
    };
    if flavor.is_some() && exchange.request_model.is_none() {
        exchange.request_model = model_in_query(parts.uri.query());
    }
    let request = match upstream_request(route, parts) {
        Ok(request) => request,
        Err(err) => return fail(&mut exchange, err),
    };
    let sent = Instant::now();
    let response = match tokio::time::timeout(
        state.config.response_timeout,
        handshake(state, runtime, request),
    )
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            let err = upstream::classify_error(&err, state.config, &route.upstream);
            return fail(&mut exchange, err);
        }
        Err(_) => {
            let after = format!(
                "{} (response_timeout)",
                humantime::format_duration(state.config.response_timeout)
            );
            let upstream = route.upstream.to_string();
            return fail(
                &mut exchange,
                ProxyError::UpstreamTimeout { upstream, after },
            );
        }
    };
    exchange.upstream_latency = Some(sent.elapsed());
    exchange.status = response.status();
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused (401, 404, 426...): not our error, handed on as received.
        let (mut head, incoming) = response.into_parts();
        upstream::strip_hop_by_hop(&mut head.headers);
        let tap = Tap::new(
            incoming,
            Extraction::None,
            exchange,
            state.config,
            state.tasks,
        );
        return Response::from_parts(head, Body::new(tap));
    }
    let mut response = response;
    let on_upstream = hyper::upgrade::on(&mut response);
    let session = relay::Session {
        turns: turns::Turns::new(exchange, flavor),
        limits: state.config.websocket,
        tasks: state.tasks.clone(),
    };
    handoff.put(Box::pin(session.run(on_client, on_upstream)));
    switching(response.headers())
}

/// The upstream's 101, handed to the client: its headers but any extension.
fn switching(upstream: &http::HeaderMap) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    for (name, value) in upstream {
        if *name != EXTENSIONS {
            headers.append(name, value.clone());
        }
    }
    response
}

/// The request sent upstream: the canonical path under the upstream's base, the client's
/// headers but hop-by-hop ones and extensions, and the upgrade asked for again.
fn upstream_request(
    route: &Route,
    mut parts: http::request::Parts,
) -> Result<http::Request<Body>, ProxyError> {
    let uri = upstream::target_for(route, &parts.uri)?;
    let headers = &mut parts.headers;
    upstream::strip_hop_by_hop(headers);
    headers.remove(EXTENSIONS);
    headers.remove(header::EXPECT);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::HOST, route.upstream.host.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let mut request = http::Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = parts.headers;
    Ok(request)
}

/// Sends the upgrade request on a fresh upstream connection, whose task (owned by `tasks`)
/// runs until the upgrade takes the connection over or the response has been read.
async fn handshake(
    state: &Context<'_>,
    runtime: &UpstreamState,
    request: http::Request<Body>,
) -> Result<http::Response<hyper::body::Incoming>, super::pool::SendError> {
    let io = runtime.pools.open_http1().await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    state.tasks.spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            tracing::debug!(%err, "upstream WebSocket handshake connection failed");
        }
    });
    Ok(sender.send_request(request).await?)
}

/// The `model` query parameter (the Realtime API names its model there).
fn model_in_query(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "model")
        .map(|(_, value)| value.to_owned())
        .filter(|model| {
            !model.is_empty()
                && model
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        })
}

/// Answers with `err`, logged with the upgrade.
fn fail(exchange: &mut Exchange, err: ProxyError) -> Response {
    exchange.status = err.status();
    exchange.error = Some(err.to_string());
    exchange.complete(
        crate::usage::Extracted::default(),
        None,
        super::tap::Outcome::Complete,
    );
    err.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut request = http::Request::builder().method(method).uri("/v1/responses");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_a_get_asking_for_websocket_is_an_upgrade() {
        let upgrade = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
        ];
        assert!(is_upgrade(&parts(Method::GET, &upgrade)));
        assert!(!is_upgrade(&parts(Method::POST, &upgrade)));
        assert!(!is_upgrade(&parts(
            Method::GET,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_upgrade(&parts(
            Method::GET,
            &[("upgrade", "h2c"), ("connection", "upgrade")]
        )));
    }

    #[test]
    fn the_model_is_read_from_a_plain_query_parameter() {
        assert_eq!(
            model_in_query(Some("model=gpt-realtime-2025-08-28&x=1")).as_deref(),
            Some("gpt-realtime-2025-08-28")
        );
        assert_eq!(model_in_query(Some("x=1")), None);
        assert_eq!(model_in_query(Some("model=%3Cscript%3E")), None);
        assert_eq!(model_in_query(None), None);
    }
}
