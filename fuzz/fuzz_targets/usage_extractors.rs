//! Every usage extractor, plain and streaming, for every flavor: never panics, and every
//! count it reports stays within a sane bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_meter::usage::{Extracted, Flavor, MAX_TOKENS, StreamUsage, Usage};
use llm_meter_fuzz::whole_events;

const FLAVORS: [Flavor; 6] = [
    Flavor::OpenAiChat,
    Flavor::OpenAiCompletions,
    Flavor::OpenAiEmbeddings,
    Flavor::OpenAiResponses,
    Flavor::AnthropicMessages,
    Flavor::Gemini,
];

/// A record field may sum a few wire fields (Gemini adds thoughts to candidates, Anthropic
/// adds two cache-write durations), each at most `MAX_TOKENS`.
const FIELD_BOUND: u64 = MAX_TOKENS * 4;

fn check(flavor: Flavor, how: &str, extracted: &Extracted) {
    let Some(usage) = extracted.usage else {
        return;
    };
    let Usage {
        input_tokens,
        cached_input_tokens,
        cache_write_tokens,
        cache_write_1h_tokens,
        output_tokens,
        reasoning_tokens,
    } = usage;
    for (name, value) in [
        ("input_tokens", input_tokens),
        ("cached_input_tokens", cached_input_tokens),
        ("cache_write_tokens", cache_write_tokens),
        ("cache_write_1h_tokens", cache_write_1h_tokens),
        ("output_tokens", output_tokens),
        ("reasoning_tokens", reasoning_tokens),
    ] {
        assert!(
            value <= FIELD_BOUND,
            "{flavor:?} {how}: {name} = {value} is past the bound"
        );
    }
    assert!(
        reasoning_tokens <= output_tokens,
        "{flavor:?} {how}: reasoning {reasoning_tokens} is more than the output {output_tokens}"
    );
    assert!(
        cache_write_1h_tokens <= cache_write_tokens,
        "{flavor:?} {how}: 1-hour cache writes {cache_write_1h_tokens} are more than all cache writes {cache_write_tokens}"
    );
    // Sums the meter makes must not overflow.
    let _ = usage.total_tokens();
}

fuzz_target!(|data: &[u8]| {
    let events = whole_events(data);
    for flavor in FLAVORS {
        check(flavor, "body", &flavor.parse_body(data));
        let mut stream = StreamUsage::new(flavor);
        for event in &events {
            let _ = stream.on_event(event);
        }
        check(flavor, "stream", &stream.finish());
    }
});
