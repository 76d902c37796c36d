//! History from the ledger: `/stats?since=&until=`, `/usage` (grouped sums), `/export` (raw
//! rows, streamed as `export` renders them) and the `export` command. Rows carry key ids and
//! labels, never keys.

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
use super::export::{Format, write_rows};
use super::stats::{CountsView, rfc3339};
use crate::app::AppState;
use crate::config::Config;
use crate::error::ProxyError;
use crate::meter::Counts;
use crate::meter::ledger::LedgerError;
use crate::meter::ledger::history::{Filter, Group, Range, Reader, UsageLine};

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
        let reader = ledger
            .reader()
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
    let reader = Reader::open_ledger(options)?;
    let mut out = io::BufWriter::with_capacity(EXPORT_CHUNK, out);
    match write_rows(&reader, &filter, format, &mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `llm-meter export | head`: the reader has what it wanted.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(CommandError::Write(err)),
    }
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
