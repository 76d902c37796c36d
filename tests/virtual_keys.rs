//! Virtual keys: an agent holds a key of its own, the proxy sends the real provider key
//! upstream in its place; the real key never appears in /stats, /admin/keys, alerts, the
//! ledger, exports or logs.

#![expect(clippy::unwrap_used, reason = "request helpers")]

mod common;

use std::sync::Arc;

use common::{Binary, Mock, Proxy, binary_command, chat_request, key_id, openai_like};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::json;

const AGENT_KEY: &str = "sk-agent-virtual-0123456789";
const REAL_KEY: &str = "sk-proj-REAL-provider-key-do-not-leak-42";

const TOML: &str = "[keys.agent]\nkey_env = \"AGENT_KEY\"\nupstream_key_env = \"OPENAI_API_KEY\"\ndaily_usd = 0.000001\n";

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn the_real_key_goes_upstream_and_nowhere_else() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: Some(dir.path().to_owned()),
        ..Flags::default()
    };
    let env = [("AGENT_KEY", AGENT_KEY), ("OPENAI_API_KEY", REAL_KEY)];
    let proxy = Proxy::start_guarded(TOML, flags, &env, Arc::new(ShiftedClock::default())).await;

    // Replaced where the client put it: a query key, x-api-key, Authorization.
    proxy
        .client
        .get(proxy.url(&format!("/v1/models?limit=1&key={AGENT_KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        mock.last().path,
        format!("/v1/models?limit=1&key={REAL_KEY}")
    );
    proxy
        .client
        .post(proxy.url("/v1/embeddings"))
        .header("x-api-key", AGENT_KEY)
        .json(&json!({"model": "text-embedding-3-small", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(mock.last().headers["x-api-key"], REAL_KEY);
    assert!(mock.last().headers.get("authorization").is_none());
    let response = proxy.chat(AGENT_KEY, &chat_request("gpt-4o", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.last().headers["authorization"],
        format!("Bearer {REAL_KEY}")
    );

    let stats = proxy.stats_after(2).await;
    let agent = &stats["keys"][0];
    assert_eq!(agent["key"], "agent");
    assert_eq!(agent["id"], key_id(AGENT_KEY));
    // The budget is spent by now: the next request is refused, and an alert has fired.
    assert_eq!(
        proxy
            .chat(AGENT_KEY, &chat_request("gpt-4o", false))
            .await
            .status(),
        429
    );
    let alerts = proxy.get_text("/alerts").await;
    assert!(alerts.contains("budget_threshold"), "{alerts}");
    let admin = proxy.get_text("/admin/keys").await;
    assert!(admin.contains("\"virtual\":true"), "{admin}");
    let export = proxy.get_text("/export?format=jsonl").await;
    for (place, text) in [
        ("/stats", stats.to_string()),
        ("/alerts", alerts),
        ("/admin/keys", admin),
        ("/export", export),
    ] {
        assert!(!text.contains(REAL_KEY), "real key in {place}");
        assert!(!text.contains(AGENT_KEY), "client key in {place}");
    }
    proxy.stop().await;
    for (path, bytes) in files_under(dir.path()) {
        assert!(!contains(&bytes, REAL_KEY), "real key in {path}");
        assert!(!contains(&bytes, AGENT_KEY), "client key in {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_key_never_reaches_the_logs() {
    let mock = Mock::start(openai_like).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, TOML).unwrap();
    let mut command = binary_command(dir.path());
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()])
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("AGENT_KEY", AGENT_KEY)
        .env("OPENAI_API_KEY", REAL_KEY);
    let binary = Binary::start(command);
    for _ in 0..3 {
        binary
            .chat_through(AGENT_KEY, &chat_request("gpt-4o", true))
            .await;
    }
    let (ok, _, stderr) = binary.terminate();
    assert!(ok);
    assert!(stderr.contains(&key_id(AGENT_KEY)), "{stderr}");
    assert!(stderr.contains("alert"), "{stderr}");
    assert!(!stderr.contains(REAL_KEY), "real key in the logs");
    assert!(!stderr.contains(AGENT_KEY), "client key in the logs");
}
