//! Reading the ledger: totals over a time range, usage grouped by day, hour, model or key, and
//! the raw rows in order. Readers never write, so they work beside a running server.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time};

use super::writer::{count, counts_from};
use super::{FILE_NAME, LedgerError, Options, Row, from_micros, micros, pg, schema};
use crate::error::InvalidValue;
use crate::key::Identity;
use crate::meter::{Counts, Snapshot};
use crate::money::NanoUsd;
use crate::usage::Usage;

/// A half-open time range `[since, until)`; an open end is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// Inclusive start.
    pub since: Option<OffsetDateTime>,
    /// Exclusive end.
    pub until: Option<OffsetDateTime>,
}

impl Range {
    /// Parses `since` / `until` as given to `/stats`, `/usage`, `/export` and the CLI.
    pub fn parse(
        since: Option<&str>,
        until: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Self, String> {
        let at = |name: &str, value: Option<&str>| {
            value
                .map(|v| parse_time(v, now).map_err(|reason| format!("`{name}`: {reason}")))
                .transpose()
        };
        let range = Self {
            since: at("since", since)?,
            until: at("until", until)?,
        };
        if let (Some(since), Some(until)) = (range.since, range.until)
            && since >= until
        {
            return Err("`since` must be before `until`".into());
        }
        Ok(range)
    }

    pub(super) fn bounds(&self) -> (i64, i64) {
        (
            self.since.map_or(i64::MIN, micros),
            self.until.map_or(i64::MAX, micros),
        )
    }
}

/// An RFC 3339 time (`2026-11-25T10:00:00Z`), a date (`2026-11-25`, midnight UTC), or a span
/// back from now (`24h`, `7d`, `90m`).
pub fn parse_time(value: &str, now: OffsetDateTime) -> Result<OffsetDateTime, InvalidValue> {
    let value = value.trim();
    if let Ok(at) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(at);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(date) = Date::parse(value, &date_format) {
        return Ok(date.with_time(Time::MIDNIGHT).assume_utc());
    }
    if let Ok(span) = humantime::parse_duration(value) {
        return now
            .checked_sub(time::Duration::try_from(span).map_err(|e| e.to_string())?)
            .ok_or_else(|| InvalidValue(format!("{value:?} reaches before year -9999")));
    }
    Err(InvalidValue(format!(
        "expected an RFC 3339 time (2026-11-25T10:00:00Z), a date (2026-11-25) or a span back from now (24h, 7d), got {value:?}"
    )))
}

/// One dimension of `/usage` and `llm-meter report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    /// Calendar day, UTC.
    Day,
    /// Hour, UTC.
    Hour,
    /// Model.
    Model,
    /// API key.
    Key,
    /// Per upstream.
    Upstream,
    /// The end user (`X-LLM-Meter-User`, or the body's).
    User,
    /// The session (`X-LLM-Meter-Session`).
    Session,
    /// One tag (`tag.team`), by its name.
    Tag(String),
    /// Every tag, by name and value (`tag`): a request with two tags counts under each, and
    /// one with none under no line.
    AnyTag,
}

/// The prefix of a tag's dimension and filter: `tag.team`.
pub const TAG_PREFIX: &str = "tag.";

impl Group {
    /// Parses `day`, `hour`, `model`, `key`, `upstream`, `user`, `session` or `tag.NAME`.
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        match value.trim() {
            "day" => Ok(Self::Day),
            "hour" => Ok(Self::Hour),
            "model" => Ok(Self::Model),
            "key" => Ok(Self::Key),
            "upstream" => Ok(Self::Upstream),
            "user" => Ok(Self::User),
            "session" => Ok(Self::Session),
            "tag" => Ok(Self::AnyTag),
            other => match other.strip_prefix(TAG_PREFIX) {
                Some(name) => {
                    check_tag_name(name)?;
                    Ok(Self::Tag(name.to_owned()))
                }
                None => Err(InvalidValue(format!(
                    "expected day, hour, model, key, upstream, user, session, tag or tag.NAME, got {other:?}"
                ))),
            },
        }
    }

    /// Parses a comma-separated list (`day,model`), each at most once.
    pub fn parse_list(value: &str) -> Result<Vec<Self>, InvalidValue> {
        let mut groups = Vec::new();
        for part in value.split(',') {
            let group = Self::parse(part)?;
            if groups.contains(&group) {
                return Err(InvalidValue(format!("{part:?} is given twice")));
            }
            groups.push(group);
        }
        Ok(groups)
    }

    /// The name used in queries and headings (`day`, `tag.team`).
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Self::Day => "day".into(),
            Self::Hour => "hour".into(),
            Self::Model => "model".into(),
            Self::Key => "key".into(),
            Self::Upstream => "upstream".into(),
            Self::User => "user".into(),
            Self::Session => "session".into(),
            Self::Tag(name) => format!("{TAG_PREFIX}{name}").into(),
            Self::AnyTag => "tag".into(),
        }
    }

    pub(super) fn columns(&self, dialect: Dialect) -> Cow<'static, str> {
        match self {
            Self::Day => "at / 86400000000".into(),
            Self::Hour => "at / 3600000000".into(),
            Self::Model => "model".into(),
            Self::Key => "key_id".into(),
            Self::Upstream => "upstream".into(),
            Self::User => "\"user\"".into(),
            Self::Session => "session".into(),
            Self::Tag(name) => tag_column(name, dialect).into(),
            // Names are `[a-z0-9_.-]`: the first `=` ends the name.
            Self::AnyTag => "each_tag.key || '=' || each_tag.value".into(),
        }
    }
}

/// The SQL of one tag's value. The name is checked (`check_tag_name`: `[a-z0-9_.-]` only), so
/// it can be written into the JSON path, quoted so that a `.` in it is not a step.
fn tag_column(name: &str, dialect: Dialect) -> String {
    match dialect {
        Dialect::Sqlite => format!("json_extract(tags, '$.\"{name}\"')"),
        Dialect::Postgres => format!("tags->>'{name}'"),
    }
}

/// Which SQL a query is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The `n`th parameter (from 1).
    pub(super) fn param(self, n: usize) -> String {
        match self {
            Self::Sqlite => format!("?{n}"),
            Self::Postgres => format!("${n}"),
        }
    }
}

/// A query parameter, bound by each backend its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Param {
    Int(i64),
    Text(String),
}

impl From<Param> for rusqlite::types::Value {
    fn from(param: Param) -> Self {
        match param {
            Param::Int(n) => n.into(),
            Param::Text(text) => text.into(),
        }
    }
}

/// The cells of a result row, read alike from SQLite and PostgreSQL (whose integer columns
/// are read as 64-bit: queries cast them).
pub(super) trait Cells {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    /// A stored count (never negative when we wrote it).
    fn count(&self, i: usize) -> Result<u64, Self::Error> {
        Ok(count(self.int(i)?))
    }
}

impl Cells for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
}

fn check_tag_name(name: &str) -> Result<(), InvalidValue> {
    crate::attribution::check_tag_name(name).map_err(InvalidValue)
}

/// Rows to sum or export: a range, optionally one key (by id), model, user, session, and tags.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The time range.
    pub range: Range,
    /// Only this key id.
    pub key_id: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Only this user.
    pub user: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only rows with each of these tags (name, value).
    pub tags: Vec<(String, String)>,
}

impl Filter {
    /// Adds the condition `name=value`, as `/usage` and `/export` take it as a query parameter
    /// and the commands as `--where`: `key`, `model`, `user`, `session` or `tag.NAME`.
    /// Returns false for a name that is none of these.
    pub fn add(&mut self, name: &str, value: &str) -> Result<bool, InvalidValue> {
        let slot = match name {
            "key" => &mut self.key_id,
            "model" => &mut self.model,
            "user" => &mut self.user,
            "session" => &mut self.session,
            other => {
                let Some(tag) = other.strip_prefix(TAG_PREFIX) else {
                    return Ok(false);
                };
                check_tag_name(tag)?;
                if self.tags.iter().any(|(t, _)| t == tag) {
                    return Err(InvalidValue(format!("{name} is given twice")));
                }
                self.tags.push((tag.to_owned(), value.to_owned()));
                return Ok(true);
            }
        };
        if slot.is_some() {
            return Err(InvalidValue(format!("{name} is given twice")));
        }
        *slot = Some(value.to_owned());
        Ok(true)
    }

    /// Adds a condition written `name=value` (`tag.team=search`).
    pub fn add_written(&mut self, condition: &str) -> Result<(), InvalidValue> {
        let (name, value) = condition.split_once('=').ok_or_else(|| {
            InvalidValue(format!(
                "expected name=value (user=alice, tag.team=search), got {condition:?}"
            ))
        })?;
        match self.add(name.trim(), value.trim())? {
            true => Ok(()),
            false => Err(InvalidValue(format!(
                "expected key, model, user, session or tag.NAME before '=', got {name:?}"
            ))),
        }
    }

    /// The SQL condition on the rows and its parameters, numbered from 1: the time range
    /// (`at >= since AND at < until`), then each condition.
    pub(super) fn sql(&self, dialect: Dialect) -> (String, Vec<Param>) {
        let (since, until) = self.range.bounds();
        let mut conditions = format!("at >= {} AND at < {}", dialect.param(1), dialect.param(2));
        let mut params = vec![Param::Int(since), Param::Int(until)];
        self.push_equal(dialect, &mut conditions, &mut params);
        (conditions, params)
    }

    /// Adds ` AND column = $n` for each condition (not the range) to `conditions`.
    pub(super) fn push_equal(
        &self,
        dialect: Dialect,
        conditions: &mut String,
        params: &mut Vec<Param>,
    ) {
        let columns = [
            ("key_id", &self.key_id),
            ("model", &self.model),
            ("\"user\"", &self.user),
            ("session", &self.session),
        ];
        let tags = self.tags.iter().map(|(n, v)| (tag_column(n, dialect), v));
        let equal = columns
            .into_iter()
            .filter_map(|(c, v)| Some((Cow::Borrowed(c), v.as_ref()?)))
            .chain(tags.map(|(c, v)| (Cow::Owned(c), v)));
        for (column, value) in equal {
            params.push(Param::Text(value.clone()));
            conditions.push_str(&format!(" AND {column} = {}", dialect.param(params.len())));
        }
    }
}

/// One line of grouped usage; the dimensions not grouped by are `None` (as are a user, session
/// or tag that rows did not name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    /// Start of the day or hour.
    pub bucket: Option<OffsetDateTime>,
    /// The model.
    pub model: Option<String>,
    /// The key.
    pub key: Option<Identity>,
    /// The upstream.
    pub upstream: Option<String>,
    /// The user.
    pub user: Option<String>,
    /// The session.
    pub session: Option<String>,
    /// The value of each tag grouped by, in the order of the groups.
    pub tags: Vec<Option<String>>,
    /// Grouped by every tag (`tag`): this line's tag, name and value.
    pub tag: Option<(String, String)>,
    /// The sums.
    pub counts: Counts,
    /// Requests whose response did not arrive whole (a ledger flag, not an in-memory counter).
    pub partial_requests: u64,
}

/// The counter columns, summed, in the order `counts_from` reads them, then the partial rows.
const SUMS: &str = "count(*), sum(error), sum(input_tokens), sum(cached_tokens),
    sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost_nano_usd),
    sum(unpriced), sum(estimated), sum(cache_write_1h_tokens), sum(partial)";

/// The columns of a row, in the order `row_from` reads them.
pub(super) const ROW_COLUMNS: &str = "at, period, key_id, key_label, model, flavor, status,
    streamed, input_tokens, cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    cost_nano_usd, latency_us, response_id, error, unpriced, estimated, partial, upstream,
    \"user\", session, tags, cache_write_1h_tokens, service_tier, price";

/// A read-only view of a ledger: the SQLite file, or the PostgreSQL database.
pub struct Reader(Backend);

enum Backend {
    Sqlite { conn: Connection, path: PathBuf },
    Postgres(pg::read::Reader),
}

impl Reader {
    /// Opens the ledger in `dir`; fails if there is none, or it is not ours.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        Self::open_file(&dir.join(FILE_NAME))
    }

    /// Opens the ledger file itself.
    pub fn open_file(path: &Path) -> Result<Self, LedgerError> {
        let conn = schema::open(path, schema::Access::Read)?;
        Ok(Self(Backend::Sqlite {
            conn,
            path: path.to_owned(),
        }))
    }

    /// Opens the ledger the options name: the PostgreSQL database when a URL is given, else
    /// the file in the data directory.
    pub fn open_ledger(options: &Options) -> Result<Self, LedgerError> {
        match &options.url {
            Some(url) => Ok(Self::postgres(pg::Db::new(url)?.pool()?)),
            None => Self::open(&options.dir),
        }
    }

    /// A reader of the PostgreSQL ledger, taking connections from `pool`.
    pub fn postgres(pool: pg::Pool) -> Self {
        Self(Backend::Postgres(pg::read::Reader::new(pool)))
    }

    /// The totals per key and model of the rows in `range`, shaped like `/stats`.
    pub fn totals(&self, range: Range) -> Result<Snapshot, LedgerError> {
        let filter = Filter {
            range,
            ..Filter::default()
        };
        let lines = self.usage(&[Group::Key, Group::Model], &filter)?;
        let since = match range.since {
            Some(since) => since,
            None => self.first_time()?.unwrap_or_else(OffsetDateTime::now_utc),
        };
        let upstreams = self
            .usage(&[Group::Upstream], &filter)?
            .into_iter()
            .filter_map(|line| Some((line.upstream?, line.counts)))
            .collect();
        Ok(Snapshot::collect(
            since,
            lines
                .into_iter()
                .filter_map(|line| Some((line.key?, line.model?, line.counts))),
            upstreams,
        ))
    }

    fn first_time(&self) -> Result<Option<OffsetDateTime>, LedgerError> {
        let at = match &self.0 {
            Backend::Sqlite { conn, path } => conn
                .query_row("SELECT min(at) FROM requests", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .map_err(|e| LedgerError::sqlite(path, &e))?,
            Backend::Postgres(reader) => reader.first_time()?,
        };
        Ok(at.map(from_micros))
    }

    /// Sums of the filtered rows per group, in group order.
    pub fn usage(&self, groups: &[Group], filter: &Filter) -> Result<Vec<UsageLine>, LedgerError> {
        let (conn, path) = match &self.0 {
            Backend::Sqlite { conn, path } => (conn, path),
            Backend::Postgres(reader) => return reader.usage(groups, filter),
        };
        let fail = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
        let (conditions, params) = filter.sql(Dialect::Sqlite);
        let by: Vec<Cow<'_, str>> = groups.iter().map(|g| g.columns(Dialect::Sqlite)).collect();
        let rows = if groups.contains(&Group::AnyTag) {
            "request_rows, json_each(request_rows.tags) AS each_tag"
        } else {
            "request_rows"
        };
        let sql = grouped_sql(&by, rows, &conditions, SUMS);
        let mut statement = conn.prepare(&sql).map_err(fail)?;
        let params = params.into_iter().map(rusqlite::types::Value::from);
        let lines = statement
            .query_map(rusqlite::params_from_iter(params), |r| line_from(groups, r))
            .map_err(fail)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(fail)?;
        Ok(lines)
    }

    /// Cost per key id of the rows recorded from `since` (µs), or of all rows (`None`, read
    /// from the per-period totals rather than the rows).
    pub fn spend_by_key(
        &self,
        since: Option<i64>,
    ) -> Result<std::collections::HashMap<String, u64>, LedgerError> {
        let (conn, path) = match &self.0 {
            Backend::Sqlite { conn, path } => (conn, path),
            Backend::Postgres(reader) => return reader.spend_by_key(since),
        };
        let fail = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
        let sql = match since {
            Some(_) => {
                "SELECT k.key_id, sum(r.cost_nano_usd) FROM requests r JOIN keys k ON k.id = r.key
                 WHERE r.at >= ?1 GROUP BY r.key"
            }
            None => {
                "SELECT key_id, sum(cost_nano_usd) FROM totals WHERE ?1 IS NOT NULL GROUP BY key_id"
            }
        };
        let mut statement = conn.prepare(sql).map_err(fail)?;
        let rows = statement
            .query_map([since.unwrap_or(i64::MIN)], |r| {
                Ok((r.get::<_, String>(0)?, count(r.get::<_, i64>(1)?)))
            })
            .map_err(fail)?;
        rows.collect::<rusqlite::Result<_>>().map_err(fail)
    }

    /// Calls `each` with every row that `filter` takes, oldest first, without loading them all;
    /// stops early when `each` returns false.
    pub fn for_each_row(
        &self,
        filter: &Filter,
        mut each: impl FnMut(&Row) -> bool,
    ) -> Result<(), LedgerError> {
        let (conn, path) = match &self.0 {
            Backend::Sqlite { conn, path } => (conn, path),
            Backend::Postgres(reader) => return reader.for_each_row(filter, each),
        };
        let fail = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
        let (conditions, params) = filter.sql(Dialect::Sqlite);
        let mut statement = conn
            .prepare(&format!(
                "SELECT {ROW_COLUMNS} FROM request_rows WHERE {conditions} ORDER BY at"
            ))
            .map_err(fail)?;
        let params = params.into_iter().map(rusqlite::types::Value::from);
        let mut rows = statement
            .query(rusqlite::params_from_iter(params))
            .map_err(fail)?;
        while let Some(r) = rows.next().map_err(fail)? {
            let row = row_from(r).map_err(fail)?;
            if !each(&row) {
                break;
            }
        }
        Ok(())
    }
}

/// `SELECT` of the `sums` of `rows` under `conditions`, grouped by `by` (a total without it).
pub(super) fn grouped_sql(by: &[Cow<'_, str>], rows: &str, conditions: &str, sums: &str) -> String {
    if by.is_empty() {
        format!("SELECT {sums} FROM {rows} WHERE {conditions} HAVING count(*) > 0")
    } else {
        let by = by.join(", ");
        format!(
            "SELECT {by}, max(key_label), {sums} FROM {rows} WHERE {conditions} GROUP BY {by} ORDER BY {by}"
        )
    }
}

/// Puts lines in SQLite's order of their groups: none first, text bytewise, whatever order
/// the database returned them in (PostgreSQL puts NULL last and compares text by collation).
pub(super) fn sort_lines(groups: &[Group], lines: &mut [UsageLine]) {
    lines.sort_by(|a, b| {
        let mut tags = 0;
        for group in groups {
            let order = match group {
                Group::Day | Group::Hour => a.bucket.cmp(&b.bucket),
                Group::Model => a.model.cmp(&b.model),
                Group::Key => a
                    .key
                    .as_ref()
                    .map(|k| &k.id)
                    .cmp(&b.key.as_ref().map(|k| &k.id)),
                Group::Upstream => a.upstream.cmp(&b.upstream),
                Group::User => a.user.cmp(&b.user),
                Group::Session => a.session.cmp(&b.session),
                Group::Tag(_) => {
                    tags += 1;
                    a.tags.get(tags - 1).cmp(&b.tags.get(tags - 1))
                }
                Group::AnyTag => {
                    let pair = |l: &UsageLine| l.tag.as_ref().map(|(n, v)| format!("{n}={v}"));
                    pair(a).cmp(&pair(b))
                }
            };
            if order.is_ne() {
                return order;
            }
        }
        std::cmp::Ordering::Equal
    });
}

/// A row, from the columns of `ROW_COLUMNS`.
pub(super) fn row_from<C: Cells>(r: &C) -> Result<Row, C::Error> {
    Ok(Row {
        at: from_micros(r.int(0)?),
        period: r.count(1)?,
        key_id: r.text(2)?,
        key_label: r.text(3)?,
        model: r.text(4)?,
        flavor: r.text(5)?,
        status: u16::try_from(r.int(6)?).unwrap_or(0),
        is_streaming: r.int(7)? != 0,
        usage: Usage {
            input_tokens: r.count(8)?,
            cached_input_tokens: r.count(9)?,
            cache_write_tokens: r.count(10)?,
            cache_write_1h_tokens: r.count(24)?,
            output_tokens: r.count(11)?,
            reasoning_tokens: r.count(12)?,
        },
        cost: NanoUsd(r.count(13)?),
        latency: r.opt_int(14)?.map(|us| Duration::from_micros(count(us))),
        response_id: r.opt_text(15)?,
        is_error: r.int(16)? != 0,
        is_unpriced: r.int(17)? != 0,
        is_estimated: r.int(18)? != 0,
        is_partial: r.int(19)? != 0,
        upstream: r.text(20)?,
        user: r.opt_text(21)?,
        session: r.opt_text(22)?,
        tags: r.opt_text(23)?,
        service_tier: r.opt_text(25)?,
        price: r.opt_text(26)?,
    })
}

/// One line of `usage`: the grouped columns, then the label of its key, then the sums.
pub(super) fn line_from<C: Cells>(groups: &[Group], r: &C) -> Result<UsageLine, C::Error> {
    let mut line = UsageLine {
        bucket: None,
        model: None,
        key: None,
        upstream: None,
        user: None,
        session: None,
        tags: Vec::new(),
        tag: None,
        counts: Counts::default(),
        partial_requests: 0,
    };
    let label = if groups.is_empty() {
        None
    } else {
        Some(r.text(groups.len())?)
    };
    for (i, group) in groups.iter().enumerate() {
        match group {
            Group::Day => line.bucket = Some(from_micros(r.int(i)? * 86_400_000_000)),
            Group::Hour => line.bucket = Some(from_micros(r.int(i)? * 3_600_000_000)),
            Group::Model => line.model = Some(r.text(i)?),
            Group::Upstream => line.upstream = Some(r.text(i)?),
            Group::User => line.user = r.opt_text(i)?,
            Group::Session => line.session = r.opt_text(i)?,
            Group::Tag(_) => line.tags.push(r.opt_text(i)?),
            Group::AnyTag => {
                let pair = r.text(i)?;
                line.tag = pair
                    .split_once('=')
                    .map(|(name, value)| (name.to_owned(), value.to_owned()));
            }
            Group::Key => {
                line.key = Some(Identity {
                    id: r.text(i)?,
                    label: label.clone().unwrap_or_default(),
                });
            }
        }
    }
    let at = if groups.is_empty() {
        0
    } else {
        groups.len() + 1
    };
    line.counts = counts_from(r, at)?;
    line.partial_requests = r.count(at + super::writer::COUNTERS.len())?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-11-25T12:00:00Z", &Rfc3339).unwrap()
    }

    #[test]
    fn times_are_rfc3339_dates_or_spans_back_from_now() {
        let t = |v| parse_time(v, now()).unwrap().format(&Rfc3339).unwrap();
        assert_eq!(t("2026-11-24T08:30:00Z"), "2026-11-24T08:30:00Z");
        assert_eq!(t("2026-11-24T08:30:00+01:00"), "2026-11-24T08:30:00+01:00");
        assert_eq!(t("2026-11-20"), "2026-11-20T00:00:00Z");
        assert_eq!(t("24h"), "2026-11-24T12:00:00Z");
        assert_eq!(t("7d"), "2026-11-18T12:00:00Z");
        assert_eq!(t("90m"), "2026-11-25T10:30:00Z");
        assert!(
            parse_time("yesterday", now())
                .unwrap_err()
                .0
                .contains("RFC 3339")
        );
    }

    #[test]
    fn a_range_must_not_end_before_it_starts() {
        assert!(Range::parse(Some("1h"), Some("2h"), now()).is_err());
        assert!(Range::parse(Some("2h"), Some("1h"), now()).is_ok());
        assert!(
            Range::parse(Some("nonsense"), None, now())
                .unwrap_err()
                .starts_with("`since`")
        );
    }

    #[test]
    fn groups_parse_as_a_list_without_repeats() {
        assert_eq!(
            Group::parse_list("day,model").unwrap(),
            vec![Group::Day, Group::Model]
        );
        assert!(Group::parse_list("day,day").is_err());
        assert!(Group::parse_list("week").is_err());
        assert_eq!(
            Group::parse_list("tag.team,user,session").unwrap(),
            vec![Group::Tag("team".into()), Group::User, Group::Session]
        );
        assert!(Group::parse_list("tag.Team").is_err());
        assert!(Group::parse_list("tag.a'b").is_err());
    }

    #[test]
    fn filters_take_name_value_conditions_each_once() {
        let mut filter = Filter::default();
        filter.add_written("tag.team=search").unwrap();
        filter.add_written("user = alice").unwrap();
        assert_eq!(filter.tags, [("team".to_owned(), "search".to_owned())]);
        assert_eq!(filter.user.as_deref(), Some("alice"));
        assert!(filter.add_written("user=bob").is_err());
        assert!(filter.add_written("tag.team=ads").is_err());
        assert!(filter.add_written("colour=red").is_err());
        assert!(filter.add_written("tag.BAD=x").is_err());
        assert!(filter.add_written("user").is_err());
    }
}
