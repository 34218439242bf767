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
mod operators;
pub mod check;
pub mod cp;
pub mod events;
mod proxy;
pub mod rng;
pub mod storage;
pub mod world;

#[cfg(test)]
mod tests;

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

fn fmt_ms(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, (s / 60) % 60, s % 60, ms % 1000)
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
    sim.run_loop()
}

impl Sim {
    fn new(cfg: SimConfig) -> Result<Sim, String> {
        let mut rng = Rng::new(cfg.seed);
        let net_rng = rng.fork();
        let mut fault_rng = rng.fork();
        let mut faults = Faults::for_profile(cfg.faults, &mut fault_rng);
        let clock = ClockHandle::manual(T0);
        let keys: Vec<SigningKey> = (0..2u8).map(|k| SigningKey::from_seed(&[k + 11; 32])).collect();
        let cp_keys: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
        std::fs::create_dir_all(&cfg.work_dir).map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
        let cp = SimCp::new(&cfg.work_dir, clock.clone(), cp_keys);
        let mut plan_rng = rng.fork();
        let mut n_hosts = cfg.n_hosts.max(1);
        let mut plan = Vec::new();
        if let Some(bytes) = &cfg.manifest {
            let m = Manifest::parse(bytes).map_err(|e| format!("--manifest: {e}"))?;
            n_hosts = m.hosts.len();
            plan.push(PlannedRollout {
                at_ms: 1_000,
                channel: m.rollout_id.channel().to_owned(),
                git_ref: m.rollout_id.git_ref().to_owned(),
                issued_at: m.issued_at,
                key: 0,
                json: bytes.clone(),
            });
        }
        let mut host_names: Vec<Hostname> = (0..n_hosts).map(world::hostname).collect();
        if let Some(bytes) = &cfg.manifest {
            if let Ok(m) = Manifest::parse(bytes) {
                host_names = m.hosts.keys().cloned().collect();
            }
        }
        let all: Vec<usize> = (0..n_hosts).collect();
        let scenario = cfg.scenario;
        if let Some(s) = scenario {
            // Scenarios keep the network quiet unless they need it.
            faults = Faults { end_ms: 3_600_000, ..Faults::default() };
            if s == Scenario::SupersedeMidSoak {
                faults.supersede = true;
            }
        } else {
            faults.draw_body_limit(cfg.faults, cfg.seed, n_hosts);
            faults.draw_operators(cfg.faults, cfg.seed, n_hosts);
        }
        let mut add = |rng: &mut Rng, at_ms: u64, channel: &str, git_ref: &str, generation: u64, hosts: &[usize]| {
            let issued_at = world::at(at_ms.saturating_sub(500));
            let json = world::manifest_json(rng, channel, git_ref, issued_at, generation, hosts, n_hosts, scenario);
            plan.push(PlannedRollout {
                at_ms,
                channel: channel.to_owned(),
                git_ref: git_ref.to_owned(),
                issued_at,
                key: 0,
                json,
            });
        };
        if cfg.manifest.is_none() {
            add(&mut plan_rng, 1_000, "stable", "r1", 1, &all);
        }
        if faults.supersede && scenario.is_none() {
            let at = plan_rng.range(120_000, 1_500_000);
            add(&mut plan_rng, at, "stable", "r2", 2, &all);
        }
        if faults.second_channel {
            let subset: Vec<usize> = all.iter().copied().filter(|_| plan_rng.chance(0.5)).collect();
            if !subset.is_empty() {
                let at = plan_rng.range(60_000, 900_000);
                add(&mut plan_rng, at, "edge", "e1", 3, &subset);
            }
        }
        match scenario {
            Some(Scenario::SupersedeMidSoak) => add(&mut plan_rng, 90_000, "stable", "r2", 2, &all),
            Some(Scenario::Downgrade) => add(&mut plan_rng, 30_000, "stable", "r2", 2, &all[1.min(all.len())..]),
            _ => {}
        }
        let mut sim = Sim {
            rng,
            net_rng,
            clock,
            now_ms: 0,
            step: 0,
            queue: EventQueue::default(),
            cp,
            cp_inbox: Vec::new(),
            cp_commit_scheduled: false,
            parked: BTreeMap::new(),
            agents: Vec::new(),
            host_idx: BTreeMap::new(),
            machines: Vec::new(),
            partitioned: BTreeSet::new(),
            cp_partitioned: false,
            keys,
            plan,
            published: Vec::new(),
            abandoned: BTreeSet::new(),
            envelopes: BTreeMap::new(),
            issued: BTreeMap::new(),
            book: ClosureBook::default(),
            faults,
            verify_cache: std::cell::RefCell::new(BTreeMap::new()),
            next_req: 1,
            next_switch: 1,
            trace: VecDeque::new(),
            stats: Stats::default(),
            checker: Checker::default(),
            n_agent_inputs: 0,
            wave_times: BTreeMap::new(),
            rollout_end: BTreeMap::new(),
            faults_over: false,
            signing_key: 0,
            op_rng: Rng::new(cfg.seed ^ world::OPERATOR_STREAM ^ 1),
            halts_seen: BTreeSet::new(),
            cfg,
        };
        let trust = vec![sim.keys[0].public_key()];
        for (idx, host) in host_names.into_iter().enumerate() {
            let role = world::role_of(idx, n_hosts);
            let base = world::closure(0, role, "sys");
            sim.machines.push(Machine {
                current: base.clone(),
                profile: base,
                activated_ms: 0,
                switches: BTreeMap::new(),
                up: true,
            });
            sim.host_idx.insert(host.clone(), idx);
            sim.agents.push(SimAgent::new(idx, host, trust.clone()));
        }
        // Closure behaviour for every target of every planned rollout.
        let mut book_rng = sim.rng.fork();
        let mut targets = Vec::new();
        for p in &sim.plan {
            if let Ok(m) = Manifest::parse(&p.json) {
                sim.issued.insert(m.rollout_id.clone(), m.issued_at);
                for e in m.hosts.values() {
                    targets.push(e.target_closure.clone());
                }
            }
        }
        for t in &targets {
            sim.book.draw(t, &sim.faults, &mut book_rng);
        }
        sim.setup_scenario(&targets);
        Ok(sim)
    }

    fn setup_scenario(&mut self, targets: &[Closure]) {
        use world::{ClosureInfo, Health};
        let bad = ClosureInfo { health: Health::Bad, reboot_required: false, switch_fails: false };
        let good = ClosureInfo { health: Health::Good, reboot_required: false, switch_fails: false };
        let Some(s) = self.cfg.scenario else { return };
        for t in targets {
            self.book.info.insert(t.clone(), good);
        }
        let first_target = |sim: &Sim, plan_idx: usize, host: usize| -> Option<Closure> {
            let m = Manifest::parse(&sim.plan.get(plan_idx)?.json).ok()?;
            Some(m.hosts.get(&sim.agents.get(host)?.host)?.target_closure.clone())
        };
        match s {
            Scenario::SupersedeMidSoak => {
                if let Some(t) = first_target(self, 0, 0) {
                    self.book.info.insert(t, bad);
                }
            }
            Scenario::StaleEvidence => {
                if let Some(t) = first_target(self, 0, 0) {
                    let flaky = ClosureInfo { health: Health::Flaky { recover_secs: 100 }, ..good };
                    self.book.info.insert(t, flaky);
                }
                self.at(60_000, Ev::AgentCrash { host: 0, down_ms: 90_000 });
            }
            Scenario::KeyRotation => {
                if let Some(t) = first_target(self, 0, 0) {
                    self.book.info.insert(t, bad);
                }
                self.at(25_000, Ev::RotateKeys);
            }
            Scenario::Quarantine => {
                if let Some(t) = first_target(self, 0, 0) {
                    self.book.info.insert(t, bad);
                }
            }
            Scenario::DbLoss => self.at(200_000, Ev::CpCrash { down_ms: 5_000, lose_db: true }),
            Scenario::Downgrade => self.at(600_000, Ev::CpCrash { down_ms: 5_000, lose_db: true }),
            Scenario::SeqGap => {
                self.at(20_000, Ev::Partition { host: Some(0), ms: 200_000 });
                self.at(100_000, Ev::Corrupt { host: 0, first: false, tries: 0 });
            }
            Scenario::DroppedRollout => self.at(60_000, Ev::Corrupt { host: 0, first: true, tries: 0 }),
            Scenario::HugeSeq => self.at(60_000, Ev::HugeSeq { tries: 0 }),
        }
    }

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

    fn schedule_faults(&mut self) {
        let mut r = self.rng.fork();
        let n = self.agents.len() as u64;
        let end = self.faults.end_ms;
        for _ in 0..self.faults.agent_crashes {
            let host = r.below(n) as usize;
            let at = r.range(30_000, end.max(60_000));
            let down = r.range(5_000, 300_000);
            self.at(at, Ev::AgentCrash { host, down_ms: down });
        }
        for _ in 0..self.faults.cp_crashes {
            let at = r.range(30_000, end.max(60_000));
            let down = r.range(2_000, 120_000);
            self.at(at, Ev::CpCrash { down_ms: down, lose_db: false });
        }
        if self.faults.db_loss {
            let at = r.range(200_000, end.max(300_000));
            self.at(at, Ev::CpCrash { down_ms: r.range(5_000, 60_000), lose_db: true });
        }
        for _ in 0..self.faults.partitions {
            let at = r.range(30_000, end.max(60_000));
            let ms = r.range(30_000, 600_000);
            let host = if r.chance(0.3) { None } else { Some(r.below(n) as usize) };
            self.at(at, Ev::Partition { host, ms });
        }
        if self.faults.rotate_keys {
            let at = r.range(60_000, end.max(120_000));
            self.at(at, Ev::RotateKeys);
        }
        for _ in 0..self.faults.corrupt {
            let host = r.below(n) as usize;
            let at = r.range(60_000, end.max(120_000));
            self.at(at, Ev::Corrupt { host, first: r.chance(0.5), tries: 0 });
        }
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
            Ev::CpTick => {
                if self.cp.is_up() {
                    self.cp_inbox.push((usize::MAX, 0, 0, ToCp::Poll));
                    self.schedule_commit();
                }
                self.after(CP_TICK_MS, Ev::CpTick);
            }
            Ev::CpCrash { down_ms, lose_db } => {
                if self.faults_over || !self.cp.is_up() {
                    return Ok(false);
                }
                self.cp_inbox.clear();
                self.parked.clear();
                if lose_db {
                    self.stats.db_losses += 1;
                    self.note(format!("CP killed and its database LOST; back in {down_ms} ms"));
                    self.cp.lose_database();
                    self.checker.database_lost();
                    self.rollout_end.clear();
                } else {
                    self.stats.cp_crashes += 1;
                    self.note(format!("CP killed; back in {down_ms} ms"));
                    self.cp.crash();
                }
                self.after(down_ms, Ev::CpStart { republish: lose_db });
            }
            Ev::CpStart { republish } => {
                if let Err(e) = self.cp.start() {
                    return Err(Violation::new("cp-restart", format!("the CP does not start: {e}")));
                }
                self.note("CP started (writer reopened the database)".into());
                self.check_replay("after a CP restart")?;
                if republish {
                    self.republish();
                }
            }
            Ev::ToCp { host, inc, req, msg } => self.cp_receive(host, inc, req, msg),
            Ev::ToAgent { host, inc, req, msg } => self.agent_receive(host, inc, req, msg)?,
            Ev::Timeout { host, inc, req } => self.agent_failure(host, inc, req, "timed out")?,
            Ev::PollExpire { host, req } => {
                if self.parked.get(&host).is_some_and(|(_, r)| *r == req) {
                    if let Some((inc, req)) = self.parked.remove(&host) {
                        let d = self.cp.dispatch_for(&self.agents[host].host).map(Box::new);
                        self.reply(host, inc, req, ToAgent::Poll(d));
                    }
                }
            }
            Ev::Timer { host, inc, timer, token } => self.agent_timer(host, inc, timer, token)?,
            Ev::SwitchDone { host, switch } => self.switch_done(host, switch)?,
            Ev::AgentCrash { host, down_ms } => {
                if self.faults_over && down_ms > 0 {
                    return Ok(false);
                }
                self.crash_agent(host, "killed");
                self.after(down_ms, Ev::AgentStart { host });
            }
            Ev::AgentStart { host } => self.start_agent(host)?,
            Ev::Reboot { host } => {
                self.stats.reboots += 1;
                self.crash_agent(host, "rebooting");
                let m = &mut self.machines[host];
                m.up = false;
                m.switches.clear();
                if m.current != m.profile {
                    m.current = m.profile.clone();
                    m.activated_ms = self.now_ms;
                }
                let boot = self.rng.range(20_000, 60_000);
                self.after(boot, Ev::AgentStart { host });
            }
            Ev::Partition { host, ms } => {
                if self.faults_over {
                    return Ok(false);
                }
                self.stats.partitions += 1;
                match host {
                    Some(h) => {
                        self.partitioned.insert(h);
                        self.note(format!("{} partitioned for {ms} ms", self.agents[h].host));
                    }
                    None => {
                        self.cp_partitioned = true;
                        self.note(format!("CP partitioned from every host for {ms} ms"));
                    }
                }
                self.after(ms, Ev::Heal { host });
            }
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
            Ev::Quiesce => {
                if self.now_ms >= self.faults.end_ms && !self.faults_over {
                    self.faults_over = true;
                    self.partitioned.clear();
                    self.cp_partitioned = false;
                    self.note("faults end: every host reachable from now on".into());
                }
                if self.is_quiescent() {
                    return Ok(true);
                }
                self.after(QUIESCE_EVERY_MS, Ev::Quiesce);
            }
        }
        Ok(false)
    }

    // ---- operators -------------------------------------------------------

    fn envelope_of(&mut self, i: usize) -> Vec<u8> {
        if let Some(e) = self.envelopes.get(&i) {
            return e.clone();
        }
        let key = &self.keys[self.signing_key.min(self.keys.len() - 1)];
        let env = sign::sign_envelope(key, &self.plan[i].json);
        let bytes = serde_json::to_vec(&env).unwrap_or_default();
        self.envelopes.insert(i, bytes.clone());
        bytes
    }

    fn publish(&mut self, i: usize) {
        if !self.cp.is_up() {
            self.after(30_000, Ev::Publish(i));
            return;
        }
        let envelope = self.envelope_of(i);
        let answers = self.cp.run(vec![Work::Publish(envelope)]);
        self.stats.publishes += 1;
        let ok = matches!(answers.first(), Some(Answer::Published(_)));
        let p = &self.plan[i];
        self.note(format!("operator publishes {}@{} ({})", p.channel, p.git_ref, if ok { "ok" } else { "failed" }));
        if ok {
            self.checker.published(self.now_ms);
            if !self.published.contains(&i) {
                self.published.push(i);
            }
            self.after_cp_group();
        } else {
            self.after(30_000, Ev::Publish(i));
        }
    }

    /// After a database loss the operator re-publishes what it published,
    /// in a random order, minutes apart (or, in the downgrade scenario,
    /// only the oldest manifest of the channel).
    fn republish(&mut self) {
        let mut list = self.published.clone();
        self.published.clear();
        if self.cfg.scenario == Some(Scenario::Downgrade) {
            list.sort_unstable();
            // The newer manifests are never published again.
            self.abandoned.extend(list.drain(1..));
        }
        let mut at = self.now_ms;
        while !list.is_empty() {
            let k = self.rng.below(list.len() as u64) as usize;
            let i = list.remove(k);
            at += self.rng.range(1_000, 120_000);
            self.at(at, Ev::Publish(i));
        }
    }

    fn rotate_keys(&mut self) {
        self.stats.key_rotations += 1;
        self.signing_key = 1;
        // Manifests not yet published are signed with the new key.
        let unpublished: Vec<usize> = (0..self.plan.len()).filter(|i| !self.published.contains(i)).collect();
        for i in unpublished {
            self.envelopes.remove(&i);
        }
        let new_key = vec![self.keys[1].public_key()];
        self.note("operator rotates the release key; agents restart trusting only the new key".into());
        for h in 0..self.agents.len() {
            self.agents[h].trust_keys = new_key.clone();
            let delay = self.rng.range(100, 30_000);
            self.at(self.now_ms + delay, Ev::AgentCrash { host: h, down_ms: 0 });
        }
    }

    fn corrupt(&mut self, host: usize, first: bool, tries: u32) -> Result<(), Violation> {
        let Some(rollouts) = self.agents[host].rollouts() else {
            if tries < 20 {
                self.after(30_000, Ev::Corrupt { host, first, tries: tries + 1 });
            }
            return Ok(());
        };
        let soaking: Option<(RolloutId, u64)> = rollouts
            .iter()
            .find(|(_, s)| s.record.state == HostState::Soaking)
            .map(|(id, s)| (id.clone(), s.record.last_seq));
        let target = soaking.and_then(|(id, last)| {
            let agent = &self.agents[host];
            if first {
                agent.event_file(&id, 1)
            } else {
                // A pending event that is not the last: the next one then
                // reaches the CP without it.
                let pending: Vec<_> = {
                    let q = agent.proc.as_ref()?.journal.lock();
                    q.pending().into_iter().filter(|e| e.rollout_id == id && e.event.seq < last).collect()
                };
                pending.first().map(|e| agent.queue_dir().join(e.file_name()))
            }
        });
        let Some(path) = target else {
            if tries < 40 {
                self.after(5_000, Ev::Corrupt { host, first, tries: tries + 1 });
            }
            return Ok(());
        };
        self.stats.corruptions += 1;
        self.crash_agent(host, "killed (before bit rot)");
        self.agents[host].storage.corrupt(&path);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
        self.note(format!("{}: bit rot in queue file {name}", self.agents[host].host));
        self.start_agent(host)
    }

    // ---- network -----------------------------------------------------------

    fn unreachable(&self, host: usize) -> bool {
        self.partitioned.contains(&host) || self.cp_partitioned
    }

    /// Delay of one message and of its duplicate, if any; None if the
    /// network drops it.
    fn transit(&mut self, host: usize) -> Option<(u64, Option<u64>)> {
        self.stats.msgs += 1;
        if self.unreachable(host) {
            self.stats.lost += 1;
            return None;
        }
        let (loss, slow, dup) = if self.faults_over {
            let f = Faults::default();
            (f.net_loss, f.net_slow, f.net_dup)
        } else {
            (self.faults.net_loss, self.faults.net_slow, self.faults.net_dup)
        };
        if self.net_rng.chance(loss) {
            self.stats.lost += 1;
            return None;
        }
        let mut delay = self.net_rng.range(1, 40);
        if self.net_rng.chance(slow) {
            self.stats.slowed += 1;
            delay += self.net_rng.range(1_000, 40_000);
        }
        let mut again = None;
        if self.net_rng.chance(dup) {
            self.stats.duplicated += 1;
            again = Some(delay + self.net_rng.range(1, 20_000));
        }
        Some((delay, again))
    }

    /// Schedules a message's deliveries: the message itself, then its
    /// duplicate (cloned only when there is one).
    fn deliver<M: Clone>(&mut self, host: usize, msg: M, ev: impl Fn(M) -> Ev) {
        let Some((delay, again)) = self.transit(host) else { return };
        match again {
            Some(later) => {
                self.after(delay, ev(msg.clone()));
                self.after(later, ev(msg));
            }
            None => self.after(delay, ev(msg)),
        }
    }

    fn send(&mut self, host: usize, msg: ToCp) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        let inc = self.agents[host].incarnation;
        let timeout =
            if matches!(msg, ToCp::Poll) { LONG_POLL_WAIT_MS + REQUEST_TIMEOUT_MS } else { REQUEST_TIMEOUT_MS };
        self.after(timeout, Ev::Timeout { host, inc, req });
        self.deliver(host, msg, |msg| Ev::ToCp { host, inc, req, msg });
        req
    }

    fn reply(&mut self, host: usize, inc: u64, req: u64, msg: ToAgent) {
        self.deliver(host, msg, |msg| Ev::ToAgent { host, inc, req, msg });
    }

    // ---- control plane -------------------------------------------------------

    /// The writer takes whatever arrived while its previous commit was
    /// flushing; the sim models that flush as a window that grows with the
    /// fleet (1 ms per 40 hosts, 1–250 ms: a 10,000-host group plans over
    /// every host of every rollout, several ms of CPU in the real writer),
    /// so a large fleet commits in groups as the real writer does under
    /// load, not once per request. Coarser windows mean fewer interleavings
    /// per simulated second, never another code path.
    fn schedule_commit(&mut self) {
        if !self.cp_commit_scheduled {
            self.cp_commit_scheduled = true;
            let window = (self.agents.len() as u64 / 40).clamp(1, 250);
            self.after(window, Ev::CpCommit);
        }
    }

    fn cp_receive(&mut self, host: usize, inc: u64, req: u64, msg: ToCp) {
        if let ToCp::Events(batch) = &msg {
            if let Some(refusal) = self.proxy_refuses(req, batch) {
                self.reply(host, inc, req, refusal);
                return;
            }
        }
        if !self.cp.is_up() {
            // Connection refused: the agent hears at once.
            self.reply(host, inc, req, ToAgent::Unavailable);
            return;
        }
        match msg {
            ToCp::Poll => {
                let hostname = self.agents[host].host.clone();
                match self.cp.dispatch_for(&hostname) {
                    Some(d) => self.reply(host, inc, req, ToAgent::Poll(Some(Box::new(d)))),
                    None => {
                        self.parked.insert(host, (inc, req));
                        self.after(LONG_POLL_WAIT_MS, Ev::PollExpire { host, req });
                    }
                }
            }
            ToCp::Manifest(id) => {
                let env = self.cp.envelope(&id);
                self.reply(host, inc, req, ToAgent::Manifest(env));
            }
            msg => {
                self.cp_inbox.push((host, inc, req, msg));
                self.schedule_commit();
            }
        }
    }

    fn cp_commit(&mut self) -> Result<(), Violation> {
        self.cp_commit_scheduled = false;
        let mut inbox = std::mem::take(&mut self.cp_inbox);
        if inbox.is_empty() || !self.cp.is_up() {
            return Ok(());
        }
        let mut work = Vec::with_capacity(inbox.len());
        for (_, _, _, msg) in &mut inbox {
            work.push(match msg {
                ToCp::Events(batch) => Work::Ingest(batch.hostname.clone(), batch.events.clone()),
                // Moved, not cloned: only an ingest's batch is read after
                // the group (by `check_ingest`).
                ToCp::Heartbeat(_) => match std::mem::replace(msg, ToCp::Poll) {
                    ToCp::Heartbeat(hb) => Work::Heartbeat(hb),
                    _ => Work::Tick,
                },
                // The CP's own tick (host usize::MAX).
                _ => Work::Tick,
            });
        }
        let has_tick = work.iter().any(|w| matches!(w, Work::Tick));
        let answers = self.cp.run(work);
        self.stats.groups += 1;
        let mut any_applied = has_tick;
        for ((host, inc, req, msg), answer) in inbox.into_iter().zip(answers) {
            if host == usize::MAX {
                continue;
            }
            let reply = match answer {
                Answer::Events(results) => {
                    any_applied |= results.iter().any(|r| r.status == crate::wire::ResultStatus::Applied);
                    if let ToCp::Events(batch) = &msg {
                        self.check_ingest(host, batch, &results)?;
                    }
                    ToAgent::Events(results)
                }
                Answer::Heartbeat(r) => {
                    if let Some(p) = self.agents[host].proc.as_mut() {
                        p.heartbeat_committed = Some((req, self.now_ms));
                    }
                    ToAgent::Heartbeat(r)
                }
                Answer::Published(_) | Answer::Action(_) | Answer::Unavailable => ToAgent::Unavailable,
            };
            self.reply(host, inc, req, reply);
        }
        self.after_cp_group();
        // The planner's promises can only change when an event was applied
        // or the planner ticked (heartbeats never change host state).
        if any_applied {
            self.check_cp()?;
        }
        Ok(())
    }

    /// After every commit: wake parked long-polls of hosts that now have a
    /// standing dispatch (the real board's Notify), note wave progress.
    fn after_cp_group(&mut self) {
        let Some(state) = self.cp.state() else { return };
        // Dispatches offered by this group carry its instant as issued_at.
        let now = world::at(self.now_ms);
        let mut offered: Vec<usize> = Vec::new();
        let mut waves = Vec::new();
        let mut ends = Vec::new();
        for (id, r) in &state.rollouts {
            for (h, d) in &r.dispatched {
                if d.issued_at == now {
                    if let Some(idx) = self.host_idx.get(h) {
                        offered.push(*idx);
                    }
                }
            }
            waves.push((id.clone(), r.current_wave));
            if matches!(
                r.state,
                crate::cp::planner::RolloutState::Completed
                    | crate::cp::planner::RolloutState::Halted
                    | crate::cp::planner::RolloutState::Superseded
                    | crate::cp::planner::RolloutState::Cancelled
            ) {
                ends.push((id.clone(), r.state.as_str().to_owned()));
            }
        }
        for (channel, closures) in &state.quarantine {
            for c in closures {
                self.checker.quarantined_at.entry((channel.clone(), c.clone())).or_insert(now);
            }
        }
        for (id, wave) in waves {
            for w in 0..=wave {
                let entry = self.wave_times.entry((id.clone(), w)).or_insert((self.now_ms, None));
                if w < wave && entry.1.is_none() {
                    entry.1 = Some(self.now_ms);
                }
            }
        }
        for (id, st) in ends {
            self.rollout_end.entry(id).or_insert((st, self.now_ms));
        }
        offered.sort_unstable();
        offered.dedup();
        for host in offered {
            if !self.parked.contains_key(&host) {
                continue;
            }
            let Some(d) = self.cp.dispatch_for(&self.agents[host].host) else { continue };
            if let Some((inc, req)) = self.parked.remove(&host) {
                self.reply(host, inc, req, ToAgent::Poll(Some(Box::new(d))));
            }
        }
        self.notice_halts();
    }

    // ---- agents ----------------------------------------------------------------

    fn crash_agent(&mut self, host: usize, why: &str) {
        if self.agents[host].proc.take().is_some() {
            self.stats.agent_crashes += 1;
            self.note(format!("{}: agent {why}", self.agents[host].host));
        }
        self.parked.remove(&host);
    }

    fn start_agent(&mut self, host: usize) -> Result<(), Violation> {
        if self.agents[host].proc.is_some() {
            return Ok(());
        }
        self.machines[host].up = true;
        let before = self.checker.live_before_crash(host);
        self.agents[host]
            .start(&self.clock, self.now_ms, &self.verify_cache)
            .map_err(|e| Violation::new("agent-restart", format!("the agent does not start: {e}")))?;
        let inc = self.agents[host].incarnation;
        let report = self.agents[host].proc.as_ref().map(|p| p.restore.clone()).unwrap_or_default();
        if inc > 1 {
            self.note(format!(
                "{}: agent restarted: restored {:?}, pruned {:?}, without manifest {:?}, skipped {:?}",
                self.agents[host].host,
                report.restored.iter().map(RolloutId::as_str).collect::<Vec<_>>(),
                report.pruned.iter().map(RolloutId::as_str).collect::<Vec<_>>(),
                report.without_manifest.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
                report.skipped.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ));
        }
        self.check_restore(host, &before)?;
        // Heartbeat and tick at once (tokio's interval ticks immediately),
        // long-poll.
        self.set_timer(host, Timer::Heartbeat, 0);
        self.set_timer(host, Timer::Poll, 0);
        let soaking =
            self.agents[host].rollouts().is_some_and(|r| r.iter().any(|(_, s)| s.record.state == HostState::Soaking));
        if soaking {
            self.checker.set_tick_armed(host, true);
            self.set_timer(host, Timer::Tick, 0);
        }
        self.after_agent(host)
    }

    fn set_timer(&mut self, host: usize, timer: Timer, delay_ms: u64) -> u64 {
        let inc = self.agents[host].incarnation;
        let Some(proc) = self.agents[host].proc.as_mut() else { return 0 };
        let token = proc.timer();
        match timer {
            Timer::Drain => proc.drain = Drain::Paused(token),
            Timer::Poll => proc.poll = LongPoll::Paused(token),
            _ => {}
        }
        self.after(delay_ms, Ev::Timer { host, inc, timer, token });
        token
    }

    /// Feeds the reducer one input and checks what changed.
    fn feed(&mut self, host: usize, input: Input) -> Result<(), Violation> {
        let before = self.checker.snapshot(&self.agents[host]);
        self.n_agent_inputs += 1;
        self.agents[host].handle(input).map_err(|e| Violation::new("agent-stuck", e))?;
        let changes = self.checker.diff(&self.agents[host], &before);
        for c in &changes {
            self.note(format!("{}: {c}", self.agents[host].host));
        }
        self.check_agent_step(host, &before)?;
        self.after_agent(host)
    }

    /// What the workers do after the reducer changed something: start a
    /// newly ordered switch, restart probes for a new plan, wake the
    /// drainer, keep the tick running while something soaks.
    fn after_agent(&mut self, host: usize) -> Result<(), Violation> {
        loop {
            let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
            let order: Option<ActivationOrder> = if proc.rx.activation.has_changed().unwrap_or(false) {
                proc.rx.activation.borrow_and_update().clone()
            } else {
                None
            };
            let plan = if proc.rx.probes.has_changed().unwrap_or(false) {
                Some(proc.rx.probes.borrow_and_update().clone())
            } else {
                None
            };
            if order.is_none() && plan.is_none() {
                break;
            }
            if let Some(plan) = plan {
                proc.probe_generation = plan.number;
                proc.probe_rollout = plan.rollout_id.clone();
                if plan.rollout_id.is_some() {
                    self.set_timer(host, Timer::ProbeDeclare(plan.number), 100);
                }
            }
            if let Some(order) = order {
                let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
                if order.number > proc.last_switch_generation {
                    proc.last_switch_generation = order.number;
                    self.start_switch(host, order)?;
                }
            }
        }
        self.wake_drainer(host);
        let Some(rollouts) = self.agents[host].rollouts() else { return Ok(()) };
        let soaking = rollouts.iter().any(|(_, s)| s.record.state == HostState::Soaking);
        if soaking && !self.checker.tick_armed(host) {
            self.checker.set_tick_armed(host, true);
            self.set_timer(host, Timer::Tick, TICK_MS);
        }
        Ok(())
    }

    /// The activation worker: a switch the host provably already made is
    /// only reported; otherwise the (detached) switch runs.
    fn start_switch(&mut self, host: usize, order: ActivationOrder) -> Result<(), Violation> {
        if order.restore_boot_from.is_some() {
            // `activation::restore_boot_default`: the profile (boot default)
            // goes back to the pre-dispatch closure while it still names
            // the failed one; no live switch, no event.
            let m = &mut self.machines[host];
            if order.restore_boot_from.as_ref() == Some(&m.profile) {
                m.profile = order.closure.clone();
            }
            return Ok(());
        }
        let m = &self.machines[host];
        if m.current == order.closure && m.profile == order.closure {
            let outcome = ActivationOutcome::Completed { observed: order.closure.clone() };
            let at = self.clock.now();
            return self
                .feed(host, Input::ActivationFinished { rollout_id: order.rollout_id.clone(), order, outcome, at });
        }
        if !order.rollback {
            self.check_activation(host, &order)?;
        }
        let id = self.next_switch;
        self.next_switch += 1;
        let duration = if self.cfg.scenario.is_some() { 5_000 } else { self.rng.range(3_000, 60_000) };
        let inc = self.agents[host].incarnation;
        self.machines[host].switches.insert(id, (order.closure.clone(), order.rollback, inc));
        self.checker.switch_orders.insert(id, order.clone());
        self.after(duration, Ev::SwitchDone { host, switch: id });
        let at = self.clock.now();
        self.feed(host, Input::ActivationStarted { rollout_id: order.rollout_id, switch_method: "sim".into(), at })
    }

    fn switch_done(&mut self, host: usize, switch: u64) -> Result<(), Violation> {
        let Some((closure, rollback, inc)) = self.machines[host].switches.remove(&switch) else { return Ok(()) };
        let Some(order) = self.checker.switch_orders.remove(&switch) else { return Ok(()) };
        let info = self.book.get(&closure);
        let outcome = if rollback {
            self.set_running(host, &closure);
            ActivationOutcome::Completed { observed: closure.clone() }
        } else if info.switch_fails {
            self.machines[host].profile = closure.clone();
            ActivationOutcome::Failed { exit_code: 1, stderr_tail: "switch-to-configuration: unit failed".into() }
        } else if info.reboot_required {
            self.machines[host].profile = closure.clone();
            let reboot_in = self.rng.range(30_000, 300_000);
            self.after(reboot_in, Ev::Reboot { host });
            ActivationOutcome::Deferred { component: "kernel".into() }
        } else {
            self.set_running(host, &closure);
            ActivationOutcome::Completed { observed: closure.clone() }
        };
        if self.agents[host].incarnation != inc || self.agents[host].proc.is_none() {
            return Ok(()); // the agent that ordered it is gone; a restart re-checks
        }
        let at = self.clock.now();
        self.feed(host, Input::ActivationFinished { rollout_id: order.rollout_id.clone(), order, outcome, at })
    }

    fn set_running(&mut self, host: usize, closure: &Closure) {
        let m = &mut self.machines[host];
        m.profile = closure.clone();
        if &m.current != closure {
            m.current = closure.clone();
            m.activated_ms = self.now_ms;
        }
    }

    fn wake_drainer(&mut self, host: usize) {
        let Some(proc) = self.agents[host].proc.as_ref() else { return };
        if matches!(proc.drain, Drain::Idle(_)) && (proc.journal.lock().pending_len() > 0 || !proc.resend.is_empty()) {
            self.set_timer(host, Timer::Drain, 0);
        }
    }

    fn agent_timer(&mut self, host: usize, inc: u64, timer: Timer, token: u64) -> Result<(), Violation> {
        if self.agents[host].incarnation != inc {
            return Ok(());
        }
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
        match timer {
            Timer::Tick => {
                let soaking = proc.reducer.rollouts().iter().any(|(_, s)| s.record.state == HostState::Soaking);
                if !soaking {
                    self.checker.set_tick_armed(host, false);
                    return Ok(());
                }
                self.set_timer(host, Timer::Tick, TICK_MS);
                let now = self.clock.now();
                self.feed(host, Input::Tick { now })?;
            }
            Timer::Drain => {
                if proc.drain != Drain::Paused(token) {
                    return Ok(());
                }
                self.drain(host)?;
            }
            Timer::Heartbeat => {
                self.heartbeat(host);
            }
            Timer::Poll => {
                if proc.poll != LongPoll::Paused(token) {
                    return Ok(());
                }
                let req = self.send(host, ToCp::Poll);
                if let Some(p) = self.agents[host].proc.as_mut() {
                    p.poll = LongPoll::Polling(req);
                }
            }
            Timer::ProbeDeclare(generation) => {
                if proc.probe_generation != generation {
                    return Ok(());
                }
                let Some(rollout_id) = proc.probe_rollout.clone() else { return Ok(()) };
                let probes: Vec<ProbeDecl> = enforce_topology().into_iter().map(|(d, _)| d).collect();
                let at = self.clock.now();
                self.feed(host, Input::ProbeTopology { rollout_id, probes, at })?;
                for (i, _) in enforce_topology().iter().enumerate() {
                    self.set_timer(host, Timer::ProbeRun(generation, i), 0);
                }
            }
            Timer::ProbeRun(generation, i) => {
                if proc.probe_generation != generation {
                    return Ok(());
                }
                let Some(rollout_id) = proc.probe_rollout.clone() else { return Ok(()) };
                let topo = enforce_topology();
                let Some((decl, interval)) = topo.get(i).cloned() else { return Ok(()) };
                let m = &self.machines[host];
                let info = self.book.get(&m.current);
                let active_secs = (self.now_ms.saturating_sub(m.activated_ms)) / 1000;
                let pass = world::probe_passes(info, decl.mode == ProbeMode::Enforce, active_secs);
                if decl.mode == ProbeMode::Enforce {
                    if let Some(p) = self.agents[host].proc.as_mut() {
                        p.fresh.insert((rollout_id.clone(), decl.name.clone()));
                    }
                }
                let at = self.clock.now();
                let (status, reason) =
                    if pass { (ProbeStatus::Pass, None) } else { (ProbeStatus::Fail, Some("HTTP 503".to_owned())) };
                self.set_timer(host, Timer::ProbeRun(generation, i), interval);
                self.feed(
                    host,
                    Input::ProbeRun { rollout_id, probe_name: decl.name, mode: decl.mode, status, reason, at },
                )?;
            }
        }
        Ok(())
    }

    /// One `drain_once` call starts: Replay-From requests, then batches.
    fn drain(&mut self, host: usize) -> Result<(), Violation> {
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
        let requests = std::mem::take(&mut proc.resend);
        let mut notes = delivery::Notes::default();
        let step = delivery::start_pass(
            &mut proc.journal.lock(),
            &hostname,
            requests,
            &mut proc.blocked,
            self.now_ms,
            &mut notes,
        );
        self.drain_step(host, step, notes)
    }

    /// Acts on what the drainer decided: post, idle (and prune, as
    /// `run_drain_worker` after a successful pass), or back off.
    fn drain_step(
        &mut self,
        host: usize,
        step: Result<delivery::Step, String>,
        notes: delivery::Notes,
    ) -> Result<(), Violation> {
        let hostname = self.agents[host].host.clone();
        self.stats.rejected += notes.dead_lettered;
        self.stats.revived += notes.revived;
        for line in notes.lines {
            self.note(format!("{hostname}: {line}"));
        }
        self.check_dead_lettered_alone(host, &notes.refused_alone)?;
        let step = step.map_err(|e| Violation::new("queue", format!("{hostname}: queue move failed: {e}")))?;
        match step {
            delivery::Step::Send(batch, pass) => {
                let req = self.send(host, ToCp::Events(batch));
                if let Some(p) = self.agents[host].proc.as_mut() {
                    p.drain = Drain::InFlight { req, pass };
                }
            }
            delivery::Step::Done => {
                let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
                proc.drain_backoff.succeed();
                proc.drain = Drain::Idle(0);
                if self.now_ms >= proc.next_prune_ms {
                    proc.next_prune_ms = self.now_ms + PRUNE_EVERY_MS;
                    let _ = proc.journal.lock().prune_acked();
                }
                // Woken while the pass ran (a Replay-From request): again.
                if !proc.resend.is_empty() {
                    self.set_timer(host, Timer::Drain, 0);
                }
            }
            delivery::Step::Pause { why, requeue } => {
                let random = self.rng.next_u64();
                let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
                for (id, after) in requeue {
                    let a = proc.resend.entry(id).or_insert(after);
                    *a = (*a).min(after);
                }
                let delay = proc.drain_backoff.fail(random);
                self.note(format!("{hostname}: delivery paused ({why}); retry in {} ms", delay.as_millis()));
                self.set_timer(host, Timer::Drain, delay.as_millis() as u64);
            }
        }
        Ok(())
    }

    fn heartbeat(&mut self, host: usize) {
        let current = self.machines[host].current.clone();
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return };
        let last_seq = proc.journal.lock().rollouts().into_iter().collect();
        let hb = Heartbeat {
            hostname,
            current_closure: current.clone(),
            booted_closure: Some(current),
            uptime_secs: (self.now_ms - proc.started_ms) / 1000,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_seq,
        };
        let req = self.send(host, ToCp::Heartbeat(Box::new(hb)));
        if let Some(p) = self.agents[host].proc.as_mut() {
            p.heartbeat_req = Some(req);
        }
        self.set_timer(host, Timer::Heartbeat, HEARTBEAT_MS);
    }

    fn agent_failure(&mut self, host: usize, inc: u64, req: u64, why: &str) -> Result<(), Violation> {
        if self.agents[host].incarnation != inc {
            return Ok(());
        }
        let random = self.rng.next_u64();
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
        if matches!(&proc.drain, Drain::InFlight { req: r, .. } if *r == req) {
            let Drain::InFlight { pass, .. } = std::mem::replace(&mut proc.drain, Drain::Idle(0)) else {
                return Ok(());
            };
            let hostname = self.agents[host].host.clone();
            let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
            let mut notes = delivery::Notes::default();
            let why = format!("delivery {why}");
            let step = delivery::on_failure(
                &mut proc.journal.lock(),
                &hostname,
                pass,
                &why,
                &mut proc.blocked,
                self.now_ms,
                &mut notes,
            );
            return self.drain_step(host, step, notes);
        } else if proc.heartbeat_req == Some(req) {
            proc.heartbeat_req = None;
        } else if matches!(&proc.poll, LongPoll::Polling(r) | LongPoll::FetchingManifest(r, _) if *r == req) {
            let delay = proc.poll_backoff.fail(random);
            self.set_timer(host, Timer::Poll, delay.as_millis() as u64);
        }
        Ok(())
    }

    fn agent_receive(&mut self, host: usize, inc: u64, req: u64, msg: ToAgent) -> Result<(), Violation> {
        if self.agents[host].incarnation != inc || self.agents[host].proc.is_none() {
            return Ok(());
        }
        if let ToAgent::Unavailable = msg {
            return self.agent_failure(host, inc, req, "refused (CP down or 503)");
        }
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
        match msg {
            ToAgent::Events(results) => {
                if !matches!(&proc.drain, Drain::InFlight { req: r, .. } if *r == req) {
                    return Ok(()); // a late duplicate of an earlier answer
                }
                let Drain::InFlight { pass, .. } = std::mem::replace(&mut proc.drain, Drain::Idle(0)) else {
                    return Ok(());
                };
                let mut notes = delivery::Notes::default();
                let step = delivery::on_answer(
                    &mut proc.journal.lock(),
                    &hostname,
                    pass,
                    &results,
                    &mut proc.blocked,
                    self.now_ms,
                    &mut notes,
                );
                self.drain_step(host, step, notes)?;
            }
            ToAgent::Heartbeat(replay_from) => {
                if proc.heartbeat_req != Some(req) {
                    return Ok(());
                }
                proc.heartbeat_req = None;
                if let Some((r, at)) = proc.heartbeat_committed {
                    if r == req {
                        proc.heartbeat_seen_ms = at;
                    }
                }
                if !replay_from.is_empty() {
                    // `queue.request_resend` per rollout: the drainer, the one
                    // sender, serves them at its next pass.
                    for (id, after) in &replay_from {
                        let a = proc.resend.entry(id.clone()).or_insert(*after);
                        *a = (*a).min(*after);
                    }
                    let from: Vec<String> = replay_from.iter().map(|(id, n)| format!("{id} after seq {n}")).collect();
                    self.note(format!("{hostname}: heartbeat answer: replay {}", from.join(", ")));
                    self.wake_drainer(host);
                }
            }
            ToAgent::Poll(d) => {
                if proc.poll != LongPoll::Polling(req) {
                    return Ok(());
                }
                proc.poll_backoff.succeed();
                let Some(d) = d else {
                    self.set_timer(host, Timer::Poll, 0);
                    return Ok(());
                };
                // `run_longpoll_worker`: known to the records (answered, so a
                // rollout Pending after a `busy` refusal is offered again
                // once nothing is live) or to the queue (pruned).
                let in_records = {
                    let rollouts = proc.snapshot.borrow();
                    rollouts.get(&d.rollout_id).map(|_| rollouts.answered(&d.rollout_id))
                };
                let known = in_records.unwrap_or_else(|| proc.journal.lock().last_seq(&d.rollout_id) > 0);
                if known {
                    let pause = proc.known_pause_ms;
                    proc.known_pause_ms = (pause * 2).min(5_000);
                    self.set_timer(host, Timer::Poll, pause);
                    return Ok(());
                }
                proc.known_pause_ms = 20;
                let id = d.rollout_id.clone();
                let req = self.send(host, ToCp::Manifest(id));
                if let Some(p) = self.agents[host].proc.as_mut() {
                    p.poll = LongPoll::FetchingManifest(req, d);
                }
            }
            ToAgent::Manifest(envelope) => {
                let LongPoll::FetchingManifest(r, d) = &proc.poll else { return Ok(()) };
                if *r != req {
                    return Ok(());
                }
                let dispatch = (**d).clone();
                let Some(envelope) = envelope else {
                    return self.agent_failure(host, inc, req, "manifest not found");
                };
                self.admit(host, dispatch, envelope)?;
                self.set_timer(host, Timer::Poll, 0);
            }
            ToAgent::Refused(status, code, message) => self.refused_whole(host, req, status, code, message)?,
            ToAgent::Unavailable => {}
        }
        Ok(())
    }

    /// The long-poll worker's admission: verify (shared cache), check,
    /// cache the envelope before the ack, read the running closure.
    fn admit(&mut self, host: usize, dispatch: Dispatch, envelope: cp::SharedEnvelope) -> Result<(), Violation> {
        let verified = verify_shared(&mut self.verify_cache.borrow_mut(), &self.agents[host].trust_keys, &envelope);
        let at = self.clock.now();
        let checked = {
            let agent = &self.agents[host];
            let Some(proc) = agent.proc.as_ref() else { return Ok(()) };
            let rollouts = proc.snapshot.borrow();
            verified.and_then(|(m, key)| check_dispatch(&agent.host, &m, &dispatch, &rollouts).map(|c| (c, m, key)))
        };
        let rollout_id = dispatch.rollout_id.clone();
        let input = match checked {
            Ok((c, manifest, key)) => {
                // `ManifestCache::store`: the envelope and the key that
                // verified it, before the DispatchAck can exist.
                self.agents[host].files.manifests.insert(rollout_id.clone(), (envelope, key));
                self.checker.dispatch_issued.insert((host, rollout_id.clone()), dispatch.issued_at);
                Input::Dispatch {
                    rollout_id,
                    policy: c.policy,
                    target_closure: c.target_closure,
                    soak_secs: c.soak_secs,
                    current_closure: self.machines[host].current.clone(),
                    issued_at: manifest.issued_at,
                    at,
                }
            }
            Err(refusal) => Input::RefuseDispatch {
                rollout_id,
                policy: Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 },
                target_closure: dispatch.target_closure,
                reason: refusal.to_string(),
                at,
            },
        };
        self.feed(host, input)
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

    fn report(&self, violation: Option<&Violation>, quiescent: bool) -> String {
        let mut out = String::new();
        let scenario = self.cfg.scenario.map(|s| format!(", scenario {}", s.as_str())).unwrap_or_default();
        let _ = writeln!(
            out,
            "nixfleet sim: seed {}, {} hosts, faults {}{scenario}, until {}",
            self.cfg.seed,
            self.agents.len(),
            self.cfg.faults.as_str(),
            fmt_ms(self.cfg.until_ms)
        );
        let names = self.faults.names();
        let _ = writeln!(out, "fault kinds: {}", if names.is_empty() { "none".to_owned() } else { names.join(", ") });
        if let Some(v) = violation {
            let _ = writeln!(
                out,
                "\nINVARIANT VIOLATED at step {} (t={}): [{}]",
                self.step,
                fmt_ms(self.now_ms),
                v.invariant
            );
            let _ = writeln!(out, "  {}", v.message);
            let _ = writeln!(out, "\nlast {} events:", self.trace.len());
            for line in &self.trace {
                let _ = writeln!(out, "  {line}");
            }
            let scen = self.cfg.scenario.map(|s| format!(" --scenario {}", s.as_str())).unwrap_or_default();
            let until = match self.cfg.until_ms {
                DEFAULT_UNTIL_MS => String::new(),
                ms if ms % 1000 == 0 => format!(" --until {}s", ms / 1000),
                ms => format!(" --until {ms}ms"),
            };
            let _ = writeln!(
                out,
                "\nreproduce: nixfleet sim --seed {} --hosts {} --faults {}{scen}{until}",
                self.cfg.seed,
                self.agents.len(),
                self.cfg.faults.as_str()
            );
            return out;
        }
        let _ = writeln!(out, "\nrollouts:");
        if let Some(state) = self.cp.state() {
            for (id, r) in &state.rollouts {
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for (h, rec) in &r.records {
                    // As the CP's views count them: a skipped host's outcome.
                    let skipped = rec.state == HostState::Pending && r.skipped.contains(h);
                    *counts.entry(if skipped { "Skipped" } else { rec.state.as_str() }).or_default() += 1;
                }
                let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
                let end = self.rollout_end.get(id).map(|(_, t)| format!(" at {}", fmt_ms(*t))).unwrap_or_default();
                let _ = writeln!(out, "  {id:<14} {:<11}{end}  hosts: {}", r.state.as_str(), counts.join(", "));
                for w in 0..r.manifest.waves.len() {
                    if let Some((start, end)) = self.wave_times.get(&(id.clone(), w)) {
                        // A wave is promoted when it settles; the last one
                        // (or one a halt, cancel or supersession stopped)
                        // settles when its rollout completes, if it does.
                        let end = match (end, r.state, self.rollout_end.get(id)) {
                            (Some(t), _, _) => format!("promoted {}", fmt_ms(*t)),
                            (None, RolloutState::Completed, Some((_, t))) => format!("settled {}", fmt_ms(*t)),
                            (None, state, _) => format!("not settled ({})", state.as_str()),
                        };
                        let _ = writeln!(out, "    wave {w}: opened {}, {end}", fmt_ms(*start));
                    }
                }
            }
        }
        let s = &self.stats;
        let _ = writeln!(
            out,
            "\nfaults injected: {} messages ({} lost, {} duplicated, {} delayed), {} agent crashes, {} reboots, \
             {} CP crashes, {} CP database losses, {} partitions, {} bit rots, {} key rotations{}{}",
            s.msgs,
            s.lost,
            s.duplicated,
            s.slowed,
            s.agent_crashes,
            s.reboots,
            s.cp_crashes,
            s.db_losses,
            s.partitions,
            s.corruptions,
            s.key_rotations,
            if s.refused_whole > 0 { format!(", {} batches refused whole", s.refused_whole) } else { String::new() },
            if s.operator_actions > 0 { format!(", {} operator actions", s.operator_actions) } else { String::new() }
        );
        let _ = writeln!(
            out,
            "work: {} steps, {} agent inputs, {} CP groups, {} publishes, {} events dead-lettered, {} revived",
            self.step, self.n_agent_inputs, s.groups, s.publishes, s.rejected, s.revived
        );
        let _ = writeln!(
            out,
            "invariants: {} checks, 0 violations; {} at {}",
            self.checker.n_checks,
            if quiescent { "quiescent" } else { "stopped" },
            fmt_ms(self.now_ms)
        );
        let _ = writeln!(out, "checked: {}", check::INVARIANTS.join(", "));
        out
    }
}

/// Why `nixfleet sim` could not run (a violation is not an error).
#[derive(Debug)]
pub enum CliError {
    /// Bad input (`--manifest` unreadable or invalid, no hosts): exit 2.
    Input(String),
    /// The run could not be set up (temp dir, the CP's database).
    Setup(String),
}

/// `nixfleet sim`: runs, prints the report on stdout; Ok(false) when an
/// invariant broke (exit 1). `--until` and `--hosts` are checked by clap
/// (`cli::parse_duration`, at least one host).
pub fn run_cli(
    seed: u64,
    hosts: usize,
    faults: FaultProfile,
    scenario: Option<Scenario>,
    manifest: Option<&std::path::Path>,
    until: std::time::Duration,
) -> Result<bool, CliError> {
    if hosts == 0 && manifest.is_none() {
        return Err(CliError::Input("--hosts: a fleet needs at least 1 host".into()));
    }
    let manifest = match manifest {
        Some(p) => {
            let bytes = fs_err::read(p).map_err(|e| CliError::Input(format!("--manifest: {e}")))?;
            Manifest::parse(&bytes).map_err(|e| CliError::Input(format!("--manifest {}: {e}", p.display())))?;
            Some(bytes)
        }
        None => None,
    };
    let dir = tempfile_dir(seed).map_err(CliError::Setup)?;
    let cfg = SimConfig {
        seed,
        n_hosts: hosts,
        faults,
        scenario,
        manifest,
        until_ms: u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
        work_dir: dir.clone(),
        keep_going: false,
    };
    let outcome = run(cfg);
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = outcome.map_err(CliError::Setup)?;
    print!("{}", outcome.text);
    Ok(outcome.violation.is_none())
}

/// A fresh directory for the CP database: tmpfs when there is one (the
/// sim's fsyncs then cost nothing), else the system temp dir.
pub fn tempfile_dir(seed: u64) -> Result<PathBuf, String> {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    for attempt in 0..1000u32 {
        let dir = base.join(format!("nixfleet-sim-{}-{seed}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    Err("cannot create a temp dir for the simulated CP".into())
}
