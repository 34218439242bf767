//! The `nixfleet cp …` commands: argument checks, the tokio runtime, and
//! human output. `serve` wires real resources into [`super::serve`];
//! `publish` and `status` are thin clients of the HTTP API.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::operator_cmd;
use super::planner::RolloutState;
use super::routes::MAX_ENVELOPE_BYTES;
use super::server::{self, PlainAcceptor, ServeConfig, ServeError};
use super::store::Drift;
use super::transport::TlsAcceptor;
use super::views::{HostView, Liveness, RolloutDetail, RolloutSummary, StatusView};
use crate::cli::{CpCommand, CpPublishArgs, CpServeArgs, CpStatusArgs};
use crate::client::{self, ClientError, CpUrl};
use crate::clock::ClockHandle;
use crate::output::print_stdout;
use crate::sdnotify::Notifier;
use crate::sign::{PublicKey, SignError};
use crate::signal::shutdown_signal;
use crate::tls::{CertKeyFiles, ReloadableServerConfig, ServerTlsFiles, TlsError};

/// How long in-flight requests may finish after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("refusing to serve plaintext HTTP on non-loopback address {0}: give --tls-cert, --tls-key and --client-ca (mutual TLS), or --insecure on a trusted lab network only")]
    PlaintextNonLoopback(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    #[error("trust key: {0}")]
    TrustKey(#[from] SignError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot write the address file: {0}")]
    AddrFile(std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read {0}")]
    Read(std::io::Error),
    #[error("{} is larger than {limit} bytes, the control plane's body limit", path.display())]
    TooLarge { path: std::path::PathBuf, limit: usize },
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    /// An operator action or dry run the control plane refused.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Backup(#[from] super::store::BackupError),
}

/// Runs one `cp` subcommand.
pub fn run(cmd: CpCommand) -> Result<(), CpError> {
    // Read (and unset) before the runtime's threads exist.
    let notifier = Notifier::take_from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CpError::Runtime)?;
    match cmd {
        CpCommand::Serve(args) => runtime.block_on(serve_cmd(args, notifier)),
        CpCommand::Publish(args) => runtime.block_on(publish_cmd(args)),
        CpCommand::Status(args) if args.watch => runtime.block_on(super::watch::watch_cmd(args)),
        CpCommand::Status(args) => runtime.block_on(status_cmd(args)),
        CpCommand::Resume(args) => runtime.block_on(operator_cmd::rollout_action("resume", args)),
        CpCommand::Cancel(args) => runtime.block_on(operator_cmd::rollout_action("cancel", args)),
        CpCommand::Unquarantine(args) => runtime.block_on(operator_cmd::unquarantine(args)),
        CpCommand::Plan(args) => runtime.block_on(operator_cmd::plan(args)),
        CpCommand::Backup(args) => operator_cmd::backup(&args),
    }
}

async fn serve_cmd(args: CpServeArgs, notifier: Notifier) -> Result<(), CpError> {
    let tls = match (&args.tls_cert, &args.tls_key, &args.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            let files = ServerTlsFiles {
                identity: CertKeyFiles { cert: cert.clone(), key: key.clone() },
                client_ca: client_ca.clone(),
            };
            Some(Arc::new(ReloadableServerConfig::load(files)?))
        }
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure {
        return Err(CpError::PlaintextNonLoopback(args.listen));
    }
    let trust_keys = args.trust_key.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let listener = server::bind(args.listen).map_err(|source| CpError::Bind { addr: args.listen, source })?;
    let local = listener.local_addr().map_err(|source| CpError::Bind { addr: args.listen, source })?;
    let db = args.db.display();
    let reloader = match &tls {
        Some(tls) => {
            tracing::info!(addr = %local, %db, "control plane listening on https://{local} (mutual TLS: every client needs a certificate from {})", tls.files().client_ca.display());
            let tls = Arc::clone(tls);
            crate::signal::spawn_on_sighup(move || tls.reload_logged())
        }
        None if !args.insecure => {
            tracing::info!(addr = %local, %db, "control plane listening on http://{local} (plaintext, loopback only: no TLS configured)");
            crate::signal::spawn_on_sighup(|| tracing::info!("SIGHUP: no TLS files to re-read (plaintext)"))
        }
        None => {
            tracing::warn!(addr = %local, %db, "INSECURE: control plane listening on http://{local} WITHOUT TLS (--insecure). Anyone who can reach this port can act as any host and publish as an operator: use this on a trusted lab network only, never on a real fleet");
            crate::signal::spawn_on_sighup(|| tracing::info!("SIGHUP: no TLS files to re-read (plaintext)"))
        }
    }
    .map_err(CpError::Signal)?;
    if let Some(path) = &args.addr_file {
        write_addr_file(path, local).map_err(CpError::AddrFile)?;
    }
    let cfg = ServeConfig {
        db_path: args.db.clone(),
        trust_keys,
        heartbeat_interval_secs: args.heartbeat_interval_secs,
        grace: SHUTDOWN_GRACE,
        limits: super::ServeLimits {
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            max_connections: args.max_connections,
            max_connections_per_address: args.max_connections_per_address,
            checkpoint_events: args.checkpoint_events,
        },
    };
    let served = match tls {
        Some(tls) => {
            server::serve_notifying(
                listener,
                TlsAcceptor::new(tls),
                cfg,
                ClockHandle::system(),
                &notifier,
                shutdown_signal(),
            )
            .await
        }
        None => {
            server::serve_notifying(listener, PlainAcceptor, cfg, ClockHandle::system(), &notifier, shutdown_signal())
                .await
        }
    };
    reloader.abort();
    served?;
    Ok(())
}

/// Written atomically (tmp + rename) so a reader never sees half an address.
fn write_addr_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs_err::write(&tmp, format!("{addr}\n"))?;
    fs_err::rename(&tmp, path)
}

async fn publish_cmd(args: CpPublishArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let meta = fs_err::metadata(&args.envelope).map_err(CpError::Read)?;
    if meta.len() > MAX_ENVELOPE_BYTES as u64 {
        return Err(CpError::TooLarge { path: args.envelope.clone(), limit: MAX_ENVELOPE_BYTES });
    }
    let bytes = fs_err::read(&args.envelope).map_err(CpError::Read)?;
    let resp = client::request(&url, Method::POST, "/v1/rollouts", &[], Some(bytes)).await?;
    let answer: serde_json::Value = resp.json()?;
    let id = answer.get("rollout_id").and_then(|v| v.as_str()).unwrap_or("?");
    let line = match resp.status {
        StatusCode::CREATED => format!("published {id}\n"),
        _ => format!("{id} was already published with these exact bytes (nothing changed)\n"),
    };
    print_stdout(&line).map_err(CpError::Stdout)
}

async fn status_cmd(args: CpStatusArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let path = match (&args.rollout, args.hosts) {
        (Some(id), _) => format!("/v1/rollouts/{id}"),
        (None, true) => "/v1/hosts".to_owned(),
        (None, false) => "/v1/status".to_owned(),
    };
    let text = match (&args.rollout, args.hosts) {
        (Some(_), _) => {
            let detail = rollout_all_pages(&url, &path).await?;
            if args.json {
                pretty(&detail)
            } else {
                render_rollout(&detail)
            }
        }
        (None, true) => {
            let hosts = hosts_all_pages(&url).await?;
            if args.json {
                pretty(&hosts)
            } else {
                render_hosts(&hosts)
            }
        }
        (None, false) => {
            let resp = client::request(&url, Method::GET, &path, &[], None).await?;
            if args.json {
                pretty(&resp.json::<serde_json::Value>()?)
            } else {
                render_status(&resp.json()?)
            }
        }
    };
    print_stdout(&text).map_err(CpError::Stdout)
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default())
}

/// `GET /v1/rollouts/{id}` page after page (`next_after`), the pages' hosts
/// merged into the first page's waves.
async fn rollout_all_pages(url: &CpUrl, path: &str) -> Result<RolloutDetail, CpError> {
    let mut detail: RolloutDetail = client::request(url, Method::GET, path, &[], None).await?.json()?;
    while let Some(after) = detail.next_after.take() {
        let page_path = format!("{path}?after={after}");
        let page: RolloutDetail = client::request(url, Method::GET, &page_path, &[], None).await?.json()?;
        for (wave, more) in detail.waves.iter_mut().zip(page.waves) {
            wave.hosts.extend(more.hosts);
        }
        detail.next_after = page.next_after;
    }
    Ok(detail)
}

/// `GET /v1/hosts` page after page (the `X-Nixfleet-Next-After` header).
async fn hosts_all_pages(url: &CpUrl) -> Result<Vec<HostView>, CpError> {
    let mut hosts = Vec::new();
    let mut path = "/v1/hosts".to_owned();
    loop {
        let resp = client::request(url, Method::GET, &path, &[], None).await?;
        hosts.extend(resp.json::<Vec<HostView>>()?);
        match resp.headers.get(super::routes::NEXT_AFTER_HEADER).and_then(|v| v.to_str().ok()) {
            Some(after) => path = format!("/v1/hosts?after={after}"),
            None => return Ok(hosts),
        }
    }
}

fn render_rollouts(out: &mut String, rollouts: &[RolloutSummary]) {
    let _ = writeln!(out, "{:<32} {:<11} {:>5} {:>6}  HOSTS", "ROLLOUT", "STATE", "WAVE", "N");
    for r in rollouts {
        let counts: Vec<String> = r.hosts_by_state.iter().map(|(s, n)| format!("{s}={n}")).collect();
        let _ = writeln!(
            out,
            "{:<32} {:<11} {:>5} {:>6}  {}",
            r.rollout_id.as_str(),
            r.state.as_str(),
            // The manifest's numbering (from 0): the wave at / the last wave.
            format!("{}/{}", r.current_wave, r.n_waves.saturating_sub(1)),
            r.n_hosts,
            counts.join(" ")
        );
        if let Some(reason) = &r.halt_reason {
            let _ = writeln!(out, "  halted: {reason}");
        }
        if let Some(by) = &r.superseded_by {
            let _ = writeln!(out, "  superseded by {by}: {}", outcome(r));
        } else if matches!(r.state, RolloutState::Completed | RolloutState::Cancelled) {
            let _ = writeln!(out, "  {}: {}", r.state, outcome(r));
        }
    }
}

/// What happened to the hosts of a finished rollout, in words: a rollout
/// in which every host reverted reads "0 converged, 4 reverted", not just
/// "completed".
pub(super) fn outcome(r: &RolloutSummary) -> String {
    let n = |state: &str| r.hosts_by_state.get(state).copied().unwrap_or(0);
    let mut parts = vec![format!("{} converged", n("Converged"))];
    for (state, word) in [("Reverted", "reverted"), ("Failed", "failed"), ("Skipped", "skipped")] {
        if n(state) > 0 {
            parts.push(format!("{} {word}", n(state)));
        }
    }
    let in_flight = n("Activating") + n("Deferred") + n("Soaking");
    if in_flight > 0 {
        parts.push(format!("{in_flight} still in flight"));
    }
    if n("Pending") > 0 {
        parts.push(format!("{} never dispatched", n("Pending")));
    }
    parts.join(", ")
}

fn render_status(s: &StatusView) -> String {
    let mut out = String::new();
    let time = short_time(&s.server_time);
    let _ = writeln!(
        out,
        "control plane time {time}; {} hosts, {} unreachable, {} drifting\n",
        s.n_hosts, s.n_unreachable, s.n_drifting
    );
    render_rollouts(&mut out, &s.rollouts);
    if !s.quarantined.is_empty() {
        let _ = writeln!(out, "\nquarantined closures:");
        for q in &s.quarantined {
            let _ = writeln!(out, "  {} {} (reverted by {} in {})", q.channel, q.closure, q.hostname, q.rollout_id);
        }
    }
    if !s.drifting.is_empty() {
        let _ = writeln!(out, "\ndrifting hosts (the host runs another closure than its records say):");
        for d in &s.drifting {
            let _ = writeln!(
                out,
                "  {} runs {}\n  {:width$} expected {} (from {})",
                d.hostname.as_str(),
                d.current_closure,
                "",
                d.expected_closure,
                d.expected_from,
                width = d.hostname.as_str().len()
            );
        }
    }
    if !s.deferred.is_empty() {
        let _ = writeln!(out, "\nwaiting for a reboot:");
        for d in &s.deferred {
            let _ = writeln!(
                out,
                "  {} in {}: deferred since {} ({})",
                d.hostname.as_str(),
                d.rollout_id,
                d.deferred_at,
                human_age(d.deferred_for_secs)
            );
        }
    }
    out
}

pub(super) fn render_rollout(r: &RolloutDetail) -> String {
    let mut out = String::new();
    render_rollouts(&mut out, std::slice::from_ref(&r.summary));
    let _ = writeln!(out, "policy: on_health_failure {}, max_failed_hosts {}", r.on_health_failure, r.max_failed_hosts);
    for a in &r.operator_actions {
        let _ = writeln!(out, "{} {} by {}: {}", short_time(&a.at), a.action, a.operator, a.reason);
    }
    for wave in &r.waves {
        let _ = writeln!(
            out,
            "\nwave {} {:?} (soak {}s, max_in_flight {})",
            wave.index, wave.name, wave.soak_secs, wave.max_in_flight
        );
        for h in &wave.hosts {
            let probes = if h.failing_probes.is_empty() {
                String::new()
            } else {
                format!(" failing: {}", h.failing_probes.join(","))
            };
            let note = h.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            let deferred = match (&h.deferred_at, h.deferred_for_secs) {
                (Some(at), Some(secs)) => format!(" deferred since {at} ({})", human_age(secs)),
                _ => String::new(),
            };
            let state = if h.skipped.is_some() { "Skipped" } else { h.state.as_str() };
            let line =
                format!("  {:<24} {:<11} seq {:<4}{probes}{deferred}{note}", h.hostname.as_str(), state, h.last_seq);
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

fn render_hosts(hosts: &[HostView]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:<12} {:<22} {:<9} ROLLOUTS", "HOST", "LIVENESS", "LAST HEARTBEAT", "DRIFT");
    for h in hosts {
        let liveness = match h.liveness {
            Liveness::Reachable => "reachable",
            Liveness::Unreachable => "UNREACHABLE",
            Liveness::NeverSeen => "never seen",
        };
        let rollouts: Vec<String> = h.rollouts.iter().map(|r| format!("{}={}", r.rollout_id, r.state)).collect();
        let drift = match h.drift {
            Drift::InSync => "in sync",
            Drift::Drifting => "DRIFTING",
            Drift::Unknown => "-",
        };
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:<22} {:<9} {}",
            h.hostname.as_str(),
            liveness,
            h.last_heartbeat_at.as_deref().map_or("-".to_owned(), short_time),
            drift,
            rollouts.join(" ")
        );
        if h.drift == Drift::Drifting {
            let _ = writeln!(
                out,
                "  drifting: runs {}, records say {} (from {})",
                h.current_closure.as_deref().unwrap_or("?"),
                h.expected_closure.as_deref().unwrap_or("?"),
                h.expected_from.as_deref().unwrap_or("?")
            );
        }
    }
    out
}

/// A duration for people: the two largest units ("6d 2h", "4m 10s").
fn human_age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// An RFC 3339 instant to whole seconds, for tables ("2026-11-25T12:00:07Z").
pub(super) fn short_time(rfc3339: &str) -> String {
    match rfc3339.split_once('.') {
        Some((secs, _)) => format!("{secs}Z"),
        None => rfc3339.to_owned(),
    }
}
