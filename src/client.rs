//! The client side of HTTP, shared by forwarding and alert webhooks: the connector (TCP, then
//! TLS with rustls and Mozilla's roots, no OpenSSL) and the pooled client webhooks are posted
//! with. Forwarded requests use their own pools (`proxy::pool`) over the same connector.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

/// Opens upstream connections: TCP, then TLS for `https`.
pub type Connector = HttpsConnector<HttpConnector>;

/// The pooled client alert webhooks are posted with.
pub type HttpClient = Client<Connector, Body>;

/// How long an idle connection is kept for reuse (upstream pools and webhooks alike): under the
/// 120 s most providers' load balancers allow.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connector, giving up on a connection after `connect_timeout`.
pub fn connector(connect_timeout: Duration) -> Result<Connector, rustls::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Without it, small SSE writes wait for Nagle's algorithm and delayed ACKs.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// A pooled keep-alive client for alert webhooks.
pub fn webhook_client(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .build(connector)
}
