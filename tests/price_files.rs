//! Price files through the binary: `pricing_file`, `prices update` from a local server, a
//! running proxy taking new prices on SIGHUP, and `prices MODEL` showing how a name resolves.

mod common;

use std::time::Duration;

use common::{
    Binary, Mock, Received, Reply, binary_command, chat_completion, chat_request, run_to_end,
};
use serde_json::{Value, json};

/// A LiteLLM-format map pricing `house-model` at `input` and `output` USD per million.
fn price_map(input: f64, output: f64) -> Value {
    json!({
        "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of …"},
        "house-model": {
            "litellm_provider": "openai", "mode": "chat",
            "input_cost_per_token": input / 1e6, "output_cost_per_token": output / 1e6,
            "max_output_tokens": 4096, "supports_vision": true
        },
        "gpt-4o": {
            "litellm_provider": "openai", "mode": "chat",
            "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6
        }
    })
}

fn million_in(_: &Received) -> Reply {
    Reply::json(200, &chat_completion("house-model", "x", 1_000_000, 0))
}

async fn cost_of(binary: &Binary, model: &str) -> Value {
    let stats = binary.get_json("/stats").await;
    stats["keys"][0]["models"][model]["cost_nano_usd"].clone()
}

async fn started(dir: &std::path::Path, upstream: &str, args: &[&str]) -> Binary {
    let mut command = binary_command(dir);
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
        .args(args);
    Binary::start(command)
}

#[tokio::test]
async fn a_pricing_file_prices_over_the_built_in_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.litellm.json");
    std::fs::write(&file, price_map(2.0, 8.0).to_string()).unwrap();
    let mock = Mock::start(million_in).await;
    let binary = started(
        dir.path(),
        &mock.url(),
        &["--pricing-file", file.to_str().unwrap()],
    )
    .await;
    binary
        .chat_through("sk-file", &chat_request("house-model", false))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(cost_of(&binary, "house-model").await, 2_000_000_000u64);
    // The same through the environment variable.
    let mut command = binary_command(dir.path());
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
            "--no-persist",
        ])
        .env("LLM_METER_PRICING_FILE", &file);
    let from_env = Binary::start(command);
    from_env
        .chat_through("sk-file", &chat_request("house-model", false))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(cost_of(&from_env, "house-model").await, 2_000_000_000u64);
}

#[test]
fn a_pricing_file_that_is_not_a_price_map_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.json");
    std::fs::write(&file, "{\"not\": ").unwrap();
    let (ok, _, stderr) = run_to_end(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--pricing-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("pricing_file") && stderr.contains("broken.json"),
        "{stderr}"
    );
}

#[tokio::test]
async fn prices_update_downloads_checks_keeps_the_previous_copy_and_says_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Mock::start(|_: &Received| Reply::json(200, &price_map(2.0, 8.0))).await;
    let url = server.url().replace("/v1", "/model_prices.json");
    // Two models where the built-in table has thousands: refused unless forced.
    let (ok, _, stderr) = run_to_end(dir.path(), &["prices", "update", "--url", &url]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    assert!(!dir.path().join("data").join("prices.json").exists());
    let (ok, stdout, stderr) =
        run_to_end(dir.path(), &["prices", "update", "--force", "--url", &url]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("2 models, 1 price changed: gpt-4o input 2.5 -> 1, output 10 -> 1"),
        "{stdout}"
    );
    assert!(stdout.contains("1 added"), "{stdout}");
    let saved = dir.path().join("data").join("prices.json");
    assert!(saved.exists());
    assert_eq!(server.last().path, "/model_prices.json");

    // A second update keeps the first as the previous copy and lists the change.
    let server = Mock::start(|_: &Received| Reply::json(200, &price_map(3.0, 8.0))).await;
    let url = server.url().replace("/v1", "/model_prices.json");
    let (ok, stdout, _) = run_to_end(dir.path(), &["prices", "update", "--url", &url]);
    assert!(ok);
    assert!(
        stdout.starts_with("2 models, 1 price changed: house-model input 2 -> 3,"),
        "{stdout}"
    );
    assert!(
        stdout.contains("; 0 added, 0 no longer listed\n"),
        "{stdout}"
    );
    assert!(
        dir.path()
            .join("data")
            .join("prices.json.previous")
            .exists()
    );

    // What is not a price map is refused, and the saved copy stays.
    let bad = Mock::start(|_: &Received| Reply::json(200, &json!({"hello": "world"}))).await;
    let url = bad.url().replace("/v1", "/x.json");
    let (ok, _, stderr) = run_to_end(dir.path(), &["prices", "update", "--url", &url]);
    assert!(!ok);
    assert!(stderr.contains("not usable"), "{stderr}");
    let missing = Mock::start(|_: &Received| Reply::json(404, &json!({}))).await;
    let url = missing.url().replace("/v1", "/x.json");
    let (ok, _, stderr) = run_to_end(dir.path(), &["prices", "update", "--url", &url]);
    assert!(!ok && stderr.contains("404"), "{stderr}");
    let (_, shown, _) = run_to_end(dir.path(), &["prices", "house-model"]);
    assert!(shown.contains("input 3, output 8"), "{shown}");
}

#[tokio::test]
async fn a_running_proxy_takes_downloaded_prices_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Mock::start(million_in).await;
    let binary = started(dir.path(), &mock.url(), &[]).await;
    binary
        .chat_through("sk-hup", &chat_request("house-model", false))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = binary.get_json("/stats").await;
    assert_eq!(
        stats["keys"][0]["models"]["house-model"]["unpriced_requests"],
        1
    );

    let server = Mock::start(|_: &Received| Reply::json(200, &price_map(5.0, 8.0))).await;
    let url = server.url().replace("/v1", "/p.json");
    assert!(run_to_end(dir.path(), &["prices", "update", "--force", "--url", &url]).0);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &binary.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // The reload happens off the request path: ask until it shows.
    let mut cost = Value::Null;
    for _ in 0..100 {
        binary
            .chat_through("sk-hup", &chat_request("house-model", false))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        cost = cost_of(&binary, "house-model").await;
        if cost != 0 {
            break;
        }
    }
    assert_eq!(cost, 5_000_000_000u64, "one request at the new price");
    let (ok, _, stderr) = binary.terminate();
    assert!(ok);
    assert!(stderr.contains("prices reloaded on SIGHUP"), "{stderr}");
}

#[test]
fn prices_shows_how_each_name_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run_to_end(
        dir.path(),
        &["prices", "claude-sonnet-4-5@20250929", "no-such-model-xyz"],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(
            "entry vertex_ai/claude-sonnet-4-5@20250929 (found by a normalized form of the name)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("built-in 20"), "{stdout}");
    assert!(stdout.contains(">200k"), "{stdout}");
    assert!(stdout.contains("no-such-model-xyz\n  no price"), "{stdout}");
    let (ok, json, _) = run_to_end(dir.path(), &["prices", "--json", "mistral-large-latest"]);
    assert!(ok);
    let shown: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown[0]["entry"], "mistral/mistral-large-latest");
    assert_eq!(shown[0]["found_by"], "form");
    assert_eq!(
        shown[0]["prices"][0]["standard"]["base"]["input_per_million"],
        0.5
    );
    let (ok, summary, _) = run_to_end(dir.path(), &["prices"]);
    assert!(ok && summary.contains("built-in 20"), "{summary}");
}
