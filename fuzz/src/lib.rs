//! What the fuzz targets share: cutting an input into chunks, and a reference SSE framer.

use bytes::Bytes;
use llm_meter::usage::sse::{self, Framer};

/// Most cut points an input may ask for: enough to reach every interesting chunking.
const MAX_CUTS: usize = 15;

/// Reads the cut points an input asks for and the payload that follows them.
///
/// The first byte's low nibble is the number of cut points; each is a little-endian `u16`,
/// taken modulo `payload.len() + 1`. The rest of the input is the payload. Cut points are
/// sorted but not deduplicated, so empty chunks happen too.
pub fn cuts_and_payload(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let count = usize::from(first & 0x0f).min(MAX_CUTS);
    let control = (count * 2).min(rest.len());
    let (control, payload) = rest.split_at(control);
    let mut cuts: Vec<usize> = control
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])) % (payload.len() + 1))
        .collect();
    cuts.sort_unstable();
    (cuts, payload)
}

/// The payload as chunks cut at `cuts` (sorted offsets into it).
pub fn chunks(payload: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        out.push(Bytes::copy_from_slice(&payload[start..cut]));
        start = cut;
    }
    out.push(Bytes::copy_from_slice(&payload[start..]));
    out
}

/// What framing a stream gave: its events, the bytes held at the end, and whether it overflowed.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    /// Every whole event, blank line included.
    pub events: Vec<Bytes>,
    /// The unfinished event at the end (or at the overflow).
    pub rest: Bytes,
    /// How many payload bytes were fed before framing stopped.
    pub fed: usize,
    /// The framer reported an overflow (and framing stopped there).
    pub overflowed: bool,
}

/// Feeds `chunks` to a framer holding at most `cap` bytes, stopping at the first overflow as
/// the proxy's tap does.
pub fn frame(chunks: &[Bytes], cap: usize) -> Framed {
    let mut framer = Framer::new(cap);
    let mut events = Vec::new();
    let mut fed = 0;
    let mut overflowed = false;
    for chunk in chunks {
        fed += chunk.len();
        if framer.feed(chunk, |event| events.push(event)).is_err() {
            overflowed = true;
            break;
        }
    }
    Framed {
        events,
        rest: framer.take_rest(),
        fed,
        overflowed,
    }
}

/// The SSE rule written plainly, as the oracle: an event ends with the first blank line (a
/// line that is empty or only `\r`); what follows the last one is the unfinished rest.
pub fn reference_events(payload: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut event_start = 0;
    let mut line_start = 0;
    for (at, &byte) in payload.iter().enumerate() {
        if byte != b'\n' {
            continue;
        }
        let line = &payload[line_start..at];
        if line.is_empty() || line == b"\r" {
            events.push(&payload[event_start..=at]);
            event_start = at + 1;
        }
        line_start = at + 1;
    }
    (events, &payload[event_start..])
}

/// The payload's events (whole framing, no cap), and the unfinished rest if any: what the
/// proxy hands a stream extractor.
pub fn whole_events(payload: &[u8]) -> Vec<Bytes> {
    let framed = frame(&[Bytes::copy_from_slice(payload)], sse::DEFAULT_EVENT_CAP);
    let mut events = framed.events;
    if !framed.rest.is_empty() {
        events.push(framed.rest);
    }
    events
}
