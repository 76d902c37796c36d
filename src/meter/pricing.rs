//! Prices per model: the built-in table, the configured ones over it, and dated snapshots
//! resolving to their base model.

use std::collections::HashMap;

pub use crate::money::{AmountError, NanoUsd, Price};

/// Prices by model name, with dated snapshots resolving to their base model.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    /// The built-in table (see `BUILTIN` for its date and sources).
    pub fn builtin() -> Self {
        let models = BUILTIN
            .iter()
            .map(|&(name, input, output, cached, write)| {
                (
                    name.to_owned(),
                    Price::per_million(input, output, cached, write),
                )
            })
            .collect();
        Self { models }
    }

    /// Adds or replaces one model's price.
    pub fn set(&mut self, model: String, price: Price) {
        self.models.insert(model, price);
    }

    /// The built-in table with `configured` prices over it.
    pub fn with_configured<'a>(
        configured: impl IntoIterator<Item = (&'a String, &'a Price)>,
    ) -> Self {
        let mut table = Self::builtin();
        for (model, price) in configured {
            table.set(model.clone(), *price);
        }
        table
    }

    /// The price for a model: exact name first, then with its date/version suffix and
    /// `vendor/` prefix removed (`gpt-4o-2024-08-06` → `gpt-4o`, `openai/gpt-4o` → `gpt-4o`).
    pub fn resolve(&self, model: &str) -> Option<&Price> {
        if let Some(price) = self.models.get(model) {
            return Some(price);
        }
        let mut name = model.rsplit_once('/').map_or(model, |(_, base)| base);
        loop {
            if let Some(price) = self.models.get(name) {
                return Some(price);
            }
            name = strip_snapshot_suffix(name)?;
        }
    }
}

/// Removes one trailing snapshot marker: `-2024-08-06`, `-20241022`, `@20241022`, `-0613`,
/// `-001`, `-latest`, or `-preview-05-20`; `None` when there is none left.
fn strip_snapshot_suffix(name: &str) -> Option<&str> {
    if let Some(base) = name.strip_suffix("-latest") {
        return Some(base);
    }
    if let Some((base, _)) = name.rsplit_once('@') {
        return Some(base);
    }
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let is_tag = |s: &str| s == "preview" || s == "exp";
    // Dated groups go at once: `-2024-08-06`, `-preview-05-20`.
    let parts: Vec<&str> = name.rsplitn(4, '-').collect();
    if let [day, month, year, base] = parts[..]
        && digits(day, 2)
        && digits(month, 2)
        && (digits(year, 4) || is_tag(year))
    {
        return Some(base);
    }
    let (base, last) = name.rsplit_once('-')?;
    (digits(last, 8) || digits(last, 4) || digits(last, 3) || is_tag(last)).then_some(base)
}

/// Built-in prices in USD per million tokens: (model, input, output, cached input, cache write).
///
/// Published list prices as of 2025-11 (standard tier, prompts up to 200k tokens where a
/// provider charges more above). Providers change prices: override any of them in proxy.toml.
/// Where a provider has no cache-write charge, cache writes cost the input price.
const BUILTIN: &[(&str, f64, f64, f64, f64)] = &[
    // OpenAI
    ("gpt-5", 1.25, 10.0, 0.125, 1.25),
    ("gpt-5-mini", 0.25, 2.0, 0.025, 0.25),
    ("gpt-5-nano", 0.05, 0.40, 0.005, 0.05),
    ("gpt-5-chat", 1.25, 10.0, 0.125, 1.25),
    ("gpt-5.1", 1.25, 10.0, 0.125, 1.25),
    ("gpt-4.1", 2.0, 8.0, 0.50, 2.0),
    ("gpt-4.1-mini", 0.40, 1.60, 0.10, 0.40),
    ("gpt-4.1-nano", 0.10, 0.40, 0.025, 0.10),
    ("gpt-4o", 2.50, 10.0, 1.25, 2.50),
    ("gpt-4o-mini", 0.15, 0.60, 0.075, 0.15),
    ("chatgpt-4o", 5.0, 15.0, 5.0, 5.0),
    ("gpt-4-turbo", 10.0, 30.0, 10.0, 10.0),
    ("gpt-4", 30.0, 60.0, 30.0, 30.0),
    ("gpt-3.5-turbo", 0.50, 1.50, 0.50, 0.50),
    ("o1", 15.0, 60.0, 7.50, 15.0),
    ("o1-mini", 1.10, 4.40, 0.55, 1.10),
    ("o3", 2.0, 8.0, 0.50, 2.0),
    ("o3-mini", 1.10, 4.40, 0.55, 1.10),
    ("o3-pro", 20.0, 80.0, 20.0, 20.0),
    ("o4-mini", 1.10, 4.40, 0.275, 1.10),
    ("text-embedding-3-small", 0.02, 0.0, 0.02, 0.02),
    ("text-embedding-3-large", 0.13, 0.0, 0.13, 0.13),
    ("text-embedding-ada-002", 0.10, 0.0, 0.10, 0.10),
    // Anthropic: cache reads at 0.1x input, 5-minute cache writes at 1.25x input.
    ("claude-opus-4-5", 5.0, 25.0, 0.50, 6.25),
    ("claude-opus-4-1", 15.0, 75.0, 1.50, 18.75),
    ("claude-opus-4", 15.0, 75.0, 1.50, 18.75),
    ("claude-sonnet-4-5", 3.0, 15.0, 0.30, 3.75),
    ("claude-sonnet-4", 3.0, 15.0, 0.30, 3.75),
    ("claude-3-7-sonnet", 3.0, 15.0, 0.30, 3.75),
    ("claude-3-5-sonnet", 3.0, 15.0, 0.30, 3.75),
    ("claude-haiku-4-5", 1.0, 5.0, 0.10, 1.25),
    ("claude-3-5-haiku", 0.80, 4.0, 0.08, 1.0),
    ("claude-3-haiku", 0.25, 1.25, 0.03, 0.30),
    ("claude-3-opus", 15.0, 75.0, 1.50, 18.75),
    // Google
    ("gemini-2.5-pro", 1.25, 10.0, 0.125, 1.25),
    ("gemini-2.5-flash", 0.30, 2.50, 0.03, 0.30),
    ("gemini-2.5-flash-lite", 0.10, 0.40, 0.01, 0.10),
    ("gemini-2.0-flash", 0.10, 0.40, 0.025, 0.10),
    ("gemini-2.0-flash-lite", 0.075, 0.30, 0.075, 0.075),
    ("gemini-1.5-pro", 1.25, 5.0, 0.3125, 1.25),
    ("gemini-1.5-flash", 0.075, 0.30, 0.01875, 0.075),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;

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
    fn sums_of_many_small_costs_do_not_drift() {
        let price = Price::per_million(0.15, 0.60, 0.075, 0.15);
        let one = price.cost(&usage(10, 0, 10));
        assert_eq!(one, NanoUsd(7_500));
        let total: u64 = (0..1_000_000).map(|_| one.0).sum();
        assert_eq!(total, 7_500_000_000);
    }

    #[test]
    fn snapshots_resolve_to_base_models() {
        let t = PriceTable::builtin();
        let base = t.resolve("gpt-4o").copied();
        assert!(base.is_some());
        for name in [
            "gpt-4o-2024-08-06",
            "openai/gpt-4o",
            "gpt-4o-latest",
            "openrouter/openai/gpt-4o-2024-11-20",
        ] {
            assert_eq!(t.resolve(name).copied(), base, "{name}");
        }
        assert_eq!(
            t.resolve("claude-3-5-sonnet-20241022"),
            t.resolve("claude-3-5-sonnet")
        );
        assert_eq!(
            t.resolve("claude-sonnet-4-5@20250929"),
            t.resolve("claude-sonnet-4-5")
        );
        assert_eq!(t.resolve("gpt-4-0613"), t.resolve("gpt-4"));
        assert_eq!(t.resolve("gemini-1.5-pro-002"), t.resolve("gemini-1.5-pro"));
        assert_eq!(
            t.resolve("gemini-2.5-flash-preview-05-20"),
            t.resolve("gemini-2.5-flash")
        );
        // A mini model must not fall back to its larger sibling.
        assert_ne!(t.resolve("gpt-4o-mini-2024-07-18"), base.as_ref());
        assert_eq!(
            t.resolve("gpt-4o-mini-2024-07-18"),
            t.resolve("gpt-4o-mini")
        );
    }

    #[test]
    fn unknown_models_have_no_price() {
        let t = PriceTable::builtin();
        assert!(t.resolve("llama-3-70b").is_none());
        assert!(t.resolve("").is_none());
        assert!(t.resolve("-").is_none());
        assert!(t.resolve("my-2024-01-01").is_none());
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
