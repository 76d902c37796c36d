//! WebSockets: an upgrade on a provider route is admitted like any request, relayed both ways,
//! and each response inside it (Responses API WebSocket mode, Realtime API) metered on its own.
#![expect(
    clippy::unwrap_used,
    reason = "the mock's helpers: a failure is a failed test"
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Binary, Proxy, binary_command, key_id};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What the mock upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// The Responses API's WebSocket mode: each `response.create` streams a response ending
    /// in `response.completed` (response n: 100·n input tokens, 20 cached, 30 output, 5 reasoning).
    Responses,
    /// The Realtime API: `session.created` first, then `response.done` with audio tokens.
    Realtime,
    /// The Responses API, cut (no close frame) after the first delta of each response.
    CutAfterDelta,
}

/// A WebSocket upstream on loopback: records the handshakes and the client's text messages.
struct WsMock {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
    received: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WsMock {
    async fn start(api: Api) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (h, r) = (Arc::clone(&heads), Arc::clone(&received));
        #[expect(
            clippy::disallowed_methods,
            reason = "owned: stop() aborts it or re-raises its panic"
        )]
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((tcp, _)) = listener.accept() => {
                        connections.spawn(serve(tcp, api, Arc::clone(&h), Arc::clone(&r)));
                    }
                    Some(done) = connections.join_next() => {
                        if let Err(err) = done && err.is_panic() {
                            std::panic::resume_unwind(err.into_panic());
                        }
                    }
                }
            }
        });
        Self {
            addr,
            heads,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn creates(&self) -> usize {
        self.received
            .lock()
            .iter()
            .filter(|m| m["type"] == "response.create")
            .count()
    }

    /// Stops the mock, failing the test with its panic if it had one.
    async fn stop(self) {
        if self.task.is_finished() {
            if let Err(err) = self.task.await
                && err.is_panic()
            {
                std::panic::resume_unwind(err.into_panic());
            }
        } else {
            self.task.abort();
        }
    }
}

/// One connection of the mock: accepts the upgrade and answers as `api` says.
async fn serve(
    tcp: TcpStream,
    api: Api,
    heads: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
    received: Arc<Mutex<Vec<Value>>>,
) {
    #[expect(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's"
    )]
    let record = |request: &Request, response: Response| {
        let path = request.uri().path_and_query().unwrap().to_string();
        heads.lock().push((path, request.headers().clone()));
        Ok(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
        return;
    };
    if api == Api::Realtime {
        let created = json!({"type": "session.created", "event_id": "event_0",
            "session": {"id": "sess_1", "object": "realtime.session", "model": "gpt-realtime"}});
        ws.send(Message::text(created.to_string())).await.unwrap();
    }
    let mut n = 0;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let request: Value = serde_json::from_str(&text).unwrap();
        received.lock().push(request.clone());
        if request["type"] != "response.create" {
            continue;
        }
        n += 1;
        let events = match api {
            Api::Realtime => realtime_events(n),
            _ => responses_events(n, request["model"].as_str().unwrap_or("gpt-x")),
        };
        let count = if api == Api::CutAfterDelta {
            2
        } else {
            events.len()
        };
        for event in &events[..count] {
            if ws.send(Message::text(event.to_string())).await.is_err() {
                return;
            }
        }
        if api == Api::CutAfterDelta {
            return;
        }
    }
}

/// Response `n` of the Responses API's WebSocket mode.
fn responses_events(n: u64, model: &str) -> Vec<Value> {
    let id = format!("resp_{n}");
    vec![
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": id, "object": "response", "status": "in_progress", "model": model, "output": [], "usage": null}}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hello"}),
        json!({"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": " there"}),
        json!({"type": "response.completed", "sequence_number": 3, "response": {"id": id, "object": "response", "status": "completed", "model": model, "output": [],
            "usage": {"input_tokens": 100 * n, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 100 * n + 30}}}),
    ]
}

/// Response `n` of a Realtime session: text and audio, part of the input cached.
fn realtime_events(n: u64) -> Vec<Value> {
    let id = format!("resp_rt{n}");
    vec![
        json!({"type": "response.created", "event_id": "event_1", "response": {"id": id, "object": "realtime.response", "status": "in_progress", "output": [], "usage": null}}),
        json!({"type": "response.output_audio_transcript.delta", "event_id": "event_2", "response_id": id, "delta": "Hi"}),
        json!({"type": "response.done", "event_id": "event_3", "response": {"id": id, "object": "realtime.response", "status": "completed", "output": [],
            "usage": {"total_tokens": 253, "input_tokens": 132, "output_tokens": 121,
                "input_token_details": {"text_tokens": 119, "audio_tokens": 13, "image_tokens": 0, "cached_tokens": 64,
                    "cached_tokens_details": {"text_tokens": 60, "audio_tokens": 4, "image_tokens": 0}},
                "output_token_details": {"text_tokens": 30, "audio_tokens": 91}}}}),
    ]
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the proxy at `addr` to `path`, with a bearer key.
async fn open(
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    headers.insert(
        "openai-beta",
        "responses_websockets=2026-02-04".parse().unwrap(),
    );
    headers.insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// Asks for one response and reads the events up to the one of type `last`.
async fn respond(ws: &mut Client, create: &Value, last: &str) -> Vec<Value> {
    ws.send(Message::text(create.to_string())).await.unwrap();
    let mut events = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap();
        let Some(Ok(Message::Text(text))) = message else {
            panic!("the WebSocket ended before {last}: {message:?}");
        };
        let event: Value = serde_json::from_str(&text).unwrap();
        let is_last = event["type"] == last;
        events.push(event);
        if is_last {
            return events;
        }
    }
}

/// Reads until the close frame, and returns its code and reason.
async fn closed(ws: &mut Client) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (frame.code, frame.reason.to_string());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

fn create(model: &str) -> Value {
    json!({"type": "response.create", "model": model, "input": [{"type": "message", "role": "user", "content": "hi"}]})
}

const PRICES: &str = "[pricing.\"ws-model\"]\ninput_per_million = 1.0\noutput_per_million = 2.0\ncached_input_per_million = 0.5\n[pricing.\"gpt-realtime\"]\ninput_per_million = 4.0\noutput_per_million = 16.0\ncached_input_per_million = 0.4\n";

#[tokio::test]
async fn each_response_on_one_websocket_is_recorded_on_its_own_with_exact_totals() {
    let mock = WsMock::start(Api::Responses).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), PRICES).await;
    let key = "sk-ws-responses-000000000000";
    let mut ws = open(proxy.addr, "/v1/responses", key).await.unwrap();

    for n in 1..=2 {
        let events = respond(&mut ws, &create("ws-model"), "response.completed").await;
        assert_eq!(events, responses_events(n, "ws-model"), "relayed as sent");
    }
    ws.close(None).await.unwrap();

    let stats = proxy.stats_after(2).await;
    let entry = Proxy::model_of(&stats, &key_id(key), "ws-model");
    assert_eq!(entry["requests"], 2);
    assert_eq!(entry["prompt_tokens"], 300);
    assert_eq!(entry["cached_tokens"], 40);
    assert_eq!(entry["completion_tokens"], 60);
    assert_eq!(entry["reasoning_tokens"], 10);
    assert_eq!(entry["errors"], 0);
    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    let costs: Vec<&Value> = rows.iter().map(|r| &r["cost_nano_usd"]).collect();
    // (100n − 20) × $1/M + 20 × $0.5/M + 30 × $2/M.
    assert_eq!(costs, [150_000, 250_000]);
    for row in &rows {
        assert_eq!(row["flavor"], "openai_responses", "{row}");
        assert_eq!(row["partial"], false, "{row}");
        assert_eq!(row["streamed"], true, "{row}");
    }
    let (path, headers) = mock.heads.lock()[0].clone();
    assert_eq!(path, "/v1/responses");
    assert_eq!(headers["openai-beta"], "responses_websockets=2026-02-04");
    assert_eq!(headers["authorization"], format!("Bearer {key}"));
    assert!(
        !headers.contains_key("sec-websocket-extensions"),
        "no compression may be negotiated"
    );
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn realtime_usage_is_recorded_per_response_with_audio_tokens_flagged_unpriced() {
    let mock = WsMock::start(Api::Realtime).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), PRICES).await;
    let key = "sk-ws-realtime-0000000000000";
    let path = "/v1/realtime?model=gpt-realtime";
    let mut ws = open(proxy.addr, path, key).await.unwrap();
    let created = ws.next().await.unwrap().unwrap();
    assert!(created.to_text().unwrap().contains("session.created"));
    let rt_create =
        json!({"type": "response.create", "response": {"modalities": ["audio", "text"]}});
    respond(&mut ws, &rt_create, "response.done").await;
    ws.close(None).await.unwrap();

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(key), "gpt-realtime");
    assert_eq!(entry["prompt_tokens"], 132);
    assert_eq!(entry["cached_tokens"], 64);
    assert_eq!(entry["completion_tokens"], 121);
    assert_eq!(entry["unpriced_requests"], 1, "audio has no price");
    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["flavor"], "openai_realtime");
    assert_eq!(rows[0]["response_id"], "resp_rt1");
    assert_eq!(rows[0]["unpriced"], true);
    // The text part only: 59 uncached × $4/M + 60 cached × $0.4/M + 30 out × $16/M.
    assert_eq!(rows[0]["cost_nano_usd"], 740_000);
    // The model has a price: the alert is about its audio.
    let alerts = proxy.get_json("/alerts").await;
    let alerts = alerts["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["kind"], "unpriced_audio");
    assert_eq!(alerts[0]["scope"], "gpt-realtime");
    assert_eq!(mock.heads.lock()[0].0, path);
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn realtime_audio_is_priced_at_the_audio_rates_the_price_map_lists() {
    let mock = WsMock::start(Api::Realtime).await;
    // No configured price: the built-in table's gpt-realtime, which lists audio rates.
    let proxy = Proxy::start_with(&mock.url(), "").await;
    let key = "sk-ws-realtime-audio-00000000";
    let mut ws = open(proxy.addr, "/v1/realtime?model=gpt-realtime", key)
        .await
        .unwrap();
    let _created = ws.next().await.unwrap().unwrap();
    let rt_create =
        json!({"type": "response.create", "response": {"modalities": ["audio", "text"]}});
    respond(&mut ws, &rt_create, "response.done").await;
    ws.close(None).await.unwrap();

    let stats = proxy.stats_after(1).await;
    let entry = Proxy::model_of(&stats, &key_id(key), "gpt-realtime");
    assert_eq!(entry["unpriced_requests"], 0, "audio is priced");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/prices.json");
    let table: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rate = |field: &str| table["models"]["gpt-realtime"][field].as_f64().unwrap();
    // Text: 59 uncached, 60 cached in, 30 out; audio: 9 uncached, 4 cached in, 91 out.
    let expected = 59.0 * rate("input_cost_per_token")
        + 60.0 * rate("cache_read_input_token_cost")
        + 30.0 * rate("output_cost_per_token")
        + 9.0 * rate("input_cost_per_audio_token")
        + 4.0 * rate("cache_read_input_audio_token_cost")
        + 91.0 * rate("output_cost_per_audio_token");
    assert_eq!(entry["cost_nano_usd"], (expected * 1e9).round() as u64);
    let alerts = proxy.get_json("/alerts").await;
    assert_eq!(alerts["alerts"].as_array().unwrap().len(), 0);
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn a_budget_spent_mid_connection_closes_both_sides_with_a_policy_violation() {
    let mock = WsMock::start(Api::Responses).await;
    let toml = format!("{PRICES}[budget]\ntotal_usd = 0.0001\n");
    let proxy = Proxy::start_with(&mock.url(), &toml).await;
    let mut ws = open(proxy.addr, "/v1/responses", "sk-ws-budget-0000000000")
        .await
        .unwrap();
    // The first response costs $0.00015: over the budget once recorded.
    respond(&mut ws, &create("ws-model"), "response.completed").await;
    ws.send(Message::text(create("ws-model").to_string()))
        .await
        .unwrap();
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(
        reason.contains("budget") && reason.contains("spent"),
        "{reason}"
    );
    assert_eq!(
        mock.creates(),
        1,
        "the refused response.create never went upstream"
    );
    assert_eq!(proxy.stats_after(1).await["totals"]["requests"], 1);
    // /metrics counts the refused response as refused, under the session's model.
    let metrics = proxy.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("llm_meter_requests_total{")
                && l.contains("model=\"ws-model\"")
                && l.contains("outcome=\"refused\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn a_connection_cut_mid_response_is_recorded_partial_from_what_was_seen() {
    let mock = WsMock::start(Api::CutAfterDelta).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_persistent(&mock.url(), dir.path(), PRICES).await;
    let mut ws = open(proxy.addr, "/v1/responses", "sk-ws-cut-00000000000")
        .await
        .unwrap();
    ws.send(Message::text(create("ws-model").to_string()))
        .await
        .unwrap();
    let (code, _) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Error, "the upstream was lost");

    proxy.stats_after(1).await;
    let rows = common::json_lines(&proxy.get_text("/export?format=jsonl").await);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["partial"], true, "{row}");
    assert_eq!(row["error"], true, "{row}");
    assert_eq!(row["model"], "ws-model", "{row}");
    assert_eq!(row["response_id"], "resp_1", "{row}");
    assert_eq!(row["estimated"], true, "{row}");
    assert!(row["prompt_tokens"].as_u64().unwrap() > 0, "{row}");
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn an_unknown_key_is_refused_before_any_upgrade_with_a_json_error() {
    let mock = WsMock::start(Api::Responses).await;
    let toml = "require_known_keys = true\n[keys.agent]\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
    let proxy = Proxy::start_with(&mock.url(), toml).await;
    let refused = open(proxy.addr, "/v1/responses", "sk-ws-unknown-000000000")
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = refused else {
        panic!("not an HTTP refusal: {refused:?}");
    };
    assert_eq!(response.status(), 401);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(mock.heads.lock().is_empty(), "nothing reached the upstream");
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn a_message_over_the_cap_closes_both_sides_as_too_big() {
    let mock = WsMock::start(Api::Responses).await;
    let proxy = Proxy::start_with(&mock.url(), "websocket_max_message_bytes = 1024\n").await;
    let mut ws = open(proxy.addr, "/v1/responses", "sk-ws-big-00000000000")
        .await
        .unwrap();
    let mut big = create("ws-model");
    big["input"][0]["content"] = json!("x".repeat(2048));
    ws.send(Message::text(big.to_string())).await.unwrap();
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("websocket_max_message_bytes"), "{reason}");
    assert_eq!(mock.creates(), 0);
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let mock = WsMock::start(Api::Responses).await;
    let proxy = Proxy::start_with(&mock.url(), "websocket_idle_timeout = \"300ms\"\n").await;
    let mut ws = open(proxy.addr, "/v1/responses", "sk-ws-idle-0000000000")
        .await
        .unwrap();
    respond(&mut ws, &create("ws-model"), "response.completed").await;
    let started = std::time::Instant::now();
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Away);
    assert!(reason.contains("idle"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn an_open_websocket_is_closed_as_going_away_at_shutdown() {
    let mock = WsMock::start(Api::Responses).await;
    let proxy = Proxy::start_with(&mock.url(), "").await;
    let mut ws = open(proxy.addr, "/v1/responses", "sk-ws-stop-0000000000")
        .await
        .unwrap();
    respond(&mut ws, &create("ws-model"), "response.completed").await;
    #[expect(clippy::disallowed_methods, reason = "owned: awaited below")]
    let stopping = tokio::spawn(proxy.stop());
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Away);
    assert!(reason.contains("shutting down"), "{reason}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_meters_a_websocket_and_never_logs_its_key() {
    const SECRET: &str = "sk-ws-secret-never-logged-123456";
    let mock = WsMock::start(Api::Responses).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = binary_command(dir.path());
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &mock.url()])
        .env("RUST_LOG", "trace");
    let binary = Binary::start(command);
    let mut ws = open(binary.addr, "/v1/responses", SECRET).await.unwrap();
    respond(&mut ws, &create("gpt-4.1-mini"), "response.completed").await;
    ws.close(None).await.unwrap();
    let mut stats = Value::Null;
    for _ in 0..200 {
        stats = binary.get_json("/stats").await;
        if stats["totals"]["requests"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats["totals"]["prompt_tokens"], 100);
    assert_eq!(stats["totals"]["completion_tokens"], 30);
    let (ok, stdout, stderr) = binary.terminate();
    assert!(ok, "{stderr}");
    let logs = format!("{stdout}{stderr}");
    assert!(logs.contains("101"), "the upgrade is logged: {logs}");
    assert!(!logs.contains(SECRET), "the key leaked into the logs");
    assert!(
        !logs.contains(&SECRET[3..15]),
        "part of the key leaked into the logs"
    );
    mock.stop().await;
}

#[tokio::test]
async fn an_upstream_that_refuses_the_upgrade_is_answered_as_a_normal_response() {
    let mock = common::Mock::start(|_| {
        common::Reply::json(405, &json!({"error": {"message": "method not allowed"}}))
    })
    .await;
    let proxy = Proxy::start(&mock.url()).await;
    let refused = open(proxy.addr, "/v1/responses", "sk-ws-refused-00000000")
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = refused else {
        panic!("not an HTTP answer: {refused:?}");
    };
    assert_eq!(response.status(), 405);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["message"], "method not allowed");
    let received = mock.last();
    assert_eq!(received.method, "GET");
    assert_eq!(received.headers["upgrade"], "websocket");
    assert_eq!(
        proxy.stats_after(0).await["totals"]["requests"],
        0,
        "no response to meter"
    );
    proxy.stop().await;
}
