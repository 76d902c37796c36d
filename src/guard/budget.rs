//! Budget windows and thresholds: the spend of one scope (a named key, or all keys) in the
//! current day, month, total and clock hour, rolled into new windows as time passes.

use jiff::tz::TimeZone;
use parking_lot::Mutex;

use super::period::{self, Period, Window};
use crate::config::guard::Budget;
use crate::money::NanoUsd;

impl Budget {
    /// The limit of one period.
    pub fn get(&self, period: Period) -> Option<NanoUsd> {
        match period {
            Period::Daily => self.daily,
            Period::Monthly => self.monthly,
            Period::Total => self.total,
        }
    }

    pub(super) fn any(&self) -> bool {
        self.daily.is_some() || self.monthly.is_some() || self.total.is_some()
    }
}

/// Spend of one period, in its current window.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spent {
    pub(super) window: Window,
    pub(super) nano: u64,
    /// What the other replicas spent in this window, as last read from the shared ledger.
    pub(super) remote: u64,
    /// The highest alert threshold already fired in this window (percent).
    pub(super) fired: u32,
}

impl Spent {
    /// This replica's spend and the others'.
    pub(super) fn total(&self) -> u64 {
        self.nano.saturating_add(self.remote)
    }

    /// When the window ends, as shown; `None` for the total, which never resets.
    pub(super) fn resets_at(&self, period: Period) -> Option<String> {
        (period != Period::Total).then(|| period::rfc3339(self.window.end))
    }
}

/// How messages name a scope: `key "agent-a"`, or `all keys`.
pub(super) fn whose(scope: &str) -> String {
    if scope == GLOBAL {
        "all keys".to_owned()
    } else {
        format!("key {scope:?}")
    }
}

/// Budget state of one scope (a named key, or global).
#[derive(Debug)]
pub(super) struct ScopeState {
    pub(super) budget: Budget,
    pub(super) spent: [Spent; 3],
    pub(super) hour: Spent,
}

/// One scope: a name and its state.
#[derive(Debug)]
pub(super) struct Scope {
    pub(super) name: String,
    pub(super) state: Mutex<ScopeState>,
}

pub(super) const GLOBAL: &str = "global";

impl Scope {
    pub(super) fn new(name: &str, budget: Budget) -> Self {
        let empty = Spent {
            window: Window { start: 0, end: 0 },
            nano: 0,
            remote: 0,
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
    pub(super) fn roll(&mut self, now: jiff::Timestamp, tz: &TimeZone) {
        let at = now.as_microsecond();
        for (spent, period) in self.spent.iter_mut().zip(Period::ALL) {
            if !spent.window.contains(at) {
                *spent = Spent {
                    window: period::window(period, now, tz),
                    nano: 0,
                    remote: 0,
                    fired: 0,
                };
            }
        }
        if !self.hour.window.contains(at) {
            self.hour = Spent {
                window: period::hour(now),
                nano: 0,
                remote: 0,
                fired: 0,
            };
        }
    }

    /// The first period whose budget is spent.
    pub(super) fn exhausted(&self) -> Option<(Period, NanoUsd, Spent)> {
        Period::ALL
            .into_iter()
            .zip(self.spent)
            .find_map(|(period, spent)| {
                let limit = self.budget.get(period)?;
                (spent.total() >= limit.0).then_some((period, limit, spent))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(time: &str) -> jiff::Timestamp {
        time.parse().unwrap()
    }

    #[test]
    fn spend_is_kept_within_its_window_and_zeroed_when_a_new_one_starts() {
        let scope = Scope::new(
            "agent",
            Budget {
                daily: Some(NanoUsd(100)),
                monthly: Some(NanoUsd(1_000)),
                ..Budget::default()
            },
        );
        let mut state = scope.state.lock();
        let utc = TimeZone::UTC;
        state.roll(at("2026-12-06T10:00:00Z"), &utc);
        state.spent[0].nano = 150;
        state.spent[1].nano = 150;
        state.roll(at("2026-12-06T23:59:59Z"), &utc);
        assert_eq!(state.spent[0].nano, 150);
        let (period, limit, spent) = state.exhausted().unwrap();
        assert_eq!(
            (period, limit, spent.nano),
            (Period::Daily, NanoUsd(100), 150)
        );
        assert_eq!(
            spent.resets_at(period).as_deref(),
            Some("2026-12-07T00:00:00Z")
        );
        state.roll(at("2026-12-07T00:00:00Z"), &utc);
        assert_eq!(state.spent[0].nano, 0, "a new day");
        assert_eq!(state.spent[1].nano, 150, "the same month");
        assert!(state.exhausted().is_none());
    }

    #[test]
    fn a_period_without_a_limit_is_never_exhausted() {
        let scope = Scope::new(GLOBAL, Budget::default());
        let mut state = scope.state.lock();
        state.roll(at("2026-12-06T10:00:00Z"), &TimeZone::UTC);
        state.spent = [Spent {
            nano: u64::MAX,
            ..state.spent[0]
        }; 3];
        assert!(state.exhausted().is_none());
        assert!(!state.budget.any());
        assert_eq!(whose(GLOBAL), "all keys");
        assert_eq!(whose("agent"), "key \"agent\"");
    }
}
