//! The reducer on an in-memory journal: write-ahead, retries, restarts,
//! one live rollout, no downgrade, fresh evidence, a full queue.

use time::Duration;

use super::*;
use crate::agent::channels::ChannelHistory;
use crate::agent::testkit::{closure, host, policy, rid, MemJournal, T0};
use crate::machine::{Event, ProbeKind, RejectCode};

fn dispatch() -> Input {
    Input::Dispatch {
        rollout_id: rid(),
        policy: policy(),
        target_closure: closure('1'),
        soak_secs: 30,
        current_closure: closure('0'),
        issued_at: T0,
        at: T0,
    }
}

fn reducer(journal: MemJournal) -> (Reducer<MemJournal>, CommandReceivers) {
    let (cmds, rx) = commands();
    let (r, _snapshot) = Reducer::new(Rollouts::new(host()), journal, cmds);
    (r, rx)
}

/// A reducer restarted from the journal, after its `resume`.
fn restarted(journal: &MemJournal) -> (Reducer<MemJournal>, CommandReceivers) {
    let mut restored = Rollouts::new(host());
    restored.restore(rid(), policy(), &journal.local_events()).expect("restore");
    let (cmds, rx) = commands();
    let (mut again, _snapshot) = Reducer::new(restored, journal.clone(), cmds);
    again.resume();
    (again, rx)
}

#[tokio::test(start_paused = true)]
async fn a_failing_probe_rolls_back_and_every_step_is_journaled_before_acting() {
    // Proves the reducer's whole decision path: dispatch → activation order,
    // probes planned on completion, sustained failure → rollback order,
    // rollback outcome → Reverted, each event journaled in seq order.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    r.handle(dispatch()).await;
    let order = rx.activation.borrow().clone().expect("activation ordered");
    assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
    r.handle(dispatch()).await; // repeated long-poll answer
    assert_eq!(journal.kinds(), vec!["DispatchAck"], "a repeated dispatch is ignored");

    let done = ActivationOutcome::Completed { observed: closure('1') };
    let at = T0 + Duration::seconds(5);
    r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: done, at }).await;
    assert_eq!(rx.probes.borrow().rollout_id, Some(rid()), "probes planned for the new system");
    let probes = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
    r.handle(Input::ProbeTopology { rollout_id: rid(), probes, at }).await;
    let fail = |secs| Input::ProbeRun {
        rollout_id: rid(),
        probe_name: "web".into(),
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Fail,
        reason: Some("HTTP 503".into()),
        at: T0 + Duration::seconds(secs),
    };
    r.handle(fail(10)).await;
    r.handle(fail(40)).await;
    r.handle(Input::Tick { now: T0 + Duration::seconds(69) }).await;
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking);
    r.handle(Input::Tick { now: T0 + Duration::seconds(70) }).await;
    let order = rx.activation.borrow().clone().expect("rollback ordered");
    assert_eq!((order.closure.clone(), order.rollback), (closure('0'), true));
    assert_eq!(rx.probes.borrow().rollout_id, None, "probes stop on a failed host");
    let back = ActivationOutcome::Completed { observed: closure('0') };
    r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: back, at: T0 + Duration::seconds(80) })
        .await;
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Reverted);
    assert_eq!(
        journal.kinds(),
        vec![
            "DispatchAck",
            "ActivationCompleted",
            "ProbeTopologyDeclared",
            "ProbeObservedFirst",
            "ProbeResult",
            "ProbeFailureFirst",
            "Failed",
            "RollbackComplete"
        ],
        "the second failing result is no change: no event"
    );
    let seqs: Vec<u64> = journal.local_events().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>(), "seq starts at 1, +1 per event, no gaps");
}

#[tokio::test(start_paused = true)]
async fn a_full_disk_holds_the_state_back_until_the_event_is_durable() {
    // Proves write-ahead under ENOSPC: no switch is ordered and the record
    // stays Pending while appends fail; once space returns the event is
    // journaled exactly once and the switch is ordered.
    let journal = MemJournal::default();
    *journal.failures_left.lock().expect("lock") = 5;
    let (r, rx) = reducer(journal.clone());
    let (tx, inputs) = mpsc::channel(INPUT_CAPACITY);
    let snapshot = r.snapshot.subscribe();
    let task = tokio::spawn(async move {
        r.run(inputs).await;
    });
    tx.send(dispatch()).await.expect("send");
    // Let the reducer hit the failures (time is paused: sleeps advance
    // instantly once every task is idle).
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert!(rx.activation.borrow().is_none(), "no switch before the event is durable");
    assert!(journal.kinds().is_empty());
    drop(tx);
    task.await.expect("reducer ends");
    assert_eq!(journal.kinds(), vec!["DispatchAck"]);
    assert_eq!(*journal.failures_left.lock().expect("lock"), 0);
    assert!(rx.activation.borrow().is_some(), "activation ordered after the append succeeded");
    assert_eq!(snapshot.borrow().last_seqs().get(&rid()), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_reducer_reissues_the_unfinished_switch_and_probes() {
    // Proves restart recovery: records rebuilt from the journal, then
    // `resume` re-orders the switch of an Activating rollout.
    let journal = MemJournal::default();
    let (mut r, _rx) = reducer(journal.clone());
    r.handle(dispatch()).await;
    let (mut again, rx) = restarted(&journal);
    let order = rx.activation.borrow().clone().expect("switch re-ordered");
    assert_eq!((order.closure, order.rollback), (closure('1'), false));
    again.handle(dispatch()).await;
    assert_eq!(journal.kinds(), vec!["DispatchAck"], "the CP's repeated dispatch is still ignored");
}

#[tokio::test(start_paused = true)]
async fn a_restart_before_the_reboot_keeps_waiting_without_a_second_deferred_event() {
    // Proves a Deferred rollout survives a restart that comes before the
    // reboot: `resume` re-orders the (idempotent) boot setup, its Deferred
    // outcome adds no event, and the reboot still completes it.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    r.handle(dispatch()).await;
    let order = rx.activation.borrow().clone().expect("activation ordered");
    let deferred = || ActivationOutcome::Deferred { component: "kernel".into() };
    r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: deferred(), at: T0 }).await;
    let (mut again, rx) = restarted(&journal);
    let order = rx.activation.borrow().clone().expect("boot setup re-ordered");
    assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
    let at = T0 + Duration::seconds(5);
    again.handle(Input::ActivationFinished { rollout_id: rid(), order: order.clone(), outcome: deferred(), at }).await;
    assert_eq!(journal.kinds(), vec!["DispatchAck", "ActivationDeferred"], "nothing new before the reboot");
    assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Deferred);
    let booted = ActivationOutcome::Completed { observed: closure('1') };
    let at = T0 + Duration::seconds(60);
    again.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: booted, at }).await;
    assert_eq!(journal.kinds(), vec!["DispatchAck", "ActivationDeferred", "ActivationCompleted"]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_dispatch_is_journaled_and_activates_nothing() {
    // Proves DispatchRejected: a Failed record, no activation ordered.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    let refuse = Input::RefuseDispatch {
        rollout_id: rid(),
        policy: policy(),
        target_closure: closure('1'),
        reason: "manifest signature does not verify".into(),
        at: T0,
    };
    r.handle(refuse).await;
    assert_eq!(journal.kinds(), vec!["DispatchRejected"]);
    assert!(rx.activation.borrow().is_none());
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Failed);
}

fn dispatch_of(id: &str, target: char, issued_at: Timestamp, at: Timestamp) -> Input {
    Input::Dispatch {
        rollout_id: RolloutId::parse(id).expect("valid"),
        policy: policy(),
        target_closure: closure(target),
        soak_secs: 30,
        current_closure: closure('0'),
        issued_at,
        at,
    }
}

fn secs(n: i64) -> Timestamp {
    T0 + Duration::seconds(n)
}

fn probe(status: ProbeStatus, at: Timestamp) -> Input {
    Input::ProbeRun {
        rollout_id: rid(),
        probe_name: "web".into(),
        mode: ProbeMode::Enforce,
        status,
        reason: (status == ProbeStatus::Fail).then(|| "HTTP 503".to_owned()),
        at,
    }
}

/// Events of one rollout as (seq, body).
fn events_of(journal: &MemJournal, id: &str) -> Vec<(u64, EventBody)> {
    let id = RolloutId::parse(id).expect("valid");
    let events = journal.events.lock().expect("lock");
    events.iter().filter(|(r, _)| *r == id).map(|(_, e)| (e.seq, e.to_body().expect("valid"))).collect()
}

/// Every rollout of the journal rebuilt, as a restarted agent does, and
/// `resume` run; `channels` is the durable history it would load.
fn restarted_all(journal: &MemJournal, channels: ChannelHistory) -> (Reducer<MemJournal>, CommandReceivers) {
    let mut restored = Rollouts::new(host());
    let ids: std::collections::BTreeSet<RolloutId> =
        journal.events.lock().expect("lock").iter().map(|(r, _)| r.clone()).collect();
    for id in ids {
        let events: Vec<Event> = journal
            .events
            .lock()
            .expect("lock")
            .iter()
            .filter(|(r, _)| *r == id)
            .map(|(_, e)| e.to_local().expect("valid"))
            .collect();
        restored.restore(id, policy(), &events).expect("restore");
    }
    restored.set_channels(channels);
    let (cmds, rx) = commands();
    let (mut again, _snapshot) = Reducer::new(restored, journal.clone(), cmds);
    again.resume();
    (again, rx)
}

/// A (rid) soaking with its enforce probe failing since `secs(10)`.
async fn soaking_and_failing(r: &mut Reducer<MemJournal>, rx: &CommandReceivers) {
    r.handle(dispatch()).await;
    let order = rx.activation.borrow().clone().expect("activation ordered");
    let done = ActivationOutcome::Completed { observed: closure('1') };
    r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: done, at: secs(5) }).await;
    let probes = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
    r.handle(Input::ProbeTopology { rollout_id: rid(), probes, at: secs(5) }).await;
    r.handle(probe(ProbeStatus::Fail, secs(10))).await;
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.failure_clock_since, Some(secs(10)));
}

#[tokio::test(start_paused = true)]
async fn a_dispatch_while_another_rollout_is_live_is_refused_busy_once_and_admitted_after_it_ends() {
    // Proves one live rollout per host on the agent (`docs/protocol.md` §3 rule 8): B offered while A
    // soaks (probe failing) is answered `busy` (durable, B stays Pending), repeats are ignored,
    // A's gate and rollback run while B waits, and B's next offer after A
    // is over activates it with the next seq. Before the fix B was
    // accepted while A soaked, and A's gate then rolled the host back.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    soaking_and_failing(&mut r, &rx).await;
    let b = RolloutId::parse("stable@r2").expect("valid");
    r.handle(dispatch_of("stable@r2", '2', T0, secs(20))).await;
    let b_events = events_of(&journal, "stable@r2");
    assert_eq!(b_events.len(), 1, "{b_events:?}");
    let EventBody::DispatchRejected { code, reason, .. } = &b_events[0].1 else { panic!("{b_events:?}") };
    assert_eq!(*code, RejectCode::Busy);
    assert!(reason.contains("stable@r1") && reason.contains("Soaking"), "{reason}");
    assert_eq!(r.rollouts().get(&b).expect("slot").record.state, HostState::Pending);
    assert!(r.rollouts().answered(&b), "the long-poll skips B's repeats while A is live");
    r.handle(dispatch_of("stable@r2", '2', T0, secs(21))).await;
    assert_eq!(events_of(&journal, "stable@r2").len(), 1, "a repeated offer is ignored");
    assert_eq!(rx.activation.borrow().as_ref().map(|o| o.rollout_id.clone()), Some(rid()), "B never switched");

    r.handle(probe(ProbeStatus::Fail, secs(11))).await;
    r.handle(Input::Tick { now: secs(70) }).await;
    let order = rx.activation.borrow().clone().expect("A's rollback");
    assert_eq!((order.rollout_id.clone(), order.closure.clone(), order.rollback), (rid(), closure('0'), true));
    r.handle(dispatch_of("stable@r2", '2', T0, secs(71))).await;
    assert_eq!(events_of(&journal, "stable@r2").len(), 1, "still busy while A rolls back");
    let back = ActivationOutcome::Completed { observed: closure('0') };
    r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: back, at: secs(80) }).await;
    assert!(!r.rollouts().answered(&b), "A is over: B's next offer gets an answer");
    r.handle(dispatch_of("stable@r2", '2', T0, secs(90))).await;
    let b_events = events_of(&journal, "stable@r2");
    assert_eq!(b_events.len(), 2);
    assert!(matches!(b_events[1], (2, EventBody::Activate { .. })), "{b_events:?}");
    let order = rx.activation.borrow().clone().expect("B's switch");
    assert_eq!((order.rollout_id, order.closure), (b, closure('2')));
    let a_before = events_of(&journal, "stable@r1").len();
    r.handle(Input::Tick { now: secs(500) }).await;
    assert_eq!(events_of(&journal, "stable@r1").len(), a_before, "nothing of A after B was accepted");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_that_refused_b_busy_admits_b_once_a_has_ended() {
    // Proves the restart path of one live rollout per host: the busy refusal is durable (no
    // second refusal after the restart while A is live), and once A has
    // ended the restarted agent activates B with the next seq.
    let journal = MemJournal::default();
    let (mut r, _rx) = reducer(journal.clone());
    r.handle(dispatch()).await;
    r.handle(dispatch_of("stable@r2", '2', T0, secs(1))).await;
    let (mut again, rx) = restarted_all(&journal, r.rollouts().channels().clone());
    again.handle(dispatch_of("stable@r2", '2', T0, secs(2))).await;
    assert_eq!(events_of(&journal, "stable@r2").len(), 1, "no second busy after the restart");
    let order = rx.activation.borrow().clone().expect("A's switch re-ordered");
    assert_eq!(order.rollout_id, rid());
    let failed = ActivationOutcome::Failed { exit_code: 1, stderr_tail: "boom".into() };
    again.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: failed, at: secs(3) }).await;
    let rollback = rx.activation.borrow().clone().expect("A's rollback");
    assert!(rollback.rollback);
    let back = ActivationOutcome::Completed { observed: closure('0') };
    again.handle(Input::ActivationFinished { rollout_id: rid(), order: rollback, outcome: back, at: secs(4) }).await;
    assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Reverted);
    again.handle(dispatch_of("stable@r2", '2', T0, secs(5))).await;
    let b_events = events_of(&journal, "stable@r2");
    assert!(
        matches!(b_events.as_slice(), [(1, EventBody::DispatchRejected { .. }), (2, EventBody::Activate { .. })]),
        "{b_events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_older_manifest_on_a_channel_is_refused_stale_even_after_a_restart() {
    // Proves no downgrade (`docs/protocol.md` §3 rule 9): after accepting stable@v2 (durably, before its
    // DispatchAck), stable@v1 is refused `stale` naming both, also by a
    // restarted agent that reloads the file; a manifest dated beyond the
    // clock-skew bound is refused. Before the fix v1 was activated.
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = MemJournal::default();
    let (mut r, _rx) = reducer(journal.clone());
    r.rollouts.set_channels(ChannelHistory::load(dir.path()).expect("load"));
    let hour = Duration::hours(1);
    r.handle(dispatch_of("stable@v2", '2', T0 + hour, T0 + hour)).await;
    assert!(matches!(events_of(&journal, "stable@v2").as_slice(), [(1, EventBody::Activate { .. })]));
    let order = r.commands.activation.borrow().clone().expect("v2 switch");
    let done = ActivationOutcome::Completed { observed: closure('2') };
    r.handle(Input::ActivationFinished { rollout_id: order.rollout_id.clone(), order, outcome: done, at: T0 + hour })
        .await;
    let probes = vec![];
    let v2 = RolloutId::parse("stable@v2").expect("valid");
    r.handle(Input::ProbeTopology { rollout_id: v2.clone(), probes, at: T0 + hour }).await;
    r.handle(Input::Tick { now: T0 + hour + Duration::seconds(30) }).await;
    assert_eq!(r.rollouts().get(&v2).expect("slot").record.state, HostState::Converged);

    let reloaded = ChannelHistory::load(dir.path()).expect("reload");
    let (mut again, rx) = restarted_all(&journal, reloaded);
    again.handle(dispatch_of("stable@v1", '1', T0, T0 + 2 * hour)).await;
    let v1 = events_of(&journal, "stable@v1");
    let [(1, EventBody::DispatchRejected { code: RejectCode::Stale, reason, .. })] = v1.as_slice() else {
        panic!("{v1:?}")
    };
    assert!(reason.contains("stable@v1") && reason.contains("stable@v2"), "{reason}");
    assert_eq!(rx.activation.borrow().as_ref().map(|o| o.rollout_id.clone()), None, "no switch back");

    let now = T0 + 2 * hour;
    again.handle(dispatch_of("canary@f1", '3', now + Duration::minutes(6), now)).await;
    let future = events_of(&journal, "canary@f1");
    let [(1, EventBody::DispatchRejected { code: RejectCode::Refused, reason, .. })] = future.as_slice() else {
        panic!("{future:?}")
    };
    assert!(reason.contains("ahead of this host's clock"), "{reason}");
    again.handle(dispatch_of("canary@f2", '3', now + Duration::minutes(4), now)).await;
    assert!(matches!(events_of(&journal, "canary@f2").as_slice(), [(1, EventBody::Activate { .. })]));
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_the_failure_gate_waits_for_fresh_results_and_counts_from_this_run() {
    // Proves fresh evidence (`docs/protocol.md` §3 rule 6): a probe failing since 10 s before the restart does
    // not fail the host on pre-restart observations (before the fix the
    // first tick after the restart rolled back); the threshold counts
    // from the first failure this run saw, and the machine accepts it.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    soaking_and_failing(&mut r, &rx).await;
    let (mut again, rx) = restarted_all(&journal, ChannelHistory::in_memory());
    again.handle(Input::Tick { now: secs(75) }).await;
    assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking, "no fresh evidence");
    again.handle(probe(ProbeStatus::Fail, secs(80))).await;
    again.handle(Input::Tick { now: secs(139) }).await;
    assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking);
    again.handle(Input::Tick { now: secs(140) }).await;
    let record = &again.rollouts().get(&rid()).expect("slot").record;
    assert_eq!(record.state, HostState::Failed);
    let last = events_of(&journal, "stable@r1").pop().expect("event");
    assert!(matches!(last.1, EventBody::SustainedFailureCrossed { sustained_duration_secs: 60, .. }), "{last:?}");
    assert!(rx.activation.borrow().as_ref().is_some_and(|o| o.rollback));

    // A service that recovered while the agent was down: the first fresh
    // result passes, the clock resets, nothing fails.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    soaking_and_failing(&mut r, &rx).await;
    let (mut again, _rx) = restarted_all(&journal, ChannelHistory::in_memory());
    again.handle(Input::Tick { now: secs(24) }).await;
    again.handle(probe(ProbeStatus::Pass, secs(24))).await;
    again.handle(Input::Tick { now: secs(300) }).await;
    let record = &again.rollouts().get(&rid()).expect("slot").record;
    assert_eq!((record.state, record.failure_clock_since), (HostState::Converged, None));
}

#[tokio::test(start_paused = true)]
async fn steady_probe_results_add_no_events_and_a_full_queue_never_blocks_a_decision() {
    // Proves that steady results are no events: a probe failing at 1 Hz for 100 s journals one
    // result (before the fix: 100); under a full queue a visibility
    // event is dropped without blocking the reducer and the sustained
    // failure (decisive, through the queue's reserve) still goes out,
    // counted from the failure this run saw after the unrecorded pass.
    let journal = MemJournal::default();
    let (mut r, rx) = reducer(journal.clone());
    soaking_and_failing(&mut r, &rx).await;
    for t in 11..40 {
        r.handle(probe(ProbeStatus::Fail, secs(t))).await;
    }
    let results = |j: &MemJournal| j.kinds().iter().filter(|k| **k == "ProbeResult").count();
    assert_eq!(results(&journal), 1);
    r.handle(probe(ProbeStatus::Pass, secs(40))).await;
    r.handle(probe(ProbeStatus::Fail, secs(41))).await;
    assert_eq!(results(&journal), 3, "each change is an event");
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.failure_clock_since, Some(secs(41)));

    let held = journal.events.lock().expect("lock").len();
    *journal.full_at.lock().expect("lock") = Some(held);
    r.handle(probe(ProbeStatus::Pass, secs(50))).await; // dropped: queue full
    r.handle(probe(ProbeStatus::Fail, secs(51))).await;
    assert_eq!(journal.events.lock().expect("lock").len(), held);
    r.handle(Input::Tick { now: secs(101) }).await;
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking, "60 s since 51 s, not 41 s");
    r.handle(Input::Tick { now: secs(111) }).await;
    assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Failed);
    assert_eq!(journal.kinds().last(), Some(&"Failed"));
}
