//! Every spelling of a metered route is metered or refused: routes are decided on one canonical
//! path, which is what the upstream receives; a path that climbs out of its prefix, or hides a
//! separator, is refused with 400. Requests here are written byte for byte (an HTTP client
//! library would normalise the paths under test before sending them).

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Mock, Proxy, Received, Reply, chat_completion};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-spender-0123456789abcdef";

/// Every answer reports 1,000 prompt tokens of gpt-4o ($0.0025): one request spends the budget.
fn costly(_: &Received) -> Reply {
    Reply::json(200, &chat_completion("gpt-4o", "ok", 1_000, 0))
}

async fn start(mock: &Mock) -> Proxy {
    let digest: String = llm_meter::key::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let url = mock.url();
    let toml = format!(
        "[upstreams.anthropic]\nurl = \"{url}\"\n\
         [upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"{url}\"\nflavor = \"gemini\"\n\
         [keys.spender]\nkey_sha256 = \"{digest}\"\ndaily_usd = 0.001\n"
    );
    let flags = Flags {
        upstream: Some(url),
        no_persist: true,
        ..Flags::default()
    };
    Proxy::start_guarded(&toml, flags, &[], Arc::new(ShiftedClock::default())).await
}

/// POSTs a small JSON body to `path` exactly as written; returns the status and the body.
async fn post_raw(addr: SocketAddr, path: &str) -> (u16, String) {
    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nx-api-key: {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Other spellings of `prefix` + `route` (route starts with `/`; its last segment is a name).
fn spellings(prefix: &str, route: &str) -> Vec<String> {
    let full = format!("{prefix}{route}");
    let (head, last) = full.rsplit_once('/').unwrap();
    let first = last.chars().next().unwrap();
    let rest_of_last = &last[first.len_utf8()..];
    let escaped_upper = format!("%{:02X}", u32::from(first));
    let escaped_lower = escaped_upper.to_lowercase();
    vec![
        format!("{prefix}/{route}"),
        format!("/{full}"),
        format!("//{full}"),
        format!("{prefix}/.{route}"),
        format!("{prefix}/x/..{route}"),
        format!("{prefix}/x/%2e%2e{route}"),
        format!("{prefix}/x/%2E%2E{route}"),
        format!("{prefix}/%2e{route}"),
        format!("{head}/./{last}"),
        format!("{head}//{last}"),
        format!("{full}/."),
        format!("{full}/"),
        format!("{full}//"),
        format!("{full}/x/.."),
        format!("{head}%2F{last}"),
        format!("{head}%2f{last}"),
        format!("{head}%5C{last}"),
        format!("{full}%20"),
        format!("{full}%09"),
        format!("{full}%00"),
        format!("{full};x=1"),
        format!("{full};"),
        format!("{head}/{escaped_upper}{rest_of_last}"),
        format!("{head}/{escaped_lower}{rest_of_last}"),
        format!("{head}/{}", last.to_uppercase()),
        format!("{full}?x=1"),
    ]
}

/// Every metered route of every flavor, under its prefix.
const METERED: [(&str, &str); 7] = [
    ("/v1", "/chat/completions"),
    ("/v1", "/completions"),
    ("/v1", "/embeddings"),
    ("/v1", "/responses"),
    ("/anthropic/v1", "/messages"),
    ("/gemini/v1beta", "/models/gemini-2.5-flash:generateContent"),
    (
        "/gemini/v1beta",
        "/models/gemini-2.5-flash:streamGenerateContent",
    ),
];

#[tokio::test]
async fn with_a_spent_budget_no_spelling_of_a_metered_route_reaches_the_upstream() {
    let mock = Mock::start(costly).await;
    let proxy = start(&mock).await;
    let (status, _) = post_raw(proxy.addr, "/v1/chat/completions").await;
    assert_eq!(status, 200, "the spending request");
    assert_eq!(mock.received().len(), 1);
    let mut tried = 0;
    for (prefix, route) in METERED {
        for path in std::iter::once(format!("{prefix}{route}")).chain(spellings(prefix, route)) {
            let (status, body) = post_raw(proxy.addr, &path).await;
            assert!(
                status == 429 || status == 400,
                "{path} answered {status}: {body}"
            );
            let error: Value = serde_json::from_str(&body).unwrap();
            assert!(error["error"]["message"].is_string(), "{path}: {body}");
            assert_eq!(mock.received().len(), 1, "{path} reached the upstream");
            tried += 1;
        }
    }
    assert_eq!(tried, 7 * 27);
}

#[tokio::test]
async fn paths_that_climb_out_of_their_prefix_or_hide_a_separator_get_400() {
    let mock = Mock::start(costly).await;
    let proxy = start(&mock).await;
    for (path, code) in [
        ("/v1/../../etc/passwd", "invalid_path"),
        ("/anthropic/v1/../../v1/models", "invalid_path"),
        ("/v1/%2e%2e/stats", "invalid_path"),
        ("/v1/chat%2Fcompletions", "invalid_path"),
        ("/v1/chat%5ccompletions", "invalid_path"),
        ("/v1/chat/completions%20", "invalid_path"),
        ("/v1/chat/completions;a=b", "invalid_path"),
        ("/v1/chat/completions%zz", "invalid_path"),
    ] {
        let (status, body) = post_raw(proxy.addr, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], code, "{path}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn the_upstream_receives_the_canonical_path_under_its_base() {
    let mock = Mock::start(costly).await;
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    let proxy = Proxy::start_guarded("", flags, &[], Arc::new(ShiftedClock::default())).await;
    for (sent, received) in [
        ("/v1//chat/./completions", "/v1/chat/completions"),
        (
            "//v1/x/../chat/%63ompletions?a=1",
            "/v1/chat/completions?a=1",
        ),
        ("/v1/files/a%3ab/../file%2dx", "/v1/files/file-x"),
        ("/v1/files/%c3%a9", "/v1/files/%C3%A9"),
    ] {
        let (status, _) = post_raw(proxy.addr, sent).await;
        assert_eq!(status, 200, "{sent}");
        assert_eq!(mock.last().path, received, "{sent}");
    }
    let stats = proxy.stats_after(2).await;
    assert_eq!(
        stats["totals"]["requests"], 2,
        "the two chat spellings are metered"
    );
}

#[tokio::test]
async fn a_request_without_a_host_or_with_two_gets_400() {
    let mock = Mock::start(costly).await;
    let proxy = start(&mock).await;
    for head in [
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 400"), "{head:?}: {response}");
        assert!(response.contains("invalid_host"), "{response}");
    }
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(
        response.contains(" 200 "),
        "HTTP/1.0 needs no Host: {response}"
    );
}
