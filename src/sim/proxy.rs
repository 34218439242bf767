//! The `body-limit` fault: a proxy in front of the simulated CP refuses
//! event batches whose body is over its limit with 413 (as `cp::routes`
//! does over 1 MiB), and the drainer's answer to such a refusal
//! (`post_in_batches` in `agent/workers/net/drain.rs`: halve the batch,
//! dead-letter an event refused on its own), decided by the worker's own
//! `refused_whole` and checked by `refused-whole`.

use super::check::Violation;
use super::{agent::delivery, Drain, Sim, ToAgent};
use crate::wire::EventBatch;

impl Sim {
    /// The proxy's answer to an events request, if it refuses it whole.
    pub(super) fn proxy_refuses(&mut self, req: u64, batch: &EventBatch) -> Option<ToAgent> {
        let limit = self.faults.body_limit.filter(|_| !self.faults_over)?;
        let size = serde_json::to_vec(batch).map_or(0, |b| b.len() as u64);
        if size <= limit {
            return None;
        }
        self.stats.refused_whole += 1;
        let first = batch.events.first().map(|e| (e.rollout_id.clone(), e.event.seq));
        self.checker.refused.insert(req, (batch.events.len(), first));
        let message = format!("request bodies are limited to {limit} bytes");
        Some(ToAgent::Refused(413, "body_too_large".into(), message))
    }

    /// The drainer's request was refused whole: `post_in_batches` decides
    /// with the worker's own `refused_whole`; the checker then sees what
    /// the drainer did about it.
    pub(super) fn refused_whole(
        &mut self,
        host: usize,
        req: u64,
        status: u16,
        code: String,
        message: String,
    ) -> Result<(), Violation> {
        let hostname = self.agents[host].host.clone();
        let Some(proc) = self.agents[host].proc.as_mut() else { return Ok(()) };
        if !matches!(&proc.drain, Drain::InFlight { req: r, .. } if *r == req) {
            return Ok(());
        }
        let Drain::InFlight { pass, .. } = std::mem::replace(&mut proc.drain, Drain::Idle(0)) else { return Ok(()) };
        let status = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
        let error = crate::client::ClientError::Status { status, code, message };
        let (n, first, from_pending) = pass.sending.in_flight();
        let mut notes = delivery::Notes::default();
        let step = match crate::agent::workers::net::refused_whole(&error) {
            Some(why) => delivery::on_refused(
                &mut proc.journal.lock(),
                &hostname,
                pass,
                why,
                &mut proc.blocked,
                self.now_ms,
                &mut notes,
            ),
            None => delivery::on_failure(
                &mut proc.journal.lock(),
                &hostname,
                pass,
                &format!("delivery: {error}"),
                &mut proc.blocked,
                self.now_ms,
                &mut notes,
            ),
        };
        if let Ok(step) = &step {
            self.check_refused_whole(host, req, n, first.filter(|_| from_pending), step)?;
        }
        self.drain_step(host, step, notes)
    }
}
