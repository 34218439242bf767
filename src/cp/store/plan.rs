//! The pure planner's decisions written down, inside the group's
//! transaction: for every rollout a command touched, skips and withdrawals
//! first (a quarantine never leaves a dispatch standing), then the
//! rollout's new state and wave, then the new dispatches (offered on the
//! board only after the commit).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use rusqlite::params;
use time::OffsetDateTime;

use super::group::{BoardChange, Group};
use super::state::{CpState, LiveRollout};
use super::{ts, Db, StoreError};
use crate::cp::planner::{self, IndexedInput, Plan, PlanInput};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::wire::Dispatch;

pub(super) fn run_planner(db: Db<'_>, state: &mut CpState, group: &mut Group) -> Result<(), StoreError> {
    let empty = HashSet::new();
    let no_busy = BTreeMap::new();
    let dirty = std::mem::take(&mut group.dirty);
    for id in &dirty {
        // A completed rollout is planned again when touched: an ack that
        // raced a skip, or a replay arriving late after a database loss,
        // can unsettle a host or exceed `max_failed_hosts` (halt) after it.
        // A superseded, halted or cancelled rollout's plan never reads the holds.
        let busy = match state.rollouts.get(id) {
            Some(r) if r.state.is_sticky() => None,
            Some(r) => Some(state.busy_elsewhere(id, &r.manifest)),
            None => continue,
        };
        let busy = busy.as_ref().unwrap_or(&no_busy);
        let Some(rollout) = state.rollouts.get_mut(id) else { continue };
        let quarantined = state.quarantine.get(id.channel()).unwrap_or(&empty);
        let plan = plan_rollout(rollout, quarantined, busy);
        // Skips and withdrawals before the rollout's new state, all in this
        // transaction: a quarantine never leaves a dispatch standing.
        skip_hosts(db, id, rollout, &plan, group.now)?;
        update_rollout(db, id, rollout, &plan, group.now)?;
        for host in plan.withdraw {
            db.conn()
                .prepare_cached("DELETE FROM dispatches WHERE rollout_id = ?1 AND hostname = ?2")
                .and_then(|mut s| s.execute(params![id.as_str(), host.as_str()]))
                .map_err(db.sql("withdraw dispatch"))?;
            rollout.remove_dispatch(&host);
            group.board.push(BoardChange::Withdraw(host, id.clone()));
        }
        let mut offers = Vec::with_capacity(plan.dispatch.len());
        for host in plan.dispatch {
            let Some(entry) = rollout.manifest.hosts.get(&host) else { continue };
            let wave = entry.wave;
            let soak_secs = rollout.manifest.waves.get(wave).map_or(0, |w| w.soak_secs);
            let dispatch = Dispatch {
                rollout_id: id.clone(),
                target_closure: entry.target_closure.clone(),
                wave,
                soak_secs,
                issued_at: group.now,
            };
            offers.push((host, dispatch));
        }
        insert_dispatches(db, &offers, group.now)?;
        for (host, dispatch) in offers {
            rollout.insert_dispatch(host.clone(), dispatch.clone());
            group.board.push(BoardChange::Offer(host, dispatch));
        }
    }
    Ok(())
}

/// The plan of one rollout: `planner::plan_indexed` on the rollout's
/// index (`planner::plan` when the index declines). Debug builds check
/// every indexed plan against `planner::plan` on the same input.
fn plan_rollout(
    rollout: &mut LiveRollout,
    quarantined: &HashSet<Closure>,
    busy: &BTreeMap<Hostname, RolloutId>,
) -> Plan {
    rollout.plan_index();
    let full_input = |dispatched| PlanInput {
        manifest: &rollout.manifest,
        state: rollout.state,
        current_wave: rollout.current_wave,
        halt_reason: rollout.halt_reason.as_deref(),
        records: &rollout.records,
        dispatched,
        quarantined,
        busy_elsewhere: busy,
        skipped: &rollout.skipped,
        accepted_failures: rollout.accepted_failures,
    };
    let indexed = rollout.index.as_ref().and_then(|index| {
        planner::plan_indexed(&IndexedInput {
            manifest: &rollout.manifest,
            state: rollout.state,
            current_wave: rollout.current_wave,
            halt_reason: rollout.halt_reason.as_deref(),
            records: &rollout.records,
            dispatched: &rollout.dispatched,
            quarantined,
            busy_elsewhere: busy,
            skipped: &rollout.skipped,
            accepted_failures: rollout.accepted_failures,
            index,
        })
    });
    let dispatched = || rollout.dispatched.keys().cloned().collect::<BTreeSet<Hostname>>();
    match indexed {
        Some(plan) => {
            #[cfg(debug_assertions)]
            {
                let full = planner::plan(&full_input(&dispatched()));
                assert_eq!(
                    plan, full,
                    "the indexed plan of {} differs from planner::plan",
                    rollout.manifest.rollout_id
                );
            }
            plan
        }
        None => planner::plan(&full_input(&dispatched())),
    }
}

fn skip_hosts(
    db: Db<'_>,
    id: &RolloutId,
    rollout: &mut LiveRollout,
    plan: &Plan,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    for host in &plan.skip {
        let Some(entry) = rollout.manifest.hosts.get(host) else { continue };
        let reason = format!("target closure {} is quarantined on channel {}", entry.target_closure, id.channel());
        tracing::info!(rollout = %id, %host, %reason, "host skipped");
        db.conn()
            .prepare_cached(
                "INSERT OR IGNORE INTO skipped_hosts (rollout_id, hostname, target_closure, reason, skipped_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![id.as_str(), host.as_str(), entry.target_closure.as_str(), reason, ts(now)])
            })
            .map_err(db.sql("skip host"))?;
        rollout.insert_skip(host.clone());
    }
    Ok(())
}

/// The rollout's state, wave cursor and halt reason, if the plan moved them.
fn update_rollout(
    db: Db<'_>,
    id: &RolloutId,
    rollout: &mut LiveRollout,
    plan: &Plan,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    if plan.state == rollout.state
        && plan.current_wave == rollout.current_wave
        && plan.halt_reason == rollout.halt_reason
    {
        return Ok(());
    }
    if plan.state != rollout.state {
        tracing::info!(rollout = %id, from = %rollout.state, to = %plan.state, reason = plan.halt_reason.as_deref().unwrap_or(""), "rollout state");
    }
    if plan.current_wave != rollout.current_wave {
        tracing::info!(rollout = %id, wave = plan.current_wave, "wave promoted");
    }
    db.conn()
        .execute(
            "UPDATE rollouts SET state = ?2, current_wave = ?3, halt_reason = ?4, updated_at = ?5 WHERE rollout_id = ?1",
            params![
                id.as_str(),
                plan.state.as_str(),
                db.int("current_wave", plan.current_wave)?,
                plan.halt_reason,
                ts(now)
            ],
        )
        .map_err(db.sql("update rollout"))?;
    rollout.state = plan.state;
    rollout.current_wave = plan.current_wave;
    rollout.halt_reason = plan.halt_reason.clone();
    Ok(())
}

/// Dispatch rows per INSERT statement: a 10,000-host wave is stored with
/// one statement per 64 rows instead of one per row, which is what makes
/// "dispatch a whole fleet" fast (SQLite's per-statement cost dominates a
/// row this small).
const DISPATCH_ROWS_PER_INSERT: usize = 64;

fn insert_dispatches(db: Db<'_>, offers: &[(Hostname, Dispatch)], now: OffsetDateTime) -> Result<(), StoreError> {
    let issued_at = ts(now);
    for chunk in offers.chunks(DISPATCH_ROWS_PER_INSERT) {
        let rows = vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        // At most two texts per rollout (full chunks and the remainder), so
        // the statement cache keeps both prepared.
        let mut insert = db
            .conn()
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO dispatches (rollout_id, hostname, target_closure, wave, soak_secs, issued_at)
                 VALUES {rows}"
            ))
            .map_err(db.sql("insert dispatches"))?;
        let texts: Vec<[&str; 3]> =
            chunk.iter().map(|(h, d)| [d.rollout_id.as_str(), h.as_str(), d.target_closure.as_str()]).collect();
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 6);
        for ([rollout_id, host, closure], (_, d)) in texts.iter().zip(chunk) {
            values.extend([rollout_id as &dyn rusqlite::ToSql, host, closure, &d.wave, &d.soak_secs, &issued_at]);
        }
        insert.execute(values.as_slice()).map_err(db.sql("insert dispatches"))?;
    }
    Ok(())
}
