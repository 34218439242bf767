//! The agent's side of the wire protocol (`docs/protocol.md` §4): long-poll for a
//! dispatch, fetch a rollout's signed manifest, post event batches, send
//! heartbeats. Thin typed calls over the shared HTTP client; every call
//! names this host.

use hyper::{Method, StatusCode};

use crate::client::{request, ClientError, CpUrl};
use crate::ids::{Hostname, RolloutId};
use crate::wire::{Dispatch, EventBatch, EventBatchResponse, Heartbeat, HeartbeatResponse, MAX_LONGPOLL_WAIT_SECS};

/// One control plane as this host talks to it.
#[derive(Debug, Clone)]
pub struct CpApi {
    url: CpUrl,
    hostname: Hostname,
}

impl CpApi {
    pub fn new(url: CpUrl, hostname: Hostname) -> CpApi {
        CpApi { url, hostname }
    }

    pub fn hostname(&self) -> &Hostname {
        &self.hostname
    }

    /// Waits up to `wait_secs` (clamped to the CP's maximum) for a dispatch.
    pub async fn dispatch(&self, wait_secs: u64) -> Result<Option<Dispatch>, ClientError> {
        let wait = wait_secs.min(MAX_LONGPOLL_WAIT_SECS);
        let path = format!("/v1/agent/dispatch?hostname={}&wait={wait}", self.hostname);
        let resp = request(&self.url, Method::GET, &path, &[], None).await?;
        if resp.status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json().map(Some)
    }

    /// The DSSE envelope of a rollout, exactly as published.
    pub async fn manifest(&self, rollout_id: &RolloutId) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/rollouts/{rollout_id}/manifest");
        let resp = request(&self.url, Method::GET, &path, &[], None).await?;
        if !resp.status.is_success() {
            return Err(resp.error());
        }
        Ok(resp.body.to_vec())
    }

    pub async fn post_events(&self, batch: &EventBatch) -> Result<EventBatchResponse, ClientError> {
        let body = serde_json::to_vec(batch).map_err(ClientError::Encode)?;
        request(&self.url, Method::POST, "/v1/agent/events", &[], Some(body)).await?.json()
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatResponse, ClientError> {
        let body = serde_json::to_vec(hb).map_err(ClientError::Encode)?;
        request(&self.url, Method::POST, "/v1/agent/heartbeat", &[], Some(body)).await?.json()
    }
}
