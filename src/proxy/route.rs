//! Route classification: which provider paths are metered, and with which usage flavor.

use http::Method;

use crate::usage::Flavor;

/// The flavor whose usage a request's response carries, or `None` for routes passed through unmetered.
///
/// `rest` is the path after llm-meter's own `/v1` prefix (`/chat/completions`).
pub fn classify(method: &Method, rest: &str) -> Option<Flavor> {
    if method != Method::POST {
        return None;
    }
    match rest.trim_end_matches('/') {
        "/chat/completions" => Some(Flavor::OpenAiChat),
        "/completions" => Some(Flavor::OpenAiCompletions),
        "/embeddings" => Some(Flavor::OpenAiEmbeddings),
        "/responses" => Some(Flavor::OpenAiResponses),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_openai_route_that_reports_usage_is_metered() {
        for (path, flavor) in [
            ("/completions", Flavor::OpenAiCompletions),
            ("/embeddings", Flavor::OpenAiEmbeddings),
            ("/responses", Flavor::OpenAiResponses),
        ] {
            assert_eq!(classify(&Method::POST, path), Some(flavor));
        }
        // Retrieving, cancelling or listing a stored response reports no usage of its own.
        assert_eq!(classify(&Method::GET, "/responses/resp_1"), None);
        assert_eq!(classify(&Method::POST, "/responses/resp_1/cancel"), None);
        assert_eq!(classify(&Method::POST, "/responses/input_tokens"), None);
    }

    #[test]
    fn only_posted_chat_completions_are_metered() {
        assert_eq!(
            classify(&Method::POST, "/chat/completions"),
            Some(Flavor::OpenAiChat)
        );
        assert_eq!(
            classify(&Method::POST, "/chat/completions/"),
            Some(Flavor::OpenAiChat)
        );
        assert_eq!(classify(&Method::GET, "/chat/completions"), None);
        assert_eq!(classify(&Method::GET, "/models"), None);
        assert_eq!(
            classify(&Method::POST, "/chat/completions/abc/messages"),
            None
        );
    }
}
