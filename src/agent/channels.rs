//! The newest manifest this host has accepted on each channel (`docs/protocol.md`
//! §3 rule 9, no downgrade). It exists apart from the queue because the queue
//! forgets: acked retention prunes whole rollouts, and a host that converged
//! on `stable@v2` must still refuse `stable@v1` a month later. So the agent
//! keeps one small file, `{state_dir}/accepted-channels.json`, written
//! durably (tmp, fsync, rename, fsync dir) BEFORE the DispatchAck that
//! accepts a rollout is journaled. A file that cannot be read or parsed is
//! an error naming it: "no history" would silently allow a downgrade.
//!
//! Each entry also keeps the acceptance itself ([`AcceptedDispatch`]: the
//! content of the rollout's DispatchAck), a second copy of the one record
//! whose loss no later event can make up for (it alone holds the rollback
//! target). The start-up rebuild uses it when that record rotted in the
//! queue (`docs/decisions.md` 29, "A lost record of a live rollout is rebuilt, or the agent stops").
//!
//! Order: [`Manifest::newness`](crate::wire::Manifest::newness), the one
//! rule shared with the control plane (later `issued_at`; on equal
//! `issued_at` the byte-wise greater ref).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{Closure, RolloutId};

/// File name inside the agent's state dir.
pub const CHANNELS_FILE: &str = "accepted-channels.json";
/// Format version written in the file; another version is refused.
const FORMAT_VERSION: u32 = 1;

/// One accepted manifest: enough to order it against any later offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub rollout_id: RolloutId,
    #[serde(with = "crate::wire::ts")]
    pub issued_at: OffsetDateTime,
    /// How this host accepted it (the DispatchAck's content). `None` in a
    /// file written by an older agent, or for an entry rebuilt from a cached
    /// manifest at start.
    /// Boxed: most entries are compared and copied, few are rebuilt from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Box<AcceptedDispatch>>,
}

/// The fields of the Activate event (wire `DispatchAck`) that accepted a
/// rollout, kept so a rotted DispatchAck record can be rebuilt exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedDispatch {
    /// The rollback target: what `current-system` was at acceptance.
    pub current_closure_at_dispatch: Closure,
    pub target_closure: Closure,
    pub soak_secs: u64,
    #[serde(with = "crate::wire::ts")]
    pub received_at: OffsetDateTime,
}

impl Accepted {
    /// Same order as `Manifest::newness`.
    pub fn newness(&self) -> (OffsetDateTime, &str) {
        (self.issued_at, self.rollout_id.git_ref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelsError {
    #[error("cannot read the accepted-channels file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the accepted-channels file {} is corrupt ({reason}); refusing to start without the host's no-downgrade history (restore it from a backup, or delete it to accept any rollout again)", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    version: u32,
    channels: BTreeMap<String, Accepted>,
}

/// Per channel, the newest accepted manifest. `file` is `None` only for
/// in-memory use (unit tests); the agent always loads it from its state dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelHistory {
    file: Option<PathBuf>,
    newest: BTreeMap<String, Accepted>,
}

/// A manifest not newer than the one this host already accepted on its
/// channel (`docs/protocol.md` §3 rule 9): refused `stale`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stale: rollout {} (issued {}) is not newer than rollout {} (issued {}) that this host already accepted on channel {}; no downgrade",
    offered.rollout_id,
    fmt_ts(offered.issued_at),
    newest.rollout_id,
    fmt_ts(newest.issued_at),
    offered.rollout_id.channel()
)]
pub struct Downgrade {
    pub offered: Accepted,
    pub newest: Accepted,
}

impl ChannelHistory {
    /// A history that is never written to disk (tests).
    pub fn in_memory() -> ChannelHistory {
        ChannelHistory::default()
    }

    /// Loads `{state_dir}/accepted-channels.json`; a missing file is an
    /// empty history (a new host), anything unreadable is an error.
    pub fn load(state_dir: &Path) -> Result<ChannelHistory, ChannelsError> {
        let path = state_dir.join(CHANNELS_FILE);
        let bytes = match fs_err::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ChannelHistory { file: Some(path), newest: BTreeMap::new() })
            }
            Err(source) => return Err(ChannelsError::Read { path, source }),
        };
        let corrupt = |reason: String| ChannelsError::Corrupt { path: path.clone(), reason };
        let body: FileBody = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if body.version != FORMAT_VERSION {
            return Err(corrupt(format!("version {} is not {FORMAT_VERSION}", body.version)));
        }
        for (channel, accepted) in &body.channels {
            if accepted.rollout_id.channel() != channel {
                return Err(corrupt(format!("channel {channel:?} holds rollout {}", accepted.rollout_id)));
            }
        }
        Ok(ChannelHistory { file: Some(path), newest: body.channels })
    }

    pub fn newest(&self, channel: &str) -> Option<&Accepted> {
        self.newest.get(channel)
    }

    /// `Err(Downgrade)` when `candidate` is older than the newest manifest
    /// accepted on its channel, or as new but another rollout (cannot happen
    /// with `newness` including the ref; refused rather than assumed).
    pub fn check(&self, candidate: &Accepted) -> Result<(), Downgrade> {
        let Some(newest) = self.newest(candidate.rollout_id.channel()) else { return Ok(()) };
        if candidate.newness() > newest.newness() || candidate.rollout_id == newest.rollout_id {
            return Ok(());
        }
        Err(Downgrade { offered: candidate.clone(), newest: newest.clone() })
    }

    /// The acceptance of `rollout_id` kept in this history, if it is still
    /// the newest of its channel and was recorded with its dispatch.
    pub fn dispatch_of(&self, rollout_id: &RolloutId) -> Option<&AcceptedDispatch> {
        self.newest(rollout_id.channel()).filter(|a| &a.rollout_id == rollout_id)?.dispatch.as_deref()
    }

    /// This history with `accepted` recorded (kept only if it is newer, or
    /// if it is the same rollout and brings the dispatch the entry lacks).
    pub fn with(&self, accepted: Accepted) -> ChannelHistory {
        let mut next = self.clone();
        let channel = accepted.rollout_id.channel().to_owned();
        let newer = next.newest.get(&channel).is_none_or(|n| {
            accepted.newness() > n.newness()
                || (n.rollout_id == accepted.rollout_id && n.dispatch.is_none() && accepted.dispatch.is_some())
        });
        if newer {
            next.newest.insert(channel, accepted);
        }
        next
    }

    /// Writes the file durably (blocking: call on the blocking pool). A
    /// no-op for an in-memory history.
    pub fn save(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        let Some(path) = &self.file else { return Ok(()) };
        let body = FileBody { version: FORMAT_VERSION, channels: self.newest.clone() };
        let bytes = serde_json::to_vec_pretty(&body).map_err(std::io::Error::other)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs_err::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = fs_err::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs_err::rename(&tmp, path)?;
        fs_err::File::open(dir)?.sync_all()
    }
}

fn fmt_ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn accepted(id: &str, issued_at: OffsetDateTime) -> Accepted {
        Accepted { rollout_id: RolloutId::parse(id).expect("valid"), issued_at, dispatch: None }
    }

    #[test]
    fn older_and_equal_time_lower_ref_manifests_are_stale_and_the_file_survives_a_reload() {
        // Proves the no-downgrade order (issued_at, then ref) and that the
        // history is durable; a corrupt file is an error naming it.
        let dir = tempfile::tempdir().expect("tempdir");
        let t = datetime!(2026-11-25 12:00 UTC);
        let history = ChannelHistory::load(dir.path()).expect("empty");
        let history = history.with(accepted("stable@v2", t));
        history.save().expect("save");
        let reloaded = ChannelHistory::load(dir.path()).expect("reload");
        assert_eq!(reloaded, history);
        let why = reloaded.check(&accepted("stable@v1", t - time::Duration::hours(1))).expect_err("older").to_string();
        assert!(why.contains("stable@v1") && why.contains("stable@v2"), "{why}");
        assert!(reloaded.check(&accepted("stable@v1", t)).is_err(), "same time, lower ref");
        assert!(reloaded.check(&accepted("stable@v3", t)).is_ok(), "same time, higher ref");
        assert!(reloaded.check(&accepted("stable@v2", t)).is_ok(), "the accepted one itself");
        assert!(reloaded.check(&accepted("canary@v0", t - time::Duration::days(9))).is_ok(), "other channel");
        assert_eq!(reloaded.with(accepted("stable@v1", t)), reloaded, "an older one is never recorded");

        fs_err::write(dir.path().join(CHANNELS_FILE), b"{not json").expect("corrupt");
        let err = ChannelHistory::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains(CHANNELS_FILE), "{err}");
    }
}
