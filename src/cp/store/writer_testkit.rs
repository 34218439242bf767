//! What the writer's tests on a real SQLite file share: a temp dir, the
//! two-host manifest `stable@{ref}`, and a publish and a heartbeat run as
//! groups of their own, answered as the writer answers them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::oneshot;

use super::{Command, PublishOutcome, Reply, Writer};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::wire::{Heartbeat, Manifest};

/// A fresh directory `nixfleet-{label}-{pid}` under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nixfleet-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn closure(name: &str) -> Closure {
    Closure::parse(&format!("/nix/store/{:0>32}-nixos-system-{name}", 0)).expect("closure")
}

pub fn host(name: &str) -> Hostname {
    Hostname::parse(name).expect("host")
}

/// `stable@{git_ref}`: hosts h0 and h1 in one wave, rollback-and-halt.
pub fn manifest(git_ref: &str) -> (Manifest, Vec<u8>) {
    let json = serde_json::json!({
        "schema": 1, "channel": "stable", "ref": git_ref, "issued_at": "2026-11-25T11:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": 0},
        "waves": [{"name": "all", "soak_secs": 0, "max_in_flight": 2}],
        "hosts": {"h0": {"wave": 0, "target_closure": closure("h0").as_str()},
                  "h1": {"wave": 0, "target_closure": closure("h1").as_str()}},
    });
    let payload = json.to_string().into_bytes();
    (Manifest::parse(&payload).expect("manifest"), payload)
}

/// Publishes `stable@{git_ref}` in a group of its own: the writer's answer.
pub fn publish(writer: &mut Writer, git_ref: &str) -> Reply<PublishOutcome> {
    let (manifest, payload) = manifest(git_ref);
    let (reply, mut rx) = oneshot::channel();
    writer.run_group(vec![Command::Publish { envelope: b"{}".to_vec(), payload, manifest: Box::new(manifest), reply }]);
    rx.try_recv().expect("answered")
}

/// A heartbeat of `name` (running its own closure) reporting `last_seq`
/// per rollout, in a group of its own: the writer's answer.
pub fn heartbeat(
    writer: &mut Writer,
    name: &str,
    last_seq: BTreeMap<RolloutId, u64>,
) -> Reply<Option<BTreeMap<RolloutId, u64>>> {
    let heartbeat = Heartbeat {
        hostname: host(name),
        current_closure: closure(name),
        booted_closure: None,
        uptime_secs: 1,
        agent_version: "test".into(),
        last_seq,
    };
    let (reply, mut rx) = oneshot::channel();
    writer.run_group(vec![Command::Heartbeat { heartbeat, reply }]);
    rx.try_recv().expect("answered")
}
