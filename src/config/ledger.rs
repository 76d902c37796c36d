//! The ledger's settings: where it lives and how it writes.

use std::path::PathBuf;
use std::time::Duration;

use super::file::FileConfig;
use super::{
    ConfigError, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_PENDING_ROWS, Flags, Layers, default_data_dir,
    env, invalid, parse_bool, parse_duration,
};

/// A PostgreSQL URL for the ledger; its password never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct LedgerUrl {
    url: super::Secret,
    shown: String,
}

impl LedgerUrl {
    /// Checks a `postgres://` (or `postgresql://`) URL.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let Some((scheme, _)) = value.split_once("://") else {
            return Err("expected a postgres://user@host/database URL".into());
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(format!("expected a postgres:// URL, got a {scheme}:// one"));
        }
        let config = value
            .parse::<postgres::Config>()
            .map_err(|e| format!("not a usable PostgreSQL URL: {e}"))?;
        Ok(Self {
            url: super::Secret(value.to_owned()),
            shown: shown(scheme, &config),
        })
    }

    /// The URL itself, to connect with only.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The URL without its password or query, for logs and `/stats`.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// The URL as shown: made from what the driver read, never cut out of the text (a password
/// may hold a `/`, or sit in the query): user, `***` for a password, hosts, ports, database.
fn shown(scheme: &str, config: &postgres::Config) -> String {
    let user = match (config.get_user(), config.get_password()) {
        (Some(user), Some(_)) => format!("{user}:***@"),
        (Some(user), None) => format!("{user}@"),
        (None, Some(_)) => ":***@".to_owned(),
        (None, None) => String::new(),
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let database = config.get_dbname().unwrap_or_default();
    format!("{scheme}://{user}{}/{database}", hosts.join(","))
}

impl std::fmt::Debug for LedgerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// How the ledger writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PostgreSQL database the ledger is kept in instead of the SQLite file in `dir`.
    pub url: Option<LedgerUrl>,
    /// The directory holding the database and its lock file (with `url`: `budgets.json` is not
    /// kept there, the database holds budgets changed at run time).
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
    let url = match (
        &flags.ledger_url,
        layer.env.get(env::LEDGER_URL),
        &file.ledger_url,
    ) {
        (Some(url), _, _) => Some((url.as_str(), "--ledger-url")),
        (None, Some(url), _) => Some((url.as_str(), env::LEDGER_URL)),
        (None, None, Some(url)) => Some((url.as_str(), name)),
        (None, None, None) => None,
    }
    .filter(|(url, _)| !url.trim().is_empty())
    .map(|(url, from)| LedgerUrl::parse(url).map_err(|r| invalid("ledger_url", from, r)))
    .transpose()?;
    if !persist {
        if url.is_some() {
            return Err(invalid(
                "ledger_url",
                name,
                "a ledger URL needs persistence: drop --no-persist (persist = false)",
            ));
        }
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
        url,
        dir,
        flush_interval,
        max_pending_rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_url_shows_no_password_and_no_query() {
        let url =
            LedgerUrl::parse("postgres://meter:s3cret@db.internal:5433/ledger?sslmode=require")
                .unwrap();
        assert_eq!(url.shown(), "postgres://meter:***@db.internal:5433/ledger");
        assert_eq!(format!("{url:?}"), url.shown());
        assert!(url.expose().contains("s3cret"));
        let plain = LedgerUrl::parse("postgresql://meter@db/ledger").unwrap();
        assert_eq!(plain.shown(), "postgresql://meter@db:5432/ledger");
        // A password holding a `/`, or given in the query, is not shown either.
        for (given, hidden) in [
            ("postgres://u:pa/ss@h/db", "pa/ss"),
            ("postgres://u@h?password=secret", "secret"),
            ("postgres://u:p%40ss@h:1/db", "p%40ss"),
        ] {
            let url = LedgerUrl::parse(given).unwrap();
            assert!(!url.shown().contains(hidden), "{given}: {}", url.shown());
            assert!(url.shown().contains("u:***@h"), "{given}: {}", url.shown());
        }
        for bad in [
            "mysql://u@h/db",
            "db.internal/ledger",
            "postgres://u@h/db?sslmode=verify-full",
        ] {
            assert!(LedgerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
