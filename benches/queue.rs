//! Queue benchmark (`just bench`): prints, in one run and under one
//! directory on the same file system, its own baseline and the queue's
//! figures, with the ratios against the targets of the queue issue:
//!
//! (a) raw loop: write + fsync + rename + dir-fsync of files the size of a
//!     queue record: the floor any durable queue pays per event;
//! (b) `Queue::enqueue`: target ≥ 0.85 × (a) events/s;
//! (c) `Queue::enqueue` + `Queue::ack`: target ≥ 0.6 × (a);
//! (d) the real release binary `nixfleet queue ls --json --all` over 10,000
//!     pending events vs a bare read (list + read every file) of the same
//!     files in this process: target ≤ 2 ×.
//!
//! (a), (b), (c) run interleaved event by event so background load hits
//! all three alike; throughput is the median over rounds of events divided
//! by their summed time, latencies are the p50/p99 of every operation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet::clock::ClockHandle;
use nixfleet::ids::{Hostname, RolloutId};
use nixfleet::queue::{Queue, QueueConfig, RealStorage, Storage};
use nixfleet::wire::{OutboundEvent, WireEventBody};

const ROUNDS: usize = 5;
const EVENTS_PER_ROUND: usize = 400;
const LS_EVENTS: usize = 10_000;
const LS_RUNS: usize = 5;

fn main() {
    let base = bench_dir();
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).expect("bench dir");
    println!("queue benchmark in {} ({ROUNDS} rounds of {EVENTS_PER_ROUND} events)", base.display());

    let host = Hostname::parse("web-1").expect("valid");
    let rollout = RolloutId::parse("stable@2026-11-25.1").expect("valid");
    let clock = ClockHandle::system();
    let mut enqueue_q =
        Queue::open(&base.join("enqueue"), host.clone(), QueueConfig::default(), clock.clone()).expect("open");
    let mut ack_q = Queue::open(&base.join("ack"), host, QueueConfig::default(), clock).expect("open");
    let record_size = {
        let queued = enqueue_q.enqueue(&rollout, &event(1)).expect("enqueue");
        fs::metadata(&queued.path).expect("stat").len() as usize
    };
    let raw_dir = base.join("raw");
    fs::create_dir_all(&raw_dir).expect("raw dir");
    let payload = vec![b'x'; record_size];

    let (mut raw, mut enq, mut enq_ack) = (Series::default(), Series::default(), Series::default());
    for round in 0..ROUNDS {
        // One event of each kind in turn, so a burst of background I/O
        // (fsync latency here depends on everything else on the disk)
        // lands on all three alike.
        for i in 0..EVENTS_PER_ROUND {
            raw.time(|| raw_write(&raw_dir, round * EVENTS_PER_ROUND + i, &payload));
            enq.time(|| {
                let seq = enqueue_q.next_seq(&rollout);
                enqueue_q.enqueue(&rollout, &event(seq)).expect("enqueue");
            });
            enq_ack.time(|| {
                let seq = ack_q.next_seq(&rollout);
                let queued = ack_q.enqueue(&rollout, &event(seq)).expect("enqueue");
                ack_q.ack(queued.qseq).expect("ack");
            });
        }
        for series in [&mut raw, &mut enq, &mut enq_ack] {
            series.end_round();
        }
    }
    println!("record size {record_size} bytes");
    let a = raw.report("(a) raw write+fsync+rename+dir-fsync");
    let b = enq.report("(b) enqueue");
    let c = enq_ack.report("(c) enqueue + ack");
    println!("(b)/(a) = {:.2}  target >= 0.85  {}", b / a, verdict(b / a >= 0.85));
    println!("(c)/(a) = {:.2}  target >= 0.60  {}", c / a, verdict(c / a >= 0.6));

    // (d) 10,000 pending events, written by the queue itself through the
    // storage seam with fsync switched off (durability is not what (d)
    // measures, and 10,000 fsyncs would take minutes on a busy disk).
    drop(enqueue_q);
    let ls_state = base.join("ls");
    let storage = Box::new(NoSync(RealStorage));
    let host = Hostname::parse("web-1").expect("valid");
    let mut ls_q = Queue::open_with_storage(storage, &ls_state, host, QueueConfig::default(), ClockHandle::system())
        .expect("open");
    for _ in 0..LS_EVENTS {
        let seq = ls_q.next_seq(&rollout);
        ls_q.enqueue(&rollout, &event(seq)).expect("enqueue");
    }
    drop(ls_q);
    let pending_dir = ls_state.join("outbound-queue");
    let bin = env!("CARGO_BIN_EXE_nixfleet");
    let ls = || {
        let status = Command::new(bin)
            .args(["queue", "ls", "--json", "--all", "--state-dir"])
            .arg(&ls_state)
            .stdout(Stdio::null())
            .status()
            .expect("run nixfleet");
        assert!(status.success());
    };
    let bare = || {
        let mut names: Vec<PathBuf> = fs::read_dir(&pending_dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        let bytes: usize = names.iter().map(|p| fs::read(p).expect("read").len()).sum();
        assert!(bytes > 0);
    };
    // Warm the page cache for both, then time alternately.
    ls();
    bare();
    let (mut ls_times, mut bare_times) = (Vec::new(), Vec::new());
    for _ in 0..LS_RUNS {
        ls_times.push(time(ls));
        bare_times.push(time(bare));
    }
    let (ls_ms, bare_ms) = (median_ms(&mut ls_times), median_ms(&mut bare_times));
    println!("(d) `nixfleet queue ls --json --all` (release binary, new process) over {LS_EVENTS} pending: median {ls_ms:.1} ms");
    println!("    bare list + read of the same {LS_EVENTS} files (in process): median {bare_ms:.1} ms");
    println!("(d) ls / bare = {:.2}  target <= 2.0  {}", ls_ms / bare_ms, verdict(ls_ms / bare_ms <= 2.0));

    // Agent start-up over the same 10,000 pending events: lock, recovery
    // (read and verify every record), index.
    let mut open_times = Vec::new();
    for _ in 0..LS_RUNS {
        let host = Hostname::parse("web-1").expect("valid");
        open_times.push(time(|| {
            let q = Queue::open(&ls_state, host.clone(), QueueConfig::default(), ClockHandle::system()).expect("open");
            assert_eq!(q.pending_len(), LS_EVENTS);
        }));
    }
    println!(
        "    Queue::open (agent start-up) over the same {LS_EVENTS} pending: median {:.1} ms",
        median_ms(&mut open_times)
    );
    let _ = fs::remove_dir_all(&base);
}

/// Under target/ so it is on the same file system as a real state dir
/// would be here, not on a tmpfs.
fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("queue-bench")
}

fn event(seq: u64) -> OutboundEvent {
    OutboundEvent {
        seq,
        body: WireEventBody::ProbeResult {
            probe_name: "http-health".to_owned(),
            mode: nixfleet::machine::ProbeMode::Enforce,
            status: nixfleet::machine::ProbeStatus::Pass,
            observed_at: time::macros::datetime!(2026-11-25 12:00 UTC),
            failure_reason: None,
        },
    }
}

fn raw_write(dir: &Path, idx: usize, payload: &[u8]) {
    let path = dir.join(format!("{idx:020}.json"));
    let tmp = dir.join(format!("{idx:020}.json.tmp"));
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).expect("create");
    file.write_all(payload).expect("write");
    file.sync_all().expect("fsync");
    fs::rename(&tmp, &path).expect("rename");
    File::open(dir).expect("open dir").sync_all().expect("fsync dir");
}

/// The real file system with fsync turned into a no-op: only for filling
/// the listing fixture fast.
#[derive(Debug)]
struct NoSync(RealStorage);

impl Storage for NoSync {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.create_dir(dir)
    }
    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.0.write_file(path, bytes)
    }
    fn fsync_file(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.rename(from, to)
    }
    fn fsync_dir(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.0.remove_file(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.0.exists(path)
    }
    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.0.list_files(dir)
    }
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.0.read_file(path)
    }
}

#[derive(Default)]
struct Series {
    latencies: Vec<Duration>,
    round_rates: Vec<f64>,
}

impl Series {
    fn time(&mut self, op: impl FnOnce()) {
        let t = Instant::now();
        op();
        self.latencies.push(t.elapsed());
    }

    /// Events/s of the round just run: its events over their summed time.
    fn end_round(&mut self) {
        let round = &self.latencies[self.latencies.len() - EVENTS_PER_ROUND..];
        let busy: Duration = round.iter().sum();
        self.round_rates.push(EVENTS_PER_ROUND as f64 / busy.as_secs_f64());
    }

    /// Prints the median events/s and p50/p99 latency; returns the median rate.
    fn report(&mut self, name: &str) -> f64 {
        self.round_rates.sort_by(f64::total_cmp);
        self.latencies.sort();
        let rate = self.round_rates[self.round_rates.len() / 2];
        let pct = |p: f64| self.latencies[((self.latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
        println!("{name}: median {rate:.0} events/s, p50 {:.3} ms, p99 {:.3} ms", pct(0.50), pct(0.99));
        rate
    }
}

fn time(f: impl Fn()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}
