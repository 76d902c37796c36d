//! Caller identity: a stable id and a redacted label derived from the API key; the raw key is never kept.

use std::fmt;

use http::HeaderMap;
use sha2::{Digest, Sha256};

/// Header names a client may carry its key in, in the order they are tried after `Authorization`:
/// Anthropic's, Azure's, Gemini's.
const KEY_HEADERS: [&str; 3] = ["x-api-key", "api-key", "x-goog-api-key"];

/// Id and label of callers that sent no key at all.
pub const ANONYMOUS: &str = "anonymous";
/// Id and label under which requests the upstream refused (401, 403) are counted: a key the
/// provider does not know is not worth an entry of its own, and random keys must not grow memory.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Id and label of the entry that counts the keys past `max_tracked_keys`.
pub const OTHER_KEYS: &str = "other";

/// Hex digits of the SHA-256 kept as the stable id: 64 bits, collision-free for any realistic key count.
const ID_HEX_LEN: usize = 16;

/// Who made a request: safe to show, log and store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Stable id: a prefix of the key's SHA-256, the same across restarts and machines.
    pub id: String,
    /// Redacted label a person can recognize (`sk-proj-…Wxyz`) but not reconstruct.
    pub label: String,
}

impl Identity {
    /// The identity of a request that carried no key.
    pub fn anonymous() -> Self {
        Self {
            id: ANONYMOUS.to_owned(),
            label: ANONYMOUS.to_owned(),
        }
    }

    /// The identity requests the upstream refused with 401 or 403 are counted under.
    pub fn unauthenticated() -> Self {
        Self {
            id: UNAUTHENTICATED.to_owned(),
            label: UNAUTHENTICATED.to_owned(),
        }
    }

    /// The identity of the entry that counts the keys past the tracked bound.
    pub fn other_keys() -> Self {
        Self {
            id: OTHER_KEYS.to_owned(),
            label: OTHER_KEYS.to_owned(),
        }
    }

    /// Derives the identity from a raw key; the key itself is not kept.
    pub fn from_key(key: &[u8]) -> Self {
        Self {
            id: id_of(key),
            label: label_of(key),
        }
    }

    /// The identity of a key whose SHA-256 is already known.
    pub fn from_digest(digest: &[u8; 32], key: &[u8]) -> Self {
        Self {
            id: id_of_digest(digest),
            label: label_of(key),
        }
    }

    /// The identity of a named key: its stable id, and its name as the label.
    pub fn named(digest: &[u8; 32], name: &str) -> Self {
        Self {
            id: id_of_digest(digest),
            label: name.to_owned(),
        }
    }
}

/// Where a request carried its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer`.
    Bearer,
    /// A header of its own (`x-api-key`, `api-key`, `x-goog-api-key`).
    Header(&'static str),
    /// A `key=` query parameter.
    Query,
}

/// The raw key of a request and where it was: headers first, then `?key=`.
pub fn find<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<(&'a [u8], KeySource)> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| strip_bearer(v.as_bytes()))
        .map(|k| (k, KeySource::Bearer));
    bearer
        .or_else(|| {
            KEY_HEADERS.iter().find_map(|name| {
                headers
                    .get(*name)
                    .map(|v| (v.as_bytes(), KeySource::Header(name)))
            })
        })
        .map(|(k, source)| (k.trim_ascii(), source))
        .filter(|(k, _)| !k.is_empty())
        .or_else(|| Some((query_key(query?)?, KeySource::Query)))
}

/// Puts `key` where the client's key was (a virtual key's real key, on its way upstream).
pub fn replace(parts: &mut http::request::Parts, source: KeySource, key: &str) {
    let value = |v: String| http::HeaderValue::from_str(&v).ok();
    match source {
        KeySource::Bearer => {
            if let Some(v) = value(format!("Bearer {key}")) {
                parts.headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        KeySource::Header(name) => {
            if let Some(v) = value(key.to_owned()) {
                parts.headers.insert(name, v);
            }
        }
        KeySource::Query => {
            let Some(query) = parts.uri.query() else {
                return;
            };
            let rebuilt: Vec<String> = query
                .split('&')
                .map(|pair| {
                    if pair.starts_with("key=") {
                        format!("key={key}")
                    } else {
                        pair.to_owned()
                    }
                })
                .collect();
            let path_and_query = format!("{}?{}", parts.uri.path(), rebuilt.join("&"));
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = path_and_query.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(uri) {
                parts.uri = uri;
            }
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.label, self.id)
    }
}

/// The value of a `key=` query parameter (percent-encoding is kept: the id only needs to be stable).
fn query_key(query: &str) -> Option<&[u8]> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("key="))
        .map(str::as_bytes)
        .filter(|k| !k.is_empty())
}

/// Returns the token of a `Bearer` credential (scheme matched case-insensitively).
fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    let head = value.get(..SCHEME.len())?;
    head.eq_ignore_ascii_case(SCHEME)
        .then(|| &value[SCHEME.len()..])
}

/// The SHA-256 of a key: what named keys are matched by, and what its id is cut from.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn id_of(key: &[u8]) -> String {
    id_of_digest(&digest(key))
}

/// The stable id of the key with this SHA-256.
pub fn id_of_digest(digest: &[u8; 32]) -> String {
    let mut id = String::with_capacity(ID_HEX_LEN);
    for byte in &digest[..ID_HEX_LEN / 2] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Builds a label showing at most a vendor prefix (`sk-`, `sk-proj-`, `sk-ant-`) and the last few
/// characters, so that at most 12 characters of any key are ever shown, and fewer of short keys.
fn label_of(key: &[u8]) -> String {
    let Ok(key) = std::str::from_utf8(key) else {
        return "…".to_owned();
    };
    if !key.is_ascii() {
        return "…".to_owned();
    }
    let tail_len = match key.len() {
        0..12 => 0,
        12..20 => 2,
        _ => 4,
    };
    let prefix = vendor_prefix(key);
    // Never let prefix and tail together cover more than half of the key.
    let prefix = if (prefix.len() + tail_len) * 2 > key.len() {
        ""
    } else {
        prefix
    };
    let tail = &key[key.len() - tail_len..];
    let mut label = String::with_capacity(prefix.len() + '…'.len_utf8() + tail.len());
    label.push_str(prefix);
    label.push('…');
    label.push_str(tail);
    label
}

/// The leading `word-` groups of a key (lowercase letters and digits), up to 8 characters.
fn vendor_prefix(key: &str) -> &str {
    let window = &key[..key.len().min(8)];
    let Some(end) = window.rfind('-') else {
        return "";
    };
    let prefix = &window[..=end];
    if prefix
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        prefix
    } else {
        ""
    }
}

/// Query parameters that carry credentials (Gemini's `?key=`, Azure SAS-style tokens): never logged.
const SECRET_QUERY_PARAMS: [&str; 6] = [
    "key",
    "api_key",
    "api-key",
    "apikey",
    "access_token",
    "token",
];

/// The request's path and query for logs, with every credential-bearing query value replaced.
pub fn redact_path(uri: &http::Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let mut out = String::with_capacity(path.len() + query.len() + 1);
    out.push_str(path);
    for (i, pair) in query.split('&').enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if SECRET_QUERY_PARAMS
            .iter()
            .any(|s| name.eq_ignore_ascii_case(s))
        {
            out.push_str(name);
            out.push_str("=REDACTED");
        } else {
            out.push_str(pair);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller of a request with these headers and no query, as the proxy identifies it.
    fn from_headers(headers: &HeaderMap) -> Identity {
        find(headers, None).map_or_else(Identity::anonymous, |(key, _)| Identity::from_key(key))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn bearer_key_wins_over_other_headers() {
        let h = headers(&[
            ("authorization", "Bearer sk-one-aaaaaaaaaaaaaaaaaaaa"),
            ("x-api-key", "sk-two-bbbbbbbbbbbbbbbbbbbb"),
        ]);
        assert_eq!(
            from_headers(&h),
            Identity::from_key(b"sk-one-aaaaaaaaaaaaaaaaaaaa")
        );
    }

    #[test]
    fn x_api_key_then_api_key_then_anonymous() {
        let h = headers(&[("x-api-key", "k1-xxxxxxxxxxxxxxxx"), ("api-key", "k2-yyyy")]);
        assert_eq!(from_headers(&h), Identity::from_key(b"k1-xxxxxxxxxxxxxxxx"));
        let h = headers(&[("api-key", "k2-yyyyyyyyyyyyyyyyyyyyyy")]);
        assert_eq!(
            from_headers(&h),
            Identity::from_key(b"k2-yyyyyyyyyyyyyyyyyyyyyy")
        );
        assert_eq!(from_headers(&HeaderMap::new()), Identity::anonymous());
    }

    #[test]
    fn non_bearer_authorization_falls_through() {
        let h = headers(&[
            ("authorization", "Basic abc"),
            ("api-key", "azure-key-1234567890"),
        ]);
        assert_eq!(
            from_headers(&h),
            Identity::from_key(b"azure-key-1234567890")
        );
        let h = headers(&[("authorization", "bearer    ")]);
        assert_eq!(from_headers(&h), Identity::anonymous());
    }

    #[test]
    fn query_keys_are_redacted_in_logged_paths() {
        let uri: http::Uri = "/v1/models/gemini:generateContent?alt=sse&key=AIzaSECRET&Token=abc"
            .parse()
            .unwrap();
        assert_eq!(
            redact_path(&uri),
            "/v1/models/gemini:generateContent?alt=sse&key=REDACTED&Token=REDACTED"
        );
        let plain: http::Uri = "/v1/chat/completions".parse().unwrap();
        assert_eq!(redact_path(&plain), "/v1/chat/completions");
    }

    #[test]
    fn id_is_stable_and_hex() {
        let a = Identity::from_key(b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789");
        let b = Identity::from_key(b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789");
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.len(), ID_HEX_LEN);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.id, Identity::from_key(b"sk-proj-other").id);
    }

    #[test]
    fn labels_show_vendor_prefix_and_last_four() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
        assert_eq!(label_of(key.as_bytes()), "sk-proj-…6789");
        assert_eq!(
            label_of(b"sk-ant-api03-ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            "sk-ant-…WXYZ"
        );
        assert_eq!(label_of(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "…WXYZ");
    }

    #[test]
    fn short_keys_show_little_or_nothing() {
        assert_eq!(label_of(b"secret"), "…");
        assert_eq!(label_of(b"sk-abcdefghijk"), "sk-…jk");
        assert_eq!(label_of(b"abcdefghijklmno"), "…no");
        assert_eq!(label_of("ключ-ключ-ключ".as_bytes()), "…");
    }

    #[test]
    fn no_label_reveals_more_than_half_of_the_key() {
        for len in 1..64 {
            let key: String = "sk-proj-"
                .chars()
                .chain(std::iter::repeat('x'))
                .take(len)
                .collect();
            let label = label_of(key.as_bytes());
            let shown = label.chars().filter(|c| *c != '…').count();
            assert!(
                shown * 2 <= len,
                "{label} reveals too much of a {len}-char key"
            );
        }
    }
}
