//! What an estimate reads of a request body: its flavor (given by the path, or told from its
//! fields), its upstream, its model, its output limit, its input tokens by the tokenizer, and
//! the body Anthropic's `count_tokens` takes.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{ApiFlavor, Route};
use crate::usage::estimate::prompt_tokens;
use crate::usage::{Flavor, ServiceTier};

/// What the path or the command line says of a request before its body is read.
#[derive(Debug, Clone, Default)]
pub struct Hint {
    /// The flavor, when the path or `--api` names it; told from the body otherwise.
    pub flavor: Option<Flavor>,
    /// The upstream (index in the routes), when the path or `--upstream` names it; the first
    /// of the flavor's API otherwise.
    pub upstream: Option<usize>,
    /// The model, when the path (Gemini's) or `--model` names it; the body's otherwise.
    pub model: Option<String>,
}

/// Why a body cannot be estimated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unestimable {
    /// Not JSON, not an object, or a field of the wrong type.
    #[error("the body is not a JSON request: {0}")]
    NotJson(String),
    /// `--api` names a flavor the chosen upstream does not speak.
    #[error("upstream {upstream} does not serve {flavor} requests")]
    WrongApi {
        /// The upstream's name.
        upstream: String,
        /// The flavor asked for.
        flavor: &'static str,
    },
}

/// A request body as an estimate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// How the request would be metered.
    pub flavor: Flavor,
    /// The upstream it would go to (index in the routes); `None` when no upstream speaks its API.
    pub upstream: Option<usize>,
    /// The model it names, if any.
    pub model: Option<String>,
    /// The output limit it sets (`max_tokens` and its kin), if any.
    pub max_output_tokens: Option<u64>,
    /// The service tier it asks for (OpenAI's `service_tier`); standard when it names none.
    pub service_tier: ServiceTier,
    /// Its input tokens, counted by the tokenizer.
    pub input_tokens: u64,
    /// The body to ask `count_tokens` with (Anthropic Messages with a model, when asked for).
    pub count_body: Option<Vec<u8>>,
}

/// The top-level fields an estimate looks at, borrowed: the body may be megabytes, and its
/// prompt is walked by the tokenizer, not built into a tree here.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Fields<'a> {
    model: Option<String>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow)]
    mcp_servers: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    contents: Option<&'a RawValue>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    service_tier: Option<String>,
    max_output_tokens: Option<u64>,
    #[serde(rename = "generationConfig", alias = "generation_config")]
    generation_config: Option<GenerationConfig>,
}

/// Gemini's `generationConfig` (its REST API takes either case).
#[derive(Deserialize, Default)]
#[serde(default)]
struct GenerationConfig {
    #[serde(rename = "maxOutputTokens", alias = "max_output_tokens")]
    max_output_tokens: Option<u64>,
}

/// The fields `count_tokens` takes of a Messages request; it refuses the others
/// (`max_tokens`, `stream`, `temperature`, `metadata`, ...).
/// <https://docs.anthropic.com/en/api/messages-count-tokens>
#[derive(Serialize)]
struct CountTokens<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcp_servers: Option<&'a RawValue>,
}

/// Longest parser message shown: serde quotes a string of the wrong type whole.
const MAX_REASON_CHARS: usize = 160;

/// Reads `body` as the request `hint` says it is, counting its input with the tokenizer (CPU
/// work bounded as `usage::tokenizer` bounds it; run it off the async threads). `count_body`
/// asks for the body `count_tokens` would take, when the request turns out to be Anthropic's.
pub fn read(
    routes: &[Route],
    hint: &Hint,
    body: &[u8],
    count_body: bool,
) -> Result<Read, Unestimable> {
    let fields: Fields<'_> = serde_json::from_slice(body).map_err(|err| {
        let reason = err.to_string();
        Unestimable::NotJson(match reason.char_indices().nth(MAX_REASON_CHARS) {
            Some((end, _)) => format!("{}…", &reason[..end]),
            None => reason,
        })
    })?;
    let api = hint.upstream.and_then(|i| routes.get(i)).map(|r| r.flavor);
    let flavor = hint.flavor.unwrap_or_else(|| detect(&fields, api));
    let upstream = match hint.upstream {
        Some(index) => {
            let route = routes.get(index);
            if let Some(route) = route.filter(|r| r.flavor != api_of(flavor)) {
                return Err(Unestimable::WrongApi {
                    upstream: route.name.clone(),
                    flavor: flavor.as_str(),
                });
            }
            Some(index)
        }
        None => routes.iter().position(|r| r.flavor == api_of(flavor)),
    };
    let model = hint
        .model
        .clone()
        .or_else(|| fields.model.clone())
        .map(|m| m.strip_prefix("models/").map(str::to_owned).unwrap_or(m));
    let count_body = (count_body && flavor == Flavor::AnthropicMessages)
        .then(|| {
            model
                .as_deref()
                .and_then(|model| count_tokens_body(&fields, model))
        })
        .flatten();
    Ok(Read {
        flavor,
        upstream,
        max_output_tokens: max_output_tokens(&fields, flavor),
        service_tier: fields
            .service_tier
            .as_deref()
            .map_or(ServiceTier::Standard, ServiceTier::from_name),
        input_tokens: prompt_tokens(flavor, model.as_deref().unwrap_or_default(), body),
        model,
        count_body,
    })
}

/// The API an upstream must speak to serve `flavor`.
fn api_of(flavor: Flavor) -> ApiFlavor {
    match flavor {
        Flavor::AnthropicMessages => ApiFlavor::Anthropic,
        Flavor::Gemini => ApiFlavor::Gemini,
        Flavor::OpenAiChat
        | Flavor::OpenAiCompletions
        | Flavor::OpenAiEmbeddings
        | Flavor::OpenAiResponses
        | Flavor::OpenAiRealtime => ApiFlavor::OpenAi,
    }
}

/// The flavor a body's fields say, within the API of its upstream when that is known:
/// `contents` is Gemini's; `messages` with a top-level `system` (Anthropic's place for it) or a
/// Claude model is Anthropic's; `input` is the Responses API's (or embeddings', for an
/// embedding model); `prompt` is a legacy completion's; anything else a chat completion.
fn detect(fields: &Fields<'_>, api: Option<ApiFlavor>) -> Flavor {
    let has = |field: Option<&RawValue>| field.is_some_and(|v| v.get() != "null");
    let model = fields.model.as_deref().unwrap_or_default();
    match api {
        Some(ApiFlavor::Anthropic) => return Flavor::AnthropicMessages,
        Some(ApiFlavor::Gemini) => return Flavor::Gemini,
        Some(ApiFlavor::OpenAi) => {}
        None => {
            if has(fields.contents) {
                return Flavor::Gemini;
            }
            let has_system = fields
                .system
                .is_some_and(|v| v.get().starts_with(['"', '[']));
            if has(fields.messages) && (has_system || model.starts_with("claude")) {
                return Flavor::AnthropicMessages;
            }
        }
    }
    if has(fields.input) {
        if model.contains("embed") {
            Flavor::OpenAiEmbeddings
        } else {
            Flavor::OpenAiResponses
        }
    } else if has(fields.prompt) {
        Flavor::OpenAiCompletions
    } else {
        Flavor::OpenAiChat
    }
}

/// The output limit the request sets, in its flavor's field; embeddings have no output.
fn max_output_tokens(fields: &Fields<'_>, flavor: Flavor) -> Option<u64> {
    match flavor {
        Flavor::OpenAiChat => fields.max_completion_tokens.or(fields.max_tokens),
        Flavor::OpenAiCompletions | Flavor::AnthropicMessages => fields.max_tokens,
        Flavor::OpenAiResponses | Flavor::OpenAiRealtime => fields.max_output_tokens,
        Flavor::OpenAiEmbeddings => Some(0),
        Flavor::Gemini => fields
            .generation_config
            .as_ref()
            .and_then(|c| c.max_output_tokens),
    }
}

/// The body of a `count_tokens` request for these fields; `None` if it cannot be written.
fn count_tokens_body(fields: &Fields<'_>, model: &str) -> Option<Vec<u8>> {
    serde_json::to_vec(&CountTokens {
        model,
        messages: fields.messages,
        system: fields.system,
        tools: fields.tools,
        tool_choice: fields.tool_choice,
        thinking: fields.thinking,
        mcp_servers: fields.mcp_servers,
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags};

    fn routes() -> Vec<Route> {
        let toml = "[upstreams.gemini]\nprefix = \"/gemini/v1beta\"\nurl = \"https://g.example/v1beta\"\nflavor = \"gemini\"\n";
        let flags = Flags {
            no_persist: true,
            ..Flags::default()
        };
        Config::from_layers(Some(toml), None, &Default::default(), &flags)
            .unwrap()
            .routes
    }

    fn flavor_of(body: &str) -> (Flavor, Option<String>) {
        let routes = routes();
        let read = read(&routes, &Hint::default(), body.as_bytes(), false).unwrap();
        let upstream = read.upstream.map(|i| routes[i].name.clone());
        (read.flavor, upstream)
    }

    #[test]
    fn a_body_alone_tells_its_flavor_and_default_upstream() {
        let cases = [
            (
                r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
                Flavor::Gemini,
                "gemini",
            ),
            (
                r#"{"model":"x","system":"Be brief.","messages":[]}"#,
                Flavor::AnthropicMessages,
                "anthropic",
            ),
            (
                r#"{"model":"claude-haiku-4-5","messages":[]}"#,
                Flavor::AnthropicMessages,
                "anthropic",
            ),
            (
                r#"{"model":"gpt-4o","input":"hi"}"#,
                Flavor::OpenAiResponses,
                "openai",
            ),
            (
                r#"{"model":"text-embedding-3-small","input":"hi"}"#,
                Flavor::OpenAiEmbeddings,
                "openai",
            ),
            (
                r#"{"model":"gpt-3.5-turbo-instruct","prompt":"hi"}"#,
                Flavor::OpenAiCompletions,
                "openai",
            ),
            (
                r#"{"model":"anthropic/claude-3.5-sonnet","messages":[{"role":"system","content":"x"}]}"#,
                Flavor::OpenAiChat,
                "openai",
            ),
        ];
        for (body, flavor, upstream) in cases {
            assert_eq!(
                flavor_of(body),
                (flavor, Some(upstream.to_owned())),
                "{body}"
            );
        }
    }

    #[test]
    fn an_upstream_given_keeps_detection_within_its_api() {
        let routes = routes();
        let openai = routes.iter().position(|r| r.name == "openai");
        let hint = Hint {
            upstream: openai,
            ..Hint::default()
        };
        let body = br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(
            read(&routes, &hint, body, false).unwrap().flavor,
            Flavor::OpenAiChat
        );
        let wrong = Hint {
            flavor: Some(Flavor::Gemini),
            ..hint
        };
        assert!(matches!(
            read(&routes, &wrong, body, false),
            Err(Unestimable::WrongApi { .. })
        ));
    }

    #[test]
    fn each_flavor_reads_its_own_output_limit() {
        let routes = routes();
        let limit = |flavor: Flavor, body: &str| {
            let hint = Hint {
                flavor: Some(flavor),
                ..Hint::default()
            };
            read(&routes, &hint, body.as_bytes(), false)
                .unwrap()
                .max_output_tokens
        };
        let all = r#"{"max_tokens":1,"max_completion_tokens":2,"max_output_tokens":3,"generationConfig":{"maxOutputTokens":4}}"#;
        assert_eq!(limit(Flavor::OpenAiChat, all), Some(2));
        assert_eq!(limit(Flavor::OpenAiChat, r#"{"max_tokens":1}"#), Some(1));
        assert_eq!(limit(Flavor::OpenAiCompletions, all), Some(1));
        assert_eq!(limit(Flavor::AnthropicMessages, all), Some(1));
        assert_eq!(limit(Flavor::OpenAiResponses, all), Some(3));
        assert_eq!(limit(Flavor::Gemini, all), Some(4));
        assert_eq!(
            limit(
                Flavor::Gemini,
                r#"{"generation_config":{"max_output_tokens":5}}"#
            ),
            Some(5)
        );
        assert_eq!(limit(Flavor::OpenAiEmbeddings, all), Some(0));
        assert_eq!(limit(Flavor::OpenAiChat, "{}"), None);
    }

    #[test]
    fn count_tokens_gets_only_the_fields_it_takes() {
        let routes = routes();
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"temperature":0.2,"system":"Be brief.","messages":[{"role":"user","content":"hi"}],"tools":[]}"#;
        let read = read(&routes, &Hint::default(), body, true).unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&read.count_body.unwrap()).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"model": "claude-sonnet-4-5", "system": "Be brief.",
                "messages": [{"role": "user", "content": "hi"}], "tools": []})
        );
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_refused_with_a_short_reason() {
        let routes = routes();
        for body in ["not json", "[1,2]", r#"{"max_tokens":"many"}"#] {
            assert!(matches!(
                read(&routes, &Hint::default(), body.as_bytes(), false),
                Err(Unestimable::NotJson(_))
            ));
        }
        // serde quotes a string of the wrong type whole.
        let long = format!(r#"{{"max_tokens":"{}"}}"#, "a".repeat(10_000));
        let Err(Unestimable::NotJson(reason)) =
            read(&routes, &Hint::default(), long.as_bytes(), false)
        else {
            panic!("a long body must be refused");
        };
        assert!(reason.chars().count() <= MAX_REASON_CHARS + 1, "{reason}");
    }
}
