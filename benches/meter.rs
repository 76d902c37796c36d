//! Micro-benchmarks of the meter's record path: one thread, and two threads on the same entry.

use std::time::{Duration, Instant};

#[path = "common/usage.rs"]
mod usage;

use criterion::{Criterion, criterion_group, criterion_main};
use llm_meter::key::Identity;
use llm_meter::meter::pricing::PriceTable;
use llm_meter::meter::{Meter, Record};
use usage::USAGE;

fn record(meter: &Meter, identity: &Identity, model: &str) {
    meter.record(&Record::ok(identity, model, Some(USAGE)));
}

fn record_path(c: &mut Criterion) {
    let meter = Meter::in_memory(PriceTable::builtin());
    let identity = Identity::from_key(b"sk-proj-bench-0123456789abcdefghij");
    let mut group = c.benchmark_group("record");
    group.bench_function("single thread", |b| {
        b.iter(|| record(&meter, &identity, "gpt-4o-mini-2024-07-18"))
    });
    group.bench_function("two threads, same key and model", |b| {
        b.iter_custom(|iterations| contended(&meter, &identity, iterations, true));
    });
    group.bench_function("two threads, different keys", |b| {
        b.iter_custom(|iterations| contended(&meter, &identity, iterations, false));
    });
    group.finish();
}

/// Time per record when two threads record at once (the total wall time for `iterations` records each).
fn contended(meter: &Meter, identity: &Identity, iterations: u64, same_key: bool) -> Duration {
    let other = Identity::from_key(b"sk-proj-bench-other-0123456789abcd");
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| (0..iterations).for_each(|_| record(meter, identity, "gpt-4o-mini-2024-07-18")));
        let second = if same_key { identity } else { &other };
        s.spawn(move || {
            (0..iterations).for_each(|_| record(meter, second, "gpt-4o-mini-2024-07-18"))
        });
    });
    started.elapsed()
}

criterion_group!(benches, record_path);
criterion_main!(benches);
