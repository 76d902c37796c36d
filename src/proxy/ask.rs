//! Requests llm-meter makes of an upstream on a client's behalf (the token count an estimate
//! asks Anthropic for): the client's key admitted, and a virtual key's replaced, as forwarding
//! does it; sent through the upstream's pool, so its egress proxy and certificates apply.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, header};
use hyper::body::Incoming;

use super::{Context, identify, put_upstream_key, send_within, upstream};
use crate::error::ProxyError;
use crate::guard::Refusal;

/// Why an upstream was not asked, or gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The guard refuses the client's key (`require_known_keys`).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The request could not be sent, or no answer came within the response timeout.
    #[error(transparent)]
    Failed(#[from] ProxyError),
}

/// Sends `request` to the upstream at index `upstream` of the routes and returns the response
/// head. Its path is the one a client would call under the upstream's prefix
/// (`/anthropic/v1/messages/count_tokens`); its headers are the few the upstream needs.
pub async fn ask(
    state: &Context<'_>,
    upstream: usize,
    request: http::Request<Bytes>,
) -> Result<http::Response<Incoming>, AskError> {
    let (Some(route), Some(runtime)) = (
        state.config.routes.get(upstream),
        state.upstreams.get(upstream),
    ) else {
        return Err(ProxyError::Internal.into());
    };
    let (mut parts, body) = request.into_parts();
    let (_, key, source) = identify(state.guard, &parts);
    state.guard.authenticate(key)?;
    put_upstream_key(state.guard, key, source, &mut parts);
    parts.uri = upstream::target_for(route, &parts.uri)?;
    upstream::strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::HOST, route.upstream.host.clone());
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.version = http::Version::HTTP_11;
    let request = http::Request::from_parts(parts, Body::from(body));
    Ok(send_within(state.config, route, runtime, request).await?)
}
