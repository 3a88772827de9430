//! The stores' clock: the system's, or, for tests and simulation (feature `test-clock`), the
//! system's moved ahead by a shift that the test advances, so that a lease, a retention or a
//! window can pass in one step, without sleeping.
//!
//! The embedded store reads it directly. On Redis the store's function reads the server's
//! `TIME`; a store with a test clock loads a library of its own that adds the shift each call
//! carries, and [`RedisStore::advance_clock`](crate::RedisStore::advance_clock) shortens the
//! keys' expiries by as much. The store's own library has no way to be shifted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock in Unix milliseconds.
pub(crate) fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A store's clock: the system's, or a test clock's shift ahead of it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Clock {
    shift_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// A clock that the test moves (see [`Clock::advance`]).
    #[cfg(feature = "test-clock")]
    pub(crate) fn test() -> Self {
        Self {
            shift_ms: Some(Arc::default()),
        }
    }

    /// Whether this is a test clock.
    pub(crate) fn is_test(&self) -> bool {
        self.shift_ms.is_some()
    }

    /// How far this clock is ahead of the system's, in milliseconds.
    pub(crate) fn shift_ms(&self) -> u64 {
        self.shift_ms
            .as_ref()
            .map_or(0, |s| s.load(Ordering::SeqCst))
    }

    /// Now, in Unix milliseconds.
    pub(crate) fn now_ms(&self) -> u64 {
        system_ms() + self.shift_ms()
    }

    /// Moves a test clock ahead; a system clock cannot be moved.
    #[cfg(feature = "test-clock")]
    pub(crate) fn advance(&self, by: std::time::Duration) {
        if let Some(shift) = &self.shift_ms {
            shift.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }
}
