//! The guard as `/stats` and `/admin/keys` show it: each scope's budgets with their spend.

use serde::Serialize;

use super::Guard;
use super::budget::Scope;
use super::period::Period;
use crate::money::NanoUsd;

impl Guard {
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
                    tags: k.settings.tags.clone(),
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
                    spent_usd: NanoUsd(spent.total()).as_usd(),
                    remaining_usd: NanoUsd(limit.0.saturating_sub(spent.total())).as_usd(),
                    resets_at: spent.resets_at(period),
                })
            })
            .collect()
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
    /// The tags its requests carry by default.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: crate::attribution::Tags,
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
