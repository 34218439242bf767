//! `POST /v1/rollouts` inside the writer's transaction: a new rollout is
//! stored with its exact envelope and payload, and supersedes the older
//! rollouts of its channel (or opens superseded, if a newer one exists).

use rusqlite::params;
use sha2::{Digest, Sha256};

use super::group::Group;
use super::state::{CpState, LiveRollout};
use super::{ts, Db, StoreError};
use crate::cp::planner::RolloutState;
use crate::ids::RolloutId;
use crate::wire::Manifest;

/// The answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new rollout was opened.
    Created,
    /// The same manifest bytes were already published (idempotent).
    Identical,
    /// The id exists with different manifest bytes.
    Conflict,
}

pub(super) fn publish(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    envelope: &[u8],
    payload: &[u8],
    manifest: Manifest,
) -> Result<PublishOutcome, StoreError> {
    let sha = hex(&Sha256::digest(payload));
    let id = manifest.rollout_id.clone();
    if let Some(existing) = state.rollouts.get(&id) {
        return Ok(if existing.payload_sha256 == sha { PublishOutcome::Identical } else { PublishOutcome::Conflict });
    }
    let newer = newer_on_channel(state, &manifest);
    let initial = if newer.is_some() { RolloutState::Superseded } else { RolloutState::Active };
    db.conn()
        .execute(
            "INSERT INTO rollouts (rollout_id, channel, envelope, payload, payload_sha256, issued_at, published_at, state,
                               current_wave, halt_reason, superseded_by, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, NULL, ?9, ?7)",
            params![
                id.as_str(),
                id.channel(),
                envelope,
                payload,
                sha,
                ts(manifest.issued_at),
                ts(group.now),
                initial.as_str(),
                newer.as_ref().map(RolloutId::as_str)
            ],
        )
        .map_err(db.sql("insert rollout"))?;
    if newer.is_none() {
        supersede_older(db, state, group, &id)?;
    }
    state.rollouts.insert(id.clone(), LiveRollout::published(manifest, sha, initial));
    group.dirty.insert(id);
    Ok(PublishOutcome::Created)
}

/// The newest rollout of the manifest's channel that is newer than it.
/// "Newer" is `Manifest::newness` (issued_at, then the byte-greater ref),
/// the order the agents use too: re-publishing old and new manifests in any
/// order ends in the same state, and an older manifest never rolls the
/// channel back (it opens superseded).
fn newer_on_channel(state: &CpState, manifest: &Manifest) -> Option<RolloutId> {
    let channel = manifest.rollout_id.channel();
    state
        .rollouts
        .iter()
        .filter(|(other, r)| other.channel() == channel && r.manifest.newness() > manifest.newness())
        .max_by(|(_, a), (_, b)| a.manifest.newness().cmp(&b.manifest.newness()))
        .map(|(other, _)| other.clone())
}

/// Marks every older, unfinished rollout of `id`'s channel superseded by it.
fn supersede_older(db: Db<'_>, state: &mut CpState, group: &mut Group, id: &RolloutId) -> Result<(), StoreError> {
    let channel = id.channel();
    let older: Vec<RolloutId> = state
        .rollouts
        .iter()
        // A completed or cancelled rollout has nothing left to stop; it
        // keeps its word, which tells the operator more than "superseded".
        .filter(|(other, r)| other.channel() == channel && !r.state.is_terminal())
        .map(|(other, _)| other.clone())
        .collect();
    for old in older {
        db.conn()
            .execute(
                "UPDATE rollouts SET state = 'superseded', superseded_by = ?2, updated_at = ?3 WHERE rollout_id = ?1",
                params![old.as_str(), id.as_str(), ts(group.now)],
            )
            .map_err(db.sql("supersede rollout"))?;
        if let Some(r) = state.rollouts.get_mut(&old) {
            r.state = RolloutState::Superseded;
        }
        group.dirty.insert(old);
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
