//! Reading the ledger: totals over a time range, usage grouped by day, hour, model or key, and
//! the raw rows in order. Readers never write, so they work beside a running server.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time};

use super::writer::{count, counts_from};
use super::{FILE_NAME, LedgerError, Row, from_micros, micros, schema};
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

    fn bounds(&self) -> (i64, i64) {
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

    fn columns(&self) -> Cow<'static, str> {
        match self {
            Self::Day => "at / 86400000000".into(),
            Self::Hour => "at / 3600000000".into(),
            Self::Model => "model".into(),
            Self::Key => "key_id".into(),
            Self::Upstream => "upstream".into(),
            Self::User => "user".into(),
            Self::Session => "session".into(),
            Self::Tag(name) => tag_column(name).into(),
            // Names are `[a-z0-9_.-]`: the first `=` ends the name.
            Self::AnyTag => "each_tag.key || '=' || each_tag.value".into(),
        }
    }
}

/// The SQL of one tag's value. The name is checked (`check_tag_name`: `[a-z0-9_.-]` only), so
/// it can be written into the JSON path, quoted so that a `.` in it is not a step.
fn tag_column(name: &str) -> String {
    format!("json_extract(tags, '$.\"{name}\"')")
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

    /// The SQL condition on `request_rows` and its parameters, numbered from 1.
    fn sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        let (since, until) = self.range.bounds();
        let mut conditions = String::from("at >= ?1 AND at < ?2");
        let mut params = vec![since.into(), until.into()];
        let columns = [
            ("key_id", &self.key_id),
            ("model", &self.model),
            ("user", &self.user),
            ("session", &self.session),
        ];
        let tags = self.tags.iter().map(|(n, v)| (tag_column(n), v));
        let equal = columns
            .into_iter()
            .filter_map(|(c, v)| Some((Cow::Borrowed(c), v.as_ref()?)))
            .chain(tags.map(|(c, v)| (Cow::Owned(c), v)));
        for (column, value) in equal {
            params.push(value.clone().into());
            conditions.push_str(&format!(" AND {column} = ?{}", params.len()));
        }
        (conditions, params)
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

/// A read-only view of a ledger.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    /// Opens the ledger in `dir`; fails if there is none, or it is not ours.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        Self::open_file(&dir.join(FILE_NAME))
    }

    /// Opens the ledger file itself.
    pub fn open_file(path: &Path) -> Result<Self, LedgerError> {
        let conn = schema::open(path, schema::Access::Read)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    fn fail(&self, err: &rusqlite::Error) -> LedgerError {
        LedgerError::sqlite(&self.path, err)
    }

    /// The totals per key and model of the rows in `range`, shaped like `/stats`.
    pub fn totals(&self, range: Range) -> Result<Snapshot, LedgerError> {
        let lines = self.usage(
            &[Group::Key, Group::Model],
            &Filter {
                range,
                ..Filter::default()
            },
        )?;
        let since = match range.since {
            Some(since) => since,
            None => self.first_time()?.unwrap_or_else(OffsetDateTime::now_utc),
        };
        let upstreams = self
            .usage(
                &[Group::Upstream],
                &Filter {
                    range,
                    ..Filter::default()
                },
            )?
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
        self.conn
            .query_row("SELECT min(at) FROM requests", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|at| at.map(from_micros))
            .map_err(|e| self.fail(&e))
    }

    /// Sums of the filtered rows per group, in group order.
    pub fn usage(&self, groups: &[Group], filter: &Filter) -> Result<Vec<UsageLine>, LedgerError> {
        let (conditions, params) = filter.sql();
        let by: Vec<Cow<'_, str>> = groups.iter().map(Group::columns).collect();
        let rows = if groups.contains(&Group::AnyTag) {
            "request_rows, json_each(request_rows.tags) AS each_tag"
        } else {
            "request_rows"
        };
        let sql = if by.is_empty() {
            format!("SELECT {SUMS} FROM {rows} WHERE {conditions} HAVING count(*) > 0")
        } else {
            let by = by.join(", ");
            format!(
                "SELECT {by}, max(key_label), {SUMS} FROM {rows} WHERE {conditions} GROUP BY {by} ORDER BY {by}"
            )
        };
        let mut statement = self.conn.prepare(&sql).map_err(|e| self.fail(&e))?;
        let lines = statement
            .query_map(rusqlite::params_from_iter(params), |r| line_from(groups, r))
            .map_err(|e| self.fail(&e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.fail(&e))?;
        Ok(lines)
    }

    /// Cost per key id of the rows recorded from `since` (µs), or of all rows (`None`, read
    /// from the per-period totals rather than the rows).
    pub fn spend_by_key(
        &self,
        since: Option<i64>,
    ) -> Result<std::collections::HashMap<String, u64>, LedgerError> {
        let sql = match since {
            Some(_) => {
                "SELECT k.key_id, sum(r.cost_nano_usd) FROM requests r JOIN keys k ON k.id = r.key
                 WHERE r.at >= ?1 GROUP BY r.key"
            }
            None => {
                "SELECT key_id, sum(cost_nano_usd) FROM totals WHERE ?1 IS NOT NULL GROUP BY key_id"
            }
        };
        let mut statement = self.conn.prepare(sql).map_err(|e| self.fail(&e))?;
        let rows = statement
            .query_map([since.unwrap_or(i64::MIN)], |r| {
                Ok((r.get::<_, String>(0)?, count(r.get::<_, i64>(1)?)))
            })
            .map_err(|e| self.fail(&e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.fail(&e))
    }

    /// Calls `each` with every row that `filter` takes, oldest first, without loading them all;
    /// stops early when `each` returns false.
    pub fn for_each_row(
        &self,
        filter: &Filter,
        mut each: impl FnMut(&Row) -> bool,
    ) -> Result<(), LedgerError> {
        let (conditions, params) = filter.sql();
        let mut statement = self
            .conn
            .prepare(&format!(
                "SELECT at, period, key_id, key_label, model, flavor, status, streamed,
                    input_tokens, cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                    cost_nano_usd, latency_us, response_id, error, unpriced, estimated, partial,
                    upstream, user, session, tags, cache_write_1h_tokens, service_tier, price
                 FROM request_rows WHERE {conditions} ORDER BY at"
            ))
            .map_err(|e| self.fail(&e))?;
        let mut rows = statement
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| self.fail(&e))?;
        while let Some(r) = rows.next().map_err(|e| self.fail(&e))? {
            let row = row_from(r).map_err(|e| self.fail(&e))?;
            if !each(&row) {
                break;
            }
        }
        Ok(())
    }
}

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let n = |i: usize| -> rusqlite::Result<u64> { Ok(count(r.get::<_, i64>(i)?)) };
    Ok(Row {
        at: from_micros(r.get(0)?),
        period: n(1)?,
        key_id: r.get(2)?,
        key_label: r.get(3)?,
        model: r.get(4)?,
        flavor: r.get(5)?,
        status: r.get(6)?,
        is_streaming: r.get(7)?,
        usage: Usage {
            input_tokens: n(8)?,
            cached_input_tokens: n(9)?,
            cache_write_tokens: n(10)?,
            cache_write_1h_tokens: n(24)?,
            output_tokens: n(11)?,
            reasoning_tokens: n(12)?,
        },
        cost: NanoUsd(n(13)?),
        latency: r
            .get::<_, Option<i64>>(14)?
            .map(|us| Duration::from_micros(count(us))),
        response_id: r.get(15)?,
        is_error: r.get(16)?,
        is_unpriced: r.get(17)?,
        is_estimated: r.get(18)?,
        is_partial: r.get(19)?,
        upstream: r.get(20)?,
        user: r.get(21)?,
        session: r.get(22)?,
        tags: r.get(23)?,
        service_tier: r.get(25)?,
        price: r.get(26)?,
    })
}

/// One line of `usage`: the grouped columns, then the label of its key, then the sums.
fn line_from(groups: &[Group], r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageLine> {
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
        Some(r.get::<_, String>(groups.len())?)
    };
    for (i, group) in groups.iter().enumerate() {
        match group {
            Group::Day => line.bucket = Some(from_micros(r.get::<_, i64>(i)? * 86_400_000_000)),
            Group::Hour => line.bucket = Some(from_micros(r.get::<_, i64>(i)? * 3_600_000_000)),
            Group::Model => line.model = Some(r.get(i)?),
            Group::Upstream => line.upstream = Some(r.get(i)?),
            Group::User => line.user = r.get(i)?,
            Group::Session => line.session = r.get(i)?,
            Group::Tag(_) => line.tags.push(r.get(i)?),
            Group::AnyTag => {
                let pair: String = r.get(i)?;
                line.tag = pair
                    .split_once('=')
                    .map(|(name, value)| (name.to_owned(), value.to_owned()));
            }
            Group::Key => {
                line.key = Some(Identity {
                    id: r.get(i)?,
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
    line.partial_requests = count(r.get::<_, i64>(at + super::writer::COUNTERS.len())?);
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
