//! The command-line surface (SPEC §1), as clap derive types. Doc comments
//! here are the `--help` text. Parsing only: every command is run by a
//! function in its role module, called from `main.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Roll NixOS system closures out to a fleet in waves, with health probes
/// and autonomous rollback.
#[derive(Debug, Parser)]
#[command(name = "nixfleet", version, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=nixfleet=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NIXFLEET_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an ed25519 release key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files; existing files are never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Work with rollout manifests (validate, sign, verify).
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Look at the agent's on-disk event queue (read-only, safe while the
    /// agent runs).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run the control plane, or publish to it and ask it for status.
    #[command(subcommand)]
    Cp(CpCommand),
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Validate an unsigned manifest and print a summary of its waves.
    Check {
        /// The manifest JSON file (SPEC §3).
        manifest: PathBuf,
        /// Print the validated manifest as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Validate a manifest and print its signed DSSE envelope on stdout.
    Sign {
        /// The release secret key (from `nixfleet keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The manifest JSON file; its exact bytes are signed.
        manifest: PathBuf,
    },
    /// Verify a DSSE envelope against trust keys and print the manifest it carries.
    Verify {
        /// A trusted public key; repeat for several (e.g. during a key rotation).
        #[arg(long = "trust-key", required = true)]
        trust_keys: Vec<PathBuf>,
        /// The signed envelope (output of `manifest sign`).
        envelope: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued events with qseq, state, rollout, seq, kind, age and size
    /// (pending and dead by default), then a summary line.
    Ls {
        /// The agent's state dir (the one holding outbound-queue/).
        #[arg(long, env = "NIXFLEET_STATE_DIR")]
        state_dir: PathBuf,
        /// Show pending events (not yet acknowledged by the control plane).
        #[arg(long)]
        pending: bool,
        /// Show acked events (delivered; kept for Replay-From).
        #[arg(long)]
        acked: bool,
        /// Show dead events (rejected, or unreadable) with their reason.
        #[arg(long)]
        dead: bool,
        /// Show all three.
        #[arg(long, conflicts_with_all = ["pending", "acked", "dead"])]
        all: bool,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print one queued event in full.
    Inspect {
        /// The agent's state dir (the one holding outbound-queue/).
        #[arg(long, env = "NIXFLEET_STATE_DIR")]
        state_dir: PathBuf,
        /// A qseq (e.g. 42) or an event file name or path.
        event: String,
        /// Print the stored record as it is on disk.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CpCommand {
    /// Serve the control plane: SQLite event log, wave planner, long-polls.
    Serve(CpServeArgs),
    /// Publish a signed rollout manifest (a DSSE envelope).
    Publish(CpPublishArgs),
    /// Show fleet, rollout or host status.
    Status(CpStatusArgs),
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
    /// Allow plaintext HTTP on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
    /// Write the bound address (host:port) to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// The agents' heartbeat interval; hosts silent for 3 of them show as unreachable.
    #[arg(long, default_value_t = 60)]
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct CpPublishArgs {
    /// Control plane URL, e.g. http://127.0.0.1:8443
    #[arg(long, env = "NIXFLEET_CP_URL")]
    pub cp: String,
    /// The signed manifest (DSSE envelope JSON, from `nixfleet manifest sign`).
    pub envelope: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CpStatusArgs {
    /// Control plane URL, e.g. http://127.0.0.1:8443
    #[arg(long, env = "NIXFLEET_CP_URL")]
    pub cp: String,
    /// Show one rollout host by host.
    #[arg(long)]
    pub rollout: Option<String>,
    /// Show hosts (liveness, closures, rollouts) instead of rollouts.
    #[arg(long, conflicts_with = "rollout")]
    pub hosts: bool,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
