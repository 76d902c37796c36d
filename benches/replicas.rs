//! PostgreSQL ledger benchmark: how many rows a second three replicas commit into one database,
//! and how fast `/usage?group_by=day,model` answers over ten million rows.
//!
//! `cargo bench --bench replicas` against the machine's server (postgres://postgres@127.0.0.1:5432,
//! or `-- --server URL`); `-- --rows N --history-rows M --replicas R` tune it. It makes a scratch
//! database of its own and drops it at the end.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[path = "common/binary.rs"]
mod binary;
#[path = "common/usage.rs"]
mod usage;

use llm_meter::config::ledger::LedgerUrl;
use llm_meter::key::Identity;
use llm_meter::meter::ledger::Options;
use llm_meter::meter::pricing::PriceTable;
use llm_meter::meter::{Meter, Record};
use usage::USAGE;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let server: String = arg(
        &args,
        "--server",
        "postgres://postgres@127.0.0.1:5432".to_owned(),
    );
    let rows: u64 = arg(&args, "--rows", 600_000);
    let replicas: u64 = arg(&args, "--replicas", 3);
    let history_rows: u64 = arg(&args, "--history-rows", 10_000_000);
    let name = format!("llm_meter_bench_{}", std::process::id());
    let mut admin =
        postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls).expect("server");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("a scratch database");
    let url = format!("{server}/{name}");
    println!("llm-meter PostgreSQL ledger benchmark ({name}, dropped at the end)");
    if rows > 0 {
        writers(&url, rows, replicas);
    }
    if history_rows > 0 {
        history(&url, history_rows);
    }
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .expect("dropped");
}

/// `replicas` meters in this process, each a replica with its own writer, each recording
/// `rows / replicas` as fast as one thread can; rows a second until all are committed.
fn writers(url: &str, rows: u64, replicas: u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let options = Options {
        dir: dir.path().to_owned(),
        url: Some(LedgerUrl::parse(url).expect("a URL")),
        flush_interval: Duration::from_millis(100),
        max_pending_rows: usize::MAX,
    };
    let meters: Vec<Meter> = (0..replicas)
        .map(|_| Meter::persistent(PriceTable::builtin(), &options).expect("ledger"))
        .collect();
    let keys: Vec<Identity> = (0..10)
        .map(|k| Identity::from_key(format!("sk-proj-bench-key-{k:04}-abcdefghij").as_bytes()))
        .collect();
    let models = ["gpt-4o-mini-2024-07-18", "gpt-4o", "claude-sonnet-4-5"];
    let each = rows / replicas;
    let started = Instant::now();
    std::thread::scope(|s| {
        for meter in &meters {
            let (keys, models) = (&keys, &models);
            s.spawn(move || {
                for i in 0..each {
                    let mut r = Record::ok(
                        &keys[(i % 10) as usize],
                        models[(i % 3) as usize],
                        Some(USAGE),
                    );
                    r.response_id = Some("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT");
                    r.upstream_latency = Some(Duration::from_micros(850));
                    meter.record(&r);
                }
            });
        }
    });
    let recorded = started.elapsed();
    for meter in &meters {
        let ledger = meter.ledger().expect("a ledger");
        while ledger.health().pending_rows > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let committed = started.elapsed();
    let total = each * replicas;
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("db");
    let stored: i64 = client
        .query_one("SELECT count(*) FROM requests", &[])
        .expect("count")
        .get(0);
    let rolled: i64 = client
        .query_one("SELECT sum(requests)::bigint FROM usage_hourly", &[])
        .expect("sum")
        .get(0);
    assert_eq!(
        (stored, rolled),
        (total as i64, total as i64),
        "every row, once"
    );
    for meter in &meters {
        meter.close();
    }
    println!(
        "{replicas} replicas: {total} rows recorded in {:.2} s, all committed after {:.2} s: {:.0} rows/s into one database",
        recorded.as_secs_f64(),
        committed.as_secs_f64(),
        total as f64 / committed.as_secs_f64()
    );
}

/// Fills the ledger to `n` rows over 30 days (20 keys, 10 models, 5 users), then times
/// `/usage?group_by=day,model` through the built binary, against a grouping the rollup cannot
/// answer.
fn history(url: &str, n: u64) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("db");
    llm_meter::meter::ledger::pg::migrate(&mut client).expect("the schema");
    let started = Instant::now();
    let now_us = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_micros(),
    )
    .expect("µs");
    let span: i64 = 30 * 86_400_000_000;
    let n = i64::try_from(n).expect("rows");
    client
        .execute(
            "INSERT INTO names (name) SELECT 'key-' || i FROM generate_series(0, 19) AS i
                UNION SELECT 'sk-…' || i FROM generate_series(0, 19) AS i
                UNION SELECT 'model-' || i FROM generate_series(0, 9) AS i
                UNION VALUES ('openai'), ('openai_chat')
                ON CONFLICT (name) DO NOTHING",
            &[],
        )
        .expect("names");
    client
        .execute(
            "INSERT INTO requests (replica, at, period, key_id, key_label, model, upstream, flavor,
                status, flags, input_tokens, cached_tokens, cache_write_tokens,
                cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_nano_usd, \"user\",
                tags)
             SELECT 42, $1::bigint - $2::bigint + i * ($2::bigint / $3::bigint), 1,
                k.id, l.id, m.id, u.id, f.id, 200, 0, 1000, 200, 0, 0, 300, 0, 5750000,
                'user-' || (i % 5), '{\"team\":\"search\"}'
             FROM generate_series(1, $3::bigint) AS i
             JOIN names k ON k.name = 'key-' || (i % 20)
             JOIN names l ON l.name = 'sk-…' || (i % 20)
             JOIN names m ON m.name = 'model-' || (i % 10)
             JOIN names u ON u.name = 'openai'
             JOIN names f ON f.name = 'openai_chat'",
            &[&now_us, &span, &n],
        )
        .expect("rows");
    client
        .batch_execute(
            "INSERT INTO usage_hourly SELECT replica, at / 3600000000, key_id, model, upstream,
                max(key_label), count(*), sum(error), sum(input_tokens), sum(cached_tokens),
                sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens),
                sum(cost_nano_usd), sum(unpriced), sum(estimated), sum(cache_write_1h_tokens),
                sum(partial)
             FROM request_rows WHERE replica = 42 GROUP BY replica, at / 3600000000, key_id, model, upstream;
             ANALYZE",
        )
        .expect("rollup");
    let filled = started.elapsed();
    let rollup: i64 = client
        .query_one("SELECT count(*) FROM usage_hourly", &[])
        .expect("count")
        .get(0);
    println!(
        "history: {n} rows over 30 days (20 keys, 10 models) written in {:.0} s; {rollup} rollup rows",
        filled.as_secs_f64()
    );
    // The server's data directory lives as long as it does.
    let data = tempfile::tempdir().expect("a temporary directory");
    let (mut child, addr) = binary::start(data.path(), &["--ledger-url", url]);
    for (query, times) in [
        ("/usage?group_by=day,model", 9),
        ("/usage?group_by=day,model&since=7d", 9),
        ("/stats?scope=all", 9),
        ("/usage?group_by=day,user", 1),
    ] {
        let mut took: Vec<f64> = (0..times)
            .map(|_| {
                let started = Instant::now();
                let body = get(addr, query);
                assert!(body.contains("\"requests\""), "{body}");
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        took.sort_by(f64::total_cmp);
        println!(
            "GET {query}: median {:.1} ms, max {:.1} ms over {times}",
            took[times / 2],
            took[times - 1]
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A plain HTTP/1.1 GET; the body.
fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}
