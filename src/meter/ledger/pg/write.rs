//! Batches into PostgreSQL: one statement inserts a batch's rows (as arrays, unnested) and adds
//! the rows it actually inserted to the hourly rollup, so a retried batch adds nothing twice.

use postgres::Client;

use super::Db;
use crate::meter::ledger::queue::{self, Entry};
use crate::meter::ledger::writer::Store;
use crate::meter::ledger::{Row, micros};

/// The rollup's counters, summed from the inserted rows, in the order of its columns.
pub(super) const ROLLUP_COUNTERS: [(&str, &str); 12] = [
    ("requests", "count(*)"),
    ("errors", "sum(error)"),
    ("input_tokens", "sum(input_tokens)"),
    ("cached_tokens", "sum(cached_tokens)"),
    ("cache_write_tokens", "sum(cache_write_tokens)"),
    ("output_tokens", "sum(output_tokens)"),
    ("reasoning_tokens", "sum(reasoning_tokens)"),
    ("cost_nano_usd", "sum(cost_nano_usd)"),
    ("unpriced", "sum(unpriced)"),
    ("estimated", "sum(estimated)"),
    ("cache_write_1h_tokens", "sum(cache_write_1h_tokens)"),
    ("partial", "sum(partial)"),
];

fn insert_sql() -> String {
    let columns: Vec<&str> = ROLLUP_COUNTERS.iter().map(|(c, _)| *c).collect();
    let sums: Vec<&str> = ROLLUP_COUNTERS.iter().map(|(_, s)| *s).collect();
    let add: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = usage_hourly.{c} + excluded.{c}"))
        .collect();
    format!(
        "WITH ins AS (
            INSERT INTO requests (replica, at, period, key_id, key_label, model, upstream, flavor,
                status, streamed, input_tokens, cached_tokens, cache_write_tokens,
                cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd, latency_us,
                response_id, error, unpriced, estimated, partial, \"user\", session, tags,
                service_tier, price)
            SELECT $1, r.at, r.period, r.key_id, r.key_label, r.model, r.upstream, r.flavor,
                r.status, r.streamed, r.input, r.cached, r.cw, r.cw1h, r.output, r.reasoning,
                r.cost, r.latency, r.response_id, r.error, r.unpriced, r.estimated, r.partial,
                r.usr, r.session, r.tags::jsonb, r.tier, r.price
            FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::int[], $10::int[], $11::bigint[], $12::bigint[],
                $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[],
                $18::bigint[], $19::text[], $20::int[], $21::int[], $22::int[], $23::int[],
                $24::text[], $25::text[], $26::text[], $27::text[], $28::text[])
            AS r(at, period, key_id, key_label, model, upstream, flavor, status, streamed, input,
                cached, cw, cw1h, output, reasoning, cost, latency, response_id, error, unpriced,
                estimated, partial, usr, session, tags, tier, price)
            ON CONFLICT DO NOTHING
            RETURNING *)
        INSERT INTO usage_hourly (replica, hour, key_id, model, upstream, key_label, {columns})
        SELECT replica, at / 3600000000, key_id, model, upstream, max(key_label), {sums}
        FROM ins GROUP BY replica, at / 3600000000, key_id, model, upstream
        ON CONFLICT (replica, hour, key_id, model, upstream) DO UPDATE
        SET key_label = excluded.key_label, {add}",
        columns = columns.join(", "),
        sums = sums.join(", "),
        add = add.join(", "),
    )
}

/// A batch's rows as columns.
#[derive(Default)]
struct Columns<'a> {
    at: Vec<i64>,
    period: Vec<i64>,
    key_id: Vec<&'a str>,
    key_label: Vec<&'a str>,
    model: Vec<&'a str>,
    upstream: Vec<&'a str>,
    flavor: Vec<&'a str>,
    status: Vec<i32>,
    streamed: Vec<i32>,
    /// input, cached, cache write, 1-hour cache write, output, reasoning, cost.
    numbers: [Vec<i64>; 7],
    latency: Vec<Option<i64>>,
    response_id: Vec<Option<&'a str>>,
    /// error, unpriced, estimated, partial.
    flags: [Vec<i32>; 4],
    user: Vec<Option<&'a str>>,
    session: Vec<Option<&'a str>>,
    tags: Vec<Option<&'a str>>,
    tier: Vec<Option<&'a str>>,
    price: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, at: i64, row: &Row<&'a str>) {
        let u = &row.usage;
        self.at.push(at);
        self.period.push(int(row.period));
        self.key_id.push(row.key_id);
        self.key_label.push(row.key_label);
        self.model.push(row.model);
        self.upstream.push(row.upstream);
        self.flavor.push(row.flavor);
        self.status.push(i32::from(row.status));
        self.streamed.push(i32::from(row.is_streaming));
        for (column, n) in self.numbers.iter_mut().zip([
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.cache_write_1h_tokens,
            u.output_tokens,
            u.reasoning_tokens,
            row.cost.0,
        ]) {
            column.push(int(n));
        }
        self.latency.push(
            row.latency
                .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        );
        self.response_id.push(row.response_id);
        for (column, on) in self.flags.iter_mut().zip([
            row.is_error,
            row.is_unpriced,
            row.is_estimated,
            row.is_partial,
        ]) {
            column.push(i32::from(on));
        }
        self.user.push(row.user);
        self.session.push(row.session);
        self.tags.push(row.tags);
        self.tier.push(row.service_tier);
        self.price.push(row.price);
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The PostgreSQL store of one replica: its connection (made again after a failure) and the
/// last row time it wrote.
pub(in crate::meter::ledger) struct Postgres {
    db: Db,
    client: Option<Client>,
    sql: String,
    /// The last `at` committed: each row's is made greater, so (replica, at) is unique and a
    /// retried batch gets the same times.
    last_at: i64,
}

impl Postgres {
    /// The store, with the connection `open` made (migrated already).
    pub(in crate::meter::ledger) fn new(db: Db, client: Client) -> Self {
        Self {
            db,
            client: Some(client),
            sql: insert_sql(),
            last_at: 0,
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
        let mut columns = Columns::default();
        let mut at = self.last_at;
        for entry in queue::entries(batch) {
            // Periods are each replica's own `/stats` resets: the database needs no record.
            if let Entry::Row(row) = entry {
                at = micros(row.at).max(at.saturating_add(1));
                columns.push(at, &row);
            }
        }
        if columns.at.is_empty() {
            return Ok(());
        }
        let replica = self.db.replica;
        let c = &columns;
        let [input, cached, cw, cw1h, output, reasoning, cost] = &c.numbers;
        let [error, unpriced, estimated, partial] = &c.flags;
        let result = connected(&mut self.client, &self.db)?.execute(
            self.sql.as_str(),
            &[
                &replica,
                &c.at,
                &c.period,
                &c.key_id,
                &c.key_label,
                &c.model,
                &c.upstream,
                &c.flavor,
                &c.status,
                &c.streamed,
                input,
                cached,
                cw,
                cw1h,
                output,
                reasoning,
                cost,
                &c.latency,
                &c.response_id,
                error,
                unpriced,
                estimated,
                partial,
                &c.user,
                &c.session,
                &c.tags,
                &c.tier,
                &c.price,
            ],
        );
        match result {
            Ok(_) => {
                // Only once committed: a failed batch is retried with the same times.
                self.last_at = at;
                Ok(())
            }
            Err(err) => Err(super::describe(&err)),
        }
    }
}
