//! The ledger's settings: where it lives and how it writes.

use std::path::PathBuf;
use std::time::Duration;

use super::file::FileConfig;
use super::{
    ConfigError, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_PENDING_ROWS, Flags, Layers, default_data_dir,
    env, invalid, parse_bool, parse_duration,
};

/// How the ledger writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding the database and its lock file.
    pub dir: PathBuf,
    /// Longest time a recorded row waits before it is committed.
    pub flush_interval: Duration,
    /// Rows kept in memory while the disk refuses them; past it the oldest are given up (and counted).
    pub max_pending_rows: usize,
}

/// The ledger's options, or `None` when nothing is persisted (`--no-persist`, `persist = false`).
pub(super) fn options(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
) -> Result<Option<Options>, ConfigError> {
    let name = layer.file_name;
    let persist = if flags.no_persist {
        false
    } else if let Some(v) = layer.env.get(env::PERSIST) {
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
    if !persist {
        return Ok(None);
    }
    let dir = match (
        &flags.data_dir,
        layer.env.get(env::DATA_DIR),
        &file.data_dir,
    ) {
        (Some(dir), _, _) => dir.clone(),
        (None, Some(dir), _) => PathBuf::from(dir),
        (None, None, Some(dir)) => dir.clone(),
        (None, None, None) => default_data_dir(layer.env).ok_or_else(|| {
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
    let flush_interval = parse_duration(
        file.flush_interval
            .as_deref()
            .unwrap_or(DEFAULT_FLUSH_INTERVAL),
    )
    .map_err(|r| invalid("flush_interval", name, r))?;
    if flush_interval.is_zero() || flush_interval > Duration::from_secs(60) {
        return Err(invalid(
            "flush_interval",
            name,
            "must be more than 0 and at most 60s",
        ));
    }
    let max_pending_rows = file.max_pending_rows.unwrap_or(DEFAULT_MAX_PENDING_ROWS);
    if max_pending_rows == 0 {
        return Err(invalid("max_pending_rows", name, "must be at least 1"));
    }
    Ok(Some(Options {
        dir,
        flush_interval,
        max_pending_rows,
    }))
}
