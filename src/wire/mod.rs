//! Everything that crosses the network or lands in the agent's queue, as
//! serde types, with explicit conversions to and from the pure `machine`
//! types. Validation happens here, at the boundary: a value that passed
//! `wire` is well-formed, so the state machine only judges legality.

pub mod api;
pub mod event;
pub mod manifest;

pub use api::{
    BatchItem, Dispatch, ErrorBody, EventBatch, EventBatchResponse, EventResult, Heartbeat, HeartbeatResponse,
    ResultStatus, MAX_AGENT_VERSION_BYTES,
};
pub use event::{OutboundEvent, WireEventBody, MAX_SEQ};
pub use manifest::{HostEntry, Manifest, ManifestError, RolloutPolicy, Wave, MAX_CLOCK_SKEW};

/// Header every request and answer carries (`docs/protocol.md` §4).
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
/// Longest long-poll the CP holds (`docs/protocol.md` §4); longer waits are clamped.
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

/// RFC 3339 timestamps whose parse errors quote the offending value (the
/// field name is lost inside tagged enums, the value is not).
pub mod ts {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        time::serde::rfc3339::serialize(t, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let raw = String::deserialize(d)?;
        OffsetDateTime::parse(&raw, &Rfc3339)
            .map_err(|e| D::Error::custom(format!("invalid RFC 3339 timestamp {raw:?}: {e}")))
    }
}

/// JSON that does not parse into the expected type, naming the path of the
/// offending field when serde knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The document as a whole: not JSON, the wrong type at the top level,
    /// or bytes after its end.
    #[error("{message}")]
    Document { message: String },
    /// One field, at `path` (`waves[1].soak_secs`).
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

/// Parses JSON, naming the path of the offending field in the error
/// (`waves[1].soak_secs: invalid type…`) rather than only a line and column.
pub fn from_json_slice<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        if path == "." {
            JsonError::Document { message }
        } else {
            JsonError::Field { path, message }
        }
    })?;
    de.end().map_err(|e| JsonError::Document { message: e.to_string() })?;
    Ok(value)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod golden_tests;
