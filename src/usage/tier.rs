//! The service tier a response says it was served at: providers bill some tiers at other rates.
//!
//! | tier       | OpenAI top-level `service_tier`      | Anthropic `usage.service_tier` |
//! |------------|--------------------------------------|--------------------------------|
//! | `Standard` | `default`, `auto`, `scale`           | `standard`                     |
//! | `Flex`     | `flex`                               |                                |
//! | `Priority` | `priority`                           | `priority`                     |
//! | `Batch`    |                                      | `batch`                        |
//!
//! A name not in the table is `Standard`: a tier we cannot price apart is priced as the default
//! one. A response that names no tier (or `null`) was served at `Standard` too.

/// A provider's service tier, as its response reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceTier {
    /// The default tier, and any tier we do not know.
    #[default]
    Standard,
    /// OpenAI's slower, cheaper tier.
    Flex,
    /// Faster, at a higher rate (OpenAI, Anthropic).
    Priority,
    /// Anthropic's Message Batches, at half the rate.
    Batch,
}

impl ServiceTier {
    /// The name stored in the ledger and shown in exports and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Flex => "flex",
            Self::Priority => "priority",
            Self::Batch => "batch",
        }
    }

    /// The tier a provider (or the ledger) calls `name`; an unknown name is `Standard`.
    pub fn from_name(name: &str) -> Self {
        match name {
            "flex" => Self::Flex,
            "priority" => Self::Priority,
            "batch" => Self::Batch,
            // "standard" (Anthropic, ours), "default", "auto", "scale" (OpenAI), and the rest.
            _ => Self::Standard,
        }
    }

    /// The tier a raw JSON value names: `None` for `null` or a value that is not a string (the
    /// response did not say), else the string's tier. Read without allocating: no tier's name
    /// needs an escape, so a string with one names none we know.
    pub fn from_json(json: &str) -> Option<Self> {
        let name = json.trim_ascii().strip_prefix('"')?.strip_suffix('"')?;
        Some(if name.contains('\\') {
            Self::Standard
        } else {
            Self::from_name(name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_map_to_tiers_and_unknown_ones_to_standard() {
        for (name, tier) in [
            ("default", ServiceTier::Standard),
            ("auto", ServiceTier::Standard),
            ("scale", ServiceTier::Standard),
            ("standard", ServiceTier::Standard),
            ("flex", ServiceTier::Flex),
            ("priority", ServiceTier::Priority),
            ("batch", ServiceTier::Batch),
            ("turbo", ServiceTier::Standard),
            ("", ServiceTier::Standard),
        ] {
            assert_eq!(ServiceTier::from_name(name), tier, "{name}");
        }
    }

    #[test]
    fn every_tier_reads_back_from_its_name() {
        for tier in [
            ServiceTier::Standard,
            ServiceTier::Flex,
            ServiceTier::Priority,
            ServiceTier::Batch,
        ] {
            assert_eq!(ServiceTier::from_name(tier.as_str()), tier);
        }
    }

    #[test]
    fn only_json_strings_name_a_tier() {
        assert_eq!(ServiceTier::from_json("\"flex\""), Some(ServiceTier::Flex));
        assert_eq!(
            ServiceTier::from_json("\"pri\\u006frity\""),
            Some(ServiceTier::Standard)
        );
        for json in ["null", "3", "{}", "[\"flex\"]", "\"", "true"] {
            assert_eq!(ServiceTier::from_json(json), None, "{json}");
        }
    }
}
