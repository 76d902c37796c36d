//! The SSE framer: never panics, loses no byte, and gives the same events however the stream
//! is cut into chunks (the same as feeding it whole, and as the reference rule).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use llm_meter::usage::sse::{self, DEFAULT_EVENT_CAP};
use llm_meter_fuzz::{chunks, cuts_and_payload, frame, reference_events};

fuzz_target!(|data: &[u8]| {
    let (cuts, payload) = cuts_and_payload(data);
    let pieces = chunks(payload, &cuts);

    // No cap in reach: the events are the reference ones, whatever the chunking.
    let whole = frame(&[Bytes::copy_from_slice(payload)], DEFAULT_EVENT_CAP);
    let split = frame(&pieces, DEFAULT_EVENT_CAP);
    let (expected, expected_rest) = reference_events(payload);
    assert!(!whole.overflowed && !split.overflowed);
    assert_eq!(
        whole.events, expected,
        "whole feed differs from the reference"
    );
    assert_eq!(whole.rest, expected_rest, "whole feed keeps another rest");
    assert_eq!(
        split, whole,
        "the chunking changed the events (cuts {cuts:?})"
    );

    for event in &split.events {
        let _ = sse::data(event);
    }
    let _ = sse::data(&split.rest);

    // A small cap (from the first byte's high nibble): framing may stop early, but what it gave
    // before stopping is a prefix of the reference events and, with the rest, every byte fed.
    let cap = usize::from(data.first().map_or(0, |b| b >> 4)) * 3;
    let capped = frame(&pieces, cap);
    assert!(capped.events.len() <= expected.len());
    assert_eq!(capped.events, expected[..capped.events.len()]);
    let mut seen = capped.events.concat();
    seen.extend_from_slice(&capped.rest);
    assert_eq!(seen, &payload[..capped.fed], "bytes were lost or added");
    if capped.overflowed {
        assert!(capped.rest.len() > cap, "overflow reported under the cap");
    } else {
        assert_eq!(capped.events, expected);
    }
});
