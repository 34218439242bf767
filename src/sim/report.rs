//! The summary a run prints (deterministic: the same seed, the same bytes).

use super::*;

/// Simulated time as `hh:mm:ss.mmm`.
pub(super) fn fmt_ms(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, (s / 60) % 60, s % 60, ms % 1000)
}

impl Sim {
    pub(super) fn report(&self, violation: Option<&Violation>, quiescent: bool) -> String {
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
            self.report_violation(&mut out, v);
            return out;
        }
        self.report_rollouts(&mut out);
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

    /// The violation, the trace that led there, and the command that
    /// reproduces it.
    fn report_violation(&self, out: &mut String, v: &Violation) {
        let _ =
            writeln!(out, "\nINVARIANT VIOLATED at step {} (t={}): [{}]", self.step, fmt_ms(self.now_ms), v.invariant);
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
    }

    /// Each rollout's outcome and host counts, and its waves' timing.
    fn report_rollouts(&self, out: &mut String) {
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
    }
}
