//! The opt-in cost headers (`cost_header = true`): a non-streamed metered response is read whole
//! before its head goes out, recorded, and answered with `X-LLM-Meter-Cost` and
//! `X-LLM-Meter-Tokens` when its usage was reported.
//!
//! A head goes out before its body, so the cost of a response can only travel in its head when
//! the body is read first: that holds the whole response back until its last byte (as a
//! buffering proxy would), which is why the setting is off by default. Streams are never held
//! back, and a body past `BODY_CAP` goes on as it comes, without the headers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::exchange::Exchange;
use super::tap::{BODY_CAP, Outcome};
use crate::config::Route;
use crate::error::ProxyError;
use crate::money::NanoUsd;
use crate::usage::Flavor;
use crate::usage::estimate::Raw;

/// What the request cost, USD as a plain decimal (`0.0045`).
pub const COST_HEADER: HeaderName = HeaderName::from_static("x-llm-meter-cost");
/// The request's total tokens (input and output).
pub const TOKENS_HEADER: HeaderName = HeaderName::from_static("x-llm-meter-tokens");

/// How reading a whole body ended.
enum Whole {
    /// All of it, within the cap.
    Read(Bytes),
    /// Past the cap: what was read, and the rest still to come.
    TooLarge(Vec<Bytes>, Incoming),
    /// The upstream failed or went silent before the end.
    Failed(ProxyError),
}

/// Answers a non-streamed metered response whole, with the cost headers when its usage is known.
pub(super) async fn answer(
    mut parts: response::Parts,
    incoming: Incoming,
    flavor: Flavor,
    mut exchange: Exchange,
    route: &Route,
    idle: Duration,
) -> Response {
    match read_whole(incoming, idle, route).await {
        Whole::Read(body) => {
            let extracted = flavor.parse_body(&body);
            let reported = extracted.usage;
            let raw = reported.is_none().then(|| Raw::Body(vec![body.clone()]));
            let priced = exchange.complete(extracted, raw, Outcome::Complete);
            if let (Some(usage), Some(priced)) = (reported, priced) {
                if let Ok(cost) = HeaderValue::from_str(&usd(priced.cost)) {
                    parts.headers.insert(COST_HEADER, cost);
                }
                parts
                    .headers
                    .insert(TOKENS_HEADER, HeaderValue::from(usage.total_tokens()));
            }
            Response::from_parts(parts, Body::from(body))
        }
        Whole::TooLarge(read, rest) => {
            // As the tap would: usage given up past the cap, estimated from what was kept.
            let raw = Raw::Body(read.clone());
            exchange.complete(flavor.parse_body(b""), Some(raw), Outcome::Complete);
            let replay = Replay {
                read: read.into(),
                rest,
            };
            Response::from_parts(parts, Body::new(replay))
        }
        Whole::Failed(err) => {
            exchange.status = err.status();
            exchange.error = Some(err.to_string());
            exchange.complete(Default::default(), None, Outcome::UpstreamFailed);
            err.into_response()
        }
    }
}

/// Reads `body` up to `BODY_CAP`, each frame within `idle`.
async fn read_whole(mut body: Incoming, idle: Duration, route: &Route) -> Whole {
    let mut chunks = Vec::new();
    let mut len = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Whole::Failed(ProxyError::UpstreamTimeout {
                    upstream: route.upstream.to_string(),
                    after: format!("{} (idle_timeout)", humantime::format_duration(idle)),
                });
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Whole::Failed(ProxyError::UpstreamUnreachable {
                    upstream: route.upstream.to_string(),
                    reason: format!("the response body was cut: {err}"),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            len += data.len();
            chunks.push(data);
            if len > BODY_CAP {
                return Whole::TooLarge(chunks, body);
            }
        }
    }
    Whole::Read(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// A cost in USD as a plain decimal: exact, no trailing zeros (`0.0045`, `12`, `0`).
fn usd(cost: NanoUsd) -> String {
    let whole = cost.0 / 1_000_000_000;
    let fraction = cost.0 % 1_000_000_000;
    if fraction == 0 {
        return whole.to_string();
    }
    let decimals = format!("{fraction:09}");
    format!("{whole}.{}", decimals.trim_end_matches('0'))
}

/// A body that hands on the chunks already read, then the rest of the upstream's.
struct Replay {
    read: VecDeque<Bytes>,
    rest: Incoming,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_plain_exact_decimals() {
        assert_eq!(usd(NanoUsd(4_500_000)), "0.0045");
        assert_eq!(usd(NanoUsd(12_000_000_000)), "12");
        assert_eq!(usd(NanoUsd(0)), "0");
        assert_eq!(usd(NanoUsd(1_000_000_001)), "1.000000001");
    }
}
