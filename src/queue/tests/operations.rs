//! The queue's calls on the real file system: enqueue, ack and reject,
//! seq rules, the lock, the caps, the history and revive, retention,
//! events_after, and the read-only view alongside a draining queue.

use super::*;

/// Enqueue, ack and reject move real files where `docs/protocol.md` §5 says, and a
/// reopen sees the same queue.
#[test]
fn enqueue_ack_reject_land_in_the_right_folders_and_survive_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = rollout("stable@r1");
    let mut q = open_real(tmp.path());
    let a = enqueue_next(&mut q, &r, "a").expect("enqueue");
    let b = enqueue_next(&mut q, &r, "b").expect("enqueue");
    let c = enqueue_next(&mut q, &r, "c").expect("enqueue");
    assert_eq!((a.qseq, b.qseq, c.qseq), (1, 2, 3));
    assert_eq!(a.path, tmp.path().join("outbound-queue/00000000000000000001-web-1-stable@r1-ActivationStarted.json"));
    q.ack(a.qseq).expect("ack");
    q.ack(a.qseq).expect("acking twice is fine");
    q.reject(b.qseq, "illegal in state Converged").expect("reject");
    assert!(matches!(q.ack(b.qseq), Err(QueueError::NotPending { qseq: 2 })));
    drop(q);

    let root = tmp.path().join(QUEUE_DIR);
    assert_eq!(names_in(&root.join("acked")), vec!["00000000000000000001-web-1-stable@r1-ActivationStarted.json"]);
    let dead = names_in(&root.join("dead"));
    assert_eq!(dead.len(), 2, "{dead:?}");
    let reason = DeadReason::decode(&std::fs::read(root.join("dead").join(&dead[1])).expect("read")).expect("parse");
    assert_eq!((reason.cause, reason.reason.as_str()), (DeadCause::Rejected, "illegal in state Converged"));

    let q = open_real(tmp.path());
    assert_eq!(q.pending().iter().map(|e| e.qseq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(q.pending()[0].event, event(3, "c"));
    assert_eq!(q.acked_len(), 1);
    assert_eq!(q.last_seq(&r), 3, "the rejected seq 2 and acked seq 1 still count");
    assert_eq!(q.next_qseq(), 4);
}

/// Two rollouts with identical seqs interleave in enqueue order and hide
/// nothing (keyed by seq alone, one of each pair would be lost).
#[test]
fn two_rollouts_with_equal_seqs_keep_enqueue_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ra, rb) = (rollout("stable@r1"), rollout("canary@r9"));
    let mut q = open_real(tmp.path());
    let mut expected = Vec::new();
    for i in 0..4 {
        for r in [&ra, &rb] {
            let queued = enqueue_next(&mut q, r, &format!("{i}")).expect("enqueue");
            expected.push((r.clone(), queued.seq));
        }
    }
    drop(q);
    let q = open_real(tmp.path());
    let got: Vec<_> = q.pending().iter().map(|e| (e.rollout_id.clone(), e.seq())).collect();
    assert_eq!(got, expected);
    assert_eq!((q.last_seq(&ra), q.last_seq(&rb)), (4, 4));
}

/// A second agent on the same state dir is refused with the lock file named.
#[test]
fn a_second_open_is_refused_naming_the_lock_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _first = open_real(tmp.path());
    let err = Queue::open(tmp.path(), host(), QueueConfig::default(), clock()).expect_err("locked");
    let text = err.to_string();
    assert!(text.contains("queue.lock") && text.contains("another process"), "{text}");
}

/// seq must be exactly the next one: no reuse, no skip.
#[test]
fn enqueue_refuses_a_reused_or_skipped_seq() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = rollout("stable@r1");
    let mut q = open_real(tmp.path());
    enqueue_next(&mut q, &r, "a").expect("enqueue");
    for bad in [1, 3] {
        let err = q.enqueue(&r, &event(bad, "x")).expect_err("out of order");
        assert!(matches!(err, QueueError::SeqOutOfOrder { expected: 2, .. }), "{err}");
    }
    assert_eq!(q.pending_len(), 1);
}

fn decisive(seq: u64) -> OutboundEvent {
    OutboundEvent {
        seq,
        body: WireEventBody::ActivationFailed {
            exit_code: 1,
            stderr_tail: format!("e{seq}"),
            failed_at: datetime!(2026-11-25 12:00 UTC),
        },
    }
}

/// At the soft cap a visibility event is refused with its own error and
/// nothing is written, while decisive events still use the reserve up to
/// the hard limit; acking below the soft cap lets visibility events in.
#[test]
fn the_soft_cap_refuses_visibility_events_and_the_reserve_keeps_room_for_decisive_ones() {
    let storage = SimStorage::default();
    let config = QueueConfig { pending_soft_max_count: 2, pending_max_count: 4, ..QueueConfig::default() };
    let mut q = sim_open(&storage, config).expect("open");
    let r = rollout("stable@r1");
    enqueue_next(&mut q, &r, "a").expect("1");
    enqueue_next(&mut q, &r, "b").expect("2");
    let before = storage.fs().n_ops();
    let err = enqueue_next(&mut q, &r, "c").expect_err("visibility at the soft cap");
    assert!(matches!(err, QueueError::SoftCapReached { kind: "ActivationStarted", pending: 2, soft_max: 2 }), "{err}");
    assert_eq!(storage.fs().n_ops(), before, "nothing written");
    assert_eq!(q.next_seq(&r), 3, "the seq is not spent");
    q.enqueue(&r, &decisive(3)).expect("decisive events use the reserve");
    q.enqueue(&r, &decisive(4)).expect("up to the hard limit");
    assert!(matches!(q.enqueue(&r, &decisive(5)), Err(QueueError::Full { pending: 4, max: 4 })));
    q.ack(1).expect("ack");
    q.ack(2).expect("ack");
    q.ack(3).expect("ack");
    enqueue_next(&mut q, &r, "d").expect("below the soft cap again");
    assert!(is_visibility(&event(1, "x")) && !is_visibility(&decisive(1)));
}

/// history_from gives the acked events and dead letters of a rollout from
/// a seq on, up to its first pending event; revive moves a dead letter to
/// acked/ with a note, and a reopen sees the same.
#[test]
fn history_spans_acked_and_dead_and_revive_brings_a_dead_letter_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, other) = (rollout("stable@r1"), rollout("canary@r1"));
    let mut q = open_real(tmp.path());
    for tag in ["a", "b", "c", "d"] {
        enqueue_next(&mut q, &r, tag).expect("enqueue");
    }
    enqueue_next(&mut q, &other, "x").expect("enqueue");
    q.ack(1).expect("ack");
    q.reject(2, "illegal then").expect("reject");
    q.ack(3).expect("ack");
    let seqs = |h: Vec<HistoryEvent>| h.into_iter().map(|h| (h.queued.seq(), h.dead)).collect::<Vec<_>>();
    assert_eq!(seqs(q.history_from(&r, 1)), vec![(1, false), (2, true), (3, false)]);
    assert_eq!(seqs(q.history_from(&r, 2)), vec![(2, true), (3, false)]);
    assert_eq!(q.first_pending_seq(&r), Some(4));
    assert!(q.history_from(&other, 1).is_empty(), "pending only");
    assert!(matches!(q.revive(4), Err(QueueError::NotDead { qseq: 4 })));
    q.revive(2).expect("revive");
    q.revive(2).expect("reviving twice is fine");
    assert_eq!(seqs(q.history_from(&r, 1)), vec![(1, false), (2, false), (3, false)]);
    drop(q);
    let root = tmp.path().join(QUEUE_DIR);
    let name2 = record::file_name(2, "web-1", r.as_str(), "ActivationStarted");
    assert!(root.join(ACKED_DIR).join(&name2).exists());
    assert!(!root.join(DEAD_DIR).join(&name2).exists());
    assert!(!root.join(DEAD_DIR).join(format!("{name2}.reason")).exists(), "the old reason moved into the note");
    let note = std::fs::read(root.join(ACKED_DIR).join(format!("{name2}.revived"))).expect("note");
    assert_eq!(RevivedNote::decode(&note).expect("parse").was_dead.reason, "illegal then");
    let q = open_real(tmp.path());
    assert!(q.recovery_report().moved_to_dead.is_empty());
    assert_eq!(q.acked().iter().map(|e| e.qseq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(q.dead_history().is_empty());
    let view = QueueView::open(tmp.path()).expect("view");
    let acked = view.list(&[EntryState::Acked]).expect("list");
    assert_eq!(acked.len(), 3, "the note is not an event");
    assert!(acked[1].revived.as_ref().is_some_and(|n| n.was_dead.reason == "illegal then"), "{acked:?}");
}

/// A rollout with a dead letter is never pruned, before or after a reopen:
/// the restart rebuild replays its rejected events with the rest, so
/// pruning only the acked ones would leave a hole in its history.
#[test]
fn retention_keeps_rollouts_with_dead_letters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = QueueConfig { acked_max_count: 0, acked_max_age: Duration::ZERO, ..QueueConfig::default() };
    let open = || Queue::open(tmp.path(), host(), config.clone(), clock()).expect("open");
    let (rejected, plain, new) = (rollout("s@rejected"), rollout("s@plain"), rollout("s@new"));
    let mut q = open();
    let first = enqueue_next(&mut q, &rejected, "x").expect("enqueue");
    q.reject(first.qseq, "illegal").expect("reject");
    for r in [&rejected, &plain, &plain, &new] {
        let queued = enqueue_next(&mut q, r, "x").expect("enqueue");
        q.ack(queued.qseq).expect("ack");
    }
    assert_eq!(q.prune_acked().expect("prune"), 2, "only plain goes");
    drop(q);
    let mut q = open();
    assert_eq!(q.prune_acked().expect("prune"), 0, "the reopened queue still knows the dead letter");
    let kept: BTreeSet<RolloutId> = q.acked().into_iter().map(|e| e.rollout_id).collect();
    assert_eq!(kept, BTreeSet::from([rejected, new]));
}

/// Retention prunes whole old rollouts past count or age, keeps the
/// newest rollout and rollouts with pending events, and the high-water
/// mark keeps pruned numbers from coming back after a restart.
#[test]
fn retention_keeps_what_it_must_and_numbers_never_come_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let config = QueueConfig { acked_max_count: 3, acked_max_age: Duration::days(30), ..QueueConfig::default() };
    let open = || Queue::open(tmp.path(), host(), config.clone(), clock.clone()).expect("open");
    let (old, mid, busy, new) = (rollout("s@old"), rollout("s@mid"), rollout("s@busy"), rollout("s@new"));
    let mut q = open();
    for r in [&old, &old, &mid, &mid, &busy, &busy, &new, &new] {
        let queued = enqueue_next(&mut q, r, "x").expect("enqueue");
        if !(r == &busy && queued.seq == 2) {
            q.ack(queued.qseq).expect("ack");
        }
    }
    // 7 acked; over the count of 3. `old` (2) then `mid` (2) go; `busy`
    // has a pending event and `new` is the newest rollout.
    assert_eq!(q.prune_acked().expect("prune"), 4);
    let kept: BTreeSet<RolloutId> = q.acked().into_iter().map(|e| e.rollout_id).collect();
    assert_eq!(kept, BTreeSet::from([busy.clone(), new.clone()]));
    assert_eq!(q.prune_acked().expect("prune"), 0, "busy and new are protected");

    // Age: once busy is drained and 31 days pass, it goes too; new stays.
    let pending_busy = q.pending()[0].qseq;
    q.ack(pending_busy).expect("ack");
    clock.advance(Duration::days(31));
    assert_eq!(q.prune_acked().expect("prune"), 2);
    assert_eq!(q.acked().iter().map(|e| e.rollout_id.clone()).collect::<BTreeSet<_>>(), BTreeSet::from([new.clone()]));
    let next_qseq = q.next_qseq();
    drop(q);

    let mut q = open();
    assert_eq!(q.next_qseq(), next_qseq, "pruned qseqs are not reused");
    assert_eq!((q.last_seq(&old), q.last_seq(&mid), q.last_seq(&busy)), (2, 2, 2), "pruned seqs are not reused");
    assert_eq!(enqueue_next(&mut q, &old, "again").expect("enqueue").seq, 3);
    assert!(q.dir().join(HIGH_WATER_FILE).exists());
}

/// Replay-From returns exactly the events of one rollout with seq > N,
/// from pending and acked together, in seq order.
#[test]
fn events_after_spans_pending_and_acked_in_seq_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ra, rb) = (rollout("stable@a"), rollout("stable@b"));
    let mut q = open_real(tmp.path());
    for i in 0..5 {
        let a = enqueue_next(&mut q, &ra, &format!("{i}")).expect("enqueue");
        enqueue_next(&mut q, &rb, &format!("{i}")).expect("enqueue");
        if i % 2 == 0 {
            q.ack(a.qseq).expect("ack");
        }
    }
    let seqs = |after| q.events_after(&ra, after).iter().map(|e| e.seq()).collect::<Vec<_>>();
    assert_eq!(seqs(0), vec![1, 2, 3, 4, 5]);
    assert_eq!(seqs(2), vec![3, 4, 5]);
    assert_eq!(seqs(5), Vec::<u64>::new());
    assert!(q.events_after(&ra, 0).iter().all(|e| e.rollout_id == ra));
}

/// The read-only view lists a queue that an agent is draining and
/// pruning at the same time without an error, a lost or a doubled event.
#[test]
fn the_view_tolerates_files_moving_while_it_lists() {
    const N_EVENTS: usize = 200;
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = QueueConfig { acked_max_count: 0, acked_max_age: Duration::ZERO, ..QueueConfig::default() };
    let mut q = Queue::open(tmp.path(), host(), config, clock()).expect("open");
    for i in 0..N_EVENTS {
        // A rollout per 10 events, so pruning removes files as we go.
        let r = rollout(&format!("stable@r{}", i / 10));
        enqueue_next(&mut q, &r, "x").expect("enqueue");
    }
    let view = QueueView::open(tmp.path()).expect("view");
    let all = [EntryState::Pending, EntryState::Acked, EntryState::Dead];
    let agent = std::thread::spawn(move || {
        for queued in q.pending() {
            if queued.qseq % 7 == 0 {
                q.reject(queued.qseq, "no").expect("reject");
            } else {
                q.ack(queued.qseq).expect("ack");
            }
            q.prune_acked().expect("prune");
        }
    });
    let mut n_lists = 0;
    while !agent.is_finished() || n_lists == 0 {
        let entries = view.list(&all).expect("listing never fails while files move");
        let qseqs: Vec<u64> = entries.iter().filter_map(|e| e.qseq).collect();
        assert!(qseqs.windows(2).all(|w| w[0] < w[1]), "no event listed twice, in qseq order");
        assert!(entries.iter().all(|e| e.header.is_some()), "no healthy event shown as unreadable");
        n_lists += 1;
    }
    agent.join().expect("agent thread");
    assert!(n_lists > 0);
}
