//! Attribution beyond the key: `X-LLM-Meter-Tags`, `-User` and `-Session` (or the body's user
//! field, or a named key's default tags) reach the ledger, `/usage`, `/export` and `report`,
//! never the provider; bad values are refused; `cost_header` answers with the cost.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers and the WebSocket upstream: a failure is a failed test"
)]

mod common;

use std::sync::Arc;

use common::{Binary, Mock, Proxy, Received, Reply, binary_command, chat_request, json_lines};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};

const KEY: &str = "sk-attribution-test-0001";
const AGENT_KEY: &str = "sk-agent-attribution-0002";

/// POSTs a chat request with these extra headers.
async fn chat(
    proxy: &Proxy,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn rows(usage: &Value) -> &Vec<Value> {
    usage["rows"].as_array().expect("rows")
}

/// Every request the mock received carries none of llm-meter's own headers.
fn assert_no_attribution_headers(received: &[Received]) {
    assert!(!received.is_empty());
    for request in received {
        for name in request.headers.keys() {
            assert!(
                !name.as_str().starts_with("x-llm-meter"),
                "{name} reached the upstream at {}",
                request.path
            );
        }
    }
}

/// Three tagged requests: alice on search twice (sessions s1, s2), bob on ads once.
async fn tagged_traffic(proxy: &Proxy) {
    for (tags, user, session) in [
        ("team=search, run=42", "alice", "s1"),
        ("team=search", "alice", "s2"),
        ("team=ads", "bob", "s3"),
    ] {
        let response = chat(
            proxy,
            KEY,
            &chat_request("gpt-4o", false),
            &[
                ("X-LLM-Meter-Tags", tags),
                ("X-LLM-Meter-User", user),
                ("X-LLM-Meter-Session", session),
            ],
        )
        .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    proxy.stats_after(3).await;
}

#[tokio::test]
async fn usage_groups_and_filters_by_tag_user_and_session() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    tagged_traffic(&proxy).await;

    let usage = proxy.get_json("/usage?group_by=tag.team,user").await;
    assert_eq!(usage["group_by"], json!(["tag.team", "user"]));
    let lines = rows(&usage);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["tags"], json!({"team": "ads"}));
    assert_eq!(lines[0]["user"], "bob");
    assert_eq!(lines[0]["requests"], 1);
    assert_eq!(lines[1]["tags"], json!({"team": "search"}));
    assert_eq!(lines[1]["user"], "alice");
    assert_eq!(lines[1]["requests"], 2);
    // 11 prompt and 3 completion tokens per request.
    assert_eq!(lines[1]["prompt_tokens"], 22);

    let by_run = proxy.get_json("/usage?group_by=tag.run").await;
    let runs: Vec<(Value, Value)> = rows(&by_run)
        .iter()
        .map(|r| (r["tags"]["run"].clone(), r["requests"].clone()))
        .collect();
    assert_eq!(runs, [(Value::Null, json!(2)), (json!("42"), json!(1))]);

    let filtered = proxy
        .get_json("/usage?group_by=session&tag.team=search&user=alice")
        .await;
    let sessions: Vec<&Value> = rows(&filtered).iter().map(|r| &r["session"]).collect();
    assert_eq!(sessions, [&json!("s1"), &json!("s2")]);
    let one = proxy.get_json("/usage?group_by=model&session=s3").await;
    assert_eq!(one["totals"]["requests"], 1);
    let none = proxy
        .get_json("/usage?group_by=model&tag.team=nobody")
        .await;
    assert_eq!(none["totals"]["requests"], 0);

    let bad = proxy.get("/usage?group_by=tag.Team").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let bad = proxy.get("/usage?tag.a%27b=x").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    // A mistyped filter is refused, not taken for none.
    let typo = proxy.get("/export?tags.team=search").send().await.unwrap();
    assert_eq!(typo.status(), 400);
    let body: Value = typo.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown parameter `tags.team`"),
        "{body}"
    );
    assert_no_attribution_headers(&mock.received());
}

#[tokio::test]
async fn export_has_user_session_and_tags_columns_and_takes_the_filters() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    tagged_traffic(&proxy).await;

    let csv = proxy.get_text("/export?format=csv&user=alice").await;
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].ends_with(",upstream,user,session,tags,cache_write_1h_tokens,service_tier,price"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len(), 3);
    assert!(
        lines[1].contains(",openai,alice,s1,\"run=42,team=search\",0,standard,built-in 20"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(",openai,alice,s2,team=search,0,standard,built-in 20"),
        "{}",
        lines[2]
    );

    let jsonl = proxy.get_text("/export?format=jsonl&tag.team=ads").await;
    let exported = json_lines(&jsonl);
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["user"], "bob");
    assert_eq!(exported[0]["session"], "s3");
    assert_eq!(exported[0]["tags"], json!({"team": "ads"}));

    let all = json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn a_named_keys_default_tags_apply_and_a_header_tag_overrides_them() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let toml =
        "[keys.agent]\nkey_env = \"AGENT_KEY\"\ntags = { team = \"search\", env = \"prod\" }\n";
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: Some(dir.path().to_owned()),
        ..Flags::default()
    };
    let clock = Arc::new(ShiftedClock::default());
    let proxy = Proxy::start_guarded(toml, flags, &[("AGENT_KEY", AGENT_KEY)], clock).await;
    let body = chat_request("gpt-4o", false);
    chat(&proxy, AGENT_KEY, &body, &[])
        .await
        .bytes()
        .await
        .unwrap();
    let header = [("X-LLM-Meter-Tags", "team=ads, run=7")];
    chat(&proxy, AGENT_KEY, &body, &header)
        .await
        .bytes()
        .await
        .unwrap();
    // Another key has no defaults.
    chat(&proxy, KEY, &body, &[]).await.bytes().await.unwrap();
    proxy.stats_after(3).await;

    let exported = json_lines(&proxy.get_text("/export?format=jsonl").await);
    let tags: Vec<&Value> = exported.iter().map(|r| &r["tags"]).collect();
    assert_eq!(
        tags,
        [
            &json!({"env": "prod", "team": "search"}),
            &json!({"env": "prod", "run": "7", "team": "ads"}),
            &Value::Null,
        ]
    );
    let keys = proxy.get_json("/admin/keys").await;
    assert_eq!(
        keys["keys"][0]["tags"],
        json!({"env": "prod", "team": "search"})
    );
    let by_env = proxy.get_json("/usage?group_by=tag.env&tag.env=prod").await;
    assert_eq!(rows(&by_env).len(), 1);
    assert_eq!(rows(&by_env)[0]["requests"], 2);
}

/// Answers OpenAI chat and Anthropic messages alike, with usage.
fn both_flavors(request: &Received) -> Reply {
    if request.path.ends_with("/messages") {
        return Reply::json(
            200,
            &json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 12, "output_tokens": 6}}),
        );
    }
    common::openai_like(request)
}

#[tokio::test]
async fn the_user_comes_from_the_body_when_no_header_names_one() {
    let mock = Mock::start(both_flavors).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[upstreams.anthropic]\nurl = \"{}\"\n", mock.url());
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), &toml).await;
    let mut body = chat_request("gpt-4o", false);
    body["user"] = json!("openai-user");
    chat(&proxy, KEY, &body, &[]).await.bytes().await.unwrap();
    let mut body = chat_request("gpt-4o", false);
    body["safety_identifier"] = json!("safety-user");
    chat(&proxy, KEY, &body, &[]).await.bytes().await.unwrap();
    let mut body = chat_request("gpt-4o", false);
    body["user"] = json!("in-body");
    chat(&proxy, KEY, &body, &[("X-LLM-Meter-User", "in-header")])
        .await
        .bytes()
        .await
        .unwrap();
    let anthropic = json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
        "metadata": {"user_id": "anthropic-user"},
        "messages": [{"role": "user", "content": "hi"}]});
    proxy
        .client
        .post(proxy.url("/anthropic/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    proxy.stats_after(4).await;

    let exported = json_lines(&proxy.get_text("/export?format=jsonl").await);
    let users: Vec<&Value> = exported.iter().map(|r| &r["user"]).collect();
    assert_eq!(
        users,
        [
            &json!("openai-user"),
            &json!("safety-user"),
            &json!("in-header"),
            &json!("anthropic-user")
        ]
    );
    // The body is the client's: forwarded as it was, user field and all.
    let received = mock.received();
    assert_eq!(received[2].json()["user"], "in-body");
    assert_no_attribution_headers(&received);
}

#[tokio::test]
async fn attribution_headers_never_reach_the_upstream_on_any_route() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let headers = [
        ("X-LLM-Meter-Tags", "team=search"),
        ("X-LLM-Meter-User", "alice"),
        ("X-LLM-Meter-Session", "s1"),
    ];
    // Metered, plain and streamed.
    chat(&proxy, KEY, &chat_request("gpt-4o", false), &headers)
        .await
        .bytes()
        .await
        .unwrap();
    chat(&proxy, KEY, &chat_request("gpt-4o", true), &headers)
        .await
        .bytes()
        .await
        .unwrap();
    // Unmetered.
    let mut models = proxy.client.get(proxy.url("/v1/models")).bearer_auth(KEY);
    for (name, value) in headers {
        models = models.header(name, value);
    }
    models.send().await.unwrap().bytes().await.unwrap();
    let received = mock.received();
    assert_eq!(received.len(), 3);
    assert_eq!(received[2].path, "/v1/models");
    assert_no_attribution_headers(&received);
}

#[tokio::test]
async fn each_bad_attribution_value_is_refused_with_400_naming_its_header() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let long_user = "u".repeat(129);
    let long_value = format!("team={}", "v".repeat(65));
    let long_name = format!("{}=x", "n".repeat(33));
    let nine = "a=1,b=2,c=3,d=4,e=5,f=6,g=7,h=8,i=9";
    for (header, value, reason) in [
        ("X-LLM-Meter-Tags", "team", "not name=value"),
        ("X-LLM-Meter-Tags", "Team=search", "tag name \"Team\""),
        ("X-LLM-Meter-Tags", long_name.as_str(), "1 to 32"),
        (
            "X-LLM-Meter-Tags",
            long_value.as_str(),
            "1 to 64 characters",
        ),
        ("X-LLM-Meter-Tags", "team=a, team=b", "given twice"),
        ("X-LLM-Meter-Tags", nine, "at most 8"),
        ("X-LLM-Meter-User", "", "empty"),
        ("X-LLM-Meter-User", long_user.as_str(), "longer than 128"),
        ("X-LLM-Meter-Session", "a\tb", "control character"),
    ] {
        let response = chat(
            &proxy,
            KEY,
            &chat_request("gpt-4o", false),
            &[(header, value)],
        )
        .await;
        assert_eq!(response.status(), 400, "{header}: {value:?}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("llm-meter: invalid {header} header: ")),
            "{message}"
        );
        assert!(message.contains(reason), "{value:?}: {message}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_attribution_header");
    }
    // On unmetered routes too, and never forwarded.
    let response = proxy
        .client
        .get(proxy.url("/v1/models"))
        .header("X-LLM-Meter-Tags", "Bad=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn cost_headers_are_absent_unless_cost_header_is_on() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start(&mock.url()).await;
    let response = chat(&proxy, KEY, &chat_request("gpt-4o", false), &[]).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-llm-meter-cost").is_none());
    assert!(response.headers().get("x-llm-meter-tokens").is_none());
}

#[tokio::test]
async fn cost_header_gives_the_exact_cost_and_tokens_of_plain_responses_and_leaves_streams_alone() {
    let mock = Mock::openai().await;
    let proxy = Proxy::start_with(&mock.url(), "cost_header = true\n").await;
    let response = chat(&proxy, KEY, &chat_request("gpt-4o", false), &[]).await;
    assert_eq!(response.status(), 200);
    // gpt-4o: 11 x $2.50/M + 3 x $10/M = $0.0000575.
    assert_eq!(response.headers()["x-llm-meter-cost"], "0.0000575");
    assert_eq!(response.headers()["x-llm-meter-tokens"], "14");
    let length = response.headers()["content-length"].clone();
    let body = response.bytes().await.unwrap();
    assert_eq!(length, body.len().to_string().as_str());
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent["usage"]["total_tokens"], 14);
    let stats = proxy.stats_after(1).await;
    assert_eq!(stats["totals"]["cost_nano_usd"], 57_500);

    let streamed = chat(&proxy, KEY, &chat_request("gpt-4o", true), &[]).await;
    assert_eq!(streamed.status(), 200);
    assert!(streamed.headers().get("x-llm-meter-cost").is_none());
    assert!(streamed.headers().get("x-llm-meter-tokens").is_none());
    let events = common::sse_data(streamed).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let stats = proxy.stats_after(2).await;
    assert_eq!(stats["totals"]["cost_nano_usd"], 2 * 57_500);
}

#[tokio::test]
async fn the_binary_records_attribution_and_reports_by_tag_and_user() {
    let mock = Mock::openai().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &mock.url(),
    ]);
    let binary = Binary::start(command);
    let client = common::client();
    for (tags, user) in [
        ("team=search", "alice"),
        ("team=search", "alice"),
        ("team=ads", "bob"),
    ] {
        let response = client
            .post(binary.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("X-LLM-Meter-Tags", tags)
            .header("X-LLM-Meter-User", user)
            .json(&chat_request("gpt-4o", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let (stopped, _, stderr) = binary.terminate();
    assert!(stopped, "{stderr}");
    assert_no_attribution_headers(&mock.received());

    let data = dir.path().join("data");
    let report = |extra: &[&str]| {
        let mut command = binary_command(dir.path());
        command.args([
            "report",
            "--period",
            "all",
            "--by",
            "tag.team,user",
            "--data-dir",
        ]);
        command.arg(&data).args(extra);
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let text = report(&[]);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[1][..4], ["TAG.TEAM", "USER", "REQUESTS", "ERRORS"]);
    // The biggest spender first.
    assert_eq!(lines[2][..4], ["search", "alice", "2", "0"]);
    assert_eq!(lines[3][..4], ["ads", "bob", "1", "0"]);
    assert_eq!(lines[4][..2], ["TOTAL", "3"]);

    let only_search = report(&["--where", "tag.team=search"]);
    assert!(only_search.contains("alice"), "{only_search}");
    assert!(!only_search.contains("bob"), "{only_search}");

    let json: Value = serde_json::from_str(&report(&["--format", "json"])).unwrap();
    assert_eq!(json["rows"][0]["tags"]["team"], "search");
    assert_eq!(json["rows"][0]["user"], "alice");
    assert_eq!(json["totals"]["requests"], 3);

    let mut export = binary_command(dir.path());
    export.args([
        "export",
        "--format",
        "jsonl",
        "--where",
        "user=bob",
        "--data-dir",
    ]);
    let output = export.arg(&data).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let exported = json_lines(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["tags"], json!({"team": "ads"}));

    let mut bad = binary_command(dir.path());
    bad.args(["report", "--where", "colour=red", "--data-dir"]);
    let output = bad.arg(&data).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--where"));
}

/// A WebSocket upstream for one connection: records its handshake's headers, and answers each
/// `response.create` with a completed response (100 input, 30 output tokens).
async fn websocket_upstream() -> (String, tokio::task::JoinHandle<http::HeaderMap>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    #[expect(
        clippy::disallowed_methods,
        reason = "owned: the test awaits the handle"
    )]
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let head = Arc::new(parking_lot::Mutex::new(http::HeaderMap::new()));
        let seen = Arc::clone(&head);
        #[expect(
            clippy::result_large_err,
            reason = "the callback's signature is tungstenite's"
        )]
        let record = move |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                           response| {
            *seen.lock() = request.headers().clone();
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, record)
            .await
            .unwrap();
        while let Some(Ok(Message::Text(_))) = ws.next().await {
            let completed = json!({"type": "response.completed", "sequence_number": 1,
                "response": {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o", "output": [],
                    "usage": {"input_tokens": 100, "output_tokens": 30, "total_tokens": 130}}});
            ws.send(Message::text(completed.to_string())).await.unwrap();
        }
        head.lock().clone()
    });
    (url, task)
}

#[tokio::test]
async fn websocket_responses_carry_the_upgrades_attribution_which_the_upstream_never_sees() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let (url, upstream) = websocket_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&url, dir.path(), "").await;
    let mut request = format!("ws://{}/v1/responses", proxy.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    headers.insert("x-llm-meter-tags", "team=voice".parse().unwrap());
    headers.insert("x-llm-meter-user", "alice".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let create = json!({"type": "response.create", "model": "gpt-4o", "input": "hi"});
    ws.send(Message::text(create.to_string())).await.unwrap();
    let answer = ws.next().await.unwrap().unwrap();
    assert!(answer.to_text().unwrap().contains("response.completed"));
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let head = upstream.await.unwrap();
    assert!(head.contains_key("authorization"));
    assert!(
        head.keys()
            .all(|name| !name.as_str().starts_with("x-llm-meter")),
        "{head:?}"
    );

    proxy.stats_after(1).await;
    let exported = json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["tags"], json!({"team": "voice"}));
    assert_eq!(exported[0]["user"], "alice");
    assert_eq!(exported[0]["input_tokens"], 100);
}

/// Turns the ledger in `dir` back into a schema-2 ledger: no attribution columns (nor the
/// later ones).
fn downgrade_to_schema_2(dir: &std::path::Path) {
    let conn = rusqlite::Connection::open(dir.join("ledger.sqlite3")).unwrap();
    conn.execute_batch(
        "DROP VIEW request_rows;
         ALTER TABLE requests DROP COLUMN cache_write_1h_tokens;
         ALTER TABLE requests DROP COLUMN service_tier;
         ALTER TABLE requests DROP COLUMN price;
         ALTER TABLE totals DROP COLUMN cache_write_1h_tokens;
         ALTER TABLE upstream_totals DROP COLUMN cache_write_1h_tokens;
         ALTER TABLE requests DROP COLUMN user;
         ALTER TABLE requests DROP COLUMN session;
         ALTER TABLE requests DROP COLUMN tags;
         CREATE VIEW request_rows AS
            SELECT r.at, r.period, k.key_id, k.label AS key_label, m.name AS model,
                coalesce(u.name, 'openai') AS upstream,
                f.name AS flavor, r.status, r.streamed, r.input_tokens, r.cached_tokens,
                r.cache_write_tokens, r.output_tokens, r.reasoning_tokens, r.cost_nano_usd,
                r.latency_us, r.response_id, r.error, r.unpriced, r.estimated, r.partial
            FROM requests r
            JOIN keys k ON k.id = r.key
            JOIN names m ON m.id = r.model
            JOIN names f ON f.id = r.flavor
            LEFT JOIN names u ON u.id = r.upstream;
         PRAGMA user_version = 2;",
    )
    .unwrap();
}

#[tokio::test]
async fn a_ledger_from_before_attribution_opens_and_its_rows_are_the_unattributed_group() {
    let dir = tempfile::tempdir().unwrap();
    common::write_ledger(
        dir.path(),
        [common::ledger_row(
            "2026-11-01T09:00:00Z",
            KEY,
            "gpt-4o",
            (1000, 200),
            4_500_000,
        )],
    );
    downgrade_to_schema_2(dir.path());
    let mock = Mock::openai().await;
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), "").await;
    let headers = [
        ("X-LLM-Meter-User", "alice"),
        ("X-LLM-Meter-Tags", "team=search"),
    ];
    chat(&proxy, KEY, &chat_request("gpt-4o", false), &headers)
        .await
        .bytes()
        .await
        .unwrap();
    proxy.stats_after(2).await;

    let usage = proxy
        .get_json("/usage?group_by=user,tag.team&since=2026-01-01")
        .await;
    let lines = rows(&usage);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["user"], Value::Null);
    assert_eq!(lines[0]["tags"], json!({"team": null}));
    assert_eq!(lines[0]["cost_nano_usd"], 4_500_000);
    assert_eq!(lines[1]["user"], "alice");
    assert_eq!(lines[1]["tags"], json!({"team": "search"}));
    let old = json_lines(
        &proxy
            .get_text("/export?format=jsonl&until=2026-11-02")
            .await,
    );
    assert_eq!(old.len(), 1);
    assert_eq!(
        (&old[0]["user"], &old[0]["tags"]),
        (&Value::Null, &Value::Null)
    );
}
