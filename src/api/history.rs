//! History from the ledger: `/stats?since=&until=`, `/usage` (grouped sums), `/export` (raw
//! rows, streamed) and the `export` command. Rows carry key ids and labels, never keys.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use http_body::Frame;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::CommandError;
use super::stats::{CountsView, rfc3339, serialize_usd};
use crate::app::AppState;
use crate::config::Config;
use crate::error::InvalidValue;
use crate::error::ProxyError;
use crate::meter::Counts;
use crate::meter::ledger::LedgerError;
use crate::meter::ledger::Row;
use crate::meter::ledger::history::{Filter, Group, Range, Reader, UsageLine};
use crate::meter::pricing::NanoUsd;

/// How long a history read waits for the rows recorded before it to be committed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of rendered rows sent to the client at a time.
const EXPORT_CHUNK: usize = 64 * 1024;

/// `?since=&until=` of the history endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct RangeQuery {
    since: Option<String>,
    until: Option<String>,
}

impl RangeQuery {
    /// True when the query asks for a range.
    pub fn is_given(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }

    /// The parsed range.
    pub fn parse(&self) -> Result<Range, ProxyError> {
        Range::parse(
            self.since.as_deref(),
            self.until.as_deref(),
            OffsetDateTime::now_utc(),
        )
        .map_err(ProxyError::BadQuery)
    }
}

/// Runs `read` against the ledger on the blocking pool, once every row recorded before the
/// call is committed, so history always includes the requests already answered.
pub async fn read<T: Send + 'static>(
    state: &AppState,
    read: impl FnOnce(Reader) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, ProxyError> {
    if state.meter.ledger().is_none() {
        return Err(ProxyError::NoLedger);
    }
    let meter = Arc::clone(&state.meter);
    tokio::task::spawn_blocking(move || {
        let ledger = meter.ledger().ok_or(ProxyError::NoLedger)?;
        if !ledger.sync(SYNC_TIMEOUT) {
            tracing::warn!(
                "history read while the ledger is behind: the newest rows are not included yet"
            );
        }
        let reader = Reader::open_file(ledger.path())
            .map_err(|e| ProxyError::LedgerUnavailable(e.to_string()))?;
        read(reader).map_err(|e| ProxyError::LedgerUnavailable(e.to_string()))
    })
    .await
    .map_err(|_| ProxyError::Internal)?
}

/// `?group_by=&since=&until=` of `/usage`; its filters (`key=`, `model=`, `user=`,
/// `session=`, `tag.NAME=`) are read from the query's pairs (`filter_of`).
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    group_by: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

/// The query's pairs, for the filters, whose names (`tag.team`) are not fields.
pub type Pairs = Vec<(String, String)>;

/// The rows of `range` that the query's filter pairs take. `own` are the endpoint's other
/// parameters; any other name is refused, so that a mistyped filter (`tags.team=`) is not
/// taken for no filter at all.
pub fn filter_of(range: Range, pairs: &Pairs, own: &[&str]) -> Result<Filter, ProxyError> {
    let mut filter = Filter {
        range,
        ..Filter::default()
    };
    for (name, value) in pairs {
        let is_filter = filter
            .add(name, value)
            .map_err(|e| ProxyError::BadQuery(format!("`{name}`: {e}")))?;
        if !is_filter && !own.contains(&name.as_str()) {
            return Err(ProxyError::BadQuery(format!(
                "unknown parameter `{name}`: the filters are key, model, user, session and tag.NAME, besides {}",
                own.join(", ")
            )));
        }
    }
    Ok(filter)
}

/// One row of `/usage`.
#[derive(Debug, Serialize)]
struct UsageRowView {
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hour: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    /// Grouped by user: the user, or null for the rows that named none.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Option<String>>,
    /// Grouped by tags: each tag's value, or null.
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<BTreeMap<String, Option<String>>>,
    /// Grouped by every tag: this line's.
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<TagView>,
    #[serde(flatten)]
    counts: CountsView,
    /// Requests whose response did not arrive whole (the client left, or the upstream cut it).
    partial_requests: u64,
}

/// One tag, by name and value.
#[derive(Debug, Serialize)]
struct TagView {
    name: String,
    value: String,
}

/// `/usage` as a whole (and `llm-meter report --format json`).
#[derive(Debug, Serialize)]
pub struct UsageView {
    since: Option<String>,
    until: Option<String>,
    group_by: Vec<String>,
    rows: Vec<UsageRowView>,
    totals: TotalsView,
}

/// The totals of `/usage`: the counters, and the partial requests among them.
#[derive(Debug, Serialize)]
struct TotalsView {
    #[serde(flatten)]
    counts: CountsView,
    partial_requests: u64,
}

impl UsageView {
    /// The view of `lines`, summed over `range` per `groups`, in their order, with their totals.
    pub fn new(range: Range, groups: &[Group], lines: &[UsageLine]) -> Self {
        let mut totals = Counts::default();
        let mut partial_requests = 0;
        for line in lines {
            totals += &line.counts;
            partial_requests += line.partial_requests;
        }
        Self {
            since: range.since.map(rfc3339),
            until: range.until.map(rfc3339),
            group_by: groups.iter().map(|g| g.name().into_owned()).collect(),
            rows: lines.iter().map(|l| row_view(groups, l)).collect(),
            totals: TotalsView {
                counts: CountsView::from(&totals),
                partial_requests,
            },
        }
    }
}

/// `GET /usage`: the ledger's counters summed per day, hour, model and/or key over a range.
pub async fn usage(
    State(state): State<AppState>,
    Query(query): Query<UsageQuery>,
    Query(pairs): Query<Pairs>,
) -> Response {
    let answer = async {
        let groups = Group::parse_list(query.group_by.as_deref().unwrap_or("day"))
            .map_err(|e| ProxyError::BadQuery(format!("`group_by`: {e}")))?;
        let filter = filter_of(
            query.range.parse()?,
            &pairs,
            &["group_by", "since", "until"],
        )?;
        let range = filter.range;
        let by = groups.clone();
        let lines = read(&state, move |reader| reader.usage(&by, &filter)).await?;
        Ok::<_, ProxyError>(UsageView::new(range, &groups, &lines))
    };
    match answer.await {
        Ok(view) => Json(view).into_response(),
        Err(err) => err.into_response(),
    }
}

fn row_view(groups: &[Group], line: &UsageLine) -> UsageRowView {
    let bucket = line.bucket;
    UsageRowView {
        day: groups
            .contains(&Group::Day)
            .then(|| bucket.map(day))
            .flatten(),
        hour: groups
            .contains(&Group::Hour)
            .then(|| bucket.map(rfc3339))
            .flatten(),
        model: line.model.clone(),
        key: line.key.as_ref().map(|k| k.label.clone()),
        key_id: line.key.as_ref().map(|k| k.id.clone()),
        upstream: line.upstream.clone(),
        user: groups.contains(&Group::User).then(|| line.user.clone()),
        session: groups
            .contains(&Group::Session)
            .then(|| line.session.clone()),
        tags: groups
            .iter()
            .any(|g| matches!(g, Group::Tag(_)))
            .then(|| tags_of(groups, line)),
        tag: line.tag.as_ref().map(|(name, value)| TagView {
            name: name.clone(),
            value: value.clone(),
        }),
        counts: CountsView::from(&line.counts),
        partial_requests: line.partial_requests,
    }
}

/// The tags grouped by and their values in `line`.
pub fn tags_of(groups: &[Group], line: &UsageLine) -> BTreeMap<String, Option<String>> {
    let names = groups.iter().filter_map(|g| match g {
        Group::Tag(name) => Some(name.clone()),
        _ => None,
    });
    names.zip(line.tags.iter().cloned()).collect()
}

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

    fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/x-ndjson",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
        }
    }
}

/// `?format=&since=&until=` of `/export`, and its filters as in `/usage`.
#[derive(Debug, Deserialize)]
pub struct ExportQuery {
    format: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

/// `GET /export`: every row in the range, oldest first, streamed in chunks as it is read.
pub async fn export(
    State(state): State<AppState>,
    Query(query): Query<ExportQuery>,
    Query(pairs): Query<Pairs>,
) -> Response {
    let prepared = async {
        let format = Format::parse(query.format.as_deref().unwrap_or("csv"))
            .map_err(|e| ProxyError::BadQuery(e.into()))?;
        let filter = filter_of(query.range.parse()?, &pairs, &["format", "since", "until"])?;
        // Open (and sync) first, so a missing ledger is an error status, not a cut body.
        let reader = read(&state, Ok).await?;
        Ok::<_, ProxyError>((format, filter, reader))
    };
    let (format, filter, reader) = match prepared.await {
        Ok(prepared) => prepared,
        Err(err) => return err.into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // The reader runs on the blocking pool; the bounded channel holds it back to the client's pace.
    drop(tokio::task::spawn_blocking(move || {
        let mut sink = ChannelWriter {
            tx,
            buf: Vec::with_capacity(EXPORT_CHUNK),
        };
        let result = write_rows(&reader, &filter, format, &mut sink).and_then(|()| sink.flush());
        if let Err(err) = result
            && err.kind() != io::ErrorKind::BrokenPipe
        {
            tracing::error!(error = %err, "export stopped");
            let _ = sink.tx.blocking_send(Err(err));
        }
    }));
    let filename = format!(
        "attachment; filename=\"llm-meter-{}.{}\"",
        day(OffsetDateTime::now_utc()),
        format.extension()
    );
    (
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (header::CONTENT_DISPOSITION, filename),
        ],
        Body::new(ChannelBody { rx }),
    )
        .into_response()
}

/// What `llm-meter export` asks for (the command line's options, as given).
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// `csv` or `jsonl`.
    pub format: String,
    /// The first time included.
    pub since: Option<String>,
    /// The end, excluded.
    pub until: Option<String>,
    /// Conditions `name=value` every row meets (`user=alice`, `tag.team=search`).
    pub filters: Vec<String>,
}

/// The `export` command: rows to `out`.
pub fn export_to(
    config: &Config,
    args: &ExportRequest,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let options = config
        .ledger
        .as_ref()
        .ok_or(CommandError::NoLedger("export"))?;
    let format = Format::parse(&args.format).map_err(|reason| CommandError::BadOption {
        option: "--format",
        reason,
    })?;
    let range = Range::parse(
        args.since.as_deref(),
        args.until.as_deref(),
        OffsetDateTime::now_utc(),
    )
    .map_err(|reason| CommandError::BadOption {
        option: "--since/--until",
        reason: reason.into(),
    })?;
    let mut filter = Filter {
        range,
        ..Filter::default()
    };
    for condition in &args.filters {
        filter
            .add_written(condition)
            .map_err(|reason| CommandError::BadOption {
                option: "--where",
                reason,
            })?;
    }
    let reader = Reader::open(&options.dir)?;
    let mut out = io::BufWriter::with_capacity(EXPORT_CHUNK, out);
    match write_rows(&reader, &filter, format, &mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `llm-meter export | head`: the reader has what it wanted.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(CommandError::Write(err)),
    }
}

/// The export columns, in order (new ones are added at the end, so scripts keep working).
const COLUMNS: [&str; 27] = [
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
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\r\n",
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
    );
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
    };
    // Serializing plain fields cannot fail; an empty line would be the only trace if it did.
    if let Ok(json) = serde_json::to_string(&view) {
        line.push_str(&json);
    }
    line.push('\n');
}

/// `2026-11-25`.
pub fn day(at: OffsetDateTime) -> String {
    at.date().to_string()
}

/// Buffers rendered rows and hands them to the response body in chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= EXPORT_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(EXPORT_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            // The client went away: stop reading the ledger.
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

/// A response body fed by a channel.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|chunk| chunk.map(Frame::data)))
    }
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
