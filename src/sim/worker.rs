//! The agent's workers as decisions (the real ones are tokio tasks around
//! timers and processes, see docs/simulator.md "Seams"): process start and
//! kill, the reducer's inputs, activation (`after_agent`, `start_switch`),
//! timers (`agent_timer`: tick, heartbeat, long-poll, probes).

use super::*;

impl Sim {
    pub(super) fn crash_agent(&mut self, host: usize, why: &str) {
        if self.agents[host].proc.take().is_some() {
            self.stats.agent_crashes += 1;
            self.note(format!("{}: agent {why}", self.agents[host].host));
        }
        self.parked.remove(&host);
    }

    pub(super) fn start_agent(&mut self, host: usize) -> Result<(), Violation> {
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

    pub(super) fn set_timer(&mut self, host: usize, timer: Timer, delay_ms: u64) -> u64 {
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
    pub(super) fn feed(&mut self, host: usize, input: Input) -> Result<(), Violation> {
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
    pub(super) fn after_agent(&mut self, host: usize) -> Result<(), Violation> {
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
                proc.probe_plan_number = plan.number;
                proc.probe_rollout = plan.rollout_id.clone();
                if plan.rollout_id.is_some() {
                    self.set_timer(host, Timer::ProbeDeclare(plan.number), 100);
                }
            }
            if let Some(order) = order {
                let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
                if order.number > proc.last_switch_order {
                    proc.last_switch_order = order.number;
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
    pub(super) fn start_switch(&mut self, host: usize, order: ActivationOrder) -> Result<(), Violation> {
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

    pub(super) fn switch_done(&mut self, host: usize, switch: u64) -> Result<(), Violation> {
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

    pub(super) fn set_running(&mut self, host: usize, closure: &Closure) {
        let m = &mut self.machines[host];
        m.profile = closure.clone();
        if &m.current != closure {
            m.current = closure.clone();
            m.activated_ms = self.now_ms;
        }
    }

    pub(super) fn agent_timer(&mut self, host: usize, inc: u64, timer: Timer, token: u64) -> Result<(), Violation> {
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
            Timer::ProbeDeclare(number) => {
                if proc.probe_plan_number != number {
                    return Ok(());
                }
                let Some(rollout_id) = proc.probe_rollout.clone() else { return Ok(()) };
                let probes: Vec<ProbeDecl> = enforce_topology().into_iter().map(|(d, _)| d).collect();
                let at = self.clock.now();
                self.feed(host, Input::ProbeTopology { rollout_id, probes, at })?;
                for (i, _) in enforce_topology().iter().enumerate() {
                    self.set_timer(host, Timer::ProbeRun(number, i), 0);
                }
            }
            Timer::ProbeRun(number, i) => {
                if proc.probe_plan_number != number {
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
                self.set_timer(host, Timer::ProbeRun(number, i), interval);
                self.feed(
                    host,
                    Input::ProbeRun { rollout_id, probe_name: decl.name, mode: decl.mode, status, reason, at },
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn heartbeat(&mut self, host: usize) {
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
}
