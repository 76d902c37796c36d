//! Repricing history: the stored cost of a time range's rows recomputed from their stored
//! tokens by a pricing function, and the new costs, flags, price labels and per-period totals
//! written in one transaction.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::{Connection, params};
use time::OffsetDateTime;

use super::history::Range;
use super::schema::{self, Access};
use super::{FILE_NAME, LedgerError, from_micros};
use crate::money::NanoUsd;
use crate::usage::{Flavor, ServiceTier, Usage};

/// One stored row, as a pricing function sees it.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// When it was recorded: the price in force then applies.
    pub at: OffsetDateTime,
    /// Its model.
    pub model: &'a str,
    /// Its upstream (its multiplier and own prices apply).
    pub upstream: &'a str,
    /// Its tokens.
    pub usage: Usage,
    /// The tier its response reported.
    pub service_tier: ServiceTier,
}

/// What a row costs now and which price said so; `None` from the pricing function when no
/// price covers it.
pub type Repriced = (NanoUsd, String);

/// The old and new sums of one model's rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelChange {
    /// Rows of the model in the range.
    pub rows: u64,
    /// Their cost as stored.
    pub old: NanoUsd,
    /// Their cost now (a row no price covers keeps its stored cost).
    pub new: NanoUsd,
    /// Rows stored unpriced that have a price now.
    pub newly_priced: u64,
    /// Rows no price covers now.
    pub unpriced: u64,
}

/// What a reprice found (and, unless a dry run, wrote).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Per model.
    pub by_model: BTreeMap<String, ModelChange>,
    /// Realtime rows, left as they are: the ledger keeps no count of their audio tokens, which
    /// cost more than text, so their cost cannot be recomputed from what is stored.
    pub skipped: u64,
}

/// Per (period, key id, model), and per (period, upstream): the change of cost and of
/// unpriced rows.
#[derive(Default)]
struct Deltas {
    totals: HashMap<(i64, String, String), (i128, i64)>,
    upstreams: HashMap<(i64, String), (i128, i64)>,
}

/// One row to rewrite: its time (rowid), stored cost (the guard that no one else changed it),
/// new cost and price label (an index into `Labels`). Small, as a range may hold millions.
struct Update {
    at: i64,
    old: NanoUsd,
    cost: NanoUsd,
    label: Option<u32>,
}

/// The distinct price labels of the updates: a handful for any number of rows.
#[derive(Default)]
struct Labels {
    all: Vec<String>,
    index: HashMap<String, u32>,
}

impl Labels {
    fn intern(&mut self, label: String) -> Option<u32> {
        if let Some(at) = self.index.get(&label) {
            return Some(*at);
        }
        let at = u32::try_from(self.all.len()).ok()?;
        self.index.insert(label.clone(), at);
        self.all.push(label);
        Some(at)
    }
}

/// Recomputes the cost of the rows of `range` in the ledger in `dir` with `price`, and writes
/// the results in one transaction unless `dry_run`. Rows are read in a read transaction, which
/// a running server's writer does not wait for; only the writes take the write lock, each row's
/// guarded by its stored cost (a row changed meanwhile by another reprice fails the whole run),
/// and the totals change by deltas, which add to whatever the server wrote meanwhile.
pub fn reprice(
    dir: &Path,
    range: Range,
    dry_run: bool,
    price: &dyn Fn(&Stored<'_>) -> Option<Repriced>,
) -> Result<Summary, LedgerError> {
    let path = dir.join(FILE_NAME);
    if !path.exists() {
        return Err(LedgerError::Missing(path));
    }
    let fail = |e: rusqlite::Error| LedgerError::sqlite(&path, &e);
    // A dry run changes nothing, not even an old ledger's schema.
    let access = if dry_run { Access::Read } else { Access::Write };
    let mut conn = schema::open(&path, access)?;
    let (summary, updates, labels, deltas) = {
        let read = conn.transaction().map_err(fail)?;
        recompute(&read, range, price).map_err(fail)?
    };
    if dry_run {
        return Ok(summary);
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(fail)?;
    write(&tx, &updates, &labels, &deltas).map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(summary)
}

fn recompute(
    conn: &Connection,
    range: Range,
    price: &dyn Fn(&Stored<'_>) -> Option<Repriced>,
) -> rusqlite::Result<(Summary, Vec<Update>, Labels, Deltas)> {
    let (since, until) = (
        range.since.map_or(i64::MIN, super::micros),
        range.until.map_or(i64::MAX, super::micros),
    );
    let mut statement = conn.prepare(
        "SELECT r.at, r.period, k.key_id, m.name, coalesce(u.name, 'openai'), f.name,
                r.input_tokens, r.cached_tokens, r.cache_write_tokens, r.cache_write_1h_tokens,
                r.output_tokens, r.reasoning_tokens, r.cost_nano_usd, r.unpriced, r.service_tier
         FROM requests r
         JOIN keys k ON k.id = r.key
         JOIN names m ON m.id = r.model
         JOIN names f ON f.id = r.flavor
         LEFT JOIN names u ON u.id = r.upstream
         WHERE r.at >= ?1 AND r.at < ?2",
    )?;
    let mut rows = statement.query(params![since, until])?;
    let mut summary = Summary::default();
    let mut updates = Vec::new();
    let mut labels = Labels::default();
    let mut deltas = Deltas::default();
    while let Some(row) = rows.next()? {
        let n = |i: usize| row.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
        let (at, period): (i64, i64) = (row.get(0)?, row.get(1)?);
        let (key_id, model, upstream, flavor): (String, String, String, String) =
            (row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?);
        let usage = Usage {
            input_tokens: n(6)?,
            cached_input_tokens: n(7)?,
            cache_write_tokens: n(8)?,
            cache_write_1h_tokens: n(9)?,
            output_tokens: n(10)?,
            reasoning_tokens: n(11)?,
        };
        let old = NanoUsd(n(12)?);
        let was_unpriced = row.get::<_, bool>(13)?;
        let tier = row
            .get::<_, Option<String>>(14)?
            .map_or(ServiceTier::Standard, |t| ServiceTier::from_name(&t));
        if flavor == Flavor::OpenAiRealtime.as_str() {
            summary.skipped += 1;
            continue;
        }
        let stored = Stored {
            at: from_micros(at),
            model: &model,
            upstream: &upstream,
            usage,
            service_tier: tier,
        };
        let change = summary.by_model.entry(model.clone()).or_default();
        change.rows += 1;
        change.old.0 += old.0;
        let now = if usage.total_tokens() == 0 {
            Some((NanoUsd(0), String::new()))
        } else {
            price(&stored)
        };
        let Some((cost, label)) = now else {
            change.new.0 += old.0;
            change.unpriced += 1;
            continue;
        };
        change.new.0 += cost.0;
        change.newly_priced += u64::from(was_unpriced);
        let delta_cost = i128::from(cost.0) - i128::from(old.0);
        let delta_unpriced = -i64::from(was_unpriced);
        for (cost_sum, unpriced_sum) in [
            deltas
                .totals
                .entry((period, key_id.clone(), model.clone()))
                .or_default(),
            deltas
                .upstreams
                .entry((period, upstream.clone()))
                .or_default(),
        ] {
            *cost_sum += delta_cost;
            *unpriced_sum += delta_unpriced;
        }
        updates.push(Update {
            at,
            old,
            cost,
            label: if label.is_empty() {
                None
            } else {
                labels.intern(label)
            },
        });
    }
    Ok((summary, updates, labels, deltas))
}

fn write(
    conn: &Connection,
    updates: &[Update],
    labels: &Labels,
    deltas: &Deltas,
) -> rusqlite::Result<()> {
    let mut name_id = conn.prepare(
        "INSERT INTO names (name) VALUES (?1)
         ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
    )?;
    let label_ids = labels
        .all
        .iter()
        .map(|label| name_id.query_row(params![label], |r| r.get::<_, i64>(0)))
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    let mut row = conn.prepare(
        "UPDATE requests SET cost_nano_usd = ?3, unpriced = 0, price = ?4
         WHERE at = ?1 AND cost_nano_usd = ?2",
    )?;
    for update in updates {
        let label = update
            .label
            .and_then(|at| label_ids.get(usize::try_from(at).ok()?).copied());
        let changed = row.execute(params![
            update.at,
            clamp(i128::from(update.old.0)),
            clamp(i128::from(update.cost.0)),
            label
        ])?;
        if changed != 1 {
            // Another reprice changed it since it was read: give the whole run up.
            return Err(rusqlite::Error::StatementChangedRows(changed));
        }
    }
    let mut totals = conn.prepare(
        "UPDATE totals SET cost_nano_usd = cost_nano_usd + ?4, unpriced = unpriced + ?5
         WHERE period = ?1 AND key_id = ?2 AND model = ?3",
    )?;
    for ((period, key_id, model), (cost, unpriced)) in &deltas.totals {
        let changed = totals.execute(params![period, key_id, model, clamp(*cost), unpriced])?;
        if changed != 1 {
            return Err(rusqlite::Error::StatementChangedRows(changed));
        }
    }
    let mut upstreams = conn.prepare(
        "UPDATE upstream_totals SET cost_nano_usd = cost_nano_usd + ?3, unpriced = unpriced + ?4
         WHERE period = ?1 AND upstream = ?2",
    )?;
    for ((period, upstream), (cost, unpriced)) in &deltas.upstreams {
        let changed = upstreams.execute(params![period, upstream, clamp(*cost), unpriced])?;
        if changed != 1 {
            return Err(rusqlite::Error::StatementChangedRows(changed));
        }
    }
    Ok(())
}

/// A change of cost as SQLite's integer (sums of stored costs fit an i64 by construction).
fn clamp(delta: i128) -> i64 {
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}
