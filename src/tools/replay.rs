//! `nixfleet replay`: re-runs recorded events through the shared state
//! machine and shows how every host's state evolved.
//!
//! - `--db PATH`: the control plane's event log. Each host starts from the
//!   Pending record its manifest implies and folds its logged events through
//!   `step` (the Remote side, exactly as ingest did). The result is compared
//!   with the host records the CP cached; any difference, or an event that
//!   no longer applies, exits 1. Then each rollout's stored state is checked
//!   against the replayed records and the operator actions
//!   (`operator_actions`: a resume's accepted failures, a cancel): see
//!   [`rollout_verdict`]. Opens the database read-only, so it is safe while
//!   the CP runs. A host whose probe events the CP compacted
//!   (`store::checkpoint`) is folded from seq 1 up to the soak's start,
//!   then from its record checkpoint at seq K; the output says so, and what
//!   rests on the checkpoint instead of on events (see [`fold_checkpointed`]).
//! - `--state-dir DIR`: an agent's queue (pending, acked and rejected
//!   events). The agent keeps no other state, so the check is that its whole
//!   journal still replays from seq 1 under its cached, re-verified manifest
//!   (`--trust-key`); otherwise exit 1. Read-only and lock-free.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::agent::channels::ChannelHistory;
use crate::agent::{journal, rebuild};
use crate::cp::store;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{step, Event, HostRecord, Outcome, Policy};
use crate::output::print_stdout;
use crate::queue::EntryState;
use crate::sign::PublicKey;
use crate::wire::OutboundEvent;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Key(#[from] crate::sign::SignError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The agent's queue cannot be listed or read.
    #[error(transparent)]
    ReadQueue(#[from] crate::queue::ViewError),
    #[error("replay disagrees: {0}")]
    Disagrees(String),
}

/// One host's evolution in one rollout.
struct Trace {
    lines: Vec<String>,
    /// Printed even with `--quiet`: what the fold started from.
    notes: Vec<String>,
    record: HostRecord,
    problems: Vec<String>,
}

/// Why a recorded event cannot be replayed at all.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
}

/// `bridged`: seqs of lost visibility events, spent without content (see
/// `agent::rebuild`).
fn fold(mut record: HostRecord, events: Vec<LoggedEvent>, policy: &Policy, bridged: &[u64]) -> Trace {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (seq, event) in events {
        while record.last_seq + 1 < seq && bridged.contains(&(record.last_seq + 1)) {
            record.last_seq += 1;
            lines.push(format!("  seq {:>4}  lost (a visibility event; only its seq is kept)", record.last_seq));
        }
        let event = match event {
            Ok(e) => e,
            Err(why) => {
                problems.push(format!("seq {seq} cannot be read: {why}"));
                continue;
            }
        };
        let from = record.state;
        match step(&record, &event, policy) {
            Ok(Outcome::Applied { record: next, .. }) => {
                let to = next.state;
                let arrow = if from == to { format!("{to}") } else { format!("{from} -> {to}") };
                lines.push(format!(
                    "  seq {:>4}  {:<24} {:<22} {}",
                    event.seq,
                    event.body.kind().wire_name(),
                    arrow,
                    event.body.occurred_at().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
                ));
                record = *next;
            }
            Ok(Outcome::Duplicate { .. }) => lines.push(format!("  seq {:>4}  duplicate (ignored)", event.seq)),
            Ok(Outcome::Gap { expected }) => {
                problems.push(format!("seq {} follows a gap: seq {expected} is missing", event.seq));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    Trace { lines, notes: Vec::new(), record, problems }
}

/// A host whose log the CP compacted at a record checkpoint at seq K
/// (`store::checkpoint`): the kept events at or below K (seqs 1..=A, up to
/// the ActivationCompleted that started the soak) are folded from the
/// Pending record, the checkpoint is checked against that proven record,
/// and the events after K are folded from the checkpoint. What cannot be
/// proven any more: the probe records, the topology and the
/// sustained-failure clock at K, which the deleted events A+1..=K made.
fn fold_checkpointed(
    start: HostRecord,
    events: Vec<LoggedEvent>,
    checkpoint: &store::Checkpoint,
    policy: &Policy,
) -> Trace {
    let k = checkpoint.seq;
    let (head, tail): (Vec<_>, Vec<_>) = events.into_iter().partition(|(seq, _)| *seq <= k);
    let head = fold(start, head, policy, &[]);
    let proven = head.record;
    let a = proven.last_seq;
    let mut lines = head.lines;
    let mut problems = head.problems;
    lines.push(format!("  seq {:>4}  checkpoint: seqs {}..={k} deleted by the CP", k, a + 1));
    problems.extend(checkpoint_problems(&proven, checkpoint));
    let tail = fold(checkpoint.record.clone(), tail, policy, &[]);
    lines.extend(tail.lines);
    problems.extend(tail.problems);
    let notes = vec![format!(
        "  started from a checkpoint at seq {k} (taken {}): seqs 1..={a} are proven from seq 1 and seqs after {k} \
         from the checkpoint; the {} probe events {}..={k} were deleted, so the probe records, the topology and \
         the sustained-failure clock at seq {k} are the CP's word, not re-proved",
        checkpoint.at,
        k.saturating_sub(a),
        a + 1
    )];
    Trace { lines, notes, record: tail.record, problems }
}

/// How a checkpoint can be wrong given the record proven at seq A (the last
/// kept event at or below it): it must be of the same soak (the host
/// Soaking at A and at K), account for exactly the missing seqs, agree
/// with the proven record in every field no probe event changes, and be a
/// record `step` could have made (every probe declared with its mode; the
/// clock running only while an enforce probe fails).
fn checkpoint_problems(proven: &HostRecord, checkpoint: &store::Checkpoint) -> Vec<String> {
    use crate::machine::HostState;
    let (a, k, cp) = (proven.last_seq, checkpoint.seq, &checkpoint.record);
    let mut problems = Vec::new();
    if proven.state != HostState::Soaking || cp.state != HostState::Soaking {
        problems.push(format!(
            "checkpoint at seq {k}: taken only while Soaking, but the log proves {} at seq {a} and the checkpoint \
             says {}",
            proven.state, cp.state
        ));
    }
    if checkpoint.compacted != k.saturating_sub(a) {
        problems.push(format!(
            "checkpoint at seq {k}: {} events deleted, but {} seqs ({}..={k}) are missing",
            checkpoint.compacted,
            k.saturating_sub(a),
            a + 1
        ));
    }
    let mut unchanged = cp.clone();
    unchanged.last_seq = a;
    unchanged.topology.clone_from(&proven.topology);
    unchanged.probes.clone_from(&proven.probes);
    unchanged.failure_clock_since = proven.failure_clock_since;
    if unchanged != *proven {
        problems.push(format!(
            "checkpoint at seq {k} differs from the record proven at seq {a} in a field no probe event changes"
        ));
    }
    for (name, probe) in &cp.probes {
        if cp.declared_mode(name) != Some(probe.mode) {
            problems.push(format!("checkpoint at seq {k}: probe {name:?} is not declared with mode {:?}", probe.mode));
        }
    }
    if cp.failure_clock_since.is_some() && cp.failing_enforce_probes().is_empty() {
        problems.push(format!("checkpoint at seq {k}: the failure clock runs but no enforce probe fails"));
    }
    problems
}

/// `nixfleet replay --db PATH`.
pub fn replay_db(db: &Path, only: Option<&RolloutId>, quiet: bool) -> Result<(), ReplayError> {
    let (out, disagreements) = db_report(db, only, quiet)?;
    print_stdout(&out)?;
    if disagreements.is_empty() {
        Ok(())
    } else {
        Err(ReplayError::Disagrees(disagreements.join("; ")))
    }
}

/// What `replay --db` prints, and its disagreements.
pub fn db_report(db: &Path, only: Option<&RolloutId>, quiet: bool) -> Result<(String, Vec<String>), ReplayError> {
    if !db.is_file() {
        return Err(ReplayError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("database {} does not exist", db.display()),
        )));
    }
    let conn = store::open_reader(db)?;
    let cached = store::cached_host_records(&conn, db)?;
    let mut out = String::new();
    let mut disagreements = Vec::new();
    let (mut n_hosts, mut n_events, mut n_checkpoints) = (0usize, 0usize, 0usize);
    let actions = store::action_rows(&conn, db, None)?;
    let checkpoints = store::has_checkpoint_table(&conn, db)?;
    for row in store::rollout_rows(&conn, db)? {
        let manifest = &row.manifest;
        let id = &manifest.rollout_id;
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let policy = manifest.machine_policy();
        let _ = writeln!(out, "rollout {id}");
        let mut replayed = BTreeMap::new();
        for (host, entry) in &manifest.hosts {
            n_hosts += 1;
            let events = logged_events(&conn, db, id, host)?;
            n_events += events.len();
            let start = HostRecord::pending(id.clone(), host.clone(), Some(entry.target_closure.clone()));
            let checkpoint = if checkpoints { store::checkpoint_of(&conn, db, id, host)? } else { None };
            let trace = match checkpoint {
                Some(checkpoint) => {
                    n_checkpoints += 1;
                    fold_checkpointed(start, events, &checkpoint, &policy)
                }
                None => fold(start, events, &policy, &[]),
            };
            let stored = cached.get(&(id.clone(), host.clone()));
            disagreements.extend(compare_host(&mut out, id, host, stored, &trace, quiet));
            replayed.insert(host.clone(), trace.record);
        }
        let skipped = store::skipped_of(&conn, db, id)?;
        let problem = rollout_lines(&mut out, &row, &replayed, &skipped, &actions);
        disagreements.extend(problem.map(|p| format!("{id}: {p}")));
    }
    if n_checkpoints > 0 {
        let _ =
            writeln!(out, "{n_checkpoints} host(s) replayed from a record checkpoint (their probe events compacted)");
    }
    let _ = writeln!(out, "{n_events} events of {n_hosts} hosts replayed; {} disagreements", disagreements.len());
    Ok((out, disagreements))
}

/// A logged event's seq and the event as ingest applied it, or why it no
/// longer reads.
type LoggedEvent = (u64, Result<Event, Unreadable>);

/// One host's logged events of one rollout in seq order, each read back as
/// the Remote event ingest applied (or why it no longer reads).
fn logged_events(
    conn: &rusqlite::Connection,
    db: &Path,
    id: &RolloutId,
    host: &Hostname,
) -> Result<Vec<LoggedEvent>, store::StoreError> {
    let events = store::logged_events_of(conn, db, id, host)?
        .into_iter()
        .map(|(seq, json)| {
            let seq = u64::try_from(seq).unwrap_or(0);
            let event = serde_json::from_str::<OutboundEvent>(&json)
                .map_err(Unreadable::from)
                .and_then(|w| w.to_remote().map_err(Unreadable::from));
            (seq, event)
        })
        .collect();
    Ok(events)
}

/// Writes one host's replay to `out` and compares it with the record the CP
/// stored; returns the disagreements.
fn compare_host(
    out: &mut String,
    id: &RolloutId,
    host: &Hostname,
    stored: Option<&HostRecord>,
    trace: &Trace,
    quiet: bool,
) -> Vec<String> {
    let verdict = match stored {
        Some(s) if *s == trace.record && trace.problems.is_empty() => "agrees",
        _ => "DISAGREES",
    };
    let _ = writeln!(out, " host {host}: {} ({verdict} with the stored record)", trace.record.state);
    write_trace_lines(out, trace, quiet);
    let mut disagreements: Vec<String> = trace.problems.iter().map(|p| format!("{host} in {id}: {p}")).collect();
    match stored {
        Some(s) if *s != trace.record => disagreements.push(format!(
            "{host} in {id}: stored record is {} at seq {}, replay gives {} at seq {}",
            s.state, s.last_seq, trace.record.state, trace.record.last_seq
        )),
        None => disagreements.push(format!("{host} in {id}: no stored record")),
        _ => {}
    }
    disagreements
}

/// A trace's notes (what the fold started from), then its event lines,
/// unless `quiet`.
fn write_trace_lines(out: &mut String, trace: &Trace, quiet: bool) {
    for note in &trace.notes {
        let _ = writeln!(out, "{note}");
    }
    if !quiet {
        for line in &trace.lines {
            let _ = writeln!(out, "{line}");
        }
    }
}

/// The rollout's operator actions and its state verdict, written to `out`;
/// the disagreement, if any.
fn rollout_lines(
    out: &mut String,
    row: &store::RolloutRow,
    replayed: &BTreeMap<Hostname, HostRecord>,
    skipped: &BTreeMap<Hostname, store::SkippedHost>,
    actions: &[store::ActionRecord],
) -> Option<String> {
    let id = row.manifest.rollout_id.as_str();
    let mine: Vec<&store::ActionRecord> = actions.iter().filter(|a| a.rollout_id.as_deref() == Some(id)).collect();
    for a in &mine {
        let _ = writeln!(out, " operator action {}: {} by {} at {}: {}", a.id, a.action, a.operator, a.at, a.reason);
    }
    let (line, problem) = rollout_verdict(row, replayed, skipped, &mine);
    let _ = writeln!(out, " rollout state: {line}");
    problem
}

/// Whether the stored state of a rollout is what its replayed records and
/// its operator actions allow (the parts of the planner's state that do
/// not depend on timing): unaccepted failures beyond `max_failed_hosts`
/// mean halted (or superseded/cancelled/completed), and a halt needs them;
/// cancelled exactly when a cancel was recorded; completed only when every
/// host settled or was skipped. Active versus converging depends on
/// standing dispatches, which are not facts of the log: not checked.
fn rollout_verdict(
    row: &store::RolloutRow,
    records: &BTreeMap<Hostname, HostRecord>,
    skipped: &BTreeMap<Hostname, store::SkippedHost>,
    actions: &[&store::ActionRecord],
) -> (String, Option<String>) {
    use crate::cp::planner::{is_settled, RolloutState as S};
    use crate::machine::HostState;
    let max_failed = row.manifest.policy.max_failed_hosts as usize;
    let n_failed = records.values().filter(|r| matches!(r.state, HostState::Failed | HostState::Reverted)).count();
    let accepted = actions
        .iter()
        .rev()
        .find(|a| a.action == "resume")
        .and_then(|a| a.detail.get("accepted_failures").and_then(|v| v.as_array()).map(Vec::len))
        .unwrap_or(0);
    let cancelled = actions.iter().any(|a| a.action == "cancel");
    let over_budget = n_failed > max_failed + accepted;
    let all_settled =
        records.iter().all(|(h, r)| is_settled(r.state) || (r.state == HostState::Pending && skipped.contains_key(h)));
    let state = row.state;
    let facts = format!("{n_failed} failed, {accepted} accepted by a resume, max_failed_hosts {max_failed}");
    let problem = match state {
        S::Active | S::Converging if over_budget => {
            Some(format!("stored {state}, but the failures call for a halt ({facts})"))
        }
        S::Halted if !over_budget => Some(format!("stored halted, but the failures are within the budget ({facts})")),
        S::Cancelled if !cancelled => Some("stored cancelled, but no cancel is recorded".to_owned()),
        s if s != S::Cancelled && cancelled => Some(format!("a cancel is recorded, but the stored state is {s}")),
        S::Completed if !all_settled => Some("stored completed, but replayed hosts are not all settled".to_owned()),
        _ => None,
    };
    let verdict = if problem.is_some() { "DISAGREES" } else { "agrees" };
    (format!("{state} ({verdict}: {facts})"), problem)
}

/// `nixfleet replay --state-dir DIR --trust-key K`. A rollout whose history
/// does not start at seq 1 is "pruned" (retention) only when nothing says
/// otherwise; a corrupt record of it in `dead/`, or pending events (never
/// pruned), make it a problem, as does a corrupt record of no known rollout.
pub fn replay_queue(state_dir: &Path, trust_key_paths: &[PathBuf], quiet: bool) -> Result<(), ReplayError> {
    let trust_keys = trust_key_paths.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let folders = [EntryState::Pending, EntryState::Acked, EntryState::Dead];
    let mut journals: BTreeMap<(RolloutId, Hostname), Vec<(u64, OutboundEvent)>> = BTreeMap::new();
    for q in journal::recorded_events(state_dir, &folders)? {
        journals.entry((q.rollout_id, q.hostname)).or_default().push((q.qseq, q.event));
    }
    let with_pending: BTreeSet<RolloutId> =
        journal::recorded_events(state_dir, &[EntryState::Pending])?.into_iter().map(|q| q.rollout_id).collect();
    let mut problems = Vec::new();
    let channels = ChannelHistory::load(state_dir).unwrap_or_else(|e| {
        problems.push(e.to_string());
        ChannelHistory::in_memory()
    });
    let mut replay = QueueReplay {
        trust_keys,
        cache: journal::ManifestCache::new(state_dir),
        channels,
        corrupt: journal::corrupt_records(state_dir)?,
        with_pending,
        quiet,
        out: String::new(),
        problems,
    };
    // Records rebuilt and written back at an earlier start: the rotted copy
    // left `dead/` then, and the loss is still a problem of this disk.
    for line in journal::rebuilt_log(state_dir)? {
        let _ = writeln!(replay.out, "REBUILT at an earlier start (written back to the queue): {line}");
        replay.problems.push(format!("rebuilt at an earlier start: {line}"));
    }
    for (name, reason) in &replay.corrupt {
        let known = journals.keys().any(|(rollout_id, host)| rebuild::names_rollout(name, host, rollout_id));
        if !known {
            replay.problems.push(format!("corrupt record dead/{name} ({reason}) of a rollout with no readable event"));
        }
    }
    for ((rollout_id, hostname), events) in journals {
        replay.journal(rollout_id, hostname, events);
    }
    let QueueReplay { mut out, problems, .. } = replay;
    let _ = writeln!(out, "{} problems", problems.len());
    print_stdout(&out)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ReplayError::Disagrees(problems.join("; ")))
    }
}

/// What `replay --state-dir` reads once, and the report it writes rollout
/// by rollout.
struct QueueReplay {
    trust_keys: Vec<PublicKey>,
    cache: journal::ManifestCache,
    channels: ChannelHistory,
    /// (file name, reason) of every unreadable record in `dead/`.
    corrupt: Vec<(String, String)>,
    /// Rollouts with pending events (never pruned by retention).
    with_pending: BTreeSet<RolloutId>,
    quiet: bool,
    out: String,
    problems: Vec<String>,
}

impl QueueReplay {
    /// One rollout's journal: its history rebuilt over lost records (or
    /// found pruned, or lost), then folded under its manifest's policy.
    fn journal(&mut self, rollout_id: RolloutId, hostname: Hostname, events: Vec<(u64, OutboundEvent)>) {
        let host = hostname.to_string();
        let _ = writeln!(self.out, "rollout {rollout_id}");
        let lost = rebuild::lost_records(&self.corrupt, &hostname, &rollout_id);
        let pending = self.with_pending.contains(&rollout_id);
        // The health-checks file is not an input of this tool: a lost
        // topology declaration shows as bridged here (the agent's start
        // rebuilds it from the file and writes it back).
        let kept = rebuild::Kept { acceptance: self.channels.dispatch_of(&rollout_id), topology: None };
        let history = match rebuild::history(&rollout_id, events, &lost, pending, kept) {
            rebuild::Verdict::Complete(history) => history,
            rebuild::Verdict::Pruned => {
                let _ = writeln!(self.out, " host {host}: history pruned by retention");
                return;
            }
            rebuild::Verdict::Lost(why) => {
                let _ = writeln!(self.out, " host {host}: NOT REBUILDABLE: {why}");
                self.problems.push(format!("{rollout_id}: {why}"));
                return;
            }
        };
        // A lost record is a problem even when it could be rebuilt: the
        // disk under the queue lost data.
        for repair in &history.repairs {
            let _ = writeln!(self.out, " host {host}: REBUILT: {repair}");
            self.problems.push(format!("{rollout_id}: {repair}"));
        }
        let events = history.events;
        let accepted = events.iter().any(|e| e.kind() == "DispatchAck");
        let Some(policy) = self.policy(&rollout_id, &hostname, accepted) else { return };
        let local = events.iter().map(|e| (e.seq, e.to_local().map_err(Unreadable::from))).collect();
        let start = HostRecord::pending(rollout_id.clone(), hostname, None);
        let trace = fold(start, local, &policy, &history.bridged);
        let _ = writeln!(self.out, " host {host}: {}", trace.record.state);
        write_trace_lines(&mut self.out, &trace, self.quiet);
        self.problems.extend(trace.problems.into_iter().map(|p| format!("{rollout_id}: {p}")));
    }

    /// The policy of the rollout's cached, re-verified manifest; the
    /// fallback for a rollout never accepted (no decision depends on it);
    /// `None`, with the problem recorded, when an accepted rollout's
    /// manifest cannot be had.
    fn policy(&mut self, rollout_id: &RolloutId, hostname: &Hostname, accepted: bool) -> Option<Policy> {
        match journal::cached_manifest(&self.cache, rollout_id, hostname, &self.trust_keys) {
            Ok(cached) => {
                if let Some(keyid) = cached.no_longer_trusted {
                    let _ = writeln!(self.out, " note: verified only by key {keyid}, recorded when it was accepted");
                }
                Some(cached.manifest.machine_policy())
            }
            Err(_) if !accepted => Some(journal::FALLBACK_POLICY),
            Err(why) => {
                self.problems.push(format!("{rollout_id}: {why}"));
                None
            }
        }
    }
}
