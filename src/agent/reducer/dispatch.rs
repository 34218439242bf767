//! The reducer's decision on a dispatch: refuse it future-dated, `stale`
//! (no downgrade) or `busy` (one live rollout per host), or accept it with
//! the channel history, and the acceptance itself, durable first.

use super::{Input, Journal, Reducer};
use crate::agent::channels::{Accepted, AcceptedDispatch};
use crate::ids::{Closure, RolloutId};
use crate::machine::{EventBody, HostState, Policy, RejectCode, Timestamp};
use crate::wire::MAX_CLOCK_SKEW;

/// Why a verified dispatch is refused, and with what code.
struct Refusal {
    code: RejectCode,
    reason: String,
}

impl<J: Journal> Reducer<J> {
    /// An [`Input::Dispatch`]: ignored when already answered, else refused
    /// or accepted (a durable DispatchRejected or DispatchAck).
    pub(super) async fn dispatch(&mut self, input: Input) {
        let Input::Dispatch { rollout_id, policy, target_closure, soak_secs, current_closure, issued_at, at } = input
        else {
            return;
        };
        let refused_busy_before = match self.rollouts.get(&rollout_id) {
            Some(slot) if slot.record.state != HostState::Pending => {
                tracing::debug!(%rollout_id, "dispatch for a rollout already under way; ignored");
                return;
            }
            Some(slot) => slot.record.last_seq > 0,
            None => false,
        };
        let dispatch = AcceptedDispatch {
            current_closure_at_dispatch: current_closure,
            target_closure,
            soak_secs,
            received_at: at,
        };
        let offered = Accepted { rollout_id: rollout_id.clone(), issued_at, dispatch: Some(Box::new(dispatch)) };
        match self.refusal(&offered, at, refused_busy_before) {
            Some(Some(Refusal { code, reason })) => {
                let target_closure = offered.dispatch.map(|d| d.target_closure);
                let Some(target_closure) = target_closure else { return };
                tracing::warn!(%rollout_id, code = code.as_str(), %reason, "dispatch refused");
                self.rollouts.open(&rollout_id, policy);
                let body = EventBody::DispatchRejected { target_closure, code, reason, rejected_at: at };
                self.feed(&rollout_id, body).await;
            }
            Some(None) => {} // already refused busy: one refusal per rollout
            None => self.accept(offered, policy).await,
        }
    }

    /// `None`: accept; `Some(None)`: ignore (refused `busy` before and a
    /// rollout is still live); `Some(Some(r))`: refuse. Order of checks:
    /// future-dated, stale, busy.
    fn refusal(&self, offered: &Accepted, at: Timestamp, refused_busy_before: bool) -> Option<Option<Refusal>> {
        let (rollout_id, issued_at) = (&offered.rollout_id, offered.issued_at);
        if issued_at > at + MAX_CLOCK_SKEW {
            let reason = format!(
                "manifest of {rollout_id} is issued at {issued_at}, more than {} s ahead of this host's clock ({at})",
                MAX_CLOCK_SKEW.whole_seconds()
            );
            return Some(Some(Refusal { code: RejectCode::Refused, reason }));
        }
        if let Err(why) = self.rollouts.channels().check(offered) {
            return Some(Some(Refusal { code: RejectCode::Stale, reason: why.to_string() }));
        }
        let (live_id, live) = self.rollouts.live(Some(rollout_id))?;
        if refused_busy_before {
            tracing::debug!(%rollout_id, live = %live_id, "dispatch already refused busy; ignored");
            return Some(None);
        }
        let reason = format!(
            "busy: rollout {live_id} is {} on this host (one live rollout per host); offer {rollout_id} again when it is over",
            live.record.state
        );
        Some(Some(Refusal { code: RejectCode::Busy, reason }))
    }

    /// Accepted: the no-downgrade history, with the acceptance itself, is
    /// durable BEFORE the DispatchAck exists, so no restart, pruning or
    /// rotted record forgets it.
    async fn accept(&mut self, offered: Accepted, policy: Policy) {
        let rollout_id = offered.rollout_id.clone();
        let Some(dispatch) = offered.dispatch.clone() else { return };
        let channels = self.rollouts.channels().with(offered);
        if &channels != self.rollouts.channels() {
            self.save_channels_until_durable(&channels).await;
            self.rollouts.set_channels(channels);
        }
        self.rollouts.open(&rollout_id, policy);
        let AcceptedDispatch { current_closure_at_dispatch, target_closure, soak_secs, received_at } = *dispatch;
        let body = EventBody::Activate { current_closure_at_dispatch, target_closure, soak_secs, received_at };
        self.feed(&rollout_id, body).await;
    }

    /// An [`Input::RefuseDispatch`] (admission refused it): journaled once.
    pub(super) async fn refuse_dispatch(
        &mut self,
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        reason: String,
        at: Timestamp,
    ) {
        if !self.rollouts.open(&rollout_id, policy) {
            return;
        }
        tracing::warn!(%rollout_id, %reason, "dispatch refused");
        let body = EventBody::DispatchRejected { target_closure, code: RejectCode::Refused, reason, rejected_at: at };
        self.feed(&rollout_id, body).await;
    }
}
