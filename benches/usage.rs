//! Micro-benchmarks of the hot pieces of a response and request: SSE framing with usage
//! extraction, plain body extraction, and the include_usage rewrite of a 100 KB request; and
//! of the estimate made (off the response's path) when a response reports no usage.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llm_meter::proxy::rewrite::ChatRequest;
use llm_meter::usage::estimate::{self, Raw};
use llm_meter::usage::{Flavor, openai_chat, sse};

fn stream_fixture(chunks: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..chunks {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":57,\"completion_tokens\":21,\"total_tokens\":78}}\n\n");
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn sse_extraction(c: &mut Criterion) {
    let fixture = stream_fixture(200);
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(fixture.len() as u64));
    for (name, chunk) in [
        ("event-sized chunks", 0usize),
        ("64-byte chunks", 64),
        ("one chunk", usize::MAX),
    ] {
        let chunks: Vec<Bytes> = match chunk {
            0 => fixture
                .split_inclusive(|b| *b == b'\n')
                .collect::<Vec<_>>()
                .chunks(2)
                .map(|pair| Bytes::from(pair.concat()))
                .collect(),
            usize::MAX => vec![Bytes::from(fixture.clone())],
            n => fixture.chunks(n).map(Bytes::copy_from_slice).collect(),
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut framer = sse::Framer::new(sse::DEFAULT_EVENT_CAP);
                let mut stream = openai_chat::Stream::default();
                let mut hidden = 0;
                for chunk in &chunks {
                    framer
                        .feed(chunk, |event| {
                            if stream.on_event(&event) == openai_chat::Event::UsageOnly {
                                hidden += 1;
                            }
                        })
                        .expect("fixture events are small");
                }
                assert_eq!(hidden, 1);
                stream.finish()
            });
        });
    }
    group.finish();
}

fn plain_extraction(c: &mut Criterion) {
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"A short answer of about twenty tokens, as an agent loop usually gets back.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":57,"completion_tokens":21,"total_tokens":78,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}},"system_fingerprint":"fp"}"#;
    let mut group = c.benchmark_group("plain");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chat completion body", |b| {
        b.iter(|| openai_chat::parse_body(body))
    });
    group.finish();
}

fn request_rewrite(c: &mut Criterion) {
    let content = "lorem ipsum dolor sit amet ".repeat(100 * 1024 / 27);
    let body = Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}],"stream":true}}"#
    ));
    let mut group = c.benchmark_group("rewrite");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("include_usage into 100 KB request", |b| {
        b.iter(|| {
            let chat = ChatRequest::inspect(&body, true).expect("valid request");
            chat.rewrite(body.clone())
        });
    });
    let plain = Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}],"stream":false}}"#
    ));
    group.bench_function("inspect a 100 KB non-streaming request", |b| {
        b.iter(|| ChatRequest::inspect(&plain, true).expect("valid request"));
    });
    group.finish();
}

fn estimation(c: &mut Criterion) {
    // About 2,000 prompt tokens and a 200-token answer streamed in 200 chunks.
    let prompt = "Summarize the following report in three bullet points. ".repeat(200);
    let request = format!(
        r#"{{"model":"llama3.2","stream":true,"messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let raw = Raw::Stream(vec![Bytes::from(stream_fixture(200))]);
    let counted = estimate::estimate(
        Flavor::OpenAiChat,
        "llama3.2",
        Some(request.as_bytes()),
        Some(&raw),
    );
    assert!(
        counted.input_tokens > 1_000 && counted.output_tokens >= 200,
        "{counted:?}"
    );
    let mut group = c.benchmark_group("estimate");
    group.throughput(Throughput::Elements(counted.total_tokens()));
    group.bench_function("2k-token prompt + 200-chunk stream", |b| {
        b.iter(|| {
            estimate::estimate(
                Flavor::OpenAiChat,
                "llama3.2",
                Some(request.as_bytes()),
                Some(&raw),
            )
        });
    });
    group.finish();
}

/// The work a hostile prompt can cause: one repeated character has no spaces to split it, so
/// tiktoken's merge would be quadratic in its length. Issue 17's bound: 1 MiB at most 50 ms of
/// CPU, a 32 MiB body at most 1 s.
fn estimation_bounds(c: &mut Criterion) {
    let mut group = c.benchmark_group("estimate bounds");
    group.sample_size(10);
    for (name, size) in [
        ("1 MiB prompt of one character", 1024 * 1024),
        ("32 MiB body of one character", 32 * 1024 * 1024),
    ] {
        let body = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(size)
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| estimate::prompt_tokens(Flavor::OpenAiChat, "gpt-4o", body.as_bytes()));
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    sse_extraction,
    plain_extraction,
    request_rewrite,
    estimation,
    estimation_bounds
);
criterion_main!(benches);
