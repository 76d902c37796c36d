//! Token estimates for responses that report no usage: a real BPE tokenizer (tiktoken's
//! `o200k_base`, or `cl100k_base` for the models that use it, counted by `tokenizer`) over the
//! request's prompt text and the text the response returned or streamed.
//!
//! Runs off the response's path (the proxy hands it to a blocking thread), and only when a
//! response carried no usage: the JSON here is parsed whole, which the hot path never does.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::tokenizer::{BYTES_PER_TOKEN, Bpe, EXACT_CAP, Encoding};
use super::{Flavor, Usage, sse};

/// Tokens OpenAI's chat format adds around every message (role and separators).
const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime the assistant's reply after the last message.
const TOKENS_PER_REPLY: u64 = 3;

/// The response's bytes, kept (reference-counted) for an estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// A plain JSON body, in its chunks.
    Body(Vec<Bytes>),
    /// SSE bytes as they arrived (up to `KEEP_CAP`).
    Stream(Vec<Bytes>),
}

/// Most response bytes kept for an estimate; a longer response is estimated from its start.
pub const KEEP_CAP: usize = 4 * 1024 * 1024;

/// The encoding for a model: `cl100k_base` for GPT-3.5, GPT-4 (not 4o/4.1) and OpenAI's
/// embedding models, `o200k_base` for everything else (current OpenAI models, and the closest
/// estimate we have for other vendors').
fn encoding_for(model: &str) -> Encoding {
    let base = model.rsplit('/').next().unwrap_or(model);
    let is_cl100k = base.starts_with("gpt-3.5")
        || base.starts_with("text-embedding")
        || (base.starts_with("gpt-4")
            && !base.starts_with("gpt-4o")
            && !base.starts_with("gpt-4."));
    if is_cl100k {
        Encoding::Cl100kBase
    } else {
        Encoding::O200kBase
    }
}

/// The counter of an encoding, built on first use; `None` (logged once) if it cannot be.
fn bpe(encoding: Encoding) -> Option<&'static Bpe> {
    static O200K: LazyLock<Option<Bpe>> = LazyLock::new(|| loaded(Encoding::O200kBase));
    static CL100K: LazyLock<Option<Bpe>> = LazyLock::new(|| loaded(Encoding::Cl100kBase));
    match encoding {
        Encoding::O200kBase => O200K.as_ref(),
        Encoding::Cl100kBase => CL100K.as_ref(),
    }
}

fn loaded(encoding: Encoding) -> Option<Bpe> {
    Bpe::new(encoding)
        .inspect_err(|err| {
            tracing::error!(%err, ?encoding, "cannot load the tokenizer: usage estimates are off");
        })
        .ok()
}

/// Set at the end of a shutdown's grace period: estimates still running count what is left
/// by its bytes, so the shutdown never waits on one.
static HURRY: AtomicBool = AtomicBool::new(false);

/// Makes every estimate in progress, and every later one, finish by byte counts.
pub fn hurry() {
    HURRY.store(true, Ordering::Relaxed);
}

/// Tokens of one text in the model's encoding (see `tokenizer` for the bounds on its work).
pub fn count(model: &str, text: &str) -> u64 {
    count_texts(model, &Texts::of(text))
}

fn count_texts(model: &str, texts: &Texts) -> u64 {
    let stop = || HURRY.load(Ordering::Relaxed);
    bpe(encoding_for(model)).map_or_else(
        || (texts.text.len() as u64 + texts.beyond).div_ceil(BYTES_PER_TOKEN),
        |bpe| bpe.count_until(&texts.text, texts.beyond, &stop),
    ) + texts.numbers
}

/// An estimate of the usage of one exchange: prompt from the request, output from the response.
pub fn estimate(flavor: Flavor, model: &str, request: Option<&[u8]>, raw: Option<&Raw>) -> Usage {
    let input = request.map_or(0, |body| prompt_tokens(flavor, model, body));
    let output = match raw {
        Some(Raw::Body(chunks)) => {
            let body = chunks.concat();
            let mut text = String::new();
            if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                response_text(flavor, &value, &mut text);
            }
            count(model, &text)
        }
        Some(Raw::Stream(chunks)) => count(model, &stream_text(flavor, chunks)),
        None => 0,
    };
    Usage {
        input_tokens: input,
        output_tokens: output,
        ..Usage::default()
    }
}

/// The top-level fields of a request that hold its prompt, borrowed, never built: a request may
/// be tens of megabytes, and its text is walked once, with no tree of it in memory.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Request<'a> {
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, rename = "systemInstruction")]
    system_instruction: Option<&'a RawValue>,
    #[serde(borrow, rename = "system_instruction")]
    system_instruction_snake: Option<&'a RawValue>,
    #[serde(borrow)]
    contents: Option<&'a RawValue>,
}

/// Prompt tokens of a request body, per flavor.
pub fn prompt_tokens(flavor: Flavor, model: &str, body: &[u8]) -> u64 {
    let Ok(request) = serde_json::from_slice::<Request<'_>>(body) else {
        return 0;
    };
    let mut texts = Texts::default();
    let mut overhead = 0;
    let fields = match flavor {
        Flavor::OpenAiChat => {
            if let Some(messages) = request.messages {
                let items = texts.walk(messages, Select::Prompt);
                overhead += items * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY;
            }
            [None; 3]
        }
        Flavor::OpenAiCompletions => [request.prompt, None, None],
        Flavor::OpenAiEmbeddings => {
            // Inputs given as token ids are counted as they are.
            if let Some(input) = request.input {
                texts.walk(input, Select::PromptAndIds);
            }
            [None; 3]
        }
        Flavor::OpenAiResponses => [request.instructions, request.input, None],
        // A Realtime conversation lives on the server: a response's prompt is not in its request.
        Flavor::OpenAiRealtime => [None; 3],
        Flavor::AnthropicMessages => [request.system, request.messages, request.tools],
        Flavor::Gemini => [
            request.system_instruction,
            request.system_instruction_snake,
            request.contents,
        ],
    };
    for field in fields.into_iter().flatten() {
        texts.walk(field, Select::Prompt);
    }
    count_texts(model, &texts) + overhead
}

/// Keys whose string values are not prompt text: roles, ids, and encoded media (which a
/// tokenizer would count as thousands of tokens it never is).
const NOT_TEXT: [&str; 14] = [
    "role",
    "type",
    "id",
    "tool_call_id",
    "image_url",
    "input_image",
    "input_audio",
    "file_data",
    "source",
    "inlineData",
    "inline_data",
    "fileData",
    "mimeType",
    "cache_control",
];

/// The text of a document to count: at most `EXACT_CAP` bytes kept, the bytes past them only
/// counted, and token ids counted one each.
#[derive(Debug, Default)]
struct Texts {
    text: String,
    beyond: u64,
    numbers: u64,
}

impl Texts {
    fn of(text: &str) -> Self {
        let mut texts = Self::default();
        texts.push(text);
        texts
    }

    fn push(&mut self, s: &str) {
        let room = EXACT_CAP.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let end = super::floor_char_boundary(s, room);
        self.text.push_str(&s[..end]);
        self.beyond += (s.len() - end) as u64;
    }

    /// Walks one JSON value for its text; returns how many items it has if it is an array.
    fn walk(&mut self, value: &RawValue, select: Select) -> u64 {
        let mut items = 0;
        let walk = Walk {
            texts: self,
            select,
            depth: 0,
            items: &mut items,
        };
        // A document deeper than serde_json's recursion limit keeps the text read before it.
        let _ = walk.deserialize(&mut serde_json::Deserializer::from_str(value.get()));
        items
    }
}

/// Which values of a prompt are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Select {
    /// Every string but those under `NOT_TEXT` keys.
    Prompt,
    /// The same, and each number as one token id.
    PromptAndIds,
}

/// A walk over one JSON value that appends its text to `texts`, building nothing.
struct Walk<'t> {
    texts: &'t mut Texts,
    select: Select,
    depth: u32,
    /// Items of the top-level array, if the value is one.
    items: &'t mut u64,
}

impl Walk<'_> {
    fn child(&mut self) -> Walk<'_> {
        Walk {
            texts: self.texts,
            select: self.select,
            depth: self.depth + 1,
            items: self.items,
        }
    }

    fn count_id(self) {
        if self.select == Select::PromptAndIds {
            self.texts.numbers += 1;
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.texts.push(s);
        self.texts.push("\n");
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.count_id();
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.count_id();
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.count_id();
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.child())?.is_some() {
            if self.depth == 0 {
                *self.items += 1;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            if key.is_text {
                map.next_value_seed(self.child())?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A map key, read only to tell whether its value may be text (`NOT_TEXT`), never kept.
struct Key {
    is_text: bool,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(Key {
                    is_text: !NOT_TEXT.contains(&key),
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Keys whose string values are generated text in a response or a stream chunk.
const GENERATED: [&str; 6] = [
    "content",
    "text",
    "arguments",
    "refusal",
    "partial_json",
    "thinking",
];

/// Appends the generated text under `GENERATED` keys anywhere in `value`.
fn collect_generated(value: &Value, text: &mut String) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| collect_generated(item, text)),
        Value::Object(fields) => {
            for (key, field) in fields {
                match field {
                    Value::String(s) if GENERATED.contains(&key.as_str()) => text.push_str(s),
                    _ => collect_generated(field, text),
                }
            }
        }
        _ => {}
    }
}

/// The generated text of a complete response (or of one stream chunk, for the flavors whose
/// chunks have the response's shape).
fn response_text(flavor: Flavor, response: &Value, text: &mut String) {
    let field = match flavor {
        Flavor::OpenAiChat | Flavor::OpenAiCompletions => "choices",
        Flavor::OpenAiEmbeddings => return,
        Flavor::OpenAiResponses | Flavor::OpenAiRealtime => "output",
        Flavor::AnthropicMessages => "content",
        Flavor::Gemini => "candidates",
    };
    match response {
        Value::Array(chunks) => chunks.iter().for_each(|c| response_text(flavor, c, text)),
        _ => {
            if let Some(value) = response.get(field) {
                collect_generated(value, text);
            }
        }
    }
}

/// The text a stream delivered, from its content-bearing events only (the Responses API
/// repeats the whole text in its `.done` events; only deltas are counted).
fn stream_text(flavor: Flavor, chunks: &[Bytes]) -> String {
    let mut text = String::new();
    let mut framer = sse::Framer::new(sse::DEFAULT_EVENT_CAP);
    let mut on_event = |event: Bytes| {
        let Some(data) = sse::data(&event) else {
            return;
        };
        let Ok(value) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        match flavor {
            Flavor::OpenAiResponses | Flavor::OpenAiRealtime => {
                let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
                // Realtime's audio deltas are base64 audio, not text.
                if kind.ends_with(".delta")
                    && !kind.ends_with("audio.delta")
                    && let Some(delta) = value.get("delta").and_then(Value::as_str)
                {
                    text.push_str(delta);
                }
            }
            Flavor::AnthropicMessages => {
                if let Some(delta) = value.get("delta") {
                    collect_generated(delta, &mut text);
                }
            }
            _ => response_text(flavor, &value, &mut text),
        }
    };
    for chunk in chunks {
        if framer.feed(chunk, &mut on_event).is_err() {
            break;
        }
    }
    // A stream cut mid-event still delivered that event's text so far: read what is whole.
    let rest = framer.take_rest();
    if !rest.is_empty() {
        on_event(rest);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_texts_have_the_reference_tokenizer_counts() {
        // OpenAI's tiktoken gives "hello world" as [24912, 2375] in o200k_base and
        // [15339, 1917] in cl100k_base, and "tiktoken is great!" as
        // [83, 1609, 5963, 374, 2294, 0] in cl100k_base (its README's example).
        assert_eq!(count("gpt-4o", "hello world"), 2);
        assert_eq!(count("gpt-4", "hello world"), 2);
        assert_eq!(count("gpt-4-turbo", "tiktoken is great!"), 6);
        assert_eq!(count("gpt-4o", "Hello, world!"), 4);
        assert_eq!(count("llama3.2", ""), 0);
        // The encoding goes by model family; vendor prefixes are ignored.
        let same = |a: &str, b: &str| encoding_for(a) == encoding_for(b);
        assert!(same("openai/gpt-4o-mini", "o3"));
        assert!(same("gpt-3.5-turbo", "text-embedding-3-small"));
        assert!(!same("gpt-4.1", "gpt-4-0613"));
        assert!(same("llama3.2", "gpt-5"));
    }

    #[test]
    fn chat_prompt_counts_every_message_with_its_framing() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":[{"type":"text","text":"Hello, world!"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="}}]}]}"#;
        let text_only = count("gpt-4o", "You are terse.\nHello, world!\n");
        assert_eq!(
            prompt_tokens(Flavor::OpenAiChat, "gpt-4o", body),
            text_only + 2 * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY
        );
    }

    #[test]
    fn streamed_chat_text_is_the_sum_of_its_deltas() {
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello,\"}}]}\n\n\
                      data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world!\"}}]}\n\n\
                      data: [DONE]\n\n";
        let raw = Raw::Stream(vec![Bytes::from(stream)]);
        let usage = estimate(Flavor::OpenAiChat, "gpt-4o", None, Some(&raw));
        assert_eq!(usage.output_tokens, 4);
    }

    #[test]
    fn responses_stream_counts_deltas_not_the_repeated_full_text() {
        let stream = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello, world!\"}\n\n\
                      event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"Hello, world!\"}\n\n";
        let raw = Raw::Stream(vec![Bytes::from(stream)]);
        let usage = estimate(Flavor::OpenAiResponses, "gpt-4o", None, Some(&raw));
        assert_eq!(usage.output_tokens, 4);
    }

    #[test]
    fn anthropic_and_gemini_bodies_yield_their_text() {
        let anthropic = Raw::Body(vec![Bytes::from_static(
            br#"{"content":[{"type":"text","text":"Hello, world!"}],"usage":null}"#,
        )]);
        assert_eq!(
            estimate(
                Flavor::AnthropicMessages,
                "claude-x",
                None,
                Some(&anthropic)
            )
            .output_tokens,
            4
        );
        let gemini = Raw::Body(vec![Bytes::from_static(
            br#"[{"candidates":[{"content":{"parts":[{"text":"Hello,"}],"role":"model"}}]},{"candidates":[{"content":{"parts":[{"text":" world!"}]}}]}]"#,
        )]);
        assert_eq!(
            estimate(Flavor::Gemini, "gemini-x", None, Some(&gemini)).output_tokens,
            4
        );
    }

    #[test]
    fn embeddings_given_as_token_ids_count_the_ids() {
        let body = br#"{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]}"#;
        assert_eq!(
            prompt_tokens(Flavor::OpenAiEmbeddings, "text-embedding-3-small", body),
            5
        );
    }
}
