//! In-memory store: one read-mostly map of keys to models to atomic counters, bounded in the
//! number of keys and models it tracks one by one.
//!
//! Any client can send a key or a model name never seen before, so the entries are bounded:
//! past `max_tracked_keys`, new keys count into one `other` entry, and past a key's model bound
//! (or the store's), its new models count into its `other` model. Totals stay exact; the ledger
//! keeps every row, so history still shows each key. An entry starts as one set of counters and
//! takes cache-line-sized stripes only once it is busy, so a cold key costs a few hundred bytes.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use parking_lot::RwLock;
use time::OffsetDateTime;

use super::{Counts, KeySnapshot, Snapshot, Store, ledger::Restored};
use crate::key::Identity;
use crate::money::NanoUsd;

type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The model entry that counts a key's models past its bound.
pub const OTHER_MODELS: &str = "other";

/// How many entries the store tracks one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Keys tracked one by one; past it, new keys count into `other` (one entry more).
    pub max_keys: usize,
    /// Models tracked one by one under a key; past it, new ones count into its `other`.
    pub max_models_per_key: usize,
}

impl Bounds {
    /// (key, model) entries in all: a few models a key on average, however they are spread.
    fn max_entries(self) -> usize {
        self.max_keys.saturating_mul(4).max(self.max_models_per_key)
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_keys: 10_000,
            max_models_per_key: 100,
        }
    }
}

/// Totals kept in process memory; lost on restart.
pub struct MemoryStore {
    /// Read-locked by every record (a lookup and atomic adds), write-locked only to add a new
    /// key or model and to reset, so a reset never splits a record.
    period: RwLock<Period>,
    bounds: Bounds,
}

struct Period {
    id: u64,
    since: OffsetDateTime,
    keys: Map<KeyEntry>,
    /// (key, model) entries, `other` ones included.
    entries: usize,
    /// Every key summed per upstream: few entries, one more atomic add per record.
    upstreams: Map<Box<Counters>>,
}

struct KeyEntry {
    identity: Identity,
    models: Map<Box<Counters>>,
}

/// Counters of one (key, model). Threads recording the same busy entry at once would fight over
/// one cache line, so a busy entry adds to stripes of their own lines instead, one per thread;
/// a quiet one (most of them, with many keys) never pays for the stripes.
struct Counters {
    first: Stripe,
    busy: OnceLock<Box<[Aligned; STRIPES]>>,
}

const STRIPES: usize = 4;
/// Requests an entry counts on its first stripe before it takes the others.
const BUSY_AFTER: u64 = 256;

#[derive(Default)]
struct Stripe {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    cache_write_tokens: AtomicU64,
    cache_write_1h_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    cost_nano_usd: AtomicU64,
    unpriced_requests: AtomicU64,
    estimated_requests: AtomicU64,
}

/// A stripe alone on its cache lines (two: adjacent-line prefetching pairs them).
#[derive(Default)]
#[repr(align(128))]
struct Aligned(Stripe);

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

impl Stripe {
    fn add(&self, c: &Counts) -> u64 {
        // Relaxed is enough: each counter is a sum, and readers only need each sum to be exact.
        let before = self.requests.fetch_add(c.requests, Relaxed);
        self.errors.fetch_add(c.errors, Relaxed);
        self.prompt_tokens.fetch_add(c.prompt_tokens, Relaxed);
        self.completion_tokens
            .fetch_add(c.completion_tokens, Relaxed);
        self.cached_tokens.fetch_add(c.cached_tokens, Relaxed);
        self.cache_write_tokens
            .fetch_add(c.cache_write_tokens, Relaxed);
        // Most requests write no 1-hour cache: skip the atomic add, as for estimates below.
        if c.cache_write_1h_tokens > 0 {
            self.cache_write_1h_tokens
                .fetch_add(c.cache_write_1h_tokens, Relaxed);
        }
        self.reasoning_tokens.fetch_add(c.reasoning_tokens, Relaxed);
        self.cost_nano_usd.fetch_add(c.cost.0, Relaxed);
        self.unpriced_requests
            .fetch_add(c.unpriced_requests, Relaxed);
        if c.estimated_requests > 0 {
            self.estimated_requests
                .fetch_add(c.estimated_requests, Relaxed);
        }
        before
    }

    fn load(&self) -> Counts {
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            total_tokens: 0,
            cached_tokens: self.cached_tokens.load(Relaxed),
            cache_write_tokens: self.cache_write_tokens.load(Relaxed),
            cache_write_1h_tokens: self.cache_write_1h_tokens.load(Relaxed),
            reasoning_tokens: self.reasoning_tokens.load(Relaxed),
            cost: NanoUsd(self.cost_nano_usd.load(Relaxed)),
            unpriced_requests: self.unpriced_requests.load(Relaxed),
            estimated_requests: self.estimated_requests.load(Relaxed),
        }
    }
}

impl Counters {
    fn new() -> Box<Self> {
        Box::new(Self {
            first: Stripe::default(),
            busy: OnceLock::new(),
        })
    }

    fn add(&self, c: &Counts) {
        if let Some(stripes) = self.busy.get() {
            stripes[stripe_of_this_thread()].0.add(c);
            return;
        }
        if self.first.add(c) >= BUSY_AFTER {
            self.busy.get_or_init(Default::default);
        }
    }

    fn load(&self) -> Counts {
        let mut total = self.first.load();
        for s in self
            .busy
            .get()
            .into_iter()
            .flat_map(|stripes| stripes.iter())
        {
            total += &s.0.load();
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

    /// An empty store whose period starts now, with the default bounds.
    pub fn new() -> Self {
        Self::with_bounds(Bounds::default())
    }

    /// An empty store whose period starts now, tracking at most `bounds` entries one by one.
    pub fn with_bounds(bounds: Bounds) -> Self {
        Self {
            period: RwLock::new(Period::new(1)),
            bounds: Bounds {
                max_keys: bounds.max_keys.max(1),
                max_models_per_key: bounds.max_models_per_key.max(1),
            },
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
            entries: 0,
            upstreams: Map::default(),
        }
    }

    /// The entry a record of (key, model) adds to, if it exists: its own, or the `other` one
    /// it falls into when the bounds are reached.
    fn existing(&self, id: &str, model: &str, bounds: Bounds) -> Option<&Counters> {
        let key = match self.keys.get(id) {
            Some(key) => key,
            None if self.keys.len() >= bounds.max_keys => self.keys.get(crate::key::OTHER_KEYS)?,
            None => return None,
        };
        match key.models.get(model) {
            Some(counters) => Some(counters),
            None if key.models.len() >= bounds.max_models_per_key
                || self.entries >= bounds.max_entries() =>
            {
                key.models.get(OTHER_MODELS).map(|c| &**c)
            }
            None => None,
        }
    }

    /// Adds to the entries, creating those that are missing (under the write lock), within the
    /// bounds.
    fn insert(
        &mut self,
        identity: &Identity,
        model: &str,
        upstream: &str,
        counts: &Counts,
        bounds: Bounds,
    ) {
        self.entry(identity, model, bounds).add(counts);
        self.upstreams
            .entry(upstream.to_owned())
            .or_insert_with(Counters::new)
            .add(counts);
    }

    /// The entry of (key, model), created if missing: its own within the bounds, else the
    /// `other` one it falls into.
    fn entry(&mut self, identity: &Identity, model: &str, bounds: Bounds) -> &Counters {
        let is_tracked = self.keys.contains_key(&identity.id) || self.keys.len() < bounds.max_keys;
        let other_keys;
        let identity = if is_tracked {
            identity
        } else {
            other_keys = Identity::other_keys();
            &other_keys
        };
        let is_full = self.entries >= bounds.max_entries();
        let key = self
            .keys
            .entry(identity.id.clone())
            .or_insert_with(|| KeyEntry {
                identity: identity.clone(),
                models: Map::default(),
            });
        let model = if key.models.contains_key(model)
            || (key.models.len() < bounds.max_models_per_key && !is_full)
        {
            model
        } else {
            OTHER_MODELS
        };
        let entries = &mut self.entries;
        key.models.entry(model.to_owned()).or_insert_with(|| {
            *entries += 1;
            Counters::new()
        })
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
    fn add(
        &self,
        identity: &Identity,
        model: &str,
        upstream: &str,
        counts: &Counts,
        counted: &mut dyn FnMut(u64),
    ) {
        {
            let period = self.period.read();
            let entry = period.existing(&identity.id, model, self.bounds);
            if let (Some(entry), Some(total)) = (entry, period.upstreams.get(upstream)) {
                counted(period.id);
                entry.add(counts);
                total.add(counts);
                return;
            }
        }
        // First request of this key, model or upstream: insert under the write lock (rare, and
        // at most once per entry: past the bounds, records land on an existing `other` entry).
        let mut period = self.period.write();
        counted(period.id);
        period.insert(identity, model, upstream, counts, self.bounds);
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
            entries: 0,
            upstreams: Map::default(),
        };
        // The biggest spenders keep entries of their own when the bounds are reached.
        let mut spend: HashMap<&str, u64> = HashMap::new();
        for (identity, _, counts) in &restored.totals {
            *spend.entry(identity.id.as_str()).or_default() += counts.cost.0;
        }
        let mut order: Vec<usize> = (0..restored.totals.len()).collect();
        order.sort_by_key(|&i| {
            let (identity, model, counts) = &restored.totals[i];
            (
                std::cmp::Reverse(spend.get(identity.id.as_str()).copied().unwrap_or(0)),
                identity.id.as_str(),
                std::cmp::Reverse(counts.cost.0),
                model.as_str(),
            )
        });
        for i in order {
            let (identity, model, counts) = &restored.totals[i];
            period.entry(identity, model, self.bounds).add(counts);
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
                        store.add(
                            &id,
                            if i % 2 == 0 { "a" } else { "b" },
                            "openai",
                            &one,
                            &mut |_| {},
                        );
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

    fn one_request() -> Counts {
        Counts {
            requests: 1,
            prompt_tokens: 10,
            completion_tokens: 5,
            cost: NanoUsd(100),
            ..Counts::default()
        }
    }

    #[test]
    fn keys_past_the_bound_count_into_other_and_totals_stay_exact() {
        let store = MemoryStore::with_bounds(Bounds {
            max_keys: 3,
            max_models_per_key: 2,
        });
        for i in 0..10 {
            let id = Identity::from_key(format!("sk-random-{i}").as_bytes());
            store.add(&id, "gpt-4o", "openai", &one_request(), &mut |_| {});
        }
        let first = Identity::from_key(b"sk-random-0");
        for model in ["a", "b", "c", "d"] {
            store.add(&first, model, "openai", &one_request(), &mut |_| {});
        }
        let snap = store.snapshot();
        assert_eq!(snap.totals.requests, 14);
        assert_eq!(snap.totals.cost, NanoUsd(1_400));
        // Three keys of their own, then `other` for the seven more.
        assert_eq!(snap.keys.len(), 4);
        let other = snap.keys.iter().find(|k| k.identity.id == "other").unwrap();
        assert_eq!(other.totals.requests, 7);
        let first = snap
            .keys
            .iter()
            .find(|k| k.identity.id == first.id)
            .unwrap();
        assert_eq!(first.models.len(), 3);
        assert_eq!(first.models["gpt-4o"].requests, 1);
        assert_eq!(first.models[OTHER_MODELS].requests, 3);
    }

    #[test]
    fn a_restore_keeps_the_biggest_spenders_within_the_bounds() {
        let store = MemoryStore::with_bounds(Bounds {
            max_keys: 2,
            max_models_per_key: 10,
        });
        let totals = (0..5u64)
            .map(|i| {
                let counts = Counts {
                    cost: NanoUsd(i * 1_000),
                    ..one_request()
                };
                (
                    Identity::from_key(format!("sk-{i}").as_bytes()),
                    "gpt-4o".to_owned(),
                    counts,
                )
            })
            .collect();
        store.restore(Restored {
            period: 3,
            since: super::super::ledger::now(),
            totals,
            upstreams: vec![("openai".into(), one_request())],
        });
        let snap = store.snapshot();
        assert_eq!(snap.totals.requests, 5);
        let ids: Vec<&str> = snap.keys.iter().map(|k| k.identity.id.as_str()).collect();
        assert!(
            ids.contains(&Identity::from_key(b"sk-4").id.as_str()),
            "{ids:?}"
        );
        assert!(ids.contains(&"other"), "{ids:?}");
        assert_eq!(snap.keys.len(), 3);
    }

    #[test]
    fn a_busy_entry_takes_its_stripes_and_loses_nothing() {
        let counters = Counters::new();
        for _ in 0..1_000 {
            counters.add(&one_request());
        }
        assert!(counters.busy.get().is_some());
        assert_eq!(counters.load().requests, 1_000);
        assert_eq!(counters.load().total_tokens, 15_000);
    }
}
