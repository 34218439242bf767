//! The simulated world, all drawn from the seed: the fleet, the closures
//! and how healthy each is, the rollouts operators publish, and which
//! faults this run injects. Nothing here runs nixfleet code; it is what the
//! real code is run against.

use std::collections::BTreeMap;

use time::Duration;

use super::rng::Rng;
use super::{FaultProfile, Scenario, T0};
use crate::ids::{Closure, Hostname};
use crate::machine::Timestamp;

/// How a closure's services behave once it runs (the enforce probe `svc`
/// and the observe probe `metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Good,
    /// The enforce probe always fails.
    Bad,
    /// The enforce probe fails for this long after activation, then passes.
    Flaky {
        recover_secs: u64,
    },
    /// The enforce probe alternates fail/pass every `period_secs`.
    Flapping {
        period_secs: u64,
    },
    /// Only the observe probe fails (must never gate).
    ObserveBad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosureInfo {
    pub health: Health,
    pub reboot_required: bool,
    pub switch_fails: bool,
}

/// One rollout an operator will publish.
#[derive(Debug, Clone)]
pub struct PlannedRollout {
    pub at_ms: u64,
    pub channel: String,
    pub git_ref: String,
    pub issued_at: Timestamp,
    /// Which release key signs it (index into the sim's keys).
    pub key: usize,
    pub json: Vec<u8>,
}

/// Which fault kinds this run injects, with their intensities.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub net_loss: f64,
    pub net_dup: f64,
    /// Chance that a message takes a long detour (reorders it).
    pub net_slow: f64,
    pub agent_crashes: u32,
    pub cp_crashes: u32,
    pub db_loss: bool,
    pub partitions: u32,
    pub supersede: bool,
    pub second_channel: bool,
    pub rotate_keys: bool,
    pub corrupt: u32,
    /// A proxy in front of the CP refuses event batches whose body is
    /// larger than this many bytes with 413 (until the faults end): the
    /// agent halves them, and dead-letters an event too large on its own.
    pub body_limit: Option<u64>,
    /// An operator runs `cp resume` on a halted rollout (once per rollout).
    pub operator_resume: bool,
    /// An operator runs `cp cancel` on a published rollout at a random time.
    pub operator_cancel: bool,
    pub bad_p: f64,
    pub flaky_p: f64,
    pub flapping_p: f64,
    pub observe_bad_p: f64,
    pub reboot_p: f64,
    pub switch_fail_p: f64,
    /// All injected faults stop here, so "eventually reachable" holds.
    pub end_ms: u64,
}

impl Faults {
    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let flags = [
            (self.net_loss > 0.0, "net-loss"),
            (self.net_dup > 0.0, "net-dup"),
            (self.net_slow > 0.0, "net-reorder"),
            (self.agent_crashes > 0, "agent-crash"),
            (self.cp_crashes > 0, "cp-crash"),
            (self.db_loss, "cp-db-loss"),
            (self.partitions > 0, "partition"),
            (self.supersede, "supersede"),
            (self.second_channel, "two-channels"),
            (self.rotate_keys, "key-rotation"),
            (self.corrupt > 0, "bit-rot"),
            (self.body_limit.is_some(), "body-limit"),
            (self.operator_resume, "operator-resume"),
            (self.operator_cancel, "operator-cancel"),
            (self.bad_p + self.flaky_p + self.flapping_p > 0.0, "failing-probes"),
            (self.reboot_p > 0.0, "reboots"),
            (self.switch_fail_p > 0.0, "failed-switches"),
        ];
        for (on, name) in flags {
            if on {
                out.push(name);
            }
        }
        out
    }

    pub fn for_profile(profile: FaultProfile, rng: &mut Rng) -> Faults {
        match profile {
            FaultProfile::None => Faults { end_ms: 0, ..Faults::default() },
            FaultProfile::Light => Faults {
                net_loss: 0.01,
                net_dup: 0.01,
                net_slow: 0.01,
                agent_crashes: u32::from(rng.chance(0.5)),
                bad_p: 0.05,
                flaky_p: 0.1,
                flapping_p: 0.03,
                observe_bad_p: 0.1,
                reboot_p: 0.1,
                switch_fail_p: 0.03,
                end_ms: 30 * 60_000,
                ..Faults::default()
            },
            FaultProfile::Heavy => {
                // Each run enables a random subset of the disruptive kinds,
                // so different seeds reach different corners first.
                let mut pick = |p: f64| rng.chance(p);
                Faults {
                    net_loss: 0.05,
                    net_dup: 0.03,
                    net_slow: 0.05,
                    agent_crashes: if pick(0.6) { 3 } else { 0 },
                    cp_crashes: if pick(0.4) { 2 } else { 0 },
                    db_loss: pick(0.3),
                    partitions: if pick(0.5) { 3 } else { 0 },
                    supersede: pick(0.4),
                    second_channel: pick(0.3),
                    rotate_keys: pick(0.25),
                    corrupt: if pick(0.25) { 1 } else { 0 },
                    // Drawn from its own stream (`Faults::draw_body_limit`).
                    body_limit: None,
                    // Drawn from their own stream (`Faults::draw_operators`).
                    operator_resume: false,
                    operator_cancel: false,
                    bad_p: 0.1,
                    flaky_p: 0.15,
                    flapping_p: 0.05,
                    observe_bad_p: 0.1,
                    reboot_p: 0.15,
                    switch_fail_p: 0.05,
                    end_ms: 40 * 60_000,
                }
            }
        }
    }
}

/// The seed of the operators' own stream (`draw_operators`, and the
/// delays and choices of their actions in `sim::operators`).
pub const OPERATOR_STREAM: u64 = 0x6f70_6572_6174_6f72;

/// The largest fleet the `body-limit` fault (and the operator actions,
/// for the same reason) is drawn for.
pub const MAX_BODY_LIMIT_HOSTS: usize = 1_000;

impl Faults {
    /// The heavy profile's body limit, from a stream of its own (derived
    /// from the seed, not forked from the run's): adding it shifts no
    /// other choice of a seed, so seeds found before keep their runs.
    /// Only for fleets of at most [`MAX_BODY_LIMIT_HOSTS`]: the fault
    /// exercises each agent's delivery on its own, which a larger fleet
    /// only repeats, and the 10,000-host benchmark (`benches/sim.rs`, seed
    /// 42) keeps the workload its figures were measured on.
    pub fn draw_body_limit(&mut self, profile: FaultProfile, seed: u64, n_hosts: usize) {
        if profile == FaultProfile::Heavy && n_hosts <= MAX_BODY_LIMIT_HOSTS {
            let mut r = Rng::new(seed ^ 0x6f64_795f_6c69_6d69);
            if r.chance(0.25) {
                self.body_limit = Some(r.range(150, 800));
            }
        }
    }

    /// The heavy profile's operator actions (`cp resume`, `cp cancel`),
    /// from a stream of their own like the body limit, and for the same
    /// fleets: no other choice of a seed moves.
    pub fn draw_operators(&mut self, profile: FaultProfile, seed: u64, n_hosts: usize) {
        if profile == FaultProfile::Heavy && n_hosts <= MAX_BODY_LIMIT_HOSTS {
            let mut r = Rng::new(seed ^ OPERATOR_STREAM);
            self.operator_resume = r.chance(0.5);
            self.operator_cancel = r.chance(0.3);
        }
    }
}

pub fn hostname(idx: usize) -> Hostname {
    Hostname::parse(&format!("h{idx:05}")).unwrap_or_else(|_| unreachable_host())
}

fn unreachable_host() -> Hostname {
    // "h" + digits always parses; this keeps the code free of unwrap.
    Hostname::parse("h").unwrap_or_else(|_| unreachable_host())
}

const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A deterministic store path for (release number, role): release 0 is what
/// the fleet runs before any rollout.
pub fn closure(release: u64, role: usize, name: &str) -> Closure {
    let mut r = Rng::new(release.wrapping_mul(1_000_003).wrapping_add(role as u64));
    let hash: String = (0..32).map(|_| NIX_BASE32[r.below(32) as usize] as char).collect();
    let text = format!("/nix/store/{hash}-nixos-system-{name}-g{release}");
    Closure::parse(&text).unwrap_or_else(|_| closure(release + 1, role, "x"))
}

pub fn at(ms: u64) -> Timestamp {
    T0 + Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The role of a host: hosts of one role share a target closure, as a
/// fleet's web servers share one system, spread across waves.
pub fn role_of(host_idx: usize, n_hosts: usize) -> usize {
    let n_roles = (n_hosts / 3).max(1);
    host_idx % n_roles
}

/// The wave of the host at `pos` in a manifest's host list: the first
/// `cut1` in wave 0, up to `cut2` in wave 1, the rest in the last.
fn wave_of(pos: usize, n_waves: usize, cut1: usize, cut2: usize) -> usize {
    match n_waves {
        1 => 0,
        2 => usize::from(pos >= cut1),
        _ if pos < cut1 => 0,
        _ if pos < cut2 => 1,
        _ => 2,
    }
}

/// Builds one manifest's JSON: hosts `hosts`, 1–3 waves, a random policy.
#[allow(clippy::too_many_arguments)]
pub fn manifest_json(
    rng: &mut Rng,
    channel: &str,
    git_ref: &str,
    issued_at: Timestamp,
    release: u64,
    hosts: &[usize],
    n_hosts: usize,
    scenario: Option<Scenario>,
) -> Vec<u8> {
    let n = hosts.len();
    let n_waves = match scenario {
        Some(Scenario::Downgrade) if n >= 2 => 2,
        Some(_) => 1,
        None if n >= 6 => rng.range(2, 3) as usize,
        None => 1,
    };
    let cut1 = (n / 10).max(1);
    let cut2 = cut1 + (n * 3 / 10).max(1);
    let mut waves = Vec::new();
    for w in 0..n_waves {
        let size = match (n_waves, w) {
            (1, _) => n,
            (_, 0) => cut1,
            (2, _) => n - cut1,
            (_, 1) => cut2 - cut1,
            _ => n.saturating_sub(cut2),
        }
        .max(1);
        let soak = match scenario {
            Some(Scenario::Downgrade) => 60,
            Some(_) => 600,
            None => rng.range(60, 300),
        };
        let max_in_flight = match scenario {
            Some(Scenario::Quarantine) => 1,
            Some(_) => size as u64,
            None => rng.range(1, size as u64).max((size as u64) / 2).min(10_000),
        };
        waves.push(serde_json::json!({"name": format!("w{w}"), "soak_secs": soak, "max_in_flight": max_in_flight}));
    }
    let mut host_map = serde_json::Map::new();
    for (pos, &h) in hosts.iter().enumerate() {
        let wave = wave_of(pos, n_waves, cut1, cut2);
        let name = hostname(h);
        let target = closure(release, role_of(h, n_hosts), "sys");
        host_map.insert(name.to_string(), serde_json::json!({"wave": wave, "target_closure": target.as_str()}));
    }
    let on_failure = if scenario.is_some() || rng.chance(0.8) { "rollback-and-halt" } else { "halt" };
    let max_failed = match scenario {
        Some(Scenario::Quarantine) => n as u64,
        Some(_) => 0,
        None => rng.below((n as u64 / 5) + 2),
    };
    let sustained = match scenario {
        Some(_) => 120,
        None => rng.range(30, 120),
    };
    let json = serde_json::json!({
        "schema": 1,
        "channel": channel,
        "ref": git_ref,
        "issued_at": crate::cp::store::ts(issued_at),
        "policy": {"on_health_failure": on_failure, "sustained_failure_secs": sustained, "max_failed_hosts": max_failed},
        "waves": waves,
        "hosts": host_map,
    });
    serde_json::to_vec_pretty(&json).unwrap_or_default()
}

/// Health and activation behaviour of every closure the run can dispatch.
#[derive(Debug, Default)]
pub struct ClosureBook {
    pub info: BTreeMap<Closure, ClosureInfo>,
}

impl ClosureBook {
    pub fn get(&self, c: &Closure) -> ClosureInfo {
        self.info.get(c).copied().unwrap_or(ClosureInfo {
            health: Health::Good,
            reboot_required: false,
            switch_fails: false,
        })
    }

    pub fn draw(&mut self, c: &Closure, faults: &Faults, rng: &mut Rng) {
        if self.info.contains_key(c) {
            return;
        }
        let roll = rng.next_u64() as f64 / u64::MAX as f64;
        let health = if roll < faults.bad_p {
            Health::Bad
        } else if roll < faults.bad_p + faults.flaky_p {
            Health::Flaky { recover_secs: rng.range(10, 150) }
        } else if roll < faults.bad_p + faults.flaky_p + faults.flapping_p {
            Health::Flapping { period_secs: rng.range(20, 90) }
        } else if roll < faults.bad_p + faults.flaky_p + faults.flapping_p + faults.observe_bad_p {
            Health::ObserveBad
        } else {
            Health::Good
        };
        let info = ClosureInfo {
            health,
            reboot_required: rng.chance(faults.reboot_p),
            switch_fails: rng.chance(faults.switch_fail_p),
        };
        self.info.insert(c.clone(), info);
    }
}

/// A probe's result for a closure that became active `since_ms` ago.
pub fn probe_passes(info: ClosureInfo, enforce: bool, active_for_secs: u64) -> bool {
    match (info.health, enforce) {
        (Health::ObserveBad, false) => false,
        (_, false) | (Health::Good | Health::ObserveBad, true) => true,
        (Health::Bad, true) => false,
        (Health::Flaky { recover_secs }, true) => active_for_secs >= recover_secs,
        (Health::Flapping { period_secs }, true) => (active_for_secs / period_secs.max(1)) % 2 == 1,
    }
}
