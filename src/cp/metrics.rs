//! `GET /metrics` in the Prometheus text format (`docs/protocol.md` §4): counters the
//! writer bumps after each commit, the long-poll board's gauges, and
//! rollout/host counts read from the database.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

use super::longpoll::Board;
use super::store::{self, Counters, StoreError};

/// Renders every metric.
pub fn render(counters: &Counters, board: &Board, conn: &Connection, path: &Path) -> Result<String, StoreError> {
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
    };
    counter(&mut out, "nixfleet_cp_commits_total", "Committed writer transactions.", &counters.commits);
    counter(
        &mut out,
        "nixfleet_cp_commit_failures_total",
        "Writer transactions that failed.",
        &counters.commit_failures,
    );
    let _ = writeln!(
        out,
        "# HELP nixfleet_cp_events_total Agent events by verdict.\n# TYPE nixfleet_cp_events_total counter"
    );
    for (status, v) in [
        ("applied", &counters.events_applied),
        ("duplicate", &counters.events_duplicate),
        ("rejected", &counters.events_rejected),
        ("retry", &counters.events_retry),
        ("gap", &counters.events_gap),
    ] {
        let _ = writeln!(out, "nixfleet_cp_events_total{{status=\"{status}\"}} {}", v.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP nixfleet_cp_longpolls_parked Long-polls waiting for a dispatch.\n# TYPE nixfleet_cp_longpolls_parked gauge\nnixfleet_cp_longpolls_parked {}",
        board.n_parked()
    );
    let _ = writeln!(out, "# HELP nixfleet_cp_rollouts Rollouts by state.\n# TYPE nixfleet_cp_rollouts gauge");
    let counts = store::metric_counts(conn, path)?;
    for (state, n) in &counts.rollouts_by_state {
        let _ = writeln!(out, "nixfleet_cp_rollouts{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP nixfleet_cp_host_records Host records of unsuperseded rollouts by state.\n# TYPE nixfleet_cp_host_records gauge");
    let mut by_state: std::collections::BTreeMap<&'static str, usize> = std::collections::BTreeMap::new();
    for manifest in store::manifests(conn, path)? {
        if counts.superseded.contains(manifest.rollout_id.as_str()) {
            continue;
        }
        for record in store::host_records_of(conn, path, &manifest)?.values() {
            *by_state.entry(record.state.as_str()).or_insert(0) += 1;
        }
    }
    for (state, n) in by_state {
        let _ = writeln!(out, "nixfleet_cp_host_records{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP nixfleet_hosts_drifting Hosts whose last heartbeat named another closure than their records say they run.\n# TYPE nixfleet_hosts_drifting gauge\nnixfleet_hosts_drifting {}",
        counts.n_drifting
    );
    let _ = writeln!(
        out,
        "# HELP nixfleet_cp_hosts_skipped Hosts skipped by a rollout because their target closure was quarantined before they acked.\n# TYPE nixfleet_cp_hosts_skipped gauge\nnixfleet_cp_hosts_skipped {}",
        counts.n_skipped
    );
    Ok(out)
}
