//! The proxy in process, on ephemeral loopback ports, and the requests tests send it.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use llm_meter::AppState;
use llm_meter::config::{Config, Flags};
use llm_meter::guard::period::ShiftedClock;
use llm_meter::server::{Listeners, run_with};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

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

/// Reads a whole SSE response and returns its events' data payloads.
pub async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}
