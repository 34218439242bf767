//! Thin dispatcher: parse the command line, set up logging, run one role,
//! turn its result into an exit code (0 ok, 1 failure, 2 usage — clap exits
//! with 2 on its own for usage errors).

use std::process::ExitCode;

use clap::Parser;

use nixfleet::cli::{Cli, Command, LogFormat, ManifestCommand, PkiCommand, QueueCommand, SimArgs};
use nixfleet::clock::ClockHandle;
use nixfleet::tools;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story on stdout; its components' info logs
    // would drown it (RUST_LOG still overrides).
    // The sim's story is its report; the real components' logs stay quiet.
    let default_level = match cli.command {
        Command::Demo { .. } => "warn",
        Command::Sim(_) => "error",
        _ => "info",
    };
    init_tracing(cli.log_format, default_level);
    if let Err(e) = init_store_dir(&cli.command) {
        eprintln!("nixfleet: error: {e}");
        return ExitCode::from(2);
    }
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Keygen { out } => tools::manifest_cmd::keygen(&out).map_err(Into::into),
        Command::Pki(PkiCommand::Init { dir }) => {
            tools::pki::init_cmd(&dir, &ClockHandle::system()).map_err(Into::into)
        }
        Command::Pki(PkiCommand::Issue { dir, name, role, dns, ip, days }) => {
            let request = tools::pki::IssueRequest { name, role: role.into(), dns, ips: ip, days };
            tools::pki::issue_cmd(&dir, &request, &ClockHandle::system()).map_err(Into::into)
        }
        Command::Pki(PkiCommand::Export { dir, name, out }) => {
            tools::pki_export::export_cmd(&dir, &name, &out).map_err(Into::into)
        }
        Command::Manifest(ManifestCommand::Check { manifest, json }) => {
            tools::manifest_cmd::check(&manifest, json).map_err(Into::into)
        }
        Command::Manifest(ManifestCommand::Sign { key, manifest }) => {
            tools::manifest_cmd::sign(&key, &manifest).map_err(Into::into)
        }
        Command::Manifest(ManifestCommand::Verify { trust_keys, envelope }) => {
            tools::manifest_cmd::verify(&trust_keys, &envelope).map_err(Into::into)
        }
        Command::Queue(QueueCommand::Ls { state_dir, pending, acked, dead, all, json }) => {
            let folders = tools::queue_cmd::ls_folders(pending, acked, dead, all);
            tools::queue_cmd::ls(&state_dir, &folders, json, ClockHandle::system().now()).map_err(Into::into)
        }
        Command::Queue(QueueCommand::Inspect { state_dir, event, json }) => {
            tools::queue_cmd::inspect(&state_dir, &event, json, ClockHandle::system().now()).map_err(Into::into)
        }
        Command::Agent(args) => nixfleet::agent::cmd::run(args).map_err(Into::into),
        Command::Demo { hosts, keep } => {
            tools::demo::run(&tools::demo::DemoOptions { hosts, keep }).map_err(Into::into)
        }
        Command::Replay(args) => match (&args.db, &args.state_dir) {
            (Some(db), _) => tools::replay::replay_db(db, args.rollout.as_ref(), args.quiet).map_err(Into::into),
            (None, Some(dir)) => tools::replay::replay_queue(dir, &args.trust_keys, args.quiet).map_err(Into::into),
            (None, None) => Err("replay needs --db or --state-dir".into()),
        },
        Command::Cp(cmd) => nixfleet::cp::run(cmd).map_err(Into::into),
        Command::Sim(SimArgs { seed, hosts, faults, scenario, manifest, until }) => {
            // Exit 1 means an invariant broke; bad input is a usage error (2).
            match nixfleet::sim::run_cli(seed, hosts, faults, scenario, manifest.as_deref(), until) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(nixfleet::sim::CliError::Input(e)) => {
                    eprintln!("nixfleet: error: {e}");
                    return ExitCode::from(2);
                }
                Err(nixfleet::sim::CliError::Setup(e)) => Err(e.into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixfleet: error: {}", nixfleet::output::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Fixes the process's Nix store directory before anything parses a closure:
/// `NIX_STORE_DIR` or `/nix/store`. The simulator's closures are always
/// `/nix/store` paths (it touches no store); the demo decides for itself
/// (its stand-in closures may need a store dir in its work dir).
fn init_store_dir(command: &Command) -> Result<(), nixfleet::ids::StoreDirError> {
    use nixfleet::ids::StoreDir;
    let dir = match command {
        Command::Demo { .. } => return Ok(()),
        Command::Sim(_) => StoreDir::nix_default(),
        _ => StoreDir::from_env()?,
    };
    nixfleet::ids::init_store_dir(dir).map(|_| ())
}

fn init_tracing(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
