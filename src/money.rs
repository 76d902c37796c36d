//! Money: amounts in integer nano-dollars, so sums never drift, and the price of one model per
//! token class, with the integer arithmetic that turns a `Usage` into an amount.

use std::fmt;

use crate::usage::{ServiceTier, Usage};

/// An amount of money in billionths of a US dollar; sums of it never drift.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(pub u64);

/// Why an amount of dollars cannot be a budget. Each carries the amount as given, rendered short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Zero, negative, or not a number.
    #[error("must be a positive amount of dollars, got {0}")]
    NotPositive(String),
    /// Positive, but under half a nano-dollar: it would be a limit of $0.
    #[error("must be at least $0.000000001 (it would round to $0), got {0}")]
    RoundsToZero(String),
    /// More nano-dollars than a `u64` holds.
    #[error("must be at most $18446744073.709551615, got {0}")]
    TooLarge(String),
}

/// 2^64 as a float: the first nano-dollar count a `u64` cannot hold.
const NANO_LIMIT: f64 = 18_446_744_073_709_551_616.0;

impl NanoUsd {
    /// The largest amount: $18,446,744,073.709551615.
    pub const MAX: Self = Self(u64::MAX);

    /// A positive amount of dollars, rounded to the nano-dollar: at least one nano-dollar once
    /// rounded, at most `MAX`.
    pub fn from_usd(usd: f64) -> Result<Self, AmountError> {
        if !(usd.is_finite() && usd > 0.0) {
            return Err(AmountError::NotPositive(short(usd)));
        }
        let nano = (usd * 1e9).round();
        if nano < 1.0 {
            return Err(AmountError::RoundsToZero(short(usd)));
        }
        if nano >= NANO_LIMIT {
            return Err(AmountError::TooLarge(short(usd)));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked: 1 <= nano < 2^64, and it is a whole number"
        )]
        Ok(Self(nano as u64))
    }

    /// The amount in dollars, for display only.
    #[expect(
        clippy::cast_precision_loss,
        reason = "display only; exact value is kept as integer"
    )]
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

/// Significant digits a cost is written with.
const SIGNIFICANT_DIGITS: u32 = 4;

impl fmt::Display for NanoUsd {
    /// A cost as every text view writes it: four significant digits, rounded half up, and never
    /// fewer than two decimals (`$0.0004175`, `$0.0122`, `$1.235`, `$123.46`, `$0.00`); zeros
    /// past the second decimal are left out (`$0.000068`, `$0.75`). A small cost never reads as
    /// free, and two costs that differ in their first four digits never read the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nano = self.0;
        let digits = nano.checked_ilog10().map_or(1, |log| log + 1);
        // A nano-dollar is the ninth decimal.
        let decimals = (9 + SIGNIFICANT_DIGITS).saturating_sub(digits).clamp(2, 9);
        let unit = 10_u64.pow(9 - decimals);
        // `nano % unit < unit <= 10^7`: doubling it cannot overflow, and dividing first keeps
        // `u64::MAX` from overflowing.
        let rounded = nano / unit + u64::from(nano % unit * 2 >= unit && unit > 1);
        let scale = 10_u64.pow(decimals);
        let fraction = format!("{:0width$}", rounded % scale, width = decimals as usize);
        let kept = fraction.trim_end_matches('0').len().max(2);
        write!(f, "${}.{}", rounded / scale, &fraction[..kept])
    }
}

/// An amount as given, for a message: as written when that is short, else in scientific
/// notation (`1e308` would otherwise be rendered as 309 digits).
fn short(usd: f64) -> String {
    let plain = usd.to_string();
    if plain.len() <= 24 {
        plain
    } else {
        format!("{usd:e}")
    }
}

/// Price of one token in pico-dollars (10^-12 USD): exact for any price given to six decimals
/// per million, and within half a pico-dollar a token of any other.
pub type PicoPerToken = u64;

/// The largest rate believed: $1 a token (a million dollars per million). A price map's larger
/// value is a mistake of units.
pub const MAX_RATE: PicoPerToken = 1_000_000_000_000;

/// What one token of each class costs, in one tier, below or above a prompt length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Uncached input.
    pub input: PicoPerToken,
    /// All output, reasoning included.
    pub output: PicoPerToken,
    /// Input read from the provider's cache.
    pub cached_input: PicoPerToken,
    /// Input written to the cache for five minutes (Anthropic's default), or any cache write
    /// where a provider has one price for them.
    pub cache_write: PicoPerToken,
    /// Input written to the cache for an hour (Anthropic's `ttl: "1h"`).
    pub cache_write_1h: PicoPerToken,
    /// Audio tokens' own rates (the Realtime API's), when the price has them: without them a
    /// response with audio is priced for its text and flagged unpriced.
    pub audio: Option<AudioRates>,
}

/// What one audio token costs (the Realtime API bills audio apart from text).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AudioRates {
    /// Uncached audio input.
    pub input: PicoPerToken,
    /// Audio input read from the cache.
    pub cached_input: PicoPerToken,
    /// Audio output.
    pub output: PicoPerToken,
}

impl Rates {
    /// Rates from USD per million tokens (the unit providers publish).
    pub fn per_million(input: f64, output: f64, cached_input: f64, cache_write: f64) -> Self {
        let cache_write = pico_per_token(cache_write);
        Self {
            input: pico_per_token(input),
            output: pico_per_token(output),
            cached_input: pico_per_token(cached_input),
            cache_write,
            cache_write_1h: cache_write,
            audio: None,
        }
    }

    /// The rates in USD per million tokens, for display: input, output, cached input, cache
    /// write, one-hour cache write.
    #[expect(
        clippy::cast_precision_loss,
        reason = "display only; rates are at most 10^12"
    )]
    pub fn usd_per_million(&self) -> [f64; 5] {
        [
            self.input,
            self.output,
            self.cached_input,
            self.cache_write,
            self.cache_write_1h,
        ]
        .map(|pico| pico as f64 / 1e6)
    }

    /// Cost of `usage` at these rates in pico-dollars, before rounding.
    fn pico(&self, usage: &Usage) -> u128 {
        let write_1h = usage.cache_write_1h_tokens.min(usage.cache_write_tokens);
        u128::from(usage.input_tokens) * u128::from(self.input)
            + u128::from(usage.cached_input_tokens) * u128::from(self.cached_input)
            + u128::from(usage.cache_write_tokens - write_1h) * u128::from(self.cache_write)
            + u128::from(write_1h) * u128::from(self.cache_write_1h)
            + u128::from(usage.output_tokens) * u128::from(self.output)
    }
}

/// A tier's rates: its base rates, and the rates a request takes once its prompt is longer than
/// a threshold (the whole request, as Anthropic and Google bill long context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    /// Rates for prompts up to the first threshold.
    pub base: Rates,
    /// (threshold in prompt tokens, rates above it), thresholds ascending.
    pub above: Vec<(u64, Rates)>,
}

impl Ladder {
    /// Rates with no long-context step.
    pub fn flat(base: Rates) -> Self {
        Self {
            base,
            above: Vec::new(),
        }
    }

    /// The rates for a prompt of `prompt_tokens`, and the threshold it crossed, if any.
    pub fn step(&self, prompt_tokens: u64) -> (&Rates, Option<u64>) {
        self.above
            .iter()
            .rev()
            .find(|(threshold, _)| prompt_tokens > *threshold)
            .map_or((&self.base, None), |(threshold, rates)| {
                (rates, Some(*threshold))
            })
    }
}

/// What one model costs: standard rates, and those of the service tiers the price map lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// The standard tier's rates.
    pub standard: Ladder,
    /// OpenAI's `flex` tier (and Google's), when listed.
    pub flex: Option<Ladder>,
    /// The `priority` tier, when listed.
    pub priority: Option<Ladder>,
    /// Batch requests (`_batches` rates), when listed.
    pub batch: Option<Ladder>,
    /// The model's output limit, when the price map gives one (for estimates).
    pub max_output_tokens: Option<u64>,
}

/// The cost of one request, and the rates it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The cost, rounded once to the nearest nano-dollar.
    pub cost: NanoUsd,
    /// The tier whose rates were used: the one reported when the price lists it, else standard.
    pub tier: ServiceTier,
    /// The long-context threshold the prompt crossed, when it did.
    pub above: Option<u64>,
    /// False when the request had audio tokens and the price no audio rates: its cost is then
    /// its text's alone.
    pub is_audio_priced: bool,
}

impl Price {
    /// One set of rates for every request (what `[pricing."MODEL"]` in proxy.toml gives).
    pub fn flat(rates: Rates) -> Self {
        Self {
            standard: Ladder::flat(rates),
            flex: None,
            priority: None,
            batch: None,
            max_output_tokens: None,
        }
    }

    /// A flat price from USD per million tokens.
    pub fn per_million(input: f64, output: f64, cached_input: f64, cache_write: f64) -> Self {
        Self::flat(Rates::per_million(input, output, cached_input, cache_write))
    }

    /// The ladder of `tier`, falling back to the standard one when the price lists none.
    pub fn ladder(&self, tier: ServiceTier) -> (&Ladder, ServiceTier) {
        let listed = match tier {
            ServiceTier::Standard => None,
            ServiceTier::Flex => self.flex.as_ref(),
            ServiceTier::Priority => self.priority.as_ref(),
            ServiceTier::Batch => self.batch.as_ref(),
        };
        listed.map_or((&self.standard, ServiceTier::Standard), |ladder| {
            (ladder, tier)
        })
    }

    /// Cost of one request in `tier`: each token class at its rate, the whole request at the
    /// long-context rates once its prompt crosses a threshold, rounded once.
    /// `audio` is the part of `usage` that was audio, at the audio rates when the price has
    /// them.
    pub fn charge(&self, usage: &Usage, audio: &Usage, tier: ServiceTier) -> Charge {
        let (ladder, tier) = self.ladder(tier);
        let (rates, above) = ladder.step(usage.prompt_tokens());
        let has_audio = audio.total_tokens() > 0;
        let mut pico = rates.pico(&usage.without(audio));
        if has_audio && let Some(a) = rates.audio {
            pico += u128::from(audio.input_tokens) * u128::from(a.input)
                + u128::from(audio.cached_input_tokens) * u128::from(a.cached_input)
                + u128::from(audio.output_tokens) * u128::from(a.output);
        }
        let nano = (pico + 500) / 1000;
        Charge {
            cost: NanoUsd(u64::try_from(nano).unwrap_or(u64::MAX)),
            tier,
            above,
            is_audio_priced: !has_audio || rates.audio.is_some(),
        }
    }

    /// Cost of one standard-tier request.
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        self.charge(usage, &Usage::default(), ServiceTier::Standard)
            .cost
    }
}

/// $/million tokens is 10^-6 $/token, and 10^-6 $ is 10^6 pico-dollars: the number itself, times 10^6.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "callers keep prices within 0..=1e6 per million, so the product fits u64"
)]
pub fn pico_per_token(usd_per_million: f64) -> PicoPerToken {
    (usd_per_million * 1e6).round() as u64
}

/// A rate in USD per token (a price map's unit) in pico-dollars, when it is a believable one:
/// a finite number from 0 to `MAX_RATE`.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked: 0 <= pico <= 10^12"
)]
pub fn pico_from_usd_per_token(usd: f64) -> Option<PicoPerToken> {
    let pico = (usd * 1e12).round();
    #[expect(clippy::cast_precision_loss, reason = "10^12 is exact in f64")]
    let max = MAX_RATE as f64;
    (usd.is_finite() && (0.0..=max).contains(&pico)).then_some(pico as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_any_amount_from_a_nano_dollar_to_the_largest_u64() {
        assert_eq!(NanoUsd::from_usd(1.5), Ok(NanoUsd(1_500_000_000)));
        assert_eq!(NanoUsd::from_usd(1e-9), Ok(NanoUsd(1)));
        // Half a nano-dollar rounds up to one.
        assert_eq!(NanoUsd::from_usd(5e-10), Ok(NanoUsd(1)));
        // A billion dollars and more, up to what a u64 of nano-dollars holds.
        assert_eq!(
            NanoUsd::from_usd(1e9),
            Ok(NanoUsd(1_000_000_000_000_000_000))
        );
        assert_eq!(
            NanoUsd::from_usd(1e10),
            Ok(NanoUsd(10_000_000_000_000_000_000))
        );
        let near_max = NanoUsd::from_usd(18_446_744_073.709_55).unwrap();
        assert!(near_max.0 > 18_446_744_073_709_000_000, "{near_max:?}");
    }

    #[test]
    fn budgets_out_of_range_are_refused_with_a_short_reason() {
        for (usd, expected) in [
            (0.0, "must be a positive amount of dollars, got 0"),
            (-1.0, "must be a positive amount of dollars, got -1"),
            (f64::NAN, "must be a positive amount of dollars, got NaN"),
            (
                f64::INFINITY,
                "must be a positive amount of dollars, got inf",
            ),
            (
                1e-12,
                "must be at least $0.000000001 (it would round to $0), got 0.000000000001",
            ),
            (
                4e-10,
                "must be at least $0.000000001 (it would round to $0), got 0.0000000004",
            ),
            (
                1e-300,
                "must be at least $0.000000001 (it would round to $0), got 1e-300",
            ),
            (
                1.9e10,
                "must be at most $18446744073.709551615, got 19000000000",
            ),
            (1e308, "must be at most $18446744073.709551615, got 1e308"),
        ] {
            let err = NanoUsd::from_usd(usd).unwrap_err();
            assert_eq!(err.to_string(), expected, "{usd}");
        }
        // The first amount past the largest.
        assert!(matches!(
            NanoUsd::from_usd(18_446_744_073.709_552),
            Err(AmountError::TooLarge(_))
        ));
    }

    #[test]
    fn the_largest_amount_is_displayed_without_overflow() {
        assert_eq!(NanoUsd::MAX.to_string(), "$18446744073.71");
        assert_eq!(NanoUsd(99_995_000).to_string(), "$0.10");
        assert_eq!(NanoUsd(99_994_999).to_string(), "$0.09999");
    }

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn worked_check_one_million_each_way_is_eighteen_dollars() {
        let price = Price::per_million(3.0, 15.0, 0.3, 3.75);
        let cost = price.cost(&usage(1_000_000, 0, 1_000_000));
        assert_eq!(cost, NanoUsd(18_000_000_000));
        assert_eq!(cost.to_string(), "$18.00");
    }

    #[test]
    fn worked_check_small_request_is_six_tenths_of_a_cent() {
        let price = Price::per_million(3.0, 15.0, 0.3, 3.75);
        let cost = price.cost(&usage(1_000, 0, 200));
        assert_eq!(cost, NanoUsd(6_000_000));
        assert!((cost.as_usd() - 0.006).abs() < f64::EPSILON);
    }

    #[test]
    fn cached_and_cache_write_tokens_use_their_own_prices() {
        let price = Price::per_million(2.0, 8.0, 0.5, 2.5);
        let mut u = usage(1_000, 4_000, 100);
        u.cache_write_tokens = 2_000;
        // (1000 x 2 + 4000 x 0.5 + 2000 x 2.5 + 100 x 8) / 1M = 9800 / 1M dollars
        assert_eq!(price.cost(&u), NanoUsd(9_800_000));
    }

    #[test]
    fn one_hour_cache_writes_take_their_own_rate_and_the_rest_the_five_minute_one() {
        let mut rates = Rates::per_million(3.0, 15.0, 0.3, 3.75);
        rates.cache_write_1h = pico_per_token(6.0);
        let price = Price::flat(rates);
        let mut u = usage(0, 0, 0);
        u.cache_write_tokens = 300;
        u.cache_write_1h_tokens = 200;
        // 100 x 3.75 + 200 x 6 = 1575 millionths of a dollar.
        assert_eq!(price.cost(&u), NanoUsd(1_575_000));
        // A 1-hour part larger than the whole is cut to it.
        u.cache_write_1h_tokens = 500;
        assert_eq!(price.cost(&u), NanoUsd(1_800_000));
    }

    #[test]
    fn sums_of_many_small_costs_do_not_drift() {
        let price = Price::per_million(0.15, 0.60, 0.075, 0.15);
        let one = price.cost(&usage(10, 0, 10));
        assert_eq!(one, NanoUsd(7_500));
        let total: u64 = (0..1_000_000).map(|_| one.0).sum();
        assert_eq!(total, 7_500_000_000);
    }

    #[test]
    fn dollars_render_with_four_significant_digits_and_two_decimals_at_least() {
        assert_eq!(NanoUsd(12_200_000).to_string(), "$0.0122");
        assert_eq!(NanoUsd(0).to_string(), "$0.00");
        assert_eq!(NanoUsd(1_234_567_890_123).to_string(), "$1234.57");
        assert_eq!(NanoUsd(21_150).to_string(), "$0.00002115");
        assert_eq!(NanoUsd(1).to_string(), "$0.000000001");
        assert_eq!(NanoUsd(99_999).to_string(), "$0.0001");
        assert_eq!(NanoUsd(417_500).to_string(), "$0.0004175");
    }
}
