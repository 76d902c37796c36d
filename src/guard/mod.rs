//! Admission control: named and virtual keys, budgets per key and global, per-minute rate
//! limits, alerts at budget thresholds and on anomalies.
//!
//! A request is checked before it is forwarded (`Guard::admit`); its cost and tokens are added
//! when it is recorded (`Guard::on_record`), the moment the meter counts it. Spend is counted in
//! calendar periods of the budget time zone and restored from the ledger on start.

pub mod alerts;
pub mod period;
pub mod rate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use jiff::tz::TimeZone;
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::Secret;
pub use crate::config::guard::{
    Budget, DEFAULT_LARGE_REQUEST_TOKENS, DEFAULT_THRESHOLDS, KeySettings, Settings,
};
use crate::money::NanoUsd;
use alerts::{Alert, Alerts};
use period::{Clock, Period, Window};
use rate::Bucket;

/// The file, in the data directory, that keeps budgets changed at run time.
pub const OVERRIDES_FILE: &str = "budgets.json";

impl Budget {
    /// The limit of one period.
    pub fn get(&self, period: Period) -> Option<NanoUsd> {
        match period {
            Period::Daily => self.daily,
            Period::Monthly => self.monthly,
            Period::Total => self.total,
        }
    }

    fn any(&self) -> bool {
        self.daily.is_some() || self.monthly.is_some() || self.total.is_some()
    }
}

/// Spend of one period, in its current window.
#[derive(Debug, Clone, Copy)]
struct Spent {
    window: Window,
    nano: u64,
    /// The highest alert threshold already fired in this window (percent).
    fired: u32,
}

impl Spent {
    /// When the window ends, as shown; `None` for the total, which never resets.
    fn resets_at(&self, period: Period) -> Option<String> {
        (period != Period::Total).then(|| period::rfc3339(self.window.end))
    }
}

/// How messages name a scope: `key "agent-a"`, or `all keys`.
fn whose(scope: &str) -> String {
    if scope == GLOBAL {
        "all keys".to_owned()
    } else {
        format!("key {scope:?}")
    }
}

/// Budget state of one scope (a named key, or global).
#[derive(Debug)]
struct ScopeState {
    budget: Budget,
    spent: [Spent; 3],
    hour: Spent,
}

/// One scope: a name and its state.
#[derive(Debug)]
struct Scope {
    name: String,
    state: Mutex<ScopeState>,
}

const GLOBAL: &str = "global";

impl Scope {
    fn new(name: &str, budget: Budget) -> Self {
        let empty = Spent {
            window: Window { start: 0, end: 0 },
            nano: 0,
            fired: 0,
        };
        Self {
            name: name.to_owned(),
            state: Mutex::new(ScopeState {
                budget,
                spent: [empty; 3],
                hour: empty,
            }),
        }
    }
}

impl ScopeState {
    /// Moves every period to the window that holds `now`, zeroing those that ended.
    fn roll(&mut self, now: jiff::Timestamp, tz: &TimeZone) {
        let at = now.as_microsecond();
        for (spent, period) in self.spent.iter_mut().zip(Period::ALL) {
            if !spent.window.contains(at) {
                *spent = Spent {
                    window: period::window(period, now, tz),
                    nano: 0,
                    fired: 0,
                };
            }
        }
        if !self.hour.window.contains(at) {
            self.hour = Spent {
                window: period::hour(now),
                nano: 0,
                fired: 0,
            };
        }
    }

    /// The first period whose budget is spent.
    fn exhausted(&self) -> Option<(Period, NanoUsd, Spent)> {
        Period::ALL
            .into_iter()
            .zip(self.spent)
            .find_map(|(period, spent)| {
                let limit = self.budget.get(period)?;
                (spent.nano >= limit.0).then_some((period, limit, spent))
            })
    }
}

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The key is not one of the named keys and `require_known_keys` is on.
    #[error("this API key is not one of the keys llm-meter is configured to accept")]
    UnknownKey,
    /// A budget of the key (or the global one) is spent.
    #[error(
        "the {} budget of {} is spent: {} of {}; it resets at {}",
        period.as_str(),
        whose(scope),
        spent,
        limit,
        resets_at.as_deref().unwrap_or("never (a total budget)")
    )]
    BudgetExceeded {
        /// The key name, or `global`.
        scope: String,
        /// Which budget.
        period: Period,
        /// The budget.
        limit: NanoUsd,
        /// What was spent in the period.
        spent: NanoUsd,
        /// When the period ends (RFC 3339); `None` for the total budget.
        resets_at: Option<String>,
    },
    /// A per-minute rate limit of the key is reached.
    #[error(
        "key {scope:?} is over its limit of {limit} {unit} per minute; retry after {} s",
        retry_after.as_secs_f64().ceil()
    )]
    RateLimited {
        /// The key name.
        scope: String,
        /// `requests` or `tokens`.
        unit: &'static str,
        /// The limit per minute.
        limit: u64,
        /// How long until a request would be admitted.
        retry_after: Duration,
    },
}

impl Refusal {
    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownKey => StatusCode::UNAUTHORIZED,
            Self::BudgetExceeded { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = format!("llm-meter: {self}");
        let (status, body, retry_after) = match &self {
            Self::UnknownKey => (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                    "code": "invalid_api_key", "param": null}}),
                None,
            ),
            Self::BudgetExceeded {
                scope,
                period,
                limit,
                spent,
                resets_at,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": {"message": message, "type": "budget_exceeded",
                    "code": "budget_exceeded", "param": null,
                    "budget": {"scope": scope, "period": period.as_str(),
                        "limit_usd": limit.as_usd(), "spent_usd": spent.as_usd(),
                        "resets_at": resets_at}}}),
                None,
            ),
            Self::RateLimited {
                unit,
                limit,
                retry_after,
                ..
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": {"message": message, "type": "rate_limit_exceeded",
                    "code": "rate_limit_exceeded", "param": null,
                    "limit": {"unit": unit, "per_minute": limit}}}),
                Some(retry_after.as_secs_f64().ceil().max(1.0)),
            ),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        match retry_after {
            Some(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
            }
            // OpenAI's and Anthropic's SDKs retry a 429 unless told not to: a spent budget
            // or a refused key does not get better in a few seconds.
            None => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        response
    }
}

/// A named key at run time.
struct KeyState {
    settings: KeySettings,
    /// Its identity id (the stable prefix of its SHA-256), as `/stats` and the ledger know it.
    id: String,
    scope: Scope,
    requests: Mutex<Option<Bucket>>,
    tokens: Mutex<Option<Bucket>>,
}

/// A named key, as the proxy sees it for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef(usize);

/// Admission control and spend of all keys.
pub struct Guard {
    by_digest: HashMap<[u8; 32], usize>,
    keys: Vec<KeyState>,
    global: Scope,
    require_known_keys: bool,
    timezone: TimeZone,
    thresholds: Vec<u32>,
    large_request_tokens: u64,
    clock: Arc<dyn Clock>,
    alerts: Alerts,
    /// Where runtime budget changes are kept (`budgets.json`); `None` without persistence.
    overrides: Option<PathBuf>,
}

/// Spend in the current windows, per key id, as read from the ledger on start.
#[derive(Debug, Default)]
pub struct RestoredSpend {
    /// Per period (daily, monthly, total), then per key id, nano-dollars.
    pub by_period: [HashMap<String, u64>; 3],
    /// The current clock hour, per key id.
    pub hour: HashMap<String, u64>,
}

/// Why an admin change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No named key has this name.
    #[error("no key is named {0:?}")]
    UnknownKey(String),
    /// A budget value is not usable.
    #[error("{0}")]
    Invalid(String),
    /// The change could not be saved.
    #[error("cannot save {path}: {reason}")]
    Save {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl Guard {
    /// The guard of these settings, with `alerts` as its alert sink, reading time from `clock`,
    /// keeping runtime budget changes in `data_dir` (when persisting).
    pub fn new(
        settings: Settings,
        clock: Arc<dyn Clock>,
        alerts: Alerts,
        data_dir: Option<&std::path::Path>,
    ) -> Self {
        let overrides = data_dir.map(|dir| dir.join(OVERRIDES_FILE));
        let saved = overrides.as_deref().map(load_overrides).unwrap_or_default();
        let keys: Vec<KeyState> = settings
            .keys
            .into_iter()
            .map(|mut key| {
                if let Some(budget) = saved.get(&key.name) {
                    key.budget = *budget;
                }
                KeyState {
                    id: crate::key::id_of_digest(&key.digest),
                    scope: Scope::new(&key.name, key.budget),
                    requests: Mutex::new(None),
                    tokens: Mutex::new(None),
                    settings: key,
                }
            })
            .collect();
        let global = saved.get(GLOBAL).copied().unwrap_or(settings.global);
        Self {
            by_digest: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.settings.digest, i))
                .collect(),
            keys,
            global: Scope::new(GLOBAL, global),
            require_known_keys: settings.require_known_keys,
            timezone: settings.timezone,
            thresholds: settings.thresholds,
            large_request_tokens: settings.large_request_tokens,
            clock,
            alerts,
            overrides,
        }
    }

    /// The named key whose client key has this SHA-256, if any.
    pub fn find(&self, digest: &[u8; 32]) -> Option<KeyRef> {
        self.by_digest.get(digest).copied().map(KeyRef)
    }

    /// The name of a named key.
    pub fn name(&self, key: KeyRef) -> &str {
        &self.keys[key.0].settings.name
    }

    /// The key to send upstream instead of the client's, for a virtual key.
    pub fn upstream_key(&self, key: KeyRef) -> Option<&Secret> {
        self.keys[key.0].settings.upstream_key.as_ref()
    }

    /// The alerts fired so far.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    /// The current time, as budgets see it.
    pub fn now(&self) -> jiff::Timestamp {
        self.clock.now()
    }

    /// The time zone of daily and monthly budgets.
    pub fn timezone(&self) -> &TimeZone {
        &self.timezone
    }

    /// Sets the spend of the current windows from the ledger, and marks the thresholds already
    /// crossed as fired, so a restart neither forgets spend nor repeats alerts.
    pub fn restore(&self, spend: &RestoredSpend) {
        let now = self.clock.now();
        let sum_all = |m: &HashMap<String, u64>| m.values().sum::<u64>();
        self.restore_scope(
            &self.global,
            now,
            |i| sum_all(&spend.by_period[i]),
            sum_all(&spend.hour),
        );
        for key in &self.keys {
            let of = |m: &HashMap<String, u64>| m.get(&key.id).copied().unwrap_or(0);
            self.restore_scope(
                &key.scope,
                now,
                |i| of(&spend.by_period[i]),
                of(&spend.hour),
            );
        }
    }

    fn restore_scope(
        &self,
        scope: &Scope,
        now: jiff::Timestamp,
        spent: impl Fn(usize) -> u64,
        hour: u64,
    ) {
        let mut state = scope.state.lock();
        state.roll(now, &self.timezone);
        let budget = state.budget;
        for (i, (entry, period)) in state.spent.iter_mut().zip(Period::ALL).enumerate() {
            entry.nano = spent(i);
            entry.fired = budget
                .get(period)
                .map_or(0, |limit| self.crossed(entry.nano, limit).unwrap_or(0));
        }
        state.hour.nano = hour;
    }

    /// The highest threshold that `spent` has reached of `limit`, if any.
    fn crossed(&self, spent: u64, limit: NanoUsd) -> Option<u32> {
        self.thresholds
            .iter()
            .rev()
            .find(|t| u128::from(spent) * 100 >= u128::from(limit.0) * u128::from(**t))
            .copied()
    }

    /// True when keys are named: only then is a request's key looked up.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Refuses unknown keys when only named keys are accepted (every route, metered or not).
    pub fn authenticate(&self, key: Option<KeyRef>) -> Result<(), Refusal> {
        if key.is_none() && self.require_known_keys {
            return Err(Refusal::UnknownKey);
        }
        Ok(())
    }

    /// Decides whether a metered request of this caller may be forwarded now: its key, the
    /// global budget, its key's budgets and rate limits.
    pub fn admit(&self, key: Option<KeyRef>) -> Result<(), Refusal> {
        self.authenticate(key)?;
        let now = self.clock.now();
        self.check_budget(&self.global, now)?;
        let Some(key) = key.map(|k| &self.keys[k.0]) else {
            return Ok(());
        };
        self.check_budget(&key.scope, now)?;
        let at = now.as_microsecond();
        let name = &key.settings.name;
        // Tokens first: a request refused for its tokens does not use up a request.
        within(
            &key.tokens,
            key.settings.tokens_per_minute,
            "tokens",
            name,
            |b| b.check(at),
            at,
        )?;
        within(
            &key.requests,
            key.settings.requests_per_minute,
            "requests",
            name,
            |b| b.take_one(at),
            at,
        )?;
        Ok(())
    }

    fn check_budget(&self, scope: &Scope, now: jiff::Timestamp) -> Result<(), Refusal> {
        let mut state = scope.state.lock();
        state.roll(now, &self.timezone);
        match state.exhausted() {
            None => Ok(()),
            Some((period, limit, spent)) => Err(Refusal::BudgetExceeded {
                scope: scope.name.clone(),
                period,
                limit,
                spent: NanoUsd(spent.nano),
                resets_at: spent.resets_at(period),
            }),
        }
    }

    /// Adds a recorded request: its cost to the budgets, its tokens to the token limit; fires
    /// the alerts it causes. `caller` names the key in anomaly alerts when it is not a named one.
    pub fn on_record(
        &self,
        key: Option<KeyRef>,
        caller: &str,
        cost: NanoUsd,
        prompt_tokens: u64,
        total_tokens: u64,
    ) {
        let now = self.clock.now();
        let key = key.map(|k| &self.keys[k.0]);
        self.add_spend(&self.global, cost, now);
        if let Some(key) = key {
            self.add_spend(&key.scope, cost, now);
            if let Some(bucket) = key.tokens.lock().as_mut() {
                bucket.spend(total_tokens, now.as_microsecond());
            }
        }
        if prompt_tokens > self.large_request_tokens {
            let scope = key.map_or(caller, |k| k.settings.name.as_str());
            let message = format!(
                "one request of {scope} sent {prompt_tokens} prompt tokens (more than {})",
                self.large_request_tokens
            );
            self.alerts.fire(Alert {
                prompt_tokens: Some(prompt_tokens),
                ..Alert::new(now, "large_request", scope, message)
            });
        }
    }

    fn add_spend(&self, scope: &Scope, cost: NanoUsd, now: jiff::Timestamp) {
        let mut fired = Vec::new();
        {
            let mut state = scope.state.lock();
            state.roll(now, &self.timezone);
            let budget = state.budget;
            for (entry, period) in state.spent.iter_mut().zip(Period::ALL) {
                entry.nano += cost.0;
                let Some(limit) = budget.get(period) else {
                    continue;
                };
                // Every threshold passed since the last alert fires, each once per period.
                let reached = self.crossed(entry.nano, limit).unwrap_or(0);
                for &threshold in &self.thresholds {
                    if threshold > entry.fired && threshold <= reached {
                        fired.push((period, threshold, limit, entry.nano));
                    }
                }
                entry.fired = entry.fired.max(reached);
            }
            state.hour.nano += cost.0;
            // A key spending its day's budget in well under a day: its hour over a 24th of it.
            if let Some(daily) = budget.daily
                && scope.name != GLOBAL
                && state.hour.fired == 0
                && state.hour.nano > daily.0 / 24
            {
                state.hour.fired = 1;
                let spent = state.hour.nano;
                drop(state);
                let message = format!(
                    "key {:?} spent {} this hour, more than a 24th of its daily budget ({})",
                    scope.name,
                    NanoUsd(spent),
                    daily
                );
                self.alerts.fire(Alert {
                    period: Some("hourly"),
                    limit_usd: Some(NanoUsd(daily.0 / 24).as_usd()),
                    spent_usd: Some(NanoUsd(spent).as_usd()),
                    ..Alert::new(now, "hourly_spend", &scope.name, message)
                });
            }
        }
        for (period, threshold, limit, spent) in fired {
            let whose = whose(&scope.name);
            let message = format!(
                "{whose} reached {threshold}% of its {} budget: {} of {}",
                period.as_str(),
                NanoUsd(spent),
                limit
            );
            self.alerts.fire(Alert {
                period: Some(period.as_str()),
                threshold_percent: Some(threshold),
                limit_usd: Some(limit.as_usd()),
                spent_usd: Some(NanoUsd(spent).as_usd()),
                ..Alert::new(now, "budget_threshold", &scope.name, message)
            });
        }
    }

    /// The budget view of the global scope and of every named key, for `/stats` and `/admin/keys`.
    pub fn view(&self) -> GuardView {
        let now = self.clock.now();
        GuardView {
            timezone: self.timezone.iana_name().unwrap_or("UTC").to_owned(),
            global: self.scope_view(&self.global, now),
            keys: self
                .keys
                .iter()
                .map(|k| KeyView {
                    name: k.settings.name.clone(),
                    id: k.id.clone(),
                    is_virtual: k.settings.upstream_key.is_some(),
                    tokens_per_minute: k.settings.tokens_per_minute,
                    requests_per_minute: k.settings.requests_per_minute,
                    budget: self.scope_view(&k.scope, now),
                })
                .collect(),
        }
    }

    fn scope_view(&self, scope: &Scope, now: jiff::Timestamp) -> Vec<BudgetLine> {
        let mut state = scope.state.lock();
        state.roll(now, &self.timezone);
        Period::ALL
            .into_iter()
            .zip(state.spent)
            .filter_map(|(period, spent)| {
                let limit = state.budget.get(period)?;
                Some(BudgetLine {
                    period: period.as_str(),
                    limit_usd: limit.as_usd(),
                    spent_usd: NanoUsd(spent.nano).as_usd(),
                    remaining_usd: NanoUsd(limit.0.saturating_sub(spent.nano)).as_usd(),
                    resets_at: spent.resets_at(period),
                })
            })
            .collect()
    }

    /// Replaces the budgets of a named key (or `global`), and saves them in `budgets.json`.
    pub fn set_budget(&self, name: &str, budget: Budget) -> Result<(), AdminError> {
        let scope = if name == GLOBAL {
            &self.global
        } else {
            &self
                .keys
                .iter()
                .find(|k| k.settings.name == name)
                .ok_or_else(|| AdminError::UnknownKey(name.to_owned()))?
                .scope
        };
        {
            let mut state = scope.state.lock();
            state.budget = budget;
            // Thresholds are measured against the new budget: alert again when it is crossed.
            for (entry, period) in state.spent.iter_mut().zip(Period::ALL) {
                entry.fired = budget
                    .get(period)
                    .and_then(|limit| self.crossed(entry.nano, limit))
                    .unwrap_or(0);
            }
        }
        self.save_overrides()
    }

    fn save_overrides(&self) -> Result<(), AdminError> {
        let Some(path) = &self.overrides else {
            return Ok(());
        };
        let mut all: std::collections::BTreeMap<&str, Budget> = self
            .keys
            .iter()
            .map(|k| (k.settings.name.as_str(), k.scope.state.lock().budget))
            .collect();
        all.insert(GLOBAL, self.global.state.lock().budget);
        let fail = |reason: String| AdminError::Save {
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_vec_pretty(&all).map_err(|e| fail(e.to_string()))?;
        // Written aside and renamed over, so a crash never leaves half a file.
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, json).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&partial, path).map_err(|e| fail(e.to_string()))
    }

    /// True when any scope has a budget (from proxy.toml or `budgets.json`).
    pub fn has_budgets(&self) -> bool {
        std::iter::once(&self.global)
            .chain(self.keys.iter().map(|k| &k.scope))
            .any(|scope| scope.state.lock().budget.any())
    }
}

/// Applies one per-minute limit (when set) with `take` on its bucket, created full on first use.
fn within(
    bucket: &Mutex<Option<Bucket>>,
    limit: Option<u64>,
    unit: &'static str,
    name: &str,
    take: impl FnOnce(&mut Bucket) -> Result<(), Duration>,
    now: i64,
) -> Result<(), Refusal> {
    let Some(limit) = limit else { return Ok(()) };
    let mut bucket = bucket.lock();
    take(bucket.get_or_insert_with(|| Bucket::new(limit, now))).map_err(|retry_after| {
        Refusal::RateLimited {
            scope: name.to_owned(),
            unit,
            limit,
            retry_after,
        }
    })
}

/// Reads `budgets.json`; a missing file is no overrides, an unreadable one is logged and ignored.
fn load_overrides(path: &std::path::Path) -> HashMap<String, Budget> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            tracing::error!(path = %path.display(), %err, "cannot read the saved budgets: using proxy.toml's");
            HashMap::new()
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(err) => {
            tracing::error!(path = %path.display(), %err, "cannot read the saved budgets: using proxy.toml's");
            HashMap::new()
        }
    }
}

/// One budget of a scope, as shown.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetLine {
    /// `daily`, `monthly` or `total`.
    pub period: &'static str,
    /// The budget.
    pub limit_usd: f64,
    /// Spent in the current period.
    pub spent_usd: f64,
    /// What is left (never negative).
    pub remaining_usd: f64,
    /// When the period ends; absent for `total`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

/// A named key, as shown.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyView {
    /// Its name.
    pub name: String,
    /// Its id in `/stats` and the ledger.
    pub id: String,
    /// Its client key is replaced by another upstream.
    #[serde(rename = "virtual")]
    pub is_virtual: bool,
    /// Tokens per minute, if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute, if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Its budgets and their spend.
    pub budget: Vec<BudgetLine>,
}

/// The guard as shown.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GuardView {
    /// The budget time zone.
    pub timezone: String,
    /// The budget of all keys together.
    pub global: Vec<BudgetLine>,
    /// Every named key.
    pub keys: Vec<KeyView>,
}
