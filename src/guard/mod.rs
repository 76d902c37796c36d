//! Admission control: named and virtual keys, budgets per key and global, per-minute rate
//! limits, alerts at budget thresholds, on anomalies and on unpriced models.
//!
//! A request is checked before it is forwarded (`Guard::admit`); its cost and tokens are added
//! when it is recorded (`Guard::on_record`), the moment the meter counts it. Spend is counted in
//! calendar periods of the budget time zone and restored from the ledger on start.

pub mod alerts;
mod budget;
pub mod overrides;
pub mod period;
pub mod rate;
mod refusal;
pub mod shared;
pub mod unpriced;
mod view;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use parking_lot::Mutex;

use crate::config::Secret;
pub use crate::config::guard::{
    Budget, DEFAULT_LARGE_REQUEST_TOKENS, DEFAULT_THRESHOLDS, KeySettings, Settings,
};
use crate::money::NanoUsd;
use alerts::{Alert, Alerts};
use budget::{GLOBAL, Scope};
use overrides::load_overrides;
pub use overrides::{AdminError, OVERRIDES_FILE};
use period::{Clock, Period};
use rate::Bucket;
pub use refusal::Refusal;
pub use view::{BudgetLine, GuardView, KeyView};

/// A named key at run time.
struct KeyState {
    settings: KeySettings,
    /// Its identity id (the stable prefix of its SHA-256), as `/stats` and the ledger know it.
    id: String,
    scope: Scope,
    requests: Mutex<Option<Bucket>>,
    tokens: Mutex<Option<Bucket>>,
    /// Requests admitted and tokens spent under its limits since start, which replicas
    /// sharing a ledger tell one another.
    used: [std::sync::atomic::AtomicU64; 2],
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
    /// The unpriced models alerted today.
    unpriced: unpriced::Seen,
    /// Where runtime budget changes are kept (`budgets.json`); `None` without persistence.
    overrides: Option<PathBuf>,
    /// With a shared ledger: saves a runtime budget change there instead.
    budget_store: shared::BudgetStore,
}

/// Spend in the current windows, per key id, as read from the ledger on start.
#[derive(Debug, Default)]
pub struct RestoredSpend {
    /// Per period (daily, monthly, total), then per key id, nano-dollars.
    pub by_period: [HashMap<String, u64>; 3],
    /// The current clock hour, per key id.
    pub hour: HashMap<String, u64>,
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
                    overrides::say_overridden(&key.name, &key.budget, budget, overrides.as_deref());
                    key.budget = *budget;
                }
                KeyState {
                    id: crate::key::id_of_digest(&key.digest),
                    scope: Scope::new(&key.name, key.budget),
                    requests: Mutex::new(None),
                    tokens: Mutex::new(None),
                    used: Default::default(),
                    settings: key,
                }
            })
            .collect();
        let global = match saved.get(GLOBAL) {
            Some(budget) => {
                overrides::say_overridden(GLOBAL, &settings.global, budget, overrides.as_deref());
                *budget
            }
            None => settings.global,
        };
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
            unpriced: unpriced::Seen::default(),
            overrides,
            budget_store: shared::BudgetStore::default(),
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

    /// The tags a named key gives its requests by default.
    pub fn tags(&self, key: KeyRef) -> &crate::attribution::Tags {
        &self.keys[key.0].settings.tags
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
        if key.settings.requests_per_minute.is_some() {
            key.used[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
                spent: NanoUsd(spent.total()),
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
                key.used[1].fetch_add(total_tokens, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if prompt_tokens > self.large_request_tokens {
            let scope = key.map_or(caller, |k| k.settings.name.as_str());
            let message = format!(
                "{} sent one request of {prompt_tokens} prompt tokens (more than the {} of large_request_tokens)",
                alerts::subject(scope),
                self.large_request_tokens
            );
            self.alerts.fire(Alert {
                prompt_tokens: Some(prompt_tokens),
                ..Alert::new(now, "large_request", scope, message)
            });
        }
    }

    /// Alerts that `part` of a recorded request of `model` on `upstream` had no price: the first
    /// time in the UTC day (see `unpriced::PER_DAY` for the bound).
    pub fn on_unpriced(&self, upstream: &str, model: &str, part: unpriced::Part) {
        let now = self.clock.now();
        if self.unpriced.is_first_today(now, upstream, model, part) {
            self.alerts
                .fire(unpriced::alert(now, upstream, model, part));
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
                let reached = self.crossed(entry.total(), limit).unwrap_or(0);
                for &threshold in &self.thresholds {
                    if threshold > entry.fired && threshold <= reached {
                        fired.push((period, threshold, limit, entry.total(), entry.window.start));
                    }
                }
                entry.fired = entry.fired.max(reached);
            }
            state.hour.nano += cost.0;
            // A key spending its day's budget in well under a day: its hour over a 24th of it.
            if let Some(daily) = budget.daily
                && scope.name != GLOBAL
                && state.hour.fired == 0
                && state.hour.total() > daily.0 / 24
            {
                state.hour.fired = 1;
                let spent = state.hour.total();
                let hour = state.hour.window.start;
                drop(state);
                let message = format!(
                    "{} spent {} this hour, more than a 24th of its daily budget of {daily}",
                    alerts::subject(&scope.name),
                    NanoUsd(spent),
                );
                self.alerts.fire(Alert {
                    period: Some("hourly"),
                    limit_usd: Some(NanoUsd(daily.0 / 24).as_usd()),
                    spent_usd: Some(NanoUsd(spent).as_usd()),
                    dedupe: Some(format!("hourly_spend/{hour}/{}", scope.name)),
                    ..Alert::new(now, "hourly_spend", &scope.name, message)
                });
            }
        }
        for (period, threshold, limit, spent, window) in fired {
            let message = format!(
                "{} reached {threshold}% of {} {} budget ({} of {limit})",
                alerts::subject(&scope.name),
                if scope.name == GLOBAL { "the" } else { "its" },
                period.as_str(),
                NanoUsd(spent),
            );
            self.alerts.fire(Alert {
                period: Some(period.as_str()),
                threshold_percent: Some(threshold),
                limit_usd: Some(limit.as_usd()),
                spent_usd: Some(NanoUsd(spent).as_usd()),
                // The limit is part of it: a budget changed fires its thresholds again.
                dedupe: Some(format!(
                    "budget_threshold/{}/{window}/{threshold}/{}/{}",
                    period.as_str(),
                    limit.0,
                    scope.name
                )),
                ..Alert::new(now, "budget_threshold", &scope.name, message)
            });
        }
    }

    /// True when any scope has a budget (from proxy.toml or `budgets.json`).
    pub fn has_budgets(&self) -> bool {
        self.scopes().any(|scope| scope.state.lock().budget.any())
    }

    /// Every scope: all keys together, then each named key.
    fn scopes(&self) -> impl Iterator<Item = &Scope> {
        std::iter::once(&self.global).chain(self.keys.iter().map(|k| &k.scope))
    }

    /// The named key of this name.
    fn key_named(&self, name: &str) -> Option<&KeyState> {
        self.keys.iter().find(|k| k.settings.name == name)
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
