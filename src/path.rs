//! Canonical request paths: the one spelling of a path that routing decides on and that the
//! upstream receives, so no other spelling of a metered route can slip past metering.
//!
//! RFC 3986 §6.2.2 and §5.2.4: percent-encoded unreserved characters are decoded (and every
//! other escape written in upper-case hex), empty segments are collapsed, and `.` and `..`
//! segments are resolved. What cannot be made canonical safely is refused: an encoded `/` or
//! `\` (a server behind us may decode it into a separator, and then route the request somewhere
//! we did not meter), a raw `\`, an encoded control character or space (some servers trim them),
//! a `;` (servers that know path parameters strip them), a malformed escape, and a `..` that
//! climbs above the upstream prefix it is in, or above the root.

use std::borrow::Cow;

/// Why a path has no canonical form we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `..` segment climbs above the upstream prefix (or the root) it is under.
    #[error("the path climbs above its prefix with `..`")]
    ClimbsAbove,
    /// A `/` or `\` encoded inside a segment (`%2F`, `%5C`), or a raw `\`.
    #[error("the path has an encoded or backslash separator (%2F, %5C or \\)")]
    EncodedSeparator,
    /// An encoded control character or space.
    #[error("the path has an encoded control character or space")]
    ControlCharacter,
    /// A `;` path parameter.
    #[error("the path has a `;` parameter")]
    Parameter,
    /// A `%` not followed by two hex digits.
    #[error("the path has a malformed percent escape")]
    MalformedEscape,
}

/// The canonical form of `raw` (a request's path, without its query), borrowed when `raw` is
/// already canonical, which is the common case and costs one scan.
///
/// `prefixes` are the upstreams' path prefixes (`/v1`, `/anthropic/v1`): a `..` may not leave
/// the one it is under. A path that does not start with `/` (`*`) is returned as it is.
pub fn canonicalize<'a, 'p>(
    raw: &'a str,
    prefixes: &(impl Iterator<Item = &'p str> + Clone),
) -> Result<Cow<'a, str>, PathError> {
    if !raw.starts_with('/') || is_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut segments: Vec<Cow<'a, str>> = Vec::new();
    // A path that ends in `/`, `/.` or `/..` keeps its trailing slash (§5.2.4).
    let mut is_directory = false;
    for segment in raw[1..].split('/') {
        let segment = decode(segment)?;
        is_directory = matches!(&*segment, "" | "." | "..");
        match &*segment {
            "" | "." => {}
            ".." => {
                if segments.len() <= prefix_depth(&segments, prefixes.clone()) {
                    return Err(PathError::ClimbsAbove);
                }
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut canonical = String::with_capacity(raw.len());
    for segment in &segments {
        canonical.push('/');
        canonical.push_str(segment);
    }
    if is_directory || segments.is_empty() {
        canonical.push('/');
    }
    Ok(Cow::Owned(canonical))
}

/// True when `raw` has nothing to decode, collapse or resolve, and nothing to refuse.
fn is_canonical(raw: &str) -> bool {
    if raw.bytes().any(|b| matches!(b, b'%' | b';' | b'\\')) {
        return false;
    }
    let mut segments = raw[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        if (segment.is_empty() && !is_last) || segment == "." || segment == ".." {
            return false;
        }
    }
    true
}

/// How many leading segments of `segments` belong to the deepest prefix they are under.
fn prefix_depth<'p>(segments: &[Cow<'_, str>], prefixes: impl Iterator<Item = &'p str>) -> usize {
    prefixes
        .filter_map(|prefix| {
            let mut depth = 0;
            for part in prefix.split('/').filter(|p| !p.is_empty()) {
                if segments.get(depth).map(|s| &**s) != Some(part) {
                    return None;
                }
                depth += 1;
            }
            Some(depth)
        })
        .max()
        .unwrap_or(0)
}

/// One segment with its escapes normalized: unreserved characters decoded, the rest upper-case.
fn decode(segment: &str) -> Result<Cow<'_, str>, PathError> {
    if segment.contains(';') {
        return Err(PathError::Parameter);
    }
    if segment.contains('\\') {
        return Err(PathError::EncodedSeparator);
    }
    if !segment.contains('%') {
        return Ok(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte != b'%' {
            // Bytes up to the next escape are copied as they are (they were valid UTF-8 text).
            let next = segment[at..].find('%').map_or(segment.len(), |i| at + i);
            out.push_str(&segment[at..next]);
            at = next;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(at + 1).and_then(|&b| hex(b)),
            bytes.get(at + 2).and_then(|&b| hex(b)),
        ) else {
            return Err(PathError::MalformedEscape);
        };
        let decoded = high << 4 | low;
        match decoded {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0..=0x20 | 0x7f => return Err(PathError::ControlCharacter),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(decoded));
            }
            _ => {
                out.push('%');
                out.push(char::from(HEX_DIGITS[usize::from(high)]));
                out.push(char::from(HEX_DIGITS[usize::from(low)]));
            }
        }
        at += 3;
    }
    Ok(Cow::Owned(out))
}

const HEX_DIGITS: &[u8; 16] = b"0123456789ABCDEF";

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIXES: [&str; 2] = ["/v1", "/anthropic/v1"];

    fn canonical(raw: &str) -> Result<String, PathError> {
        canonicalize(raw, &PREFIXES.into_iter()).map(Cow::into_owned)
    }

    #[test]
    fn a_canonical_path_is_borrowed_as_it_is() {
        for raw in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/",
            "/stats",
            "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
            "*",
        ] {
            let got = canonicalize(raw, &PREFIXES.into_iter()).unwrap();
            assert!(matches!(got, Cow::Borrowed(_)), "{raw}");
            assert_eq!(got, raw);
        }
    }

    #[test]
    fn every_other_spelling_of_a_route_becomes_the_route() {
        for raw in [
            "/v1//chat/completions",
            "//v1/chat/completions",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1/chat/./completions",
            "/v1/chat/completions/x/..",
            "/v1/chat/%63ompletions",
            "/v1/chat/%43%4F%4D%50%4C%45%54%49%4F%4E%53",
            "/%76%31/chat/completions",
            "/v1/chat%2ecompletions/../chat/completions",
            "/v1/chat/x/%2e%2e/completions",
            "/v1/chat/x/%2E%2E/completions",
            "/v1/chat/%2e/completions",
        ] {
            let got = canonical(raw).unwrap();
            assert!(
                got.eq_ignore_ascii_case("/v1/chat/completions") || got == "/v1/chat/completions/",
                "{raw} -> {got}"
            );
        }
        assert_eq!(
            canonical("/v1/chat/completions/.").unwrap(),
            "/v1/chat/completions/"
        );
        assert_eq!(
            canonical("/v1/chat/completions//").unwrap(),
            "/v1/chat/completions/"
        );
    }

    #[test]
    fn escapes_that_are_not_unreserved_stay_escaped_in_upper_case() {
        assert_eq!(canonical("/v1/files/a%3ab").unwrap(), "/v1/files/a%3Ab");
        assert_eq!(canonical("/v1/files/%c3%a9").unwrap(), "/v1/files/%C3%A9");
    }

    #[test]
    fn paths_that_would_slip_past_the_route_are_refused() {
        for (raw, error) in [
            ("/v1/../../etc/passwd", PathError::ClimbsAbove),
            ("/anthropic/v1/../../v1/models", PathError::ClimbsAbove),
            ("/v1/..", PathError::ClimbsAbove),
            ("/v1/%2e%2e/stats", PathError::ClimbsAbove),
            ("/..", PathError::ClimbsAbove),
            ("/stats/../..", PathError::ClimbsAbove),
            ("/v1/chat%2Fcompletions", PathError::EncodedSeparator),
            ("/v1/chat%2fcompletions", PathError::EncodedSeparator),
            ("/v1/chat%5Ccompletions", PathError::EncodedSeparator),
            ("/v1/chat\\completions", PathError::EncodedSeparator),
            ("/v1/chat/completions%20", PathError::ControlCharacter),
            ("/v1/chat/completions%00", PathError::ControlCharacter),
            ("/v1/chat/completions%0a", PathError::ControlCharacter),
            ("/v1/chat/completions;x=1", PathError::Parameter),
            ("/v1/chat;/completions", PathError::Parameter),
            ("/v1/chat/completions%", PathError::MalformedEscape),
            ("/v1/chat/completions%2", PathError::MalformedEscape),
            ("/v1/chat/completions%zz", PathError::MalformedEscape),
        ] {
            assert_eq!(canonical(raw), Err(error), "{raw}");
        }
    }

    #[test]
    fn dot_segments_may_move_within_a_prefix_and_outside_every_prefix() {
        assert_eq!(canonical("/v1/models/../files").unwrap(), "/v1/files");
        assert_eq!(canonical("/stats/../healthz").unwrap(), "/healthz");
        assert_eq!(
            canonical("/anthropic/v1/x/../messages").unwrap(),
            "/anthropic/v1/messages"
        );
    }

    #[test]
    fn canonical_forms_are_canonical() {
        for raw in ["/v1//a/./b/../c/", "/x/%7e%41", "/a/b/..", "//"] {
            let once = canonical(raw).unwrap();
            assert_eq!(canonical(&once).unwrap(), once, "{raw}");
            assert!(is_canonical(&once), "{once}");
        }
    }
}
