//! The way out: upstream connections through the egress proxy that `HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY` or the `proxy` setting names (less `NO_PROXY` and loopback), with credentials
//! that are sent and never shown; TLS that trusts a company's CA (`SSL_CERT_FILE`, `ca_file`);
//! and a 502 or 504 that names the part that failed.

mod common;

use std::sync::Arc;

use common::{
    Behaviour, Binary, EgressProxy, H2_AND_HTTP1, Mock, Proxy, TestCa, binary_command,
    chat_request, openai_like,
};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::Value;

/// The proxy in process with `toml`, these environment variables, and `upstream`.
async fn start(upstream: &str, toml: &str, env: &[(&str, &str)]) -> Proxy {
    let flags = Flags {
        upstream: Some(upstream.into()),
        no_persist: true,
        ..Flags::default()
    };
    Proxy::start_guarded(toml, flags, env, Arc::new(ShiftedClock::default())).await
}

/// A TLS upstream under the test's own CA, named `api.test` (which only the egress proxy can
/// resolve) and `localhost`, and the CA's certificate file.
async fn company_upstream(dir: &std::path::Path) -> (Mock, TestCa, String) {
    let ca = TestCa::new("Example Corp Root CA");
    let mock = Mock::start_tls(
        openai_like,
        ca.server(&["api.test", "localhost"], H2_AND_HTTP1),
    )
    .await;
    let ca_file = ca.write(dir, "corp-ca.pem").display().to_string();
    (mock, ca, ca_file)
}

fn api_test_url(mock: &Mock) -> String {
    format!("https://api.test:{}/v1", mock.addr.port())
}

/// Sends a small chat request, and returns the status and the JSON body.
async fn chat(proxy: &Proxy) -> (u16, Value) {
    let response = proxy
        .chat(
            "sk-corp-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", false),
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn https_proxy_and_ssl_cert_file_from_the_environment_reach_a_company_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let egress = EgressProxy::start(Behaviour::Open).await;
    let proxy_url = egress.url("");
    let proxy = start(
        &api_test_url(&mock),
        "",
        &[
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("SSL_CERT_FILE", ca_file.as_str()),
        ],
    )
    .await;

    assert_eq!(chat(&proxy).await.0, 200);
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["prompt_tokens"], 11);
    assert_eq!(stats["totals"]["completion_tokens"], 3);
    let asked = egress.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        asked[0].line,
        format!("CONNECT api.test:{} HTTP/1.1", mock.addr.port())
    );
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test]
async fn lower_case_and_all_proxy_variables_are_read_too() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    for variable in ["https_proxy", "ALL_PROXY", "all_proxy"] {
        let egress = EgressProxy::start(Behaviour::Open).await;
        let proxy_url = egress.url("");
        let proxy = start(
            &api_test_url(&mock),
            &format!("ca_file = {ca_file:?}"),
            &[(variable, proxy_url.as_str())],
        )
        .await;
        assert_eq!(chat(&proxy).await.0, 200, "{variable}");
        assert_eq!(egress.asked().len(), 1, "{variable}");
    }
}

#[tokio::test]
async fn proxy_credentials_go_as_proxy_authorization_and_never_into_logs_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    // base64("agent:s3cret pass")
    let egress = EgressProxy::start(Behaviour::Credentials(
        "Basic YWdlbnQ6czNjcmV0IHBhc3M=".into(),
    ))
    .await;
    let mut command = binary_command(dir.path());
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &api_test_url(&mock),
        ])
        .env("HTTPS_PROXY", egress.url("agent:s3cret%20pass@"))
        .env("SSL_CERT_FILE", &ca_file)
        .env("RUST_LOG", "debug");
    let binary = Binary::start(command);
    let through = format!(
        "/v1 to {} through {} (environment variable HTTPS_PROXY)",
        api_test_url(&mock),
        egress.url("")
    );
    assert!(binary.banner.contains(&through), "{}", binary.banner);
    let answer = binary
        .chat_through(
            "sk-corp-aaaaaaaaaaaaaaaa",
            &chat_request("gpt-4o-mini", true),
        )
        .await;
    assert!(String::from_utf8_lossy(&answer).contains("[DONE]"));
    let stats = binary.get_json("/stats").await;
    assert_eq!(stats["totals"]["prompt_tokens"], 11);
    assert_eq!(
        egress.asked()[0].authorization.as_deref(),
        Some("Basic YWdlbnQ6czNjcmV0IHBhc3M=")
    );
    let binary_banner = binary.banner.clone();
    let (_, stdout, stderr) = binary.terminate();
    let logs = format!("{binary_banner}{stdout}{stderr}");
    assert!(
        logs.contains(&egress.addr.to_string()),
        "the proxy is named: {logs}"
    );
    for secret in ["s3cret", "YWdlbnQ6czNjcmV0IHBhc3M"] {
        assert!(!logs.contains(secret), "{secret} in {logs}");
    }
}

#[tokio::test]
async fn a_proxy_that_wants_credentials_gets_a_502_that_names_it_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let egress = EgressProxy::start(Behaviour::Credentials("Basic x".into())).await;
    let toml = format!("proxy = {:?}\nca_file = {ca_file:?}", egress.url(""));
    let proxy = start(&api_test_url(&mock), &toml, &[]).await;
    let (status, body) = chat(&proxy).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "egress_proxy_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&egress.url("")), "{message}");
    assert!(
        message.contains("407") && message.contains("credentials"),
        "{message}"
    );
    assert!(mock.received().is_empty());
    // The request is still recorded, as an error.
    assert_eq!(proxy.stats_after(1).await["totals"]["errors"], 1);
}

#[tokio::test]
async fn a_proxy_that_refuses_or_is_down_gets_a_502_naming_the_proxy_not_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let refusing = EgressProxy::start(Behaviour::Refuse("403 Forbidden".into())).await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for (proxy_url, says) in [
        (refusing.url(""), "403 Forbidden"),
        (down.clone(), "cannot be reached"),
    ] {
        let toml = format!("proxy = {proxy_url:?}\nca_file = {ca_file:?}");
        let proxy = start(&api_test_url(&mock), &toml, &[]).await;
        let (status, body) = chat(&proxy).await;
        assert_eq!(status, 502, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("egress proxy {proxy_url} failed")),
            "{message}"
        );
        assert!(message.contains(says), "{message}");
    }
}

#[tokio::test]
async fn a_proxy_that_never_answers_gets_a_504_naming_it() {
    let silent = EgressProxy::start(Behaviour::Silent).await;
    let toml = format!("proxy = {:?}\nconnect_timeout = \"300ms\"", silent.url(""));
    let proxy = start("https://api.test:443/v1", &toml, &[]).await;
    let started = std::time::Instant::now();
    let (status, body) = chat(&proxy).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "egress_proxy_timeout");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&silent.url(""))
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test]
async fn no_proxy_and_loopback_hosts_go_direct() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let egress = EgressProxy::start(Behaviour::Open).await;
    let proxy_url = egress.url("");
    // `localhost` is loopback: direct, whatever the variables say.
    let proxy = start(
        &mock.url(),
        &format!("ca_file = {ca_file:?}"),
        &[("HTTPS_PROXY", proxy_url.as_str())],
    )
    .await;
    assert_eq!(chat(&proxy).await.0, 200);
    assert!(egress.asked().is_empty());

    // `api.test` matched by NO_PROXY goes direct, so no DNS knows it: the error says so, and
    // the proxy saw nothing.
    for no_proxy in ["api.test", ".test", "*", "127.0.0.1,api.test:{port}"] {
        let no_proxy = no_proxy.replace("{port}", &mock.addr.port().to_string());
        let proxy = start(
            &api_test_url(&mock),
            &format!("ca_file = {ca_file:?}"),
            &[
                ("HTTPS_PROXY", proxy_url.as_str()),
                ("NO_PROXY", no_proxy.as_str()),
            ],
        )
        .await;
        let (status, body) = chat(&proxy).await;
        assert_eq!(status, 502, "NO_PROXY={no_proxy}: {body}");
        assert_eq!(body["error"]["code"], "upstream_unreachable", "{no_proxy}");
        assert!(egress.asked().is_empty(), "NO_PROXY={no_proxy}");
    }
    // Another port of the same host is not matched.
    let proxy = start(
        &api_test_url(&mock),
        &format!("ca_file = {ca_file:?}"),
        &[
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("no_proxy", "api.test:1"),
        ],
    )
    .await;
    assert_eq!(chat(&proxy).await.0, 200);
    assert_eq!(egress.asked().len(), 1);
}

#[tokio::test]
async fn the_proxy_setting_wins_over_the_environment_and_an_empty_one_turns_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let from_env = EgressProxy::start(Behaviour::Open).await;
    let from_file = EgressProxy::start(Behaviour::Open).await;
    let env_url = from_env.url("");
    let env = [("HTTPS_PROXY", env_url.as_str())];
    let toml = format!("proxy = {:?}\nca_file = {ca_file:?}", from_file.url(""));
    let proxy = start(&api_test_url(&mock), &toml, &env).await;
    assert_eq!(chat(&proxy).await.0, 200);
    assert_eq!((from_env.asked().len(), from_file.asked().len()), (0, 1));

    // `proxy = ""`: direct, so `api.test` is not found.
    let toml = format!("proxy = \"\"\nca_file = {ca_file:?}");
    let proxy = start(&api_test_url(&mock), &toml, &env).await;
    let (status, _) = chat(&proxy).await;
    assert_eq!(status, 502);
    assert!(from_env.asked().is_empty());

    // An upstream's own `proxy` wins over both, and over `proxy = ""`.
    let toml = format!(
        "proxy = \"\"\nca_file = {ca_file:?}\n[upstreams.openai]\nproxy = {:?}",
        from_file.url("")
    );
    let proxy = start(&api_test_url(&mock), &toml, &env).await;
    assert_eq!(chat(&proxy).await.0, 200);
    assert_eq!(from_file.asked().len(), 2);
}

#[tokio::test]
async fn a_plain_http_upstream_behind_its_own_proxy_gets_forward_requests_with_credentials() {
    let mock = Mock::openai().await;
    let egress = EgressProxy::start(Behaviour::Credentials("Basic dTpw".into())).await;
    // Asked for by name, so even a loopback upstream goes through it.
    let toml = format!(
        "[upstreams.local]\nurl = {:?}\nproxy = {:?}",
        mock.url(),
        egress.url("u:p@")
    );
    let proxy = start("https://api.openai.com/v1", &toml, &[]).await;
    let response = proxy
        .client
        .post(proxy.url("/local/v1/chat/completions"))
        .bearer_auth("sk-local-aaaaaaaaaaaaaaaa")
        .json(&chat_request("gpt-4o-mini", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let asked = egress.asked();
    assert_eq!(
        asked[0].line,
        format!("POST {}/chat/completions HTTP/1.1", mock.url())
    );
    assert_eq!(asked[0].authorization.as_deref(), Some("Basic dTpw"));
    assert_eq!(mock.last().path, "/v1/chat/completions");
    assert_eq!(proxy.stats_after(1).await["totals"]["completion_tokens"], 3);
}

#[tokio::test]
async fn a_private_ca_is_trusted_through_ca_file_ssl_cert_file_or_an_upstreams_own_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, ca_file) = company_upstream(dir.path()).await;
    let own = format!("[upstreams.openai]\nca_file = {ca_file:?}");
    for (toml, env) in [
        (format!("ca_file = {ca_file:?}"), vec![]),
        (String::new(), vec![("SSL_CERT_FILE", ca_file.as_str())]),
        (own, vec![]),
    ] {
        let proxy = start(&mock.url(), &toml, &env).await;
        assert_eq!(chat(&proxy).await.0, 200, "{toml} {env:?}");
    }
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("unused");
    std::fs::copy(&ca_file, certs.path().join("corp.pem")).unwrap();
    ca.write(certs.path(), "other.pem");
    let dir_var = certs.path().display().to_string();
    let proxy = start(&mock.url(), "", &[("SSL_CERT_DIR", dir_var.as_str())]).await;
    assert_eq!(chat(&proxy).await.0, 200, "SSL_CERT_DIR");
}

#[tokio::test]
async fn an_untrusted_certificate_gets_a_502_that_says_how_to_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, _ca, _ca_file) = company_upstream(dir.path()).await;
    let proxy = start(&mock.url(), "", &[]).await;
    let (status, body) = chat(&proxy).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("TLS handshake failed"), "{message}");
    assert!(
        message.contains("ca_file") && message.contains("SSL_CERT_FILE"),
        "{message}"
    );
    assert!(mock.received().is_empty());
}

#[test]
fn a_certificate_file_that_cannot_be_used_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-cert.pem");
    std::fs::write(&bad, "hello").unwrap();
    let output = binary_command(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("SSL_CERT_FILE", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not-a-cert.pem") && stderr.contains("no PEM"),
        "{stderr}"
    );
    let output = binary_command(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("HTTPS_PROXY") && stderr.contains("socks5"),
        "{stderr}"
    );
}
