//! `systemd` probes: Pass when `systemctl is-active UNIT` exits 0 (the unit
//! is active). The program is configurable so tests and non-standard hosts
//! can point elsewhere.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::ProbeRun;

/// `systemctl is-active` answers from systemd's memory in milliseconds; a
/// hung D-Bus is a failure, not something to wait on.
pub const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks systemd once whether `unit` is active.
pub async fn run(systemctl: &Path, unit: &str) -> ProbeRun {
    let mut cmd = Command::new(systemctl);
    cmd.args(["is-active", "--", unit]).stdin(Stdio::null()).kill_on_drop(true);
    let program = systemctl.display();
    match tokio::time::timeout(SYSTEMCTL_TIMEOUT, cmd.output()).await {
        Err(_elapsed) => {
            ProbeRun::fail(format!("{program} is-active {unit} timed out after {} s", SYSTEMCTL_TIMEOUT.as_secs()))
        }
        Ok(Err(e)) => ProbeRun::fail(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) if out.status.success() => ProbeRun::pass(),
        Ok(Ok(out)) => {
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let state = if state.is_empty() { "not active".to_owned() } else { state };
            let extra = if err.is_empty() { String::new() } else { format!(" ({err})") };
            ProbeRun::fail(format!("unit {unit} is {state}{extra}"))
        }
    }
}
