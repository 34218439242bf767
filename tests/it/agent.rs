//! The real `nixfleet agent` against the real `nixfleet cp serve` on
//! loopback, with real Nix store paths (or the stand-ins where Nix is
//! absent; `nixenv` prints which ran).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet::ids::Closure;
use nixfleet::queue::{EntryState, QueueView};

use crate::harness::{bin, Cp, Release, TempDir};
use crate::nixenv::{resolve, ClosureSpec, NixEnv};

/// Generous: a debug binary, real Nix and a shared 2-core machine.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

const PASSING_PROBE: &str = r#"{"probes":[{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","exit 0"],"timeout_secs":5}]}"#;
const FAILING_PROBE: &str = r#"{"probes":[{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","exit 3"],"timeout_secs":5}]}"#;

/// One host: its Nix, its current-system link and profile, its agent.
struct Host {
    name: String,
    nix: NixEnv,
    root: PathBuf,
    agent: Option<Child>,
}

impl Host {
    fn new(name: &str) -> Host {
        let nix = NixEnv::detect();
        let root = nix.dir().join(name);
        fs_err::create_dir_all(root.join("profiles")).expect("mkdir");
        Host { name: name.to_owned(), nix, root, agent: None }
    }
    fn current_system(&self) -> PathBuf {
        self.root.join("current-system")
    }
    fn closure(&self, label: &str, health_checks: &str) -> Closure {
        self.nix.build_closure(&ClosureSpec {
            label: format!("{}-{label}", self.name),
            current_system: self.current_system(),
            health_checks: Some(health_checks.to_owned()),
            ..ClosureSpec::default()
        })
    }
    fn boot_into(&self, closure: &Closure) {
        for link in [self.current_system(), self.root.join("profiles/system")] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(closure.as_str(), &link).expect("symlink");
        }
    }
    fn running(&self) -> Option<PathBuf> {
        resolve(&self.current_system())
    }
    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    fn start_agent(&mut self, cp: &Cp, trust: &Path) {
        let log = std::fs::File::create(self.root.join("agent.log")).expect("log");
        let child = Command::new(bin())
            .arg("agent")
            .args(["--state-dir", &self.state_dir().display().to_string()])
            .args(["--cp", &format!("http://{}", cp.url.authority())])
            .args(["--hostname", &self.name])
            .args(["--trust-key", &trust.display().to_string()])
            .args([
                "--health-checks",
                &self.current_system().join("etc/nixfleet/agent/health-checks.json").display().to_string(),
            ])
            .args(["--current-system", &self.current_system().display().to_string()])
            .args(["--booted-system", &self.current_system().display().to_string()])
            .args(["--profile", &self.root.join("profiles/system").display().to_string()])
            .args(["--nix-store", &self.nix.nix_store().display().to_string()])
            .args(["--nix-env", &self.nix.nix_env().display().to_string()])
            .args(["--switch-runner", "setsid", "--tick", "200ms", "--heartbeat", "1s", "--drain", "1s"])
            .args(["--longpoll-wait", "2"])
            .env("RUST_LOG", "nixfleet=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agent = Some(child);
    }
    fn stop_agent(&mut self) -> Option<i32> {
        let mut child = self.agent.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
    fn log(&self) -> String {
        fs_err::read_to_string(self.root.join("agent.log")).unwrap_or_default()
    }
    /// (seq, kind) of the agent's acked events of one rollout, in seq order.
    fn acked(&self, rollout: &str) -> Vec<(u64, String)> {
        let view = QueueView::open(&self.state_dir()).expect("queue view");
        let mut out: Vec<(u64, String)> = view
            .list(&[EntryState::Acked])
            .expect("list")
            .into_iter()
            .filter_map(|e| e.header)
            .filter(|h| h.rollout_id.as_str() == rollout)
            .map(|h| (h.seq, h.kind.clone()))
            .collect();
        out.sort();
        out
    }
    fn pending(&self) -> usize {
        QueueView::open(&self.state_dir()).map(|v| v.counts().map(|c| c.pending).unwrap_or(1)).unwrap_or(1)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn manifest(id: &str, soak_secs: u64, hosts: &[(&str, usize, &Closure)]) -> String {
    let (channel, git_ref) = id.split_once('@').expect("channel@ref");
    let hosts: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|(h, w, c)| ((*h).to_owned(), serde_json::json!({"wave": w, "target_closure": c.as_str()})))
        .collect();
    serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "sustained_failure_secs": 2, "max_failed_hosts": 0},
        "waves": [{"name": "canary", "soak_secs": soak_secs, "max_in_flight": 1},
                  {"name": "rest", "soak_secs": soak_secs, "max_in_flight": 10}],
        "hosts": hosts,
    })
    .to_string()
}

async fn wait_state(cp: &Cp, rollout: &str, host: &Host, want: &str) {
    let start = Instant::now();
    loop {
        let state = cp.host_state(rollout, &host.name).await;
        if state == want {
            return;
        }
        assert!(
            start.elapsed() < CONVERGE_LIMIT,
            "{} stuck in {state}, wanted {want}; agent log:\n{}",
            host.name,
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The CP's event log of one host in one rollout as (seq, kind).
async fn cp_events(cp: &Cp, rollout: &str, host: &str) -> Vec<(u64, String)> {
    let log = cp.get_json(&format!("/v1/rollouts/{rollout}/events")).await;
    let events = log["events"].as_array().or_else(|| log.as_array()).expect("events array").clone();
    let mut out: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["hostname"] == host)
        .map(|e| {
            let seq = e["seq"].as_u64().expect("seq");
            let kind = e["event"]["kind"].as_str().or_else(|| e["kind"].as_str()).expect("kind").to_owned();
            (seq, kind)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_wave_rollout_converges_and_the_cp_log_matches_the_agents_queue() {
    // Proves the happy path end to end with real processes: canary then the
    // rest, both agents switch their real closures, probe, converge, and the
    // CP's event log equals each agent's acked queue one for one.
    let dir = TempDir::new("agent-happy");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut web1 = Host::new("web-1");
    let mut web2 = Host::new("web-2");
    let (old1, new1) = (web1.closure("old", PASSING_PROBE), web1.closure("new", PASSING_PROBE));
    let (old2, new2) = (web2.closure("old", PASSING_PROBE), web2.closure("new", PASSING_PROBE));
    web1.boot_into(&old1);
    web2.boot_into(&old2);
    let m = manifest("stable@r1", 1, &[("web-1", 0, &new1), ("web-2", 1, &new2)]);
    let resp = cp.publish(&release.sign(&m)).await;
    assert!(resp.status.is_success(), "publish: {:?}", resp.status);
    web1.start_agent(&cp, &release.pub_path);
    web2.start_agent(&cp, &release.pub_path);

    wait_state(&cp, "stable@r1", &web1, "Converged").await;
    wait_state(&cp, "stable@r1", &web2, "Converged").await;
    assert_eq!(web1.running(), Some(PathBuf::from(new1.as_str())));
    assert_eq!(web2.running(), Some(PathBuf::from(new2.as_str())));
    for host in [&web1, &web2] {
        crate::harness::wait_for("the agent's queue to drain", || (host.pending() == 0).then_some(()));
        let acked = host.acked("stable@r1");
        assert_eq!(acked.first().map(|(s, k)| (*s, k.as_str())), Some((1, "DispatchAck")));
        assert_eq!(acked.last().map(|(_, k)| k.as_str()), Some("Converged"));
        assert_eq!(cp_events(&cp, "stable@r1", &host.name).await, acked, "CP log == agent queue for {}", host.name);
    }
    assert_eq!(web1.stop_agent(), Some(0), "SIGTERM is a clean exit; log:\n{}", web1.log());
    assert_eq!(web2.stop_agent(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_probe_rolls_the_host_back_and_the_cp_halts_the_rollout() {
    // Proves autonomous rollback end to end: the canary's enforce probe
    // fails, the agent rolls back to the closure it ran before, the CP marks
    // it Reverted, and the second wave is never dispatched.
    let dir = TempDir::new("agent-rollback");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut web1 = Host::new("web-1");
    let mut web2 = Host::new("web-2");
    let (old1, bad1) = (web1.closure("old", PASSING_PROBE), web1.closure("bad", FAILING_PROBE));
    let (old2, new2) = (web2.closure("old", PASSING_PROBE), web2.closure("new", PASSING_PROBE));
    web1.boot_into(&old1);
    web2.boot_into(&old2);
    let m = manifest("stable@r2", 30, &[("web-1", 0, &bad1), ("web-2", 1, &new2)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    web2.start_agent(&cp, &release.pub_path);

    wait_state(&cp, "stable@r2", &web1, "Reverted").await;
    assert_eq!(web1.running(), Some(PathBuf::from(old1.as_str())), "rolled back to the closure it ran at dispatch");
    let kinds: Vec<String> = web1.acked("stable@r2").into_iter().map(|(_, k)| k).collect();
    assert!(kinds.contains(&"Failed".to_owned()) && kinds.last().map(String::as_str) == Some("RollbackComplete"));
    assert_eq!(cp.host_state("stable@r2", "web-2").await, "Pending", "the halted rollout dispatches nothing more");
    assert_eq!(web2.running(), Some(PathBuf::from(old2.as_str())));
}

impl Host {
    fn kill9_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            child.kill().expect("kill -9 the agent");
            let _ = child.wait();
        }
    }
}

/// Asserts the CP holds each seq once, 1..=n, equal to the agent's queue.
async fn assert_logs_agree(cp: &Cp, rollout: &str, host: &Host) {
    crate::harness::wait_for("the agent's queue to drain", || (host.pending() == 0).then_some(()));
    let logged = cp_events(cp, rollout, &host.name).await;
    let seqs: Vec<u64> = logged.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no event lost or duplicated: {logged:?}");
    assert_eq!(logged, host.acked(rollout), "CP log == agent queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_soaking_resumes_from_its_queue_and_converges() {
    // Proves restart recovery mid-soak: after kill -9 the agent rebuilds its
    // record from the queue, resumes its probes and converges; the CP's log
    // has every event exactly once.
    let dir = TempDir::new("agent-kill-soak");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut web1 = Host::new("web-1");
    let (old, new) = (web1.closure("old", PASSING_PROBE), web1.closure("new", PASSING_PROBE));
    web1.boot_into(&old);
    let m = manifest("stable@k1", 4, &[("web-1", 0, &new)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@k1", &web1, "Soaking").await;
    web1.kill9_agent();
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@k1", &web1, "Converged").await;
    assert_eq!(web1.running(), Some(PathBuf::from(new.as_str())));
    assert_logs_agree(&cp, "stable@k1", &web1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_switch_reports_the_switch_that_finished_without_it() {
    // Proves the detached switch outlives a kill -9 of the agent and the
    // restarted agent reports the activation it can prove from
    // current-system, then converges; nothing is lost or duplicated.
    let dir = TempDir::new("agent-kill-switch");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut web1 = Host::new("web-1");
    let old = web1.closure("old", PASSING_PROBE);
    let gate = web1.root.join("gate");
    let started = web1.root.join("switch-started");
    let new = web1.nix.build_closure(&ClosureSpec {
        label: "web-1-gated".into(),
        current_system: web1.current_system(),
        health_checks: Some(PASSING_PROBE.to_owned()),
        started_file: Some(started.clone()),
        wait_for: Some(gate.clone()),
        ..ClosureSpec::default()
    });
    web1.boot_into(&old);
    let m = manifest("stable@k2", 1, &[("web-1", 0, &new)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    crate::harness::wait_for("the switch to start", || started.exists().then_some(()));
    web1.kill9_agent();
    fs_err::write(&gate, "go").expect("open the gate");
    crate::harness::wait_for("the orphaned switch to finish", || {
        (web1.running() == Some(PathBuf::from(new.as_str()))).then_some(())
    });
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@k2", &web1, "Converged").await;
    assert_logs_agree(&cp, "stable@k2", &web1).await;
}
