//! The price an estimate quotes: every price lookup of an estimate goes through `quote`, so a
//! change to how prices resolve (by upstream, time, tier) is made in this one place.

use std::sync::LazyLock;

use crate::meter::pricing::PriceTable;
use crate::money::NanoUsd;
use crate::usage::Usage;

/// A model's price as an estimate states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Per million uncached input tokens.
    pub input: NanoUsd,
    /// Per million output tokens.
    pub output: NanoUsd,
    /// Per million input tokens read from the provider's cache.
    pub cached_input: NanoUsd,
    /// Per million input tokens written to the provider's cache.
    pub cache_write: NanoUsd,
    /// Where the price comes from (`built-in (2025-11)`, `proxy.toml`).
    pub source: String,
    /// Which of the provider's tiers it is.
    pub tier: String,
    /// The most output tokens the model gives in one response, when the price map knows it.
    pub max_output_tokens: Option<u64>,
}

/// Tokens a rate is stated per.
const MILLION: u64 = 1_000_000;

/// The built-in table's date, as `PriceTable::builtin` documents it.
const BUILTIN_SOURCE: &str = "built-in (2025-11)";

impl Quote {
    /// What `input` tokens cost at the input rate plus `output` tokens at the output rate,
    /// rounded once to the nano-dollar, as the meter rounds a request's cost.
    pub fn cost(&self, input: u64, output: u64) -> NanoUsd {
        let nano = u128::from(input) * u128::from(self.input.0)
            + u128::from(output) * u128::from(self.output.0);
        let rounded = (nano + u128::from(MILLION / 2)) / u128::from(MILLION);
        NanoUsd(u64::try_from(rounded).unwrap_or(u64::MAX))
    }
}

/// The price `model` would be charged at on `upstream` for a prompt of `input_tokens`; `None`
/// when no price is known.
///
/// Today's table resolves by model name alone and has one tier; `upstream` and `input_tokens`
/// are here for the prices that depend on them (a reseller's, a long prompt's).
pub fn quote(
    prices: &PriceTable,
    upstream: Option<&str>,
    model: &str,
    input_tokens: u64,
) -> Option<Quote> {
    // The built-in table, to tell a configured price from a built-in one.
    static BUILTIN: LazyLock<PriceTable> = LazyLock::new(PriceTable::builtin);
    let _ = (upstream, input_tokens);
    let price = prices.resolve(model)?;
    // A price's rate per million is what a million tokens of that class cost: exact, as a
    // price is kept in pico-dollars per token.
    let per_million = |usage: Usage| price.cost(&usage);
    let source = if BUILTIN.resolve(model) == Some(price) {
        BUILTIN_SOURCE
    } else {
        "proxy.toml"
    };
    Some(Quote {
        input: per_million(Usage {
            input_tokens: MILLION,
            ..Usage::default()
        }),
        output: per_million(Usage {
            output_tokens: MILLION,
            ..Usage::default()
        }),
        cached_input: per_million(Usage {
            cached_input_tokens: MILLION,
            ..Usage::default()
        }),
        cache_write: per_million(Usage {
            cache_write_tokens: MILLION,
            ..Usage::default()
        }),
        source: source.to_owned(),
        tier: "standard".to_owned(),
        max_output_tokens: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Price;

    #[test]
    fn a_quote_states_per_million_rates_and_costs_as_the_meter_does() {
        let prices = PriceTable::builtin();
        let quote = quote(&prices, Some("openai"), "gpt-4o-2024-08-06", 0).unwrap();
        assert_eq!(quote.input, NanoUsd(2_500_000_000));
        assert_eq!(quote.output, NanoUsd(10_000_000_000));
        assert_eq!(quote.cached_input, NanoUsd(1_250_000_000));
        assert_eq!(quote.source, BUILTIN_SOURCE);
        let usage = Usage {
            input_tokens: 1234,
            output_tokens: 567,
            ..Usage::default()
        };
        let meter_price = prices.resolve("gpt-4o").unwrap();
        assert_eq!(quote.cost(1234, 567), meter_price.cost(&usage));
    }

    #[test]
    fn a_cost_is_rounded_once_to_the_nano_dollar_as_the_meter_rounds_it() {
        // Half a nano-dollar per input token, a third of one per output token.
        let tiny = Price::per_million(0.0005, 0.000_333, 0.0, 0.0);
        let configured = [("tiny".to_owned(), tiny)];
        let prices = PriceTable::with_configured(configured.iter().map(|(m, p)| (m, p)));
        let quote = quote(&prices, None, "tiny", 0).unwrap();
        for (input, output) in [(1, 0), (0, 1), (1, 1), (3, 7), (999, 1001)] {
            let usage = Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            };
            assert_eq!(
                quote.cost(input, output),
                tiny.cost(&usage),
                "{input} {output}"
            );
        }
        assert_eq!(quote.cost(1, 0), NanoUsd(1), "half a nano-dollar rounds up");
    }

    #[test]
    fn a_configured_price_is_quoted_as_from_proxy_toml() {
        let custom = Price::per_million(1.0, 2.0, 0.5, 1.0);
        let configured = [("gpt-4o".to_owned(), custom)];
        let prices = PriceTable::with_configured(configured.iter().map(|(m, p)| (m, p)));
        let quote = quote(&prices, None, "gpt-4o", 0).unwrap();
        assert_eq!(quote.source, "proxy.toml");
        assert_eq!(quote.output, NanoUsd(2_000_000_000));
        assert_eq!(super::quote(&prices, None, "no-such-model", 0), None);
    }
}
