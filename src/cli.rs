//! The command-line surface (`docs/manual.md`), as clap derive types. Doc comments
//! here are the `--help` text. Parsing only: every command is run by a
//! function in its role module, called from `main.rs`.
//!
//! Every duration flag takes a duration string ([`parse_duration`]: `500ms`,
//! `5s`, `2m`, `1h`); a bare number is seconds, the unit those flags were
//! first given in, so older units and env files keep working.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod cp;

pub use cp::{
    CpBackupArgs, CpClientArgs, CpCommand, CpPlanArgs, CpPublishArgs, CpRolloutActionArgs, CpServeArgs, CpStatusArgs,
    CpUnquarantineArgs,
};

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
    /// A small certificate authority for mutual TLS: a CA, then host,
    /// operator and cp certificates (large fleets bring their own CA).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Work with rollout manifests (validate, sign, verify).
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Look at the agent's on-disk event queue (read-only, safe while the
    /// agent runs).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run the host agent: long-poll for dispatches, activate, probe, roll
    /// back on its own, report every step through its on-disk queue.
    Agent(AgentArgs),
    /// The whole system on this machine: a control plane and four agents on
    /// loopback, a 2-wave rollout in which one host fails its probe and rolls
    /// back by itself; prints progress and a final per-host table. Without
    /// `nix-store` on PATH it runs with stand-in closures and says so.
    Demo {
        /// Number of hosts (2 to 32): web-1 is the canary, the rest the second wave.
        #[arg(long, default_value_t = 4, value_parser = crate::tools::demo::parse_hosts)]
        hosts: usize,
        /// Keep the work dir (CP database, agent queues) for `replay` and `queue ls`.
        #[arg(long)]
        keep: bool,
    },
    /// Re-run the CP's event log (--db) or an agent's queue (--state-dir)
    /// through the state machine; exit 1 if it disagrees with what is stored.
    Replay(ReplayArgs),
    /// Run the control plane, or publish to it and ask it for status.
    #[command(subcommand)]
    Cp(CpCommand),
    /// Deterministic fleet simulation: the real control-plane writer and
    /// agent reducer against a simulated network, clock, hosts and faults.
    /// Exit 1 (with the seed and a trace) when an invariant breaks.
    Sim(SimArgs),
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// The seed: the same seed gives byte-identical output.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of simulated hosts, at least 1 (ignored with --manifest).
    #[arg(long, default_value_t = 20, value_parser = parse_sim_hosts)]
    pub hosts: usize,
    /// Network, crash and operator faults to inject.
    #[arg(long, value_enum, default_value_t = crate::sim::FaultProfile::Light)]
    pub faults: crate::sim::FaultProfile,
    /// A hand-built situation aimed at one known divergence.
    #[arg(long, value_enum)]
    pub scenario: Option<crate::sim::Scenario>,
    /// Roll out this manifest (unsigned JSON, `docs/protocol.md` §2) first; the sim signs it.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Simulated time limit, e.g. 6h, 90m, 3600s.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    pub until: Duration,
}

/// `nixfleet sim --hosts`: a whole number, at least 1.
fn parse_sim_hosts(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("a fleet needs at least 1 host".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a number of hosts")),
    }
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA: DIR/ca.crt and DIR/ca.key (mode 0600), valid 10 years.
    Init {
        /// Directory for the CA files (created 0700 if missing); existing files are never overwritten.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by DIR's CA: DIR/NAME.crt and DIR/NAME.key (mode 0600).
    Issue {
        /// The directory holding ca.crt and ca.key (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// The certificate's CN and file name; for a host, its hostname ([a-z0-9][a-z0-9-]{0,62}).
        #[arg(long)]
        name: String,
        /// host: an agent (client); operator: `cp publish|status` (client); cp: the control plane (server).
        #[arg(long, value_enum, default_value_t = PkiRole::Host)]
        role: PkiRole,
        /// An extra DNS name (subjectAltName); repeat for several. A cp certificate needs a --dns or an --ip.
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address (subjectAltName); repeat for several.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Days the certificate is valid (1..=3650).
        #[arg(long, default_value_t = crate::tools::pki::DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Bundle an operator's DIR/NAME.crt and DIR/NAME.key (with DIR/ca.crt) into a
    /// password-protected PKCS#12 file for a browser: the web page needs mutual TLS.
    /// The password comes from NIXFLEET_P12_PASSWORD, else it is asked on the terminal.
    Export {
        /// The directory holding ca.crt and NAME.crt/NAME.key (from `pki issue --role operator`).
        #[arg(long)]
        dir: PathBuf,
        /// The operator certificate's name.
        #[arg(long)]
        name: String,
        /// The PKCS#12 file to write (mode 0600; an existing file is never overwritten), e.g. alice.p12.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The role a `pki issue` certificate carries (URI SAN `nixfleet:ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PkiRole {
    Host,
    Operator,
    Cp,
}

impl From<PkiRole> for crate::tls::Role {
    fn from(role: PkiRole) -> crate::tls::Role {
        match role {
            PkiRole::Host => crate::tls::Role::Host,
            PkiRole::Operator => crate::tls::Role::Operator,
            PkiRole::Cp => crate::tls::Role::Cp,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Validate an unsigned manifest and print a summary of its waves.
    Check {
        /// The manifest JSON file (format: docs/protocol.md §2).
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SwitchRunnerArg {
    /// systemd-run when systemd runs the host, else setsid.
    Auto,
    /// A transient systemd unit: survives a restart of the agent's unit.
    SystemdRun,
    /// A new session: survives the agent's death, not a cgroup kill.
    Setsid,
    /// A plain child process (debugging only: dies with the agent).
    Direct,
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Where the agent keeps its queue, cached manifests and switch logs.
    #[arg(long, env = "NIXFLEET_AGENT_STATE_DIR", default_value = "/var/lib/nixfleet-agent")]
    pub state_dir: PathBuf,
    /// The control plane, e.g. https://cp.example:8443 (http:// only for a
    /// CP without TLS).
    #[arg(long, env = "NIXFLEET_AGENT_CP")]
    pub cp: String,
    /// The CA the control plane's certificate must chain to (https).
    #[arg(long, env = "NIXFLEET_AGENT_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// This host's certificate (CN or a DNS SAN = its hostname, URI SAN
    /// nixfleet:host); SIGHUP re-reads it and the next request uses it.
    #[arg(long, env = "NIXFLEET_AGENT_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert.
    #[arg(long, env = "NIXFLEET_AGENT_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// This host's name in manifests (default: the system's hostname).
    #[arg(long, env = "NIXFLEET_AGENT_HOSTNAME")]
    pub hostname: Option<String>,
    /// A release public key manifests must be signed with; repeat (or
    /// comma-separate in the environment) for several.
    #[arg(long = "trust-key", env = "NIXFLEET_AGENT_TRUST_KEY", value_delimiter = ',', required = true)]
    pub trust_keys: Vec<PathBuf>,
    /// The health-checks file of the running system.
    #[arg(long, env = "NIXFLEET_AGENT_HEALTH_CHECKS", default_value = "/etc/nixfleet/agent/health-checks.json")]
    pub health_checks: PathBuf,
    /// The symlink naming the running closure.
    #[arg(long, env = "NIXFLEET_AGENT_CURRENT_SYSTEM", default_value = "/run/current-system")]
    pub current_system: PathBuf,
    /// The symlink naming the closure the host booted (reported in heartbeats).
    #[arg(long, env = "NIXFLEET_AGENT_BOOTED_SYSTEM", default_value = "/run/booted-system")]
    pub booted_system: PathBuf,
    /// The system profile `nix-env --set` moves.
    #[arg(long, env = "NIXFLEET_AGENT_PROFILE", default_value = "/nix/var/nix/profiles/system")]
    pub profile: PathBuf,
    /// The nix-env program.
    #[arg(long, env = "NIXFLEET_AGENT_NIX_ENV", default_value = "nix-env")]
    pub nix_env: PathBuf,
    /// The nix-store program.
    #[arg(long, env = "NIXFLEET_AGENT_NIX_STORE", default_value = "nix-store")]
    pub nix_store: PathBuf,
    /// How the switch is detached from the agent.
    #[arg(long, env = "NIXFLEET_AGENT_SWITCH_RUNNER", value_enum, default_value_t = SwitchRunnerArg::Auto)]
    pub switch_runner: SwitchRunnerArg,
    /// Longest an activation (realise + profile + switch) may take.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_ACTIVATION_TIMEOUT",
        default_value = "15m",
        value_name = "DURATION",
        value_parser = parse_duration,
    )]
    pub activation_timeout: std::time::Duration,
    /// How often the convergence and failure gates are checked.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_TICK",
        default_value = "5s",
        value_name = "DURATION",
        value_parser = parse_duration,
    )]
    pub tick: std::time::Duration,
    /// How often the agent sends a heartbeat.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_HEARTBEAT",
        default_value = "60s",
        value_name = "DURATION",
        value_parser = parse_duration,
    )]
    pub heartbeat: std::time::Duration,
    /// How often the queue is drained without being woken.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_DRAIN",
        default_value = "15s",
        value_name = "DURATION",
        value_parser = parse_duration,
    )]
    pub drain: std::time::Duration,
    /// How long one long-poll may wait, in whole seconds (the CP caps it at 60s).
    #[arg(
        long,
        env = "NIXFLEET_AGENT_LONGPOLL_WAIT",
        default_value = "60s",
        value_name = "DURATION",
        value_parser = parse_secs,
    )]
    pub longpoll_wait: u64,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["db", "state_dir"])))]
pub struct ReplayArgs {
    /// The control plane's SQLite database (opened read-only).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// An agent's state dir (its queue and cached manifests; read-only).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// With --state-dir: the release key(s) the agent's cached manifests are
    /// verified with.
    #[arg(long = "trust-key", requires = "state_dir")]
    pub trust_keys: Vec<PathBuf>,
    /// With --db: only this rollout.
    #[arg(long, requires = "db")]
    pub rollout: Option<crate::ids::RolloutId>,
    /// Only the final state of each host, not every event.
    #[arg(long)]
    pub quiet: bool,
}

/// Parses `5s`, `500ms`, `2m`, `1h` or a plain number of seconds; zero is
/// refused (every duration flag is a period or a limit, and zero would spin
/// or give up at once).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(idx) => text.split_at(idx),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 5s, 500ms, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(d)
}

/// [`parse_duration`] for the flags whose value is used in whole seconds
/// (on the wire or in stored state): `60s`, `2m`, `60`; `1500ms` is refused
/// rather than rounded.
pub fn parse_secs(text: &str) -> Result<u64, String> {
    let d = parse_duration(text)?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{:?} is not a whole number of seconds", text.trim()));
    }
    Ok(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        // Proves the flag syntax of --tick/--heartbeat/--drain.
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        for bad in ["", "0s", "5x", "s", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn whole_second_flags_take_durations_and_refuse_fractions() {
        // Proves the syntax of --heartbeat-interval and --longpoll-wait: a
        // duration or bare seconds, never a fraction silently rounded.
        assert_eq!(parse_secs("60s"), Ok(60));
        assert_eq!(parse_secs("2m"), Ok(120));
        assert_eq!(parse_secs("45"), Ok(45));
        assert_eq!(parse_secs("3000ms"), Ok(3));
        for bad in ["1500ms", "500ms", "0", "0s", "5x", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nixfleet").chain(args.iter().copied()))
    }

    fn heartbeat_interval_secs(extra: &[&str]) -> Result<u64, clap::Error> {
        let mut args = vec!["cp", "serve", "--db", "cp.db", "--trust-key", "release.pub"];
        args.extend_from_slice(extra);
        match parse(&args)?.command {
            Command::Cp(CpCommand::Serve(a)) => Ok(a.heartbeat_interval_secs),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cp_serve_limit_flags_default_to_the_named_constants() {
        let args = ["cp", "serve", "--db", "cp.db", "--trust-key", "release.pub"];
        let Command::Cp(CpCommand::Serve(a)) = parse(&args).expect("parses").command else { panic!("not cp serve") };
        let defaults = crate::cp::ServeLimits::default();
        assert_eq!(a.header_timeout, defaults.header_timeout);
        assert_eq!(a.body_timeout, defaults.body_timeout);
        assert_eq!(a.max_connections, defaults.max_connections);
        assert_eq!(a.max_connections_per_address, defaults.max_connections_per_address);
    }

    fn longpoll_wait_secs(extra: &[&str]) -> Result<u64, clap::Error> {
        let mut args = vec!["agent", "--cp", "http://127.0.0.1:8443", "--trust-key", "release.pub"];
        args.extend_from_slice(extra);
        match parse(&args)?.command {
            Command::Agent(a) => Ok(a.longpoll_wait),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cp_heartbeat_interval_takes_a_duration_and_its_old_spelling_still_works() {
        // Proves --heartbeat-interval takes a duration, and the hidden alias
        // --heartbeat-interval-secs still takes the bare seconds old units pass.
        assert_eq!(heartbeat_interval_secs(&[]).expect("default"), 60);
        assert_eq!(heartbeat_interval_secs(&["--heartbeat-interval", "2m"]).expect("2m"), 120);
        assert_eq!(heartbeat_interval_secs(&["--heartbeat-interval", "90"]).expect("bare"), 90);
        assert_eq!(heartbeat_interval_secs(&["--heartbeat-interval-secs", "30"]).expect("old spelling"), 30);
        assert!(heartbeat_interval_secs(&["--heartbeat-interval", "1500ms"]).is_err());
        let help = Cli::command()
            .find_subcommand_mut("cp")
            .and_then(|c| c.find_subcommand_mut("serve"))
            .map(|c| c.render_long_help().to_string())
            .expect("cp serve");
        assert!(help.contains("--heartbeat-interval <DURATION>"), "{help}");
        assert!(!help.contains("heartbeat-interval-secs"), "the old spelling is hidden: {help}");
    }

    #[test]
    fn agent_longpoll_wait_takes_a_duration_or_bare_seconds() {
        // Proves --longpoll-wait (same name as before) still takes bare
        // seconds, and takes a duration like every other duration flag.
        assert_eq!(longpoll_wait_secs(&[]).expect("default"), 60);
        assert_eq!(longpoll_wait_secs(&["--longpoll-wait", "30s"]).expect("30s"), 30);
        assert_eq!(longpoll_wait_secs(&["--longpoll-wait", "30"]).expect("bare"), 30);
        assert!(longpoll_wait_secs(&["--longpoll-wait", "0"]).is_err());
    }

    /// `NAME=value` pairs of an env file, commented-out examples included
    /// (`# NAME=value   # note`), so every documented example is checked.
    fn env_pairs(text: &str) -> Vec<(&str, &str)> {
        text.lines()
            .map(|l| l.trim_start_matches(['#', ' ']))
            .filter_map(|l| l.split_once('='))
            .filter(|(name, _)| name.starts_with("NIXFLEET_") && !name.contains(' '))
            .map(|(name, value)| (name, value.split_whitespace().next().unwrap_or("")))
            .collect()
    }

    /// The flags an env file sets for a subcommand, by each flag's `env` name.
    fn env_flags(sub: &str, text: &str) -> Vec<String> {
        let cmd = Cli::command();
        let sub = cmd.find_subcommand(sub).expect("subcommand");
        let mut flags = Vec::new();
        for (name, value) in env_pairs(text) {
            let arg = sub
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name))
                .unwrap_or_else(|| panic!("{name} is not the variable of any flag"));
            flags.push(format!("--{}", arg.get_long().expect("long flag")));
            flags.push(value.to_owned());
        }
        flags
    }

    /// The arguments of a unit's `ExecStart=` line after the program.
    fn exec_start_args(unit: &str) -> Vec<String> {
        let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    }

    #[test]
    fn the_example_env_file_and_the_systemd_units_parse() {
        // Proves every variable in examples/agent.env (commented examples
        // too) is a real flag with a valid value, and the contrib/systemd
        // command lines parse (the agent's together with that env file).
        let env = include_str!("../examples/agent.env");
        assert!(env_pairs(env).len() >= 5, "the example lists its variables: {env}");
        let mut agent = exec_start_args(include_str!("../contrib/systemd/nixfleet-agent.service"));
        agent.extend(env_flags("agent", env));
        let parsed = Cli::try_parse_from(std::iter::once("nixfleet".to_owned()).chain(agent.clone()))
            .unwrap_or_else(|e| panic!("{agent:?}: {e}"));
        let Command::Agent(agent_args) = parsed.command else { panic!("{agent:?}") };
        // The examples run a real fleet: the agent speaks mutual TLS...
        assert!(agent_args.cp.starts_with("https://"), "{agent:?}");
        assert!(agent_args.ca_cert.is_some() && agent_args.client_cert.is_some() && agent_args.client_key.is_some());
        let cp = exec_start_args(include_str!("../contrib/systemd/nixfleet-cp.service"));
        let parsed = Cli::try_parse_from(std::iter::once("nixfleet".to_owned()).chain(cp.clone()))
            .unwrap_or_else(|e| panic!("{cp:?}: {e}"));
        let Command::Cp(CpCommand::Serve(serve)) = parsed.command else { panic!("{cp:?}") };
        // ...and the CP listens on the network with TLS, never --insecure.
        assert!(!serve.listen.ip().is_loopback() && serve.tls_cert.is_some() && !serve.insecure, "{cp:?}");
    }
}
