//! The tick worker: the agent's only source of "time passed". The gates
//! (soak done → Converged, sustained failure → Failed) are pure functions
//! of `now`; the reducer evaluates them on each `Tick`, whose `now` comes
//! from the injected clock so tests and replays control it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::{Shutdown, WorkerExit};
use crate::agent::reducer::Input;
use crate::clock::ClockHandle;

/// The agent ticks every 5 s by default (the gates of `docs/protocol.md` §3). A gate is therefore
/// decided at most 5 s late, at a cost of one cheap input per 5 s when idle.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest interval accepted (shorter ones are raised to it): tokio
/// refuses a zero interval, and gates measured in whole seconds gain nothing
/// from ticking more than ten times a second.
pub const MIN_TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Sends `Tick { now: clock.now() }` at once and then every `interval`
/// (at least [`MIN_TICK_INTERVAL`]) until shutdown or until the reducer is gone. A late tick (a busy
/// reducer holding the send) shifts the schedule rather than bursting
/// (`MissedTickBehavior::Delay`): ticks carry the current time, so a burst
/// would decide nothing more.
pub async fn run_tick_worker(
    interval: Duration,
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut ticker = tokio::time::interval(interval.max(MIN_TICK_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            _ = ticker.tick() => {}
        }
        let tick = Input::Tick { now: clock.now() };
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            sent = inputs.send(tick) => {
                if sent.is_err() {
                    return WorkerExit::ReducerGone;
                }
            }
        }
    }
}
