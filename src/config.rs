//! Configuration: file, environment and flag layers merged into one validated `Config`; errors name the field.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::guard::{self, Budget, KeySettings};
use crate::meter::ledger;
use crate::meter::pricing::NanoUsd;
use crate::meter::pricing::{Price, PriceTable};

/// Default listen address: loopback only, so a key-carrying proxy is not exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default upstream, written as clients write it (`/v1` included).
pub const DEFAULT_UPSTREAM: &str = "https://api.openai.com/v1";
/// Default Anthropic upstream, mounted at `/anthropic/v1`.
pub const DEFAULT_ANTHROPIC_UPSTREAM: &str = "https://api.anthropic.com/v1";
/// Name of the built-in upstream behind `/v1` (its URL is the `upstream` setting).
pub const OPENAI: &str = "openai";
/// Name of the built-in upstream behind `/anthropic/v1`.
pub const ANTHROPIC: &str = "anthropic";
/// Our own endpoints: no upstream prefix may shadow them.
const RESERVED_PATHS: [&str; 6] = [
    "/stats", "/usage", "/export", "/healthz", "/admin", "/alerts",
];
/// Most threads one instance may run.
pub const MAX_THREADS: usize = 256;
/// Most worker threads started by default: one already serves tens of thousands of requests per
/// second, and every worker keeps its own upstream connections.
pub const DEFAULT_MAX_THREADS: usize = 4;
/// The file read when it exists in the working directory and no other is named.
pub const DEFAULT_CONFIG_FILE: &str = "proxy.toml";
/// Default request body limit: 32 MiB holds any realistic prompt, images included.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// Environment variable names, defined once.
pub mod env {
    /// Path of the config file.
    pub const CONFIG: &str = "LLM_METER_CONFIG";
    /// Listen address.
    pub const LISTEN: &str = "LLM_METER_LISTEN";
    /// Listen address of our own endpoints, when they have a port of their own.
    pub const ADMIN_LISTEN: &str = "LLM_METER_ADMIN_LISTEN";
    /// Upstream base URL.
    pub const UPSTREAM: &str = "LLM_METER_UPSTREAM";
    /// Base URL of the built-in Anthropic upstream.
    pub const ANTHROPIC_UPSTREAM: &str = "LLM_METER_ANTHROPIC_UPSTREAM";
    /// Admin token for `/stats/reset`.
    pub const ADMIN_TOKEN: &str = "LLM_METER_ADMIN_TOKEN";
    /// `text` or `json`.
    pub const LOG_FORMAT: &str = "LLM_METER_LOG_FORMAT";
    /// Threads serving requests.
    pub const THREADS: &str = "LLM_METER_THREADS";
    /// Directory of the ledger.
    pub const DATA_DIR: &str = "LLM_METER_DATA_DIR";
    /// `false` keeps totals in memory only.
    pub const PERSIST: &str = "LLM_METER_PERSIST";
    /// Base of per-user data directories (XDG); read to place the default data directory.
    pub const XDG_DATA_HOME: &str = "XDG_DATA_HOME";
    /// The user's home; the default data directory is under it when `XDG_DATA_HOME` is unset.
    pub const HOME: &str = "HOME";
}

/// Default `header_timeout`: a head takes milliseconds; ten seconds leaves room for slow links.
pub const DEFAULT_HEADER_TIMEOUT: &str = "10s";
/// Default `keepalive_timeout`: longer than the idle expiry of the pools clients keep (httpx 5 s,
/// undici 4 s, Go 90 s), so a client never reuses a connection the moment we close it, and longer
/// than a load balancer's own (60 s on AWS and nginx), which must close first.
pub const DEFAULT_KEEPALIVE_TIMEOUT: &str = "120s";
/// Default `max_tracked_keys`: about 10 MB of per-key totals at most.
pub const DEFAULT_MAX_TRACKED_KEYS: usize = 10_000;
/// Default `max_models_per_key`.
pub const DEFAULT_MAX_MODELS_PER_KEY: usize = 100;

/// Default longest wait of a recorded row before it is committed to the ledger.
pub const DEFAULT_FLUSH_INTERVAL: &str = "100ms";
/// Default bound of rows kept in memory while the ledger's disk fails (about 30 MB).
pub const DEFAULT_MAX_PENDING_ROWS: usize = 100_000;

/// A configuration problem, naming where it is and what is wrong, on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The config file is not valid TOML or has an unknown field or a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file, with line number when known.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is present but unusable.
    #[error("invalid `{field}` ({source_layer}): {reason}")]
    Invalid {
        /// The field name as written in proxy.toml.
        field: String,
        /// Which layer gave the value: flag, environment variable or file.
        source_layer: String,
        /// What is wrong.
        reason: String,
    },
}

/// The raw shape of `proxy.toml`: every field optional, unknown fields rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    header_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    max_connections: Option<usize>,
    max_tracked_keys: Option<usize>,
    max_models_per_key: Option<usize>,
    upstream: Option<String>,
    admin_token: Option<String>,
    log_format: Option<String>,
    threads: Option<usize>,
    max_body_bytes: Option<u64>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    shutdown_grace: Option<String>,
    data_dir: Option<PathBuf>,
    persist: Option<bool>,
    flush_interval: Option<String>,
    max_pending_rows: Option<usize>,
    on_client_disconnect: Option<String>,
    drain_timeout: Option<String>,
    #[serde(default)]
    pricing: BTreeMap<String, PriceEntry>,
    #[serde(default)]
    upstreams: BTreeMap<String, UpstreamEntry>,
    require_known_keys: Option<bool>,
    budget_timezone: Option<String>,
    alert_thresholds: Option<Vec<u32>>,
    alert_webhook: Option<String>,
    large_request_tokens: Option<u64>,
    budget: Option<BudgetEntry>,
    #[serde(default)]
    keys: BTreeMap<String, KeyEntry>,
}

/// `[budget]`: the budget of all keys together, USD.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetEntry {
    daily_usd: Option<f64>,
    monthly_usd: Option<f64>,
    total_usd: Option<f64>,
}

/// One `[keys.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key_env: Option<String>,
    key_sha256: Option<String>,
    upstream_key_env: Option<String>,
    daily_usd: Option<f64>,
    monthly_usd: Option<f64>,
    total_usd: Option<f64>,
    tokens_per_minute: Option<u64>,
    requests_per_minute: Option<u64>,
}

/// One `[upstreams.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamEntry {
    prefix: Option<String>,
    url: Option<String>,
    flavor: Option<String>,
    inject_stream_usage: Option<String>,
}

/// One `[pricing."MODEL"]` table, in USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input_per_million: f64,
    output_per_million: f64,
    cached_input_per_million: Option<f64>,
    cache_write_per_million: Option<f64>,
}

/// Values given on the command line; `None` where the flag was not given.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--threads`.
    pub threads: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--no-persist`.
    pub no_persist: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret that never prints: `Debug` shows a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for comparison only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where requests are forwarded: scheme and authority plus the base path they are appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Base path without a trailing slash (`/v1`, or empty).
    pub base_path: String,
    /// The `Host` header forwarded requests carry: the host, and the port unless it is the
    /// scheme's default (as HTTP clients write it).
    pub host: http::HeaderValue,
}

impl Upstream {
    /// Parses an absolute `http(s)://host[:port][/base]` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("must be an absolute URL such as https://api.openai.com/v1")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!("scheme must be http or https, not {scheme}"));
        }
        let authority = uri.authority().cloned().ok_or("has no host")?;
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let host = http::HeaderValue::try_from(host).map_err(|_| "has an invalid host")?;
        Ok(Self {
            scheme,
            authority,
            base_path,
            host,
        })
    }
}

/// Which provider API an upstream speaks, and so which routes are metered and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFlavor {
    /// OpenAI and OpenAI-compatible servers (OpenRouter, vLLM, llama.cpp, Ollama, Gemini's compatibility endpoint).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Gemini's native `generateContent` API.
    Gemini,
}

/// Whether llm-meter adds `stream_options.include_usage` to streaming requests that lack it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectStreamUsage {
    /// Add it; if the upstream rejects it with a 400 naming it, retry without it and stop adding it.
    Auto,
    /// Always add it.
    Always,
    /// Never add it: such streams are metered by estimate.
    Never,
}

/// What llm-meter does with the upstream stream when the client leaves before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClientDisconnect {
    /// Close the upstream connection at once: the provider stops generating (and billing).
    Close,
    /// Keep reading to the end (bounded by `drain_timeout` and `DRAIN_MAX_BYTES`) to record the exact usage.
    Drain,
}

/// Most bytes read from an upstream after its client left, in drain mode.
pub const DRAIN_MAX_BYTES: usize = 8 * 1024 * 1024;

/// A named upstream and the path prefix it is mounted at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name shown in `/stats` and stored in the ledger.
    pub name: String,
    /// Our path prefix (`/v1`, `/anthropic/v1`, `/openrouter/v1`), stripped before forwarding.
    pub prefix: String,
    /// Where the rest of the path is appended.
    pub upstream: Upstream,
    /// The API it speaks.
    pub flavor: ApiFlavor,
    /// Whether to ask for stream usage on the client's behalf.
    pub inject_stream_usage: InjectStreamUsage,
}

impl Route {
    fn new(name: &str, prefix: &str, upstream: Upstream, flavor: ApiFlavor) -> Self {
        Self {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            upstream,
            flavor,
            inject_stream_usage: InjectStreamUsage::Auto,
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// The validated configuration the service runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where our own endpoints listen, when not on `listen`: that port then serves provider
    /// routes and `/healthz` only.
    pub admin_listen: Option<SocketAddr>,
    /// Longest a request head may take from its first byte (and a request body may stall).
    pub header_timeout: Duration,
    /// Longest a client connection stays open with no request in flight.
    pub keepalive_timeout: Duration,
    /// Most client connections at once; `None` derives it from the file-descriptor limit.
    pub max_connections: Option<usize>,
    /// Keys tracked one by one in memory; past it, new keys count into one `other` entry.
    pub max_tracked_keys: usize,
    /// Models tracked one by one under each key; past it, new models count into `other`.
    pub max_models_per_key: usize,
    /// Where `/v1/*` is forwarded (the first route's upstream).
    pub upstream: Upstream,
    /// Every mounted upstream: `openai` at `/v1`, `anthropic` at `/anthropic/v1`, then the declared ones.
    pub routes: Vec<Route>,
    /// Close or drain an upstream stream whose client left.
    pub on_client_disconnect: OnClientDisconnect,
    /// Longest a drained stream is read after its client left.
    pub drain_timeout: Duration,
    /// Token required by `/stats/reset` when set.
    pub admin_token: Option<Secret>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Worker threads serving requests; a connection and its requests stay on one of them.
    pub threads: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Time allowed to open a connection to the upstream.
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the upstream's response headers.
    pub response_timeout: Duration,
    /// Longest silence allowed inside a response body; a stream still sending tokens never trips it.
    pub idle_timeout: Duration,
    /// Time in-flight requests get to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Built-in prices with the file's overrides applied.
    pub prices: PriceTable,
    /// Where every request is written; `None` keeps totals in memory only.
    pub ledger: Option<ledger::Options>,
    /// Named keys, budgets, rate limits and alerts.
    pub guard: guard::Settings,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Reads the config file (named or default) and merges it with the environment and flags.
    pub fn load(flags: &Flags, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let path = flags
            .config
            .clone()
            .or_else(|| env.get(env::CONFIG).map(PathBuf::from));
        let (path, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                (Some(path), Some(text))
            }
            None => {
                let default = Path::new(DEFAULT_CONFIG_FILE);
                match std::fs::read_to_string(default) {
                    Ok(text) => (Some(default.to_owned()), Some(text)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                    Err(e) => {
                        return Err(ConfigError::Read {
                            path: default.to_owned(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        };
        let mut config = Self::from_layers(text.as_deref(), path.as_deref(), env, flags)?;
        config.file = path;
        Ok(config)
    }

    /// Merges a file's text (if any), the environment and flags: flag > env > file > default.
    pub fn from_layers(
        file_text: Option<&str>,
        file_name: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &Flags,
    ) -> Result<Self, ConfigError> {
        let name = file_name.map_or_else(
            || DEFAULT_CONFIG_FILE.to_owned(),
            |p| p.display().to_string(),
        );
        let mut file: FileConfig = match file_text {
            Some(text) => parse_file(text, &name)?,
            None => FileConfig::default(),
        };
        let file_guard = GuardFile {
            require_known_keys: file.require_known_keys,
            budget_timezone: file.budget_timezone.take(),
            alert_thresholds: file.alert_thresholds.take(),
            alert_webhook: file.alert_webhook.take(),
            large_request_tokens: file.large_request_tokens,
            budget: file.budget.take().unwrap_or_default(),
            keys: std::mem::take(&mut file.keys),
        };
        let layer = Layers {
            env,
            file_name: &name,
        };

        let (listen, from) = layer.pick(
            flags.listen.as_deref(),
            env::LISTEN,
            file.listen.as_deref(),
            DEFAULT_LISTEN,
        );
        let listen = parse_listen(listen).map_err(|reason| invalid("listen", &from, reason))?;
        let admin_listen = match (
            flags.admin_listen.as_deref(),
            env.get(env::ADMIN_LISTEN),
            file.admin_listen.as_deref(),
        ) {
            (Some(v), _, _) => Some((v, "command-line flag".to_owned())),
            (None, Some(v), _) => Some((
                v.as_str(),
                format!("environment variable {}", env::ADMIN_LISTEN),
            )),
            (None, None, Some(v)) => Some((v, name.clone())),
            (None, None, None) => None,
        };
        let admin_listen = match admin_listen {
            Some((value, from)) => {
                let addr = parse_listen(value).map_err(|r| invalid("admin_listen", &from, r))?;
                if addr == listen && addr.port() != 0 {
                    return Err(invalid("admin_listen", &from, "must differ from `listen`"));
                }
                Some(addr)
            }
            None => None,
        };

        let (upstream, from) = layer.pick(
            flags.upstream.as_deref(),
            env::UPSTREAM,
            file.upstream.as_deref(),
            DEFAULT_UPSTREAM,
        );
        let upstream = Upstream::parse(upstream).map_err(|r| invalid("upstream", &from, r))?;

        let (log_format, from) = layer.pick(
            flags.log_format.as_deref(),
            env::LOG_FORMAT,
            file.log_format.as_deref(),
            "text",
        );
        let log_format = match log_format {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    &from,
                    format!("expected \"text\" or \"json\", got {other:?}"),
                ));
            }
        };

        let file_threads = file.threads.map(|n| n.to_string());
        let default_threads = default_threads().to_string();
        let (threads, from) = layer.pick(
            flags.threads.as_deref(),
            env::THREADS,
            file_threads.as_deref(),
            &default_threads,
        );
        let threads = threads
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_THREADS).contains(n))
            .ok_or_else(|| {
                invalid(
                    "threads",
                    &from,
                    format!("expected a whole number from 1 to {MAX_THREADS}, got {threads:?}"),
                )
            })?;

        let admin_token = env
            .get(env::ADMIN_TOKEN)
            .cloned()
            .or(file.admin_token)
            .filter(|t| !t.is_empty())
            .map(Secret);

        let max_body_bytes = file.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        let max_body_bytes = usize::try_from(max_body_bytes)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid(
                    "max_body_bytes",
                    &name,
                    "must be a positive number of bytes",
                )
            })?;

        let duration = |field: &str, value: Option<&str>, default: &str| {
            parse_duration(value.unwrap_or(default)).map_err(|r| invalid(field, &name, r))
        };
        let connect_timeout = duration("connect_timeout", file.connect_timeout.as_deref(), "10s")?;
        let response_timeout =
            duration("response_timeout", file.response_timeout.as_deref(), "10m")?;
        let idle_timeout = duration("idle_timeout", file.idle_timeout.as_deref(), "5m")?;
        let shutdown_grace = duration("shutdown_grace", file.shutdown_grace.as_deref(), "30s")?;
        let header_timeout = duration(
            "header_timeout",
            file.header_timeout.as_deref(),
            DEFAULT_HEADER_TIMEOUT,
        )?;
        let keepalive_timeout = duration(
            "keepalive_timeout",
            file.keepalive_timeout.as_deref(),
            DEFAULT_KEEPALIVE_TIMEOUT,
        )?;
        let at_least_one = |field: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(invalid(field, &name, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let max_connections = file
            .max_connections
            .map(|n| at_least_one("max_connections", Some(n), n))
            .transpose()?;
        let max_tracked_keys = at_least_one(
            "max_tracked_keys",
            file.max_tracked_keys,
            DEFAULT_MAX_TRACKED_KEYS,
        )?;
        let max_models_per_key = at_least_one(
            "max_models_per_key",
            file.max_models_per_key,
            DEFAULT_MAX_MODELS_PER_KEY,
        )?;

        let mut prices = PriceTable::builtin();
        for (model, entry) in file.pricing {
            let field = format!("pricing.\"{model}\"");
            let price = price_from(&entry).map_err(|r| invalid(&field, &name, r))?;
            prices.set(model, price);
        }

        let persist = if flags.no_persist {
            false
        } else if let Some(v) = env.get(env::PERSIST) {
            parse_bool(v).ok_or_else(|| {
                invalid(
                    "persist",
                    &format!("environment variable {}", env::PERSIST),
                    format!("expected true or false, got {v:?}"),
                )
            })?
        } else {
            file.persist.unwrap_or(true)
        };
        let ledger = if persist {
            let dir = match (&flags.data_dir, env.get(env::DATA_DIR), file.data_dir) {
                (Some(dir), _, _) => dir.clone(),
                (None, Some(dir), _) => PathBuf::from(dir),
                (None, None, Some(dir)) => dir,
                (None, None, None) => default_data_dir(env).ok_or_else(|| {
                    invalid(
                        "data_dir",
                        "default",
                        "neither XDG_DATA_HOME nor HOME is set: give --data-dir, or --no-persist",
                    )
                })?,
            };
            if dir.as_os_str().is_empty() {
                return Err(invalid("data_dir", "given", "must not be empty"));
            }
            let flush_interval = duration(
                "flush_interval",
                file.flush_interval.as_deref(),
                DEFAULT_FLUSH_INTERVAL,
            )?;
            if flush_interval.is_zero() || flush_interval > Duration::from_secs(60) {
                return Err(invalid(
                    "flush_interval",
                    &name,
                    "must be more than 0 and at most 60s",
                ));
            }
            let max_pending_rows = file.max_pending_rows.unwrap_or(DEFAULT_MAX_PENDING_ROWS);
            if max_pending_rows == 0 {
                return Err(invalid("max_pending_rows", &name, "must be at least 1"));
            }
            Some(ledger::Options {
                dir,
                flush_interval,
                max_pending_rows,
            })
        } else {
            None
        };

        let on_client_disconnect = match file.on_client_disconnect.as_deref() {
            None | Some("close") => OnClientDisconnect::Close,
            Some("drain") => OnClientDisconnect::Drain,
            Some(other) => {
                return Err(invalid(
                    "on_client_disconnect",
                    &name,
                    format!("expected \"close\" or \"drain\", got {other:?}"),
                ));
            }
        };
        let drain_timeout = duration("drain_timeout", file.drain_timeout.as_deref(), "2m")?;
        let anthropic = match env.get(env::ANTHROPIC_UPSTREAM) {
            Some(url) => Upstream::parse(url).map_err(|r| {
                invalid(
                    "upstreams.anthropic.url",
                    &format!("environment variable {}", env::ANTHROPIC_UPSTREAM),
                    r,
                )
            })?,
            None => Upstream::parse(DEFAULT_ANTHROPIC_UPSTREAM)
                .map_err(|r| invalid("upstreams.anthropic.url", "default", r))?,
        };
        let routes = routes(
            Route::new(OPENAI, "/v1", upstream.clone(), ApiFlavor::OpenAi),
            Route::new(ANTHROPIC, "/anthropic/v1", anthropic, ApiFlavor::Anthropic),
            file.upstreams,
            &name,
        )?;

        let guard = guard_settings(&file_guard, env, &name)?;

        Ok(Self {
            guard,
            listen,
            admin_listen,
            header_timeout,
            keepalive_timeout,
            max_connections,
            max_tracked_keys,
            max_models_per_key,
            upstream,
            routes,
            on_client_disconnect,
            drain_timeout,
            admin_token,
            log_format,
            threads,
            max_body_bytes,
            connect_timeout,
            response_timeout,
            idle_timeout,
            shutdown_grace,
            prices,
            ledger,
            file: None,
        })
    }
}

/// The built-in routes with the file's `[upstreams.*]` applied: `openai` may set only
/// `inject_stream_usage` (its URL is `upstream`), `anthropic` may be re-pointed, others are added.
fn routes(
    openai: Route,
    anthropic: Route,
    declared: BTreeMap<String, UpstreamEntry>,
    file: &str,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = vec![openai, anthropic];
    for (name, entry) in declared {
        let field = |part: &str| format!("upstreams.{name}.{part}");
        if !is_plain_name(&name) {
            return Err(invalid(
                &format!("upstreams.{name}"),
                file,
                "a name may only have letters, digits, '-' and '_'",
            ));
        }
        let existing = routes.iter().position(|r| r.name == name);
        if name == OPENAI
            && (entry.url.is_some() || entry.prefix.is_some() || entry.flavor.is_some())
        {
            return Err(invalid(
                &field("url"),
                file,
                "the openai upstream's URL is the top-level `upstream` setting; only inject_stream_usage may be set here",
            ));
        }
        let mut route = match existing {
            Some(at) => routes.remove(at),
            None => {
                let url = entry.url.as_deref().ok_or_else(|| {
                    invalid(
                        &field("url"),
                        file,
                        "missing: where this upstream's requests go",
                    )
                })?;
                let upstream = Upstream::parse(url).map_err(|r| invalid(&field("url"), file, r))?;
                Route::new(&name, &format!("/{name}/v1"), upstream, ApiFlavor::OpenAi)
            }
        };
        if let Some(url) = entry.url.as_deref() {
            route.upstream = Upstream::parse(url).map_err(|r| invalid(&field("url"), file, r))?;
        }
        if let Some(flavor) = entry.flavor.as_deref() {
            route.flavor = match flavor {
                "openai" => ApiFlavor::OpenAi,
                "anthropic" => ApiFlavor::Anthropic,
                "gemini" => ApiFlavor::Gemini,
                other => {
                    return Err(invalid(
                        &field("flavor"),
                        file,
                        format!("expected \"openai\", \"anthropic\" or \"gemini\", got {other:?}"),
                    ));
                }
            };
        }
        if let Some(prefix) = entry.prefix {
            route.prefix = prefix.trim_end_matches('/').to_owned();
        }
        if let Some(inject) = entry.inject_stream_usage.as_deref() {
            route.inject_stream_usage = match inject {
                "auto" => InjectStreamUsage::Auto,
                "always" => InjectStreamUsage::Always,
                "never" => InjectStreamUsage::Never,
                other => {
                    return Err(invalid(
                        &field("inject_stream_usage"),
                        file,
                        format!("expected \"auto\", \"always\" or \"never\", got {other:?}"),
                    ));
                }
            };
        }
        check_prefix(&route.prefix, &routes).map_err(|r| invalid(&field("prefix"), file, r))?;
        let at = existing.unwrap_or(routes.len()).min(routes.len());
        routes.insert(at, route);
    }
    Ok(routes)
}

/// Names of upstreams and keys: letters, digits, `-` and `_` (they appear in paths, JSON and logs).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A prefix is a plain absolute path, apart from our own endpoints and every other prefix.
fn check_prefix(prefix: &str, others: &[Route]) -> Result<(), String> {
    let is_plain = prefix.starts_with('/')
        && prefix.len() > 1
        && prefix.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        });
    if !is_plain {
        return Err(format!(
            "{prefix:?} must be an absolute path of plain segments, such as \"/openrouter/v1\""
        ));
    }
    let nests = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
    if let Some(own) = RESERVED_PATHS
        .iter()
        .find(|own| nests(prefix, own) || nests(own, prefix))
    {
        return Err(format!("{prefix:?} would hide llm-meter's own {own}"));
    }
    if let Some(other) = others
        .iter()
        .find(|r| nests(prefix, &r.prefix) || nests(&r.prefix, prefix))
    {
        return Err(format!(
            "{prefix:?} overlaps the prefix {:?} of upstream {:?}",
            other.prefix, other.name
        ));
    }
    Ok(())
}

/// The guard's part of the file, taken out before the rest is consumed.
struct GuardFile {
    require_known_keys: Option<bool>,
    budget_timezone: Option<String>,
    alert_thresholds: Option<Vec<u32>>,
    alert_webhook: Option<String>,
    large_request_tokens: Option<u64>,
    budget: BudgetEntry,
    keys: BTreeMap<String, KeyEntry>,
}

/// Validates named keys, budgets, rate limits and alert settings; every error names its field.
fn guard_settings(
    file: &GuardFile,
    env: &HashMap<String, String>,
    name: &str,
) -> Result<guard::Settings, ConfigError> {
    let mut settings = guard::Settings {
        require_known_keys: file.require_known_keys.unwrap_or(false),
        global: budget_of(
            "budget",
            [
                file.budget.daily_usd,
                file.budget.monthly_usd,
                file.budget.total_usd,
            ],
            name,
        )?,
        ..guard::Settings::default()
    };
    if let Some(zone) = &file.budget_timezone {
        settings.timezone = jiff::tz::TimeZone::get(zone).map_err(|_| {
            invalid(
                "budget_timezone",
                name,
                format!(
                    "unknown time zone {zone:?} (IANA names such as \"Europe/Paris\", or \"UTC\")"
                ),
            )
        })?;
    }
    if let Some(thresholds) = &file.alert_thresholds {
        if thresholds.is_empty() || thresholds.iter().any(|t| !(1..=100).contains(t)) {
            return Err(invalid(
                "alert_thresholds",
                name,
                "must be percentages from 1 to 100, such as [50, 80, 100]",
            ));
        }
        let mut sorted = thresholds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        settings.thresholds = sorted;
    }
    if let Some(url) = &file.alert_webhook {
        let uri: http::Uri = url
            .parse()
            .ok()
            .filter(|u: &http::Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            })
            .ok_or_else(|| invalid("alert_webhook", name, "must be an http(s) URL"))?;
        settings.webhook = Some(uri);
    }
    if let Some(tokens) = file.large_request_tokens {
        if tokens == 0 {
            return Err(invalid("large_request_tokens", name, "must be at least 1"));
        }
        settings.large_request_tokens = tokens;
    }
    for (key_name, entry) in &file.keys {
        let field = |part: &str| format!("keys.{key_name}.{part}");
        if !is_plain_name(key_name) || key_name == "global" {
            return Err(invalid(
                &format!("keys.{key_name}"),
                name,
                "a name may only have letters, digits, '-' and '_' (and is not \"global\")",
            ));
        }
        let from_env = |part: &str, var: &str| {
            env.get(var)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    invalid(
                        &field(part),
                        name,
                        format!("environment variable {var} is not set"),
                    )
                })
        };
        let digest = match (&entry.key_env, &entry.key_sha256) {
            (Some(var), None) => crate::key::digest(from_env("key_env", var)?.as_bytes()),
            (None, Some(hex)) => parse_sha256(hex).ok_or_else(|| {
                invalid(
                    &field("key_sha256"),
                    name,
                    "must be 64 hexadecimal digits (sha256sum of the key)",
                )
            })?,
            _ => {
                return Err(invalid(
                    &field("key_env"),
                    name,
                    "give exactly one of key_env (the variable holding the key) and key_sha256",
                ));
            }
        };
        if let Some(other) = settings.keys.iter().find(|k| k.digest == digest) {
            return Err(invalid(
                &field("key_env"),
                name,
                format!("the same key as keys.{}", other.name),
            ));
        }
        let upstream_key = match &entry.upstream_key_env {
            Some(var) => Some(Secret(from_env("upstream_key_env", var)?)),
            None => None,
        };
        let per_minute = |part: &str, value: Option<u64>| match value {
            Some(0) => Err(invalid(&field(part), name, "must be at least 1")),
            other => Ok(other),
        };
        settings.keys.push(KeySettings {
            name: key_name.clone(),
            digest,
            upstream_key,
            budget: budget_of(
                &format!("keys.{key_name}"),
                [entry.daily_usd, entry.monthly_usd, entry.total_usd],
                name,
            )?,
            tokens_per_minute: per_minute("tokens_per_minute", entry.tokens_per_minute)?,
            requests_per_minute: per_minute("requests_per_minute", entry.requests_per_minute)?,
        });
    }
    Ok(settings)
}

/// Budgets in USD (daily, monthly, total) to nano-dollars; each must be positive.
fn budget_of(table: &str, usd: [Option<f64>; 3], name: &str) -> Result<Budget, ConfigError> {
    let mut out = [None; 3];
    for ((slot, value), period) in out.iter_mut().zip(usd).zip(["daily", "monthly", "total"]) {
        let Some(value) = value else { continue };
        *slot = Some(NanoUsd::from_usd(value).ok_or_else(|| {
            invalid(
                &format!("{table}.{period}_usd"),
                name,
                format!("must be a positive amount of dollars, got {value}"),
            )
        })?);
    }
    let [daily, monthly, total] = out;
    Ok(Budget {
        daily,
        monthly,
        total,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The environment and the file name, to pick each value from the highest layer that has it.
struct Layers<'a> {
    env: &'a HashMap<String, String>,
    file_name: &'a str,
}

impl<'a> Layers<'a> {
    /// Returns the value and a description of the layer it came from.
    fn pick(
        &self,
        flag: Option<&'a str>,
        env_name: &str,
        file: Option<&'a str>,
        default: &'a str,
    ) -> (&'a str, String) {
        if let Some(v) = flag {
            (v, "command-line flag".to_owned())
        } else if let Some(v) = self.env.get(env_name) {
            (v.as_str(), format!("environment variable {env_name}"))
        } else if let Some(v) = file {
            (v, self.file_name.to_owned())
        } else {
            (default, "default".to_owned())
        }
    }
}

/// Worker threads when none are configured: one per CPU core this process may use (the cgroup
/// quota counts, as in a container), at most `DEFAULT_MAX_THREADS`.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(DEFAULT_MAX_THREADS))
}

/// `$XDG_DATA_HOME/llm-meter`, else `$HOME/.local/share/llm-meter` (the XDG default).
fn default_data_dir(env: &HashMap<String, String>) -> Option<PathBuf> {
    let absolute = |name: &str| env.get(name).map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(env::XDG_DATA_HOME)
        .or_else(|| absolute(env::HOME).map(|home| home.join(".local").join("share")))
        .map(|base| base.join("llm-meter"))
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn invalid(field: &str, from: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        source_layer: from.to_owned(),
        reason: reason.into(),
    }
}

/// Parses TOML, turning the parser's multi-line report into `file line N: `field`: message`.
fn parse_file(text: &str, name: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|span| span.start.min(text.len()));
        let mut message = e.message().trim().replace('\n', " ");
        if let Some(field) = start.and_then(|at| field_at(text, at))
            && !message.contains(&field)
        {
            message = format!("`{field}`: {message}");
        }
        ConfigError::Parse {
            path: match start {
                Some(at) => format!("{name} line {}", text[..at].matches('\n').count() + 1),
                None => name.to_owned(),
            },
            message,
        }
    })
}

/// The dotted name of the `key = value` line containing `offset`, under its `[table]` header.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    value
        .to_socket_addrs()
        .map_err(|e| format!("{value:?} is not a host:port address ({e})"))?
        .next()
        .ok_or_else(|| format!("{value:?} resolves to no address"))
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration like \"30s\" or \"5m\" ({e})"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

fn price_from(entry: &PriceEntry) -> Result<Price, String> {
    let check = |name: &str, v: f64| {
        if v.is_finite() && (0.0..=1_000_000.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!(
                "{name} must be a number of USD from 0 to 1000000, got {v}"
            ))
        }
    };
    let input = check("input_per_million", entry.input_per_million)?;
    let output = check("output_per_million", entry.output_per_million)?;
    let cached = check(
        "cached_input_per_million",
        entry.cached_input_per_million.unwrap_or(input),
    )?;
    let write = check(
        "cache_write_per_million",
        entry.cache_write_per_million.unwrap_or(input),
    )?;
    Ok(Price::per_million(input, output, cached, write))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The given variables, plus a HOME (every login has one) unless they set it.
    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.entry(env::HOME.to_owned())
            .or_insert_with(|| "/home/ada".to_owned());
        map
    }

    fn load(
        file: Option<&str>,
        env_pairs: &[(&str, &str)],
        flags: &Flags,
    ) -> Result<Config, ConfigError> {
        Config::from_layers(file, None, &env(env_pairs), flags)
    }

    #[test]
    fn defaults_apply_with_no_layers() {
        let c = load(None, &[], &Flags::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.upstream.to_string(), "https://api.openai.com/v1");
        assert_eq!(c.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.admin_token.is_none());
    }

    #[test]
    fn the_ledger_lives_in_the_xdg_data_dir_unless_told_otherwise() {
        let dir = |c: Config| c.ledger.unwrap().dir;
        let c = load(None, &[], &Flags::default()).unwrap();
        assert_eq!(dir(c), PathBuf::from("/home/ada/.local/share/llm-meter"));
        let c = load(None, &[(env::XDG_DATA_HOME, "/xdg")], &Flags::default()).unwrap();
        assert_eq!(dir(c), PathBuf::from("/xdg/llm-meter"));
        // A relative XDG_DATA_HOME is invalid by the spec: ignored.
        let c = load(None, &[(env::XDG_DATA_HOME, "xdg")], &Flags::default()).unwrap();
        assert_eq!(dir(c), PathBuf::from("/home/ada/.local/share/llm-meter"));
        let file = Some("data_dir = \"/from-file\"\n");
        assert_eq!(
            dir(load(file, &[], &Flags::default()).unwrap()),
            PathBuf::from("/from-file")
        );
        let c = load(file, &[(env::DATA_DIR, "/from-env")], &Flags::default()).unwrap();
        assert_eq!(dir(c), PathBuf::from("/from-env"));
        let flags = Flags {
            data_dir: Some("/from-flag".into()),
            ..Flags::default()
        };
        let c = load(file, &[(env::DATA_DIR, "/from-env")], &flags).unwrap();
        assert_eq!(dir(c), PathBuf::from("/from-flag"));
        let c = load(None, &[], &Flags::default()).unwrap();
        let ledger = c.ledger.unwrap();
        assert_eq!(ledger.flush_interval, Duration::from_millis(100));
        assert_eq!(ledger.max_pending_rows, DEFAULT_MAX_PENDING_ROWS);
    }

    #[test]
    fn persistence_can_be_turned_off_from_any_layer() {
        let off = |file: Option<&str>, env_pairs: &[(&str, &str)], flags: &Flags| {
            load(file, env_pairs, flags).unwrap().ledger.is_none()
        };
        assert!(off(Some("persist = false\n"), &[], &Flags::default()));
        assert!(off(None, &[(env::PERSIST, "false")], &Flags::default()));
        assert!(!off(
            Some("persist = false\n"),
            &[(env::PERSIST, "true")],
            &Flags::default()
        ));
        let no_persist = Flags {
            no_persist: true,
            ..Flags::default()
        };
        assert!(off(None, &[(env::PERSIST, "true")], &no_persist));
        let err = load(None, &[(env::PERSIST, "maybe")], &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("LLM_METER_PERSIST"), "{err}");
    }

    #[test]
    fn ledger_settings_are_checked() {
        let no_home = HashMap::new();
        let err = Config::from_layers(None, None, &no_home, &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("--data-dir"), "{err}");
        let err = load(Some("flush_interval = \"2m\"\n"), &[], &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("flush_interval"), "{err}");
        let err = load(Some("max_pending_rows = 0\n"), &[], &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("max_pending_rows"), "{err}");
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let file = Some("listen = \"127.0.0.1:1001\"\nupstream = \"http://file.test/v1\"\n");
        let flags = Flags {
            listen: Some("127.0.0.1:1003".into()),
            ..Flags::default()
        };
        let c = load(
            file,
            &[
                (env::LISTEN, "127.0.0.1:1002"),
                (env::UPSTREAM, "http://env.test/v1"),
            ],
            &flags,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 1003);
        assert_eq!(c.upstream.to_string(), "http://env.test/v1");
        let c = load(file, &[], &Flags::default()).unwrap();
        assert_eq!(c.listen.port(), 1001);
        assert_eq!(c.upstream.to_string(), "http://file.test/v1");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = load(
            Some("listen = \"127.0.0.1:1\"\nlisten_port = 3\n"),
            &[],
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn invalid_values_name_field_and_layer() {
        let err = load(None, &[(env::UPSTREAM, "ftp://x")], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`upstream`") && err.contains(env::UPSTREAM),
            "{err}"
        );
        let err = load(Some("idle_timeout = \"soon\""), &[], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`idle_timeout`"), "{err}");
        let err = load(
            Some("[pricing.\"m\"]\ninput_per_million = -1.0\noutput_per_million = 1.0"),
            &[],
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pricing.\"m\"") && err.contains("input_per_million"),
            "{err}"
        );
        let err = load(Some("max_body_bytes = \"big\""), &[], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_body_bytes"), "{err}");
    }

    #[test]
    fn threads_come_from_any_layer_and_must_be_positive() {
        assert_eq!(
            load(None, &[], &Flags::default()).unwrap().threads,
            default_threads()
        );
        assert!((1..=DEFAULT_MAX_THREADS).contains(&default_threads()));
        assert_eq!(
            load(Some("threads = 4"), &[], &Flags::default())
                .unwrap()
                .threads,
            4
        );
        assert_eq!(
            load(
                Some("threads = 4"),
                &[(env::THREADS, "2")],
                &Flags::default()
            )
            .unwrap()
            .threads,
            2
        );
        for bad in ["0", "-1", "many", "100000"] {
            let err = load(None, &[(env::THREADS, bad)], &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("`threads`"), "{err}");
        }
    }

    #[test]
    fn upstream_base_path_loses_trailing_slash() {
        let u = Upstream::parse("http://127.0.0.1:9000/api/v1/").unwrap();
        assert_eq!(u.base_path, "/api/v1");
        assert_eq!(Upstream::parse("http://h").unwrap().base_path, "");
        assert!(Upstream::parse("api.openai.com/v1").is_err());
    }

    #[test]
    fn admin_token_never_prints() {
        let c = load(
            Some("admin_token = \"hunter2-admin\""),
            &[],
            &Flags::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.admin_token.unwrap().expose(), "hunter2-admin");
    }

    #[test]
    fn pricing_overrides_and_adds_models() {
        let c = load(
            Some("[pricing.\"my-model\"]\ninput_per_million = 2.0\noutput_per_million = 8.0\ncached_input_per_million = 0.5\n"),
            &[],
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(
            c.prices.resolve("my-model"),
            Some(&Price::per_million(2.0, 8.0, 0.5, 2.0))
        );
    }
}

#[cfg(test)]
mod upstream_tests {
    use super::*;

    fn load(file: &str, env_pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: HashMap<String, String> = env_pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.insert(env::HOME.into(), "/home/ada".into());
        Config::from_layers(Some(file), None, &env, &Flags::default())
    }

    fn error(file: &str) -> String {
        load(file, &[]).unwrap_err().to_string()
    }

    #[test]
    fn openai_and_anthropic_are_mounted_with_no_config() {
        let c = load("", &[]).unwrap();
        let mounted: Vec<(&str, &str, String, ApiFlavor)> = c
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.prefix.as_str(),
                    r.upstream.to_string(),
                    r.flavor,
                )
            })
            .collect();
        assert_eq!(
            mounted,
            [
                (
                    "openai",
                    "/v1",
                    DEFAULT_UPSTREAM.to_owned(),
                    ApiFlavor::OpenAi
                ),
                (
                    "anthropic",
                    "/anthropic/v1",
                    DEFAULT_ANTHROPIC_UPSTREAM.to_owned(),
                    ApiFlavor::Anthropic
                ),
            ]
        );
        assert_eq!(c.on_client_disconnect, OnClientDisconnect::Close);
    }

    #[test]
    fn declared_upstreams_get_a_prefix_from_their_name_unless_given_one() {
        let c = load(
            r#"
            [upstreams.ollama]
            url = "http://localhost:11434/v1"
            inject_stream_usage = "never"
            [upstreams.gemini]
            prefix = "/gemini/v1beta/"
            url = "https://generativelanguage.googleapis.com/v1beta"
            flavor = "gemini"
            [upstreams.anthropic]
            url = "https://anthropic.example.com/v1"
            "#,
            &[],
        )
        .unwrap();
        let by_name = |name: &str| c.routes.iter().find(|r| r.name == name).unwrap();
        assert_eq!(by_name("ollama").prefix, "/ollama/v1");
        assert_eq!(
            by_name("ollama").inject_stream_usage,
            InjectStreamUsage::Never
        );
        assert_eq!(by_name("gemini").prefix, "/gemini/v1beta");
        assert_eq!(by_name("gemini").flavor, ApiFlavor::Gemini);
        assert_eq!(
            by_name("anthropic").upstream.to_string(),
            "https://anthropic.example.com/v1"
        );
        assert_eq!(by_name("anthropic").prefix, "/anthropic/v1");
        assert_eq!(c.routes.len(), 4);
    }

    #[test]
    fn the_anthropic_upstream_can_come_from_the_environment() {
        let c = load("", &[(env::ANTHROPIC_UPSTREAM, "http://127.0.0.1:7/v1")]).unwrap();
        assert_eq!(c.routes[1].upstream.to_string(), "http://127.0.0.1:7/v1");
    }

    #[test]
    fn bad_upstreams_are_refused_with_the_field_named() {
        for (file, expected) in [
            ("[upstreams.x]\nprefix = \"/x\"", "`upstreams.x.url`"),
            ("[upstreams.x]\nurl = \"ftp://h\"", "`upstreams.x.url`"),
            (
                "[upstreams.x]\nurl = \"http://h\"\nflavor = \"cohere\"",
                "`upstreams.x.flavor`",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\ninject_stream_usage = \"sometimes\"",
                "`upstreams.x.inject_stream_usage`",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/v1\"",
                "overlaps",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/v1/x\"",
                "overlaps",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/stats\"",
                "llm-meter's own /stats",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"x\"",
                "absolute path",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/a/../b\"",
                "absolute path",
            ),
            (
                "[upstreams.openai]\nurl = \"http://h\"",
                "top-level `upstream`",
            ),
            ("[upstreams.\"a b\"]\nurl = \"http://h\"", "letters, digits"),
            ("on_client_disconnect = \"wait\"", "`on_client_disconnect`"),
        ] {
            let message = error(file);
            assert!(message.contains(expected), "{file:?}: {message}");
        }
    }

    #[test]
    fn drain_mode_and_its_timeout_are_read() {
        let c = load(
            "on_client_disconnect = \"drain\"\ndrain_timeout = \"30s\"",
            &[],
        )
        .unwrap();
        assert_eq!(c.on_client_disconnect, OnClientDisconnect::Drain);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    fn load(file: &str) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = [
            (env::HOME, "/home/ada"),
            ("AGENT_KEY", "sk-agent-0000"),
            ("REAL_KEY", "sk-real-1111"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        Config::from_layers(Some(file), None, &env, &Flags::default())
    }

    #[test]
    fn named_keys_budgets_and_alerts_are_read() {
        let c = load(
            r#"
            require_known_keys = true
            budget_timezone = "America/New_York"
            alert_thresholds = [90, 25, 90]
            alert_webhook = "https://hooks.example.com/llm"
            large_request_tokens = 20000
            [budget]
            monthly_usd = 200
            [keys.agent]
            key_env = "AGENT_KEY"
            upstream_key_env = "REAL_KEY"
            daily_usd = 1.5
            tokens_per_minute = 30000
            [keys.other]
            key_sha256 = "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824"
            "#,
        )
        .unwrap();
        let g = &c.guard;
        assert!(g.require_known_keys);
        assert_eq!(g.timezone.iana_name(), Some("America/New_York"));
        assert_eq!(g.thresholds, [25, 90]);
        assert_eq!(g.large_request_tokens, 20_000);
        assert_eq!(g.global.monthly, Some(NanoUsd(200_000_000_000)));
        let agent = &g.keys[0];
        assert_eq!(agent.digest, crate::key::digest(b"sk-agent-0000"));
        assert_eq!(
            agent.upstream_key.as_ref().map(Secret::expose),
            Some("sk-real-1111")
        );
        assert_eq!(agent.budget.daily, Some(NanoUsd(1_500_000_000)));
        assert_eq!(agent.tokens_per_minute, Some(30_000));
        // sha256("hello"), written in capitals.
        assert_eq!(g.keys[1].digest, crate::key::digest(b"hello"));
    }

    #[test]
    fn budgets_that_cannot_be_met_refuse_to_start_with_the_field_named() {
        for (file, expected) in [
            ("[budget]\ndaily_usd = -1", "`budget.daily_usd`"),
            ("[budget]\ndaily_usd = 0", "`budget.daily_usd`"),
            ("[budget]\nweekly_usd = 5", "weekly_usd"),
            ("budget_timezone = \"Mars/Olympus\"", "`budget_timezone`"),
            ("alert_thresholds = [0, 50]", "`alert_thresholds`"),
            ("alert_thresholds = [150]", "`alert_thresholds`"),
            ("alert_webhook = \"ftp://x\"", "`alert_webhook`"),
            ("large_request_tokens = 0", "`large_request_tokens`"),
            ("[keys.a]\ndaily_usd = 1", "`keys.a.key_env`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nkey_sha256 = \"00\"",
                "`keys.a.key_env`",
            ),
            ("[keys.a]\nkey_env = \"NOT_SET\"", "NOT_SET is not set"),
            ("[keys.a]\nkey_sha256 = \"xyz\"", "`keys.a.key_sha256`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nupstream_key_env = \"NOPE\"",
                "`keys.a.upstream_key_env`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nrequests_per_minute = 0",
                "`keys.a.requests_per_minute`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nmonthly_usd = nan",
                "`keys.a.monthly_usd`",
            ),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\n[keys.b]\nkey_env = \"AGENT_KEY\"",
                "the same key as keys.a",
            ),
            ("[keys.global]\nkey_env = \"AGENT_KEY\"", "`keys.global`"),
            (
                "[keys.a]\nkey_env = \"AGENT_KEY\"\nhourly_usd = 1",
                "hourly_usd",
            ),
        ] {
            let message = load(file).unwrap_err().to_string();
            assert!(message.contains(expected), "{file:?}: {message}");
        }
    }
}
