//! The ledger's settings: where it lives and how it writes.

use std::path::PathBuf;
use std::time::Duration;

/// How the ledger writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding the database and its lock file.
    pub dir: PathBuf,
    /// Longest time a recorded row waits before it is committed.
    pub flush_interval: Duration,
    /// Rows kept in memory while the disk refuses them; past it the oldest are given up (and counted).
    pub max_pending_rows: usize,
}
