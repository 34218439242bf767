//! What reaches an agent from the CP (`agent_receive`): event answers for
//! the drainer, heartbeat answers, dispatches (admitted as `admit` does),
//! manifests; and the drainer's passes.

use super::*;

impl Sim {
    pub(super) fn wake_drainer(&mut self, host: usize) {
        let Some(proc) = self.agents[host].proc.as_ref() else { return };
        if matches!(proc.drain, Drain::Idle(_)) && (proc.journal.lock().pending_len() > 0 || !proc.resend.is_empty()) {
            self.set_timer(host, Timer::Drain, 0);
        }
    }

    /// One `drain_once` call starts: Replay-From requests, then batches.
    pub(super) fn drain(&mut self, host: usize) -> Result<(), Violation> {
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
    pub(super) fn drain_step(
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

    pub(super) fn agent_failure(&mut self, host: usize, inc: u64, req: u64, why: &str) -> Result<(), Violation> {
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

    pub(super) fn agent_receive(&mut self, host: usize, inc: u64, req: u64, msg: ToAgent) -> Result<(), Violation> {
        if self.agents[host].incarnation != inc || self.agents[host].proc.is_none() {
            return Ok(());
        }
        match msg {
            ToAgent::Unavailable => self.agent_failure(host, inc, req, "refused (CP down or 503)"),
            ToAgent::Events(results) => self.on_events_answer(host, req, &results),
            ToAgent::Heartbeat(replay_from) => {
                self.on_heartbeat_answer(host, req, &replay_from);
                Ok(())
            }
            ToAgent::Poll(d) => {
                self.on_poll_answer(host, req, d);
                Ok(())
            }
            ToAgent::Manifest(envelope) => self.on_manifest(host, inc, req, envelope),
            ToAgent::Refused(status, code, message) => self.refused_whole(host, req, status, code, message),
        }
    }

    /// The drainer's batch answered: `drain_once`'s bookkeeping.
    fn on_events_answer(&mut self, host: usize, req: u64, results: &[EventResult]) -> Result<(), Violation> {
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
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
            results,
            &mut proc.blocked,
            self.now_ms,
            &mut notes,
        );
        self.drain_step(host, step, notes)
    }

    /// A heartbeat answered, with the CP's Replay-From per rollout.
    fn on_heartbeat_answer(&mut self, host: usize, req: u64, replay_from: &BTreeMap<RolloutId, u64>) {
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return };
        if proc.heartbeat_req != Some(req) {
            return;
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
            for (id, after) in replay_from {
                let a = proc.resend.entry(id.clone()).or_insert(*after);
                *a = (*a).min(*after);
            }
            let from: Vec<String> = replay_from.iter().map(|(id, n)| format!("{id} after seq {n}")).collect();
            self.note(format!("{hostname}: heartbeat answer: replay {}", from.join(", ")));
            self.wake_drainer(host);
        }
    }

    /// A long-poll answered: nothing (poll again), a dispatch already
    /// known (pause, doubling), or a new one (fetch its manifest).
    fn on_poll_answer(&mut self, host: usize, req: u64, d: Option<Box<Dispatch>>) {
        let Some(proc) = self.agents[host].proc.as_mut() else { return };
        if proc.poll != LongPoll::Polling(req) {
            return;
        }
        proc.poll_backoff.succeed();
        let Some(d) = d else {
            self.set_timer(host, Timer::Poll, 0);
            return;
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
            return;
        }
        proc.known_pause_ms = 20;
        let id = d.rollout_id.clone();
        let req = self.send(host, ToCp::Manifest(id));
        if let Some(p) = self.agents[host].proc.as_mut() {
            p.poll = LongPoll::FetchingManifest(req, d);
        }
    }

    /// The dispatch's manifest fetched: admitted (or not), then poll again.
    fn on_manifest(
        &mut self,
        host: usize,
        inc: u64,
        req: u64,
        envelope: Option<cp::SharedEnvelope>,
    ) -> Result<(), Violation> {
        let Some(proc) = self.agents[host].proc.as_ref() else { return Ok(()) };
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
        Ok(())
    }

    /// The long-poll worker's admission: verify (shared cache), check,
    /// cache the envelope before the ack, read the running closure.
    pub(super) fn admit(
        &mut self,
        host: usize,
        dispatch: Dispatch,
        envelope: cp::SharedEnvelope,
    ) -> Result<(), Violation> {
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
}
