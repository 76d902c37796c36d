//! Usage extraction: every API flavor's `usage` object becomes one normalized `Usage` record.
//!
//! Wire fields per flavor and how each maps to the record:
//!
//! | record field          | OpenAI chat / completions / embeddings                |
//! |-----------------------|-------------------------------------------------------|
//! | `input_tokens`        | `prompt_tokens` − cached − cache writes               |
//! | `cached_input_tokens` | `prompt_tokens_details.cached_tokens`                 |
//! | `cache_write_tokens`  | `prompt_tokens_details.cache_write_tokens` (or `cache_creation_tokens`, as OpenRouter sends) |
//! | `output_tokens`       | `completion_tokens` (reasoning included)              |
//! | `reasoning_tokens`    | `completion_tokens_details.reasoning_tokens`          |
//!
//! An absent or `null` field counts as 0. A field of the wrong type, negative, fractional or
//! absurdly large (over `MAX_TOKENS`) is ignored (counted as 0) and reported as a `Warning`.
//! A response with no `usage` object at all yields no `Usage`: the request is still counted.

pub mod openai_chat;
pub mod sse;

use serde_json::Value;

/// Largest token count believed for one field of one request; anything above is a bogus value.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// The tokens of one request, normalized across providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Uncached input, billed at the input price.
    pub input_tokens: u64,
    /// Input read from the provider's cache, billed at the cached price.
    pub cached_input_tokens: u64,
    /// Input written to the provider's cache, billed at the cache-write price.
    pub cache_write_tokens: u64,
    /// All output, reasoning included.
    pub output_tokens: u64,
    /// The part of the output that was reasoning (informational).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Prompt tokens as providers count them: uncached + cached + cache writes.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cached_input_tokens + self.cache_write_tokens
    }

    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens() + self.output_tokens
    }
}

/// How a route's responses report usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI chat completions: plain JSON or SSE chunks with a final usage chunk.
    OpenAiChat,
}

/// A usage field that was present but unusable, for one warning log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The JSON path of the field (`usage.prompt_tokens`).
    pub field: &'static str,
    /// What was wrong with it, never its content.
    pub problem: &'static str,
}

/// What was learned from one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The usage, if the response reported one.
    pub usage: Option<Usage>,
    /// The model named in the response, if any.
    pub model: Option<String>,
    /// Fields that were present but ignored.
    pub warnings: Vec<Warning>,
}

/// Reads a token count; records a warning and returns 0 for anything that is not a sane count.
fn count(
    parent: Option<&Value>,
    key: &str,
    field: &'static str,
    warnings: &mut Vec<Warning>,
) -> u64 {
    let Some(value) = parent.and_then(|p| p.get(key)) else {
        return 0;
    };
    let problem = match value {
        Value::Null => return 0,
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) if v <= MAX_TOKENS => return v,
            (Some(_), _) => "absurdly large",
            (None, Some(f)) if f < 0.0 => "negative",
            (None, Some(f)) if f > 1e9 => "absurdly large",
            // Integral floats (`12.0`) come from servers that keep counts as doubles.
            (None, Some(f)) if f.fract() == 0.0 => return float_count(f),
            _ => "not a whole number",
        },
        _ => "not a number",
    };
    warnings.push(Warning { field, problem });
    0
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "caller checked 0 <= f <= 1e9 and integral"
)]
fn float_count(f: f64) -> u64 {
    f as u64
}

/// Reads the `model` field: a string, or nothing (with a warning for another type).
fn model_of(value: Option<&Value>, warnings: &mut Vec<Warning>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Null | Value::String(_) => None,
        _ => {
            warnings.push(Warning {
                field: "model",
                problem: "not a string",
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_accept_sane_numbers_and_reject_the_rest() {
        let v = json!({"a": 5, "b": null, "c": -3, "d": "7", "e": 1.5, "f": 1e30, "g": 12.0, "h": 2_000_000_000u64});
        let mut w = Vec::new();
        let got: Vec<u64> = ["a", "b", "c", "d", "e", "f", "g", "h", "missing"]
            .iter()
            .map(|k| count(Some(&v), k, "x", &mut w))
            .collect();
        assert_eq!(got, [5, 0, 0, 0, 0, 0, 12, 0, 0]);
        let problems: Vec<&str> = w.iter().map(|w| w.problem).collect();
        assert_eq!(
            problems,
            [
                "negative",
                "not a number",
                "not a whole number",
                "absurdly large",
                "absurdly large"
            ]
        );
    }
}
