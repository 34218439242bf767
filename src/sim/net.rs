//! The simulated network: loss, duplication, detours, partitions and
//! request timeouts between an agent and the CP.

use super::*;

impl Sim {
    pub(super) fn unreachable(&self, host: usize) -> bool {
        self.partitioned.contains(&host) || self.cp_partitioned
    }

    /// Delay of one message and of its duplicate, if any; None if the
    /// network drops it.
    pub(super) fn transit(&mut self, host: usize) -> Option<(u64, Option<u64>)> {
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
    pub(super) fn deliver<M: Clone>(&mut self, host: usize, msg: M, ev: impl Fn(M) -> Ev) {
        let Some((delay, again)) = self.transit(host) else { return };
        match again {
            Some(later) => {
                self.after(delay, ev(msg.clone()));
                self.after(later, ev(msg));
            }
            None => self.after(delay, ev(msg)),
        }
    }

    pub(super) fn send(&mut self, host: usize, msg: ToCp) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        let inc = self.agents[host].incarnation;
        let timeout =
            if matches!(msg, ToCp::Poll) { LONG_POLL_WAIT_MS + REQUEST_TIMEOUT_MS } else { REQUEST_TIMEOUT_MS };
        self.after(timeout, Ev::Timeout { host, inc, req });
        self.deliver(host, msg, |msg| Ev::ToCp { host, inc, req, msg });
        req
    }

    pub(super) fn reply(&mut self, host: usize, inc: u64, req: u64, msg: ToAgent) {
        self.deliver(host, msg, |msg| Ev::ToAgent { host, inc, req, msg });
    }
}
