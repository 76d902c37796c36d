//! The price an estimate quotes: every price lookup of an estimate goes through `quote`, so a
//! change to how prices resolve (by upstream, time, tier) is made in this one place.

use crate::meter::pricing::PriceTable;
use crate::money::NanoUsd;
use crate::usage::ServiceTier;

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

/// The price `model` would be charged at on `upstream` now, in `tier` (the standard one when
/// the price lists no such tier), for a prompt of `input_tokens` (past a long-context
/// threshold, the rates above it); `None` when no price is known. The upstream's multiplier is
/// applied to the rates.
pub fn quote(
    prices: &PriceTable,
    upstream: Option<&str>,
    model: &str,
    input_tokens: u64,
    tier: ServiceTier,
) -> Option<Quote> {
    // No upstream: the shared prices alone (no upstream is named "").
    let resolved = prices.resolve(upstream.unwrap_or(""), model)?;
    let now = jiff::Timestamp::now().as_second();
    let (resolved, dated) = resolved.at(now)?;
    let (ladder, tier) = dated.price.ladder(tier);
    let (rates, above) = ladder.step(input_tokens);
    let ppm = u128::from(resolved.multiplier_ppm.unwrap_or(1_000_000));
    // Pico-dollars per token are nano-dollars per thousand tokens: times 1,000 per million.
    let per_million = |pico: u64| {
        let nano = u128::from(pico) * 1000 * ppm / 1_000_000;
        NanoUsd(u64::try_from(nano).unwrap_or(u64::MAX))
    };
    // The tier is said apart (`Quote::tier`), not in the label.
    let source = dated
        .label_as_applied(above, ServiceTier::Standard, resolved.multiplier_ppm)
        .to_string();
    Some(Quote {
        input: per_million(rates.input),
        output: per_million(rates.output),
        cached_input: per_million(rates.cached_input),
        cache_write: per_million(rates.cache_write),
        source,
        tier: tier.as_str().to_owned(),
        max_output_tokens: dated.price.max_output_tokens,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::meter::pricing::{Layer, LayerPrice};
    use crate::money::Price;
    use crate::usage::Usage;

    fn with(model: &str, price: Price) -> PriceTable {
        let layer = Layer {
            source: "proxy.toml".into(),
            prices: vec![LayerPrice {
                model: model.into(),
                since: None,
                price,
                provider: None,
            }],
        };
        PriceTable::new(&[], &layer, BTreeMap::new(), BTreeMap::new())
    }

    #[test]
    fn a_quote_states_per_million_rates_and_costs_as_the_meter_does() {
        let prices = PriceTable::builtin();
        let quote = quote(
            &prices,
            Some("openai"),
            "gpt-4o-2024-08-06",
            0,
            ServiceTier::Standard,
        )
        .unwrap();
        assert_eq!(quote.input, NanoUsd(2_500_000_000));
        assert_eq!(quote.output, NanoUsd(10_000_000_000));
        assert_eq!(quote.cached_input, NanoUsd(1_250_000_000));
        assert!(quote.source.starts_with("built-in 20"), "{}", quote.source);
        assert_eq!(quote.max_output_tokens, Some(16_384));
        let usage = Usage {
            input_tokens: 1234,
            output_tokens: 567,
            ..Usage::default()
        };
        let resolved = prices.resolve("openai", "gpt-4o").unwrap();
        assert_eq!(
            quote.cost(1234, 567),
            resolved.at(0).unwrap().1.price.cost(&usage)
        );
    }

    #[test]
    fn a_cost_is_rounded_once_to_the_nano_dollar_as_the_meter_rounds_it() {
        // Half a nano-dollar per input token, a third of one per output token.
        let tiny = Price::per_million(0.0005, 0.000_333, 0.0, 0.0);
        let prices = with("tiny", tiny.clone());
        let quote = quote(&prices, None, "tiny", 0, ServiceTier::Standard).unwrap();
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
        let prices = with("gpt-4o", Price::per_million(1.0, 2.0, 0.5, 1.0));
        let quote = quote(&prices, None, "gpt-4o", 0, ServiceTier::Standard).unwrap();
        assert_eq!(quote.source, "proxy.toml: gpt-4o");
        assert_eq!(quote.output, NanoUsd(2_000_000_000));
        assert_eq!(
            super::quote(&prices, None, "no-such-model", 0, ServiceTier::Standard),
            None
        );
    }

    #[test]
    fn a_request_for_the_priority_tier_is_quoted_at_its_rates() {
        let prices = PriceTable::builtin();
        let standard = quote(&prices, None, "gpt-4o", 10, ServiceTier::Standard).unwrap();
        let priority = quote(&prices, None, "gpt-4o", 10, ServiceTier::Priority).unwrap();
        assert_eq!(priority.tier, "priority");
        assert!(priority.input > standard.input);
    }

    #[test]
    fn a_long_prompt_is_quoted_at_the_long_context_rates() {
        let prices = PriceTable::builtin();
        let short = quote(&prices, None, "gemini-2.5-pro", 1000, ServiceTier::Standard).unwrap();
        let long = quote(
            &prices,
            None,
            "gemini-2.5-pro",
            250_000,
            ServiceTier::Standard,
        )
        .unwrap();
        assert!(long.input > short.input);
        assert!(long.source.ends_with(", above 200k"), "{}", long.source);
    }
}
