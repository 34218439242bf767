//! The cache of signed manifests the agent acted on
//! (`{state_dir}/manifests/`), and their re-verification at start: with the
//! current trust keys, or else with the key recorded when the dispatch was
//! accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::admission::{check_cached, verified_manifest, Refusal};
use crate::ids::{Hostname, RolloutId};
use crate::machine::Policy;
use crate::sign::{PublicKey, SignError};
use crate::wire::Manifest;

/// Folder of cached DSSE envelopes inside the state dir, one per rollout.
pub const MANIFEST_DIR: &str = "manifests";

/// Signed manifests the agent acted on, kept so a restart can re-verify
/// them and recover each rollout's policy without the control plane. Next
/// to each envelope, `{rollout}.key` holds the public key that verified it
/// when the dispatch was accepted (trust keys may rotate later).
#[derive(Debug, Clone)]
pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    pub fn new(state_dir: &Path) -> ManifestCache {
        ManifestCache { dir: state_dir.join(MANIFEST_DIR) }
    }

    /// The cached envelope of a rollout.
    pub fn path(&self, rollout_id: &RolloutId) -> PathBuf {
        // Rollout ids are `[a-z0-9_-]@[A-Za-z0-9._-]`: safe as a file name.
        self.dir.join(format!("{rollout_id}.json"))
    }

    fn key_path(&self, rollout_id: &RolloutId) -> PathBuf {
        self.dir.join(format!("{rollout_id}.key"))
    }

    /// Stores the key that verified the envelope, then the envelope, each
    /// durably (tmp, fsync, rename, fsync dir), before the agent
    /// acknowledges the dispatch. Key first: an envelope written by this
    /// version always has its key beside it.
    pub fn store(&self, rollout_id: &RolloutId, envelope: &[u8], verified_by: &PublicKey) -> std::io::Result<()> {
        fs_err::create_dir_all(&self.dir)?;
        let key = format!("{}\n", verified_by.to_text());
        write_durably(&self.dir, &self.key_path(rollout_id), key.as_bytes())?;
        write_durably(&self.dir, &self.path(rollout_id), envelope)
    }

    pub fn load(&self, rollout_id: &RolloutId) -> std::io::Result<Option<Vec<u8>>> {
        read_optional(&self.path(rollout_id))
    }

    /// The key recorded when the rollout was accepted (None: none recorded,
    /// e.g. cached by an older agent).
    pub fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError> {
        let path = self.key_path(rollout_id);
        let read =
            read_optional(&path).map_err(|source| CachedManifestError::ReadKey { path: path.clone(), source })?;
        let Some(bytes) = read else { return Ok(None) };
        let text = String::from_utf8_lossy(&bytes);
        PublicKey::from_text(&text).map(Some).map_err(|source| CachedManifestError::BadKey { path, source })
    }
}

fn read_optional(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match fs_err::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut file = fs_err::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs_err::rename(&tmp, path)?;
    fs_err::File::open(dir)?.sync_all()
}

/// Why a rollout's cached manifest proves nothing ([`cached_manifest`]).
#[derive(Debug, thiserror::Error)]
pub enum CachedManifestError {
    #[error("cannot read the cached manifest {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no cached manifest")]
    Missing { path: PathBuf },
    #[error("cannot read the key recorded when it was accepted, {}: {source}", path.display())]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    BadKey { path: PathBuf, source: SignError },
    /// The current trust keys refuse it and no key was recorded at
    /// acceptance (cached by an older agent).
    #[error("{now} (and no key was recorded when it was accepted)")]
    NoKeyRecorded { now: Box<Refusal> },
    /// Neither the current trust keys nor the key recorded at acceptance
    /// verify it.
    #[error("{now}; with key {keyid} that accepted it: {then}")]
    Refused { now: Box<Refusal>, keyid: String, then: Box<Refusal> },
}

/// A cached manifest that still proves what the host accepted.
#[derive(Debug, Clone)]
pub struct CachedManifest {
    pub manifest: crate::wire::Manifest,
    /// `Some(keyid)` when only the key recorded at acceptance verifies it
    /// (the trust keys changed since).
    pub no_longer_trusted: Option<String>,
}

/// The manifest of a rollout from its cached envelope, verified with
/// `trust_keys`, or else with the key recorded when it was accepted; Err
/// says why neither works.
pub fn cached_manifest(
    cache: &ManifestCache,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<CachedManifest, CachedManifestError> {
    let path = cache.path(rollout_id);
    let bytes = cache
        .load(rollout_id)
        .map_err(|source| CachedManifestError::Read { path: path.clone(), source })?
        .ok_or(CachedManifestError::Missing { path })?;
    let verify = |keys: &[PublicKey], bytes: &[u8]| verified_manifest(keys, bytes).map(Arc::new);
    verify_cached(&bytes, || cache.accepted_key(rollout_id), rollout_id, hostname, trust_keys, &verify).map(
        |(manifest, no_longer_trusted)| CachedManifest { manifest: Arc::unwrap_or_clone(manifest), no_longer_trusted },
    )
}

/// Verifies a signed envelope with the given keys.
pub(super) type Verify<'a> = &'a dyn Fn(&[PublicKey], &[u8]) -> Result<Arc<Manifest>, Refusal>;

/// [`cached_manifest`] once the envelope is read (`admission::admit_cached`
/// with the signature check passed in): the manifest, and `Some(keyid)`
/// when only the key recorded at acceptance verifies it. `accepted_key` is
/// asked only when the current trust keys do not verify it.
pub(super) fn verify_cached(
    bytes: &[u8],
    accepted_key: impl FnOnce() -> Result<Option<PublicKey>, CachedManifestError>,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
    verify: Verify<'_>,
) -> Result<(Arc<Manifest>, Option<String>), CachedManifestError> {
    let admit = |keys: &[PublicKey]| -> Result<Arc<Manifest>, Refusal> {
        let manifest = verify(keys, bytes)?;
        check_cached(hostname, &manifest, rollout_id)?;
        Ok(manifest)
    };
    let now = match admit(trust_keys) {
        Ok(manifest) => return Ok((manifest, None)),
        Err(e) => e,
    };
    let Some(key) = accepted_key()? else {
        return Err(CachedManifestError::NoKeyRecorded { now: Box::new(now) });
    };
    let keyid = key.keyid();
    admit(&[key]).map(|manifest| (manifest, Some(keyid.clone()))).map_err(|then| CachedManifestError::Refused {
        now: Box::new(now),
        keyid,
        then: Box::new(then),
    })
}

/// The policy of a rollout from its cached manifest (see
/// [`cached_manifest`]); Err says why there is none.
pub fn cached_policy(
    cache: &ManifestCache,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<Policy, CachedManifestError> {
    cached_manifest(cache, rollout_id, hostname, trust_keys).map(|c| c.manifest.machine_policy())
}
