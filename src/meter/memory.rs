//! In-memory store: a read-mostly map of keys to models to atomic counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::RwLock;
use time::OffsetDateTime;

use super::{Counts, KeySnapshot, Snapshot, Store};
use crate::key::Identity;
use crate::meter::pricing::NanoUsd;

/// Totals kept in process memory; lost on restart.
pub struct MemoryStore {
    /// Swapped whole on reset, so a reset never races with a half-applied record.
    period: RwLock<Arc<Period>>,
}

struct Period {
    since: OffsetDateTime,
    keys: RwLock<HashMap<String, Arc<KeyEntry>>>,
}

struct KeyEntry {
    identity: Identity,
    models: RwLock<HashMap<String, Arc<Counters>>>,
}

/// Lock-free counters: recording is a map lookup under a read lock plus `fetch_add`s.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    total_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    cache_write_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    cost_nano_usd: AtomicU64,
    unpriced_requests: AtomicU64,
}

impl Counters {
    fn add(&self, c: &Counts) {
        // Relaxed is enough: each counter is a sum, and readers only need each sum to be exact.
        self.requests.fetch_add(c.requests, Relaxed);
        self.errors.fetch_add(c.errors, Relaxed);
        self.prompt_tokens.fetch_add(c.prompt_tokens, Relaxed);
        self.completion_tokens
            .fetch_add(c.completion_tokens, Relaxed);
        self.total_tokens.fetch_add(c.total_tokens, Relaxed);
        self.cached_tokens.fetch_add(c.cached_tokens, Relaxed);
        self.cache_write_tokens
            .fetch_add(c.cache_write_tokens, Relaxed);
        self.reasoning_tokens.fetch_add(c.reasoning_tokens, Relaxed);
        self.cost_nano_usd.fetch_add(c.cost.0, Relaxed);
        self.unpriced_requests
            .fetch_add(c.unpriced_requests, Relaxed);
    }

    fn load(&self) -> Counts {
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            total_tokens: self.total_tokens.load(Relaxed),
            cached_tokens: self.cached_tokens.load(Relaxed),
            cache_write_tokens: self.cache_write_tokens.load(Relaxed),
            reasoning_tokens: self.reasoning_tokens.load(Relaxed),
            cost: NanoUsd(self.cost_nano_usd.load(Relaxed)),
            unpriced_requests: self.unpriced_requests.load(Relaxed),
        }
    }
}

impl MemoryStore {
    /// An empty store whose period starts now.
    pub fn new() -> Self {
        Self {
            period: RwLock::new(Arc::new(Period::new())),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Period {
    fn new() -> Self {
        Self {
            since: OffsetDateTime::now_utc(),
            keys: RwLock::new(HashMap::new()),
        }
    }

    fn key(&self, identity: &Identity) -> Arc<KeyEntry> {
        if let Some(entry) = self.keys.read().get(&identity.id) {
            return Arc::clone(entry);
        }
        let mut keys = self.keys.write();
        Arc::clone(keys.entry(identity.id.clone()).or_insert_with(|| {
            Arc::new(KeyEntry {
                identity: identity.clone(),
                models: RwLock::new(HashMap::new()),
            })
        }))
    }
}

impl KeyEntry {
    fn model(&self, model: &str) -> Arc<Counters> {
        if let Some(counters) = self.models.read().get(model) {
            return Arc::clone(counters);
        }
        let mut models = self.models.write();
        Arc::clone(models.entry(model.to_owned()).or_default())
    }

    fn snapshot(&self) -> KeySnapshot {
        let models: BTreeMap<String, Counts> = self
            .models
            .read()
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
    fn add(&self, identity: &Identity, model: &str, counts: &Counts) {
        let period = Arc::clone(&self.period.read());
        period.key(identity).model(model).add(counts);
    }

    fn snapshot(&self) -> Snapshot {
        let period = Arc::clone(&self.period.read());
        let entries: Vec<Arc<KeyEntry>> = period.keys.read().values().cloned().collect();
        let mut keys: Vec<KeySnapshot> = entries.iter().map(|e| e.snapshot()).collect();
        keys.sort_by(|a, b| {
            b.totals
                .cost
                .cmp(&a.totals.cost)
                .then_with(|| a.identity.id.cmp(&b.identity.id))
        });
        let mut totals = Counts::default();
        for key in &keys {
            totals += &key.totals;
        }
        Snapshot {
            since: period.since,
            totals,
            keys,
        }
    }

    fn reset(&self) {
        *self.period.write() = Arc::new(Period::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_adds_are_all_counted() {
        let store = Arc::new(MemoryStore::new());
        let one = Counts {
            requests: 1,
            prompt_tokens: 3,
            cost: NanoUsd(7),
            ..Counts::default()
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    for i in 0..10_000 {
                        let id = Identity::from_key(format!("key-{}", (t + i) % 5).as_bytes());
                        store.add(&id, if i % 2 == 0 { "a" } else { "b" }, &one);
                    }
                });
            }
        });
        let snap = store.snapshot();
        assert_eq!(snap.totals.requests, 40_000);
        assert_eq!(snap.totals.prompt_tokens, 120_000);
        assert_eq!(snap.totals.cost, NanoUsd(280_000));
        assert_eq!(snap.keys.len(), 5);
    }
}
