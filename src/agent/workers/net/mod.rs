//! The workers that talk to the control plane: the long-poll (dispatches
//! in), the drainer (outbound events out, in order) and the heartbeat
//! (liveness out, Replay-From in). None of them changes a record: a
//! dispatch becomes an `Input` for the reducer, and delivery only moves
//! queue files. With the CP unreachable they back off and keep trying while
//! the rest of the agent goes on working from its queue.

mod drain;
mod heartbeat;
mod longpoll;

use std::time::Duration;

use super::Shutdown;

pub use drain::{
    refused_whole, run_drain_worker, DeliveryPaused, BLOCKED_RECHECK, DEFAULT_DRAIN_INTERVAL, PRUNE_EVERY,
};
pub use heartbeat::{run_heartbeat_worker, HeartbeatConfig, DEFAULT_HEARTBEAT_INTERVAL};
pub use longpoll::{run_longpoll_worker, LongPollConfig, MAX_KNOWN_DISPATCH_PAUSE, MIN_KNOWN_DISPATCH_PAUSE};

/// Randomness for jitter; seeded from the OS, falling back to the clock's
/// nanoseconds (jitter only spreads load; it guards no secret).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return u64::from(std::process::id()).rotate_left(17);
    }
    u64::from_le_bytes(bytes)
}

/// Sleeps `delay` unless shutdown comes first (then returns false).
async fn pause(delay: Duration, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        biased;
        () = shutdown.requested() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
