//! The runners: how each program of an activation is started, waited for
//! until the deadline, and killed past it (`nix-store`, `nix-env` with
//! captured output; `switch-to-configuration` detached, logging to a file).

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{
    utf8_tail, ActivationConfig, ActivationOutcome, EXIT_CODE_NOT_RUN, EXIT_CODE_SIGNALLED, EXIT_CODE_TIME_LIMIT,
    SWITCH_UNIT_PREFIX,
};
use crate::wire::event::MAX_STDERR_TAIL_BYTES;

/// How `switch-to-configuration` is started relative to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchRunner {
    /// `systemd-run --unit=nixfleet-switch-<id> --wait --collect …`: the
    /// switch runs in its own transient unit and cgroup, so stopping or
    /// restarting the agent's unit does not kill it. The time limit is
    /// enforced by `RuntimeMaxSec=` and by `systemctl stop` of the unit.
    Detached { systemd_run: PathBuf, systemctl: PathBuf },
    /// `setsid PROGRAM …`: a new session and process group, so a signal to
    /// the agent's process group does not reach it. Does not leave the
    /// agent's cgroup: under systemd use `Detached`.
    Session { setsid: PathBuf },
    /// A plain child in the agent's process group; it dies with the agent's
    /// group. For debugging only.
    Direct,
}

impl SwitchRunner {
    /// `Detached` when systemd is the init system (the test `sd_booted(3)`
    /// uses: `/run/systemd/system` exists), else `Session`.
    pub fn detect() -> SwitchRunner {
        if Path::new("/run/systemd/system").is_dir() {
            SwitchRunner::Detached { systemd_run: "systemd-run".into(), systemctl: "systemctl".into() }
        } else {
            SwitchRunner::Session { setsid: "setsid".into() }
        }
    }

    pub(super) fn method_name(&self) -> &'static str {
        match self {
            SwitchRunner::Detached { .. } => "systemd-run",
            SwitchRunner::Session { .. } => "setsid",
            SwitchRunner::Direct => "direct",
        }
    }
}

/// A failed step: the exit code, the program's own output and our context.
#[derive(Debug)]
pub(super) struct StepFailure {
    exit_code: i32,
    output: Vec<u8>,
    context: String,
}

impl StepFailure {
    pub(super) fn new(exit_code: i32, output: Vec<u8>, context: String) -> StepFailure {
        StepFailure { exit_code, output, context }
    }

    pub(super) fn into_outcome(self) -> ActivationOutcome {
        let mut text = self.output;
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend_from_slice(format!("nixfleet: {}", self.context).as_bytes());
        ActivationOutcome::Failed { exit_code: self.exit_code, stderr_tail: utf8_tail(&text, MAX_STDERR_TAIL_BYTES) }
    }
}

/// Runs a short-lived Nix command with captured output, killed at the deadline.
pub(super) async fn run_captured(
    mut cmd: Command,
    program: &Path,
    step: &str,
    closure: &str,
    deadline: Instant,
    time_limit: Duration,
) -> Result<(), StepFailure> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let name = program.display();
    let child = cmd.spawn().map_err(|e| {
        StepFailure::new(EXIT_CODE_NOT_RUN, Vec::new(), format!("{step} {closure}: cannot run {name}: {e}"))
    })?;
    let output = match tokio::time::timeout_at(deadline, child.wait_with_output()).await {
        Err(_elapsed) => {
            let why = format!(
                "{step} {closure}: {name} exceeded the activation time limit of {} s and was killed",
                time_limit.as_secs()
            );
            return Err(StepFailure::new(EXIT_CODE_TIME_LIMIT, Vec::new(), why));
        }
        Ok(Err(e)) => {
            return Err(StepFailure::new(
                EXIT_CODE_NOT_RUN,
                Vec::new(),
                format!("{step} {closure}: waiting for {name}: {e}"),
            ))
        }
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(());
    }
    let mut text = output.stderr;
    text.extend_from_slice(&output.stdout);
    let (exit_code, how) = describe_status(output.status);
    Err(StepFailure::new(exit_code, text, format!("{step} {closure}: {name} {how}")))
}

fn describe_status(status: ExitStatus) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, format!("exited with status {code}")),
        (None, Some(sig)) => (EXIT_CODE_SIGNALLED, format!("was killed by signal {sig}")),
        (None, None) => (EXIT_CODE_SIGNALLED, "ended without an exit status".to_owned()),
    }
}

/// Starts `CLOSURE/bin/switch-to-configuration ACTION` through the configured
/// runner and waits for it until the deadline; at the deadline the switch's
/// whole process group (or unit) is killed.
pub(super) async fn run_switch(
    cfg: &ActivationConfig,
    closure: &str,
    action: &str,
    id: &str,
    deadline: Instant,
) -> Result<(), StepFailure> {
    let switch = Path::new(closure).join("bin/switch-to-configuration");
    let log_path = cfg.log_dir.join(format!("switch-{id}.log"));
    let fail = |exit_code: i32, output: Vec<u8>, why: String| {
        StepFailure::new(exit_code, output, format!("{} {action}: {why}", switch.display()))
    };
    fs_err::create_dir_all(&cfg.log_dir).map_err(|e| fail(EXIT_CODE_NOT_RUN, Vec::new(), e.to_string()))?;
    let log = fs_err::File::create(&log_path).map_err(|e| fail(EXIT_CODE_NOT_RUN, Vec::new(), e.to_string()))?;
    let log_err = log
        .file()
        .try_clone()
        .map_err(|e| fail(EXIT_CODE_NOT_RUN, Vec::new(), format!("{}: {e}", log_path.display())))?;

    let unit = format!("{SWITCH_UNIT_PREFIX}{id}");
    let (program, mut cmd) = match &cfg.switch_runner {
        SwitchRunner::Detached { systemd_run, .. } => {
            let mut cmd = Command::new(systemd_run);
            cmd.arg(format!("--unit={unit}"))
                .args(["--wait", "--collect", "--quiet", "--service-type=exec"])
                .arg(format!("--property=RuntimeMaxSec={}", cfg.time_limit.as_secs().max(1)))
                .arg(format!("--property=StandardOutput=append:{}", log_path.display()))
                .arg(format!("--property=StandardError=append:{}", log_path.display()))
                .arg("--")
                .arg(&switch)
                .arg(action);
            (systemd_run.clone(), cmd)
        }
        SwitchRunner::Session { setsid } => {
            // Not a process group leader, so setsid(1) calls setsid(2) and
            // execs without forking: the pid we hold is the switch's, and it
            // leads its own process group.
            let mut cmd = Command::new(setsid);
            cmd.arg(&switch).arg(action);
            (setsid.clone(), cmd)
        }
        SwitchRunner::Direct => {
            let mut cmd = Command::new(&switch);
            cmd.arg(action);
            (switch.clone(), cmd)
        }
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::from(log.into_parts().0)).stderr(Stdio::from(log_err));
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(EXIT_CODE_NOT_RUN, Vec::new(), format!("cannot run {}: {e}", program.display())))?;

    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            return Err(fail(EXIT_CODE_NOT_RUN, read_tail(&log_path), format!("waiting for the switch: {e}")))
        }
        Err(_elapsed) => {
            let (stopped, what) = kill_switch(&cfg.switch_runner, &mut child, &unit).await;
            let lock = if stopped {
                "the switch lock is released"
            } else {
                "the switch MAY STILL BE RUNNING and holding the switch lock"
            };
            let why = format!("exceeded the activation time limit of {} s; {what}; {lock}", cfg.time_limit.as_secs());
            return Err(fail(EXIT_CODE_TIME_LIMIT, read_tail(&log_path), why));
        }
    };
    if status.success() {
        return Ok(());
    }
    let (exit_code, how) = describe_status(status);
    Err(fail(exit_code, read_tail(&log_path), how))
}

/// Kills a switch past its deadline and reaps it; says whether the switch
/// is known to be stopped, and what was done.
async fn kill_switch(runner: &SwitchRunner, child: &mut Child, unit: &str) -> (bool, String) {
    let pid = child.id();
    let (stopped, mut done) = match (runner, pid) {
        (SwitchRunner::Detached { systemctl, .. }, _) => {
            let stopped = Command::new(systemctl)
                .args(["stop", unit])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            match stopped {
                Ok(s) if s.success() => (true, format!("unit {unit} stopped")),
                Ok(s) => (false, format!("`{} stop {unit}` failed ({s})", systemctl.display())),
                Err(e) => (false, format!("cannot run {}: {e}", systemctl.display())),
            }
        }
        (SwitchRunner::Session { .. }, Some(pid)) => {
            let group = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw);
            match group.map(|g| rustix::process::kill_process_group(g, rustix::process::Signal::KILL)) {
                Some(Ok(())) => (true, format!("process group {pid} killed")),
                Some(Err(e)) => (false, format!("killing process group {pid} failed: {e}")),
                None => (false, format!("pid {pid} is not a valid process group")),
            }
        }
        // Direct: only the child itself is killed below; its own children
        // are not (documented: Direct is for debugging).
        (SwitchRunner::Session { .. }, None) | (SwitchRunner::Direct, _) => {
            (true, String::from("switch process killed (not its children: Direct runner)"))
        }
    };
    // The client (systemd-run), the session leader or the direct child.
    if let Err(e) = child.kill().await {
        done.push_str(&format!(" (kill of pid {pid:?}: {e})"));
    }
    (stopped, done)
}

fn read_tail(path: &Path) -> Vec<u8> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let max = MAX_STDERR_TAIL_BYTES as u64;
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        file.take(max).read_to_end(&mut buf)?;
        Ok(buf)
    };
    read().unwrap_or_else(|e| format!("(switch log {} unreadable: {e})", path.display()).into_bytes())
}
