//! Metering: prices each finished request and adds it to per-key, per-model totals.

pub mod ledger;
pub mod memory;
pub mod pricing;

use std::collections::{BTreeMap, HashMap};
use std::ops::AddAssign;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use time::OffsetDateTime;

use crate::attribution::Attribution;
use crate::key::Identity;
use crate::usage::{Flavor, ServiceTier, Usage};
use ledger::{Ledger, LedgerError, Row};
use pricing::{NanoUsd, PriceTable, Resolved};

/// Model name recorded when neither the response nor the request named one.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The counters kept for every (key, model) pair, and summed for keys and totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests seen.
    pub requests: u64,
    /// Requests that did not end in a complete 2xx response.
    pub errors: u64,
    /// Input tokens: uncached + cached + cache writes.
    pub prompt_tokens: u64,
    /// Output tokens, reasoning included.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Input tokens read from the provider's cache.
    pub cached_tokens: u64,
    /// Input tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    /// The part of `cache_write_tokens` written for an hour (Anthropic's 1-hour TTL).
    pub cache_write_1h_tokens: u64,
    /// Output tokens spent reasoning.
    pub reasoning_tokens: u64,
    /// Cost at the prices in force when each request was recorded.
    pub cost: NanoUsd,
    /// Requests whose model has no price: their tokens are counted, their cost is not known.
    pub unpriced_requests: u64,
    /// Requests whose tokens were counted by a tokenizer because the provider reported none.
    pub estimated_requests: u64,
}

impl AddAssign<&Counts> for Counts {
    fn add_assign(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cached_tokens += other.cached_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.cache_write_1h_tokens += other.cache_write_1h_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.cost.0 += other.cost.0;
        self.unpriced_requests += other.unpriced_requests;
        self.estimated_requests += other.estimated_requests;
    }
}

impl Counts {
    /// The counts of one request with these tokens and this cost.
    pub fn of_request(usage: &Usage, cost: NanoUsd, flags: Flags) -> Self {
        Self {
            requests: 1,
            errors: u64::from(flags.is_error),
            prompt_tokens: usage.prompt_tokens(),
            completion_tokens: usage.output_tokens,
            total_tokens: usage.total_tokens(),
            cached_tokens: usage.cached_input_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            cache_write_1h_tokens: usage.cache_write_1h_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost,
            unpriced_requests: u64::from(flags.is_unpriced),
            estimated_requests: u64::from(flags.is_estimated),
        }
    }
}

/// What a request's counts say besides its tokens and cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// It did not end in a complete 2xx response.
    pub is_error: bool,
    /// Its model has no price.
    pub is_unpriced: bool,
    /// Its tokens were estimated.
    pub is_estimated: bool,
}

/// One finished request, as the proxy hands it to the meter.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Who made it.
    pub identity: &'a Identity,
    /// The response's model, else the request's, else `UNKNOWN_MODEL`.
    pub model: &'a str,
    /// Tokens reported, if any.
    pub usage: Option<Usage>,
    /// The request did not end in a complete 2xx response.
    pub is_error: bool,
    /// The API flavor of the route.
    pub flavor: Flavor,
    /// HTTP status the client got.
    pub status: u16,
    /// A streamed response.
    pub is_streaming: bool,
    /// Time until the upstream's response headers, when there was a response.
    pub upstream_latency: Option<Duration>,
    /// The upstream's response id, when it sent one.
    pub response_id: Option<&'a str>,
    /// The response did not arrive whole.
    pub is_partial: bool,
    /// The usage was counted by a tokenizer: the provider reported none.
    pub is_estimated: bool,
    /// The name of the upstream it went to (`openai`, `anthropic`, or a declared one).
    pub upstream: &'a str,
    /// The part of `usage` that was audio: priced at the price's audio rates, or, when it has
    /// none, left out of the cost and the request flagged unpriced.
    pub audio: Usage,
    /// The service tier the response reported (`Standard` when it said none).
    pub service_tier: ServiceTier,
    /// The user, session and tags it is for: ledger columns, never in-memory totals.
    pub attribution: &'a Attribution,
}

/// The attribution of a record that has none.
static NO_ATTRIBUTION: Attribution = Attribution::NONE;

impl<'a> Record<'a> {
    /// A complete, successful, non-streamed chat request: the common case, for tests and benchmarks.
    pub fn ok(identity: &'a Identity, model: &'a str, usage: Option<Usage>) -> Self {
        Self {
            identity,
            model,
            usage,
            is_error: false,
            flavor: Flavor::OpenAiChat,
            status: 200,
            is_streaming: false,
            upstream_latency: None,
            response_id: None,
            is_partial: false,
            is_estimated: false,
            upstream: crate::config::OPENAI,
            audio: Usage::default(),
            service_tier: ServiceTier::Standard,
            attribution: &NO_ATTRIBUTION,
        }
    }
}

/// The result of recording: what the request cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// The cost; zero when unpriced.
    pub cost: NanoUsd,
    /// False when the model had no price (and there were tokens to price).
    pub is_priced: bool,
    /// Which price it took: its source, entry, and the tier or long-context rate when not the
    /// standard one (`built-in 2026-12-06: gemini-2.5-pro, above 200k`).
    pub source: Option<Arc<str>>,
}

/// Where the live totals of the current period are kept.
pub trait Store: Send + Sync {
    /// Adds one request's counts to its (key, model) entry and to its upstream's totals.
    /// `counted` is called once, with the period the request counts in, before the totals
    /// show it and while no reset can slip in: the ledger's row is queued there, so a request
    /// the totals show is one a history query waits for.
    fn add(
        &self,
        identity: &Identity,
        model: &str,
        upstream: &str,
        counts: &Counts,
        counted: &mut dyn FnMut(u64),
    );
    /// All totals of the current period.
    fn snapshot(&self) -> Snapshot;
    /// Starts a new period with zeroed totals and returns the one it closed. `started` is
    /// called with the new period's number and start while no record can slip in between.
    fn reset(&self, started: &mut dyn FnMut(u64, OffsetDateTime)) -> Snapshot;
    /// Replaces the current period with one read back from the ledger.
    fn restore(&self, restored: ledger::Restored);
}

/// Totals of one period, per key and per model within a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// When the period started (start-up or the last reset).
    pub since: OffsetDateTime,
    /// Every key summed.
    pub totals: Counts,
    /// One entry per key, most expensive first.
    pub keys: Vec<KeySnapshot>,
    /// Every key summed per upstream (`openai`, `anthropic`, declared ones).
    pub upstreams: BTreeMap<String, Counts>,
}

impl Snapshot {
    /// Builds a snapshot from (key, model, counts) entries: keys most expensive first.
    pub fn collect(
        since: OffsetDateTime,
        entries: impl IntoIterator<Item = (Identity, String, Counts)>,
        upstreams: BTreeMap<String, Counts>,
    ) -> Self {
        let mut by_key: HashMap<String, KeySnapshot> = HashMap::new();
        for (identity, model, counts) in entries {
            let key = by_key
                .entry(identity.id.clone())
                .or_insert_with(|| KeySnapshot {
                    identity,
                    totals: Counts::default(),
                    models: BTreeMap::new(),
                });
            key.totals += &counts;
            *key.models.entry(model).or_default() += &counts;
        }
        Self::from_keys(since, by_key.into_values().collect(), upstreams)
    }

    /// Orders the keys (most expensive first, then by id) and sums them.
    pub fn from_keys(
        since: OffsetDateTime,
        mut keys: Vec<KeySnapshot>,
        upstreams: BTreeMap<String, Counts>,
    ) -> Self {
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
        Self {
            since,
            totals,
            keys,
            upstreams,
        }
    }
}

/// One key's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The key's identity.
    pub identity: Identity,
    /// The key's models summed.
    pub totals: Counts,
    /// Per model.
    pub models: BTreeMap<String, Counts>,
}

/// Prices finished requests and keeps their totals (and, with a ledger, every request).
pub struct Meter {
    store: Box<dyn Store>,
    ledger: Option<Ledger>,
    prices: RwLock<Arc<PriceTable>>,
    /// Upstream, then model name, to its price as resolved the first time, so names are
    /// normalized once.
    resolved: RwLock<Resolutions>,
    /// Requests being estimated on a blocking thread, not yet recorded: `close` waits for them.
    estimating: Arc<AtomicUsize>,
}

type ModelCache = HashMap<Box<str>, Option<Resolved>, foldhash::fast::RandomState>;

/// Names resolved against the table of one generation (a reload starts the next).
#[derive(Default)]
struct Resolutions {
    generation: u64,
    pairs: HashMap<Box<str>, ModelCache, foldhash::fast::RandomState>,
    count: usize,
}

/// Marks one estimate in progress until dropped.
pub struct Estimating(Arc<AtomicUsize>);

impl Drop for Estimating {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Longest `close` waits for estimates still running.
const ESTIMATES_GRACE: Duration = Duration::from_secs(5);

/// Distinct model names whose resolution is remembered; past it, names are resolved each time.
const RESOLVED_CAP: usize = 4096;

impl Meter {
    /// A meter over the given store and price table.
    pub fn new(store: Box<dyn Store>, prices: PriceTable) -> Self {
        Self {
            store,
            ledger: None,
            prices: RwLock::new(Arc::new(prices)),
            resolved: RwLock::new(Resolutions::default()),
            estimating: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// An in-memory meter with the default bounds.
    pub fn in_memory(prices: PriceTable) -> Self {
        Self::in_memory_within(prices, memory::Bounds::default())
    }

    /// An in-memory meter tracking at most `bounds` keys and models one by one.
    pub fn in_memory_within(prices: PriceTable, bounds: memory::Bounds) -> Self {
        Self::new(Box::new(memory::MemoryStore::with_bounds(bounds)), prices)
    }

    /// An in-memory meter (default bounds) that also writes every request to the ledger.
    pub fn persistent(prices: PriceTable, options: &ledger::Options) -> Result<Self, LedgerError> {
        Self::persistent_within(prices, options, memory::Bounds::default())
    }

    /// An in-memory meter within `bounds` that also writes every request to the ledger, its
    /// totals restored from the ledger's current period.
    pub fn persistent_within(
        prices: PriceTable,
        options: &ledger::Options,
        bounds: memory::Bounds,
    ) -> Result<Self, LedgerError> {
        let (ledger, restored) = Ledger::open(options)?;
        let store = memory::MemoryStore::with_bounds(bounds);
        store.restore(restored);
        let mut meter = Self::new(Box::new(store), prices);
        meter.ledger = Some(ledger);
        Ok(meter)
    }

    /// The ledger, when requests are persisted.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Prices one request and adds it to the totals; never fails.
    pub fn record(&self, record: &Record<'_>) -> Priced {
        let usage = record.usage.unwrap_or_default();
        let priced = self.price(record, &usage);
        let flags = Flags {
            is_error: record.is_error,
            is_unpriced: !priced.is_priced,
            is_estimated: record.is_estimated,
        };
        let counts = Counts::of_request(&usage, priced.cost, flags);
        self.store.add(
            record.identity,
            record.model,
            record.upstream,
            &counts,
            &mut |period| self.append_row(record, period, usage, &priced, flags),
        );
        priced
    }

    /// Records `record` as its row in the ledger, when there is one.
    fn append_row(
        &self,
        record: &Record<'_>,
        period: u64,
        usage: Usage,
        priced: &Priced,
        flags: Flags,
    ) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let attribution = record.attribution;
        let tags = attribution.tags_json();
        ledger.append(&Row {
            at: ledger::now(),
            period,
            key_id: record.identity.id.as_str(),
            key_label: record.identity.label.as_str(),
            model: record.model,
            upstream: record.upstream,
            flavor: record.flavor.as_str(),
            status: record.status,
            is_streaming: record.is_streaming,
            usage,
            cost: priced.cost,
            latency: record.upstream_latency,
            response_id: record.response_id,
            is_error: flags.is_error,
            is_unpriced: flags.is_unpriced,
            is_estimated: flags.is_estimated,
            is_partial: record.is_partial,
            user: attribution.user.as_deref(),
            session: attribution.session.as_deref(),
            tags: tags.as_deref(),
            service_tier: (record.service_tier != ServiceTier::Standard)
                .then(|| record.service_tier.as_str()),
            price: priced.source.as_deref(),
        });
    }

    /// What `usage` of the record's model costs on its upstream, at the price in force now, in
    /// the tier it reports; its `audio` part at the audio rates, or, when the price has none,
    /// left out and the record unpriced. The proxy alerts on unpriced requests (once per model
    /// and day, through the guard): not here.
    fn price(&self, record: &Record<'_>, usage: &Usage) -> Priced {
        // A request with no tokens costs nothing whatever the model: nothing to be unsure of,
        // and its name (often a failed request's) is not looked up.
        if usage.total_tokens() == 0 {
            return Priced {
                cost: NanoUsd(0),
                is_priced: true,
                source: None,
            };
        }
        let resolved = self.resolution(record.upstream, record.model);
        let charged = resolved.and_then(|resolved| {
            let at = if resolved.is_undated() {
                0
            } else {
                OffsetDateTime::now_utc().unix_timestamp()
            };
            resolved.charge(usage, &record.audio, record.service_tier, at)
        });
        match charged {
            Some((charge, label)) => Priced {
                cost: charge.cost,
                is_priced: charge.is_audio_priced,
                source: Some(label),
            },
            None => Priced {
                cost: NanoUsd(0),
                is_priced: false,
                source: None,
            },
        }
    }

    /// What prices `model` on `upstream`, resolved once per pair. Past `RESOLVED_CAP` pairs
    /// the cache starts over: names come from clients, and a flood of made-up ones must neither
    /// grow it nor keep real ones out of it for good.
    fn resolution(&self, upstream: &str, model: &str) -> Option<Resolved> {
        let generation = {
            let cache = self.resolved.read();
            if let Some(resolved) = cache.pairs.get(upstream).and_then(|m| m.get(model)) {
                return resolved.clone();
            }
            cache.generation
        };
        // Resolved with no lock held; cached only if no reload came in between (the
        // generation is read before the table, and a reload changes both under the lock).
        let resolved = self.prices().resolve(upstream, model);
        let mut cache = self.resolved.write();
        if cache.generation == generation {
            if cache.count >= RESOLVED_CAP {
                cache.pairs.clear();
                cache.count = 0;
            }
            cache
                .pairs
                .entry(upstream.into())
                .or_default()
                .insert(model.into(), resolved.clone());
            cache.count += 1;
        }
        resolved
    }

    /// The prices requests are recorded at (an estimate quotes from them too).
    pub fn prices(&self) -> Arc<PriceTable> {
        Arc::clone(&self.prices.read())
    }

    /// Prices requests recorded from now on with `table` (a reload, on SIGHUP).
    pub fn set_prices(&self, table: PriceTable) {
        let mut cache = self.resolved.write();
        *self.prices.write() = Arc::new(table);
        cache.generation += 1;
        cache.pairs.clear();
        cache.count = 0;
    }

    /// True when `model` has a price (its audio tokens aside): an unpriced request of a priced
    /// model is unpriced for its audio.
    pub fn has_price(&self, upstream: &str, model: &str) -> bool {
        self.resolution(upstream, model).is_some()
    }

    /// The current totals.
    pub fn snapshot(&self) -> Snapshot {
        self.store.snapshot()
    }

    /// Zeroes the totals and starts a new period (recorded in the ledger; history is kept).
    /// Returns the totals of the period it closed.
    pub fn reset(&self) -> Snapshot {
        self.store.reset(&mut |id, started| {
            if let Some(ledger) = &self.ledger {
                ledger.start_period(id, started);
            }
        })
    }

    /// Marks a request whose record waits for an estimate, so that `close` waits for it too.
    pub fn begin_estimate(&self) -> Estimating {
        self.estimating.fetch_add(1, Ordering::AcqRel);
        Estimating(Arc::clone(&self.estimating))
    }

    /// Writes out everything recorded so far and stops the ledger's writer (graceful shutdown).
    /// Records still being estimated are waited for (a few seconds at most).
    pub fn close(&self) {
        let deadline = std::time::Instant::now() + ESTIMATES_GRACE;
        while self.estimating.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(ledger) = &self.ledger {
            ledger.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_priced_and_summed_per_key_and_model() {
        let meter = Meter::in_memory(PriceTable::builtin());
        let alice = Identity::from_key(b"sk-alice-0000000000000000");
        let usage = Usage {
            input_tokens: 1_000,
            output_tokens: 200,
            ..Usage::default()
        };
        for _ in 0..3 {
            meter.record(&Record::ok(&alice, "gpt-4o-2024-08-06", Some(usage)));
        }
        let unpriced = meter.record(&Record {
            is_error: true,
            ..Record::ok(&alice, "my-local-llama", Some(usage))
        });
        assert!(!unpriced.is_priced);
        let snap = meter.snapshot();
        assert_eq!(snap.keys.len(), 1);
        let key = &snap.keys[0];
        assert_eq!(key.models.len(), 2);
        // gpt-4o: 1000 x $2.50/M + 200 x $10/M = $0.0045 per request.
        assert_eq!(key.models["gpt-4o-2024-08-06"].cost, NanoUsd(3 * 4_500_000));
        assert_eq!(key.totals.requests, 4);
        assert_eq!(key.totals.errors, 1);
        assert_eq!(key.totals.unpriced_requests, 1);
        assert_eq!(key.totals.prompt_tokens, 4_000);
        assert_eq!(snap.totals, key.totals);
    }

    #[test]
    fn reset_zeroes_totals_and_moves_since() {
        let meter = Meter::in_memory(PriceTable::builtin());
        let before = meter.snapshot().since;
        meter.record(&Record::ok(&Identity::anonymous(), UNKNOWN_MODEL, None));
        assert_eq!(meter.snapshot().totals.requests, 1);
        let closed = meter.reset();
        assert_eq!(closed.totals.requests, 1);
        let snap = meter.snapshot();
        assert_eq!(snap.totals, Counts::default());
        assert!(snap.keys.is_empty());
        assert!(snap.since >= before);
    }
}
