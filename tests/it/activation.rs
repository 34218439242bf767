//! Activation (`docs/protocol.md` §6) against real Nix where installed: real store paths,
//! a real signed binary cache, real `nix-store --realise` and `nix-env --set`,
//! and a stand-in `switch-to-configuration` that repoints a symlink.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixfleet::agent::activation::{
    activate, ActivationConfig, ActivationOutcome, ActivationRequest, Direction, SwitchRunner, EXIT_CODE_TIME_LIMIT,
    EXIT_CODE_VERIFY_FAILED,
};
use nixfleet::ids::Closure;
use nixfleet::wire::event::MAX_STDERR_TAIL_BYTES;

use crate::harness::{child_param, child_test};
use crate::nixenv::{profile_generations, resolve, ClosureSpec, Host};

/// Builds a closure and makes it what the host currently runs (the
/// current-system link only: the profile stays nix-env's).
fn running(host: &Host, label: &str) -> Closure {
    let closure = host.build(host.spec(label));
    std::os::unix::fs::symlink(closure.as_str(), host.current_system()).expect("symlink current-system");
    closure
}

fn forward(closure: &Closure) -> ActivationRequest {
    ActivationRequest { closure: closure.clone(), direction: Direction::Forward, activation_id: "test@1".into() }
}

async fn run(cfg: &ActivationConfig, req: &ActivationRequest) -> ActivationOutcome {
    let mut started = None;
    let outcome = activate(cfg, req, |s| started = Some(s)).await;
    let started = started.expect("ActivationStarted is reported before the outcome");
    assert!(started.switch_method.contains("switch-to-configuration"), "{started:?}");
    outcome
}

fn failed(outcome: ActivationOutcome) -> (i32, String) {
    match outcome {
        ActivationOutcome::Failed { exit_code, stderr_tail } => {
            assert!(stderr_tail.len() <= MAX_STDERR_TAIL_BYTES);
            (exit_code, stderr_tail)
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pids of live (not zombie) processes whose process group is `pgid`.
fn live_group_members(pgid: u32) -> Vec<u32> {
    let mut live = Vec::new();
    for entry in fs_err::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the parenthesised command: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" && fields[0] != "X" {
            live.push(pid);
        }
    }
    live
}

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
            !matches!(state.as_deref(), Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn switch_repoints_current_system_and_adds_a_profile_generation() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the forward path end to end: realise, a new real profile generation, the symlink flip, and the observed closure.
    let host = Host::new();
    let old = running(&host, "old");
    let new = host.nix.build_closure(&host.spec("new"));
    let outcome = run(&host.config(Host::session()), &forward(&new)).await;
    assert_eq!(outcome, ActivationOutcome::Completed { observed: new.clone() });
    assert_eq!(host.running(), Some(PathBuf::from(new.as_str())));
    assert_ne!(old, new);
    let gens = profile_generations(&host.profile());
    assert_eq!(gens, vec![(1, PathBuf::from(new.as_str()))], "one generation pointing at the new closure");
}

#[tokio::test]
async fn switch_exiting_1_is_failed_with_its_stderr_tail() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a failing switch is reported with its exit code and its own output, and nothing is left half-switched.
    let host = Host::new();
    let old = running(&host, "old");
    let bad = host.nix.build_closure(&ClosureSpec { fail_switch: true, ..host.spec("bad") });
    let (code, tail) = failed(run(&host.config(Host::session()), &forward(&bad)).await);
    assert_eq!(code, 1);
    assert!(tail.contains("stand-in switch was told to fail (switch)"), "{tail}");
    assert!(tail.contains("switch-to-configuration switch: exited with status 1"), "{tail}");
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
}

#[tokio::test]
async fn closure_deleted_from_the_store_is_fetched_from_the_signed_cache() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves realise really substitutes: the closure is gone from the store, comes back from the signed file:// cache, and the switch runs.
    let host = Host::new();
    running(&host, "old");
    let new = host.nix.build_closure(&host.spec("cached"));
    host.nix.push_to_cache(&new);
    host.nix.delete_from_store(&new);
    let outcome = run(&host.config(Host::session()), &forward(&new)).await;
    assert_eq!(outcome, ActivationOutcome::Completed { observed: new.clone() });
    assert!(Path::new(new.as_str()).join("bin/switch-to-configuration").exists());
}

#[tokio::test]
async fn closure_absent_from_the_cache_fails_with_nix_message_and_host_unchanged() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a realise failure is ActivationFailed carrying Nix's own words, and the profile and current-system stay put.
    let host = Host::new();
    let old = running(&host, "old");
    let missing = host.nix.build_closure(&host.spec("missing"));
    host.nix.delete_from_store(&missing);
    let (code, tail) = failed(run(&host.config(Host::session()), &forward(&missing)).await);
    assert_eq!(code, 1, "{tail}");
    assert!(tail.contains("error:"), "Nix's message is carried: {tail}");
    assert!(tail.contains(&format!("nixfleet: realise {missing}")), "{tail}");
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
    assert!(profile_generations(&host.profile()).is_empty(), "profile untouched");
}

#[tokio::test]
async fn closure_signed_by_an_untrusted_key_is_refused() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the cache signature is checked: the same cache trusted under another key does not deliver the closure.
    let host = Host::new();
    let old = running(&host, "old");
    let new = host.nix.build_closure(&host.spec("untrusted"));
    host.nix.push_to_cache(&new);
    host.nix.delete_from_store(&new);
    let mut cfg = host.config(Host::session());
    cfg.nix_extra_env = host.nix.untrusted_substituter_env();
    let (_code, tail) = failed(run(&cfg, &forward(&new)).await);
    assert!(tail.contains("not signed by any of the keys"), "{tail}");
    assert!(!Path::new(new.as_str()).exists(), "the untrusted substitute was not imported");
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
}

#[tokio::test]
async fn reboot_required_closure_is_deferred_with_profile_set_and_current_system_unchanged() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the marker path: profile set, `switch-to-configuration boot` ran, no live switch, component reported.
    let host = Host::new();
    let old = running(&host, "old");
    let new = host.nix.build_closure(&ClosureSpec { reboot_required: Some("kernel\n".into()), ..host.spec("kernel") });
    let outcome = run(&host.config(Host::session()), &forward(&new)).await;
    assert_eq!(outcome, ActivationOutcome::Deferred { component: "kernel".into() });
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())), "no live switch");
    assert_eq!(resolve(&host.profile()), Some(PathBuf::from(new.as_str())), "profile points at the new closure");
    let next_boot = fs_err::read_to_string(host.current_system().with_extension("next-boot")).expect("boot ran");
    assert_eq!(next_boot.trim(), new.as_str());
}

#[tokio::test]
async fn rollback_switches_back_to_exactly_the_previous_closure() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves rollback runs the same steps to the rollback target, ignoring nothing: a new generation and current-system back on the old closure.
    let host = Host::new();
    let old = running(&host, "old");
    let new = host.nix.build_closure(&host.spec("new"));
    let cfg = host.config(Host::session());
    assert_eq!(run(&cfg, &forward(&new)).await, ActivationOutcome::Completed { observed: new.clone() });
    let back = ActivationRequest { closure: old.clone(), direction: Direction::Rollback, activation_id: "rb".into() };
    assert_eq!(run(&cfg, &back).await, ActivationOutcome::Completed { observed: old.clone() });
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
    let gens: Vec<PathBuf> = profile_generations(&host.profile()).into_iter().map(|(_, p)| p).collect();
    assert_eq!(gens, vec![PathBuf::from(new.as_str()), PathBuf::from(old.as_str())]);
}

#[tokio::test]
async fn switch_past_its_time_limit_is_killed_with_its_process_group_and_reported() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a hung switch does not outlive its limit: Failed with a clear message, and no process of its group survives.
    let host = Host::new();
    let old = running(&host, "old");
    let started = host.root.join("switch.pid");
    let never = host.root.join("never-created");
    let spec = ClosureSpec { started_file: Some(started.clone()), wait_for: Some(never), ..host.spec("hung") };
    let hung = host.nix.build_closure(&spec);
    let mut cfg = host.config(Host::session());
    cfg.time_limit = Duration::from_secs(2);
    let begun = std::time::Instant::now();
    let (code, tail) = failed(run(&cfg, &forward(&hung)).await);
    assert!(begun.elapsed() < Duration::from_secs(10), "killed at the limit, not later: {:?}", begun.elapsed());
    assert_eq!(code, EXIT_CODE_TIME_LIMIT);
    assert!(tail.contains("exceeded the activation time limit of 2 s"), "{tail}");
    let pid: u32 = fs_err::read_to_string(&started).expect("switch started").trim().parse().expect("pid");
    assert!(tail.contains(&format!("process group {pid} killed")), "{tail}");
    assert!(tail.contains("the switch lock is released"), "{tail}");
    wait_until("the switch's process group to die", Duration::from_secs(5), || live_group_members(pid).is_empty())
        .await;
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
}

#[tokio::test]
#[ignore = "helper process for the survival tests; runs only when they start it"]
async fn survival_child_runs_one_activation() {
    // Not a test by itself: the parent passes `runner|nix_store|nix_env|root|closure`.
    let Some(params) = child_param() else { return };
    // In the parent's store directory (its NIX_STORE_DIR, when it had one).
    assert!(crate::nixenv::closures_here(), "the parent built its closures where this child can");
    let p: Vec<&str> = params.split('|').collect();
    let runner =
        if p[0] == "session" { SwitchRunner::Session { setsid: "setsid".into() } } else { SwitchRunner::Direct };
    let root = Path::new(p[3]);
    let cfg = ActivationConfig {
        nix_store: p[1].into(),
        nix_env: p[2].into(),
        profile: root.join("profiles/system"),
        current_system: root.join("current-system"),
        switch_runner: runner,
        time_limit: Duration::from_secs(60),
        log_dir: root.join("log"),
        nix_extra_env: Vec::new(),
    };
    let closure = Closure::parse(p[4]).expect("closure");
    activate(&cfg, &forward(&closure), |_| ()).await;
}

/// Starts the child in its own process group, kills that whole group with
/// SIGKILL once the switch has started, then lets the switch proceed.
/// Returns the switch's pid.
async fn kill_parent_mid_switch(host: &Host, runner: &str, closure: &Closure, started: &Path, go: &Path) -> u32 {
    use std::os::unix::process::CommandExt as _;
    let params = [
        runner,
        &host.nix.nix_store().display().to_string(),
        &host.nix.nix_env().display().to_string(),
        &host.root.display().to_string(),
        closure.as_str(),
    ]
    .join("|");
    let mut child = child_test("activation::survival_child_runs_one_activation", params)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    wait_until("the switch to start", Duration::from_secs(30), || started.exists()).await;
    let group = rustix::process::Pid::from_raw(i32::try_from(child.id()).expect("pid")).expect("pid");
    rustix::process::kill_process_group(group, rustix::process::Signal::KILL).expect("kill -9 the parent's group");
    let status = child.wait().expect("reap child");
    assert!(!status.success(), "the parent died by SIGKILL");
    fs_err::write(go, "").expect("let the switch continue");
    fs_err::read_to_string(started).expect("pid").trim().parse().expect("pid")
}

#[tokio::test]
async fn switch_in_its_own_session_survives_kill_9_of_the_agent_process_group() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a Session-run switch outlives its parent's death (as when the switch restarts the agent): the symlink still flips.
    let host = Host::new();
    running(&host, "old");
    let (started, go) = (host.root.join("switch.pid"), host.root.join("go"));
    let spec = ClosureSpec { started_file: Some(started.clone()), wait_for: Some(go.clone()), ..host.spec("survivor") };
    let new = host.nix.build_closure(&spec);
    kill_parent_mid_switch(&host, "session", &new, &started, &go).await;
    let want = PathBuf::from(new.as_str());
    wait_until("current-system to flip", Duration::from_secs(10), || host.running().as_ref() == Some(&want)).await;
}

#[tokio::test]
async fn direct_switch_dies_with_the_agent_process_group() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Control for the survival test: without a new session the same kill takes the switch down, so that test can fail.
    let host = Host::new();
    let old = running(&host, "old");
    let (started, go) = (host.root.join("switch.pid"), host.root.join("go"));
    let spec = ClosureSpec { started_file: Some(started.clone()), wait_for: Some(go.clone()), ..host.spec("victim") };
    let new = host.nix.build_closure(&spec);
    let pid = kill_parent_mid_switch(&host, "direct", &new, &started, &go).await;
    wait_until("the direct switch to die", Duration::from_secs(5), || !pid_alive(pid)).await;
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())), "a dead switch flips nothing");
}

/// Stand-ins for `systemd-run` and `systemctl` (systemd is not PID 1 here):
/// `systemd-run` records its argv, starts the command after `--` in a new
/// session with output appended to the StandardError= file, records the
/// unit's pid and waits like `--wait`; `systemctl stop UNIT` kills that
/// unit's process group like systemd's control-group kill.
fn systemd_stand_ins(dir: &Path) -> SwitchRunner {
    use std::os::unix::fs::PermissionsExt as _;
    let d = dir.display();
    let run = format!(
        "#!/bin/sh\nPATH=/usr/bin:/bin\necho \"$*\" > {d}/systemd-run.argv\nunit=; log=/dev/null\n\
         for a; do case \"$a\" in --unit=*) unit=${{a#--unit=}} ;; --property=StandardError=append:*) \
         log=${{a#--property=StandardError=append:}} ;; --) break ;; esac; done\n\
         while [ \"$1\" != -- ]; do shift; done; shift\n\
         setsid \"$@\" >> \"$log\" 2>&1 &\npid=$!\necho $pid > {d}/$unit.pid\nwait $pid\n"
    );
    let ctl = format!(
        "#!/bin/sh\nPATH=/usr/bin:/bin\necho \"$*\" >> {d}/systemctl.log\n\
         [ \"$1\" = stop ] || exit 2\n/bin/kill -KILL -- -$(cat {d}/$2.pid)\n"
    );
    for (name, text) in [("systemd-run", run), ("systemctl", ctl)] {
        fs_err::write(dir.join(name), text).expect("write stand-in");
        fs_err::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    SwitchRunner::Detached { systemd_run: dir.join("systemd-run"), systemctl: dir.join("systemctl") }
}

#[tokio::test]
async fn detached_switch_runs_through_systemd_run_as_a_named_unit_with_a_runtime_limit() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the systemd-run boundary: unit name, --wait/--collect, RuntimeMaxSec, output to the log file, exit status used.
    let host = Host::new();
    running(&host, "old");
    let new = host.nix.build_closure(&host.spec("unit"));
    let runner = systemd_stand_ins(&host.root);
    let outcome = run(&host.config(runner), &forward(&new)).await;
    assert_eq!(outcome, ActivationOutcome::Completed { observed: new.clone() });
    let argv = fs_err::read_to_string(host.root.join("systemd-run.argv")).expect("systemd-run ran");
    for want in ["--unit=nixfleet-switch-test_1", "--wait", "--collect", "--property=RuntimeMaxSec=30"] {
        assert!(argv.contains(want), "{want} missing from {argv}");
    }
    assert!(argv.trim_end().ends_with(&format!("-- {new}/bin/switch-to-configuration switch")), "{argv}");
    let log = fs_err::read_to_string(host.root.join("log/switch-test_1.log")).expect("switch log");
    assert!(log.contains("stand-in switch-to-configuration switch"), "{log}");
}

#[tokio::test]
async fn detached_switch_past_its_time_limit_is_stopped_through_systemctl() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the Detached time limit: `systemctl stop` of the unit, the switch dead, Failed with the unit named.
    let host = Host::new();
    let old = running(&host, "old");
    let started = host.root.join("switch.pid");
    let spec = ClosureSpec {
        started_file: Some(started.clone()),
        wait_for: Some(host.root.join("never")),
        ..host.spec("hung-unit")
    };
    let hung = host.nix.build_closure(&spec);
    let mut cfg = host.config(systemd_stand_ins(&host.root));
    cfg.time_limit = Duration::from_secs(2);
    let (code, tail) = failed(run(&cfg, &forward(&hung)).await);
    assert_eq!(code, EXIT_CODE_TIME_LIMIT);
    assert!(tail.contains("unit nixfleet-switch-test_1 stopped"), "{tail}");
    assert!(tail.contains("the switch lock is released"), "{tail}");
    let stops = fs_err::read_to_string(host.root.join("systemctl.log")).expect("systemctl ran");
    assert_eq!(stops.trim(), "stop nixfleet-switch-test_1");
    let pid: u32 = fs_err::read_to_string(&started).expect("started").trim().parse().expect("pid");
    wait_until("the unit's switch to die", Duration::from_secs(5), || !pid_alive(pid)).await;
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
}

#[tokio::test]
async fn completed_reports_what_current_system_really_resolves_to() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves verification reads the symlink rather than assuming success: a switch that flips another link leaves `observed` = the old closure.
    let host = Host::new();
    let old = running(&host, "old");
    let elsewhere = host.root.join("other-current-system");
    let new = host.nix.build_closure(&ClosureSpec { current_system: elsewhere, ..host.spec("elsewhere") });
    let outcome = run(&host.config(Host::session()), &forward(&new)).await;
    assert_eq!(outcome, ActivationOutcome::Completed { observed: old });
}

#[tokio::test]
async fn unresolvable_current_system_after_a_successful_switch_is_a_verify_failure() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a missing current-system after exit 0 is Failed with the verify exit code and the path named.
    let host = Host::new();
    running(&host, "old");
    let new = host.nix.build_closure(&host.spec("new"));
    let mut cfg = host.config(Host::session());
    cfg.current_system = host.root.join("no-such-link");
    let (code, tail) = failed(run(&cfg, &forward(&new)).await);
    assert_eq!(code, EXIT_CODE_VERIFY_FAILED);
    assert!(tail.contains("no-such-link does not resolve"), "{tail}");
}

#[tokio::test]
async fn the_direct_runner_passes_switch_and_boot_to_switch_to_configuration() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves `--switch-runner direct` names the action: a plain switch
    // completes on the new closure and a reboot-required closure runs
    // `boot` (the stand-in refuses a missing action with exit 2).
    let host = Host::new();
    let old = running(&host, "old");
    let cfg = host.config(SwitchRunner::Direct);
    let new = host.nix.build_closure(&host.spec("new-direct"));
    assert_eq!(run(&cfg, &forward(&new)).await, ActivationOutcome::Completed { observed: new.clone() });
    let back = ActivationRequest { closure: old.clone(), direction: Direction::Rollback, activation_id: "rb".into() };
    assert_eq!(run(&cfg, &back).await, ActivationOutcome::Completed { observed: old.clone() });
    let kernel =
        host.nix.build_closure(&ClosureSpec { reboot_required: Some("kernel".into()), ..host.spec("kernel-direct") });
    assert_eq!(run(&cfg, &forward(&kernel)).await, ActivationOutcome::Deferred { component: "kernel".into() });
    let next_boot = fs_err::read_to_string(host.current_system().with_extension("next-boot")).expect("boot ran");
    assert_eq!(next_boot.trim(), kernel.as_str());
    assert_eq!(host.running(), Some(PathBuf::from(old.as_str())));
}
