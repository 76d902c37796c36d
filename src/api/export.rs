//! Ledger rows as export lines: CSV (RFC 4180, safe to open in a spreadsheet) or JSON Lines,
//! for `/export` and the `export` command.

use std::borrow::Cow;
use std::io::{self, Write};

use serde::Serialize;

use super::stats::{rfc3339, serialize_usd};
use crate::error::InvalidValue;
use crate::meter::ledger::Row;
use crate::meter::ledger::history::{Filter, Reader};
use crate::meter::pricing::NanoUsd;
use crate::usage::ServiceTier;

/// Export file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header line (RFC 4180).
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// Parses `csv` or `jsonl`.
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        match value {
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            other => Err(InvalidValue(format!(
                "format must be csv or jsonl, got {other:?}"
            ))),
        }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/x-ndjson",
        }
    }

    pub(super) fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
        }
    }
}

/// The export columns, in order (new ones are added at the end, so scripts keep working).
const COLUMNS: [&str; 30] = [
    "time",
    "key_id",
    "key",
    "model",
    "flavor",
    "status",
    "streamed",
    "prompt_tokens",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "cost_nano_usd",
    "latency_ms",
    "response_id",
    "error",
    "unpriced",
    "estimated",
    "partial",
    "period",
    "upstream",
    "user",
    "session",
    "tags",
    "cache_write_1h_tokens",
    "service_tier",
    "price",
];

/// Writes the rows `filter` takes in `format` (CSV with a header line).
pub fn write_rows(
    reader: &Reader,
    filter: &Filter,
    format: Format,
    out: &mut impl Write,
) -> io::Result<()> {
    if format == Format::Csv {
        writeln!(out, "{}", COLUMNS.join(","))?;
    }
    let mut failure = None;
    let mut line = String::with_capacity(512);
    reader
        .for_each_row(filter, |row| {
            line.clear();
            match format {
                Format::Csv => csv_line(row, &mut line),
                Format::Jsonl => json_line(row, &mut line),
            }
            match out.write_all(line.as_bytes()) {
                Ok(()) => true,
                Err(err) => {
                    failure = Some(err);
                    false
                }
            }
        })
        .map_err(io::Error::other)?;
    failure.map_or(Ok(()), Err)
}

/// Cost in dollars with all nine decimals: exact, and read as a number by spreadsheets.
fn usd_exact(nano: u64) -> String {
    format!("{}.{:09}", nano / 1_000_000_000, nano % 1_000_000_000)
}

fn latency_ms(row: &Row) -> Option<String> {
    row.latency
        .map(|d| format!("{}.{:03}", d.as_micros() / 1000, d.as_micros() % 1000))
}

fn csv_line(row: &Row, line: &mut String) {
    use std::fmt::Write as _;
    let u = &row.usage;
    let _ = write!(
        line,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\r\n",
        rfc3339(row.at),
        csv_field(&row.key_id),
        csv_field(&row.key_label),
        csv_field(&row.model),
        csv_field(&row.flavor),
        row.status,
        row.is_streaming,
        u.prompt_tokens(),
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        u.total_tokens(),
        usd_exact(row.cost.0),
        row.cost.0,
        latency_ms(row).unwrap_or_default(),
        csv_field(row.response_id.as_deref().unwrap_or_default()),
        row.is_error,
        row.is_unpriced,
        row.is_estimated,
        row.is_partial,
        row.period,
        csv_field(&row.upstream),
        csv_field(row.user.as_deref().unwrap_or_default()),
        csv_field(row.session.as_deref().unwrap_or_default()),
        csv_field(&tags_text(row.tags.as_deref())),
        u.cache_write_1h_tokens,
        csv_field(service_tier(row)),
        csv_field(row.price.as_deref().unwrap_or_default()),
    );
}

/// The row's service tier: the ledger keeps none for the standard one.
fn service_tier(row: &Row) -> &str {
    row.service_tier
        .as_deref()
        .unwrap_or(ServiceTier::Standard.as_str())
}

/// Stored tags as the header writes them (`run=42,team=search`): values hold no comma.
fn tags_text(json: Option<&str>) -> String {
    let tags: crate::attribution::Tags = json
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let pairs: Vec<String> = tags.iter().map(|(n, v)| format!("{n}={v}")).collect();
    pairs.join(",")
}

/// A text cell as written: defused if a spreadsheet would run it as a formula, then quoted
/// when it holds a separator, a quote or a line break (RFC 4180).
fn csv_field(value: &str) -> Cow<'_, str> {
    let value = defuse_formula(value);
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\"")).into()
    } else {
        value
    }
}

/// Spreadsheets run a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return as a
/// formula, and a model name or response id comes from the client or the upstream: such a cell
/// gets a leading `'`, which makes it text, unless it is a plain number such as `-1.5`.
/// See <https://owasp.org/www-community/attacks/CSV_Injection>.
fn defuse_formula(value: &str) -> Cow<'_, str> {
    let is_trigger = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if is_trigger && !is_plain_number(value) {
        format!("'{value}").into()
    } else {
        value.into()
    }
}

/// True for a decimal number (`-1.5`, `+2e3`); `inf` and `NaN`, which Rust also parses, are
/// words to a spreadsheet.
fn is_plain_number(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
        && value.parse::<f64>().is_ok()
}

/// One export row as JSON.
#[derive(Serialize)]
struct RowView<'a> {
    time: String,
    key_id: &'a str,
    key: &'a str,
    model: &'a str,
    flavor: &'a str,
    status: u16,
    streamed: bool,
    prompt_tokens: u64,
    input_tokens: u64,
    cached_tokens: u64,
    cache_write_tokens: u64,
    completion_tokens: u64,
    reasoning_tokens: u64,
    total_tokens: u64,
    #[serde(serialize_with = "serialize_usd")]
    cost_usd: NanoUsd,
    cost_nano_usd: u64,
    latency_ms: Option<f64>,
    response_id: Option<&'a str>,
    error: bool,
    unpriced: bool,
    estimated: bool,
    partial: bool,
    period: u64,
    upstream: &'a str,
    user: Option<&'a str>,
    session: Option<&'a str>,
    /// The stored JSON object as it is.
    tags: Option<&'a serde_json::value::RawValue>,
    cache_write_1h_tokens: u64,
    service_tier: &'a str,
    price: Option<&'a str>,
}

fn json_line(row: &Row, line: &mut String) {
    let u = &row.usage;
    let view = RowView {
        time: rfc3339(row.at),
        key_id: &row.key_id,
        key: &row.key_label,
        model: &row.model,
        flavor: &row.flavor,
        status: row.status,
        streamed: row.is_streaming,
        prompt_tokens: u.prompt_tokens(),
        input_tokens: u.input_tokens,
        cached_tokens: u.cached_input_tokens,
        cache_write_tokens: u.cache_write_tokens,
        completion_tokens: u.output_tokens,
        reasoning_tokens: u.reasoning_tokens,
        total_tokens: u.total_tokens(),
        cost_usd: row.cost,
        cost_nano_usd: row.cost.0,
        latency_ms: latency_ms(row).and_then(|ms| ms.parse().ok()),
        response_id: row.response_id.as_deref(),
        error: row.is_error,
        unpriced: row.is_unpriced,
        estimated: row.is_estimated,
        partial: row.is_partial,
        period: row.period,
        upstream: &row.upstream,
        user: row.user.as_deref(),
        session: row.session.as_deref(),
        tags: row
            .tags
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
        cache_write_1h_tokens: u.cache_write_1h_tokens,
        service_tier: service_tier(row),
        price: row.price.as_deref(),
    };
    // Serializing plain fields cannot fail; an empty line would be the only trace if it did.
    if let Ok(json) = serde_json::to_string(&view) {
        line.push_str(&json);
    }
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("gpt-4o"), "gpt-4o");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_as_formulas_become_text() {
        for (value, written) in [
            ("=1+2", "'=1+2"),
            ("+1+2", "'+1+2"),
            ("-1+2", "'-1+2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "\"'\rx\""),
            (
                "=HYPERLINK(\"http://x\",\"x\")",
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"x\"\")\"",
            ),
            ("-inf", "'-inf"),
            ("-", "'-"),
            // Numbers stay numbers, and a sign inside a cell is harmless.
            ("-1.5", "-1.5"),
            ("+2e3", "+2e3"),
            ("gpt-4o", "gpt-4o"),
            ("a=b", "a=b"),
        ] {
            assert_eq!(csv_field(value), written, "{value:?}");
        }
    }

    #[test]
    fn costs_are_exported_exactly() {
        assert_eq!(usd_exact(4_500_000), "0.004500000");
        assert_eq!(usd_exact(12_345_678_901), "12.345678901");
        assert_eq!(usd_exact(0), "0.000000000");
    }
}
