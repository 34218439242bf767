//! Everything that crosses the network or lands in the agent's queue, as
//! serde types, with explicit conversions to and from the pure `machine`
//! types. Validation happens here, at the boundary: a value that passed
//! `wire` is well-formed, so the state machine only judges legality.

pub mod api;
pub mod event;
pub mod manifest;

pub use api::{
    BatchItem, Dispatch, ErrorBody, EventBatch, EventBatchResponse, EventResult, Heartbeat, HeartbeatResponse,
    ResultStatus,
};
pub use event::{OutboundEvent, WireEventBody};
pub use manifest::{HostEntry, Manifest, ManifestError, RolloutPolicy, Wave};

/// Header every request and answer carries (SPEC §5).
pub const PROTOCOL_HEADER: &str = "X-Nixfleet-Protocol";
/// The one protocol version this build speaks.
pub const PROTOCOL_VERSION: &str = "1";
/// Header naming the seq after which one rollout's events must be re-sent.
pub const REPLAY_FROM_HEADER: &str = "X-Nixfleet-Replay-From";
/// Request bodies above this are refused with 413: a full batch of 256
/// events with 4 KiB stderr tails stays well below it, and it bounds the
/// memory one connection can pin.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Events per batch: bounds one transaction and one answer; the agent
/// sends more in the next batch.
pub const MAX_BATCH_EVENTS: usize = 256;
/// Longest long-poll the CP holds (SPEC §5); longer waits are clamped.
pub const MAX_LONGPOLL_WAIT_SECS: u64 = 60;

/// A malformed value at the boundary, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WireError {
    pub field: String,
    pub message: String,
}

impl WireError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> WireError {
        WireError { field: field.into(), message: message.into() }
    }
}

#[cfg(test)]
mod tests;
