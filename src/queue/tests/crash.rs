//! Crash-state enumeration: every small workload crashed after every
//! mutating call, in every state the conservative crash model allows, plus
//! seeded random longer workloads, each recovered and checked.

use super::*;

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

/// A recovered crash state: the disk, the reopened queue and its index.
struct Recovered {
    storage: SimStorage,
    q: Queue,
    pending: BTreeMap<u64, QueuedEvent>,
    acked: BTreeMap<u64, QueuedEvent>,
}

/// Recovers one crash state and checks every invariant of the queue.
fn check_crash_state(state: SimFs, expect: &Expect, context: &dyn Fn() -> String) {
    let storage = SimStorage::new(state);
    let q = sim_open(&storage, prune_everything()).unwrap_or_else(|e| panic!("recovery failed: {e}\n{}", context()));
    let pending: BTreeMap<u64, QueuedEvent> = q.pending().into_iter().map(|e| (e.qseq, e)).collect();
    let acked: BTreeMap<u64, QueuedEvent> = q.acked().into_iter().map(|e| (e.qseq, e)).collect();
    let rec = Recovered { storage, q, pending, acked };
    check_only_attempted_events_read(&rec, expect, context);
    for qseq in &expect.enqueued_ok {
        check_enqueued_event(&rec, expect, *qseq, context);
    }
    check_histories_have_no_hole(&rec, context);
    check_no_leftovers(&rec.storage, context);
    check_numbers_never_come_back(&rec, expect, context);
    // Recovery is idempotent and the queue is usable.
    let Recovered { storage, q, pending, .. } = rec;
    let r = rollout("stable@r1");
    let n_pending = pending.len();
    drop(q);
    let mut q = sim_open(&storage, prune_everything()).expect("second recovery");
    assert_eq!(q.pending_len(), n_pending, "{}", context());
    enqueue_next(&mut q, &r, "after").unwrap_or_else(|e| panic!("enqueue after recovery: {e}\n{}", context()));
}

/// No torn or foreign event is ever read: each is what was attempted.
fn check_only_attempted_events_read(rec: &Recovered, expect: &Expect, context: &dyn Fn() -> String) {
    for queued in rec.pending.values().chain(rec.acked.values()) {
        let (r, ev) =
            expect.attempted.get(&queued.qseq).unwrap_or_else(|| panic!("unknown qseq {}\n{}", queued.qseq, context()));
        assert_eq!((&queued.rollout_id, &queued.event), (r, ev), "{}", context());
    }
    assert!(
        rec.q.recovery_report().moved_to_dead.is_empty(),
        "a crash produced an unreadable event: {:?}\n{}",
        rec.q.recovery_report(),
        context()
    );
}

/// An Ok enqueue is there; acked/rejected ones are never pending again;
/// a rejected one is in dead/ with its reason; a revived one is acked.
fn check_enqueued_event(rec: &Recovered, expect: &Expect, qseq: u64, context: &dyn Fn() -> String) {
    let (pending, acked) = (&rec.pending, &rec.acked);
    let qseq = &qseq;
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
        assert!(!rec.q.dead_history().iter().any(|(d, _, _)| d == qseq), "revived {qseq} still dead\n{}", context());
    } else if expect.rejected_ok.contains(qseq) && expect.revive_attempted.contains(qseq) {
        // Cut short: dead with its reason, or acked; never pending.
        let dead = rec.q.dead_history().iter().any(|(d, _, _)| d == qseq);
        assert!(!pending.contains_key(qseq) && (dead || acked.contains_key(qseq)), "{}", context());
    } else if expect.rejected_ok.contains(qseq) {
        assert!(!pending.contains_key(qseq) && !acked.contains_key(qseq), "{}", context());
        let name = {
            let (r, ev) = &expect.attempted[qseq];
            record::file_name(*qseq, "web-1", r.as_str(), ev.kind())
        };
        let dead = PathBuf::from(ROOT).join(QUEUE_DIR).join(DEAD_DIR);
        let fs = rec.storage.fs();
        assert!(fs.file(&dead.join(&name)).is_some(), "rejected {qseq} not in dead/\n{}", context());
        assert!(fs.file(&dead.join(format!("{name}.reason"))).is_some(), "{}", context());
    }
}

/// What the agent rebuilds a rollout from (pending, acked, and dead
/// letters with their reason) is its whole history or lacks seq 1 (then
/// it counts as pruned): never a history with a hole after seq 1.
fn check_histories_have_no_hole(rec: &Recovered, context: &dyn Fn() -> String) {
    let dead_dir = PathBuf::from(ROOT).join(QUEUE_DIR).join(DEAD_DIR);
    let mut history: BTreeMap<RolloutId, BTreeSet<u64>> = BTreeMap::new();
    for queued in rec.pending.values().chain(rec.acked.values()) {
        history.entry(queued.rollout_id.clone()).or_default().insert(queued.seq());
    }
    let paths = rec.storage.fs().paths();
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
        if path.parent() != Some(dead_dir.as_path()) || !record::is_event_name(&name) {
            continue;
        }
        let has_reason = rec.storage.fs().file(&dead_dir.join(format!("{name}.reason"))).is_some();
        let header = rec.storage.fs().file(&path).and_then(|bytes| record::decode_header(bytes).ok());
        if let (true, Some(header)) = (has_reason, header) {
            history.entry(rollout(&header.rollout_id)).or_default().insert(header.seq);
        }
    }
    for (r, seqs) in &history {
        if seqs.contains(&1) {
            let whole: BTreeSet<u64> = (1..=rec.q.last_seq(r)).collect();
            assert_eq!(seqs, &whole, "the history of {r} has a hole\n{}", context());
        }
    }
}

/// No reason without its dead event, no revived note without its acked
/// event, and no tmp survive recovery.
fn check_no_leftovers(storage: &SimStorage, context: &dyn Fn() -> String) {
    let paths = storage.fs().paths();
    for path in paths {
        let text = path.to_string_lossy().into_owned();
        for suffix in [record::REASON_SUFFIX, record::REVIVED_SUFFIX] {
            if let Some(event) = text.strip_suffix(suffix) {
                assert!(storage.fs().file(Path::new(event)).is_some(), "leftover {text}\n{}", context());
            }
        }
    }
    assert!(!storage.fs().paths().iter().any(|p| p.to_string_lossy().ends_with(".tmp")), "{}", context());
}

/// Numbers never come back: above every Ok qseq/seq and every file on
/// disk; per rollout, seqs are unique among live events.
fn check_numbers_never_come_back(rec: &Recovered, expect: &Expect, context: &dyn Fn() -> String) {
    let q = &rec.q;
    let max_ok_qseq = expect.enqueued_ok.iter().max().copied().unwrap_or(0);
    let max_disk_qseq = rec
        .storage
        .fs()
        .paths()
        .iter()
        .filter_map(|p| record::qseq_of_name(p.file_name()?.to_str()?))
        .max()
        .unwrap_or(0);
    assert!(q.next_qseq() > max_ok_qseq.max(max_disk_qseq), "qseq {} reused\n{}", q.next_qseq(), context());
    for (r, seq) in &expect.max_seq_ok {
        assert!(q.next_seq(r) > *seq, "seq {} of {r} reused\n{}", q.next_seq(r), context());
    }
    let mut seen = BTreeSet::new();
    for queued in rec.pending.values().chain(rec.acked.values()) {
        assert!(seen.insert((queued.rollout_id.clone(), queued.seq())), "{}", context());
    }
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
