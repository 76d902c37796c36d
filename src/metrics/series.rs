//! The recorded series: per worker, one map of (upstream, model, key, operation) entries with
//! plain counters and histograms behind a lock only that worker and a scrape ever take.

use std::collections::HashMap;
use std::hash::BuildHasher;

use super::{Operation, Outcome, Sample};

/// Upper bounds of `gen_ai.client.token.usage` (OpenTelemetry GenAI semantic conventions).
pub const TOKEN_BOUNDS: [f64; 14] = [
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Upper bounds of `gen_ai.client.operation.duration`, in seconds (the same conventions).
pub const DURATION_BOUNDS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Upper bounds of the time llm-meter adds to a request, in seconds: 10 µs to about 1.3 s.
pub const OVERHEAD_BOUNDS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1, 0.5, 1.28,
];

/// Token types, in the order of `Entry::tokens`, as the `type` label gives them. The first four
/// add up to a request's tokens; `reasoning` is a part of `output`, and `cache_write_1h` a part
/// of `cache_write` (Anthropic's 1-hour cache writes), each shown again on its own.
pub const TOKEN_TYPES: [&str; 6] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
    "cache_write_1h",
];

/// A histogram with 14 finite bounds and the `+Inf` one: counts per bucket (not cumulative)
/// and the sum of what was observed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket; the last one is past every bound.
    pub counts: [u64; 15],
    /// The sum of the observations.
    pub sum: f64,
}

impl Histogram {
    /// Counts one observation of `value` against `bounds`.
    pub fn observe(&mut self, bounds: &[f64; 14], value: f64) {
        let bucket = bounds.iter().position(|b| value <= *b).unwrap_or(14);
        self.counts[bucket] += 1;
        self.sum += value;
    }

    /// Adds another histogram of the same bounds.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What one series has counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Requests per outcome, in the order of `Outcome::ALL`.
    pub requests: [u64; 3],
    /// Tokens per type, in the order of `TOKEN_TYPES`.
    pub tokens: [u64; 6],
    /// Cost in nano-dollars.
    pub cost_nano_usd: u64,
    /// Requests whose tokens were estimated.
    pub estimated: u64,
    /// Requests whose model has no price.
    pub unpriced: u64,
    /// Input tokens per request (`gen_ai_token_type="input"`).
    pub input: Histogram,
    /// Output tokens per request (`gen_ai_token_type="output"`).
    pub output: Histogram,
    /// Seconds from a request's arrival to the end of its response, for those that did not fail.
    pub duration: Histogram,
    /// The same for failed requests, per `error_type`: a status code, or 0 for a failure after
    /// a 2xx status (the upstream cut the stream); a few codes at most, then 0 for the rest.
    pub failed: Vec<(u16, Histogram)>,
}

/// Error types a series keeps apart: 7 status codes and `_OTHER` (0), where later codes count.
const MAX_ERROR_TYPES: usize = 8;

/// The `error_type` of a failed request's status.
fn error_type(status: u16, known: &[(u16, Histogram)]) -> u16 {
    let is_known = known.iter().any(|(s, _)| *s == status);
    let codes = known.iter().filter(|(s, _)| *s != 0).count();
    if (200..300).contains(&status) || (!is_known && codes >= MAX_ERROR_TYPES - 1) {
        0
    } else {
        status
    }
}

/// The histogram of `error_type` among `failed`, added if missing.
fn failed_histogram(failed: &mut Vec<(u16, Histogram)>, error_type: u16) -> &mut Histogram {
    let at = match failed.iter().position(|(s, _)| *s == error_type) {
        Some(at) => at,
        None => {
            failed.push((error_type, Histogram::default()));
            failed.len() - 1
        }
    };
    &mut failed[at].1
}

impl Totals {
    fn add(&mut self, sample: &Sample<'_>) {
        self.requests[sample.outcome as usize] += 1;
        if let Some(usage) = &sample.usage {
            let tokens = [
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.cache_write_tokens,
                usage.output_tokens,
                usage.reasoning_tokens,
                usage.cache_write_1h_tokens,
            ];
            for (total, n) in self.tokens.iter_mut().zip(tokens) {
                *total += n;
            }
            self.input
                .observe(&TOKEN_BOUNDS, as_f64(usage.prompt_tokens()));
            self.output
                .observe(&TOKEN_BOUNDS, as_f64(usage.output_tokens));
        }
        self.cost_nano_usd += sample.cost.0;
        self.estimated += u64::from(sample.is_estimated);
        self.unpriced += u64::from(sample.is_unpriced);
        if let Some(duration) = sample.duration {
            let histogram = if sample.outcome == Outcome::Error {
                let kind = error_type(sample.status, &self.failed);
                failed_histogram(&mut self.failed, kind)
            } else {
                &mut self.duration
            };
            histogram.observe(&DURATION_BOUNDS, duration.as_secs_f64());
        }
    }

    /// Adds another series' totals.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.requests.iter_mut().zip(other.requests) {
            *a += b;
        }
        for (a, b) in self.tokens.iter_mut().zip(other.tokens) {
            *a += b;
        }
        self.cost_nano_usd += other.cost_nano_usd;
        self.estimated += other.estimated;
        self.unpriced += other.unpriced;
        self.input.merge(&other.input);
        self.output.merge(&other.output);
        self.duration.merge(&other.duration);
        for (error_type, histogram) in &other.failed {
            failed_histogram(&mut self.failed, *error_type).merge(histogram);
        }
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "token counts under 2^53 are exact"
)]
fn as_f64(n: u64) -> f64 {
    n as f64
}

/// The labels of one series: who, where, what model, which operation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    /// The upstream's name.
    pub upstream: Box<str>,
    /// The model, or `other` past the series bound.
    pub model: Box<str>,
    /// The named key's name, else the key's id, or `other` past the series bound.
    pub key: Box<str>,
    /// The GenAI operation, when the route tells it.
    pub operation: Option<Operation>,
}

impl Labels {
    fn is(&self, upstream: &str, model: &str, key: &str, operation: Option<Operation>) -> bool {
        *self.upstream == *upstream
            && *self.model == *model
            && *self.key == *key
            && self.operation == operation
    }
}

/// The hash a series is found by: the same in every shard.
pub fn hash_of(
    state: &foldhash::fast::RandomState,
    upstream: &str,
    model: &str,
    key: &str,
    operation: Option<Operation>,
) -> u64 {
    state.hash_one((upstream, model, key, operation))
}

/// One worker's series, and the time llm-meter added to its requests.
#[derive(Debug, Default)]
pub struct Shard {
    /// Entries by the hash of their labels (a few share a hash at most).
    entries: HashMap<u64, Vec<(Labels, Totals)>, foldhash::fast::RandomState>,
    /// Seconds between a request's arrival and its sending upstream.
    pub overhead: Histogram,
}

impl Shard {
    /// Adds a sample to the series of these labels, if this shard has it.
    pub fn add_existing(&mut self, hash: u64, sample: &Sample<'_>) -> bool {
        let Some(entries) = self.entries.get_mut(&hash) else {
            return false;
        };
        let found = entries
            .iter_mut()
            .find(|(l, _)| l.is(sample.upstream, sample.model, sample.key, sample.operation));
        match found {
            Some((_, totals)) => {
                totals.add(sample);
                true
            }
            None => false,
        }
    }

    /// Adds a sample to a series this shard does not have yet.
    pub fn add_new(&mut self, hash: u64, labels: Labels, sample: &Sample<'_>) {
        let mut totals = Totals::default();
        totals.add(sample);
        self.entries.entry(hash).or_default().push((labels, totals));
    }

    /// Every series of this shard.
    pub fn series(&self) -> impl Iterator<Item = &(Labels, Totals)> {
        self.entries.values().flatten()
    }
}

impl Outcome {
    /// Every outcome, in the order of `Totals::requests`.
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Error, Outcome::Refused];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Refused => "refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::default();
        for v in [0.0, 1.0, 1.5, 67_108_864.0, 1e9] {
            h.observe(&TOKEN_BOUNDS, v);
        }
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[13], 1);
        assert_eq!(h.counts[14], 1);
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn failures_keep_a_few_statuses_apart_then_count_as_other() {
        let mut totals = Totals::default();
        let failed = |status| Sample {
            outcome: Outcome::Error,
            status,
            duration: Some(std::time::Duration::from_millis(5)),
            ..Sample::refused("openai", "m", "k", None)
        };
        for status in [500, 500, 200, 400, 401, 402, 403, 404, 405, 406, 407] {
            totals.add(&failed(status));
        }
        let codes: Vec<u16> = totals.failed.iter().map(|(s, _)| *s).collect();
        assert_eq!(codes, [500, 0, 400, 401, 402, 403, 404, 405]);
        assert_eq!(totals.failed[0].1.count(), 2);
        // The 200 (a stream cut after its status) and the two codes past the bound.
        assert_eq!(totals.failed[1].1.count(), 3);
        assert_eq!(totals.duration.count(), 0);
    }
}
