//! Request rewrite: asks for `stream_options.include_usage` on streaming chat requests, touching nothing else.
//!
//! The body is never re-serialized: the one edit is spliced into the original bytes, and the
//! result is a list of zero-copy slices around it.

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::{attribution, json};

/// What we need to know of a chat request, read from its top-level fields only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The requested model, when it is a string.
    pub model: Option<String>,
    /// `"stream": true`.
    pub is_streaming: bool,
    /// Where to splice so that the upstream sends usage, or `None` when the client already asked.
    edit: Option<Edit>,
    /// The end user the body names in its standard field (OpenAI's `user` or
    /// `safety_identifier`, Anthropic's `metadata.user_id`).
    pub user: Option<String>,
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
    #[serde(borrow, default, deserialize_with = "raw")]
    user: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    safety_identifier: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    metadata: Option<&'a RawValue>,
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
        // A fast scan finds the top-level fields, skipping the (long) messages with a
        // vectorized search instead of serde's byte-by-byte walk. That covers the common cases:
        // no edit, or a stream without `stream_options`, whose edit is an insertion after the
        // opening brace. An edit inside `stream_options`, or a body the scan does not take,
        // goes through serde, which also validates.
        let fields = json::top_level(
            body,
            [
                b"model",
                b"stream",
                b"stream_options",
                b"user",
                b"safety_identifier",
                b"metadata",
            ],
        );
        if let Some([model, stream, options, user, safety_identifier, metadata]) = fields {
            let is_streaming = stream == Some(b"true".as_slice());
            let needs_edit = is_streaming && asks_stream_usage;
            if !needs_edit || options.is_none() {
                return Some(Self {
                    model: model.and_then(|m| serde_json::from_slice(m).ok()),
                    is_streaming,
                    edit: if needs_edit {
                        usage_edit(body, None)?
                    } else {
                        None
                    },
                    user: attribution::user_in_body(user, safety_identifier, metadata),
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
            user: attribution::user_in_body(
                top.user.map(|v| v.get().as_bytes()),
                top.safety_identifier.map(|v| v.get().as_bytes()),
                top.metadata.map(|v| v.get().as_bytes()),
            ),
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
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

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
    fn the_scan_plans_the_same_edit_as_serde() {
        for body in [
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"{\"stream_options\":{}}"}]}"#,
            " \n{ \"stream\" : true , \"model\" : \"m\" }",
            r#"{"stream":true}"#,
            r#"{"model":"gpt-4o","stream":false,"messages":[]}"#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":null}"#,
        ] {
            let scanned = ChatRequest::inspect(body.as_bytes(), true);
            assert!(scanned.is_some(), "{body}");
            assert_eq!(scanned, ChatRequest::parse(body.as_bytes(), true), "{body}");
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

    /// Any JSON value, small: what fills `messages` and the fields the rewrite must not touch.
    /// Strings lean on the characters that could fool a scan (quotes, backslashes, braces).
    fn value() -> impl Strategy<Value = Value> {
        let text = prop::collection::vec(
            prop::sample::select(vec!['a', '"', '\\', '{', '}', '[', ']', ':', ',', ' ', 'é']),
            0..12,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>());
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            text.clone().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(text.clone(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// What a client may send as `stream_options` (`None`: absent).
    fn stream_options() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            Just(Some(json!({}))),
            Just(Some(json!({"include_usage": false}))),
            Just(Some(json!({"include_usage": null, "x": [1, {"y": "}"}]}))),
            Just(Some(json!({"x": "include_usage"}))),
            Just(Some(json!("odd"))),
            Just(Some(json!(7))),
        ]
    }

    /// A chat request: model, `"stream": true` (or not), `stream_options`, messages and other
    /// fields; written compact or pretty.
    fn chat_request() -> impl Strategy<Value = (Value, String)> {
        (
            prop::option::of(value()),
            prop_oneof![3 => Just(json!(true)), 1 => value()],
            stream_options(),
            prop::collection::vec(value(), 0..3),
            prop::collection::btree_map("[a-z_]{1,8}", value(), 0..3),
            any::<bool>(),
        )
            .prop_map(|(model, stream, options, messages, extra, pretty)| {
                let mut body = serde_json::Map::new();
                for (k, v) in extra {
                    body.insert(k, v);
                }
                if let Some(model) = model {
                    body.insert("model".into(), model);
                }
                body.insert("messages".into(), Value::Array(messages));
                body.insert("stream".into(), stream);
                if let Some(options) = options {
                    body.insert("stream_options".into(), options);
                }
                let body = Value::Object(body);
                let text = if pretty {
                    serde_json::to_string_pretty(&body)
                } else {
                    serde_json::to_string(&body)
                };
                (body, text.expect("a Value always serializes"))
            })
    }

    /// The request as upstream must receive it: `stream_options.include_usage` true on a
    /// stream, other `stream_options` members kept, nothing else changed.
    fn expected(body: &Value) -> Value {
        let mut expected = body.clone();
        if body["stream"] == json!(true) {
            let options = &mut expected["stream_options"];
            if !options.is_object() {
                *options = json!({});
            }
            options["include_usage"] = json!(true);
        }
        expected
    }

    /// Everything a `Spliced` body sends, frame by frame.
    fn sent(body: Spliced) -> Vec<u8> {
        use http_body::Body as _;
        let mut body = std::pin::pin!(body);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let std::task::Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
            let Ok(frame) = frame;
            out.extend_from_slice(&frame.into_data().expect("only data frames"));
        }
        out
    }

    /// The pieces, each cut again at the given points (indexes into the whole body).
    fn recut(pieces: Vec<Bytes>, cuts: &[prop::sample::Index]) -> Vec<Bytes> {
        let total: usize = pieces.iter().map(Bytes::len).sum();
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(total + 1)).collect();
        at.sort_unstable();
        let mut out = Vec::new();
        let mut offset = 0;
        for mut piece in pieces {
            let end = offset + piece.len();
            for &cut in at.iter().filter(|&&cut| cut > offset && cut < end) {
                let head = piece.split_to(cut - (end - piece.len()));
                out.push(head);
            }
            out.push(piece);
            offset = end;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn the_rewritten_body_is_the_expected_json_whatever_the_split_points(
            (body, text) in chat_request(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let req = ChatRequest::inspect(text.as_bytes(), true).expect("inspectable");
            let pieces = req.rewrite(Bytes::from(text.clone()));
            let whole = pieces.concat();
            let spliced = Spliced::new(recut(pieces, &cuts));
            prop_assert_eq!(spliced.len(), whole.len() as u64);
            let out = sent(spliced);
            prop_assert_eq!(&out, &whole);
            let got: Value = serde_json::from_slice(&out).expect("the rewrite gives JSON");
            prop_assert_eq!(got, expected(&body));
            if body["stream"] != json!(true) {
                prop_assert_eq!(out, text.into_bytes());
            }
        }
    }

    #[test]
    fn model_that_is_not_a_string_is_ignored() {
        let req = ChatRequest::inspect(br#"{"model":5}"#, true).unwrap();
        assert_eq!(req.model, None);
    }
}
