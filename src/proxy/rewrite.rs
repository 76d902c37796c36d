//! Request rewrite: asks for `stream_options.include_usage` on streaming chat requests, touching nothing else.
//!
//! The body is never re-serialized: the one edit is spliced into the original bytes, and the
//! result is a list of zero-copy slices around it.

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// What we need to know of a chat request, read from its top-level fields only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The requested model, when it is a string.
    pub model: Option<String>,
    /// `"stream": true`.
    pub is_streaming: bool,
    /// Where to splice so that the upstream sends usage, or `None` when the client already asked.
    edit: Option<Edit>,
}

/// One splice into the body: replace `start..end` with `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    start: usize,
    end: usize,
    text: &'static str,
}

const OPTIONS_OBJECT: &str = r#"{"include_usage":true}"#;
const OPTIONS_MEMBER: &str = r#""stream_options":{"include_usage":true},"#;
const INCLUDE_MEMBER: &str = r#""include_usage":true,"#;

/// Captures a field's raw JSON even when it is `null` (a plain `Option` would turn `null` into `None`).
fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct TopLevel<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    include_usage: Option<&'a RawValue>,
}

impl ChatRequest {
    /// Reads a request body; `None` when it is not a JSON object we can safely edit (invalid
    /// JSON, duplicate top-level fields): such a body is forwarded untouched. With
    /// `asks_stream_usage` (routes whose streams report usage only when asked), a streaming
    /// request that does not ask gets the edit planned.
    pub fn inspect(body: &[u8], asks_stream_usage: bool) -> Option<Self> {
        // The common case needs no edit: a fast scan finds the top-level fields, skipping the
        // (long) messages with a vectorized search instead of serde's byte-by-byte walk. An
        // edit, or a body the scan does not take, goes through serde, which also validates.
        if let Some(fields) = scan_top_level(body) {
            let is_streaming = fields.stream == Some(b"true".as_slice());
            if !(is_streaming && asks_stream_usage) {
                return Some(Self {
                    model: fields.model.and_then(|m| serde_json::from_slice(m).ok()),
                    is_streaming,
                    edit: None,
                });
            }
        }
        Self::parse(body, asks_stream_usage)
    }

    /// `inspect` through serde: the whole body is read, and an edit planned where needed.
    fn parse(body: &[u8], asks_stream_usage: bool) -> Option<Self> {
        // serde would also read a struct from a JSON array; only an object can be edited.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        let top: TopLevel<'_> = serde_json::from_slice(body).ok()?;
        let model = top.model.and_then(|m| serde_json::from_str(m.get()).ok());
        let is_streaming = top.stream.is_some_and(|s| s.get() == "true");
        let edit = if is_streaming && asks_stream_usage {
            usage_edit(body, top.stream_options)?
        } else {
            None
        };
        Some(Self {
            model,
            is_streaming,
            edit,
        })
    }

    /// True when llm-meter must ask for usage on the client's behalf (and hide the answer).
    pub fn needs_usage_injected(&self) -> bool {
        self.edit.is_some()
    }

    /// The body to send upstream: the original bytes, with the usage option spliced in if needed.
    pub fn rewrite(&self, body: Bytes) -> Vec<Bytes> {
        match &self.edit {
            None => vec![body],
            Some(edit) => vec![
                body.slice(..edit.start),
                Bytes::from_static(edit.text.as_bytes()),
                body.slice(edit.end..),
            ],
        }
    }
}

/// A request body made of a few slices, sent in order with an exact length.
#[derive(Debug)]
pub struct Spliced {
    pieces: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl Spliced {
    /// A body of these pieces, in order.
    pub fn new(pieces: Vec<Bytes>) -> Self {
        let remaining = pieces.iter().map(|p| p.len() as u64).sum();
        Self {
            pieces: pieces.into(),
            remaining,
        }
    }

    /// Total length in bytes, for `Content-Length`.
    pub fn len(&self) -> u64 {
        self.remaining
    }

    /// True when the body has no bytes.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }
}

impl http_body::Body for Spliced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = this.pieces.pop_front().map(|piece| {
            this.remaining -= piece.len() as u64;
            Ok(http_body::Frame::data(piece))
        });
        std::task::Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// The raw JSON of the top-level fields `inspect` reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fields<'a> {
    model: Option<&'a [u8]>,
    stream: Option<&'a [u8]>,
    stream_options: Option<&'a [u8]>,
}

/// Finds the top-level `model`, `stream` and `stream_options` of a JSON object without
/// parsing the rest: strings are skipped with `memchr`, nesting is only counted. `None` for
/// anything it does not take as-is (not an object, a repeated field, a key with escapes):
/// `inspect` then asks serde.
fn scan_top_level(b: &[u8]) -> Option<Fields<'_>> {
    let mut fields = Fields::default();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(fields);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(b, i)?;
        let key = &b[i + 1..key_end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_end = skip_value(b, i)?;
        let slot = match key {
            b"model" => Some(&mut fields.model),
            b"stream" => Some(&mut fields.stream),
            b"stream_options" => Some(&mut fields.stream_options),
            _ => None,
        };
        if let Some(slot) = slot {
            if slot.is_some() {
                return None;
            }
            *slot = Some(&b[i..value_end]);
        }
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return (skip_ws(b, i + 1) == b.len()).then_some(fields),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// The index after the string that starts (with its quote) at `i`.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let at = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: the next byte is part of it, whatever it is.
        j = at + 2;
    }
}

/// The index after the value that starts at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())
                .unwrap_or(b.len() - i);
            (len > 0).then_some(i + len)
        }
    }
}

/// Where and what to splice so that `stream_options.include_usage` is `true`; `Some(None)` when it
/// already is, `None` when the body cannot be edited safely.
#[expect(
    clippy::option_option,
    reason = "three outcomes: cannot edit, no edit needed, edit"
)]
fn usage_edit(body: &[u8], options: Option<&RawValue>) -> Option<Option<Edit>> {
    let Some(options) = options else {
        // No `stream_options`: add the member right after the top-level `{`.
        let at = body.iter().position(|b| !b.is_ascii_whitespace())? + 1;
        return Some(Some(Edit {
            start: at,
            end: at,
            text: OPTIONS_MEMBER,
        }));
    };
    let span = span_of(body, options.get());
    let trimmed = options.get().trim_start();
    if !trimmed.starts_with('{') {
        // `null` or a wrong type: replace the value.
        return Some(Some(whole(span)));
    }
    let parsed: StreamOptions<'_> = serde_json::from_str(options.get()).ok()?;
    match parsed.include_usage {
        Some(v) if v.get() == "true" => Some(None),
        Some(v) => {
            let inner = span_of(body, v.get());
            Some(Some(Edit {
                start: inner.0,
                end: inner.1,
                text: "true",
            }))
        }
        None if trimmed[1..].trim_start().starts_with('}') => Some(Some(whole(span))),
        None => {
            let at = span.0 + (options.get().len() - trimmed.len()) + 1;
            Some(Some(Edit {
                start: at,
                end: at,
                text: INCLUDE_MEMBER,
            }))
        }
    }
}

fn whole((start, end): (usize, usize)) -> Edit {
    Edit {
        start,
        end,
        text: OPTIONS_OBJECT,
    }
}

/// The byte range a borrowed JSON fragment occupies inside the body it was parsed from.
fn span_of(body: &[u8], fragment: &str) -> (usize, usize) {
    let start = (fragment.as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    (start, start + fragment.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn rewritten(body: &str) -> (ChatRequest, String) {
        let req = ChatRequest::inspect(body.as_bytes(), true).expect("inspectable");
        let out = req
            .rewrite(Bytes::copy_from_slice(body.as_bytes()))
            .concat();
        (req, String::from_utf8(out).unwrap())
    }

    fn json_of(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn stream_without_options_gets_include_usage_and_nothing_else() {
        let body =
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let (req, out) = rewritten(body);
        assert!(req.needs_usage_injected());
        assert_eq!(req.model.as_deref(), Some("gpt-4o"));
        let mut expected = json_of(body);
        expected["stream_options"] = json!({"include_usage": true});
        assert_eq!(json_of(&out), expected);
        // Every original byte is still there, in order.
        assert_eq!(out.replace(OPTIONS_MEMBER, ""), body);
    }

    #[test]
    fn existing_options_are_kept_and_extended() {
        for (body, expected_options) in [
            (
                r#"{"stream":true,"stream_options":{"x":1}}"#,
                json!({"x":1,"include_usage":true}),
            ),
            (
                r#"{"stream":true,"stream_options":{ }}"#,
                json!({"include_usage":true}),
            ),
            (
                r#"{"stream":true,"stream_options":null}"#,
                json!({"include_usage":true}),
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false,"x":2}}"#,
                json!({"include_usage":true,"x":2}),
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":null}}"#,
                json!({"include_usage":true}),
            ),
            (
                r#"  {"stream":true,"stream_options":"odd"}"#,
                json!({"include_usage":true}),
            ),
        ] {
            let (req, out) = rewritten(body);
            assert!(req.needs_usage_injected(), "{body}");
            let got = json_of(&out);
            assert_eq!(got["stream_options"], expected_options, "{body}");
            assert_eq!(got["stream"], json!(true));
        }
    }

    #[test]
    fn client_that_asked_for_usage_is_left_alone() {
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let (req, out) = rewritten(body);
        assert!(!req.needs_usage_injected());
        assert_eq!(out, body);
    }

    #[test]
    fn non_streaming_requests_are_never_edited() {
        for body in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","stream":false}"#,
            r#"{"stream":"true"}"#,
        ] {
            let (req, out) = rewritten(body);
            assert!(!req.is_streaming && !req.needs_usage_injected());
            assert_eq!(out, body);
        }
    }

    #[test]
    fn uneditable_bodies_are_refused() {
        for body in [
            "",
            "[]",
            "not json",
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true"#,
        ] {
            assert_eq!(ChatRequest::inspect(body.as_bytes(), true), None, "{body}");
        }
    }

    #[test]
    fn routes_whose_streams_always_report_usage_get_no_edit() {
        // Neither body is touched, with or without `stream_options` (chat would edit both).
        for body in [
            r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#,
            r#"{"model":"gpt-4.1","stream":true,"stream_options":7}"#,
        ] {
            let req = ChatRequest::inspect(body.as_bytes(), false).expect("inspectable");
            assert_eq!(req.model.as_deref(), Some("gpt-4.1"));
            assert!(req.is_streaming);
            assert!(!req.needs_usage_injected());
            assert_eq!(req.rewrite(Bytes::from(body)).concat(), body.as_bytes());
        }
    }

    #[test]
    fn the_fast_scan_finds_what_serde_finds() {
        let long = "x\\\"y\\\\".repeat(1000);
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":false}"#.to_owned(),
            r#" { "messages" : [ {"content": "a \"stream\": true }"} , [1, {"b": [ ]}] ] , "model" : "m\u00e9" , "stream" : true } "#.to_owned(),
            format!(r#"{{"messages":[{{"content":"{long}"}}],"model":"big","stream_options":{{"include_usage":true}},"stream":true}}"#),
            r#"{"model":null,"stream":1,"n":-2.5e3,"t":true}"#.to_owned(),
            r#"{}"#.to_owned(),
        ] {
            let fast = scan_top_level(body.as_bytes()).expect("the scan takes it");
            let top: TopLevel<'_> = serde_json::from_str(&body).unwrap();
            fn raw(v: Option<&RawValue>) -> Option<&[u8]> {
                v.map(|v| v.get().as_bytes())
            }
            assert_eq!(fast.model, raw(top.model), "{body}");
            assert_eq!(fast.stream, raw(top.stream), "{body}");
            assert_eq!(fast.stream_options, raw(top.stream_options), "{body}");
        }
        for refused in [
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true"#,
            r#"{"mod\u0065l":"m"}"#,
            r#"{"model":"m"} x"#,
            r#"["model"]"#,
            "",
        ] {
            assert_eq!(scan_top_level(refused.as_bytes()), None, "{refused}");
        }
    }

    #[test]
    fn model_that_is_not_a_string_is_ignored() {
        let req = ChatRequest::inspect(br#"{"model":5}"#, true).unwrap();
        assert_eq!(req.model, None);
    }
}
