//! The control plane's commands (`nixfleet cp …`): serving, and the
//! operator commands that talk to a running control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::{parse_duration, parse_secs};

#[derive(Debug, Subcommand)]
pub enum CpCommand {
    /// Serve the control plane: SQLite event log, wave planner, long-polls.
    Serve(CpServeArgs),
    /// Publish a signed rollout manifest (a DSSE envelope).
    Publish(CpPublishArgs),
    /// Show fleet, rollout or host status.
    Status(CpStatusArgs),
    /// Clear a rollout's halt (after a fix): dispatches continue; the hosts
    /// failed so far no longer count against max_failed_hosts.
    Resume(CpRolloutActionArgs),
    /// Cancel a rollout: no new dispatches; hosts in flight finish.
    Cancel(CpRolloutActionArgs),
    /// Take a closure off a channel's quarantine.
    Unquarantine(CpUnquarantineArgs),
    /// Dry run of a signed manifest against the fleet; changes nothing.
    Plan(CpPlanArgs),
    /// Consistent online copy of a (live) control-plane database.
    Backup(CpBackupArgs),
}

#[derive(Debug, clap::Args)]
pub struct CpRolloutActionArgs {
    #[command(flatten)]
    pub client: CpClientArgs,
    /// The rollout, channel@ref.
    pub rollout: String,
    /// Why (recorded with who and when in the control plane's log).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct CpUnquarantineArgs {
    #[command(flatten)]
    pub client: CpClientArgs,
    /// The channel the closure is quarantined on.
    #[arg(long)]
    pub channel: String,
    /// The quarantined closure (a store path).
    pub closure: String,
    /// Why (recorded with who and when in the control plane's log).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct CpPlanArgs {
    #[command(flatten)]
    pub client: CpClientArgs,
    /// The signed manifest (DSSE envelope JSON, from `nixfleet manifest sign`).
    pub envelope: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CpBackupArgs {
    /// The control plane's database (may be in use by `cp serve`).
    #[arg(long)]
    pub db: PathBuf,
    /// Where to write the copy; an existing file is never overwritten.
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CpServeArgs {
    /// Address to listen on; port 0 picks a free port (see --addr-file).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// The SQLite database (created if missing).
    #[arg(long)]
    pub db: PathBuf,
    /// Public key(s) that may sign rollout manifests (repeatable).
    #[arg(long = "trust-key", required = true)]
    pub trust_key: Vec<PathBuf>,
    /// The CP's certificate chain (PEM, leaf first), e.g. from `nixfleet pki
    /// issue --role cp`. With --tls-key and --client-ca the CP speaks mutual
    /// TLS only and may listen on any address; SIGHUP re-reads all three.
    #[arg(long, requires_all = ["tls_key", "client_ca"], value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires_all = ["tls_cert", "client_ca"], value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA every client certificate (agents, operators) must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"], value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext HTTP on a non-loopback address: for a trusted lab
    /// network only (anyone who reaches the port can act as any host).
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// Write the bound address (host:port) to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// The agents' heartbeat interval (whole seconds, e.g. 60s, 2m); hosts
    /// silent for 3 of them show as unreachable.
    // `--heartbeat-interval-secs N` was the first spelling: a hidden alias.
    #[arg(
        long = "heartbeat-interval",
        alias = "heartbeat-interval-secs",
        default_value = "60s",
        value_name = "DURATION",
        value_parser = parse_secs,
    )]
    pub heartbeat_interval_secs: u64,
    /// A request head must arrive within this; also the idle keep-alive timeout.
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A request body must arrive whole within this (408 after it).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Connections held at once (lowered to fit the descriptor limit).
    #[arg(long, default_value_t = crate::cp::config::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections held at once from one client address (raise it when a
    /// NAT puts many agents behind one address).
    #[arg(long, default_value_t = crate::cp::config::MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: usize,
    /// Events of one host in one rollout applied between two record
    /// checkpoints; past it the host's probe events give way to the record
    /// they made (`docs/protocol.md` §7). Lower it to keep the log small.
    #[arg(long, default_value_t = crate::cp::store::MAX_EVENTS_SINCE_CHECKPOINT, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_events: u64,
}

/// How an operator command reaches the control plane: its URL and, for
/// https, the TLS files (every operator command flattens this).
#[derive(Debug, Clone, clap::Args)]
pub struct CpClientArgs {
    /// Control plane URL, e.g. https://cp.example:8443 (http:// only for a
    /// CP without TLS).
    #[arg(long, env = "NIXFLEET_CP_URL")]
    pub cp: String,
    /// The CA the control plane's certificate must chain to (https).
    #[arg(long, env = "NIXFLEET_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Your operator certificate (URI SAN nixfleet:operator), e.g. from
    /// `nixfleet pki issue --role operator`.
    #[arg(long, env = "NIXFLEET_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert.
    #[arg(long, env = "NIXFLEET_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

impl CpClientArgs {
    /// The URL with its TLS config loaded (errors name the missing flag or the bad file).
    pub fn url(&self) -> Result<crate::client::CpUrl, crate::client::ClientError> {
        let paths = crate::client::ClientTlsPaths {
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        };
        crate::client::CpUrl::connect_to(&self.cp, &paths)
    }
}

#[derive(Debug, clap::Args)]
pub struct CpPublishArgs {
    #[command(flatten)]
    pub client: CpClientArgs,
    /// The signed manifest (DSSE envelope JSON, from `nixfleet manifest sign`).
    pub envelope: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CpStatusArgs {
    #[command(flatten)]
    pub client: CpClientArgs,
    /// Show one rollout host by host.
    #[arg(long)]
    pub rollout: Option<String>,
    /// Show hosts (liveness, closures, rollouts) instead of rollouts.
    #[arg(long, conflicts_with = "rollout")]
    pub hosts: bool,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// With --rollout: refresh until the rollout is completed, cancelled,
    /// superseded or halted (in place on a terminal; piped, each change).
    #[arg(long, requires = "rollout")]
    pub watch: bool,
    /// How often --watch asks the control plane (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "watch")]
    pub interval: Duration,
}
