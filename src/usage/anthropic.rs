//! Anthropic Messages usage: from a plain message, or from a stream's `message_start` (input
//! and cache counts) and `message_delta` events (cumulative counts: the last one wins).
//!
//! | record field          | Anthropic Messages                                   |
//! |-----------------------|------------------------------------------------------|
//! | `input_tokens`        | `input_tokens` (cache tokens are NOT in it)          |
//! | `cached_input_tokens` | `cache_read_input_tokens`                            |
//! | `cache_write_tokens`  | `cache_creation_input_tokens`, else the sum of `cache_creation.ephemeral_*_input_tokens` |
//! | `cache_write_1h_tokens` | `cache_creation.ephemeral_1h_input_tokens`, cut to `cache_write_tokens` (0 when absent) |
//! | `output_tokens`       | `output_tokens`                                      |
//! | `reasoning_tokens`    | 0: thinking is billed as output and not counted apart |
//!
//! `Extracted::service_tier` is `usage.service_tier` (`standard`, `priority`, `batch`), in a
//! stream the last one given.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Count, Counted, Extracted, ServiceTier, Usage, Warning, details, has_usage_value, id_of,
    model_of, object, part_of, sse, tier_of, usage_object,
};

/// The message object's fields we read.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
}

/// A stream event: `message_start` carries the message, `message_delta` carries `usage`.
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(borrow)]
    message: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
}

/// The wire counts; every field may be absent (a `message_delta` often has only `output_tokens`).
#[derive(Deserialize)]
struct WireUsage<'a> {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(default)]
    cache_creation_input_tokens: Count,
    #[serde(default)]
    cache_read_input_tokens: Count,
    #[serde(borrow, default)]
    cache_creation: Option<&'a RawValue>,
    #[serde(borrow, default)]
    service_tier: Option<&'a RawValue>,
}

impl Counted for WireUsage<'_> {
    fn names_a_count(&self) -> bool {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
        .into_iter()
        .any(Count::is_present)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Count,
    ephemeral_1h_input_tokens: Count,
}

/// Counts as read so far; `None` where the provider has not said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Partial {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    /// The part of `cache_write` with a 1-hour TTL.
    cache_write_1h: Option<u64>,
    tier: Option<ServiceTier>,
}

impl Partial {
    /// Fields present in `newer` replace ours (the counts are cumulative, not increments).
    fn update(&mut self, newer: Self) {
        self.input = newer.input.or(self.input);
        self.output = newer.output.or(self.output);
        self.cache_read = newer.cache_read.or(self.cache_read);
        self.cache_write = newer.cache_write.or(self.cache_write);
        self.cache_write_1h = newer.cache_write_1h.or(self.cache_write_1h);
        self.tier = newer.tier.or(self.tier);
    }

    fn usage(self) -> Usage {
        let cache_write = self.cache_write.unwrap_or(0);
        Usage {
            input_tokens: self.input.unwrap_or(0),
            cached_input_tokens: self.cache_read.unwrap_or(0),
            cache_write_tokens: cache_write,
            // A later event may restate the total alone, smaller than the split it gave first.
            cache_write_1h_tokens: self.cache_write_1h.unwrap_or(0).min(cache_write),
            output_tokens: self.output.unwrap_or(0),
            reasoning_tokens: 0,
        }
    }
}

fn present(count: Count, field: &'static str, warnings: &mut Vec<Warning>) -> Option<u64> {
    match count {
        Count::Absent => None,
        other => Some(other.take(field, warnings)),
    }
}

/// Reads one `usage` object; `None` for `null`, and with a warning for a non-object or an object
/// with none of Anthropic's counts (an OpenAI-shaped usage, `{}`).
fn partial_from(raw: &RawValue, warnings: &mut Vec<Warning>) -> Option<Partial> {
    let w = warnings;
    let usage: WireUsage<'_> = usage_object(raw.get(), "usage", w)?;
    let split: CacheCreation = details(usage.cache_creation, "usage.cache_creation", w);
    let long = present(split.ephemeral_1h_input_tokens, LONG_FIELD, w);
    let cache_write = present(
        usage.cache_creation_input_tokens,
        "usage.cache_creation_input_tokens",
        w,
    )
    .or_else(|| {
        let short = present(
            split.ephemeral_5m_input_tokens,
            "usage.cache_creation.ephemeral_5m_input_tokens",
            w,
        );
        (short.is_some() || long.is_some()).then(|| short.unwrap_or(0) + long.unwrap_or(0))
    });
    // With the split given, the total is there too (given, or summed from it).
    let cache_write_1h = long
        .zip(cache_write)
        .map(|(long, total)| part_of(long, total, LONG_FIELD, w));
    Some(Partial {
        input: present(usage.input_tokens, "usage.input_tokens", w),
        output: present(usage.output_tokens, "usage.output_tokens", w),
        cache_read: present(
            usage.cache_read_input_tokens,
            "usage.cache_read_input_tokens",
            w,
        ),
        cache_write,
        cache_write_1h,
        tier: tier_of(usage.service_tier.map(RawValue::get)),
    })
}

/// The 1-hour part of the cache writes, as warnings name it.
const LONG_FIELD: &str = "usage.cache_creation.ephemeral_1h_input_tokens";

/// Reads model, id and usage from a complete (non-streaming) message.
pub fn parse_body(body: &[u8]) -> Extracted {
    let mut out = Extracted::default();
    let Some(envelope) = object::<Envelope<'_>>(body, &mut out.warnings) else {
        return out;
    };
    out.model = model_of(envelope.model.map(RawValue::get), &mut out.warnings);
    out.response_id = id_of(envelope.id.map(RawValue::get));
    let partial = envelope
        .usage
        .and_then(|u| partial_from(u, &mut out.warnings));
    out.usage = partial.map(Partial::usage);
    out.service_tier = partial.and_then(|p| p.tier).unwrap_or_default();
    out
}

/// Usage extraction state for one Messages stream.
#[derive(Debug, Default)]
pub struct Stream {
    extracted: Extracted,
    counts: Option<Partial>,
    /// A `message_delta` with usage arrived: the output count is the provider's final one.
    has_final_output: bool,
}

impl Stream {
    /// Looks at one whole event; parses JSON only when it carries a usage object
    /// (`message_start`, `message_delta`). Content deltas are only scanned.
    pub fn on_event(&mut self, event: &[u8]) {
        let Some(data) = sse::data(event) else {
            return;
        };
        if !has_usage_value(&data) {
            return;
        }
        let Ok(parsed) = serde_json::from_slice::<StreamEvent<'_>>(&data) else {
            self.extracted.warnings.push(Warning {
                field: "usage event",
                problem: "not a JSON object",
            });
            return;
        };
        let out = &mut self.extracted;
        let (usage, is_delta) = match parsed.message {
            Some(message) => match serde_json::from_str::<Envelope<'_>>(message.get()) {
                Ok(message) => {
                    if let Some(model) =
                        model_of(message.model.map(RawValue::get), &mut out.warnings)
                    {
                        out.model = Some(model);
                    }
                    out.response_id = out
                        .response_id
                        .take()
                        .or_else(|| id_of(message.id.map(RawValue::get)));
                    (message.usage, false)
                }
                Err(_) => (None, false),
            },
            None => (parsed.usage, true),
        };
        let Some(partial) = usage.and_then(|u| partial_from(u, &mut out.warnings)) else {
            return;
        };
        self.counts.get_or_insert_default().update(partial);
        self.has_final_output |= is_delta && partial.output.is_some();
    }

    /// What the stream reported, once it has ended (or was cut). A stream cut before its
    /// `message_delta` has its input counts but only the provisional output count of `message_start`.
    pub fn finish(self) -> Extracted {
        let mut out = self.extracted;
        out.usage = self.counts.map(Partial::usage);
        out.service_tier = self.counts.and_then(|c| c.tier).unwrap_or_default();
        out.is_output_provisional = self.counts.is_some() && !self.has_final_output;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello \"usage\": {"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},"output_tokens":6,"service_tier":"standard"}}"#;

    #[test]
    fn plain_message_counts_input_cache_reads_writes_and_output() {
        let got = parse_body(PLAIN.as_bytes());
        assert_eq!(got.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(
            got.response_id.as_deref(),
            Some("msg_01XFDUDYJgAACzvnptvVoYEL")
        );
        let usage = got.usage.unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: 12,
                cached_input_tokens: 2000,
                cache_write_tokens: 100,
                cache_write_1h_tokens: 0,
                output_tokens: 6,
                reasoning_tokens: 0,
            }
        );
        // Anthropic's input excludes the cache; the prompt we show includes it.
        assert_eq!(usage.prompt_tokens(), 2112);
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn cache_writes_split_by_duration_are_summed() {
        let got = parse_body(
            br#"{"model":"m","usage":{"input_tokens":1,"output_tokens":2,"cache_creation":{"ephemeral_5m_input_tokens":30,"ephemeral_1h_input_tokens":40}}}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!(usage.cache_write_tokens, 70);
        assert_eq!(usage.cache_write_1h_tokens, 40);
    }

    #[test]
    fn one_hour_cache_writes_are_the_split_part_of_a_given_total() {
        let got = parse_body(
            br#"{"model":"m","usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (300, 200)
        );
        // All cache writes stay in the prompt once, the 1-hour ones among them.
        assert_eq!(usage.prompt_tokens(), 301);
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn a_total_without_its_split_has_no_one_hour_writes() {
        let got = parse_body(
            br#"{"model":"m","usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":300}}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (300, 0)
        );
    }

    #[test]
    fn one_hour_writes_past_the_total_are_cut_to_it_with_a_warning() {
        let got = parse_body(
            br#"{"model":"m","usage":{"input_tokens":1,"cache_creation_input_tokens":50,"cache_creation":{"ephemeral_1h_input_tokens":80}}}"#,
        );
        let usage = got.usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (50, 50)
        );
        assert_eq!(
            got.warnings,
            [Warning {
                field: LONG_FIELD,
                problem: "exceeds the total it is part of"
            }]
        );
    }

    /// `stream_events` whose start reports cache writes of 100 (5 minutes) and 200 (1 hour).
    fn stream_with_one_hour_writes() -> Vec<String> {
        let mut events = stream_events(15);
        events[0] = events[0].replace(
            "\"cache_creation_input_tokens\":7,",
            "\"cache_creation_input_tokens\":300,\"cache_creation\":{\"ephemeral_5m_input_tokens\":100,\"ephemeral_1h_input_tokens\":200},",
        );
        events
    }

    #[test]
    fn a_stream_keeps_its_one_hour_writes_at_every_split() {
        let whole = stream_with_one_hour_writes().concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        let usage = expected.usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (300, 200)
        );
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
    }

    #[test]
    fn a_message_reports_its_service_tier() {
        assert_eq!(
            parse_body(PLAIN.as_bytes()).service_tier,
            ServiceTier::Standard
        );
        let priority = PLAIN.replace("\"standard\"", "\"priority\"");
        assert_eq!(
            parse_body(priority.as_bytes()).service_tier,
            ServiceTier::Priority
        );
        let batch = PLAIN.replace("\"standard\"", "\"batch\"");
        assert_eq!(
            parse_body(batch.as_bytes()).service_tier,
            ServiceTier::Batch
        );
    }

    #[test]
    fn a_stream_reports_the_last_service_tier_given_at_every_split() {
        let mut events = stream_events(15);
        events[0] = events[0].replace(
            "\"output_tokens\":1}",
            "\"output_tokens\":1,\"service_tier\":\"priority\"}",
        );
        let whole = events.concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        assert_eq!(expected.service_tier, ServiceTier::Priority);
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
        // A delta that names another tier has the last word.
        events[6] = events[6].replace(
            "{\"output_tokens\":15}",
            "{\"output_tokens\":15,\"service_tier\":\"standard\"}",
        );
        let got = run(&[events.concat().as_bytes()]);
        assert_eq!(got.service_tier, ServiceTier::Standard);
        assert_eq!(got.usage.unwrap().output_tokens, 15);
    }

    #[test]
    fn a_delta_restating_the_cache_writes_alone_keeps_their_one_hour_part() {
        let mut events = stream_with_one_hour_writes();
        events[6] = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"cache_creation_input_tokens\":300,\"output_tokens\":12}}\n\n".to_owned();
        let usage = run(&[events.concat().as_bytes()]).usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (300, 200)
        );
        events[6] = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"cache_creation_input_tokens\":300,\"cache_creation\":{\"ephemeral_5m_input_tokens\":250,\"ephemeral_1h_input_tokens\":50},\"output_tokens\":12}}\n\n".to_owned();
        let usage = run(&[events.concat().as_bytes()]).usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (300, 50)
        );
    }

    /// A stream as the Messages API sends it (`event:` lines, a ping, text deltas).
    pub(crate) fn stream_events(final_output: u64) -> Vec<String> {
        vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-haiku-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n".to_owned(),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_owned(),
            "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned(),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello \\\"usage\\\": {\"}}\n\n".to_owned(),
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" world\"}}\n\n".to_owned(),
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_owned(),
            format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{final_output}}}}}\n\n"),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned(),
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
    fn stream_keeps_start_counts_and_the_last_cumulative_output_at_every_split() {
        let whole = stream_events(15).concat();
        let bytes = whole.as_bytes();
        let expected = run(&[bytes]);
        assert_eq!(expected.model.as_deref(), Some("claude-haiku-4-5"));
        assert_eq!(expected.response_id.as_deref(), Some("msg_1"));
        assert_eq!(
            expected.usage,
            Some(Usage {
                input_tokens: 25,
                cached_input_tokens: 1000,
                cache_write_tokens: 7,
                cache_write_1h_tokens: 0,
                output_tokens: 15,
                reasoning_tokens: 0,
            })
        );
        assert!(!expected.is_output_provisional);
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), expected, "split at {i}");
        }
    }

    #[test]
    fn cumulative_deltas_are_not_added_up() {
        let mut events = stream_events(10);
        events.insert(
            6,
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":4}}\n\n".to_owned(),
        );
        let got = run(&[events.concat().as_bytes()]);
        assert_eq!(got.usage.unwrap().output_tokens, 10);
        assert_eq!(got.usage.unwrap().input_tokens, 25);
    }

    #[test]
    fn a_delta_that_restates_input_counts_replaces_them() {
        let mut events = stream_events(10);
        events[6] = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":1000,\"output_tokens\":12}}\n\n".to_owned();
        let usage = run(&[events.concat().as_bytes()]).usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (30, 12));
        assert_eq!(usage.cache_write_tokens, 7);
    }

    #[test]
    fn a_stream_cut_before_message_delta_has_input_but_no_final_output() {
        let events = stream_events(15);
        let got = run(&[events[..4].concat().as_bytes()]);
        assert_eq!(got.usage.unwrap().input_tokens, 25);
        assert!(got.is_output_provisional);
    }

    /// `NOT_A_USAGE` and OpenAI's shape, which the Messages API never sends.
    fn not_an_anthropic_usage() -> Vec<&'static str> {
        let mut shapes = super::super::NOT_A_USAGE.to_vec();
        shapes.push(r#"{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}"#);
        shapes
    }

    #[test]
    fn a_plain_usage_that_is_no_anthropic_usage_is_none_with_a_warning() {
        for usage in not_an_anthropic_usage() {
            let body = format!(r#"{{"id":"msg_1","model":"m","content":[],"usage":{usage}}}"#);
            let got = parse_body(body.as_bytes());
            super::super::assert_no_usage(&got, usage, "usage");
        }
    }

    #[test]
    fn a_streamed_usage_that_is_no_anthropic_usage_is_none_with_a_warning() {
        for usage in not_an_anthropic_usage() {
            let mut events = stream_events(15);
            events[0] = format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"model\":\"m\",\"content\":[],\"usage\":{usage}}}}}\n\n"
            );
            events[6] = format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{usage}}}\n\n"
            );
            let got = run(&[events.concat().as_bytes()]);
            assert_eq!(got.usage, None, "{usage}");
            assert!(!got.is_output_provisional, "{usage}");
            assert_eq!(
                got.warnings,
                [super::super::no_usage_warning(usage, "usage")],
                "{usage}"
            );
            assert_eq!(got.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_bad_final_delta_leaves_the_output_provisional() {
        let mut events = stream_events(15);
        events[6] = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{}}\n\n".to_owned();
        let got = run(&[events.concat().as_bytes()]);
        assert_eq!(got.usage.map(|u| u.input_tokens), Some(25));
        assert!(got.is_output_provisional);
    }

    #[test]
    fn a_usage_of_zero_counts_is_a_usage_not_a_missing_one() {
        let got = parse_body(br#"{"usage":{"input_tokens":0,"output_tokens":0}}"#);
        assert_eq!(got.usage, Some(Usage::default()));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }
}
