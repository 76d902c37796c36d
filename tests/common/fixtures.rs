//! Fixtures: provider bodies, request bodies, key ids, ledger rows, and readers of what tests get back.
#![expect(
    clippy::unwrap_used,
    reason = "harness failures are test failures, reported where they happen"
)]

use std::time::Duration;

use serde_json::{Value, json};

/// A chat.completion body.
pub fn chat_completion(model: &str, text: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
    })
}

/// SSE events of a chat stream, as OpenAI sends them, ending with `[DONE]`.
pub fn chat_stream(model: &str, words: &[&str], usage: Option<(u64, u64)>) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if usage.is_some() {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        words
            .iter()
            .map(|w| chunk(json!({"content": w}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if let Some((prompt, completion)) = usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
        events.push(format!("data: {u}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// The stable id llm-meter gives a key.
pub fn key_id(key: &str) -> String {
    llm_meter::key::Identity::from_key(key.as_bytes()).id
}

/// A chat request body.
pub fn chat_request(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// A ledger row recorded at `at` (RFC 3339) for `key` and `model`, 200 OK, not streamed.
pub fn ledger_row(
    at: &str,
    key: &str,
    model: &str,
    tokens: (u64, u64),
    cost_nano_usd: u64,
) -> llm_meter::meter::ledger::Row {
    use time::format_description::well_known::Rfc3339;
    let identity = llm_meter::key::Identity::from_key(key.as_bytes());
    llm_meter::meter::ledger::Row {
        at: time::OffsetDateTime::parse(at, &Rfc3339).unwrap(),
        period: 1,
        key_id: identity.id,
        key_label: identity.label,
        model: model.to_owned(),
        upstream: "openai".into(),
        flavor: "openai_chat".into(),
        status: 200,
        is_streaming: false,
        usage: llm_meter::usage::Usage {
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            ..llm_meter::usage::Usage::default()
        },
        cost: llm_meter::money::NanoUsd(cost_nano_usd),
        latency: Some(Duration::from_micros(1500)),
        response_id: Some("chatcmpl-test".to_owned()),
        is_error: false,
        is_unpriced: false,
        is_estimated: false,
        is_partial: false,
        user: None,
        session: None,
        tags: None,
        service_tier: None,
        price: None,
    }
}

/// Writes `rows` to the ledger in `dir` as a server would, and closes it.
pub fn write_ledger(
    dir: &std::path::Path,
    rows: impl IntoIterator<Item = llm_meter::meter::ledger::Row>,
) {
    use llm_meter::meter::ledger::{Ledger, Options};
    let (ledger, _) = Ledger::open(&Options {
        dir: dir.to_owned(),
        url: None,
        flush_interval: Duration::from_millis(10),
        max_pending_rows: usize::MAX,
    })
    .unwrap();
    for row in rows {
        ledger.append(&row.borrowed());
    }
    ledger.close();
}

/// Parses JSON lines (an export, a JSON log).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The stats JSON without the parts that describe the ledger's own progress, for comparing
/// totals across restarts.
pub fn totals_of(mut stats: Value) -> Value {
    stats.as_object_mut().unwrap().remove("ledger");
    stats
}
