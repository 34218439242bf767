//! The writer's commit thread (`Writer::commit_on_another_thread`, used by
//! `nixfleet sim` only), on a real SQLite file: a group is answered before
//! its COMMIT runs, `join_commit` waits for it, and a COMMIT that fails
//! there is reported, refuses the next group and leaves memory as the
//! database is. The simulator's side (`SimCp::settle` stops the process
//! and the run reports `cp-commit`) is tested in `sim::cp`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use time::macros::datetime;
use tokio::sync::oneshot;

use super::*;
use crate::clock::ClockHandle;
use crate::cp::longpoll::Board;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::wire::{Heartbeat, Manifest};

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nixfleet-commit-thread-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn closure(name: &str) -> Closure {
    Closure::parse(&format!("/nix/store/{:0>32}-nixos-system-{name}", 0)).expect("closure")
}

fn open_writer(path: &Path) -> Writer {
    let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
    let mut writer =
        Writer::open(path, clock, Arc::new(Board::default()), Arc::new(Counters::default())).expect("writer");
    writer.commit_on_another_thread().expect("a commit thread");
    writer
}

fn publish(writer: &mut Writer, git_ref: &str) -> Reply<PublishOutcome> {
    let json = serde_json::json!({
        "schema": 1, "channel": "stable", "ref": git_ref, "issued_at": "2026-11-25T11:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": 0},
        "waves": [{"name": "all", "soak_secs": 0, "max_in_flight": 1}],
        "hosts": {"h0": {"wave": 0, "target_closure": closure("h0").as_str()}},
    });
    let payload = json.to_string().into_bytes();
    let manifest = Manifest::parse(&payload).expect("manifest");
    let (reply, mut rx) = oneshot::channel();
    writer.run_group(vec![Command::Publish { envelope: b"{}".to_vec(), payload, manifest: Box::new(manifest), reply }]);
    rx.try_recv().expect("answered")
}

fn heartbeat(writer: &mut Writer) -> Reply<Option<BTreeMap<RolloutId, u64>>> {
    let heartbeat = Heartbeat {
        hostname: Hostname::parse("h0").expect("host"),
        current_closure: closure("h0"),
        booted_closure: None,
        uptime_secs: 1,
        agent_version: "test".into(),
        last_seq: BTreeMap::new(),
    };
    let (reply, mut rx) = oneshot::channel();
    writer.run_group(vec![Command::Heartbeat { heartbeat, reply }]);
    rx.try_recv().expect("answered")
}

/// Rows of `table` another connection sees.
fn rows(path: &Path, table: &str) -> i64 {
    let conn = Connection::open(path).expect("open");
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).expect("count")
}

#[test]
fn a_group_is_answered_first_and_committed_by_the_join() {
    let dir = temp_dir("ok");
    let path = dir.join("cp.db");
    let mut writer = open_writer(&path);
    assert_eq!(publish(&mut writer, "r1").expect("answered ok"), PublishOutcome::Created);
    writer.join_commit().expect("committed");
    assert_eq!(rows(&path, "rollouts"), 1);
    heartbeat(&mut writer).expect("answered ok");
    // The next group waits for the previous commit before it begins.
    assert_eq!(publish(&mut writer, "r2").expect("answered ok"), PublishOutcome::Created);
    writer.join_commit().expect("committed");
    assert_eq!((rows(&path, "rollouts"), rows(&path, "hosts")), (2, 1));
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_commit_is_reported_by_the_join() {
    let dir = temp_dir("join");
    let path = dir.join("cp.db");
    let mut writer = open_writer(&path);
    assert_eq!(publish(&mut writer, "r1").expect("answered ok"), PublishOutcome::Created);
    writer.join_commit().expect("committed");
    writer.fail_next_commit();
    heartbeat(&mut writer).expect("answered before its commit");
    let err = writer.join_commit().expect_err("the commit failed");
    assert!(err.to_string().contains("commit"), "{err}");
    // Nothing of the group is in the database, and the writer goes on.
    assert_eq!(rows(&path, "hosts"), 0);
    heartbeat(&mut writer).expect("answered ok");
    writer.join_commit().expect("committed");
    assert_eq!(rows(&path, "hosts"), 1);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_commit_refuses_the_next_group_and_memory_follows_the_database() {
    let dir = temp_dir("next");
    let path = dir.join("cp.db");
    let mut writer = open_writer(&path);
    writer.fail_next_commit();
    assert_eq!(publish(&mut writer, "r1").expect("answered before its commit"), PublishOutcome::Created);
    assert_eq!(writer.state().rollouts.len(), 1, "memory ran ahead of the commit");
    // The next group finds the failed commit: refused, memory reloaded.
    assert!(publish(&mut writer, "r2").is_err(), "refused after a failed commit");
    assert!(writer.state().rollouts.is_empty(), "memory is what the database holds");
    assert_eq!(rows(&path, "rollouts"), 0);
    assert_eq!(publish(&mut writer, "r3").expect("answered ok"), PublishOutcome::Created);
    writer.join_commit().expect("committed");
    assert_eq!(rows(&path, "rollouts"), 1);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}
