//! Health probes (`docs/protocol.md` §6): the health-checks file of the active system, and
//! the runners that turn one probe into Pass or Fail.
//!
//! The file is parsed strictly (unknown fields are errors naming the field),
//! because a typo in a probe that silently turns into "no probe" would let a
//! broken host converge. A missing file is an empty topology: a closure
//! without probes converges on its soak time alone.
//!
//! Runners never panic and never answer "unknown": a timeout, a spawn
//! failure, a refused connection or a wrong status is a Fail with a reason of
//! at most [`MAX_FAILURE_REASON_BYTES`].

pub mod exec;
pub mod http;
pub mod systemd;
pub mod tcp;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::agent::activation::utf8_head;
use crate::machine::{ProbeDecl, ProbeKind, ProbeMode, ProbeStatus};
use crate::wire::event::{validate_probe_name, MAX_FAILURE_REASON_BYTES, MAX_PROBES};

/// Where a NixOS closure puts its health checks (relative to the system root).
pub const DEFAULT_HEALTH_CHECKS_PATH: &str = "/etc/nixfleet/agent/health-checks.json";
/// A health-checks file is a few KiB; a bigger one is a mistake, and reading
/// it whole must stay cheap.
pub const MAX_HEALTH_CHECKS_BYTES: u64 = 1024 * 1024;
/// Probe interval when the file does not say.
pub const DEFAULT_INTERVAL_SECS: u64 = 30;
/// Faster than once a second is load, not health checking.
pub const MIN_INTERVAL_SECS: u64 = 1;
/// Slower than daily cannot gate any realistic soak window.
pub const MAX_INTERVAL_SECS: u64 = 24 * 60 * 60;
/// A probe that needs more than five minutes to answer is itself unhealthy.
pub const MAX_TIMEOUT_SECS: u64 = 5 * 60;
/// TCP connect timeout when the file does not say.
pub const DEFAULT_TCP_TIMEOUT_SECS: u64 = 3;
/// HTTP status when the file does not say.
pub const DEFAULT_HTTP_STATUS: u16 = 200;

/// A health-checks file that cannot be used: the field path and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health checks {}: {field}: {message}", path.as_ref().map_or("(inline)".to_owned(), |p| p.display().to_string()))]
pub struct ProbeConfigError {
    pub path: Option<PathBuf>,
    pub field: String,
    pub message: String,
}

fn config_error(field: impl Into<String>, message: impl Into<String>) -> ProbeConfigError {
    ProbeConfigError { path: None, field: field.into(), message: message.into() }
}

/// One declared probe, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    pub mode: ProbeMode,
    pub interval: Duration,
    pub check: Check,
}

/// What a probe checks; the fields of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Exec {
        argv: Vec<String>,
        timeout: Duration,
        expect_exit_code: i32,
    },
    /// `ca_file`: https only; the one CA bundle the server must chain to
    /// (None: the system's roots).
    Http {
        url: http::HttpUrl,
        expect_status: u16,
        body_contains: Option<String>,
        ca_file: Option<PathBuf>,
        timeout: Duration,
    },
    Tcp {
        host: String,
        port: u16,
        timeout: Duration,
    },
    Systemd {
        unit: String,
    },
}

impl Probe {
    pub fn kind(&self) -> ProbeKind {
        match self.check {
            Check::Exec { .. } => ProbeKind::Exec,
            Check::Http { .. } => ProbeKind::Http,
            Check::Tcp { .. } => ProbeKind::Tcp,
            Check::Systemd { .. } => ProbeKind::Systemd,
        }
    }

    pub fn decl(&self) -> ProbeDecl {
        ProbeDecl { name: self.name.clone(), kind: self.kind(), mode: self.mode }
    }
}

/// The parsed health-checks file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks {
    pub probes: Vec<Probe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    probes: Vec<RawProbe>,
}

fn default_interval() -> u64 {
    DEFAULT_INTERVAL_SECS
}
fn default_status() -> u16 {
    DEFAULT_HTTP_STATUS
}
fn default_tcp_timeout() -> u64 {
    DEFAULT_TCP_TIMEOUT_SECS
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum RawProbe {
    Exec {
        name: String,
        mode: ProbeMode,
        #[serde(default = "default_interval")]
        interval_secs: u64,
        argv: Vec<String>,
        timeout_secs: u64,
        #[serde(default)]
        expect_exit_code: i32,
    },
    Http {
        name: String,
        mode: ProbeMode,
        #[serde(default = "default_interval")]
        interval_secs: u64,
        url: String,
        #[serde(default = "default_status")]
        expect_status: u16,
        #[serde(default)]
        body_contains: Option<String>,
        #[serde(default)]
        ca_file: Option<PathBuf>,
        timeout_secs: u64,
    },
    Tcp {
        name: String,
        mode: ProbeMode,
        #[serde(default = "default_interval")]
        interval_secs: u64,
        host: String,
        port: u16,
        #[serde(default = "default_tcp_timeout")]
        timeout_secs: u64,
    },
    Systemd {
        name: String,
        mode: ProbeMode,
        #[serde(default = "default_interval")]
        interval_secs: u64,
        unit: String,
    },
}

fn secs_in(field: &str, secs: u64, min: u64, max: u64) -> Result<Duration, ProbeConfigError> {
    if secs < min || secs > max {
        return Err(config_error(field, format!("{secs} is outside {min}..={max} seconds")));
    }
    Ok(Duration::from_secs(secs))
}

fn non_empty(field: &str, value: &str) -> Result<(), ProbeConfigError> {
    if value.trim().is_empty() {
        return Err(config_error(field, "must not be empty"));
    }
    Ok(())
}

/// A probe's CA file must be usable when the file is parsed, so a wrong path
/// is a config error naming the field, not a probe that fails forever.
fn validate_ca_file(field: &str, path: &Path, scheme: http::Scheme) -> Result<(), ProbeConfigError> {
    if scheme != http::Scheme::Https {
        return Err(config_error(field, "only https:// URLs use a CA file"));
    }
    if !path.is_absolute() {
        return Err(config_error(field, format!("{} must be an absolute path", path.display())));
    }
    crate::tls::load_ca_bundle(path).map_err(|e| config_error(field, e.to_string()))?;
    Ok(())
}

impl RawProbe {
    fn validate(self, at: &str) -> Result<Probe, ProbeConfigError> {
        let f = |name: &str| format!("{at}.{name}");
        let (name, mode, interval_secs, check) = match self {
            RawProbe::Exec { name, mode, interval_secs, argv, timeout_secs, expect_exit_code } => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(config_error(f("argv"), "must name a program: [\"/path/to/program\", args...]"));
                }
                let timeout = secs_in(&f("timeout_secs"), timeout_secs, 1, MAX_TIMEOUT_SECS)?;
                (name, mode, interval_secs, Check::Exec { argv, timeout, expect_exit_code })
            }
            RawProbe::Http { name, mode, interval_secs, url, expect_status, body_contains, ca_file, timeout_secs } => {
                let url = http::HttpUrl::parse(&url).map_err(|why| config_error(f("url"), why.to_string()))?;
                if let Some(path) = &ca_file {
                    validate_ca_file(&f("ca_file"), path, url.scheme)?;
                }
                if !(100..=599).contains(&expect_status) {
                    return Err(config_error(f("expect_status"), format!("{expect_status} is not an HTTP status")));
                }
                if body_contains.as_deref() == Some("") {
                    return Err(config_error(f("body_contains"), "must not be empty (omit it instead)"));
                }
                let timeout = secs_in(&f("timeout_secs"), timeout_secs, 1, MAX_TIMEOUT_SECS)?;
                (name, mode, interval_secs, Check::Http { url, expect_status, body_contains, ca_file, timeout })
            }
            RawProbe::Tcp { name, mode, interval_secs, host, port, timeout_secs } => {
                non_empty(&f("host"), &host)?;
                if port == 0 {
                    return Err(config_error(f("port"), "must be 1..=65535"));
                }
                let timeout = secs_in(&f("timeout_secs"), timeout_secs, 1, MAX_TIMEOUT_SECS)?;
                (name, mode, interval_secs, Check::Tcp { host, port, timeout })
            }
            RawProbe::Systemd { name, mode, interval_secs, unit } => {
                non_empty(&f("unit"), &unit)?;
                if unit.starts_with('-') {
                    return Err(config_error(f("unit"), "must not start with '-' (it would be read as an option)"));
                }
                (name, mode, interval_secs, Check::Systemd { unit })
            }
        };
        let name = validate_probe_name(&f("name"), &name).map_err(|e| config_error(f("name"), e.to_string()))?;
        let interval = secs_in(&f("interval_secs"), interval_secs, MIN_INTERVAL_SECS, MAX_INTERVAL_SECS)?;
        Ok(Probe { name, mode, interval, check })
    }
}

impl HealthChecks {
    /// Parses the file's text; errors name the field (`probes[2].timeout_secs`).
    /// An https probe's `ca_file` is read here to check it (file I/O: call
    /// this off the reactor, as [`HealthChecks::load`] is).
    pub fn parse(json: &str) -> Result<HealthChecks, ProbeConfigError> {
        let de = &mut serde_json::Deserializer::from_str(json);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            config_error(if field == "." { "(file)".to_owned() } else { field }, e.into_inner().to_string())
        })?;
        if raw.probes.len() > MAX_PROBES {
            return Err(config_error("probes", format!("{} probes; at most {MAX_PROBES}", raw.probes.len())));
        }
        let mut probes: Vec<Probe> = Vec::with_capacity(raw.probes.len());
        for (idx, raw) in raw.probes.into_iter().enumerate() {
            let at = format!("probes[{idx}]");
            let probe = raw.validate(&at)?;
            if probes.iter().any(|p| p.name == probe.name) {
                return Err(config_error(format!("{at}.name"), format!("duplicate probe name {:?}", probe.name)));
            }
            probes.push(probe);
        }
        Ok(HealthChecks { probes })
    }

    /// Reads and parses the file. A missing file is an empty topology (no
    /// probes); any other read error or a bad file is an error.
    pub fn load(path: &Path) -> Result<HealthChecks, ProbeConfigError> {
        let with_path = |mut e: ProbeConfigError| {
            e.path = Some(path.to_owned());
            e
        };
        let len = match fs_err::metadata(path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HealthChecks::default()),
            Err(e) => return Err(with_path(config_error("(file)", e.to_string()))),
        };
        if len > MAX_HEALTH_CHECKS_BYTES {
            return Err(with_path(config_error("(file)", format!("{len} bytes; at most {MAX_HEALTH_CHECKS_BYTES}"))));
        }
        let text = fs_err::read_to_string(path).map_err(|e| with_path(config_error("(file)", e.to_string())))?;
        HealthChecks::parse(&text).map_err(with_path)
    }

    /// Every declared probe, disabled ones included (they are listed, not run).
    pub fn topology(&self) -> Vec<ProbeDecl> {
        self.probes.iter().map(Probe::decl).collect()
    }
}

/// The result of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub status: ProbeStatus,
    /// Why it failed, at most [`MAX_FAILURE_REASON_BYTES`]; None on Pass.
    pub reason: Option<String>,
}

impl ProbeRun {
    pub fn pass() -> ProbeRun {
        ProbeRun { status: ProbeStatus::Pass, reason: None }
    }

    /// A Fail whose reason is cut to the wire limit at a character boundary.
    pub fn fail(reason: impl AsRef<str>) -> ProbeRun {
        ProbeRun { status: ProbeStatus::Fail, reason: Some(utf8_head(reason.as_ref(), MAX_FAILURE_REASON_BYTES)) }
    }
}

/// Runs one probe once. A seam so the agent runtime can be tested with
/// scripted results; [`HostRunner`] is the real one.
pub trait ProbeRunner {
    fn run(&self, probe: &Probe) -> impl Future<Output = ProbeRun> + Send;
}

/// Runs probes on this host.
#[derive(Debug, Clone)]
pub struct HostRunner {
    /// `systemctl`, for systemd probes.
    pub systemctl: PathBuf,
}

impl Default for HostRunner {
    fn default() -> HostRunner {
        HostRunner { systemctl: "systemctl".into() }
    }
}

impl ProbeRunner for HostRunner {
    async fn run(&self, probe: &Probe) -> ProbeRun {
        match &probe.check {
            Check::Exec { argv, timeout, expect_exit_code } => exec::run(argv, *timeout, *expect_exit_code).await,
            Check::Http { url, expect_status, body_contains, ca_file, timeout } => {
                http::run(url, *expect_status, body_contains.as_deref(), ca_file.as_deref(), *timeout).await
            }
            Check::Tcp { host, port, timeout } => tcp::run(host, *port, *timeout).await,
            Check::Systemd { unit } => systemd::run(&self.systemctl, unit).await,
        }
    }
}

#[cfg(test)]
mod tests;
