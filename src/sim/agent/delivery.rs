//! The delivery loop of `agent/workers/net/drain.rs` (`drain_once`,
//! `resend_history`, `settle`), in one place, as a state machine because
//! the sim's network answers later in simulated time where the real worker
//! `await`s. Every queue change is the real `Queue` call the worker makes
//! (`pending_head`, `ack`, `reject`, `first_pending_seq`, `history_from`,
//! `revive`); the decisions follow the worker line by line and the
//! dead-letter reasons are its texts. `post_in_batches` is modelled too: a
//! batch the CP refuses whole (413, or 400 `bad_event_batch`, as judged by
//! the worker's own `refused_whole`) is halved down to one event, and one
//! event refused alone gets the worker's synthesised `rejected` result
//! (dead-lettered with the CP's answer); the size doubles back after a
//! success.

use super::*;
use crate::queue::HistoryEvent;
use crate::wire::{BatchItem, EventBatch, EventResult, ResultStatus, MAX_BATCH_EVENTS};

/// `workers/net/drain.rs::BLOCKED_RECHECK`, in simulated ms.
pub const BLOCKED_RECHECK_MS: u64 = crate::agent::workers::net::BLOCKED_RECHECK.as_millis() as u64;

/// The worker's `Blocked`: per rollout the seq its history cannot get
/// past, the dead-letter text, and since when (simulated ms).
pub type Blocked = BTreeMap<RolloutId, (u64, String, u64)>;

fn blocked_at<'a>(blocked: &'a Blocked, rollout_id: &RolloutId, seq: u64, now_ms: u64) -> Option<&'a str> {
    blocked
        .get(rollout_id)
        .filter(|(s, _, at)| *s == seq && now_ms.saturating_sub(*at) < BLOCKED_RECHECK_MS)
        .map(|(_, text, _)| text.as_str())
}

/// `workers/net/drain.rs::refused_reason`.
pub fn refused_reason(rollout_id: &RolloutId, seq: u64, why: &str) -> String {
    format!(
        "undeliverable: the control plane needs seq {seq} of {rollout_id} first and refuses it ({why}); no later event of the rollout can be applied"
    )
}

/// `workers/net/drain.rs::unavailable_reason`.
pub fn unavailable_reason(rollout_id: &RolloutId, seq: u64) -> String {
    format!(
        "undeliverable: the control plane needs seq {seq} of {rollout_id} first, which this agent no longer has (pruned from acked/ or unreadable); no later event of the rollout can be applied"
    )
}

/// Why a history re-send was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResendFor {
    /// A Replay-From request (`after` = the CP's last seq).
    Request { after: u64 },
    /// A `gap` answer: the held events wait on it (they stay pending).
    Gap { expected: u64, held: Vec<QueuedEvent> },
}

/// `post_in_batches` over a batch from the head of `pending/`:
/// `batch[start..start + chunk]` is in flight, `results` answer
/// `batch[..start]`, `size` is the current batch size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub batch: Vec<QueuedEvent>,
    pub results: Vec<EventResult>,
    pub start: usize,
    pub chunk: usize,
    pub size: usize,
    /// Indexes into `batch` of events the CP refused on their own.
    pub alone: Vec<usize>,
}

/// What the request in flight carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sending {
    Batch(Posting),
    /// `resend_history`: `history[sent..sent + chunk]` is in flight, in
    /// batches of at most `size` (halved on a refusal, as `post_in_batches`).
    Resend {
        why: ResendFor,
        rollout_id: RolloutId,
        history: Vec<HistoryEvent>,
        sent: usize,
        chunk: usize,
        size: usize,
    },
}

impl Posting {
    fn new(batch: Vec<QueuedEvent>) -> Posting {
        Posting { batch, results: Vec::new(), start: 0, chunk: 0, size: MAX_BATCH_EVENTS, alone: Vec::new() }
    }
}

impl Sending {
    fn none() -> Sending {
        Sending::Batch(Posting::new(Vec::new()))
    }

    /// The events of the request in flight: (number, the first one's
    /// rollout and seq, whether it is a batch from `pending/`).
    pub fn in_flight(&self) -> (usize, Option<(RolloutId, u64)>, bool) {
        match self {
            Sending::Batch(p) => (p.chunk, p.batch.get(p.start).map(|q| (q.rollout_id.clone(), q.seq())), true),
            Sending::Resend { history, sent, chunk, .. } => {
                (*chunk, history.get(*sent).map(|h| (h.queued.rollout_id.clone(), h.queued.seq())), false)
            }
        }
    }
}

/// One `drain_once` call in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Replay-From requests taken at the start, not served yet.
    pub requests: VecDeque<(RolloutId, u64)>,
    /// (rollout, expected seq) re-sent in this pass.
    pub resent: BTreeSet<(RolloutId, u64)>,
    /// Gaps of the last batch still to handle, and that batch's
    /// rejections and pause.
    pub gaps: VecDeque<(RolloutId, u64, Vec<QueuedEvent>)>,
    pub rejected: BTreeMap<RolloutId, (u64, String)>,
    pub pause: Option<String>,
    pub sending: Sending,
}

/// What the drainer does next.
#[derive(Debug)]
pub enum Step {
    /// Post this batch (the pass goes on when it is answered).
    Send(EventBatch, Box<Pass>),
    /// The queue is empty: `drain_once` returned Ok.
    Done,
    /// `drain_once` returned Err: back off. `requeue` are Replay-From
    /// requests to keep (`queue.request_resend`).
    Pause { why: String, requeue: Vec<(RolloutId, u64)> },
}

/// What the drainer tells the sim happened, for the trace and checks.
#[derive(Debug, Default)]
pub struct Notes {
    pub lines: Vec<String>,
    pub dead_lettered: u64,
    pub revived: u64,
    /// Events the CP refused on their own, dead-lettered with its answer:
    /// (rollout, seq, reason), for the checker.
    pub refused_alone: Vec<(RolloutId, u64, String)>,
}

fn to_batch(host: &Hostname, events: impl Iterator<Item = QueuedEvent>) -> EventBatch {
    EventBatch {
        hostname: host.clone(),
        events: events.map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event }).collect(),
    }
}

/// Starts a pass with the Replay-From requests taken from the queue.
pub fn start_pass(
    queue: &mut Queue,
    host: &Hostname,
    requests: BTreeMap<RolloutId, u64>,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    let pass = Pass {
        requests: requests.into_iter().collect(),
        resent: BTreeSet::new(),
        gaps: VecDeque::new(),
        rejected: BTreeMap::new(),
        pause: None,
        sending: Sending::none(),
    };
    advance(queue, host, Box::new(pass), blocked, now_ms, notes)
}

/// The start of `resend_history`: the history from `from` up to the
/// rollout's first pending event, or where it has a hole.
enum Start {
    Done,
    Unavailable { seq: u64 },
    Send(Vec<HistoryEvent>),
}

fn start_resend(queue: &Queue, rollout_id: &RolloutId, from: u64) -> Start {
    let end = queue.first_pending_seq(rollout_id).unwrap_or_else(|| queue.last_seq(rollout_id).saturating_add(1));
    let history = queue.history_from(rollout_id, from);
    let want = crate::queue::first_missing_seq(&history, from);
    if want < end {
        return Start::Unavailable { seq: want };
    }
    if history.is_empty() {
        return Start::Done;
    }
    Start::Send(history)
}

/// Posts the next part of what is being sent (`post_in_batches`).
fn send_chunk(host: &Hostname, mut pass: Box<Pass>) -> Step {
    let batch = match &mut pass.sending {
        Sending::Resend { history, sent, chunk, size, .. } => {
            *chunk = (history.len() - *sent).min(*size);
            to_batch(host, history[*sent..*sent + *chunk].iter().map(|h| h.queued.clone()))
        }
        Sending::Batch(p) => {
            p.chunk = (p.batch.len() - p.start).min(p.size);
            to_batch(host, p.batch[p.start..p.start + p.chunk].iter().cloned())
        }
    };
    Step::Send(batch, pass)
}

fn dead_letter(queue: &mut Queue, held: &[QueuedEvent], reason: &str, notes: &mut Notes) -> Result<(), String> {
    for q in held {
        queue.reject(q.qseq, reason).map_err(|e| e.to_string())?;
        notes.dead_lettered += 1;
        notes.lines.push(format!("{} seq {} dead-lettered: {reason}", q.rollout_id, q.seq()));
    }
    Ok(())
}

/// Goes on with the pass until something must be sent or it ends:
/// Replay-From requests first, then the gaps of the last batch, then
/// the next batch from the head of `pending/`.
fn advance(
    queue: &mut Queue,
    host: &Hostname,
    mut pass: Box<Pass>,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    while let Some((rollout_id, after)) = pass.requests.pop_front() {
        let from = after.saturating_add(1);
        if blocked_at(blocked, &rollout_id, from, now_ms).is_some() {
            continue;
        }
        match start_resend(queue, &rollout_id, from) {
            Start::Done => {}
            Start::Unavailable { seq } => {
                let text = unavailable_reason(&rollout_id, seq);
                notes.lines.push(text.clone());
                blocked.insert(rollout_id, (from, text, now_ms));
            }
            Start::Send(history) => {
                pass.sending = Sending::Resend {
                    why: ResendFor::Request { after },
                    rollout_id,
                    history,
                    sent: 0,
                    chunk: 0,
                    size: MAX_BATCH_EVENTS,
                };
                return Ok(send_chunk(host, pass));
            }
        }
    }
    while let Some((rollout_id, expected, held)) = pass.gaps.pop_front() {
        let dead_reason = if let Some((seq, why)) = pass.rejected.get(&rollout_id).filter(|(s, _)| *s == expected) {
            Some(refused_reason(&rollout_id, *seq, why))
        } else if let Some(text) = blocked_at(blocked, &rollout_id, expected, now_ms) {
            Some(text.to_owned())
        } else if !pass.resent.insert((rollout_id.clone(), expected)) {
            return Ok(Step::Pause {
                why: format!("the CP still expects seq {expected} of {rollout_id} after a re-send"),
                requeue: Vec::new(),
            });
        } else {
            notes.lines.push(format!("the CP lacks {rollout_id} from seq {expected}; re-sending its history"));
            match start_resend(queue, &rollout_id, expected) {
                Start::Done => None,
                Start::Unavailable { seq } => {
                    let text = unavailable_reason(&rollout_id, seq);
                    blocked.insert(rollout_id.clone(), (expected, text.clone(), now_ms));
                    Some(text)
                }
                Start::Send(history) => {
                    let why = ResendFor::Gap { expected, held };
                    pass.sending =
                        Sending::Resend { why, rollout_id, history, sent: 0, chunk: 0, size: MAX_BATCH_EVENTS };
                    return Ok(send_chunk(host, pass));
                }
            }
        };
        if let Some(reason) = dead_reason {
            dead_letter(queue, &held, &reason, notes)?;
        }
    }
    if let Some(why) = pass.pause.take() {
        return Ok(Step::Pause { why, requeue: Vec::new() });
    }
    let batch = queue.pending_head(MAX_BATCH_EVENTS);
    if batch.is_empty() {
        return Ok(Step::Done);
    }
    pass.rejected.clear();
    pass.sending = Sending::Batch(Posting::new(batch));
    Ok(send_chunk(host, pass))
}

/// `sort_answers` and `settle` of a batch from `pending/` (`results`
/// answer a prefix of it when posting `stopped`): acks, dead letters, the
/// events held behind a gap; then the pass goes on (gaps, then the pause).
#[allow(clippy::too_many_arguments)]
fn settle_batch(
    queue: &mut Queue,
    host: &Hostname,
    mut pass: Box<Pass>,
    posted: &Posting,
    stopped: Option<String>,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    let (batch, results) = (&posted.batch, &posted.results);
    pass.pause = stopped;
    let mut moves: Vec<(u64, Option<String>)> = Vec::new();
    let mut gapped: BTreeMap<RolloutId, (u64, Vec<QueuedEvent>)> = BTreeMap::new();
    for (i, (queued, result)) in batch.iter().zip(results).enumerate() {
        if let Some((_, held)) = gapped.get_mut(&queued.rollout_id) {
            // Held behind the gap, whatever its own answer (refused alone too).
            held.push(queued.clone());
            continue;
        }
        match result.status {
            ResultStatus::Applied | ResultStatus::Duplicate => moves.push((queued.qseq, None)),
            ResultStatus::Rejected => {
                let reason = result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                notes.lines.push(format!("{} seq {} rejected: {reason}", queued.rollout_id, queued.seq()));
                notes.dead_lettered += 1;
                if posted.alone.contains(&i) {
                    notes.refused_alone.push((queued.rollout_id.clone(), queued.seq(), reason.clone()));
                }
                pass.rejected.insert(queued.rollout_id.clone(), (queued.seq(), reason.clone()));
                moves.push((queued.qseq, Some(reason)));
            }
            ResultStatus::Gap => match result.expected_seq {
                Some(expected) if expected < queued.seq() => {
                    gapped.insert(queued.rollout_id.clone(), (expected, vec![queued.clone()]));
                }
                _ => {
                    pass.pause = Some(format!(
                        "the CP answered gap with expected seq {:?} for seq {}",
                        result.expected_seq,
                        queued.seq()
                    ));
                    break;
                }
            },
            ResultStatus::Retry => {
                pass.pause = Some(format!(
                    "the CP asked to retry: {}",
                    result.reason.clone().unwrap_or_else(|| "retry".to_owned())
                ));
                break;
            }
        }
    }
    for (qseq, rejected) in moves {
        match rejected {
            None => queue.ack(qseq),
            Some(reason) => queue.reject(qseq, &reason),
        }
        .map_err(|e| e.to_string())?;
    }
    pass.gaps = gapped.into_iter().map(|(id, (expected, held))| (id, expected, held)).collect();
    advance(queue, host, pass, blocked, now_ms, notes)
}

/// The CP answered the request in flight.
pub fn on_answer(
    queue: &mut Queue,
    host: &Hostname,
    mut pass: Box<Pass>,
    results: &[EventResult],
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    match std::mem::replace(&mut pass.sending, Sending::none()) {
        Sending::Batch(mut p) => {
            if results.len() != p.chunk {
                // `post_in_batches` stops: the answers so far still count.
                let why = format!("the CP answered {} results for {} events", results.len(), p.chunk);
                return settle_batch(queue, host, pass, &p, Some(why), blocked, now_ms, notes);
            }
            p.results.extend_from_slice(results);
            p.start += p.chunk;
            p.size = (p.size * 2).min(MAX_BATCH_EVENTS);
            if p.start < p.batch.len() {
                pass.sending = Sending::Batch(p);
                return Ok(send_chunk(host, pass));
            }
            settle_batch(queue, host, pass, &p, None, blocked, now_ms, notes)
        }
        Sending::Resend { why, rollout_id, history, sent, chunk, size } => {
            let part = &history[sent..sent + chunk];
            let mut revive = Vec::new();
            // None: this chunk went through; Some(Ok(..)) refused; Some(Err) pause.
            let mut outcome: Option<Result<(u64, String), String>> = None;
            for (h, result) in part.iter().zip(results) {
                match result.status {
                    ResultStatus::Applied | ResultStatus::Duplicate => {
                        if h.dead {
                            revive.push(h.queued.qseq);
                        }
                    }
                    ResultStatus::Rejected => {
                        let reason = result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                        outcome = Some(Ok((h.queued.seq(), reason)));
                        break;
                    }
                    ResultStatus::Retry | ResultStatus::Gap => {
                        outcome = Some(Err(format!(
                            "re-sending seq {} of {rollout_id}: the CP answered {:?} ({})",
                            h.queued.seq(),
                            result.status,
                            result.reason.as_deref().unwrap_or("")
                        )));
                        break;
                    }
                }
            }
            if outcome.is_none() && results.len() != part.len() {
                outcome = Some(Err(format!("the CP answered {} results for {} events", results.len(), part.len())));
            }
            for qseq in &revive {
                queue.revive(*qseq).map_err(|e| e.to_string())?;
            }
            if !revive.is_empty() {
                notes.revived += revive.len() as u64;
                notes
                    .lines
                    .push(format!("{} dead letter(s) of {rollout_id} applied on re-send; revived", revive.len()));
            }
            if outcome.is_none() && sent + chunk < history.len() {
                let size = (size * 2).min(MAX_BATCH_EVENTS);
                pass.sending = Sending::Resend { why, rollout_id, history, sent: sent + chunk, chunk: 0, size };
                return Ok(send_chunk(host, pass));
            }
            resend_over(queue, host, pass, why, rollout_id, outcome, blocked, now_ms, notes)
        }
    }
}

/// The request in flight failed (network, timeout, 503): the worker's
/// `post_in_batches` stopped, so `drain_once` settles what was answered
/// before and returns Err.
pub fn on_failure(
    queue: &mut Queue,
    host: &Hostname,
    mut pass: Box<Pass>,
    why: &str,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    let mut requeue: Vec<(RolloutId, u64)> = Vec::new();
    match std::mem::replace(&mut pass.sending, Sending::none()) {
        Sending::Batch(p) if !p.results.is_empty() => {
            let why = Some(why.to_owned());
            return settle_batch(queue, host, pass, &p, why, blocked, now_ms, notes);
        }
        Sending::Resend { why: ResendFor::Request { after }, rollout_id, .. } => {
            // Keep this request and the ones not served yet.
            requeue.push((rollout_id, after));
            requeue.extend(pass.requests.iter().cloned());
        }
        _ => {}
    }
    Ok(Step::Pause { why: why.to_owned(), requeue })
}

/// The CP refused the request in flight whole (`why`: the worker's
/// `refused_whole` text): `post_in_batches` halves a batch of several
/// events and sends again; a single event gets a synthesised `rejected`
/// result carrying `why`, and posting goes on after it.
pub fn on_refused(
    queue: &mut Queue,
    host: &Hostname,
    mut pass: Box<Pass>,
    why: String,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    match std::mem::replace(&mut pass.sending, Sending::none()) {
        Sending::Batch(mut p) => {
            if p.chunk > 1 {
                notes.lines.push(format!("a batch of {} events refused whole; halving it ({why})", p.chunk));
                p.size = p.chunk / 2;
                pass.sending = Sending::Batch(p);
                return Ok(send_chunk(host, pass));
            }
            p.results.push(EventResult { status: ResultStatus::Rejected, reason: Some(why), expected_seq: None });
            p.alone.push(p.start);
            p.start += 1;
            if p.start < p.batch.len() {
                pass.sending = Sending::Batch(p);
                return Ok(send_chunk(host, pass));
            }
            settle_batch(queue, host, pass, &p, None, blocked, now_ms, notes)
        }
        Sending::Resend { why: resend_for, rollout_id, history, sent, chunk, size } => {
            if chunk > 1 {
                notes.lines.push(format!("a re-send of {chunk} events refused whole; halving it ({why})"));
                let size = (chunk / 2).min(size);
                pass.sending = Sending::Resend { why: resend_for, rollout_id, history, sent, chunk: 0, size };
                return Ok(send_chunk(host, pass));
            }
            let seq = history[sent].queued.seq();
            resend_over(queue, host, pass, resend_for, rollout_id, Some(Ok((seq, why))), blocked, now_ms, notes)
        }
    }
}

/// What `drain_once` does with the `Resent` outcome of a re-send.
#[allow(clippy::too_many_arguments)]
fn resend_over(
    queue: &mut Queue,
    host: &Hostname,
    pass: Box<Pass>,
    why: ResendFor,
    rollout_id: RolloutId,
    outcome: Option<Result<(u64, String), String>>,
    blocked: &mut Blocked,
    now_ms: u64,
    notes: &mut Notes,
) -> Result<Step, String> {
    match (why, outcome) {
        (_, None) => {}
        (ResendFor::Request { after }, Some(Err(why))) => {
            let mut requeue = vec![(rollout_id, after)];
            requeue.extend(pass.requests.iter().cloned());
            return Ok(Step::Pause { why, requeue });
        }
        (ResendFor::Gap { .. }, Some(Err(why))) => return Ok(Step::Pause { why, requeue: Vec::new() }),
        (ResendFor::Request { .. }, Some(Ok((seq, reason)))) => {
            let text = refused_reason(&rollout_id, seq, &reason);
            notes.lines.push(text.clone());
            blocked.insert(rollout_id, (seq, text, now_ms));
        }
        (ResendFor::Gap { held, .. }, Some(Ok((seq, reason)))) => {
            let text = refused_reason(&rollout_id, seq, &reason);
            blocked.insert(rollout_id, (seq, text.clone(), now_ms));
            dead_letter(queue, &held, &text, notes)?;
        }
    }
    advance(queue, host, pass, blocked, now_ms, notes)
}
