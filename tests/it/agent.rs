//! The real `nixfleet agent` against the real `nixfleet cp serve` on
//! loopback over mutual TLS (certificates from the `pki` code), with real
//! Nix store paths (or the stand-ins where Nix is absent; `nixenv` prints
//! which ran).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet::ids::Closure;
use nixfleet::queue::{EntryState, QueueView};

use nixfleet::tls::Role;

use crate::harness::{bin, Cp, Release, TempDir};
use crate::nixenv::{resolve, ClosureSpec, NixEnv};

/// Generous: a debug binary, real Nix and a shared 2-core machine.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

pub(crate) const PASSING_PROBE: &str = r#"{"probes":[{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","exit 0"],"timeout_secs":5}]}"#;
const FAILING_PROBE: &str = r#"{"probes":[{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","exit 3"],"timeout_secs":5}]}"#;

/// One host: its Nix, its current-system link and profile, its agent.
pub(crate) struct Host {
    pub(crate) name: String,
    nix: NixEnv,
    pub(crate) root: PathBuf,
    pub(crate) agent: Option<Child>,
}

impl Host {
    pub(crate) fn new(name: &str) -> Host {
        let nix = NixEnv::detect();
        let root = nix.dir().join(name);
        fs_err::create_dir_all(root.join("profiles")).expect("mkdir");
        Host { name: name.to_owned(), nix, root, agent: None }
    }
    fn current_system(&self) -> PathBuf {
        self.root.join("current-system")
    }
    pub(crate) fn closure(&self, label: &str, health_checks: &str) -> Closure {
        self.nix.build_closure(&ClosureSpec {
            label: format!("{}-{label}", self.name),
            current_system: self.current_system(),
            health_checks: Some(health_checks.to_owned()),
            ..ClosureSpec::default()
        })
    }
    pub(crate) fn boot_into(&self, closure: &Closure) {
        for link in [self.current_system(), self.root.join("profiles/system")] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(closure.as_str(), &link).expect("symlink");
        }
    }
    pub(crate) fn running(&self) -> Option<PathBuf> {
        resolve(&self.current_system())
    }
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    pub(crate) fn start_agent(&mut self, cp: &Cp, trust: &Path) {
        let log = std::fs::File::create(self.root.join("agent.log")).expect("log");
        let child = Command::new(bin())
            .arg("agent")
            .args(["--state-dir", &self.state_dir().display().to_string()])
            .args(cp.client_args(&self.name, Role::Host))
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
            .args(["--longpoll-wait", "2s"])
            .env("RUST_LOG", "nixfleet=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agent = Some(child);
    }
    pub(crate) fn stop_agent(&mut self) -> Option<i32> {
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
    pub(crate) fn log(&self) -> String {
        fs_err::read_to_string(self.root.join("agent.log")).unwrap_or_default()
    }
    /// (seq, kind) of the agent's acked events of one rollout, in seq order.
    fn acked(&self, rollout: &str) -> Vec<(u64, String)> {
        let Ok(view) = QueueView::open(&self.state_dir()) else { return Vec::new() };
        let mut out: Vec<(u64, String)> = view
            .list(&[EntryState::Acked])
            .unwrap_or_default()
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

pub(crate) fn manifest(id: &str, soak_secs: u64, hosts: &[(&str, usize, &Closure)]) -> String {
    manifest_with(id, soak_secs, "rollback-and-halt", hosts)
}

fn manifest_with(id: &str, soak_secs: u64, on_health_failure: &str, hosts: &[(&str, usize, &Closure)]) -> String {
    let (channel, git_ref) = id.split_once('@').expect("channel@ref");
    let hosts: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|(h, w, c)| ((*h).to_owned(), serde_json::json!({"wave": w, "target_closure": c.as_str()})))
        .collect();
    serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": on_health_failure, "sustained_failure_secs": 2, "max_failed_hosts": 0},
        "waves": [{"name": "canary", "soak_secs": soak_secs, "max_in_flight": 1},
                  {"name": "rest", "soak_secs": soak_secs, "max_in_flight": 10}],
        "hosts": hosts,
    })
    .to_string()
}

pub(crate) async fn wait_state(cp: &Cp, rollout: &str, host: &Host, want: &str) {
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
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the happy path end to end with real processes: canary then the
    // rest, both agents switch their real closures, probe, converge, and the
    // CP's event log equals each agent's acked queue one for one.
    let dir = TempDir::new("agent-happy");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
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

    // `nixfleet replay` agrees with what both sides stored...
    let replay = |args: &[&str]| Command::new(bin()).arg("replay").args(args).output().expect("replay");
    let db = cp.db.display().to_string();
    let out = replay(&["--db", &db]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("host web-2: Converged (agrees with the stored record)"), "{text}");
    assert!(text.contains("0 disagreements"), "{text}");
    let state = web1.state_dir().display().to_string();
    let trust = release.pub_path.display().to_string();
    let out = replay(&["--state-dir", &state, "--trust-key", &trust, "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("host web-1: Converged"));
    // ...and exits 1 naming the host when a cached record was altered.
    let conn = rusqlite::Connection::open(&cp.db).expect("open db");
    let changed = conn
        .execute(
            "UPDATE host_records SET record = replace(record, '\"Converged\"', '\"Soaking\"') WHERE hostname = 'web-2'",
            [],
        )
        .expect("tamper");
    assert_eq!(changed, 1);
    drop(conn);
    let out = replay(&["--db", &db, "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web-2 in stable@r1: stored record is Soaking"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_probe_rolls_the_host_back_and_the_cp_halts_the_rollout() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves autonomous rollback end to end: the canary's enforce probe
    // fails, the agent rolls back to the closure it ran before, the CP marks
    // it Reverted, and the second wave is never dispatched.
    let dir = TempDir::new("agent-rollback");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
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
    let status = cp.get_json("/v1/status").await;
    assert!(status["quarantined"].to_string().contains(bad1.as_str()), "the bad closure is quarantined: {status}");
    let summary = cp.get_json("/v1/rollouts/stable@r2").await;
    assert_eq!(summary["state"], "halted", "{summary}");
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
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves restart recovery mid-soak: after kill -9 the agent rebuilds its
    // record from the queue, resumes its probes and converges; the CP's log
    // has every event exactly once.
    let dir = TempDir::new("agent-kill-soak");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let (old, new) = (web1.closure("old", PASSING_PROBE), web1.closure("new", PASSING_PROBE));
    web1.boot_into(&old);
    let m = manifest("stable@k1", 6, &[("web-1", 0, &new)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    // Two kill points: as soon as the CP sees Soaking, and again once the
    // restarted agent has delivered more probe results.
    wait_state(&cp, "stable@k1", &web1, "Soaking").await;
    web1.kill9_agent();
    let delivered = cp_events(&cp, "stable@k1", "web-1").await.len();
    web1.start_agent(&cp, &release.pub_path);
    let start = Instant::now();
    while cp_events(&cp, "stable@k1", "web-1").await.len() < delivered + 2 {
        assert!(start.elapsed() < CONVERGE_LIMIT, "no progress after the restart:\n{}", web1.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if cp.host_state("stable@k1", "web-1").await == "Soaking" {
        web1.kill9_agent();
        web1.start_agent(&cp, &release.pub_path);
    }
    wait_state(&cp, "stable@k1", &web1, "Converged").await;
    assert_eq!(web1.running(), Some(PathBuf::from(new.as_str())));
    assert_logs_agree(&cp, "stable@k1", &web1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_switch_reports_the_switch_that_finished_without_it() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the detached switch outlives a kill -9 of the agent and the
    // restarted agent reports the activation it can prove from
    // current-system, then converges; nothing is lost or duplicated.
    let dir = TempDir::new("agent-kill-switch");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_signed_by_a_key_the_agent_does_not_trust_is_refused_and_nothing_activates() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the agent verifies with its own trust keys, not the CP's: a
    // dispatch of a rollout the CP accepted but the host does not trust ends
    // as DispatchRejected, and current-system never moves.
    let dir = TempDir::new("agent-untrusted");
    let release = Release::new(dir.path(), "release");
    let other = Release::new(dir.path(), "other");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let (old, new) = (web1.closure("old", PASSING_PROBE), web1.closure("new", PASSING_PROBE));
    web1.boot_into(&old);
    assert!(cp.publish(&release.sign(&manifest("stable@u1", 1, &[("web-1", 0, &new)]))).await.status.is_success());
    web1.start_agent(&cp, &other.pub_path);
    wait_state(&cp, "stable@u1", &web1, "Failed").await;
    let row = cp.host_row("stable@u1", "web-1").await;
    assert!(row.to_string().contains("trust"), "the refusal names the reason: {row}");
    assert_eq!(web1.running(), Some(PathBuf::from(old.as_str())), "nothing activated");
    assert_eq!(web1.acked("stable@u1").into_iter().map(|(_, k)| k).collect::<Vec<_>>(), vec!["DispatchRejected"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cp_down_the_agent_converges_alone_and_delivers_everything_in_order_later() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the agent works without its CP: the CP is killed mid-soak, the
    // host converges offline with its events queued, and after the CP comes
    // back every event is delivered in order, once.
    let dir = TempDir::new("agent-cp-down");
    let release = Release::new(dir.path(), "release");
    let mut cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let (old, new) = (web1.closure("old", PASSING_PROBE), web1.closure("new", PASSING_PROBE));
    web1.boot_into(&old);
    assert!(cp.publish(&release.sign(&manifest("stable@d1", 3, &[("web-1", 0, &new)]))).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@d1", &web1, "Soaking").await;
    cp.kill9();
    crate::harness::wait_for("the agent to converge offline", || {
        let view = QueueView::open(&web1.state_dir()).ok()?;
        let entries = view.list(&[EntryState::Pending]).ok()?;
        entries.iter().any(|e| e.header.as_ref().is_some_and(|h| h.kind == "Converged")).then_some(())
    });
    assert!(web1.pending() > 0, "events wait in the queue while the CP is down");
    cp.restart_same_port();
    wait_state(&cp, "stable@d1", &web1, "Converged").await;
    assert_logs_agree(&cp, "stable@d1", &web1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_switch_and_a_failed_rollback_are_both_reported() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves both failures reach the CP: the switch exits 1 (ActivationFailed
    // with its stderr), the rollback's switch fails too (RollbackFailed), and
    // the host stays Failed with a note that the operator must act.
    let dir = TempDir::new("agent-double-failure");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let spec = |label: &str| ClosureSpec {
        label: format!("web-1-{label}"),
        current_system: web1.current_system(),
        health_checks: Some(PASSING_PROBE.to_owned()),
        fail_switch: true,
        ..ClosureSpec::default()
    };
    let (old, bad) = (web1.nix.build_closure(&spec("old-broken")), web1.nix.build_closure(&spec("bad")));
    web1.boot_into(&old);
    assert!(cp.publish(&release.sign(&manifest("stable@f1", 1, &[("web-1", 0, &bad)]))).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    crate::harness::wait_for("both failures in the queue", || {
        let kinds: Vec<String> = web1.acked("stable@f1").into_iter().map(|(_, k)| k).collect();
        kinds.contains(&"RollbackFailed".to_owned()).then_some(kinds)
    });
    let kinds: Vec<String> = web1.acked("stable@f1").into_iter().map(|(_, k)| k).collect();
    assert!(kinds.contains(&"ActivationFailed".to_owned()), "{kinds:?}");
    assert_eq!(cp.host_state("stable@f1", "web-1").await, "Failed");
    let row = cp.host_row("stable@f1", "web-1").await;
    assert!(row["note"].as_str().unwrap_or("").contains("rollback failed"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_halt_a_failing_host_stays_failed_on_the_new_closure() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves on_health_failure = halt: sustained probe failure fails the host
    // and nothing rolls it back.
    let dir = TempDir::new("agent-halt");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let (old, bad) = (web1.closure("old", PASSING_PROBE), web1.closure("bad", FAILING_PROBE));
    web1.boot_into(&old);
    let m = manifest_with("stable@h1", 30, "halt", &[("web-1", 0, &bad)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@h1", &web1, "Failed").await;
    crate::harness::wait_for("the Failed event to be delivered", || (web1.pending() == 0).then_some(()));
    assert_eq!(web1.running(), Some(PathBuf::from(bad.as_str())), "halt never rolls back");
    let kinds: Vec<String> = web1.acked("stable@h1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds.last().map(String::as_str), Some("Failed"), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_required_closure_is_deferred_and_completes_after_the_reboot() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the deferred path: the agent sets the profile and reports
    // Deferred (shown in status with a note); after a "reboot" into the
    // target, the restarted agent reports the completion and converges.
    let dir = TempDir::new("agent-deferred");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let old = web1.closure("old", PASSING_PROBE);
    let new = web1.nix.build_closure(&ClosureSpec {
        label: "web-1-kernel".into(),
        current_system: web1.current_system(),
        health_checks: Some(PASSING_PROBE.to_owned()),
        reboot_required: Some("kernel".into()),
        ..ClosureSpec::default()
    });
    web1.boot_into(&old);
    assert!(cp.publish(&release.sign(&manifest("stable@b1", 1, &[("web-1", 0, &new)]))).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@b1", &web1, "Deferred").await;
    let row = cp.host_row("stable@b1", "web-1").await;
    assert!(row["note"].as_str().unwrap_or("").contains("reboot"), "{row}");
    assert_eq!(web1.running(), Some(PathBuf::from(old.as_str())), "no live switch");
    // The reboot: the agent stops, the machine comes up on the new closure.
    assert_eq!(web1.stop_agent(), Some(0));
    web1.boot_into(&new);
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@b1", &web1, "Converged").await;
    assert_logs_agree(&cp, "stable@b1", &web1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_that_kills_the_agent_and_completes_is_reported_by_the_restarted_agent() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the Cachix-Deploy failure mode is handled: the switch kill -9s
    // the agent (as restarting its unit would) and then completes; the
    // restarted agent proves the switch from current-system and the profile,
    // reports it once, and converges.
    let dir = TempDir::new("agent-switch-kills");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let old = web1.closure("old", PASSING_PROBE);
    let pid_file = web1.root.join("agent.pid");
    let new = web1.nix.build_closure(&ClosureSpec {
        label: "web-1-restarts-agent".into(),
        current_system: web1.current_system(),
        health_checks: Some(PASSING_PROBE.to_owned()),
        kill_pid_file: Some(pid_file.clone()),
        ..ClosureSpec::default()
    });
    web1.boot_into(&old);
    web1.start_agent(&cp, &release.pub_path);
    let pid = web1.agent.as_ref().expect("running").id();
    fs_err::write(&pid_file, pid.to_string()).expect("pid file");
    assert!(cp.publish(&release.sign(&manifest("stable@s1", 1, &[("web-1", 0, &new)]))).await.status.is_success());
    crate::harness::wait_for("the switch to kill the agent", || {
        web1.agent.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(|_| ())
    });
    crate::harness::wait_for("the switch to finish without the agent", || {
        (web1.running() == Some(PathBuf::from(new.as_str()))).then_some(())
    });
    let _ = std::fs::remove_file(&pid_file);
    web1.agent = None;
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@s1", &web1, "Converged").await;
    assert_logs_agree(&cp, "stable@s1", &web1).await;
    let kinds: Vec<String> = web1.acked("stable@s1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "ActivationCompleted").count(), 1, "{kinds:?}");
}

/// A CP with rollouts `stable@q1` and `canary@q1` for web-1, and web-1's
/// queue holding `events` (rollout id, event) in that order, delivered by the real drain worker until none
/// is pending and `settled` holds for the queue's folder. Returns the queue
/// (still open) with what keeps it alive.
async fn drain_through_real_cp(
    label: &str,
    config: nixfleet::queue::QueueConfig,
    events: impl FnOnce(&Closure, &Closure) -> Vec<(&'static str, nixfleet::wire::OutboundEvent)>,
    settled: impl Fn(&std::path::Path) -> bool,
) -> (TempDir, Cp, PathBuf, nixfleet::agent::journal::SharedQueue) {
    use nixfleet::agent::journal::SharedQueue;
    use nixfleet::agent::net::CpApi;
    use nixfleet::agent::workers::net::run_drain_worker;
    use nixfleet::agent::workers::shutdown_channel;
    use nixfleet::clock::ClockHandle;
    use nixfleet::ids::{Hostname, RolloutId};
    use nixfleet::queue::Queue;

    let dir = TempDir::new(label);
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let old =
        Closure::parse(&format!("{}/00000000000000000000000000000000-old", nixfleet::ids::store_dir())).expect("valid");
    let new =
        Closure::parse(&format!("{}/11111111111111111111111111111111-new", nixfleet::ids::store_dir())).expect("valid");
    for id in ["stable@q1", "canary@q1"] {
        assert!(cp.publish(&release.sign(&manifest(id, 1, &[("web-1", 0, &new)]))).await.status.is_success());
    }
    let host = Hostname::parse("web-1").expect("valid");
    let state_dir = dir.path().join("agent");
    let mut queue = Queue::open(&state_dir, host.clone(), config, ClockHandle::system()).expect("queue");
    for (id, event) in events(&old, &new) {
        queue.enqueue(&RolloutId::parse(id).expect("valid"), &event).expect("enqueue");
    }
    let queue = SharedQueue::new(queue);
    let (trigger, stop) = shutdown_channel();
    let api = CpApi::new(cp.host_url("web-1"), host);
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let worker = tokio::spawn(run_drain_worker(api, queue.clone(), wake, Duration::from_millis(50), stop));
    let start = Instant::now();
    while queue.lock().pending_len() > 0 || !settled(&state_dir) {
        assert!(start.elapsed() < CONVERGE_LIMIT, "the queue never drained and settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.trigger();
    worker.await.expect("worker");
    (dir, cp, state_dir, queue)
}

fn converged(seq: u64, closure: &Closure) -> nixfleet::wire::OutboundEvent {
    let at = time::macros::datetime!(2026-11-25 12:00 UTC);
    nixfleet::wire::OutboundEvent {
        seq,
        body: nixfleet::wire::WireEventBody::Converged { converged_at: at, current_closure: closure.clone() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_is_dead_lettered_and_the_events_after_it_are_delivered() {
    // Proves no head-of-line blocking with the real drain worker and the real
    // CP: an event the CP rejects goes to dead/ with the CP's reason and the
    // next event (of another rollout: within one rollout the CP applies only
    // the next seq) is still applied.
    use nixfleet::wire::{OutboundEvent, WireEventBody};
    let config = nixfleet::queue::QueueConfig::default();
    let (_dir, cp, state_dir, queue) = drain_through_real_cp(
        "agent-rejected",
        config,
        |old, new| {
            let legal = OutboundEvent {
                seq: 1,
                body: WireEventBody::DispatchAck {
                    current_closure_at_dispatch: old.clone(),
                    target_closure: new.clone(),
                    soak_secs: 1,
                    received_at: time::macros::datetime!(2026-11-25 12:00 UTC),
                },
            };
            vec![("stable@q1", converged(1, new)), ("canary@q1", legal)]
        },
        |_| true,
    )
    .await;
    let view = QueueView::open(&state_dir).expect("view");
    let dead = view.list(&[EntryState::Dead]).expect("list");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.as_deref().unwrap_or("").contains("illegal"), "{:?}", dead[0].reason);
    let acked = queue.lock().acked().iter().map(|q| (q.rollout_id.to_string(), q.event.seq)).collect::<Vec<_>>();
    assert_eq!(acked, vec![("canary@q1".to_owned(), 1)]);
    assert_eq!(cp.host_state("stable@q1", "web-1").await, "Pending");
    assert_eq!(cp.host_state("canary@q1", "web-1").await, "Activating");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_worker_applies_acked_retention() {
    // Proves the running agent bounds acked/ (the limit here is 0): once
    // delivered, the older rollout's acked history is removed from disk and
    // the newest rollout's is kept.
    let config = nixfleet::queue::QueueConfig { acked_max_count: 0, ..nixfleet::queue::QueueConfig::default() };
    let acked_on_disk = |state_dir: &std::path::Path| {
        let view = QueueView::open(state_dir).expect("view");
        view.list(&[EntryState::Acked]).expect("list").into_iter().filter_map(|e| e.header).collect::<Vec<_>>()
    };
    let ack = |old: &Closure, new: &Closure| nixfleet::wire::OutboundEvent {
        seq: 1,
        body: nixfleet::wire::WireEventBody::DispatchAck {
            current_closure_at_dispatch: old.clone(),
            target_closure: new.clone(),
            soak_secs: 1,
            received_at: time::macros::datetime!(2026-11-25 12:00 UTC),
        },
    };
    let (_dir, cp, state_dir, _queue) = drain_through_real_cp(
        "agent-acked-retention",
        config,
        |old, new| vec![("stable@q1", ack(old, new)), ("canary@q1", ack(old, new))],
        |state_dir| acked_on_disk(state_dir).len() == 1,
    )
    .await;
    let kept = acked_on_disk(&state_dir);
    assert_eq!((kept[0].rollout_id.as_str(), kept[0].seq), ("canary@q1", 1));
    assert_eq!(cp.host_state("stable@q1", "web-1").await, "Activating", "delivered before it was pruned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_offered_while_another_is_live_waits_busy_and_runs_after_it() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves rule 8 (`docs/protocol.md` §3) end to end (the reproduced bug): A soaks on web-1, B is
    // published on the same channel; the CP holds B's dispatch for web-1
    // (the view names A as what holds it), A's probe then fails, A rolls back
    // to its pre-A closure, and only then is B dispatched, accepted and
    // converged. Before the fix B converged first and A's gate then rolled
    // the host back under it. (The agent's own `busy` refusal, the second
    // line for a CP that does not know A, is proven by the reducer's tests
    // and the simulator.)
    let dir = TempDir::new("agent-busy");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_tls(dir.path(), &release.pub_path, &[]);
    let mut web1 = Host::new("web-1");
    let fail_now = web1.root.join("fail-now");
    let a_probe = format!(
        r#"{{"probes":[{{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
  "argv":["/bin/sh","-c","test ! -e '{}'"],"timeout_secs":5}}]}}"#,
        fail_now.display()
    );
    let (old, a, b) =
        (web1.closure("old", PASSING_PROBE), web1.closure("a", &a_probe), web1.closure("b", PASSING_PROBE));
    web1.boot_into(&old);
    assert!(cp.publish(&release.sign(&manifest("stable@a1", 300, &[("web-1", 0, &a)]))).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@a1", &web1, "Soaking").await;
    assert!(cp.publish(&release.sign(&manifest("stable@b1", 1, &[("web-1", 0, &b)]))).await.status.is_success());
    let detail = cp.get_json("/v1/rollouts/stable@b1").await;
    let held_by = detail["waves"][0]["hosts"][0]["held_by"].clone();
    assert_eq!(held_by, "stable@a1", "B's dispatch for web-1 is held by A: {detail}");
    // Several long-poll rounds of the agent: B is never offered meanwhile.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(web1.acked("stable@b1").is_empty(), "B did not reach the agent while A is live");
    assert_eq!(cp.host_state("stable@b1", "web-1").await, "Pending");
    assert_eq!(web1.running(), Some(PathBuf::from(a.as_str())), "B did not touch the host");
    fs_err::write(&fail_now, "x").expect("break A");
    wait_state(&cp, "stable@a1", &web1, "Reverted").await;
    wait_state(&cp, "stable@b1", &web1, "Converged").await;
    assert_eq!(web1.running(), Some(PathBuf::from(b.as_str())), "B's closure runs at the end");
    let b_kinds: Vec<(u64, String)> = web1.acked("stable@b1");
    assert_eq!(b_kinds[..1], [(1, "DispatchAck".to_owned())], "{b_kinds:?}");
    let a_kinds: Vec<String> = web1.acked("stable@a1").into_iter().map(|(_, k)| k).collect();
    assert_eq!(a_kinds.last().map(String::as_str), Some("RollbackComplete"), "{a_kinds:?}");
    assert_logs_agree(&cp, "stable@b1", &web1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotted_dispatch_ack_is_rebuilt_and_the_restarted_agent_still_rolls_the_host_back() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the fix of divergence 8 in docs/simulator.md through the real binaries: kill -9 while soaking,
    // the acked DispatchAck file (the only record holding the rollback
    // target) rots, the restarted agent rebuilds it and keeps supervising:
    // the probe starts failing, the gate fires and the host goes back to
    // the closure it ran at dispatch. `replay --state-dir` names the loss.
    // (Before: the rollout was skipped; no probes, no gate, CP Soaking.)
    let dir = TempDir::new("agent-rotted-ack");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut web1 = Host::new("web-1");
    let flag = dir.path().join("break-the-service");
    let probe = format!(
        r#"{{"probes":[{{"name":"selftest","kind":"exec","mode":"enforce","interval_secs":1,
          "argv":["/bin/sh","-c","test ! -e {}"],"timeout_secs":5}}]}}"#,
        flag.display()
    );
    let (old, new) = (web1.closure("old", PASSING_PROBE), web1.closure("new", &probe));
    web1.boot_into(&old);
    let m = manifest("stable@rot1", 3600, &[("web-1", 0, &new)]);
    assert!(cp.publish(&release.sign(&m)).await.status.is_success());
    web1.start_agent(&cp, &release.pub_path);
    wait_state(&cp, "stable@rot1", &web1, "Soaking").await;
    crate::harness::wait_for("the DispatchAck to be acked", || {
        web1.acked("stable@rot1").iter().any(|(seq, kind)| *seq == 1 && kind == "DispatchAck").then_some(())
    });
    web1.kill9_agent();
    let acked = web1.state_dir().join("outbound-queue/acked");
    let ack = fs_err::read_dir(&acked)
        .expect("acked/")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-stable@rot1-DispatchAck.json"))
        .expect("the DispatchAck file");
    fs_err::write(&ack, b"{\"bit\": \"rot\"").expect("rot it");
    fs_err::write(&flag, b"").expect("the service breaks");
    web1.start_agent(&cp, &release.pub_path);

    wait_state(&cp, "stable@rot1", &web1, "Reverted").await;
    assert_eq!(web1.running(), Some(PathBuf::from(old.as_str())), "rolled back to the closure it ran at dispatch");
    let log = web1.log();
    assert!(log.contains("is rebuilt") && log.contains("seq 1 (DispatchAck"), "{log}");
    web1.stop_agent();
    let trust = release.pub_path.display().to_string();
    let state = web1.state_dir().display().to_string();
    let out = Command::new(bin())
        .args(["replay", "--state-dir", &state, "--trust-key", &trust, "--quiet"])
        .output()
        .expect("replay");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a lost record is a problem: {text}");
    // The rebuilt record was written back to the queue at the restart (the
    // rotted copy left dead/); the loss stays on record in rebuilt-records.log.
    assert!(
        text.contains("REBUILT at an earlier start (written back to the queue): stable@rot1: seq 1 (DispatchAck")
            && text.contains("Reverted"),
        "{text}"
    );
}
