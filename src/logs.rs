//! Log output: the tracing subscriber, writing through a batching writer that never makes a request wait.
//!
//! Request handlers only append a formatted line to a buffer under a short lock. One thread
//! writes the buffer to stderr, woken when the buffer goes from empty to non-empty and then
//! gathering lines for a few milliseconds, so a busy proxy makes one `write` per batch instead
//! of a thread hand-off per line. If stderr stalls (a paused terminal, a full pipe), the buffer
//! stops growing at `BUFFER_CAP`, later lines are dropped, and the drop is reported once stderr
//! moves again: logging can lose lines, never slow the proxy down.

use std::io::{self, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

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
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    Ok(guard)
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
