//! Injected faults at every step through the storage seam (ENOSPC, EIO, a
//! failing fsync): the error reaches the caller, nothing is lost or torn,
//! the retry completes, and an undo that fails poisons the queue.

use super::*;

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
