//! Request and answer bodies of the HTTP API (`docs/protocol.md` §4) other than the
//! manifest: event batches and their per-event results, dispatches,
//! heartbeats and the JSON error shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::event::{OutboundEvent, MAX_SEQ};
use super::{WireError, MAX_BATCH_EVENTS};
use crate::ids::{Closure, Hostname, RolloutId};

/// `POST /v1/agent/events` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub hostname: Hostname,
    pub events: Vec<BatchItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    pub rollout_id: RolloutId,
    pub event: OutboundEvent,
}

impl EventBatch {
    /// Parses and checks the batch bounds; each event's own fields are
    /// validated one by one so one bad event does not refuse the others.
    pub fn parse(bytes: &[u8]) -> Result<EventBatch, WireError> {
        let batch: EventBatch = super::from_json_slice(bytes).map_err(|e| WireError::new("body", e.to_string()))?;
        if batch.events.is_empty() {
            return Err(WireError::new("events", "must not be empty"));
        }
        if batch.events.len() > MAX_BATCH_EVENTS {
            return Err(WireError::new("events", format!("more than {MAX_BATCH_EVENTS} events in one batch")));
        }
        Ok(batch)
    }
}

/// What became of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// Durably in the event log and applied: the agent may retire it.
    Applied,
    /// Already in the event log: the agent may retire it.
    Duplicate,
    /// Illegal for the host's state: never retried; the agent dead-letters it.
    Rejected,
    /// Not processed now (e.g. unknown rollout after a database loss): keep
    /// it and send it again later.
    Retry,
    /// An earlier event of this (host, rollout) is missing: nothing was
    /// stored; re-send from `expected_seq` (pending and acked events).
    Gap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `gap`: the seq the CP applies next for this (host, rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_seq: Option<u64>,
}

/// `POST /v1/agent/events` answer: one result per event, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatchResponse {
    pub results: Vec<EventResult>,
}

/// `GET /v1/agent/dispatch` answer (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub rollout_id: RolloutId,
    pub target_closure: Closure,
    pub wave: usize,
    pub soak_secs: u64,
    #[serde(with = "super::ts")]
    pub issued_at: OffsetDateTime,
}

/// `POST /v1/agent/heartbeat` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub hostname: Hostname,
    pub current_closure: Closure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_closure: Option<Closure>,
    pub uptime_secs: u64,
    pub agent_version: String,
    /// Highest seq the agent has emitted, per rollout it knows.
    #[serde(default)]
    pub last_seq: BTreeMap<RolloutId, u64>,
}

/// `agent_version` is shown in tables and logs; a longer one is junk.
pub const MAX_AGENT_VERSION_BYTES: usize = 128;

impl Heartbeat {
    /// Parses a heartbeat body and checks its bounds: the version's length,
    /// and every `last_seq` within the wire's seq range (the CP stores seqs
    /// as SQLite INTEGER, i64, where a larger one would wrap).
    pub fn parse(bytes: &[u8]) -> Result<Heartbeat, WireError> {
        let heartbeat: Heartbeat = super::from_json_slice(bytes).map_err(|e| WireError::new("body", e.to_string()))?;
        if heartbeat.agent_version.len() > MAX_AGENT_VERSION_BYTES {
            return Err(WireError::new("agent_version", format!("longer than {MAX_AGENT_VERSION_BYTES} bytes")));
        }
        if let Some((id, seq)) = heartbeat.last_seq.iter().find(|(_, seq)| **seq > MAX_SEQ) {
            return Err(WireError::new(
                format!("last_seq.{id}"),
                format!("{seq} is larger than the largest seq, {MAX_SEQ}"),
            ));
        }
        Ok(heartbeat)
    }
}

/// `POST /v1/agent/heartbeat` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(with = "super::ts")]
    pub server_time: OffsetDateTime,
    /// Per rollout: re-send your events with seq greater than this.
    #[serde(default)]
    pub replay_from: BTreeMap<RolloutId, u64>,
}

/// Every error answer: a machine code and a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}
