//! The client side of HTTP: dialing an upstream (directly or through its egress proxy, then TLS
//! with rustls when its scheme asks, offering HTTP/2 by ALPN) and posting alert webhooks.
//! Forwarded requests keep their connections in their own pools (`proxy::pool`).

pub mod egress;
pub mod trust;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tower_service::Service;

pub use egress::{NoProxy, ProxyServer};
pub use trust::{TlsClients, TlsRoots, Trust, TrustError};

/// How long an idle connection is kept for reuse: under the 120 s most providers' load
/// balancers allow.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An open upstream connection: TCP, or TLS over TCP (either one possibly through a tunnel).
pub type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// When HTTP/2 is spoken to an upstream (`http2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http2 {
    /// When a TLS upstream offers it by ALPN; plain-text upstreams get HTTP/1.1.
    #[default]
    Offered,
    /// Never.
    Off,
    /// Always, without asking first (plain-text upstreams that speak only HTTP/2).
    PriorKnowledge,
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1: one request at a time.
    Http1,
    /// HTTP/2: requests multiplexed.
    Http2,
}

/// How one upstream is reached: its proxy, if any, the TLS it trusts, and HTTP/2 or not.
#[derive(Debug, Clone)]
pub struct Route {
    /// The proxy that connections go through.
    pub proxy: Option<ProxyServer>,
    /// When to speak HTTP/2.
    pub http2: Http2,
}

/// Opens connections to one upstream. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dialer {
    inner: Arc<Target>,
}

#[derive(Debug)]
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// `host:port`, what a CONNECT asks for.
    address: String,
    /// `None` for a host rustls cannot name (its TLS handshake then fails, saying so).
    server_name: Option<ServerName<'static>>,
    route: Route,
    tcp: HttpConnector,
    tls: Option<TlsClients>,
    connect_timeout: Duration,
}

/// Why no connection could be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No TCP connection to the upstream (DNS, refused, unreachable).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (an unknown issuer, a name mismatch, a protocol error).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The egress proxy could not be reached, or gave no tunnel.
    #[error("egress proxy {proxy} {reason}")]
    Proxy {
        /// The proxy, without credentials.
        proxy: String,
        /// What went wrong there.
        reason: String,
    },
    /// No connection within `connect_timeout`.
    #[error("no connection within {}{}", humantime::format_duration(*.after), .proxy.as_ref().map(|p| format!(" through egress proxy {p}")).unwrap_or_default())]
    TimedOut {
        /// The proxy it went through, if any.
        proxy: Option<String>,
        /// The timeout.
        after: Duration,
    },
}

/// Why a TCP connection failed.
enum Tcp {
    TimedOut,
    Failed(String),
}

/// An open connection and the protocol it speaks.
pub struct Dialed {
    /// The connection, ready for hyper.
    pub io: TokioIo<Stream>,
    /// What it speaks.
    pub protocol: Protocol,
}

impl Dialer {
    /// A dialer of `scheme://authority`, trusting `tls` when the scheme is `https`.
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        route: Route,
        tls: &TlsClients,
        connect_timeout: Duration,
    ) -> Self {
        let is_https = *scheme == Scheme::HTTPS;
        let port = egress::port_of(scheme, authority);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned()).ok();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        // Without it, small SSE writes wait for Nagle's algorithm and delayed ACKs.
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        Self {
            inner: Arc::new(Target {
                scheme: scheme.clone(),
                authority: authority.clone(),
                address: format!("{}:{port}", authority.host()),
                server_name,
                route,
                tcp,
                tls: is_https.then(|| tls.clone()),
                connect_timeout,
            }),
        }
    }

    /// Whether connections may speak HTTP/2, so that requests can share one.
    pub fn may_multiplex(&self) -> bool {
        match self.inner.route.http2 {
            Http2::Off => false,
            Http2::Offered => self.inner.tls.is_some(),
            Http2::PriorKnowledge => true,
        }
    }

    /// The egress proxy, if connections go through one.
    pub fn proxy(&self) -> Option<&ProxyServer> {
        self.inner.route.proxy.as_ref()
    }

    /// Opens a connection, within `connect_timeout`. `upgrade` asks for one that can carry a
    /// protocol upgrade (a WebSocket): HTTP/1.1 only, and tunnelled through a proxy whatever
    /// the scheme.
    pub async fn dial(&self, upgrade: bool) -> Result<Dialed, DialError> {
        let target = &self.inner;
        tokio::time::timeout(target.connect_timeout, self.open(upgrade))
            .await
            .map_err(|_| self.timed_out())?
    }

    fn timed_out(&self) -> DialError {
        DialError::TimedOut {
            proxy: self.proxy().map(ToString::to_string),
            after: self.inner.connect_timeout,
        }
    }

    async fn open(&self, upgrade: bool) -> Result<Dialed, DialError> {
        let target = &self.inner;
        let tcp = match &target.route.proxy {
            None => self.tcp(&target.address).await.map_err(|e| match e {
                Tcp::TimedOut => self.timed_out(),
                Tcp::Failed(reason) => DialError::Connect(reason),
            })?,
            Some(proxy) => {
                let failed = |reason: String| DialError::Proxy {
                    proxy: proxy.to_string(),
                    reason,
                };
                let mut tcp = self.tcp(&proxy.address()).await.map_err(|e| match e {
                    Tcp::TimedOut => self.timed_out(),
                    Tcp::Failed(reason) => failed(format!("cannot be reached: {reason}")),
                })?;
                if target.tls.is_some() || upgrade {
                    egress::open_tunnel(&mut tcp, &target.address, proxy.authorization.as_ref())
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                }
                tcp
            }
        };
        let Some(tls) = &target.tls else {
            let protocol = if target.route.http2 == Http2::PriorKnowledge && !upgrade {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            return Ok(Dialed {
                io: TokioIo::new(Either::Left(tcp)),
                protocol,
            });
        };
        let connector = if upgrade || target.route.http2 == Http2::Off {
            &tls.http1
        } else {
            &tls.http2
        };
        let name = target.server_name.clone().ok_or_else(|| {
            DialError::Tls(format!("{} is not a name TLS can verify", target.address))
        })?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| DialError::Tls(tls_reason(&e)))?;
        let protocol = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        Ok(Dialed {
            io: TokioIo::new(Either::Right(Box::new(stream))),
            protocol,
        })
    }

    /// A TCP connection to `address` (`host:port`), with our socket options.
    async fn tcp(&self, address: &str) -> Result<TcpStream, Tcp> {
        let uri: Uri = format!("http://{address}")
            .parse()
            .map_err(|_| Tcp::Failed(format!("{address} is not a valid address")))?;
        let mut tcp = self.inner.tcp.clone();
        match tcp.call(uri).await {
            Ok(io) => Ok(io.into_inner()),
            Err(err) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
                while let Some(cause) = source {
                    if cause
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                    {
                        return Err(Tcp::TimedOut);
                    }
                    source = cause.source();
                }
                Err(Tcp::Failed(crate::error::chain(&err)))
            }
        }
    }

    /// Writes `request`'s target for a connection of `protocol`: absolute (with no `Host`
    /// header) for HTTP/2, absolute with the proxy's credentials for a plain-HTTP upstream
    /// behind a proxy (a proxy's forward request, as curl sends it), else as it is, in origin
    /// form.
    pub fn address<B>(&self, request: &mut Request<B>, protocol: Protocol) {
        let target = &self.inner;
        let forwarded = target.tls.is_none() && target.route.proxy.is_some();
        if protocol == Protocol::Http1 && !forwarded {
            return;
        }
        let mut absolute = http::uri::Parts::default();
        absolute.scheme = Some(target.scheme.clone());
        absolute.authority = Some(target.authority.clone());
        absolute.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(absolute) {
            *request.uri_mut() = uri;
        }
        if protocol == Protocol::Http2 {
            request.headers_mut().remove(header::HOST);
            *request.version_mut() = http::Version::HTTP_2;
        } else if let Some(authorization) = target
            .route
            .proxy
            .as_ref()
            .and_then(|p| p.authorization.clone())
        {
            request
                .headers_mut()
                .insert(header::PROXY_AUTHORIZATION, authorization);
        }
    }
}

/// A TLS failure, with a hint where the fix is ours to give.
fn tls_reason(err: &std::io::Error) -> String {
    let reason = crate::error::chain(err);
    if reason.contains("UnknownIssuer") {
        format!(
            "{reason} (a private or inspecting CA? add it with ca_file, SSL_CERT_FILE or tls_roots = \"both\")"
        )
    } else {
        reason
    }
}

/// Why a request got no response: no connection, or a failed exchange on it (forwarded
/// requests and webhook posts alike).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (proxy, DNS, TCP, TLS, or the connect timeout).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The exchange failed on an open connection (or the request body failed while sent).
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Sends one request on a connection of its own (alert webhooks: few, so not pooled), and reads
/// the response head. The dialer's `http2` must be `Off`.
pub async fn send_once(
    dialer: &Dialer,
    mut request: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let dialed = dialer.dial(false).await?;
    // Origin form and a Host header, as for any request of ours; then the proxy's form.
    if let Some(authority) = request.uri().authority()
        && let Ok(host) = http::HeaderValue::try_from(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    if let Some(origin) = request.uri().path_and_query().cloned() {
        *request.uri_mut() = Uri::from(origin);
    }
    dialer.address(&mut request, Protocol::Http1);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(dialed.io).await?;
    let connection = async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "webhook connection closed with an error");
        }
    };
    tokio::select! {
        response = sender.send_request(request) => Ok(response?),
        () = connection => Err(SendError::Dial(DialError::Connect("the connection closed".into()))),
    }
}
