//! Gemini native usage (`generateContent`, `streamGenerateContent`): the `usageMetadata` object.
//!
//! | record field          | Gemini `usageMetadata`                                         |
//! |-----------------------|----------------------------------------------------------------|
//! | `input_tokens`        | `promptTokenCount` − cached + `toolUsePromptTokenCount`         |
//! | `cached_input_tokens` | `cachedContentTokenCount` (part of `promptTokenCount`)          |
//! | `output_tokens`       | `candidatesTokenCount` + `thoughtsTokenCount`, unless the total shows the thoughts are already inside the candidates |
//! | `reasoning_tokens`    | `thoughtsTokenCount`                                           |
//!
//! A stream repeats a running `usageMetadata` in its chunks: the last one is the whole. Without
//! `?alt=sse` the stream is one JSON array delivered piece by piece; it is read as a plain body.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Count, Counted, Extracted, Usage, Warning, has_key, note, sse, usage_object};

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, rename = "responseId")]
    id: Option<&'a RawValue>,
    #[serde(borrow, rename = "modelVersion")]
    model: Option<&'a RawValue>,
    #[serde(borrow, rename = "usageMetadata")]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: Count,
    #[serde(default)]
    candidates_token_count: Count,
    #[serde(default)]
    cached_content_token_count: Count,
    #[serde(default)]
    thoughts_token_count: Count,
    #[serde(default)]
    tool_use_prompt_token_count: Count,
    #[serde(default)]
    total_token_count: Count,
}

impl Counted for WireUsage {
    /// Any count but `totalTokenCount`: a total alone cannot be split or priced.
    fn names_a_count(&self) -> bool {
        [
            self.prompt_token_count,
            self.candidates_token_count,
            self.cached_content_token_count,
            self.thoughts_token_count,
            self.tool_use_prompt_token_count,
        ]
        .into_iter()
        .any(Count::is_present)
    }
}

/// Maps a `usageMetadata` object to the record; `None` for `null`, and with a warning for a
/// non-object or an object with none of Gemini's counts.
pub fn usage_from(raw: &RawValue, warnings: &mut Vec<Warning>) -> Option<Usage> {
    let w = warnings;
    let usage: WireUsage = usage_object(raw.get(), "usageMetadata", w)?;
    let prompt = usage
        .prompt_token_count
        .take("usageMetadata.promptTokenCount", w);
    let candidates = usage
        .candidates_token_count
        .take("usageMetadata.candidatesTokenCount", w);
    let cached = usage
        .cached_content_token_count
        .take("usageMetadata.cachedContentTokenCount", w);
    let cached = super::part_of(cached, prompt, "usageMetadata.cachedContentTokenCount", w);
    let thoughts = usage
        .thoughts_token_count
        .take("usageMetadata.thoughtsTokenCount", w);
    let tool_prompt = usage
        .tool_use_prompt_token_count
        .take("usageMetadata.toolUsePromptTokenCount", w);
    let total = usage
        .total_token_count
        .take("usageMetadata.totalTokenCount", w);
    // Some model versions count thoughts inside the candidates; the total tells which.
    let thoughts_inside = thoughts > 0 && prompt + tool_prompt + candidates == total;
    let output = if thoughts_inside {
        candidates.max(thoughts)
    } else {
        candidates + thoughts
    };
    Some(Usage {
        input_tokens: prompt - cached + tool_prompt,
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        output_tokens: output,
        reasoning_tokens: thoughts.min(output),
    })
}

fn read(envelope: &Envelope<'_>, out: &mut Extracted) {
    note(
        out,
        (envelope.model, envelope.id, envelope.usage),
        usage_from,
    );
}

/// Reads a complete response: one object, or the JSON array a stream without `alt=sse` is.
pub fn parse_body(body: &[u8]) -> Extracted {
    let mut out = Extracted::default();
    match body.trim_ascii_start().first() {
        Some(b'{') => {
            if let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(body) {
                read(&envelope, &mut out);
                return out;
            }
        }
        Some(b'[') => {
            if let Ok(chunks) = serde_json::from_slice::<Vec<Envelope<'_>>>(body) {
                for chunk in &chunks {
                    read(chunk, &mut out);
                }
                return out;
            }
        }
        _ => {}
    }
    out.warnings.push(Warning {
        field: "body",
        problem: "not a JSON object or array",
    });
    out
}

/// Usage extraction state for one `streamGenerateContent?alt=sse` stream.
#[derive(Debug, Default)]
pub struct Stream {
    extracted: Extracted,
}

impl Stream {
    /// Looks at one whole event; parses JSON only when it carries `usageMetadata` or the
    /// model is not known yet.
    pub fn on_event(&mut self, event: &[u8]) {
        let Some(data) = sse::data(event) else {
            return;
        };
        if !has_key(&data, b"\"usageMetadata\"") && self.extracted.model.is_some() {
            return;
        }
        match serde_json::from_slice::<Envelope<'_>>(&data) {
            Ok(envelope) => read(&envelope, &mut self.extracted),
            Err(_) => self.extracted.warnings.push(Warning {
                field: "stream chunk",
                problem: "not a JSON object",
            }),
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

    #[test]
    fn thoughts_outside_the_candidates_are_added_to_the_output() {
        let got = parse_body(
            br#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":12,"totalTokenCount":45,"thoughtsTokenCount":25,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}]},"modelVersion":"gemini-2.5-flash","responseId":"r-1"}"#,
        );
        assert_eq!(got.model.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(got.response_id.as_deref(), Some("r-1"));
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 8,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                output_tokens: 37,
                reasoning_tokens: 25,
            })
        );
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn thoughts_inside_the_candidates_are_not_counted_twice() {
        let got = parse_body(
            br#"{"usageMetadata":{"promptTokenCount":100,"cachedContentTokenCount":60,"candidatesTokenCount":40,"thoughtsTokenCount":30,"totalTokenCount":140},"modelVersion":"gemini-2.5-pro"}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.cached_input_tokens), (40, 60));
        assert_eq!((usage.output_tokens, usage.reasoning_tokens), (40, 30));
        assert_eq!(usage.total_tokens(), 140);
    }

    #[test]
    fn a_json_array_stream_keeps_the_last_usage() {
        let got = parse_body(
            br#"[{"candidates":[],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1,"totalTokenCount":6},"modelVersion":"gemini-2.0-flash"}
,{"candidates":[],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":9,"totalTokenCount":14},"modelVersion":"gemini-2.0-flash"}]"#,
        );
        assert_eq!(got.usage.unwrap().output_tokens, 9);
        assert_eq!(got.model.as_deref(), Some("gemini-2.0-flash"));
    }

    /// A stream as `streamGenerateContent?alt=sse` sends it (CRLF framing, running totals).
    pub(crate) fn stream_events() -> Vec<String> {
        let chunk = |text: &str, candidates: u64, finish: &str| {
            format!(
                "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{text}\"}}],\"role\": \"model\"}}{finish},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 7,\"candidatesTokenCount\": {candidates},\"totalTokenCount\": {}}},\"modelVersion\": \"gemini-2.0-flash\",\"responseId\": \"r-2\"}}\r\n\r\n",
                7 + candidates
            )
        };
        vec![
            chunk("The \\\"usageMetadata\\\"", 2, ""),
            chunk(" sky", 4, ""),
            chunk(" is blue.", 6, ",\"finishReason\": \"STOP\""),
        ]
    }

    fn run(chunks: &[&[u8]]) -> Extracted {
        let mut stream = Stream::default();
        sse::frame_all(chunks, |event| {
            stream.on_event(event);
        });
        stream.finish()
    }

    #[test]
    fn sse_stream_usage_is_the_last_running_total_at_every_split() {
        let whole = stream_events().concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        assert_eq!(expected.model.as_deref(), Some("gemini-2.0-flash"));
        assert_eq!(
            expected.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((7, 6))
        );
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
    }

    /// `NOT_A_USAGE`, OpenAI's shape and a total alone, which cannot be split or priced.
    fn not_a_gemini_usage() -> Vec<&'static str> {
        let mut shapes = super::super::NOT_A_USAGE.to_vec();
        shapes.push(r#"{"prompt_tokens":5,"completion_tokens":3}"#);
        shapes.push(r#"{"totalTokenCount":8}"#);
        shapes
    }

    #[test]
    fn a_plain_usage_that_is_no_gemini_usage_is_none_with_a_warning() {
        for usage in not_a_gemini_usage() {
            let one = format!(r#"{{"candidates":[],"usageMetadata":{usage},"modelVersion":"m"}}"#);
            // A whole response, and the JSON array a stream without `alt=sse` is.
            for body in [one.clone(), format!("[{one},{one}]")] {
                let got = parse_body(body.as_bytes());
                assert_eq!(got.usage, None, "{body}");
                assert_eq!(
                    got.warnings,
                    [super::super::no_usage_warning(usage, "usageMetadata")],
                    "{body}"
                );
                assert_eq!(got.model.as_deref(), Some("m"));
            }
        }
    }

    #[test]
    fn a_streamed_usage_that_is_no_gemini_usage_is_none_with_a_warning() {
        for usage in not_a_gemini_usage() {
            let chunk = format!(
                "data: {{\"candidates\":[],\"usageMetadata\":{usage},\"modelVersion\":\"m\"}}\r\n\r\n"
            );
            let got = run(&[chunk.repeat(3).as_bytes()]);
            super::super::assert_no_usage(&got, usage, "usageMetadata");
        }
    }

    #[test]
    fn a_usage_of_zero_counts_is_a_usage_not_a_missing_one() {
        let got = parse_body(br#"{"usageMetadata":{"promptTokenCount":0,"totalTokenCount":0}}"#);
        assert_eq!(got.usage, Some(Usage::default()));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }
}
