//! Queue tests, one file per concern: `recovery` and `operations` on the
//! real file system, `faults` injected at every step through the storage
//! seam, and `crash` (exhaustive crash-state enumeration of small workloads
//! plus seeded random longer ones). The helpers shared by them are here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use time::macros::datetime;
use time::Duration;

use super::record::{self, DeadReason};
use super::sim::{SimFs, SimStorage, EIO, ENOSPC};
use super::storage::{self, MAX_QUEUE_FILE_BYTES};
use super::*;
use crate::wire::WireEventBody;

fn host() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}

fn rollout(name: &str) -> RolloutId {
    RolloutId::parse(name).expect("valid")
}

fn clock() -> ClockHandle {
    ClockHandle::manual(datetime!(2026-11-25 12:00 UTC))
}

/// A small event whose content depends on seq and a tag, so two events are
/// never equal by accident.
fn event(seq: u64, tag: &str) -> OutboundEvent {
    OutboundEvent {
        seq,
        body: WireEventBody::ActivationStarted {
            started_at: datetime!(2026-11-25 12:00 UTC) + Duration::seconds(seq as i64),
            switch_method: format!("switch-{tag}"),
        },
    }
}

fn open_real(dir: &Path) -> Queue {
    Queue::open(dir, host(), QueueConfig::default(), clock()).expect("open")
}

fn enqueue_next(q: &mut Queue, r: &RolloutId, tag: &str) -> Result<QueuedRef, QueueError> {
    let seq = q.next_seq(r);
    q.enqueue(r, &event(seq, tag))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    names
}

// ------------------------------------------------ the simulated disk

const ROOT: &str = "/state";

fn sim_open(storage: &SimStorage, config: QueueConfig) -> Result<Queue, QueueError> {
    Queue::open_with_storage(Box::new(storage.clone()), Path::new(ROOT), host(), config, clock())
}

/// Opens on an empty simulated disk, returning the queue and its storage.
fn sim_queue() -> (Queue, SimStorage) {
    let storage = SimStorage::default();
    let q = sim_open(&storage, QueueConfig::default()).expect("open");
    (q, storage)
}

fn disk_events(storage: &SimStorage, folder: &str) -> Vec<QueuedEvent> {
    let dir = PathBuf::from(ROOT).join(QUEUE_DIR).join(folder);
    let fs = storage.fs();
    fs.paths()
        .iter()
        .filter(|p| {
            p.parent() == Some(dir.as_path())
                && record::is_event_name(p.file_name().and_then(|n| n.to_str()).unwrap_or(""))
        })
        .map(|p| record::decode(fs.file(p).expect("exists")).expect("an event file on disk is always whole"))
        .collect()
}

mod crash;
mod faults;
mod operations;
mod recovery;
