//! Retry delays for delivery to the control plane: exponential growth with
//! "equal jitter" (half fixed, half random), capped. Jitter spreads a fleet
//! whose CP just came back so thousands of agents do not retry in lockstep;
//! the fixed half keeps a single agent from hammering a struggling CP. The
//! randomness is an argument, so the schedule is testable and replayable.

use std::time::Duration;

/// First retry after a failed delivery.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Delivery backoff is capped at 60 s; an agent never waits
/// longer than a minute to learn that its CP is back.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Consecutive-failure counter and the delay that goes with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff::default()
    }

    /// Records a failure; returns how long to wait before the next try.
    /// `random` is any uniformly random u64.
    pub fn fail(&mut self, random: u64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let ceiling = MIN_RETRY_DELAY.saturating_mul(1u32 << exp).min(MAX_RETRY_DELAY);
        let half = ceiling / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if jitter_nanos == 0 { 0 } else { random % (jitter_nanos + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// A success resets the schedule.
    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_stay_within_jitter_bounds_and_cap_at_60s() {
        // Proves the schedule: ceiling doubles from 0.5 s, each delay lies in
        // [ceiling/2, ceiling], and never exceeds 60 s even after many failures.
        let mut b = Backoff::new();
        let mut ceiling = MIN_RETRY_DELAY;
        for attempt in 0..40u64 {
            let low = b.clone().fail(0);
            let high = b.clone().fail(u64::MAX);
            let mid = b.fail(attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            assert_eq!(low, ceiling / 2, "attempt {attempt}");
            assert!(high <= ceiling && mid >= low && mid <= ceiling, "attempt {attempt}: {mid:?}");
            assert!(mid <= MAX_RETRY_DELAY);
            ceiling = (ceiling * 2).min(MAX_RETRY_DELAY);
        }
        assert_eq!(b.clone().fail(0), MAX_RETRY_DELAY / 2);
        b.succeed();
        assert_eq!(b.fail(0), MIN_RETRY_DELAY / 2, "success resets");
    }
}
