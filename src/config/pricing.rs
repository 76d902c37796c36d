//! Price settings: `[pricing."MODEL"]` (dated or not), `[models] alias`, `pricing_file`, where
//! `prices update` keeps its download, and each upstream's multiplier and own prices.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::file::{FileConfig, UpstreamEntry};
use super::{ConfigError, Flags, Layers, env, invalid};
use crate::money::{Price, Rates, pico_per_token};

/// The file `llm-meter prices update` writes in the data directory, read at start over the
/// built-in table.
pub const DOWNLOADED_FILE: &str = "prices.json";

/// One configured price of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Configured {
    /// When it takes effect, in seconds since the Unix epoch (UTC midnight of the date given);
    /// `None` for always.
    pub since: Option<i64>,
    /// The rates.
    pub price: Price,
}

/// Prices as configured, applied over the built-in table at start and on SIGHUP.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// `[pricing."MODEL"]`: wins over every file.
    pub prices: BTreeMap<String, Vec<Configured>>,
    /// `[models] alias`: a name to the model id that prices it.
    pub aliases: BTreeMap<String, String>,
    /// `pricing_file`: a LiteLLM-format price map over the built-in table.
    pub file: Option<PathBuf>,
    /// Where `prices update` keeps `prices.json`: the data directory, when there is one.
    pub downloaded: Option<PathBuf>,
    /// Per upstream: `pricing_multiplier` and `[upstreams.NAME.pricing."MODEL"]`.
    pub upstreams: BTreeMap<String, UpstreamPricing>,
}

/// One upstream's price settings.
#[derive(Debug, Clone, Default)]
pub struct UpstreamPricing {
    /// `pricing_multiplier`, in parts per million (1.05 is 1,050,000).
    pub multiplier_ppm: Option<u64>,
    /// Its own prices, exact, multiplier not applied.
    pub prices: BTreeMap<String, Vec<Configured>>,
}

/// `[pricing."MODEL"]`: one table, or several (`[[pricing."MODEL"]]`) each with its `since`.
#[derive(Debug)]
pub(super) enum PriceEntries {
    One(PriceEntry),
    Dated(Vec<PriceEntry>),
}

/// By hand rather than `#[serde(untagged)]`, so that a mistake inside a table is reported as
/// the field it is (`missing field output_per_million`), not as "no variant matched".
impl<'de> Deserialize<'de> for PriceEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = PriceEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of prices, or an array of them each with `since`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                PriceEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PriceEntries::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(PriceEntries::Dated)
            }
        }
        deserializer.deserialize_any(Entries)
    }
}

/// One price, in USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PriceEntry {
    input_per_million: f64,
    output_per_million: f64,
    cached_input_per_million: Option<f64>,
    cache_write_per_million: Option<f64>,
    cache_write_1h_per_million: Option<f64>,
    since: Option<toml::value::Datetime>,
}

/// `[models]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModelsEntry {
    #[serde(default)]
    alias: BTreeMap<String, String>,
}

/// The price settings of the file, environment and flags.
pub(super) fn settings(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
    data_dir: Option<PathBuf>,
) -> Result<Pricing, ConfigError> {
    let name = layer.file_name;
    let file_path = match (&flags.pricing_file, layer.env.get(env::PRICING_FILE)) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(path)) => Some(PathBuf::from(path)),
        (None, None) => file.pricing_file.clone(),
    }
    .filter(|p| !p.as_os_str().is_empty());
    let aliases = file
        .models
        .as_ref()
        .map(|m| m.alias.clone())
        .unwrap_or_default();
    for (alias, target) in &aliases {
        if alias.is_empty() || target.is_empty() {
            return Err(invalid("models.alias", name, "names must not be empty"));
        }
    }
    Ok(Pricing {
        prices: prices(&file.pricing, "pricing", name)?,
        aliases,
        file: file_path,
        downloaded: data_dir.map(|dir| dir.join(DOWNLOADED_FILE)),
        upstreams: upstreams(&file.upstreams, name)?,
    })
}

fn upstreams(
    entries: &BTreeMap<String, UpstreamEntry>,
    name: &str,
) -> Result<BTreeMap<String, UpstreamPricing>, ConfigError> {
    let mut out = BTreeMap::new();
    for (upstream, entry) in entries {
        if entry.pricing_multiplier.is_none() && entry.pricing.is_empty() {
            continue;
        }
        let multiplier_ppm = entry
            .pricing_multiplier
            .map(|m| {
                multiplier(m).map_err(|r| {
                    invalid(&format!("upstreams.{upstream}.pricing_multiplier"), name, r)
                })
            })
            .transpose()?;
        let prices = prices(
            &entry.pricing,
            &format!("upstreams.{upstream}.pricing"),
            name,
        )?;
        out.insert(
            upstream.clone(),
            UpstreamPricing {
                multiplier_ppm,
                prices,
            },
        );
    }
    Ok(out)
}

/// A multiplier from 0 to 100 in parts per million.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked: 0 < m <= 100, so m x 10^6 fits u64"
)]
fn multiplier(m: f64) -> Result<u64, String> {
    if m.is_finite() && m > 0.0 && m <= 100.0 {
        Ok((m * 1e6).round() as u64)
    } else {
        Err(format!(
            "must be a number more than 0 and at most 100, got {m}"
        ))
    }
}

fn prices(
    entries: &BTreeMap<String, PriceEntries>,
    table: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<Configured>>, ConfigError> {
    let mut out = BTreeMap::new();
    for (model, entries) in entries {
        let field = format!("{table}.\"{model}\"");
        let list = match entries {
            PriceEntries::One(one) => std::slice::from_ref(one),
            PriceEntries::Dated(many) => many.as_slice(),
        };
        if list.len() > 1 && list.iter().any(|e| e.since.is_none()) {
            return Err(invalid(
                &field,
                name,
                "when a model has several prices, each needs `since`",
            ));
        }
        let mut configured = Vec::with_capacity(list.len());
        for entry in list {
            configured.push(configured_from(entry).map_err(|r| invalid(&field, name, r))?);
        }
        out.insert(model.clone(), configured);
    }
    Ok(out)
}

fn configured_from(entry: &PriceEntry) -> Result<Configured, String> {
    let check = |name: &str, v: f64| {
        if v.is_finite() && (0.0..=1_000_000.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!(
                "{name} must be a number of USD from 0 to 1000000, got {v}"
            ))
        }
    };
    let input = check("input_per_million", entry.input_per_million)?;
    let output = check("output_per_million", entry.output_per_million)?;
    let cached = check(
        "cached_input_per_million",
        entry.cached_input_per_million.unwrap_or(input),
    )?;
    let write = check(
        "cache_write_per_million",
        entry.cache_write_per_million.unwrap_or(input),
    )?;
    let mut rates = Rates::per_million(input, output, cached, write);
    if let Some(write_1h) = entry.cache_write_1h_per_million {
        let write_1h = check("cache_write_1h_per_million", write_1h)?;
        rates.cache_write_1h = pico_per_token(write_1h);
    }
    let since = entry.since.as_ref().map(since_from).transpose()?;
    Ok(Configured {
        since,
        price: Price::flat(rates),
    })
}

/// `since = 2026-01-01` (a TOML date, or a date-time with an offset): seconds since the epoch.
fn since_from(value: &toml::value::Datetime) -> Result<i64, String> {
    let text = value.to_string();
    let date = value
        .date
        .ok_or_else(|| format!("since must be a date like 2026-01-01, got {text}"))?;
    let civil = jiff::civil::Date::new(
        i16::try_from(date.year).map_err(|_| format!("since: year out of range in {text}"))?,
        i8::try_from(date.month).map_err(|_| format!("since: bad month in {text}"))?,
        i8::try_from(date.day).map_err(|_| format!("since: bad day in {text}"))?,
    )
    .map_err(|e| format!("since: {text} is not a date ({e})"))?;
    let timestamp = match (value.time, value.offset) {
        (None, _) => {
            jiff::tz::TimeZone::UTC.to_timestamp(civil.to_datetime(jiff::civil::Time::midnight()))
        }
        (Some(_), Some(_)) => text.parse::<jiff::Timestamp>(),
        (Some(_), None) => {
            return Err(format!(
                "since: {text} has a time but no offset; give a date, or add Z"
            ));
        }
    }
    .map_err(|e| format!("since: {text} ({e})"))?;
    Ok(timestamp.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_utc_midnight_of_a_date_or_an_exact_instant() {
        let date: toml::value::Datetime = "2026-01-01".parse().unwrap();
        assert_eq!(since_from(&date), Ok(1_767_225_600));
        let instant: toml::value::Datetime = "2026-01-01T06:00:00Z".parse().unwrap();
        assert_eq!(since_from(&instant), Ok(1_767_225_600 + 6 * 3600));
        let local: toml::value::Datetime = "2026-01-01T06:00:00".parse().unwrap();
        assert!(since_from(&local).is_err());
    }

    #[test]
    fn multipliers_are_parts_per_million_within_reason() {
        assert_eq!(multiplier(1.05), Ok(1_050_000));
        assert_eq!(multiplier(0.5), Ok(500_000));
        assert!(multiplier(0.0).is_err() && multiplier(f64::NAN).is_err());
        assert!(multiplier(1000.0).is_err());
    }
}
