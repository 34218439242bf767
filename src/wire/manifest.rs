//! The rollout manifest (`docs/protocol.md` §2): parsed strictly (unknown fields are
//! errors, so a typo like `max_inflight` is not silently ignored) and
//! validated into typed identifiers. Every error names the field by its
//! JSON path, e.g. `hosts.web-1.wave`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{validate_channel, validate_ref, Closure, Hostname, RolloutId};
use crate::machine::{OnHealthFailure, Policy};

/// The manifest schema this build understands.
pub const SCHEMA_VERSION: u32 = 1;
/// Waves per rollout: more than a few dozen stages is a mistake, not a plan.
pub const MAX_WAVES: usize = 64;
/// Wave names show in tables and logs.
pub const MAX_WAVE_NAME_LEN: usize = 64;
/// A week: a longer soak is a parked rollout, better expressed as a new one.
pub const MAX_SOAK_SECS: u64 = 7 * 24 * 3600;
/// Concurrent activations per wave; above this the CP's long-poll wake-up
/// burst, not the policy, would be the limit.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// A day of continuous failure is surely a failure.
pub const MAX_SUSTAINED_FAILURE_SECS: u64 = 24 * 3600;
/// Hosts per manifest: the CP plans every host on each change; this keeps a
/// planning pass and a manifest (≈ 120 bytes a host) bounded (≈ 12 MiB).
pub const MAX_HOSTS: usize = 100_000;

/// A manifest that did not parse or validate, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for schema 1: {0}")]
    Json(super::JsonError),
    #[error("manifest field {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { field: field.into(), message: message.into() }
}

/// The manifest as written: strings, checked only for shape by serde.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    schema: u32,
    channel: String,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(with = "super::ts")]
    issued_at: OffsetDateTime,
    policy: RawPolicy,
    waves: Vec<Wave>,
    hosts: BTreeMap<String, RawHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    on_health_failure: OnHealthFailure,
    #[serde(default = "default_sustained_failure_secs")]
    sustained_failure_secs: u64,
    #[serde(default)]
    max_failed_hosts: u32,
}

fn default_sustained_failure_secs() -> u64 {
    Policy::DEFAULT_SUSTAINED_FAILURE_SECS
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    wave: usize,
    target_closure: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    pub soak_secs: u64,
    pub max_in_flight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPolicy {
    pub on_health_failure: OnHealthFailure,
    pub sustained_failure_secs: u64,
    /// The rollout halts once MORE than this many hosts are Failed/Reverted.
    pub max_failed_hosts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub wave: usize,
    pub target_closure: Closure,
}

/// How far a manifest's `issued_at` may lie ahead of the clock of the CP or
/// agent checking it: release machines and hosts run NTP, so minutes cover
/// honest skew while an attacker-dated manifest is caught.
pub const MAX_CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub rollout_id: RolloutId,
    pub issued_at: OffsetDateTime,
    pub policy: RolloutPolicy,
    pub waves: Vec<Wave>,
    pub hosts: BTreeMap<Hostname, HostEntry>,
}

impl Manifest {
    /// Parses and validates manifest bytes (the exact bytes that were signed).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = super::from_json_slice(bytes).map_err(ManifestError::Json)?;
        if raw.schema != SCHEMA_VERSION {
            return Err(invalid("schema", format!("must be {SCHEMA_VERSION}, got {}", raw.schema)));
        }
        validate_channel(&raw.channel).map_err(|e| invalid("channel", e.to_string()))?;
        validate_ref(&raw.git_ref).map_err(|e| invalid("ref", e.to_string()))?;
        let rollout_id = RolloutId::new(&raw.channel, &raw.git_ref).map_err(|e| invalid("channel", e.to_string()))?;

        let p = &raw.policy;
        if p.sustained_failure_secs == 0 || p.sustained_failure_secs > MAX_SUSTAINED_FAILURE_SECS {
            return Err(invalid(
                "policy.sustained_failure_secs",
                format!("must be 1 to {MAX_SUSTAINED_FAILURE_SECS}, got {}", p.sustained_failure_secs),
            ));
        }
        let policy = RolloutPolicy {
            on_health_failure: p.on_health_failure,
            sustained_failure_secs: p.sustained_failure_secs,
            max_failed_hosts: p.max_failed_hosts,
        };

        if raw.waves.is_empty() {
            return Err(invalid("waves", "must list at least one wave"));
        }
        if raw.waves.len() > MAX_WAVES {
            return Err(invalid("waves", format!("more than {MAX_WAVES} waves")));
        }
        for (idx, wave) in raw.waves.iter().enumerate() {
            let field = |f: &str| format!("waves[{idx}].{f}");
            if wave.name.is_empty() || wave.name.len() > MAX_WAVE_NAME_LEN || wave.name.chars().any(char::is_control) {
                return Err(invalid(field("name"), "must be 1 to 64 printable characters"));
            }
            if raw.waves[..idx].iter().any(|w| w.name == wave.name) {
                return Err(invalid(field("name"), format!("{:?} is used by an earlier wave", wave.name)));
            }
            if wave.soak_secs > MAX_SOAK_SECS {
                return Err(invalid(field("soak_secs"), format!("must be at most {MAX_SOAK_SECS}")));
            }
            if wave.max_in_flight == 0 || wave.max_in_flight > MAX_IN_FLIGHT {
                return Err(invalid(field("max_in_flight"), format!("must be 1 to {MAX_IN_FLIGHT}")));
            }
        }

        if raw.hosts.is_empty() {
            return Err(invalid("hosts", "must list at least one host"));
        }
        if raw.hosts.len() > MAX_HOSTS {
            return Err(invalid("hosts", format!("more than {MAX_HOSTS} hosts")));
        }
        let mut hosts = BTreeMap::new();
        for (name, host) in raw.hosts {
            let hostname = Hostname::parse(&name).map_err(|e| invalid(format!("hosts.{name}"), e.to_string()))?;
            if host.wave >= raw.waves.len() {
                return Err(invalid(
                    format!("hosts.{name}.wave"),
                    format!("wave {} does not exist (the manifest has {} waves)", host.wave, raw.waves.len()),
                ));
            }
            let target_closure = Closure::parse(&host.target_closure)
                .map_err(|e| invalid(format!("hosts.{name}.target_closure"), e.to_string()))?;
            hosts.insert(hostname, HostEntry { wave: host.wave, target_closure });
        }

        Ok(Manifest { rollout_id, issued_at: raw.issued_at, policy, waves: raw.waves, hosts })
    }

    /// The part of the policy the per-host state machine consults.
    pub fn machine_policy(&self) -> Policy {
        Policy {
            on_health_failure: self.policy.on_health_failure,
            sustained_failure_secs: self.policy.sustained_failure_secs,
        }
    }

    /// Hosts of one wave, in hostname order.
    /// The order of rollouts on one channel, the same on the CP and the
    /// agent (no downgrade): later `issued_at` is newer; on equal
    /// `issued_at` the byte-wise greater `ref` is newer (deterministic,
    /// whatever the publish order). Ids on different channels are not
    /// compared by anyone; this still gives them a total order.
    pub fn newness(&self) -> (OffsetDateTime, &str) {
        (self.issued_at, self.rollout_id.git_ref())
    }

    /// Whether `issued_at` lies further in the future than the clock-skew
    /// bound allows at `now`: such a manifest is refused by both sides, or
    /// it would outrank every honest manifest on its channel for a long time.
    pub fn issued_in_the_future(&self, now: OffsetDateTime) -> bool {
        self.issued_at > now + MAX_CLOCK_SKEW
    }

    pub fn hosts_in_wave(&self, wave: usize) -> impl Iterator<Item = (&Hostname, &HostEntry)> {
        self.hosts.iter().filter(move |(_, h)| h.wave == wave)
    }

    /// Serialises back to the `docs/protocol.md` §2 shape (for examples and tests; the
    /// signed bytes are always kept as published, never re-serialised).
    pub fn to_json(&self) -> serde_json::Value {
        let raw = RawManifest {
            schema: SCHEMA_VERSION,
            channel: self.rollout_id.channel().to_owned(),
            git_ref: self.rollout_id.git_ref().to_owned(),
            issued_at: self.issued_at,
            policy: RawPolicy {
                on_health_failure: self.policy.on_health_failure,
                sustained_failure_secs: self.policy.sustained_failure_secs,
                max_failed_hosts: self.policy.max_failed_hosts,
            },
            waves: self.waves.clone(),
            hosts: self
                .hosts
                .iter()
                .map(|(h, e)| (h.to_string(), RawHost { wave: e.wave, target_closure: e.target_closure.to_string() }))
                .collect(),
        };
        serde_json::to_value(raw).unwrap_or(serde_json::Value::Null)
    }
}
