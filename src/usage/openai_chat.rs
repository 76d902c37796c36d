//! OpenAI chat completions usage: from a plain JSON body, or from the final chunk of an SSE stream.

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    Count, Counted, Extracted, Usage, Warning, details, has_usage_value, id_of, model_of, object,
    part_of, sse, tier_of, usage_object,
};

/// A searcher built once: building one per event would cost more than the search.
static MODEL_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"model\""));

/// The top-level fields we read, borrowed as raw JSON; serde skips everything else without building it.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(default)]
    choices: Choices,
}

/// How many `choices` an object has, counted without building them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Choices {
    #[default]
    Absent,
    Count(usize),
    /// `choices` is not an array.
    Other,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = Choices;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Choices::Count(n))
            }
            fn visit_unit<E>(self) -> Result<Choices, E> {
                Ok(Choices::Absent)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Choices, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Choices::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Choices, E> {
                Ok(Choices::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Choices, E> {
                Ok(Choices::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Choices, E> {
                Ok(Choices::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Choices, E> {
                Ok(Choices::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Choices, E> {
                Ok(Choices::Other)
            }
        }
        d.deserialize_any(Counter)
    }
}

/// OpenAI's `usage` object, every count classified as it is read.
#[derive(Deserialize, Default)]
#[serde(default)]
struct WireUsage<'a> {
    prompt_tokens: Count,
    completion_tokens: Count,
    #[serde(borrow)]
    prompt_tokens_details: Option<&'a RawValue>,
    #[serde(borrow)]
    completion_tokens_details: Option<&'a RawValue>,
}

impl Counted for WireUsage<'_> {
    /// `prompt_tokens` or `completion_tokens`; a `total_tokens` alone cannot be split or priced.
    fn names_a_count(&self) -> bool {
        self.prompt_tokens.is_present() || self.completion_tokens.is_present()
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: Count,
    cache_write_tokens: Count,
    cache_creation_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompletionDetails {
    reasoning_tokens: Count,
}

/// Reads model and usage from a complete (non-streaming) response body.
pub fn parse_body(body: &[u8]) -> Extracted {
    let mut out = Extracted::default();
    let keys = [b"id".as_slice(), b"model", b"usage", b"service_tier"];
    let [id, model, usage, tier] = match crate::json::top_level(body, keys).and_then(as_text) {
        Some(found) => found,
        None => {
            let Some(envelope) = object::<Envelope<'_>>(body, &mut out.warnings) else {
                return out;
            };
            [
                envelope.id,
                envelope.model,
                envelope.usage,
                envelope.service_tier,
            ]
            .map(|v| v.map(RawValue::get))
        }
    };
    out.model = model_of(model, &mut out.warnings);
    out.response_id = id_of(id);
    out.usage = usage.and_then(|u| usage_of(u, &mut out.warnings));
    out.service_tier = tier_of(tier).unwrap_or_default();
    out
}

/// Scanned values as text, `null` as absent (as serde's `Option` reads it); `None` when one is
/// not UTF-8, for serde to decide.
fn as_text<const N: usize>(found: [Option<&[u8]>; N]) -> Option<[Option<&str>; N]> {
    let mut text = [None; N];
    for (slot, value) in text.iter_mut().zip(found) {
        *slot = match value {
            None | Some(b"null") => None,
            Some(json) => Some(std::str::from_utf8(json).ok()?),
        };
    }
    Some(text)
}

/// Maps an OpenAI `usage` object to the record; `None` for `null`, and with a warning for a
/// non-object or an object with neither `prompt_tokens` nor `completion_tokens`.
pub fn usage_from(raw: &RawValue, warnings: &mut Vec<Warning>) -> Option<Usage> {
    usage_of(raw.get(), warnings)
}

/// `usage_from`, on the JSON text of the value.
fn usage_of(json: &str, warnings: &mut Vec<Warning>) -> Option<Usage> {
    let w = warnings;
    let usage: WireUsage<'_> = usage_object(json, "usage", w)?;
    let prompt = usage.prompt_tokens.take("usage.prompt_tokens", w);
    let completion = usage.completion_tokens.take("usage.completion_tokens", w);
    let prompt_details: PromptDetails = details(
        usage.prompt_tokens_details,
        "usage.prompt_tokens_details",
        w,
    );
    let mut cached = prompt_details
        .cached_tokens
        .take("usage.prompt_tokens_details.cached_tokens", w);
    let mut write = match prompt_details.cache_write_tokens {
        Count::Absent => prompt_details
            .cache_creation_tokens
            .take("usage.prompt_tokens_details.cache_creation_tokens", w),
        present => present.take("usage.prompt_tokens_details.cache_write_tokens", w),
    };
    let completion_details: CompletionDetails = details(
        usage.completion_tokens_details,
        "usage.completion_tokens_details",
        w,
    );
    let reasoning = completion_details
        .reasoning_tokens
        .take("usage.completion_tokens_details.reasoning_tokens", w);
    // `prompt_tokens` includes cache reads and writes; parts larger than the whole are bogus.
    if cached + write > prompt {
        w.push(Warning {
            field: "usage.prompt_tokens_details",
            problem: "cache tokens exceed prompt_tokens",
        });
        cached = cached.min(prompt);
        write = write.min(prompt - cached);
    }
    let reasoning = part_of(
        reasoning,
        completion,
        "usage.completion_tokens_details.reasoning_tokens",
        w,
    );
    Some(Usage {
        input_tokens: prompt - cached - write,
        cached_input_tokens: cached,
        cache_write_tokens: write,
        cache_write_1h_tokens: 0,
        output_tokens: completion,
        reasoning_tokens: reasoning,
    })
}

/// What an event of a chat stream turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Content, `[DONE]`, comments: passed on as is.
    Other,
    /// The usage chunk that has no choices: only there because usage was asked for.
    UsageOnly,
}

/// Usage extraction state for one chat-completions SSE stream.
#[derive(Debug, Default)]
pub struct Stream {
    extracted: Extracted,
}

impl Stream {
    /// Looks at one whole event; parses JSON only for the first chunk (model) and usage chunks.
    pub fn on_event(&mut self, event: &[u8]) -> Event {
        let Some(data) = sse::data(event) else {
            return Event::Other;
        };
        if !has_usage_value(&data) {
            if self.extracted.model.is_none() && MODEL_KEY.find(&data).is_some() {
                self.read_model(&data);
            }
            return Event::Other;
        }
        let Ok(chunk) = serde_json::from_slice::<Envelope<'_>>(&data) else {
            self.extracted.warnings.push(Warning {
                field: "usage chunk",
                problem: "not a JSON object",
            });
            return Event::Other;
        };
        let out = &mut self.extracted;
        if let Some(model) = model_of(chunk.model.map(RawValue::get), &mut out.warnings) {
            out.model = Some(model);
        }
        if out.response_id.is_none() {
            out.response_id = id_of(chunk.id.map(RawValue::get));
        }
        if let Some(tier) = tier_of(chunk.service_tier.map(RawValue::get)) {
            out.service_tier = tier;
        }
        let Some(raw) = chunk.usage else {
            return Event::Other;
        };
        // Some servers repeat a running total in every chunk: the last one is the whole.
        if let Some(usage) = usage_from(raw, &mut out.warnings) {
            out.usage = Some(usage);
        }
        // A chunk with no choices is there for its usage, whatever that turned out to be.
        match chunk.choices {
            Choices::Absent | Choices::Count(0) => Event::UsageOnly,
            Choices::Count(_) | Choices::Other => Event::Other,
        }
    }

    fn read_model(&mut self, data: &[u8]) {
        #[derive(Deserialize)]
        struct ModelOnly<'a> {
            #[serde(borrow)]
            id: Option<&'a RawValue>,
            #[serde(borrow)]
            model: Option<&'a RawValue>,
            #[serde(borrow)]
            service_tier: Option<&'a RawValue>,
        }
        if let Ok(chunk) = serde_json::from_slice::<ModelOnly<'_>>(data) {
            self.extracted.model =
                model_of(chunk.model.map(RawValue::get), &mut self.extracted.warnings);
            self.extracted.response_id = id_of(chunk.id.map(RawValue::get));
            if let Some(tier) = tier_of(chunk.service_tier.map(RawValue::get)) {
                self.extracted.service_tier = tier;
            }
        }
    }

    /// What the stream reported, once it has ended (or was cut).
    pub fn finish(self) -> Extracted {
        self.extracted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::ServiceTier;
    use bytes::Bytes;

    const PLAIN: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":42,"completion_tokens":15,"total_tokens":57,"prompt_tokens_details":{"cached_tokens":10,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":5,"audio_tokens":0}}}"#;

    #[test]
    fn plain_body_gives_all_five_counts() {
        let got = parse_body(PLAIN.as_bytes());
        assert_eq!(got.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(got.response_id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 32,
                cached_input_tokens: 10,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                output_tokens: 15,
                reasoning_tokens: 5,
            })
        );
        assert!(got.warnings.is_empty());
        assert_eq!(got.usage.unwrap().total_tokens(), 57);
    }

    #[test]
    fn missing_and_null_fields_count_as_zero() {
        let got = parse_body(br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}}"#);
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 3,
                ..Usage::default()
            })
        );
        assert!(got.warnings.is_empty());
    }

    #[test]
    fn weird_bodies_never_panic_and_report_why() {
        for body in [
            &b""[..],
            b"not json",
            b"[1,2,3]",
            b"{\"usage\": 5}",
            b"{\"usage\": {\"prompt_tokens\": \"many\", \"completion_tokens\": -1}}",
            b"{\"usage\": {\"prompt_tokens\": 1e400}}",
            b"{\"model\": 7, \"usage\": {\"prompt_tokens\": 1, \"prompt_tokens_details\": {\"cached_tokens\": 99}}}",
            b"{\"usage\": {\"completion_tokens\": 1, \"completion_tokens_details\": {\"reasoning_tokens\": 99}}}",
            b"{\"usage\": {\"prompt_tokens\": 18446744073709551615}}",
            b"{\"usage\": {\"prompt_tokens\": 5,",
        ] {
            let got = parse_body(body);
            assert!(!got.warnings.is_empty(), "{}", String::from_utf8_lossy(body));
            if let Some(u) = got.usage {
                assert!(u.prompt_tokens() <= 1);
                assert!(u.reasoning_tokens <= u.output_tokens);
            }
        }
    }

    #[test]
    fn openrouter_cache_writes_are_read() {
        let got = parse_body(br#"{"usage":{"prompt_tokens":100,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":20,"cache_write_tokens":30},"cost":0.1}}"#);
        let u = got.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens),
            (50, 20, 30)
        );
    }

    pub(crate) const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"the \\\"usage\\\": {\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn a_plain_body_reports_its_service_tier() {
        for (tier, expected) in [
            ("\"priority\"", ServiceTier::Priority),
            ("\"flex\"", ServiceTier::Flex),
            ("\"default\"", ServiceTier::Standard),
            ("null", ServiceTier::Standard),
        ] {
            let body = PLAIN.replacen('{', &format!("{{\"service_tier\":{tier},"), 1);
            assert_eq!(parse_body(body.as_bytes()).service_tier, expected, "{tier}");
            // The same body where the scan gives up (a key written with an escape): serde reads it.
            let escaped = body.replacen("\"id\"", "\"i\\u0064\"", 1);
            let got = parse_body(escaped.as_bytes());
            assert_eq!(got.service_tier, expected, "{escaped}");
            assert!(got.usage.is_some());
        }
        assert_eq!(
            parse_body(PLAIN.as_bytes()).service_tier,
            ServiceTier::Standard
        );
    }

    #[test]
    fn a_stream_reports_the_last_service_tier_of_the_chunks_it_reads() {
        let stream = STREAM.replace(
            "\"object\":\"chat.completion.chunk\",",
            "\"object\":\"chat.completion.chunk\",\"service_tier\":\"priority\",",
        );
        let bytes = stream.as_bytes();
        let (expected, _) = run_stream(&[bytes]);
        assert_eq!(expected.service_tier, ServiceTier::Priority);
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run_stream(&[a, b]).0, expected, "split at {i}");
        }
        // A usage chunk that says `null` keeps what the first chunk said.
        let last = stream.rfind("\"service_tier\":\"priority\"").unwrap();
        let mut nulled = stream.clone();
        nulled.replace_range(last..last + 25, "\"service_tier\":null");
        assert_eq!(
            run_stream(&[nulled.as_bytes()]).0.service_tier,
            ServiceTier::Priority
        );
    }

    fn run_stream(chunks: &[&[u8]]) -> (Extracted, Vec<Event>) {
        let mut framer = sse::Framer::new(sse::DEFAULT_EVENT_CAP);
        let mut stream = Stream::default();
        let mut kinds = Vec::new();
        for chunk in chunks {
            framer
                .feed(&Bytes::copy_from_slice(chunk), |e| {
                    kinds.push(stream.on_event(&e))
                })
                .unwrap();
        }
        (stream.finish(), kinds)
    }

    #[test]
    fn stream_usage_comes_from_the_usage_only_chunk() {
        let (got, kinds) = run_stream(&[STREAM.as_bytes()]);
        assert_eq!(got.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(got.response_id.as_deref(), Some("c"));
        assert_eq!(got.usage.unwrap().output_tokens, 2);
        assert_eq!(got.usage.unwrap().input_tokens, 9);
        assert_eq!(
            kinds,
            [
                Event::Other,
                Event::Other,
                Event::Other,
                Event::UsageOnly,
                Event::Other
            ]
        );
    }

    #[test]
    fn stream_split_at_every_offset_gives_the_same_usage() {
        let bytes = STREAM.as_bytes();
        let (expected, expected_kinds) = run_stream(&[bytes]);
        for i in 0..=bytes.len() {
            let (got, kinds) = run_stream(&[&bytes[..i], &bytes[i..]]);
            assert_eq!(got, expected, "split at {i}");
            assert_eq!(kinds, expected_kinds, "split at {i}");
        }
    }

    #[test]
    fn usage_inside_choices_is_kept_not_dropped() {
        let event = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        let mut stream = Stream::default();
        assert_eq!(stream.on_event(event), Event::Other);
        assert_eq!(stream.finish().usage.unwrap().output_tokens, 1);
    }

    #[test]
    fn truncated_stream_has_model_but_no_usage() {
        let bytes = STREAM.as_bytes();
        let (got, _) = run_stream(&[&bytes[..bytes.len() / 2]]);
        assert_eq!(got.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(got.usage, None);
    }

    /// `NOT_A_USAGE` and the Responses API's shape, which chat completions never send.
    fn not_a_chat_usage() -> Vec<&'static str> {
        let mut shapes = super::super::NOT_A_USAGE.to_vec();
        shapes.push(r#"{"input_tokens":5,"output_tokens":3}"#);
        shapes.push(r#"{"total_tokens":8}"#);
        shapes
    }

    #[test]
    fn a_plain_usage_that_is_no_chat_usage_is_none_with_a_warning() {
        for usage in not_a_chat_usage() {
            let got = parse_body(format!(r#"{{"model":"m","usage":{usage}}}"#).as_bytes());
            super::super::assert_no_usage(&got, usage, "usage");
            assert_eq!(got.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_streamed_usage_that_is_no_chat_usage_is_none_with_one_warning() {
        for usage in not_a_chat_usage() {
            let chunk = format!(r#"data: {{"model":"m","choices":[],"usage":{usage}}}"#);
            // Repeated, as servers that send a running usage in every chunk do.
            let stream = format!("{chunk}\n\n{chunk}\n\ndata: [DONE]\n\n");
            let (got, kinds) = run_stream(&[stream.as_bytes()]);
            super::super::assert_no_usage(&got, usage, "usage");
            // Still a chunk that is there for its usage: stripped when llm-meter asked for it.
            assert_eq!(
                kinds,
                [Event::UsageOnly, Event::UsageOnly, Event::Other],
                "{usage}"
            );
        }
    }

    #[test]
    fn a_usage_of_zero_counts_is_a_usage_not_a_missing_one() {
        let zero = r#"{"prompt_tokens":0,"completion_tokens":0}"#;
        let got = parse_body(format!(r#"{{"usage":{zero}}}"#).as_bytes());
        assert_eq!(got.usage, Some(Usage::default()));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        let stream = format!("data: {{\"choices\":[],\"usage\":{zero}}}\n\n");
        let (got, _) = run_stream(&[stream.as_bytes()]);
        assert_eq!(got.usage, Some(Usage::default()));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        // One count is enough: embeddings report only `prompt_tokens`.
        let got = parse_body(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        assert_eq!(got.usage.map(|u| u.input_tokens), Some(8));
    }

    #[test]
    fn a_bad_usage_after_a_good_one_keeps_the_good_one() {
        let stream = concat!(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{}}\n\n",
        );
        let (got, _) = run_stream(&[stream.as_bytes()]);
        assert_eq!(got.usage.map(|u| u.total_tokens()), Some(6));
    }
}
