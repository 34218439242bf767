//! The `nixfleet cp …` commands: argument checks, the tokio runtime, and
//! human output. `serve` wires real resources into [`super::serve`];
//! `publish` and `status` are thin clients of the HTTP API.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::routes::MAX_ENVELOPE_BYTES;
use super::server::{self, PlainAcceptor, ServeConfig, ServeError};
use super::store::Drift;
use super::views::{HostView, Liveness, RolloutDetail, RolloutSummary, StatusView};
use crate::cli::{CpCommand, CpPublishArgs, CpServeArgs, CpStatusArgs};
use crate::client::{self, ClientError, CpUrl};
use crate::clock::ClockHandle;
use crate::output::print_stdout;
use crate::sign::{PublicKey, SignError};
use crate::signal::shutdown_signal;

/// How long in-flight requests may finish after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("refusing to serve plaintext HTTP on non-loopback address {0}: pass --insecure, or wait for TLS support")]
    PlaintextNonLoopback(SocketAddr),
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
}

/// Runs one `cp` subcommand.
pub fn run(cmd: CpCommand) -> Result<(), CpError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CpError::Runtime)?;
    match cmd {
        CpCommand::Serve(args) => runtime.block_on(serve_cmd(args)),
        CpCommand::Publish(args) => runtime.block_on(publish_cmd(args)),
        CpCommand::Status(args) => runtime.block_on(status_cmd(args)),
    }
}

async fn serve_cmd(args: CpServeArgs) -> Result<(), CpError> {
    if !args.listen.ip().is_loopback() && !args.insecure {
        return Err(CpError::PlaintextNonLoopback(args.listen));
    }
    let trust_keys = args.trust_key.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let listener = server::bind(args.listen).map_err(|source| CpError::Bind { addr: args.listen, source })?;
    let local = listener.local_addr().map_err(|source| CpError::Bind { addr: args.listen, source })?;
    if args.listen.ip().is_loopback() {
        tracing::info!(addr = %local, db = %args.db.display(), "control plane listening on http://{local} (plaintext, loopback only: no TLS configured)");
    } else {
        tracing::warn!(addr = %local, db = %args.db.display(), "control plane listening on http://{local} WITHOUT TLS (--insecure)");
    }
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
        },
    };
    server::serve(listener, PlainAcceptor, cfg, ClockHandle::system(), shutdown_signal()).await?;
    Ok(())
}

/// Written atomically (tmp + rename) so a reader never sees half an address.
fn write_addr_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs_err::write(&tmp, format!("{addr}\n"))?;
    fs_err::rename(&tmp, path)
}

async fn publish_cmd(args: CpPublishArgs) -> Result<(), CpError> {
    let url = CpUrl::parse(&args.cp)?;
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
    let url = CpUrl::parse(&args.cp)?;
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
            format!("{}/{}", r.current_wave + 1, r.n_waves),
            r.n_hosts,
            counts.join(" ")
        );
        if let Some(reason) = &r.halt_reason {
            let _ = writeln!(out, "  halted: {reason}");
        }
        if let Some(by) = &r.superseded_by {
            let _ = writeln!(out, "  superseded by {by}");
        }
    }
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

fn render_rollout(r: &RolloutDetail) -> String {
    let mut out = String::new();
    render_rollouts(&mut out, std::slice::from_ref(&r.summary));
    let _ = writeln!(out, "policy: on_health_failure {}, max_failed_hosts {}", r.on_health_failure, r.max_failed_hosts);
    for wave in &r.waves {
        let _ = writeln!(
            out,
            "\nwave {} {:?} (soak {}s, max_in_flight {})",
            wave.index + 1,
            wave.name,
            wave.soak_secs,
            wave.max_in_flight
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
fn short_time(rfc3339: &str) -> String {
    match rfc3339.split_once('.') {
        Some((secs, _)) => format!("{secs}Z"),
        None => rfc3339.to_owned(),
    }
}
