//! How the service serves: where it listens, its threads and log format, its timeouts, and the
//! bounds on what clients may make it hold (body size, connections, tracked keys and models).

use std::net::SocketAddr;
use std::time::Duration;

use super::file::FileConfig;
use super::{
    ConfigError, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_MODELS_PER_KEY, DEFAULT_MAX_TRACKED_KEYS,
    DEFAULT_METRICS_MAX_SERIES, Flags, Layers, LogFormat, MAX_THREADS, OnClientDisconnect, Secret,
    default_threads, env, invalid, parse_duration, parse_listen,
};

/// Where the service listens.
pub(super) struct Addresses {
    pub(super) listen: SocketAddr,
    pub(super) admin_listen: Option<SocketAddr>,
}

/// The main address, and our own endpoints' when they have one of their own.
pub(super) fn addresses(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
) -> Result<Addresses, ConfigError> {
    let (listen, from) = layer.pick(
        flags.listen.as_deref(),
        env::LISTEN,
        file.listen.as_deref(),
        DEFAULT_LISTEN,
    );
    let listen = parse_listen(listen).map_err(|reason| invalid("listen", &from, reason))?;
    let admin_listen = match layer.pick_optional(
        flags.admin_listen.as_deref(),
        env::ADMIN_LISTEN,
        file.admin_listen.as_deref(),
    ) {
        Some((value, from)) => {
            let addr = parse_listen(value).map_err(|r| invalid("admin_listen", &from, r))?;
            if addr == listen && addr.port() != 0 {
                return Err(invalid("admin_listen", &from, "must differ from `listen`"));
            }
            Some(addr)
        }
        None => None,
    };
    Ok(Addresses {
        listen,
        admin_listen,
    })
}

/// The log line format.
pub(super) fn log_format(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
) -> Result<LogFormat, ConfigError> {
    let (log_format, from) = layer.pick(
        flags.log_format.as_deref(),
        env::LOG_FORMAT,
        file.log_format.as_deref(),
        "text",
    );
    match log_format {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid(
            "log_format",
            &from,
            format!("expected \"text\" or \"json\", got {other:?}"),
        )),
    }
}

/// Worker threads: one per core by default, at most `MAX_THREADS`.
pub(super) fn threads(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
) -> Result<usize, ConfigError> {
    let file_threads = file.threads.map(|n| n.to_string());
    let default_threads = default_threads().to_string();
    let (threads, from) = layer.pick(
        flags.threads.as_deref(),
        env::THREADS,
        file_threads.as_deref(),
        &default_threads,
    );
    threads
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_THREADS).contains(n))
        .ok_or_else(|| {
            invalid(
                "threads",
                &from,
                format!("expected a whole number from 1 to {MAX_THREADS}, got {threads:?}"),
            )
        })
}

/// The admin token: the environment's, else the file's; an empty one is none.
pub(super) fn admin_token(layer: &Layers<'_>, file: &FileConfig) -> Option<Secret> {
    layer
        .env
        .get(env::ADMIN_TOKEN)
        .cloned()
        .or_else(|| file.admin_token.clone())
        .filter(|t| !t.is_empty())
        .map(Secret)
}

/// Every timeout of the service.
pub(super) struct Timeouts {
    pub(super) connect: Duration,
    pub(super) response: Duration,
    pub(super) idle: Duration,
    pub(super) shutdown_grace: Duration,
    pub(super) header: Duration,
    pub(super) keepalive: Duration,
    pub(super) drain: Duration,
}

/// The timeouts, from the file or their defaults.
pub(super) fn timeouts(layer: &Layers<'_>, file: &FileConfig) -> Result<Timeouts, ConfigError> {
    let duration = |field: &str, value: &Option<String>, default: &str| {
        parse_duration(value.as_deref().unwrap_or(default))
            .map_err(|r| invalid(field, layer.file_name, r))
    };
    Ok(Timeouts {
        connect: duration("connect_timeout", &file.connect_timeout, "10s")?,
        response: duration("response_timeout", &file.response_timeout, "10m")?,
        idle: duration("idle_timeout", &file.idle_timeout, "5m")?,
        shutdown_grace: duration("shutdown_grace", &file.shutdown_grace, "30s")?,
        header: duration(
            "header_timeout",
            &file.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        )?,
        keepalive: duration(
            "keepalive_timeout",
            &file.keepalive_timeout,
            DEFAULT_KEEPALIVE_TIMEOUT,
        )?,
        drain: duration("drain_timeout", &file.drain_timeout, "2m")?,
    })
}

/// The bounds on what clients may make the service hold.
pub(super) struct Bounds {
    pub(super) max_body_bytes: usize,
    pub(super) max_connections: Option<usize>,
    pub(super) max_tracked_keys: usize,
    pub(super) max_models_per_key: usize,
    pub(super) metrics_max_series: usize,
}

/// The bounds, from the file or their defaults; each at least 1.
pub(super) fn bounds(layer: &Layers<'_>, file: &FileConfig) -> Result<Bounds, ConfigError> {
    let name = layer.file_name;
    let max_body_bytes = usize::try_from(file.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES))
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid("max_body_bytes", name, "must be a positive number of bytes"))?;
    let at_least_one = |field: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(invalid(field, name, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(Bounds {
        max_body_bytes,
        max_connections: file
            .max_connections
            .map(|n| at_least_one("max_connections", Some(n), n))
            .transpose()?,
        max_tracked_keys: at_least_one(
            "max_tracked_keys",
            file.max_tracked_keys,
            DEFAULT_MAX_TRACKED_KEYS,
        )?,
        max_models_per_key: at_least_one(
            "max_models_per_key",
            file.max_models_per_key,
            DEFAULT_MAX_MODELS_PER_KEY,
        )?,
        metrics_max_series: at_least_one(
            "metrics_max_series",
            file.metrics_max_series,
            DEFAULT_METRICS_MAX_SERIES,
        )?,
    })
}

/// What to do with an upstream stream whose client left.
pub(super) fn on_client_disconnect(
    layer: &Layers<'_>,
    file: &FileConfig,
) -> Result<OnClientDisconnect, ConfigError> {
    match file.on_client_disconnect.as_deref() {
        None | Some("close") => Ok(OnClientDisconnect::Close),
        Some("drain") => Ok(OnClientDisconnect::Drain),
        Some(other) => Err(invalid(
            "on_client_disconnect",
            layer.file_name,
            format!("expected \"close\" or \"drain\", got {other:?}"),
        )),
    }
}
