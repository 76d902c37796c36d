//! The corruption check: `PRAGMA quick_check` over the whole ledger once at start, on its own
//! thread (it reads every page, which takes seconds on a large file), its result logged once
//! and shown in `/stats`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{Connection, InterruptHandle};

use super::schema;

/// What the check has found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// Still reading the file.
    Checking,
    /// SQLite found nothing wrong.
    Ok,
    /// The first problems SQLite reported, on one line joined by `; ` (or why the check could not run).
    Failed(String),
    /// The ledger is in PostgreSQL, which checks its own pages.
    ByServer,
}

impl fmt::Display for Integrity {
    /// `checking`, `ok` or `failed: …`, as `/stats` shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Checking => f.write_str("checking"),
            Self::Ok => f.write_str("ok"),
            Self::Failed(problems) => write!(f, "failed: {problems}"),
            Self::ByServer => f.write_str("kept by the server"),
        }
    }
}

/// Problems reported at most: the first few say that the file is damaged and where.
const MAX_PROBLEMS: usize = 5;

/// How often `stop` repeats its interrupt until the check has ended.
const INTERRUPT_EVERY: Duration = Duration::from_millis(5);

/// The check's thread, what it found, and how to stop it early.
pub(super) struct Check {
    result: Arc<Mutex<Integrity>>,
    /// Set by the thread once its connection is open.
    interrupt: Arc<Mutex<Option<InterruptHandle>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Check {
    /// Starts checking the ledger at `path` on a thread of its own, at low priority; returns at once.
    pub(super) fn start(path: &Path) -> Self {
        let result = Arc::new(Mutex::new(Integrity::Checking));
        let interrupt = Arc::new(Mutex::new(None));
        let (found, handle, path) = (Arc::clone(&result), Arc::clone(&interrupt), path.to_owned());
        let thread = std::thread::Builder::new()
            .name("ledger-check".into())
            .spawn(move || run(&path, &found, &handle));
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(err) => {
                *result.lock() = Integrity::Failed(format!("the check did not start: {err}"));
                None
            }
        };
        Self {
            result,
            interrupt,
            thread: Mutex::new(thread),
        }
    }

    /// No check: the database server keeps its own.
    pub(super) fn by_server() -> Self {
        Self {
            result: Arc::new(Mutex::new(Integrity::ByServer)),
            interrupt: Arc::new(Mutex::new(None)),
            thread: Mutex::new(None),
        }
    }

    /// What the check has found so far.
    pub(super) fn result(&self) -> Integrity {
        self.result.lock().clone()
    }

    /// Stops the check if it still runs (the ledger is closing) and waits for its thread.
    pub(super) fn stop(&self) {
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        // An interrupt stops only a statement already running: repeat it until the thread ends.
        while !thread.is_finished() {
            if let Some(interrupt) = &*self.interrupt.lock() {
                interrupt.interrupt();
            }
            std::thread::sleep(INTERRUPT_EVERY);
        }
        if thread.join().is_err() {
            tracing::error!("the ledger check panicked");
        }
    }
}

/// The check's thread: opens its own connection, runs the check, logs and keeps the result.
fn run(path: &Path, result: &Mutex<Integrity>, interrupt: &Mutex<Option<InterruptHandle>>) {
    lower_priority();
    let started = Instant::now();
    let conn = match schema::open(path, schema::Access::Read) {
        Ok(conn) => conn,
        Err(err) => {
            tracing::error!(path = %path.display(), error = %err, "the ledger's integrity could not be checked");
            *result.lock() =
                Integrity::Failed(format!("the check could not open the ledger: {err}"));
            return;
        }
    };
    *interrupt.lock() = Some(conn.get_interrupt_handle());
    let found = match quick_check(&conn) {
        Ok(problems) if problems == ["ok"] => Integrity::Ok,
        Ok(problems) => Integrity::Failed(one_line(&problems)),
        // Stopped by `Check::stop`: the ledger is closing, and nothing was learned.
        Err(err) if err.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
            return;
        }
        // A damaged file can fail the check itself ("database disk image is malformed").
        Err(err) => Integrity::Failed(err.to_string()),
    };
    let seconds = started.elapsed().as_secs_f64();
    match &found {
        Integrity::Failed(problems) => tracing::error!(
            path = %path.display(),
            problems,
            seconds,
            "the ledger failed its integrity check: it may be damaged; keep a copy of it"
        ),
        _ => {
            tracing::info!(path = %path.display(), seconds, "the ledger passed its integrity check")
        }
    }
    *result.lock() = found;
}

/// `PRAGMA quick_check`: "ok", or the first `MAX_PROBLEMS` problems found.
fn quick_check(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(&format!("PRAGMA quick_check({MAX_PROBLEMS})"))?;
    statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect()
}

/// SQLite's report on one line: its rows hold several problems a line each, the first after a
/// `*** in database main ***` heading, which says nothing here (the ledger is one database).
fn one_line(problems: &[String]) -> String {
    let lines: Vec<&str> = problems
        .iter()
        .flat_map(|p| p.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("*** in database"))
        .take(MAX_PROBLEMS)
        .collect();
    lines.join("; ")
}

/// Lowers the calling thread to the lowest normal priority (nice 19, batch), where the platform
/// allows it: the check must not take CPU from requests, yet must finish on a busy CPU, which
/// the background priority of the ledger writer (`SCHED_IDLE`) would not promise.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        if let Err(err) = set_thread_priority_and_policy(
            thread_native_id(),
            thread_priority::ThreadPriority::Min,
            batch,
        ) {
            tracing::debug!(?err, "the ledger check keeps normal priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_reports_are_shown_on_one_line_without_the_heading() {
        let report = [
            "*** in database main ***\nTree 7 page 48: btreeInitPage() returns error code 11\nTree 7 page 47: btreeInitPage() returns error code 11".to_owned(),
            "Page 60: never used".to_owned(),
        ];
        assert_eq!(
            one_line(&report),
            "Tree 7 page 48: btreeInitPage() returns error code 11; Tree 7 page 47: btreeInitPage() returns error code 11; Page 60: never used"
        );
        assert_eq!(
            Integrity::Failed(one_line(&report[1..])).to_string(),
            "failed: Page 60: never used"
        );
    }
}
