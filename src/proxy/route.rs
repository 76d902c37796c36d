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
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
