//! The operator-action routes (`docs/protocol.md` §4, operator actions):
//! `POST /v1/rollouts/{id}/resume|cancel`, `POST
//! /v1/channels/{channel}/unquarantine`, `GET /v1/actions`, and the dry run
//! `POST /v1/plan`. Each action needs a reason and is recorded with the
//! peer's identity by the writer ([`super::store::ActionKind`]); the dry run
//! only reads.

#![allow(clippy::result_large_err)]

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;

use super::preview;
use super::routes::{
    ask, body, body_limited, check_protocol, error, json, parse_rollout_segment, percent_decode, store_unavailable,
    verified_manifest, App, PeerIdentity, Resp, MAX_ENVELOPE_BYTES,
};
use super::store::{self, ActionKind, Command, OperatorRequest, Refusal};
use super::views::UNREACHABLE_AFTER_INTERVALS;
use crate::ids::{Closure, RolloutId};

/// The body of an action: why, and for unquarantine the closure.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: String,
    #[serde(default)]
    closure: Option<String>,
}

/// Who acts: the operator certificate's CN (else its first DNS name), or
/// that the connection was plaintext. `authz::authorize` has already
/// required the operator role on a TLS connection.
fn operator_name(peer: &PeerIdentity) -> String {
    match peer {
        PeerIdentity::Unauthenticated => store::UNAUTHENTICATED.to_owned(),
        PeerIdentity::Certificate(Ok(id)) => id
            .common_name
            .clone()
            .or_else(|| id.dns_names.first().cloned())
            .unwrap_or_else(|| "(an operator certificate without a name)".to_owned()),
        PeerIdentity::Certificate(Err(why)) => format!("(a certificate without a usable identity: {why})"),
    }
}

async fn action_body(req: Request<Incoming>, app: &App) -> Result<ActionBody, Resp> {
    check_protocol(&req, true)?;
    let bytes = body(req, app).await?;
    let parsed: ActionBody = serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_action", format!("the action's body: {e}")))?;
    store::check_reason(&parsed.reason).map_err(|m| error(StatusCode::BAD_REQUEST, "bad_reason", m))?;
    Ok(parsed)
}

/// `POST /v1/rollouts/{id}/resume` and `…/cancel`.
pub(super) async fn on_rollout(
    req: Request<Incoming>,
    app: &Arc<App>,
    peer: &PeerIdentity,
    id: &str,
    action: &str,
) -> Resp {
    let id = match parse_rollout_segment(id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_rollout_id", e.to_string()),
    };
    let parsed = match action_body(req, app).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if parsed.closure.is_some() {
        return error(StatusCode::BAD_REQUEST, "bad_action", format!("{action} takes no closure"));
    }
    let kind = if action == "resume" { ActionKind::Resume(id) } else { ActionKind::Cancel(id) };
    act(app, peer, kind, parsed.reason).await
}

/// `POST /v1/channels/{channel}/unquarantine` with `{closure, reason}`.
pub(super) async fn unquarantine(req: Request<Incoming>, app: &Arc<App>, peer: &PeerIdentity, channel: &str) -> Resp {
    let channel = percent_decode(channel);
    // A channel is a rollout id's first half: checked the same way.
    if let Err(e) = RolloutId::parse(&format!("{channel}@x")) {
        return error(StatusCode::BAD_REQUEST, "bad_channel", format!("channel {channel:?}: {e}"));
    }
    let parsed = match action_body(req, app).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let closure = match parsed.closure.as_deref().map(Closure::parse) {
        Some(Ok(c)) => c,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_closure", format!("closure: {e}")),
        None => return error(StatusCode::BAD_REQUEST, "bad_action", "unquarantine needs a closure"),
    };
    act(app, peer, ActionKind::Unquarantine { channel, closure }, parsed.reason).await
}

async fn act(app: &Arc<App>, peer: &PeerIdentity, kind: ActionKind, reason: String) -> Resp {
    let request = OperatorRequest { kind, operator: operator_name(peer), reason };
    match ask(app, |reply| Command::Operator { request, reply }).await {
        Ok(Ok(record)) => json(StatusCode::OK, &record),
        Ok(Err(refusal)) => {
            let (status, code) = match &refusal {
                Refusal::UnknownRollout(_) => (StatusCode::NOT_FOUND, "unknown_rollout"),
                Refusal::NotQuarantined { .. } => (StatusCode::NOT_FOUND, "not_quarantined"),
                Refusal::NotHalted { .. } => (StatusCode::CONFLICT, "not_halted"),
                Refusal::Finished { .. } => (StatusCode::CONFLICT, "rollout_finished"),
            };
            error(status, code, refusal.to_string())
        }
        Err(resp) => resp,
    }
}

/// `GET /v1/actions[?rollout=ID]`: the operator actions, oldest first.
pub(super) async fn list(req: Request<Incoming>, app: &Arc<App>) -> Resp {
    if let Err(resp) = check_protocol(&req, false) {
        return resp;
    }
    let rollout = match super::routes::query_param(&req, "rollout").map(parse_rollout_segment) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_rollout_id", e.to_string()),
    };
    match app.read(move |conn, path| store::action_rows(conn, path, rollout.as_ref())).await {
        Ok(rows) => json(StatusCode::OK, &rows),
        Err(e) => store_unavailable(&e),
    }
}

/// `POST /v1/plan` with a signed manifest: the dry run. Verified exactly
/// like a publish (an envelope the CP would refuse is refused here too),
/// then planned against the fleet on a reader connection.
pub(super) async fn dry_run(req: Request<Incoming>, app: &Arc<App>) -> Resp {
    if let Err(resp) = check_protocol(&req, true) {
        return resp;
    }
    let bytes = match body_limited(req, MAX_ENVELOPE_BYTES, app.body_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let manifest = match verified_manifest(app, &bytes) {
        Ok((_, m)) => m,
        Err(resp) => return resp,
    };
    let now = app.clock.now();
    let stale_after_secs = app.heartbeat_interval_secs.saturating_mul(UNREACHABLE_AFTER_INTERVALS);
    match app.read(move |conn, path| preview::preview(conn, path, &manifest, now, stale_after_secs)).await {
        Ok(p) => json(StatusCode::OK, &p),
        Err(e) => store_unavailable(&e),
    }
}
