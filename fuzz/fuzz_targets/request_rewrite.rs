//! The request rewrite: never panics; a body that needs no edit goes out byte for byte; an
//! edited JSON object comes out as JSON asking for stream usage, every other field unchanged;
//! the `Spliced` body sends exactly the rewritten bytes.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Body;
use libfuzzer_sys::fuzz_target;
use llm_meter::proxy::rewrite::{ChatRequest, Spliced};
use serde_json::{Map, Value};

/// Everything a `Spliced` body sends, frame by frame, checked against its announced length.
fn sent(pieces: Vec<Bytes>) -> Vec<u8> {
    let mut body = Spliced::new(pieces);
    let announced = body.len();
    assert_eq!(body.size_hint().exact(), Some(announced));
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        let Ok(frame) = frame;
        let data = frame.into_data().expect("only data frames");
        out.extend_from_slice(&data);
        assert_eq!(body.len(), announced - out.len() as u64);
    }
    assert!(body.is_end_stream() && body.is_empty());
    assert_eq!(out.len() as u64, announced);
    out
}

fn check(body: &[u8], asks_stream_usage: bool) {
    let Some(request) = ChatRequest::inspect(body, asks_stream_usage) else {
        return;
    };
    let out = sent(request.rewrite(Bytes::copy_from_slice(body)));
    let input: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    if !request.needs_usage_injected() {
        assert_eq!(out, body, "a body with no edit was changed");
    }
    let Some(mut input) = input else {
        return;
    };
    // A JSON object: what was read of it matches what it says.
    let streams = input.get("stream") == Some(&Value::Bool(true));
    assert_eq!(request.is_streaming, streams, "stream misread");
    let model = input.get("model").and_then(Value::as_str);
    assert_eq!(request.model.as_deref(), model, "model misread");
    if !(asks_stream_usage && streams) {
        assert!(
            !request.needs_usage_injected(),
            "edited a request it should not"
        );
        return;
    }
    // Edited or not (the client may have asked already), the upstream is asked for usage.
    let mut output: Map<String, Value> = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "rewritten body is not a JSON object ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    let options = output.remove("stream_options");
    let asked = options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .cloned();
    assert_eq!(
        asked,
        Some(Value::Bool(true)),
        "usage not asked: {options:?}"
    );
    // Other members of `stream_options` are kept too.
    if let (Some(Value::Object(before)), Some(Value::Object(after))) =
        (input.get("stream_options"), &options)
    {
        for (k, v) in before {
            if k != "include_usage" {
                assert_eq!(after.get(k), Some(v), "stream_options.{k} changed");
            }
        }
    }
    input.remove("stream_options");
    assert_eq!(
        output, input,
        "a top-level field other than stream_options changed"
    );
}

fuzz_target!(|data: &[u8]| {
    check(data, true);
    check(data, false);
});
