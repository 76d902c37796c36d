//! The writer thread: group commits of queued rows, retries while the disk fails, restore on start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior, params};

use super::history::Cells;
use super::queue::{self, Entry};
use super::{Restored, Row, Shared, from_micros, micros};
use crate::key::Identity;
use crate::meter::Counts;
use crate::money::NanoUsd;

/// How long the writer waits before retrying after a failed commit.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Backlog above which a slow disk is warned about (at most once a minute).
const SLOW_BACKLOG: u64 = 10_000;

/// Where a batch is committed: the SQLite file, or PostgreSQL.
pub(super) trait Store: Send {
    /// Writes a batch of queued entries in one transaction. A batch that fails is given again,
    /// grown by what was queued since (or with its oldest rows given up), so a store must not
    /// keep anything of a failed attempt.
    fn commit(&mut self, batch: &[u8]) -> Result<(), String>;
}

/// The SQLite file's store.
pub(super) struct Sqlite {
    pub conn: Connection,
    pub ids: Ids,
    /// The last `at` written: each row's is made greater, so it can be the rowid.
    pub last_at: i64,
}

impl Store for Sqlite {
    fn commit(&mut self, batch: &[u8]) -> Result<(), String> {
        commit(&mut self.conn, batch, &mut self.last_at, &mut self.ids).map_err(|err| {
            // Ids handed out in the rolled-back transaction no longer exist.
            self.ids = Ids::default();
            err.to_string()
        })
    }
}

pub(super) struct Writer {
    pub store: Box<dyn Store>,
    pub shared: Arc<Shared>,
    pub flush_interval: Duration,
    pub max_pending_rows: usize,
    pub path: PathBuf,
    pub batch: Batch,
    pub last_slow_warning: Option<Instant>,
}

/// Entries taken from the queue but not yet committed (kept across failed attempts).
#[derive(Default)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    len: usize,
}

/// A buffer grown past this by a backlog is given back once the backlog is written: about 3,000
/// rows, more than a flush interval brings at any but the highest rates. Larger kept buffers
/// raised the load benchmark's peak RSS and made its soak creep (see docs/performance.md).
const KEEP_CAPACITY: usize = 512 << 10;

impl Writer {
    /// One round: gathers a batch and commits it (or keeps it for a retry). False once the
    /// ledger is closed and everything is written or given up.
    /// With `wait`, first waits for the batch to fill (see `wait_for_batch`); without, the caller
    /// has waited already, outside the writer's lock.
    fn round(&mut self, wait: bool) -> bool {
        if wait {
            wait_for_batch(&self.shared, self.flush_interval, self.batch.len > 0);
        }
        let mut batch = std::mem::take(&mut self.batch);
        let go_on = self.round_with(&mut batch);
        self.batch = batch;
        go_on
    }

    fn round_with(&mut self, batch: &mut Batch) -> bool {
        let is_closing = self.take(batch);
        if batch.len == 0 {
            return !is_closing;
        }
        let started = Instant::now();
        match self.store.commit(&batch.bytes) {
            Ok(()) => {
                let n = batch.len as u64;
                batch.len = 0;
                batch.bytes.clear();
                if batch.bytes.capacity() > KEEP_CAPACITY {
                    batch.bytes.shrink_to(KEEP_CAPACITY / 4);
                }
                self.shared.pending.fetch_sub(n, Relaxed);
                self.shared.written.fetch_add(n, Relaxed);
                self.settle(n);
                if self.shared.is_failing.swap(false, Relaxed) {
                    tracing::info!(path = %self.path.display(), "ledger writes succeed again: the rows kept in memory are saved");
                }
                let pending = self.shared.pending.load(Relaxed);
                if pending > SLOW_BACKLOG
                    && self
                        .last_slow_warning
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    self.last_slow_warning = Some(Instant::now());
                    tracing::warn!(path = %self.path.display(), pending_rows = pending, commit_ms = started.elapsed().as_millis(), "the ledger's disk is slower than the traffic: rows are waiting in memory");
                }
            }
            Err(reason) => {
                if !self.shared.is_failing.swap(true, Relaxed) {
                    tracing::error!(path = %self.path.display(), error = %reason, "cannot write to the ledger: forwarding goes on, rows wait in memory and are retried");
                }
                *self.shared.last_error.lock() = Some(reason);
                self.give_up_oldest(batch);
                if is_closing {
                    self.give_up(batch);
                    return false;
                }
                // Wait before the next attempt, still taking new rows (and a close).
                let queue = self.shared.queue.lock();
                if !queue.is_closing {
                    drop(self.shared.wake.wait_for(queue, RETRY_AFTER));
                }
            }
        }
        true
    }

    /// Moves the queue into `batch`. Returns whether the ledger is closing.
    fn take(&self, batch: &mut Batch) -> bool {
        let mut queue = self.shared.queue.lock();
        queue.is_flush_asked = false;
        if batch.len == 0 {
            // Trade buffers: the queue gets the writer's empty one, capacity and all.
            batch.bytes.clear();
            std::mem::swap(&mut batch.bytes, &mut queue.bytes);
        } else {
            batch.bytes.extend_from_slice(&queue.bytes);
            queue.bytes.clear();
        }
        batch.len += std::mem::take(&mut queue.len);
        queue.oldest = None;
        queue.is_closing
    }

    /// Counts entries as done with (committed or given up) and wakes `sync` callers.
    fn settle(&self, n: u64) {
        self.shared.settled.fetch_add(n, Relaxed);
        let _queue = self.shared.queue.lock();
        self.shared.settled_cv.notify_all();
    }

    /// Gives up the whole batch on a close while the disk fails: counts and logs its rows as
    /// lost, and empties it. Both writer threads run a round on close; the one that comes second
    /// must find nothing left to count and log again.
    fn give_up(&self, batch: &mut Batch) {
        let rows = queue::entries(&batch.bytes)
            .filter(|e| matches!(e, Entry::Row(_)))
            .count() as u64;
        tracing::error!(path = %self.path.display(), lost_rows = rows, "stopping with the ledger still failing: the rows not yet written are lost");
        let entries = batch.len as u64;
        self.shared.lost.fetch_add(rows, Relaxed);
        self.shared.pending.fetch_sub(entries, Relaxed);
        self.settle(entries);
        batch.len = 0;
        batch.bytes.clear();
    }

    /// Keeps the backlog within its bound by giving up the oldest rows (periods are kept).
    fn give_up_oldest(&self, batch: &mut Batch) {
        let rows = queue::entries(&batch.bytes)
            .filter(|e| matches!(e, Entry::Row(_)))
            .count();
        let excess = rows.saturating_sub(self.max_pending_rows);
        if excess == 0 {
            return;
        }
        let dropped = queue::drop_oldest_rows(&mut batch.bytes, excess);
        batch.len -= dropped;
        self.shared.pending.fetch_sub(dropped as u64, Relaxed);
        self.shared.lost.fetch_add(dropped as u64, Relaxed);
        self.settle(dropped as u64);
        tracing::error!(path = %self.path.display(), lost_rows = dropped, max_pending_rows = self.max_pending_rows, "the ledger backlog is full: gave up the oldest rows (their totals stay in /stats until restart)");
    }
}

/// Waits for a batch to start (unless one is already waiting for a retry), then up to a flush
/// interval for it to fill; returns early on a long queue, a history read's flush, or close.
/// Runs without the writer's lock, so the background thread never sleeps holding it.
fn wait_for_batch(shared: &Shared, flush_interval: Duration, is_retrying: bool) {
    let mut queue = shared.queue.lock();
    while queue.len == 0 && !is_retrying && !queue.is_closing {
        queue = shared.wake.wait(queue);
    }
    let deadline = Instant::now() + flush_interval;
    while !queue.is_closing && !queue.is_flush_asked && queue.len < super::EARLY_WAKE {
        let timed_out;
        (queue, timed_out) = shared.wake.wait_until(queue, deadline);
        if timed_out {
            break;
        }
    }
}

/// Backlog at which the normal-priority thread takes over from the background one (the queue
/// wakes it then): on a CPU kept busy, the background thread gets no time, and rows waiting
/// in memory are the ledger's share of the process's RSS (about 150 bytes each, twice over:
/// the queue's buffer and the writer's keep their capacity).
pub(super) const HIGH_WATER: u64 = super::EARLY_WAKE as u64;
/// Backlog under which it hands back.
const LOW_WATER: u64 = 1_000;

/// Starts the writer on two threads sharing it. One runs at background priority (`SCHED_IDLE`
/// on Linux): it writes with CPU time nobody else wants, so a busy proxy never waits for it.
/// The other, at normal priority, sleeps and takes over when the backlog shows that the CPU
/// has had no room for a while, and for the final flush on close.
pub(super) fn start(writer: Writer) -> std::io::Result<Vec<JoinHandle<()>>> {
    let shared = Arc::clone(&writer.shared);
    let flush_interval = writer.flush_interval;
    let writer = Arc::new(Mutex::new(writer));
    let background = Arc::clone(&writer);
    let shared_bg = Arc::clone(&shared);
    let writing = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            lower_priority();
            loop {
                let is_retrying = background.lock().batch.len > 0;
                wait_for_batch(&shared_bg, flush_interval, is_retrying);
                if !background.lock().round(false) {
                    return;
                }
            }
        })?;
    let rescuing = std::thread::Builder::new()
        .name("ledger-rescue".into())
        .spawn(move || rescue(&writer, &shared, flush_interval))?;
    Ok(vec![writing, rescuing])
}

/// Looks every flush interval whether the background writer keeps up: it has not taken a row
/// queued two intervals ago, or the backlog is long. Then it writes until the backlog is short,
/// so what a killed process can lose stays about three flush intervals even on a busy CPU.
fn rescue(writer: &Mutex<Writer>, shared: &Shared, flush_interval: Duration) {
    let late = flush_interval * 2;
    loop {
        let mut queue = shared.queue.lock();
        if !queue.is_closing {
            (queue, _) = shared.rescue.wait_for(queue, flush_interval);
        }
        let is_closing = queue.is_closing;
        let is_late = queue.oldest.is_some_and(|t| t.elapsed() > late);
        drop(queue);
        if is_closing {
            // Shutdown must not wait for idle CPU.
            let mut writer = writer.lock();
            while writer.round(true) {}
            return;
        }
        let pending = shared.pending.load(Relaxed);
        if is_late || pending >= HIGH_WATER {
            let mut writer = writer.lock();
            tracing::debug!(
                pending_rows = pending,
                "the CPU is busy: the ledger writes at normal priority until it catches up"
            );
            loop {
                if !writer.round(true) {
                    return;
                }
                if shared.pending.load(Relaxed) <= LOW_WATER {
                    break;
                }
            }
        }
    }
}

/// Lowers the calling thread to background priority, where the platform allows it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(err) = set_thread_priority_and_policy(
            thread_native_id(),
            thread_priority::ThreadPriority::Min,
            idle,
        ) {
            tracing::debug!(?err, "the ledger writer keeps normal priority");
        }
    }
}

/// Multi-row INSERTs after which a commit yields the CPU. When both cores are busy, the
/// normal-priority thread writes the backlog in bursts of thousands of rows, 4 ms and more of
/// CPU; yielding every 256 rows lets a request thread waiting for that core run in between,
/// which lowers the p99 latency under load with the same throughput (see docs/performance.md).
const YIELD_EVERY: usize = 8;

/// Writes a batch in one transaction: the rows, new periods, and the sums of the rows per
/// (period, key, model) added to `totals`.
fn commit(
    conn: &mut Connection,
    batch: &[u8],
    last_at: &mut i64,
    ids: &mut Ids,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut at = *last_at;
    let mut sums: HashMap<(u64, &str, &str), (&str, Counts), foldhash::fast::RandomState> =
        HashMap::default();
    let mut by_upstream: HashMap<(u64, &str), Counts, foldhash::fast::RandomState> =
        HashMap::default();
    {
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        let mut period =
            tx.prepare_cached("INSERT OR IGNORE INTO periods (id, started_at) VALUES (?1, ?2)")?;
        let mut chunk: Vec<(Refs, Row<&str>)> = Vec::with_capacity(ROWS_PER_INSERT);
        let mut inserts = 0_usize;
        for entry in queue::entries(batch) {
            match entry {
                Entry::Period { id, started } => {
                    period.execute(params![int(id), micros(started)])?;
                }
                Entry::Row(row) => {
                    at = micros(row.at).max(at.saturating_add(1));
                    let (_, sum) = sums
                        .entry((row.period, row.key_id, row.model))
                        .or_insert((row.key_label, Counts::default()));
                    let counts = row.counts();
                    *sum += &counts;
                    *by_upstream.entry((row.period, row.upstream)).or_default() += &counts;
                    let refs = Refs {
                        at,
                        key: ids.key(&tx, row.key_id, row.key_label)?,
                        model: ids.name(&tx, row.model)?,
                        upstream: ids.name(&tx, row.upstream)?,
                        flavor: ids.name(&tx, row.flavor)?,
                        price: row.price.map(|label| ids.name(&tx, label)).transpose()?,
                    };
                    chunk.push((refs, row));
                    if chunk.len() == ROWS_PER_INSERT {
                        for (i, (refs, row)) in chunk.iter().enumerate() {
                            bind_row(&mut many, i * COLUMNS, refs, row)?;
                        }
                        many.raw_execute()?;
                        chunk.clear();
                        inserts += 1;
                        if inserts.is_multiple_of(YIELD_EVERY) {
                            std::thread::yield_now();
                        }
                    }
                }
            }
        }
        for (refs, row) in &chunk {
            bind_row(&mut one, 0, refs, row)?;
            one.raw_execute()?;
        }
    }
    {
        let mut upsert = tx.prepare_cached(&upsert_sql(
            "totals (period, key_id, key_label, model,",
            "?1, ?2, ?3, ?4",
            "period, key_id, model",
        ))?;
        for ((period, key_id, model), (label, c)) in &sums {
            upsert.raw_bind_parameter(1, int(*period))?;
            upsert.raw_bind_parameter(2, key_id)?;
            upsert.raw_bind_parameter(3, label)?;
            upsert.raw_bind_parameter(4, model)?;
            bind_counts(&mut upsert, 4, c)?;
            upsert.raw_execute()?;
        }
        let mut upsert = tx.prepare_cached(&upsert_sql(
            "upstream_totals (period, upstream,",
            "?1, ?2",
            "period, upstream",
        ))?;
        for ((period, upstream), c) in &by_upstream {
            upsert.raw_bind_parameter(1, int(*period))?;
            upsert.raw_bind_parameter(2, upstream)?;
            bind_counts(&mut upsert, 2, c)?;
            upsert.raw_execute()?;
        }
    }
    tx.commit()?;
    // Only once committed: a failed batch is retried with the same times.
    *last_at = at;
    Ok(())
}

/// Adds a batch's sums to a totals table: `table` names it and its leading columns,
/// `values` their parameters, `conflict` its primary key; the ten counters follow.
fn upsert_sql(table: &str, values: &str, conflict: &str) -> String {
    let first = values.matches('?').count();
    let params: Vec<String> = (first + 1..=first + COUNTERS.len())
        .map(|i| format!("?{i}"))
        .collect();
    let sums: Vec<String> = COUNTERS
        .iter()
        .map(|c| format!("{c} = {c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} {}) VALUES ({values}, {}) ON CONFLICT ({conflict}) DO UPDATE SET {}",
        COUNTERS.join(", "),
        params.join(", "),
        sums.join(", ")
    )
}

/// The counter columns of both totals tables, in the order `counts_from` reads them.
pub const COUNTERS: [&str; 11] = [
    "requests",
    "errors",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "unpriced",
    "estimated",
    "cache_write_1h_tokens",
];

/// Binds `COUNTERS` after `base` parameters.
fn bind_counts(
    upsert: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    c: &Counts,
) -> rusqlite::Result<()> {
    let input = c.prompt_tokens - c.cached_tokens - c.cache_write_tokens;
    for (i, n) in [
        c.requests,
        c.errors,
        input,
        c.cached_tokens,
        c.cache_write_tokens,
        c.completion_tokens,
        c.reasoning_tokens,
        c.cost.0,
        c.unpriced_requests,
        c.estimated_requests,
        c.cache_write_1h_tokens,
    ]
    .into_iter()
    .enumerate()
    {
        upsert.raw_bind_parameter(base + 1 + i, int(n))?;
    }
    Ok(())
}

/// Columns of `requests`, bound per row.
const COLUMNS: usize = 26;

/// A row's time (its rowid) and the numbers of its key, model, upstream, flavor and price.
struct Refs {
    at: i64,
    key: i64,
    model: i64,
    upstream: i64,
    flavor: i64,
    /// The price label, stored once in `names`: a few distinct labels label every row.
    price: Option<i64>,
}

/// Numbers of the keys and names already in the ledger, so most rows need no lookup.
#[derive(Default)]
pub(super) struct Ids {
    keys: HashMap<String, i64, foldhash::fast::RandomState>,
    names: HashMap<String, i64, foldhash::fast::RandomState>,
}

/// Entries each map keeps before starting over (many distinct keys must not grow it forever).
pub(super) const IDS_CAP: usize = 10_000;

impl Ids {
    fn key(&mut self, tx: &Connection, key_id: &str, label: &str) -> rusqlite::Result<i64> {
        if let Some(id) = self.keys.get(key_id) {
            return Ok(*id);
        }
        let id = tx
            .prepare_cached(
                "INSERT INTO keys (key_id, label) VALUES (?1, ?2)
                 ON CONFLICT (key_id) DO UPDATE SET label = excluded.label RETURNING id",
            )?
            .query_row(params![key_id, label], |r| r.get(0))?;
        if self.keys.len() >= IDS_CAP {
            self.keys.clear();
        }
        self.keys.insert(key_id.to_owned(), id);
        Ok(id)
    }

    fn name(&mut self, tx: &Connection, name: &str) -> rusqlite::Result<i64> {
        if let Some(id) = self.names.get(name) {
            return Ok(*id);
        }
        let id = tx
            .prepare_cached(
                "INSERT INTO names (name) VALUES (?1)
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
            )?
            .query_row(params![name], |r| r.get(0))?;
        if self.names.len() >= IDS_CAP {
            self.names.clear();
        }
        self.names.insert(name.to_owned(), id);
        Ok(id)
    }
}
/// Rows inserted by one statement: a statement's fixed cost (step, reset, unbind) is then paid
/// once per this many rows.
const ROWS_PER_INSERT: usize = 32;

/// `INSERT INTO requests … VALUES (…), (…), …` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=COLUMNS)
                .map(|c| format!("?{}", r * COLUMNS + c))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO requests (at, period, key, model, flavor, status, streamed,
            input_tokens, cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
            cost_nano_usd, latency_us, response_id, error, unpriced, estimated, partial, upstream,
            user, session, tags, cache_write_1h_tokens, service_tier, price)
         VALUES {}",
        values.join(", ")
    )
}

/// Binds one row's columns after `base` parameters, directly: the generic `params!` path costs
/// a visible share per row.
fn bind_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    refs: &Refs,
    row: &Row<&str>,
) -> rusqlite::Result<()> {
    let u = &row.usage;
    insert.raw_bind_parameter(base + 1, refs.at)?;
    insert.raw_bind_parameter(base + 2, int(row.period))?;
    insert.raw_bind_parameter(base + 3, refs.key)?;
    insert.raw_bind_parameter(base + 4, refs.model)?;
    insert.raw_bind_parameter(base + 5, refs.flavor)?;
    insert.raw_bind_parameter(base + 6, row.status)?;
    insert.raw_bind_parameter(base + 7, row.is_streaming)?;
    insert.raw_bind_parameter(base + 8, int(u.input_tokens))?;
    insert.raw_bind_parameter(base + 9, int(u.cached_input_tokens))?;
    insert.raw_bind_parameter(base + 10, int(u.cache_write_tokens))?;
    insert.raw_bind_parameter(base + 11, int(u.output_tokens))?;
    insert.raw_bind_parameter(base + 12, int(u.reasoning_tokens))?;
    insert.raw_bind_parameter(base + 13, int(row.cost.0))?;
    insert.raw_bind_parameter(
        base + 14,
        row.latency
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
    )?;
    insert.raw_bind_parameter(base + 15, row.response_id)?;
    insert.raw_bind_parameter(base + 16, row.is_error)?;
    insert.raw_bind_parameter(base + 17, row.is_unpriced)?;
    insert.raw_bind_parameter(base + 18, row.is_estimated)?;
    insert.raw_bind_parameter(base + 19, row.is_partial)?;
    insert.raw_bind_parameter(base + 20, refs.upstream)?;
    insert.raw_bind_parameter(base + 21, row.user)?;
    insert.raw_bind_parameter(base + 22, row.session)?;
    insert.raw_bind_parameter(base + 23, row.tags)?;
    insert.raw_bind_parameter(base + 24, int(u.cache_write_1h_tokens))?;
    insert.raw_bind_parameter(base + 25, row.service_tier)?;
    insert.raw_bind_parameter(base + 26, refs.price)?;
    Ok(())
}

/// SQL integers (SQLite's and PostgreSQL's `bigint`) are signed; counts past `i64::MAX` cannot
/// happen (tokens are capped per request), so saturating is only a guard.
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads back a stored count (never negative when we wrote it).
pub(super) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The newest row's time (0 in an empty ledger).
pub(super) fn last_at(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(at), 0) FROM requests", [], |r| {
        r.get(0)
    })
}

/// The current period's totals; starts period 1 in a new ledger.
pub(super) fn restore(conn: &mut Connection) -> rusqlite::Result<Restored> {
    let current: Option<(i64, i64)> = conn
        .query_row(
            "SELECT id, started_at FROM periods ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some((period, started)) = current else {
        let since = super::now();
        conn.execute(
            "INSERT INTO periods (id, started_at) VALUES (1, ?1)",
            params![micros(since)],
        )?;
        return Ok(Restored {
            period: 1,
            since,
            totals: Vec::new(),
            upstreams: Vec::new(),
        });
    };
    let counters = COUNTERS.join(", ");
    let mut statement = conn.prepare(&format!(
        "SELECT key_id, key_label, model, {counters} FROM totals WHERE period = ?1"
    ))?;
    let totals = statement
        .query_map(params![period], |r| {
            let identity = Identity {
                id: r.get(0)?,
                label: r.get(1)?,
            };
            let model: String = r.get(2)?;
            let counts = counts_from(r, 3)?;
            Ok((identity, model, counts))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let upstreams = conn
        .prepare(&format!(
            "SELECT upstream, {counters} FROM upstream_totals WHERE period = ?1"
        ))?
        .query_map(params![period], |r| Ok((r.get(0)?, counts_from(r, 1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Restored {
        period: count(period),
        since: from_micros(started),
        totals,
        upstreams,
    })
}

/// Reads the counter columns (`COUNTERS`, in their order) starting at column `at`.
pub(super) fn counts_from<C: Cells>(r: &C, at: usize) -> Result<Counts, C::Error> {
    let get = |i: usize| r.count(at + i);
    let input = get(2)?;
    let cached = get(3)?;
    let cache_write = get(4)?;
    let output = get(5)?;
    let prompt = input + cached + cache_write;
    Ok(Counts {
        requests: get(0)?,
        errors: get(1)?,
        prompt_tokens: prompt,
        completion_tokens: output,
        total_tokens: prompt + output,
        cached_tokens: cached,
        cache_write_tokens: cache_write,
        cache_write_1h_tokens: get(10)?,
        reasoning_tokens: get(6)?,
        cost: NanoUsd(get(7)?),
        unpriced_requests: get(8)?,
        estimated_requests: get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{FILE_NAME, schema};
    use super::*;
    use crate::money::NanoUsd;
    use crate::usage::Usage;

    /// A writer over a new ledger in `dir`, with no thread running it, and its shared state.
    fn idle_writer(dir: &std::path::Path) -> (Mutex<Writer>, Arc<Shared>) {
        let path = dir.join(FILE_NAME);
        let mut conn = schema::open(&path, schema::Access::Write).unwrap();
        restore(&mut conn).unwrap();
        let shared = Arc::new(Shared::new());
        let writer = Mutex::new(Writer {
            store: Box::new(Sqlite {
                conn,
                ids: Ids::default(),
                last_at: 0,
            }),
            shared: Arc::clone(&shared),
            flush_interval: Duration::from_millis(10),
            max_pending_rows: usize::MAX,
            path,
            batch: Batch::default(),
            last_slow_warning: None,
        });
        (writer, shared)
    }

    /// A request of no tokens, recorded now.
    fn row() -> Row<&'static str> {
        Row {
            at: super::super::now(),
            period: 1,
            key_id: "0123456789abcdef",
            key_label: "sk-…cdef",
            model: "gpt-4o",
            upstream: "openai",
            flavor: "openai_chat",
            status: 200,
            is_streaming: false,
            usage: Usage::default(),
            cost: NanoUsd(1),
            latency: None,
            response_id: None,
            is_error: false,
            is_unpriced: false,
            is_estimated: false,
            is_partial: false,
            user: None,
            session: None,
            tags: None,
            service_tier: None,
            price: None,
        }
    }

    fn queue_rows(shared: &Arc<Shared>, n: u64) {
        for _ in 0..n {
            shared.push(|bytes| queue::push_row(bytes, &row()));
        }
    }

    #[test]
    fn one_hour_writes_tier_and_price_are_stored_read_back_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, shared) = idle_writer(dir.path());
        let written = Row {
            model: "claude-sonnet-4-5",
            upstream: "anthropic",
            usage: Usage {
                input_tokens: 10,
                cache_write_tokens: 300,
                cache_write_1h_tokens: 200,
                ..Usage::default()
            },
            service_tier: Some("priority"),
            price: Some("built-in 2025-11"),
            ..row()
        };
        shared.push(|bytes| queue::push_row(bytes, &written));
        let mut writer = writer.lock();
        assert!(writer.round(false));
        let reader = super::super::history::Reader::open(dir.path()).unwrap();
        let mut read = Vec::new();
        reader
            .for_each_row(&super::super::history::Filter::default(), |r| {
                read.push(r.clone());
                true
            })
            .unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].borrowed(), written);
        drop(writer);
        let mut conn = schema::open(&dir.path().join(FILE_NAME), schema::Access::Write).unwrap();
        let restored = restore(&mut conn).unwrap();
        assert_eq!(restored.totals[0].2.cache_write_1h_tokens, 200);
        assert_eq!(restored.totals[0].2.cache_write_tokens, 300);
        assert_eq!(restored.upstreams[0].1.cache_write_1h_tokens, 200);
    }

    /// Runs only the normal-priority thread (as if the background one never got the CPU) until
    /// `done`, then closes.
    fn rescue_until(writer: &Mutex<Writer>, shared: &Shared, done: impl Fn() -> bool) {
        std::thread::scope(|s| {
            let rescuer = s.spawn(|| rescue(writer, shared, Duration::from_millis(10)));
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done() {
                assert!(Instant::now() < deadline, "the rows were never written");
                std::thread::sleep(Duration::from_millis(5));
            }
            shared.queue.lock().is_closing = true;
            shared.rescue.notify_all();
            rescuer.join().unwrap();
        });
    }

    #[test]
    fn buffers_grown_by_a_backlog_are_given_back_once_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, shared) = idle_writer(dir.path());
        let mut queued = 0;
        while shared.queue.lock().bytes.capacity() <= KEEP_CAPACITY {
            queue_rows(&shared, 1_000);
            queued += 1_000;
        }
        let mut writer = writer.lock();
        assert!(writer.round(false));
        assert_eq!(shared.written.load(Relaxed), queued);
        assert!(
            writer.batch.bytes.capacity() <= KEEP_CAPACITY,
            "{}",
            writer.batch.bytes.capacity()
        );
        assert!(shared.queue.lock().bytes.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn a_long_backlog_is_written_at_normal_priority() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, shared) = idle_writer(dir.path());
        let rows = HIGH_WATER + 5_000;
        queue_rows(&shared, rows);
        rescue_until(&writer, &shared, || {
            shared.pending.load(Relaxed) <= LOW_WATER
        });
        assert_eq!(shared.pending.load(Relaxed), 0);
        assert_eq!(shared.written.load(Relaxed), rows);
    }

    #[test]
    fn a_queue_that_reaches_the_high_water_mark_calls_the_normal_priority_thread_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, shared) = idle_writer(dir.path());
        std::thread::scope(|s| {
            // Its own look comes only once a minute here: only the queue's call can bring it.
            let rescuer = s.spawn(|| rescue(&writer, &shared, Duration::from_secs(60)));
            // Let it start waiting, so the call is not missed.
            std::thread::sleep(Duration::from_millis(50));
            queue_rows(&shared, HIGH_WATER - 1);
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(
                shared.written.load(Relaxed),
                0,
                "short of the mark: left waiting"
            );
            queue_rows(&shared, 1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while shared.written.load(Relaxed) < HIGH_WATER {
                assert!(Instant::now() < deadline, "the rows were never written");
                std::thread::sleep(Duration::from_millis(5));
            }
            shared.queue.lock().is_closing = true;
            shared.rescue.notify_all();
            rescuer.join().unwrap();
        });
    }

    #[test]
    fn a_few_rows_left_waiting_are_written_within_three_flush_intervals() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, shared) = idle_writer(dir.path());
        let started = Instant::now();
        queue_rows(&shared, 3);
        rescue_until(&writer, &shared, || shared.written.load(Relaxed) == 3);
        // 10 ms intervals: noticed after 20-30 ms, committed after one more.
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
}
