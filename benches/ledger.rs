//! Ledger benchmark: what recording costs with the ledger on, how fast the writer commits, and
//! how long a restart over a million rows takes until the server answers.
//!
//! `cargo bench --bench ledger` (`-- --rows 1000000` by default).

use std::time::{Duration, Instant};

#[path = "common/binary.rs"]
mod binary;
#[path = "common/usage.rs"]
mod usage;

use llm_meter::key::Identity;
use llm_meter::meter::ledger::Options;
use llm_meter::meter::pricing::PriceTable;
use llm_meter::meter::{Meter, Record};
use usage::USAGE;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: u64 = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let options = Options {
        dir: dir.path().to_owned(),
        url: None,
        flush_interval: Duration::from_millis(100),
        max_pending_rows: 100_000,
    };
    let keys: Vec<Identity> = (0..10)
        .map(|k| Identity::from_key(format!("sk-proj-bench-key-{k:04}-abcdefghij").as_bytes()))
        .collect();
    let models = ["gpt-4o-mini-2024-07-18", "gpt-4o", "claude-sonnet-4-5"];
    let record = |meter: &Meter, i: u64| {
        let mut r = Record::ok(
            &keys[(i % 10) as usize],
            models[(i % 3) as usize],
            Some(USAGE),
        );
        r.response_id = Some("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT");
        r.upstream_latency = Some(Duration::from_micros(850));
        meter.record(&r);
    };

    println!("llm-meter ledger benchmark: {rows} rows, 10 keys x 3 models");
    let memory = Meter::in_memory(PriceTable::builtin());
    let started = Instant::now();
    for i in 0..rows {
        record(&memory, i);
    }
    let in_memory = started.elapsed();

    let meter = Meter::persistent(PriceTable::builtin(), &options).expect("ledger");
    let started = Instant::now();
    // As fast as one thread can: the writer commits while recording goes on.
    for i in 0..rows {
        record(&meter, i);
    }
    let appended = started.elapsed();
    let ledger = meter.ledger().expect("a ledger");
    while ledger.health().pending_rows > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let committed = started.elapsed();
    // Both writer threads: recording this fast makes a backlog, which the normal-priority one takes.
    let writer_cpu = thread_cpu("ledger-");
    meter.close();
    let per = |d: Duration| d.as_nanos() as f64 / rows as f64;
    println!(
        "record, in memory only: {:.0} ns per request",
        per(in_memory)
    );
    println!(
        "record, with the ledger: {:.0} ns per request on the request path (+{:.0} ns: queueing the row)",
        per(appended),
        per(appended) - per(in_memory)
    );
    println!(
        "writer: all {rows} rows committed {:.2} s after the first ({:.0} rows/s), {:.2} µs of CPU per row; file {:.1} MB",
        committed.as_secs_f64(),
        rows as f64 / committed.as_secs_f64(),
        writer_cpu.as_secs_f64() * 1e6 / rows as f64,
        size_mb(dir.path())
    );
    drop(meter);

    let started = Instant::now();
    let meter = Meter::persistent(PriceTable::builtin(), &options).expect("reopen");
    let reopened = started.elapsed();
    let requests = meter.snapshot().totals.requests;
    assert_eq!(requests, rows, "restored totals");
    meter.close();
    drop(meter);
    println!(
        "restart, in process: ledger opened and totals of {requests} rows restored in {:.1} ms",
        reopened.as_secs_f64() * 1000.0
    );

    let (spawn_to_banner, spawn_to_health) = binary_start(dir.path());
    println!(
        "restart, the binary: listening {:.1} ms after exec, /healthz answered at {:.1} ms",
        spawn_to_banner.as_secs_f64() * 1000.0,
        spawn_to_health.as_secs_f64() * 1000.0
    );
}

/// Starts the built binary on the ledger and times its startup line and first /healthz answer.
fn binary_start(data: &std::path::Path) -> (Duration, Duration) {
    let started = Instant::now();
    let (mut child, addr) = binary::start(data, &[]);
    let banner = started.elapsed();
    let healthy = loop {
        if llm_meter::api::probe_health(addr, Duration::from_secs(1)).is_ok() {
            break started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    (banner, healthy)
}

/// CPU time (user + system) of this process's threads whose names start with `name`.
fn thread_cpu(name: &str) -> Duration {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !comm.trim().starts_with(name) {
                return None;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                .sum();
            Some(Duration::from_secs_f64(ticks as f64 / ticks_per_second))
        })
        .sum()
}

fn size_mb(dir: &std::path::Path) -> f64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len() as f64)
                .sum::<f64>()
        })
        .unwrap_or(0.0)
        / 1e6
}
