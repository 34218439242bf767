//! [`ServeConfig`], what `cp serve` is started with, and the defaults of
//! its limits: its own module, a leaf (it names neither the server nor the
//! routes), so the server (which runs the routes), the routes (which read
//! it) and the command line (whose defaults these are) all depend on it,
//! and not on each other.

use std::path::PathBuf;
use std::time::Duration;

use crate::sign::PublicKey;

/// A client must send its request head within this; bounds slowloris.
/// hyper restarts the same timer when a kept-alive connection goes idle
/// after an answer, so it is also the idle keep-alive timeout (agents open
/// one connection per request, and a request head is a few hundred bytes).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// A request body must arrive whole within this (a body dribbled a byte at
/// a time used to hold its connection and memory forever; only the head had
/// a deadline). A 1 MiB event batch needs 35 KB/s, a 16 MiB manifest 280 KB/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections held at once (lowered to fit the descriptor limit, see
/// `conn::ConnLimits::fitted`); beyond it `conn::OPERATOR_RESERVE_CONNECTIONS`
/// more serve operators only, then accepting pauses until one closes (the
/// kernel backlog holds the rest). 10,000 idle long-polls fit with room.
pub const MAX_CONNECTIONS: usize = 50_000;
/// Default cap of connections held at once from one client address: one
/// client (or one NAT) cannot take every descriptor of the CP. Fleets that
/// reach the CP through one NAT raise it with `--max-connections-per-address`.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;

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
    /// keep-alive timeout ([`HEADER_READ_TIMEOUT`]).
    pub header_timeout: Duration,
    /// A request body must arrive whole within this
    /// ([`BODY_READ_TIMEOUT`]).
    pub body_timeout: Duration,
    /// Connections held at once, before the descriptor limit lowers it
    /// ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Connections held at once from one client address
    /// ([`MAX_CONNECTIONS_PER_ADDRESS`]).
    pub max_connections_per_address: usize,
    /// Events of a (host, rollout) between two record checkpoints
    /// ([`super::store::MAX_EVENTS_SINCE_CHECKPOINT`]).
    pub checkpoint_events: u64,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            header_timeout: HEADER_READ_TIMEOUT,
            body_timeout: BODY_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_address: MAX_CONNECTIONS_PER_ADDRESS,
            checkpoint_events: super::store::MAX_EVENTS_SINCE_CHECKPOINT,
        }
    }
}
