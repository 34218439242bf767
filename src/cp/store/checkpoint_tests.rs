//! Record checkpoints on a real SQLite file through the real writer: the
//! log stays bounded, the record is the one computed without compaction,
//! `replay`, a restart and the rebuild agree, resends below the checkpoint
//! are duplicates, and a schema-3 database written by the previous version
//! is migrated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection};
use time::macros::datetime;
use time::Duration;
use tokio::sync::oneshot;

use super::writer_testkit::{self as testkit, closure, host};
use super::*;
use crate::clock::ClockHandle;
use crate::cp::longpoll::Board;
use crate::ids::RolloutId;
use crate::machine::{self, EventBody, HostRecord, ProbeDecl, ProbeKind, ProbeMode, ProbeStatus, Timestamp};
use crate::wire::{BatchItem, EventResult, Manifest, OutboundEvent, ResultStatus};

const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);
const ROLLOUT: &str = "stable@r1";
/// A small bound, so a few hundred events cross it several times.
const BOUND: u64 = 40;

fn temp_dir(label: &str) -> PathBuf {
    testkit::temp_dir(&format!("checkpoint-{label}"))
}

fn at(secs: i64) -> Timestamp {
    T0 + Duration::seconds(secs)
}

fn rollout() -> RolloutId {
    RolloutId::parse(ROLLOUT).expect("id")
}

fn manifest() -> (Manifest, Vec<u8>) {
    testkit::manifest("r1")
}

fn open_writer(path: &Path) -> Writer {
    let counters = Arc::new(Counters::default());
    let mut writer =
        Writer::open(path, ClockHandle::manual(at(100_000)), Arc::new(Board::default()), counters).expect("writer");
    writer.set_checkpoint_bound(BOUND);
    writer
}

fn publish(writer: &mut Writer) {
    assert_eq!(testkit::publish(writer, "r1").expect("committed"), PublishOutcome::Created);
}

fn ingest(writer: &mut Writer, name: &str, events: &[OutboundEvent]) -> Vec<EventResult> {
    let items = events.iter().map(|e| BatchItem { rollout_id: rollout(), event: e.clone() }).collect();
    let (reply, mut rx) = oneshot::channel();
    writer.run_group(vec![Command::Ingest { hostname: host(name), items, reply }]);
    rx.try_recv().expect("answered").expect("committed")
}

fn heartbeat(writer: &mut Writer, name: &str, last_seq: u64) -> BTreeMap<RolloutId, u64> {
    testkit::heartbeat(writer, name, BTreeMap::from([(rollout(), last_seq)]))
        .expect("committed")
        .expect("a manifest names the host")
}

/// A soak with a flapping enforce probe: DispatchAck, ActivationCompleted,
/// the topology, then `n_probe` probe events (fail, the failure clock
/// starting, an observe probe failing, a pass resetting the clock, a
/// re-declaration or an observe pass), then Converged.
fn history(name: &str, n_probe: usize) -> Vec<EventBody> {
    let topology = vec![
        ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce },
        ProbeDecl { name: "disk".into(), kind: ProbeKind::Exec, mode: ProbeMode::Observe },
    ];
    let result = |probe: &str, mode, status, t: i64| EventBody::ProbeResult {
        probe_name: probe.into(),
        mode,
        status,
        observed_at: at(t),
        failure_reason: (status == ProbeStatus::Fail).then(|| format!("down at {t}")),
    };
    let mut out = vec![
        EventBody::Activate {
            current_closure_at_dispatch: closure("old"),
            target_closure: closure(name),
            soak_secs: 0,
            received_at: at(0),
        },
        EventBody::ActivationCompleted { observed_current_closure: closure(name), exit_code: 0, completed_at: at(1) },
        EventBody::ProbeTopologyDeclared { probes: topology.clone(), declared_at: at(2) },
    ];
    let (mut t, mut last_fail) = (3, 3);
    for i in 0..n_probe {
        out.push(match i % 5 {
            0 => {
                last_fail = t;
                result("web", ProbeMode::Enforce, ProbeStatus::Fail, t)
            }
            1 => EventBody::ProbeFailureFirst {
                probe_name: "web".into(),
                mode: ProbeMode::Enforce,
                first_failed_at: at(last_fail),
            },
            2 => result("disk", ProbeMode::Observe, ProbeStatus::Fail, t),
            3 => result("web", ProbeMode::Enforce, ProbeStatus::Pass, t),
            _ if i % 50 == 49 => EventBody::ProbeTopologyDeclared { probes: topology.clone(), declared_at: at(t) },
            _ => result("disk", ProbeMode::Observe, ProbeStatus::Pass, t),
        });
        t += 1;
    }
    out.push(EventBody::ConvergedReached { converged_at: at(t), current_closure: closure(name) });
    out
}

fn wire(events: &[EventBody]) -> Vec<OutboundEvent> {
    events.iter().enumerate().map(|(i, b)| OutboundEvent::from_machine(i as u64 + 1, b)).collect()
}

/// The record computed without compaction: the whole history folded from
/// the manifest's Pending record, on the CP's side.
fn uncompacted(name: &str, events: &[OutboundEvent]) -> HostRecord {
    let remote: Vec<_> = events.iter().map(|e| e.to_remote().expect("valid")).collect();
    let start = HostRecord::pending(rollout(), host(name), Some(closure(name)));
    machine::replay(start, &remote, &manifest().0.machine_policy()).expect("the history is legal")
}

fn rows_of(conn: &Connection, name: &str) -> u64 {
    conn.query_row("SELECT COUNT(*) FROM event_log WHERE hostname = ?1", params![name], |r| r.get(0)).expect("count")
}

fn statuses(results: &[EventResult]) -> Vec<ResultStatus> {
    results.iter().map(|r| r.status).collect()
}

/// 504 events of one (host, rollout) through the real writer with a bound
/// of 40: at every commit the host's rows stay at or below the bound plus
/// the two events before the soak; the record equals the uncompacted fold;
/// a restart, the rebuild and `replay` agree; resends below the checkpoint
/// are duplicates, a gap is still a gap, Replay-From still asks from the
/// record's last seq.
#[test]
fn a_checkpoint_bounds_the_log_and_everything_still_agrees() {
    let dir = temp_dir("bounded");
    let path = dir.join("cp.db");
    let mut writer = open_writer(&path);
    publish(&mut writer);
    let events = wire(&history("h0", 500));
    let reader = open_reader(&path).expect("reader");
    let (first_half, second_half) = events.split_at(260);
    let mut max_rows = 0;
    for batch in first_half.chunks(7) {
        assert!(statuses(&ingest(&mut writer, "h0", batch)).iter().all(|s| *s == ResultStatus::Applied));
        max_rows = max_rows.max(rows_of(&reader, "h0"));
    }
    let k = writer.state().checkpoints.seq_of(&rollout(), &host("h0"));
    assert!(k > BOUND && k <= 260, "a checkpoint was taken in the first half: seq {k}");

    // Below the checkpoint: duplicates (a deleted probe event and a kept
    // DispatchAck); beyond the next seq: a gap, nothing stored.
    let results = ingest(&mut writer, "h0", &[events[4].clone(), events[0].clone(), events[261].clone()]);
    assert_eq!(statuses(&results), [ResultStatus::Duplicate, ResultStatus::Duplicate, ResultStatus::Gap]);
    assert_eq!(results[2].expected_seq, Some(261));
    assert_eq!(heartbeat(&mut writer, "h0", 300), BTreeMap::from([(rollout(), 260)]), "Replay-From the record");
    assert!(heartbeat(&mut writer, "h0", 260).is_empty());

    // A restart loads the same records and the same checkpoint.
    let before = writer.state().rollouts[&rollout()].records.clone();
    drop(writer);
    let mut writer = open_writer(&path);
    assert_eq!(writer.state().rollouts[&rollout()].records, before);
    assert_eq!(writer.state().checkpoints.seq_of(&rollout(), &host("h0")), k);
    for batch in second_half.chunks(7) {
        assert!(statuses(&ingest(&mut writer, "h0", batch)).iter().all(|s| *s == ResultStatus::Applied));
        max_rows = max_rows.max(rows_of(&reader, "h0"));
    }
    let short = wire(&history("h1", 10));
    assert!(statuses(&ingest(&mut writer, "h1", &short)).iter().all(|s| *s == ResultStatus::Applied));

    assert!(max_rows <= BOUND + 2, "at most {} rows, saw {max_rows}", BOUND + 2);
    let expected = uncompacted("h0", &events);
    assert_eq!(expected.state, machine::HostState::Converged);
    assert_eq!(writer.state().rollouts[&rollout()].records[&host("h0")], expected);
    let checkpoint = checkpoint_of(&reader, &path, &rollout(), &host("h0")).expect("read").expect("a checkpoint");
    let k = checkpoint.seq;
    assert!(k > 260, "another checkpoint after the restart: seq {k}");
    assert_eq!(checkpoint.compacted, k - 2, "every seq between the soak's start and the checkpoint was deleted");
    assert_eq!(rows_of(&reader, "h0"), 2 + events.len() as u64 - k);
    let mut kinds =
        reader.prepare("SELECT kind FROM event_log WHERE hostname = 'h0' AND seq <= ?1 ORDER BY seq").expect("sql");
    let kept_below: Vec<String> =
        kinds.query_map(params![k as i64], |r| r.get(0)).expect("kinds").collect::<Result<_, _>>().expect("kinds");
    assert_eq!(kept_below, ["DispatchAck", "ActivationCompleted"]);
    assert!(checkpoint_of(&reader, &path, &rollout(), &host("h1")).expect("read").is_none());
    assert_eq!(writer.state().rollouts[&rollout()].records[&host("h1")], uncompacted("h1", &short));

    // The rebuild, the cache and `replay` agree; replay says where it started.
    let cached = cached_host_records(&reader, &path).expect("cached");
    assert_eq!(rebuild_host_records(&reader, &path).expect("rebuild"), cached);
    assert_eq!(cached[&(rollout(), host("h0"))], expected);
    drop(writer);
    let (out, disagreements) = crate::tools::replay::db_report(&path, None, false).expect("replay");
    assert!(disagreements.is_empty(), "{disagreements:?}\n{out}");
    assert!(out.contains(&format!("started from a checkpoint at seq {k}")), "{out}");
    assert!(out.contains(&format!("the {} probe events 3..={k} were deleted", k - 2)), "{out}");
    assert!(out.contains("1 host(s) replayed from a record checkpoint"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `replay` checks the checkpoint instead of trusting it whole: a field no
/// probe event changes, altered in the checkpoint and the cache alike, a
/// wrong count of deleted events, and a kept event removed are each
/// reported.
#[test]
fn replay_reports_a_checkpoint_that_does_not_continue_the_proven_record() {
    let dir = temp_dir("tampered");
    let path = dir.join("cp.db");
    let mut writer = open_writer(&path);
    publish(&mut writer);
    let events = wire(&history("h0", 100));
    assert!(statuses(&ingest(&mut writer, "h0", &events)).iter().all(|s| *s == ResultStatus::Applied));
    drop(writer);
    let (_, clean) = crate::tools::replay::db_report(&path, None, true).expect("replay");
    assert!(clean.is_empty(), "{clean:?}");

    let conn = open(&path).expect("open");
    for table in ["record_checkpoints", "host_records"] {
        conn.execute(
            &format!(
                "UPDATE {table} SET record = json_set(record, '$.current_closure_at_dispatch', ?1) WHERE hostname = 'h0'"
            ),
            params![closure("elsewhere").as_str()],
        )
        .expect("altered alike");
    }
    let (_, found) = crate::tools::replay::db_report(&path, None, true).expect("replay");
    assert!(found.iter().any(|d| d.contains("differs from the record proven at seq 2")), "{found:?}");

    conn.execute("UPDATE record_checkpoints SET compacted = compacted + 1", []).expect("count");
    let (_, found) = crate::tools::replay::db_report(&path, None, true).expect("replay");
    assert!(found.iter().any(|d| d.contains("events deleted, but")), "{found:?}");

    let k: i64 = conn.query_row("SELECT seq FROM record_checkpoints", [], |r| r.get(0)).expect("seq");
    conn.execute("DELETE FROM event_log WHERE hostname = 'h0' AND seq = ?1", params![k + 1]).expect("delete");
    let (_, found) = crate::tools::replay::db_report(&path, None, true).expect("replay");
    assert!(found.iter().any(|d| d.contains(&format!("seq {} is missing", k + 1))), "{found:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tests/fixtures/cp-schema-3-demo.db` was written by the previous version
/// (schema 3: `nixfleet demo --hosts 2 --keep` before this change). Replay
/// reads the copy unmigrated; `open` migrates it to schema 4 keeping every
/// row; the writer loads it and takes checkpoints from then on.
#[test]
fn a_schema_3_database_written_by_the_previous_version_is_migrated() {
    let dir = temp_dir("migrate4");
    let path = dir.join("cp.db");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cp-schema-3-demo.db");
    std::fs::copy(&fixture, &path).expect("copy the fixture");
    let version = |conn: &Connection| -> i64 { conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("v") };
    let reader = open_reader(&path).expect("reader");
    assert_eq!(version(&reader), 3);
    assert!(!has_checkpoint_table(&reader, &path).expect("look"));
    let before = cached_host_records(&reader, &path).expect("cached");
    let n_events: i64 = reader.query_row("SELECT COUNT(*) FROM event_log", [], |r| r.get(0)).expect("count");
    let (_, unmigrated) = crate::tools::replay::db_report(&path, None, true).expect("replay of schema 3");
    assert!(unmigrated.is_empty(), "{unmigrated:?}");
    drop(reader);

    let conn = open(&path).expect("migrate");
    assert_eq!(version(&conn), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 4);
    let n_after: i64 = conn.query_row("SELECT COUNT(*) FROM event_log", [], |r| r.get(0)).expect("count");
    let n_checkpoints: i64 =
        conn.query_row("SELECT COUNT(*) FROM record_checkpoints", [], |r| r.get(0)).expect("new table");
    assert_eq!((n_after, n_checkpoints), (n_events, 0));
    assert_eq!(cached_host_records(&conn, &path).expect("cached"), before);
    assert_eq!(rebuild_host_records(&conn, &path).expect("rebuild"), before);
    drop(conn);
    let writer = open_writer(&path);
    assert_eq!(writer.state().checkpoints.bound, BOUND);
    drop(writer);
    let (_, migrated) = crate::tools::replay::db_report(&path, None, true).expect("replay of schema 4");
    assert!(migrated.is_empty(), "{migrated:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
