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
    /// Work with rollout manifests (validate, sign, verify).
    #[command(subcommand)]
    Manifest(ManifestCommand),
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
}
