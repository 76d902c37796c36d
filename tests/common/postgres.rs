//! PostgreSQL for tests: a database of its own on the machine's server for each test, dropped
//! after it; or a whole server of the test's own (initdb in a temporary directory) that a test
//! may stop and start again without touching the machine's.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The machine's server (trust auth on loopback); `LLM_METER_TEST_POSTGRES` names another.
pub fn server_url() -> String {
    std::env::var("LLM_METER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Runs `f` with a connection to `url`, on a thread of its own (the client is blocking and
/// must not run on a test's async runtime).
pub fn with_client<T: Send>(url: &str, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut client = postgres::Client::connect(url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
            f(&mut client)
        })
        .join()
        .unwrap()
    })
}

/// A database of one test's own, dropped when it is.
pub struct TestDb {
    server: String,
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A new, empty database on the machine's server.
    pub fn create() -> Self {
        Self::create_on(&server_url())
    }

    /// A new, empty database on the server of `server` (a URL without a database).
    pub fn create_on(server: &str) -> Self {
        let name = format!(
            "llm_meter_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let admin = format!("{server}/postgres");
        with_client(&admin, |c| {
            c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        });
        Self {
            server: server.to_owned(),
            name,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// Runs `f` with a connection to it.
    pub fn with<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        with_client(&self.url(), f)
    }

    /// The one integer `sql` answers.
    pub fn number(&self, sql: &str) -> i64 {
        self.with(|c| c.query_one(sql, &[]).unwrap().get(0))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", self.server);
        let name = self.name.clone();
        // A server a test stopped may be gone: nothing to drop then.
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&admin, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}

/// A PostgreSQL server of the test's own, in a temporary directory, on a free loopback port.
pub struct OwnServer {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn bin(name: &str) -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    versions.pop().unwrap().join("bin").join(name)
}

/// A command as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(program: &Path) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if is_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl OwnServer {
    /// Creates and starts a server.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_postgres(&bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Self { dir, port };
        server.up();
        server
    }

    /// Its URL, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let out = as_postgres(&bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Starts it (again), waiting until it accepts connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.pg_ctl(&["-w", "-o", &options, "start"]);
    }

    /// Stops it: connections are cut, as when a database server goes away.
    pub fn down(&self) {
        self.pg_ctl(&["-w", "-m", "fast", "stop"]);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}
