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
}
