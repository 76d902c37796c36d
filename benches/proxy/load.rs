//! The benchmark's load driver: keep-alive HTTP/1.1 connections, closed-loop or fixed-rate, with answer checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

/// One request shape.
#[derive(Clone)]
pub struct Shape {
    pub body: Bytes,
    pub is_stream: bool,
}

/// How load is applied.
#[derive(Clone, Copy)]
pub enum Mode {
    /// `concurrency` connections, each sending its next request as soon as the last one ended.
    Closed { concurrency: usize },
    /// Requests started at a fixed rate, whatever the latency (no coordinated omission).
    Rate { per_second: u32 },
}

/// What to measure per request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Until the whole response has arrived.
    Total,
    /// Until the first byte of the body.
    FirstByte,
}

/// The outcome of one round.
#[derive(Debug, Default)]
pub struct Round {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Round {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        f64::from(self.latencies_us[rank]) / 1000.0
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the target");
    tcp.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// Sends one request; returns the latency from `start` and whether the answer was right.
async fn exchange(
    sender: &mut Sender,
    shape: &Shape,
    start: Instant,
    measure: Measure,
) -> (Duration, bool) {
    let request = Request::post("/v1/chat/completions")
        .header(header::HOST, "bench")
        .header(
            header::AUTHORIZATION,
            "Bearer sk-bench-0123456789abcdefghijklmnop",
        )
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(shape.body.clone()))
        .expect("request");
    if sender.ready().await.is_err() {
        return (start.elapsed(), false);
    }
    let Ok(response) = sender.send_request(request).await else {
        return (start.elapsed(), false);
    };
    let ok_status = response.status() == 200;
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut first_byte = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (start.elapsed(), false);
        };
        if let Ok(data) = frame.into_data() {
            if first_byte.is_none() && !data.is_empty() {
                first_byte = Some(start.elapsed());
            }
            bytes.extend_from_slice(&data);
        }
    }
    let total = start.elapsed();
    let ok = ok_status && answer_is_right(&bytes, shape.is_stream);
    let latency = match measure {
        Measure::Total => total,
        Measure::FirstByte => first_byte.unwrap_or(total),
    };
    (latency, ok)
}

/// Plain: a usage object. Stream: every chunk and [DONE], and no usage-only chunk the client did not ask for.
fn answer_is_right(body: &[u8], is_stream: bool) -> bool {
    let has = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
    if is_stream {
        body.ends_with(b"data: [DONE]\n\n") && !has(b"\"choices\":[]") && has(b"token19")
    } else {
        has(b"\"usage\":{\"prompt_tokens\":")
    }
}

/// Runs one round against `addr` for `duration`.
pub async fn round(
    addr: SocketAddr,
    shape: &Shape,
    mode: Mode,
    measure: Measure,
    duration: Duration,
) -> Round {
    match mode {
        Mode::Closed { concurrency } => closed(addr, shape, concurrency, measure, duration).await,
        Mode::Rate { per_second } => interleaved(&[addr], shape, per_second, measure, duration)
            .await
            .pop()
            .unwrap_or_default(),
    }
}

async fn closed(
    addr: SocketAddr,
    shape: &Shape,
    concurrency: usize,
    measure: Measure,
    duration: Duration,
) -> Round {
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        senders.push(connect(addr).await);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let shape = shape.clone();
        tasks.spawn(async move {
            let mut round = Round::default();
            while Instant::now() < deadline {
                let (latency, ok) = exchange(&mut sender, &shape, Instant::now(), measure).await;
                if ok {
                    round.ok += 1;
                    round.latencies_us.push(micros(latency));
                } else {
                    round.failed += 1;
                }
            }
            round
        });
    }
    let mut total = Round::default();
    while let Some(part) = tasks.join_next().await {
        let part = part.expect("load task");
        total.ok += part.ok;
        total.failed += part.failed;
        total.latencies_us.extend(part.latencies_us);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    total
}

/// One fixed-rate round against every target in `addrs` at once: each gets `per_second`
/// requests a second, the targets' schedules offset evenly within the interval so that their
/// requests take turns instead of coinciding. Each target's latencies come from the same
/// seconds as the others', so a shared machine's drift between rounds cannot favour one.
pub async fn interleaved(
    addrs: &[SocketAddr],
    shape: &Shape,
    per_second: u32,
    measure: Measure,
    duration: Duration,
) -> Vec<Round> {
    let mut targets = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let idle: Arc<Mutex<Vec<Sender>>> = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..4 {
            let sender = connect(addr).await;
            idle.lock().push(sender);
        }
        targets.push((addr, idle, Arc::new(Mutex::new(Round::default()))));
    }
    let interval = Duration::from_secs_f64(1.0 / f64::from(per_second));
    let count = (duration.as_secs_f64() * f64::from(per_second)) as u32;
    let turns = targets.len() as u32;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        for (turn, (addr, idle, results)) in (0..turns).zip(&targets) {
            let due = started + interval * i + interval * turn / turns;
            tokio::time::sleep_until(due.into()).await;
            let (addr, idle, results, shape) =
                (*addr, Arc::clone(idle), Arc::clone(results), shape.clone());
            tasks.spawn(async move {
                let pooled = idle.lock().pop();
                let mut sender = match pooled {
                    Some(sender) => sender,
                    None => connect(addr).await,
                };
                // Each request is its own task, so a slow answer never delays the next start; the
                // clock starts when the request starts (the timer wakes up to 1 ms after it was due).
                let (latency, ok) = exchange(&mut sender, &shape, Instant::now(), measure).await;
                idle.lock().push(sender);
                let mut results = results.lock();
                if ok {
                    results.ok += 1;
                    results.latencies_us.push(micros(latency));
                } else {
                    results.failed += 1;
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    targets
        .into_iter()
        .map(|(_, _, results)| {
            let mut round = std::mem::take(&mut *results.lock());
            round.elapsed = elapsed;
            round.latencies_us.sort_unstable();
            round
        })
        .collect()
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// GETs a JSON document (the proxy's /stats).
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut sender = connect(addr).await;
    let request = Request::get(path)
        .header(header::HOST, "bench")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("stats answer");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("stats body")
        .to_bytes();
    serde_json::from_slice(&body).expect("stats JSON")
}
