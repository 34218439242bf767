//! The probe and tick workers against the reducer's input channel, and the
//! activation worker's exits. Scheduling is tested under paused tokio time
//! with a counting runner; real child processes run under real time (paused
//! time would jump past an exec probe's timeout while the child runs).
//! The activation worker's switching is tested against real Nix closures in
//! `tests/it/workers.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::macros::datetime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::agent::activation::ActivationConfig;
use crate::agent::probes::{HostRunner, Probe, ProbeRun, ProbeRunner};
use crate::agent::reducer::{ActivationOrder, Input, ProbePlan, INPUT_CAPACITY};
use crate::clock::ClockHandle;
use crate::ids::RolloutId;
use crate::machine::{ProbeDecl, ProbeKind, ProbeMode, ProbeStatus, Timestamp};

const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);

fn rid(name: &str) -> RolloutId {
    RolloutId::parse(&format!("stable@{name}")).expect("valid")
}

/// Counts runs per probe name; every run passes.
#[derive(Debug, Clone, Default)]
struct CountingRunner {
    runs: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl CountingRunner {
    fn counts(&self) -> BTreeMap<String, u32> {
        self.runs.lock().expect("lock").clone()
    }
}

impl ProbeRunner for CountingRunner {
    async fn run(&self, probe: &Probe) -> ProbeRun {
        *self.runs.lock().expect("lock").entry(probe.name.clone()).or_default() += 1;
        ProbeRun::pass()
    }
}

struct ProbeHarness {
    plan: watch::Sender<ProbePlan>,
    inputs: mpsc::Receiver<Input>,
    trigger: ShutdownTrigger,
    worker: JoinHandle<WorkerExit>,
    clock: ClockHandle,
    _dir: tempfile::TempDir,
}

fn probe_worker<R: ProbeRunner + Send + Sync + 'static>(checks: Option<&str>, runner: R) -> ProbeHarness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("health-checks.json");
    if let Some(text) = checks {
        fs_err::write(&path, text).expect("write checks");
    }
    let (plan, plan_rx) = watch::channel(ProbePlan::default());
    let (tx, inputs) = mpsc::channel(INPUT_CAPACITY);
    let (trigger, shutdown) = shutdown_channel();
    let clock = ClockHandle::manual(T0);
    let worker = tokio::spawn(run_probe_worker(path, runner, plan_rx, tx, clock.clone(), shutdown));
    ProbeHarness { plan, inputs, trigger, worker, clock, _dir: dir }
}

impl ProbeHarness {
    fn order(&self, rollout_id: Option<RolloutId>, number: u64) {
        self.plan.send_replace(ProbePlan { rollout_id, number });
    }

    async fn next(&mut self) -> Input {
        tokio::time::timeout(Duration::from_secs(120), self.inputs.recv())
            .await
            .expect("an input within 120 s")
            .expect("worker alive")
    }

    async fn topology(&mut self) -> (RolloutId, Vec<ProbeDecl>) {
        match self.next().await {
            Input::ProbeTopology { rollout_id, probes, .. } => (rollout_id, probes),
            other => panic!("expected a topology, got {other:?}"),
        }
    }

    fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.inputs.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

fn exec(name: &str, mode: &str, interval_secs: u64, program: &str) -> String {
    format!(
        r#"{{"name":"{name}","kind":"exec","mode":"{mode}","interval_secs":{interval_secs},"argv":["{program}"],"timeout_secs":5}}"#
    )
}

fn file(probes: &[String]) -> String {
    format!(r#"{{"probes":[{}]}}"#, probes.join(","))
}

#[tokio::test]
async fn real_probe_processes_report_pass_and_fail_after_the_topology() {
    // Proves the worker declares every probe (disabled too), runs the
    // non-disabled ones at once with the real runner, and stamps results
    // with the injected clock.
    let checks = file(&[
        exec("up", "enforce", 60, "true"),
        exec("down", "observe", 60, "false"),
        exec("off", "disabled", 60, "false"),
    ]);
    let mut h = probe_worker(Some(&checks), HostRunner::default());
    h.order(Some(rid("r1")), 1);
    let (rollout_id, probes) = h.topology().await;
    assert_eq!(rollout_id, rid("r1"));
    let names: Vec<(&str, ProbeKind, ProbeMode)> = probes.iter().map(|p| (p.name.as_str(), p.kind, p.mode)).collect();
    assert_eq!(
        names,
        vec![
            ("up", ProbeKind::Exec, ProbeMode::Enforce),
            ("down", ProbeKind::Exec, ProbeMode::Observe),
            ("off", ProbeKind::Exec, ProbeMode::Disabled)
        ]
    );
    let mut results = BTreeMap::new();
    for _ in 0..2 {
        match h.next().await {
            Input::ProbeRun { rollout_id, probe_name, mode, status, reason, at } => {
                assert_eq!((rollout_id, at), (rid("r1"), T0));
                results.insert(probe_name, (mode, status, reason));
            }
            other => panic!("expected a probe run, got {other:?}"),
        }
    }
    assert_eq!(results["up"], (ProbeMode::Enforce, ProbeStatus::Pass, None));
    let (mode, status, reason) = &results["down"];
    assert_eq!((*mode, *status), (ProbeMode::Observe, ProbeStatus::Fail));
    assert!(reason.as_deref().is_some_and(|r| r.contains("false exited 1")), "{reason:?}");
    assert!(!results.contains_key("off"), "a disabled probe is declared, never run");
    h.trigger.trigger();
    assert_eq!(h.worker.await.expect("join"), WorkerExit::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn each_probe_runs_on_its_own_interval_and_a_new_plan_stops_the_old_loops() {
    // Proves per-probe intervals, that a plan without a rollout stops every
    // loop (no run at all during a virtual hour), and that a later plan
    // starts the loops again for the new rollout.
    let runner = CountingRunner::default();
    let checks = file(&[exec("fast", "enforce", 1, "x"), exec("slow", "enforce", 10, "x")]);
    let mut h = probe_worker(Some(&checks), runner.clone());
    h.order(Some(rid("r1")), 1);
    assert_eq!(h.topology().await.0, rid("r1"));
    let start = tokio::time::Instant::now();
    let mut fast_runs = Vec::new();
    while fast_runs.len() < 21 {
        if let Input::ProbeRun { probe_name, rollout_id, .. } = h.next().await {
            assert_eq!(rollout_id, rid("r1"));
            if probe_name == "fast" {
                fast_runs.push(tokio::time::Instant::now() - start);
            }
        }
    }
    assert_eq!(fast_runs[0], Duration::ZERO, "first run at once");
    assert_eq!(fast_runs[20], Duration::from_secs(20), "then every second");
    assert_eq!(runner.counts()["slow"], 3, "the 10 s probe ran at 0, 10 and 20 s");

    h.order(None, 2);
    tokio::time::sleep(Duration::from_secs(5)).await; // virtual: lets the worker see the plan
    h.drain();
    let stopped = runner.counts();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(runner.counts(), stopped, "no loop of the old plan ran after it was replaced");
    assert_eq!(h.drain(), 0, "and nothing was reported");

    h.order(Some(rid("r2")), 3);
    assert_eq!(h.topology().await.0, rid("r2"));
    match h.next().await {
        Input::ProbeRun { rollout_id, .. } => assert_eq!(rollout_id, rid("r2")),
        other => panic!("expected a run, got {other:?}"),
    }
    h.trigger.trigger();
    assert_eq!(h.worker.await.expect("join"), WorkerExit::Shutdown);
    let after_shutdown = runner.counts();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(runner.counts(), after_shutdown, "shutdown left no loop behind");
}

#[tokio::test(start_paused = true)]
async fn an_invalid_file_is_a_failing_enforce_probe_reported_every_interval() {
    // Proves a broken health-checks file cannot converge: it is declared as
    // one enforce probe that fails with the parse error, again and again.
    let checks = r#"{"probes":[{"name":"p","kind":"exec","mode":"enforce","argv":["true"],"timeout_secs":0}]}"#;
    let mut h = probe_worker(Some(checks), CountingRunner::default());
    h.order(Some(rid("r1")), 1);
    let (_, probes) = h.topology().await;
    assert_eq!(
        probes,
        vec![ProbeDecl { name: HEALTH_CHECKS_FILE_PROBE.into(), kind: ProbeKind::Exec, mode: ProbeMode::Enforce }]
    );
    let start = tokio::time::Instant::now();
    for n in 0..3u32 {
        h.clock.set(T0 + time::Duration::minutes(i64::from(n)));
        match h.next().await {
            Input::ProbeRun { probe_name, mode, status, reason, .. } => {
                assert_eq!(
                    (probe_name.as_str(), mode, status),
                    (HEALTH_CHECKS_FILE_PROBE, ProbeMode::Enforce, ProbeStatus::Fail)
                );
                let reason = reason.expect("a reason");
                assert!(reason.contains("probes[0].timeout_secs"), "the parse error names the field: {reason}");
            }
            other => panic!("expected a run, got {other:?}"),
        }
        assert_eq!(tokio::time::Instant::now() - start, probes::INVALID_FILE_REPORT_INTERVAL * n);
    }
    drop(h.inputs);
    assert_eq!(h.worker.await.expect("join"), WorkerExit::ReducerGone, "a closed input channel stops the worker");
}

/// Panics on every run of the probe named "boom"; every other probe passes.
#[derive(Debug, Clone, Default)]
struct PanickingRunner;

impl ProbeRunner for PanickingRunner {
    async fn run(&self, probe: &Probe) -> ProbeRun {
        tokio::task::yield_now().await;
        assert_ne!(probe.name, "boom", "runner bug on purpose");
        ProbeRun::pass()
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_runner_reports_a_failure_every_interval_instead_of_going_silent() {
    // Proves a runner bug cannot hold a host Soaking forever or let it
    // converge: the panicking probe fails on every run, the others go on.
    let checks = file(&[exec("boom", "enforce", 10, "true"), exec("fine", "enforce", 10, "true")]);
    let mut h = probe_worker(Some(&checks), PanickingRunner);
    h.order(Some(rid("r1")), 1);
    let _ = h.topology().await;
    let mut seen: BTreeMap<String, Vec<(ProbeStatus, Option<String>)>> = BTreeMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < 6 {
        match h.next().await {
            Input::ProbeRun { probe_name, status, reason, .. } => {
                seen.entry(probe_name).or_default().push((status, reason))
            }
            other => panic!("expected a run, got {other:?}"),
        }
    }
    assert_eq!(seen["fine"].iter().map(|r| r.0).collect::<Vec<_>>(), vec![ProbeStatus::Pass; 3]);
    for (status, reason) in &seen["boom"] {
        assert_eq!(*status, ProbeStatus::Fail);
        let reason = reason.as_deref().expect("a reason");
        assert!(reason.contains("panicked") && reason.contains("runner bug on purpose"), "{reason}");
    }
    assert_eq!(seen["boom"].len(), 3, "the probe keeps reporting after a panic");
}

#[tokio::test(start_paused = true)]
async fn a_missing_file_declares_an_empty_topology_and_runs_nothing() {
    // Proves a closure without health checks declares "no probes" (so it can
    // converge on soak time) and starts no loop.
    let runner = CountingRunner::default();
    let mut h = probe_worker(None, runner.clone());
    h.order(Some(rid("r1")), 1);
    assert_eq!(h.topology().await, (rid("r1"), Vec::new()));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(h.drain(), 0);
    assert!(runner.counts().is_empty());
    drop(h.plan);
    assert_eq!(h.worker.await.expect("join"), WorkerExit::ReducerGone, "a dropped plan sender stops the worker");
}

#[tokio::test(start_paused = true)]
async fn ticks_come_at_the_interval_stamped_by_the_injected_clock() {
    // Proves the tick pace (first at once, then every interval, late ticks
    // delayed rather than bursting) and that `now` is the clock's, not tokio's.
    // Capacity 1: the worker blocks in `send` as soon as one tick waits.
    let (tx, mut rx) = mpsc::channel(1);
    let (trigger, shutdown) = shutdown_channel();
    let clock = ClockHandle::manual(T0);
    let worker = tokio::spawn(run_tick_worker(Duration::from_secs(5), tx, clock.clone(), shutdown));
    let start = tokio::time::Instant::now();
    let elapsed = || tokio::time::Instant::now() - start;
    for n in 0..4i64 {
        clock.set(T0 + time::Duration::hours(n));
        let Some(Input::Tick { now }) = rx.recv().await else { panic!("a tick") };
        assert_eq!(now, T0 + time::Duration::hours(n));
        assert_eq!(elapsed(), Duration::from_secs(5 * n as u64));
    }
    // The reducer stalls from 15 s to 37 s: the 20 s tick waits in the
    // channel, the 25 s tick's send blocks until 37 s, the 30 s and 35 s
    // deadlines pass. Delay gives ONE late tick at 37 s and the next at
    // 42 s; Burst would send the missed ones back to back.
    tokio::time::sleep(Duration::from_secs(22)).await;
    for _ in 0..3 {
        assert!(matches!(rx.recv().await, Some(Input::Tick { .. })));
        assert_eq!(elapsed(), Duration::from_secs(37));
    }
    assert!(matches!(rx.recv().await, Some(Input::Tick { .. })));
    assert_eq!(elapsed(), Duration::from_secs(42), "no burst of missed ticks");
    trigger.trigger();
    assert_eq!(worker.await.expect("join"), WorkerExit::Shutdown);

    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let (_trigger, shutdown) = shutdown_channel();
    assert_eq!(run_tick_worker(DEFAULT_TICK_INTERVAL, tx, clock, shutdown).await, WorkerExit::ReducerGone);
}

#[tokio::test(start_paused = true)]
async fn a_tick_blocked_on_a_full_channel_still_stops_on_shutdown() {
    // Proves shutdown is prompt even when the reducer does not take inputs.
    let (tx, _rx) = mpsc::channel(1);
    let (trigger, shutdown) = shutdown_channel();
    let worker = tokio::spawn(run_tick_worker(Duration::from_secs(1), tx, ClockHandle::manual(T0), shutdown));
    tokio::time::sleep(Duration::from_secs(10)).await; // virtual: the channel is full by now
    trigger.trigger();
    let exit = tokio::time::timeout(Duration::from_secs(1), worker).await.expect("prompt").expect("join");
    assert_eq!(exit, WorkerExit::Shutdown);
}

fn idle_activation_config(dir: &Path) -> ActivationConfig {
    let mut cfg = ActivationConfig::host_defaults(dir.join("log"));
    cfg.current_system = dir.join("current-system");
    cfg.profile = dir.join("profile");
    cfg
}

#[tokio::test(start_paused = true)]
async fn an_idle_activation_worker_stops_on_shutdown_or_when_the_reducer_is_gone() {
    // Proves both exits while waiting for orders, and that an order seen
    // after shutdown was requested is not started.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = idle_activation_config(dir.path());
    let (orders, orders_rx) = watch::channel::<Option<ActivationOrder>>(None);
    let (tx, mut rx) = mpsc::channel(INPUT_CAPACITY);
    let (trigger, shutdown) = shutdown_channel();
    let clock = ClockHandle::manual(T0);
    let worker = tokio::spawn(run_activation_worker(cfg.clone(), orders_rx, tx.clone(), clock.clone(), shutdown));
    tokio::time::sleep(Duration::from_secs(1)).await;
    trigger.trigger();
    assert_eq!(worker.await.expect("join"), WorkerExit::Shutdown);
    let closure = crate::ids::Closure::parse("/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x").expect("valid");
    orders.send_replace(Some(ActivationOrder {
        rollout_id: rid("r1"),
        closure,
        rollback: false,
        number: 1,
        restore_boot_from: None,
    }));
    let (_trigger, stopped) = shutdown_channel();
    drop(_trigger);
    assert!(stopped.is_requested(), "a dropped trigger counts as a request");
    let exit = run_activation_worker(cfg.clone(), orders.subscribe(), tx.clone(), clock.clone(), stopped).await;
    assert_eq!(exit, WorkerExit::Shutdown);
    assert!(rx.try_recv().is_err(), "nothing was switched or reported after shutdown");

    let (orders, orders_rx) = watch::channel::<Option<ActivationOrder>>(None);
    drop(orders);
    let (_keep, shutdown) = shutdown_channel();
    assert_eq!(run_activation_worker(cfg, orders_rx, tx, clock, shutdown).await, WorkerExit::ReducerGone);
}
