//! Log output: the tracing subscriber, writing through a batching writer that never makes a request wait.
//!
//! Request handlers only append a formatted line to a buffer under a short lock. One thread
//! writes the buffer to stderr, woken when the buffer goes from empty to non-empty and then
//! gathering lines for a few milliseconds, so a busy proxy makes one `write` per batch instead
//! of a thread hand-off per line. If stderr stalls (a paused terminal, a full pipe), the buffer
//! stops growing at `BUFFER_CAP`, later lines are dropped, and the drop is reported once stderr
//! moves again: logging can lose lines, never slow the proxy down.
//!
//! The text format writes the same lines as tracing-subscriber's own, but formats the fields
//! and the timestamp directly instead of through `core::fmt`, which took a large share of the
//! proxy's instructions per request (see docs/performance.md).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Most log bytes held while stderr is not keeping up.
const BUFFER_CAP: usize = 4 * 1024 * 1024;
/// How long the writer gathers lines after the first one arrives.
const GATHER: Duration = Duration::from_millis(5);

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    dropped_lines: u64,
    is_closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The `MakeWriter` handed to the subscriber.
#[derive(Clone, Default)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes every buffered line and stops the writer thread when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.state.lock();
        if state.buffer.len() + line.len() > BUFFER_CAP {
            state.dropped_lines += 1;
            return Ok(line.len());
        }
        let was_empty = state.buffer.is_empty();
        state.buffer.extend_from_slice(line);
        drop(state);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl BatchWriter {
    /// Starts the writer thread; lines go to `out`.
    pub fn spawn(out: impl Write + Send + 'static) -> io::Result<(Self, Guard)> {
        let writer = Self::default();
        let shared = Arc::clone(&writer.shared);
        let thread = std::thread::Builder::new()
            .name("llm-meter-logs".into())
            .spawn(move || drain(&shared, out))?;
        let guard = Guard {
            shared: Arc::clone(&writer.shared),
            thread: Some(thread),
        };
        Ok((writer, guard))
    }
}

fn drain(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.state.lock();
        while state.buffer.is_empty() && !state.is_closed {
            shared.wake.wait(&mut state);
        }
        if state.buffer.is_empty() && state.is_closed {
            return;
        }
        if !state.is_closed {
            // Let more lines join this batch.
            drop(state);
            std::thread::sleep(GATHER);
            state = shared.state.lock();
        }
        std::mem::swap(&mut batch, &mut state.buffer);
        let dropped = std::mem::take(&mut state.dropped_lines);
        drop(state);
        // Nothing to do if stderr is gone; the proxy goes on.
        let _ = out.write_all(&batch);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "llm-meter: {dropped} log lines dropped while the log output was blocked"
            );
        }
        let _ = out.flush();
        batch.clear();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.state.lock().is_closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), text or JSON lines on stderr.
pub fn init(format: LogFormat) -> io::Result<Guard> {
    let (writer, guard) = BatchWriter::spawn(io::stderr())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .event_format(PlainJson(tracing_subscriber::fmt::format().json()))
            .init(),
        LogFormat::Text => builder
            .with_ansi(false)
            .with_timer(UtcMicros)
            .fmt_fields(TextFields)
            .init(),
    }
    Ok(guard)
}

/// Text fields as tracing-subscriber writes them (`message` bare, then `name=value`, strings
/// quoted), but numbers, booleans and plain strings are written without `core::fmt`; floats
/// as short plain decimals (`0.25`, `0.00000795`, where `Debug` wrote `7.95e-6`).
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        // The fields are gathered in a plain `String` and handed to the writer in one piece:
        // every write through `Writer` is a dynamic call, and a line has about fifty.
        FIELDS.with(|cell| {
            let mut reused = cell.try_borrow_mut();
            // A `Debug` impl that logs while its value is written: that line gets its own buffer.
            let mut own = String::new();
            let text = match &mut reused {
                Ok(reused) => {
                    reused.clear();
                    &mut **reused
                }
                Err(_) => &mut own,
            };
            format_into(text, &fields)?;
            writer.write_str(text)
        })
    }
}

thread_local! {
    /// The fields of the line being written on this thread, kept to reuse its capacity.
    static FIELDS: RefCell<String> = const { RefCell::new(String::new()) };
}

fn format_into<R: RecordFields>(text: &mut String, fields: &R) -> fmt::Result {
    let mut visitor = TextVisitor {
        text,
        is_empty: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

struct TextVisitor<'a> {
    text: &'a mut String,
    is_empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Starts a field: the separating space, then `name=` (nothing for the message). `false`
    /// for fields not to write: `log.*` metadata, already shown by the formatter.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.is_empty) {
            self.text.push(' ');
        }
        if name != "message" {
            self.text.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.text.push('=');
        }
        true
    }

    fn write(&mut self, field: &Field, text: &str) {
        if self.start(field) {
            self.text.push_str(text);
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            if self.start(field) {
                plain_decimal(value, self.text);
            }
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let is_plain = || {
            value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        };
        if field.name() == "message" {
            self.write(field, value);
        } else if is_plain() {
            if self.start(field) {
                self.text.push('"');
                self.text.push_str(value);
                self.text.push('"');
            }
        } else {
            // Anything to escape: `Debug`, exactly as tracing-subscriber quotes it.
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = write!(self.text, "{value:?}");
        }
    }
}

/// Appends a finite float as a plain decimal: the shortest digits that read back as `value`,
/// never in exponent form (`0.00000795`, a cost that zmij and serde_json write `7.95e-6`).
fn plain_decimal(value: f64, out: &mut String) {
    let mut buffer = zmij::Buffer::new();
    let short = buffer.format_finite(value);
    if !short.contains('e') {
        out.push_str(short);
        return;
    }
    // `Display` writes the same shortest digits in place; only very small or very large values
    // get here, so going through `core::fmt` costs nothing that matters.
    let start = out.len();
    let _ = write!(out, "{value}");
    if !out[start..].contains('.') {
        out.push_str(".0");
    }
}

/// tracing-subscriber's JSON lines, with numbers in exponent form written as plain decimals:
/// its fields go through serde_json, which writes a cost of `0.00000795` as `7.95e-6`.
struct PlainJson<E>(E);

impl<S, N, E> FormatEvent<S, N> for PlainJson<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&plain_numbers(&line))
    }
}

/// `json` with every number outside its strings that is in exponent form written as a plain
/// decimal; the same text when there is none.
fn plain_numbers(json: &str) -> Cow<'_, str> {
    let bytes = json.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'-' | b'0'..=b'9' if !in_string => {
                let end = bytes[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(bytes.len(), |len| i + len);
                let number = &json[i..end];
                if number.contains(['e', 'E'])
                    && let Ok(value) = number.parse::<f64>()
                    && value.is_finite()
                {
                    out.push_str(&json[copied..i]);
                    plain_decimal(value, &mut out);
                    copied = end;
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if copied == 0 {
        return Cow::Borrowed(json);
    }
    out.push_str(&json[copied..]);
    Cow::Owned(out)
}

/// UTC timestamps with microseconds (`2026-12-01T16:50:23.529035Z`), the date and time of day
/// formatted once per second per thread.
pub struct UtcMicros;

thread_local! {
    /// The second last formatted on this thread, and its text up to the seconds.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let second = since_epoch.as_secs();
        let (cached, mut text) = SECOND.get();
        if cached != second {
            text = date_time(second);
            SECOND.set((second, text));
        }
        // Digits and separators only: always UTF-8.
        w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
        let mut fraction = *b".000000Z";
        let mut micros = since_epoch.subsec_micros();
        for digit in fraction[1..7].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&fraction).map_err(|_| fmt::Error)?)
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second (the epoch's for a time `time` cannot show).
fn date_time(second: u64) -> [u8; 19] {
    let mut text = *b"1970-01-01T00:00:00";
    let formatted = i64::try_from(second)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|at| at.format(&Rfc3339).ok());
    // A whole second is written without a fraction: `2026-12-01T16:50:23Z`.
    if let Some(prefix) = formatted.as_ref().and_then(|f| f.as_bytes().get(..19)) {
        text.copy_from_slice(prefix);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that appends to shared bytes, so the test can read what was written.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The text line `event` writes through a subscriber whose fields are formatted by `fields`.
    fn text_line<F>(fields: F, event: impl FnOnce()) -> String
    where
        F: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        String::from_utf8(sink.0.lock().clone()).unwrap()
    }

    #[test]
    fn text_fields_are_written_as_tracing_subscriber_writes_them() {
        let event = || {
            tracing::info!(
                plain = "gpt-4o",
                escaped = "a \"b\" \\ c\n",
                unicode = "naïve",
                n = 42u64,
                negative = -7i64,
                yes = true,
                shown = %"display",
                debugged = ?Some(1),
                r#type = "t",
                "message {}",
                5
            );
        };
        let ours = text_line(TextFields, event);
        let theirs = text_line(tracing_subscriber::fmt::format::DefaultFields::new(), event);
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#"message 5 plain="gpt-4o" escaped="a \"b\" \\ c\n""#),
            "{ours}"
        );
    }

    #[test]
    fn text_floats_are_written_as_short_decimals() {
        let line = text_line(TextFields, || {
            tracing::info!(
                cost_usd = 2.115e-5,
                small = 7.95e-6,
                ms = 0.25,
                whole = 3.0,
                large = 1e21,
                nan = f64::NAN,
                "request"
            );
        });
        assert!(
            line.ends_with(
                "request cost_usd=0.00002115 small=0.00000795 ms=0.25 whole=3.0 \
                 large=1000000000000000000000.0 nan=NaN\n"
            ),
            "{line}"
        );
    }

    #[test]
    fn json_numbers_in_exponent_form_become_plain_decimals_outside_strings() {
        let line = r#"{"a":7.95e-6,"b":[-2.5E-7,1e21,12,0.5],"s":"7.95e-6 \" 1e-9","t":true}"#;
        assert_eq!(
            plain_numbers(line),
            r#"{"a":0.00000795,"b":[-0.00000025,1000000000000000000000.0,12,0.5],"s":"7.95e-6 \" 1e-9","t":true}"#
        );
        let plain = r#"{"a":0.25,"s":"1e-9"}"#;
        assert!(matches!(plain_numbers(plain), Cow::Borrowed(_)));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        assert_eq!(&date_time(0), b"1970-01-01T00:00:00");
        assert_eq!(&date_time(1_764_607_823), b"2025-12-01T16:50:23");
        assert_eq!(&date_time(951_868_799), b"2000-02-29T23:59:59");
        let mut text = String::new();
        let before = time::OffsetDateTime::now_utc();
        UtcMicros.format_time(&mut Writer::new(&mut text)).unwrap();
        UtcMicros.format_time(&mut Writer::new(&mut text)).unwrap();
        let (first, second) = text.split_at(text.len() / 2);
        for stamp in [first, second] {
            assert_eq!(stamp.len(), "2026-12-01T16:50:23.529035Z".len(), "{stamp}");
            let at =
                time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                    .unwrap();
            assert!((at - before).abs() < time::Duration::seconds(2), "{stamp}");
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_drops() {
        let sink = Sink::default();
        let (writer, guard) = BatchWriter::spawn(sink.clone()).unwrap();
        std::thread::scope(|s| {
            for t in 0..2 {
                let writer = &writer;
                s.spawn(move || {
                    for i in 0..1000 {
                        let mut w = writer.make_writer();
                        w.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let text = String::from_utf8(sink.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..2 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..1000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_growing_and_says_so() {
        let writer = BatchWriter::default();
        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..6 {
            (&writer).write_all(&line).unwrap();
        }
        let state = writer.shared.state.lock();
        assert!(state.buffer.len() <= BUFFER_CAP);
        assert_eq!(state.dropped_lines, 2);
    }
}
