//! `nixfleet manifest check|sign|verify`: the release engineer's tools.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::tools::print_stdout;
use crate::wire::{Manifest, ManifestError};

#[derive(Debug, thiserror::Error)]
pub enum ManifestCmdError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
}

/// Reads, validates and prints a summary (or the JSON) of a manifest.
pub fn check(path: &Path, json: bool) -> Result<(), ManifestCmdError> {
    let bytes = fs_err::read(path)?;
    let manifest =
        Manifest::parse(&bytes).map_err(|source| ManifestCmdError::Manifest { path: path.to_owned(), source })?;
    let text = if json { format!("{:#}\n", manifest.to_json()) } else { summary(&manifest) };
    print_stdout(&text)?;
    Ok(())
}

/// A human summary: id, policy, and one line per wave.
pub fn summary(m: &Manifest) -> String {
    let mut s = String::new();
    let p = &m.policy;
    let _ = writeln!(s, "rollout {} issued {}", m.rollout_id, m.issued_at);
    let _ = writeln!(
        s,
        "policy: on_health_failure={} sustained_failure_secs={} max_failed_hosts={}",
        p.on_health_failure.as_str(),
        p.sustained_failure_secs,
        p.max_failed_hosts
    );
    for (idx, wave) in m.waves.iter().enumerate() {
        let hosts: Vec<&str> = m.hosts_in_wave(idx).map(|(h, _)| h.as_str()).collect();
        let _ = writeln!(
            s,
            "wave {idx} {:?}: soak {}s, max_in_flight {}, {} hosts: {}",
            wave.name,
            wave.soak_secs,
            wave.max_in_flight,
            hosts.len(),
            hosts.join(" ")
        );
    }
    s
}
