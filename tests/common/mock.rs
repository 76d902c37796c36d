//! The mock upstream: a scripted HTTP server on an ephemeral loopback port that records what it received.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

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
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use super::fixtures::{chat_completion, chat_stream};

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
