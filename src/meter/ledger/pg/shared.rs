//! What replicas share besides the rows: each one's spend per budget window and use of rate
//! limits (written whole, so a retry changes nothing), budgets changed at run time, and the
//! rows that make each alert fire once.

use postgres::Client;

use crate::config::guard::Budget;
use crate::meter::ledger::writer::int;
use crate::money::NanoUsd;

/// One replica's spend of one scope in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    /// A key's name, or `global`.
    pub scope: String,
    /// `daily`, `monthly`, `total` or `hourly`.
    pub period: &'static str,
    /// The window's start (µs).
    pub window_start: i64,
    /// Nano-dollars.
    pub nano: u64,
}

/// One replica's use of one key's per-minute limit since it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateUse {
    /// The replica.
    pub replica: i64,
    /// The key's name.
    pub key: String,
    /// `requests` or `tokens`.
    pub unit: String,
    /// Used so far.
    pub used: u64,
}

/// Writes this replica's spend, replacing what it wrote before for the same windows.
pub fn publish_spend(
    client: &mut Client,
    replica: i64,
    spend: &[Spend],
    now: i64,
) -> Result<(), postgres::Error> {
    let scopes: Vec<&str> = spend.iter().map(|s| s.scope.as_str()).collect();
    let periods: Vec<&str> = spend.iter().map(|s| s.period).collect();
    let starts: Vec<i64> = spend.iter().map(|s| s.window_start).collect();
    let nanos: Vec<i64> = spend.iter().map(|s| int(s.nano)).collect();
    client.execute(
        "INSERT INTO spend (replica, scope, period, window_start, nano_usd, updated_at)
         SELECT $1, s, p, w, n, $6 FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS t(s, p, w, n)
         ON CONFLICT (replica, scope, period, window_start)
         DO UPDATE SET nano_usd = excluded.nano_usd, updated_at = excluded.updated_at
         WHERE spend.nano_usd <> excluded.nano_usd",
        &[&replica, &scopes, &periods, &starts, &nanos, &now],
    )?;
    Ok(())
}

/// The database's clock in microseconds: replicas' clocks may disagree, the server's is one.
const SERVER_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

/// Writes this replica's use of rate limits (name, unit, used since start); written every
/// round, its time (the server's) tells the others this replica is live.
pub fn publish_rates(
    client: &mut Client,
    replica: i64,
    rates: &[(String, &'static str, u64)],
) -> Result<(), postgres::Error> {
    let keys: Vec<&str> = rates.iter().map(|r| r.0.as_str()).collect();
    let units: Vec<&str> = rates.iter().map(|r| r.1).collect();
    let used: Vec<i64> = rates.iter().map(|r| int(r.2)).collect();
    client.execute(
        &format!(
            "INSERT INTO rate_use (replica, key_name, unit, used, updated_at)
             SELECT $1, k, u, n, {SERVER_NOW} FROM unnest($2::text[], $3::text[], $4::bigint[]) AS t(k, u, n)
             ON CONFLICT (replica, key_name, unit)
             DO UPDATE SET used = excluded.used, updated_at = excluded.updated_at"
        ),
        &[&replica, &keys, &units, &used],
    )?;
    Ok(())
}

/// The other replicas' spend per scope in the given windows (period, start), summed.
pub fn others_spend(
    client: &mut Client,
    replica: i64,
    windows: &[(&'static str, i64)],
) -> Result<Vec<Spend>, postgres::Error> {
    let periods: Vec<&str> = windows.iter().map(|w| w.0).collect();
    let starts: Vec<i64> = windows.iter().map(|w| w.1).collect();
    let rows = client.query(
        "SELECT scope, period, window_start, sum(nano_usd)::bigint FROM spend
         WHERE replica <> $1
           AND (period, window_start) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))
         GROUP BY scope, period, window_start",
        &[&replica, &periods, &starts],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let period: String = row.try_get(1)?;
        // Only the periods asked for come back.
        let Some(period) = windows.iter().map(|w| w.0).find(|p| *p == period) else {
            continue;
        };
        out.push(Spend {
            scope: row.try_get(0)?,
            period,
            window_start: row.try_get(2)?,
            nano: u64::try_from(row.try_get::<_, i64>(3)?).unwrap_or(0),
        });
    }
    Ok(out)
}

/// The other replicas' rate use written within `within` µs, by the server's clock.
pub fn others_rates(
    client: &mut Client,
    replica: i64,
    within: i64,
) -> Result<Vec<RateUse>, postgres::Error> {
    let rows = client.query(
        &format!(
            "SELECT replica, key_name, unit, used FROM rate_use
             WHERE replica <> $1 AND updated_at >= {SERVER_NOW} - $2"
        ),
        &[&replica, &within],
    )?;
    rows.iter()
        .map(|row| {
            Ok(RateUse {
                replica: row.try_get(0)?,
                key: row.try_get(1)?,
                unit: row.try_get(2)?,
                used: u64::try_from(row.try_get::<_, i64>(3)?).unwrap_or(0),
            })
        })
        .collect()
}

fn nano(v: Option<NanoUsd>) -> Option<i64> {
    v.map(|n| int(n.0))
}

/// Saves a scope's budget for every replica.
pub fn save_budget(
    client: &mut Client,
    scope: &str,
    budget: &Budget,
) -> Result<(), postgres::Error> {
    // Saves one at a time, so versions commit in the order they are taken: a reader that has
    // seen version N has seen every version before it.
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7812739770201957747)", &[])?;
    tx.execute(
        "INSERT INTO budgets (scope, daily, monthly, total, version)
         VALUES ($1, $2, $3, $4, nextval('budget_versions'))
         ON CONFLICT (scope) DO UPDATE SET daily = excluded.daily, monthly = excluded.monthly,
            total = excluded.total, version = excluded.version",
        &[
            &scope,
            &nano(budget.daily),
            &nano(budget.monthly),
            &nano(budget.total),
        ],
    )?;
    tx.commit()
}

/// Budgets saved after `version`, with the newest version seen.
pub fn budgets_after(
    client: &mut Client,
    version: i64,
) -> Result<(Vec<(String, Budget)>, i64), postgres::Error> {
    let rows = client.query(
        "SELECT scope, daily, monthly, total, version FROM budgets WHERE version > $1 ORDER BY version",
        &[&version],
    )?;
    let mut newest = version;
    let mut out = Vec::with_capacity(rows.len());
    let usd = |v: Option<i64>| v.map(|n| NanoUsd(u64::try_from(n).unwrap_or(0)));
    for row in rows {
        newest = newest.max(row.try_get(4)?);
        out.push((
            row.try_get(0)?,
            Budget {
                daily: usd(row.try_get(1)?),
                monthly: usd(row.try_get(2)?),
                total: usd(row.try_get(3)?),
            },
        ));
    }
    Ok((out, newest))
}

/// Claims an alert: true for the one replica whose row went in first.
pub fn claim_alert(
    client: &mut Client,
    dedupe: &str,
    replica: i64,
    now: i64,
) -> Result<bool, postgres::Error> {
    let dedupe = super::write::text(dedupe);
    let inserted = client.execute(
        "INSERT INTO alerts_fired (dedupe, replica, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&dedupe.as_ref(), &replica, &now],
    )?;
    Ok(inserted == 1)
}

/// Deletes what no replica reads any more: rate use of replicas stopped an hour ago, and spend
/// of windows long over (an hour's after a day, a day's after 40 days, a month's after a
/// year). A total's rows stay: they are the total.
pub fn forget_old(client: &mut Client, now: i64) -> Result<u64, postgres::Error> {
    const HOUR: i64 = 3_600_000_000;
    let rates = client.execute(
        "DELETE FROM rate_use WHERE updated_at < $1",
        &[&(now - HOUR)],
    )?;
    let spend = client.execute(
        "DELETE FROM spend WHERE (period = 'hourly' AND window_start < $1)
            OR (period = 'daily' AND window_start < $2)
            OR (period = 'monthly' AND window_start < $3)",
        &[
            &(now - 24 * HOUR),
            &(now - 40 * 24 * HOUR),
            &(now - 400 * 24 * HOUR),
        ],
    )?;
    Ok(rates + spend)
}
