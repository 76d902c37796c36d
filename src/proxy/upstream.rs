//! The upstream side of a forwarded request: URL join, hop-by-hop header filtering, error mapping.

use http::{HeaderMap, HeaderName, Uri, header};

use crate::client::DialError;
use crate::config::{Config, Route, Upstream};
use crate::error::{ProxyError, chain};
use crate::proxy::pool::SendError;

/// The path of a request under `route` after the route's prefix (empty when it is the prefix).
pub fn rest_of<'a>(route: &Route, uri: &'a Uri) -> &'a str {
    uri.path()
        .strip_prefix(route.prefix.as_str())
        .unwrap_or_default()
}

/// The request target sent upstream for a request to `uri` under `route`.
pub fn target_for(route: &Route, uri: &Uri) -> Result<Uri, ProxyError> {
    target_uri(&route.upstream, rest_of(route, uri), uri.query())
}

/// The request target sent upstream (origin form): the upstream's base path, the path after
/// its prefix, and the client's query string.
fn target_uri(upstream: &Upstream, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut path = String::with_capacity(
        upstream.base_path.len() + rest.len() + 1 + query.map_or(0, str::len),
    );
    path.push_str(&upstream.base_path);
    path.push_str(rest);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(query) = query {
        path.push('?');
        path.push_str(query);
    }
    let path_and_query: http::uri::PathAndQuery = path
        .parse()
        .map_err(|_| ProxyError::ClientBody("invalid request path".into()))?;
    Ok(Uri::from(path_and_query))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those the `Connection` header names. (`Host` is left to the
/// caller: a forwarded request gets its upstream's, `Upstream::host`.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present, instead of a hashed lookup per hop-by-hop name: most
    // messages carry none, or only `Connection`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::try_from(name.trim()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Maps a failed upstream exchange to our error: 413 for our body limit, 504 for timeouts, a
/// 502 that names the egress proxy when it failed, else a 502 that names the upstream.
pub fn classify_error(err: &SendError, config: &Config, upstream: &Upstream) -> ProxyError {
    match err {
        SendError::Dial(DialError::Proxy { proxy, reason }) => {
            return ProxyError::EgressProxyFailed {
                proxy: proxy.clone(),
                upstream: upstream.to_string(),
                reason: reason.clone(),
            };
        }
        SendError::Dial(DialError::TimedOut { proxy, .. }) => {
            let after = format!(
                "{} (connect_timeout)",
                humantime::format_duration(config.connect_timeout)
            );
            return match proxy {
                Some(proxy) => ProxyError::EgressProxyTimeout {
                    proxy: proxy.clone(),
                    upstream: upstream.to_string(),
                    after,
                },
                None => ProxyError::UpstreamTimeout {
                    upstream: upstream.to_string(),
                    after,
                },
            };
        }
        _ => {}
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge {
                limit: config.max_body_bytes,
            };
        }
        source = cause.source();
    }
    ProxyError::UpstreamUnreachable {
        upstream: upstream.to_string(),
        reason: chain(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_are_joined_under_the_base() {
        let up = Upstream::parse("https://api.example.com/v1").unwrap();
        assert_eq!(
            target_uri(&up, "/chat/completions", Some("a=1&b=2"))
                .unwrap()
                .to_string(),
            "/v1/chat/completions?a=1&b=2"
        );
        let root = Upstream::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(target_uri(&root, "", None).unwrap().to_string(), "/");
        assert_eq!(
            target_uri(&root, "/models", None).unwrap().to_string(),
            "/models"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::HOST, "localhost:8080".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        h.insert("openai-organization", "org".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "host", "openai-organization"]);
    }

    #[test]
    fn headers_without_hop_by_hop_ones_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.append("x-custom", "a".parse().unwrap());
        h.append("x-custom", "b".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn the_host_header_names_the_upstream_and_its_port_unless_default() {
        for (url, host) in [
            ("https://api.openai.com/v1", "api.openai.com"),
            ("https://api.openai.com:443/v1", "api.openai.com"),
            ("http://127.0.0.1:80", "127.0.0.1"),
            ("http://127.0.0.1:8081/v1", "127.0.0.1:8081"),
            ("https://gw.example:8443", "gw.example:8443"),
            ("http://[::1]:9000/v1", "[::1]:9000"),
        ] {
            assert_eq!(Upstream::parse(url).unwrap().host, host, "{url}");
        }
    }
}
