//! `nixfleet agent` from the command line: resolve flags (and their
//! `NIXFLEET_AGENT_*` environment variables) into an [`AgentConfig`], load
//! the trust keys and the TLS files, and run the agent on a small tokio
//! runtime until SIGTERM/SIGINT (SIGHUP re-reads the TLS files).

use std::path::PathBuf;

use super::activation::SwitchRunner;
use super::runtime::{serve_notifying, AgentConfig, AgentError};
use crate::cli::{AgentArgs, SwitchRunnerArg};
use crate::client::{ClientError, ClientTlsPaths, CpUrl};
use crate::clock::ClockHandle;
use crate::ids::{Hostname, IdError};
use crate::sdnotify::Notifier;
use crate::sign::{PublicKey, SignError};

/// The agent is mostly idle and waits on I/O; two worker threads are
/// enough and keep its footprint small on every host.
const RUNTIME_WORKER_THREADS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum AgentCmdError {
    #[error(transparent)]
    Url(#[from] ClientError),
    #[error("--hostname: {0}")]
    Hostname(IdError),
    #[error("cannot read this machine's hostname (pass --hostname): {0}")]
    SystemHostname(std::io::Error),
    #[error(transparent)]
    TrustKey(#[from] SignError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}

fn system_hostname() -> Result<String, std::io::Error> {
    Ok(fs_err::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned())
}

/// Turns the parsed flags into a validated configuration.
pub fn config(args: &AgentArgs) -> Result<AgentConfig, AgentCmdError> {
    let hostname = match &args.hostname {
        Some(h) => h.clone(),
        None => system_hostname().map_err(AgentCmdError::SystemHostname)?,
    };
    let hostname = Hostname::parse(&hostname).map_err(AgentCmdError::Hostname)?;
    let trust_keys = args.trust_keys.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let mut activation = AgentConfig::activation_defaults(&args.state_dir);
    activation.nix_store = args.nix_store.clone();
    activation.nix_env = args.nix_env.clone();
    activation.profile = args.profile.clone();
    activation.current_system = args.current_system.clone();
    activation.time_limit = args.activation_timeout;
    activation.switch_runner = match args.switch_runner {
        SwitchRunnerArg::Auto => SwitchRunner::detect(),
        SwitchRunnerArg::SystemdRun => {
            SwitchRunner::Detached { systemd_run: "systemd-run".into(), systemctl: "systemctl".into() }
        }
        SwitchRunnerArg::Setsid => SwitchRunner::Session { setsid: PathBuf::from("setsid") },
        SwitchRunnerArg::Direct => SwitchRunner::Direct,
    };
    Ok(AgentConfig {
        state_dir: args.state_dir.clone(),
        cp: CpUrl::connect_to(
            &args.cp,
            &ClientTlsPaths {
                ca_cert: args.ca_cert.clone(),
                client_cert: args.client_cert.clone(),
                client_key: args.client_key.clone(),
            },
        )?,
        hostname,
        trust_keys,
        health_checks: args.health_checks.clone(),
        current_system: args.current_system.clone(),
        booted_system: args.booted_system.clone(),
        activation,
        tick: args.tick,
        heartbeat: args.heartbeat,
        drain: args.drain,
        longpoll_wait_secs: args.longpoll_wait,
    })
}

/// `nixfleet agent`.
pub fn run(args: AgentArgs) -> Result<(), AgentCmdError> {
    let cfg = config(&args)?;
    // Read (and unset, so switches and probes do not inherit it) before the
    // runtime's threads exist.
    let notifier = Notifier::take_from_env();
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|source| AgentError::StateDir { path: cfg.state_dir.clone(), source })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        // SIGHUP re-reads the client certificate, key and CA; every request
        // opens its own connection, so the next one uses the new files.
        let tls = cfg.cp.tls().cloned();
        let reloader = crate::signal::spawn_on_sighup(move || match &tls {
            Some(tls) => tls.reload_logged(),
            None => tracing::info!("SIGHUP: no TLS files to re-read (plaintext)"),
        })
        .map_err(AgentCmdError::Signal)?;
        let served = serve_notifying(cfg, ClockHandle::system(), &notifier, crate::signal::shutdown_signal()).await;
        reloader.abort();
        served.map_err(AgentCmdError::from)
    })
}
