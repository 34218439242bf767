//! `GET /metrics` in the Prometheus text format (`docs/protocol.md` §4): counters the
//! writer bumps after each commit, latency histograms (commit, event
//! ingest, long-poll answers), the long-poll board's gauges, build info, and
//! rollout/host figures counted in SQL (`store::fleet`: a scrape reads a few
//! rows per rollout, whatever the size of the fleet). `docs/manual.md`
//! ("Metrics") lists every metric.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use time::OffsetDateTime;

pub use super::histogram::{Histogram, LATENCY_BUCKETS_SECS};
use super::longpoll::Board;
use super::planner::RolloutState;
use super::store::{self, Counters, StoreError};
use crate::machine::HostState;
use crate::wire::PROTOCOL_VERSION;

/// Latencies the request handlers measure (the writer's commit latency is
/// in [`Counters`]).
#[derive(Debug, Default)]
pub struct RouteLatencies {
    /// `POST /v1/agent/events`: from the request to its answer after the commit.
    pub ingest: Histogram,
    /// `GET /v1/agent/dispatch` answered with a dispatch (at once or on wake).
    pub longpoll_dispatch: Histogram,
    /// `GET /v1/agent/dispatch` answered 204 after its wait (or at shutdown).
    pub longpoll_no_work: Histogram,
}

/// What `/metrics` reads besides the database.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub counters: &'a Counters,
    pub latencies: &'a RouteLatencies,
    pub board: &'a Board,
    pub now: OffsetDateTime,
    /// Silence after which a host counts as unreachable (as in the views).
    pub stale_after_secs: u64,
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric.
pub fn render(src: Sources<'_>, conn: &Connection, path: &Path) -> Result<String, StoreError> {
    let mut out = String::new();
    header(&mut out, "nixfleet_build_info", "gauge", "The running version; always 1.");
    let _ = writeln!(
        out,
        "nixfleet_build_info{{version=\"{}\",protocol=\"{PROTOCOL_VERSION}\",role=\"cp\"}} 1",
        label(env!("CARGO_PKG_VERSION"))
    );
    render_counters(&mut out, src);
    render_latencies(&mut out, src);
    render_fleet(&mut out, src, conn, path)?;
    Ok(out)
}

fn render_counters(out: &mut String, src: Sources<'_>) {
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    };
    let c = src.counters;
    counter(out, "nixfleet_cp_commits_total", "Committed writer transactions.", &c.commits);
    counter(out, "nixfleet_cp_commit_failures_total", "Writer transactions that failed.", &c.commit_failures);
    header(out, "nixfleet_cp_events_total", "counter", "Agent events by verdict.");
    for (status, v) in [
        ("applied", &c.events_applied),
        ("duplicate", &c.events_duplicate),
        ("rejected", &c.events_rejected),
        ("retry", &c.events_retry),
        ("gap", &c.events_gap),
    ] {
        let _ = writeln!(out, "nixfleet_cp_events_total{{status=\"{status}\"}} {}", v.load(Ordering::Relaxed));
    }
    header(out, "nixfleet_cp_longpolls_parked", "gauge", "Long-polls waiting for a dispatch.");
    let _ = writeln!(out, "nixfleet_cp_longpolls_parked {}", src.board.n_parked());
}

fn render_latencies(out: &mut String, src: Sources<'_>) {
    let name = "nixfleet_cp_commit_seconds";
    header(out, name, "histogram", "Writer groups: from the first command to the synchronous commit.");
    src.counters.commit_seconds.render(out, name, "");
    let name = "nixfleet_cp_ingest_seconds";
    header(out, name, "histogram", "Event batches: from the request to the answer after the commit.");
    src.latencies.ingest.render(out, name, "");
    let name = "nixfleet_cp_longpoll_answer_seconds";
    header(out, name, "histogram", "Long-polls: from the request to the answer, by outcome.");
    src.latencies.longpoll_dispatch.render(out, name, "outcome=\"dispatch\",");
    src.latencies.longpoll_no_work.render(out, name, "outcome=\"no_work\",");
}

/// Rollouts, hosts per rollout and state, drift, reachability, skips: all
/// counted in SQL, so a scrape reads a few rows per rollout whatever the
/// size of the fleet.
fn render_fleet(out: &mut String, src: Sources<'_>, conn: &Connection, path: &Path) -> Result<(), StoreError> {
    header(out, "nixfleet_cp_rollouts", "gauge", "Rollouts by state.");
    let counts = store::metric_counts(conn, path)?;
    for (state, n) in &counts.rollouts_by_state {
        let _ = writeln!(out, "nixfleet_cp_rollouts{{state=\"{}\"}} {n}", label(state));
    }
    let mut fleet: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut per_rollout = String::new();
    let mut recorded = store::record_counts(conn, path)?;
    for head in store::rollout_heads(conn, path)? {
        let id = head.rollout_id.as_str();
        if head.state == RolloutState::Superseded {
            continue;
        }
        let stored = recorded.remove(id).unwrap_or_default();
        let n_recorded: usize = stored.values().sum();
        for state in HostState::ALL {
            let mut n = stored.get(state.as_str()).copied().unwrap_or(0);
            if state == HostState::Pending {
                n += head.n_hosts.saturating_sub(n_recorded);
            }
            *fleet.entry(state.as_str()).or_insert(0) += n;
            let _ = writeln!(
                per_rollout,
                "nixfleet_cp_rollout_hosts{{rollout=\"{}\",state=\"{}\"}} {n}",
                label(id),
                state.as_str()
            );
        }
    }
    header(out, "nixfleet_cp_host_records", "gauge", "Host records of unsuperseded rollouts by state.");
    for (state, n) in fleet {
        let _ = writeln!(out, "nixfleet_cp_host_records{{state=\"{state}\"}} {n}");
    }
    header(out, "nixfleet_cp_rollout_hosts", "gauge", "Hosts of each unsuperseded rollout by state.");
    out.push_str(&per_rollout);
    header(
        out,
        "nixfleet_hosts_drifting",
        "gauge",
        "Hosts whose last heartbeat named another closure than their records say they run.",
    );
    let _ = writeln!(out, "nixfleet_hosts_drifting {}", counts.n_drifting);
    let live = store::liveness_counts(conn, path, src.now, src.stale_after_secs)?;
    header(out, "nixfleet_hosts_unreachable", "gauge", "Hosts silent for more than 3 heartbeat intervals.");
    let _ = writeln!(out, "nixfleet_hosts_unreachable {}", live.unreachable);
    header(out, "nixfleet_cp_hosts", "gauge", "Hosts seen in a heartbeat or named by a manifest, by liveness.");
    for (name, n) in [("reachable", live.reachable), ("unreachable", live.unreachable), ("never_seen", live.never_seen)]
    {
        let _ = writeln!(out, "nixfleet_cp_hosts{{liveness=\"{name}\"}} {n}");
    }
    header(
        out,
        "nixfleet_cp_hosts_skipped",
        "gauge",
        "Hosts skipped by a rollout because their target closure was quarantined before they acked.",
    );
    let _ = writeln!(out, "nixfleet_cp_hosts_skipped {}", counts.n_skipped);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
