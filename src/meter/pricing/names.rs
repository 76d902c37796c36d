//! The names one model goes by, and which provider's entry prices a name no entry has exactly.
//!
//! A requested name is tried as given, then as each of these forms in turn, each form applied
//! to the one before (see docs/prices.md):
//!
//! 1. lower case;
//! 2. without routing prefixes (`openrouter/anthropic/claude-…` → `claude-…`);
//! 3. without Bedrock's decorations: an inference-profile region (`us.`, `eu.`, `apac.`,
//!    `global.`…), the vendor (`anthropic.`, `meta.`…) and the version (`-v2:0`, `:0`);
//! 4. without snapshot suffixes, one at a time: `@20241022` (Vertex), `-latest`, `-2024-08-06`,
//!    `-20241022`, `-0613`, `-001`, `-preview-05-20`, `-preview`, `-exp`;
//! 5. with OpenRouter's dotted versions dashed (`claude-3.5-sonnet` → `claude-3-5-sonnet`),
//!    then that without its snapshot suffixes.
//!
//! Price map entries are indexed under the same forms of their own ids, so `claude-3-5-sonnet`
//! finds `vertex_ai/claude-3-5-sonnet` when no entry is named `claude-3-5-sonnet` itself.

/// The forms of `name` after itself, in the order they are tried, without repeats.
pub fn forms(name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push = |form: String, out: &mut Vec<String>| {
        if form != name && !form.is_empty() && !out.contains(&form) {
            out.push(form);
        }
    };
    let mut current = name.to_ascii_lowercase();
    push(current.clone(), &mut out);
    current = current
        .rsplit_once('/')
        .map_or(current.clone(), |(_, last)| last.to_owned());
    push(current.clone(), &mut out);
    current = without_bedrock(&current).to_owned();
    // Snapshot suffixes go from the name as written, then from its dashed form.
    for mut form in [current.clone(), dashed_versions(&current)] {
        push(form.clone(), &mut out);
        while let Some(base) = strip_snapshot_suffix(&form) {
            form = base.to_owned();
            push(form.clone(), &mut out);
        }
    }
    out
}

/// Bedrock's regional inference profiles prefix the model id with one of these.
const BEDROCK_REGIONS: &[&str] = &["us", "eu", "apac", "global", "jp", "au", "ca", "us-gov"];

/// Model vendors as Bedrock spells them before the model's own name.
const BEDROCK_VENDORS: &[&str] = &[
    "anthropic",
    "meta",
    "amazon",
    "mistral",
    "cohere",
    "ai21",
    "deepseek",
    "openai",
    "qwen",
    "writer",
    "twelvelabs",
    "stability",
    "moonshotai",
    "minimax",
    "nvidia",
    "xai",
    "google",
    "zai",
];

/// `us.anthropic.claude-3-5-sonnet-20241022-v2:0` → `claude-3-5-sonnet-20241022`.
fn without_bedrock(name: &str) -> &str {
    let mut rest = name;
    if let Some((region, after)) = rest.split_once('.')
        && BEDROCK_REGIONS.contains(&region)
    {
        rest = after;
    }
    let Some((vendor, model)) = rest.split_once('.') else {
        return name;
    };
    if !BEDROCK_VENDORS.contains(&vendor) {
        return name;
    }
    // `:0`, and `-v2` after a date: the version of the Bedrock model, not of the model
    // (`claude-v2` and `llama3-70b-instruct-v1` keep theirs).
    let model = model
        .rsplit_once(':')
        .filter(|(_, n)| is_number(n))
        .map_or(model, |(base, _)| base);
    without_version(model)
        .filter(|base| ends_with_date(base))
        .unwrap_or(model)
}

/// `name` without a trailing model version `-v2`, when it has one.
fn without_version(name: &str) -> Option<&str> {
    name.rsplit_once("-v")
        .filter(|(_, n)| is_number(n))
        .map(|(base, _)| base)
}

/// True for one or more ASCII digits and nothing else.
fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// True when an id is scoped to a region: a Bedrock inference profile (`us.`, `us-gov.`,
/// `eu.anthropic.…`), or a region in its path (`bedrock_mantle/us-gov-west-1/…`).
pub fn is_regional(id: &str) -> bool {
    let mut segments: Vec<&str> = id.split('/').collect();
    let last = segments.pop().unwrap_or_default();
    let profile = last
        .split_once('.')
        .is_some_and(|(region, _)| BEDROCK_REGIONS.contains(&region));
    // A path segment between the provider and the model naming a region: `eu`, `us-west-2`.
    let in_path = segments.iter().skip(1).any(|segment| {
        BEDROCK_REGIONS.contains(segment)
            || segment.split('-').count() >= 3 && segment.ends_with(|c: char| c.is_ascii_digit())
    });
    profile || in_path
}

/// The snapshot date an id carries (`-20250219`, `@20250219`, `-2024-08-06`), as YYYYMMDD; 0
/// when it has none.
pub fn snapshot_date(id: &str) -> u32 {
    let b = id.as_bytes();
    let digits_at = |at: usize, n: usize| {
        b.get(at..at + n)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
            && !b.get(at + n).is_some_and(u8::is_ascii_digit)
    };
    let mut best = 0;
    let mut i = 0;
    while i < b.len() {
        let run = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if run == 0 {
            i += 1;
            continue;
        }
        let date = if run == 8 {
            Some(id[i..i + 8].to_owned())
        } else if run == 4
            && b.get(i + 4) == Some(&b'-')
            && digits_at(i + 5, 2)
            && b.get(i + 7) == Some(&b'-')
            && digits_at(i + 8, 2)
        {
            Some(format!(
                "{}{}{}",
                &id[i..i + 4],
                &id[i + 5..i + 7],
                &id[i + 8..i + 10]
            ))
        } else {
            None
        };
        if let Some(date) = date.filter(|d| d.starts_with("20"))
            && let Ok(date) = date.parse::<u32>()
        {
            best = best.max(date);
        }
        i += run;
    }
    best
}

/// True when `name` ends with `-YYYYMMDD`.
fn ends_with_date(name: &str) -> bool {
    name.rsplit_once('-')
        .is_some_and(|(_, d)| d.len() == 8 && is_number(d))
}

/// `claude-3.5-sonnet` → `claude-3-5-sonnet`: a dot between digits becomes a dash.
fn dashed_versions(name: &str) -> String {
    let bytes = name.as_bytes();
    name.char_indices()
        .map(|(i, c)| {
            let between_digits = c == '.'
                && i > 0
                && bytes[i - 1].is_ascii_digit()
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            if between_digits { '-' } else { c }
        })
        .collect()
}

/// Removes one trailing snapshot marker: `@20241022`, `-latest`, `-2024-08-06`, `-20241022`,
/// `-0613`, `-001`, `-preview-05-20`, `-preview`, `-exp`; `None` when there is none left.
fn strip_snapshot_suffix(name: &str) -> Option<&str> {
    if let Some(base) = name.strip_suffix("-latest") {
        return Some(base);
    }
    if let Some((base, _)) = name.rsplit_once('@') {
        // Vertex writes a model's own version before the date: `claude-3-5-sonnet-v2@20241022`.
        return Some(without_version(base).unwrap_or(base));
    }
    let digits = |s: &str, n: usize| s.len() == n && is_number(s);
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

/// Providers whose entries price a name first, in this order: the model makers, then the
/// clouds that resell them at list price. Other providers (resellers, hosts of open models)
/// come after, and only once no form of the name matched one of these.
const PREFERRED: &[&str] = &[
    // The makers, selling their own models.
    "openai",
    "anthropic",
    "gemini",
    "mistral",
    "codestral",
    "deepseek",
    "xai",
    "cohere",
    "cohere_chat",
    "ai21",
    "meta",
    "amazon_nova",
    "moonshot",
    "zai",
    "dashscope",
    "minimax",
    "text-completion-openai",
    // The clouds reselling them at list price.
    "vertex_ai",
    "vertex_ai-anthropic_models",
    "vertex_ai-language-models",
    "vertex_ai-mistral_models",
    "vertex_ai-llama_models",
    "vertex_ai-embedding-models",
    "bedrock",
    "bedrock_converse",
    "azure",
    "azure_ai",
];

/// Where a provider's entries rank: `Some(position)` for a preferred one, `None` for another.
pub fn preference(provider: &str) -> Option<usize> {
    let position = PREFERRED.iter().position(|p| *p == provider)?;
    // One cloud's entry kinds rank as one (`bedrock` and `bedrock_converse` list the same
    // models): the newest snapshot among them then decides.
    let family = ["vertex_ai", "bedrock", "azure"]
        .into_iter()
        .find(|family| provider.starts_with(family))
        .and_then(|family| PREFERRED.iter().position(|p| *p == family));
    Some(family.unwrap_or(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_prefixes_bedrock_ids_dots_and_snapshots_each_give_a_form() {
        assert_eq!(
            forms("openrouter/anthropic/claude-3.5-sonnet"),
            ["claude-3.5-sonnet", "claude-3-5-sonnet"]
        );
        assert_eq!(
            forms("us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
            ["claude-3-5-sonnet-20241022", "claude-3-5-sonnet"]
        );
        assert_eq!(forms("claude-sonnet-4-5@20250929"), ["claude-sonnet-4-5"]);
        assert_eq!(
            forms("claude-3-5-sonnet-v2@20241022"),
            ["claude-3-5-sonnet"]
        );
        assert_eq!(forms("mistral-large-latest"), ["mistral-large"]);
        assert_eq!(forms("gpt-4o-2024-08-06"), ["gpt-4o"]);
        assert_eq!(forms("GPT-4o"), ["gpt-4o"]);
        assert_eq!(
            forms("gemini-2.5-flash-preview-05-20"),
            [
                "gemini-2.5-flash",
                "gemini-2-5-flash-preview-05-20",
                "gemini-2-5-flash"
            ]
        );
        assert!(forms("gpt-4.1").contains(&"gpt-4-1".to_owned()));
        assert!(forms("").is_empty());
    }

    #[test]
    fn regional_ids_and_snapshot_dates_are_told() {
        assert!(is_regional("us.anthropic.claude-3-7-sonnet-20250219-v1:0"));
        assert!(is_regional("us-gov.meta.llama3"));
        assert!(is_regional("bedrock_mantle/us-gov-west-1/google.gemma-4"));
        assert!(is_regional("azure/eu/gpt-4o"));
        assert!(!is_regional("anthropic.claude-3-7-sonnet-20250219-v1:0"));
        assert!(!is_regional("vertex_ai/claude-3-5-sonnet@20240620"));
        assert!(!is_regional("deepinfra/meta-llama/Llama-3.3-70B-Instruct"));
        assert_eq!(
            snapshot_date("anthropic.claude-3-7-sonnet-20250219-v1:0"),
            20_250_219
        );
        assert_eq!(
            snapshot_date("vertex_ai/claude-3-5-sonnet@20240620"),
            20_240_620
        );
        assert_eq!(snapshot_date("gpt-4o-2024-08-06"), 20_240_806);
        assert_eq!(snapshot_date("gpt-4o"), 0);
        assert_eq!(snapshot_date("model-123456789"), 0);
    }

    #[test]
    fn bedrock_decorations_go_only_when_the_vendor_is_one() {
        assert_eq!(without_bedrock("anthropic.claude-v2:1"), "claude-v2");
        assert_eq!(
            without_bedrock("meta.llama3-70b-instruct-v1:0"),
            "llama3-70b-instruct-v1"
        );
        assert_eq!(
            without_bedrock("anthropic.claude-3-5-sonnet-20241022-v2:0"),
            "claude-3-5-sonnet-20241022"
        );
        assert_eq!(without_bedrock("xai.grok-4-fast"), "grok-4-fast");
        assert_eq!(without_bedrock("gpt-4.1"), "gpt-4.1");
        assert_eq!(without_bedrock("eu.claude"), "eu.claude");
    }
}
