//! The demo's fleet: certificates from a fresh `nixfleet pki` CA, the signed
//! manifest, the control plane and the agents, all in this process on
//! loopback, and [`Running`], which stops them all.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::closures::Store;
use super::{setup, DemoError, Host, ROLLOUT};
use crate::agent::activation::{ActivationConfig, SwitchRunner};
use crate::agent::runtime::{serve as serve_agent, AgentConfig};
use crate::client::{request, CpUrl};
use crate::clock::ClockHandle;
use crate::cp::server::{self, ServeConfig};
use crate::cp::transport::TlsAcceptor;
use crate::ids::Hostname;
use crate::sign::{self, SigningKey};
use crate::tls::{self, CertKeyFiles, ClientTlsFiles, ReloadableClientConfig, ReloadableServerConfig, Role};
use crate::tools::pki;

/// How long the CP and the agents get to stop after being asked; past it
/// their tasks are aborted (their child processes are killed on drop).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The demo's certificates: a CA, the CP's (for 127.0.0.1), one per host and
/// the operator's, all in `work/pki` as `nixfleet pki` writes them.
#[derive(Debug)]
pub struct DemoPki {
    pub dir: PathBuf,
}

impl DemoPki {
    pub fn new(work: &Path, hosts: &[Host], clock: &ClockHandle) -> Result<DemoPki, DemoError> {
        let dir = work.join("pki");
        pki::init(&dir, clock.now())?;
        let demo = DemoPki { dir };
        demo.issue("cp", Role::Cp, vec![IpAddr::from([127, 0, 0, 1])], clock)?;
        demo.issue("operator", Role::Operator, Vec::new(), clock)?;
        for host in hosts {
            demo.issue(&host.name, Role::Host, Vec::new(), clock)?;
        }
        Ok(demo)
    }

    fn issue(&self, name: &str, role: Role, ips: Vec<IpAddr>, clock: &ClockHandle) -> Result<(), DemoError> {
        let request = pki::IssueRequest { name: name.to_owned(), role, dns: Vec::new(), ips, days: 1 };
        pki::issue(&self.dir, &request, clock.now())?;
        Ok(())
    }

    fn files(&self, name: &str) -> CertKeyFiles {
        CertKeyFiles { cert: self.dir.join(format!("{name}.crt")), key: self.dir.join(format!("{name}.key")) }
    }

    fn server(&self) -> Result<Arc<ReloadableServerConfig>, DemoError> {
        let files = tls::ServerTlsFiles { identity: self.files("cp"), client_ca: self.dir.join(pki::CA_CERT_FILE) };
        Ok(Arc::new(ReloadableServerConfig::load(files)?))
    }

    /// The CP's URL as `name`, presenting its certificate.
    pub fn url(&self, addr: SocketAddr, name: &str) -> Result<CpUrl, DemoError> {
        let files = ClientTlsFiles { ca: self.dir.join(pki::CA_CERT_FILE), identity: Some(self.files(name)) };
        let tls = Arc::new(ReloadableClientConfig::load(files)?);
        Ok(CpUrl::parse(&format!("https://{addr}")).map_err(setup("url"))?.with_tls(tls))
    }
}

/// The signed manifest: wave 0 is the canary (the first host), wave 1 the rest.
pub fn signed_manifest(key: &SigningKey, hosts: &[Host]) -> Result<Vec<u8>, DemoError> {
    let hosts_json: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| (h.name.clone(), serde_json::json!({"wave": h.wave, "target_closure": h.new.as_str()})))
        .collect();
    let (channel, git_ref) = ROLLOUT.split_once('@').unwrap_or(("stable", "demo-1"));
    let rest = hosts.len().saturating_sub(1).max(1);
    let manifest = serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "sustained_failure_secs": 3, "max_failed_hosts": 0},
        "waves": [{"name": "canary", "soak_secs": 3, "max_in_flight": 1},
                  {"name": "rest", "soak_secs": 3, "max_in_flight": rest}],
        "hosts": hosts_json,
    })
    .to_string();
    serde_json::to_vec(&sign::sign_envelope(key, manifest.as_bytes())).map_err(setup("envelope"))
}

/// The CP and agent tasks of one run, and the switches that stop them:
/// the agents first, then the CP (an agent still running after its CP has
/// gone would log a failed long-poll under the demo's final table).
#[derive(Debug)]
pub struct Running {
    stop_agents: watch::Sender<bool>,
    stop_cp: watch::Sender<bool>,
    agents: Vec<JoinHandle<()>>,
    cp: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn new() -> Running {
        Running {
            stop_agents: watch::channel(false).0,
            stop_cp: watch::channel(false).0,
            agents: Vec::new(),
            cp: Vec::new(),
        }
    }

    fn stopped(switch: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = switch.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Asks the agents to stop, then the CP, each within [`STOP_GRACE`] of
    /// the start; aborts what is left.
    pub async fn stop(&mut self) {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for (switch, tasks) in [(&self.stop_agents, &mut self.agents), (&self.stop_cp, &mut self.cp)] {
            switch.send_replace(true);
            for mut task in std::mem::take(tasks) {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                    let _ = task.await;
                }
            }
        }
    }
}

/// Starts the control plane on a loopback port and publishes the rollout;
/// returns the operator's URL.
pub async fn start_cp(
    running: &mut Running,
    work: &Path,
    demo_pki: &DemoPki,
    key: &SigningKey,
    envelope: Vec<u8>,
) -> Result<(CpUrl, SocketAddr), DemoError> {
    let listener = server::bind("127.0.0.1:0".parse().map_err(setup("address"))?)?;
    let addr = listener.local_addr()?;
    let cfg = ServeConfig {
        db_path: work.join("cp.db"),
        trust_keys: vec![key.public_key()],
        heartbeat_interval_secs: 2,
        grace: Duration::from_secs(2),
        limits: crate::cp::ServeLimits::default(),
    };
    let acceptor = TlsAcceptor::new(demo_pki.server()?);
    let serve = server::serve(listener, acceptor, cfg, ClockHandle::system(), Running::stopped(&running.stop_cp));
    running.cp.push(tokio::spawn(async move {
        let _ = serve.await;
    }));
    let url = demo_pki.url(addr, "operator")?;
    let published = request(&url, Method::POST, "/v1/rollouts", &[], Some(envelope)).await.map_err(setup("publish"))?;
    if !published.status.is_success() {
        return Err(DemoError::Setup(format!("publish answered {}", published.status)));
    }
    Ok((url, addr))
}

/// Starts one agent per host, each with its own state dir, profile and
/// `current-system` link, speaking mutual TLS with its own certificate.
pub fn start_agents(
    running: &mut Running,
    hosts: &[Host],
    store: &Store,
    demo_pki: &DemoPki,
    addr: SocketAddr,
    key: &SigningKey,
) -> Result<(), DemoError> {
    let (nix_store, nix_env) = store.programs();
    let nix_extra_env = store.nix_env_vars();
    for host in hosts {
        let root = &host.root;
        let activation = ActivationConfig {
            nix_store: nix_store.clone(),
            nix_env: nix_env.clone(),
            profile: root.join("profile"),
            current_system: root.join("current-system"),
            switch_runner: SwitchRunner::Session { setsid: "setsid".into() },
            time_limit: Duration::from_secs(60),
            log_dir: root.join("log"),
            nix_extra_env: nix_extra_env.clone(),
        };
        let cfg = AgentConfig {
            state_dir: root.join("state"),
            cp: demo_pki.url(addr, &host.name)?,
            hostname: Hostname::parse(&host.name).map_err(setup("hostname"))?,
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
        let agent = serve_agent(cfg, ClockHandle::system(), Running::stopped(&running.stop_agents));
        running.agents.push(tokio::spawn(async move {
            let _ = agent.await;
        }));
    }
    Ok(())
}
