//! Operator actions inside the writer's transaction: `cp resume` (clear a
//! halt), `cp cancel` (no new dispatches) and `cp unquarantine` (take a
//! closure off a channel's quarantine). Each one is a row of
//! `operator_actions` (who, when, why, and what it found and changed),
//! committed with the state change it makes, and the planner runs over the
//! rollouts it touched in the same transaction.
//!
//! These are rollout-level facts of the control plane, not host events:
//! they never enter `event_log` and never pass through `machine::step`, so
//! `host_records` stay a pure fold of the agents' events
//! (`docs/protocol.md` §7).

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::group::Group;
use super::state::CpState;
use super::{ts, Db, StoreError};
use crate::cp::planner::RolloutState;
use crate::ids::{Closure, RolloutId};
use crate::machine::HostState;

/// An operator's reason is shown in tables and logs; a longer one is a
/// document, which belongs elsewhere (a ticket the reason can name).
pub const MAX_REASON_BYTES: usize = 1024;

/// The name recorded when the transport authenticated nobody.
pub const UNAUTHENTICATED: &str = "unauthenticated (plaintext)";

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    Resume(RolloutId),
    Cancel(RolloutId),
    Unquarantine { channel: String, closure: Closure },
}

impl ActionKind {
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::Resume(_) => "resume",
            ActionKind::Cancel(_) => "cancel",
            ActionKind::Unquarantine { .. } => "unquarantine",
        }
    }
}

/// One action with its author and reason, as the route received it.
#[derive(Debug, Clone)]
pub struct OperatorRequest {
    pub kind: ActionKind,
    pub operator: String,
    pub reason: String,
}

/// A row of `operator_actions`, as `GET /v1/actions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub id: i64,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<String>,
    pub operator: String,
    pub reason: String,
    /// CP time.
    pub at: String,
    /// What the action found and changed (state before, accepted
    /// failures, the quarantine row removed, standing dispatches).
    pub detail: serde_json::Value,
}

/// Why an action was refused; nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no rollout {0}")]
    UnknownRollout(RolloutId),
    #[error("rollout {id} is {state}, not halted: there is no halt to clear")]
    NotHalted { id: RolloutId, state: RolloutState },
    #[error("rollout {id} is already {state}: nothing is left to cancel")]
    Finished { id: RolloutId, state: RolloutState },
    #[error("closure {closure} is not quarantined on channel {channel}")]
    NotQuarantined { channel: String, closure: Closure },
}

/// The answer to an action: the stored row, or why nothing was stored.
pub type ActionOutcome = Result<ActionRecord, Refusal>;

/// The reason as given, or why it is refused (`--reason` is required).
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty() {
        return Err("reason: an operator action needs a reason (who asked, which ticket, why)".to_owned());
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(format!("reason: longer than {MAX_REASON_BYTES} bytes"));
    }
    Ok(())
}

pub(super) fn apply(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    req: &OperatorRequest,
) -> Result<ActionOutcome, StoreError> {
    let found = match &req.kind {
        ActionKind::Resume(id) => resume(db, state, group, id)?,
        ActionKind::Cancel(id) => cancel(db, state, group, id)?,
        ActionKind::Unquarantine { channel, closure } => unquarantine(db, state, group, channel, closure)?,
    };
    let detail = match found {
        Ok(detail) => detail,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let (rollout_id, channel, closure) = match &req.kind {
        ActionKind::Resume(id) | ActionKind::Cancel(id) => (Some(id.to_string()), id.channel().to_owned(), None),
        ActionKind::Unquarantine { channel, closure } => (None, channel.clone(), Some(closure.to_string())),
    };
    let at = ts(group.now);
    let detail_text = db.json(|| format!("the detail of operator action {}", req.kind.name()), &detail)?;
    db.conn()
        .execute(
            "INSERT INTO operator_actions (action, rollout_id, channel, closure, operator, reason, at, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![req.kind.name(), rollout_id, channel, closure, req.operator, req.reason, at, detail_text],
        )
        .map_err(db.sql("insert operator action"))?;
    let id = db.conn().last_insert_rowid();
    tracing::info!(action = req.kind.name(), operator = %req.operator, reason = %req.reason, %detail, "operator action");
    Ok(Ok(ActionRecord {
        id,
        action: req.kind.name().to_owned(),
        rollout_id,
        channel,
        closure,
        operator: req.operator.clone(),
        reason: req.reason.clone(),
        at,
        detail,
    }))
}

type Found = Result<serde_json::Value, Refusal>;

/// Clears a halt: the hosts Failed/Reverted now are accepted (they leave
/// the failure budget) and the planner, run after this in the same
/// transaction, decides the rollout's state and dispatches again.
fn resume(db: Db<'_>, state: &mut CpState, group: &mut Group, id: &RolloutId) -> Result<Found, StoreError> {
    let Some(rollout) = state.rollouts.get_mut(id) else { return Ok(Err(Refusal::UnknownRollout(id.clone()))) };
    if rollout.state != RolloutState::Halted {
        return Ok(Err(Refusal::NotHalted { id: id.clone(), state: rollout.state }));
    }
    let accepted: Vec<&str> = rollout
        .records
        .iter()
        .filter(|(_, r)| matches!(r.state, HostState::Failed | HostState::Reverted))
        .map(|(h, _)| h.as_str())
        .collect();
    let detail = serde_json::json!({
        "state_before": rollout.state.as_str(),
        "halt_reason_before": rollout.halt_reason,
        "accepted_failures": accepted,
    });
    db.conn()
        .execute(
            "UPDATE rollouts SET state = 'active', halt_reason = NULL, updated_at = ?2 WHERE rollout_id = ?1",
            params![id.as_str(), ts(group.now)],
        )
        .map_err(db.sql("resume rollout"))?;
    rollout.accepted_failures = accepted.len();
    rollout.state = RolloutState::Active;
    rollout.halt_reason = None;
    group.dirty.insert(id.clone());
    Ok(Ok(detail))
}

/// Cancels: the planner withdraws the standing dispatches and dispatches
/// nothing more; in-flight hosts finish and their events are applied.
fn cancel(db: Db<'_>, state: &mut CpState, group: &mut Group, id: &RolloutId) -> Result<Found, StoreError> {
    let Some(rollout) = state.rollouts.get_mut(id) else { return Ok(Err(Refusal::UnknownRollout(id.clone()))) };
    if rollout.state.is_terminal() {
        return Ok(Err(Refusal::Finished { id: id.clone(), state: rollout.state }));
    }
    let in_flight: Vec<&str> = rollout.records.values().filter(|r| r.is_live()).map(|r| r.hostname.as_str()).collect();
    let withdrawn: Vec<&str> = rollout.dispatched.keys().map(|h| h.as_str()).collect();
    let detail = serde_json::json!({
        "state_before": rollout.state.as_str(),
        "halt_reason_before": rollout.halt_reason,
        "in_flight": in_flight,
        "dispatches_withdrawn": withdrawn,
    });
    db.conn()
        .execute(
            "UPDATE rollouts SET state = 'cancelled', halt_reason = NULL, updated_at = ?2 WHERE rollout_id = ?1",
            params![id.as_str(), ts(group.now)],
        )
        .map_err(db.sql("cancel rollout"))?;
    rollout.state = RolloutState::Cancelled;
    rollout.halt_reason = None;
    group.dirty.insert(id.clone());
    Ok(Ok(detail))
}

/// Takes a closure off a channel's quarantine. Hosts already skipped stay
/// skipped (that was the CP's decision then, recorded); every unfinished
/// rollout of the channel is planned again, and later rollouts may
/// dispatch the closure.
fn unquarantine(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    channel: &str,
    closure: &Closure,
) -> Result<Found, StoreError> {
    let row = db
        .rows(
            "read quarantine row",
            "SELECT rollout_id, hostname, quarantined_at FROM quarantined_closures WHERE channel = ?1 AND closure = ?2",
            params![channel, closure.as_str()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
        )?
        .into_iter()
        .next();
    let Some((rollout_id, hostname, quarantined_at)) = row else {
        return Ok(Err(Refusal::NotQuarantined { channel: channel.to_owned(), closure: closure.clone() }));
    };
    db.conn()
        .execute(
            "DELETE FROM quarantined_closures WHERE channel = ?1 AND closure = ?2",
            params![channel, closure.as_str()],
        )
        .map_err(db.sql("unquarantine"))?;
    state.quarantine_remove(channel, closure);
    let replanned: Vec<RolloutId> = state
        .rollouts
        .iter()
        .filter(|(id, r)| id.channel() == channel && !r.state.is_terminal())
        .map(|(id, _)| id.clone())
        .collect();
    group.dirty.extend(replanned);
    Ok(Ok(serde_json::json!({
        "quarantined_in": rollout_id,
        "quarantined_by_host": hostname,
        "quarantined_at": quarantined_at,
    })))
}

/// The accepted failures of every rollout: those of its last resume.
pub(super) fn load_accepted_failures(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    let rows = db.rows(
        "load operator actions",
        "SELECT rollout_id, detail FROM operator_actions WHERE action = 'resume' ORDER BY id",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    for (id, detail) in rows {
        let accepted = accepted_of(&detail).ok_or_else(|| db.corrupt(format!("operator action on {id}: {detail}")))?;
        let id = RolloutId::parse(&id).map_err(|e| db.corrupt(format!("operator action: {e}")))?;
        if let Some(r) = state.rollouts.get_mut(&id) {
            r.accepted_failures = accepted.len();
        }
    }
    Ok(())
}

/// The hosts a resume's detail accepted.
pub fn accepted_of(detail: &str) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(detail).ok()?;
    value.get("accepted_failures")?.as_array()?.iter().map(|v| v.as_str().map(str::to_owned)).collect()
}

/// Every operator action, oldest first; only those naming `rollout` when
/// given (an unquarantine names a channel, not a rollout).
pub fn action_rows(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
    rollout: Option<&RolloutId>,
) -> Result<Vec<ActionRecord>, StoreError> {
    let db = Db::new(conn, path);
    // `replay` reads databases of older versions without migrating them:
    // before schema 3 there were no operator actions.
    let exists = db.rows(
        "read operator actions",
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'operator_actions'",
        [],
        |r| r.get::<_, i64>(0),
    )?;
    if exists.is_empty() {
        return Ok(Vec::new());
    }
    let rows = db.rows(
        "read operator actions",
        "SELECT id, action, rollout_id, channel, closure, operator, reason, at, detail FROM operator_actions
         WHERE ?1 IS NULL OR rollout_id = ?1 ORDER BY id",
        params![rollout.map(RolloutId::as_str)],
        |r| {
            Ok((
                ActionRecord {
                    id: r.get(0)?,
                    action: r.get(1)?,
                    rollout_id: r.get(2)?,
                    channel: r.get(3)?,
                    closure: r.get(4)?,
                    operator: r.get(5)?,
                    reason: r.get(6)?,
                    at: r.get(7)?,
                    detail: serde_json::Value::Null,
                },
                r.get::<_, String>(8)?,
            ))
        },
    )?;
    rows.into_iter()
        .map(|(mut record, detail)| {
            record.detail = serde_json::from_str(&detail)
                .map_err(|e| db.corrupt(format!("operator action {}: detail: {e}", record.id)))?;
            Ok(record)
        })
        .collect()
}
