//! The only module that reads the wall clock. Everything else receives a
//! [`ClockHandle`] or a timestamp, so tests drive time by hand and `replay`
//! re-runs history exactly (TigerBeetle-style injected time). `clippy.toml`
//! forbids `SystemTime::now` / `OffsetDateTime::now_utc` elsewhere.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

/// A source of "now". Cheap to clone; clones of a manual clock share time.
#[derive(Debug, Clone)]
pub struct ClockHandle {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    System,
    Manual(Arc<Mutex<OffsetDateTime>>),
}

impl ClockHandle {
    /// The real wall clock (UTC).
    pub fn system() -> ClockHandle {
        ClockHandle { source: Source::System }
    }

    /// A clock that only moves when told to; for tests and replays.
    pub fn manual(start: OffsetDateTime) -> ClockHandle {
        ClockHandle { source: Source::Manual(Arc::new(Mutex::new(start))) }
    }

    /// The current instant in UTC.
    pub fn now(&self) -> OffsetDateTime {
        match &self.source {
            #[allow(clippy::disallowed_methods)] // this is the one allowed reader
            Source::System => OffsetDateTime::now_utc(),
            Source::Manual(t) => *lock(t),
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock (real time
    /// cannot be pushed, and silently ignoring keeps call sites simple in
    /// code shared by tests and production).
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(t) = &self.source {
            let mut guard = lock(t);
            *guard += by;
        }
    }

    /// Sets a manual clock to an instant; a no-op on the system clock.
    pub fn set(&self, to: OffsetDateTime) {
        if let Source::Manual(t) = &self.source {
            *lock(t) = to;
        }
    }
}

fn lock(t: &Mutex<OffsetDateTime>) -> std::sync::MutexGuard<'_, OffsetDateTime> {
    // A poisoned lock only means a panicking test thread held it; the value
    // (a plain instant) is still valid.
    t.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn manual_clock_moves_only_when_told_and_is_shared_by_clones() {
        let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let other = clock.clone();
        assert_eq!(clock.now(), datetime!(2026-11-25 12:00 UTC));
        other.advance(Duration::seconds(90));
        assert_eq!(clock.now(), datetime!(2026-11-25 12:01:30 UTC));
        clock.set(datetime!(2027-01-01 0:00 UTC));
        assert_eq!(other.now(), datetime!(2027-01-01 0:00 UTC));
    }

    #[test]
    fn system_clock_is_utc_and_not_moved_by_advance() {
        let clock = ClockHandle::system();
        let before = clock.now();
        clock.advance(Duration::days(365));
        assert!(clock.now() - before < Duration::days(1));
        assert_eq!(before.offset(), time::UtcOffset::UTC);
    }
}
