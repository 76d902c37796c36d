//! `AppState`, the router of our own endpoints, and which upstream prefix a path is under.

use std::ops::Deref;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post, put};

use crate::api;
use crate::config::{Config, Route};
use crate::guard::alerts::Alerts;
use crate::guard::period::{self, Clock, Period, SystemClock};
use crate::guard::{Guard, RestoredSpend};
use crate::meter::Meter;
use crate::meter::ledger::LedgerError;
use crate::meter::ledger::history::Reader;
use crate::meter::memory::Bounds;
use crate::proxy::{self, UpstreamState, upstream};
use crate::tasks::Tasks;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The shared parts behind `AppState`.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Totals per key and model.
    pub meter: Arc<Meter>,
    /// What is learned of each upstream while running, in the order of `config.routes`.
    pub upstreams: Vec<UpstreamState>,
    /// Named keys, budgets, rate limits and alerts.
    pub guard: Arc<Guard>,
    /// The background tasks (alert deliveries, drains), finished at shutdown.
    pub tasks: Tasks,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS client could not be set up.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Spend per key id in the current hour, day, month and in total, read from the ledger.
fn spend_from_ledger(dir: &std::path::Path, guard: &Guard) -> Result<RestoredSpend, LedgerError> {
    let reader = Reader::open(dir)?;
    let now = guard.now();
    let mut spend = RestoredSpend::default();
    for (slot, period) in spend.by_period.iter_mut().zip(Period::ALL) {
        let window = period::window(period, now, guard.timezone());
        *slot = reader.spend_by_key((period != Period::Total).then_some(window.start))?;
    }
    spend.hour = reader.spend_by_key(Some(period::hour(now).start))?;
    Ok(spend)
}

impl AppState {
    /// Builds the state: the upstream client, and a meter with the configured prices whose
    /// totals are restored from the ledger (unless persistence is off).
    pub fn new(config: Config) -> Result<Self, StartError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Builds the state with budgets and rate limits reading time from `clock` (tests move it).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let connector = upstream::connector(&config)?;
        let bounds = Bounds {
            max_keys: config.max_tracked_keys,
            max_models_per_key: config.max_models_per_key,
        };
        let meter = match &config.ledger {
            Some(options) => Meter::persistent_within(config.prices.clone(), options, bounds)?,
            None => Meter::in_memory_within(config.prices.clone(), bounds),
        };
        let meter = Arc::new(meter);
        let upstreams = config
            .routes
            .iter()
            .map(|route| UpstreamState::new(route, connector.clone(), config.threads))
            .collect();
        let tasks = Tasks::new();
        let alerts = match &config.guard.webhook {
            Some(url) => {
                Alerts::with_webhook(url.clone(), upstream::webhook_client(connector), &tasks)
            }
            None => Alerts::new(),
        };
        let data_dir = config.ledger.as_ref().map(|l| l.dir.as_path());
        let guard = Guard::new(config.guard.clone(), clock, alerts, data_dir);
        // Only budgets need the spend so far; without them the ledger is not read.
        if let Some(dir) = data_dir
            && guard.has_budgets()
        {
            guard.restore(&spend_from_ledger(dir, &guard)?);
        }
        Ok(Self(Arc::new(Shared {
            config,
            meter,
            upstreams,
            guard: Arc::new(guard),
            tasks,
        })))
    }
}

/// Our own endpoints; anything else that is under no upstream's prefix gets a 404.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/stats", get(api::show))
        .route("/stats/reset", post(api::reset))
        .route("/usage", get(api::history::usage))
        .route("/export", get(api::history::export))
        .route("/healthz", get(api::healthz))
        .route("/alerts", get(api::admin::alerts))
        .route("/admin/keys", get(api::admin::keys))
        .route("/admin/keys/{name}/budget", put(api::admin::set_budget))
        .fallback(proxy::not_found)
        .with_state(state)
}

/// The upstream whose prefix `path` is under: the prefix itself or anything below it. Prefixes
/// never nest one another or our own endpoints (the config refuses it), so at most one matches.
pub fn upstream_of(routes: &[Route], path: &str) -> Option<usize> {
    routes.iter().position(|route| {
        path.strip_prefix(route.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;

    #[test]
    fn a_path_belongs_to_the_upstream_whose_prefix_it_is_or_is_under() {
        let toml =
            "[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"https://g.example/v1beta\"\n";
        let flags = Flags {
            no_persist: true,
            ..Flags::default()
        };
        let config = Config::from_layers(Some(toml), None, &Default::default(), &flags).unwrap();
        let index = |name: &str| config.routes.iter().position(|r| r.name == name);
        let (openai, gemini) = (index("openai"), index("gemini"));
        assert!(openai.is_some() && gemini.is_some() && openai != gemini);
        for (path, expected) in [
            ("/v1", openai),
            ("/v1/", openai),
            ("/v1/chat/completions", openai),
            ("/v1//models", openai),
            ("/gemini/v1beta/models/m:generateContent", gemini),
            ("/gemini/v1beta", gemini),
            ("/v1beta/models", None),
            ("/v10/models", None),
            ("/gemini/v1", None),
            ("/gemini", None),
            ("/stats", None),
            ("/", None),
            ("", None),
        ] {
            assert_eq!(upstream_of(&config.routes, path), expected, "{path}");
        }
    }
}
