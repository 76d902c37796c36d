//! `AppState`: the configuration, the meter, the guard and the upstreams, built once and cheap to
//! clone; and which upstream prefix a path is under.

use std::ops::Deref;
use std::sync::Arc;

use crate::client;
use crate::cluster::Cluster;
use crate::config::egress::Egress;
use crate::config::{Config, Route};
use crate::guard::alerts::Alerts;
use crate::guard::period::{self, Clock, Period, SystemClock};
use crate::guard::{Guard, RestoredSpend};
use crate::meter::Meter;
use crate::meter::ledger::LedgerError;
use crate::meter::ledger::history::Reader;
use crate::meter::memory::Bounds;
use crate::meter::pricing;
use crate::metrics::Metrics;
use crate::otlp;
use crate::proxy::{self, UpstreamState};
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
    /// The series `/metrics` shows, counted per request.
    pub metrics: Arc<Metrics>,
    /// What is learned of each upstream while running, in the order of `config.routes`.
    pub upstreams: Vec<UpstreamState>,
    /// Named keys, budgets, rate limits and alerts.
    pub guard: Arc<Guard>,
    /// The background tasks (alert deliveries, drains), finished at shutdown.
    pub tasks: Tasks,
    /// The OpenTelemetry exporter's queue, when `otlp_endpoint` is set.
    pub spans: Option<Arc<otlp::Spans>>,
    /// The sync with other replicas, when the ledger is in PostgreSQL.
    pub cluster: Option<Arc<Cluster>>,
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
    /// The certificates upstream TLS trusts could not be loaded.
    #[error(transparent)]
    Trust(#[from] client::TrustError),
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A named price file could not be used.
    #[error(transparent)]
    Prices(#[from] pricing::load::LoadError),
}

/// Builds the dialers of upstreams, loading each distinct set of trusted certificates once.
#[derive(Default)]
struct Dialers {
    tls: Vec<(client::Trust, client::TlsClients)>,
}

impl Dialers {
    fn dial(
        &mut self,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
        egress: &Egress,
        config: &Config,
    ) -> Result<client::Dialer, StartError> {
        let tls = match self.tls.iter().find(|(trust, _)| *trust == egress.trust) {
            Some((_, tls)) => tls.clone(),
            None => {
                let tls = client::TlsClients::new(&egress.trust)?;
                self.tls.push((egress.trust.clone(), tls.clone()));
                tls
            }
        };
        let route = client::Route {
            proxy: egress.proxy.as_ref().map(|(proxy, _)| proxy.clone()),
            http2: egress.http2,
        };
        Ok(client::Dialer::new(
            scheme,
            authority,
            route,
            &tls,
            config.connect_timeout,
        ))
    }
}

/// Reads the settings and price files again and prices requests recorded from now on with
/// them (SIGHUP); returns what was read, or why nothing changed.
pub fn reload_prices(
    meter: &Meter,
    flags: &crate::config::Flags,
    env: &std::collections::HashMap<String, String>,
) -> Result<Vec<String>, String> {
    let config = Config::load(flags, env).map_err(|e| e.to_string())?;
    let loaded = pricing::load::load(&config.pricing).map_err(|e| e.to_string())?;
    let mut notes = vec![format!("sources {}", loaded.table.sources().join(", "))];
    notes.extend(loaded.notes);
    meter.set_prices(loaded.table);
    Ok(notes)
}

/// A dialer for one request of ours to `authority` (the price map's download), reached as the
/// egress rules say: through the proxy and with the CAs an upstream there would get.
pub fn dialer_for(
    config: &Config,
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
) -> Result<client::Dialer, StartError> {
    let mut egress = config.egress.for_target(scheme, authority);
    // One request per connection: HTTP/1.1 is all it needs.
    egress.http2 = client::Http2::Off;
    Dialers::default().dial(scheme, authority, &egress, config)
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
    /// What forwarding needs of the state, for one request.
    pub fn proxy(&self) -> proxy::Context<'_> {
        proxy::Context {
            config: &self.config,
            upstreams: &self.upstreams,
            meter: &self.meter,
            metrics: &self.metrics,
            guard: &self.guard,
            tasks: &self.tasks,
            spans: self.spans.as_ref(),
        }
    }

    /// The dialer of the OpenTelemetry collector (through the egress proxy its host is given),
    /// `None` for an endpoint without scheme or host (the config takes none).
    fn collector(
        dialers: &mut Dialers,
        settings: &crate::config::otlp::Settings,
        config: &Config,
    ) -> Result<Option<client::Dialer>, StartError> {
        let (Some(scheme), Some(authority)) =
            (settings.endpoint.scheme(), settings.endpoint.authority())
        else {
            return Ok(None);
        };
        let mut egress = config.egress.for_target(scheme, authority);
        // One post per connection: HTTP/1.1 is all it needs.
        egress.http2 = client::Http2::Off;
        Ok(Some(dialers.dial(scheme, authority, &egress, config)?))
    }

    /// Builds the state: the upstream client, and a meter with the configured prices whose
    /// totals are restored from the ledger (unless persistence is off).
    pub fn new(config: Config) -> Result<Self, StartError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Builds the state with budgets and rate limits reading time from `clock` (tests move it).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let mut dialers = Dialers::default();
        let bounds = Bounds {
            max_keys: config.max_tracked_keys,
            max_models_per_key: config.max_models_per_key,
        };
        let prices = pricing::load::load(&config.pricing)?;
        for note in &prices.notes {
            tracing::info!("prices: {note}");
        }
        let prices = prices.table;
        let meter = match &config.ledger {
            Some(options) => Meter::persistent_within(prices, options, bounds)?,
            None => Meter::in_memory_within(prices, bounds),
        };
        let meter = Arc::new(meter);
        let upstreams = config
            .routes
            .iter()
            .map(|route| {
                let upstream = &route.upstream;
                let dialer = dialers.dial(
                    &upstream.scheme,
                    &upstream.authority,
                    &route.egress,
                    &config,
                )?;
                Ok(UpstreamState::new(route, dialer, config.threads))
            })
            .collect::<Result<_, StartError>>()?;
        let tasks = Tasks::new();
        let mut webhooks = Vec::new();
        for webhook in &config.guard.webhooks {
            // The config takes only URLs with both.
            let (Some(scheme), Some(authority)) = (webhook.url.scheme(), webhook.url.authority())
            else {
                continue;
            };
            let mut egress = config.egress.for_target(scheme, authority);
            // One post per connection: HTTP/1.1 is all it needs.
            egress.http2 = client::Http2::Off;
            let dialer = dialers.dial(scheme, authority, &egress, &config)?;
            webhooks.push((webhook.clone(), dialer));
        }
        let alerts = Alerts::with_webhooks(webhooks, &tasks);
        let pool = meter.ledger().and_then(|l| l.pool()).cloned();
        // With a shared ledger, budgets changed at run time are kept in it, not budgets.json.
        let data_dir = config
            .ledger
            .as_ref()
            .filter(|_| pool.is_none())
            .map(|l| l.dir.as_path());
        let guard = Arc::new(Guard::new(config.guard.clone(), clock, alerts, data_dir));
        // Only budgets need the spend so far; without them the ledger is not read. A shared
        // ledger's spend comes from every replica's, read by the first sync.
        if let Some(dir) = data_dir
            && guard.has_budgets()
        {
            guard.restore(&spend_from_ledger(dir, &guard)?);
        }
        let cluster = match &pool {
            Some(pool) => Some(Arc::new(Cluster::start(pool, Arc::clone(&guard))?)),
            None => None,
        };
        // One set of series per worker (worker 0's also takes the records of estimates).
        let metrics = Arc::new(Metrics::new(config.metrics_max_series, config.threads));
        let spans = match &config.otlp {
            Some(settings) => {
                let dialer = Self::collector(&mut dialers, settings, &config)?;
                dialer.and_then(|d| otlp::start(settings, d, Arc::clone(&metrics), &tasks))
            }
            None => None,
        };
        Ok(Self(Arc::new(Shared {
            config,
            meter,
            metrics,
            upstreams,
            guard,
            tasks,
            spans,
            cluster,
        })))
    }
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
