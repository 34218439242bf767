//! Queue tests: behaviour on the real file system, injected faults at
//! every step through the storage seam, and exhaustive crash-state
//! enumeration of small workloads plus seeded random longer ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use time::macros::datetime;
use time::Duration;

use super::record::{self, DeadReason};
use super::sim::{SimFs, SimStorage, EIO, ENOSPC};
use super::storage::{self, MAX_QUEUE_FILE_BYTES};
use super::*;
use crate::wire::WireEventBody;

fn host() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}

fn rollout(name: &str) -> RolloutId {
    RolloutId::parse(name).expect("valid")
}

fn clock() -> ClockHandle {
    ClockHandle::manual(datetime!(2026-11-25 12:00 UTC))
}

/// A small event whose content depends on seq and a tag, so two events are
/// never equal by accident.
fn event(seq: u64, tag: &str) -> OutboundEvent {
    OutboundEvent {
        seq,
        body: WireEventBody::ActivationStarted {
            started_at: datetime!(2026-11-25 12:00 UTC) + Duration::seconds(seq as i64),
            switch_method: format!("switch-{tag}"),
        },
    }
}

fn open_real(dir: &Path) -> Queue {
    Queue::open(dir, host(), QueueConfig::default(), clock()).expect("open")
}

fn enqueue_next(q: &mut Queue, r: &RolloutId, tag: &str) -> Result<QueuedRef, QueueError> {
    let seq = q.next_seq(r);
    q.enqueue(r, &event(seq, tag))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------- records

/// A record survives encode/decode, and any changed byte is caught.
#[test]
fn record_round_trips_and_every_flipped_byte_is_detected() {
    let queued = QueuedEvent {
        qseq: 7,
        hostname: host(),
        rollout_id: rollout("stable@r1"),
        created_at: datetime!(2026-11-25 12:00:00.5 UTC),
        event: event(3, "a"),
    };
    let bytes = record::encode(&queued);
    assert_eq!(record::decode(&bytes).expect("decodes"), queued);
    for i in 0..bytes.len() - 1 {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(record::decode(&bad).is_err(), "flipping byte {i} ({:?}) went unnoticed", bytes[i] as char);
    }
    assert!(record::decode(&bytes[..bytes.len() / 2]).is_err());
}

/// File names sanitise odd characters and stay under NAME_MAX with every
/// suffix the queue adds.
#[test]
fn file_names_are_sanitised_ordered_and_short_enough() {
    let name = record::file_name(42, "web-1", "stable@r/1 x", "Kind");
    assert_eq!(name, "00000000000000000042-web-1-stable@r_1_x-Kind.json");
    assert_eq!(record::qseq_of_name(&name), Some(42));
    let longest = record::file_name(
        u64::MAX,
        &"h".repeat(63),
        &format!("{}@{}", "c".repeat(64), "r".repeat(128)),
        "ProbeTopologyDeclared",
    );
    for suffix in [record::REASON_SUFFIX, record::REVIVED_SUFFIX] {
        assert!(longest.len() + suffix.len() + record::TMP_SUFFIX.len() <= 255, "{} {suffix}", longest.len());
    }
    assert!(record::file_name(9, "a", "b@c", "K") < record::file_name(10, "a", "b@c", "K"));
    assert_eq!(record::qseq_of_name("123-x.json"), None);
}

// ---------------------------------------------------- real file system

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

/// Corrupt, truncated and checksum-mismatched files and stale tmps are
/// cleaned at open, the bad ones kept in dead/ with the reason, and the
/// good events still drain in order.
#[test]
fn corrupt_files_go_to_dead_with_the_reason_and_the_rest_drains() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = rollout("stable@r1");
    let mut q = open_real(tmp.path());
    let refs: Vec<QueuedRef> = (0..5).map(|i| enqueue_next(&mut q, &r, &format!("{i}")).expect("enqueue")).collect();
    drop(q);
    let truncate = &refs[1].path;
    let bytes = std::fs::read(truncate).expect("read");
    std::fs::write(truncate, &bytes[..bytes.len() / 3]).expect("truncate");
    let edited =
        String::from_utf8(std::fs::read(&refs[2].path).expect("read")).expect("utf8").replace("switch-2", "switch-X");
    std::fs::write(&refs[2].path, edited).expect("edit");
    std::fs::write(&refs[3].path, b"\0\0\0\0").expect("garbage");
    let stale_tmp = tmp.path().join("outbound-queue/00000000000000000006-web-1-stable@r1-ActivationStarted.json.tmp");
    std::fs::write(&stale_tmp, b"{\"half").expect("tmp");

    let mut q = open_real(tmp.path());
    let report = q.recovery_report().clone();
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(report.moved_to_dead.len(), 3, "{:?}", report.moved_to_dead);
    assert!(
        report.moved_to_dead.iter().any(|(_, why)| why.contains("checksum mismatch")),
        "{:?}",
        report.moved_to_dead
    );
    assert!(!stale_tmp.exists());
    assert_eq!(q.pending().iter().map(|e| e.qseq).collect::<Vec<_>>(), vec![1, 5]);
    assert_eq!(q.next_qseq(), 6, "continues after the highest event (a tmp was never an event)");
    for queued in q.pending() {
        q.ack(queued.qseq).expect("drains");
    }
    let dead = tmp.path().join("outbound-queue/dead");
    for r in &refs[1..4] {
        let name = r.path.file_name().expect("name").to_str().expect("utf8");
        let reason = std::fs::read(dead.join(format!("{name}.reason"))).expect("sidecar");
        assert_eq!(DeadReason::decode(&reason).expect("parse").cause, DeadCause::Corrupt);
    }
}

/// A garbage file beyond the queue's file bound (sparse, 300 MB) is moved
/// to dead/ at start without being read into memory; the rest opens.
/// `read_regular` refuses a symlink and a FIFO (which would block a plain
/// open) as well.
#[test]
fn an_oversized_file_goes_to_dead_unread_and_links_and_fifos_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = rollout("stable@r1");
    let mut q = open_real(tmp.path());
    enqueue_next(&mut q, &r, "a").expect("enqueue");
    drop(q);
    let big = tmp.path().join("outbound-queue/00000000000000000002-web-1-stable@r1-ActivationStarted.json");
    std::fs::File::create(&big).expect("create").set_len(300 * 1024 * 1024).expect("sparse");
    let q = open_real(tmp.path());
    let moved = &q.recovery_report().moved_to_dead;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(moved[0].1.contains("larger than 1048576 bytes"), "{moved:?}");
    assert_eq!(q.pending().len(), 1);
    drop(q);

    let target = tmp.path().join("target");
    std::fs::write(&target, b"x").expect("target");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let err = storage::read_regular(&link, MAX_QUEUE_FILE_BYTES).expect_err("a link is refused");
    assert_eq!(storage::unsafe_file(&err), Some(&storage::UnsafeFile::Symlink), "{err}");
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let err = storage::read_regular(&fifo, MAX_QUEUE_FILE_BYTES).expect_err("a fifo is refused");
    assert!(matches!(storage::unsafe_file(&err), Some(storage::UnsafeFile::NotRegular(_))), "{err}");
    assert_eq!(storage::read_regular(&target, 1).expect("regular"), b"x");
    let err = storage::read_regular(&target, 0).expect_err("over the bound");
    assert_eq!(storage::unsafe_file(&err), Some(&storage::UnsafeFile::TooLarge { max: 0 }));
}

/// A file named with a qseq beyond MAX_QSEQ (u64::MAX: corrupt, or a
/// valid record whose qseq is that large) goes to dead/ with the reason and
/// never numbers the queue: pending events stay, qseqs continue after the
/// real ones, also at the next open (it used to wrap to 0).
#[test]
fn a_qseq_beyond_the_bound_is_dead_and_never_used_for_numbering() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (r, other) = (rollout("stable@r1"), rollout("canary@r1"));
    let mut q = open_real(tmp.path());
    enqueue_next(&mut q, &r, "a").expect("enqueue");
    enqueue_next(&mut q, &r, "b").expect("enqueue");
    drop(q);
    let root = tmp.path().join(QUEUE_DIR);
    let garbage = record::file_name(u64::MAX, "web-1", r.as_str(), "ActivationStarted");
    std::fs::write(root.join(&garbage), b"not json").expect("write");
    let huge = QueuedEvent {
        qseq: u64::MAX - 1,
        hostname: host(),
        rollout_id: other.clone(),
        created_at: datetime!(2026-11-25 12:00 UTC),
        event: event(1, "huge"),
    };
    std::fs::write(root.join(ACKED_DIR).join(huge.file_name()), record::encode(&huge)).expect("write");

    let mut q = open_real(tmp.path());
    let moved = &q.recovery_report().moved_to_dead;
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved.iter().any(|(n, why)| n == &huge.file_name() && why.contains("beyond")), "{moved:?}");
    assert_eq!(q.pending().iter().map(|e| e.seq()).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(q.next_qseq(), 3);
    assert_eq!(enqueue_next(&mut q, &r, "c").expect("enqueue").qseq, 3);
    drop(q);
    let q = open_real(tmp.path());
    assert_eq!(q.pending().iter().map(|e| e.seq()).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(q.next_qseq(), 4, "names in dead/ beyond the bound do not number either");
}

/// A high-water mark beyond the bounds (qseq or a rollout's seq) is
/// refused like a corrupt one, naming the file.
#[test]
fn a_high_water_mark_beyond_the_bounds_is_refused() {
    for (qseq, seq) in [(u64::MAX, 1), (5, u64::MAX)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        drop(open_real(tmp.path()));
        let hw = HighWater { qseq, seqs: BTreeMap::from([(rollout("stable@r1"), seq)]) };
        std::fs::write(tmp.path().join(QUEUE_DIR).join(HIGH_WATER_FILE), hw.encode()).expect("write");
        let err = Queue::open(tmp.path(), host(), QueueConfig::default(), clock()).expect_err("refused");
        let expected = if qseq == u64::MAX {
            HighWaterError::QseqBeyondBound(qseq)
        } else {
            HighWaterError::SeqBeyondBound { rollout_id: rollout("stable@r1"), seq }
        };
        assert!(matches!(&err, QueueError::HighWaterCorrupt { source, .. } if *source == expected), "{err}");
        assert!(err.to_string().contains("beyond"), "{err}");
    }
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

/// A fault at any step of revive reaches the caller; the event is then in
/// dead/ with its reason or in acked/, never lost, and the retry completes.
#[test]
fn revive_faults_at_every_step_keep_the_event_and_the_retry_completes() {
    let r = rollout("stable@r1");
    let setup = |q: &mut Queue| {
        enqueue_next(q, &r, "a").expect("setup");
        q.reject(1, "nope").expect("setup");
    };
    let n_steps = for_each_fault(
        setup,
        |q| q.revive(1),
        |q, storage, err, context| {
            assert!(matches!(err, QueueError::Io { .. }), "{context}");
            let total = disk_events(storage, ACKED_DIR).len() + disk_events(storage, DEAD_DIR).len();
            assert_eq!(total, 1, "the event is in exactly one folder: {context}");
            q.revive(1).expect("the retry completes");
            assert_eq!(disk_events(storage, ACKED_DIR).len(), 1, "{context}");
            let reopened = sim_open(storage, QueueConfig::default()).expect("reopen");
            assert_eq!(reopened.acked_len(), 1, "{context}");
            assert!(reopened.dead_history().is_empty(), "{context}");
        },
    );
    // note: write, fsync, rename, fsync acked/; the event's rename, fsync
    // acked/; the old reason's removal, fsync dead/.
    assert_eq!(n_steps, 8);
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

/// Should a move leave its source name behind, the copy in pending is
/// dropped at open: the event was acked (or rejected) and is not re-sent.
#[test]
fn a_pending_copy_of_an_acked_or_dead_event_is_dropped_at_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = rollout("stable@r1");
    let mut q = open_real(tmp.path());
    let acked = enqueue_next(&mut q, &r, "a").expect("enqueue");
    let dead = enqueue_next(&mut q, &r, "b").expect("enqueue");
    let kept = enqueue_next(&mut q, &r, "c").expect("enqueue");
    q.ack(acked.qseq).expect("ack");
    q.reject(dead.qseq, "no").expect("reject");
    drop(q);
    let root = tmp.path().join(QUEUE_DIR);
    for (folder, r) in [(ACKED_DIR, &acked), (DEAD_DIR, &dead)] {
        let name = r.path.file_name().expect("name");
        std::fs::copy(root.join(folder).join(name), &r.path).expect("resurrect the source name");
    }
    let q = open_real(tmp.path());
    assert_eq!(q.pending().iter().map(|e| e.qseq).collect::<Vec<_>>(), vec![kept.qseq]);
    assert!(!acked.path.exists() && !dead.path.exists());
    assert_eq!(q.acked_len(), 1);
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

/// A damaged high-water mark stops the agent with the file named rather
/// than risking reused numbers.
#[test]
fn a_corrupt_high_water_mark_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    drop(open_real(tmp.path()));
    let path = tmp.path().join(QUEUE_DIR).join(HIGH_WATER_FILE);
    std::fs::write(&path, b"{\"format\":1").expect("write");
    let err = Queue::open(tmp.path(), host(), QueueConfig::default(), clock()).expect_err("refused");
    assert!(err.to_string().contains("high-water.json"), "{err}");
}

/// An event of another host (a copied state dir) is not sent as ours.
#[test]
fn an_event_of_another_host_goes_to_dead() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let other = Hostname::parse("db-1").expect("valid");
    let r = rollout("stable@r1");
    let mut q = Queue::open(tmp.path(), other, QueueConfig::default(), clock()).expect("open");
    q.enqueue(&r, &event(1, "x")).expect("enqueue");
    drop(q);
    let q = open_real(tmp.path());
    assert_eq!(q.pending_len(), 0);
    assert!(q.recovery_report().moved_to_dead[0].1.contains("belongs to host db-1"));
}

// ------------------------------------------------------ injected faults

const ROOT: &str = "/state";

fn sim_open(storage: &SimStorage, config: QueueConfig) -> Result<Queue, QueueError> {
    Queue::open_with_storage(Box::new(storage.clone()), Path::new(ROOT), host(), config, clock())
}

/// Opens on an empty simulated disk, returning the queue and its storage.
fn sim_queue() -> (Queue, SimStorage) {
    let storage = SimStorage::default();
    let q = sim_open(&storage, QueueConfig::default()).expect("open");
    (q, storage)
}

/// Runs `action` once cleanly to count its mutating steps, then once per
/// step with that step failing with each errno, on a fresh queue prepared
/// by `setup`; `check` judges the queue after each failure.
fn for_each_fault(
    setup: impl Fn(&mut Queue),
    action: impl Fn(&mut Queue) -> Result<(), QueueError>,
    check: impl Fn(&mut Queue, &SimStorage, &QueueError, &str),
) -> usize {
    let (mut q, storage) = sim_queue();
    setup(&mut q);
    let before = storage.fs().n_ops();
    action(&mut q).expect("clean run");
    let n_steps = storage.fs().n_ops() - before;
    for step in 0..n_steps {
        for errno in [ENOSPC, EIO] {
            let (mut q, storage) = sim_queue();
            setup(&mut q);
            let at = storage.fs().n_ops() + step;
            storage.fs().fail_at(at, errno);
            let err = action(&mut q).expect_err("the injected fault must reach the caller");
            let failed_op = storage.fs().log[at].op;
            let context = format!("step {step} ({failed_op}) errno {errno}: {err}");
            check(&mut q, &storage, &err, &context);
        }
    }
    n_steps
}

fn disk_events(storage: &SimStorage, folder: &str) -> Vec<QueuedEvent> {
    let dir = PathBuf::from(ROOT).join(QUEUE_DIR).join(folder);
    let fs = storage.fs();
    fs.paths()
        .iter()
        .filter(|p| {
            p.parent() == Some(dir.as_path())
                && record::is_event_name(p.file_name().and_then(|n| n.to_str()).unwrap_or(""))
        })
        .map(|p| record::decode(fs.file(p).expect("exists")).expect("an event file on disk is always whole"))
        .collect()
}

/// A fault at any step of enqueue (ENOSPC, EIO, a failing fsync) reaches
/// the caller, leaves no event and no tmp behind, and the retry writes the
/// whole event again rather than trusting a second fsync.
#[test]
fn enqueue_faults_at_every_step_reach_the_caller_and_the_retry_rewrites() {
    let r = rollout("stable@r1");
    let n_steps = for_each_fault(
        |q| {
            enqueue_next(q, &r, "first").expect("setup");
        },
        |q| enqueue_next(q, &r, "second").map(|_| ()),
        |q, storage, err, context| {
            assert!(matches!(err, QueueError::Io { .. }), "{context}");
            assert!(err.to_string().contains("/state/outbound-queue"), "the error names the path: {context}");
            let on_disk = disk_events(storage, "");
            assert_eq!(on_disk.len(), 1, "nothing half-written is visible: {context}");
            assert!(!storage.fs().paths().iter().any(|p| p.to_string_lossy().ends_with(".tmp")), "{context}");
            assert_eq!(q.last_seq(&r), 1, "{context}");
            let before = storage.fs().n_ops();
            let retried = enqueue_next(q, &r, "second").expect("the retry succeeds");
            assert_eq!(retried.seq, 2);
            let fs = storage.fs();
            let retry_ops: Vec<&str> = fs.log[before..].iter().map(|o| o.op).collect();
            assert_eq!(retry_ops, ["write_file", "fsync_file", "rename", "fsync_dir"], "{context}");
            drop(fs);
            let reopened = sim_open(storage, QueueConfig::default()).expect("reopen");
            let seqs: Vec<u64> = reopened.pending().iter().map(|e| e.seq()).collect();
            assert_eq!(seqs, vec![1, 2], "{context}");
        },
    );
    assert_eq!(n_steps, 4, "write, fsync, rename, fsync dir");
}

/// A fault at any step of ack or reject reaches the caller; the event is
/// then pending or moved, never lost, and the retry completes.
#[test]
fn ack_and_reject_faults_at_every_step_keep_the_event_and_the_retry_completes() {
    let r = rollout("stable@r1");
    let setup = |q: &mut Queue| {
        enqueue_next(q, &r, "a").expect("setup");
    };
    for reject in [false, true] {
        let act = |q: &mut Queue| if reject { q.reject(1, "nope") } else { q.ack(1) };
        let n_steps = for_each_fault(setup, act, |q, storage, err, context| {
            assert!(matches!(err, QueueError::Io { .. }), "{context}");
            let total = disk_events(storage, "").len()
                + disk_events(storage, ACKED_DIR).len()
                + disk_events(storage, DEAD_DIR).len();
            assert_eq!(total, 1, "the event is in exactly one folder: {context}");
            act(q).expect("the retry completes");
            let folder = if reject { DEAD_DIR } else { ACKED_DIR };
            assert_eq!(disk_events(storage, folder).len(), 1, "{context}");
            let reopened = sim_open(storage, QueueConfig::default()).expect("reopen");
            assert_eq!(reopened.pending_len(), 0, "{context}");
        });
        // ack: rename, fsync acked/; reject: sidecar write, fsync, rename,
        // fsync dead/, then the event's rename, fsync dead/.
        assert_eq!(n_steps, if reject { 6 } else { 2 });
    }
}

/// When a failed write cannot even be undone, the queue stops answering
/// (rather than guessing what is on disk) until it is reopened, and the
/// reopened queue reports the truth from disk.
#[test]
fn an_undo_that_fails_poisons_the_queue_until_reopened() {
    let r = rollout("stable@r1");
    let (mut q, storage) = sim_queue();
    let start = storage.fs().n_ops();
    // write, fsync, rename succeed; the directory fsync fails, and so does
    // the removal that would undo the visible file.
    storage.fs().fail_at(start + 3, EIO);
    storage.fs().fail_at(start + 4, EIO);
    let err = enqueue_next(&mut q, &r, "a").expect_err("fsync dir fails");
    assert!(err.to_string().starts_with("fsync directory /state/outbound-queue"), "{err}");
    assert!(matches!(enqueue_next(&mut q, &r, "b"), Err(QueueError::Poisoned(_))));
    assert!(matches!(q.ack(1), Err(QueueError::Poisoned(_))));
    let reopened = sim_open(&storage, QueueConfig::default()).expect("reopen");
    assert_eq!(reopened.pending().iter().map(|e| e.seq()).collect::<Vec<_>>(), vec![1]);
    assert_eq!(reopened.next_seq(&r), 2);
}

/// At the pending limit enqueue fails with Full and writes nothing.
#[test]
fn enqueue_at_the_pending_limit_fails_and_writes_nothing() {
    let storage = SimStorage::default();
    let mut q = sim_open(&storage, QueueConfig { pending_max_count: 2, ..QueueConfig::default() }).expect("open");
    let r = rollout("stable@r1");
    enqueue_next(&mut q, &r, "a").expect("1");
    enqueue_next(&mut q, &r, "b").expect("2");
    let before = storage.fs().n_ops();
    assert!(matches!(enqueue_next(&mut q, &r, "c"), Err(QueueError::Full { pending: 2, max: 2 })));
    assert_eq!(storage.fs().n_ops(), before);
    q.ack(1).expect("ack");
    enqueue_next(&mut q, &r, "c").expect("room again");
}

// ------------------------------------------------ crash-state enumeration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Enqueue(usize),
    Ack,
    Reject,
    Restart,
    Prune,
    /// Revive the oldest dead letter (a re-send after a gap got it applied).
    Revive,
}

const STEPS: [Step; 7] =
    [Step::Enqueue(0), Step::Enqueue(1), Step::Ack, Step::Reject, Step::Restart, Step::Prune, Step::Revive];

/// What the workload was told, to judge every crash state against.
#[derive(Debug, Default)]
struct Expect {
    /// Every enqueue attempt by qseq, successful or not.
    attempted: BTreeMap<u64, (RolloutId, OutboundEvent)>,
    enqueued_ok: BTreeSet<u64>,
    /// Acks and rejects called (a crash may cut them short).
    settle_attempted: BTreeSet<u64>,
    acked_ok: BTreeSet<u64>,
    rejected_ok: BTreeSet<u64>,
    /// Revives called (a crash may cut them short) and those that returned Ok.
    revive_attempted: BTreeSet<u64>,
    revived_ok: BTreeSet<u64>,
    pruned_ok: BTreeSet<u64>,
    /// What a prune that a crash cut short may have removed.
    prune_planned: BTreeSet<u64>,
    max_seq_ok: BTreeMap<RolloutId, u64>,
}

fn prune_everything() -> QueueConfig {
    QueueConfig { acked_max_count: 0, acked_max_age: Duration::ZERO, ..QueueConfig::default() }
}

/// Runs a workload, the disk crashing at mutating call `crash_at` (or
/// never). Returns what the caller was told.
fn run_workload(steps: &[Step], storage: &SimStorage, crash_at: Option<usize>) -> Expect {
    let rollouts = [rollout("stable@r1"), rollout("canary@r1")];
    if let Some(at) = crash_at {
        storage.fs().crash_at(at);
    }
    let mut expect = Expect::default();
    let Ok(mut q) = sim_open(storage, prune_everything()) else { return expect };
    for (idx, step) in steps.iter().enumerate() {
        match *step {
            Step::Enqueue(r) => {
                let r = &rollouts[r];
                let ev = event(q.next_seq(r), &format!("step{idx}"));
                expect.attempted.insert(q.next_qseq(), (r.clone(), ev.clone()));
                if let Ok(queued) = q.enqueue(r, &ev) {
                    expect.enqueued_ok.insert(queued.qseq);
                    expect.max_seq_ok.insert(r.clone(), queued.seq);
                }
            }
            Step::Ack => {
                if let Some(head) = q.pending().first() {
                    expect.settle_attempted.insert(head.qseq);
                    if q.ack(head.qseq).is_ok() {
                        expect.acked_ok.insert(head.qseq);
                    }
                }
            }
            Step::Reject => {
                if let Some(head) = q.pending().first() {
                    expect.settle_attempted.insert(head.qseq);
                    if q.reject(head.qseq, "rejected by test").is_ok() {
                        expect.rejected_ok.insert(head.qseq);
                    }
                }
            }
            Step::Restart => {
                drop(q);
                match sim_open(storage, prune_everything()) {
                    Ok(reopened) => q = reopened,
                    Err(_) => return expect,
                }
            }
            Step::Revive => {
                if let Some((qseq, _, _)) = q.dead_history().first().cloned() {
                    expect.revive_attempted.insert(qseq);
                    if q.revive(qseq).is_ok() {
                        expect.revived_ok.insert(qseq);
                    }
                }
            }
            Step::Prune => {
                let before: BTreeSet<u64> = q.acked().iter().map(|e| e.qseq).collect();
                expect.prune_planned.extend(q.prune_plan());
                if q.prune_acked().is_ok() {
                    let after: BTreeSet<u64> = q.acked().iter().map(|e| e.qseq).collect();
                    expect.pruned_ok.extend(before.difference(&after));
                }
            }
        }
    }
    expect
}

/// Recovers one crash state and checks every invariant of the queue.
fn check_crash_state(state: SimFs, expect: &Expect, context: &dyn Fn() -> String) {
    let storage = SimStorage::new(state);
    let q = sim_open(&storage, prune_everything()).unwrap_or_else(|e| panic!("recovery failed: {e}\n{}", context()));
    let pending: BTreeMap<u64, QueuedEvent> = q.pending().into_iter().map(|e| (e.qseq, e)).collect();
    let acked: BTreeMap<u64, QueuedEvent> = q.acked().into_iter().map(|e| (e.qseq, e)).collect();

    // No torn or foreign event is ever read: each is what was attempted.
    for queued in pending.values().chain(acked.values()) {
        let (r, ev) =
            expect.attempted.get(&queued.qseq).unwrap_or_else(|| panic!("unknown qseq {}\n{}", queued.qseq, context()));
        assert_eq!((&queued.rollout_id, &queued.event), (r, ev), "{}", context());
    }
    assert!(
        q.recovery_report().moved_to_dead.is_empty(),
        "a crash produced an unreadable event: {:?}\n{}",
        q.recovery_report(),
        context()
    );
    // Every Ok enqueue is there; acked/rejected ones are never pending again.
    for qseq in &expect.enqueued_ok {
        if !expect.settle_attempted.contains(qseq) {
            assert!(pending.contains_key(qseq), "enqueue {qseq} returned Ok but is not pending\n{}", context());
        }
        if expect.acked_ok.contains(qseq) {
            assert!(!pending.contains_key(qseq), "acked {qseq} is pending again\n{}", context());
            if !expect.pruned_ok.contains(qseq) && !expect.prune_planned.contains(qseq) {
                assert!(acked.contains_key(qseq), "acked {qseq} vanished\n{}", context());
            }
        }
        if expect.revived_ok.contains(qseq) {
            assert!(!pending.contains_key(qseq), "{}", context());
            if !expect.pruned_ok.contains(qseq) && !expect.prune_planned.contains(qseq) {
                assert!(acked.contains_key(qseq), "revived {qseq} is not acked\n{}", context());
            }
            assert!(!q.dead_history().iter().any(|(d, _, _)| d == qseq), "revived {qseq} still dead\n{}", context());
        } else if expect.rejected_ok.contains(qseq) && expect.revive_attempted.contains(qseq) {
            // Cut short: dead with its reason, or acked; never pending.
            let dead = q.dead_history().iter().any(|(d, _, _)| d == qseq);
            assert!(!pending.contains_key(qseq) && (dead || acked.contains_key(qseq)), "{}", context());
        } else if expect.rejected_ok.contains(qseq) {
            assert!(!pending.contains_key(qseq) && !acked.contains_key(qseq), "{}", context());
            let name = {
                let (r, ev) = &expect.attempted[qseq];
                record::file_name(*qseq, "web-1", r.as_str(), ev.kind())
            };
            let dead = PathBuf::from(ROOT).join(QUEUE_DIR).join(DEAD_DIR);
            assert!(storage.fs().file(&dead.join(&name)).is_some(), "rejected {qseq} not in dead/\n{}", context());
            assert!(storage.fs().file(&dead.join(format!("{name}.reason"))).is_some(), "{}", context());
        }
    }
    // What the agent rebuilds a rollout from (pending, acked, and dead
    // letters with their reason) is its whole history or lacks seq 1 (then
    // it counts as pruned): never a history with a hole after seq 1.
    let dead_dir = PathBuf::from(ROOT).join(QUEUE_DIR).join(DEAD_DIR);
    let mut history: BTreeMap<RolloutId, BTreeSet<u64>> = BTreeMap::new();
    for queued in pending.values().chain(acked.values()) {
        history.entry(queued.rollout_id.clone()).or_default().insert(queued.seq());
    }
    let paths = storage.fs().paths();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
        if path.parent() != Some(dead_dir.as_path()) || !record::is_event_name(&name) {
            continue;
        }
        let has_reason = storage.fs().file(&dead_dir.join(format!("{name}.reason"))).is_some();
        let header = storage.fs().file(&path).and_then(|bytes| record::decode_header(bytes).ok());
        if let (true, Some(header)) = (has_reason, header) {
            history.entry(rollout(&header.rollout_id)).or_default().insert(header.seq);
        }
    }
    for (r, seqs) in &history {
        if seqs.contains(&1) {
            let whole: BTreeSet<u64> = (1..=q.last_seq(r)).collect();
            assert_eq!(seqs, &whole, "the history of {r} has a hole\n{}", context());
        }
    }
    // No reason without its dead event and no revived note without its
    // acked event survive recovery.
    let paths = storage.fs().paths();
    for path in paths {
        let text = path.to_string_lossy().into_owned();
        for suffix in [record::REASON_SUFFIX, record::REVIVED_SUFFIX] {
            if let Some(event) = text.strip_suffix(suffix) {
                assert!(storage.fs().file(Path::new(event)).is_some(), "leftover {text}\n{}", context());
            }
        }
    }
    // No tmp survives recovery.
    assert!(!storage.fs().paths().iter().any(|p| p.to_string_lossy().ends_with(".tmp")), "{}", context());
    // Numbers never come back: above every Ok qseq/seq and every file on disk.
    let max_ok_qseq = expect.enqueued_ok.iter().max().copied().unwrap_or(0);
    let max_disk_qseq =
        storage.fs().paths().iter().filter_map(|p| record::qseq_of_name(p.file_name()?.to_str()?)).max().unwrap_or(0);
    assert!(q.next_qseq() > max_ok_qseq.max(max_disk_qseq), "qseq {} reused\n{}", q.next_qseq(), context());
    for (r, seq) in &expect.max_seq_ok {
        assert!(q.next_seq(r) > *seq, "seq {} of {r} reused\n{}", q.next_seq(r), context());
    }
    // Per rollout, seqs are unique among live events.
    let mut seen = BTreeSet::new();
    for queued in pending.values().chain(acked.values()) {
        assert!(seen.insert((queued.rollout_id.clone(), queued.seq())), "{}", context());
    }
    // Recovery is idempotent and the queue is usable.
    let r = rollout("stable@r1");
    let n_pending = pending.len();
    drop(q);
    let mut q = sim_open(&storage, prune_everything()).expect("second recovery");
    assert_eq!(q.pending_len(), n_pending, "{}", context());
    enqueue_next(&mut q, &r, "after").unwrap_or_else(|e| panic!("enqueue after recovery: {e}\n{}", context()));
}

/// Crashes a workload after each of its mutating calls (or only at
/// `only_at`) and checks every state the crash model allows. Returns the
/// number of states checked.
fn crash_everywhere(steps: &[Step], only_at: Option<usize>) -> usize {
    let clean = SimStorage::default();
    run_workload(steps, &clean, None);
    let n_ops = clean.fs().n_ops();
    let points: Vec<usize> = match only_at {
        Some(at) => vec![at % (n_ops + 1)],
        None => (0..=n_ops).collect(),
    };
    let mut n_states = 0;
    for crash_at in points {
        let storage = SimStorage::default();
        let expect = run_workload(steps, &storage, Some(crash_at));
        let states = storage.fs().crash_states();
        for (idx, state) in states.into_iter().enumerate() {
            n_states += 1;
            let context = || format!("workload {steps:?}, crash at call {crash_at} of {n_ops}, state #{idx}");
            check_crash_state(state, &expect, &context);
        }
    }
    n_states
}

/// False for workloads with a step that cannot do anything (ack with
/// nothing pending, restart twice in a row, prune before any ack): their
/// crash states are those of a shorter workload already enumerated.
fn every_step_acts(steps: &[Step]) -> bool {
    let (mut pending, mut acked, mut dead) = (0, 0, 0);
    for (idx, step) in steps.iter().enumerate() {
        match step {
            Step::Enqueue(_) => pending += 1,
            Step::Ack | Step::Reject if pending == 0 => return false,
            Step::Ack => (pending, acked) = (pending - 1, acked + 1),
            Step::Reject => (pending, dead) = (pending - 1, dead + 1),
            Step::Restart if idx == 0 || steps[idx - 1] == Step::Restart => return false,
            Step::Prune if acked == 0 => return false,
            Step::Revive if dead == 0 => return false,
            Step::Revive => (dead, acked) = (dead - 1, acked + 1),
            Step::Restart | Step::Prune => {}
        }
    }
    true
}

/// Every workload of up to 4 steps (enqueue on two rollouts with equal
/// seqs, ack, reject, restart, prune), crashed after every mutating call,
/// in every state the conservative crash model allows, recovers with
/// nothing lost, nothing torn, no number reused and no acked event
/// pending again.
#[test]
fn every_crash_state_of_every_small_workload_recovers() {
    let mut workloads = Vec::new();
    for a in STEPS {
        for b in STEPS {
            for c in STEPS {
                for d in STEPS {
                    workloads.push(vec![a, b, c, d]);
                }
            }
        }
    }
    workloads.retain(|w| every_step_acts(w));
    let n_states: usize = workloads.iter().map(|w| crash_everywhere(w, None)).sum();
    eprintln!("{} workloads, {n_states} crash states checked", workloads.len());
    assert!(workloads.len() > 100 && n_states > 5_000, "the enumeration should be large, got {n_states}");
}

/// Seeded random longer workloads, each crashed at one random call, in
/// every state the model allows.
#[test]
fn random_longer_workloads_recover_from_a_crash_anywhere() {
    const N_WORKLOADS: u64 = 3_000;
    let mut rng = SplitMix(0x6e69_7866_6c65_6574);
    let mut n_states = 0;
    for _ in 0..N_WORKLOADS {
        let len = 6 + (rng.next() % 7) as usize;
        let steps: Vec<Step> = (0..len).map(|_| STEPS[(rng.next() % STEPS.len() as u64) as usize]).collect();
        n_states += crash_everywhere(&steps, Some(rng.next() as usize));
    }
    eprintln!("{N_WORKLOADS} random workloads, {n_states} crash states checked");
    assert!(n_states >= N_WORKLOADS as usize);
}

/// The model itself: an un-synced rename may or may not survive; after
/// the directory fsync it must; un-synced data may be torn.
#[test]
fn the_crash_model_allows_exactly_the_conservative_states() {
    let storage = SimStorage::default();
    let dir = Path::new("/d");
    storage.create_dir(dir).expect("mkdir");
    storage.write_file(&dir.join("a.tmp"), b"0123456789").expect("write");
    let contents =
        |s: &SimFs| (s.file(&dir.join("a.tmp")).map(<[u8]>::to_vec), s.file(&dir.join("a")).map(<[u8]>::to_vec));
    let states: BTreeSet<_> = storage.fs().crash_states().iter().map(contents).collect();
    assert!(states.contains(&(None, None)) && states.contains(&(Some(b"01234".to_vec()), None)), "{states:?}");
    storage.fsync_file(&dir.join("a.tmp")).expect("fsync");
    storage.rename(&dir.join("a.tmp"), &dir.join("a")).expect("rename");
    let states: BTreeSet<_> = storage.fs().crash_states().iter().map(contents).collect();
    let whole = Some(b"0123456789".to_vec());
    assert_eq!(states, BTreeSet::from([(None, None), (whole.clone(), None), (None, whole.clone())]));
    storage.fsync_dir(dir).expect("fsync dir");
    let states: BTreeSet<_> = storage.fs().crash_states().iter().map(contents).collect();
    assert_eq!(states, BTreeSet::from([(None, whole)]));
}

/// A small deterministic generator (SplitMix64) so failures reproduce.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
