//! Building a run: the fleet, the planned rollouts, the closures'
//! behaviour, and each scenario's set-up.

use super::*;

impl Sim {
    pub(super) fn new(cfg: SimConfig) -> Result<Sim, String> {
        let mut rng = Rng::new(cfg.seed);
        let net_rng = rng.fork();
        let mut fault_rng = rng.fork();
        let faults = Faults::for_profile(cfg.faults, &mut fault_rng);
        let clock = ClockHandle::manual(T0);
        let keys: Vec<SigningKey> = (0..2u8).map(|k| SigningKey::from_seed(&[k + 11; 32])).collect();
        let cp_keys: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
        std::fs::create_dir_all(&cfg.work_dir).map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
        let cp = SimCp::new(&cfg.work_dir, clock.clone(), cp_keys);
        let mut plan_rng = rng.fork();
        let Fleet { host_names, mut plan, faults } = fleet(&cfg, faults)?;
        generated_rollouts(&mut plan, &mut plan_rng, &faults, host_names.len(), &cfg);
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
            wave_seen: BTreeMap::new(),
            quarantine_seen: 0,
            rollout_end: BTreeMap::new(),
            faults_over: false,
            signing_key: 0,
            op_rng: Rng::new(cfg.seed ^ world::OPERATOR_STREAM ^ 1),
            halts_seen: BTreeSet::new(),
            cfg,
        };
        sim.add_hosts(host_names);
        sim.draw_closures();
        Ok(sim)
    }

    /// One agent and one machine per host, all on the base closure.
    fn add_hosts(&mut self, host_names: Vec<Hostname>) {
        let n_hosts = host_names.len();
        let trust = vec![self.keys[0].public_key()];
        for (idx, host) in host_names.into_iter().enumerate() {
            let role = world::role_of(idx, n_hosts);
            let base = world::closure(0, role, "sys");
            self.machines.push(Machine {
                current: base.clone(),
                profile: base,
                activated_ms: 0,
                switches: BTreeMap::new(),
                up: true,
            });
            self.host_idx.insert(host.clone(), idx);
            self.agents.push(SimAgent::new(idx, host, trust.clone()));
        }
    }

    /// Closure behaviour for every target of every planned rollout, then
    /// the scenario's own.
    fn draw_closures(&mut self) {
        let mut book_rng = self.rng.fork();
        let mut targets = Vec::new();
        for p in &self.plan {
            if let Ok(m) = Manifest::parse(&p.json) {
                self.issued.insert(m.rollout_id.clone(), m.issued_at);
                for e in m.hosts.values() {
                    targets.push(e.target_closure.clone());
                }
            }
        }
        for t in &targets {
            self.book.draw(t, &self.faults, &mut book_rng);
        }
        self.setup_scenario(&targets);
    }

    pub(super) fn setup_scenario(&mut self, targets: &[Closure]) {
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
}

/// The fleet's names and what is published first, and the faults as a
/// scenario or the profile's own streams leave them.
struct Fleet {
    host_names: Vec<Hostname>,
    plan: Vec<PlannedRollout>,
    faults: Faults,
}

fn fleet(cfg: &SimConfig, mut faults: Faults) -> Result<Fleet, String> {
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
    if let Some(s) = cfg.scenario {
        // Scenarios keep the network quiet unless they need it.
        faults = Faults { end_ms: 3_600_000, ..Faults::default() };
        if s == Scenario::SupersedeMidSoak {
            faults.supersede = true;
        }
    } else {
        faults.draw_body_limit(cfg.faults, cfg.seed, n_hosts);
        faults.draw_operators(cfg.faults, cfg.seed, n_hosts);
    }
    Ok(Fleet { host_names, plan, faults })
}

/// The generated rollouts: `stable@r1` (unless a manifest was given), and
/// what the faults or the scenario add (a superseding `stable@r2`, `edge@e1`
/// on a second channel). Release numbers: 1 for r1, 2 for r2, 3 for e1.
fn generated_rollouts(
    plan: &mut Vec<PlannedRollout>,
    plan_rng: &mut Rng,
    faults: &Faults,
    n_hosts: usize,
    cfg: &SimConfig,
) {
    let all: Vec<usize> = (0..n_hosts).collect();
    let scenario = cfg.scenario;
    let mut add = |rng: &mut Rng, at_ms: u64, channel: &str, git_ref: &str, release: u64, hosts: &[usize]| {
        let issued_at = world::at(at_ms.saturating_sub(500));
        let json = world::manifest_json(rng, channel, git_ref, issued_at, release, hosts, n_hosts, scenario);
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
        add(plan_rng, 1_000, "stable", "r1", 1, &all);
    }
    if faults.supersede && scenario.is_none() {
        let at = plan_rng.range(120_000, 1_500_000);
        add(plan_rng, at, "stable", "r2", 2, &all);
    }
    if faults.second_channel {
        let subset: Vec<usize> = all.iter().copied().filter(|_| plan_rng.chance(0.5)).collect();
        if !subset.is_empty() {
            let at = plan_rng.range(60_000, 900_000);
            add(plan_rng, at, "edge", "e1", 3, &subset);
        }
    }
    match scenario {
        Some(Scenario::SupersedeMidSoak) => add(plan_rng, 90_000, "stable", "r2", 2, &all),
        Some(Scenario::Downgrade) => add(plan_rng, 30_000, "stable", "r2", 2, &all[1.min(all.len())..]),
        _ => {}
    }
}
