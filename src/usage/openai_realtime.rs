//! OpenAI Realtime API usage: from the `response.done` event that ends each response of a
//! WebSocket session; and the session's model, from `session.created` / `session.updated`.
//!
//! | record field          | Realtime API (`response.usage`)                          |
//! |-----------------------|----------------------------------------------------------|
//! | `input_tokens`        | `input_tokens` − `input_token_details.cached_tokens`      |
//! | `cached_input_tokens` | `input_token_details.cached_tokens`                       |
//! | `output_tokens`       | `output_tokens` (text and audio)                          |
//! | `audio` (input)       | `input_token_details.audio_tokens` − cached audio, and `input_token_details.cached_tokens_details.audio_tokens` |
//! | `audio` (output)      | `output_token_details.audio_tokens`                       |
//!
//! Audio tokens are counted in the input and output like any token; their part is kept apart
//! (`Extracted::audio`) because they cost more than text, at the audio rates of a price that has
//! them.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Count, Counted, Extracted, Usage, Warning, details, has_usage_value, note, part_of,
    usage_object,
};

/// An event whose `response` object we read.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

/// The response object's fields we read.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireUsage<'a> {
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(borrow, default)]
    input_token_details: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_token_details: Option<&'a RawValue>,
}

impl Counted for WireUsage<'_> {
    fn names_a_count(&self) -> bool {
        self.input_tokens.is_present() || self.output_tokens.is_present()
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InputDetails<'a> {
    cached_tokens: Count,
    audio_tokens: Count,
    #[serde(borrow)]
    cached_tokens_details: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CachedDetails {
    audio_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputDetails {
    audio_tokens: Count,
}

/// The session object of `session.created` / `session.updated`.
#[derive(Deserialize)]
struct SessionEvent<'a> {
    #[serde(borrow)]
    session: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Session<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
}

/// Reads model, id, usage and its audio part from one server event (`response.done`); an
/// event with no `response` object gives nothing.
pub fn parse_event(data: &[u8]) -> Extracted {
    let mut out = Extracted::default();
    let has_usage = has_usage_value(data);
    let envelope = serde_json::from_slice::<Event<'_>>(data)
        .ok()
        .and_then(|e| e.response)
        .and_then(|r| serde_json::from_str::<Envelope<'_>>(r.get()).ok());
    match envelope {
        Some(envelope) => {
            note(
                &mut out,
                (envelope.model, envelope.id, envelope.usage),
                usage_from,
            );
            if out.usage.is_some()
                && let Some(usage) = envelope.usage
            {
                out.audio = audio_of(usage);
            }
        }
        None if has_usage => out.warnings.push(Warning {
            field: "response",
            problem: "not a JSON object",
        }),
        None => {}
    }
    out
}

/// Maps a Realtime `usage` object to the record; `None` for `null`, and with a warning for a
/// non-object or an object with neither `input_tokens` nor `output_tokens`.
fn usage_from(raw: &RawValue, warnings: &mut Vec<Warning>) -> Option<Usage> {
    let w = warnings;
    let usage: WireUsage<'_> = usage_object(raw.get(), "usage", w)?;
    let input = usage.input_tokens.take("usage.input_tokens", w);
    let output = usage.output_tokens.take("usage.output_tokens", w);
    let input_details: InputDetails<'_> =
        details(usage.input_token_details, "usage.input_token_details", w);
    let cached = input_details
        .cached_tokens
        .take("usage.input_token_details.cached_tokens", w);
    let cached = part_of(cached, input, "usage.input_token_details.cached_tokens", w);
    Some(Usage {
        input_tokens: input - cached,
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        output_tokens: output,
        reasoning_tokens: 0,
    })
}

/// The audio part of a usage already read (its problems were warned about then): uncached and
/// cached audio input, and audio output, each within the count it is part of.
fn audio_of(raw: &RawValue) -> Usage {
    let mut ignored = Vec::new();
    let w = &mut ignored;
    let Some(usage) = usage_object::<WireUsage<'_>>(raw.get(), "usage", w) else {
        return Usage::default();
    };
    let input = usage.input_tokens.take("", w);
    let output = usage.output_tokens.take("", w);
    let input_details: InputDetails<'_> = details(usage.input_token_details, "", w);
    let cached = part_of(input_details.cached_tokens.take("", w), input, "", w);
    let cached_details: CachedDetails = details(input_details.cached_tokens_details, "", w);
    let audio_in = part_of(input_details.audio_tokens.take("", w), input, "", w);
    let cached_audio =
        part_of(cached_details.audio_tokens.take("", w), cached, "", w).min(audio_in);
    let output_details: OutputDetails = details(usage.output_token_details, "", w);
    Usage {
        input_tokens: (audio_in - cached_audio).min(input - cached),
        cached_input_tokens: cached_audio,
        output_tokens: part_of(output_details.audio_tokens.take("", w), output, "", w),
        ..Usage::default()
    }
}

/// The model a `session.created` or `session.updated` event names, if any.
pub fn session_model(data: &[u8]) -> Option<String> {
    let session = serde_json::from_slice::<SessionEvent<'_>>(data)
        .ok()?
        .session?;
    let model = serde_json::from_str::<Session<'_>>(session.get())
        .ok()?
        .model?;
    let model: String = serde_json::from_str(model.get()).ok()?;
    (!model.is_empty()).then_some(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `response.done` as the Realtime API sends it, audio and cache included.
    const DONE: &str = r#"{"type":"response.done","event_id":"event_1","response":{"object":"realtime.response","id":"resp_rt1","status":"completed","output":[],"usage":{"total_tokens":253,"input_tokens":132,"output_tokens":121,"input_token_details":{"text_tokens":119,"audio_tokens":13,"image_tokens":0,"cached_tokens":64,"cached_tokens_details":{"text_tokens":60,"audio_tokens":4,"image_tokens":0}},"output_token_details":{"text_tokens":30,"audio_tokens":91}}}}"#;

    #[test]
    fn response_done_gives_input_cached_output_and_the_audio_part() {
        let got = parse_event(DONE.as_bytes());
        assert_eq!(got.response_id.as_deref(), Some("resp_rt1"));
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 68,
                cached_input_tokens: 64,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                output_tokens: 121,
                reasoning_tokens: 0,
            })
        );
        assert_eq!(
            got.audio,
            Usage {
                input_tokens: 9,
                cached_input_tokens: 4,
                output_tokens: 91,
                ..Usage::default()
            }
        );
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn a_text_only_response_has_no_audio_part() {
        let got = parse_event(
            br#"{"type":"response.done","response":{"id":"r","usage":{"input_tokens":10,"output_tokens":4}}}"#,
        );
        assert_eq!(got.usage.map(|u| u.total_tokens()), Some(14));
        assert_eq!(got.audio, Usage::default());
    }

    #[test]
    fn a_usage_that_is_no_realtime_usage_is_none_with_a_warning() {
        for usage in super::super::NOT_A_USAGE {
            let event =
                format!(r#"{{"type":"response.done","response":{{"id":"r","usage":{usage}}}}}"#);
            let got = parse_event(event.as_bytes());
            super::super::assert_no_usage(&got, usage, "usage");
        }
        assert_eq!(
            parse_event(b"{\"type\":\"response.done\"}"),
            Extracted::default()
        );
    }

    #[test]
    fn the_session_names_the_model() {
        let created = br#"{"type":"session.created","session":{"id":"sess_1","model":"gpt-realtime","voice":"alloy"}}"#;
        assert_eq!(session_model(created).as_deref(), Some("gpt-realtime"));
        assert_eq!(
            session_model(br#"{"type":"session.created","session":{"model":""}}"#),
            None
        );
        assert_eq!(session_model(br#"{"type":"error"}"#), None);
    }
}
