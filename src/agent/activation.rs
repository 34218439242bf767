//! Activation on a NixOS host (`docs/protocol.md` §6): fetch the closure, point the system
//! profile at it, run its `switch-to-configuration`, and check what
//! `/run/current-system` resolves to afterwards.
//!
//! This is the part of the agent that touches the host, so it exists as its
//! own module with plain-data results ([`ActivationOutcome`]); the agent
//! runtime turns them into machine events. Three lessons from peers shape it:
//!
//! * The switch can restart the agent itself (its unit is part of the new
//!   system; Cachix Deploy loses its agent this way). So the switch runs
//!   detached from the agent ([`SwitchRunner`]), and its output goes to a log
//!   file rather than a pipe the agent's death would break (SIGPIPE).
//! * A switch that hangs must not hold the switch lock forever (deploy-rs
//!   #390): at the time limit the whole process group (or systemd unit) is
//!   killed and the activation is reported as failed.
//! * The profile is set before the switch runs, so the bootloader follows the
//!   new closure even if the switch dies half-way.

use std::ffi::OsString;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::ids::Closure;
use crate::wire::event::{SHORT_TEXT_MAX_BYTES, STDERR_TAIL_MAX_BYTES};

/// A closure carrying this file at its root must not be switched live
/// (kernel, systemd, dbus or init would change): set the profile, run
/// `switch-to-configuration boot`, report Deferred. The file's content names
/// the component.
pub const REBOOT_REQUIRED_MARKER: &str = "nixfleet-reboot-required";

/// Transient systemd units are named `nixfleet-switch-<activation id>`.
pub const SWITCH_UNIT_PREFIX: &str = "nixfleet-switch-";

/// A real switch restarts services and may wait on slow stop jobs; 15 minutes
/// is far beyond a healthy switch and short enough that a hung one does not
/// hold the switch lock for hours. At the limit the switch is killed.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Activation ids become systemd unit and log file names; longer ids are cut.
pub const MAX_ACTIVATION_ID_LEN: usize = 64;

/// Exit code reported when a program could not be run at all, or a step
/// failed without a process exit status (I/O error, bad marker file).
pub const EXIT_CODE_NOT_RUN: i32 = -1;
/// Exit code reported when a program was killed by a signal.
pub const EXIT_CODE_SIGNALLED: i32 = -2;
/// Exit code reported when the switch exited 0 but `current-system` does not
/// resolve to a store path.
pub const EXIT_CODE_VERIFY_FAILED: i32 = -3;
/// Exit code reported when the activation exceeded its time limit and was killed.
pub const EXIT_CODE_TIME_LIMIT: i32 = -4;
/// Exit code reported with a completed activation: the switch exited 0, or
/// the host was proven to run the closure already.
pub const EXIT_CODE_COMPLETED: i32 = 0;

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

    fn method_name(&self) -> &'static str {
        match self {
            SwitchRunner::Detached { .. } => "systemd-run",
            SwitchRunner::Session { .. } => "setsid",
            SwitchRunner::Direct => "direct",
        }
    }
}

/// Everything activation needs from the host; every program path is
/// configurable so tests and unusual hosts can point elsewhere.
#[derive(Debug, Clone)]
pub struct ActivationConfig {
    pub nix_store: PathBuf,
    pub nix_env: PathBuf,
    /// The system profile (`/nix/var/nix/profiles/system`).
    pub profile: PathBuf,
    /// The symlink the switch repoints (`/run/current-system`).
    pub current_system: PathBuf,
    pub switch_runner: SwitchRunner,
    /// Deadline for the whole activation (realise, profile, switch).
    pub time_limit: Duration,
    /// Where the switch's stdout and stderr go (`switch-<id>.log`): a file
    /// survives the agent's death where a pipe would not.
    pub log_dir: PathBuf,
    /// Environment added to the `nix-store` and `nix-env` calls (tests point
    /// `NIX_CONFIG` at a local binary cache).
    pub nix_extra_env: Vec<(OsString, OsString)>,
}

impl ActivationConfig {
    /// The `docs/protocol.md` §6 defaults for a NixOS host, with the switch log in `log_dir`.
    pub fn host_defaults(log_dir: PathBuf) -> ActivationConfig {
        ActivationConfig {
            nix_store: "nix-store".into(),
            nix_env: "nix-env".into(),
            profile: "/nix/var/nix/profiles/system".into(),
            current_system: "/run/current-system".into(),
            switch_runner: SwitchRunner::detect(),
            time_limit: DEFAULT_TIME_LIMIT,
            log_dir,
            nix_extra_env: Vec::new(),
        }
    }
}

/// Forward activation honours the reboot-required marker; rollback always
/// switches live, because the rollback target is the closure the host was
/// running when it accepted the dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Rollback,
}

/// One activation to run.
#[derive(Debug, Clone)]
pub struct ActivationRequest {
    pub closure: Closure,
    pub direction: Direction,
    /// Names the systemd unit and the log file; characters other than
    /// `[A-Za-z0-9_-]` are replaced by `_` (see [`sanitize_activation_id`]).
    pub activation_id: String,
}

/// Sent once, before any program runs: the runtime turns it into
/// `ActivationStarted` (forward only; it is illegal from Failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationStarted {
    pub switch_method: String,
}

/// The result of one activation (forward or rollback), as plain data: what
/// the runner returns, what the activation worker reports, and what the
/// reducer turns into an event ([`crate::agent::rollouts::forward_body`],
/// [`crate::agent::rollouts::rollback_body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivationOutcome {
    /// The switch exited 0 (or had already happened) and `current-system`
    /// resolves to `observed` (which the state machine compares with the
    /// target); reported with [`EXIT_CODE_COMPLETED`].
    Completed { observed: Closure },
    /// The closure is marked reboot-required: the profile is set and
    /// `switch-to-configuration boot` succeeded; a reboot finishes the job.
    Deferred { component: String },
    /// Any step failed. `stderr_tail` is at most [`STDERR_TAIL_MAX_BYTES`],
    /// keeps the end of the output, and ends with a `nixfleet:` line that
    /// names the step, the program and the path involved.
    Failed { exit_code: i32, stderr_tail: String },
}

/// Runs one activation to its end. Never panics; every failure is an
/// [`ActivationOutcome::Failed`].
pub async fn activate(
    cfg: &ActivationConfig,
    req: &ActivationRequest,
    on_started: impl FnOnce(ActivationStarted),
) -> ActivationOutcome {
    let id = sanitize_activation_id(&req.activation_id);
    let switch_method = match &cfg.switch_runner {
        SwitchRunner::Detached { .. } => {
            format!("switch-to-configuration via systemd-run unit {SWITCH_UNIT_PREFIX}{id}")
        }
        other => format!("switch-to-configuration via {}", other.method_name()),
    };
    on_started(ActivationStarted { switch_method });
    let deadline = Instant::now() + cfg.time_limit;
    match run_steps(cfg, req, &id, deadline).await {
        Ok(outcome) => outcome,
        Err(failure) => failure.into_outcome(),
    }
}

/// A failed step: the exit code, the program's own output and our context.
#[derive(Debug)]
struct StepFailure {
    exit_code: i32,
    output: Vec<u8>,
    context: String,
}

impl StepFailure {
    fn new(exit_code: i32, output: Vec<u8>, context: String) -> StepFailure {
        StepFailure { exit_code, output, context }
    }

    fn into_outcome(self) -> ActivationOutcome {
        let mut text = self.output;
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend_from_slice(format!("nixfleet: {}", self.context).as_bytes());
        ActivationOutcome::Failed { exit_code: self.exit_code, stderr_tail: utf8_tail(&text, STDERR_TAIL_MAX_BYTES) }
    }
}

async fn run_steps(
    cfg: &ActivationConfig,
    req: &ActivationRequest,
    id: &str,
    deadline: Instant,
) -> Result<ActivationOutcome, StepFailure> {
    let closure = req.closure.as_str();
    // 1. Fetch the closure (substituters check the cache signatures).
    let mut realise = Command::new(&cfg.nix_store);
    realise.arg("--realise").arg(closure).envs(cfg.nix_extra_env.iter().cloned());
    run_captured(realise, &cfg.nix_store, "realise", closure, deadline, cfg.time_limit).await?;

    // 2. Which switch: a marked closure is only made the next boot's default.
    let marker = Path::new(closure).join(REBOOT_REQUIRED_MARKER);
    let deferred_component = match req.direction {
        Direction::Rollback => None,
        Direction::Forward => read_marker(&marker)?,
    };

    // 3. Profile first, so the bootloader follows even if the switch dies.
    let mut set = Command::new(&cfg.nix_env);
    set.arg("-p").arg(&cfg.profile).arg("--set").arg(closure).envs(cfg.nix_extra_env.iter().cloned());
    let what = format!("set profile {}", cfg.profile.display());
    run_captured(set, &cfg.nix_env, &what, closure, deadline, cfg.time_limit).await?;

    // 4. The switch, detached from the agent.
    let action = if deferred_component.is_some() { "boot" } else { "switch" };
    run_switch(cfg, closure, action, id, deadline).await?;

    if let Some(component) = deferred_component {
        return Ok(ActivationOutcome::Deferred { component });
    }
    // 5. What is the host running now?
    let observed = resolve_current_system(&cfg.current_system).map_err(|why| {
        StepFailure::new(EXIT_CODE_VERIFY_FAILED, Vec::new(), format!("switch to {closure} exited 0 but {why}"))
    })?;
    Ok(ActivationOutcome::Completed { observed })
}

/// What [`restore_boot_default`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The profile and the boot default name the pre-dispatch closure again.
    Restored,
    /// Nothing to do: the profile no longer names the failed closure (it was
    /// restored before, or someone or something moved it since).
    Skipped {
        why: String,
    },
    Failed {
        exit_code: i32,
        stderr_tail: String,
    },
}

/// After a failed forward activation under `halt` (no rollback): points the
/// system profile back at `closure` and runs its `switch-to-configuration
/// boot`, so the next reboot boots the closure the host ran before the
/// dispatch rather than the one that failed. Nothing is switched live (the
/// operator decides under `halt`). Only while the profile still names
/// `failed`, so repeating it (after a restart) is harmless and it never
/// undoes a later change. Setting the profile alone would not do: on NixOS
/// the boot loader entry is written by `switch-to-configuration`, and a
/// switch that failed after installing the boot loader has already made the
/// failed closure the default.
pub async fn restore_boot_default(
    cfg: &ActivationConfig,
    closure: &Closure,
    failed: &Closure,
    activation_id: &str,
) -> RestoreOutcome {
    match resolve_current_system(&cfg.profile) {
        Ok(profile) if &profile == failed => {}
        Ok(profile) => {
            return RestoreOutcome::Skipped {
                why: format!("the profile {} names {profile}, not the failed {failed}", cfg.profile.display()),
            }
        }
        Err(why) => {
            return RestoreOutcome::Skipped { why: format!("the profile {} {why}", cfg.profile.display()) };
        }
    }
    let id = sanitize_activation_id(activation_id);
    let deadline = Instant::now() + cfg.time_limit;
    let steps = async {
        let mut set = Command::new(&cfg.nix_env);
        set.arg("-p").arg(&cfg.profile).arg("--set").arg(closure.as_str()).envs(cfg.nix_extra_env.iter().cloned());
        let what = format!("set profile {}", cfg.profile.display());
        run_captured(set, &cfg.nix_env, &what, closure.as_str(), deadline, cfg.time_limit).await?;
        run_switch(cfg, closure.as_str(), "boot", &id, deadline).await
    };
    match steps.await {
        Ok(()) => RestoreOutcome::Restored,
        Err(failure) => match failure.into_outcome() {
            ActivationOutcome::Failed { exit_code, stderr_tail } => RestoreOutcome::Failed { exit_code, stderr_tail },
            other => RestoreOutcome::Failed { exit_code: EXIT_CODE_NOT_RUN, stderr_tail: format!("{other:?}") },
        },
    }
}

/// Reads the reboot-required marker: `None` if absent, else the component it
/// names (trimmed, "unspecified" when empty, capped to the wire limit).
fn read_marker(marker: &Path) -> Result<Option<String>, StepFailure> {
    match fs_err::read(marker) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let component = text.trim();
            let component = if component.is_empty() { "unspecified" } else { component };
            Ok(Some(utf8_head(component, SHORT_TEXT_MAX_BYTES)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StepFailure::new(EXIT_CODE_NOT_RUN, Vec::new(), format!("reading reboot marker: {e}"))),
    }
}

/// Why a system link (`current-system`, a profile) names no closure.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{} does not resolve: {source}", link.display())]
    Dangling { link: PathBuf, source: std::io::Error },
    #[error("{} resolves to a non-UTF-8 path {}", link.display(), target.display())]
    NotUtf8 { link: PathBuf, target: PathBuf },
    #[error("{} does not resolve to a closure: {source}", link.display())]
    NotAClosure { link: PathBuf, source: crate::ids::IdError },
}

/// What `current_system` resolves to, as a closure.
pub fn resolve_current_system(current_system: &Path) -> Result<Closure, ResolveError> {
    let link = || current_system.to_owned();
    let target =
        std::fs::canonicalize(current_system).map_err(|source| ResolveError::Dangling { link: link(), source })?;
    let Some(text) = target.to_str() else { return Err(ResolveError::NotUtf8 { link: link(), target }) };
    Closure::parse(text).map_err(|source| ResolveError::NotAClosure { link: link(), source })
}

/// Runs a short-lived Nix command with captured output, killed at the deadline.
async fn run_captured(
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
async fn run_switch(
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
        let max = STDERR_TAIL_MAX_BYTES as u64;
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        file.take(max).read_to_end(&mut buf)?;
        Ok(buf)
    };
    read().unwrap_or_else(|e| format!("(switch log {} unreadable: {e})", path.display()).into_bytes())
}

/// Replaces characters that cannot appear in a unit or file name and caps the length.
pub fn sanitize_activation_id(id: &str) -> String {
    let clean: String = id
        .chars()
        .take(MAX_ACTIVATION_ID_LEN)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if clean.is_empty() {
        "unnamed".to_owned()
    } else {
        clean
    }
}

/// The last at most `max` bytes of `bytes` as UTF-8, cut at a character
/// boundary (invalid sequences become U+FFFD; the result still fits).
pub fn utf8_tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let mut cut = text.len().saturating_sub(max);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// The first at most `max` bytes of `text`, cut at a character boundary.
pub fn utf8_head(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_tail_keeps_the_end_within_the_limit_at_a_char_boundary() {
        // "é" is 2 bytes: cutting 5 bytes from "aéééé" must not split one.
        let text = "aéééé".as_bytes();
        let tail = utf8_tail(text, 5);
        assert_eq!(tail, "éé");
        assert!(tail.len() <= 5);
        assert_eq!(utf8_tail(b"short", 4096), "short");
        // Invalid bytes turn into U+FFFD (3 bytes) yet the result still fits.
        let junk = [0xffu8; 10];
        assert!(utf8_tail(&junk, 10).len() <= 10);
    }

    #[test]
    fn utf8_head_cuts_at_a_char_boundary() {
        assert_eq!(utf8_head("ééé", 3), "é");
        assert_eq!(utf8_head("kernel", 1024), "kernel");
    }

    #[test]
    fn activation_future_is_send_so_the_runtime_can_spawn_it() {
        // Compile-time proof: `tokio::spawn` needs a Send future.
        fn assert_send<T: Send>(_: &T) {}
        let cfg = ActivationConfig::host_defaults("/nonexistent".into());
        let closure = Closure::parse("/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-x").expect("valid");
        let req = ActivationRequest { closure, direction: Direction::Forward, activation_id: "a".into() };
        assert_send(&activate(&cfg, &req, |_| ()));
    }

    #[test]
    fn activation_ids_become_safe_unit_names() {
        assert_eq!(sanitize_activation_id("stable@2026-11-25.1/3"), "stable_2026-11-25_1_3");
        assert_eq!(sanitize_activation_id(""), "unnamed");
        assert_eq!(sanitize_activation_id(&"x".repeat(200)).len(), MAX_ACTIVATION_ID_LEN);
    }
}
