//! Whether this host acts on a dispatch. The control plane is not trusted
//! to choose closures: the agent verifies the rollout's DSSE envelope with
//! ITS OWN trust keys (never a default path, which an attacker with
//! write access to it could fill), checks
//! that the manifest names this host with exactly the dispatched closure and
//! soak, and refuses a closure this host has already rolled back on the
//! same channel. The answer is either what to feed the reducer as a
//! `Dispatch` or the reason for a `DispatchRejected`.

use crate::ids::{Closure, Hostname};
use crate::machine::{HostState, Policy};
use crate::sign::{self, PublicKey};
use crate::wire::{Dispatch, Manifest};

use super::rollouts::Rollouts;

/// What a verified dispatch tells the reducer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub manifest: Manifest,
    pub policy: Policy,
    pub target_closure: Closure,
    pub soak_secs: u64,
    /// The trusted key that verified the envelope: cached next to it, so a
    /// restart after a trust-key rotation can still prove which manifest
    /// the host accepted (and finish the rollout under it).
    pub verified_by: PublicKey,
}

/// Why the agent refuses a dispatch: the reason goes into DispatchRejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("manifest envelope does not verify against this host's trust keys: {0}")]
    Signature(String),
    #[error("signed manifest is invalid: {0}")]
    Manifest(String),
    #[error("dispatch is for rollout {dispatched} but the signed manifest is {signed}")]
    WrongRollout { dispatched: String, signed: String },
    #[error("signed manifest does not list host {0}")]
    HostNotInManifest(Hostname),
    #[error("dispatched closure {dispatched} differs from the signed manifest's {signed}")]
    TargetMismatch { dispatched: Closure, signed: Closure },
    #[error("dispatched soak of {dispatched}s differs from the signed manifest's {signed}s for wave {wave}")]
    SoakMismatch { dispatched: u64, signed: u64, wave: usize },
    #[error("closure {0} was rolled back on this host on channel {1}; it is quarantined")]
    Quarantined(Closure, String),
}

/// Re-verifies a cached envelope at start (trust keys may have changed
/// since): the manifest must verify, be for `rollout_id` and list this host.
pub fn admit_cached(
    hostname: &Hostname,
    trust_keys: &[PublicKey],
    envelope_bytes: &[u8],
    rollout_id: &crate::ids::RolloutId,
) -> Result<Manifest, Refusal> {
    let manifest = verified_manifest(trust_keys, envelope_bytes)?;
    check_cached(hostname, &manifest, rollout_id)?;
    Ok(manifest)
}

/// The checks of [`admit_cached`] after the signature: the verified
/// manifest is for `rollout_id` and lists this host. Seam for the restart
/// rebuild's shared verification (`journal::RestoreSource::verify_envelope`).
pub fn check_cached(
    hostname: &Hostname,
    manifest: &Manifest,
    rollout_id: &crate::ids::RolloutId,
) -> Result<(), Refusal> {
    if &manifest.rollout_id != rollout_id {
        return Err(Refusal::WrongRollout {
            dispatched: rollout_id.to_string(),
            signed: manifest.rollout_id.to_string(),
        });
    }
    if !manifest.hosts.contains_key(hostname) {
        return Err(Refusal::HostNotInManifest(hostname.clone()));
    }
    Ok(())
}

pub fn verified_manifest(trust_keys: &[PublicKey], envelope_bytes: &[u8]) -> Result<Manifest, Refusal> {
    verified_manifest_by(trust_keys, envelope_bytes).map(|(manifest, _)| manifest)
}

/// The manifest and the first trusted key that verifies it on its own.
/// `pub` for `nixfleet sim`, which verifies each envelope once for all its
/// agents and caches the key next to it as the long-poll worker does.
pub fn verified_manifest_by(trust_keys: &[PublicKey], envelope_bytes: &[u8]) -> Result<(Manifest, PublicKey), Refusal> {
    let envelope = sign::parse_envelope(envelope_bytes).map_err(|e| Refusal::Signature(e.to_string()))?;
    let payload = sign::verify_envelope(&envelope, trust_keys).map_err(|e| Refusal::Signature(e.to_string()))?;
    let key = trust_keys
        .iter()
        .find(|k| sign::verify_envelope(&envelope, std::slice::from_ref(*k)).is_ok())
        .cloned()
        .ok_or_else(|| Refusal::Signature("no single trusted key verifies the envelope".to_owned()))?;
    let manifest = Manifest::parse(&payload).map_err(|e| Refusal::Manifest(e.to_string()))?;
    Ok((manifest, key))
}

/// Verifies `envelope_bytes` and checks `dispatch` against it.
pub fn admit(
    hostname: &Hostname,
    trust_keys: &[PublicKey],
    envelope_bytes: &[u8],
    dispatch: &Dispatch,
    rollouts: &Rollouts,
) -> Result<Admitted, Refusal> {
    let (manifest, verified_by) = verified_manifest_by(trust_keys, envelope_bytes)?;
    let checked = check_dispatch(hostname, &manifest, dispatch, rollouts)?;
    Ok(Admitted {
        policy: checked.policy,
        target_closure: checked.target_closure,
        soak_secs: checked.soak_secs,
        manifest,
        verified_by,
    })
}

/// What [`check_dispatch`] found: the reducer's part of [`Admitted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub policy: Policy,
    pub target_closure: Closure,
    pub soak_secs: u64,
}

/// The checks of [`admit`] after the signature: the dispatch against an
/// already verified manifest and this host's records. Seam for `nixfleet
/// sim`, whose agents share one verification per envelope (verifying a
/// 10,000-host manifest on every simulated host would dominate the run).
pub fn check_dispatch(
    hostname: &Hostname,
    manifest: &Manifest,
    dispatch: &Dispatch,
    rollouts: &Rollouts,
) -> Result<Checked, Refusal> {
    if manifest.rollout_id != dispatch.rollout_id {
        return Err(Refusal::WrongRollout {
            dispatched: dispatch.rollout_id.to_string(),
            signed: manifest.rollout_id.to_string(),
        });
    }
    let entry = manifest.hosts.get(hostname).ok_or_else(|| Refusal::HostNotInManifest(hostname.clone()))?;
    if entry.target_closure != dispatch.target_closure {
        return Err(Refusal::TargetMismatch {
            dispatched: dispatch.target_closure.clone(),
            signed: entry.target_closure.clone(),
        });
    }
    let signed_soak = manifest.waves.get(entry.wave).map_or(0, |w| w.soak_secs);
    if dispatch.soak_secs != signed_soak {
        return Err(Refusal::SoakMismatch { dispatched: dispatch.soak_secs, signed: signed_soak, wave: entry.wave });
    }
    let channel = manifest.rollout_id.channel();
    let rolled_back_here = rollouts.iter().any(|(id, slot)| {
        id.channel() == channel
            && slot.record.state == HostState::Reverted
            && slot.record.target_closure.as_ref() == Some(&dispatch.target_closure)
    });
    if rolled_back_here {
        return Err(Refusal::Quarantined(dispatch.target_closure.clone(), channel.to_owned()));
    }
    Ok(Checked {
        policy: manifest.machine_policy(),
        target_closure: entry.target_closure.clone(),
        soak_secs: signed_soak,
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::ids::RolloutId;
    use crate::machine::{Event, EventBody};

    const MANIFEST: &str = include_str!("../../examples/manifest.json");

    fn keys() -> (sign::SigningKey, PublicKey) {
        let key = sign::SigningKey::from_seed(&[7; 32]);
        let public = key.public_key();
        (key, public)
    }

    fn envelope(manifest: &str, key: &sign::SigningKey) -> Vec<u8> {
        serde_json::to_vec(&sign::sign_envelope(key, manifest.as_bytes())).expect("serialise")
    }

    fn host() -> Hostname {
        Hostname::parse("web-1").expect("valid")
    }

    fn good_dispatch() -> Dispatch {
        let manifest = Manifest::parse(MANIFEST.as_bytes()).expect("valid");
        Dispatch {
            rollout_id: manifest.rollout_id.clone(),
            target_closure: manifest.hosts[&host()].target_closure.clone(),
            wave: 0,
            soak_secs: 300,
            issued_at: datetime!(2026-11-25 12:00 UTC),
        }
    }

    #[test]
    fn a_dispatch_matching_the_signed_manifest_is_admitted() {
        // Proves the happy path yields the manifest's policy, target and soak.
        let (key, public) = keys();
        let admitted = admit(&host(), &[public], &envelope(MANIFEST, &key), &good_dispatch(), &Rollouts::new(host()))
            .expect("admitted");
        assert_eq!(admitted.soak_secs, 300);
        assert_eq!(admitted.policy.sustained_failure_secs, 60);
    }

    #[test]
    fn every_mismatch_is_refused_with_its_reason() {
        // Proves an untrusted key, another rollout, another closure, another
        // soak and a host missing from the manifest are each refused.
        let (key, public) = keys();
        let trusted = [public];
        let env = envelope(MANIFEST, &key);
        let none = Rollouts::new(host());
        let other_key = sign::SigningKey::from_seed(&[9; 32]).public_key();
        let refusal = admit(&host(), &[other_key], &env, &good_dispatch(), &none).expect_err("untrusted");
        assert!(matches!(refusal, Refusal::Signature(_)), "{refusal}");

        let mut d = good_dispatch();
        d.rollout_id = RolloutId::parse("stable@other").expect("valid");
        assert!(matches!(admit(&host(), &trusted, &env, &d, &none), Err(Refusal::WrongRollout { .. })));

        let mut d = good_dispatch();
        d.target_closure = Closure::parse("/nix/store/22222222222222222222222222222222-evil").expect("valid");
        let refusal = admit(&host(), &trusted, &env, &d, &none).expect_err("mismatch");
        assert!(refusal.to_string().contains("differs from the signed manifest"), "{refusal}");

        let mut d = good_dispatch();
        d.soak_secs = 0;
        assert!(matches!(admit(&host(), &trusted, &env, &d, &none), Err(Refusal::SoakMismatch { .. })));

        let stranger = Hostname::parse("db-9").expect("valid");
        let refusal = admit(&stranger, &trusted, &env, &good_dispatch(), &none).expect_err("not listed");
        assert!(matches!(refusal, Refusal::HostNotInManifest(_)), "{refusal}");
    }

    #[test]
    fn a_closure_this_host_rolled_back_on_the_channel_is_refused() {
        // Proves the agent-side quarantine: a Reverted record of the same
        // closure on the same channel refuses a new dispatch of it.
        let (key, public) = keys();
        let d = good_dispatch();
        let mut rollouts = Rollouts::new(host());
        let old = RolloutId::parse("stable@earlier").expect("valid");
        let t = datetime!(2026-11-24 12:00 UTC);
        let previous = Closure::parse("/nix/store/00000000000000000000000000000000-prev").expect("valid");
        let journal = vec![
            Event::local(
                1,
                EventBody::Activate {
                    current_closure_at_dispatch: previous.clone(),
                    target_closure: d.target_closure.clone(),
                    soak_secs: 1,
                    received_at: t,
                },
            ),
            Event::local(2, EventBody::ActivationFailed { exit_code: 1, stderr_tail: String::new(), failed_at: t }),
            Event::local(
                3,
                EventBody::RollbackCompleted { reverted_to_closure: previous, exit_code: 0, completed_at: t },
            ),
        ];
        let policy = Manifest::parse(MANIFEST.as_bytes()).expect("valid").machine_policy();
        rollouts.restore(old, policy, &journal).expect("restore");
        let refusal = admit(&host(), &[public], &envelope(MANIFEST, &key), &d, &rollouts).expect_err("quarantined");
        assert!(matches!(refusal, Refusal::Quarantined(..)), "{refusal}");
    }
}
