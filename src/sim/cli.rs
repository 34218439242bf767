//! `nixfleet sim` as a command: input checks, the temp dir, the report.

use std::path::PathBuf;

use super::{run, FaultProfile, Scenario, SimConfig};
use crate::wire::Manifest;

/// Why `nixfleet sim` could not run (a violation is not an error).
#[derive(Debug)]
pub enum CliError {
    /// Bad input (`--manifest` unreadable or invalid, no hosts): exit 2.
    Input(String),
    /// The run could not be set up (temp dir, the CP's database).
    Setup(String),
}

/// `nixfleet sim`: runs, prints the report on stdout; Ok(false) when an
/// invariant broke (exit 1). `--until` and `--hosts` are checked by clap
/// (`cli::parse_duration`, at least one host).
pub fn run_cli(
    seed: u64,
    hosts: usize,
    faults: FaultProfile,
    scenario: Option<Scenario>,
    manifest: Option<&std::path::Path>,
    until: std::time::Duration,
) -> Result<bool, CliError> {
    if hosts == 0 && manifest.is_none() {
        return Err(CliError::Input("--hosts: a fleet needs at least 1 host".into()));
    }
    let manifest = match manifest {
        Some(p) => {
            let bytes = fs_err::read(p).map_err(|e| CliError::Input(format!("--manifest: {e}")))?;
            Manifest::parse(&bytes).map_err(|e| CliError::Input(format!("--manifest {}: {e}", p.display())))?;
            Some(bytes)
        }
        None => None,
    };
    let dir = tempfile_dir(seed).map_err(CliError::Setup)?;
    let cfg = SimConfig {
        seed,
        n_hosts: hosts,
        faults,
        scenario,
        manifest,
        until_ms: u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
        work_dir: dir.clone(),
        keep_going: false,
    };
    let outcome = run(cfg);
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = outcome.map_err(CliError::Setup)?;
    print!("{}", outcome.text);
    Ok(outcome.violation.is_none())
}

/// A fresh directory for the CP database: tmpfs when there is one (the
/// sim's fsyncs then cost nothing), else the system temp dir.
pub fn tempfile_dir(seed: u64) -> Result<PathBuf, String> {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    for attempt in 0..1000u32 {
        let dir = base.join(format!("nixfleet-sim-{}-{seed}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    Err("cannot create a temp dir for the simulated CP".into())
}
