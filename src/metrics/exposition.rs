//! `/metrics` as text: the recorded series, the budgets and the ledger's state encoded by the
//! `prometheus-client` crate, as OpenMetrics 1.0 or (when the scraper prefers it) Prometheus
//! text 0.0.4.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::series::{
    DURATION_BOUNDS, Histogram, Labels, OVERHEAD_BOUNDS, TOKEN_BOUNDS, TOKEN_TYPES, Totals,
};
use super::{Outcome, Recorded};
use crate::guard::{BudgetLine, GuardView};
use crate::meter::ledger::Health;

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text content type.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0: `# UNIT` lines and a closing `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    PrometheusText,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics unless `text/plain` is asked for with
    /// a higher quality than OpenMetrics (or OpenMetrics not at all).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::OpenMetrics;
        };
        let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let quality = params
                .find_map(|p| p.strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(quality, |q| q.max(quality)));
        }
        match (openmetrics, text) {
            (None, Some(_)) => Self::PrometheusText,
            (Some(om), Some(t)) if t > om => Self::PrometheusText,
            _ => Self::OpenMetrics,
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS,
            Self::PrometheusText => PROMETHEUS_TEXT,
        }
    }
}

/// Everything one scrape shows, read before encoding.
#[derive(Debug)]
pub struct Scrape {
    recorded: Recorded,
    budgets: Vec<Budget>,
    ledger: Option<LedgerState>,
}

#[derive(Debug)]
struct Budget {
    /// `global` or `key`.
    scope: &'static str,
    /// The named key's name, for a key's budget.
    key: Option<String>,
    period: &'static str,
    line: BudgetLine,
}

#[derive(Debug)]
struct LedgerState {
    pending_rows: u64,
    written_rows: u64,
    lost_rows: u64,
    is_failing: bool,
}

impl Scrape {
    /// A scrape of these series, budgets and ledger.
    pub fn new(recorded: Recorded, guard: &GuardView, ledger: Option<&Health>) -> Self {
        let global = guard.global.iter().map(|line| Budget {
            scope: "global",
            key: None,
            period: line.period,
            line: line.clone(),
        });
        let keys = guard.keys.iter().flat_map(|k| {
            k.budget.iter().map(|line| Budget {
                scope: "key",
                key: Some(k.name.clone()),
                period: line.period,
                line: line.clone(),
            })
        });
        Self {
            recorded,
            budgets: global.chain(keys).collect(),
            ledger: ledger.map(|h| LedgerState {
                pending_rows: h.pending_rows,
                written_rows: h.written_rows,
                lost_rows: h.lost_rows,
                is_failing: h.is_failing,
            }),
        }
    }

    /// The scrape as text in `format`.
    pub fn encode(self, format: Format) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry)?,
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
            }
        }
        Ok(text)
    }
}

type Error = std::fmt::Error;

/// The labels of a counter series: upstream, model, key.
fn series_labels(labels: &Labels) -> [(&'static str, &str); 3] {
    [
        ("upstream", &*labels.upstream),
        ("model", &*labels.model),
        ("key", &*labels.key),
    ]
}

#[expect(
    clippy::cast_precision_loss,
    reason = "dollars are shown as floats; nano-dollar totals stay exact in /stats"
)]
fn usd(nano: u64) -> f64 {
    nano as f64 / 1e9
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        self.encode_requests(&mut encoder)?;
        self.encode_costs(&mut encoder)?;
        self.encode_budgets(&mut encoder)?;
        self.encode_ledger(&mut encoder)?;
        self.encode_histograms(&mut encoder)
    }
}

/// Sums the series by the labels `by` picks from each: the counter families drop the
/// operation, the GenAI ones the key.
fn summed<K: Ord, V: Default>(
    recorded: &Recorded,
    by: impl Fn(&Labels, &Totals) -> (K, V),
    add: impl Fn(&mut V, V),
) -> BTreeMap<K, V> {
    let mut out = BTreeMap::new();
    for (labels, totals) in &recorded.series {
        let (k, v) = by(labels, totals);
        add(out.entry(k).or_default(), v);
    }
    out
}

impl Scrape {
    /// The counters per (upstream, model, key), the operation summed away.
    fn counters(&self) -> BTreeMap<[(&'static str, &str); 3], Totals> {
        let mut out: BTreeMap<_, Totals> = BTreeMap::new();
        for (labels, totals) in &self.recorded.series {
            out.entry(series_labels(labels)).or_default().merge(totals);
        }
        out
    }

    fn encode_requests(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let counters = self.counters();
        let mut family = encoder.encode_descriptor(
            "llm_meter_requests",
            "Requests by how they ended: ok and error are those /stats counts, refused those refused at admission.",
            None,
            MetricType::Counter,
        )?;
        for (labels, totals) in &counters {
            for outcome in Outcome::ALL {
                let [u, m, k] = *labels;
                let set = [u, m, k, ("outcome", outcome.as_str())];
                ConstCounter::new(totals.requests[outcome as usize])
                    .encode(family.encode_family(&set)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "llm_meter_tokens",
            "Tokens by type: input (uncached), cached_input, cache_write, output (reasoning included), reasoning, cache_write_1h (a part of cache_write).",
            None,
            MetricType::Counter,
        )?;
        for (labels, totals) in &counters {
            for (kind, n) in TOKEN_TYPES.iter().zip(totals.tokens) {
                let [u, m, k] = *labels;
                let set = [u, m, k, ("type", *kind)];
                ConstCounter::new(n).encode(family.encode_family(&set)?)?;
            }
        }
        for (name, help, pick) in [
            (
                "llm_meter_estimated_requests",
                "Requests whose tokens were counted by a tokenizer: the provider reported none.",
                (|t: &Totals| t.estimated) as fn(&Totals) -> u64,
            ),
            (
                "llm_meter_unpriced_requests",
                "Requests whose model has no price: their tokens are counted, their cost is not.",
                |t: &Totals| t.unpriced,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, totals) in &counters {
                ConstCounter::new(pick(totals)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }

    fn encode_costs(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let unit = Unit::Other("usd".into());
        let mut family = encoder.encode_descriptor(
            "llm_meter_cost",
            "Cost in US dollars at the prices in force when each request was recorded.",
            Some(&unit),
            MetricType::Counter,
        )?;
        for (labels, totals) in &self.counters() {
            ConstCounter::new(usd(totals.cost_nano_usd)).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn encode_budgets(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let unit = Unit::Other("usd".into());
        for (name, help, pick) in [
            (
                "llm_meter_budget_spent",
                "Spent in the budget's current period, in US dollars.",
                (|l: &BudgetLine| l.spent_usd) as fn(&BudgetLine) -> f64,
            ),
            (
                "llm_meter_budget_limit",
                "The budget of the period, in US dollars.",
                |l: &BudgetLine| l.limit_usd,
            ),
            (
                "llm_meter_budget_remaining",
                "What is left of the budget in its current period (never negative), in US dollars.",
                |l: &BudgetLine| l.remaining_usd,
            ),
        ] {
            if self.budgets.is_empty() {
                break;
            }
            let mut family =
                encoder.encode_descriptor(name, help, Some(&unit), MetricType::Gauge)?;
            for budget in &self.budgets {
                let mut set = vec![("scope", budget.scope)];
                if let Some(key) = &budget.key {
                    set.push(("key", key.as_str()));
                }
                set.push(("period", budget.period));
                ConstGauge::new(pick(&budget.line)).encode(family.encode_family(&set)?)?;
            }
        }
        Ok(())
    }

    fn encode_ledger(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let gauges = [
            (
                "llm_meter_ledger_pending_rows",
                "Rows recorded but not yet committed to the ledger (a growing number means a slow or failing disk).",
                ledger.pending_rows,
            ),
            (
                "llm_meter_ledger_failing",
                "1 while the ledger's last write failed (rows wait in memory), else 0.",
                u64::from(ledger.is_failing),
            ),
        ];
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        let counters = [
            (
                "llm_meter_ledger_written_rows",
                "Rows committed to the ledger since start.",
                ledger.written_rows,
            ),
            (
                "llm_meter_ledger_lost_rows",
                "Rows given up since start because the disk kept failing and the backlog bound was reached.",
                ledger.lost_rows,
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }

    fn encode_histograms(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let seconds = Unit::Seconds;
        let family = encoder.encode_descriptor(
            "llm_meter_added_latency",
            "Time llm-meter adds before a request can start upstream: from its arrival to its sending (admission, reading and rewriting the body, a pooled connection), in seconds.",
            Some(&seconds),
            MetricType::Histogram,
        )?;
        encode_histogram(family, &self.recorded.overhead, &OVERHEAD_BOUNDS)?;

        let tokens = summed(
            &self.recorded,
            |l, t| ((l.model.clone(), l.upstream.clone()), [t.input, t.output]),
            |a, b| {
                a[0].merge(&b[0]);
                a[1].merge(&b[1]);
            },
        );
        let mut family = encoder.encode_descriptor(
            "gen_ai_client_token_usage",
            "Tokens used per request, by token type (OpenTelemetry GenAI semantic conventions).",
            None,
            MetricType::Histogram,
        )?;
        for ((model, provider), [input, output]) in &tokens {
            for (kind, histogram) in [("input", input), ("output", output)] {
                let set = [
                    ("gen_ai_token_type", kind),
                    ("gen_ai_request_model", &**model),
                    ("gen_ai_provider_name", &**provider),
                ];
                encode_histogram(family.encode_family(&set)?, histogram, &TOKEN_BOUNDS)?;
            }
        }

        let mut durations = BTreeMap::<_, Histogram>::new();
        for (l, t) in &self.recorded.series {
            let failed = t.failed.iter().map(|(code, h)| (Some(*code), h));
            for (error_type, histogram) in std::iter::once((None, &t.duration)).chain(failed) {
                let key = (l.operation, l.model.clone(), l.upstream.clone(), error_type);
                durations.entry(key).or_default().merge(histogram);
            }
        }
        let mut family = encoder.encode_descriptor(
            "gen_ai_client_operation_duration",
            "Duration of GenAI operations, from the request's arrival to the end of its response (OpenTelemetry GenAI semantic conventions), in seconds.",
            Some(&seconds),
            MetricType::Histogram,
        )?;
        for ((operation, model, provider, error_type), histogram) in &durations {
            if histogram.count() == 0 {
                continue;
            }
            let code = error_type.map(|c| match c {
                0 => "_OTHER".to_owned(),
                c => c.to_string(),
            });
            let mut set = Vec::with_capacity(4);
            if let Some(operation) = operation {
                set.push(("gen_ai_operation_name", operation.as_str()));
            }
            set.push(("gen_ai_request_model", &**model));
            set.push(("gen_ai_provider_name", &**provider));
            if let Some(code) = &code {
                set.push(("error_type", code.as_str()));
            }
            encode_histogram(family.encode_family(&set)?, histogram, &DURATION_BOUNDS)?;
        }
        Ok(())
    }
}

fn encode_histogram(
    mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    histogram: &Histogram,
    bounds: &[f64; 14],
) -> Result<(), Error> {
    let mut buckets = [(0.0, 0); 15];
    for (i, bucket) in buckets.iter_mut().enumerate() {
        *bucket = (
            bounds.get(i).copied().unwrap_or(f64::INFINITY),
            histogram.counts[i],
        );
    }
    encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        histogram.sum,
        histogram.count(),
        &buckets,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_is_served_unless_plain_text_is_preferred() {
        assert_eq!(Format::negotiate(None), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("text/plain")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.1, text/plain;q=0.9")),
            Format::PrometheusText
        );
    }
}
