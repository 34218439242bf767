//! Delivery of the agent's queue to the control plane: the real drain
//! worker against the real `nixfleet cp serve` (gaps after a database loss,
//! lost history, dead letters revived, batches the CP refuses whole), the
//! heartbeat while the queue is fsyncing (a stub CP counts heartbeats), and
//! the agent stopping when its queue stops (a storage that fails on command).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nixfleet::agent::journal::SharedQueue;
use nixfleet::agent::net::CpApi;
use nixfleet::agent::workers::net::run_drain_worker;
use nixfleet::agent::workers::{shutdown_channel, ShutdownTrigger, WorkerExit};
use nixfleet::client::CpUrl;
use nixfleet::clock::ClockHandle;
use nixfleet::ids::{Closure, Hostname, RolloutId};
use nixfleet::machine::{ProbeDecl, ProbeKind, ProbeMode, ProbeStatus};
use nixfleet::queue::{EntryState, Queue, QueueConfig, QueueView, RealStorage, Storage};
use nixfleet::wire::{OutboundEvent, WireEventBody};
use time::macros::datetime;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::harness::{bin, Cp, Release, TempDir};

/// Generous: a debug binary on a shared 2-core machine; a healthy run of
/// each test takes a second or two.
const LIMIT: Duration = Duration::from_secs(60);
const T0: OffsetDateTime = datetime!(2026-11-25 12:00 UTC);

fn host() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}

fn rid(id: &str) -> RolloutId {
    RolloutId::parse(id).expect("valid")
}

fn old() -> Closure {
    Closure::parse(&format!("{}/00000000000000000000000000000000-old", nixfleet::ids::store_dir())).expect("valid")
}

fn new() -> Closure {
    Closure::parse(&format!("{}/11111111111111111111111111111111-new", nixfleet::ids::store_dir())).expect("valid")
}

/// A manifest naming `hosts`, all in wave 0 with the closure `new()`.
fn manifest(id: &str, hosts: &[&str]) -> String {
    let (channel, git_ref) = id.split_once('@').expect("channel@ref");
    let hosts: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| ((*h).to_owned(), serde_json::json!({"wave": 0, "target_closure": new().as_str()})))
        .collect();
    serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "halt", "sustained_failure_secs": 60, "max_failed_hosts": 0},
        "waves": [{"name": "all", "soak_secs": 1, "max_in_flight": 10}],
        "hosts": hosts,
    })
    .to_string()
}

/// Event `seq` of a legal history for web-1: ack, switch started and
/// completed, one enforce probe declared and observed, passing results,
/// then (seq 14) converged.
fn legal(seq: u64) -> OutboundEvent {
    let at = T0 + time::Duration::seconds(seq as i64);
    let body = match seq {
        1 => WireEventBody::DispatchAck {
            current_closure_at_dispatch: old(),
            target_closure: new(),
            soak_secs: 1,
            received_at: at,
        },
        2 => WireEventBody::ActivationStarted { started_at: at, switch_method: "setsid".into() },
        3 => WireEventBody::ActivationCompleted { observed_current_closure: new(), exit_code: 0, completed_at: at },
        4 => WireEventBody::ProbeTopologyDeclared {
            probes: vec![ProbeDecl { name: "p".into(), kind: ProbeKind::Exec, mode: ProbeMode::Enforce }],
            declared_at: at,
        },
        5 => WireEventBody::ProbeObservedFirst { probe_name: "p".into(), mode: ProbeMode::Enforce, observed_at: at },
        6..=13 => WireEventBody::ProbeResult {
            probe_name: "p".into(),
            mode: ProbeMode::Enforce,
            status: ProbeStatus::Pass,
            observed_at: at,
            failure_reason: None,
        },
        _ => WireEventBody::Converged { converged_at: T0 + time::Duration::seconds(60), current_closure: new() },
    };
    OutboundEvent { seq, body }
}

/// A CP process with its release key, restartable with its database lost.
struct World {
    dir: TempDir,
    release: Release,
    cp: Cp,
}

impl World {
    async fn start(label: &str, rollouts: &[(&str, &[&str])]) -> World {
        let dir = TempDir::new(label);
        let release = Release::new(dir.path(), "release");
        let cp = Cp::start(dir.path(), &release.pub_path);
        let world = World { dir, release, cp };
        world.publish(rollouts).await;
        world
    }

    async fn publish(&self, rollouts: &[(&str, &[&str])]) {
        for (id, hosts) in rollouts {
            let resp = self.cp.publish(&self.release.sign(&manifest(id, hosts))).await;
            assert!(resp.status.is_success(), "publish {id}: {}", String::from_utf8_lossy(&resp.body));
        }
    }

    /// kill -9, delete the database, start again, publish `rollouts`.
    async fn lose_database(&mut self, rollouts: &[(&str, &[&str])]) {
        self.cp.kill9();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.cp.db.display()));
        }
        self.cp.restart();
        self.publish(rollouts).await;
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// The CP's event log of web-1 in one rollout as seqs, in order.
    async fn cp_seqs(&self, rollout: &str) -> Vec<u64> {
        let log = self.cp.get_json(&format!("/v1/rollouts/{rollout}/events")).await;
        let events = log["events"].as_array().or_else(|| log.as_array()).expect("events array").clone();
        let mut seqs: Vec<u64> =
            events.iter().filter(|e| e["hostname"] == "web-1").map(|e| e["seq"].as_u64().expect("seq")).collect();
        seqs.sort_unstable();
        seqs
    }
}

/// The real drain worker, delivering `queue` to `url` until stopped.
struct Drainer {
    trigger: ShutdownTrigger,
    task: JoinHandle<WorkerExit>,
}

impl Drainer {
    fn start(url: &CpUrl, queue: &SharedQueue) -> Drainer {
        let (trigger, stop) = shutdown_channel();
        let api = CpApi::new(url.clone(), host());
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run_drain_worker(api, queue.clone(), wake, Duration::from_millis(50), stop));
        Drainer { trigger, task }
    }

    async fn stop(self) {
        self.trigger.trigger();
        assert_eq!(self.task.await.expect("drain worker"), WorkerExit::Shutdown);
    }
}

/// Polls `cond` (async) every 20 ms until it holds, or panics after LIMIT.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn enqueue(queue: &SharedQueue, rollout: &str, event: OutboundEvent) {
    queue.lock().enqueue(&rid(rollout), &event).expect("enqueue");
}

/// (rollout, seq) of the events in one folder of the queue on disk.
fn on_disk(state_dir: &Path, folder: EntryState) -> Vec<(String, u64)> {
    let view = QueueView::open(state_dir).expect("view");
    let mut out: Vec<(String, u64)> = view
        .list(&[folder])
        .expect("list")
        .into_iter()
        .filter_map(|e| e.header)
        .map(|h| (h.rollout_id, h.seq))
        .collect();
    out.sort();
    out
}

fn open_queue(state_dir: &Path, config: QueueConfig) -> SharedQueue {
    SharedQueue::new(Queue::open(state_dir, host(), config, ClockHandle::system()).expect("queue"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cp_database_loss_a_gap_resends_the_acked_history_and_everything_applies() {
    // Proves rule 2 (`docs/protocol.md` §3) on the agent side with the real CP: the CP lost its
    // database and got the manifest again; the drainer posts pending seq
    // 11.. before any heartbeat, is answered `gap` expecting 1, re-sends
    // 1..10 from acked/ and then 11..14, and both sides agree.
    let mut world = World::start("delivery-dbloss", &[("stable@q1", &["web-1"])]).await;
    let queue = open_queue(&world.state_dir(), QueueConfig::default());
    for seq in 1..=10 {
        enqueue(&queue, "stable@q1", legal(seq));
    }
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("seq 1..10 delivered", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, (1..=10).collect::<Vec<_>>());

    world.lose_database(&[("stable@q1", &["web-1"])]).await;
    assert!(world.cp_seqs("stable@q1").await.is_empty(), "the CP starts from nothing");
    for seq in 11..=14 {
        enqueue(&queue, "stable@q1", legal(seq));
    }
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("seq 11..14 delivered", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, (1..=14).collect::<Vec<_>>(), "history re-sent, then the rest");
    assert_eq!(world.cp.host_state("stable@q1", "web-1").await, "Converged");
    assert!(on_disk(&world.state_dir(), EntryState::Dead).is_empty());
    assert_eq!(on_disk(&world.state_dir(), EntryState::Acked).len(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_agent_cannot_fill_dead_letters_naming_the_seq_and_other_rollouts_still_flow() {
    // Proves no endless loop and no head-of-line blocking when the seq the
    // CP expects is gone (here: stable@q1's acked history pruned by the
    // drainer's retention before the CP lost its database): the pending
    // event is dead-lettered with a reason naming the missing seq, and
    // canary@q1 (history kept) is re-sent and delivered.
    let both: &[(&str, &[&str])] = &[("stable@q1", &["web-1"]), ("canary@q1", &["web-1"])];
    let mut world = World::start("delivery-lost", both).await;
    let config = QueueConfig { acked_max_count: 0, ..QueueConfig::default() };
    let queue = open_queue(&world.state_dir(), config);
    enqueue(&queue, "stable@q1", legal(1));
    enqueue(&queue, "canary@q1", legal(1));
    let drainer = Drainer::start(&world.cp.url, &queue);
    let state_dir = world.state_dir();
    until("delivered, and stable@q1 pruned", || async {
        queue.lock().pending_len() == 0 && on_disk(&state_dir, EntryState::Acked) == [("canary@q1".to_owned(), 1)]
    })
    .await;
    drainer.stop().await;

    world.lose_database(both).await;
    enqueue(&queue, "stable@q1", legal(2));
    enqueue(&queue, "canary@q1", legal(2));
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("the queue settled", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("canary@q1").await, vec![1, 2], "the other rollout re-sent and delivered");
    assert!(world.cp_seqs("stable@q1").await.is_empty());
    let view = QueueView::open(&world.state_dir()).expect("view");
    let dead = view.list(&[EntryState::Dead]).expect("list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header.as_ref().map(|h| (h.rollout_id.as_str(), h.seq)), Some(("stable@q1", 2)));
    let reason = dead[0].reason.as_deref().unwrap_or("");
    assert!(reason.contains("seq 1 of stable@q1") && reason.contains("no longer has"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_resent_after_a_database_loss_and_revived_when_applied() {
    // Proves dead letters are part of the history a re-send carries: the
    // first CP rejects web-1's events (its manifest does not name web-1);
    // after a database loss and a manifest that does, a new event's gap
    // re-sends the dead letters, the CP applies them, they move back to
    // acked/ with a note, and `queue ls` shows them as revived.
    let mut world = World::start("delivery-revive", &[("stable@q1", &["web-2"])]).await;
    let queue = open_queue(&world.state_dir(), QueueConfig::default());
    enqueue(&queue, "stable@q1", legal(1));
    enqueue(&queue, "stable@q1", legal(2));
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("both dead-lettered", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(on_disk(&world.state_dir(), EntryState::Dead).len(), 2);

    world.lose_database(&[("stable@q1", &["web-1", "web-2"])]).await;
    enqueue(&queue, "stable@q1", legal(3));
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("seq 3 delivered", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, vec![1, 2, 3]);
    assert_eq!(world.cp.host_state("stable@q1", "web-1").await, "Soaking");
    assert!(on_disk(&world.state_dir(), EntryState::Dead).is_empty());
    assert_eq!(on_disk(&world.state_dir(), EntryState::Acked).len(), 3);

    let out = std::process::Command::new(bin())
        .args(["queue", "ls", "--acked", "--json", "--state-dir"])
        .arg(world.state_dir())
        .output()
        .expect("queue ls");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let revived: Vec<(u64, String)> = doc["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| !e["revived"].is_null())
        .map(|e| (e["seq"].as_u64().expect("seq"), e["revived"]["was_dead_reason"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(revived.len(), 2, "{doc}");
    assert!(revived.iter().all(|(_, why)| why.contains("not in the manifest")), "{revived:?}");
    let table = std::process::Command::new(bin())
        .args(["queue", "ls", "--acked", "--state-dir"])
        .arg(world.state_dir())
        .output()
        .expect("queue ls");
    assert_eq!(String::from_utf8_lossy(&table.stdout).matches("revived").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_cp_refuses_as_too_large_is_halved_and_the_oversized_event_dead_lettered() {
    // Proves a 413 for a whole batch no longer blocks the queue forever:
    // the drainer halves the batch, delivers the events that fit, and
    // dead-letters the one event the CP refuses on its own, with the CP's
    // answer as the reason.
    let both: &[(&str, &[&str])] = &[("stable@q1", &["web-1"]), ("canary@q1", &["web-1"])];
    let world = World::start("delivery-413", both).await;
    let queue = open_queue(&world.state_dir(), QueueConfig::default());
    enqueue(&queue, "stable@q1", legal(1));
    enqueue(&queue, "canary@q1", legal(1));
    let huge = OutboundEvent {
        seq: 2,
        body: WireEventBody::ActivationFailed { exit_code: 1, stderr_tail: "x".repeat(3 << 19), failed_at: T0 },
    };
    enqueue(&queue, "canary@q1", huge);
    enqueue(&queue, "stable@q1", legal(2));
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("the queue settled", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, vec![1, 2]);
    assert_eq!(world.cp_seqs("canary@q1").await, vec![1]);
    let view = QueueView::open(&world.state_dir()).expect("view");
    let dead = view.list(&[EntryState::Dead]).expect("list");
    assert_eq!(dead.len(), 1);
    let reason = dead[0].reason.as_deref().unwrap_or("");
    assert!(reason.contains("413") && reason.contains("body_too_large"), "{reason}");
}

// ------------------------------------------------ storage seams for faults

/// The real file system, whose `fsync_file` can be made to wait at a gate
/// (a slow disk), and whose `fsync_dir` and `remove_file` can be made to
/// fail (a disk gone bad).
#[derive(Debug, Clone, Default)]
struct TestStorage {
    gate: Arc<Gate>,
    failing: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = closed;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if *closed {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        while *closed {
            closed = self.changed.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Opens the gate when dropped, so a failing test never leaves a thread
/// stuck in an fsync.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl TestStorage {
    fn fail<T>(&self) -> Option<io::Result<T>> {
        self.failing.load(Ordering::SeqCst).then(|| Err(io::Error::from_raw_os_error(5)))
    }
}

impl Storage for TestStorage {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        RealStorage.create_dir(dir)
    }
    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        RealStorage.write_file(path, bytes)
    }
    fn fsync_file(&self, path: &Path) -> io::Result<()> {
        self.gate.pass();
        RealStorage.fsync_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealStorage.rename(from, to)
    }
    fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
        self.fail().unwrap_or_else(|| RealStorage.fsync_dir(dir))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.fail().unwrap_or_else(|| RealStorage.remove_file(path))
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        RealStorage.exists(path)
    }
    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealStorage.list_files(dir)
    }
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        RealStorage.read_file(path)
    }
}

/// A stand-in control plane that answers heartbeats and counts them.
async fn heartbeat_counter() -> (CpUrl, Arc<AtomicUsize>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = CpUrl::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("url");
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let counted = counted.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/v1/agent/heartbeat" {
                            counted.fetch_add(1, Ordering::SeqCst);
                            (200, r#"{"server_time":"2026-11-25T12:00:00Z","replay_from":{}}"#)
                        } else {
                            (503, r#"{"error":"stub","message":"heartbeats only"}"#)
                        };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_is_not_delayed_by_an_fsync_in_progress() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves the runtime threads never wait on the queue's fsync: while an
    // append is stuck in fsync (holding the queue), heartbeats keep going
    // out. (The heartbeat used to lock the queue on a runtime thread and
    // stalled with it.)
    use nixfleet::agent::workers::net::{run_heartbeat_worker, HeartbeatConfig};
    let fixture = crate::nixenv::Host::new();
    let closure = fixture.build(fixture.spec("heartbeat"));
    fixture.boot_into(&closure);
    let dir = TempDir::new("delivery-heartbeat");
    let storage = TestStorage::default();
    let queue = Queue::open_with_storage(
        Box::new(storage.clone()),
        dir.path(),
        host(),
        QueueConfig::default(),
        ClockHandle::system(),
    )
    .expect("queue");
    let queue = SharedQueue::new(queue);
    let (url, beats) = heartbeat_counter().await;
    let (trigger, stop) = shutdown_channel();
    let cfg = HeartbeatConfig {
        interval: Duration::from_millis(50),
        current_system: fixture.current_system(),
        booted_system: fixture.current_system(),
    };
    let worker = tokio::spawn(run_heartbeat_worker(CpApi::new(url, host()), cfg, queue.clone(), Instant::now(), stop));
    until("a first heartbeat", || async { beats.load(Ordering::SeqCst) > 0 }).await;

    let _open = OpenOnDrop(storage.gate.clone());
    storage.gate.set(true);
    let appending = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.append_event(&rid("stable@q1"), &legal(1)).await })
    };
    until("the append waits in fsync", || async { storage.gate.waiting.load(Ordering::SeqCst) > 0 }).await;
    // Polled with a plain thread sleep: if the runtime's threads are stuck
    // behind the fsync, its timers may be too, and the test must still end.
    let before = beats.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while beats.load(Ordering::SeqCst) < before + 3 {
        if Instant::now() > deadline {
            storage.gate.set(false);
            panic!("heartbeats stopped while the queue was fsyncing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!appending.is_finished(), "the fsync was still in progress");
    storage.gate.set(false);
    let queued = appending.await.expect("task").expect("append");
    assert_eq!(queued.seq, 1);
    assert_eq!(queue.last_seq(&rid("stable@q1")), 1, "the copy the workers read follows the queue");
    trigger.trigger();
    assert_eq!(worker.await.expect("worker"), WorkerExit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_stops_on_a_failed_write_stops_the_agent_with_an_error_naming_it() {
    if !crate::nixenv::closures_here() {
        return;
    }
    // Proves a poisoned queue no longer wedges the agent: the DispatchAck's
    // directory fsync fails and so does the undo, the queue stops, and the
    // agent returns an error naming the queue (main exits 1; systemd
    // restarts it) instead of retrying forever; a reopen then recovers.
    use nixfleet::agent::runtime::{serve_with_queue, AgentConfig, AgentError};
    use nixfleet::sign::PublicKey;
    let fixture = crate::nixenv::Host::new();
    let running = fixture.build(fixture.spec("poison"));
    fixture.boot_into(&running);
    let world = World::start("delivery-poison", &[("stable@q1", &["web-1"])]).await;
    let state_dir = world.state_dir();
    let storage = TestStorage::default();
    let queue = Queue::open_with_storage(
        Box::new(storage.clone()),
        &state_dir,
        host(),
        QueueConfig::default(),
        ClockHandle::system(),
    )
    .expect("queue");
    storage.failing.store(true, Ordering::SeqCst);
    let cfg = AgentConfig {
        state_dir: state_dir.clone(),
        cp: world.cp.url.clone(),
        hostname: host(),
        trust_keys: vec![PublicKey::load(&world.release.pub_path).expect("key")],
        health_checks: fixture.path("health-checks.json"),
        current_system: fixture.current_system(),
        booted_system: fixture.current_system(),
        activation: fixture.config(crate::nixenv::Host::session()),
        tick: Duration::from_millis(200),
        heartbeat: Duration::from_secs(1),
        drain: Duration::from_secs(1),
        longpoll_wait_secs: 2,
    };
    let agent = serve_with_queue(cfg, ClockHandle::system(), queue, std::future::pending());
    let result = tokio::time::timeout(LIMIT, agent).await.expect("the agent stops on its own");
    let err = result.expect_err("an error exit");
    assert!(matches!(err, AgentError::QueueStopped { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&state_dir.join("outbound-queue").display().to_string()), "{text}");
    assert!(text.contains("Input/output error"), "{text}");

    storage.failing.store(false, Ordering::SeqCst);
    let reopened = Queue::open(&state_dir, host(), QueueConfig::default(), ClockHandle::system()).expect("reopen");
    let kinds: Vec<&str> = reopened.pending().iter().map(|q| q.kind()).collect();
    assert!(kinds.is_empty() || kinds == ["DispatchAck"], "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotted_pending_record_is_rebuilt_written_back_and_the_cp_receives_its_seq() {
    // Proves the follow-up to divergence 8 in docs/simulator.md: seq 3 (ActivationCompleted) rots
    // while still pending, never delivered. The restart rebuilds it from
    // the events after it and writes it back under its qseq; the real
    // drainer then delivers 1..5 in order to the real CP. Without the
    // write-back the CP stops at 2 and seqs 4 and 5 are dead-lettered.
    let world = World::start("delivery-writeback", &[("stable@q1", &["web-1"])]).await;
    let state_dir = world.state_dir();
    let id = rid("stable@q1");
    let envelope = world.release.sign(&manifest("stable@q1", &["web-1"]));
    let public = world.release.key.public_key();
    nixfleet::agent::journal::ManifestCache::new(&state_dir).store(&id, &envelope, &public).expect("cache");
    let rotted = {
        let mut queue = Queue::open(&state_dir, host(), QueueConfig::default(), ClockHandle::system()).expect("queue");
        let refs: Vec<_> = (1..=5).map(|seq| queue.enqueue(&id, &legal(seq)).expect("enqueue")).collect();
        refs[2].path.clone()
    };
    std::fs::write(&rotted, b"{ bit rot").expect("rot");

    let mut queue = Queue::open(&state_dir, host(), QueueConfig::default(), ClockHandle::system()).expect("reopen");
    let (rollouts, report) = nixfleet::agent::journal::restore_and_write_back(
        &mut queue,
        &state_dir,
        &state_dir.join("health-checks.json"),
        &host(),
        &[public],
    )
    .expect("restore");
    assert_eq!(rollouts.get(&id).map(|s| s.record.last_seq), Some(5));
    assert_eq!(report.written_back, vec![(id.clone(), 3)], "{report:?}");
    assert!(rotted.exists(), "back in the pending folder under its own name");
    let queue = SharedQueue::new(queue);
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("the queue drained", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, vec![1, 2, 3, 4, 5], "the CP received the rebuilt seq 3");
    assert_eq!(world.cp.host_state("stable@q1", "web-1").await, "Soaking");
    assert!(on_disk(&state_dir, EntryState::Dead).is_empty(), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotted_pending_topology_and_first_observation_reach_the_cp_rebuilt() {
    // Proves what the simulator's soak found (nixfleet sim heavy seeds 468, 557,
    // 1057): the ProbeTopologyDeclared (seq 4) and ProbeObservedFirst
    // (seq 5) rot while pending. Before, the topology's loss stopped the
    // agent and a bridged first observation never reached the CP, which
    // waited for seq 5 forever. Now the restart rebuilds the topology from
    // the health-checks file and the first observation from the result
    // after it, writes both back, and the real drainer delivers 1..7 to
    // the real CP, which takes them.
    let world = World::start("delivery-writeback-visibility", &[("stable@q1", &["web-1"])]).await;
    let state_dir = world.state_dir();
    let id = rid("stable@q1");
    let envelope = world.release.sign(&manifest("stable@q1", &["web-1"]));
    let public = world.release.key.public_key();
    nixfleet::agent::journal::ManifestCache::new(&state_dir).store(&id, &envelope, &public).expect("cache");
    let checks = state_dir.join("health-checks.json");
    let probe = r#"{"probes":[{"name":"p","kind":"exec","mode":"enforce","interval_secs":1,"argv":["/bin/true"],"timeout_secs":5}]}"#;
    std::fs::write(&checks, probe).expect("health checks");
    let rotted: Vec<_> = {
        let mut queue = Queue::open(&state_dir, host(), QueueConfig::default(), ClockHandle::system()).expect("queue");
        let refs: Vec<_> = (1..=7).map(|seq| queue.enqueue(&id, &legal(seq)).expect("enqueue")).collect();
        vec![refs[3].path.clone(), refs[4].path.clone()]
    };
    for path in &rotted {
        std::fs::write(path, b"{ bit rot").expect("rot");
    }

    let mut queue = Queue::open(&state_dir, host(), QueueConfig::default(), ClockHandle::system()).expect("reopen");
    let (rollouts, report) =
        nixfleet::agent::journal::restore_and_write_back(&mut queue, &state_dir, &checks, &host(), &[public])
            .expect("the agent starts");
    assert_eq!(rollouts.get(&id).map(|s| s.record.last_seq), Some(7));
    assert_eq!(report.written_back, vec![(id.clone(), 4), (id.clone(), 5)], "{report:?}");
    let queue = SharedQueue::new(queue);
    let drainer = Drainer::start(&world.cp.url, &queue);
    until("the queue drained", || async { queue.lock().pending_len() == 0 }).await;
    drainer.stop().await;
    assert_eq!(world.cp_seqs("stable@q1").await, vec![1, 2, 3, 4, 5, 6, 7], "the CP received seqs 4 and 5");
    assert_eq!(world.cp.host_state("stable@q1", "web-1").await, "Soaking");
    assert!(on_disk(&state_dir, EntryState::Dead).is_empty(), "nothing dead-lettered");
}
