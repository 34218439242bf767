//! Records and start-up recovery on the real file system: what open does
//! with corrupt, oversized, out-of-bounds and foreign files, a damaged
//! high-water mark, and a pending copy of an event that had moved.

use super::*;

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
