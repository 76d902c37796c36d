//! Prometheus metrics: each request is recorded once into its worker's own series (counters
//! and histograms, bounded in number), and `/metrics` renders them with the budgets and the
//! ledger's state as OpenMetrics or Prometheus text.
//!
//! Series are labelled by upstream, model, key (a named key's name, else its id: never more of
//! the key) and GenAI operation. The first `metrics_max_series` label sets seen keep labels of
//! their own for the life of the process; later ones count into `model="other", key="other"`
//! of their upstream and operation, so every total stays exact and no counter ever goes down.
//! Counters count since the process started: `/stats/reset` does not touch them.

pub mod exposition;
pub mod series;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::key::Identity;
use crate::money::NanoUsd;
use crate::usage::{Flavor, Usage};
use series::{Histogram, Labels, OVERHEAD_BOUNDS, Shard, Totals, hash_of};

/// The model and key labels of the series past `metrics_max_series`.
pub const OTHER: &str = "other";

/// How a request ended, as `llm_meter_requests_total{outcome}` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A complete 2xx response (or a client that left before the end).
    Ok = 0,
    /// Anything else the upstream or llm-meter answered: counted in `/stats` as an error.
    Error = 1,
    /// Refused at admission (budget, rate limit, unknown key): never sent upstream.
    Refused = 2,
}

/// The GenAI operation of a route (`gen_ai.operation.name`), where the route tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    /// Chat completions, Responses, Anthropic Messages.
    Chat,
    /// Legacy completions.
    TextCompletion,
    /// Embeddings.
    Embeddings,
    /// Gemini's `generateContent`.
    GenerateContent,
}

impl Operation {
    /// The operation of a flavor's route; none for Realtime sessions, which are no one call.
    pub fn of(flavor: Flavor) -> Option<Self> {
        match flavor {
            Flavor::OpenAiChat | Flavor::OpenAiResponses | Flavor::AnthropicMessages => {
                Some(Self::Chat)
            }
            Flavor::OpenAiCompletions => Some(Self::TextCompletion),
            Flavor::OpenAiEmbeddings => Some(Self::Embeddings),
            Flavor::Gemini => Some(Self::GenerateContent),
            Flavor::OpenAiRealtime => None,
        }
    }

    /// The semantic conventions' name of the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::TextCompletion => "text_completion",
            Self::Embeddings => "embeddings",
            Self::GenerateContent => "generate_content",
        }
    }
}

/// One request, as the metrics count it.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The upstream's name.
    pub upstream: &'a str,
    /// The model recorded (`unknown` when none was named).
    pub model: &'a str,
    /// The named key's name, else the key's id.
    pub key: &'a str,
    /// The route's GenAI operation.
    pub operation: Option<Operation>,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status its client got (for `error_type`).
    pub status: u16,
    /// Its tokens, when reported or estimated.
    pub usage: Option<Usage>,
    /// What it cost.
    pub cost: NanoUsd,
    /// Its model has no price.
    pub is_unpriced: bool,
    /// Its tokens were estimated.
    pub is_estimated: bool,
    /// From its arrival to the end of its response.
    pub duration: Option<Duration>,
    /// From its arrival to its sending upstream: the time llm-meter added before the upstream
    /// could start.
    pub overhead: Option<Duration>,
}

impl<'a> Sample<'a> {
    /// A request refused at admission.
    pub fn refused(
        upstream: &'a str,
        model: &'a str,
        key: &'a str,
        flavor: Option<Flavor>,
    ) -> Self {
        Self {
            upstream,
            model,
            key,
            operation: flavor.and_then(Operation::of),
            outcome: Outcome::Refused,
            status: 0,
            usage: None,
            cost: NanoUsd(0),
            is_unpriced: false,
            is_estimated: false,
            duration: None,
            overhead: None,
        }
    }
}

/// The recorded series of every worker, and which label sets have series of their own.
#[derive(Debug)]
pub struct Metrics {
    /// One per worker (and one for worker 0, which also takes estimates' records): a lock only
    /// its worker and a scrape take, so workers never wait on one another.
    shards: Box<[Mutex<Shard>]>,
    /// One seed for every shard, so a label set has one hash; random, so that clients cannot
    /// choose model names whose hashes collide.
    hasher: foldhash::fast::RandomState,
    /// Hashes of the label sets with series of their own: at most `max_series`, never fewer.
    admitted: RwLock<HashSet<u64, foldhash::fast::RandomState>>,
    max_series: usize,
}

/// What a scrape reads of the recorded series.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Every series, those of different workers summed.
    pub series: BTreeMap<Labels, Totals>,
    /// The time llm-meter added to requests, in seconds.
    pub overhead: Histogram,
}

impl Metrics {
    /// Metrics of `workers` worker threads, keeping at most `max_series` label sets apart.
    pub fn new(max_series: usize, workers: usize) -> Self {
        Self {
            shards: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            admitted: RwLock::default(),
            max_series: max_series.max(1),
        }
    }

    /// Counts one request: a lookup in this worker's series and a few additions.
    pub fn record(&self, sample: &Sample<'_>) {
        let shard = &self.shards[crate::worker::index() % self.shards.len()];
        let hash = self.hash(sample);
        let mut shard = shard.lock();
        if let Some(overhead) = sample.overhead {
            shard
                .overhead
                .observe(&OVERHEAD_BOUNDS, overhead.as_secs_f64());
        }
        if shard.add_existing(hash, sample) {
            return;
        }
        if self.admit(hash) {
            shard.add_new(hash, labels_of(sample), sample);
            return;
        }
        let folded = Sample {
            model: OTHER,
            key: OTHER,
            ..*sample
        };
        let hash = self.hash(&folded);
        if !shard.add_existing(hash, &folded) {
            shard.add_new(hash, labels_of(&folded), &folded);
        }
    }

    fn hash(&self, sample: &Sample<'_>) -> u64 {
        hash_of(
            &self.hasher,
            sample.upstream,
            sample.model,
            sample.key,
            sample.operation,
        )
    }

    /// True when the label set of `hash` has a series of its own: it had, or there is room.
    /// Past the bound the set never changes again, so a folded label set stays folded.
    fn admit(&self, hash: u64) -> bool {
        {
            let admitted = self.admitted.read();
            if admitted.contains(&hash) {
                return true;
            }
            if admitted.len() >= self.max_series {
                return false;
            }
        }
        let mut admitted = self.admitted.write();
        if admitted.contains(&hash) || admitted.len() < self.max_series {
            admitted.insert(hash);
            true
        } else {
            false
        }
    }

    /// Every series so far, the workers' summed.
    pub fn recorded(&self) -> Recorded {
        let mut recorded = Recorded::default();
        for shard in &self.shards {
            let shard = shard.lock();
            recorded.overhead.merge(&shard.overhead);
            for (labels, totals) in shard.series() {
                recorded
                    .series
                    .entry(labels.clone())
                    .or_default()
                    .merge(totals);
            }
        }
        recorded
    }
}

/// The `key` label of a caller: a named key's name, else the key's id. Never the key's label,
/// which shows a piece of the key.
pub fn key_label(identity: &Identity, is_named: bool) -> &str {
    if is_named {
        &identity.label
    } else {
        &identity.id
    }
}

fn labels_of(sample: &Sample<'_>) -> Labels {
    Labels {
        upstream: sample.upstream.into(),
        model: sample.model.into(),
        key: sample.key.into(),
        operation: sample.operation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<'a>(model: &'a str, key: &'a str) -> Sample<'a> {
        Sample {
            outcome: Outcome::Ok,
            usage: Some(Usage {
                input_tokens: 10,
                output_tokens: 5,
                ..Usage::default()
            }),
            cost: NanoUsd(7),
            operation: Some(Operation::Chat),
            duration: Some(Duration::from_millis(30)),
            overhead: Some(Duration::from_micros(40)),
            ..Sample::refused("openai", model, key, None)
        }
    }

    #[test]
    fn label_sets_past_the_bound_fold_into_other_with_exact_totals() {
        let metrics = Metrics::new(2, 3);
        for key in ["a", "b", "c", "d", "a", "c"] {
            metrics.record(&ok("gpt-4o", key));
        }
        let recorded = metrics.recorded();
        let keys: Vec<&str> = recorded.series.keys().map(|l| &*l.key).collect();
        assert_eq!(keys, ["a", "b", "other"]);
        let requests: u64 = recorded.series.values().map(|t| t.requests[0]).sum();
        assert_eq!(requests, 6);
        let other = recorded.series.iter().find(|(l, _)| &*l.key == OTHER);
        assert_eq!(other.map(|(_, t)| t.requests[0]), Some(3));
        assert_eq!(recorded.overhead.count(), 6);
        let cost: u64 = recorded.series.values().map(|t| t.cost_nano_usd).sum();
        assert_eq!(cost, 42);
    }

    #[test]
    fn operations_follow_the_semantic_conventions() {
        assert_eq!(
            Operation::of(Flavor::OpenAiResponses),
            Some(Operation::Chat)
        );
        assert_eq!(
            Operation::of(Flavor::Gemini).map(Operation::as_str),
            Some("generate_content")
        );
        assert_eq!(Operation::of(Flavor::OpenAiRealtime), None);
    }
}
