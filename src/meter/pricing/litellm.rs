//! LiteLLM's price map (`model_prices_and_context_window.json`, USD per token, one entry per
//! model id) read into prices: the built-in table, `pricing_file`, and what `prices update`
//! downloads are all in this format.
//!
//! A rate field is a base name, then optionally a long-context threshold, then optionally a
//! tier: `input_cost_per_token`, `cache_read_input_token_cost_above_200k_tokens`,
//! `output_cost_per_token_priority`, `input_cost_per_token_above_272k_tokens_flex`; audio tokens
//! have theirs (`input_cost_per_audio_token`, `output_cost_per_audio_token`,
//! `cache_read_input_audio_token_cost`). Other fields (images, search, `_ultrafast`, ...) are
//! ignored, as are entries with no token price.
//! `scripts/price_table.py` cuts a copy to the same grammar for the built-in table.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::money::{AudioRates, Ladder, PicoPerToken, Price, Rates, pico_from_usd_per_token};
use crate::usage::ServiceTier;

/// Largest price map read: LiteLLM's own is a few MiB.
pub const MAX_BYTES: u64 = 64 << 20;

/// The modes whose requests llm-meter meters (scripts/price_table.py keeps the same); an entry
/// of another mode is skipped, one with no mode is read.
const METERED_MODES: &[&str] = &["chat", "responses", "completion", "embedding", "realtime"];

/// Problems listed one by one; past it they are only counted.
const PROBLEMS_SHOWN: usize = 5;

/// One model's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its price.
    pub price: Price,
    /// `litellm_provider`: who serves the model under this id.
    pub provider: String,
}

/// A price map read whole.
#[derive(Debug, Clone, Default)]
pub struct PriceMap {
    /// Priced models by id.
    pub models: BTreeMap<String, Entry>,
    /// Where the copy came from and its date, when it says (the built-in table does).
    pub source: Option<String>,
    /// Its date, `YYYY-MM-DD`, when it says.
    pub date: Option<String>,
    /// Entries refused (a rate that is not a believable number, no `litellm_provider`).
    pub refused: usize,
    /// The first few refusals, each naming the model and the field.
    pub problems: Vec<String>,
}

/// Why a file is not a price map at all.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Not JSON, or not an object.
    #[error("not a LiteLLM price map: {0}")]
    NotAMap(String),
    /// An object with no priced model in it.
    #[error("not a LiteLLM price map: no entry has a token price")]
    NoPrices,
}

/// The token classes a rate field can price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Input,
    Output,
    Cached,
    /// `input_cost_per_token_cache_hit` (DeepSeek's name for a cache read), used when there is
    /// no `cache_read_input_token_cost`.
    CacheHit,
    CacheWrite,
    CacheWrite1h,
    AudioInput,
    AudioCached,
    AudioOutput,
}

/// Base names, longest first where one starts another.
const BASES: &[(&str, Class)] = &[
    (
        "cache_creation_input_token_cost_above_1hr",
        Class::CacheWrite1h,
    ),
    ("cache_creation_input_token_cost", Class::CacheWrite),
    ("cache_read_input_token_cost", Class::Cached),
    ("input_cost_per_token_cache_hit", Class::CacheHit),
    ("input_cost_per_token", Class::Input),
    ("output_cost_per_token", Class::Output),
    ("cache_read_input_audio_token_cost", Class::AudioCached),
    ("input_cost_per_audio_token", Class::AudioInput),
    ("output_cost_per_audio_token", Class::AudioOutput),
];

const TIERS: &[(&str, ServiceTier)] = &[
    ("_flex", ServiceTier::Flex),
    ("_priority", ServiceTier::Priority),
    ("_batches", ServiceTier::Batch),
];

/// (class, threshold in tokens or 0, tier) of a rate field's name, or `None` for another field.
fn rate_field(name: &str) -> Option<(Class, u64, ServiceTier)> {
    let (rest, class) = BASES
        .iter()
        .find_map(|&(base, class)| name.strip_prefix(base).map(|rest| (rest, class)))?;
    let (rest, tier) = TIERS
        .iter()
        .find_map(|&(suffix, tier)| rest.strip_suffix(suffix).map(|rest| (rest, tier)))
        .unwrap_or((rest, ServiceTier::Standard));
    if rest.is_empty() {
        return Some((class, 0, tier));
    }
    let thousands = rest.strip_prefix("_above_")?.strip_suffix("k_tokens")?;
    if thousands.is_empty() || !thousands.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let threshold = thousands.parse::<u64>().ok()?.checked_mul(1000)?;
    (threshold > 0).then_some((class, threshold, tier))
}

/// Reads a price map: LiteLLM's file, or the built-in table's (the same entries under
/// `models`, with `source` and `date` beside them).
pub fn parse(text: &[u8]) -> Result<PriceMap, MapError> {
    let value: Value =
        serde_json::from_slice(text).map_err(|e| MapError::NotAMap(e.to_string()))?;
    let Value::Object(mut top) = value else {
        return Err(MapError::NotAMap("the top level is not an object".into()));
    };
    let mut map = PriceMap::default();
    let entries = match top.remove("models") {
        Some(Value::Object(models)) if top.get("source").is_some_and(Value::is_string) => {
            map.source = top.get("source").and_then(Value::as_str).map(str::to_owned);
            map.date = top.get("date").and_then(Value::as_str).map(str::to_owned);
            models
        }
        Some(other) => {
            top.insert("models".into(), other);
            top
        }
        None => top,
    };
    for (name, entry) in entries {
        if name == "sample_spec" {
            continue;
        }
        let Value::Object(fields) = entry else {
            continue;
        };
        // Image, audio, rerank and other models bill by what llm-meter does not meter.
        if fields
            .get("mode")
            .and_then(Value::as_str)
            .is_some_and(|mode| !METERED_MODES.contains(&mode))
        {
            continue;
        }
        match read_entry(&fields) {
            Ok(Some(entry)) => {
                map.models.insert(name, entry);
            }
            Ok(None) => {}
            Err(problem) => {
                map.refused += 1;
                if map.problems.len() < PROBLEMS_SHOWN {
                    map.problems.push(format!("{name}: {problem}"));
                }
            }
        }
    }
    if map.models.is_empty() {
        return Err(MapError::NoPrices);
    }
    Ok(map)
}

/// One entry's price, `None` when it has no token price (an image model, say).
fn read_entry(fields: &Map<String, Value>) -> Result<Option<Entry>, String> {
    let mut explicit = BTreeMap::new();
    for (field, value) in fields {
        let Some(key) = rate_field(field) else {
            continue;
        };
        match value {
            Value::Null => {}
            Value::Number(n) => {
                let pico = n
                    .as_f64()
                    .and_then(pico_from_usd_per_token)
                    .ok_or_else(|| format!("{field} is not a rate from 0 to $1 a token: {n}"))?;
                explicit.insert(key, pico);
            }
            _ => return Err(format!("{field} is not a number")),
        }
    }
    let has = |class| explicit.contains_key(&(class, 0, ServiceTier::Standard));
    if !has(Class::Input) && !has(Class::Output) {
        return Ok(None);
    }
    let provider = fields
        .get("litellm_provider")
        .and_then(Value::as_str)
        .ok_or("no litellm_provider")?
        .to_owned();
    let max_output_tokens = fields.get("max_output_tokens").and_then(Value::as_u64);
    let rates = Explicit(explicit);
    let price = Price {
        standard: rates.ladder(ServiceTier::Standard),
        flex: rates
            .has_tier(ServiceTier::Flex)
            .then(|| rates.ladder(ServiceTier::Flex)),
        priority: rates
            .has_tier(ServiceTier::Priority)
            .then(|| rates.ladder(ServiceTier::Priority)),
        batch: rates
            .has_tier(ServiceTier::Batch)
            .then(|| rates.ladder(ServiceTier::Batch)),
        max_output_tokens,
    };
    Ok(Some(Entry { price, provider }))
}

/// The rates an entry lists, by (class, threshold, tier).
struct Explicit(BTreeMap<(Class, u64, ServiceTier), PicoPerToken>);

impl Explicit {
    fn has_tier(&self, tier: ServiceTier) -> bool {
        self.0.keys().any(|&(_, _, t)| t == tier)
    }

    /// The tier's base rates and a step for each threshold any rate names.
    fn ladder(&self, tier: ServiceTier) -> Ladder {
        let thresholds: BTreeSet<u64> = self.0.keys().map(|&(_, n, _)| n).collect();
        Ladder {
            base: self.rates(0, tier),
            above: thresholds
                .into_iter()
                .filter(|&n| n > 0)
                .map(|n| (n, self.rates(n, tier)))
                .collect(),
        }
    }

    /// A class's rate at a threshold in a tier. What the map leaves out: a tier's rate above a
    /// threshold is the standard rate above it scaled as the tier scales the base rate (a batch
    /// discount applies to long prompts too); else, in order, the standard rate at that
    /// threshold, the tier's base rate, the standard base rate.
    fn rate(&self, class: Class, threshold: u64, tier: ServiceTier) -> Option<PicoPerToken> {
        let get = |n: u64, t: ServiceTier| self.0.get(&(class, n, t)).copied();
        let std = ServiceTier::Standard;
        if let Some(rate) = get(threshold, tier) {
            return Some(rate);
        }
        if threshold > 0
            && tier != std
            && let (Some(tier_base), Some(std_above), Some(std_base)) =
                (get(0, tier), get(threshold, std), get(0, std))
            && std_base > 0
        {
            let scaled = (u128::from(std_above) * u128::from(tier_base) + u128::from(std_base / 2))
                / u128::from(std_base);
            return u64::try_from(scaled).ok();
        }
        [(threshold, std), (0, tier), (0, std)]
            .into_iter()
            .find_map(|(n, t)| get(n, t))
    }

    /// Audio rates, when the map gives an audio input or output rate: a missing one is the
    /// text rate of its class (cached audio: the text cached rate, which is what OpenAI
    /// publishes for the realtime models whose entries leave it out).
    fn audio(&self, threshold: u64, tier: ServiceTier, text: &Rates) -> Option<AudioRates> {
        let rate = |class| self.rate(class, threshold, tier);
        let (input, output) = (rate(Class::AudioInput), rate(Class::AudioOutput));
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(AudioRates {
            input: input.unwrap_or(text.input),
            cached_input: rate(Class::AudioCached).unwrap_or(text.cached_input),
            output: output.unwrap_or(text.output),
        })
    }

    /// All classes at a threshold in a tier. A class the map prices nowhere costs what the
    /// cheaper class it refines costs: cache reads and writes the input rate, one-hour writes
    /// the five-minute rate.
    fn rates(&self, threshold: u64, tier: ServiceTier) -> Rates {
        let rate = |class| self.rate(class, threshold, tier);
        let input = rate(Class::Input).unwrap_or(0);
        let output = rate(Class::Output).unwrap_or(0);
        let cache_write = rate(Class::CacheWrite).unwrap_or(input);
        let mut rates = Rates {
            input,
            output,
            cached_input: rate(Class::Cached)
                .or_else(|| rate(Class::CacheHit))
                .unwrap_or(input),
            cache_write,
            cache_write_1h: rate(Class::CacheWrite1h).unwrap_or(cache_write),
            audio: None,
        };
        rates.audio = self.audio(threshold, tier, &rates);
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price_of(json: &str) -> Price {
        let map = parse(format!(r#"{{"m": {json}}}"#).as_bytes()).unwrap();
        map.models["m"].price.clone()
    }

    #[test]
    fn rate_fields_are_read_by_base_threshold_and_tier() {
        assert_eq!(
            rate_field("input_cost_per_token"),
            Some((Class::Input, 0, ServiceTier::Standard))
        );
        assert_eq!(
            rate_field("cache_creation_input_token_cost_above_1hr_above_200k_tokens"),
            Some((Class::CacheWrite1h, 200_000, ServiceTier::Standard))
        );
        assert_eq!(
            rate_field("input_cost_per_token_above_272k_tokens_priority"),
            Some((Class::Input, 272_000, ServiceTier::Priority))
        );
        assert_eq!(
            rate_field("output_cost_per_token_batches"),
            Some((Class::Output, 0, ServiceTier::Batch))
        );
        assert_eq!(
            rate_field("input_cost_per_audio_token"),
            Some((Class::AudioInput, 0, ServiceTier::Standard))
        );
        for other in [
            "input_cost_per_token_ultrafast",
            "cache_creation_input_token_cost_above_12hr",
            "input_cost_per_token_above_k_tokens",
            "output_cost_per_image",
        ] {
            assert_eq!(rate_field(other), None, "{other}");
        }
    }

    #[test]
    fn rates_per_token_become_pico_dollars_and_missing_classes_fall_back() {
        let price = price_of(
            r#"{"litellm_provider":"openai","input_cost_per_token":2.5e-06,"output_cost_per_token":1e-05,"cache_read_input_token_cost":1.25e-06}"#,
        );
        assert_eq!(
            price.standard.base,
            Rates {
                input: 2_500_000,
                output: 10_000_000,
                cached_input: 1_250_000,
                cache_write: 2_500_000,
                cache_write_1h: 2_500_000,
                audio: None,
            }
        );
        assert!(price.flex.is_none() && price.standard.above.is_empty());
    }

    #[test]
    fn long_context_and_tiers_fill_from_the_tier_then_the_standard_rates() {
        let price = price_of(
            r#"{"litellm_provider":"gemini","input_cost_per_token":1.25e-06,"output_cost_per_token":1e-05,
                "input_cost_per_token_above_200k_tokens":2.5e-06,"output_cost_per_token_above_200k_tokens":1.5e-05,
                "input_cost_per_token_priority":2.25e-06,"max_output_tokens":65535}"#,
        );
        let (threshold, above) = price.standard.above[0];
        assert_eq!(threshold, 200_000);
        assert_eq!((above.input, above.output), (2_500_000, 15_000_000));
        let priority = price.priority.unwrap();
        assert_eq!(
            (priority.base.input, priority.base.output),
            (2_250_000, 10_000_000)
        );
        // Above the threshold: the standard long rate scaled as priority scales the base
        // (2.5 x 2.25 / 1.25 = 4.5), and the standard long output (priority lists no output).
        assert_eq!(
            (priority.above[0].1.input, priority.above[0].1.output),
            (4_500_000, 15_000_000)
        );
        assert_eq!(price.max_output_tokens, Some(65535));
    }

    #[test]
    fn entries_without_token_prices_are_skipped_and_bad_rates_refused() {
        let map = parse(
            br#"{"sample_spec":{"input_cost_per_token":0},
                "img":{"litellm_provider":"openai","output_cost_per_image":0.04},
                "bad":{"litellm_provider":"x","input_cost_per_token":"3e-6"},
                "huge":{"litellm_provider":"x","input_cost_per_token":3.0},
                "ok":{"litellm_provider":"x","output_cost_per_token":1e-6}}"#,
        )
        .unwrap();
        assert_eq!(map.models.keys().collect::<Vec<_>>(), ["ok"]);
        assert_eq!(map.refused, 2);
        assert!(map.problems.iter().any(|p| p.starts_with("bad: ")));
        assert!(matches!(parse(b"[1]"), Err(MapError::NotAMap(_))));
        assert!(matches!(parse(b"{}"), Err(MapError::NoPrices)));
    }

    #[test]
    fn the_built_in_table_reads_with_its_source_and_date() {
        let map = parse(super::super::BUILTIN_MAP.as_bytes()).unwrap();
        assert!(map.models.len() > 3000, "{}", map.models.len());
        assert!(map.source.unwrap().contains("litellm"));
        assert_eq!(map.date.unwrap().len(), 10);
        assert_eq!(map.refused, 0, "{:?}", map.problems);
    }
}
