//! Test harness: a scriptable mock upstream and the proxy, each on an ephemeral loopback port, in process.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use llm_meter::AppState;
use llm_meter::config::{Config, Flags};
use llm_meter::guard::period::ShiftedClock;
use llm_meter::server::{Listeners, run_with};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

/// What the mock upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// One piece of a streamed reply.
#[derive(Clone)]
pub struct Chunk {
    pub bytes: Bytes,
    pub delay: Duration,
    /// Waits for this before sending.
    pub gate: Option<Arc<Notify>>,
}

impl Chunk {
    pub fn now(bytes: impl Into<Bytes>) -> Self {
        Self {
            bytes: bytes.into(),
            delay: Duration::ZERO,
            gate: None,
        }
    }
}

/// How the mock answers one request.
pub enum Reply {
    Full {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    Stream {
        chunks: Vec<Chunk>,
        /// After the chunks, cut the connection instead of ending the body.
        then_cut: bool,
        /// After the chunks, go silent forever.
        then_hang: bool,
    },
    /// Never answer.
    Hang,
}

impl Reply {
    pub fn json(status: u16, body: &Value) -> Self {
        Self::Full {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    pub fn sse(events: &[String]) -> Self {
        Self::Stream {
            chunks: events.iter().map(|e| Chunk::now(e.clone())).collect(),
            then_cut: false,
            then_hang: false,
        }
    }
}

type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A mock upstream on an ephemeral port.
pub struct Mock {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    _shutdown: oneshot::Sender<()>,
}

impl Mock {
    /// Starts a mock that behaves like OpenAI's chat completions API.
    pub async fn openai() -> Self {
        Self::start(openai_like).await
    }

    pub async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = Arc::clone(&connections);
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let log = Arc::clone(&received);
        let app = axum::Router::new().fallback(move |request: Request| {
            let script = Arc::clone(&script);
            let log = Arc::clone(&log);
            async move { serve(request, &script, &log).await }
        });
        let (tx, rx) = oneshot::channel::<()>();
        #[expect(
            clippy::disallowed_methods,
            reason = "the mock lives until its Mock is dropped, which closes the shutdown channel"
        )]
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            received,
            connections,
            _shutdown: tx,
        }
    }

    /// The upstream base URL, written as clients write it.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .last()
            .cloned()
            .expect("the mock received a request")
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(request: Request, script: &Script, log: &Mutex<Vec<Received>>) -> Response {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let reply = script(&received);
    log.lock().push(received);
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut response = Response::builder().status(status);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response.body(Body::from(body)).unwrap()
        }
        Reply::Stream {
            chunks,
            then_cut,
            then_hang,
        } => {
            let stream = futures_util::stream::iter(chunks)
                .then(|chunk| async move {
                    if let Some(gate) = &chunk.gate {
                        gate.notified().await;
                    }
                    if !chunk.delay.is_zero() {
                        tokio::time::sleep(chunk.delay).await;
                    }
                    Ok::<Bytes, std::io::Error>(chunk.bytes)
                })
                .chain(futures_util::stream::once(async move {
                    if then_hang {
                        std::future::pending::<()>().await;
                    }
                    if then_cut {
                        // Let the head and the chunks leave before the connection is cut.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(std::io::Error::other("mock cut the connection"))
                    } else {
                        Ok(Bytes::new())
                    }
                }));
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .header("x-mock", "stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Reply::Hang => std::future::pending().await,
    }
}

/// Behaves like OpenAI: JSON for plain requests; SSE for `stream: true`, with a usage chunk only
/// when `stream_options.include_usage` is true. Usage: prompt = 10 + message count, completion = 3.
pub fn openai_like(request: &Received) -> Reply {
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return Reply::json(400, &json!({"error": {"message": "bad json"}}));
    };
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let prompt = 10 + body["messages"].as_array().map_or(0, Vec::len) as u64;
    if body["stream"] == json!(true) {
        let with_usage = body["stream_options"]["include_usage"] == json!(true);
        Reply::sse(&chat_stream(
            &model,
            &["Hello", " there", "!"],
            with_usage.then_some((prompt, 3)),
        ))
    } else {
        Reply::json(200, &chat_completion(&model, "Hello there!", prompt, 3))
    }
}

/// A chat.completion body.
pub fn chat_completion(model: &str, text: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
    })
}

/// SSE events of a chat stream, as OpenAI sends them, ending with `[DONE]`.
pub fn chat_stream(model: &str, words: &[&str], usage: Option<(u64, u64)>) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if usage.is_some() {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        words
            .iter()
            .map(|w| chunk(json!({"content": w}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if let Some((prompt, completion)) = usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
        events.push(format!("data: {u}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// How the proxy's listeners are set up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Listening {
    /// Our own endpoints on a port of their own (`admin_listen`).
    pub admin_port: bool,
    /// Every connection taken as coming from this address.
    pub peer_as: Option<SocketAddr>,
}

/// The proxy, in process, on an ephemeral port.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The port of our own endpoints, when they have one.
    pub admin_addr: Option<SocketAddr>,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Self {
        Self::start_with(upstream, "").await
    }

    /// Starts with `toml` as the contents of proxy.toml, in memory only (no ledger).
    pub async fn start_with(upstream: &str, toml: &str) -> Self {
        Self::start_flags(
            toml,
            Flags {
                upstream: Some(upstream.into()),
                no_persist: true,
                ..Flags::default()
            },
        )
        .await
    }

    /// Starts with its ledger in `data_dir`.
    pub async fn start_persistent(upstream: &str, data_dir: &std::path::Path, toml: &str) -> Self {
        Self::start_flags(
            toml,
            Flags {
                upstream: Some(upstream.into()),
                data_dir: Some(data_dir.to_owned()),
                ..Flags::default()
            },
        )
        .await
    }

    async fn start_flags(toml: &str, flags: Flags) -> Self {
        Self::start_guarded(toml, flags, &[], Arc::new(ShiftedClock::default())).await
    }

    /// Starts with `toml`, these flags, these environment variables (for `key_env`) and a
    /// clock the test can move (budget periods, rate windows).
    pub async fn start_guarded(
        toml: &str,
        flags: Flags,
        env: &[(&str, &str)],
        clock: Arc<ShiftedClock>,
    ) -> Self {
        Self::start_listening(toml, flags, env, clock, Listening::default()).await
    }

    /// Starts on listeners set up as `listening` says.
    pub async fn start_listening(
        toml: &str,
        flags: Flags,
        env: &[(&str, &str)],
        clock: Arc<ShiftedClock>,
        listening: Listening,
    ) -> Self {
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            ..flags
        };
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let config = Config::from_layers(Some(toml), None, &env, &flags).unwrap();
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = if listening.admin_port {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let state = AppState::with_clock(config, clock).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = Listeners {
            main: listener,
            admin,
            peer_as: listening.peer_as,
        };
        #[expect(
            clippy::disallowed_methods,
            reason = "owned: the handle is awaited in stop()"
        )]
        let task = tokio::spawn(run_with(listeners, state.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin_addr,
            state,
            client: client(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs a chat completion with a bearer key.
    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs a chat completion and reads the whole answer.
    pub async fn chat_through(&self, key: &str, body: &Value) -> Bytes {
        self.chat(key, body).await.bytes().await.unwrap()
    }

    /// A GET of one of the proxy's own paths, with the admin token when one is configured.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.get(self.url(path));
        match &self.state.config.admin_token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// GETs one of the proxy's paths as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).send().await.unwrap().text().await.unwrap()
    }

    /// GETs one of the proxy's paths as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).send().await.unwrap().json().await.unwrap()
    }

    pub async fn stats(&self) -> Value {
        self.get_json("/stats").await
    }

    /// POSTs `/stats/reset` (no admin token) and returns the closed period's totals.
    pub async fn reset(&self) -> Value {
        self.client
            .post(self.url("/stats/reset"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls /stats until `totals.requests` reaches `n` (recording happens as the body ends,
    /// which can be a moment after the client has every byte).
    pub async fn stats_after(&self, n: u64) -> Value {
        for _ in 0..500 {
            let stats = self.stats().await;
            if stats["totals"]["requests"].as_u64() >= Some(n) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("stats never reached {n} requests: {}", self.stats().await);
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        // As the binary does after `run`: write out the ledger and release it.
        self.state.meter.close();
    }

    /// The entry for a model under the key whose label ends with `suffix`.
    pub fn model_of<'a>(stats: &'a Value, key_id: &str, model: &str) -> &'a Value {
        let key = stats["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == key_id)
            .unwrap_or_else(|| panic!("no key {key_id} in {stats}"));
        &key["models"][model]
    }
}

/// A client that never goes through a system proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The stable id llm-meter gives a key.
pub fn key_id(key: &str) -> String {
    llm_meter::key::Identity::from_key(key.as_bytes()).id
}

/// A chat request body.
pub fn chat_request(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// Reads a whole SSE response and returns its events' data payloads.
pub async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}

/// The built `llm-meter` binary, running as a child process.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// The startup line.
    pub banner: String,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    stderr: Arc<Mutex<String>>,
}

/// A command for the built binary, run in `dir` (so no proxy.toml of the repo is picked up),
/// with its ledger in `dir/data` (never the user's own).
pub fn binary_command(dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_llm-meter"));
    command.current_dir(dir).env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LLM_METER_") {
            command.env_remove(name);
        }
    }
    command.env("LLM_METER_DATA_DIR", dir.join("data"));
    command
}

impl Binary {
    /// POSTs a chat completion with a bearer key and reads the whole answer.
    pub async fn chat_through(&self, key: &str, body: &Value) -> Bytes {
        client()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    /// GETs one of its paths as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Starts the binary and waits for its startup line.
    pub fn start(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut err_pipe = std::io::BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while err_pipe.read_line(&mut line).unwrap_or(0) > 0 {
                sink.lock().push_str(&line);
                line.clear();
            }
        });
        let mut banner = String::new();
        stdout.read_line(&mut banner).unwrap();
        let addr = banner
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no address in startup line {banner:?}; stderr: {}",
                    stderr.lock()
                )
            });
        Self {
            child,
            addr,
            banner,
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, waits for the exit, and returns (exit success, rest of stdout, all of stderr).
    pub fn terminate(mut self) -> (bool, String, String) {
        use std::io::Read;
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        // Give the stderr thread a moment to drain the pipe.
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().clone();
        (status.success(), rest, stderr)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ledger row recorded at `at` (RFC 3339) for `key` and `model`, 200 OK, not streamed.
pub fn ledger_row(
    at: &str,
    key: &str,
    model: &str,
    tokens: (u64, u64),
    cost_nano_usd: u64,
) -> llm_meter::meter::ledger::Row {
    use time::format_description::well_known::Rfc3339;
    let identity = llm_meter::key::Identity::from_key(key.as_bytes());
    llm_meter::meter::ledger::Row {
        at: time::OffsetDateTime::parse(at, &Rfc3339).unwrap(),
        period: 1,
        key_id: identity.id,
        key_label: identity.label,
        model: model.to_owned(),
        upstream: "openai".into(),
        flavor: "openai_chat".into(),
        status: 200,
        is_streaming: false,
        usage: llm_meter::usage::Usage {
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            ..llm_meter::usage::Usage::default()
        },
        cost: llm_meter::meter::pricing::NanoUsd(cost_nano_usd),
        latency: Some(Duration::from_micros(1500)),
        response_id: Some("chatcmpl-test".to_owned()),
        is_error: false,
        is_unpriced: false,
        is_estimated: false,
        is_partial: false,
    }
}

/// Writes `rows` to the ledger in `dir` as a server would, and closes it.
pub fn write_ledger(
    dir: &std::path::Path,
    rows: impl IntoIterator<Item = llm_meter::meter::ledger::Row>,
) {
    use llm_meter::meter::ledger::{Ledger, Options};
    let (ledger, _) = Ledger::open(&Options {
        dir: dir.to_owned(),
        flush_interval: Duration::from_millis(10),
        max_pending_rows: usize::MAX,
    })
    .unwrap();
    for row in rows {
        ledger.append(&row.borrowed());
    }
    ledger.close();
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Parses JSON lines (an export, a JSON log).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The stats JSON without the parts that describe the ledger's own progress, for comparing
/// totals across restarts.
pub fn totals_of(mut stats: Value) -> Value {
    stats.as_object_mut().unwrap().remove("ledger");
    stats
}
