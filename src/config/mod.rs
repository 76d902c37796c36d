//! Configuration: file, environment and flag layers merged into one validated `Config`; errors name the field.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod alerts;
pub mod egress;
mod file;
pub mod guard;
pub mod ledger;
pub mod otlp;
pub mod pricing;
mod serving;
mod upstreams;
pub mod websocket;

use upstreams::is_plain_name;
pub use upstreams::{ApiFlavor, InjectStreamUsage, Route, Upstream};

use file::{FileConfig, parse_file};
use guard::GuardFile;

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
    /// A LiteLLM-format price map over the built-in table.
    pub const PRICING_FILE: &str = "LLM_METER_PRICING_FILE";
    /// A PostgreSQL URL: the ledger is kept there instead of the SQLite file.
    pub const LEDGER_URL: &str = "LLM_METER_LEDGER_URL";
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
/// Default `metrics_max_series`: (upstream, model, key, operation) label sets shown apart in
/// `/metrics`; up to about 60 lines each, so a scrape stays within a few MB.
pub const DEFAULT_METRICS_MAX_SERIES: usize = 2_000;

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
    /// `--pricing-file`.
    pub pricing_file: Option<PathBuf>,
    /// `--ledger-url`.
    pub ledger_url: Option<String>,
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
    /// Label sets with series of their own in `/metrics`; past it, new ones count into `other`.
    pub metrics_max_series: usize,
    /// Where `/v1/*` is forwarded (the first route's upstream).
    pub upstream: Upstream,
    /// Every mounted upstream: `openai` at `/v1`, `anthropic` at `/anthropic/v1`, then the declared ones.
    pub routes: Vec<Route>,
    /// How upstreams (and the alert webhook) are reached unless an upstream says otherwise.
    pub egress: egress::Rules,
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
    /// Prices: configured ones, aliases, the files read over the built-in table, per upstream.
    pub pricing: pricing::Pricing,
    /// Where every request is written; `None` keeps totals in memory only.
    pub ledger: Option<ledger::Options>,
    /// Named keys, budgets, rate limits and alerts.
    pub guard: guard::Settings,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    /// Limits of relayed WebSockets.
    pub websocket: websocket::Settings,
    /// Add `X-LLM-Meter-Cost` and `X-LLM-Meter-Tokens` to non-streamed metered responses,
    /// which are then read whole before they are answered.
    pub cost_header: bool,
    /// OpenTelemetry export (OTLP over HTTP); `None` when no endpoint is set.
    pub otlp: Option<otlp::Settings>,
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
        let file_guard = GuardFile::take(&mut file);
        let layer = Layers {
            env,
            file_name: &name,
        };
        let addresses = serving::addresses(&layer, flags, &file)?;
        let timeouts = serving::timeouts(&layer, &file)?;
        let bounds = serving::bounds(&layer, &file)?;
        let upstream = upstreams::main(&layer, flags, &file)?;
        let egress = egress::Rules::load(env, &file, &name)?;
        let own_egress = egress::own_settings(&file.upstreams, &name)?;
        let pricing = pricing::settings(&layer, flags, &file, data_dir(&layer, flags, &file))?;
        let mut routes = upstreams::all(&layer, &upstream, std::mem::take(&mut file.upstreams))?;
        egress::resolve(&egress, &mut routes, &own_egress, &name);
        Ok(Self {
            listen: addresses.listen,
            admin_listen: addresses.admin_listen,
            log_format: serving::log_format(&layer, flags, &file)?,
            threads: serving::threads(&layer, flags, &file)?,
            admin_token: serving::admin_token(&layer, &file),
            on_client_disconnect: serving::on_client_disconnect(&layer, &file)?,
            header_timeout: timeouts.header,
            keepalive_timeout: timeouts.keepalive,
            connect_timeout: timeouts.connect,
            response_timeout: timeouts.response,
            idle_timeout: timeouts.idle,
            shutdown_grace: timeouts.shutdown_grace,
            drain_timeout: timeouts.drain,
            max_body_bytes: bounds.max_body_bytes,
            max_connections: bounds.max_connections,
            max_tracked_keys: bounds.max_tracked_keys,
            max_models_per_key: bounds.max_models_per_key,
            metrics_max_series: bounds.metrics_max_series,
            ledger: ledger::options(&layer, flags, &file)?,
            guard: guard::settings(&file_guard, env, &name)?,
            pricing,
            upstream,
            routes,
            egress,
            file: None,
            websocket: websocket::settings(&file, &name)?,
            cost_header: file.cost_header.unwrap_or(false),
            otlp: otlp::settings(
                &otlp::File {
                    endpoint: file.otlp_endpoint.as_deref(),
                    headers: file.otlp_headers.as_ref(),
                    metrics_interval: file.otlp_metrics_interval.as_deref(),
                },
                env,
                &name,
            )?,
        })
    }
}

/// The environment and the file name, to pick each value from the highest layer that has it.
struct Layers<'a> {
    env: &'a HashMap<String, String>,
    file_name: &'a str,
}

impl<'a> Layers<'a> {
    /// The value and the layer it came from, when any layer has one.
    fn pick_optional(
        &self,
        flag: Option<&'a str>,
        env_name: &str,
        file: Option<&'a str>,
    ) -> Option<(&'a str, String)> {
        if let Some(v) = flag {
            Some((v, "command-line flag".to_owned()))
        } else if let Some(v) = self.env.get(env_name) {
            Some((v.as_str(), format!("environment variable {env_name}")))
        } else {
            file.map(|v| (v, self.file_name.to_owned()))
        }
    }

    /// Returns the value and a description of the layer it came from, `default` when none has it.
    fn pick(
        &self,
        flag: Option<&'a str>,
        env_name: &str,
        file: Option<&'a str>,
        default: &'a str,
    ) -> (&'a str, String) {
        self.pick_optional(flag, env_name, file)
            .unwrap_or_else(|| (default, "default".to_owned()))
    }
}

/// Worker threads when none are configured: one per CPU core this process may use (the cgroup
/// quota counts, as in a container), at most `DEFAULT_MAX_THREADS`.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(DEFAULT_MAX_THREADS))
}

/// `$XDG_DATA_HOME/llm-meter`, else `$HOME/.local/share/llm-meter` (the XDG default).
/// The data directory as flag, environment, file or default give it, when one is known.
fn data_dir(layer: &Layers<'_>, flags: &Flags, file: &FileConfig) -> Option<PathBuf> {
    flags
        .data_dir
        .clone()
        .or_else(|| layer.env.get(env::DATA_DIR).map(PathBuf::from))
        .or_else(|| file.data_dir.clone())
        .or_else(|| default_data_dir(layer.env))
        .filter(|dir| !dir.as_os_str().is_empty())
}

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
            c.pricing.prices["my-model"][0].price,
            crate::money::Price::per_million(2.0, 8.0, 0.5, 2.0)
        );
    }

    #[test]
    fn dated_prices_aliases_and_upstream_prices_are_read() {
        let c = load(
            Some(
                r#"
                [[pricing."m"]]
                input_per_million = 1.0
                output_per_million = 2.0
                since = 2026-01-01
                [[pricing."m"]]
                input_per_million = 3.0
                output_per_million = 4.0
                since = 2026-06-01
                [models]
                alias = { "my-deploy" = "gpt-4o" }
                [upstreams.azure]
                url = "https://example.openai.azure.com/openai"
                pricing_multiplier = 1.1
                [upstreams.azure.pricing."gpt-4o"]
                input_per_million = 5.0
                output_per_million = 6.0
                "#,
            ),
            &[(env::PRICING_FILE, "/tmp/prices.json")],
            &Flags::default(),
        )
        .unwrap();
        let since: Vec<_> = c.pricing.prices["m"].iter().map(|p| p.since).collect();
        assert_eq!(since, [Some(1_767_225_600), Some(1_780_272_000)]);
        assert_eq!(c.pricing.aliases["my-deploy"], "gpt-4o");
        let azure = &c.pricing.upstreams["azure"];
        assert_eq!(azure.multiplier_ppm, Some(1_100_000));
        assert!(azure.prices.contains_key("gpt-4o"));
        assert_eq!(
            c.pricing.file.as_deref(),
            Some(Path::new("/tmp/prices.json"))
        );
        let undated_twice = load(
            Some("[[pricing.m]]\ninput_per_million = 1.0\noutput_per_million = 1.0\n[[pricing.m]]\ninput_per_million = 1.0\noutput_per_million = 1.0\n"),
            &[],
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            undated_twice.contains("each needs `since`"),
            "{undated_twice}"
        );
    }
}
