//! [`ServeConfig`], what `cp serve` is started with: its own module so the
//! server (which runs the routes) and the routes (which read it) both
//! depend on it, and not on each other.

use std::path::PathBuf;
use std::time::Duration;

use crate::sign::PublicKey;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub db_path: PathBuf,
    pub trust_keys: Vec<PublicKey>,
    /// The agents' heartbeat interval; 3 missed ones mark a host unreachable.
    pub heartbeat_interval_secs: u64,
    /// How long in-flight requests may take to finish after a shutdown.
    pub grace: Duration,
    /// Time and connection limits of the HTTP server.
    pub limits: ServeLimits,
}

/// The server's time, connection and event-log limits (`cp serve` flags; the
/// defaults and their reasons are the constants they name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// A request head must arrive within this; hyper restarts the same
    /// timer when a kept-alive connection goes idle, so it is also the idle
    /// keep-alive timeout ([`super::server::HEADER_READ_TIMEOUT`]).
    pub header_timeout: Duration,
    /// A request body must arrive whole within this
    /// ([`super::routes::BODY_READ_TIMEOUT`]).
    pub body_timeout: Duration,
    /// Connections held at once, before the descriptor limit lowers it
    /// ([`super::server::MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Connections held at once from one client address
    /// ([`super::conn::MAX_CONNECTIONS_PER_ADDRESS`]).
    pub max_connections_per_address: usize,
    /// Events of a (host, rollout) between two record checkpoints
    /// ([`super::store::MAX_EVENTS_SINCE_CHECKPOINT`]).
    pub checkpoint_events: u64,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            header_timeout: super::server::HEADER_READ_TIMEOUT,
            body_timeout: super::routes::BODY_READ_TIMEOUT,
            max_connections: super::server::MAX_CONNECTIONS,
            max_connections_per_address: super::conn::MAX_CONNECTIONS_PER_ADDRESS,
            checkpoint_events: super::store::MAX_EVENTS_SINCE_CHECKPOINT,
        }
    }
}
