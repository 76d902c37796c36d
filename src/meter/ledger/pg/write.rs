//! Batches into PostgreSQL: one transaction copies a batch's rows in (`COPY … FORMAT binary`, the
//! cheapest way in for the server: a third of the CPU per row of an `INSERT` from arrays) and
//! adds their sums per hour, key, model and upstream to the hourly rollup. After a failure whose
//! outcome is unknown (the connection broke during a commit), the next attempt first asks which
//! of its rows are in, so a retried batch adds nothing twice.

use std::collections::HashMap;

use postgres::Client;
use std::io::Write;

use super::Db;
use crate::meter::ledger::queue::{self, Entry};
use crate::meter::ledger::writer::{IDS_CAP, Store, int};
use crate::meter::ledger::{Row, micros};

/// The rollup's counters, in the order of its columns: the SQLite totals' (the order
/// `counts_from` reads them), then the partial requests.
pub(super) fn rollup_counters() -> Vec<&'static str> {
    crate::meter::ledger::writer::COUNTERS
        .into_iter()
        .chain(["partial"])
        .collect()
}

const HOUR: i64 = 3_600_000_000;

/// The columns a batch's rows are copied into, in the order `copy_row` writes them (period and
/// counts in `queue::counts`' order, names as their numbers in `names`, the 0/1 columns as
/// bits of `flags`: migration 2).
const COPY_SQL: &str = "COPY requests (replica, at, period, input_tokens, cached_tokens,
    cache_write_tokens, cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd,
    latency_us, key_id, key_label, model, upstream, flavor, service_tier, price, status, flags,
    response_id, \"user\", session, tags) FROM STDIN (FORMAT binary)";

/// A batch's rows in the binary `COPY` format, built whole and sent in large messages: the
/// server then wakes once per batch, not once per four kilobytes as with the client's own
/// copy writer, and no value goes through a dynamic type check.
struct CopyRows {
    buf: Vec<u8>,
}

impl CopyRows {
    /// Columns per row: `COPY_SQL`'s.
    const COLUMNS: i16 = 24;

    fn new() -> Self {
        // The signature, no flags, no header extension.
        let mut buf = b"PGCOPY\n\xff\r\n\0".to_vec();
        buf.extend_from_slice(&[0; 8]);
        Self { buf }
    }

    fn row(&mut self) {
        self.buf.extend_from_slice(&Self::COLUMNS.to_be_bytes());
    }

    fn field(&mut self, value: &[u8]) {
        // A field longer than the format can say is cut (no text of ours comes near 2 GiB).
        let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf
            .extend_from_slice(&value[..usize::try_from(len).unwrap_or_default()]);
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn int8(&mut self, v: i64) {
        self.field(&v.to_be_bytes());
    }

    fn int4(&mut self, v: i32) {
        self.field(&v.to_be_bytes());
    }

    fn int2(&mut self, v: i16) {
        self.field(&v.to_be_bytes());
    }

    fn opt<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Self, T)) {
        match v {
            Some(v) => put(self, v),
            None => self.null(),
        }
    }

    fn text(&mut self, v: &str) {
        self.field(text(v).as_bytes());
    }

    /// A JSON text as `jsonb`: its binary form is a version byte, then the text.
    fn jsonb(&mut self, v: &str) {
        let v = text(v);
        let len = i32::try_from(v.len().saturating_add(1)).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf
            .extend_from_slice(&v.as_bytes()[..usize::try_from(len - 1).unwrap_or_default()]);
    }

    /// The whole copy, with its trailer.
    fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Adds a batch's sums to the rollup: this replica's rows only, so no other writer waits.
fn rollup_sql() -> String {
    let columns = rollup_counters();
    let counters = columns.join(", ");
    let arrays: Vec<String> = (0..columns.len())
        .map(|i| format!("${}::bigint[]", 7 + i))
        .collect();
    let names: Vec<String> = (0..columns.len()).map(|i| format!("c{i}")).collect();
    let add: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = usage_hourly.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO usage_hourly (replica, hour, key_id, model, upstream, key_label, {counters})
        SELECT $1, s.* FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[],
            $6::text[], {arrays}) AS s(hour, key_id, model, upstream, key_label, {names})
        ON CONFLICT (replica, hour, key_id, model, upstream) DO UPDATE
        SET key_label = excluded.key_label, {add}",
        arrays = arrays.join(", "),
        names = names.join(", "),
        add = add.join(", "),
    )
}

/// A batch's sums per hour, key, model and upstream, as columns.
#[derive(Default)]
struct Sums<'a> {
    index: HashMap<(i64, &'a str, &'a str, &'a str), usize, foldhash::fast::RandomState>,
    hour: Vec<i64>,
    key_id: Vec<&'a str>,
    model: Vec<&'a str>,
    upstream: Vec<&'a str>,
    key_label: Vec<&'a str>,
    counters: [Vec<i64>; 12],
}

impl<'a> Sums<'a> {
    fn add(&mut self, at: i64, row: &Row<&'a str>) {
        let hour = at.div_euclid(HOUR);
        let next = self.hour.len();
        let i = *self
            .index
            .entry((hour, row.key_id, row.model, row.upstream))
            .or_insert(next);
        if i == next {
            self.hour.push(hour);
            self.key_id.push(row.key_id);
            self.model.push(row.model);
            self.upstream.push(row.upstream);
            self.key_label.push(row.key_label);
            for column in &mut self.counters {
                column.push(0);
            }
        }
        // The newest label of the key, as SQLite's totals keep it.
        self.key_label[i] = row.key_label;
        let u = &row.usage;
        let values = [
            1,
            u64::from(row.is_error),
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.output_tokens,
            u.reasoning_tokens,
            row.cost.0,
            u64::from(row.is_unpriced),
            u64::from(row.is_estimated),
            u.cache_write_1h_tokens,
            u64::from(row.is_partial),
        ];
        for (column, v) in self.counters.iter_mut().zip(values) {
            column[i] = column[i].saturating_add(int(v));
        }
    }
}

/// Text PostgreSQL takes: it refuses a NUL byte in any text, which a client can put in a model
/// name (`"a\u0000b"` is valid JSON); one such row would fail its whole batch at every retry.
pub(super) fn text(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains('\0') {
        value.replace('\0', "\u{FFFD}").into()
    } else {
        value.into()
    }
}

/// The names a row refers to by number: key id and label, model, upstream, flavor, then the
/// service tier and price label when it has them.
fn names_of<'a>(row: &Row<&'a str>) -> impl Iterator<Item = &'a str> {
    [
        row.key_id,
        row.key_label,
        row.model,
        row.upstream,
        row.flavor,
    ]
    .into_iter()
    .chain(row.service_tier)
    .chain(row.price)
}

/// Numbers of the names already in `names`, so most batches look nothing up.
#[derive(Default)]
struct Names {
    ids: HashMap<String, i32, foldhash::fast::RandomState>,
}

impl Names {
    /// Gives every name of `batch` its number: the ones not known yet are added (once across
    /// replicas: the name is unique) and read back. Outside the batch's transaction, so a
    /// batch that fails leaves no number here that the database lacks.
    fn learn(&mut self, client: &mut Client, batch: &[u8]) -> Result<(), postgres::Error> {
        let mut missing = std::collections::BTreeSet::new();
        for entry in queue::entries(batch) {
            if let Entry::Row(row) = entry {
                for name in names_of(&row).map(text) {
                    if !self.ids.contains_key(name.as_ref()) {
                        missing.insert(name.into_owned());
                    }
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // Sorted: replicas adding some of the same names take their locks in one order.
        let missing: Vec<String> = missing.into_iter().collect();
        client.execute(
            "INSERT INTO names (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING",
            &[&missing],
        )?;
        let rows = client.query(
            "SELECT id, name FROM names WHERE name = ANY($1)",
            &[&missing],
        )?;
        // Many distinct names (random keys, say) must not grow it forever.
        if self.ids.len() + rows.len() > IDS_CAP {
            self.ids.clear();
        }
        for row in rows {
            self.ids.insert(row.try_get(1)?, row.try_get(0)?);
        }
        Ok(())
    }

    fn id(&self, name: &str) -> Result<i32, String> {
        self.ids
            .get(text(name).as_ref())
            .copied()
            .ok_or_else(|| format!("no number for the name {name:?}"))
    }
}

/// Writes one row into the copy.
fn copy_row(
    copy: &mut CopyRows,
    names: &Names,
    replica: i64,
    at: i64,
    row: &Row<&str>,
) -> Result<(), String> {
    // A failure leaves a part row behind: the whole copy is then given up, and the batch tried
    // again.
    copy.row();
    copy.int8(replica);
    copy.int8(at);
    for v in queue::counts(row) {
        copy.int8(int(v));
    }
    copy.opt(row.latency, |c, d| {
        c.int8(i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    });
    for name in [
        row.key_id,
        row.key_label,
        row.model,
        row.upstream,
        row.flavor,
    ] {
        copy.int4(names.id(name)?);
    }
    for name in [row.service_tier, row.price] {
        copy.opt(name.map(|n| names.id(n)).transpose()?, CopyRows::int4);
    }
    copy.int2(i16::try_from(row.status).unwrap_or(i16::MAX));
    copy.int2(i16::from(queue::outcome_bits(row)));
    for v in [row.response_id, row.user, row.session] {
        copy.opt(v, CopyRows::text);
    }
    copy.opt(row.tags, CopyRows::jsonb);
    Ok(())
}

/// The PostgreSQL store of one replica: its connection (made again after a failure) and the
/// last row time it wrote.
pub(in crate::meter::ledger) struct Postgres {
    db: Db,
    client: Option<Client>,
    sql: String,
    /// The last `at` committed: each row's is made greater, so (at, replica) is unique and a
    /// retried batch gets the same times.
    last_at: i64,
    /// The last attempt failed, perhaps after its commit: the next asks what is in first.
    is_uncertain: bool,
    names: Names,
    /// The rollup statement, prepared once per connection: planning it for every batch cost
    /// the server more than the batch's commit.
    rollup: Option<postgres::Statement>,
}

impl Postgres {
    /// The store, with the connection `open` made (migrated already).
    pub(in crate::meter::ledger) fn new(db: Db, client: Client) -> Self {
        Self {
            db,
            client: Some(client),
            sql: rollup_sql(),
            last_at: 0,
            is_uncertain: false,
            names: Names::default(),
            rollup: None,
        }
    }
}

/// The open connection, made again when there is none or the last one broke (then the names'
/// numbers are asked for again, the database may not be the one they came from, and the
/// rollup statement is prepared again).
fn connected<'c>(
    client: &'c mut Option<Client>,
    names: &mut Names,
    rollup: &mut Option<postgres::Statement>,
    db: &Db,
) -> Result<&'c mut Client, String> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = None;
        *names = Names::default();
        *rollup = None;
        *client = Some(db.connect().map_err(|e| e.to_string())?);
    }
    client.as_mut().ok_or_else(|| "no connection".to_owned())
}

impl Store for Postgres {
    fn commit(&mut self, batch: &[u8]) -> Result<(), String> {
        let result = self.write(batch);
        self.is_uncertain = result.is_err();
        result
    }
}

impl Postgres {
    fn write(&mut self, batch: &[u8]) -> Result<(), String> {
        let replica = self.db.replica;
        let client = connected(
            &mut self.client,
            &mut self.names,
            &mut self.rollup,
            &self.db,
        )?;
        let first = self.last_at.saturating_add(1);
        // After a failure, the rows of this batch already in (a commit whose answer was lost)
        // are the ones up to the newest of this replica's from the batch's first time on.
        let written = if self.is_uncertain {
            client
                .query_one(
                    "SELECT coalesce(max(at), 0) FROM requests WHERE at >= $2 AND replica = $1",
                    &[&replica, &first],
                )
                .and_then(|row| row.try_get::<_, i64>(0))
                .map_err(|e| super::describe(&e))?
        } else {
            0
        };
        let fail = |e: postgres::Error| super::describe(&e);
        self.names.learn(client, batch).map_err(fail)?;
        let rollup = match &self.rollup {
            Some(statement) => statement.clone(),
            None => client.prepare(&self.sql).map_err(fail)?,
        };
        self.rollup = Some(rollup.clone());
        let mut sums = Sums::default();
        let mut at = self.last_at;
        let mut tx = client.transaction().map_err(fail)?;
        let mut copy = CopyRows::new();
        for entry in queue::entries(batch) {
            // Periods are each replica's own `/stats` resets: the database needs no record.
            if let Entry::Row(row) = entry {
                at = micros(row.at).max(at.saturating_add(1));
                if at > written {
                    copy_row(&mut copy, &self.names, replica, at, &row)?;
                    sums.add(at, &row);
                }
            }
        }
        let mut writer = tx.copy_in(COPY_SQL).map_err(fail)?;
        // A message a mebibyte long at most: a backlog of many rows stays far below the
        // server's limit on one message (1 GiB).
        for piece in copy.finish().chunks(1 << 20) {
            writer
                .write_all(piece)
                .map_err(|e| format!("copying the rows: {e}"))?;
        }
        writer.finish().map_err(fail)?;
        if !sums.hour.is_empty() {
            add_sums(&mut tx, &rollup, replica, &sums).map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
        // Only once committed: a failed batch is retried with the same times.
        self.last_at = at;
        Ok(())
    }
}

/// Adds the batch's sums to the rollup.
fn add_sums(
    tx: &mut postgres::Transaction<'_>,
    statement: &postgres::Statement,
    replica: i64,
    s: &Sums<'_>,
) -> Result<u64, postgres::Error> {
    let [s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11] = &s.counters;
    let texts =
        |column: &[&str]| -> Vec<String> { column.iter().map(|v| text(v).into_owned()).collect() };
    tx.execute(
        statement,
        &[
            &replica,
            &s.hour,
            &texts(&s.key_id),
            &texts(&s.model),
            &texts(&s.upstream),
            &texts(&s.key_label),
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            s8,
            s9,
            s10,
            s11,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ledger::LedgerUrl;
    use crate::meter::ledger::{now, queue};
    use crate::money::NanoUsd;
    use crate::usage::Usage;

    fn row(model: &str) -> Row<&str> {
        Row {
            at: now(),
            period: 1,
            key_id: "0123456789abcdef",
            key_label: "sk-…cdef",
            model,
            upstream: "openai",
            flavor: "openai_chat",
            status: 200,
            is_streaming: false,
            usage: Usage {
                input_tokens: 10,
                output_tokens: 3,
                ..Usage::default()
            },
            cost: NanoUsd(7),
            latency: None,
            response_id: None,
            is_error: false,
            is_unpriced: false,
            is_estimated: false,
            is_partial: false,
            user: None,
            session: None,
            tags: Some("{\"team\":\"a\"}"),
            service_tier: None,
            price: None,
        }
    }

    /// A scratch database on the test server, dropped with it.
    struct Scratch {
        admin: postgres::Client,
        name: String,
        db: Db,
    }

    impl Scratch {
        fn new(tag: &str) -> Self {
            let server = std::env::var("LLM_METER_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
            let name = format!("llm_meter_unit_{tag}_{}", std::process::id());
            let mut admin =
                postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls)
                    .expect("the test server (LLM_METER_TEST_POSTGRES)");
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            let db = Db::new(&LedgerUrl::parse(&format!("{server}/{name}")).unwrap()).unwrap();
            Self { admin, name, db }
        }

        fn store(&self) -> Postgres {
            Postgres::new(self.db.clone(), super::super::open(&self.db).unwrap())
        }

        fn count(&self, sql: &str) -> i64 {
            self.db
                .connect()
                .unwrap()
                .query_one(sql, &[])
                .unwrap()
                .get(0)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let drop = format!("DROP DATABASE {} WITH (FORCE)", self.name);
            self.admin.batch_execute(&drop).unwrap();
        }
    }

    #[test]
    fn a_batch_retried_after_its_commit_was_not_acknowledged_adds_nothing_twice() {
        let scratch = Scratch::new("retry");
        let mut store = scratch.store();
        let mut batch = Vec::new();
        for model in ["gpt-4o", "gpt-4o", "gpt-4o-mini"] {
            queue::push_row(&mut batch, &row(model));
        }
        store.commit(&batch).unwrap();
        // The commit went in, but its answer was lost: the writer keeps the batch, grown by
        // what was queued since, and tries again from the same time.
        store.last_at = 0;
        store.is_uncertain = true;
        queue::push_row(&mut batch, &row("gpt-4o"));
        store.commit(&batch).unwrap();
        drop(store);
        let count = |sql| scratch.count(sql);
        assert_eq!(count("SELECT count(*) FROM requests"), 4);
        assert_eq!(count("SELECT sum(requests)::bigint FROM usage_hourly"), 4);
        assert_eq!(
            count("SELECT sum(cost_nano_usd)::bigint FROM usage_hourly"),
            28
        );
        assert_eq!(
            count("SELECT sum(requests)::bigint FROM usage_hourly WHERE model = 'gpt-4o'"),
            3
        );
    }

    #[test]
    fn a_batch_of_many_megabytes_and_names_goes_in_whole_with_every_value() {
        let scratch = Scratch::new("large");
        let mut store = scratch.store();
        let models: Vec<String> = (0..300).map(|i| format!("model-{i}")).collect();
        let long_id = "r".repeat(400);
        let mut batch = Vec::new();
        for i in 0..20_000u64 {
            let mut r = row(&models[usize::try_from(i % 300).unwrap()]);
            r.response_id = Some(&long_id);
            r.is_streaming = i % 2 == 0;
            r.is_partial = i % 3 == 0;
            r.status = 200 + u16::try_from(i % 7).unwrap();
            r.usage.output_tokens = i;
            r.latency = (i % 5 != 0).then(|| std::time::Duration::from_micros(i));
            queue::push_row(&mut batch, &r);
        }
        // About 9 MB of rows: nine messages of the copy.
        assert!(batch.len() > 8 << 20, "{}", batch.len());
        store.commit(&batch).unwrap();
        drop(store);
        let count = |sql| scratch.count(sql);
        assert_eq!(count("SELECT count(*) FROM request_rows"), 20_000);
        assert_eq!(count("SELECT count(DISTINCT model) FROM request_rows"), 300);
        // The models, and the key id, key label, upstream and flavor.
        assert_eq!(count("SELECT count(*) FROM names"), 300 + 4);
        assert_eq!(
            count("SELECT sum(output_tokens)::bigint FROM request_rows"),
            (0..20_000).sum::<i64>()
        );
        let (streamed, partial) = (
            count("SELECT sum(streamed)::bigint FROM request_rows"),
            count("SELECT sum(partial)::bigint FROM request_rows"),
        );
        assert_eq!((streamed, partial), (10_000, 6_667));
        assert_eq!(
            count("SELECT sum(status - 200)::bigint FROM request_rows"),
            59_997
        );
        assert_eq!(
            count("SELECT count(*) FROM request_rows WHERE latency_us IS NULL"),
            4_000
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM request_rows WHERE tags->>'team' = 'a' AND length(response_id) = 400"
            ),
            20_000
        );
    }
}
