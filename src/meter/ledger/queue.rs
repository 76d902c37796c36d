//! The writer's queue as one byte buffer: rows are encoded into it on the request path (a copy
//! of about 150 bytes, no allocation) and decoded in place by the writer, so no per-row memory
//! is allocated on one thread and freed on another.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Row, from_micros, micros};
use crate::money::NanoUsd;
use crate::usage::Usage;

const ROW: u8 = 0;
const PERIOD: u8 = 1;

// A row's outcome bits. The first five are also the PostgreSQL ledger's `flags` column
// (migration 2), written from `outcome_bits`: never renumbered.
const STREAMING: u8 = 1;
const ERROR: u8 = 1 << 1;
const UNPRICED: u8 = 1 << 2;
const ESTIMATED: u8 = 1 << 3;
const PARTIAL: u8 = 1 << 4;
const HAS_LATENCY: u8 = 1 << 5;
const HAS_RESPONSE_ID: u8 = 1 << 6;

/// One decoded entry, borrowing its text from the buffer.
#[derive(Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "decoded one at a time on the writer's stack and never stored: boxing would allocate per row"
)]
pub(super) enum Entry<'a> {
    Row(Row<&'a str>),
    Period { id: u64, started: OffsetDateTime },
}

/// A row's outcome as bits: streamed, error, unpriced, estimated, partial.
pub(super) fn outcome_bits(row: &Row<&str>) -> u8 {
    [
        (row.is_streaming, STREAMING),
        (row.is_error, ERROR),
        (row.is_unpriced, UNPRICED),
        (row.is_estimated, ESTIMATED),
        (row.is_partial, PARTIAL),
    ]
    .iter()
    .fold(0u8, |acc, (on, bit)| if *on { acc | bit } else { acc })
}

/// A row's period and counts, in the order the queue and the PostgreSQL copy write them.
pub(super) fn counts(row: &Row<&str>) -> [u64; 8] {
    let u = &row.usage;
    [
        row.period,
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        row.cost.0,
    ]
}

/// Appends a row.
pub(super) fn push_row(buf: &mut Vec<u8>, row: &Row<&str>) {
    let flags = [
        (row.latency.is_some(), HAS_LATENCY),
        (row.response_id.is_some(), HAS_RESPONSE_ID),
    ]
    .iter()
    .fold(
        outcome_bits(row),
        |acc, (on, bit)| {
            if *on { acc | bit } else { acc }
        },
    );
    buf.push(ROW);
    buf.push(flags);
    buf.extend_from_slice(&row.status.to_le_bytes());
    buf.extend_from_slice(&micros(row.at).cast_unsigned().to_le_bytes());
    for n in counts(row) {
        buf.extend_from_slice(&n.to_le_bytes());
    }
    let latency = row
        .latency
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    buf.extend_from_slice(&latency.to_le_bytes());
    for text in [
        row.key_id,
        row.key_label,
        row.model,
        row.upstream,
        row.flavor,
        row.response_id.unwrap_or_default(),
        // Attribution: an empty text is none (an empty user, session or tag set is never kept).
        row.user.unwrap_or_default(),
        row.session.unwrap_or_default(),
        row.tags.unwrap_or_default(),
        row.service_tier.unwrap_or_default(),
        row.price.unwrap_or_default(),
    ] {
        push_text(buf, text);
    }
}

/// Appends the start of a period.
pub(super) fn push_period(buf: &mut Vec<u8>, id: u64, started: OffsetDateTime) {
    buf.push(PERIOD);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&micros(started).to_le_bytes());
}

/// Text longer than this is cut (at a character boundary); model names and ids are far shorter.
const MAX_TEXT: usize = u16::MAX as usize;

fn push_text(buf: &mut Vec<u8>, text: &str) {
    let end = crate::usage::floor_char_boundary(text, MAX_TEXT);
    buf.extend_from_slice(&(end as u16).to_le_bytes());
    buf.extend_from_slice(&text.as_bytes()[..end]);
}

/// Reads the entries back, in order.
pub(super) fn entries(buf: &[u8]) -> Entries<'_> {
    Entries { rest: buf }
}

/// Iterator over a buffer's entries; stops at the end (or at bytes it did not write).
pub(super) struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Entries<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        std::str::from_utf8(self.take(usize::from(len))?).ok()
    }

    fn row(&mut self) -> Option<Row<&'a str>> {
        let flags = *self.take(1)?.first()?;
        let status = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        let mut n = [0u64; 10];
        for slot in &mut n {
            *slot = self.u64()?;
        }
        let [
            at,
            period,
            input,
            cached,
            cache_write,
            cache_write_1h,
            output,
            reasoning,
            cost,
            latency,
        ] = n;
        let key_id = self.text()?;
        let key_label = self.text()?;
        let model = self.text()?;
        let upstream = self.text()?;
        let flavor = self.text()?;
        let response_id = self.text()?;
        let present = |text: &'a str| (!text.is_empty()).then_some(text);
        let user = present(self.text()?);
        let session = present(self.text()?);
        let tags = present(self.text()?);
        let service_tier = present(self.text()?);
        let price = present(self.text()?);
        let is = |bit: u8| flags & bit != 0;
        Some(Row {
            at: from_micros(at.cast_signed()),
            period,
            key_id,
            key_label,
            model,
            upstream,
            flavor,
            status,
            is_streaming: is(STREAMING),
            usage: Usage {
                input_tokens: input,
                cached_input_tokens: cached,
                cache_write_tokens: cache_write,
                cache_write_1h_tokens: cache_write_1h,
                output_tokens: output,
                reasoning_tokens: reasoning,
            },
            cost: NanoUsd(cost),
            latency: is(HAS_LATENCY).then(|| Duration::from_micros(latency)),
            response_id: is(HAS_RESPONSE_ID).then_some(response_id),
            is_error: is(ERROR),
            is_unpriced: is(UNPRICED),
            is_estimated: is(ESTIMATED),
            is_partial: is(PARTIAL),
            user,
            session,
            tags,
            service_tier,
            price,
        })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        match *self.take(1)?.first()? {
            ROW => self.row().map(Entry::Row),
            PERIOD => {
                let id = self.u64()?;
                let started = from_micros(self.u64()?.cast_signed());
                Some(Entry::Period { id, started })
            }
            _ => None,
        }
    }
}

/// Drops the first `n` rows of `buf`, keeping every period entry; returns how many were dropped.
pub(super) fn drop_oldest_rows(buf: &mut Vec<u8>, n: usize) -> usize {
    let mut kept = Vec::with_capacity(buf.len());
    let mut dropped = 0;
    for entry in entries(buf) {
        match entry {
            Entry::Row(_) if dropped < n => dropped += 1,
            Entry::Row(row) => push_row(&mut kept, &row),
            Entry::Period { id, started } => push_period(&mut kept, id, started),
        }
    }
    *buf = kept;
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, response_id: Option<&'static str>) -> Row<String> {
        Row {
            at: from_micros(1_764_000_000_123_456),
            period: 3,
            key_id: "0123456789abcdef".into(),
            key_label: "sk-…wxyz".into(),
            model: model.into(),
            upstream: "openrouter".into(),
            flavor: "openai_chat".into(),
            status: 499,
            is_streaming: true,
            usage: Usage {
                input_tokens: 1,
                cached_input_tokens: 2,
                cache_write_tokens: 3,
                cache_write_1h_tokens: 2,
                output_tokens: 4,
                reasoning_tokens: 5,
            },
            cost: NanoUsd(6),
            latency: response_id.map(|_| Duration::from_micros(789)),
            response_id: response_id.map(str::to_owned),
            is_error: false,
            is_unpriced: true,
            is_estimated: false,
            is_partial: true,
            user: response_id.map(|_| "alice".to_owned()),
            session: None,
            tags: response_id.map(|_| r#"{"team":"search"}"#.to_owned()),
            service_tier: response_id.map(|_| "priority".to_owned()),
            price: response_id.map(|_| "built-in 2025-11".to_owned()),
        }
    }

    #[test]
    fn rows_and_periods_come_back_as_they_went_in() {
        let a = row("gpt-4o", Some("chatcmpl-1"));
        let b = row("ünïcödé-model", None);
        let mut buf = Vec::new();
        push_row(&mut buf, &a.borrowed());
        push_period(&mut buf, 4, from_micros(1_764_000_001_000_000));
        push_row(&mut buf, &b.borrowed());
        let got: Vec<Entry<'_>> = entries(&buf).collect();
        assert_eq!(
            got,
            [
                Entry::Row(a.borrowed()),
                Entry::Period {
                    id: 4,
                    started: from_micros(1_764_000_001_000_000)
                },
                Entry::Row(b.borrowed()),
            ]
        );
    }

    #[test]
    fn dropping_the_oldest_rows_keeps_periods_and_order() {
        let mut buf = Vec::new();
        for model in ["a", "b"] {
            push_row(&mut buf, &row(model, None).borrowed());
        }
        push_period(&mut buf, 2, from_micros(0));
        push_row(&mut buf, &row("c", None).borrowed());
        assert_eq!(drop_oldest_rows(&mut buf, 2), 2);
        let got: Vec<Entry<'_>> = entries(&buf).collect();
        assert!(matches!(got[0], Entry::Period { id: 2, .. }));
        assert!(matches!(&got[1], Entry::Row(r) if r.model == "c"));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn overlong_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let mut buf = Vec::new();
        push_row(&mut buf, &row(&long, None).borrowed());
        let Some(Entry::Row(back)) = entries(&buf).next() else {
            panic!("no row");
        };
        assert!(back.model.len() <= MAX_TEXT);
        assert!(long.starts_with(back.model));
    }
}
