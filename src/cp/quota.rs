//! Per-host ingest quotas: a token bucket per hostname for events and one
//! for heartbeats, checked in the routes before a request reaches the
//! writer, so one client cannot fill the event log or keep the writer busy
//! (one client stored 1.34 M events in 20 s). A request beyond its host's
//! quota is answered 429 `quota_exceeded` with `Retry-After`; the agent
//! keeps the events and retries with its back-off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::Hostname;

/// Events one host may send at once: a full queue flush after an outage of
/// a few hours (the agent sends at most `MAX_BATCH_EVENTS` per batch).
pub const EVENT_QUOTA_BURST: u32 = 5_000;
/// Events per second one host earns back: an agent emits a handful per
/// state change and one per probe status flip; 50/s is 180,000 an hour.
pub const EVENT_QUOTA_PER_SEC: u32 = 50;
/// Heartbeats one host may send at once (restarts, retries).
pub const HEARTBEAT_QUOTA_BURST: u32 = 10;
/// One heartbeat earned back every this many seconds (the shortest useful
/// heartbeat interval; the default is 60 s).
pub const HEARTBEAT_QUOTA_EVERY_SECS: u32 = 5;
/// Hostnames with a bucket at once: beyond it, buckets that are full again
/// (idle hosts) are dropped first; if none is, the request is refused. Bounds
/// the memory invented hostnames can cost (a fleet is ≤ 100,000 hosts).
pub const MAX_QUOTA_HOSTS: usize = 200_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One kind of quota for every host.
#[derive(Debug)]
pub struct HostQuotas {
    what: &'static str,
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<Hostname, Bucket>>,
}

/// A refused request: what, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct OverQuota {
    pub message: String,
    pub retry_after: Duration,
}

impl HostQuotas {
    pub fn new(what: &'static str, burst: u32, per_sec: f64) -> HostQuotas {
        HostQuotas { what, burst: f64::from(burst), per_sec, buckets: Mutex::default() }
    }

    pub fn events() -> HostQuotas {
        HostQuotas::new("events", EVENT_QUOTA_BURST, f64::from(EVENT_QUOTA_PER_SEC))
    }

    pub fn heartbeats() -> HostQuotas {
        HostQuotas::new("heartbeats", HEARTBEAT_QUOTA_BURST, 1.0 / f64::from(HEARTBEAT_QUOTA_EVERY_SECS))
    }

    fn refill(&self, bucket: &Bucket, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec;
        (bucket.tokens + earned).min(self.burst)
    }

    /// Takes `n` units of `host`'s quota at `now`, or says when to retry.
    pub fn take(&self, host: &Hostname, n: u32, now: Instant) -> Result<(), OverQuota> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(host) && buckets.len() >= MAX_QUOTA_HOSTS {
            buckets.retain(|_, b| self.refill(b, now) < self.burst);
            if buckets.len() >= MAX_QUOTA_HOSTS {
                return Err(OverQuota {
                    message: format!("{MAX_QUOTA_HOSTS} hosts are sending {} right now; retry later", self.what),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        let bucket = buckets.entry(host.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let tokens = self.refill(bucket, now);
        let wanted = f64::from(n);
        if wanted > tokens {
            // What is missing, earned back at the rate (a batch larger than
            // the burst waits for a full bucket and is then still refused,
            // but a batch is at most MAX_BATCH_EVENTS, far below the burst).
            let missing = wanted.min(self.burst) - tokens;
            let retry_after = Duration::from_secs_f64((missing / self.per_sec).max(0.0)).max(Duration::from_secs(1));
            return Err(OverQuota {
                message: format!(
                    "host {host} is over its quota of {} (burst {}, {} per second); retry in {} s",
                    self.what,
                    self.burst,
                    self.per_sec,
                    retry_after.as_secs()
                ),
                retry_after,
            });
        }
        *bucket = Bucket { tokens: tokens - wanted, at: now };
        Ok(())
    }

    /// Hosts with a bucket (for tests and metrics).
    pub fn n_hosts(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> Hostname {
        Hostname::parse(name).expect("hostname")
    }

    #[test]
    fn a_host_gets_its_burst_then_the_rate_and_other_hosts_are_untouched() {
        let q = HostQuotas::new("events", 10, 2.0);
        let t0 = Instant::now();
        assert!(q.take(&host("web-1"), 10, t0).is_ok());
        let refused = q.take(&host("web-1"), 1, t0).expect_err("over the burst");
        assert!(refused.message.contains("web-1"), "{}", refused.message);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert!(q.take(&host("web-2"), 10, t0).is_ok(), "another host has its own bucket");
        assert!(q.take(&host("web-1"), 2, t0 + Duration::from_secs(1)).is_ok(), "2 per second earned back");
        assert!(q.take(&host("web-1"), 1, t0 + Duration::from_secs(1)).is_err());
        let refused = q.take(&host("web-1"), 8, t0 + Duration::from_secs(1)).expect_err("far over");
        assert_eq!(refused.retry_after, Duration::from_secs(4));
    }

    #[test]
    fn invented_hostnames_cannot_grow_the_map_beyond_its_bound() {
        let q = HostQuotas::new("heartbeats", 2, 1.0);
        let t0 = Instant::now();
        for i in 0..MAX_QUOTA_HOSTS {
            q.take(&host(&format!("h{i}")), 1, t0).expect("room");
        }
        assert_eq!(q.n_hosts(), MAX_QUOTA_HOSTS);
        assert!(q.take(&host("one-more"), 1, t0).is_err(), "no idle bucket to drop: refused");
        // Later every bucket is full again: they are dropped to make room.
        assert!(q.take(&host("one-more"), 1, t0 + Duration::from_secs(5)).is_ok());
        assert_eq!(q.n_hosts(), 1);
    }
}
