//! `llm-meter report`: the ledger's spend over a period as an aligned table with totals, or as
//! the JSON of `/usage`.

use std::fmt::Write as _;

use time::{Duration, OffsetDateTime, Time};

use super::CommandError;
use super::history::{UsageView, day};
use super::stats::rfc3339;
use crate::config::Config;
use crate::error::InvalidValue;
use crate::meter::Counts;
use crate::meter::ledger::history::{Filter, Group, Range, Reader, UsageLine, parse_time};

/// What `llm-meter report` asks for (the command line's options, as given).
#[derive(Debug, Clone)]
pub struct Request {
    /// `today`, `week`, `month` or `all`.
    pub period: String,
    /// Dimensions, comma-separated (`day,model`).
    pub by: String,
    /// Start instead of the period's.
    pub since: Option<String>,
    /// End instead of now.
    pub until: Option<String>,
    /// `text` or `json`.
    pub format: String,
    /// Conditions `name=value` every row meets (`user=alice`, `tag.team=search`).
    pub filters: Vec<String>,
}

/// Runs the command: reads the ledger named by the config and renders the table.
pub fn run(config: &Config, args: &Request) -> Result<String, CommandError> {
    let options = config
        .ledger
        .as_ref()
        .ok_or(CommandError::NoLedger("report on"))?;
    let now = OffsetDateTime::now_utc();
    let bad = |option: &'static str| move |reason| CommandError::BadOption { option, reason };
    let mut range = period(&args.period, now).map_err(bad("--period"))?;
    if let Some(since) = &args.since {
        range.since = Some(parse_time(since, now).map_err(bad("--since"))?);
    }
    if let Some(until) = &args.until {
        range.until = Some(parse_time(until, now).map_err(bad("--until"))?);
    }
    let groups = Group::parse_list(&args.by).map_err(bad("--by"))?;
    let mut filter = Filter {
        range,
        ..Filter::default()
    };
    for condition in &args.filters {
        filter.add_written(condition).map_err(bad("--where"))?;
    }
    let reader = Reader::open_ledger(options)?;
    let mut lines = reader.usage(&groups, &filter)?;
    if args.format == "json" {
        order(&groups, &mut lines);
        let view = UsageView::new(range, &groups, &lines);
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    let heading = match (&args.since, &args.until) {
        (None, None) => format!("{} ({})", args.period, describe(range)),
        _ => describe(range),
    };
    Ok(render(&heading, &groups, lines))
}

/// The range of a named period, in UTC: `today`, `week` (since Monday), `month`, `all`.
pub fn period(name: &str, now: OffsetDateTime) -> Result<Range, InvalidValue> {
    let midnight = now.replace_time(Time::MIDNIGHT);
    let since = match name {
        "today" | "day" => midnight,
        "week" => midnight - Duration::days(i64::from(now.weekday().number_days_from_monday())),
        "month" => midnight
            .replace_day(1)
            .map_err(|e| format!("--period month: {e}"))?,
        "all" => return Ok(Range::default()),
        other => {
            return Err(InvalidValue(format!(
                "--period: expected today, week, month or all, got {other:?}"
            )));
        }
    };
    Ok(Range {
        since: Some(since),
        until: None,
    })
}

fn describe(range: Range) -> String {
    let at = |t: Option<OffsetDateTime>, open: &str| t.map_or_else(|| open.to_owned(), rfc3339);
    format!(
        "{} to {}",
        at(range.since, "the first request"),
        at(range.until, "now")
    )
}

/// Renders the table: one row per line, then the totals; costs of unpriced models noted.
pub fn render(heading: &str, groups: &[Group], mut lines: Vec<UsageLine>) -> String {
    let mut out = format!("llm-meter report: {heading}\n");
    if lines.is_empty() {
        out.push_str("no requests recorded in this range\n");
        return out;
    }
    order(groups, &mut lines);
    let mut header: Vec<String> = groups.iter().map(|g| g.name().to_uppercase()).collect();
    header.extend(
        [
            "REQUESTS",
            "ERRORS",
            "PROMPT",
            "CACHED",
            "COMPLETION",
            "COST",
        ]
        .map(str::to_owned),
    );
    let labels = groups.len();
    let mut table = vec![header];
    let mut totals = Counts::default();
    for line in &lines {
        totals += &line.counts;
        let mut tags = line.tags.iter();
        let mut cells: Vec<String> = groups
            .iter()
            .map(|g| match g {
                Group::Day => line.bucket.map(day).unwrap_or_default(),
                Group::Hour => line
                    .bucket
                    .map(|t| format!("{} {:02}:00", day(t), t.hour()))
                    .unwrap_or_default(),
                Group::Model => line.model.clone().unwrap_or_default(),
                Group::Key => line
                    .key
                    .as_ref()
                    .map(|k| format!("{} [{}]", k.label, k.id))
                    .unwrap_or_default(),
                Group::Upstream => line.upstream.clone().unwrap_or_default(),
                Group::User => named(line.user.as_deref()),
                Group::Session => named(line.session.as_deref()),
                Group::Tag(_) => named(tags.next().and_then(Option::as_deref)),
                Group::AnyTag => line
                    .tag
                    .as_ref()
                    .map(|(name, value)| format!("{name}={value}"))
                    .unwrap_or_default(),
            })
            .collect();
        cells.extend(numbers(&line.counts));
        table.push(cells);
    }
    let mut total_row = vec![String::new(); labels.max(1)];
    total_row[0] = "TOTAL".to_owned();
    total_row.extend(numbers(&totals));
    table.push(total_row);

    out.push_str(&aligned(&table, labels.max(1)));
    match totals.unpriced_requests {
        0 => {}
        1 => out.push_str(
            "1 request was to a model without a price: its tokens are counted, its cost is not (COST: unknown, or +? after the part that is known)\n",
        ),
        n => {
            let _ = writeln!(
                out,
                "{n} requests were to models without a price: their tokens are counted, their cost is not (COST: unknown, or +? after the part that is known)"
            );
        }
    }
    match totals.estimated_requests {
        0 => {}
        1 => out.push_str(
            "1 request reported no usage: its tokens were counted by a tokenizer (estimated)\n",
        ),
        n => {
            let _ = writeln!(
                out,
                "{n} requests reported no usage: their tokens were counted by a tokenizer (estimated)"
            );
        }
    }
    out
}

/// A user, session or tag value as a cell: `-` for rows that named none.
fn named(value: Option<&str>) -> String {
    value.unwrap_or(NONE).to_owned()
}

/// The cell of a user, session or tag that rows did not name.
const NONE: &str = "-";

/// The table's rows as aligned text: the first `labels` columns to the left, numbers to the right.
fn aligned(table: &[Vec<String>], labels: usize) -> String {
    let mut out = String::new();
    let columns = table[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|row| row.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if c < labels {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Without a time column, the biggest spenders come first; with one, the ledger's time order stays.
fn order(groups: &[Group], lines: &mut [UsageLine]) {
    if !groups.iter().any(|g| matches!(g, Group::Day | Group::Hour)) {
        lines.sort_by_key(|line| std::cmp::Reverse(line.counts.cost));
    }
}

fn numbers(c: &Counts) -> Vec<String> {
    vec![
        thousands(c.requests),
        thousands(c.errors),
        thousands(c.prompt_tokens),
        thousands(c.cached_tokens),
        thousands(c.completion_tokens),
        cost(c),
    ]
}

/// A cost cell: `$0.0122`; with unpriced requests in it, `unknown` when nothing of it is known,
/// else `$0.0122+?` (the known part, and more not priced). Never a bare `$0.00` for them.
fn cost(c: &Counts) -> String {
    match (c.unpriced_requests, c.cost.0) {
        (0, _) => c.cost.to_string(),
        (_, 0) => UNKNOWN.to_owned(),
        _ => format!("{}+?", c.cost),
    }
}

/// The cost cell of requests none of whose cost is known.
const UNKNOWN: &str = "unknown";

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    #[test]
    fn unpriced_cost_cells_are_unknown_or_marked_as_a_lower_bound() {
        let known = Counts {
            cost: crate::money::NanoUsd(12_200_000),
            ..Counts::default()
        };
        assert_eq!(cost(&known), "$0.0122");
        assert_eq!(cost(&Counts::default()), "$0.00");
        let none_known = Counts {
            unpriced_requests: 3,
            ..Counts::default()
        };
        assert_eq!(cost(&none_known), "unknown");
        let partly = Counts {
            unpriced_requests: 1,
            ..known
        };
        assert_eq!(cost(&partly), "$0.0122+?");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn periods_start_at_utc_midnight_monday_and_the_first() {
        // A Wednesday.
        let now = OffsetDateTime::parse("2026-11-25T15:30:00Z", &Rfc3339).unwrap();
        let since = |p| rfc3339(period(p, now).unwrap().since.unwrap());
        assert_eq!(since("today"), "2026-11-25T00:00:00Z");
        assert_eq!(since("week"), "2026-11-23T00:00:00Z");
        assert_eq!(since("month"), "2026-11-01T00:00:00Z");
        assert_eq!(period("all", now).unwrap(), Range::default());
        assert!(period("year", now).is_err());
    }
}
