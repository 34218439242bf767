//! Scheduled faults: when agents and the CP crash, partitions, key
//! rotation, and bit rot in a queue file (the other faults are drawn per
//! message or per closure in `net` and `world`).

use super::*;

impl Sim {
    pub(super) fn schedule_faults(&mut self) {
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

    pub(super) fn corrupt(&mut self, host: usize, first: bool, tries: u32) -> Result<(), Violation> {
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

    pub(super) fn cp_crash(&mut self, down_ms: u64, lose_db: bool) {
        if self.faults_over || !self.cp.is_up() {
            return;
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

    pub(super) fn agent_crash(&mut self, host: usize, down_ms: u64) {
        if self.faults_over && down_ms > 0 {
            return;
        }
        self.crash_agent(host, "killed");
        self.after(down_ms, Ev::AgentStart { host });
    }

    /// The machine reboots: the agent dies, switches in progress die with
    /// it, and the boot default becomes what runs.
    pub(super) fn reboot(&mut self, host: usize) {
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

    pub(super) fn partition(&mut self, host: Option<usize>, ms: u64) {
        if self.faults_over {
            return;
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
}
