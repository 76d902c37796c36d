//! Budgets changed at run time (`PUT /admin/keys/NAME/budget`) and their persistence in
//! `budgets.json` in the data directory, which wins over `proxy.toml` on the next start.

use std::collections::HashMap;

use super::Guard;
use super::budget::GLOBAL;
use super::period::Period;
use crate::config::guard::Budget;

/// The file, in the data directory, that keeps budgets changed at run time.
pub const OVERRIDES_FILE: &str = "budgets.json";

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
    /// Replaces the budgets of a named key (or `global`), and saves them in `budgets.json` (or,
    /// with a shared ledger, there, for every replica).
    pub fn set_budget(&self, name: &str, budget: Budget) -> Result<(), AdminError> {
        self.apply_budget(name, budget)?;
        if let Some(store) = self.budget_store.get() {
            return store(name, &budget).map_err(|reason| AdminError::Save {
                path: "the shared ledger".into(),
                reason,
            });
        }
        self.save_overrides()
    }

    /// Replaces the budgets of a named key (or `global`) here only.
    pub fn apply_budget(&self, name: &str, budget: Budget) -> Result<(), AdminError> {
        let scope = if name == GLOBAL {
            &self.global
        } else {
            &self
                .key_named(name)
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
                    .and_then(|limit| self.crossed(entry.total(), limit))
                    .unwrap_or(0);
            }
        }
        Ok(())
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
}

/// Reads `budgets.json`; a missing file is no overrides, an unreadable one is logged and ignored.
pub(super) fn load_overrides(path: &std::path::Path) -> HashMap<String, Budget> {
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

/// Says at start that a budget changed at run time (kept in `budgets.json`) wins over the one
/// in `proxy.toml`, one line per budget that differs: otherwise an edit of `proxy.toml` would
/// seem to be ignored.
pub(super) fn say_overridden(
    scope: &str,
    configured: &Budget,
    saved: &Budget,
    path: Option<&std::path::Path>,
) {
    let file = path.map(|p| p.display().to_string()).unwrap_or_default();
    for period in Period::ALL {
        let (from, to) = (configured.get(period), saved.get(period));
        if from != to {
            let show = |limit: Option<crate::money::NanoUsd>| {
                limit.map_or_else(|| "none".to_owned(), |l| l.to_string())
            };
            tracing::info!(
                scope,
                period = period.as_str(),
                configured = show(from),
                in_force = show(to),
                file,
                "a budget changed at run time wins over proxy.toml's (PUT /admin/keys/NAME/budget again, or delete the file, to change it)"
            );
        }
    }
}
