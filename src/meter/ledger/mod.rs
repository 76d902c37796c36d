//! The durable ledger: one SQLite row per metered request, written off the hot path by one
//! writer thread in group commits, and read back on start so totals survive a restart.
//!
//! Recording pushes a row onto an in-memory queue (a short mutex section, no I/O). The writer
//! thread wakes when a batch starts, waits up to `flush_interval` for more rows, and commits them
//! in one transaction together with the per-period sums that restore `/stats` on start. A killed
//! process loses at most the rows queued in its last `flush_interval` (plus the commit in
//! progress); a graceful stop writes everything. A check for corruption reads the whole file
//! once at start, in the background.

pub mod history;
pub mod integrity;
pub mod pg;
mod queue;
pub mod reprice;
pub mod schema;
mod writer;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use time::OffsetDateTime;

use crate::key::Identity;
use crate::meter::{Counts, Flags};
use crate::money::NanoUsd;
use crate::usage::Usage;
use integrity::{Check, Integrity};

/// The database file inside the data directory.
pub const FILE_NAME: &str = "ledger.sqlite3";
/// The lock file that keeps a second server off the same ledger.
pub const LOCK_FILE_NAME: &str = "llm-meter.lock";

/// Why the ledger cannot be opened or read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The data directory cannot be created or used.
    #[error("cannot use data directory {path}: {reason}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// Another server holds the ledger.
    #[error(
        "the ledger in {path} is in use by another llm-meter{pid}; stop it, or give this one another --data-dir (or --no-persist)"
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// ` (pid N)` when known.
        pid: String,
    },
    /// No ledger has been written there yet.
    #[error("no ledger at {0} (llm-meter serve creates it when it first starts)")]
    Missing(PathBuf),
    /// The file exists but is not an llm-meter ledger; it is left untouched.
    #[error(
        "{path} is not an llm-meter ledger: {reason}; it was left untouched (move it away or choose another --data-dir)"
    )]
    NotALedger {
        /// The file.
        path: PathBuf,
        /// What it seems to be.
        reason: String,
    },
    /// The ledger was written by a newer llm-meter.
    #[error(
        "{path} has ledger schema version {found}, newer than this llm-meter knows ({known}); upgrade llm-meter"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i32,
        /// Ours.
        known: i32,
    },
    /// PostgreSQL could not be reached or refused a statement.
    #[error("ledger {url}: {reason}")]
    Postgres {
        /// The database, as shown (no password).
        url: String,
        /// Why.
        reason: String,
    },
    /// SQLite failed.
    #[error("ledger {path}: {reason}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's message.
        reason: String,
    },
}

impl LedgerError {
    fn sqlite(path: &Path, err: &rusqlite::Error) -> Self {
        Self::Sqlite {
            path: path.to_owned(),
            reason: err.to_string(),
        }
    }
}

pub use crate::config::ledger::Options;

/// One metered request as the ledger stores it. Carries no key material. Its text is owned
/// when read back (`Row<String>`) and borrowed when recorded (`Row<&str>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<S = String> {
    /// When it was recorded.
    pub at: OffsetDateTime,
    /// The `/stats` period it was counted in.
    pub period: u64,
    /// The caller's key id.
    pub key_id: S,
    /// The caller's redacted key label.
    pub key_label: S,
    /// The model it was counted under.
    pub model: S,
    /// The upstream's name (`openai`, `anthropic`, a declared one).
    pub upstream: S,
    /// The API flavor (`openai_chat`).
    pub flavor: S,
    /// HTTP status the client got (499 when it left first).
    pub status: u16,
    /// A streamed response.
    pub is_streaming: bool,
    /// Tokens (zero when none were reported).
    pub usage: Usage,
    /// Cost at the prices in force when recorded.
    pub cost: NanoUsd,
    /// Time until the upstream's response headers, when there was a response.
    pub latency: Option<Duration>,
    /// The upstream's response id (`chatcmpl-…`), when it sent one.
    pub response_id: Option<S>,
    /// Not a complete 2xx response.
    pub is_error: bool,
    /// The model had no price.
    pub is_unpriced: bool,
    /// Tokens counted by estimate, not reported by the provider.
    pub is_estimated: bool,
    /// The response did not arrive whole (client left, upstream cut).
    pub is_partial: bool,
    /// The end user it was for (`X-LLM-Meter-User`, or the body's `user`).
    pub user: Option<S>,
    /// The session it belonged to (`X-LLM-Meter-Session`).
    pub session: Option<S>,
    /// Its tags, as a JSON object of strings (`{"team":"search"}`).
    pub tags: Option<S>,
    /// The service tier the response reported (`priority`); `None` for the standard one.
    pub service_tier: Option<S>,
    /// A label of the price it was priced at; `None` when unpriced, or when none was said.
    pub price: Option<S>,
}

impl<S: AsRef<str>> Row<S> {
    /// The same row, borrowing its text.
    pub fn borrowed(&self) -> Row<&str> {
        Row {
            at: self.at,
            period: self.period,
            key_id: self.key_id.as_ref(),
            key_label: self.key_label.as_ref(),
            model: self.model.as_ref(),
            upstream: self.upstream.as_ref(),
            flavor: self.flavor.as_ref(),
            status: self.status,
            is_streaming: self.is_streaming,
            usage: self.usage,
            cost: self.cost,
            latency: self.latency,
            response_id: self.response_id.as_ref().map(AsRef::as_ref),
            is_error: self.is_error,
            is_unpriced: self.is_unpriced,
            is_estimated: self.is_estimated,
            is_partial: self.is_partial,
            user: self.user.as_ref().map(AsRef::as_ref),
            session: self.session.as_ref().map(AsRef::as_ref),
            tags: self.tags.as_ref().map(AsRef::as_ref),
            service_tier: self.service_tier.as_ref().map(AsRef::as_ref),
            price: self.price.as_ref().map(AsRef::as_ref),
        }
    }

    /// The counters this row adds to its (key, model) totals.
    pub fn counts(&self) -> Counts {
        let flags = Flags {
            is_error: self.is_error,
            is_unpriced: self.is_unpriced,
            is_estimated: self.is_estimated,
        };
        Counts::of_request(&self.usage, self.cost, flags)
    }
}

/// The totals of the ledger's current period, to rebuild the in-memory store on start.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The current period's number.
    pub period: u64,
    /// When it started.
    pub since: OffsetDateTime,
    /// Its totals per (key, model).
    pub totals: Vec<(Identity, String, Counts)>,
    /// Its totals per upstream.
    pub upstreams: Vec<(String, Counts)>,
}

/// The ledger's state as `/stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The database file.
    pub path: PathBuf,
    /// Rows recorded but not yet committed.
    pub pending_rows: u64,
    /// Rows committed since start.
    pub written_rows: u64,
    /// Rows given up because the disk kept failing: the backlog was full, or the ledger closed.
    pub lost_rows: u64,
    /// The last write failed (the disk is full, read-only, …); rows wait in memory.
    pub is_failing: bool,
    /// The last write error, while failing.
    pub last_error: Option<String>,
    /// What the corruption check run at start has found.
    pub integrity: Integrity,
}

/// The writer's side of the queue, shared with the recording threads.
struct Shared {
    queue: QueueLock,
    /// Wakes the writer: a batch started, grew long, a sync was asked for, or the ledger closes.
    wake: Signal,
    /// Wakes `sync` callers: entries were committed (or given up).
    settled_cv: Signal,
    /// Wakes the normal-priority writer thread on close.
    rescue: Signal,
    /// Entries committed or given up, ever; compared with `Queue::enqueued`.
    settled: AtomicU64,
    pending: AtomicU64,
    written: AtomicU64,
    lost: AtomicU64,
    is_failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            queue: QueueLock::default(),
            wake: Signal::default(),
            settled_cv: Signal::default(),
            rescue: Signal::default(),
            settled: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            written: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            is_failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn push(self: &Arc<Self>, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut queue = self.queue.lock();
        if queue.is_closing {
            drop(queue);
            // Only a request finishing after shutdown's grace period can get here.
            self.lost.fetch_add(1, Relaxed);
            tracing::warn!("a request finished after the ledger was closed: not written");
            return;
        }
        self.pending.fetch_add(1, Relaxed);
        encode(&mut queue.bytes);
        if queue.len == 0 {
            queue.oldest = Some(std::time::Instant::now());
        }
        queue.len += 1;
        queue.enqueued += 1;
        let len = queue.len;
        drop(queue);
        // The first entry starts a batch (the writer sleeps until then), once the response in
        // hand has gone out; a long queue ends one early, at once. Both writer threads may be
        // waiting: wake both, the writer's lock picks one.
        if len == 1 {
            let shared = Arc::clone(self);
            crate::deferred::after_response(move || shared.wake.notify_all());
        } else if len == EARLY_WAKE {
            self.wake.notify_all();
        }
        // A long queue also calls in the normal-priority thread, which otherwise only looks
        // once per flush interval: the background one may be getting no CPU at all.
        if len == EARLY_WAKE {
            self.rescue.notify_one();
        }
    }
}

/// The queue's lock: `std`'s, not parking_lot's. Every recorded request takes it, and so does
/// the background writer, which may wait milliseconds for a CPU when both cores are busy.
/// parking_lot's eventual fairness now and then hands a contended lock straight to the thread
/// parked on it, before that thread runs; `std` wakes it and leaves the lock to whoever takes it
/// first, so a request rarely waits behind a writer that has no CPU (measured: see
/// docs/performance.md).
#[derive(Default)]
struct QueueLock(std::sync::Mutex<Queue>);

type QueueGuard<'a> = std::sync::MutexGuard<'a, Queue>;

impl QueueLock {
    fn lock(&self) -> QueueGuard<'_> {
        // What runs under it (appending an entry, trading or copying buffers) cannot panic
        // short of running out of memory, which aborts instead of poisoning the lock.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A condition variable for the queue's lock.
#[derive(Default)]
struct Signal(std::sync::Condvar);

impl Signal {
    fn notify_one(&self) {
        self.0.notify_one();
    }

    fn notify_all(&self) {
        self.0.notify_all();
    }

    fn wait<'a>(&self, queue: QueueGuard<'a>) -> QueueGuard<'a> {
        self.0
            .wait(queue)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a notification or `timeout`; true when it timed out.
    fn wait_for<'a>(&self, queue: QueueGuard<'a>, timeout: Duration) -> (QueueGuard<'a>, bool) {
        let (queue, result) = self
            .0
            .wait_timeout(queue, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (queue, result.timed_out())
    }

    /// Waits for a notification or `deadline`; true when it has passed.
    fn wait_until<'a>(&self, queue: QueueGuard<'a>, deadline: Instant) -> (QueueGuard<'a>, bool) {
        self.wait_for(queue, deadline.saturating_duration_since(Instant::now()))
    }
}

#[derive(Default)]
struct Queue {
    /// Encoded entries (`queue.rs`), oldest first.
    bytes: Vec<u8>,
    /// How many entries `bytes` holds.
    len: usize,
    /// Entries ever queued.
    enqueued: u64,
    /// A reader wants everything queued so far committed now.
    is_flush_asked: bool,
    is_closing: bool,
    /// When the oldest entry still in the queue was pushed (the writer has not taken it yet).
    oldest: Option<std::time::Instant>,
}

/// Entries that wake the writer before its flush interval is over, to keep batches bounded.
const EARLY_WAKE: usize = 2048;

/// A handle on the open ledger: appends rows, reports health, flushes on close.
pub struct Ledger {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    path: PathBuf,
    /// Held (and locked) until the ledger is closed.
    lock: Mutex<Option<File>>,
    /// The corruption check started with the ledger.
    check: Check,
    /// Connections to the PostgreSQL database, when the ledger is there.
    pool: Option<pg::Pool>,
}

impl Ledger {
    /// Opens (creating or migrating) the ledger in `options.dir`, takes its lock, reads back the
    /// current period's totals and starts the writer thread and the corruption check; or, with
    /// `options.url`, connects to PostgreSQL and migrates it (see `open_postgres`).
    pub fn open(options: &Options) -> Result<(Self, Restored), LedgerError> {
        if let Some(url) = &options.url {
            return Self::open_postgres(options, &pg::Db::new(url)?);
        }
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|e| LedgerError::Dir {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let lock = lock_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let mut conn = schema::open(&path, schema::Access::Write)?;
        let restored = writer::restore(&mut conn).map_err(|e| LedgerError::sqlite(&path, &e))?;
        let last_at = writer::last_at(&conn).map_err(|e| LedgerError::sqlite(&path, &e))?;
        let store = writer::Sqlite {
            conn,
            ids: writer::Ids::default(),
            last_at,
        };
        let (shared, threads) =
            start_writer(Box::new(store), options, &path, |reason| LedgerError::Dir {
                path: dir.clone(),
                reason,
            })?;
        let check = Check::start(&path);
        Ok((
            Self {
                shared,
                threads: Mutex::new(threads),
                path,
                lock: Mutex::new(Some(lock)),
                check,
                pool: None,
            },
            restored,
        ))
    }

    /// Opens the PostgreSQL ledger of `db` as one replica among others: no lock (replicas share
    /// it), no file check, and nothing restored into `/stats`, which counts this process's own
    /// requests (`/stats?scope=all` reads every replica's from the database).
    pub fn open_postgres(options: &Options, db: &pg::Db) -> Result<(Self, Restored), LedgerError> {
        let client = pg::off_runtime(|| pg::open(db))?;
        let pool = db.pool()?;
        let path = PathBuf::from(db.shown());
        let store = pg::Postgres::new(db.clone(), client);
        let (shared, threads) = start_writer(Box::new(store), options, &path, |reason| {
            LedgerError::Postgres {
                url: db.shown().to_owned(),
                reason,
            }
        })?;
        let restored = Restored {
            period: 1,
            since: now(),
            totals: Vec::new(),
            upstreams: Vec::new(),
        };
        Ok((
            Self {
                shared,
                threads: Mutex::new(threads),
                path,
                lock: Mutex::new(None),
                check: Check::by_server(),
                pool: Some(pool),
            },
            restored,
        ))
    }

    /// The PostgreSQL database, when the ledger is there.
    pub fn db(&self) -> Option<&pg::Db> {
        self.pool.as_ref().map(pg::Pool::db)
    }

    /// The PostgreSQL connections readers and the replicas' sync share, when the ledger is there.
    pub fn pool(&self) -> Option<&pg::Pool> {
        self.pool.as_ref()
    }

    /// A reader of this ledger (beside the writer: SQLite readers never block it).
    pub fn reader(&self) -> Result<history::Reader, LedgerError> {
        match &self.pool {
            Some(pool) => Ok(history::Reader::postgres(pool.clone())),
            None => history::Reader::open_file(&self.path),
        }
    }

    /// Queues a row (a copy into the queue's buffer); never blocks on the disk.
    pub fn append(&self, row: &Row<&str>) {
        self.shared.push(|bytes| queue::push_row(bytes, row));
    }

    /// Queues the start of a new period.
    pub fn start_period(&self, id: u64, started: OffsetDateTime) {
        self.shared
            .push(|bytes| queue::push_period(bytes, id, started));
    }

    /// Waits until every row recorded before the call is committed, so that history reads see
    /// them; false if that takes longer than `timeout` (a slow or failing disk).
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut queue = self.shared.queue.lock();
        let target = queue.enqueued;
        if self.shared.settled.load(Relaxed) >= target {
            return true;
        }
        queue.is_flush_asked = true;
        self.shared.wake.notify_all();
        while self.shared.settled.load(Relaxed) < target {
            let timed_out;
            (queue, timed_out) = self.shared.settled_cv.wait_until(queue, deadline);
            if timed_out {
                return self.shared.settled.load(Relaxed) >= target;
            }
        }
        true
    }

    /// Counters for `/stats`.
    pub fn health(&self) -> Health {
        let s = &self.shared;
        let is_failing = s.is_failing.load(Relaxed);
        Health {
            path: self.path.clone(),
            pending_rows: s.pending.load(Relaxed),
            written_rows: s.written.load(Relaxed),
            lost_rows: s.lost.load(Relaxed),
            is_failing,
            last_error: if is_failing {
                s.last_error.lock().clone()
            } else {
                None
            },
            integrity: self.check.result(),
        }
    }

    /// Stops the corruption check if it still runs, commits everything queued, stops the writer
    /// and releases the lock; later appends are not written (and are counted as lost).
    pub fn close(&self) {
        self.check.stop();
        self.shared.queue.lock().is_closing = true;
        self.shared.wake.notify_all();
        self.shared.rescue.notify_all();
        for handle in self.threads.lock().drain(..) {
            if handle.join().is_err() {
                tracing::error!(path = %self.path.display(), "the ledger writer panicked");
            }
        }
        drop(self.lock.lock().take());
    }

    /// The database file (with PostgreSQL, its URL as shown).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

/// Starts the writer threads on `store`; `fail` names the ledger in the error of a thread that
/// cannot start.
fn start_writer(
    store: Box<dyn writer::Store>,
    options: &Options,
    path: &Path,
    fail: impl FnOnce(String) -> LedgerError,
) -> Result<(Arc<Shared>, Vec<JoinHandle<()>>), LedgerError> {
    let shared = Arc::new(Shared::new());
    let writer = writer::Writer {
        store,
        shared: Arc::clone(&shared),
        flush_interval: options.flush_interval,
        max_pending_rows: options.max_pending_rows.max(1),
        path: path.to_owned(),
        batch: writer::Batch::default(),
        last_slow_warning: None,
    };
    let threads =
        writer::start(writer).map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
    Ok((shared, threads))
}

/// Takes the directory's lock file, so two servers never write one ledger; readers don't take it.
fn lock_dir(dir: &Path) -> Result<File, LedgerError> {
    let path = dir.join(LOCK_FILE_NAME);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LedgerError::Dir {
            path: dir.to_owned(),
            reason: format!("cannot open {}: {e}", path.display()),
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LedgerError::InUse {
                path: dir.to_owned(),
                pid: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(LedgerError::Dir {
                path: dir.to_owned(),
                reason: format!("cannot lock {}: {e}", path.display()),
            });
        }
    }
    // The pid is only a hint for the message above; failing to write it changes nothing.
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

/// The current time at the ledger's precision (microseconds), so that what is shown before a
/// restart equals what is read back after it.
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}

/// Unix microseconds, as the ledger stores times.
pub fn micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// The time of a stored unix-microsecond value.
pub fn from_micros(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
