//! `POST /v1/agent/events` inside the writer's transaction: each event of a
//! batch, in order, through the SAME `machine::step` the agents run (the
//! Remote side); an applied event's effects are run in order, the journal
//! effect (`AppendEventLog`) first, then the cached record is updated.

use rusqlite::params;

use super::group::{BoardChange, Group};
use super::state::CpState;
use super::{ts, Db, StoreError};
use crate::ids::Hostname;
use crate::machine::{self, Effect, Event, EventBody, HostRecord, HostState, Outcome, TransitionError};
use crate::wire::{BatchItem, EventResult, ResultStatus};

fn result(status: ResultStatus, reason: Option<String>) -> EventResult {
    EventResult { status, reason, expected_seq: None }
}

pub(super) fn ingest(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    hostname: &Hostname,
    items: &[BatchItem],
) -> Result<Vec<EventResult>, StoreError> {
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        results.push(ingest_one(db, state, group, hostname, item)?);
    }
    Ok(results)
}

/// One event: unknown rollout → retry; host not in the manifest or a
/// malformed event → rejected; then whatever `step` says.
fn ingest_one(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    hostname: &Hostname,
    item: &BatchItem,
) -> Result<EventResult, StoreError> {
    let Some(rollout) = state.rollouts.get(&item.rollout_id) else {
        return Ok(result(
            ResultStatus::Retry,
            Some(format!("rollout {} is not known here (yet); keep the event and send it again", item.rollout_id)),
        ));
    };
    let Some(record) = rollout.records.get(hostname).cloned() else {
        return Ok(result(
            ResultStatus::Rejected,
            Some(format!("host {hostname} is not in the manifest of rollout {}", item.rollout_id)),
        ));
    };
    let event = match item.event.to_remote() {
        Ok(e) => e,
        Err(e) => return Ok(result(ResultStatus::Rejected, Some(format!("malformed event: {e}")))),
    };
    let policy = rollout.manifest.machine_policy();
    // The wave's soak is as binding as the target (the agent checks both
    // against the signed manifest; the CP's record knows only the target).
    let wave_soak_secs = rollout
        .manifest
        .hosts
        .get(hostname)
        .and_then(|e| rollout.manifest.waves.get(e.wave).map(|w| (e.wave, w.soak_secs)));
    match machine::step(&record, &event, &policy) {
        Ok(Outcome::Duplicate { .. }) => Ok(result(ResultStatus::Duplicate, None)),
        // Nothing stored: the agent re-sends from the expected seq.
        Ok(Outcome::Gap { expected }) => Ok(EventResult {
            status: ResultStatus::Gap,
            reason: Some(format!("seq {} arrived before seq {expected}; send from seq {expected}", event.seq)),
            expected_seq: Some(expected),
        }),
        Err(e) => Ok(result(ResultStatus::Rejected, Some(e.to_string()))),
        Ok(Outcome::Applied { record: next, effects }) => {
            if let Some(refused) = soak_mismatch(&record, &event, hostname, item, wave_soak_secs) {
                return Ok(result(ResultStatus::Rejected, Some(refused.to_string())));
            }
            let applied = Applied { hostname, item, event: &event, before: &record };
            run_effects(db, state, group, &applied, &effects)?;
            store_record(db, state, group, &applied, *next)?;
            super::checkpoint::after_applied(db, state, group.now, hostname, &item.rollout_id, event.body.kind())?;
            Ok(result(ResultStatus::Applied, None))
        }
    }
}

/// A DispatchAck (`Activate`) whose `soak_secs` differs from the manifest's
/// wave: refused naming both.
fn soak_mismatch(
    record: &HostRecord,
    event: &Event,
    hostname: &Hostname,
    item: &BatchItem,
    wave_soak_secs: Option<(usize, u64)>,
) -> Option<TransitionError> {
    let (EventBody::Activate { soak_secs, .. }, Some((wave, expected))) = (&event.body, wave_soak_secs) else {
        return None;
    };
    (*soak_secs != expected).then(|| TransitionError::Refused {
        state: record.state,
        event: event.name(),
        seq: event.seq,
        hostname: hostname.clone(),
        rollout_id: item.rollout_id.clone(),
        reason: format!("soak_secs {soak_secs} differs from the manifest's {expected} for wave {wave}"),
    })
}

/// An event `step` applied, and the record it was applied to.
struct Applied<'a> {
    hostname: &'a Hostname,
    item: &'a BatchItem,
    event: &'a Event,
    before: &'a HostRecord,
}

/// The effects of an applied event, in order (the journal first).
fn run_effects(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    applied: &Applied<'_>,
    effects: &[Effect],
) -> Result<(), StoreError> {
    let Applied { hostname, item, event, .. } = applied;
    let event_json =
        db.json(|| format!("event seq {} of {hostname} in {}", event.seq, item.rollout_id), &item.event)?;
    for effect in effects {
        match effect {
            Effect::AppendEventLog { seq, body } => {
                let seq = db.int("seq", *seq)?;
                db.conn()
                    .prepare_cached(
                        "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            hostname.as_str(),
                            item.rollout_id.as_str(),
                            seq,
                            item.event.kind(),
                            event_json,
                            ts(body.occurred_at()),
                            ts(group.now)
                        ])
                    })
                    .map_err(db.sql("append event log"))?;
            }
            Effect::InsertQuarantine { channel, closure } => {
                db.conn()
                    .execute(
                        "INSERT OR IGNORE INTO quarantined_closures
                             (channel, closure, rollout_id, hostname, quarantined_at)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            channel,
                            closure.as_str(),
                            item.rollout_id.as_str(),
                            hostname.as_str(),
                            ts(event.body.occurred_at())
                        ],
                    )
                    .map_err(db.sql("insert quarantine"))?;
                state.quarantine_insert(channel, closure);
                // Every rollout of the channel must re-check its hosts.
                group.dirty.extend(state.rollouts.keys().filter(|id| id.channel() == channel).cloned());
            }
            Effect::RecordTransition { from, to, at } => {
                tracing::info!(host = %hostname, rollout = %item.rollout_id, %from, %to, at = %ts(*at), "host transition");
            }
            // Agent-side effects never come out of a Remote event.
            Effect::EmitOutbound { .. }
            | Effect::FireActivation { .. }
            | Effect::FireRollback { .. }
            | Effect::ResetProbes => {}
        }
    }
    Ok(())
}

/// UPDATE the cached record; end the standing dispatch once the host left
/// Pending; keep the live index and the planner's dirty set up to date.
fn store_record(
    db: Db<'_>,
    state: &mut CpState,
    group: &mut Group,
    applied: &Applied<'_>,
    next: HostRecord,
) -> Result<(), StoreError> {
    let Applied { hostname, item, before, .. } = *applied;
    let Some(rollout) = state.rollouts.get_mut(&item.rollout_id) else { return Ok(()) };
    let wave = db.int("wave", rollout.manifest.hosts.get(hostname).map_or(0, |e| e.wave))?;
    let last_seq = db.int("last_seq", next.last_seq)?;
    let record_json = db.json(|| format!("the record of {hostname} in {}", item.rollout_id), &next)?;
    db.conn()
        .prepare_cached(
            "INSERT INTO host_records (rollout_id, hostname, wave, state, last_seq, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (rollout_id, hostname) DO UPDATE
                 SET state = excluded.state, last_seq = excluded.last_seq, record = excluded.record",
        )
        .and_then(|mut s| {
            s.execute(params![
                item.rollout_id.as_str(),
                hostname.as_str(),
                wave,
                next.state.as_str(),
                last_seq,
                record_json
            ])
        })
        .map_err(db.sql("update host record"))?;
    // The ack (or rejection) ends the standing dispatch.
    if next.state != HostState::Pending && rollout.remove_dispatch(hostname).is_some() {
        db.conn()
            .prepare_cached("DELETE FROM dispatches WHERE rollout_id = ?1 AND hostname = ?2")
            .and_then(|mut s| s.execute(params![item.rollout_id.as_str(), hostname.as_str()]))
            .map_err(db.sql("delete dispatch"))?;
        group.board.push(BoardChange::Withdraw(hostname.clone(), item.rollout_id.clone()));
    }
    if before.state != next.state {
        group.dirty.insert(item.rollout_id.clone());
    }
    let live = next.is_live();
    rollout.set_record(next);
    if live != before.is_live() {
        // The host's hold moved: every other rollout naming it
        // re-checks (`docs/protocol.md` §3 rule 8), in this same transaction.
        state.set_live(hostname, &item.rollout_id, live);
        group.dirty.extend(
            state
                .rollouts
                .iter()
                .filter(|(id, r)| **id != item.rollout_id && r.manifest.hosts.contains_key(hostname))
                .map(|(id, _)| id.clone()),
        );
    }
    Ok(())
}
