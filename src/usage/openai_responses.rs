//! OpenAI Responses API usage: from a plain response object, or from the `response.completed`
//! (or `.incomplete` / `.failed`) event that ends a stream.
//!
//! | record field          | Responses API                                   |
//! |-----------------------|-------------------------------------------------|
//! | `input_tokens`        | `input_tokens` − `input_tokens_details.cached_tokens` |
//! | `cached_input_tokens` | `input_tokens_details.cached_tokens`            |
//! | `output_tokens`       | `output_tokens` (reasoning included)            |
//! | `reasoning_tokens`    | `output_tokens_details.reasoning_tokens`        |
//!
//! `Extracted::service_tier` is the response object's `service_tier`: in a stream, that of the
//! last event read (`response.created`, then the terminal event that carries the usage).

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Count, Counted, Extracted, Usage, Warning, details, has_usage_value, note, object, part_of,
    sse, tier_of, usage_object,
};

/// The stream's first event names the model and id, so a cut stream still has them.
static CREATED: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"response.created\""));

/// The response object's fields we read.
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
}

/// A stream event: the response object rides in `response`.
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireUsage<'a> {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(borrow, default)]
    input_tokens_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens_details: Option<&'a RawValue>,
}

impl Counted for WireUsage<'_> {
    fn names_a_count(&self) -> bool {
        self.input_tokens.is_present() || self.output_tokens.is_present()
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InputDetails {
    cached_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputDetails {
    reasoning_tokens: Count,
}

/// Reads model, id and usage from a complete (non-streaming) response body.
pub fn parse_body(body: &[u8]) -> Extracted {
    let mut out = Extracted::default();
    if let Some(envelope) = object::<Envelope<'_>>(body, &mut out.warnings) {
        read(&envelope, &mut out);
    }
    out
}

fn read(envelope: &Envelope<'_>, out: &mut Extracted) {
    note(
        out,
        (envelope.model, envelope.id, envelope.usage),
        usage_from,
    );
    if let Some(tier) = tier_of(envelope.service_tier.map(RawValue::get)) {
        out.service_tier = tier;
    }
}

/// Maps a Responses `usage` object to the record; `None` for `null`, and with a warning for a
/// non-object or an object with neither `input_tokens` nor `output_tokens`.
pub fn usage_from(raw: &RawValue, warnings: &mut Vec<Warning>) -> Option<Usage> {
    let w = warnings;
    let usage: WireUsage<'_> = usage_object(raw.get(), "usage", w)?;
    let input = usage.input_tokens.take("usage.input_tokens", w);
    let output = usage.output_tokens.take("usage.output_tokens", w);
    let input_details: InputDetails =
        details(usage.input_tokens_details, "usage.input_tokens_details", w);
    let cached = input_details
        .cached_tokens
        .take("usage.input_tokens_details.cached_tokens", w);
    let cached = part_of(cached, input, "usage.input_tokens_details.cached_tokens", w);
    let output_details: OutputDetails = details(
        usage.output_tokens_details,
        "usage.output_tokens_details",
        w,
    );
    let reasoning = output_details
        .reasoning_tokens
        .take("usage.output_tokens_details.reasoning_tokens", w);
    let reasoning = part_of(
        reasoning,
        output,
        "usage.output_tokens_details.reasoning_tokens",
        w,
    );
    Some(Usage {
        input_tokens: input - cached,
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        output_tokens: output,
        reasoning_tokens: reasoning,
    })
}

/// Usage extraction state for one Responses API stream.
#[derive(Debug, Default)]
pub struct Stream {
    extracted: Extracted,
}

impl Stream {
    /// Looks at one whole event; parses JSON only for `response.created` and events whose
    /// response carries a usage object (the terminal ones). Text deltas are only scanned.
    pub fn on_event(&mut self, event: &[u8]) {
        if let Some(data) = sse::data(event) {
            self.on_data(&data);
        }
    }

    /// Looks at one event's data: an SSE event's `data`, or a whole WebSocket message (the
    /// API's WebSocket mode sends the same events, one per message).
    pub fn on_data(&mut self, data: &[u8]) {
        let has_usage = has_usage_value(data);
        if !has_usage && CREATED.find(data).is_none() {
            return;
        }
        let response = serde_json::from_slice::<StreamEvent<'_>>(data)
            .ok()
            .and_then(|e| e.response)
            .and_then(|r| serde_json::from_str::<Envelope<'_>>(r.get()).ok());
        match response {
            Some(envelope) => read(&envelope, &mut self.extracted),
            None if has_usage => self.extracted.warnings.push(Warning {
                field: "response",
                problem: "not a JSON object",
            }),
            None => {}
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

    const PLAIN: &str = r#"{"id":"resp_67cc","object":"response","created_at":1741476542,"status":"completed","model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove \"usage\": {","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":6},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":123}}"#;

    #[test]
    fn plain_response_gives_input_cached_output_and_reasoning() {
        let got = parse_body(PLAIN.as_bytes());
        assert_eq!(got.model.as_deref(), Some("gpt-4.1-2025-04-14"));
        assert_eq!(got.response_id.as_deref(), Some("resp_67cc"));
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 30,
                cached_input_tokens: 6,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                output_tokens: 87,
                reasoning_tokens: 12,
            })
        );
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn bogus_details_are_clamped_and_reported() {
        let got = parse_body(
            br#"{"model":"m","usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":9},"output_tokens":"x"}}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.cached_input_tokens), (0, 5));
        assert_eq!(usage.output_tokens, 0);
        assert_eq!(got.warnings.len(), 2, "{:?}", got.warnings);
        assert!(parse_body(b"[]").usage.is_none());
    }

    /// A stream as the Responses API sends it: typed events, usage only at the end.
    pub(crate) fn stream_events(usage: bool) -> Vec<String> {
        let usage = if usage {
            r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":39}"#
        } else {
            "null"
        };
        vec![
            r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"gpt-4.1-mini","output":[],"usage":null}}

"#.to_owned(),
            r#"event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi \"usage\": {"}

"#.to_owned(),
            r#"event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":" there"}

"#.to_owned(),
            format!(
                r#"event: response.completed
data: {{"type":"response.completed","sequence_number":3,"response":{{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1-mini-2025-04-14","output":[],"usage":{usage}}}}}

"#
            ),
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
    fn stream_usage_comes_from_response_completed_at_every_split() {
        let whole = stream_events(true).concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        assert_eq!(expected.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
        assert_eq!(expected.response_id.as_deref(), Some("resp_1"));
        assert_eq!(expected.usage.map(|u| u.total_tokens()), Some(39));
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
    }

    #[test]
    fn a_plain_response_reports_its_service_tier() {
        let body = PLAIN.replacen('{', "{\"service_tier\":\"flex\",", 1);
        assert_eq!(parse_body(body.as_bytes()).service_tier, ServiceTier::Flex);
        assert_eq!(
            parse_body(PLAIN.as_bytes()).service_tier,
            ServiceTier::Standard
        );
    }

    #[test]
    fn a_stream_reports_the_service_tier_of_its_terminal_event_at_every_split() {
        let mut events = stream_events(true);
        events[0] = events[0].replace("\"usage\":null", "\"service_tier\":\"auto\",\"usage\":null");
        events[3] = events[3].replace("\"output\":[]", "\"service_tier\":\"flex\",\"output\":[]");
        let whole = events.concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        assert_eq!(expected.service_tier, ServiceTier::Flex);
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
        // Cut before its end: what `response.created` said.
        let cut = run(&[events[..3].concat().as_bytes()]);
        assert_eq!(cut.service_tier, ServiceTier::Standard);
    }

    #[test]
    fn a_websocket_message_reports_its_service_tier() {
        let mut stream = Stream::default();
        stream.on_data(
            br#"{"type":"response.completed","response":{"id":"resp_1","model":"m","service_tier":"priority","usage":{"input_tokens":3,"output_tokens":1}}}"#,
        );
        assert_eq!(stream.finish().service_tier, ServiceTier::Priority);
    }

    #[test]
    fn a_cut_stream_still_has_model_and_id() {
        let events = stream_events(true);
        let got = run(&[events[..3].concat().as_bytes()]);
        assert_eq!(got.model.as_deref(), Some("gpt-4.1-mini"));
        assert_eq!(got.response_id.as_deref(), Some("resp_1"));
        assert_eq!(got.usage, None);
    }

    /// `NOT_A_USAGE` and chat completions' shape, which the Responses API never sends.
    fn not_a_responses_usage() -> Vec<&'static str> {
        let mut shapes = super::super::NOT_A_USAGE.to_vec();
        shapes.push(r#"{"prompt_tokens":5,"completion_tokens":3}"#);
        shapes
    }

    #[test]
    fn a_plain_usage_that_is_no_responses_usage_is_none_with_a_warning() {
        for usage in not_a_responses_usage() {
            let body = format!(r#"{{"id":"resp_1","model":"m","output":[],"usage":{usage}}}"#);
            let got = parse_body(body.as_bytes());
            super::super::assert_no_usage(&got, usage, "usage");
        }
    }

    #[test]
    fn a_streamed_usage_that_is_no_responses_usage_is_none_with_a_warning() {
        for usage in not_a_responses_usage() {
            let mut events = stream_events(false);
            events[3] = format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\"model\":\"m\",\"output\":[],\"usage\":{usage}}}}}\n\n"
            );
            let got = run(&[events.concat().as_bytes()]);
            super::super::assert_no_usage(&got, usage, "usage");
            assert_eq!(got.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_usage_of_zero_counts_is_a_usage_not_a_missing_one() {
        let got = parse_body(br#"{"usage":{"input_tokens":0,"output_tokens":0}}"#);
        assert_eq!(got.usage, Some(Usage::default()));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }
}
