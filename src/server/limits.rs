//! How many client connections one process may hold: derived from its file-descriptor limit,
//! which is raised to its hard ceiling at start, with room left for upstream sockets, the
//! ledger and the runtime.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Descriptors kept for everything but client and upstream sockets: the ledger's files, the
/// runtime's, the log writer's, the listeners.
const RESERVED_DESCRIPTORS: u64 = 64;
/// Most connections by default however high the limit: each one costs buffers too.
const MAX_DEFAULT_CONNECTIONS: u64 = 16_384;
/// Fewest connections by default, even under a tiny limit.
const MIN_DEFAULT_CONNECTIONS: u64 = 16;

/// Raises the soft file-descriptor limit to the hard one (`run` derives its default
/// `max_connections` from the limit in force then).
pub fn raise_descriptor_limit() {
    let raised = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .and_then(|(_, hard)| rlimit::increase_nofile_limit(hard));
    if let Err(err) = raised {
        tracing::debug!(%err, "could not raise the file-descriptor limit");
    }
}

/// The default `max_connections` under a soft descriptor limit of `descriptors`: every client
/// connection may need an upstream socket too, so half of what the reserve leaves.
pub fn default_max_connections(descriptors: Option<u64>) -> usize {
    let descriptors = descriptors.unwrap_or(1024);
    let connections = (descriptors.saturating_sub(RESERVED_DESCRIPTORS) / 2)
        .clamp(MIN_DEFAULT_CONNECTIONS, MAX_DEFAULT_CONNECTIONS);
    usize::try_from(connections).unwrap_or(usize::MAX)
}

/// The descriptor limit in force now (after any raise), if it can be read.
pub fn current_descriptor_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Counts connections refused past `max_connections` and warns at most once per interval.
#[derive(Debug)]
pub struct Refusals {
    since_warning: AtomicU64,
    last_warning: parking_lot::Mutex<Option<Instant>>,
    interval: Duration,
}

impl Refusals {
    /// Warns at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            since_warning: AtomicU64::new(0),
            last_warning: parking_lot::Mutex::new(None),
            interval,
        }
    }

    /// Counts one refusal; logs a warning with the count when the last one is old enough.
    pub fn refused(&self, max_connections: usize) {
        self.since_warning.fetch_add(1, Relaxed);
        let mut last = self.last_warning.lock();
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return;
        }
        *last = Some(now);
        drop(last);
        let refused = self.since_warning.swap(0, Relaxed);
        tracing::warn!(
            refused,
            max_connections,
            "connection limit reached: refusing new connections (raise max_connections, or the file-descriptor limit)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_room_for_upstream_sockets_and_the_reserve() {
        assert_eq!(default_max_connections(Some(1024)), 480);
        assert_eq!(default_max_connections(Some(1_048_576)), 16_384);
        assert_eq!(default_max_connections(Some(10)), 16);
        assert_eq!(default_max_connections(None), 480);
    }
}
