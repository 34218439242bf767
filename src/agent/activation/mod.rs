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

mod runners;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::ids::Closure;
use crate::wire::event::MAX_SHORT_TEXT_BYTES;
use runners::{run_captured, run_switch, StepFailure};

pub use runners::SwitchRunner;

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
    /// Any step failed. `stderr_tail` is at most [`MAX_STDERR_TAIL_BYTES`](crate::wire::event::MAX_STDERR_TAIL_BYTES),
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
            Ok(Some(utf8_head(component, MAX_SHORT_TEXT_BYTES)))
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
