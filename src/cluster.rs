//! Replicas sharing a PostgreSQL ledger: a thread that, ten times a second, publishes this
//! replica's spend and rate-limit use, reads the others' into the guard, picks up budgets
//! changed on any replica, and claims alerts so that each fires on one replica only.
//!
//! Nothing here is on a request's path: admission reads what the last sync left in the guard.
//! Staleness is bounded by `SYNC_EVERY` plus one round trip (docs/replicas.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::guard::Guard;
use crate::guard::alerts::Alert;
use crate::meter::ledger::LedgerError;
use crate::meter::ledger::pg::{self, Pool, shared};

/// How often a replica publishes and reads the shared state.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Rate use older than this is not read: its replica has stopped (live ones write it every
/// round), and no longer takes a share of any limit.
const RATES_WITHIN_US: i64 = 10_000_000;
/// Rounds between writes of this replica's spend while no scope has a budget (a second).
const UNBUDGETED_EVERY: u64 = 10;
/// Rounds between syncs while this replica has no budget or limit to share and no alert to
/// claim (half a second): a budget set on another replica still arrives within a second, and
/// the database is asked five times less while nothing here reads it.
const QUIET_EVERY: u64 = 5;
/// Rounds between clean-ups of rows no replica reads any more (about ten minutes).
const FORGET_EVERY: u64 = 6_000;
/// Alerts waiting for a claim while the database is unreachable, at most.
const MAX_UNCLAIMED: usize = 1_000;

/// The shared state's health, for `/stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This replica's id (hex).
    pub replica: String,
    /// Milliseconds since the last sync that succeeded.
    pub last_sync_ms: Option<u64>,
    /// The last sync failed; the error.
    pub error: Option<String>,
}

/// The sync thread of one replica.
pub struct Cluster {
    pool: Pool,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    last_ok: Arc<AtomicI64>,
    error: Arc<Mutex<Option<String>>>,
    started: Instant,
}

/// What the sync loop keeps between rounds.
struct Round {
    guard: Arc<Guard>,
    pool: Pool,
    alerts: mpsc::Receiver<Alert>,
    unclaimed: Vec<Alert>,
    /// Last use read per (replica, key, unit).
    seen: HashMap<(i64, String, String), u64>,
    /// Per (key, unit): rounds left for which another replica counts as taking from it (two
    /// after it was last seen taking).
    busy: HashMap<(String, &'static str), u8>,
    budget_version: i64,
    /// Rounds run, for the occasional clean-up.
    rounds: u64,
    /// Its own connection, made again after a failure (the pool is for readers).
    client: Option<postgres::Client>,
    /// The spend last written, not written again while it stays the same.
    published: Vec<shared::Spend>,
}

impl Cluster {
    /// Connects `guard` to the other replicas of `db`: sets its alert gate and budget store,
    /// syncs once before returning (budgets and spend are shared from the first request), and
    /// starts the thread.
    pub fn start(pool: &Pool, guard: Arc<Guard>) -> Result<Self, LedgerError> {
        let pool = pool.clone();
        let db = pool.db().clone();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        guard.alerts().set_gate(Box::new(move |alert| {
            // The receiver lives as long as the thread; after it, nothing is claimed anyway.
            let _ = tx.lock().send(alert);
        }));
        let saving = pool.clone();
        guard.set_budget_store(Box::new(move |name, budget| {
            let mut client = saving.get().map_err(|e| e.to_string())?;
            shared::save_budget(&mut client, name, budget).map_err(|e| pg::describe(&e))
        }));
        let started = Instant::now();
        let mut round = Round {
            guard,
            pool: pool.clone(),
            alerts: rx,
            unclaimed: Vec::new(),
            seen: HashMap::new(),
            busy: HashMap::new(),
            budget_version: 0,
            rounds: 0,
            client: None,
            published: Vec::new(),
        };
        pg::off_runtime(|| {
            let result = round.run(false);
            if result.is_err() {
                // Closed here: a client dropped on the runtime's thread would panic.
                round.client = None;
            }
            result
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let last_ok = Arc::new(AtomicI64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (stopping, ok, failed) = (Arc::clone(&stop), Arc::clone(&last_ok), Arc::clone(&error));
        let thread = std::thread::Builder::new()
            .name("ledger-sync".into())
            .spawn(move || round.repeat(&stopping, started, &ok, &failed))
            .map_err(|e| LedgerError::Postgres {
                url: db.shown().to_owned(),
                reason: format!("cannot start the sync thread: {e}"),
            })?;
        Ok(Self {
            pool,
            stop,
            thread: Mutex::new(Some(thread)),
            last_ok,
            error,
            started,
        })
    }

    /// How the shared state is doing.
    pub fn status(&self) -> Status {
        let last = self.last_ok.load(Relaxed);
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        Status {
            replica: format!("{:016x}", self.pool.db().replica),
            last_sync_ms: (last > 0).then(|| u64::try_from(now - last).unwrap_or(0)),
            error: self.error.lock().clone(),
        }
    }

    /// Publishes a last time and stops the thread (graceful shutdown).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.lock().take()
            && thread.join().is_err()
        {
            tracing::error!("the ledger sync thread panicked");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Round {
    fn repeat(
        &mut self,
        stop: &AtomicBool,
        started: Instant,
        ok: &AtomicI64,
        failed: &Mutex<Option<String>>,
    ) {
        let mut next = Instant::now();
        loop {
            let is_last = stop.load(Relaxed);
            match self.run(is_last) {
                Ok(false) => {}
                Ok(true) => {
                    let at = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
                    ok.store(at.max(1), Relaxed);
                    if failed.lock().take().is_some() {
                        tracing::info!(
                            "the shared ledger is reachable again: budgets and limits are shared"
                        );
                    }
                }
                Err(err) => {
                    let reason = err.to_string();
                    let mut last = failed.lock();
                    if last.is_none() {
                        tracing::error!(error = %reason, "cannot reach the shared ledger: budgets and limits count this replica's spend and the others' as last read");
                    }
                    *last = Some(reason);
                }
            }
            if is_last {
                return;
            }
            next += crate::cluster::SYNC_EVERY;
            let now = Instant::now();
            if next < now {
                next = now;
            }
            // Short sleeps, so a stop is seen at once.
            while Instant::now() < next && !stop.load(Relaxed) {
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
            }
        }
    }

    /// One round: publish, read, apply, claim; or, in a quiet round, nothing (false). The
    /// last round, at stop, is never quiet and publishes this replica's spend whatever it is.
    fn run(&mut self, is_last: bool) -> Result<bool, LedgerError> {
        self.take_alerts();
        let is_quiet = self.unclaimed.is_empty()
            && !self.guard.has_budgets()
            && self.guard.own_rate_use().is_empty();
        if is_quiet && !is_last && !self.rounds.is_multiple_of(QUIET_EVERY) {
            self.rounds += 1;
            return Ok(false);
        }
        let db = self.pool.db().clone();
        let mut client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => db.connect()?,
        };
        let result = self.run_with(&mut client, &db, is_last);
        self.client = Some(client);
        result.map(|()| true)
    }

    fn run_with(
        &mut self,
        client: &mut postgres::Client,
        db: &pg::Db,
        is_last: bool,
    ) -> Result<(), LedgerError> {
        let fail = |e: postgres::Error| db.fail(&e);
        let now = crate::meter::ledger::micros(crate::meter::ledger::now());
        // Every scope's spend is published (when it changed), so a budget given later counts
        // it; the others' is read only while some scope has a budget to check it against.
        // Without a budget anywhere, nobody reads it soon: once a second is enough.
        let has_budgets = self.guard.has_budgets();
        if has_budgets || is_last || self.rounds.is_multiple_of(UNBUDGETED_EVERY) {
            let spend = self.guard.own_spend();
            if spend != self.published {
                shared::publish_spend(client, db.replica, &spend, now).map_err(fail)?;
                self.published = spend;
            }
        }
        if has_budgets {
            let others =
                shared::others_spend(client, db.replica, &self.guard.windows()).map_err(fail)?;
            self.guard.set_others_spend(&others);
        }
        let use_ = self.guard.own_rate_use();
        if !use_.is_empty() {
            shared::publish_rates(client, db.replica, &use_).map_err(fail)?;
            let rates = shared::others_rates(client, db.replica, RATES_WITHIN_US).map_err(fail)?;
            self.apply_rates(&rates);
        }
        let (budgets, version) =
            shared::budgets_after(client, self.budget_version).map_err(fail)?;
        for (name, budget) in budgets {
            if let Err(err) = self.guard.apply_budget(&name, budget) {
                tracing::debug!(scope = name, error = %err, "a shared budget names no key of this replica");
            }
        }
        self.budget_version = version;
        self.rounds += 1;
        if self.rounds.is_multiple_of(FORGET_EVERY) {
            shared::forget_old(client, now).map_err(fail)?;
        }
        while let Some(alert) = self.unclaimed.first() {
            let dedupe = alert.dedupe.as_deref().unwrap_or_default();
            match shared::claim_alert(client, dedupe, db.replica, now) {
                Ok(true) => self.guard.alerts().deliver(self.unclaimed.remove(0)),
                Ok(false) => drop(self.unclaimed.remove(0)),
                // The database refused this one claim (not the connection): sent unclaimed,
                // rather than held up forever with every alert behind it.
                Err(err) if err.as_db_error().is_some() => {
                    tracing::warn!(error = %pg::describe(&err), "an alert could not be claimed in the shared ledger: sent by this replica anyway");
                    self.guard.alerts().deliver(self.unclaimed.remove(0));
                }
                Err(err) => return Err(fail(err)),
            }
        }
        Ok(())
    }

    /// Takes the alerts fired since the last round, keeping at most `MAX_UNCLAIMED` waiting
    /// (the oldest are dropped past it), whether or not the database answers.
    fn take_alerts(&mut self) {
        self.unclaimed.extend(self.alerts.try_iter());
        let excess = self.unclaimed.len().saturating_sub(MAX_UNCLAIMED);
        if excess > 0 {
            tracing::warn!(
                alerts = excess,
                "alerts waited too long for the shared ledger: not sent"
            );
            self.unclaimed.drain(..excess);
        }
    }

    /// Turns the others' use since start into what they used since the last round, per key
    /// and unit, and tells the guard with how many replicas it shares each limit and whether
    /// another one took from it in the last two rounds.
    fn apply_rates(&mut self, rates: &[shared::RateUse]) {
        // Per key and unit: used elsewhere since the last round, and by how many replicas.
        let mut used: HashMap<(&str, &str), (u64, u32)> = HashMap::new();
        for rate in rates {
            let seen = self
                .seen
                .entry((rate.replica, rate.key.clone(), rate.unit.clone()))
                // First heard of (at start, or back after a silence): what it used so far is
                // history, not news. At worst a replica's first round of use is missed.
                .or_insert(rate.used);
            let delta = rate.used.saturating_sub(*seen);
            *seen = (*seen).max(rate.used);
            let entry = used.entry((&rate.key, &rate.unit)).or_default();
            entry.0 += delta;
            entry.1 += 1;
        }
        let names: Vec<String> = self.guard.limited_keys().map(str::to_owned).collect();
        for name in &names {
            for unit in crate::guard::shared::UNITS {
                let (delta, live) = used
                    .get(&(name.as_str(), unit))
                    .copied()
                    .unwrap_or_default();
                let busy = self.busy.entry((name.clone(), unit)).or_insert(0);
                *busy = if delta > 0 { 2 } else { busy.saturating_sub(1) };
                // Every live replica may start taking at the same moment: each takes its share
                // of what is left, busy or not. One alone still reaches the full rate: what it
                // leaves grows until its share is the refill.
                self.guard.sync_rate(name, unit, delta, live + 1, *busy > 0);
            }
        }
        // Forget replicas no longer heard of (stopped more than `RATES_WITHIN_US` ago).
        self.seen.retain(|(replica, key, unit), _| {
            rates
                .iter()
                .any(|r| r.replica == *replica && r.key == *key && r.unit == *unit)
        });
    }
}
