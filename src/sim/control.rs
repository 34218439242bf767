//! The control plane's side of the loop: requests in, groups through the
//! real writer, answers out, long-polls woken.

use super::*;

impl Sim {
    /// The writer takes whatever arrived while its previous commit was
    /// flushing; the sim models that flush as a window that grows with the
    /// fleet (1 ms per 40 hosts, 1–250 ms: a 10,000-host group plans over
    /// every host of every rollout, several ms of CPU in the real writer),
    /// so a large fleet commits in groups as the real writer does under
    /// load, not once per request. Coarser windows mean fewer interleavings
    /// per simulated second, never another code path.
    pub(super) fn schedule_commit(&mut self) {
        if !self.cp_commit_scheduled {
            self.cp_commit_scheduled = true;
            let window = (self.agents.len() as u64 / 40).clamp(1, 250);
            self.after(window, Ev::CpCommit);
        }
    }

    pub(super) fn cp_receive(&mut self, host: usize, inc: u64, req: u64, msg: ToCp) {
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

    pub(super) fn cp_commit(&mut self) -> Result<(), Violation> {
        self.cp_commit_scheduled = false;
        self.cp.check_committed()?;
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
        self.cp.check_committed()?;
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
    pub(super) fn after_cp_group(&mut self) {
        let Some(state) = self.cp.state() else { return };
        let now = world::at(self.now_ms);
        // The hosts whose parked long-poll the real board would wake.
        let mut offered: Vec<usize> =
            self.cp.take_woken().iter().filter_map(|h| self.host_idx.get(h).copied()).collect();
        let mut waves = Vec::new();
        let mut ends = Vec::new();
        for (id, r) in &state.rollouts {
            if self.wave_seen.get(id) != Some(&r.current_wave) {
                waves.push((id.clone(), r.current_wave));
            }
            if !self.rollout_end.contains_key(id)
                && matches!(
                    r.state,
                    crate::cp::planner::RolloutState::Completed
                        | crate::cp::planner::RolloutState::Halted
                        | crate::cp::planner::RolloutState::Superseded
                        | crate::cp::planner::RolloutState::Cancelled
                )
            {
                ends.push((id.clone(), r.state.as_str().to_owned()));
            }
        }
        // Read only after a change (the quarantine may hold hundreds of
        // closures, and most groups leave it alone).
        if self.quarantine_seen != state.quarantine_changed {
            self.quarantine_seen = state.quarantine_changed;
            for (channel, closures) in &state.quarantine {
                let since = self.checker.quarantined_at.entry(channel.clone()).or_default();
                for c in closures {
                    since.entry(c.clone()).or_insert(now);
                }
            }
        }
        for (id, wave) in waves {
            self.wave_seen.insert(id.clone(), wave);
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

    /// The CP's safety-net tick (`Command::Tick`), every 15 s.
    pub(super) fn cp_tick(&mut self) {
        if self.cp.is_up() {
            self.cp_inbox.push((usize::MAX, 0, 0, ToCp::Poll));
            self.schedule_commit();
        }
        self.after(CP_TICK_MS, Ev::CpTick);
    }

    pub(super) fn cp_restart(&mut self, republish: bool) -> Result<(), Violation> {
        if let Err(e) = self.cp.start() {
            return Err(Violation::new("cp-restart", format!("the CP does not start: {e}")));
        }
        self.note("CP started (writer reopened the database)".into());
        self.check_replay("after a CP restart")?;
        if republish {
            self.republish();
        }
        Ok(())
    }

    /// A parked long-poll's 60 s are up: answered with whatever stands.
    pub(super) fn poll_expire(&mut self, host: usize, req: u64) {
        if self.parked.get(&host).is_some_and(|(_, r)| *r == req) {
            if let Some((inc, req)) = self.parked.remove(&host) {
                let d = self.cp.dispatch_for(&self.agents[host].host).map(Box::new);
                self.reply(host, inc, req, ToAgent::Poll(d));
            }
        }
    }
}
