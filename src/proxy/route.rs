//! Route classification: which provider paths are metered, and with which usage flavor.

use http::Method;

use crate::config::ApiFlavor;
use crate::usage::Flavor;

/// A metered route: how its response reports usage, and what its path says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered<'a> {
    /// How to read the response's usage.
    pub flavor: Flavor,
    /// The model named in the path (Gemini puts it there, not in the body).
    pub path_model: Option<&'a str>,
    /// The path alone says the response streams (Gemini's `streamGenerateContent`).
    pub is_stream_path: bool,
}

impl Metered<'_> {
    fn body(flavor: Flavor) -> Self {
        Self {
            flavor,
            path_model: None,
            is_stream_path: false,
        }
    }
}

/// The flavor whose usage a request's response carries, or `None` for routes passed through unmetered.
///
/// `rest` is the path after the upstream's prefix (`/chat/completions`, `/messages`).
pub fn classify<'a>(api: ApiFlavor, method: &Method, rest: &'a str) -> Option<Metered<'a>> {
    // A server that folds method case would take `post` as POST.
    if !method.as_str().eq_ignore_ascii_case("POST") {
        return None;
    }
    // `rest` is canonical (see `path`); case is ignored, as servers that fold it would.
    let rest = rest.trim_end_matches('/');
    let is = |route: &str| rest.eq_ignore_ascii_case(route);
    match api {
        ApiFlavor::OpenAi => {
            if is("/chat/completions") {
                Some(Metered::body(Flavor::OpenAiChat))
            } else if is("/completions") {
                Some(Metered::body(Flavor::OpenAiCompletions))
            } else if is("/embeddings") {
                Some(Metered::body(Flavor::OpenAiEmbeddings))
            } else if is("/responses") {
                Some(Metered::body(Flavor::OpenAiResponses))
            } else {
                None
            }
        }
        // `/messages/count_tokens` and `/messages/batches` report no usage of their own.
        ApiFlavor::Anthropic => is("/messages").then(|| Metered::body(Flavor::AnthropicMessages)),
        ApiFlavor::Gemini => {
            let (model_path, method) = rest.rsplit_once(':')?;
            let is_stream_path = if method.eq_ignore_ascii_case("generateContent") {
                false
            } else if method.eq_ignore_ascii_case("streamGenerateContent") {
                true
            } else {
                return None;
            };
            let model = strip_prefix_ignoring_case(model_path, "/models/")
                .or_else(|| strip_prefix_ignoring_case(model_path, "/tunedModels/"))
                .filter(|m| !m.is_empty() && !m.contains('/'))?;
            Some(Metered {
                flavor: Flavor::Gemini,
                path_model: Some(model),
                is_stream_path,
            })
        }
    }
}

/// The flavor whose usage a WebSocket upgrade's messages carry, or `None` for upgrades relayed
/// unmetered: the Responses API's WebSocket mode and the Realtime API, on OpenAI upstreams.
pub fn classify_upgrade(api: ApiFlavor, rest: &str) -> Option<Flavor> {
    let rest = rest.trim_end_matches('/');
    match api {
        ApiFlavor::OpenAi if rest.eq_ignore_ascii_case("/responses") => {
            Some(Flavor::OpenAiResponses)
        }
        ApiFlavor::OpenAi if rest.eq_ignore_ascii_case("/realtime") => Some(Flavor::OpenAiRealtime),
        _ => None,
    }
}

fn strip_prefix_ignoring_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flavor(api: ApiFlavor, method: &Method, rest: &str) -> Option<Flavor> {
        classify(api, method, rest).map(|m| m.flavor)
    }

    #[test]
    fn every_openai_route_that_reports_usage_is_metered() {
        let openai = ApiFlavor::OpenAi;
        for (path, expected) in [
            ("/completions", Flavor::OpenAiCompletions),
            ("/embeddings", Flavor::OpenAiEmbeddings),
            ("/responses", Flavor::OpenAiResponses),
        ] {
            assert_eq!(flavor(openai, &Method::POST, path), Some(expected));
        }
        // Retrieving, cancelling or listing a stored response reports no usage of its own.
        assert_eq!(flavor(openai, &Method::GET, "/responses/resp_1"), None);
        assert_eq!(
            flavor(openai, &Method::POST, "/responses/resp_1/cancel"),
            None
        );
        assert_eq!(
            flavor(openai, &Method::POST, "/responses/input_tokens"),
            None
        );
    }

    #[test]
    fn websocket_upgrades_are_metered_on_responses_and_realtime_only() {
        let openai = ApiFlavor::OpenAi;
        assert_eq!(
            classify_upgrade(openai, "/responses"),
            Some(Flavor::OpenAiResponses)
        );
        assert_eq!(
            classify_upgrade(openai, "/Realtime/"),
            Some(Flavor::OpenAiRealtime)
        );
        assert_eq!(classify_upgrade(openai, "/chat/completions"), None);
        assert_eq!(classify_upgrade(ApiFlavor::Anthropic, "/responses"), None);
    }

    #[test]
    fn only_posted_chat_completions_are_metered() {
        let openai = ApiFlavor::OpenAi;
        assert_eq!(
            flavor(openai, &Method::POST, "/chat/completions"),
            Some(Flavor::OpenAiChat)
        );
        assert_eq!(
            flavor(openai, &Method::POST, "/chat/completions/"),
            Some(Flavor::OpenAiChat)
        );
        assert_eq!(
            flavor(openai, &Method::POST, "/Chat/COMPLETIONS"),
            Some(Flavor::OpenAiChat)
        );
        assert_eq!(flavor(openai, &Method::GET, "/chat/completions"), None);
        assert_eq!(flavor(openai, &Method::GET, "/models"), None);
        assert_eq!(
            flavor(openai, &Method::POST, "/chat/completions/abc/messages"),
            None
        );
    }

    #[test]
    fn anthropic_meters_messages_but_not_token_counting_or_batches() {
        let anthropic = ApiFlavor::Anthropic;
        assert_eq!(
            flavor(anthropic, &Method::POST, "/messages"),
            Some(Flavor::AnthropicMessages)
        );
        assert_eq!(
            flavor(anthropic, &Method::POST, "/messages/count_tokens"),
            None
        );
        assert_eq!(flavor(anthropic, &Method::POST, "/messages/batches"), None);
        assert_eq!(flavor(anthropic, &Method::GET, "/models"), None);
        // The OpenAI paths mean nothing on an Anthropic upstream.
        assert_eq!(flavor(anthropic, &Method::POST, "/chat/completions"), None);
    }

    #[test]
    fn gemini_takes_the_model_and_streaming_from_the_path() {
        let gemini = ApiFlavor::Gemini;
        let plain = classify(
            gemini,
            &Method::POST,
            "/models/gemini-2.5-flash:generateContent",
        );
        assert_eq!(
            plain,
            Some(Metered {
                flavor: Flavor::Gemini,
                path_model: Some("gemini-2.5-flash"),
                is_stream_path: false,
            })
        );
        let stream = classify(
            gemini,
            &Method::POST,
            "/models/gemini-2.0-flash:streamGenerateContent",
        )
        .unwrap();
        assert!(stream.is_stream_path);
        assert_eq!(stream.path_model, Some("gemini-2.0-flash"));
        for unmetered in [
            "/models/gemini-2.0-flash:countTokens",
            "/models/gemini-2.0-flash:embedContent",
            "/models",
            "/models/:generateContent",
            "/cachedContents",
        ] {
            assert_eq!(
                classify(gemini, &Method::POST, unmetered),
                None,
                "{unmetered}"
            );
        }
    }
}
