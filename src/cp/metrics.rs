//! `GET /metrics` in the Prometheus text format (SPEC §5): counters the
//! writer bumps after each commit, the long-poll board's gauges, and
//! rollout/host counts read from the database.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

use super::longpoll::Board;
use super::store::{self, StoreError};

/// Counters shared by the writer (which bumps them after a commit, so they
/// count only durable work) and the metrics route.
#[derive(Debug, Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub events_applied: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    pub events_retry: AtomicU64,
    pub events_gap: AtomicU64,
}

fn sql(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sql { path: path.to_owned(), op: "read metrics", source }
}

fn grouped(conn: &Connection, path: &Path, query: &str) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare(query).map_err(sql(path))?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql(path))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql(path))
}

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
    for (state, n) in grouped(conn, path, "SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY state")? {
        let _ = writeln!(out, "nixfleet_cp_rollouts{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP nixfleet_cp_host_records Host records of unsuperseded rollouts by state.\n# TYPE nixfleet_cp_host_records gauge");
    let mut by_state: std::collections::BTreeMap<&'static str, usize> = std::collections::BTreeMap::new();
    let superseded: std::collections::HashSet<String> =
        grouped(conn, path, "SELECT rollout_id, 0 FROM rollouts WHERE state = 'superseded'")?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
    for manifest in store::manifests(conn, path)? {
        if superseded.contains(manifest.rollout_id.as_str()) {
            continue;
        }
        for record in store::host_records_of(conn, path, &manifest)?.values() {
            *by_state.entry(record.state.as_str()).or_insert(0) += 1;
        }
    }
    for (state, n) in by_state {
        let _ = writeln!(out, "nixfleet_cp_host_records{{state=\"{state}\"}} {n}");
    }
    let count = |query: &str| -> Result<i64, StoreError> { conn.query_row(query, [], |r| r.get(0)).map_err(sql(path)) };
    let _ = writeln!(
        out,
        "# HELP nixfleet_hosts_drifting Hosts whose last heartbeat named another closure than their records say they run.\n# TYPE nixfleet_hosts_drifting gauge\nnixfleet_hosts_drifting {}",
        count("SELECT COUNT(*) FROM hosts WHERE drift = 'drifting'")?
    );
    let _ = writeln!(
        out,
        "# HELP nixfleet_cp_hosts_skipped Hosts skipped by a rollout because their target closure was quarantined before they acked.\n# TYPE nixfleet_cp_hosts_skipped gauge\nnixfleet_cp_hosts_skipped {}",
        count("SELECT COUNT(*) FROM skipped_hosts")?
    );
    Ok(out)
}
