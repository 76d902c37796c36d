//! The ledger file: opening it safely (never writing to a file that is not ours) and migrating its schema.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::LedgerError;

/// Marks a database as an llm-meter ledger (`PRAGMA application_id`, "LLMm").
pub const APPLICATION_ID: i32 = 0x4C4C_4D6D;

/// Migrations in order; the schema version is the number applied (`PRAGMA user_version`).
/// Never edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: requests, periods, and per-period totals kept in step with the rows.
    "
    CREATE TABLE periods (
        id          INTEGER PRIMARY KEY,
        started_at  INTEGER NOT NULL  -- unix microseconds, UTC
    );
    -- Key ids and labels, model and flavor names, stored once and referred to by number, so a
    -- request row is mostly small integers.
    CREATE TABLE keys (
        id      INTEGER PRIMARY KEY,
        key_id  TEXT NOT NULL UNIQUE,
        label   TEXT NOT NULL
    );
    CREATE TABLE names (
        id      INTEGER PRIMARY KEY,
        name    TEXT NOT NULL UNIQUE
    );
    -- `at` is the rowid: rows are stored in time order and a time range is a rowid range, with
    -- no index to keep up. The writer makes it unique by moving a clash one microsecond on.
    CREATE TABLE requests (
        at                  INTEGER PRIMARY KEY,  -- unix microseconds, UTC, when recorded
        period              INTEGER NOT NULL,
        key                 INTEGER NOT NULL REFERENCES keys,
        model               INTEGER NOT NULL REFERENCES names,
        flavor              INTEGER NOT NULL REFERENCES names,
        status              INTEGER NOT NULL,
        streamed            INTEGER NOT NULL,
        input_tokens        INTEGER NOT NULL,  -- uncached input
        cached_tokens       INTEGER NOT NULL,
        cache_write_tokens  INTEGER NOT NULL,
        output_tokens       INTEGER NOT NULL,  -- reasoning included
        reasoning_tokens    INTEGER NOT NULL,
        cost_nano_usd       INTEGER NOT NULL,
        latency_us          INTEGER,           -- until the upstream's response headers
        response_id         TEXT,
        error               INTEGER NOT NULL,
        unpriced            INTEGER NOT NULL,
        estimated           INTEGER NOT NULL,
        partial             INTEGER NOT NULL
    );
    -- The rows with their names: what reports read, and what to query by hand.
    CREATE VIEW request_rows AS
        SELECT r.at, r.period, k.key_id, k.label AS key_label, m.name AS model,
            f.name AS flavor, r.status, r.streamed, r.input_tokens, r.cached_tokens,
            r.cache_write_tokens, r.output_tokens, r.reasoning_tokens, r.cost_nano_usd,
            r.latency_us, r.response_id, r.error, r.unpriced, r.estimated, r.partial
        FROM requests r
        JOIN keys k ON k.id = r.key
        JOIN names m ON m.id = r.model
        JOIN names f ON f.id = r.flavor;
    -- The sums of each period's rows, updated in the same transaction as the rows, so that a
    -- restart restores /stats without reading every row.
    CREATE TABLE totals (
        period              INTEGER NOT NULL,
        key_id              TEXT NOT NULL,
        key_label           TEXT NOT NULL,
        model               TEXT NOT NULL,
        requests            INTEGER NOT NULL,
        errors              INTEGER NOT NULL,
        input_tokens        INTEGER NOT NULL,
        cached_tokens       INTEGER NOT NULL,
        cache_write_tokens  INTEGER NOT NULL,
        output_tokens       INTEGER NOT NULL,
        reasoning_tokens    INTEGER NOT NULL,
        cost_nano_usd       INTEGER NOT NULL,
        unpriced            INTEGER NOT NULL,
        PRIMARY KEY (period, key_id, model)
    ) WITHOUT ROWID;
    ",
    // 2: the upstream of each request (rows before it went to the only upstream, `openai`),
    // estimated requests in the totals, and per-upstream totals for /stats' `by_upstream`.
    "
    ALTER TABLE requests ADD COLUMN upstream INTEGER REFERENCES names;
    ALTER TABLE totals ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE upstream_totals (
        period              INTEGER NOT NULL,
        upstream            TEXT NOT NULL,
        requests            INTEGER NOT NULL,
        errors              INTEGER NOT NULL,
        input_tokens        INTEGER NOT NULL,
        cached_tokens       INTEGER NOT NULL,
        cache_write_tokens  INTEGER NOT NULL,
        output_tokens       INTEGER NOT NULL,
        reasoning_tokens    INTEGER NOT NULL,
        cost_nano_usd       INTEGER NOT NULL,
        unpriced            INTEGER NOT NULL,
        estimated           INTEGER NOT NULL,
        PRIMARY KEY (period, upstream)
    ) WITHOUT ROWID;
    INSERT INTO upstream_totals
        SELECT period, 'openai', sum(requests), sum(errors), sum(input_tokens),
            sum(cached_tokens), sum(cache_write_tokens), sum(output_tokens),
            sum(reasoning_tokens), sum(cost_nano_usd), sum(unpriced), 0
        FROM totals GROUP BY period;
    DROP VIEW request_rows;
    CREATE VIEW request_rows AS
        SELECT r.at, r.period, k.key_id, k.label AS key_label, m.name AS model,
            coalesce(u.name, 'openai') AS upstream,
            f.name AS flavor, r.status, r.streamed, r.input_tokens, r.cached_tokens,
            r.cache_write_tokens, r.output_tokens, r.reasoning_tokens, r.cost_nano_usd,
            r.latency_us, r.response_id, r.error, r.unpriced, r.estimated, r.partial
        FROM requests r
        JOIN keys k ON k.id = r.key
        JOIN names m ON m.id = r.model
        JOIN names f ON f.id = r.flavor
        LEFT JOIN names u ON u.id = r.upstream;
    ",
    // 3: attribution: the user, session and tags a request named (NULL before, or when it named
    // none). Text in the row rather than numbers in `names`: users and sessions are many and
    // mostly seen once. Tags are one JSON object of strings, read with SQLite's JSON functions
    // (`tags ->> '$."team"'`) when grouping or filtering: a range is scanned by rowid anyway.
    "
    ALTER TABLE requests ADD COLUMN user TEXT;
    ALTER TABLE requests ADD COLUMN session TEXT;
    ALTER TABLE requests ADD COLUMN tags TEXT;
    DROP VIEW request_rows;
    CREATE VIEW request_rows AS
        SELECT r.at, r.period, k.key_id, k.label AS key_label, m.name AS model,
            coalesce(u.name, 'openai') AS upstream,
            f.name AS flavor, r.status, r.streamed, r.input_tokens, r.cached_tokens,
            r.cache_write_tokens, r.output_tokens, r.reasoning_tokens, r.cost_nano_usd,
            r.latency_us, r.response_id, r.error, r.unpriced, r.estimated, r.partial,
            r.user, r.session, r.tags
        FROM requests r
        JOIN keys k ON k.id = r.key
        JOIN names m ON m.id = r.model
        JOIN names f ON f.id = r.flavor
        LEFT JOIN names u ON u.id = r.upstream;
    ",
    // 4: Anthropic's 1-hour cache writes (a part of cache_write_tokens, 0 before), the service
    // tier the response reported (NULL: standard, as every row before; text in the row, as
    // attribution is: a tier other than standard is rare), and the price used, by number in
    // `names` as models are (NULL: no price found, or not said, as every row before; a row
    // unpriced for its audio alone names the price of its text): a handful of labels label
    // every row, and a reprice rewrites them with the costs.
    "
    ALTER TABLE requests ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN service_tier TEXT;
    ALTER TABLE requests ADD COLUMN price INTEGER REFERENCES names;
    ALTER TABLE totals ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE upstream_totals ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
    DROP VIEW request_rows;
    CREATE VIEW request_rows AS
        SELECT r.at, r.period, k.key_id, k.label AS key_label, m.name AS model,
            coalesce(u.name, 'openai') AS upstream,
            f.name AS flavor, r.status, r.streamed, r.input_tokens, r.cached_tokens,
            r.cache_write_tokens, r.output_tokens, r.reasoning_tokens, r.cost_nano_usd,
            r.latency_us, r.response_id, r.error, r.unpriced, r.estimated, r.partial,
            r.user, r.session, r.tags, r.cache_write_1h_tokens, r.service_tier, p.name AS price
        FROM requests r
        JOIN keys k ON k.id = r.key
        JOIN names m ON m.id = r.model
        JOIN names f ON f.id = r.flavor
        LEFT JOIN names u ON u.id = r.upstream
        LEFT JOIN names p ON p.id = r.price;
    ",
];

/// The schema version this build writes and reads.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// How a connection will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The server's writer: creates the file when missing and migrates it.
    Write,
    /// Reports and exports: never creates or changes anything.
    Read,
}

/// Opens the ledger at `path`, refusing files that are not an llm-meter ledger of a known version.
pub fn open(path: &Path, access: Access) -> Result<Connection, LedgerError> {
    let flags = match access {
        Access::Write => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        // Read-write without create: a reader of a WAL database may need to set up its
        // shared-memory index; `query_only` below keeps it from changing data.
        Access::Read => OpenFlags::SQLITE_OPEN_READ_WRITE,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if access == Access::Read && !path.exists() {
        return Err(LedgerError::Missing(path.to_owned()));
    }
    let fail = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
    let conn = Connection::open_with_flags(path, flags).map_err(fail)?;
    // Identify the file before anything writes to it: these reads fail on a file that is not
    // SQLite ("file is not a database") and leave it untouched.
    let (app_id, version, tables) = identify(&conn).map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => LedgerError::NotALedger {
            path: path.to_owned(),
            reason: "it is not an SQLite database (corrupt, or another kind of file)".into(),
        },
        _ => fail(e),
    })?;
    let is_empty = app_id == 0 && version == 0 && tables == 0;
    if !is_empty && app_id != APPLICATION_ID {
        return Err(LedgerError::NotALedger {
            path: path.to_owned(),
            reason: "it is an SQLite database of another application".into(),
        });
    }
    if version > VERSION {
        return Err(LedgerError::TooNew {
            path: path.to_owned(),
            found: version,
            known: VERSION,
        });
    }
    // The writer is the only writer (the lock file sees to that), so it waits briefly and
    // retries later rather than stall its queue; readers may wait out a checkpoint.
    let busy = match access {
        Access::Write => std::time::Duration::from_secs(1),
        Access::Read => std::time::Duration::from_secs(5),
    };
    conn.busy_timeout(busy).map_err(fail)?;
    match access {
        Access::Read => {
            if is_empty {
                return Err(LedgerError::Missing(path.to_owned()));
            }
            conn.pragma_update(None, "query_only", true).map_err(fail)?;
        }
        Access::Write => {
            // WAL: readers (reports, exports, /stats history) never block the writer. NORMAL:
            // a commit is a write to the log, durable when the process dies; only a power loss
            // can take the last commits, which the next checkpoint's fsync makes safe.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(fail)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(fail)?;
            // Appends touch few pages: 1 MiB of cache (SQLite's default is 2 MiB) is plenty.
            conn.pragma_update(None, "cache_size", -1024)
                .map_err(fail)?;
            migrate(&conn, version).map_err(fail)?;
        }
    }
    Ok(conn)
}

fn identify(conn: &Connection) -> rusqlite::Result<(i32, i32, i64)> {
    let app_id = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    Ok((app_id, version, tables))
}

/// Applies the migrations after `from`, each in its own transaction with its version bump.
fn migrate(conn: &Connection, from: i32) -> rusqlite::Result<()> {
    for (done, sql) in (from.max(0)..).zip(MIGRATIONS.iter().skip(from.max(0) as usize)) {
        let version = done + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             {sql}
             PRAGMA application_id = {APPLICATION_ID};
             PRAGMA user_version = {version};
             COMMIT;"
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_gets_the_latest_schema_and_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite3");
        drop(open(&path, Access::Write).unwrap());
        let conn = open(&path, Access::Read).unwrap();
        let (app_id, version, _) = identify(&conn).unwrap();
        assert_eq!((app_id, version), (APPLICATION_ID, VERSION));
        drop(open(&path, Access::Write).unwrap());
    }

    /// A ledger in `dir` at schema `version` holding period 1, key `k1` and `rows` (SQL), opened
    /// by the writer: migrated to the latest schema.
    fn migrated_from(dir: &Path, version: usize, rows: &str) -> Connection {
        let path = dir.join("ledger.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "{}
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {version};
                 INSERT INTO periods VALUES (1, 0);
                 INSERT INTO keys VALUES (1, 'k1', 'sk-…1');
                 {rows}",
                MIGRATIONS[..version].join("\n")
            ))
            .unwrap();
        }
        let conn = open(&path, Access::Write).unwrap();
        let (_, migrated, _) = identify(&conn).unwrap();
        assert_eq!(migrated, VERSION);
        conn
    }

    #[test]
    fn a_version_1_ledger_is_migrated_with_its_rows_under_the_openai_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated_from(
            dir.path(),
            1,
            "INSERT INTO names VALUES (1, 'gpt-4o'), (2, 'openai_chat');
             INSERT INTO requests VALUES (5, 1, 1, 1, 2, 200, 0, 10, 0, 0, 5, 0, 75, NULL, NULL, 0, 0, 0, 0);
             INSERT INTO totals VALUES (1, 'k1', 'sk-…1', 'gpt-4o', 1, 0, 10, 0, 0, 5, 0, 75, 0);",
        );
        let upstream: String = conn
            .query_row("SELECT upstream FROM request_rows", [], |r| r.get(0))
            .unwrap();
        assert_eq!(upstream, "openai");
        let (requests, cost): (i64, i64) = conn
            .query_row(
                "SELECT requests, cost_nano_usd FROM upstream_totals WHERE upstream = 'openai'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((requests, cost), (1, 75));
    }

    #[test]
    fn a_version_2_ledger_is_migrated_with_its_rows_unattributed() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated_from(
            dir.path(),
            2,
            "INSERT INTO names VALUES (1, 'gpt-4o'), (2, 'openai_chat'), (3, 'openai');
             INSERT INTO requests VALUES (5, 1, 1, 1, 2, 200, 0, 10, 0, 0, 5, 0, 75, NULL, NULL, 0, 0, 0, 0, 3);",
        );
        let row: (String, Option<String>, Option<String>, Option<String>) = conn
            .query_row(
                "SELECT upstream, user, session, tags FROM request_rows",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(row, ("openai".to_owned(), None, None, None));
    }

    #[test]
    fn a_version_3_ledger_is_migrated_with_no_one_hour_writes_tier_or_price() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated_from(
            dir.path(),
            3,
            "INSERT INTO names VALUES (1, 'claude-sonnet-4-5'), (2, 'anthropic_messages'), (3, 'anthropic');
             INSERT INTO requests VALUES (5, 1, 1, 1, 2, 200, 0, 10, 0, 300, 5, 0, 75, NULL, NULL, 0, 0, 0, 0, 3, 'alice', NULL, NULL);
             INSERT INTO totals VALUES (1, 'k1', 'sk-…1', 'claude-sonnet-4-5', 1, 0, 10, 0, 300, 5, 0, 75, 0, 0);
             INSERT INTO upstream_totals VALUES (1, 'anthropic', 1, 0, 10, 0, 300, 5, 0, 75, 0, 0);",
        );
        let row: (i64, i64, Option<String>, Option<String>, String) = conn
            .query_row(
                "SELECT cache_write_tokens, cache_write_1h_tokens, service_tier, price, user FROM request_rows",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(row, (300, 0, None, None, "alice".to_owned()));
        for table in ["totals", "upstream_totals"] {
            let (write, write_1h): (i64, i64) = conn
                .query_row(
                    &format!("SELECT cache_write_tokens, cache_write_1h_tokens FROM {table}"),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((write, write_1h), (300, 0), "{table}");
        }
    }

    #[test]
    fn readers_never_create_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite3");
        assert!(matches!(
            open(&path, Access::Read),
            Err(LedgerError::Missing(_))
        ));
        assert!(!path.exists());
    }
}
