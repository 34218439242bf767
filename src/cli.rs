//! The command-line surface (SPEC §1), as clap derive types. Doc comments
//! here are the `--help` text. Parsing only: every command is run by a
//! function in its role module, called from `main.rs`.

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
