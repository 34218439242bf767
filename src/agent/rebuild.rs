//! A rollout's history at start when some of its queue records are lost (a
//! record that does not decode is moved to `dead/` at open, under its name
//! `{qseq}-{host}-{rollout}-{kind}.json`): which seqs are missing, what each
//! one was (its kind, from the file name; its place, from the qseq between
//! the readable events), and what can be rebuilt. Pure: the caller reads the
//! files and decides what to do with a loss.
//!
//! The rules (`docs/decisions.md` 29, "A lost record of a live rollout is rebuilt, or the agent stops"):
//! - a lost `DispatchAck` is rebuilt exactly from the acceptance kept in
//!   `accepted-channels.json` ([`AcceptedDispatch`]);
//! - a lost `ActivationCompleted` that the later events prove (they are
//!   legal only while Soaking) is rebuilt with the target as the observed
//!   closure and the time of the next readable event: the soak ends no
//!   earlier than it did;
//! - a lost visibility event is rebuilt where what it said is known
//!   ([`Repair::Rebuilt`], written back so the CP receives its seq): a
//!   `ProbeObservedFirst` from the `ProbeResult` right after it (the agent
//!   reports a probe's first observation and its result as a pair: same
//!   probe, mode and time); a `ProbeTopologyDeclared` from the topology of
//!   the health-checks file of the running system (the file is part of the
//!   immutable closure the lost declaration read); an `ActivationStarted`
//!   with the time of the event before it and the switch method marked
//!   unknown. Otherwise (a `ProbeResult`, whose status no later event
//!   proves, or the inference does not hold) it is bridged: its seq is
//!   spent, its content is not guessed (a restart declares the topology and
//!   reports every probe's first result again), and the CP, which never
//!   gets that seq, stays behind (`docs/decisions.md` 29, "Not closed");
//! - anything else, a loss after the last readable event (its seq would be
//!   handed out again), or a gap no corrupt file explains, is not rebuilt.

use super::channels::AcceptedDispatch;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{EventBody, ProbeDecl};
use crate::wire::OutboundEvent;

/// Wire kinds whose loss only hides something (they never decide).
const BRIDGEABLE_KINDS: [&str; 4] = ["ActivationStarted", "ProbeTopologyDeclared", "ProbeObservedFirst", "ProbeResult"];

/// One record of the rollout that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRecord {
    pub qseq: u64,
    /// The wire kind, from the file name.
    pub kind: String,
    /// `dead/{name} ({reason})`, for messages.
    pub file: String,
}

/// What was done for one lost seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Rebuilt; the event takes the lost seq, and the restart writes it back
    /// under the lost record's `qseq` (`Queue::write_back`).
    Rebuilt { seq: u64, qseq: u64, kind: String, from: &'static str, file: String },
    /// Only the seq is kept (a visibility event).
    Bridged { seq: u64, kind: String, file: String },
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::Rebuilt { seq, kind, from, file, .. } => {
                write!(f, "seq {seq} ({kind}, {file}) rebuilt from {from}")
            }
            Repair::Bridged { seq, kind, file } => {
                write!(
                    f,
                    "seq {seq} ({kind}, {file}) lost; a visibility event, its seq is kept and its content not guessed"
                )
            }
        }
    }
}

/// A rollout's history ready to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Readable and rebuilt events, in seq order.
    pub events: Vec<OutboundEvent>,
    /// Seqs spent by bridged events (see [`Repair::Bridged`]).
    pub bridged: Vec<u64>,
    pub repairs: Vec<Repair>,
}

/// The history of one rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Starts at seq 1 and every lost seq was repaired (none, mostly).
    Complete(History),
    /// Retention removed the start: a finished rollout, known by its last seq.
    Pruned,
    /// A loss that cannot be repaired, with why (names the seqs and files).
    Lost(String),
}

/// The corrupt records of `dead/` that belong to this rollout, by qseq.
pub fn lost_records(corrupt: &[(String, String)], hostname: &Hostname, rollout_id: &RolloutId) -> Vec<LostRecord> {
    let mut out: Vec<LostRecord> = corrupt
        .iter()
        .filter(|(name, _)| names_rollout(name, hostname, rollout_id))
        .map(|(name, reason)| {
            let qseq = name.split('-').next().and_then(|q| q.parse().ok()).unwrap_or(0);
            let kind = name.trim_end_matches(".json").rsplit('-').next().unwrap_or("").to_owned();
            LostRecord { qseq, kind, file: format!("dead/{name} ({reason})") }
        })
        .collect();
    out.sort_by_key(|l| l.qseq);
    out
}

/// Whether a queue file name (`{qseq}-{host}-{rollout}-{kind}.json`) is one
/// of this rollout's (names are sanitised, and the rollout part may be cut).
pub fn names_rollout(name: &str, hostname: &Hostname, rollout_id: &RolloutId) -> bool {
    let Some(rest) = name.split_once('-').map(|(_, r)| r) else { return false };
    let Some(rest) = rest.strip_prefix(&format!("{hostname}-")) else { return false };
    let Some((rollout_part, _kind)) = rest.rsplit_once('-') else { return false };
    let cut = rollout_part.chars().count() >= crate::queue::record::MAX_NAME_ROLLOUT_CHARS;
    rollout_part == rollout_id.as_str() || (cut && rollout_id.as_str().starts_with(rollout_part))
}

/// What the rebuild knows besides the queue: the rollout's entry of
/// `accepted-channels.json` (if it has one) and the probe topology the
/// health-checks file of the running system declares (if known).
#[derive(Debug, Clone, Copy, Default)]
pub struct Kept<'a> {
    pub acceptance: Option<&'a AcceptedDispatch>,
    pub topology: Option<&'a [ProbeDecl]>,
}

/// Puts the readable events (`(qseq, event)`) and the lost records of one
/// rollout in order and repairs what the rules allow from `kept`.
pub fn history(
    rollout_id: &RolloutId,
    mut readable: Vec<(u64, OutboundEvent)>,
    lost: &[LostRecord],
    has_pending: bool,
    kept: Kept<'_>,
) -> Verdict {
    readable.sort_by_key(|(_, e)| e.seq);
    readable.dedup_by_key(|(_, e)| e.seq);
    let first = readable.first().map(|(_, e)| e.seq);
    if first != Some(1) && lost.is_empty() && !has_pending {
        return Verdict::Pruned;
    }
    let mut out = History::default();
    let mut next_seq = 1;
    let mut lost = lost.iter().peekable();
    for (qseq, event) in &readable {
        let before: Vec<&LostRecord> = std::iter::from_fn(|| lost.next_if(|l| l.qseq < *qseq)).collect();
        if event.seq > next_seq || !before.is_empty() {
            let seqs = next_seq..event.seq;
            if before.len() as u64 != seqs.end - seqs.start {
                return Verdict::Lost(unexplained(rollout_id, seqs, &before, has_pending));
            }
            for (seq, record) in seqs.zip(before) {
                if let Err(why) = repair(seq, record, event, kept, &mut out) {
                    return Verdict::Lost(format!("seq {seq} of rollout {rollout_id} is lost: {why}"));
                }
            }
        }
        out.events.push(event.clone());
        next_seq = event.seq + 1;
    }
    let after: Vec<String> = lost.map(|l| l.file.clone()).collect();
    if !after.is_empty() {
        return Verdict::Lost(format!(
            "the last record(s) of rollout {rollout_id} are lost ({}): their seqs, after seq {}, are unknown and would be handed out again",
            after.join(", "),
            next_seq - 1
        ));
    }
    Verdict::Complete(out)
}

fn unexplained(rollout_id: &RolloutId, seqs: std::ops::Range<u64>, files: &[&LostRecord], has_pending: bool) -> String {
    let missing = match seqs.end - seqs.start {
        0 => format!("a record before seq {}", seqs.end),
        1 => format!("seq {}", seqs.start),
        _ => format!("seqs {} to {}", seqs.start, seqs.end - 1),
    };
    let cause = if files.is_empty() && has_pending && seqs.start == 1 {
        "no corrupt file names it, yet it has pending events, which retention never prunes".to_owned()
    } else if files.is_empty() {
        "no corrupt file names it".to_owned()
    } else {
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        format!("corrupt record(s): {} (they do not match the missing seqs one to one)", names.join(", "))
    };
    format!("{missing} of rollout {rollout_id} missing; {cause}")
}

/// Repairs one lost seq or says why it cannot be. `next` is the first
/// readable event after the gap.
fn repair(
    seq: u64,
    record: &LostRecord,
    next: &OutboundEvent,
    kept: Kept<'_>,
    out: &mut History,
) -> Result<(), String> {
    let kind = record.kind.as_str();
    let (body, from) = match kind {
        "DispatchAck" => {
            let Some(a) = kept.acceptance else {
                return Err(format!(
                    "its DispatchAck ({}) holds the rollback target, and accepted-channels.json has no copy of this acceptance",
                    record.file
                ));
            };
            let body = EventBody::Activate {
                current_closure_at_dispatch: a.current_closure_at_dispatch.clone(),
                target_closure: a.target_closure.clone(),
                soak_secs: a.soak_secs,
                received_at: a.received_at,
            };
            (body, "accepted-channels.json")
        }
        "ActivationCompleted" => {
            let target = out.events.iter().find_map(|e| match e.to_body() {
                Ok(EventBody::Activate { target_closure, .. }) => Some(target_closure),
                _ => None,
            });
            let at = next.to_body().ok().map(|b| b.occurred_at());
            let (Some(target), Some(at)) = (target, at) else {
                return Err(format!("its ActivationCompleted ({}) cannot be inferred", record.file));
            };
            let body = EventBody::ActivationCompleted {
                observed_current_closure: target,
                exit_code: super::activation::EXIT_CODE_COMPLETED,
                completed_at: at,
            };
            (body, "the events after it (soak from the next one)")
        }
        k if BRIDGEABLE_KINDS.contains(&k) => match visibility(seq, kind, next, kept, out) {
            Some(rebuilt) => rebuilt,
            None => {
                out.bridged.push(seq);
                out.repairs.push(Repair::Bridged { seq, kind: kind.to_owned(), file: record.file.clone() });
                return Ok(());
            }
        },
        _ => return Err(format!("a {kind} record ({}) decides the rollout and cannot be inferred", record.file)),
    };
    out.events.push(OutboundEvent::from_machine(seq, &body));
    out.repairs.push(Repair::Rebuilt {
        seq,
        qseq: record.qseq,
        kind: kind.to_owned(),
        from,
        file: record.file.clone(),
    });
    Ok(())
}

/// The switch method of a rebuilt `ActivationStarted`: the lost record
/// named it, nothing else does.
pub const UNKNOWN_SWITCH_METHOD: &str = "unknown (record lost)";

/// A lost visibility event rebuilt from what is known, with where from;
/// `None` when it is not known (the seq is then bridged).
fn visibility(
    seq: u64,
    kind: &str,
    next: &OutboundEvent,
    kept: Kept<'_>,
    out: &History,
) -> Option<(EventBody, &'static str)> {
    let next_body = next.to_body().ok()?;
    match kind {
        // Reported as a pair with the probe's first result: same probe,
        // mode and time, the result right after it.
        "ProbeObservedFirst" => match next_body {
            EventBody::ProbeResult { probe_name, mode, observed_at, .. } if next.seq == seq + 1 => {
                let body = EventBody::ProbeObservedFirst { probe_name, mode, observed_at };
                Some((body, "the ProbeResult after it (the same probe, mode and time)"))
            }
            _ => None,
        },
        // The file lives in the closure the host runs while it soaks: the
        // declaration that was lost read the same file.
        "ProbeTopologyDeclared" => kept.topology.map(|probes| {
            let body =
                EventBody::ProbeTopologyDeclared { probes: probes.to_vec(), declared_at: next_body.occurred_at() };
            (body, "the health-checks file of the running system")
        }),
        "ActivationStarted" => {
            let started_at = out.events.last().and_then(|e| e.to_body().ok()).map(|b| b.occurred_at())?;
            let body = EventBody::ActivationStarted { started_at, switch_method: UNKNOWN_SWITCH_METHOD.to_owned() };
            Some((body, "the event before it (the switch method is unknown)"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use time::Duration;

    use super::*;
    use crate::agent::testkit::{closure, rid, T0};
    use crate::machine::{ProbeMode, ProbeStatus};

    fn host() -> Hostname {
        Hostname::parse("web-1").expect("valid")
    }

    fn ev(seq: u64, body: EventBody) -> OutboundEvent {
        OutboundEvent::from_machine(seq, &body)
    }

    fn activate() -> EventBody {
        EventBody::Activate {
            current_closure_at_dispatch: closure('0'),
            target_closure: closure('1'),
            soak_secs: 30,
            received_at: T0,
        }
    }

    fn started() -> EventBody {
        EventBody::ActivationStarted { started_at: T0, switch_method: "setsid".into() }
    }

    fn completed(at: Timestamp) -> EventBody {
        EventBody::ActivationCompleted { observed_current_closure: closure('1'), exit_code: 0, completed_at: at }
    }

    fn probe(at: Timestamp) -> EventBody {
        EventBody::ProbeResult {
            probe_name: "web".into(),
            mode: ProbeMode::Enforce,
            status: ProbeStatus::Pass,
            observed_at: at,
            failure_reason: None,
        }
    }

    fn lost(qseq: u64, kind: &str) -> (String, String) {
        (format!("{qseq:020}-web-1-stable@r1-{kind}.json"), "checksum mismatch".to_owned())
    }

    fn acceptance() -> AcceptedDispatch {
        AcceptedDispatch {
            current_closure_at_dispatch: closure('0'),
            target_closure: closure('1'),
            soak_secs: 30,
            received_at: T0,
        }
    }

    fn verdict(readable: Vec<(u64, OutboundEvent)>, corrupt: &[(String, String)], kept: bool) -> Verdict {
        let lost = lost_records(corrupt, &host(), &rid());
        let acceptance = kept.then(acceptance);
        history(&rid(), readable, &lost, false, Kept { acceptance: acceptance.as_ref(), topology: None })
    }

    use crate::machine::Timestamp;

    #[test]
    fn a_missing_start_without_pending_events_or_a_corrupt_record_is_retention() {
        // Proves the distinction: pruned by retention vs lost.
        let tail = vec![(9, ev(5, started()))];
        assert_eq!(history(&rid(), tail.clone(), &[], false, Kept::default()), Verdict::Pruned);
        let Verdict::Lost(why) = history(&rid(), tail.clone(), &[], true, Kept::default()) else { panic!() };
        assert!(why.contains("seqs 1 to 4") && why.contains("pending"), "{why}");
        let corrupt = [lost(7, "DispatchAck")];
        let Verdict::Lost(why) = verdict(tail, &corrupt, false) else { panic!() };
        assert!(why.contains("dead/00000000000000000007-web-1-stable@r1-DispatchAck.json"), "{why}");
        assert!(!names_rollout("00000000000000000007-web-1-stable@r10-DispatchAck.json", &host(), &rid()));
        let r10 = RolloutId::parse("stable@r10").expect("valid");
        assert!(!names_rollout(&corrupt[0].0, &host(), &r10), "a shorter id is not a prefix match");
    }

    #[test]
    fn a_lost_dispatch_ack_is_rebuilt_exactly_from_the_kept_acceptance_or_not_at_all() {
        // Proves the DispatchAck rule: with the acceptance kept, seq 1 is
        // the Activate it was (rollback target included); without it, the
        // loss names the file and the rollback target.
        let readable = vec![(2, ev(2, started())), (3, ev(3, completed(T0)))];
        let Verdict::Complete(h) = verdict(readable.clone(), &[lost(1, "DispatchAck")], true) else { panic!() };
        assert_eq!(h.events[0], ev(1, activate()));
        assert_eq!(h.events.len(), 3);
        assert!(h.bridged.is_empty());
        assert!(h.repairs[0].to_string().starts_with("seq 1 (DispatchAck, dead/00000000000000000001-"), "{:?}", h);
        let Verdict::Lost(why) = verdict(readable, &[lost(1, "DispatchAck")], false) else { panic!() };
        assert!(why.contains("seq 1") && why.contains("rollback target") && why.contains("DispatchAck"), "{why}");
    }

    #[test]
    fn lost_visibility_events_are_bridged_and_a_proven_completion_gets_the_next_events_time() {
        // Proves the middle rules: a ProbeResult keeps only its seq; an
        // ActivationCompleted followed by Soaking events is rebuilt with
        // the next event's time (the soak ends no earlier than it did).
        let later = T0 + Duration::seconds(40);
        let readable = vec![(1, ev(1, activate())), (2, ev(2, started())), (5, ev(5, probe(later)))];
        let corrupt = [lost(3, "ActivationCompleted"), lost(4, "ProbeResult")];
        let Verdict::Complete(h) = verdict(readable, &corrupt, false) else { panic!() };
        assert_eq!(h.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 5]);
        assert_eq!(h.events[2], ev(3, completed(later)));
        assert_eq!(h.bridged, vec![4]);
        assert!(matches!(&h.repairs[1], Repair::Bridged { seq: 4, kind, .. } if kind == "ProbeResult"));
    }

    #[test]
    fn a_lost_topology_and_first_observation_are_rebuilt_only_from_what_proves_them() {
        // Proves the visibility rules: a ProbeObservedFirst is rebuilt from
        // the ProbeResult right after it (same probe, mode, time) and a
        // ProbeTopologyDeclared from the kept topology; without the result
        // right after, or without a topology, each stays bridged.
        use crate::machine::{ProbeDecl, ProbeKind};
        let t = T0 + Duration::seconds(40);
        let decl = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        let head = vec![(1, ev(1, activate())), (2, ev(2, started())), (3, ev(3, completed(T0)))];
        let mut readable = head.clone();
        readable.push((6, ev(6, probe(t))));
        let corrupt = [lost(4, "ProbeTopologyDeclared"), lost(5, "ProbeObservedFirst")];
        let lost_recs = lost_records(&corrupt, &host(), &rid());
        let kept = Kept { acceptance: None, topology: Some(&decl) };
        let Verdict::Complete(h) = history(&rid(), readable.clone(), &lost_recs, true, kept) else { panic!() };
        assert!(h.bridged.is_empty(), "{h:?}");
        assert_eq!(h.events[3], ev(4, EventBody::ProbeTopologyDeclared { probes: decl.clone(), declared_at: t }));
        let first =
            EventBody::ProbeObservedFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, observed_at: t };
        assert_eq!(h.events[4], ev(5, first));
        assert!(h.repairs.iter().all(|r| matches!(r, Repair::Rebuilt { .. })), "{h:?}");
        // No topology kept: bridged. A result that is not right after: bridged.
        let Verdict::Complete(h) = history(&rid(), readable, &lost_recs, true, Kept::default()) else { panic!() };
        assert_eq!(h.bridged, vec![4]);
        let mut far = head;
        far.push((6, ev(6, probe(t))));
        let corrupt = [lost(4, "ProbeObservedFirst"), lost(5, "ProbeObservedFirst")];
        let lost_recs = lost_records(&corrupt, &host(), &rid());
        let Verdict::Complete(h) = history(&rid(), far, &lost_recs, true, kept) else { panic!() };
        assert_eq!(h.bridged, vec![4], "seq 4 is not right before the result");
        assert!(matches!(&h.repairs[1], Repair::Rebuilt { seq: 5, .. }), "{h:?}");
    }

    #[test]
    fn a_lost_decision_a_lost_tail_and_an_unmatched_gap_are_not_rebuilt() {
        // Proves what stays lost: a decisive event, records after the last
        // readable one (their seqs would be handed out again), and a gap
        // whose files do not match it one to one.
        let head = vec![(1, ev(1, activate())), (2, ev(2, started()))];
        let mut with_after = head.clone();
        with_after.push((9, ev(4, completed(T0))));
        let Verdict::Lost(why) = verdict(with_after, &[lost(5, "Failed")], false) else { panic!() };
        assert!(why.contains("Failed") && why.contains("seq 3"), "{why}");
        let Verdict::Lost(why) = verdict(head.clone(), &[lost(3, "ProbeResult")], false) else { panic!() };
        assert!(why.contains("last record") && why.contains("after seq 2"), "{why}");
        let mut gap2 = head;
        gap2.push((9, ev(5, completed(T0))));
        let Verdict::Lost(why) = verdict(gap2, &[lost(5, "ProbeResult")], false) else { panic!() };
        assert!(why.contains("seqs 3 to 4") && why.contains("one to one"), "{why}");
    }
}
