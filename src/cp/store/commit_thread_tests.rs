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

use super::writer_testkit as testkit;
use super::*;
use crate::clock::ClockHandle;
use crate::cp::longpoll::Board;
use crate::ids::RolloutId;

fn open_writer(path: &Path) -> Writer {
    let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
    let mut writer =
        Writer::open(path, clock, Arc::new(Board::default()), Arc::new(Counters::default())).expect("writer");
    writer.commit_on_another_thread().expect("a commit thread");
    writer
}

fn publish(writer: &mut Writer, git_ref: &str) -> Reply<PublishOutcome> {
    testkit::publish(writer, git_ref)
}

fn heartbeat(writer: &mut Writer) -> Reply<Option<BTreeMap<RolloutId, u64>>> {
    testkit::heartbeat(writer, "h0", BTreeMap::new())
}

fn temp_dir(label: &str) -> PathBuf {
    testkit::temp_dir(&format!("commit-thread-{label}"))
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
