//! The activation, probe and tick workers driving the REAL reducer (with an
//! in-memory journal) against real Nix closures (`nixenv.rs`: real store
//! paths, real `nix-store`/`nix-env` where installed), real probe processes
//! and real time. Each test follows one rollout to the state it proves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixfleet::agent::probes::HostRunner;
use nixfleet::agent::reducer::{commands, Input, Reducer, INPUT_CAPACITY};
use nixfleet::agent::rollouts::Rollouts;
use nixfleet::agent::testkit::MemJournal;
use nixfleet::agent::workers::{
    run_activation_worker, run_probe_worker, run_tick_worker, shutdown_channel, ShutdownTrigger, WorkerExit,
};
use nixfleet::clock::ClockHandle;
use nixfleet::ids::{Closure, Hostname, RolloutId};
use nixfleet::machine::{EventBody, HostState, OnHealthFailure, Policy};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::nixenv::{ClosureSpec, Host};

/// Everything a test gives a rollout: generous for a loaded CI machine,
/// while a healthy run takes a few seconds.
const STATE_LIMIT: Duration = Duration::from_secs(40);

fn rid() -> RolloutId {
    RolloutId::parse("stable@r1").expect("valid")
}
fn hostname() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}
fn policy(sustained_failure_secs: u64) -> Policy {
    Policy { on_health_failure: OnHealthFailure::RollbackAndHalt, sustained_failure_secs }
}

/// The health-checks file of whatever system is active: it follows the
/// current-system symlink, as `/etc` follows `/run/current-system`.
fn health_checks_path(host: &Host) -> PathBuf {
    host.current_system().join("etc/nixfleet/agent/health-checks.json")
}

fn exec_probe(name: &str, program: &str) -> String {
    format!(
        r#"{{"probes":[{{"name":"{name}","kind":"exec","mode":"enforce","interval_secs":1,"argv":["{program}"],"timeout_secs":5}}]}}"#
    )
}

/// A running agent: the real reducer and the chosen workers.
struct Agent {
    inputs: mpsc::Sender<Input>,
    snapshot: watch::Receiver<Rollouts>,
    trigger: ShutdownTrigger,
    reducer: JoinHandle<()>,
    workers: Vec<JoinHandle<WorkerExit>>,
}

#[derive(Clone, Copy)]
struct Workers {
    probes: bool,
    tick: bool,
}

impl Agent {
    /// Starts the reducer on `rollouts` (after `resume`, as a restarted
    /// agent does) and the activation worker, plus the probe and tick
    /// workers if asked.
    fn start(host: &Host, rollouts: Rollouts, journal: MemJournal, with: Workers) -> Agent {
        let clock = ClockHandle::system();
        let (cmds, rx) = commands();
        let (mut reducer, snapshot) = Reducer::new(rollouts, journal, cmds);
        reducer.resume();
        let (inputs, inputs_rx) = mpsc::channel(INPUT_CAPACITY);
        let (trigger, shutdown) = shutdown_channel();
        let mut workers = vec![tokio::spawn(run_activation_worker(
            host.config(Host::session()),
            rx.activation,
            inputs.clone(),
            clock.clone(),
            shutdown.clone(),
        ))];
        if with.probes {
            let path = health_checks_path(host);
            let worker = run_probe_worker(
                path,
                HostRunner::default(),
                rx.probes,
                inputs.clone(),
                clock.clone(),
                shutdown.clone(),
            );
            workers.push(tokio::spawn(worker));
        }
        if with.tick {
            let worker = run_tick_worker(Duration::from_millis(100), inputs.clone(), clock, shutdown);
            workers.push(tokio::spawn(worker));
        }
        let reducer = tokio::spawn(reducer.run(inputs_rx));
        Agent { inputs, snapshot, trigger, reducer, workers }
    }

    async fn dispatch(&self, target: &Closure, current: &Closure, soak_secs: u64, policy: Policy) {
        let at = ClockHandle::system().now();
        let input = Input::Dispatch {
            rollout_id: rid(),
            policy,
            target_closure: target.clone(),
            soak_secs,
            current_closure: current.clone(),
            issued_at: at,
            at,
        };
        self.inputs.send(input).await.expect("reducer alive");
    }

    async fn wait_for(&mut self, state: HostState) {
        let reached = self.snapshot.wait_for(|r| r.get(&rid()).is_some_and(|s| s.record.state == state));
        let outcome = tokio::time::timeout(STATE_LIMIT, reached).await.map(|r| r.map(|_| ()));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("reducer stopped before {state}"),
            Err(_) => {
                let now = self.snapshot.borrow().get(&rid()).map(|s| s.record.state);
                panic!("rollout not {state} within {STATE_LIMIT:?}; it is {now:?}")
            }
        }
    }

    /// Graceful stop: every worker reports Shutdown, then the reducer ends.
    async fn stop(self) {
        self.trigger.trigger();
        for worker in self.workers {
            assert_eq!(worker.await.expect("worker join"), WorkerExit::Shutdown);
        }
        drop(self.inputs);
        self.reducer.await.expect("reducer join");
    }

    /// The agent dies (kill -9 / its unit restarted by the switch): tasks
    /// are dropped where they stand, nothing is flushed or reported.
    async fn kill(self) {
        self.reducer.abort();
        for worker in self.workers {
            worker.abort();
            let _ = worker.await;
        }
        let _ = self.reducer.await;
    }
}

fn declared_probe_names(journal: &MemJournal) -> Vec<String> {
    journal
        .local_events()
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::ProbeTopologyDeclared { probes, .. } => {
                Some(probes.into_iter().map(|p| p.name).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

#[tokio::test]
async fn dispatch_switches_soaks_on_the_new_systems_probes_and_converges() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the happy path through real workers: the switch runs, the
    // reducer soaks, the probe worker reads the NEW closure's health checks
    // (through current-system) and its passing probe plus ticks converge it.
    let host = Host::new();
    let old = host.build(host.spec("old"));
    host.boot_into(&old);
    let new = host.build(ClosureSpec { health_checks: Some(exec_probe("app", "true")), ..host.spec("new") });
    let journal = MemJournal::default();
    let mut agent =
        Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: true, tick: true });
    agent.dispatch(&new, &old, 1, policy(60)).await;
    agent.wait_for(HostState::Converged).await;
    agent.stop().await;

    assert_eq!(host.running(), Some(PathBuf::from(new.as_str())));
    assert_eq!(host.booting(), Some(PathBuf::from(new.as_str())), "the profile follows the switch");
    let kinds = journal.kinds();
    assert_eq!(
        kinds[..5],
        ["DispatchAck", "ActivationStarted", "ActivationCompleted", "ProbeTopologyDeclared", "ProbeObservedFirst"],
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"Converged"), "{kinds:?}");
    assert!(kinds.iter().all(|k| *k != "ProbeFailureFirst"), "{kinds:?}");
    assert_eq!(declared_probe_names(&journal), ["app"]);
}

#[tokio::test]
async fn a_failing_enforce_probe_is_rolled_back_by_the_worker_to_the_previous_closure() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the rollback is really executed: sustained probe failure fails
    // the host, the worker switches back, and both current-system and the
    // profile name the previous closure again (Reverted).
    let host = Host::new();
    let old = host.build(host.spec("old"));
    host.boot_into(&old);
    let new = host.build(ClosureSpec { health_checks: Some(exec_probe("app", "false")), ..host.spec("sick") });
    let journal = MemJournal::default();
    let mut agent =
        Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: true, tick: true });
    agent.dispatch(&new, &old, 300, policy(1)).await;
    agent.wait_for(HostState::Reverted).await;
    agent.stop().await;

    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())), "switched back");
    assert_eq!(host.booting(), Some(PathBuf::from(old.as_str())), "and boots the previous closure");
    let kinds = journal.kinds();
    let failed = kinds.iter().position(|k| *k == "Failed").expect("Failed");
    assert_eq!(kinds.last(), Some(&"RollbackComplete"), "{kinds:?}");
    assert!(
        kinds[failed..].iter().all(|k| *k != "ActivationStarted"),
        "no ActivationStarted for a rollback: {kinds:?}"
    );
    assert!(kinds.contains(&"ProbeFailureFirst"), "{kinds:?}");
}

#[tokio::test]
async fn a_failed_switch_is_reported_and_the_rollback_resets_the_profile() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves ActivationFailed carries the switch's exit code, and the
    // rollback runs even though current-system never left the old closure:
    // nix-env had already pointed the profile (next boot) at the bad one.
    let host = Host::new();
    let rollback_ran = host.path("old-switch-ran");
    let old = host.build(ClosureSpec { started_file: Some(rollback_ran.clone()), ..host.spec("old") });
    host.boot_into(&old);
    let bad = host.build(ClosureSpec { fail_switch: true, ..host.spec("bad") });
    let journal = MemJournal::default();
    let mut agent =
        Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: false, tick: false });
    agent.dispatch(&bad, &old, 60, policy(60)).await;
    agent.wait_for(HostState::Reverted).await;
    agent.stop().await;

    assert_eq!(journal.kinds(), ["DispatchAck", "ActivationStarted", "ActivationFailed", "RollbackComplete"]);
    let failure = journal.local_events().into_iter().find_map(|e| match e.body {
        EventBody::ActivationFailed { exit_code, stderr_tail, .. } => Some((exit_code, stderr_tail)),
        _ => None,
    });
    let (exit_code, stderr_tail) = failure.expect("ActivationFailed");
    assert_eq!(exit_code, 1);
    assert!(stderr_tail.contains("stand-in switch was told to fail"), "{stderr_tail}");
    assert!(rollback_ran.exists(), "the rollback ran the previous closure's switch");
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
    assert_eq!(host.booting(), Some(PathBuf::from(old.as_str())), "the profile no longer boots the bad closure");
}

#[tokio::test]
async fn under_halt_a_failed_switch_puts_the_boot_default_back_on_the_previous_closure() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves item 6: under `halt` there is no rollback, but a failed
    // forward switch must not stay the next boot's default: the profile
    // (real nix-env generation) and `switch-to-configuration boot` name the
    // pre-dispatch closure again, nothing is switched live and no rollback
    // event is emitted. Before the fix the profile kept the failed closure.
    let host = Host::new();
    let old = host.build(host.spec("old"));
    host.boot_into(&old);
    let bad = host.build(ClosureSpec { fail_switch: true, ..host.spec("bad") });
    let journal = MemJournal::default();
    let mut agent =
        Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: false, tick: false });
    let halt = Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 };
    agent.dispatch(&bad, &old, 60, halt).await;
    agent.wait_for(HostState::Failed).await;
    let old_path = PathBuf::from(old.as_str());
    poll_until("the profile to name the previous closure", STATE_LIMIT, || host.booting().as_ref() == Some(&old_path))
        .await;
    let next_boot = host.current_system().with_extension("next-boot");
    poll_until("switch-to-configuration boot of the previous closure", STATE_LIMIT, exists(&next_boot)).await;
    agent.stop().await;
    assert_eq!(fs_err::read_to_string(&next_boot).expect("next-boot").trim(), old.as_str());
    assert_eq!(host.running(), Some(old_path), "nothing switched live");
    assert_eq!(journal.kinds(), ["DispatchAck", "ActivationStarted", "ActivationFailed"]);
    let gens = crate::nixenv::profile_generations(&host.profile());
    assert_eq!(gens.last().map(|(_, p)| p.clone()), Some(PathBuf::from(old.as_str())), "{gens:?}");
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
async fn poll_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn exists(path: &Path) -> impl FnMut() -> bool + '_ {
    move || path.exists()
}

/// A host running `old`, and a `new` closure whose switch marks
/// `switch_ran` when it starts and then waits until `gate` exists.
struct GatedSwitch {
    old: Closure,
    new: Closure,
    switch_ran: PathBuf,
    gate: PathBuf,
}

impl GatedSwitch {
    fn build(host: &Host) -> GatedSwitch {
        let old = host.build(host.spec("old"));
        host.boot_into(&old);
        let (switch_ran, gate) = (host.path("new-switch-ran"), host.path("gate"));
        let new = host.build(ClosureSpec {
            started_file: Some(switch_ran.clone()),
            wait_for: Some(gate.clone()),
            ..host.spec("new")
        });
        GatedSwitch { old, new, switch_ran, gate }
    }
}

#[tokio::test]
async fn a_restarted_agent_reports_a_switch_that_finished_after_the_agent_died() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves restart recovery of an activation: the agent dies mid-switch
    // (as when the switch restarts the agent's unit), the detached switch
    // completes without it, and the restarted agent reports Completed from
    // current-system and the profile WITHOUT running the switch again.
    let host = Host::new();
    let GatedSwitch { old, new, switch_ran, gate } = GatedSwitch::build(&host);
    let journal = MemJournal::default();
    let agent = Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: false, tick: false });
    agent.dispatch(&new, &old, 60, policy(60)).await;
    poll_until("the switch to start", STATE_LIMIT, exists(&switch_ran)).await;
    agent.kill().await;
    assert_eq!(journal.kinds(), ["DispatchAck", "ActivationStarted"], "killed while Activating");

    fs_err::write(&gate, "").expect("open the gate");
    let target = PathBuf::from(new.as_str());
    poll_until("the orphaned switch to finish", STATE_LIMIT, || host.running().as_ref() == Some(&target)).await;
    fs_err::remove_file(&switch_ran).expect("reset the marker");

    let mut restored = Rollouts::new(hostname());
    restored.restore(rid(), policy(60), &journal.local_events()).expect("journal replays");
    let mut agent = Agent::start(&host, restored, journal.clone(), Workers { probes: false, tick: false });
    agent.wait_for(HostState::Soaking).await;
    agent.stop().await;
    assert_eq!(journal.kinds(), ["DispatchAck", "ActivationStarted", "ActivationCompleted"]);
    assert!(!switch_ran.exists(), "the restarted agent did not run the switch again");
}

#[tokio::test]
async fn a_shutdown_during_a_switch_lets_it_finish_and_reports_its_outcome() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the shutdown decision: a stop requested mid-switch neither kills
    // the switch nor loses its outcome; the worker reports, then exits.
    let host = Host::new();
    let GatedSwitch { old, new, switch_ran, gate } = GatedSwitch::build(&host);
    let journal = MemJournal::default();
    let mut agent =
        Agent::start(&host, Rollouts::new(hostname()), journal.clone(), Workers { probes: false, tick: false });
    agent.dispatch(&new, &old, 60, policy(60)).await;
    poll_until("the switch to start", STATE_LIMIT, exists(&switch_ran)).await;
    agent.trigger.trigger();
    fs_err::write(&gate, "").expect("open the gate");
    agent.wait_for(HostState::Soaking).await;
    agent.stop().await;
    assert_eq!(journal.kinds(), ["DispatchAck", "ActivationStarted", "ActivationCompleted"]);
    assert_eq!(host.running(), Some(PathBuf::from(new.as_str())));
}
