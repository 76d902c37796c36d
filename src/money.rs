//! Money: amounts in integer nano-dollars, so sums never drift, and the price of one model per
//! token class, with the integer arithmetic that turns a `Usage` into an amount.

use std::fmt;

use crate::usage::Usage;

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

/// Price of one token in pico-dollars (10^-12 USD): exact for any price given to six decimals per million.
type PicoPerToken = u64;

/// What one model costs, per token class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    input: PicoPerToken,
    output: PicoPerToken,
    cached_input: PicoPerToken,
    cache_write: PicoPerToken,
}

impl Price {
    /// A price from USD per million tokens (the unit providers publish).
    pub fn per_million(input: f64, output: f64, cached_input: f64, cache_write: f64) -> Self {
        Self {
            input: pico_per_token(input),
            output: pico_per_token(output),
            cached_input: pico_per_token(cached_input),
            cache_write: pico_per_token(cache_write),
        }
    }

    /// Cost of one request: each token class at its price, rounded once to the nearest nano-dollar.
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        let pico = u128::from(usage.input_tokens) * u128::from(self.input)
            + u128::from(usage.cached_input_tokens) * u128::from(self.cached_input)
            + u128::from(usage.cache_write_tokens) * u128::from(self.cache_write)
            + u128::from(usage.output_tokens) * u128::from(self.output);
        let nano = (pico + 500) / 1000;
        NanoUsd(u64::try_from(nano).unwrap_or(u64::MAX))
    }
}

/// $/million tokens is 10^-6 $/token, and 10^-6 $ is 10^6 pico-dollars: the number itself, times 10^6.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "config validation keeps prices within 0..=1e6, so the product fits u64"
)]
fn pico_per_token(usd_per_million: f64) -> PicoPerToken {
    (usd_per_million * 1e6).round() as u64
}
