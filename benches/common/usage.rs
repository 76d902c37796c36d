//! The usage every recording bench records: one chat of 1,000 input tokens (200 of them
//! cached) and 300 output tokens.

use llm_meter::usage::Usage;

pub const USAGE: Usage = Usage {
    input_tokens: 1_000,
    cached_input_tokens: 200,
    cache_write_tokens: 0,
    cache_write_1h_tokens: 0,
    output_tokens: 300,
    reasoning_tokens: 0,
};
