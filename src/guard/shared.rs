//! The guard's side of replicas sharing one ledger: what this replica spent and used of its
//! rate limits, to publish; the others' spend and use, to admit against; budgets changed on
//! another replica.

use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;

use super::period::{self, Period};
use super::{Budget, Guard};
use crate::meter::ledger::pg::shared::Spend;
use crate::money::NanoUsd;

/// Saves a budget changed at run time where every replica reads it.
type Save = Box<dyn Fn(&str, &Budget) -> Result<(), String> + Send + Sync>;

/// Where runtime budget changes go with a shared ledger; empty without one.
#[derive(Default)]
pub struct BudgetStore(OnceLock<Save>);

impl BudgetStore {
    pub(super) fn get(&self) -> Option<&Save> {
        self.0.get()
    }
}

/// The rate-limit units, in the order of `KeyState::used`.
pub const UNITS: [&str; 2] = ["requests", "tokens"];

/// The name of the clock hour's window in the shared spend.
const HOURLY: &str = "hourly";

impl Guard {
    /// The windows spend is counted in now: each period's and the clock hour's.
    pub fn windows(&self) -> Vec<(&'static str, i64)> {
        let now = self.clock.now();
        let mut windows: Vec<(&'static str, i64)> = Period::ALL
            .into_iter()
            .map(|p| (p.as_str(), period::window(p, now, &self.timezone).start))
            .collect();
        windows.push((HOURLY, period::hour(now).start));
        windows
    }

    /// What this replica spent in the current windows, per scope: every named key's, budget or
    /// not, so a budget given later (in proxy.toml, then a restart, or by another replica)
    /// counts what was spent before it.
    pub fn own_spend(&self) -> Vec<Spend> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for scope in self.scopes() {
            let mut state = scope.state.lock();
            state.roll(now, &self.timezone);
            let periods = Period::ALL.into_iter().map(Period::as_str).chain([HOURLY]);
            let spent = state.spent.iter().chain([&state.hour]);
            for (period, spent) in periods.zip(spent) {
                out.push(Spend {
                    scope: scope.name.clone(),
                    period,
                    window_start: spent.window.start,
                    nano: spent.nano,
                });
            }
        }
        out
    }

    /// Takes the other replicas' spend in the current windows (none listed: zero), and fires
    /// the thresholds the sum has crossed.
    pub fn set_others_spend(&self, others: &[Spend]) {
        let now = self.clock.now();
        let find = |scope: &str, period: &str, start: i64| {
            others
                .iter()
                .find(|s| s.scope == scope && s.period == period && s.window_start == start)
                .map_or(0, |s| s.nano)
        };
        for scope in self.scopes() {
            {
                let mut state = scope.state.lock();
                state.roll(now, &self.timezone);
                for (spent, period) in state.spent.iter_mut().zip(Period::ALL) {
                    spent.remote = find(&scope.name, period.as_str(), spent.window.start);
                }
                let hour = state.hour.window.start;
                state.hour.remote = find(&scope.name, HOURLY, hour);
            }
            self.add_spend(scope, NanoUsd(0), now);
        }
    }

    /// This replica's use of each named key's per-minute limits since start: (name, unit, used).
    pub fn own_rate_use(&self) -> Vec<(String, &'static str, u64)> {
        let mut out = Vec::new();
        for key in &self.keys {
            let limits = [
                key.settings.requests_per_minute,
                key.settings.tokens_per_minute,
            ];
            for ((limit, used), unit) in limits.iter().zip(&key.used).zip(UNITS) {
                if limit.is_some() {
                    out.push((key.settings.name.clone(), unit, used.load(Relaxed)));
                }
            }
        }
        out
    }

    /// Takes what other replicas used of a key's limit since the last sync, how many replicas
    /// (this one counted) share it, and whether another one is taking from it now.
    pub fn sync_rate(
        &self,
        name: &str,
        unit: &str,
        used_elsewhere: u64,
        replicas: u32,
        others_busy: bool,
    ) {
        let Some(key) = self.key_named(name) else {
            return;
        };
        let (bucket, limit) = match unit {
            "requests" => (&key.requests, key.settings.requests_per_minute),
            "tokens" => (&key.tokens, key.settings.tokens_per_minute),
            _ => return,
        };
        let Some(limit) = limit else { return };
        let now = self.clock.now().as_microsecond();
        bucket
            .lock()
            .get_or_insert_with(|| super::rate::Bucket::new(limit, now))
            .sync(used_elsewhere, replicas, others_busy, now);
    }

    /// Names of the keys with a per-minute limit.
    pub fn limited_keys(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .filter(|k| {
                k.settings.requests_per_minute.is_some() || k.settings.tokens_per_minute.is_some()
            })
            .map(|k| k.settings.name.as_str())
    }

    /// Saves budgets changed at run time with `save` (the shared ledger) from now on, instead
    /// of `budgets.json`. Set once.
    pub fn set_budget_store(&self, save: Save) {
        if self.budget_store.0.set(save).is_err() {
            tracing::warn!("the budget store is set already");
        }
    }
}
