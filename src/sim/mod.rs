//! `nixfleet sim`: a seeded, deterministic fleet simulator in the spirit of
//! FoundationDB's simulation and TigerBeetle's VOPR. It runs the REAL
//! control-plane writer (ingest, `step`, planner, SQLite) and the REAL
//! agent reducer, queue, rebuild and admission checks against a simulated
//! world: a manual clock, a lossy network, activations, probes, crashes,
//! database loss and operators, all drawn from one seed. After every step
//! it checks cheap invariants, at quiescence the agreement ones; the first
//! violation stops the run with the seed, the step and the trace.
//!
//! Reading order: [`rng`], [`world`] (what the code runs against),
//! [`storage`] (the agents' in-memory disks), [`cp`] (the CP process),
//! [`agent`] (an agent process and its delivery loop), `proxy` (the
//! body-limit fault), [`check`] (the invariants), then this file's event
//! loop. `docs/simulator.md` says what
//! is real and what is modelled, and why.

pub mod agent;
mod attack;
mod cli;
mod control;
mod faults;
mod net;
mod operators;
mod receive;
mod report;
mod setup;
mod worker;
pub mod check;
pub mod cp;
pub mod events;
mod proxy;
pub mod rng;
pub mod storage;
pub mod world;

#[cfg(test)]
mod tests;

pub use self::cli::{run_cli, tempfile_dir, CliError};
use self::report::fmt_ms;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;

use time::macros::datetime;

use self::agent::{delivery, verify_shared, Drain, LongPoll, SimAgent, VerifyCache};
use self::check::{Checker, Violation};
use self::cp::{Answer, SimCp, Work};
use self::events::EventQueue;
use self::rng::Rng;
use self::world::{ClosureBook, Faults, PlannedRollout};
use crate::agent::activation::ActivationOutcome;
use crate::agent::admission::check_dispatch;
use crate::agent::reducer::{ActivationOrder, Input};
use crate::clock::ClockHandle;
use crate::cp::planner::RolloutState;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{HostState, OnHealthFailure, Policy, ProbeDecl, ProbeKind, ProbeMode, ProbeStatus, Timestamp};
use crate::sign::{self, PublicKey, SigningKey};
use crate::wire::{Dispatch, EventBatch, EventResult, Heartbeat, Manifest};

/// Simulated time starts here (the example manifest's day).
pub const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);
/// Events shown when an invariant fails.
pub const TRACE_LEN: usize = 60;
/// An agent gives up on a request after this long (`agent::net`'s client
/// timeout order of magnitude); long-polls wait their 60 s plus this.
const REQUEST_TIMEOUT_MS: u64 = 30_000;
const LONG_POLL_WAIT_MS: u64 = 60_000;
const HEARTBEAT_MS: u64 = 60_000;
const TICK_MS: u64 = 5_000;
const CP_TICK_MS: u64 = 15_000;
const PRUNE_EVERY_MS: u64 = 600_000;
/// `--until`'s default (6 h), left out of the reproduce line.
pub const DEFAULT_UNTIL_MS: u64 = 6 * 3_600_000;
/// How often the loop looks for quiescence (the end of the run).
const QUIESCE_EVERY_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultProfile {
    None,
    Light,
    Heavy,
}

impl FaultProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultProfile::None => "none",
            FaultProfile::Light => "light",
            FaultProfile::Heavy => "heavy",
        }
    }
}

/// Hand-built situations, one per known divergence, on top of the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// A newer rollout is published while a host soaks with a failing probe.
    SupersedeMidSoak,
    /// The CP database is lost mid-rollout and re-published.
    DbLoss,
    /// A pending event file rots while the agent is down.
    SeqGap,
    /// The agent restarts while its failure clock runs; the service recovered.
    StaleEvidence,
    /// Release keys are rotated while a host soaks.
    KeyRotation,
    /// A closure is quarantined while other hosts of its role wait for it.
    Quarantine,
    /// After a database loss only the older manifest of a channel is re-published.
    Downgrade,
    /// The first (acked) event of a soaking rollout rots; the agent restarts.
    DroppedRollout,
    /// An event with seq above `MAX_SEQ` is posted as a host, and a queue
    /// file named with a qseq above `MAX_QSEQ` appears (the lost-seq case).
    HugeSeq,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::SupersedeMidSoak => "supersede-mid-soak",
            Scenario::DbLoss => "db-loss",
            Scenario::SeqGap => "seq-gap",
            Scenario::StaleEvidence => "stale-evidence",
            Scenario::KeyRotation => "key-rotation",
            Scenario::Quarantine => "quarantine",
            Scenario::Downgrade => "downgrade",
            Scenario::DroppedRollout => "dropped-rollout",
            Scenario::HugeSeq => "huge-seq",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub n_hosts: usize,
    pub faults: FaultProfile,
    pub scenario: Option<Scenario>,
    /// A manifest (unsigned JSON) to roll out first instead of a generated one.
    pub manifest: Option<Vec<u8>>,
    pub until_ms: u64,
    /// Where the CP's SQLite file lives (a fresh temp dir per run).
    pub work_dir: PathBuf,
    /// Record the first violation and run on (benchmarks): the whole
    /// workload is simulated even where today's code breaks a rule.
    pub keep_going: bool,
}

/// How a run ended.
#[derive(Debug)]
pub struct SimOutcome {
    /// The report (deterministic: the same seed gives the same bytes).
    pub text: String,
    pub violation: Option<Violation>,
    pub n_steps: u64,
    pub n_agent_inputs: u64,
}

#[derive(Debug, Clone)]
enum ToCp {
    Events(EventBatch),
    Heartbeat(Box<Heartbeat>),
    Poll,
    Manifest(RolloutId),
}

#[derive(Debug, Clone)]
enum ToAgent {
    Events(Vec<EventResult>),
    Heartbeat(BTreeMap<RolloutId, u64>),
    Poll(Option<Box<Dispatch>>),
    Manifest(Option<cp::SharedEnvelope>),
    Unavailable,
    /// An events request refused whole: (HTTP status, error code, message).
    Refused(u16, String, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Tick,
    Drain,
    Heartbeat,
    Poll,
    ProbeDeclare(u64),
    ProbeRun(u64, usize),
}

#[derive(Debug, Clone)]
enum Ev {
    Publish(usize),
    CpCommit,
    CpTick,
    CpCrash { down_ms: u64, lose_db: bool },
    CpStart { republish: bool },
    ToCp { host: usize, inc: u64, req: u64, msg: ToCp },
    ToAgent { host: usize, inc: u64, req: u64, msg: ToAgent },
    Timeout { host: usize, inc: u64, req: u64 },
    PollExpire { host: usize, req: u64 },
    Timer { host: usize, inc: u64, timer: Timer, token: u64 },
    SwitchDone { host: usize, switch: u64 },
    AgentCrash { host: usize, down_ms: u64 },
    AgentStart { host: usize },
    Reboot { host: usize },
    Partition { host: Option<usize>, ms: u64 },
    Heal { host: Option<usize> },
    Corrupt { host: usize, first: bool, tries: u32 },
    RotateKeys,
    HugeSeq { tries: u32 },
    Operator(operators::Action),
    Quiesce,
}

/// The physical host under an agent: what it runs, what boots next.
#[derive(Debug, Clone)]
struct Machine {
    current: Closure,
    profile: Closure,
    activated_ms: u64,
    /// Detached switches in progress: id → (closure, rollback).
    switches: BTreeMap<u64, (Closure, bool, u64)>,
    up: bool,
}

/// Counts for the summary.
#[derive(Debug, Default, Clone)]
struct Stats {
    msgs: u64,
    lost: u64,
    duplicated: u64,
    slowed: u64,
    agent_crashes: u64,
    cp_crashes: u64,
    db_losses: u64,
    partitions: u64,
    reboots: u64,
    corruptions: u64,
    revived: u64,
    key_rotations: u64,
    refused_whole: u64,
    publishes: u64,
    groups: u64,
    rejected: u64,
    operator_actions: u64,
}

pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    net_rng: Rng,
    clock: ClockHandle,
    now_ms: u64,
    step: u64,
    queue: EventQueue<Ev>,
    cp: SimCp,
    cp_inbox: Vec<(usize, u64, u64, ToCp)>,
    cp_commit_scheduled: bool,
    parked: BTreeMap<usize, (u64, u64)>,
    agents: Vec<SimAgent>,
    host_idx: BTreeMap<Hostname, usize>,
    machines: Vec<Machine>,
    partitioned: BTreeSet<usize>,
    cp_partitioned: bool,
    keys: Vec<SigningKey>,
    plan: Vec<PlannedRollout>,
    published: Vec<usize>,
    /// Planned rollouts the operator will not publish again (lost with the
    /// database in the downgrade scenario).
    abandoned: BTreeSet<usize>,
    envelopes: BTreeMap<usize, Vec<u8>>,
    issued: BTreeMap<RolloutId, Timestamp>,
    book: ClosureBook,
    faults: Faults,
    verify_cache: std::cell::RefCell<VerifyCache>,
    next_req: u64,
    next_switch: u64,
    trace: VecDeque<String>,
    stats: Stats,
    checker: Checker,
    n_agent_inputs: u64,
    wave_times: BTreeMap<(RolloutId, usize), (u64, Option<u64>)>,
    /// The current wave of each rollout as `wave_times` last saw it: a
    /// group that leaves it unchanged has nothing to add there.
    wave_seen: BTreeMap<RolloutId, usize>,
    /// The CP quarantine's change stamp as `after_cp_group` last read it.
    quarantine_seen: u64,
    rollout_end: BTreeMap<RolloutId, (String, u64)>,
    faults_over: bool,
    signing_key: usize,
    /// The operators' own stream (`Faults::draw_operators`).
    op_rng: Rng,
    /// Rollouts seen halted (each gets at most one `cp resume`).
    halts_seen: BTreeSet<RolloutId>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("seed", &self.cfg.seed).field("step", &self.step).finish()
    }
}

fn enforce_topology() -> Vec<(ProbeDecl, u64)> {
    vec![
        (ProbeDecl { name: "svc".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }, 10_000),
        (ProbeDecl { name: "metrics".into(), kind: ProbeKind::Exec, mode: ProbeMode::Observe }, 30_000),
    ]
}

/// Runs one simulation; `Err` only for a broken set-up (bad manifest, the
/// temp dir), never for what the run found.
pub fn run(cfg: SimConfig) -> Result<SimOutcome, String> {
    let mut sim = Sim::new(cfg)?;
    let outcome = sim.run_loop();
    // The last commit is waited for and the database closed before the
    // caller removes its directory.
    sim.cp.close();
    outcome
}

impl Sim {
    fn at(&mut self, at_ms: u64, ev: Ev) {
        self.queue.push(at_ms, ev);
    }

    fn after(&mut self, delay_ms: u64, ev: Ev) {
        self.at(self.now_ms + delay_ms, ev);
    }

    fn note(&mut self, text: String) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("#{:<7} {} {}", self.step, fmt_ms(self.now_ms), text));
    }

    fn run_loop(&mut self) -> Result<SimOutcome, String> {
        self.cp.start()?;
        for idx in 0..self.agents.len() {
            let at = self.rng.range(0, 900);
            self.at(at, Ev::AgentStart { host: idx });
        }
        for i in 0..self.plan.len() {
            let at = self.plan[i].at_ms;
            self.at(at, Ev::Publish(i));
        }
        self.at(CP_TICK_MS, Ev::CpTick);
        self.at(QUIESCE_EVERY_MS, Ev::Quiesce);
        self.schedule_faults();
        self.schedule_operators();
        let mut violation = None;
        let mut quiescent = false;
        while let Some((at_ms, ev)) = self.queue.pop() {
            if at_ms > self.cfg.until_ms {
                break;
            }
            self.now_ms = at_ms;
            self.clock.set(world::at(self.now_ms));
            self.step += 1;
            match self.dispatch(ev) {
                Ok(true) => {
                    quiescent = true;
                    break;
                }
                Ok(false) => {}
                Err(v) if self.cfg.keep_going => {
                    violation.get_or_insert(v);
                }
                Err(v) => {
                    violation = Some(v);
                    break;
                }
            }
        }
        if violation.is_none() || self.cfg.keep_going {
            if let Err(v) = self.final_checks(quiescent) {
                violation.get_or_insert(v);
            }
        }
        let text = self.report(violation.as_ref(), quiescent);
        Ok(SimOutcome { text, violation, n_steps: self.step, n_agent_inputs: self.n_agent_inputs })
    }

    /// One event; Ok(true) when the run is over (quiescent).
    fn dispatch(&mut self, ev: Ev) -> Result<bool, Violation> {
        match ev {
            Ev::Publish(i) => self.publish(i),
            Ev::CpCommit => self.cp_commit()?,
            Ev::CpTick => self.cp_tick(),
            Ev::CpCrash { down_ms, lose_db } => self.cp_crash(down_ms, lose_db),
            Ev::CpStart { republish } => self.cp_restart(republish)?,
            Ev::ToCp { host, inc, req, msg } => self.cp_receive(host, inc, req, msg),
            Ev::ToAgent { host, inc, req, msg } => self.agent_receive(host, inc, req, msg)?,
            Ev::Timeout { host, inc, req } => self.agent_failure(host, inc, req, "timed out")?,
            Ev::PollExpire { host, req } => self.poll_expire(host, req),
            Ev::Timer { host, inc, timer, token } => self.agent_timer(host, inc, timer, token)?,
            Ev::SwitchDone { host, switch } => self.switch_done(host, switch)?,
            Ev::AgentCrash { host, down_ms } => self.agent_crash(host, down_ms),
            Ev::AgentStart { host } => self.start_agent(host)?,
            Ev::Reboot { host } => self.reboot(host),
            Ev::Partition { host, ms } => self.partition(host, ms),
            Ev::Heal { host } => match host {
                Some(h) => {
                    self.partitioned.remove(&h);
                }
                None => self.cp_partitioned = false,
            },
            Ev::Corrupt { host, first, tries } => self.corrupt(host, first, tries)?,
            Ev::RotateKeys => self.rotate_keys(),
            Ev::HugeSeq { tries } => self.huge_seq(tries)?,
            Ev::Operator(action) => self.operator(action)?,
            Ev::Quiesce => return Ok(self.quiesce()),
        }
        Ok(false)
    }

    /// Ends the faults once their time is up; true when the run is over.
    fn quiesce(&mut self) -> bool {
        if self.now_ms >= self.faults.end_ms && !self.faults_over {
            self.faults_over = true;
            self.partitioned.clear();
            self.cp_partitioned = false;
            self.note("faults end: every host reachable from now on".into());
        }
        if self.is_quiescent() {
            return true;
        }
        self.after(QUIESCE_EVERY_MS, Ev::Quiesce);
        false
    }

    fn is_quiescent(&self) -> bool {
        if !self.faults_over || !self.cp.is_up() || self.published.len() + self.abandoned.len() < self.plan.len() {
            return false;
        }
        let Some(state) = self.cp.state() else { return false };
        use crate::cp::planner::RolloutState as R;
        if state.rollouts.values().any(|r| matches!(r.state, R::Active | R::Converging)) {
            return false;
        }
        self.agents.iter().zip(&self.machines).all(|(a, m)| {
            let Some(proc) = a.proc.as_ref() else { return false };
            // The CP has every seq of the agent's records (a dead letter
            // the CP lacks is re-sent on a later gap or Replay-From).
            let cp_has_all = proc.reducer.rollouts().iter().all(|(id, s)| {
                let cp = state.rollouts.get(id).and_then(|r| r.records.get(&a.host));
                cp.is_none_or(|r| r.last_seq >= s.record.last_seq)
            });
            cp_has_all
                && m.switches.is_empty()
                && proc.journal.lock().pending_len() == 0
                && proc.resend.is_empty()
                && proc.heartbeat_seen_ms >= self.checker.republished_ms()
                && !matches!(proc.drain, Drain::InFlight { .. })
                && proc.reducer.rollouts().iter().all(|(_, s)| !check::is_live(&s.record))
        })
    }
}
