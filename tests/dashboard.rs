//! The dashboard at `/`: served with its security headers, behind the admin token, with no
//! other origin named; and, in headless Chromium driven over the DevTools protocol, drawn with
//! no console error, no request leaving loopback, and the totals `/stats` gives.

#![expect(
    clippy::unwrap_used,
    reason = "a failure in the test's own plumbing is a failed test"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{Mock, Proxy, Reply, chat_completion, chat_stream, key_id, openai_like};
use futures_util::{SinkExt, StreamExt};
use llm_meter::config::Flags;
use llm_meter::guard::period::ShiftedClock;
use serde_json::{Value, json};
use std::io::BufRead as _;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "dashboard-admin-token";
const AGENT_KEY: &str = "sk-agent-a-0000000000000000";
const OTHER_KEY: &str = "sk-other-1111111111111111";
/// Set to a path (relative to the crate) to keep a copy of the screenshot there.
const SCREENSHOT_ENV: &str = "LLM_METER_SCREENSHOT";
/// Set to skip the browser tests, with a note, where Chromium is not installed.
const SKIP_ENV: &str = "LLM_METER_SKIP_BROWSER_TESTS";

const CONFIG: &str = r#"
admin_token = "dashboard-admin-token"

[keys.agent-a]
key_env = "AGENT_A_KEY"
daily_usd = 0.02
monthly_usd = 8.0
tags = { team = "search" }

[budget]
daily_usd = 0.1
monthly_usd = 12.0
"#;

/// The mock's answers: OpenAI's, but with no usage when asked to `estimate`, and cut in the
/// middle of the stream when asked to `cut`.
fn upstream(request: &common::Received) -> Reply {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    match body["messages"][0]["content"].as_str() {
        Some("estimate") => {
            let mut reply = chat_completion(&model, "Hello there!", 11, 3);
            reply.as_object_mut().unwrap().remove("usage");
            Reply::json(200, &reply)
        }
        Some("cut") => Reply::Stream {
            chunks: chat_stream(&model, &["Hel", "lo"], Some((11, 2)))[..2]
                .iter()
                .map(|e| common::Chunk::now(e.clone()))
                .collect(),
            then_cut: true,
            then_hang: false,
        },
        Some(_) if body["stream"] == json!(false) => {
            Reply::json(200, &chat_completion(&model, "Hello there!", 2400, 600))
        }
        _ => openai_like(request),
    }
}

/// Rows of the 29 days before today, at noon UTC, oldest first (as the ledger takes them): three
/// models, two keys (one the named key's), costs that vary.
fn history() -> Vec<llm_meter::meter::ledger::Row> {
    use time::format_description::well_known::Rfc3339;
    let today = time::OffsetDateTime::now_utc().replace_time(time::macros::time!(12:00));
    let mut rows = Vec::new();
    for day in (1..=29_u64).rev() {
        let at = (today - time::Duration::days(day as i64))
            .format(&Rfc3339)
            .unwrap();
        let nano = |usd_cents: u64| usd_cents * 10_000_000;
        let mut named = common::ledger_row(
            &at,
            AGENT_KEY,
            "gpt-4o",
            (9000, 1500),
            nano(10 + day * 37 % 11 * 3),
        );
        named.key_label = "agent-a".into();
        rows.push(named);
        rows.push(common::ledger_row(
            &at,
            OTHER_KEY,
            "gpt-4o-mini",
            (40000, 8000),
            nano(2 + day * 17 % 7),
        ));
        if day.is_multiple_of(2) {
            rows.push(common::ledger_row(
                &at,
                OTHER_KEY,
                "claude-sonnet-4",
                (5000, 900),
                nano(day * 13 % 5 * 4),
            ));
        }
    }
    rows
}

async fn send(proxy: &Proxy, key: &str, model: &str, text: &str, headers: &[(&str, &str)]) {
    let stream = text == "cut";
    let mut request = proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let _ = response.bytes().await;
}

/// Traffic from two keys (one named, with budgets and a default tag), three models (one with no
/// price), a user, a tag, an estimated and a partial request; the named key's spend crosses
/// half its daily budget, which fires an alert.
async fn traffic(proxy: &Proxy) {
    let user = [("x-llm-meter-user", "alice")];
    let tagged = [("x-llm-meter-tags", "run=42")];
    let before = proxy.stats().await["totals"]["requests"].as_u64().unwrap();
    send(proxy, AGENT_KEY, "gpt-4o", "hi", &user).await;
    send(proxy, AGENT_KEY, "gpt-4o-mini", "hi", &[]).await;
    send(proxy, OTHER_KEY, "gpt-4o-mini", "hi", &tagged).await;
    send(proxy, OTHER_KEY, "gpt-4o-mini", "hi", &user).await;
    send(proxy, OTHER_KEY, "house-model", "hi", &[]).await;
    send(proxy, OTHER_KEY, "gpt-4o-mini", "estimate", &[]).await;
    send(proxy, OTHER_KEY, "gpt-4o-mini", "cut", &[]).await;
    proxy.stats_after(before + 7).await;
}

async fn start(data_dir: Option<&Path>, toml: &str, mock: &Mock) -> Proxy {
    let flags = Flags {
        upstream: Some(mock.url()),
        data_dir: data_dir.map(Path::to_owned),
        no_persist: data_dir.is_none(),
        ..Flags::default()
    };
    let env = [("AGENT_A_KEY", AGENT_KEY)];
    Proxy::start_guarded(toml, flags, &env, Arc::new(ShiftedClock::default())).await
}

#[tokio::test]
async fn the_page_and_its_files_carry_a_policy_that_allows_only_this_origin() {
    let mock = Mock::openai().await;
    let proxy = start(None, "", &mock).await;
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
        ("/dashboard/icon.svg", "image/svg+xml"),
    ] {
        let response = proxy.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        let header = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        for directive in [
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(directive), "{csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("http"),
            "{csp}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("cache-control"), "no-store");
        let text = response
            .text()
            .await
            .unwrap()
            .replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path} names another origin"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn the_page_follows_the_admin_token_rule_and_takes_it_as_a_basic_password() {
    let mock = Mock::openai().await;
    let proxy = start(None, CONFIG, &mock).await;
    let basic = |pair: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    for path in ["/", "/dashboard/app.js", "/stats"] {
        let status = |auth: Option<String>| {
            let mut request = proxy.client.get(proxy.url(path));
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            async move { request.send().await.unwrap() }
        };
        let refused = status(None).await;
        assert_eq!(refused.status(), 401, "{path}");
        assert_eq!(
            refused.headers()["www-authenticate"],
            "Basic realm=\"llm-meter\", charset=\"UTF-8\""
        );
        assert_eq!(
            status(Some(basic("admin:wrong"))).await.status(),
            401,
            "{path}"
        );
        assert_eq!(
            status(Some(format!("Bearer {TOKEN}"))).await.status(),
            200,
            "{path}"
        );
        assert_eq!(
            status(Some(basic(&format!("admin:{TOKEN}"))))
                .await
                .status(),
            200,
            "{path}"
        );
    }
    // Changes take the bearer form only: a browser adds Basic to requests other sites make.
    let reset = proxy
        .client
        .post(proxy.url("/stats/reset"))
        .header("authorization", basic(&format!("admin:{TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 401);
    proxy.stop().await;
}

#[tokio::test]
async fn usage_counts_partial_requests_and_groups_by_every_tag() {
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(Some(dir.path()), CONFIG, &mock).await;
    traffic(&proxy).await;
    let usage = proxy.get_json("/usage?group_by=day").await;
    assert_eq!(usage["totals"]["requests"], 7);
    assert_eq!(usage["totals"]["partial_requests"], 1, "{usage}");
    let tags = proxy.get_json("/usage?group_by=tag").await;
    let pairs: Vec<(String, u64)> = tags["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let tag = format!(
                "{}={}",
                r["tag"]["name"].as_str().unwrap(),
                r["tag"]["value"].as_str().unwrap()
            );
            (tag, r["requests"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        pairs,
        [("run=42".to_owned(), 1), ("team=search".to_owned(), 2)]
    );
    let one = proxy
        .get_json(&format!("/usage?group_by=tag&key={}", key_id(OTHER_KEY)))
        .await;
    assert_eq!(one["rows"].as_array().unwrap().len(), 1, "{one}");
    proxy.stop().await;
}

// --- Chromium, driven over the DevTools protocol -------------------------------------------

/// Chromium's path, or `None` (after a note) when it is missing and the skip variable is set.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os(SKIP_ENV).is_some(),
            "Chromium is not installed: the dashboard is tested in it (apt-get install chromium; .ci/run does), or set {SKIP_ENV}=1 to skip these tests"
        );
        eprintln!(
            "note: Chromium is not installed and {SKIP_ENV} is set: the browser test is skipped"
        );
    }
    found
}

/// A headless Chromium, killed (by its own pid) when dropped.
struct Browser {
    child: std::process::Child,
    devtools: String,
}

impl Browser {
    fn start(binary: &Path, profile: &Path) -> Self {
        let mut child = std::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Chromium says where DevTools listens on stderr; the thread keeps reading it so that
        // Chromium never blocks on a full pipe, and ends with it.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let devtools = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Chromium did not listen for DevTools within 30 s");
        Self { child, devtools }
    }

    /// The DevTools socket of the page Chromium opened.
    async fn page(&self) -> String {
        let port = self
            .devtools
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let list: Value = common::client()
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// One page's DevTools session: commands, and the events seen meanwhile.
struct Page {
    socket: Socket,
    next_id: u64,
    /// Sent as the Basic password when a response asks for credentials.
    password: Option<String>,
    requests: Vec<String>,
    errors: Vec<String>,
}

impl Page {
    async fn open(browser: &Browser, password: Option<&str>) -> Self {
        let url = browser.page().await;
        let host = url.split('/').nth(2).unwrap().to_owned();
        let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        let mut page = Self {
            socket,
            next_id: 0,
            password: password.map(str::to_owned),
            requests: Vec::new(),
            errors: Vec::new(),
        };
        for domain in ["Network", "Runtime", "Log", "Page"] {
            page.call(&format!("{domain}.enable"), json!({})).await;
        }
        let fetch = json!({"handleAuthRequests": true, "patterns": [{"urlPattern": "*"}]});
        page.call("Fetch.enable", fetch).await;
        page
    }

    /// Sends a command and answers events until its result comes.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .unwrap()
                .unwrap();
            let Ok(text) = message.to_text() else {
                continue;
            };
            let message: Value = serde_json::from_str(text).unwrap();
            if message["id"] == id {
                assert!(message["error"].is_null(), "{method}: {message}");
                return message["result"].clone();
            }
            self.event(&message).await;
        }
    }

    async fn event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str().unwrap_or_default() {
            "Network.requestWillBeSent" => {
                self.requests
                    .push(params["request"]["url"].as_str().unwrap().to_owned());
            }
            "Fetch.requestPaused" => {
                let reply = json!({"id": 0, "method": "Fetch.continueRequest", "params": {"requestId": params["requestId"]}});
                self.socket
                    .send(Message::text(reply.to_string()))
                    .await
                    .unwrap();
            }
            "Fetch.authRequired" => {
                let answer = match &self.password {
                    Some(password) => {
                        json!({"response": "ProvideCredentials", "username": "admin", "password": password})
                    }
                    None => json!({"response": "CancelAuth"}),
                };
                let reply = json!({"id": 0, "method": "Fetch.continueWithAuth", "params": {"requestId": params["requestId"], "authChallengeResponse": answer}});
                self.socket
                    .send(Message::text(reply.to_string()))
                    .await
                    .unwrap();
            }
            "Runtime.consoleAPICalled" if params["type"] == "error" => {
                self.errors.push(format!("console: {}", params["args"]));
            }
            "Runtime.exceptionThrown" => {
                self.errors
                    .push(format!("exception: {}", params["exceptionDetails"]));
            }
            "Log.entryAdded" if params["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", params["entry"]));
            }
            "Network.loadingFailed" => {
                self.errors.push(format!("request failed: {params}"));
            }
            _ => {}
        }
    }

    /// The value of a script expression.
    async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let result = self.call("Runtime.evaluate", params).await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Loads `url` at `width` CSS pixels and waits until the script has drawn it once.
    async fn load(&mut self, url: &str, width: u32) {
        let metrics =
            json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600});
        self.call("Emulation.setDeviceMetricsOverride", metrics)
            .await;
        self.call("Page.navigate", json!({"url": url})).await;
        for _ in 0..200 {
            if self
                .eval("document.body && document.body.dataset.loaded === 'true'")
                .await
                == true
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = self
            .eval("document.getElementById('status')?.textContent")
            .await;
        panic!(
            "the dashboard did not load: {status}; errors: {:?}",
            self.errors
        );
    }

    /// Chooses the selector's option labelled `label`, and waits for the page to be redrawn.
    async fn choose_scope(&mut self, label: &str) {
        let choose = format!(
            "(() => {{ const s = document.getElementById('scope');
              const o = [...s.options].find((o) => o.textContent === {label:?});
              if (!o) return false;
              document.body.dataset.loaded = '';
              s.value = o.value; s.dispatchEvent(new Event('change')); return true; }})()"
        );
        assert_eq!(self.eval(&choose).await, true, "no option {label}");
        for _ in 0..200 {
            if self.eval("document.body.dataset.loaded === 'true'").await == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the dashboard was not redrawn for {label}");
    }

    /// A PNG of the whole page, written to `path`.
    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Fails on any console error, or any request to another place than `origin`.
    fn assert_clean(&self, origin: &str) {
        assert!(self.errors.is_empty(), "console errors: {:#?}", self.errors);
        let away: Vec<_> = self
            .requests
            .iter()
            .filter(|url| !url.starts_with(origin) && *url != "about:blank")
            .collect();
        assert!(away.is_empty(), "requests leaving {origin}: {away:?}");
    }
}

/// What the page shows, read from its DOM.
const SHOWN: &str = "(() => {
  const text = (id) => document.getElementById(id).textContent;
  const rows = (id) => document.querySelectorAll('#' + id + ' td.name').length;
  return {
    cost: document.getElementById('total-cost').dataset.usd, cost_text: text('total-cost'),
    requests: text('total-requests'), tokens: text('total-tokens'), errors: text('total-errors'),
    unpriced: text('unpriced'), estimated: text('estimated'), partial: text('partial'),
    keys: rows('top-keys'), models: rows('top-models'), users: rows('top-users'), tags: rows('top-tags'),
    budgets: document.querySelectorAll('#budgets .budget').length,
    alerts: document.querySelectorAll('#alerts li:not(.empty)').length,
    bars: document.querySelectorAll('#chart rect').length,
    scopes: [...document.querySelectorAll('#scope option')].map((o) => o.textContent),
    note: document.getElementById('chart-note').hidden ? '' : text('chart-note'),
    overflow: document.documentElement.scrollWidth > window.innerWidth,
  };
})()";

/// A count as the page writes it: digits in groups of three (`1,794,120`).
fn count(value: &Value) -> String {
    let digits = value.as_u64().unwrap().to_string();
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_stats_in_chromium_with_no_error_and_no_request_off_loopback() {
    let Some(binary) = chromium() else { return };
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    common::write_ledger(&dir.path().join("data"), history());
    let proxy = start(Some(&dir.path().join("data")), CONFIG, &mock).await;
    traffic(&proxy).await;
    let browser = Browser::start(&binary, &dir.path().join("profile"));
    let mut page = Page::open(&browser, Some(TOKEN)).await;
    let origin = proxy.url("/");
    page.load(&origin, 1200).await;
    let shown = page.eval(SHOWN).await;
    let stats = proxy.stats().await;
    let totals = &stats["totals"];
    assert_eq!(
        shown["cost"].as_str().unwrap().parse::<f64>().unwrap(),
        totals["cost_usd"].as_f64().unwrap()
    );
    assert_eq!(shown["requests"], count(&totals["requests"]));
    assert_eq!(shown["tokens"], count(&totals["total_tokens"]));
    assert_eq!(shown["errors"], count(&totals["errors"]));
    assert_eq!(shown["unpriced"], count(&totals["unpriced_requests"]));
    assert_eq!(shown["estimated"], count(&totals["estimated_requests"]));
    // The cut stream is partial, and (having sent no usage) estimated too.
    assert_eq!(
        (shown["unpriced"].as_str(), shown["partial"].as_str()),
        (Some("1"), Some("1"))
    );
    assert_eq!(shown["estimated"], "2");
    assert_eq!(
        (shown["keys"].as_u64(), shown["models"].as_u64()),
        (Some(2), Some(4)),
        "{shown}"
    );
    assert_eq!(
        (shown["users"].as_u64(), shown["tags"].as_u64()),
        (Some(1), Some(2)),
        "{shown}"
    );
    assert_eq!(
        shown["budgets"], 4,
        "global and agent-a, daily and monthly: {shown}"
    );
    assert!(shown["alerts"].as_u64().unwrap() >= 1, "{shown}");
    // History: gpt-4o and gpt-4o-mini each day, claude-sonnet-4 every other day (two at $0);
    // today: gpt-4o and gpt-4o-mini (house-model has no price).
    assert_eq!(shown["bars"], 29 + 29 + 12 + 2, "{shown}");
    assert_eq!(shown["note"], "");
    let scopes = shown["scopes"].to_string();
    for scope in ["user alice", "tag team=search", "tag run=42"] {
        assert!(scopes.contains(scope), "{scopes}");
    }
    assert_eq!(shown["overflow"], false);
    let shot = dir.path().join("dashboard.png");
    page.screenshot(&shot).await;
    if let Some(copy) = std::env::var_os(SCREENSHOT_ENV) {
        std::fs::copy(&shot, Path::new(env!("CARGO_MANIFEST_DIR")).join(copy)).unwrap();
    }
    // The selector narrows the chart: alice's two requests of today, one per model.
    page.choose_scope("user alice").await;
    assert_eq!(page.eval(SHOWN).await["bars"], 2);
    page.choose_scope("tag run=42").await;
    assert_eq!(page.eval(SHOWN).await["bars"], 1);
    // A phone's width: nothing wider than the screen.
    page.load(&origin, 390).await;
    assert_eq!(page.eval(SHOWN).await["overflow"], false);
    page.screenshot(&dir.path().join("dashboard-phone.png"))
        .await;
    page.assert_clean(&origin);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ledger_the_dashboard_shows_the_totals_and_says_history_needs_one() {
    let Some(binary) = chromium() else { return };
    let mock = Mock::start(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(None, "", &mock).await;
    send(&proxy, OTHER_KEY, "gpt-4o-mini", "hi", &[]).await;
    proxy.stats_after(1).await;
    let browser = Browser::start(&binary, &dir.path().join("profile"));
    let mut page = Page::open(&browser, None).await;
    let origin = proxy.url("/");
    page.load(&origin, 1200).await;
    let shown = page.eval(SHOWN).await;
    assert_eq!(shown["requests"], "1");
    assert_eq!(shown["partial"], "needs the ledger");
    assert!(
        shown["note"]
            .as_str()
            .unwrap()
            .contains("History needs the ledger"),
        "{shown}"
    );
    page.assert_clean(&origin);
    proxy.stop().await;
}

#[tokio::test]
async fn the_binary_serves_the_dashboard_and_its_files_from_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = common::binary_command(dir.path());
    command.args(["--listen", "127.0.0.1:0"]);
    let binary = common::Binary::start(command);
    let client = common::client();
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let response = client.get(binary.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        let content_type = headers["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(headers.contains_key("content-security-policy"), "{path}");
        assert!(
            !response.text().await.unwrap().contains("https://"),
            "{path}"
        );
    }
}
