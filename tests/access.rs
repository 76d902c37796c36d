//! Who can reach llm-meter's own endpoints: with an admin token, every one but `/healthz` needs
//! it; without one, changes come from loopback only; `admin_listen` puts them on a port of
//! their own.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Listening, Mock, Proxy, chat_request, openai_like};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use reqwest::Method;
use serde_json::{Value, json};

const TOKEN: &str = "admin-secret-token";

/// Every own endpoint, as (method, path); the list a new endpoint must join.
const OWN: [(&str, &str); 12] = [
    ("GET", "/stats"),
    ("GET", "/stats?format=text"),
    ("GET", "/stats?since=24h"),
    ("GET", "/usage"),
    ("GET", "/export"),
    ("GET", "/alerts"),
    ("GET", "/admin/keys"),
    ("POST", "/stats/reset"),
    ("PUT", "/admin/keys/worker/budget"),
    ("GET", "/not-an-endpoint"),
    ("HEAD", "/stats"),
    ("POST", "/estimate"),
];

/// The proxy, and its data directory (removed when dropped).
async fn start(mock: &Mock, toml: &str, listening: Listening) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: Some(dir.path().to_owned()),
        ..Flags::default()
    };
    let toml = format!("{toml}\n[keys.worker]\nkey_env = \"WORKER_KEY\"\n");
    let proxy = Proxy::start_listening(
        &toml,
        flags,
        &[("WORKER_KEY", "sk-worker-0123456789")],
        Arc::new(ShiftedClock::default()),
        listening,
    )
    .await;
    (proxy, dir)
}

async fn call(
    proxy: &Proxy,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = proxy
        .client
        .request(method.clone(), format!("http://{addr}{path}"));
    if method == Method::PUT {
        request = request.json(&json!({"daily_usd": 3.0}));
    }
    if path == "/estimate" {
        request = request.json(&chat_request("gpt-4o", false));
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn with_a_token_every_own_endpoint_but_healthz_needs_it() {
    let mock = Mock::start(openai_like).await;
    let toml = format!("admin_token = \"{TOKEN}\"");
    let (proxy, _dir) = start(&mock, &toml, Listening::default()).await;
    for (method, path) in OWN {
        for token in [None, Some("wrong"), Some("admin-secret-tokenX")] {
            let response = call(&proxy, proxy.addr, method, path, token).await;
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            if method != "HEAD" {
                assert_eq!(error_code(response).await, "invalid_admin_token");
            }
        }
    }
    for (method, path) in OWN {
        let response = call(&proxy, proxy.addr, method, path, Some(TOKEN)).await;
        let expected = if path == "/not-an-endpoint" { 404 } else { 200 };
        assert_eq!(
            response.status(),
            expected,
            "{method} {path} with the token"
        );
    }
    let health = call(&proxy, proxy.addr, "GET", "/healthz", None).await;
    assert_eq!(health.status(), 200);
    // Provider routes are the provider's business: the admin token has no say there.
    let chat = proxy
        .chat("sk-client-key-1", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(chat.status(), 200);
}

#[tokio::test]
async fn the_token_is_checked_on_every_spelling_of_an_own_path() {
    let mock = Mock::start(openai_like).await;
    let toml = format!("admin_token = \"{TOKEN}\"");
    let (proxy, _dir) = start(&mock, &toml, Listening::default()).await;
    for path in [
        "//stats",
        "/stats/",
        "/./stats",
        "/x/../stats",
        "/%73tats",
        "/STATS",
        "/healthz/../stats",
    ] {
        let response = call(&proxy, proxy.addr, "GET", path, None).await;
        assert_eq!(response.status(), 401, "{path}");
    }
}

#[tokio::test]
async fn without_a_token_reads_are_open_and_changes_come_from_loopback_only() {
    let mock = Mock::start(openai_like).await;
    let remote: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let (proxy, _dir) = start(
        &mock,
        "",
        Listening {
            peer_as: Some(remote),
            ..Listening::default()
        },
    )
    .await;
    proxy
        .chat("sk-client-key-1", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(proxy.stats_after(1).await["totals"]["requests"], 1);
    for (method, path) in [
        ("POST", "/stats/reset"),
        ("PUT", "/admin/keys/worker/budget"),
    ] {
        let response = call(&proxy, proxy.addr, method, path, None).await;
        assert_eq!(response.status(), 403, "{method} {path}");
        assert_eq!(error_code(response).await, "loopback_only");
    }
    assert_eq!(
        proxy.stats().await["totals"]["requests"],
        1,
        "reset went through"
    );

    let (local, _local_dir) = start(&mock, "", Listening::default()).await;
    let reset = call(&local, local.addr, "POST", "/stats/reset", None).await;
    assert_eq!(reset.status(), 200);
}

#[tokio::test]
async fn admin_listen_keeps_own_endpoints_off_the_main_port() {
    let mock = Mock::start(openai_like).await;
    let (proxy, _dir) = start(
        &mock,
        "",
        Listening {
            admin_port: true,
            ..Listening::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let chat = proxy
        .chat("sk-client-key-1", &chat_request("gpt-4o", false))
        .await;
    assert_eq!(chat.status(), 200);
    for (method, path) in OWN {
        let response = call(&proxy, proxy.addr, method, path, None).await;
        assert_eq!(response.status(), 404, "{method} {path} on the main port");
    }
    assert_eq!(
        call(&proxy, proxy.addr, "GET", "/healthz", None)
            .await
            .status(),
        200
    );

    let stats: Value = call(&proxy, admin, "GET", "/stats", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stats["totals"]["requests"], 1);
    let chat_on_admin = call(&proxy, admin, "POST", "/v1/chat/completions", None).await;
    assert_eq!(chat_on_admin.status(), 404);
}

#[test]
fn the_start_warns_when_the_meter_is_reachable_off_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = common::binary_command(dir.path());
    command.args(["--listen", "0.0.0.0:0", "--no-persist"]);
    let (ok, _, stderr) = common::Binary::start(command).terminate();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("reachable off this machine"), "{stderr}");

    let mut private = common::binary_command(dir.path());
    private.args([
        "--listen",
        "0.0.0.0:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--no-persist",
    ]);
    let binary = common::Binary::start(private);
    assert!(
        binary.banner.contains("own endpoints on http://127.0.0.1:"),
        "{}",
        binary.banner
    );
    let (ok, _, stderr) = binary.terminate();
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("reachable off this machine"), "{stderr}");
}
