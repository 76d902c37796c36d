//! Attribution beyond the key: the user, session and tags a request is for, as a client names
//! them in llm-meter's own headers (`X-LLM-Meter-User`, `X-LLM-Meter-Session`,
//! `X-LLM-Meter-Tags: team=search, run=42`) or, for the user, in the body's standard field.
//!
//! The headers are ours: `take` removes them from every forwarded request, so the provider never
//! sees them, and refuses a bad value (400) instead of dropping it. The limits keep what one
//! request can add to a ledger row small; grouping by them is the ledger's job, never memory's.

use std::collections::BTreeMap;

use http::HeaderMap;
use http::header::HeaderName;

use crate::error::ProxyError;

/// `X-LLM-Meter-Tags: team=search, run=42`.
pub const TAGS_HEADER: HeaderName = HeaderName::from_static("x-llm-meter-tags");
/// `X-LLM-Meter-User: alice`.
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-llm-meter-user");
/// `X-LLM-Meter-Session: 7f3c…`.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("x-llm-meter-session");

/// Most tags one request may carry in its header (and one named key by default).
pub const MAX_TAGS: usize = 8;
/// Longest tag name, in bytes.
pub const MAX_TAG_NAME: usize = 32;
/// Longest tag value, in characters.
pub const MAX_TAG_VALUE: usize = 64;
/// Longest user or session, in characters.
pub const MAX_ID: usize = 128;

/// Tags by name, in name order.
pub type Tags = BTreeMap<String, String>;

/// What a request is attributed to besides its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    /// The end user: the header's, else the body's standard field.
    pub user: Option<String>,
    /// The session, conversation or run.
    pub session: Option<String>,
    /// The tags: the named key's defaults, overridden by the header's of the same name.
    pub tags: Tags,
}

impl Attribution {
    /// No user, no session, no tags.
    pub const NONE: Self = Self {
        user: None,
        session: None,
        tags: BTreeMap::new(),
    };

    /// True when there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.session.is_none() && self.tags.is_empty()
    }

    /// The tags as a JSON object (`{"run":"42","team":"search"}`), as the ledger stores them;
    /// `None` without tags.
    pub fn tags_json(&self) -> Option<String> {
        if self.tags.is_empty() {
            return None;
        }
        serde_json::to_string(&self.tags).ok()
    }

    /// Takes `user` (the body's) when no header named one.
    pub fn or_user(&mut self, user: Option<&str>) {
        if self.user.is_none() {
            self.user = user.map(str::to_owned);
        }
    }

    /// Adds `defaults` (a named key's tags) under the tags the request named itself.
    pub fn add_defaults(&mut self, defaults: &Tags) {
        for (name, value) in defaults {
            self.tags
                .entry(name.clone())
                .or_insert_with(|| value.clone());
        }
    }
}

/// Removes llm-meter's attribution headers from `headers` and reads them; a bad value is an
/// error naming its header (the headers are removed either way).
pub fn take(headers: &mut HeaderMap) -> Result<Attribution, ProxyError> {
    let tags = take_all(headers, &TAGS_HEADER);
    let user = take_all(headers, &USER_HEADER);
    let session = take_all(headers, &SESSION_HEADER);
    let bad =
        |header: &'static str| move |reason: String| ProxyError::BadAttribution { header, reason };
    let mut attribution = Attribution::NONE;
    if !tags.is_empty() {
        let joined = join(&tags).map_err(bad("X-LLM-Meter-Tags"))?;
        attribution.tags = parse_tags(&joined).map_err(bad("X-LLM-Meter-Tags"))?;
    }
    attribution.user = one_id(&user).map_err(bad("X-LLM-Meter-User"))?;
    attribution.session = one_id(&session).map_err(bad("X-LLM-Meter-Session"))?;
    Ok(attribution)
}

/// Every value of `name`, removed.
fn take_all(headers: &mut HeaderMap, name: &HeaderName) -> Vec<http::HeaderValue> {
    // The common case, none, without `entry`, which may grow the map to make room.
    if !headers.contains_key(name) {
        return Vec::new();
    }
    match headers.entry(name) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => Vec::new(),
    }
}

/// The values of a list header, joined with commas as HTTP allows.
fn join(values: &[http::HeaderValue]) -> Result<String, String> {
    let texts: Result<Vec<&str>, String> = values.iter().map(text).collect();
    Ok(texts?.join(","))
}

/// A header value as text: UTF-8 (a header may carry it as raw bytes), no control characters.
fn text(value: &http::HeaderValue) -> Result<&str, String> {
    let text =
        std::str::from_utf8(value.as_bytes()).map_err(|_| "the value is not UTF-8".to_owned())?;
    if text.chars().any(char::is_control) {
        return Err("the value has a control character".into());
    }
    Ok(text)
}

/// A user or session: one value, not empty, at most `MAX_ID` characters.
fn one_id(values: &[http::HeaderValue]) -> Result<Option<String>, String> {
    match values {
        [] => Ok(None),
        [value] => {
            let id = text(value)?.trim();
            check_id(id)?;
            Ok(Some(id.to_owned()))
        }
        _ => Err("it is given more than once".into()),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the value is empty".into());
    }
    let len = id.chars().count();
    if len > MAX_ID {
        return Err(format!(
            "the value is {len} characters long, longer than {MAX_ID}"
        ));
    }
    Ok(())
}

/// Parses `team=search, run=42`: comma-separated `name=value` pairs, each name once, at most
/// `MAX_TAGS`; empty items (`a=1,,b=2`, a trailing comma) are skipped.
pub fn parse_tags(value: &str) -> Result<Tags, String> {
    let mut tags = Tags::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=value"))?;
        let (name, value) = (name.trim(), value.trim());
        check_tag_name(name)?;
        check_tag_value(name, value)?;
        if tags.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(format!("tag {name:?} is given twice"));
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "{} tags given, at most {MAX_TAGS} are allowed",
            tags.len()
        ));
    }
    Ok(tags)
}

/// A tag name: 1 to `MAX_TAG_NAME` of lower-case letters, digits, `_`, `.` and `-`.
pub fn check_tag_name(name: &str) -> Result<(), String> {
    let is_allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-');
    if name.is_empty() || name.len() > MAX_TAG_NAME || !name.bytes().all(is_allowed) {
        return Err(format!(
            "tag name {name:?} must be 1 to {MAX_TAG_NAME} of a-z, 0-9, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// A tag value: 1 to `MAX_TAG_VALUE` characters, no control characters, no comma.
pub fn check_tag_value(name: &str, value: &str) -> Result<(), String> {
    let len = value.chars().count();
    if value.is_empty() || len > MAX_TAG_VALUE {
        return Err(format!(
            "the value of tag {name:?} must be 1 to {MAX_TAG_VALUE} characters, got {len}"
        ));
    }
    if value.chars().any(|c| c.is_control() || c == ',') {
        return Err(format!(
            "the value of tag {name:?} has a comma or a control character"
        ));
    }
    Ok(())
}

/// The user named in a request body's standard field, from the raw JSON of the top-level fields
/// `user` or `safety_identifier` (OpenAI) and `metadata` (Anthropic's `metadata.user_id`).
/// The body is the client's contract with its provider, so an unusable value (not a string,
/// empty, with a control character) is passed over rather than refused; a long one is cut to
/// `MAX_ID` characters.
pub fn user_in_body(
    user: Option<&[u8]>,
    safety_identifier: Option<&[u8]>,
    metadata: Option<&[u8]>,
) -> Option<String> {
    let from_metadata = || {
        let [user_id] = crate::json::top_level(metadata?, [b"user_id"])?;
        usable_id(user_id?)
    };
    user.and_then(usable_id)
        .or_else(|| safety_identifier.and_then(usable_id))
        .or_else(from_metadata)
}

fn usable_id(raw: &[u8]) -> Option<String> {
    let id: String = serde_json::from_slice(raw).ok()?;
    let id = id.trim();
    if id.is_empty() || id.chars().any(char::is_control) {
        return None;
    }
    Some(id.chars().take(MAX_ID).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append((*name).clone(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn headers_are_read_and_removed() {
        let mut map = headers(&[
            (&TAGS_HEADER, "team=search, run=42"),
            (&TAGS_HEADER, "env=prod"),
            (&USER_HEADER, " alice "),
            (&SESSION_HEADER, "7f3c"),
            (&http::header::ACCEPT, "*/*"),
        ]);
        let got = take(&mut map).unwrap();
        assert_eq!(got.user.as_deref(), Some("alice"));
        assert_eq!(got.session.as_deref(), Some("7f3c"));
        assert_eq!(
            got.tags_json().unwrap(),
            r#"{"env":"prod","run":"42","team":"search"}"#
        );
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn bad_tags_are_refused_with_a_reason() {
        for (value, expected) in [
            ("team", "not name=value"),
            ("Team=a", "tag name \"Team\""),
            ("a b=1", "tag name"),
            (&format!("{}=1", "n".repeat(33)), "tag name"),
            (&format!("a={}", "v".repeat(65)), "1 to 64 characters"),
            ("a=", "1 to 64 characters"),
            ("a=1,a=2", "given twice"),
            ("a=1,b=2,c=3,d=4,e=5,f=6,g=7,h=8,i=9", "at most 8"),
        ] {
            let err = parse_tags(value).unwrap_err();
            assert!(err.contains(expected), "{value:?}: {err}");
        }
        assert_eq!(parse_tags("a=1,,b=x=y,").unwrap().len(), 2);
    }

    #[test]
    fn bad_users_and_sessions_are_refused_with_the_header_named() {
        let long = "u".repeat(129);
        for (name, value, expected) in [
            (&USER_HEADER, "", "X-LLM-Meter-User"),
            (&USER_HEADER, long.as_str(), "longer than 128"),
            (&SESSION_HEADER, "  ", "X-LLM-Meter-Session"),
        ] {
            let err = take(&mut headers(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{value:?}: {err}");
        }
        let mut twice = headers(&[(&USER_HEADER, "a"), (&USER_HEADER, "b")]);
        assert!(
            take(&mut twice)
                .unwrap_err()
                .to_string()
                .contains("more than once")
        );
        assert!(twice.is_empty());
        let mut raw = HeaderMap::new();
        raw.insert(USER_HEADER, http::HeaderValue::from_bytes(b"a\tb").unwrap());
        assert!(take(&mut raw).unwrap_err().to_string().contains("control"));
    }

    #[test]
    fn the_user_comes_from_user_then_safety_identifier_then_metadata() {
        let meta = br#"{"user_id": "carol", "x": [1]}"#.as_slice();
        let user = user_in_body(Some(br#""alice""#), Some(br#""bob""#), Some(meta));
        assert_eq!(user.as_deref(), Some("alice"));
        let user = user_in_body(None, Some(br#""bob""#), Some(meta));
        assert_eq!(user.as_deref(), Some("bob"));
        assert_eq!(
            user_in_body(None, None, Some(meta)).as_deref(),
            Some("carol")
        );
        assert_eq!(user_in_body(Some(b"42"), Some(br#""""#), None), None);
        let long = format!("\"{}\"", "é".repeat(200));
        let cut = user_in_body(Some(long.as_bytes()), None, None).unwrap();
        assert_eq!(cut.chars().count(), MAX_ID);
    }

    #[test]
    fn header_tags_override_a_keys_defaults() {
        let mut a = Attribution {
            tags: parse_tags("team=search").unwrap(),
            ..Attribution::NONE
        };
        a.add_defaults(&parse_tags("team=ads, env=prod").unwrap());
        assert_eq!(a.tags_json().unwrap(), r#"{"env":"prod","team":"search"}"#);
    }
}
