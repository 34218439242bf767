//! `nixfleet keygen` and `nixfleet manifest check|sign|verify`: the release
//! engineer's tools. Signing refuses an invalid manifest, and verifying also
//! validates, so a signature is never put on (or accepted for) a manifest the
//! control plane would refuse anyway.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::output::print_stdout;
use crate::sign::{self, PublicKey, SignError, SigningKey, VerifyError};
use crate::wire::{Manifest, ManifestError};

#[derive(Debug, thiserror::Error)]
pub enum ManifestCmdError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path}: {source}")]
    Manifest { path: PathBuf, source: ManifestError },
    #[error(transparent)]
    Key(#[from] SignError),
    #[error("{path}: {source}")]
    Verify { path: PathBuf, source: VerifyError },
}

/// Writes PREFIX.key and PREFIX.pub and prints their paths and the keyid.
pub fn keygen(prefix: &Path) -> Result<(), ManifestCmdError> {
    let (secret, public) = sign::write_keypair(prefix)?;
    let keyid = PublicKey::load(&public)?.keyid();
    print_stdout(&format!("secret key: {}\npublic key: {}\nkeyid: {keyid}\n", secret.display(), public.display()))?;
    Ok(())
}

/// Validates the manifest, then prints the DSSE envelope over its exact bytes.
pub fn sign(key_path: &Path, manifest_path: &Path) -> Result<(), ManifestCmdError> {
    let key = SigningKey::load(key_path)?;
    let bytes = fs_err::read(manifest_path)?;
    Manifest::parse(&bytes).map_err(|source| ManifestCmdError::Manifest { path: manifest_path.to_owned(), source })?;
    let envelope = sign::sign_envelope(&key, &bytes);
    let json = serde_json::to_string_pretty(&envelope).map_err(std::io::Error::other)?;
    print_stdout(&format!("{json}\n"))?;
    Ok(())
}

/// Verifies the envelope against the trust keys, validates the manifest and
/// prints the manifest bytes exactly as signed.
pub fn verify(trust_key_paths: &[PathBuf], envelope_path: &Path) -> Result<(), ManifestCmdError> {
    let trusted = trust_key_paths.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let bytes = fs_err::read(envelope_path)?;
    let verify_err = |source| ManifestCmdError::Verify { path: envelope_path.to_owned(), source };
    let envelope = sign::parse_envelope(&bytes).map_err(verify_err)?;
    let payload = sign::verify_envelope(&envelope, &trusted).map_err(verify_err)?;
    let manifest = Manifest::parse(&payload)
        .map_err(|source| ManifestCmdError::Manifest { path: envelope_path.to_owned(), source })?;
    tracing::info!(rollout_id = %manifest.rollout_id, "signature verified");
    let mut out = String::from_utf8_lossy(&payload).into_owned();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    print_stdout(&out)?;
    Ok(())
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
