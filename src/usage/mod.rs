//! Usage extraction: every API flavor's `usage` object becomes one normalized `Usage` record.
//!
//! Wire fields per flavor and how each maps to the record:
//!
//! (The Responses API's, the Realtime API's, Anthropic's and Gemini's mappings are in their own
//! modules.)
//!
//! | record field          | OpenAI chat / completions / embeddings                |
//! |-----------------------|-------------------------------------------------------|
//! | `input_tokens`        | `prompt_tokens` − cached − cache writes               |
//! | `cached_input_tokens` | `prompt_tokens_details.cached_tokens`                 |
//! | `cache_write_tokens`  | `prompt_tokens_details.cache_write_tokens` (or `cache_creation_tokens`, as OpenRouter sends) |
//! | `output_tokens`       | `completion_tokens` (reasoning included)              |
//! | `reasoning_tokens`    | `completion_tokens_details.reasoning_tokens`          |
//!
//! Besides the counts, `Extracted::service_tier` is the response's top-level `service_tier`
//! (`tier.rs` maps the names). Every chunk of a stream repeats it: it is read from those the
//! extractor parses anyway (the first, and those with usage), the last one not `null` winning.
//!
//! An absent or `null` field counts as 0. A field of the wrong type, negative, fractional or
//! absurdly large (over `MAX_TOKENS`) is ignored (counted as 0) and reported as a `Warning`.
//! A response with no `usage` object at all yields no `Usage`: the request is still counted.
//! So does a `usage` that is not an object (a list, a string) or that has none of the counts
//! its flavor defines (`{}`, another provider's shape), with a `Warning`: the request is then
//! estimated and flagged, never recorded as a silent 0. One count present, even 0, is a usage.

pub mod anthropic;
pub mod estimate;
pub mod gemini;
pub mod openai_chat;
pub mod openai_realtime;
pub mod openai_responses;
pub mod sse;
pub mod tier;
pub mod tokenizer;

pub use tier::ServiceTier;

use std::sync::LazyLock;

use memchr::memmem;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Largest token count believed for one field of one request; anything above is a bogus value.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// The tokens of one request, normalized across providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Uncached input, billed at the input price.
    pub input_tokens: u64,
    /// Input read from the provider's cache, billed at the cached price.
    pub cached_input_tokens: u64,
    /// Input written to the provider's cache, billed at the cache-write price.
    pub cache_write_tokens: u64,
    /// The part of `cache_write_tokens` written to be kept an hour (Anthropic's 1-hour cache
    /// TTL, billed at a higher rate than the default 5 minutes); informational, like reasoning.
    pub cache_write_1h_tokens: u64,
    /// All output, reasoning included.
    pub output_tokens: u64,
    /// The part of the output that was reasoning (informational).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Prompt tokens as providers count them: uncached + cached + cache writes.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cached_input_tokens + self.cache_write_tokens
    }

    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens() + self.output_tokens
    }

    /// These tokens less `part` (a part of them, such as the audio tokens), class by class.
    pub fn without(&self, part: &Self) -> Self {
        Self {
            input_tokens: self.input_tokens.saturating_sub(part.input_tokens),
            cached_input_tokens: self
                .cached_input_tokens
                .saturating_sub(part.cached_input_tokens),
            cache_write_tokens: self
                .cache_write_tokens
                .saturating_sub(part.cache_write_tokens),
            cache_write_1h_tokens: self
                .cache_write_1h_tokens
                .saturating_sub(part.cache_write_1h_tokens),
            output_tokens: self.output_tokens.saturating_sub(part.output_tokens),
            reasoning_tokens: self.reasoning_tokens.saturating_sub(part.reasoning_tokens),
        }
    }
}

/// How a route's responses report usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI chat completions: plain JSON or SSE chunks with a final usage chunk.
    OpenAiChat,
    /// OpenAI legacy completions: the same usage shapes as chat.
    OpenAiCompletions,
    /// OpenAI embeddings: plain JSON, `prompt_tokens` only.
    OpenAiEmbeddings,
    /// OpenAI Responses API: plain JSON, or typed SSE events ending in `response.completed`.
    OpenAiResponses,
    /// OpenAI Realtime API: WebSocket events, each response ending in `response.done`.
    OpenAiRealtime,
    /// Anthropic Messages: plain JSON, or SSE with `message_start` and cumulative `message_delta` usage.
    AnthropicMessages,
    /// Gemini native `generateContent` / `streamGenerateContent`: `usageMetadata`.
    Gemini,
}

impl Flavor {
    /// The name stored in the ledger and shown in exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiCompletions => "openai_completions",
            Self::OpenAiEmbeddings => "openai_embeddings",
            Self::OpenAiResponses => "openai_responses",
            Self::OpenAiRealtime => "openai_realtime",
            Self::AnthropicMessages => "anthropic_messages",
            Self::Gemini => "gemini",
        }
    }

    /// True when a stream reports usage only if asked (`stream_options.include_usage`), so
    /// llm-meter asks on the client's behalf.
    pub fn needs_stream_usage_asked(self) -> bool {
        matches!(self, Self::OpenAiChat | Self::OpenAiCompletions)
    }

    /// Reads a complete (non-streaming) response body.
    pub fn parse_body(self, body: &[u8]) -> Extracted {
        match self {
            Self::OpenAiChat | Self::OpenAiCompletions | Self::OpenAiEmbeddings => {
                openai_chat::parse_body(body)
            }
            Self::OpenAiResponses => openai_responses::parse_body(body),
            Self::OpenAiRealtime => openai_realtime::parse_event(body),
            Self::AnthropicMessages => anthropic::parse_body(body),
            Self::Gemini => gemini::parse_body(body),
        }
    }
}

/// Usage extraction state for one SSE stream, per flavor.
#[derive(Debug)]
pub enum StreamUsage {
    /// Chat or legacy completions chunks.
    Chat(openai_chat::Stream),
    /// Responses API events.
    Responses(openai_responses::Stream),
    /// Anthropic Messages events.
    Anthropic(anthropic::Stream),
    /// Gemini `alt=sse` chunks.
    Gemini(gemini::Stream),
}

impl StreamUsage {
    /// The extractor for a stream of this flavor.
    pub fn new(flavor: Flavor) -> Self {
        match flavor {
            Flavor::OpenAiChat | Flavor::OpenAiCompletions | Flavor::OpenAiEmbeddings => {
                Self::Chat(openai_chat::Stream::default())
            }
            Flavor::OpenAiResponses | Flavor::OpenAiRealtime => {
                Self::Responses(openai_responses::Stream::default())
            }
            Flavor::AnthropicMessages => Self::Anthropic(anthropic::Stream::default()),
            Flavor::Gemini => Self::Gemini(gemini::Stream::default()),
        }
    }

    /// Looks at one whole event and says what it was.
    pub fn on_event(&mut self, event: &[u8]) -> openai_chat::Event {
        match self {
            Self::Chat(chat) => chat.on_event(event),
            Self::Responses(responses) => {
                responses.on_event(event);
                openai_chat::Event::Other
            }
            Self::Anthropic(anthropic) => {
                anthropic.on_event(event);
                openai_chat::Event::Other
            }
            Self::Gemini(gemini) => {
                gemini.on_event(event);
                openai_chat::Event::Other
            }
        }
    }

    /// What the stream reported, once it has ended (or was cut).
    pub fn finish(self) -> Extracted {
        match self {
            Self::Chat(chat) => chat.finish(),
            Self::Responses(responses) => responses.finish(),
            Self::Anthropic(anthropic) => anthropic.finish(),
            Self::Gemini(gemini) => gemini.finish(),
        }
    }
}

/// The largest char boundary of `text` at or below `at`: where a text cut to at most `at` bytes
/// ends (model names, records, the part of a prompt counted exactly).
pub fn floor_char_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    (0..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// A searcher built once: building one per event would cost more than the search.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// True when the data has a `"usage"` key whose value is not `null`, found without parsing. A
/// value of the wrong shape (a list, a string) is parsed too, so that it is reported.
fn has_usage_value(data: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(data)
        .any(|at| is_present_value(&data[at + 7..]))
}

/// True when the data has the quoted `key` followed by a value other than `null` (a scan, not a parse).
fn has_key(data: &[u8], key: &[u8]) -> bool {
    memmem::find_iter(data, key).any(|at| is_present_value(&data[at + key.len()..]))
}

/// True when `rest` (what follows a quoted key) is `:` and a value that is not `null`.
fn is_present_value(rest: &[u8]) -> bool {
    rest.trim_ascii_start().strip_prefix(b":").is_some_and(|v| {
        let v = v.trim_ascii_start();
        !v.is_empty() && !v.starts_with(b"null")
    })
}

/// A usage field that was present but unusable, for one warning log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The JSON path of the field (`usage.prompt_tokens`).
    pub field: &'static str,
    /// What was wrong with it, never its content.
    pub problem: &'static str,
}

/// What was learned from one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The usage, if the response reported one.
    pub usage: Option<Usage>,
    /// The model named in the response, if any.
    pub model: Option<String>,
    /// The response's id (`chatcmpl-…`), if any.
    pub response_id: Option<String>,
    /// The service tier the response says it was served at (`Standard` when it did not say).
    pub service_tier: ServiceTier,
    /// Fields that were present but ignored.
    pub warnings: Vec<Warning>,
    /// The output count is a provisional one: the stream was cut before the provider's final
    /// count (an Anthropic stream ends with it; its start gives only the input).
    pub is_output_provisional: bool,
    /// The part of `usage` that was audio (the Realtime API reports it): counted as tokens,
    /// but priced by no price we know, so the record is flagged unpriced.
    pub audio: Usage,
}

/// A JSON value found where a token count belongs, classified while parsing, without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Count {
    /// Missing or `null`: counts as 0.
    #[default]
    Absent,
    /// A sane count.
    Valid(u64),
    /// Present but unusable, and why.
    Bogus(&'static str),
}

impl Count {
    /// True when the field was there and not `null` (a bogus value is there too).
    pub fn is_present(self) -> bool {
        self != Self::Absent
    }

    /// The count, or 0 with a warning naming `field` when it was bogus.
    pub fn take(self, field: &'static str, warnings: &mut Vec<Warning>) -> u64 {
        match self {
            Self::Absent => 0,
            Self::Valid(n) => n,
            Self::Bogus(problem) => {
                warnings.push(Warning { field, problem });
                0
            }
        }
    }

    fn from_u64(v: u64) -> Self {
        if v <= MAX_TOKENS {
            Self::Valid(v)
        } else {
            Self::Bogus("absurdly large")
        }
    }

    fn from_f64(f: f64) -> Self {
        if f < 0.0 {
            Self::Bogus("negative")
        } else if f > 1e9 {
            Self::Bogus("absurdly large")
        } else if f.fract() == 0.0 {
            // Integral floats (`12.0`) come from servers that keep counts as doubles.
            Self::Valid(float_count(f))
        } else {
            Self::Bogus("not a whole number")
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
        Ok(Count::from_u64(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
        Ok(u64::try_from(v).map_or(Count::Bogus("negative"), Count::from_u64))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Count, E> {
        Ok(Count::from_f64(v))
    }

    fn visit_unit<E>(self) -> Result<Count, E> {
        Ok(Count::Absent)
    }

    fn visit_none<E>(self) -> Result<Count, E> {
        Ok(Count::Absent)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
        Ok(Count::Bogus("not a number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Count, E> {
        Ok(Count::Bogus("not a number"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count::Bogus("not a number"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count::Bogus("not a number"))
    }
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "caller checked 0 <= f <= 1e9 and integral"
)]
fn float_count(f: f64) -> u64 {
    f as u64
}

/// Parses a borrowed JSON fragment as `T`; `None` with a warning when it has another shape.
fn parse_raw<'a, T: Deserialize<'a>>(
    json: &'a str,
    field: &'static str,
    problem: &'static str,
    warnings: &mut Vec<Warning>,
) -> Option<T> {
    match serde_json::from_str(json) {
        Ok(value) => Some(value),
        Err(_) => {
            warnings.push(Warning { field, problem });
            None
        }
    }
}

/// Adds a warning unless the same one is there already: a stream can repeat a bad value in
/// every chunk, and one warning says it.
fn warn_once(warnings: &mut Vec<Warning>, field: &'static str, problem: &'static str) {
    let warning = Warning { field, problem };
    if !warnings.contains(&warning) {
        warnings.push(warning);
    }
}

/// Parses a JSON value that must be an object as `T`; `None`, with a warning, for anything
/// else. The shape is checked first because serde's derived `Deserialize` also takes a JSON
/// array, as the struct's fields in order: `[5,3]` would read as a usage of 5 and 3.
fn object_of<'a, T: Deserialize<'a>>(
    json: &'a str,
    field: &'static str,
    warnings: &mut Vec<Warning>,
) -> Option<T> {
    let parsed = if json.trim_ascii_start().starts_with('{') {
        serde_json::from_str(json).ok()
    } else {
        None
    };
    if parsed.is_none() {
        warn_once(warnings, field, "not an object");
    }
    parsed
}

/// A flavor's wire `usage` struct, as parsed.
trait Counted {
    /// True when at least one of the counts the flavor defines is there (even 0, even bogus):
    /// missing and `null` ones are not.
    fn names_a_count(&self) -> bool;
}

/// Reads a `usage` value (named `field` in warnings) as the flavor's wire struct `T`. `null` is
/// no usage. So, with a warning, is a value that is not an object, or an object with none of
/// the flavor's counts (`{}`, another provider's shape): recording it as 0 tokens would be a
/// silent $0, while no usage gets the request estimated and flagged.
fn usage_object<'a, T: Deserialize<'a> + Counted>(
    json: &'a str,
    field: &'static str,
    warnings: &mut Vec<Warning>,
) -> Option<T> {
    if json == "null" {
        return None;
    }
    let usage: T = object_of(json, field, warnings)?;
    if usage.names_a_count() {
        Some(usage)
    } else {
        warn_once(warnings, field, "has none of the counts of its flavor");
        None
    }
}

/// Reads an optional `*_details` object; absent, `null` or unusable (with a warning) gives its defaults.
fn details<'a, T: Deserialize<'a> + Default>(
    raw: Option<&'a RawValue>,
    field: &'static str,
    warnings: &mut Vec<Warning>,
) -> T {
    raw.filter(|d| d.get() != "null")
        .and_then(|d| object_of(d.get(), field, warnings))
        .unwrap_or_default()
}

/// A part of a count that says it is larger than the whole is cut to the whole, with a warning.
fn part_of(part: u64, whole: u64, field: &'static str, warnings: &mut Vec<Warning>) -> u64 {
    if part > whole {
        warnings.push(Warning {
            field,
            problem: "exceeds the total it is part of",
        });
        whole
    } else {
        part
    }
}

/// The tier a raw `service_tier` value names, if it names one (see `ServiceTier::from_json`).
fn tier_of(raw: Option<&str>) -> Option<ServiceTier> {
    raw.and_then(ServiceTier::from_json)
}

/// Notes what one response object (or stream event) says: a model replaces the one known, the
/// first id is kept, a usage replaces the last one (streams repeat running totals).
fn note(
    out: &mut Extracted,
    (model, id, usage): (Option<&RawValue>, Option<&RawValue>, Option<&RawValue>),
    usage_from: fn(&RawValue, &mut Vec<Warning>) -> Option<Usage>,
) {
    if let Some(model) = model_of(model.map(RawValue::get), &mut out.warnings) {
        out.model = Some(model);
    }
    if out.response_id.is_none() {
        out.response_id = id_of(id.map(RawValue::get));
    }
    if let Some(usage) = usage.and_then(|u| usage_from(u, &mut out.warnings)) {
        out.usage = Some(usage);
    }
}

/// Parses a body that must be a JSON object as `T`; `None`, with a warning, for anything else.
fn object<'a, T: Deserialize<'a>>(body: &'a [u8], warnings: &mut Vec<Warning>) -> Option<T> {
    let parsed = match body.trim_ascii_start().first() {
        Some(b'{') => serde_json::from_slice(body).ok(),
        _ => None,
    };
    if parsed.is_none() {
        warnings.push(Warning {
            field: "body",
            problem: "not a JSON object",
        });
    }
    parsed
}

/// Reads a response's `id`: a short string, or nothing (an id is informational: no warning).
fn id_of(json: Option<&str>) -> Option<String> {
    let id: String = serde_json::from_str(json?).ok()?;
    (!id.is_empty() && id.len() <= MAX_ID_LEN).then_some(id)
}

/// Longest response id kept; provider ids are tens of characters.
const MAX_ID_LEN: usize = 256;

/// Reads the `model` field: a non-empty string, or nothing (with a warning for another type).
fn model_of(json: Option<&str>, warnings: &mut Vec<Warning>) -> Option<String> {
    let model: String = parse_raw(json?, "model", "not a string", warnings)?;
    (!model.is_empty()).then_some(model)
}

/// `usage` values that are no usage in any flavor; each flavor's tests add another's shape.
#[cfg(test)]
const NOT_A_USAGE: [&str; 6] = ["{}", "[]", "[5,3]", "\"12\"", "7", "true"];

/// The one warning a value of `NOT_A_USAGE` (or a foreign shape) gives, under `field`.
#[cfg(test)]
fn no_usage_warning(usage: &str, field: &'static str) -> Warning {
    let problem = if usage.starts_with('{') {
        "has none of the counts of its flavor"
    } else {
        "not an object"
    };
    Warning { field, problem }
}

/// Asserts that `got` has no usage and the one warning `usage` (under `field`) gives.
#[cfg(test)]
fn assert_no_usage(got: &Extracted, usage: &str, field: &'static str) {
    assert_eq!(got.usage, None, "{usage}");
    assert_eq!(got.warnings, [no_usage_warning(usage, field)], "{usage}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accept_sane_numbers_and_reject_the_rest() {
        let cases = [
            ("5", Count::Valid(5)),
            ("null", Count::Absent),
            ("-3", Count::Bogus("negative")),
            ("\"7\"", Count::Bogus("not a number")),
            ("1.5", Count::Bogus("not a whole number")),
            ("1e30", Count::Bogus("absurdly large")),
            ("12.0", Count::Valid(12)),
            ("2000000000", Count::Bogus("absurdly large")),
            ("18446744073709551616", Count::Bogus("absurdly large")),
            ("[1,{\"a\":2}]", Count::Bogus("not a number")),
            ("{\"n\":1}", Count::Bogus("not a number")),
            ("true", Count::Bogus("not a number")),
        ];
        for (json, expected) in cases {
            assert_eq!(
                serde_json::from_str::<Count>(json).unwrap(),
                expected,
                "{json}"
            );
        }
        let mut warnings = Vec::new();
        assert_eq!(Count::Bogus("negative").take("usage.x", &mut warnings), 0);
        assert_eq!(
            warnings,
            [Warning {
                field: "usage.x",
                problem: "negative"
            }]
        );
    }

    #[test]
    fn only_objects_are_read_as_objects() {
        // What serde alone would do with an array.
        assert_eq!(
            serde_json::from_str::<PairOf>("[5,3]").unwrap(),
            PairOf { a: 5, b: 3 }
        );
        let mut warnings = Vec::new();
        assert_eq!(object_of::<PairOf>("[5,3]", "usage", &mut warnings), None);
        assert_eq!(
            object_of::<PairOf>(" {\"a\":5}", "usage", &mut warnings).map(|p| p.a),
            Some(5)
        );
        // The same problem twice (a stream repeating it) is one warning.
        assert_eq!(object_of::<PairOf>("\"x\"", "usage", &mut warnings), None);
        assert_eq!(
            warnings,
            [Warning {
                field: "usage",
                problem: "not an object"
            }]
        );
    }

    /// A struct serde would also read from a two-element array.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct PairOf {
        a: u64,
        #[serde(default)]
        b: u64,
    }

    #[test]
    fn values_are_found_by_the_scan_unless_null() {
        assert!(has_usage_value(br#"{"usage": [5,3]}"#));
        assert!(has_usage_value(br#"{"usage":"12"}"#));
        assert!(has_usage_value(br#"{"usage" : {}}"#));
        assert!(!has_usage_value(br#"{"usage": null}"#));
        assert!(!has_usage_value(br#"{"text": "usage"}"#));
        assert!(!has_usage_value(br#"{"text": "the \"usage\": [1]"}"#));
        assert!(has_key(br#"{"usageMetadata":[]}"#, b"\"usageMetadata\""));
    }
}
