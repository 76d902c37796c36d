//! Builds the price table from the settings: the built-in table, then `prices update`'s
//! download, then `pricing_file`, then `[pricing]` in proxy.toml, with aliases and per-upstream
//! prices; at start and again on SIGHUP.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::litellm::{self, MapError};
use super::{Layer, LayerPrice, PriceTable, UpstreamPrices, builtin_layer};
use crate::config::pricing::{Configured, Pricing};

/// Why the prices could not be loaded: a named price file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `pricing_file` could not be read.
    #[error("cannot read pricing_file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `pricing_file` is not a price map.
    #[error("pricing_file {path}: {source}")]
    Map {
        /// The file.
        path: String,
        /// What is wrong with it.
        source: MapError,
    },
}

/// The table, and lines worth logging at start (what was read, what was refused).
pub struct Loaded {
    /// The prices.
    pub table: PriceTable,
    /// One line per source read, and per problem skipped over.
    pub notes: Vec<String>,
}

/// Reads a price map file, at most `litellm::MAX_BYTES` of it.
pub fn read_map(path: &Path) -> Result<litellm::PriceMap, LoadError> {
    let shown = path.display().to_string();
    let read_error = |e: std::io::Error| LoadError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = Vec::new();
    file.take(litellm::MAX_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > litellm::MAX_BYTES {
        return Err(LoadError::Read {
            path: shown,
            reason: format!("larger than {} MiB", litellm::MAX_BYTES >> 20),
        });
    }
    litellm::parse(&text).map_err(|source| LoadError::Map {
        path: shown,
        source,
    })
}

/// The date a file was last written, `YYYY-MM-DD` UTC, for its source label.
fn modified_date(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or_else(
            || "undated".to_owned(),
            |t| t.strftime("%Y-%m-%d").to_string(),
        )
}

/// Builds the table `pricing` describes. A `pricing_file` that cannot be used is an error (it
/// was asked for by name); a download that cannot is skipped with a note (prices update
/// checked it when it was written; the built-in table still prices).
pub fn load(pricing: &Pricing) -> Result<Loaded, LoadError> {
    let builtin = builtin_layer();
    let mut notes = vec![format!(
        "{}: {} models",
        builtin.source,
        builtin.prices.len()
    )];
    let mut layers = vec![builtin];
    if let Some(path) = pricing.downloaded.as_deref().filter(|p| p.exists()) {
        match read_map(path) {
            Ok(map) => layers.push(file_layer("downloaded", path, map, &mut notes)),
            Err(e) => notes.push(format!("{e}: skipped, the other prices still apply")),
        }
    }
    if let Some(path) = pricing.file.as_deref() {
        let map = read_map(path)?;
        layers.push(file_layer("pricing_file", path, map, &mut notes));
    }
    let configured = configured_layer("proxy.toml", &pricing.prices);
    let upstreams = pricing
        .upstreams
        .iter()
        .map(|(name, own)| {
            let prices = configured_layer(&format!("proxy.toml upstreams.{name}"), &own.prices);
            let own = UpstreamPrices {
                multiplier_ppm: own.multiplier_ppm,
                prices,
            };
            (name.clone(), own)
        })
        .collect();
    let table = PriceTable::new(&layers, &configured, pricing.aliases.clone(), upstreams);
    Ok(Loaded { table, notes })
}

fn file_layer(kind: &str, path: &Path, map: litellm::PriceMap, notes: &mut Vec<String>) -> Layer {
    let label = format!("{kind} {}", modified_date(path));
    notes.push(format!(
        "{kind} {}: {} models{}",
        path.display(),
        map.models.len(),
        match map.refused {
            0 => String::new(),
            n => format!(", {n} entries refused ({})", map.problems.join("; ")),
        }
    ));
    Layer::from_map(label, map)
}

fn configured_layer(source: &str, prices: &BTreeMap<String, Vec<Configured>>) -> Layer {
    let prices = prices
        .iter()
        .flat_map(|(model, list)| {
            list.iter().map(move |c| LayerPrice {
                model: model.clone(),
                since: c.since,
                price: c.price.clone(),
                provider: None,
            })
        })
        .collect();
    Layer {
        source: source.to_owned(),
        prices,
    }
}
