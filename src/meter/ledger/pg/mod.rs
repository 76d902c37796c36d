//! The ledger in PostgreSQL, shared by replicas: connections (TLS by rustls when the URL asks),
//! numbered migrations run once under an advisory lock, and each process's replica id.
//!
//! Every replica writes its own rows, keyed by (at, replica) with `at` strictly increasing per
//! replica, so a retried batch can tell what of it went in; and its own hourly rollup rows.
//! Readers sum over replicas. Nothing here runs on a
//! request's path: the writer threads, history reads and the shared-state poller call it.

pub mod read;
pub mod shared;
mod write;

use std::sync::Arc;
use std::time::Duration;

use postgres::Client;
use postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::LedgerError;
use crate::client::trust::{TlsRoots, Trust, plain_config};
use crate::config::ledger::LedgerUrl;
pub(super) use write::Postgres;

/// Connections readers and the shared-state poller may hold at once, per process.
const POOL_SIZE: u32 = 4;
/// Longest wait for a connection (TCP, TLS and authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a statement may run: a stalled server fails a write (which is retried) or a read
/// (which answers an error) instead of holding a thread.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;

/// How this process reaches the database: its settings and TLS, and its replica id.
#[derive(Clone)]
pub struct Db {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    shown: Arc<str>,
    /// This process's id among the replicas: random, new at each start.
    pub replica: i64,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({}, replica {:x})", self.shown, self.replica)
    }
}

impl Db {
    /// The database of `url`, with a new replica id; connects nothing yet.
    pub fn new(url: &LedgerUrl) -> Result<Self, LedgerError> {
        let fail = |reason: String| LedgerError::Postgres {
            url: url.shown().to_owned(),
            reason,
        };
        let mut config: postgres::Config =
            url.expose().parse().map_err(|e| fail(format!("{e}")))?;
        // TLS when the URL asks for it (`sslmode=require`, or `prefer`), and then with the
        // server's certificate verified; without `sslmode`, plain (libpq's default, `prefer`,
        // would try TLS and take any certificate).
        if !url.expose().contains("sslmode=") {
            config.ssl_mode(SslMode::Disable);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A silent network (a partition, a server gone without a reset) fails a statement within
        // about 20 s, so the writer retries and the backlog bound applies, instead of waiting for
        // the system's TCP timeouts (minutes).
        config
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(2)
            .tcp_user_timeout(Duration::from_secs(20));
        if config.get_application_name().is_none() {
            config.application_name("llm-meter");
        }
        // Ours first: a statement_timeout of the URL's own `options` comes later and wins.
        let options = format!(
            "-c statement_timeout={STATEMENT_TIMEOUT_MS} {}",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim_end());
        let trust = Trust {
            roots: TlsRoots::Both,
            ..Trust::default()
        };
        let tls = MakeRustlsConnect::new(plain_config(&trust).map_err(|e| fail(e.to_string()))?);
        Ok(Self {
            config,
            tls,
            shown: url.shown().into(),
            replica: replica_id(),
        })
    }

    /// The URL as shown (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Client, LedgerError> {
        self.config
            .connect(self.tls.clone())
            .map_err(|e| self.fail(&e))
    }

    /// A pool of connections for readers and the poller.
    pub fn pool(&self) -> Result<Pool, LedgerError> {
        let manager =
            r2d2_postgres::PostgresConnectionManager::new(self.config.clone(), self.tls.clone());
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(0))
            // A broken connection fails its statement, which the caller reports or retries:
            // a test query before every use would double the round trips.
            .test_on_check_out(false)
            .connection_timeout(CONNECT_TIMEOUT)
            .build_unchecked(manager);
        Ok(Pool {
            pool: Arc::new(Connections(Some(pool))),
            db: self.clone(),
        })
    }

    /// The error of a failed statement or connection, naming the database (never its password).
    pub fn fail(&self, err: &postgres::Error) -> LedgerError {
        LedgerError::Postgres {
            url: self.shown.to_string(),
            reason: describe(err),
        }
    }
}

/// A database error's text with the server's detail, which `Display` leaves out.
pub fn describe(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}

/// A small pool of connections; its clones share it.
#[derive(Clone)]
pub struct Pool {
    pool: Arc<Connections>,
    db: Db,
}

type Manager = r2d2_postgres::PostgresConnectionManager<MakeRustlsConnect>;

/// The connections themselves, closed when the last handle on them goes.
struct Connections(Option<r2d2::Pool<Manager>>);

impl Drop for Connections {
    /// Closes the connections, which the blocking client does with a runtime of its own: never
    /// on a thread driving one (the server drops its state inside its own), so on a thread of
    /// its own.
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            let closing = std::thread::Builder::new()
                .name("ledger-pool-close".into())
                .spawn(move || drop(pool));
            if let Ok(thread) = closing {
                let _ = thread.join();
            }
        }
    }
}

/// A connection taken from a pool, given back when dropped.
pub type Pooled = r2d2::PooledConnection<Manager>;

impl Pool {
    /// A connection, waiting at most the connect timeout for one.
    pub fn get(&self) -> Result<Pooled, LedgerError> {
        let fail = |reason: String| LedgerError::Postgres {
            url: self.db.shown.to_string(),
            reason,
        };
        self.pool
            .0
            .as_ref()
            .ok_or_else(|| fail("the pool is closed".into()))?
            .get()
            .map_err(|e| fail(e.to_string()))
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// A random replica id: from the process's random hasher keys, the time and the pid.
fn replica_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish().cast_signed()
}

/// The numbered migrations, each run once in order. Shipped ones are never edited.
const MIGRATIONS: [&str; 2] = [
    include_str!("migrations/1.sql"),
    include_str!("migrations/2.sql"),
];

/// Runs the migrations this database lacks. Replicas starting together each take the same
/// advisory lock inside their transaction, so one migrates and the others find it done.
pub fn migrate(client: &mut Client) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    // A fixed key of ours ("llmmeter" as bytes), held for the whole migration.
    tx.execute("SELECT pg_advisory_xact_lock(7812739770201957746)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS llm_meter_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    let done: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM llm_meter_migrations",
            &[],
        )?
        .get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        if version <= done {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO llm_meter_migrations (version) VALUES ($1)",
            &[&version],
        )?;
    }
    tx.commit()
}

/// The newest migration this llm-meter knows.
pub fn known_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// Fails when the database was migrated by a newer llm-meter.
pub fn check_version(client: &mut Client, db: &Db) -> Result<(), LedgerError> {
    let found: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM llm_meter_migrations",
            &[],
        )
        .map_err(|e| db.fail(&e))?
        .get(0);
    if found > known_version() {
        return Err(LedgerError::TooNew {
            path: db.shown().into(),
            found,
            known: known_version(),
        });
    }
    Ok(())
}

/// Runs `f` on a thread of its own and waits for it. The blocking client runs a small runtime
/// of its own, which tokio refuses to start on a thread that is driving one (the server's
/// start-up runs inside its runtime).
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Opens the database for a server: connects, migrates, and checks the version.
pub fn open(db: &Db) -> Result<Client, LedgerError> {
    let mut client = db.connect()?;
    migrate(&mut client).map_err(|e| db.fail(&e))?;
    check_version(&mut client, db)?;
    Ok(client)
}
