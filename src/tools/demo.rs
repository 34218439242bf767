//! `nixfleet demo`: the whole system on one machine. A control plane and
//! four agents run in this process on loopback, each agent with its own
//! state dir, profile and `current-system` link; the closures are real
//! store paths (`nix-store --add`) whose only stand-in is the
//! `bin/switch-to-configuration` script (it repoints that host's link).
//! A 2-wave rollout runs; web-3's new closure fails its enforce probe, so
//! web-3 rolls back by itself, the rollout halts, and a per-host table ends
//! the run. Everything else is the production code path.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hyper::Method;

use crate::agent::activation::{ActivationConfig, SwitchRunner};
use crate::agent::runtime::{serve as serve_agent, AgentConfig};
use crate::client::{request, CpUrl};
use crate::clock::ClockHandle;
use crate::cp::server::{self, PlainAcceptor, ServeConfig};
use crate::ids::{Closure, Hostname};
use crate::output::print_stdout;
use crate::sign;

const HOSTS: [(&str, usize); 4] = [("web-1", 0), ("web-2", 1), ("web-3", 1), ("web-4", 1)];
const BROKEN_HOST: &str = "web-3";
const ROLLOUT: &str = "stable@demo-1";
/// The demo should finish within a minute; past this something is wrong.
const DEMO_LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "the demo makes real store paths with `nix-store --add`, which failed ({0}); \
         install Nix (as root on Debian: `bash .ci/nix-setup.sh`) and run it as a user that may write the store"
    )]
    NoNix(String),
    #[error("demo setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// A closure directory turned into a real store path.
fn add_closure(work: &Path, name: &str, link: &Path, probe_exit: i32) -> Result<Closure, DemoError> {
    let dir = work.join(name);
    fs_err::create_dir_all(dir.join("bin"))?;
    fs_err::create_dir_all(dir.join("etc/nixfleet/agent"))?;
    let link = link.display();
    let script = format!(
        "#!/bin/sh\n# nixfleet demo stand-in for switch-to-configuration\nset -e\n\
         self=$(cd \"$(dirname \"$0\")/..\" && pwd)\n\
         case \"$1\" in\n  switch|test) ln -sfn \"$self\" '{link}.tmp' && mv -T '{link}.tmp' '{link}' ;;\n  boot) ;;\n  *) exit 2 ;;\nesac\n"
    );
    let switch = dir.join("bin/switch-to-configuration");
    fs_err::write(&switch, script)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs_err::set_permissions(&switch, std::fs::Permissions::from_mode(0o755))?;
    let checks = format!(
        r#"{{"probes":[{{"name":"app-selftest","kind":"exec","mode":"enforce","interval_secs":1,"argv":["/bin/sh","-c","exit {probe_exit}"],"timeout_secs":5}}]}}"#
    );
    fs_err::write(dir.join("etc/nixfleet/agent/health-checks.json"), checks)?;
    let out = Command::new("nix-store").arg("--add").arg(&dir).output().map_err(|e| DemoError::NoNix(e.to_string()))?;
    if !out.status.success() {
        return Err(DemoError::NoNix(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Closure::parse(String::from_utf8_lossy(&out.stdout).trim()).map_err(setup("store path"))
}

fn repoint(link: &Path, closure: &Closure) -> Result<(), DemoError> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(closure.as_str(), link)?;
    Ok(())
}

fn short(closure: &str) -> &str {
    closure.rsplit_once('-').map_or(closure, |(_, tail)| tail)
}

/// `nixfleet demo`.
pub fn run(keep: bool) -> Result<(), DemoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(keep))
}

async fn demo(keep: bool) -> Result<(), DemoError> {
    let started = Instant::now();
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce).map_err(setup("randomness"))?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let work = std::env::temp_dir().join(format!("nixfleet-demo-{nonce}"));
    fs_err::create_dir_all(&work)?;
    let say = |text: String| {
        let _ = print_stdout(&format!("[{:>5.1}s] {text}\n", started.elapsed().as_secs_f64()));
    };
    say(format!("work dir {}", work.display()));

    // Release key and closures: every host boots "old"; web-3's "new" fails its probe.
    let key = sign::generate().map_err(setup("key"))?;
    let mut hosts_json = serde_json::Map::new();
    let mut dirs = Vec::new();
    for (host, wave) in HOSTS {
        let root = work.join(host);
        fs_err::create_dir_all(root.join("state"))?;
        let link = root.join("current-system");
        let old = add_closure(&work, &format!("nixos-system-{host}-{nonce}-old"), &link, 0)?;
        let probe_exit = if host == BROKEN_HOST { 1 } else { 0 };
        let new = add_closure(&work, &format!("nixos-system-{host}-{nonce}-new"), &link, probe_exit)?;
        repoint(&link, &old)?;
        repoint(&root.join("profile"), &old)?;
        hosts_json.insert(host.to_owned(), serde_json::json!({"wave": wave, "target_closure": new.as_str()}));
        dirs.push((host, root));
    }
    say("built 8 closures (real store paths; stand-in switch scripts), every host runs its \"old\" one".to_owned());
    let (channel, git_ref) = ROLLOUT.split_once('@').unwrap_or(("stable", "demo-1"));
    let manifest = serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "sustained_failure_secs": 3, "max_failed_hosts": 0},
        "waves": [{"name": "canary", "soak_secs": 3, "max_in_flight": 1},
                  {"name": "rest", "soak_secs": 3, "max_in_flight": 3}],
        "hosts": hosts_json,
    })
    .to_string();
    let envelope = serde_json::to_vec(&sign::sign_envelope(&key, manifest.as_bytes())).map_err(setup("envelope"))?;

    // The control plane, on loopback.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener = server::bind("127.0.0.1:0".parse().map_err(setup("address"))?)?;
    let addr = listener.local_addr()?;
    let cfg = ServeConfig {
        db_path: work.join("cp.db"),
        trust_keys: vec![key.public_key()],
        heartbeat_interval_secs: 2,
        grace: Duration::from_secs(2),
        limits: crate::cp::ServeLimits::default(),
    };
    let cp_task =
        tokio::spawn(server::serve(listener, PlainAcceptor, cfg, ClockHandle::system(), stopped(stop_rx.clone())));
    let url = CpUrl::parse(&format!("http://{addr}")).map_err(setup("url"))?;
    say(format!("control plane on http://{addr}"));
    let published = request(&url, Method::POST, "/v1/rollouts", &[], Some(envelope)).await.map_err(setup("publish"))?;
    if !published.status.is_success() {
        return Err(DemoError::Setup(format!("publish answered {}", published.status)));
    }
    say(format!("published {ROLLOUT}: wave 0 = web-1 (canary), wave 1 = web-2 web-3 web-4"));

    // Four agents.
    let mut agents = Vec::new();
    for (host, root) in &dirs {
        let activation = ActivationConfig {
            nix_store: "nix-store".into(),
            nix_env: "nix-env".into(),
            profile: root.join("profile"),
            current_system: root.join("current-system"),
            switch_runner: SwitchRunner::Session { setsid: "setsid".into() },
            time_limit: Duration::from_secs(60),
            log_dir: root.join("log"),
            nix_extra_env: Vec::new(),
        };
        let cfg = AgentConfig {
            state_dir: root.join("state"),
            cp: url.clone(),
            hostname: Hostname::parse(host).map_err(setup("hostname"))?,
            trust_keys: vec![key.public_key()],
            health_checks: root.join("current-system/etc/nixfleet/agent/health-checks.json"),
            current_system: root.join("current-system"),
            booted_system: root.join("current-system"),
            activation,
            tick: Duration::from_millis(250),
            heartbeat: Duration::from_secs(2),
            drain: Duration::from_secs(1),
            longpoll_wait_secs: 5,
        };
        agents.push(tokio::spawn(serve_agent(cfg, ClockHandle::system(), stopped(stop_rx.clone()))));
    }
    say("started 4 agents".to_owned());

    // Watch the rollout through the CP's status API.
    let mut last: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut last_rollout = String::new();
    let detail = loop {
        let resp =
            request(&url, Method::GET, &format!("/v1/rollouts/{ROLLOUT}"), &[], None).await.map_err(setup("status"))?;
        let detail: serde_json::Value = resp.json().map_err(setup("status"))?;
        let rollout_state = format!(
            "{} (wave {})",
            detail["state"].as_str().unwrap_or("?"),
            detail["current_wave"].as_u64().unwrap_or(0)
        );
        if rollout_state != last_rollout {
            let why = detail["halt_reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
            say(format!("rollout {rollout_state}{why}"));
            last_rollout = rollout_state;
        }
        let mut settled = true;
        for wave in detail["waves"].as_array().into_iter().flatten() {
            for h in wave["hosts"].as_array().into_iter().flatten() {
                let name = h["hostname"].as_str().unwrap_or("?").to_owned();
                let state = h["state"].as_str().unwrap_or("?").to_owned();
                // Failed is final only once no rollback is still running.
                let rolling_back = h["note"].as_str() == Some("rolling back");
                settled &= matches!(state.as_str(), "Converged" | "Reverted")
                    || (state == "Failed" && !rolling_back)
                    || (state == "Pending" && detail["state"] == "halted");
                if last.get(&name) != Some(&state) {
                    let from = last.get(&name).cloned().unwrap_or_else(|| "-".to_owned());
                    say(format!("{name:<6} {from} -> {state}"));
                    last.insert(name, state);
                }
            }
        }
        if settled && detail["state"] == "halted" {
            break detail;
        }
        if started.elapsed() > DEMO_LIMIT {
            return Err(DemoError::Setup(format!("the rollout did not settle within {DEMO_LIMIT:?}: {detail}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The final report.
    let mut table = String::from("\nHOST    WAVE  STATE       RUNNING     NOTE\n");
    for wave in detail["waves"].as_array().into_iter().flatten() {
        for h in wave["hosts"].as_array().into_iter().flatten() {
            let name = h["hostname"].as_str().unwrap_or("?");
            let running = dirs
                .iter()
                .find(|(host, _)| *host == name)
                .and_then(|(_, root)| std::fs::canonicalize(root.join("current-system")).ok())
                .map(|p| short(&p.display().to_string()).to_owned())
                .unwrap_or_default();
            let note = h["note"].as_str().or_else(|| h["failure"]["cause"].as_str()).unwrap_or("");
            let _ = writeln!(
                table,
                "{name:<7} {:<5} {:<11} {running:<11} {note}",
                wave["index"].as_u64().unwrap_or(0),
                h["state"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        table,
        "\nrollout {ROLLOUT}: {}\n{}: its probe failed, it rolled back to the closure it ran before, and its closure is quarantined.",
        detail["halt_reason"].as_str().unwrap_or("halted"),
        BROKEN_HOST
    );
    print_stdout(&table)?;

    stop_tx.send_replace(true);
    for agent in agents {
        let _ = agent.await;
    }
    let _ = cp_task.await;
    if keep {
        say(format!(
            "kept {} (CP database, agent queues: try `nixfleet replay --db {}/cp.db`)",
            work.display(),
            work.display()
        ));
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
