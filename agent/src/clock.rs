//! Wall-clock milliseconds for leases, TTLs and deadlines: monotonic within
//! a run, comparable across restarts (they are persisted), and movable by
//! tests with [`Clock::advance`] instead of sleeping. (`tokio::time::pause`
//! does not fit here: it auto-advances while SQLite works on its own thread.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct Clock {
    base_ms: u64,
    base: Instant,
    skew_ms: Arc<AtomicU64>,
}

impl Clock {
    pub fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            base_ms,
            base: Instant::now(),
            skew_ms: Arc::default(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64 + self.skew_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock forward (tests).
    pub fn advance(&self, ms: u64) {
        self.skew_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub use payload_proto::domain::{millis, timestamp};
