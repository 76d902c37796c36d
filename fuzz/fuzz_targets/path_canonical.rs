//! Path canonicalization: never panics; a canonical form is canonical (canonicalizing it again
//! gives itself), starts with `/`, has no empty (but a trailing one), `.` or `..` segment, and
//! no encoded separator.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use llm_meter::path::canonicalize;

/// The built-in upstream prefixes, and one declared upstream's.
const PREFIXES: [&str; 3] = ["/v1", "/anthropic/v1", "/gemini/v1beta"];

fn check(raw: &str, prefixes: &[&str]) {
    let Ok(canonical) = canonicalize(raw, &prefixes.iter().copied()) else {
        return;
    };
    if !raw.starts_with('/') {
        // `*` and other non-paths are passed over as they are.
        assert!(matches!(canonical, Cow::Borrowed(_)) && canonical == raw);
        return;
    }
    assert!(canonical.starts_with('/'), "{raw:?} -> {canonical:?}");
    let segments: Vec<&str> = canonical[1..].split('/').collect();
    for (at, segment) in segments.iter().enumerate() {
        let is_last = at + 1 == segments.len();
        assert!(
            (is_last || !segment.is_empty()) && *segment != "." && *segment != "..",
            "{raw:?} -> {canonical:?}: segment {segment:?}"
        );
    }
    let upper = canonical.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C"),
        "{raw:?} -> {canonical:?} keeps an encoded separator"
    );
    let again = canonicalize(&canonical, &prefixes.iter().copied())
        .unwrap_or_else(|e| panic!("{raw:?} -> {canonical:?} is refused the second time: {e}"));
    assert_eq!(again, canonical, "{raw:?}: not idempotent");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // An optional first line names one more prefix, so `..` meets prefixes of every shape.
    let (extra, raw) = match text.split_once('\n') {
        Some((prefix, raw)) => (Some(prefix), raw),
        None => (None, &*text),
    };
    let mut prefixes = PREFIXES.to_vec();
    check(raw, &prefixes);
    if let Some(prefix) = extra {
        prefixes.push(prefix);
        check(raw, &prefixes);
    }
});
