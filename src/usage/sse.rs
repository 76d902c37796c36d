//! Incremental server-sent-events framer: splits a byte stream into whole events, whatever the chunking.
//!
//! An event ends at a blank line (`\n\n` or `\r\n\r\n`). Each byte is scanned once; events that
//! lie inside one incoming chunk are handed out as zero-copy slices of it, and only an event
//! split across chunks is copied, once, into the carry buffer.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// Largest event held back while waiting for its end; past it, framing gives up on the stream.
pub const DEFAULT_EVENT_CAP: usize = 16 * 1024 * 1024;

/// Splits SSE bytes into events; partial input is a normal state, not an error.
#[derive(Debug)]
pub struct Framer {
    /// Bytes of the event in progress.
    partial: BytesMut,
    /// Where the current line starts inside `partial`.
    line_start: usize,
    cap: usize,
}

/// The event in progress grew past the cap: the caller takes it with `take_rest` and stops framing.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl Framer {
    /// A framer that holds at most `cap` bytes of one unfinished event.
    pub fn new(cap: usize) -> Self {
        Self {
            partial: BytesMut::new(),
            line_start: 0,
            cap,
        }
    }

    /// Feeds one chunk, calling `on_event` with every event it completes (blank line included).
    pub fn feed(&mut self, chunk: &Bytes, mut on_event: impl FnMut(Bytes)) -> Result<(), Overflow> {
        if self.partial.is_empty() {
            self.feed_fresh(chunk, &mut on_event);
        } else {
            self.feed_carried(chunk, &mut on_event);
        }
        if self.partial.len() > self.cap {
            return Err(Overflow);
        }
        Ok(())
    }

    /// Nothing carried over: frame the chunk in place and keep only its unfinished tail.
    fn feed_fresh(&mut self, chunk: &Bytes, on_event: &mut impl FnMut(Bytes)) {
        let mut event_start = 0;
        let mut line_start = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            if is_blank(&chunk[line_start..nl]) {
                on_event(chunk.slice(event_start..=nl));
                event_start = nl + 1;
            }
            line_start = nl + 1;
        }
        if event_start < chunk.len() {
            self.partial.extend_from_slice(&chunk[event_start..]);
            self.line_start = line_start - event_start;
        }
    }

    /// An event is in progress: append, then scan only the new bytes.
    fn feed_carried(&mut self, chunk: &Bytes, on_event: &mut impl FnMut(Bytes)) {
        let mut pos = self.partial.len();
        self.partial.extend_from_slice(chunk);
        let mut line_start = self.line_start;
        while let Some(offset) = memchr::memchr(b'\n', &self.partial[pos..]) {
            let nl = pos + offset;
            if is_blank(&self.partial[line_start..nl]) {
                on_event(self.partial.split_to(nl + 1).freeze());
                pos = 0;
                line_start = 0;
            } else {
                pos = nl + 1;
                line_start = pos;
            }
        }
        self.line_start = line_start;
    }

    /// Takes the bytes of an unfinished event (at end of stream, or after an overflow).
    pub fn take_rest(&mut self) -> Bytes {
        self.line_start = 0;
        self.partial.split().freeze()
    }

    /// True when no unfinished event is held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.is_empty() || line == b"\r"
}

/// Frames `chunks` (copied into `Bytes`) and hands every whole event to `on_event`: the test
/// driver of every stream extractor.
#[cfg(test)]
pub fn frame_all(chunks: &[&[u8]], mut on_event: impl FnMut(&[u8])) {
    let mut framer = Framer::new(DEFAULT_EVENT_CAP);
    for chunk in chunks {
        framer
            .feed(&Bytes::copy_from_slice(chunk), |event| on_event(&event))
            .expect("test events are small");
    }
}

/// The event's data: its `data:` lines' values joined by `\n`, or `None` when it has none.
pub fn data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut found: Option<Cow<'_, [u8]>> = None;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', event).chain(std::iter::once(event.len())) {
        let line = &event[start..end];
        start = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(rest) = line.strip_prefix(b"data") else {
            continue;
        };
        let value = match rest.split_first() {
            None => &[][..],
            Some((b':', value)) => value.strip_prefix(b" ").unwrap_or(value),
            Some(_) => continue,
        };
        found = Some(match found {
            None => Cow::Borrowed(value),
            Some(previous) => {
                let mut joined = previous.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const STREAM: &[u8] = b"data: {\"a\":1}\n\n: keep-alive comment\n\nevent: x\r\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";

    fn frame_all(chunks: &[&[u8]]) -> (Vec<Bytes>, Bytes) {
        let mut framer = Framer::new(DEFAULT_EVENT_CAP);
        let mut events = Vec::new();
        for chunk in chunks {
            framer
                .feed(&Bytes::copy_from_slice(chunk), |e| events.push(e))
                .unwrap();
        }
        (events, framer.take_rest())
    }

    #[test]
    fn whole_stream_in_one_chunk_gives_every_event() {
        let (events, rest) = frame_all(&[STREAM]);
        assert_eq!(events.len(), 4);
        assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
        assert_eq!(&events[3][..], b"data: [DONE]\n\n");
        assert!(rest.is_empty());
        assert_eq!(events.concat(), STREAM);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let (expected, _) = frame_all(&[STREAM]);
        for i in 0..=STREAM.len() {
            let (events, rest) = frame_all(&[&STREAM[..i], &STREAM[i..]]);
            assert_eq!(events, expected, "split at {i}");
            assert!(rest.is_empty());
        }
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let (events, _) = frame_all(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(events, expected, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn byte_at_a_time_gives_the_same_events() {
        let (expected, _) = frame_all(&[STREAM]);
        let chunks: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(frame_all(&chunks).0, expected);
    }

    #[test]
    fn unfinished_event_is_returned_at_the_end() {
        let (events, rest) = frame_all(&[b"data: 1\n\ndata: 2\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(&rest[..], b"data: 2\n");
    }

    #[test]
    fn an_event_over_the_cap_overflows() {
        let mut framer = Framer::new(8);
        assert_eq!(
            framer.feed(&Bytes::from_static(b"data: 0123456789"), |_| {}),
            Err(Overflow)
        );
        assert_eq!(&framer.take_rest()[..], b"data: 0123456789");
        assert!(framer.is_empty());
    }

    /// Streams drawn mostly from the bytes that matter to framing, so that blank lines (plain
    /// and `\r\n`) are common, with any other byte now and then.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => Just(b'\n'),
            2 => Just(b'\r'),
            3 => prop::sample::select(b"data: {}x".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..200)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn events_are_the_same_whatever_the_split_points(
            stream in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let (expected, expected_rest) = frame_all(&[&stream]);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in at {
                chunks.push(&stream[start..cut]);
                start = cut;
            }
            chunks.push(&stream[start..]);
            let (events, rest) = frame_all(&chunks);
            prop_assert_eq!(&events, &expected);
            prop_assert_eq!(&rest, &expected_rest);
            // Nothing lost, nothing added.
            let mut all = events.concat();
            all.extend_from_slice(&rest);
            prop_assert_eq!(all, stream);
        }
    }

    #[test]
    fn data_joins_lines_and_ignores_other_fields() {
        assert_eq!(
            data(b"data: {\"a\":1}\n\n").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(data(b"data:x\n\n").as_deref(), Some(&b"x"[..]));
        assert_eq!(
            data(b"event: x\r\ndata: two\r\ndata: lines\r\n\r\n").as_deref(),
            Some(&b"two\nlines"[..])
        );
        assert_eq!(data(b": comment\n\n"), None);
        assert_eq!(data(b"database: no\n\n"), None);
    }
}
