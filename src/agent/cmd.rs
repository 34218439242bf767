//! `nixfleet agent` from the command line: resolve flags (and their
//! `NIXFLEET_AGENT_*` environment variables) into an [`AgentConfig`], load
//! the trust keys, and run the agent on a small tokio runtime until
//! SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use super::activation::SwitchRunner;
use super::runtime::{serve, AgentConfig, AgentError};
use crate::cli::{AgentArgs, SwitchRunnerArg};
use crate::client::{ClientError, CpUrl};
use crate::clock::ClockHandle;
use crate::ids::{Hostname, IdError};
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
}

/// Parses `5s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(idx) => text.split_at(idx),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 5s, 500ms, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(d)
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
        cp: CpUrl::parse(&args.cp)?,
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
    fs_err::create_dir_all(&cfg.state_dir).map_err(|e| AgentError::Restore(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(serve(cfg, ClockHandle::system(), crate::signal::shutdown_signal()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        // Proves the flag syntax of --tick/--heartbeat/--drain.
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        for bad in ["", "0s", "5x", "s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
