//! In-memory store: one read-mostly map of keys to models to striped atomic counters.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use parking_lot::RwLock;
use time::OffsetDateTime;

use super::{Counts, KeySnapshot, Snapshot, Store, ledger::Restored};
use crate::key::Identity;
use crate::meter::pricing::NanoUsd;

type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Totals kept in process memory; lost on restart.
pub struct MemoryStore {
    /// Read-locked by every record (a lookup and atomic adds), write-locked only to add a new
    /// key or model and to reset, so a reset never splits a record.
    period: RwLock<Period>,
}

struct Period {
    id: u64,
    since: OffsetDateTime,
    keys: Map<KeyEntry>,
    /// Every key summed per upstream: few entries, one more atomic add per record.
    upstreams: Map<Counters>,
}

struct KeyEntry {
    identity: Identity,
    models: Map<Counters>,
}

/// Counters of one (key, model), split into cache-line-sized stripes so that threads recording
/// the same entry at once add to different lines instead of fighting over one.
struct Counters {
    stripes: [Stripe; STRIPES],
}

const STRIPES: usize = 4;

#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    cache_write_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    cost_nano_usd: AtomicU64,
    unpriced_requests: AtomicU64,
    estimated_requests: AtomicU64,
}

/// Each thread sticks to one stripe, handed out round-robin.
fn stripe_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Relaxed) % STRIPES);
        }
        s.get()
    })
}

impl Counters {
    fn new() -> Self {
        Self {
            stripes: Default::default(),
        }
    }

    fn add(&self, c: &Counts) {
        // Relaxed is enough: each counter is a sum, and readers only need each sum to be exact.
        let s = &self.stripes[stripe_of_this_thread()];
        s.requests.fetch_add(c.requests, Relaxed);
        s.errors.fetch_add(c.errors, Relaxed);
        s.prompt_tokens.fetch_add(c.prompt_tokens, Relaxed);
        s.completion_tokens.fetch_add(c.completion_tokens, Relaxed);
        s.cached_tokens.fetch_add(c.cached_tokens, Relaxed);
        s.cache_write_tokens
            .fetch_add(c.cache_write_tokens, Relaxed);
        s.reasoning_tokens.fetch_add(c.reasoning_tokens, Relaxed);
        s.cost_nano_usd.fetch_add(c.cost.0, Relaxed);
        s.unpriced_requests.fetch_add(c.unpriced_requests, Relaxed);
        if c.estimated_requests > 0 {
            s.estimated_requests
                .fetch_add(c.estimated_requests, Relaxed);
        }
    }

    fn load(&self) -> Counts {
        let mut total = Counts::default();
        for s in &self.stripes {
            let c = Counts {
                requests: s.requests.load(Relaxed),
                errors: s.errors.load(Relaxed),
                prompt_tokens: s.prompt_tokens.load(Relaxed),
                completion_tokens: s.completion_tokens.load(Relaxed),
                total_tokens: 0,
                cached_tokens: s.cached_tokens.load(Relaxed),
                cache_write_tokens: s.cache_write_tokens.load(Relaxed),
                reasoning_tokens: s.reasoning_tokens.load(Relaxed),
                cost: NanoUsd(s.cost_nano_usd.load(Relaxed)),
                unpriced_requests: s.unpriced_requests.load(Relaxed),
                estimated_requests: s.estimated_requests.load(Relaxed),
            };
            total += &c;
        }
        total.total_tokens = total.prompt_tokens + total.completion_tokens;
        total
    }
}

impl MemoryStore {
    fn snapshot_of(period: &Period) -> Snapshot {
        let keys: Vec<KeySnapshot> = period.keys.values().map(KeyEntry::snapshot).collect();
        let upstreams = period
            .upstreams
            .iter()
            .map(|(name, counters)| (name.clone(), counters.load()))
            .collect();
        Snapshot::from_keys(period.since, keys, upstreams)
    }

    /// An empty store whose period starts now.
    pub fn new() -> Self {
        Self {
            period: RwLock::new(Period::new(1)),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Period {
    fn new(id: u64) -> Self {
        Self {
            id,
            since: super::ledger::now(),
            keys: Map::default(),
            upstreams: Map::default(),
        }
    }

    /// Adds to the entries, creating those that are missing (under the write lock).
    fn insert(&mut self, identity: &Identity, model: &str, upstream: &str, counts: &Counts) {
        let key = self
            .keys
            .entry(identity.id.clone())
            .or_insert_with(|| KeyEntry {
                identity: identity.clone(),
                models: Map::default(),
            });
        key.models
            .entry(model.to_owned())
            .or_insert_with(Counters::new)
            .add(counts);
        self.upstreams
            .entry(upstream.to_owned())
            .or_insert_with(Counters::new)
            .add(counts);
    }
}

impl KeyEntry {
    fn snapshot(&self) -> KeySnapshot {
        let models: BTreeMap<String, Counts> = self
            .models
            .iter()
            .map(|(name, counters)| (name.clone(), counters.load()))
            .collect();
        let mut totals = Counts::default();
        for counts in models.values() {
            totals += counts;
        }
        KeySnapshot {
            identity: self.identity.clone(),
            totals,
            models,
        }
    }
}

impl Store for MemoryStore {
    fn add(&self, identity: &Identity, model: &str, upstream: &str, counts: &Counts) -> u64 {
        {
            let period = self.period.read();
            let entry = period
                .keys
                .get(&identity.id)
                .and_then(|key| key.models.get(model));
            if let (Some(entry), Some(total)) = (entry, period.upstreams.get(upstream)) {
                entry.add(counts);
                total.add(counts);
                return period.id;
            }
        }
        // First request of this key, model or upstream: insert under the write lock (rare).
        let mut period = self.period.write();
        period.insert(identity, model, upstream, counts);
        period.id
    }

    fn snapshot(&self) -> Snapshot {
        Self::snapshot_of(&self.period.read())
    }

    fn reset(&self, started: &mut dyn FnMut(u64, OffsetDateTime)) -> Snapshot {
        let mut period = self.period.write();
        let next = Period::new(period.id + 1);
        started(next.id, next.since);
        let closed = std::mem::replace(&mut *period, next);
        drop(period);
        Self::snapshot_of(&closed)
    }

    fn restore(&self, restored: Restored) {
        let mut period = Period {
            id: restored.period,
            since: restored.since,
            keys: Map::default(),
            upstreams: Map::default(),
        };
        for (identity, model, counts) in restored.totals {
            let key = period
                .keys
                .entry(identity.id.clone())
                .or_insert_with(|| KeyEntry {
                    identity,
                    models: Map::default(),
                });
            key.models
                .entry(model)
                .or_insert_with(Counters::new)
                .add(&counts);
        }
        for (upstream, counts) in restored.upstreams {
            period
                .upstreams
                .entry(upstream)
                .or_insert_with(Counters::new)
                .add(&counts);
        }
        *self.period.write() = period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_adds_are_all_counted() {
        let store = Arc::new(MemoryStore::new());
        let one = Counts {
            requests: 1,
            prompt_tokens: 3,
            completion_tokens: 2,
            cost: NanoUsd(7),
            ..Counts::default()
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    for i in 0..10_000 {
                        let id = Identity::from_key(format!("key-{}", (t + i) % 5).as_bytes());
                        store.add(&id, if i % 2 == 0 { "a" } else { "b" }, "openai", &one);
                    }
                });
            }
        });
        let snap = store.snapshot();
        assert_eq!(snap.totals.requests, 40_000);
        assert_eq!(snap.totals.prompt_tokens, 120_000);
        assert_eq!(snap.totals.total_tokens, 200_000);
        assert_eq!(snap.totals.cost, NanoUsd(280_000));
        assert_eq!(snap.keys.len(), 5);
        assert_eq!(snap.upstreams["openai"], snap.totals);
    }
}
