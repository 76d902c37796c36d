//! Prices per model: the built-in table (LiteLLM's price map), the files and configured prices
//! over it, per-upstream prices, dated prices, and every name a model goes by.

pub mod litellm;
pub mod load;
pub mod names;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use crate::money::{AmountError, Charge, NanoUsd, Price, Rates};

/// The built-in table: LiteLLM's price map cut by `scripts/price_table.py`, with its source and
/// date. Read at start: no network is ever needed to price.
pub const BUILTIN_MAP: &str = include_str!("../../../data/prices.json");

/// Seconds since the Unix epoch, UTC: when a dated price takes effect, when a request was made.
pub type UnixSeconds = i64;

/// One price of a model from one source, in force from `since` (always, when `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Dated {
    /// When it takes effect.
    pub since: Option<UnixSeconds>,
    /// The rates.
    pub price: Arc<Price>,
    /// Where it came from: `built-in 2026-12-06`, `pricing_file 2026-12-01`, `proxy.toml`.
    pub source: Arc<str>,
    /// Its source and entry (`built-in 2026-12-06: gpt-4o`), made once, not per request.
    pub label: Arc<str>,
}

impl Dated {
    /// The label of this price as one request took it: shared when no long-context step,
    /// service tier or multiplier applied, else with those said
    /// (`built-in 2026-12-06: gemini-2.5-pro, above 200k, priority, x1.05`).
    pub fn label_as_applied(
        &self,
        above: Option<u64>,
        tier: crate::usage::ServiceTier,
        multiplier_ppm: Option<u64>,
    ) -> Arc<str> {
        use std::fmt::Write as _;
        if above.is_none()
            && tier == crate::usage::ServiceTier::Standard
            && multiplier_ppm.is_none()
        {
            return Arc::clone(&self.label);
        }
        let mut label = self.label.to_string();
        if let Some(above) = above {
            let _ = write!(label, ", above {}k", above / 1000);
        }
        if tier != crate::usage::ServiceTier::Standard {
            let _ = write!(label, ", {}", tier.as_str());
        }
        if let Some(ppm) = multiplier_ppm {
            let _ = write!(label, ", x{}", ppm_text(ppm));
        }
        Arc::from(label)
    }
}

/// Prices from one source, for `PriceTable::new`.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    /// The source's label.
    pub source: String,
    /// (model id, since, price, provider) for each price it gives.
    pub prices: Vec<LayerPrice>,
}

/// One price a layer gives.
#[derive(Debug, Clone)]
pub struct LayerPrice {
    /// The model id it prices.
    pub model: String,
    /// When it takes effect (always, when `None`).
    pub since: Option<UnixSeconds>,
    /// The rates.
    pub price: Price,
    /// The price map's `litellm_provider`, when it names one.
    pub provider: Option<String>,
}

impl Layer {
    /// A price map's models as a layer labelled `source`.
    pub fn from_map(source: String, map: litellm::PriceMap) -> Self {
        let prices = map
            .models
            .into_iter()
            .map(|(model, entry)| LayerPrice {
                model,
                since: None,
                price: entry.price,
                provider: Some(entry.provider),
            })
            .collect();
        Self { source, prices }
    }
}

/// Prices by model name, with the normalized forms of every name indexed.
#[derive(Debug, Clone, Default)]
struct Names {
    /// Model id to its prices, by `since`, undated first.
    models: HashMap<String, Entry>,
    /// A normalized form to the best entries having it: a preferred provider's, and another's.
    index: HashMap<String, Best>,
}

#[derive(Debug, Clone)]
struct Entry {
    versions: Arc<[Dated]>,
    /// `None` for a provider outside `names::PREFERRED` (a reseller).
    preference: Option<usize>,
}

/// Lowest wins: (form's position in the entry's forms, provider preference, scoped to a region,
/// the snapshot's date reversed, entry id). Among a provider's entries of one form, one of no
/// region before a regional one (`us.`, `us-gov.` cost more), then the latest snapshot
/// (`…-20250219` over `…-20240620`), then the id.
type Rank = (usize, usize, bool, std::cmp::Reverse<u32>, String);

#[derive(Debug, Clone, Default)]
struct Best {
    preferred: Option<Rank>,
    other: Option<Rank>,
}

impl Names {
    fn build(layers: &[Layer]) -> Self {
        let mut models: HashMap<String, (Vec<Dated>, Option<usize>)> = HashMap::new();
        for layer in layers {
            let source: Arc<str> = Arc::from(layer.source.as_str());
            for p in &layer.prices {
                let dated = Dated {
                    since: p.since,
                    price: Arc::new(p.price.clone()),
                    source: Arc::clone(&source),
                    label: Arc::from(format!("{source}: {}", p.model)),
                };
                // A configured price has no provider: it is the user's, and preferred.
                let preference = p.provider.as_deref().map_or(Some(0), names::preference);
                let slot = models.entry(p.model.clone()).or_default();
                slot.1 = preference;
                match p.since {
                    // An undated price from a later layer replaces the earlier ones.
                    None => slot.0 = vec![dated],
                    Some(since) => {
                        slot.0.retain(|d| d.since != Some(since));
                        slot.0.push(dated);
                        slot.0.sort_by_key(|d| d.since);
                    }
                }
            }
        }
        let mut index: HashMap<String, Best> = HashMap::new();
        // A maker's or cloud's id with a region or route in its path (`azure/eu/gpt-4o`,
        // `bedrock/us-gov-east-1/…`) prices its own exact name only: its rates are the
        // region's, not the model's list price.
        let is_routed = |name: &str| {
            name.matches('/').count() > 1
                && name
                    .split('/')
                    .next()
                    .is_some_and(|first| names::preference(first).is_some())
        };
        for (name, (_, preference)) in models.iter().filter(|(name, _)| !is_routed(name)) {
            for (depth, form) in names::forms(name).into_iter().enumerate() {
                let best = index.entry(form).or_default();
                let slot = if preference.is_some() {
                    &mut best.preferred
                } else {
                    &mut best.other
                };
                let rank = (
                    depth,
                    preference.unwrap_or(0),
                    names::is_regional(name),
                    std::cmp::Reverse(names::snapshot_date(name)),
                    name.clone(),
                );
                if slot.as_ref().is_none_or(|current| rank < *current) {
                    *slot = Some(rank);
                }
            }
        }
        let models = models
            .into_iter()
            .map(|(name, (versions, preference))| {
                let entry = Entry {
                    versions: versions.into(),
                    preference,
                };
                (name, entry)
            })
            .collect();
        Self { models, index }
    }

    /// The entry pricing `model`: its own, else the first form a preferred provider's entry
    /// has, else the first form any entry has.
    fn find(&self, model: &str) -> Option<(&str, &Entry, Match)> {
        if let Some((name, entry)) = self.models.get_key_value(model) {
            return Some((name, entry, Match::Exact));
        }
        // The name itself is a form too: `mistral-large-latest` is how the index knows
        // `mistral/mistral-large-latest`.
        let mut forms = names::forms(model);
        forms.insert(0, model.to_owned());
        let found = forms
            .iter()
            .find_map(|form| {
                self.models
                    .get_key_value(form.as_str())
                    .filter(|(_, e)| e.preference.is_some())
                    .map(|(name, entry)| (name.as_str(), entry))
                    .or_else(|| self.ranked(form, |best| best.preferred.as_ref()))
            })
            .or_else(|| {
                forms
                    .iter()
                    .find_map(|form| self.ranked(form, |best| best.other.as_ref()))
            })?;
        Some((found.0, found.1, Match::Form))
    }

    fn ranked(&self, form: &str, pick: impl Fn(&Best) -> Option<&Rank>) -> Option<(&str, &Entry)> {
        let (_, _, _, _, name) = pick(self.index.get(form)?)?;
        let (name, entry) = self.models.get_key_value(name)?;
        Some((name.as_str(), entry))
    }
}

/// How a requested name found its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The entry has the name itself.
    Exact,
    /// A normalized form of the name (see `names`).
    Form,
    /// `[models] alias` names the entry.
    Alias,
}

/// One upstream's own prices and multiplier.
#[derive(Debug, Clone, Default)]
pub struct UpstreamPrices {
    /// What the upstream charges relative to the shared prices, in parts per million
    /// (`pricing_multiplier = 1.05` is 1,050,000); `None` for list price.
    pub multiplier_ppm: Option<u64>,
    /// `[upstreams.NAME.pricing."MODEL"]`: exact prices on this upstream, multiplier not applied.
    pub prices: Layer,
}

/// What prices a model on an upstream: the entry, its dated prices and the multiplier, and
/// what prices it when none of those is in force yet (the files under a dated proxy.toml price).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The id of the entry that prices it.
    pub entry: Arc<str>,
    /// How the name found it.
    pub found_by: Match,
    /// The entry's prices, by `since`.
    pub versions: Arc<[Dated]>,
    /// The upstream's multiplier, in parts per million, when one applies.
    pub multiplier_ppm: Option<u64>,
    /// What prices the name before the first of `versions` takes effect.
    pub before: Option<Arc<Resolved>>,
}

impl Resolved {
    /// The price in force at `at`: the latest of `versions` taking effect at or before it,
    /// else what priced the name before them; with the resolution it belongs to.
    pub fn at(&self, at: UnixSeconds) -> Option<(&Self, &Dated)> {
        match self
            .versions
            .iter()
            .rev()
            .find(|d| d.since.is_none_or(|since| since <= at))
        {
            Some(dated) => Some((self, dated)),
            None => self.before.as_deref()?.at(at),
        }
    }

    /// True when one price is in force always (no clock needed to choose).
    pub fn is_undated(&self) -> bool {
        self.versions.first().is_some_and(|d| d.since.is_none()) && self.versions.len() == 1
    }

    /// The cost of `usage` (of which `audio` was audio) in `tier` at the price in force at `at`,
    /// and a label saying which price it took (`built-in 2026-12-06: gemini-2.5-pro, above
    /// 200k`); `None` when no price was in force then.
    pub fn charge(
        &self,
        usage: &crate::usage::Usage,
        audio: &crate::usage::Usage,
        tier: crate::usage::ServiceTier,
        at: UnixSeconds,
    ) -> Option<(Charge, Arc<str>)> {
        let (resolved, dated) = self.at(at)?;
        let mut charge = dated.price.charge(usage, audio, tier);
        if let Some(ppm) = resolved.multiplier_ppm {
            let scaled = (u128::from(charge.cost.0) * u128::from(ppm) + 500_000) / 1_000_000;
            charge.cost = NanoUsd(u64::try_from(scaled).unwrap_or(u64::MAX));
        }
        let label = dated.label_as_applied(charge.above, charge.tier, resolved.multiplier_ppm);
        Some((charge, label))
    }

    /// This resolution, then what priced the name before it, and so on.
    pub fn levels(&self) -> impl Iterator<Item = &Self> {
        std::iter::successors(Some(self), |level| level.before.as_deref())
    }
}

/// A multiplier in parts per million as written in proxy.toml: `1050000` → `1.05`.
pub fn ppm_text(ppm: u64) -> String {
    let whole = ppm / 1_000_000;
    let fraction = format!("{:06}", ppm % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        whole.to_string()
    } else {
        format!("{whole}.{fraction}")
    }
}

/// Every price llm-meter knows, and how names find them.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    /// `[pricing."MODEL"]` in proxy.toml.
    configured: Names,
    /// The files: built-in, downloaded, `pricing_file`.
    files: Names,
    aliases: BTreeMap<String, String>,
    upstreams: HashMap<String, (Option<u64>, Names)>,
    /// The labels of the layers, lowest first (for `prices` and the start-up line).
    sources: Vec<String>,
}

impl PriceTable {
    /// A table from the files' layers (lowest precedence first: an undated price of a model
    /// replaces the earlier layers' prices of it; a dated one is added to them), the prices
    /// configured in proxy.toml, `[models] alias` names, and per-upstream prices.
    pub fn new(
        files: &[Layer],
        configured: &Layer,
        aliases: BTreeMap<String, String>,
        upstreams: BTreeMap<String, UpstreamPrices>,
    ) -> Self {
        let mut sources: Vec<String> = files.iter().map(|l| l.source.clone()).collect();
        if !configured.prices.is_empty() {
            sources.push(configured.source.clone());
        }
        Self {
            configured: Names::build(std::slice::from_ref(configured)),
            files: Names::build(files),
            aliases,
            upstreams: upstreams
                .into_iter()
                .map(|(name, own)| {
                    let names = Names::build(std::slice::from_ref(&own.prices));
                    (name, (own.multiplier_ppm, names))
                })
                .collect(),
            sources,
        }
    }

    /// The built-in table alone.
    pub fn builtin() -> Self {
        Self::new(
            &[builtin_layer()],
            &Layer::default(),
            BTreeMap::new(),
            BTreeMap::new(),
        )
    }

    /// The labels of the table's layers, lowest precedence first.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// What prices `model` on `upstream`: its alias's entry, else the upstream's own prices,
    /// else the prices configured in proxy.toml, else the files' (the last two times the
    /// upstream's multiplier); each by exact name, then by the forms of the name. A user's
    /// `[pricing."gpt-4o"]` thus prices `gpt-4o-2024-08-06` too, the name responses report.
    pub fn resolve(&self, upstream: &str, model: &str) -> Option<Resolved> {
        let (model, aliased) = match self.aliases.get(model) {
            Some(target) => (target.as_str(), true),
            None => (model, false),
        };
        let own = self.upstreams.get(upstream);
        let multiplier_ppm = own.and_then(|(ppm, _)| *ppm);
        let resolved = |names: &Names, multiplier_ppm, before: Option<Resolved>| {
            names.find(model).map(|(entry, prices, found_by)| Resolved {
                entry: Arc::from(entry),
                found_by: if aliased { Match::Alias } else { found_by },
                versions: Arc::clone(&prices.versions),
                multiplier_ppm,
                before: before.clone().map(Arc::new),
            })
        };
        let files = resolved(&self.files, multiplier_ppm, None);
        let configured = resolved(&self.configured, multiplier_ppm, files.clone()).or(files);
        match own {
            Some((_, names)) => resolved(names, None, configured.clone()).or(configured),
            None => configured,
        }
    }
}

/// The built-in table as a layer labelled `built-in DATE`.
pub fn builtin_layer() -> Layer {
    match litellm::parse(BUILTIN_MAP.as_bytes()) {
        Ok(map) => {
            let label = format!("built-in {}", map.date.as_deref().unwrap_or("undated"));
            Layer::from_map(label, map)
        }
        // The table is generated and tested in this repository: this is unreachable in a build
        // that passed its tests, and an empty table still meters (every model unpriced).
        Err(_) => Layer::default(),
    }
}

#[cfg(test)]
mod tests;
