//! The price table's resolution, tiers and dates, against the built-in table and small layers.

use super::*;
use crate::usage::{ServiceTier, Usage};

fn price_of(t: &PriceTable, model: &str) -> Option<Arc<Price>> {
    t.resolve("openai", model)
        .and_then(|r| r.at(0).map(|(_, d)| Arc::clone(&d.price)))
}

fn entry_of(t: &PriceTable, model: &str) -> Option<String> {
    t.resolve("openai", model).map(|r| r.entry.to_string())
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        ..Usage::default()
    }
}

fn layer(source: &str, prices: &[(&str, Option<UnixSeconds>, f64)]) -> Layer {
    Layer {
        source: source.into(),
        prices: prices
            .iter()
            .map(|&(model, since, input)| LayerPrice {
                model: model.into(),
                since,
                price: Price::per_million(input, input, input, input),
                provider: None,
            })
            .collect(),
    }
}

#[test]
fn snapshots_resolve_to_base_models() {
    let t = PriceTable::builtin();
    let base = price_of(&t, "gpt-4o");
    assert!(base.is_some());
    for name in ["openai/gpt-4o", "gpt-4o-latest", "GPT-4o"] {
        assert_eq!(price_of(&t, name), base, "{name}");
    }
    // A snapshot the file lists is priced as listed.
    assert_eq!(entry_of(&t, "gpt-4-0613").as_deref(), Some("gpt-4-0613"));
    // A mini model must not fall back to its larger sibling.
    assert_ne!(price_of(&t, "gpt-4o-mini-2024-07-18"), base);
}

#[test]
fn the_names_users_meet_are_priced_from_the_file() {
    let t = PriceTable::builtin();
    for (name, entry) in [
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),
        ("deepseek-chat", "deepseek-chat"),
        ("mistral-large-latest", "mistral/mistral-large-latest"),
        ("gpt-5-codex", "gpt-5-codex"),
        (
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
        ),
        (
            "claude-sonnet-4-5@20250929",
            "vertex_ai/claude-sonnet-4-5@20250929",
        ),
        ("claude-3-5-sonnet", "vertex_ai/claude-3-5-sonnet"),
        ("anthropic/claude-3.5-sonnet", "vertex_ai/claude-3-5-sonnet"),
        (
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        ),
    ] {
        assert_eq!(entry_of(&t, name).as_deref(), Some(entry), "{name}");
    }
}

#[test]
fn unknown_models_have_no_price() {
    let t = PriceTable::builtin();
    for name in ["no-such-model-xyz", "", "-", "my-2024-01-01"] {
        assert!(t.resolve("openai", name).is_none(), "{name}");
    }
}

#[test]
fn a_long_gemini_prompt_is_billed_whole_at_the_long_context_rate() {
    let t = PriceTable::builtin();
    let price = price_of(&t, "gemini-2.5-pro").unwrap();
    let short = price.charge(
        &usage(100_000, 1000),
        &Usage::default(),
        ServiceTier::Standard,
    );
    let long = price.charge(
        &usage(250_000, 1000),
        &Usage::default(),
        ServiceTier::Standard,
    );
    assert_eq!(short.above, None);
    assert_eq!(long.above, Some(200_000));
    let (_, rates) = price.standard.above[0];
    let expected = 250_000 * u128::from(rates.input) + 1000 * u128::from(rates.output);
    assert_eq!(u128::from(long.cost.0), expected.div_ceil(1000));
}

#[test]
fn a_reported_tier_takes_its_rates_and_an_unlisted_one_the_standard() {
    let t = PriceTable::builtin();
    let price = price_of(&t, "gpt-4o").unwrap();
    let standard = price.charge(&usage(1000, 1000), &Usage::default(), ServiceTier::Standard);
    let priority = price.charge(&usage(1000, 1000), &Usage::default(), ServiceTier::Priority);
    assert_eq!(priority.tier, ServiceTier::Priority);
    assert!(priority.cost > standard.cost);
    let embedding = price_of(&t, "text-embedding-3-small").unwrap();
    let flex = embedding.charge(&usage(1000, 0), &Usage::default(), ServiceTier::Flex);
    assert_eq!(flex.tier, ServiceTier::Standard);
}

#[test]
fn later_layers_win_and_dated_prices_apply_from_their_date() {
    let t = PriceTable::new(
        &[layer("built-in", &[("m", None, 1.0)])],
        &layer(
            "proxy.toml",
            &[("m", Some(1000), 2.0), ("m", Some(2000), 3.0)],
        ),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    let r = t.resolve("openai", "m").unwrap();
    let input_at = |at| r.at(at).unwrap().1.price.standard.base.input;
    assert_eq!(input_at(999), 1_000_000);
    assert_eq!(input_at(1000), 2_000_000);
    assert_eq!(input_at(5000), 3_000_000);
    assert_eq!(&*r.at(5000).unwrap().1.source, "proxy.toml");
    // A configured price covers the names responses report (`m-2024-08-06`), over the files'
    // own entry for that snapshot.
    let t = PriceTable::new(
        &[layer(
            "built-in",
            &[("m", None, 1.0), ("m-2024-08-06", None, 9.0)],
        )],
        &layer("proxy.toml", &[("m", None, 2.0)]),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    let snapshot = t.resolve("openai", "m-2024-08-06").unwrap();
    assert_eq!(
        snapshot.at(0).unwrap().1.price.standard.base.input,
        2_000_000
    );
    let undated = PriceTable::new(
        &[
            layer("a", &[("m", Some(10), 1.0)]),
            layer("b", &[("m", None, 5.0)]),
        ],
        &Layer::default(),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    assert_eq!(undated.resolve("x", "m").unwrap().versions.len(), 1);
}

#[test]
fn aliases_upstream_prices_and_multipliers_apply() {
    let upstreams = BTreeMap::from([(
        "azure".to_owned(),
        UpstreamPrices {
            multiplier_ppm: Some(1_050_000),
            prices: layer("proxy.toml upstreams.azure", &[("special", None, 7.0)]),
        },
    )]);
    let aliases = BTreeMap::from([("my-deploy".to_owned(), "m".to_owned())]);
    let t = PriceTable::new(
        &[layer("built-in", &[("m", None, 1.0)])],
        &Layer::default(),
        aliases,
        upstreams,
    );
    let r = t.resolve("azure", "my-deploy").unwrap();
    assert_eq!((&*r.entry, r.found_by), ("m", Match::Alias));
    let (charge, label) = r
        .charge(
            &usage(1_000_000, 0),
            &Usage::default(),
            ServiceTier::Standard,
            0,
        )
        .unwrap();
    assert_eq!(charge.cost, NanoUsd(1_050_000_000));
    assert_eq!(&*label, "built-in: m, x1.05");
    let own = t.resolve("azure", "special").unwrap();
    assert_eq!(own.multiplier_ppm, None);
    assert!(t.resolve("openai", "special").is_none());
}

#[test]
fn regional_ids_never_price_another_name() {
    let t = PriceTable::builtin();
    for name in [
        "o1-mini",
        "openai/o1-mini",
        "gpt-4o-realtime-preview",
        "claude-3-haiku-20240307",
    ] {
        let entry = entry_of(&t, name).unwrap_or_default();
        assert!(entry.matches('/').count() <= 1, "{name} priced as {entry}");
    }
    // Of a cloud's entries for one name, the latest snapshot (Bedrock lists Claude 3.7 Sonnet
    // under two entry kinds, the older one at another price).
    let sonnet = entry_of(&t, "claude-3-7-sonnet").unwrap();
    assert!(sonnet.contains("20250219"), "{sonnet}");
    for name in ["claude-3-5-sonnet-v2@20241022", "grok-4-fast"] {
        assert!(entry_of(&t, name).is_some(), "{name} has no price");
    }
}
