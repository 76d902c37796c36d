//! History reads from PostgreSQL: the same answers as the SQLite reader, over every replica's
//! rows. Sums by day, hour, model, key and upstream read the hourly rollup for the whole hours
//! of a range and the rows only for its ragged ends, so they cost the same over ten rows or
//! ten million.

use std::borrow::Cow;
use std::collections::HashMap;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

use super::Pool;
use super::write::rollup_counters;
use crate::meter::ledger::history::{
    Cells, Dialect, Filter, Group, Param, UsageLine, grouped_sql, line_from, row_from, sort_lines,
};
use crate::meter::ledger::{LedgerError, Row};

const HOUR: i64 = 3_600_000_000;

/// The counter columns, summed, in the order `counts_from` reads them, then the partial rows
/// (PostgreSQL sums integers as numeric: cast back).
const SUMS: &str = "count(*), sum(error)::bigint, sum(input_tokens)::bigint,
    sum(cached_tokens)::bigint, sum(cache_write_tokens)::bigint, sum(output_tokens)::bigint,
    sum(reasoning_tokens)::bigint, sum(cost_nano_usd)::bigint, sum(unpriced)::bigint,
    sum(estimated)::bigint, sum(cache_write_1h_tokens)::bigint, sum(partial)::bigint";

/// A row's columns as `row_from` reads them: integers as bigint, tags as text.
const ROW_COLUMNS: &str = "at, period, key_id, key_label, model, flavor, status::bigint,
    streamed::bigint, input_tokens, cached_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, cost_nano_usd, latency_us, response_id, error::bigint, unpriced::bigint,
    estimated::bigint, partial::bigint, upstream, \"user\", session, tags::text,
    cache_write_1h_tokens, service_tier, price";

/// One row's values under the rollup's counter names, to sum with rollup rows.
const ROW_AS_ROLLUP: &str = "1::bigint, error::bigint, input_tokens, cached_tokens,
    cache_write_tokens, output_tokens, reasoning_tokens, cost_nano_usd, unpriced::bigint,
    estimated::bigint, cache_write_1h_tokens, partial::bigint";

impl Cells for postgres::Row {
    type Error = postgres::Error;
    fn int(&self, i: usize) -> Result<i64, postgres::Error> {
        self.try_get(i)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, postgres::Error> {
        self.try_get(i)
    }
    fn text(&self, i: usize) -> Result<String, postgres::Error> {
        self.try_get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, postgres::Error> {
        self.try_get(i)
    }
}

/// A reader over a pool's connections.
pub struct Reader {
    pool: Pool,
}

fn bound(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Param::Int(n) => n as &(dyn ToSql + Sync),
            Param::Text(t) => t as &(dyn ToSql + Sync),
        })
        .collect()
}

impl Reader {
    /// A reader taking connections from `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    fn fail(&self, err: &postgres::Error) -> LedgerError {
        self.pool.db().fail(err)
    }

    /// The time of the oldest row.
    pub fn first_time(&self) -> Result<Option<i64>, LedgerError> {
        let mut client = self.pool.get()?;
        let row = client
            .query_one("SELECT min(at) FROM requests", &[])
            .map_err(|e| self.fail(&e))?;
        row.try_get(0).map_err(|e| self.fail(&e))
    }

    /// Sums of the filtered rows per group, in group order.
    pub fn usage(&self, groups: &[Group], filter: &Filter) -> Result<Vec<UsageLine>, LedgerError> {
        let (sql, params) = usage_sql(groups, filter);
        let mut client = self.pool.get()?;
        let rows = client
            .query(sql.as_str(), &bound(&params))
            .map_err(|e| self.fail(&e))?;
        let mut lines = rows
            .iter()
            .map(|r| line_from(groups, r).map_err(|e| self.fail(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        sort_lines(groups, &mut lines);
        Ok(lines)
    }

    /// Cost per key id of the rows from `since` (µs), or of all rows.
    pub fn spend_by_key(&self, since: Option<i64>) -> Result<HashMap<String, u64>, LedgerError> {
        let mut client = self.pool.get()?;
        let rows = match since {
            Some(since) => client.query(
                "SELECT key_id, sum(cost_nano_usd)::bigint FROM request_rows WHERE at >= $1 GROUP BY key_id",
                &[&since],
            ),
            None => client.query(
                "SELECT key_id, sum(cost_nano_usd)::bigint FROM usage_hourly GROUP BY key_id",
                &[],
            ),
        }
        .map_err(|e| self.fail(&e))?;
        rows.iter()
            .map(|r| Ok((r.text(0)?, r.count(1)?)))
            .collect::<Result<_, postgres::Error>>()
            .map_err(|e| self.fail(&e))
    }

    /// Calls `each` with every row that `filter` takes, oldest first, streamed; stops early
    /// when `each` returns false.
    pub fn for_each_row(
        &self,
        filter: &Filter,
        mut each: impl FnMut(&Row) -> bool,
    ) -> Result<(), LedgerError> {
        let (conditions, params) = filter.sql(Dialect::Postgres);
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM request_rows WHERE {conditions} ORDER BY at, replica"
        );
        let mut client = self.pool.get()?;
        let fail = |e: postgres::Error| self.fail(&e);
        let mut tx = client.transaction().map_err(fail)?;
        // An export streams at its reader's pace and may take longer than the statement
        // timeout every other statement has.
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .map_err(fail)?;
        let mut rows = tx.query_raw(sql.as_str(), bound(&params)).map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let row = row_from(&r).map_err(fail)?;
            if !each(&row) {
                break;
            }
        }
        drop(rows);
        tx.commit().map_err(fail)
    }
}

/// The query of `usage` and its parameters. Groups and conditions the rollup has (day, hour,
/// model, key, upstream) read it for the whole hours of the range, and the rows for the
/// ends; any other reads the rows.
fn usage_sql(groups: &[Group], filter: &Filter) -> (String, Vec<Param>) {
    let d = Dialect::Postgres;
    let is_rolled_up = filter.user.is_none()
        && filter.session.is_none()
        && filter.tags.is_empty()
        && groups.iter().all(|g| {
            matches!(
                g,
                Group::Day | Group::Hour | Group::Model | Group::Key | Group::Upstream
            )
        });
    let (since, until) = filter.range.bounds();
    // The whole hours inside [since, until).
    let first = since.div_euclid(HOUR) + i64::from(since.rem_euclid(HOUR) != 0);
    let end = until.div_euclid(HOUR);
    if !is_rolled_up || first >= end {
        let (conditions, params) = filter.sql(d);
        let by: Vec<Cow<'_, str>> = groups.iter().map(|g| g.columns(d)).collect();
        let rows = if groups.contains(&Group::AnyTag) {
            "request_rows, jsonb_each_text(request_rows.tags) AS each_tag"
        } else {
            "request_rows"
        };
        return (grouped_sql(&by, rows, &conditions, SUMS), params);
    }
    let names: Vec<String> = (0..groups.len()).map(|i| format!("g{i}")).collect();
    let rolled: Vec<String> = groups
        .iter()
        .zip(&names)
        .map(|(g, name)| {
            let column = match g {
                Group::Day => "hour / 24".into(),
                Group::Hour => "hour".into(),
                other => other.columns(d),
            };
            format!("{column} AS {name}, ")
        })
        .collect();
    let raw: Vec<String> = groups
        .iter()
        .zip(&names)
        .map(|(g, name)| format!("{} AS {name}, ", g.columns(d)))
        .collect();
    let mut params = vec![Param::Int(first), Param::Int(end)];
    let mut rollup_where = "hour >= $1 AND hour < $2".to_owned();
    filter.push_equal(d, &mut rollup_where, &mut params);
    let n = params.len();
    params.extend([
        Param::Int(since),
        Param::Int(first * HOUR),
        Param::Int(end * HOUR),
        Param::Int(until),
    ]);
    let mut rows_where = format!(
        "((at >= ${} AND at < ${}) OR (at >= ${} AND at < ${}))",
        n + 1,
        n + 2,
        n + 3,
        n + 4
    );
    filter.push_equal(d, &mut rows_where, &mut params);
    let counters = rollup_counters();
    let sums: Vec<String> = counters
        .iter()
        .map(|c| format!("sum({c})::bigint"))
        .collect();
    let both = format!(
        "(SELECT {}key_label, {} FROM usage_hourly WHERE {rollup_where}
          UNION ALL
          SELECT {}key_label, {ROW_AS_ROLLUP} FROM request_rows WHERE {rows_where}) AS u",
        rolled.concat(),
        counters.join(", "),
        raw.concat(),
    );
    let by: Vec<Cow<'_, str>> = names.iter().map(|n| Cow::Borrowed(n.as_str())).collect();
    (grouped_sql(&by, &both, "TRUE", &sums.join(", ")), params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::ledger::history::Range;

    #[test]
    fn whole_hours_come_from_the_rollup_and_only_the_ends_from_the_rows() {
        let at = |h: i64, us: i64| {
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::microseconds(h * HOUR + us)
        };
        let filter = Filter {
            range: Range {
                since: Some(at(10, 5)),
                until: Some(at(20, 7)),
            },
            model: Some("gpt-4o".into()),
            ..Filter::default()
        };
        let (sql, params) = usage_sql(&[Group::Day, Group::Model], &filter);
        assert!(
            sql.contains("FROM usage_hourly WHERE hour >= $1 AND hour < $2 AND model = $3"),
            "{sql}"
        );
        assert_eq!(
            params[..3],
            [Param::Int(11), Param::Int(20), Param::Text("gpt-4o".into())]
        );
        assert_eq!(
            params[3..7],
            [
                Param::Int(10 * HOUR + 5),
                Param::Int(11 * HOUR),
                Param::Int(20 * HOUR),
                Param::Int(20 * HOUR + 7)
            ]
        );
        // A user is not in the rollup: the rows answer.
        let by_user = Filter {
            user: Some("alice".into()),
            ..filter
        };
        let (sql, _) = usage_sql(&[Group::Day], &by_user);
        assert!(!sql.contains("usage_hourly"), "{sql}");
        // Less than an hour: the rows answer.
        let (sql, _) = usage_sql(
            &[Group::Model],
            &Filter {
                range: Range {
                    since: Some(at(10, 5)),
                    until: Some(at(10, 9)),
                },
                ..Filter::default()
            },
        );
        assert!(!sql.contains("usage_hourly"), "{sql}");
    }
}
