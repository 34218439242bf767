//! The journal against the real queue on real files: caps, restart
//! rebuild, trust-key rotation, lost records.

use time::macros::datetime;

use super::*;
use crate::agent::channels::{ChannelHistory, CHANNELS_FILE};
use crate::agent::reducer::{commands, Input, Reducer};
use crate::agent::rollouts::Rollouts;
use crate::clock::ClockHandle;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::HostState;
use crate::queue::{Queue, QueueConfig};
use crate::sign::{sign_envelope, PublicKey, SigningKey};
use crate::wire::Manifest;

const MANIFEST: &str = include_str!("../../../examples/manifest.json");

fn setup(dir: &Path) -> (SharedQueue, PublicKey, Manifest) {
    let key = SigningKey::from_seed(&[3; 32]);
    let manifest = Manifest::parse(MANIFEST.as_bytes()).expect("valid");
    let envelope = serde_json::to_vec(&sign_envelope(&key, MANIFEST.as_bytes())).expect("json");
    ManifestCache::new(dir).store(&manifest.rollout_id, &envelope, &key.public_key()).expect("cache");
    let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
    let queue = Queue::open(dir, host(), QueueConfig::default(), clock).expect("open queue");
    (SharedQueue::new(queue), key.public_key(), manifest)
}

fn host() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}

fn dispatch(manifest: &Manifest) -> Input {
    Input::Dispatch {
        rollout_id: manifest.rollout_id.clone(),
        policy: manifest.machine_policy(),
        target_closure: manifest.hosts[&host()].target_closure.clone(),
        soak_secs: 300,
        current_closure: Closure::parse("/nix/store/00000000000000000000000000000000-old").expect("valid"),
        issued_at: manifest.issued_at,
        at: datetime!(2026-11-25 12:00 UTC),
    }
}

#[test]
fn async_workers_never_lock_the_queue_on_a_runtime_thread() {
    // Proves, by reading the source, that the workers and the runtime use
    // only `SharedQueue::with` (blocking pool) and the lock-free copies:
    // `lock()` there would stall a runtime thread behind an fsync.
    for (file, source) in [
        ("workers/net/mod.rs", include_str!("../workers/net/mod.rs")),
        ("workers/net/longpoll.rs", include_str!("../workers/net/longpoll.rs")),
        ("workers/net/drain.rs", include_str!("../workers/net/drain.rs")),
        ("workers/net/heartbeat.rs", include_str!("../workers/net/heartbeat.rs")),
        ("runtime.rs", include_str!("../runtime.rs")),
    ] {
        assert!(!source.contains(".lock()"), "src/agent/{file} locks something on a runtime thread");
    }
}

#[tokio::test]
async fn the_real_queue_at_its_soft_cap_tells_the_reducer_full_for_visibility_and_keeps_room_for_decisions() {
    // Proves the glue between the queue's caps and the reducer: at the
    // soft cap a visibility event is `JournalError::Full` (the reducer
    // skips it, never loops), a decisive event still lands in the
    // reserve, and at the hard cap a decisive event is `Full` too.
    use crate::machine::{EventBody, ProbeMode, ProbeStatus};
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
    let config = QueueConfig { pending_soft_max_count: 2, pending_max_count: 3, ..QueueConfig::default() };
    let mut queue = SharedQueue::new(Queue::open(dir.path(), host(), config, clock).expect("open"));
    let id = RolloutId::parse("stable@r1").expect("id");
    let t = datetime!(2026-11-25 12:00 UTC);
    let closure = Closure::parse("/nix/store/00000000000000000000000000000000-new").expect("closure");
    let started = |seq| {
        OutboundEvent::from_machine(
            seq,
            &EventBody::ActivationStarted { started_at: t, switch_method: "direct".into() },
        )
    };
    let probe = |seq| {
        OutboundEvent::from_machine(
            seq,
            &EventBody::ProbeResult {
                probe_name: "web".into(),
                mode: ProbeMode::Enforce,
                status: ProbeStatus::Fail,
                observed_at: t,
                failure_reason: None,
            },
        )
    };
    let decisive = |seq| {
        OutboundEvent::from_machine(
            seq,
            &EventBody::ActivationFailed { exit_code: 1, stderr_tail: String::new(), failed_at: t },
        )
    };
    let ack = OutboundEvent::from_machine(
        1,
        &EventBody::Activate {
            current_closure_at_dispatch: closure.clone(),
            target_closure: closure,
            soak_secs: 1,
            received_at: t,
        },
    );
    queue.append(&id, &ack).await.expect("below the soft cap");
    queue.append(&id, &started(2)).await.expect("below the soft cap");
    let refused = queue.append(&id, &probe(3)).await;
    assert!(matches!(refused, Err(JournalError::Full(_))), "{refused:?}");
    queue.append(&id, &decisive(3)).await.expect("the reserve takes a decisive event (the seq was not spent)");
    let refused = queue.append(&id, &decisive(4)).await;
    assert!(matches!(refused, Err(JournalError::Full(_))), "{refused:?}");
}

#[tokio::test]
async fn events_journaled_through_the_real_queue_rebuild_the_record_after_a_restart() {
    // Proves the agent's restart path on real files: the reducer writes
    // through the queue, a new process (queue reopened) rebuilds the same
    // record from pending + acked + rejected events and the cached manifest.
    let dir = tempfile::tempdir().expect("tempdir");
    let (queue, public, manifest) = setup(dir.path());
    let (cmds, _rx) = commands();
    let (mut reducer, _snap) = Reducer::new(Rollouts::new(host()), queue.clone(), cmds);
    reducer.handle(dispatch(&manifest)).await;
    let rid = manifest.rollout_id.clone();
    reducer
        .handle(Input::ActivationStarted {
            rollout_id: rid.clone(),
            switch_method: "setsid".into(),
            at: datetime!(2026-11-25 12:00:01 UTC),
        })
        .await;
    let live = reducer.rollouts().get(&rid).expect("slot").clone();
    assert_eq!(live.record.state, HostState::Activating);
    {
        // The CP acked the first event and rejected the second.
        let mut q = queue.lock();
        let pending = q.pending();
        q.ack(pending[0].qseq).expect("ack");
        q.reject(pending[1].qseq, "illegal for the CP's record").expect("reject");
        assert!(q.pending().is_empty());
    }
    drop(reducer);
    drop(queue);

    let reopened =
        Queue::open(dir.path(), host(), QueueConfig::default(), ClockHandle::manual(datetime!(2026-11-25 13:00 UTC)))
            .expect("reopen");
    let (rollouts, report) = restore(&reopened, dir.path(), &host(), &[public]).expect("restore");
    assert_eq!(report.restored, vec![rid.clone()]);
    assert_eq!(rollouts.get(&rid), Some(&live), "rejected events are part of the agent's history");
    assert_eq!(reopened.next_seq(&rid), live.record.last_seq + 1, "queue and record agree on the next seq");
}

#[tokio::test]
async fn a_rollout_accepted_under_a_key_no_longer_trusted_is_finished_under_its_accepted_manifest() {
    // Proves the trust-key rotation decision: the restarted agent keeps
    // the policy verified at acceptance (key recorded beside the
    // envelope) and reports the key, instead of inventing a `halt`
    // policy the CP then refuses (before the fix: FALLBACK_POLICY). A
    // live rollout whose manifest cannot be proven at all stops the
    // agent with an error naming the rollout and the file.
    let dir = tempfile::tempdir().expect("tempdir");
    let (queue, public, manifest) = setup(dir.path());
    let (cmds, _rx) = commands();
    let (mut reducer, _snap) = Reducer::new(Rollouts::new(host()), queue.clone(), cmds);
    reducer.handle(dispatch(&manifest)).await;
    let other = SigningKey::from_seed(&[4; 32]).public_key();
    let (rollouts, report) =
        restore(&queue.lock(), dir.path(), &host(), std::slice::from_ref(&other)).expect("restore");
    let slot = rollouts.get(&manifest.rollout_id).expect("rebuilt");
    assert_eq!(slot.policy, manifest.machine_policy(), "the accepted manifest's policy, not a guess");
    assert_eq!(slot.record.last_seq, 1);
    assert_eq!(report.untrusted_key, vec![(manifest.rollout_id.clone(), public.keyid())]);
    assert_eq!(
        rollouts.channels().newest("stable").map(|a| a.rollout_id.clone()),
        Some(manifest.rollout_id.clone()),
        "the accepted manifest also seeds the no-downgrade history"
    );

    fs_err::remove_file(dir.path().join(MANIFEST_DIR).join(format!("{}.key", manifest.rollout_id))).expect("rm");
    let err = restore(&queue.lock(), dir.path(), &host(), &[other]).expect_err("cannot be proven").to_string();
    assert!(err.contains(manifest.rollout_id.as_str()) && err.contains(MANIFEST_DIR), "{err}");
    assert!(err.contains("refusing to guess its policy"), "{err}");
}

/// A rollout Soaking through the real reducer and queue, every event
/// acked, the agent stopped; the record before the stop and the key.
async fn soaking_then_stopped(dir: &Path) -> (RolloutId, crate::agent::rollouts::Slot, PublicKey) {
    let (queue, public, manifest) = setup(dir);
    let (cmds, _rx) = commands();
    // As the agent: the durable channel history of the state dir.
    let mut rollouts = Rollouts::new(host());
    rollouts.set_channels(ChannelHistory::load(dir).expect("channels"));
    let (mut reducer, _snap) = Reducer::new(rollouts, queue.clone(), cmds);
    reducer.handle(dispatch(&manifest)).await;
    let rid = manifest.rollout_id.clone();
    let at = datetime!(2026-11-25 12:00:01 UTC);
    reducer.handle(Input::ActivationStarted { rollout_id: rid.clone(), switch_method: "setsid".into(), at }).await;
    let target = manifest.hosts[&host()].target_closure.clone();
    let order = reducer_order(&rid, &target);
    let outcome = crate::agent::activation::ActivationOutcome::Completed { observed: target };
    reducer.handle(Input::ActivationFinished { rollout_id: rid.clone(), order, outcome, at }).await;
    let live = reducer.rollouts().get(&rid).expect("slot").clone();
    assert_eq!(live.record.state, HostState::Soaking);
    {
        let mut q = queue.lock();
        for p in q.pending() {
            q.ack(p.qseq).expect("ack");
        }
    }
    (rid, live, public)
}

fn reducer_order(rid: &RolloutId, closure: &Closure) -> crate::agent::reducer::ActivationOrder {
    crate::agent::reducer::ActivationOrder {
        rollout_id: rid.clone(),
        closure: closure.clone(),
        rollback: false,
        number: 1,
        restore_boot_from: None,
    }
}

/// Corrupts the acked file of `kind`; its name.
fn rot(dir: &Path, kind: &str) -> String {
    let acked_dir = dir.join("outbound-queue/acked");
    let file = fs_err::read_dir(&acked_dir)
        .expect("acked")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(&format!("-{kind}.json")))
        .expect("on disk");
    fs_err::write(&file, b"{ bit rot").expect("corrupt");
    file.file_name().and_then(|n| n.to_str()).expect("name").to_owned()
}

/// A health-checks file with one enforce probe, `selftest`.
const ONE_ENFORCE_PROBE: &str = r#"{"probes":[{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","exit 0"],"timeout_secs":5}]}"#;

fn reopen(dir: &Path) -> Queue {
    let clock = ClockHandle::manual(datetime!(2026-11-25 13:00 UTC));
    Queue::open(dir, host(), QueueConfig::default(), clock).expect("reopen")
}

#[tokio::test]
async fn a_corrupt_dispatch_ack_of_a_soaking_rollout_is_rebuilt_exactly_and_replay_reports_it() {
    // Proves the fix of divergence 8 in docs/simulator.md: the rotted seq 1 (the DispatchAck, which alone
    // holds the rollback target) is rebuilt from the acceptance kept in
    // accepted-channels.json, so the restarted agent supervises the
    // soak with the same record (before: skipped with an ERROR, the host
    // unsupervised); the report and `replay --state-dir` name it.
    let dir = tempfile::tempdir().expect("tempdir");
    let (rid, live, public) = soaking_then_stopped(dir.path()).await;
    let name = rot(dir.path(), "DispatchAck");
    let reopened = reopen(dir.path());
    let (rollouts, report) = restore(&reopened, dir.path(), &host(), std::slice::from_ref(&public)).expect("restore");
    assert_eq!(rollouts.get(&rid), Some(&live), "the same record, rollback target included");
    assert_eq!(report.restored, vec![rid.clone()]);
    assert!(report.skipped.is_empty() && report.pruned.is_empty(), "{report:?}");
    let [(rebuilt, what)] = report.rebuilt.as_slice() else { panic!("{report:?}") };
    assert_eq!(rebuilt, &rid);
    assert!(what.contains("seq 1 (DispatchAck") && what.contains(&name), "{what}");
    assert!(what.contains("accepted-channels.json"), "{what}");
    drop(reopened);

    let key_path = dir.path().join("release.pub");
    fs_err::write(&key_path, public.to_text()).expect("key file");
    let replayed = crate::tools::replay::replay_queue(dir.path(), &[key_path], true);
    let err = replayed.expect_err("a lost record is a problem, even rebuilt").to_string();
    assert!(err.contains(rid.as_str()) && err.contains("seq 1 (DispatchAck") && err.contains("rebuilt"), "{err}");
}

#[tokio::test]
async fn a_lost_dispatch_ack_without_a_kept_acceptance_stops_the_agent_naming_the_rollout() {
    // Proves the loud stop: an accepted-channels.json written by an
    // older agent has no copy of the acceptance, so the rollback target
    // is unknowable; the live rollout is neither dropped nor guessed.
    let dir = tempfile::tempdir().expect("tempdir");
    let (rid, _live, public) = soaking_then_stopped(dir.path()).await;
    let name = rot(dir.path(), "DispatchAck");
    let file = dir.path().join(CHANNELS_FILE);
    let mut body: serde_json::Value = serde_json::from_slice(&fs_err::read(&file).expect("read")).expect("json");
    body["channels"]["stable"].as_object_mut().expect("entry").remove("dispatch").expect("kept");
    fs_err::write(&file, serde_json::to_vec(&body).expect("json")).expect("older format");
    let reopened = reopen(dir.path());
    let err = restore(&reopened, dir.path(), &host(), &[public]).expect_err("cannot be rebuilt").to_string();
    assert!(err.contains(rid.as_str()) && err.contains(&name) && err.contains("rollback target"), "{err}");
    assert!(err.contains("does not start"), "{err}");
}

#[tokio::test]
async fn a_corrupt_activation_started_is_rebuilt_with_its_time_and_an_unknown_switch_method() {
    // Proves a lost ActivationStarted (seq 2) no longer drops the rollout
    // nor leaves a hole: it is rebuilt with the time of the event before
    // it and the switch method marked unknown (nothing else names it), the
    // rest replays, and the next seq agrees with the queue.
    let dir = tempfile::tempdir().expect("tempdir");
    let (rid, live, public) = soaking_then_stopped(dir.path()).await;
    rot(dir.path(), "ActivationStarted");
    let reopened = reopen(dir.path());
    let (rollouts, report) = restore(&reopened, dir.path(), &host(), &[public]).expect("restore");
    let slot = rollouts.get(&rid).expect("rebuilt");
    assert_eq!(slot.record.state, HostState::Soaking);
    assert_eq!(slot.record.last_seq, live.record.last_seq);
    assert_eq!(slot.record.current_closure_at_dispatch, live.record.current_closure_at_dispatch);
    assert_eq!(slot.record.switch_method.as_deref(), Some(crate::agent::rebuild::UNKNOWN_SWITCH_METHOD));
    assert_eq!(slot.record.activation_started_at, live.record.dispatch_acked_at, "the time of the event before it");
    assert_eq!(reopened.next_seq(&rid), slot.record.last_seq + 1);
    assert!(report.rebuilt[0].1.contains("seq 2 (ActivationStarted") && report.rebuilt[0].1.contains("rebuilt from"));
}

#[tokio::test]
async fn a_rotted_pending_topology_and_first_observation_are_rebuilt_and_written_back() {
    // Proves what the simulator's soak found (SOAK_SEEDS 468, 557, 1057 heavy): the
    // ProbeTopologyDeclared (seq 4) and ProbeObservedFirst (seq 5) of a
    // soaking rollout rot while still pending. Before, the first stopped
    // the agent (the next probe event no longer replayed) and the second
    // was bridged in memory only, so the CP waited for seq 5 forever. Now
    // the topology is rebuilt from the health-checks file of the running
    // system and the first observation from the ProbeResult after it;
    // both are written back as pending records, the record is the one the
    // agent had, and the queue delivers seqs 4..6 in order.
    use crate::machine::{ProbeMode, ProbeStatus};
    let dir = tempfile::tempdir().expect("tempdir");
    let (queue, public, manifest) = setup(dir.path());
    let (cmds, _rx) = commands();
    let mut rollouts = Rollouts::new(host());
    rollouts.set_channels(ChannelHistory::load(dir.path()).expect("channels"));
    let (mut reducer, _snap) = Reducer::new(rollouts, queue.clone(), cmds);
    reducer.handle(dispatch(&manifest)).await;
    let rid = manifest.rollout_id.clone();
    let at = datetime!(2026-11-25 12:00:01 UTC);
    reducer.handle(Input::ActivationStarted { rollout_id: rid.clone(), switch_method: "setsid".into(), at }).await;
    let target = manifest.hosts[&host()].target_closure.clone();
    let outcome = crate::agent::activation::ActivationOutcome::Completed { observed: target.clone() };
    let order = reducer_order(&rid, &target);
    reducer.handle(Input::ActivationFinished { rollout_id: rid.clone(), order, outcome, at }).await;
    let checks = dir.path().join("health-checks.json");
    fs_err::write(&checks, ONE_ENFORCE_PROBE).expect("health checks");
    let probes = crate::agent::workers::probes::declared_topology(&checks);
    let at = datetime!(2026-11-25 12:00:02 UTC);
    reducer.handle(Input::ProbeTopology { rollout_id: rid.clone(), probes, at }).await;
    let probe_name = "selftest".to_owned();
    let run = Input::ProbeRun {
        rollout_id: rid.clone(),
        probe_name,
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Pass,
        reason: None,
        at: datetime!(2026-11-25 12:00:03 UTC),
    };
    reducer.handle(run).await;
    let live = reducer.rollouts().get(&rid).expect("slot").clone();
    assert_eq!(live.record.last_seq, 6, "1 ack, 2 started, 3 completed, 4 topology, 5 first seen, 6 result");
    let kinds_pending = |q: &Queue| q.pending().iter().map(|e| (e.seq(), e.kind().to_owned())).collect::<Vec<_>>();
    let before = kinds_pending(&queue.lock());
    drop((reducer, queue));
    for kind in ["ProbeTopologyDeclared", "ProbeObservedFirst"] {
        let file = fs_err::read_dir(dir.path().join("outbound-queue"))
            .expect("pending")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-{kind}.json")))
            .expect("pending on disk");
        fs_err::write(&file, b"{ bit rot").expect("corrupt");
    }
    let mut reopened = reopen(dir.path());
    let (rollouts, report) =
        restore_and_write_back(&mut reopened, dir.path(), &checks, &host(), &[public]).expect("restore");
    assert_eq!(rollouts.get(&rid), Some(&live), "the record the agent had");
    assert_eq!(report.written_back, vec![(rid.clone(), 4), (rid.clone(), 5)], "{report:?}");
    let [(_, what)] = report.rebuilt.as_slice() else { panic!("{report:?}") };
    assert!(what.contains("health-checks file") && what.contains("ProbeResult after it"), "{what}");
    assert_eq!(kinds_pending(&reopened), before, "every seq pending again, in order, for the drainer");
}

#[test]
fn a_lost_decision_of_a_rollout_that_is_over_is_skipped_loudly_not_a_stop() {
    // Proves the other side of the loud stop: a rotted ActivationFailed in
    // a rollout whose RollbackComplete survived cannot be rebuilt, but the
    // rollout no longer acts on the host, so the agent starts and reports it.
    use crate::machine::EventBody;
    let dir = tempfile::tempdir().expect("tempdir");
    let (queue, public, manifest) = setup(dir.path());
    let rid = manifest.rollout_id.clone();
    let old = Closure::parse("/nix/store/00000000000000000000000000000000-old").expect("valid");
    let new = manifest.hosts[&host()].target_closure.clone();
    let t = datetime!(2026-11-25 12:00 UTC);
    let bodies = [
        EventBody::Activate {
            current_closure_at_dispatch: old.clone(),
            target_closure: new,
            soak_secs: 300,
            received_at: t,
        },
        EventBody::ActivationFailed { exit_code: 1, stderr_tail: "boom".into(), failed_at: t },
        EventBody::RollbackCompleted { reverted_to_closure: old, exit_code: 0, completed_at: t },
    ];
    {
        let mut q = queue.lock();
        for (i, body) in bodies.iter().enumerate() {
            q.enqueue(&rid, &OutboundEvent::from_machine(i as u64 + 1, body)).expect("enqueue");
        }
        for p in q.pending() {
            q.ack(p.qseq).expect("ack");
        }
    }
    drop(queue);
    let name = rot(dir.path(), "ActivationFailed");
    let reopened = reopen(dir.path());
    let (rollouts, report) = restore(&reopened, dir.path(), &host(), &[public]).expect("starts");
    assert!(rollouts.get(&rid).is_none());
    let [(skipped, why)] = report.skipped.as_slice() else { panic!("{report:?}") };
    assert_eq!(skipped, &rid);
    assert!(why.contains("seq 2") && why.contains(&name) && why.contains("ActivationFailed"), "{why}");
}
