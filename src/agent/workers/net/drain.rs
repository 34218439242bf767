//! The drain worker: outbound events out, in enqueue order, in batches;
//! gaps and Replay-From requests are served by re-sending the rollout's
//! delivered history. Delivery only moves queue files.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hyper::StatusCode;
use tokio::sync::Notify;

use super::super::{Shutdown, WorkerExit};
use super::{pause, random_u64};
use crate::agent::backoff::Backoff;
use crate::agent::journal::{QueueTaskError, SharedQueue};
use crate::agent::net::CpApi;
use crate::client::ClientError;
use crate::ids::RolloutId;
use crate::queue::{QueueError, QueuedEvent};
use crate::wire::{BatchItem, EventBatch, EventResult, ResultStatus, MAX_BATCH_EVENTS};

/// The drainer also looks at the queue this often without being woken
/// (every 15 s by default), so nothing waits for the next enqueue.
pub const DEFAULT_DRAIN_INTERVAL: Duration = Duration::from_secs(15);

/// after its first successful drain, then at most this often. Pruning
/// scans the acked index (≤ 10,000 events), so not after every batch.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Delivers pending events in enqueue order, in batches, and moves each to
/// `acked/` or `dead/` by the CP's answer. `retry`, 5xx and network errors
/// keep the event where it is and back off (jitter, cap 60 s). A `gap`
/// re-sends the rollout's delivered history from the expected seq first
/// (`docs/protocol.md` §3 rule 2); Replay-From requests of the heartbeat are served the same way,
/// by this one sender. A batch the CP refuses whole (400 `bad_event_batch`,
/// 413) is halved down to one event, and an event refused on its own is
/// dead-lettered with the CP's answer. It also applies the queue's
/// retention of `acked/`, every [`PRUNE_EVERY`] after a successful drain.
pub async fn run_drain_worker(
    api: CpApi,
    queue: SharedQueue,
    wake: std::sync::Arc<Notify>,
    interval: Duration,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut backoff = Backoff::new();
    let mut next_prune = tokio::time::Instant::now();
    let mut blocked = Blocked::new();
    loop {
        match drain_once(&api, &queue, &mut blocked).await {
            Ok(()) => {
                backoff.succeed();
                if tokio::time::Instant::now() >= next_prune {
                    prune(&queue).await;
                    next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
                }
            }
            Err(why) => {
                let delay = backoff.fail(random_u64());
                tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "delivery paused");
                if !pause(delay, &mut shutdown).await {
                    return WorkerExit::Shutdown;
                }
                continue;
            }
        }
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            () = wake.notified() => {}
            () = queue.resend_wake().notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Applies the queue's retention of `acked/`; a failure is logged and
/// retried at the next turn (nothing is lost by pruning late).
async fn prune(queue: &SharedQueue) {
    match queue.with(|q| q.prune_acked()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(acked = n, "queue retention removed old acked rollouts"),
        Ok(Err(e)) => tracing::warn!(error = %e, "queue retention failed; retrying later"),
        Err(e) => tracing::warn!(error = %e, "queue retention failed; retrying later"),
    }
}

/// Rollouts whose history cannot get past a seq in this run of the agent
/// (the CP refused that seq when it was re-sent, or the agent no longer has
/// it), with the dead-letter reason of the events that wait on it. Later
/// gaps at the same seq dead-letter at once instead of re-sending again,
/// and a Replay-From that would start there is skipped: at most one re-send
/// per [`BLOCKED_RECHECK`] (a restart, or a CP that expects another seq,
/// tries again at once).
type Blocked = BTreeMap<RolloutId, (u64, String, tokio::time::Instant)>;

/// How long the drainer trusts that a rollout's history cannot get past a
/// seq before it re-sends it again: the CP's state can change (a database
/// restored from a backup, a manifest re-published), and a re-send costs
/// one small request, so ten minutes bounds both the waste and the wait.
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(600);

/// The dead-letter reason for events waiting on `seq` of a blocked rollout,
/// if the block is recent.
fn blocked_at<'a>(blocked: &'a Blocked, rollout_id: &RolloutId, seq: u64) -> Option<&'a str> {
    blocked
        .get(rollout_id)
        .filter(|(s, _, at)| *s == seq && at.elapsed() < BLOCKED_RECHECK)
        .map(|(_, text, _)| text.as_str())
}

/// How a re-send of a rollout's delivered history went.
#[derive(Debug)]
enum Resent {
    /// The CP now has every event before the rollout's first pending one.
    Done,
    /// A seq the CP needs is not in the queue (pruned, or unreadable).
    Unavailable { seq: u64 },
    /// The CP refused an event of the history (`rejected`, or refused on
    /// its own with 400/413): it can never get past that seq.
    Refused { seq: u64, reason: String },
    /// Network, 5xx, `retry` or an unexpected answer: try again later.
    Pause(DeliveryPaused),
}

/// Why delivery pauses (backs off, keeping the order) instead of going on.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryPaused {
    /// Network, timeout, 5xx, or an answer that does not parse.
    #[error(transparent)]
    Cp(#[from] ClientError),
    #[error("the CP answered {answered} results for {sent} events")]
    ResultCount { answered: usize, sent: usize },
    #[error("the CP answered gap with expected seq {expected:?} for seq {seq}")]
    BadGap { expected: Option<u64>, seq: u64 },
    #[error("the CP asked to retry: {reason}")]
    Retry { reason: String },
    /// A gap re-sent in this pass came back at the same seq.
    #[error("the CP still expects seq {expected} of {rollout_id} after a re-send")]
    StillExpected { rollout_id: RolloutId, expected: u64 },
    #[error("re-sending seq {seq} of {rollout_id}: the CP answered {status:?} ({reason})")]
    ResendAnswer { rollout_id: RolloutId, seq: u64, status: ResultStatus, reason: String },
    #[error(transparent)]
    QueueTask(#[from] QueueTaskError),
    /// Acking, dead-lettering or reviving an event failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What the CP said about each event posted, in order, and why posting
/// stopped early (then `results` covers a prefix of the events).
struct Delivery {
    results: Vec<EventResult>,
    stopped: Option<DeliveryPaused>,
}

/// Whether the CP refused a whole batch for what is in it (so a smaller
/// batch may pass, and a single event refused this way never will): 413
/// (too large; a proxy may answer it too), or 400 `bad_event_batch` (the
/// batch does not parse). Other 400s (a body cut in transit) are transient.
pub fn refused_whole(error: &ClientError) -> Option<String> {
    match error {
        ClientError::Status { status, code, message }
            if *status == StatusCode::PAYLOAD_TOO_LARGE
                || (*status == StatusCode::BAD_REQUEST && code == "bad_event_batch") =>
        {
            Some(format!("the control plane refused it on its own with {status} {code}: {message}"))
        }
        _ => None,
    }
}

/// Posts `events` in order, in batches of at most [`MAX_BATCH_EVENTS`].
/// A batch refused whole (see [`refused_whole`]) is halved and retried,
/// down to one event; one event refused alone gets a synthesised `rejected`
/// result carrying the CP's answer, so the caller dead-letters it and the
/// queue moves on. After a success the batch size doubles back.
async fn post_in_batches(api: &CpApi, events: &[QueuedEvent]) -> Delivery {
    let mut results = Vec::with_capacity(events.len());
    let mut size = MAX_BATCH_EVENTS;
    let mut start = 0;
    while start < events.len() {
        let chunk = &events[start..(start + size).min(events.len())];
        let batch = EventBatch {
            hostname: api.hostname().clone(),
            events: chunk
                .iter()
                .map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event.clone() })
                .collect(),
        };
        match api.post_events(&batch).await {
            Ok(answer) if answer.results.len() == chunk.len() => {
                results.extend(answer.results);
                start += chunk.len();
                size = (size * 2).min(MAX_BATCH_EVENTS);
            }
            Ok(answer) => {
                let why = DeliveryPaused::ResultCount { answered: answer.results.len(), sent: chunk.len() };
                return Delivery { results, stopped: Some(why) };
            }
            Err(e) => match refused_whole(&e) {
                Some(why) if chunk.len() > 1 => {
                    size = chunk.len() / 2;
                    tracing::warn!(n_events = chunk.len(), retry_with = size, %why, "batch refused whole; halving it");
                }
                Some(why) => {
                    let q = &chunk[0];
                    tracing::error!(
                        qseq = q.qseq, rollout_id = %q.rollout_id, seq = q.seq(), kind = q.kind(), %why,
                        "the control plane refuses this event on its own; dead-lettering it"
                    );
                    results.push(EventResult { status: ResultStatus::Rejected, reason: Some(why), expected_seq: None });
                    start += 1;
                }
                None => return Delivery { results, stopped: Some(e.into()) },
            },
        }
    }
    Delivery { results, stopped: None }
}

/// Sends batches until the queue is empty; Err when delivery must pause.
async fn drain_once(api: &CpApi, queue: &SharedQueue, blocked: &mut Blocked) -> Result<(), DeliveryPaused> {
    serve_resend_requests(api, queue, blocked).await?;
    // (rollout, expected seq) re-sent in this pass: the same gap again
    // means the CP does not take the history; pause rather than loop.
    let mut resent = BTreeSet::new();
    loop {
        let batch: Vec<QueuedEvent> = queue.with(|q| q.pending_head(MAX_BATCH_EVENTS)).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let delivery = post_in_batches(api, &batch).await;
        let answers = sort_answers(&batch, delivery);
        settle(queue, answers.moves).await?;
        for (rollout_id, (expected, held)) in answers.gapped {
            let rejected_here = answers.rejected.get(&rollout_id).filter(|(seq, _)| *seq == expected);
            let reason = match rejected_here {
                Some((seq, why)) => Some(refused_reason(&rollout_id, *seq, why)),
                None => fill_gap(api, queue, blocked, &mut resent, &rollout_id, expected).await?,
            };
            if let Some(reason) = reason {
                dead_letter_held(queue, &rollout_id, held, &reason).await?;
            }
        }
        if let Some(why) = answers.pause {
            return Err(why);
        }
    }
}

/// Serves the Replay-From requests first: the CP lacks history that the
/// pending events build on. A paused re-send puts back its request and the
/// ones not served yet.
async fn serve_resend_requests(api: &CpApi, queue: &SharedQueue, blocked: &mut Blocked) -> Result<(), DeliveryPaused> {
    let mut requests = queue.take_resend_requests().into_iter();
    while let Some((rollout_id, after)) = requests.next() {
        let from = after.saturating_add(1);
        if blocked_at(blocked, &rollout_id, from).is_some() {
            continue;
        }
        match resend_history(api, queue, &rollout_id, from).await {
            Resent::Done => {}
            Resent::Unavailable { seq } => {
                let text = unavailable_reason(&rollout_id, seq);
                tracing::error!(%rollout_id, seq, "{text}");
                block(blocked, rollout_id, from, text);
            }
            Resent::Refused { seq, reason } => {
                let text = refused_reason(&rollout_id, seq, &reason);
                tracing::error!(%rollout_id, seq, "{text}");
                block(blocked, rollout_id, seq, text);
            }
            Resent::Pause(why) => {
                queue.request_resend(rollout_id, after);
                for (r, a) in requests {
                    queue.request_resend(r, a);
                }
                return Err(why);
            }
        }
    }
    Ok(())
}

/// Records that a rollout's history cannot get past `seq` (see [`Blocked`]).
fn block(blocked: &mut Blocked, rollout_id: RolloutId, seq: u64, reason: String) {
    blocked.insert(rollout_id, (seq, reason, tokio::time::Instant::now()));
}

/// What the answers to one batch decide.
#[derive(Default)]
struct Answers {
    /// By qseq: ack (None) or dead-letter (Some(reason)).
    moves: Vec<(u64, Option<String>)>,
    /// Per rollout answered `gap`: the expected seq and the events of the
    /// rollout from the gapped one on (they stay pending).
    gapped: BTreeMap<RolloutId, (u64, Vec<QueuedEvent>)>,
    /// Per rollout, the seq rejected in this batch and why.
    rejected: BTreeMap<RolloutId, (u64, String)>,
    /// Why delivery pauses after this batch, if it does.
    pause: Option<DeliveryPaused>,
}

/// Sorts the answers of a batch, in order: applied and duplicate events are
/// acked, rejected ones dead-lettered, a rollout's events from a `gap` on
/// are held for [`fill_gap`]; nothing after a `retry` or an odd gap moves.
fn sort_answers(batch: &[QueuedEvent], delivery: Delivery) -> Answers {
    let mut answers = Answers { pause: delivery.stopped, ..Answers::default() };
    for (queued, result) in batch.iter().zip(delivery.results) {
        if let Some((_, held)) = answers.gapped.get_mut(&queued.rollout_id) {
            held.push(queued.clone());
            continue;
        }
        match result.status {
            ResultStatus::Applied | ResultStatus::Duplicate => answers.moves.push((queued.qseq, None)),
            ResultStatus::Rejected => {
                let reason = result.reason.unwrap_or_else(|| "rejected without a reason".to_owned());
                tracing::warn!(qseq = queued.qseq, kind = queued.event.kind(), %reason, "event rejected; dead-lettered");
                answers.rejected.insert(queued.rollout_id.clone(), (queued.seq(), reason.clone()));
                answers.moves.push((queued.qseq, Some(reason)));
            }
            ResultStatus::Gap => match result.expected_seq {
                Some(expected) if expected < queued.seq() => {
                    answers.gapped.insert(queued.rollout_id.clone(), (expected, vec![queued.clone()]));
                }
                expected => {
                    answers.pause = Some(DeliveryPaused::BadGap { expected, seq: queued.seq() });
                    break;
                }
            },
            ResultStatus::Retry => {
                // Order is kept: nothing after the first retry moves.
                let reason = result.reason.unwrap_or_else(|| "retry".to_owned());
                answers.pause = Some(DeliveryPaused::Retry { reason });
                break;
            }
        }
    }
    answers
}

/// A rollout the CP answered `gap` for: re-sends its history from
/// `expected`. `Ok(Some(reason))` when the gap can never be filled (the
/// held events are then dead-lettered with it), `Ok(None)` when it is
/// filled (they are sent again next), Err when delivery pauses.
async fn fill_gap(
    api: &CpApi,
    queue: &SharedQueue,
    blocked: &mut Blocked,
    resent: &mut BTreeSet<(RolloutId, u64)>,
    rollout_id: &RolloutId,
    expected: u64,
) -> Result<Option<String>, DeliveryPaused> {
    if let Some(text) = blocked_at(blocked, rollout_id, expected) {
        return Ok(Some(text.to_owned()));
    }
    if !resent.insert((rollout_id.clone(), expected)) {
        return Err(DeliveryPaused::StillExpected { rollout_id: rollout_id.clone(), expected });
    }
    tracing::info!(%rollout_id, expected, "the control plane lacks earlier events; re-sending its history");
    match resend_history(api, queue, rollout_id, expected).await {
        Resent::Done => Ok(None),
        Resent::Unavailable { seq } => {
            let text = unavailable_reason(rollout_id, seq);
            block(blocked, rollout_id.clone(), expected, text.clone());
            Ok(Some(text))
        }
        Resent::Refused { seq, reason } => {
            let text = refused_reason(rollout_id, seq, &reason);
            block(blocked, rollout_id.clone(), seq, text.clone());
            Ok(Some(text))
        }
        Resent::Pause(why) => Err(why),
    }
}

/// Dead-letters the events of a rollout held behind a gap that cannot be filled.
async fn dead_letter_held(
    queue: &SharedQueue,
    rollout_id: &RolloutId,
    held: Vec<QueuedEvent>,
    reason: &str,
) -> Result<(), DeliveryPaused> {
    for q in &held {
        tracing::error!(
            qseq = q.qseq, %rollout_id, seq = q.seq(), kind = q.kind(), %reason,
            "event cannot be delivered; dead-lettered"
        );
    }
    settle(queue, held.into_iter().map(|q| (q.qseq, Some(reason.to_owned()))).collect()).await
}

/// The dead-letter reason of events that wait on a seq the CP refused.
fn refused_reason(rollout_id: &RolloutId, seq: u64, why: &str) -> String {
    format!(
        "undeliverable: the control plane needs seq {seq} of {rollout_id} first and refuses it ({why}); no later event of the rollout can be applied"
    )
}

/// The dead-letter reason of events that wait on a seq the agent lost.
fn unavailable_reason(rollout_id: &RolloutId, seq: u64) -> String {
    format!(
        "undeliverable: the control plane needs seq {seq} of {rollout_id} first, which this agent no longer has (pruned from acked/ or unreadable); no later event of the rollout can be applied"
    )
}

/// Acks (None) or dead-letters (Some(reason)) pending events.
async fn settle(queue: &SharedQueue, moves: Vec<(u64, Option<String>)>) -> Result<(), DeliveryPaused> {
    if moves.is_empty() {
        return Ok(());
    }
    queue
        .with(move |q| {
            for (qseq, rejected) in moves {
                match rejected {
                    None => q.ack(qseq)?,
                    Some(reason) => q.reject(qseq, &reason)?,
                }
            }
            Ok::<(), QueueError>(())
        })
        .await??;
    Ok(())
}

/// Re-sends one rollout's delivered history from seq `from` (acked events
/// and dead letters, in seq order) up to its first pending event. Dead
/// letters the CP now applies are revived (moved back to `acked/`): the
/// agent applied them before sending (write-ahead), so after a CP database
/// loss they are part of the history the CP needs.
async fn resend_history(api: &CpApi, queue: &SharedQueue, rollout_id: &RolloutId, from: u64) -> Resent {
    let r = rollout_id.clone();
    let found = queue
        .with(move |q| {
            let end = q.first_pending_seq(&r).unwrap_or_else(|| q.last_seq(&r).saturating_add(1));
            (q.history_from(&r, from), end)
        })
        .await;
    let (history, end) = match found {
        Ok(found) => found,
        Err(why) => return Resent::Pause(why.into()),
    };
    // The events must run from `from` to just before `end` without a hole.
    let want = crate::queue::first_missing_seq(&history, from);
    if want < end {
        return Resent::Unavailable { seq: want };
    }
    if history.is_empty() {
        return Resent::Done;
    }
    tracing::info!(
        %rollout_id, from, n_events = history.len(), n_dead = history.iter().filter(|h| h.dead).count(),
        "re-sending delivered history"
    );
    let events: Vec<QueuedEvent> = history.iter().map(|h| h.queued.clone()).collect();
    let delivery = post_in_batches(api, &events).await;
    let mut revive = Vec::new();
    let mut outcome = None;
    for (h, result) in history.iter().zip(&delivery.results) {
        match result.status {
            ResultStatus::Applied | ResultStatus::Duplicate => {
                if h.dead {
                    revive.push(h.queued.qseq);
                }
            }
            ResultStatus::Rejected => {
                let reason = result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                outcome = Some(Resent::Refused { seq: h.queued.seq(), reason });
                break;
            }
            ResultStatus::Retry | ResultStatus::Gap => {
                outcome = Some(Resent::Pause(DeliveryPaused::ResendAnswer {
                    rollout_id: rollout_id.clone(),
                    seq: h.queued.seq(),
                    status: result.status,
                    reason: result.reason.clone().unwrap_or_default(),
                }));
                break;
            }
        }
    }
    if !revive.is_empty() {
        tracing::info!(%rollout_id, n_events = revive.len(), "dead letters applied on re-send; moved back to acked/");
        let revived = queue.with(move |q| revive.into_iter().try_for_each(|qseq| q.revive(qseq))).await;
        let revived = revived.map_err(DeliveryPaused::from).and_then(|r| r.map_err(DeliveryPaused::from));
        if let Err(why) = revived {
            return Resent::Pause(why);
        }
    }
    if let Some(outcome) = outcome {
        return outcome;
    }
    match delivery.stopped {
        Some(why) => Resent::Pause(why),
        None => Resent::Done,
    }
}
