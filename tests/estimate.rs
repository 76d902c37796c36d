//! What a request will cost before it is sent: `POST /estimate` answers for every metered flavor
//! without forwarding, counts input with the tokenizer (or Anthropic's `count_tokens` when given
//! a key), quotes the model's price and the cost range; `llm-meter estimate FILE` does the same
//! offline.

#![expect(clippy::unwrap_used, reason = "request and number helpers")]

mod common;

use std::io::Write as _;

use common::{Listening, Mock, Proxy, Received, Reply, binary_command, chat_request, key_id};
use llm_meter::config::Flags;
use llm_meter::usage::estimate::count;
use serde_json::{Value, json};

const KEY: &str = "sk-ant-estimate-0123456789";

/// A mock that answers Anthropic's `count_tokens` with 42, anything else as OpenAI's chat
/// would, without usage (so a forwarded request is estimated).
fn upstream(request: &Received) -> Reply {
    if request.path.ends_with("/messages/count_tokens") {
        return Reply::json(200, &json!({"input_tokens": 42}));
    }
    Reply::json(
        200,
        &json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}),
    )
}

/// The proxy with its OpenAI, Anthropic and Gemini upstreams all on `mock`, and `extra` config.
async fn start(mock: &Mock, extra: &str) -> Proxy {
    let toml = format!(
        "{extra}\n[upstreams.anthropic]\nurl = \"{url}\"\n\n[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"{url}\"\nflavor = \"gemini\"\n",
        url = mock.url()
    );
    Proxy::start_with(&mock.url(), &toml).await
}

/// POSTs `body` to `path` with `headers`, and returns the status and the JSON answer.
async fn estimate(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Value) {
    let mut request = proxy.client.post(proxy.url(path)).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The cost of `tokens` at `per_million` USD per million.
fn at(tokens: &Value, per_million: &Value) -> f64 {
    tokens.as_f64().unwrap() * per_million.as_f64().unwrap() / 1e6
}

fn assert_usd(actual: &Value, expected: f64) {
    let actual = actual.as_f64().unwrap();
    assert!(
        (actual - expected).abs() < 1e-9,
        "{actual} is not ${expected}"
    );
}

/// A one-message chat request ("hi") with an output limit.
fn chat_with_limit(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
}

fn anthropic_request() -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true, "temperature": 0.5,
        "system": "Be brief.", "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

#[tokio::test]
async fn a_chat_body_is_estimated_as_the_meter_would_count_it_without_reaching_the_upstream() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let body = chat_with_limit("gpt-4o", 300);
    let (status, answer) = estimate(&proxy, "/estimate/v1/chat/completions", &[], &body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(mock.received().is_empty(), "the estimate was forwarded");
    assert_eq!(answer["model"], "gpt-4o");
    assert_eq!(answer["flavor"], "openai_chat");
    assert_eq!(answer["upstream"], "openai");
    assert_eq!(answer["input_tokens_source"], "tokenizer");
    assert_eq!(answer["max_output_tokens"], 300);
    assert_eq!(answer["max_output_tokens_source"], "request");

    // The same request forwarded, its answer without usage: the meter records the same count.
    proxy
        .chat("sk-client-0123456789", &chat_request("gpt-4o", false))
        .await;
    let stats = proxy.stats_after(1).await;
    let recorded = &Proxy::model_of(&stats, &key_id("sk-client-0123456789"), "gpt-4o");
    assert_eq!(recorded["estimated_requests"], 1);
    assert_eq!(answer["input_tokens"], recorded["prompt_tokens"]);
    assert_eq!(answer["input_tokens"], count("gpt-4o", "hi\n") + 6);
    assert_eq!(mock.received().len(), 1, "only the forwarded request");
}

#[tokio::test]
async fn the_cost_range_is_the_models_price_from_no_output_to_the_output_limit() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let body = json!({"model": "gpt-4o-2024-08-06", "max_completion_tokens": 1000,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]});
    let (_, answer) = estimate(&proxy, "/estimate/v1/chat/completions", &[], &body).await;
    assert_eq!(answer["priced"], true);
    let price = &answer["price"];
    let rates = &price["per_million_usd"];
    // gpt-4o's list price, so that a $0 table could not pass.
    assert_eq!(rates["input"], 2.5);
    assert_eq!(rates["output"], 10.0);
    assert_eq!(rates["cached_input"], 1.25);
    assert!(price["source"].as_str().unwrap().starts_with("built-in"));
    assert_eq!(price["tier"], "standard");
    let input = &answer["input_tokens"];
    assert_eq!(
        *input,
        count("gpt-4o", "You are terse.\nHello, world!\n") + 2 * 3 + 3
    );
    let min = at(input, &rates["input"]);
    assert_usd(&answer["cost"]["min_usd"], min);
    assert_usd(
        &answer["cost"]["max_usd"],
        min + at(&json!(1000), &rates["output"]),
    );
}

#[tokio::test]
async fn responses_and_gemini_bodies_are_estimated_from_their_own_fields() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let responses = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello, world!",
        "max_output_tokens": 50});
    let (status, answer) = estimate(&proxy, "/estimate/v1/responses", &[], &responses).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["flavor"], "openai_responses");
    assert_eq!(
        answer["input_tokens"],
        count("gpt-4o", "Be brief.\nHello, world!\n")
    );
    assert_eq!(answer["max_output_tokens"], 50);

    let gemini = json!({"contents": [{"role": "user", "parts": [{"text": "Hello, world!"}]}],
        "generationConfig": {"maxOutputTokens": 200}});
    let path = "/estimate/gemini/v1beta/models/gemini-2.5-flash:generateContent";
    let (status, answer) = estimate(&proxy, path, &[], &gemini).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["model"], "gemini-2.5-flash",
        "the model is the path's"
    );
    assert_eq!(answer["flavor"], "gemini");
    assert_eq!(answer["upstream"], "gemini");
    assert_eq!(
        answer["input_tokens"],
        count("gemini-2.5-flash", "Hello, world!\n")
    );
    assert_eq!(answer["max_output_tokens"], 200);
    assert_eq!(answer["priced"], true);
    assert_usd(
        &answer["cost"]["max_usd"],
        at(
            &answer["input_tokens"],
            &answer["price"]["per_million_usd"]["input"],
        ) + at(&json!(200), &answer["price"]["per_million_usd"]["output"]),
    );
    assert!(mock.received().is_empty(), "an estimate was forwarded");
}

#[tokio::test]
async fn a_plain_estimate_tells_the_flavor_and_upstream_from_the_body() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    for (body, flavor, upstream) in [
        (anthropic_request(), "anthropic_messages", "anthropic"),
        (
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
            "gemini",
            "gemini",
        ),
        (
            json!({"model": "gpt-4o", "input": "hi"}),
            "openai_responses",
            "openai",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": ["hi"]}),
            "openai_embeddings",
            "openai",
        ),
        (
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
            "openai_completions",
            "openai",
        ),
        (chat_request("gpt-4o", false), "openai_chat", "openai"),
    ] {
        let (status, answer) = estimate(&proxy, "/estimate", &[], &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["flavor"], flavor, "{body}");
        assert_eq!(answer["upstream"], upstream, "{body}");
    }
    assert!(mock.received().is_empty(), "an estimate was forwarded");
}

#[tokio::test]
async fn embeddings_cost_their_input_alone() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let body = json!({"model": "text-embedding-3-small", "input": "hello world"});
    let (_, answer) = estimate(&proxy, "/estimate/v1/embeddings", &[], &body).await;
    assert_eq!(answer["max_output_tokens"], 0);
    assert_eq!(answer["max_output_tokens_source"], "no output");
    assert_eq!(answer["cost"]["min_usd"], answer["cost"]["max_usd"]);
}

#[tokio::test]
async fn anthropic_with_a_key_asks_count_tokens_with_the_key_and_without_max_tokens() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let headers = [
        ("x-api-key", KEY),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "token-counting-2024-11-01"),
    ];
    let (status, answer) = estimate(
        &proxy,
        "/estimate/anthropic/v1/messages",
        &headers,
        &anthropic_request(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["input_tokens"], 42);
    assert_eq!(answer["input_tokens_source"], "count_tokens");
    assert_eq!(answer["max_output_tokens"], 1024);
    assert!(!answer.to_string().contains(KEY), "the key is in {answer}");

    let asked = mock.received();
    assert_eq!(asked.len(), 1, "only count_tokens was asked");
    assert_eq!(asked[0].method, "POST");
    assert_eq!(asked[0].path, "/v1/messages/count_tokens");
    assert_eq!(asked[0].headers["x-api-key"], KEY);
    assert_eq!(asked[0].headers["anthropic-version"], "2023-06-01");
    assert_eq!(
        asked[0].headers["anthropic-beta"],
        "token-counting-2024-11-01"
    );
    assert_eq!(
        asked[0].json(),
        json!({"model": "claude-sonnet-4-5", "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hello, Claude"}]})
    );
    // Nothing was metered: an estimate is no request.
    assert_eq!(proxy.stats().await["totals"]["requests"], 0);
}

#[tokio::test]
async fn a_virtual_keys_real_key_is_what_count_tokens_gets() {
    let mock = Mock::start(upstream).await;
    let toml = format!(
        "[keys.agent]\nkey_env = \"AGENT_KEY\"\nupstream_key_env = \"REAL_KEY\"\n\n[upstreams.anthropic]\nurl = \"{}\"\n",
        mock.url()
    );
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    let env = [("AGENT_KEY", "sk-virtual-0123456789"), ("REAL_KEY", KEY)];
    let proxy = Proxy::start_guarded(&toml, flags, &env, Default::default()).await;
    let headers = [("x-api-key", "sk-virtual-0123456789")];
    let (_, answer) = estimate(&proxy, "/estimate", &headers, &anthropic_request()).await;
    assert_eq!(answer["input_tokens_source"], "count_tokens");
    assert_eq!(mock.last().headers["x-api-key"], KEY);
}

#[tokio::test]
async fn a_failing_count_tokens_falls_back_to_the_tokenizer_and_says_so() {
    let mock = Mock::start(|_: &Received| {
        Reply::json(
            401,
            &json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
        )
    })
    .await;
    let proxy = start(&mock, "").await;
    let headers = [("x-api-key", KEY)];
    let (status, answer) = estimate(
        &proxy,
        "/estimate/anthropic/v1/messages",
        &headers,
        &anthropic_request(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["input_tokens_source"],
        "tokenizer (count_tokens failed: 401)"
    );
    assert_eq!(
        answer["input_tokens"],
        count("claude-sonnet-4-5", "Be brief.\nHello, Claude\n")
    );
    assert_eq!(mock.received().len(), 1);

    // Without a key, the provider is not asked.
    let (_, answer) = estimate(
        &proxy,
        "/estimate/anthropic/v1/messages",
        &[],
        &anthropic_request(),
    )
    .await;
    assert_eq!(answer["input_tokens_source"], "tokenizer");
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test]
async fn an_unpriced_model_is_estimated_without_a_cost() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "").await;
    let body = chat_with_limit("llama3.2", 100);
    let (status, answer) = estimate(&proxy, "/estimate/v1/chat/completions", &[], &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["priced"], false);
    assert_eq!(answer["price"], Value::Null);
    assert_eq!(answer["cost"], json!({"min_usd": null, "max_usd": null}));
    assert_eq!(answer["input_tokens"], count("llama3.2", "hi\n") + 6);
}

#[tokio::test]
async fn a_configured_price_is_the_one_quoted() {
    let mock = Mock::start(upstream).await;
    let toml = "[pricing.\"llama3.2\"]\ninput_per_million = 1.0\noutput_per_million = 2.0\n";
    let proxy = start(&mock, toml).await;
    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
    let (_, answer) = estimate(&proxy, "/estimate/v1/chat/completions", &[], &body).await;
    assert_eq!(answer["price"]["source"], "proxy.toml: llama3.2");
    assert_eq!(answer["price"]["per_million_usd"]["output"], 2.0);
    assert_eq!(answer["max_output_tokens"], Value::Null);
    assert_eq!(
        answer["cost"]["max_usd"],
        Value::Null,
        "no output limit known"
    );
    assert_usd(
        &answer["cost"]["min_usd"],
        at(&answer["input_tokens"], &json!(1.0)),
    );
}

#[tokio::test]
async fn bad_bodies_and_paths_get_400_and_an_oversized_body_413() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "max_body_bytes = 1000").await;
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let (status, answer) = estimate(&proxy, "/estimate", &[], &big).await;
    assert_eq!(status, 413);
    assert_eq!(answer["error"]["code"], "request_too_large");

    let response = proxy
        .client
        .post(proxy.url("/estimate/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "cannot_estimate");
    assert_eq!(answer["error"]["type"], "invalid_request_error");

    for path in [
        "/estimate/v1/models",
        "/estimate/nowhere/v1/chat/completions",
    ] {
        let (status, answer) = estimate(&proxy, path, &[], &chat_request("gpt-4o", false)).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(answer["error"]["code"], "cannot_estimate", "{path}");
    }
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn with_an_admin_token_an_estimate_needs_it() {
    let mock = Mock::start(upstream).await;
    let proxy = start(&mock, "admin_token = \"admin-secret-token\"").await;
    let body = chat_request("gpt-4o", false);
    let (status, answer) = estimate(&proxy, "/estimate", &[], &body).await;
    assert_eq!(status, 401);
    assert_eq!(answer["error"]["code"], "invalid_admin_token");
    let token = [("authorization", "Bearer admin-secret-token")];
    let (status, _) = estimate(&proxy, "/estimate/v1/chat/completions", &token, &body).await;
    assert_eq!(status, 200);

    // The bearer token is llm-meter's: count_tokens takes the key from x-api-key only.
    let (_, answer) = estimate(&proxy, "/estimate", &token, &anthropic_request()).await;
    assert_eq!(answer["input_tokens_source"], "tokenizer");
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn without_an_admin_token_an_estimate_is_open_to_every_peer_as_reads_are() {
    let mock = Mock::start(upstream).await;
    let flags = Flags {
        upstream: Some(mock.url()),
        no_persist: true,
        ..Flags::default()
    };
    let listening = Listening {
        peer_as: Some("203.0.113.7:40000".parse().unwrap()),
        ..Listening::default()
    };
    let proxy = Proxy::start_listening("", flags, &[], Default::default(), listening).await;
    let (status, answer) = estimate(&proxy, "/estimate", &[], &chat_request("gpt-4o", false)).await;
    assert_eq!(status, 200, "{answer}");
    let reset = proxy
        .client
        .post(proxy.url("/stats/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 403, "changes still come from loopback only");
}

#[test]
fn the_command_prints_a_summary_or_the_json_of_a_file_or_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    let body = chat_with_limit("gpt-4o", 1000);
    std::fs::write(&file, body.to_string()).unwrap();
    let file = file.to_str().unwrap();
    let tokens = count("gpt-4o", "hi\n") + 6;

    let output = binary_command(dir.path())
        .args(["estimate", file])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("gpt-4o via openai (openai_chat)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("input       {tokens} tokens (tokenizer)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("max output  1000 tokens (request)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("$2.50 input, $10.00 output per million tokens"),
        "{stdout}"
    );
    assert!(stdout.contains("cost        $0.0"), "{stdout}");

    let output = binary_command(dir.path())
        .args(["estimate", file, "--json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["input_tokens"], tokens);
    assert_eq!(answer["input_tokens_source"], "tokenizer");
    assert_usd(
        &answer["cost"]["max_usd"],
        at(&json!(tokens), &json!(2.5)) + at(&json!(1000), &json!(10.0)),
    );

    let gemini = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let mut child = binary_command(dir.path())
        .args([
            "estimate",
            "-",
            "--api",
            "gemini",
            "--model",
            "gemini-2.5-flash",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(gemini.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["flavor"], "gemini");
    assert_eq!(answer["model"], "gemini-2.5-flash");
    assert_eq!(
        answer["upstream"],
        Value::Null,
        "no Gemini upstream is configured"
    );
    assert_eq!(answer["priced"], true);
}

#[test]
fn the_command_refuses_an_upstream_that_does_not_speak_the_api_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, chat_request("gpt-4o", false).to_string()).unwrap();
    let output = binary_command(dir.path())
        .args([
            "estimate",
            file.to_str().unwrap(),
            "--api",
            "chat",
            "--upstream",
            "anthropic",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upstream anthropic does not serve openai_chat"),
        "{stderr}"
    );
    let missing = binary_command(dir.path())
        .args(["estimate", "no-such-file.json"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read no-such-file.json"));
}
