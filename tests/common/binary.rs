//! The built `llm-meter` binary, run as a child process.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;

use super::proxy::client;

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
    // The machine's own proxies and certificate files are not the test's.
    for name in [
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        // Nor is the machine's OpenTelemetry collector.
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        command.env_remove(name);
    }
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LLM_METER_") {
            command.env_remove(name);
        }
    }
    command.env("LLM_METER_DATA_DIR", dir.join("data"));
    command
}

/// Runs the binary in `dir` with `args` to its end: (exit success, stdout, stderr).
pub fn run_to_end(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = binary_command(dir).args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
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

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
