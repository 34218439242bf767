//! `nixfleet demo`: the whole system on one machine. A control plane and
//! `--hosts` agents (4 by default) run in this process on loopback, each
//! agent with its own state dir, profile and `current-system` link, over
//! mutual TLS with certificates from a fresh `nixfleet pki` CA in the work
//! dir, as a real fleet does. With Nix the closures are real store paths;
//! without it they are stand-ins (in the work dir's store when this user may
//! not write `/nix/store`: no root needed), and the first line and the final
//! table say so ([`closures`]). A 2-wave rollout runs; one host's new closure fails its
//! enforce probe, so that host rolls back by itself, the rollout halts, and a
//! per-host table ends the run. Everything else is the production code path.
//!
//! SIGINT and SIGTERM stop the CP and the agents, remove the work dir and
//! the closures (unless `--keep`) and end the run with an error saying so.

mod closures;
mod fleet;
mod watch;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ids::Closure;
use crate::output::print_stdout;
use crate::sign;
use crate::tls;
use crate::tools::pki;
use closures::{repoint, NixMode, Store};
#[doc(hidden)]
pub use closures::{STANDIN_NIX_ENV, STANDIN_NIX_STORE};
use fleet::{DemoPki, Running};

const ROLLOUT: &str = "stable@demo-1";
/// The story needs a canary and a second wave with the failing host.
pub const MIN_DEMO_HOSTS: usize = 2;
/// Each host is an in-process agent with two closures, and the live view
/// draws a line per host: past 32 it no longer fits a terminal and the run
/// stops being a demo. `nixfleet sim` rehearses large fleets.
pub const MAX_DEMO_HOSTS: usize = 32;
/// How long the runtime waits for its last tasks when the demo ends.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "nix-store is on PATH but `nix-store --add` failed ({0}); run the demo as a user that may write the \
         Nix store, or with a PATH without nix-store to run it with stand-in closures"
    )]
    NoNix(String),
    #[error(
        "without Nix the demo writes its stand-in closures as plain directories in the store directory \
         (NIX_STORE_DIR, else /nix/store, else the work dir's store/), and that failed ({0}); unset \
         NIX_STORE_DIR or point it at a directory you may write"
    )]
    NoStore(String),
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("demo interrupted by {signal}; {cleanup}")]
    Interrupted { signal: &'static str, cleanup: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("demo certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("demo TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// `--hosts`: a number from [`MIN_DEMO_HOSTS`] to [`MAX_DEMO_HOSTS`].
pub fn parse_hosts(text: &str) -> Result<usize, String> {
    let n: usize = text.trim().parse().map_err(|_| format!("'{text}' is not a number of hosts"))?;
    if !(MIN_DEMO_HOSTS..=MAX_DEMO_HOSTS).contains(&n) {
        return Err(format!(
            "the demo runs {MIN_DEMO_HOSTS} to {MAX_DEMO_HOSTS} hosts, not {n} (it needs a canary and a host \
             that fails its probe; `nixfleet sim --hosts N` rehearses larger fleets)"
        ));
    }
    Ok(n)
}

/// What `nixfleet demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub hosts: usize,
    pub keep: bool,
}

/// One demo host: its dir (state, profile, `current-system`), wave and closures.
#[derive(Debug)]
struct Host {
    name: String,
    wave: usize,
    root: PathBuf,
    new: Closure,
    probe_fails: bool,
}

/// Timestamped story lines on stdout; `live` when stdout is a terminal.
#[derive(Debug)]
struct Say {
    started: Instant,
    live: bool,
}

impl Say {
    fn line(&self, text: &str) {
        let _ = print_stdout(&format!("[{:>5.1}s] {text}\n", self.elapsed().as_secs_f64()));
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `nixfleet demo`.
pub fn run(opts: &DemoOptions) -> Result<(), DemoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(demo(opts));
    // Dropping the tasks kills their child processes (kill_on_drop).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

async fn demo(opts: &DemoOptions) -> Result<(), DemoError> {
    let say = Say { started: Instant::now(), live: std::io::stdout().is_terminal() };
    let mode = NixMode::detect();
    let mut signals = Signals::new()?;
    let nonce = nonce()?;
    let work = std::env::temp_dir().join(format!("nixfleet-demo-{nonce}"));
    fs_err::create_dir_all(&work)?;
    let mut store = match Store::new(mode, &work, &nonce) {
        Ok(store) => store,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    say.line(&format!("nixfleet demo, {} hosts, {}", opts.hosts, store.headline()));
    say.line(&format!("work dir {}", work.display()));
    let mut running = Running::new();
    let end = tokio::select! {
        result = story(opts, &work, &mut store, &mut running, &say) => result.err(),
        signal = signals.next() => Some(DemoError::Interrupted { signal, cleanup: String::new() }),
    };
    running.stop().await;
    let cleanup = if opts.keep {
        say.line(&format!(
            "kept {w}: `{env}nixfleet replay --db {w}/cp.db` re-runs the CP's event log; \
             `{env}nixfleet queue ls --state-dir {w}/web-{b}/state --all` lists the failing host's queue",
            w = work.display(),
            env = store.env_prefix(),
            b = opts.hosts.min(3)
        ));
        format!("kept {}", work.display())
    } else {
        let _ = std::fs::remove_dir_all(&work);
        store.remove_all().await;
        format!("stopped the control plane and the agents, removed {} and the demo's closures", work.display())
    };
    match end {
        None => Ok(()),
        Some(DemoError::Interrupted { signal, .. }) => Err(DemoError::Interrupted { signal, cleanup }),
        Some(e) => Err(e),
    }
}

/// SIGINT and SIGTERM, listened for from the start of the run.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, DemoError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

fn nonce() -> Result<String, DemoError> {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(setup("randomness"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The run itself: closures, certificates, CP, agents, the watched rollout, the report.
async fn story(
    opts: &DemoOptions,
    work: &Path,
    store: &mut Store,
    running: &mut Running,
    say: &Say,
) -> Result<(), DemoError> {
    let hosts = make_hosts(opts.hosts, work, store).await?;
    let kind = match store.mode {
        NixMode::Real { .. } => "real store paths",
        NixMode::StandIn => "STAND-IN plain directories",
    };
    say.line(&format!(
        "built {} closures ({kind}; stand-in switch scripts), every host runs its \"old\" one",
        2 * hosts.len()
    ));
    let clock = crate::clock::ClockHandle::system();
    let key = sign::generate().map_err(setup("key"))?;
    let demo_pki = DemoPki::new(work, &hosts, &clock)?;
    let envelope = fleet::signed_manifest(&key, &hosts)?;
    let (url, addr) = fleet::start_cp(running, work, &demo_pki, &key, envelope).await?;
    say.line(&format!(
        "control plane on https://{addr} (mutual TLS; CA and certificates of the CP, the operator and each host in {})",
        demo_pki.dir.display()
    ));
    let rest: Vec<&str> = hosts.iter().filter(|h| h.wave == 1).map(|h| h.name.as_str()).collect();
    say.line(&format!("published {ROLLOUT}: wave 0 = {} (canary), wave 1 = {}", hosts[0].name, rest.join(" ")));
    fleet::start_agents(running, &hosts, store, &demo_pki, addr, &key)?;
    say.line(&format!("started {} agents", hosts.len()));
    let detail = watch::watch(&url, say, say.live).await?;
    let status = crate::client::request(&url, hyper::Method::GET, "/v1/status", &[], None)
        .await
        .and_then(|resp| resp.json::<serde_json::Value>())
        .map_err(setup("status"))?;
    print_stdout(&watch::report(&detail, &status["quarantined"], &hosts, &store.label()))?;
    Ok(())
}

/// `web-1` … `web-N`: web-1 is the canary (wave 0), the rest are wave 1; the
/// failing host is web-3 (web-2 with two hosts). Every host boots "old".
async fn make_hosts(n_hosts: usize, work: &Path, store: &mut Store) -> Result<Vec<Host>, DemoError> {
    let broken = n_hosts.min(3);
    let mut hosts = Vec::with_capacity(n_hosts);
    for number in 1..=n_hosts {
        let name = format!("web-{number}");
        let root = work.join(&name);
        fs_err::create_dir_all(root.join("state"))?;
        let link = root.join("current-system");
        let old = store.add(&name, "old", &link, 0).await?;
        let probe_fails = number == broken;
        let new = store.add(&name, "new", &link, i32::from(probe_fails)).await?;
        repoint(&link, &old)?;
        repoint(&root.join("profile"), &old)?;
        hosts.push(Host { name, wave: usize::from(number > 1), root, new, probe_fails });
    }
    Ok(hosts)
}
