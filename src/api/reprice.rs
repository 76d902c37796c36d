//! The `reprice` command: the ledger's stored costs recomputed with today's prices, the old and
//! new totals printed per model, and the new costs written in one transaction.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;

use super::CommandError;
use crate::config::Config;
use crate::meter::ledger::history::{Range, parse_time};
use crate::meter::ledger::reprice::{self, Stored, Summary};
use crate::meter::pricing::load;
use crate::money::NanoUsd;

/// Reprices the rows of `[since, until)` with the prices the settings give; writes nothing
/// when `dry_run`.
pub fn run(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
    dry_run: bool,
) -> Result<String, CommandError> {
    let ledger = config
        .ledger
        .as_ref()
        .ok_or(CommandError::NoLedger("reprice"))?;
    if ledger.url.is_some() {
        return Err(CommandError::BadOption {
            option: "ledger_url",
            reason: crate::error::InvalidValue(
                "reprice rewrites the SQLite ledger only; a PostgreSQL ledger is not repriced yet"
                    .into(),
            ),
        });
    }
    let now = time::OffsetDateTime::now_utc();
    let bad = |option: &'static str| move |reason| CommandError::BadOption { option, reason };
    let range = Range {
        since: since
            .map(|v| parse_time(v, now).map_err(bad("--since")))
            .transpose()?,
        until: until
            .map(|v| parse_time(v, now).map_err(bad("--until")))
            .transpose()?,
    };
    let table = load::load(&config.pricing)?.table;
    // Names resolve once per (upstream, model), as in the meter: a range holds few of them.
    let resolved = RefCell::new(HashMap::new());
    let price = |row: &Stored<'_>| {
        let key = (row.upstream.to_owned(), row.model.to_owned());
        let resolved = resolved
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| table.resolve(row.upstream, row.model))
            .clone()?;
        let (charge, label) = resolved.charge(
            &row.usage,
            &crate::usage::Usage::default(),
            row.service_tier,
            row.at.unix_timestamp(),
        )?;
        Some((charge.cost, label.to_string()))
    };
    let summary = reprice::reprice(&ledger.dir, range, dry_run, &price)?;
    Ok(render(&summary, dry_run))
}

fn render(summary: &Summary, dry_run: bool) -> String {
    let mut out = String::new();
    let width = summary
        .by_model
        .keys()
        .map(String::len)
        .chain([5])
        .max()
        .unwrap_or(5);
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>14}  {:>14}  {:>14}",
        "MODEL", "ROWS", "OLD", "NEW", "CHANGE"
    );
    let (mut old, mut new, mut rows, mut newly, mut unpriced) = (0_u64, 0_u64, 0_u64, 0_u64, 0_u64);
    for (model, change) in &summary.by_model {
        let _ = writeln!(
            out,
            "{model:<width$}  {:>8}  {:>14}  {:>14}  {:>14}",
            change.rows,
            change.old.to_string(),
            change.new.to_string(),
            signed(change.old, change.new)
        );
        old += change.old.0;
        new += change.new.0;
        rows += change.rows;
        newly += change.newly_priced;
        unpriced += change.unpriced;
    }
    let _ = writeln!(
        out,
        "{:<width$}  {rows:>8}  {:>14}  {:>14}  {:>14}",
        "TOTAL",
        NanoUsd(old).to_string(),
        NanoUsd(new).to_string(),
        signed(NanoUsd(old), NanoUsd(new))
    );
    let _ = writeln!(out, "{newly} rows that were unpriced now have a price.");
    if unpriced > 0 {
        let _ = writeln!(
            out,
            "{unpriced} rows have no price now: their stored cost is kept."
        );
    }
    if summary.skipped > 0 {
        let _ = writeln!(
            out,
            "{} Realtime rows left as they are (the ledger keeps no count of their audio tokens).",
            summary.skipped
        );
    }
    if dry_run {
        out.push_str("Dry run: nothing was written.\n");
    } else {
        out.push_str(
            "Written in one transaction. /usage, /export and report show the new costs now; a running llm-meter's /stats and budgets show them after a restart.\n",
        );
    }
    out
}

/// `+$0.12`, `-$0.05`, `$0.00`.
fn signed(old: NanoUsd, new: NanoUsd) -> String {
    match new.cmp(&old) {
        std::cmp::Ordering::Greater => format!("+{}", NanoUsd(new.0 - old.0)),
        std::cmp::Ordering::Less => format!("-{}", NanoUsd(old.0 - new.0)),
        std::cmp::Ordering::Equal => NanoUsd(0).to_string(),
    }
}
