//! The mock upstream: a scripted HTTP server on an ephemeral loopback port that records what it received.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::any::Any;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinError, JoinSet};

use super::fixtures::{chat_completion, chat_stream};

/// What the mock upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    /// HTTP/1.1 or HTTP/2, as the request arrived.
    pub version: http::Version,
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

/// A mock upstream on an ephemeral port, served by a thread of its own until dropped.
///
/// Dropping it joins that thread and re-raises in the test a panic of the mock's (its script's
/// or its serving code's), so the test fails with it. The mock runs its own runtime because
/// `Drop` cannot await: a test on a current-thread runtime could not run the mock's tasks while
/// its thread waits in `drop`, and a thread can be joined from anywhere.
pub struct Mock {
    pub addr: SocketAddr,
    is_tls: bool,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    /// Dropped to stop the server.
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    /// Starts a mock that behaves like OpenAI's chat completions API.
    pub async fn openai() -> Self {
        Self::start(openai_like).await
    }

    /// Starts a mock that answers each request as `script` says.
    pub async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on(script, None, false).await
    }

    /// Starts a mock behind TLS with `tls`'s certificate, speaking what its ALPN offers
    /// (HTTP/2 or HTTP/1.1); its URL names `localhost`.
    pub async fn start_tls(
        script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self::start_on(script, Some(tokio_rustls::TlsAcceptor::from(tls)), true).await
    }

    /// Starts a plain-text mock that also takes HTTP/2 with prior knowledge.
    pub async fn start_h2c(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on(script, None, true).await
    }

    async fn start_on(
        script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
        http2: bool,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let is_tls = tls.is_some();
        let server = Server {
            tls,
            http2,
            script: Arc::new(script),
            received: Arc::new(Mutex::new(Vec::new())),
            connections: Arc::new(AtomicUsize::new(0)),
        };
        let (received, connections) = (
            Arc::clone(&server.received),
            Arc::clone(&server.connections),
        );
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("mock upstream {addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(server.run(listener, stop));
            })
            .unwrap();
        Self {
            addr,
            is_tls,
            received,
            connections,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The upstream base URL, written as clients write it.
    pub fn url(&self) -> String {
        if self.is_tls {
            format!("https://localhost:{}/v1", self.addr.port())
        } else {
            format!("http://{}/v1", self.addr)
        }
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

impl Drop for Mock {
    /// Stops the server and joins its thread, re-raising its panic. Not while the test is
    /// failing already: a second panic would abort, and the mock's was printed when it happened.
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take()
            && let Err(panic) = thread.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

/// What serves the mock's connections, shared by them.
#[derive(Clone)]
struct Server {
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether HTTP/2 is served too (else HTTP/1.1 only, with hyper's own HTTP/1 server).
    http2: bool,
    script: Script,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    /// Serves until `stop` fires or its sender is dropped, then cancels the connections still
    /// open. Each connection is a task of its own, owned here; the first of them to panic has its
    /// panic re-raised at the end (the others keep being served meanwhile).
    async fn run(self, listener: std::net::TcpListener, mut stop: oneshot::Receiver<()>) {
        let listener = TcpListener::from_std(listener).unwrap();
        let mut tasks = JoinSet::new();
        let mut panic = None;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(done) = tasks.join_next() => keep_panic(&mut panic, done),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        self.connections.fetch_add(1, Ordering::SeqCst);
                        tasks.spawn(self.clone().serve_connection(stream));
                    }
                    // A connection reset before it was taken, or no file descriptor left: as
                    // axum::serve does, wait a moment and go on.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
        tasks.abort_all();
        while let Some(done) = tasks.join_next().await {
            keep_panic(&mut panic, done);
        }
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }

    async fn serve_connection(self, stream: TcpStream) {
        let (tls, http2) = (self.tls.clone(), self.http2);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let server = self.clone();
            async move {
                let response = serve(request.map(Body::new), &server.script, &server.received);
                Ok::<_, Infallible>(response.await)
            }
        });
        // A connection that fails (a stream the mock cuts, a client that leaves) is part of a
        // test, not a failure of the mock. Both protocols are served: HTTP/2 where TLS's ALPN
        // chose it, or on a plain connection that opens with its preface.
        if !http2 {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            return;
        }
        let auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        match tls {
            Some(tls) => {
                let Ok(stream) = tls.accept(stream).await else {
                    return;
                };
                let _ = auto.serve_connection(TokioIo::new(stream), service).await;
            }
            None => {
                let _ = auto.serve_connection(TokioIo::new(stream), service).await;
            }
        }
    }
}

/// Keeps the first panic among finished connections; a cancelled one is no failure.
fn keep_panic(first: &mut Option<Box<dyn Any + Send>>, done: Result<(), JoinError>) {
    if let Err(err) = done
        && err.is_panic()
        && first.is_none()
    {
        *first = Some(err.into_panic());
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
        version: parts.version,
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
