//! Batches into PostgreSQL: one transaction copies a batch's rows in (`COPY … FORMAT binary`, the
//! cheapest way in for the server: a third of the CPU per row of an `INSERT` from arrays) and
//! adds their sums per hour, key, model and upstream to the hourly rollup. After a failure whose
//! outcome is unknown (the connection broke during a commit), the next attempt first asks which
//! of its rows are in, so a retried batch adds nothing twice.

use std::collections::HashMap;

use postgres::Client;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::Db;
use crate::meter::ledger::queue::{self, Entry};
use crate::meter::ledger::writer::{Store, int};
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

/// The columns a batch's rows are copied into, in the order `copy_row` writes them.
const COPY_SQL: &str = "COPY requests (replica, at, period, key_id, key_label, model, upstream,
    flavor, status, streamed, input_tokens, cached_tokens, cache_write_tokens,
    cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd, latency_us,
    response_id, error, unpriced, estimated, partial, \"user\", session, tags, service_tier,
    price) FROM STDIN (FORMAT binary)";

/// The types of `COPY_SQL`'s columns.
const COPY_TYPES: [Type; 28] = [
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT4,
    Type::INT4,
    Type::INT4,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
];

/// A JSON text sent as `jsonb` (its binary form is a version byte, then the text).
#[derive(Debug)]
struct Jsonb<'a>(&'a str);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
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

/// Writes one row into the copy.
fn copy_row(
    copy: &mut BinaryCopyInWriter<'_>,
    replica: i64,
    at: i64,
    row: &Row<&str>,
) -> Result<(), postgres::Error> {
    let u = &row.usage;
    let latency = row
        .latency
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let [input, cached, cw, cw1h, output, reasoning, cost] = [
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        row.cost.0,
    ]
    .map(int);
    let [error, unpriced, estimated, partial, streamed] = [
        row.is_error,
        row.is_unpriced,
        row.is_estimated,
        row.is_partial,
        row.is_streaming,
    ]
    .map(i32::from);
    let opt = |v: Option<&str>| v.map(|v| text(v).into_owned());
    let (key_id, key_label, model, upstream, flavor) = (
        text(row.key_id),
        text(row.key_label),
        text(row.model),
        text(row.upstream),
        text(row.flavor),
    );
    let (response_id, user, session, tier, price) = (
        opt(row.response_id),
        opt(row.user),
        opt(row.session),
        opt(row.service_tier),
        opt(row.price),
    );
    let tags = opt(row.tags);
    copy.write(&[
        &replica,
        &at,
        &int(row.period),
        &key_id.as_ref(),
        &key_label.as_ref(),
        &model.as_ref(),
        &upstream.as_ref(),
        &flavor.as_ref(),
        &i32::from(row.status),
        &streamed,
        &input,
        &cached,
        &cw,
        &cw1h,
        &output,
        &reasoning,
        &cost,
        &latency,
        &response_id,
        &error,
        &unpriced,
        &estimated,
        &partial,
        &user,
        &session,
        &tags.as_deref().map(Jsonb),
        &tier,
        &price,
    ])
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
        }
    }
}

/// The open connection, made again when there is none or the last one broke.
fn connected<'c>(client: &'c mut Option<Client>, db: &Db) -> Result<&'c mut Client, String> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = None;
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
        let client = connected(&mut self.client, &self.db)?;
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
        let mut sums = Sums::default();
        let mut at = self.last_at;
        let fail = |e: postgres::Error| super::describe(&e);
        let mut tx = client.transaction().map_err(fail)?;
        let mut copy = BinaryCopyInWriter::new(tx.copy_in(COPY_SQL).map_err(fail)?, &COPY_TYPES);
        for entry in queue::entries(batch) {
            // Periods are each replica's own `/stats` resets: the database needs no record.
            if let Entry::Row(row) = entry {
                at = micros(row.at).max(at.saturating_add(1));
                if at > written {
                    copy_row(&mut copy, replica, at, &row).map_err(fail)?;
                    sums.add(at, &row);
                }
            }
        }
        copy.finish().map_err(fail)?;
        if !sums.hour.is_empty() {
            add_sums(&mut tx, &self.sql, replica, &sums).map_err(fail)?;
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
    sql: &str,
    replica: i64,
    s: &Sums<'_>,
) -> Result<u64, postgres::Error> {
    let [s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11] = &s.counters;
    let texts =
        |column: &[&str]| -> Vec<String> { column.iter().map(|v| text(v).into_owned()).collect() };
    tx.execute(
        sql,
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

    fn row(model: &'static str) -> Row<&'static str> {
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

    #[test]
    fn a_batch_retried_after_its_commit_was_not_acknowledged_adds_nothing_twice() {
        let server = std::env::var("LLM_METER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("llm_meter_unit_{}", std::process::id());
        let mut admin = postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls)
            .expect("the test server (LLM_METER_TEST_POSTGRES)");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let db = Db::new(&LedgerUrl::parse(&format!("{server}/{name}")).unwrap()).unwrap();
        let mut store = Postgres::new(db.clone(), super::super::open(&db).unwrap());
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
        let mut client = db.connect().unwrap();
        let mut count = |sql: &str| -> i64 { client.query_one(sql, &[]).unwrap().get(0) };
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
        drop(client);
        drop(store);
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .unwrap();
    }
}
