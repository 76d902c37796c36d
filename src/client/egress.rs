//! The way out to an upstream: the egress proxy a URL names (credentials kept out of every
//! message), which hosts skip it (`NO_PROXY`, read as curl reads it), and the CONNECT tunnel
//! through it.

use std::net::IpAddr;

use base64::Engine;
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head a proxy may send to a CONNECT.
const MAX_TUNNEL_HEAD: usize = 16 * 1024;

/// An HTTP proxy that upstream connections go through.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyServer {
    /// Its host (brackets removed from an IPv6 address).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `Proxy-Authorization`, from the URL's credentials: never logged or shown.
    pub authorization: Option<HeaderValue>,
}

impl ProxyServer {
    /// Reads `http://[user:password@]host[:port]` (a URL without a scheme is taken as `http://`,
    /// as curl does; credentials may be percent-encoded).
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxies are reached over plain HTTP (http://host:port), and {scheme}:// is not supported"
                ));
            }
            None => url,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        let parsed: http::uri::Authority = host_port
            .parse()
            .map_err(|_| "is not an http://host:port URL".to_owned())?;
        let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("has no host".to_owned());
        }
        let authorization = credentials.map(basic_authorization).transpose()?;
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port: parsed.port_u16().unwrap_or(80),
            authorization,
        })
    }

    /// `host:port`, as it is dialed.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The proxy's URL without its credentials: what messages and logs show.
impl std::fmt::Display for ProxyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.address())
    }
}

impl std::fmt::Debug for ProxyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyServer({self}")?;
        if self.authorization.is_some() {
            f.write_str(", with credentials")?;
        }
        f.write_str(")")
    }
}

/// `Basic` credentials from a URL's `user:password`, percent-decoded.
fn basic_authorization(credentials: &str) -> Result<HeaderValue, String> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(credentials).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(decoded);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}"))
        .map_err(|_| "has credentials that cannot be sent".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

/// The hosts that skip the proxy: a `NO_PROXY` list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NoProxy {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `*`: every host.
    All,
    /// A host name and its subdomains (`example.com`, `.example.com`, `*.example.com`).
    Domain(String, Option<u16>),
    /// An address, or a network in CIDR notation.
    Network(IpAddr, u8, Option<u16>),
}

impl NoProxy {
    /// Reads a comma-separated list: host names (with their subdomains; a leading `.` or `*.`
    /// changes nothing), IP addresses, CIDR networks, any of them with `:port`, and `*`.
    /// Entries that are none of these are ignored, as curl ignores them.
    pub fn parse(list: &str) -> Self {
        let entries = list
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(Entry::parse)
            .collect();
        Self { entries }
    }

    /// Whether a connection to `host:port` skips the proxy.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = comparable(host);
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|entry| match entry {
            Entry::All => true,
            Entry::Domain(domain, want) => {
                want.is_none_or(|p| p == port)
                    && (host == *domain
                        || host
                            .strip_suffix(domain.as_str())
                            .is_some_and(|head| head.ends_with('.')))
            }
            Entry::Network(net, bits, want) => {
                want.is_none_or(|p| p == port) && ip.is_some_and(|ip| in_network(ip, *net, *bits))
            }
        })
    }
}

impl Entry {
    fn parse(entry: &str) -> Option<Self> {
        if entry == "*" {
            return Some(Self::All);
        }
        let entry = entry.to_ascii_lowercase();
        // `[v6]:port`, `v4:port`, `host:port`; a bare IPv6 address has colons of its own.
        let (name, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (inside, after) = rest.split_once(']')?;
            (
                inside.to_owned(),
                after.strip_prefix(':').map(str::parse).transpose().ok()?,
            )
        } else if entry.matches(':').count() == 1 {
            let (name, port) = entry.split_once(':')?;
            (name.to_owned(), Some(port.parse().ok()?))
        } else {
            (entry, None)
        };
        let (address, bits) = match name.split_once('/') {
            Some((address, bits)) => (address, Some(bits.parse::<u8>().ok()?)),
            None => (name.as_str(), None),
        };
        if let Ok(ip) = address.parse::<IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = bits.unwrap_or(max);
            return (bits <= max).then_some(Self::Network(ip, bits, port));
        }
        let domain = name
            .trim_start_matches("*.")
            .trim_start_matches('.')
            .trim_end_matches('.');
        (!domain.is_empty() && bits.is_none()).then(|| Self::Domain(domain.to_owned(), port))
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            (u128::from(ip.to_bits()), u128::from(net.to_bits()), 32u32)
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => (ip.to_bits(), net.to_bits(), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    shift >= width || ip >> shift == net >> shift
}

/// A URL's host as host rules compare it: IPv6 brackets and a final dot removed, lower case.
fn comparable(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The port of `scheme://authority`: the one written, else the scheme's (443 for `https`).
pub fn port_of(scheme: &http::uri::Scheme, authority: &http::uri::Authority) -> u16 {
    authority
        .port_u16()
        .unwrap_or(if *scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        })
}

/// Whether a host is this machine: `localhost` (and its subdomains) or a loopback address.
pub fn is_loopback(host: &str) -> bool {
    let host = comparable(host);
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Why a proxy gave no tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Reading or writing the proxy connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The proxy answered the CONNECT with something other than 2xx.
    #[error("refused the tunnel to {target}: {status}{hint}")]
    Refused {
        /// `host:port` asked for.
        target: String,
        /// Its status line's code and reason.
        status: String,
        /// What to do about a 407.
        hint: &'static str,
    },
    /// The proxy closed the connection, or answered with something that is not HTTP.
    #[error("gave no valid answer to CONNECT {0}")]
    Malformed(String),
}

/// Asks the proxy on `stream` for a tunnel to `target` (`host:port`).
pub async fn open_tunnel(
    stream: &mut TcpStream,
    target: &str,
    authorization: Option<&HeaderValue>,
) -> Result<(), TunnelError> {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(authorization) = authorization {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(authorization.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 || answer.len() + n > MAX_TUNNEL_HEAD {
            return Err(TunnelError::Malformed(target.to_owned()));
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(at) = memchr::memmem::find(&answer, b"\r\n\r\n") {
            break at + 4;
        }
    };
    // The upstream speaks only once we do (a TLS hello, a request): anything more is not HTTP.
    if end != answer.len() {
        return Err(TunnelError::Malformed(target.to_owned()));
    }
    let line = answer.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.splitn(2, ' ');
    let (Some(version), Some(status)) = (words.next(), words.next()) else {
        return Err(TunnelError::Malformed(target.to_owned()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(TunnelError::Malformed(target.to_owned()));
    }
    if status.starts_with('2') {
        return Ok(());
    }
    let hint = match (status.starts_with("407"), authorization.is_some()) {
        (true, false) => " (the proxy wants credentials: http://user:password@host:port)",
        (true, true) => " (the proxy refused the credentials in its URL)",
        _ => "",
    };
    Err(TunnelError::Refused {
        target: target.to_owned(),
        status: status.chars().take(200).collect(),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_url_keeps_its_credentials_out_of_what_is_shown() {
        let proxy = ProxyServer::parse("http://alice:p%40ss@Proxy.corp:3128").unwrap();
        assert_eq!(proxy.to_string(), "http://proxy.corp:3128");
        assert_eq!(
            format!("{proxy:?}"),
            "ProxyServer(http://proxy.corp:3128, with credentials)"
        );
        // base64("alice:p@ss")
        assert_eq!(proxy.authorization.unwrap(), "Basic YWxpY2U6cEBzcw==");
        let bare = ProxyServer::parse("10.0.0.1:8080").unwrap();
        assert_eq!(bare.address(), "10.0.0.1:8080");
        assert!(bare.authorization.is_none());
        assert_eq!(
            ProxyServer::parse("http://[::1]:3128/").unwrap().address(),
            "[::1]:3128"
        );
        assert_eq!(ProxyServer::parse("http://proxy").unwrap().port, 80);
        for bad in [
            "socks5://proxy:1080",
            "https://proxy:443",
            "http://",
            "http://a b",
        ] {
            assert!(ProxyServer::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_proxy_matches_as_curl_does() {
        let rules = NoProxy::parse(
            "example.com, .corp.internal,*.lab, 10.0.0.0/8, 192.168.1.7, [::1]:8443, gw.test:8080, fd00::/16",
        );
        for (host, port, skips) in [
            ("example.com", 443, true),
            ("api.example.com", 443, true),
            ("EXAMPLE.COM.", 443, true),
            ("notexample.com", 443, false),
            ("corp.internal", 443, true),
            ("llm.corp.internal", 443, true),
            ("x.lab", 80, true),
            ("10.20.30.40", 443, true),
            ("11.0.0.1", 443, false),
            ("192.168.1.7", 80, true),
            ("192.168.1.8", 80, false),
            ("[::1]", 8443, true),
            ("[::1]", 443, false),
            ("gw.test", 8080, true),
            ("gw.test", 443, false),
            ("[fd00::5]", 443, true),
            ("api.openai.com", 443, false),
        ] {
            assert_eq!(rules.matches(host, port), skips, "{host}:{port}");
        }
        assert!(NoProxy::parse("*").matches("anything", 1));
        assert!(!NoProxy::parse("").matches("anything", 1));
        assert!(!NoProxy::parse("10.0.0.0/99, :").matches("10.0.0.1", 1));
    }

    #[test]
    fn loopback_hosts_are_known() {
        for host in [
            "localhost",
            "api.localhost",
            "127.0.0.1",
            "127.3.2.1",
            "[::1]",
            "LOCALHOST.",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["localhost.example", "10.0.0.1", "api.openai.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
