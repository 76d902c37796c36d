//! W3C Trace Context: the client's `traceparent` (and `tracestate`), read so that our span is
//! its child; and fresh trace and span ids. Nothing is added to the forwarded request: the
//! client's own headers pass through unchanged.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::HeaderName;

/// `traceparent: 00-<trace id>-<parent span id>-<flags>`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`: vendors' entries, kept on our span as they came.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Longest `tracestate` kept (the spec's limit is 512 bytes).
const MAX_TRACESTATE: usize = 512;

/// The client's span our span is a child of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The trace's id.
    pub trace_id: [u8; 16],
    /// The client's span.
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate`, if any (and not too long).
    pub state: Option<String>,
}

impl Parent {
    /// The parent a request's headers name, if they carry a valid `traceparent`.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut parent = Self::parse(headers.get(TRACEPARENT)?.to_str().ok()?)?;
        parent.state = headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.len() <= MAX_TRACESTATE && !s.is_empty())
            .map(str::to_owned);
        Some(parent)
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (a later version may add fields after them); an
    /// all-zero id or version `ff` is invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let version = hex::<1>(version)?[0];
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id = hex::<16>(trace)?;
        let span_id = hex::<8>(span)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: hex::<1>(flags)?[0],
            state: None,
        })
    }
}

/// `N` bytes from exactly `2 * N` lower-case hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// A random non-zero 64-bit number: a counter hashed with a per-process random key.
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let seed = SEED.get_or_init(std::collections::hash_map::RandomState::new);
    let mut hasher = seed.build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish().max(1)
}

/// A fresh trace id.
pub fn trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&random().to_be_bytes());
    id[8..].copy_from_slice(&random().to_be_bytes());
    id
}

/// A fresh span id.
pub fn span_id() -> [u8; 8] {
    random().to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_names_the_parent() {
        let parent =
            Parent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parent.trace_id[0], 0x4b);
        assert_eq!(parent.trace_id[15], 0x36);
        assert_eq!(
            parent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(parent.flags, 1);
        // A later version may carry more.
        assert!(
            Parent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx").is_some()
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1é",
        ] {
            assert_eq!(Parent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fresh_ids_differ_and_are_never_zero() {
        let (a, b) = (trace_id(), trace_id());
        assert_ne!(a, b);
        assert_ne!(span_id(), [0; 8]);
    }
}
