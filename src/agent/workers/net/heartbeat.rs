//! The heartbeat worker: liveness out, Replay-From requests in (handed to
//! the drainer, the one sender of events).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use super::super::{Shutdown, WorkerExit};
use crate::agent::activation::resolve_current_system;
use crate::agent::journal::SharedQueue;
use crate::agent::net::CpApi;
use crate::client::ClientError;
use crate::wire::Heartbeat;

/// The default heartbeat interval: liveness once a minute.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// What the heartbeat reports about the host.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub interval: Duration,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
}

/// Whether a published manifest names this host, as the last heartbeat's
/// answer told (404 `unknown_host`: the CP stores nothing for a host no
/// manifest names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    Unknown,
    Yes,
    No,
}

impl Named {
    /// Logs a change once: a host set up before its first rollout is named
    /// nowhere for a while, which is normal, not a failure each interval.
    fn set(&mut self, now: Named) {
        match (*self, now) {
            (before, Named::No) if before != Named::No => tracing::info!(
                "heartbeat: this host is not in any published manifest yet, so the control plane keeps no record \
                 of it (404 unknown_host); heartbeating quietly until a manifest names it"
            ),
            (Named::No, Named::Yes) => {
                tracing::info!("heartbeat: a published manifest now names this host; the control plane records it")
            }
            _ => {}
        }
        *self = now;
    }
}

/// 404 `unknown_host`: no published manifest names this host.
fn is_unknown_host(e: &ClientError) -> bool {
    matches!(e, ClientError::Status { status, code, .. } if *status == StatusCode::NOT_FOUND && code == "unknown_host")
}

/// Sends liveness and `last_seq` per rollout; hands what the CP asks to be
/// re-sent (Replay-From) to the drainer, the one sender of events. It never
/// takes state from the CP, and never waits for the queue (it reads the
/// queue's copy of the last seqs), so an fsync in progress cannot delay it.
pub async fn run_heartbeat_worker(
    api: CpApi,
    cfg: HeartbeatConfig,
    queue: SharedQueue,
    started: Instant,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut named = Named::Unknown;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            _ = ticker.tick() => {}
        }
        let Ok(current_closure) = resolve_current_system(&cfg.current_system) else {
            tracing::warn!(path = %cfg.current_system.display(), "cannot resolve current-system; heartbeat skipped");
            continue;
        };
        let hb = Heartbeat {
            hostname: api.hostname().clone(),
            current_closure,
            booted_closure: resolve_current_system(&cfg.booted_system).ok(),
            uptime_secs: started.elapsed().as_secs(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_seq: queue.last_seqs(),
        };
        match api.heartbeat(&hb).await {
            Err(e) if is_unknown_host(&e) => named.set(Named::No),
            Ok(answer) => {
                named.set(Named::Yes);
                for (rollout_id, after) in answer.replay_from {
                    tracing::info!(%rollout_id, after, "the control plane lacks events; asking the drainer to re-send");
                    queue.request_resend(rollout_id, after);
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
