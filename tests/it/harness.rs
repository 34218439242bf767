//! Shared test fixtures: temp dirs, release keys and signed manifests, the
//! real `nixfleet cp serve` process (port 0, address read from a file), and
//! a scripted test agent that speaks the wire protocol over real HTTP.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nixfleet::client::{self, CpUrl, HttpResponse};
use nixfleet::ids::Closure;
use nixfleet::machine::ProbeDecl;
use nixfleet::sign::{self, SigningKey};
use nixfleet::tls::{CertKeyFiles, ClientTlsFiles, ReloadableClientConfig, Role};
use nixfleet::tools::pki;
use nixfleet::wire::{
    Dispatch, EventBatchResponse, EventResult, HeartbeatResponse, OutboundEvent, WireEventBody, REPLAY_FROM_HEADER,
};
use sha2::{Digest, Sha256};
use time::macros::datetime;
use time::{Duration as TimeDuration, OffsetDateTime};

/// Everything in tests waits on a condition with this deadline, never a sleep.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A test's own directory, `nixfleet-it-{label}-XXXXXX` under the system
/// temp dir, created fresh and removed when dropped: the one way these
/// tests make a temp dir (the label says which test left one behind after
/// a crash).
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let dir = tempfile::Builder::new().prefix(&format!("nixfleet-it-{label}-")).tempdir().expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Keeps the directory (for a failed test's evidence) and returns its path.
    pub fn keep(self) -> PathBuf {
        self.0.keep()
    }
}

/// Hands a child test its parameter (see [`child_test`]).
const CHILD_PARAM_ENV: &str = "NIXFLEET_IT_CHILD_PARAM";

/// This test binary, re-executed to run only the `#[ignore]`d child test
/// `name` (its path, e.g. `queue::enqueue_loop_child`) with `param` for
/// [`child_param`]: a real process running library code that a crash test
/// can `kill -9`, without a hidden subcommand in the user CLI or an extra
/// binary target. The caller adds stdio and a process group.
pub fn child_test(name: &str, param: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"]).env(CHILD_PARAM_ENV, param);
    cmd
}

/// In a child test: the parameter [`child_test`] passed, or `None` when the
/// test was run some other way (`cargo test -- --ignored`); it must then
/// return at once.
pub fn child_param() -> Option<String> {
    std::env::var(CHILD_PARAM_ENV).ok()
}

/// Polls `cond` until it returns `Some`, or panics after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// A release key pair on disk (the CP trusts `pub_path`).
pub struct Release {
    pub key: SigningKey,
    pub pub_path: PathBuf,
}

impl Release {
    pub fn new(dir: &Path, name: &str) -> Release {
        let (key_path, pub_path) = sign::write_keypair(&dir.join(name)).expect("write keypair");
        Release { key: SigningKey::load(&key_path).expect("load key"), pub_path }
    }

    /// The DSSE envelope bytes of `manifest`.
    pub fn sign(&self, manifest: &str) -> Vec<u8> {
        serde_json::to_vec(&sign::sign_envelope(&self.key, manifest.as_bytes())).expect("envelope json")
    }
}

/// A valid store path in this process's store directory, deterministic per label.
pub fn closure(label: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let digest = Sha256::digest(label.as_bytes());
    let hash: String = digest.iter().take(32).map(|b| ALPHABET[(*b as usize) % 32] as char).collect();
    format!("{}/{hash}-nixos-system-{label}", nixfleet::ids::store_dir())
}

/// One wave: (name, soak_secs, max_in_flight).
pub type WaveSpec<'a> = (&'a str, u64, u32);

/// Manifest JSON (`docs/protocol.md` §2); hosts are (hostname, wave, closure label).
pub fn manifest(
    id: &str,
    issued_at: &str,
    max_failed_hosts: u32,
    waves: &[WaveSpec<'_>],
    hosts: &[(&str, usize, &str)],
) -> String {
    let (channel, git_ref) = id.split_once('@').expect("channel@ref");
    let hosts: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|(h, w, c)| ((*h).to_owned(), serde_json::json!({"wave": w, "target_closure": closure(c)})))
        .collect();
    let waves: Vec<_> =
        waves.iter().map(|(n, s, m)| serde_json::json!({"name": n, "soak_secs": s, "max_in_flight": m})).collect();
    serde_json::json!({
        "schema": 1, "channel": channel, "ref": git_ref, "issued_at": issued_at,
        "policy": {"on_health_failure": "rollback-and-halt", "sustained_failure_secs": 60, "max_failed_hosts": max_failed_hosts},
        "waves": waves, "hosts": hosts,
    })
    .to_string()
}

/// Every HTTP request of the integration tests: `client::request`, then
/// the answer is checked against docs/openapi.yaml (route, status, content
/// type, JSON schema; `openapi::check_response`), so a test that gets an
/// undocumented answer fails.
pub async fn request(
    url: &CpUrl,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<HttpResponse, client::ClientError> {
    let resp = client::request(url, method.clone(), path_and_query, headers, body).await?;
    crate::openapi::check_response(method.as_str(), path_and_query, &resp);
    Ok(resp)
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nixfleet")
}

/// A fleet CA made with the `nixfleet pki` code (`tools::pki`), and the
/// certificates issued from it: `cp` (server, for 127.0.0.1 and localhost)
/// at once, any host or operator on first use.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let pki = Pki { dir: dir.to_owned() };
        pki::init(&pki.dir, nixfleet::clock::ClockHandle::system().now()).expect("pki init");
        let cp = pki::IssueRequest {
            name: "cp".into(),
            role: Role::Cp,
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("ip")],
            days: 30,
        };
        pki::issue(&pki.dir, &cp, nixfleet::clock::ClockHandle::system().now()).expect("pki issue cp");
        pki
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `NAME.crt` and `NAME.key`, issued now for 30 days unless they exist.
    pub fn files(&self, name: &str, role: Role) -> CertKeyFiles {
        let files = self.paths(name);
        if !files.cert.exists() {
            self.issue_at(name, role, nixfleet::clock::ClockHandle::system().now(), 30);
        }
        files
    }

    /// Issues `name` as if the clock said `now` (an expired or a not yet
    /// valid certificate is issued in the past or the future).
    pub fn issue_at(&self, name: &str, role: Role, now: OffsetDateTime, days: u32) -> CertKeyFiles {
        let request = pki::IssueRequest { name: name.into(), role, dns: Vec::new(), ips: Vec::new(), days };
        pki::issue(&self.dir, &request, now).expect("pki issue");
        self.paths(name)
    }

    pub fn paths(&self, name: &str) -> CertKeyFiles {
        CertKeyFiles { cert: self.dir.join(format!("{name}.crt")), key: self.dir.join(format!("{name}.key")) }
    }

    /// `--ca-cert F --client-cert F --client-key F` for `name`.
    pub fn client_args(&self, name: &str, role: Role) -> Vec<String> {
        let files = self.files(name, role);
        [("--ca-cert", self.ca()), ("--client-cert", files.cert), ("--client-key", files.key)]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
            .collect()
    }

    /// `--tls-cert F --tls-key F --client-ca F` of `cp serve`.
    pub fn serve_args(&self) -> Vec<String> {
        let cp = self.paths("cp");
        [("--tls-cert", cp.cert), ("--tls-key", cp.key), ("--client-ca", self.ca())]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
            .collect()
    }

    /// An https URL of `authority` presenting `files`.
    pub fn url_with(&self, authority: &str, files: CertKeyFiles) -> CpUrl {
        let tls = ClientTlsFiles { ca: self.ca(), identity: Some(files) };
        let tls = std::sync::Arc::new(ReloadableClientConfig::load(tls).expect("client TLS config"));
        CpUrl::parse(&format!("https://{authority}")).expect("url").with_tls(tls)
    }
}

/// A real `nixfleet cp serve` process.
pub struct Cp {
    child: Option<Child>,
    /// The operator's URL (with TLS: the `operator` certificate).
    pub url: CpUrl,
    pub pki: Option<Pki>,
    pub db: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    addr_file: PathBuf,
    /// A descriptor limit (`ulimit -n`) to start the process under.
    nofile: Option<u64>,
    /// Extra environment variables of the process.
    envs: Vec<(String, String)>,
}

impl Cp {
    pub fn start(dir: &Path, trust: &Path) -> Cp {
        Cp::start_with(dir, trust, &[])
    }

    /// With mutual TLS: a fleet CA in `dir/pki`, the CP's certificate, and
    /// `url` speaking as the operator `operator`.
    pub fn start_tls(dir: &Path, trust: &Path, extra: &[&str]) -> Cp {
        let pki = Pki::new(&dir.join("pki"));
        let mut args: Vec<String> = pki.serve_args();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Cp::start_inner(dir, trust, &args, Some(pki))
    }

    pub fn start_with(dir: &Path, trust: &Path, extra: &[&str]) -> Cp {
        Cp::start_inner(dir, trust, extra, None)
    }

    fn start_inner(dir: &Path, trust: &Path, extra: &[&str], pki: Option<Pki>) -> Cp {
        let db = dir.join("cp.db");
        let addr_file = dir.join("cp.addr");
        let mut args: Vec<String> = vec![
            "cp".into(),
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            db.display().to_string(),
            "--trust-key".into(),
            trust.display().to_string(),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut cp = Cp {
            child: None,
            url: CpUrl::parse("http://127.0.0.1:1").expect("url"),
            pki,
            db,
            log: dir.join("cp.log"),
            args,
            addr_file,
            nofile: None,
            envs: Vec::new(),
        };
        cp.spawn();
        cp
    }

    /// [`Cp::start_with`] under a descriptor limit of `nofile`.
    pub fn start_with_nofile(dir: &Path, trust: &Path, extra: &[&str], nofile: u64) -> Cp {
        let mut cp = Cp::start_with(dir, trust, extra);
        cp.kill9();
        cp.nofile = Some(nofile);
        cp.restart();
        cp
    }

    /// [`Cp::start_with`] with extra environment variables.
    pub fn start_with_env(dir: &Path, trust: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Cp {
        let mut cp = Cp::start_with(dir, trust, extra);
        cp.kill9();
        cp.envs = envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        cp.restart();
        cp
    }

    /// The process id (for /proc readings).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.addr_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut command = match self.nofile {
            None => Command::new(bin()),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(bin());
                sh
            }
        };
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "nixfleet=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nixfleet cp serve");
        self.child = Some(child);
        let addr = wait_for("the CP's address file", || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "cp serve exited early with {status}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            std::fs::read_to_string(&self.addr_file).ok().filter(|s| s.ends_with('\n'))
        });
        self.url = self.url_as("operator", Role::Operator, addr.trim());
    }

    /// The URL of this CP as `name` (with TLS: its certificate, issued on first use).
    fn url_as(&self, name: &str, role: Role, authority: &str) -> CpUrl {
        match &self.pki {
            Some(pki) => pki.url_with(authority, pki.files(name, role)),
            None => CpUrl::parse(&format!("http://{authority}")).expect("cp url"),
        }
    }

    /// The URL an agent for `host` uses (with TLS: the host's own certificate).
    pub fn host_url(&self, host: &str) -> CpUrl {
        self.url_as(host, Role::Host, self.url.authority())
    }

    /// `--cp URL` and, with TLS, the client certificate flags of `name`.
    pub fn client_args(&self, name: &str, role: Role) -> Vec<String> {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let mut args = vec!["--cp".to_owned(), format!("{scheme}://{}", self.url.authority())];
        if let Some(pki) = &self.pki {
            args.extend(pki.client_args(name, role));
        }
        args
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("kill -TERM");
        assert!(ok.success());
        wait_for("cp serve to exit", || child.try_wait().expect("try_wait"))
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// Restarts on the address it had, as a real CP behind a fixed port
    /// would come back (agents keep their configured URL).
    pub fn restart_same_port(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let authority = self.url.authority().to_owned();
        if let Some(idx) = self.args.iter().position(|a| a == "--listen") {
            self.args[idx + 1] = authority;
        }
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> HttpResponse {
        request(&self.url, Method::GET, path, &[], None).await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let resp = self.get(path).await;
        assert_eq!(resp.status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&resp.body));
        serde_json::from_slice(&resp.body).expect("json")
    }

    pub async fn publish(&self, envelope: &[u8]) -> HttpResponse {
        request(&self.url, Method::POST, "/v1/rollouts", &[], Some(envelope.to_vec())).await.expect("POST")
    }

    /// One host's row of `/v1/rollouts/{id}`.
    pub async fn host_row(&self, rollout: &str, host: &str) -> serde_json::Value {
        let detail = self.get_json(&format!("/v1/rollouts/{rollout}")).await;
        for wave in detail["waves"].as_array().expect("waves") {
            for h in wave["hosts"].as_array().expect("hosts") {
                if h["hostname"] == host {
                    return h.clone();
                }
            }
        }
        panic!("{host} not in {rollout}: {detail:#}")
    }

    /// The state of one host in one rollout, from `/v1/rollouts/{id}`.
    pub async fn host_state(&self, rollout: &str, host: &str) -> String {
        self.host_row(rollout, host).await["state"].as_str().expect("state").to_owned()
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A scripted agent: assigns seqs per rollout, keeps its own journal (like
/// the real agent's retained queue) and speaks HTTP to the CP.
pub struct Agent {
    pub host: String,
    pub url: CpUrl,
    /// The closure the host runs now.
    pub current: String,
    pub journal: BTreeMap<String, Vec<OutboundEvent>>,
    clock: OffsetDateTime,
}

impl Agent {
    pub fn new(host: &str, url: &CpUrl) -> Agent {
        Agent {
            host: host.to_owned(),
            url: url.clone(),
            current: closure(&format!("{host}-old")),
            journal: BTreeMap::new(),
            clock: datetime!(2026-11-25 12:00 UTC),
        }
    }

    pub fn tick(&mut self, secs: i64) -> OffsetDateTime {
        self.clock += TimeDuration::seconds(secs);
        self.clock
    }

    /// Appends an event with the next seq of the rollout to the journal.
    pub fn emit(&mut self, rollout: &str, body: WireEventBody) -> OutboundEvent {
        let events = self.journal.entry(rollout.to_owned()).or_default();
        let event = OutboundEvent { seq: events.len() as u64 + 1, body };
        events.push(event.clone());
        event
    }

    pub fn last_seq(&self, rollout: &str) -> u64 {
        self.journal.get(rollout).map_or(0, |e| e.len() as u64)
    }

    pub async fn post(&self, items: &[(&str, &OutboundEvent)]) -> Vec<EventResult> {
        let resp = self.post_raw(items).await;
        assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
        let answer: EventBatchResponse = serde_json::from_slice(&resp.body).expect("batch answer");
        assert_eq!(answer.results.len(), items.len());
        answer.results
    }

    pub async fn post_raw(&self, items: &[(&str, &OutboundEvent)]) -> HttpResponse {
        let events: Vec<_> = items.iter().map(|(r, e)| serde_json::json!({"rollout_id": r, "event": e})).collect();
        let body = serde_json::json!({"hostname": self.host, "events": events});
        request(&self.url, Method::POST, "/v1/agent/events", &[], Some(body.to_string().into_bytes()))
            .await
            .expect("POST events")
    }

    /// Like `post`, but `None` when the connection fails (the CP was killed).
    pub async fn post_raw_checked(&self, items: &[(&str, &OutboundEvent)]) -> Option<Vec<EventResult>> {
        let events: Vec<_> = items.iter().map(|(r, e)| serde_json::json!({"rollout_id": r, "event": e})).collect();
        let body = serde_json::json!({"hostname": self.host, "events": events});
        let resp = request(&self.url, Method::POST, "/v1/agent/events", &[], Some(body.to_string().into_bytes()))
            .await
            .ok()?;
        if resp.status != StatusCode::OK {
            return None;
        }
        let answer: EventBatchResponse = serde_json::from_slice(&resp.body).ok()?;
        Some(answer.results)
    }

    /// Emits and posts one event; returns the CP's verdict.
    pub async fn send(&mut self, rollout: &str, body: WireEventBody) -> EventResult {
        let event = self.emit(rollout, body);
        self.post(&[(rollout, &event)]).await.remove(0)
    }

    pub async fn poll(&self, wait_secs: u64) -> Option<Dispatch> {
        let path = format!("/v1/agent/dispatch?hostname={}&wait={wait_secs}", self.host);
        let resp = request(&self.url, Method::GET, &path, &[], None).await.expect("long-poll");
        match resp.status {
            StatusCode::OK => Some(serde_json::from_slice(&resp.body).expect("dispatch")),
            StatusCode::NO_CONTENT => None,
            other => panic!("long-poll answered {other}: {}", String::from_utf8_lossy(&resp.body)),
        }
    }

    pub async fn heartbeat(&self) -> (HeartbeatResponse, Option<String>) {
        let last_seq: BTreeMap<&String, u64> = self.journal.iter().map(|(r, e)| (r, e.len() as u64)).collect();
        let body = serde_json::json!({
            "hostname": self.host, "current_closure": self.current, "uptime_secs": 100,
            "agent_version": "test", "last_seq": last_seq,
        });
        let resp = request(&self.url, Method::POST, "/v1/agent/heartbeat", &[], Some(body.to_string().into_bytes()))
            .await
            .expect("heartbeat");
        assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
        let header = resp.headers.get(REPLAY_FROM_HEADER).map(|v| v.to_str().expect("ascii").to_owned());
        (serde_json::from_slice(&resp.body).expect("heartbeat answer"), header)
    }

    /// Re-sends journaled events with seq > `after` (the agent's side of
    /// Replay-From); returns the verdicts.
    pub async fn replay(&self, rollout: &str, after: u64) -> Vec<EventResult> {
        let events: Vec<&OutboundEvent> =
            self.journal.get(rollout).map(|e| e.iter().filter(|e| e.seq > after).collect()).unwrap_or_default();
        let items: Vec<(&str, &OutboundEvent)> = events.into_iter().map(|e| (rollout, e)).collect();
        if items.is_empty() {
            return Vec::new();
        }
        self.post(&items).await
    }

    pub fn ack_body(&mut self, d: &Dispatch) -> WireEventBody {
        WireEventBody::DispatchAck {
            current_closure_at_dispatch: Closure::parse(&self.current).expect("closure"),
            target_closure: d.target_closure.clone(),
            soak_secs: d.soak_secs,
            received_at: self.tick(1),
        }
    }

    /// Ack → switch → activation completes: the host is Soaking.
    pub async fn activate(&mut self, d: &Dispatch) {
        let rollout = d.rollout_id.to_string();
        let ack = self.ack_body(d);
        assert_applied(&self.send(&rollout, ack).await);
        self.current = d.target_closure.to_string();
        let completed = WireEventBody::ActivationCompleted {
            observed_current_closure: d.target_closure.clone(),
            exit_code: 0,
            completed_at: self.tick(5),
        };
        assert_applied(&self.send(&rollout, completed).await);
    }

    /// From Soaking: declare an empty topology and converge after the soak.
    pub async fn converge(&mut self, d: &Dispatch) {
        let rollout = d.rollout_id.to_string();
        let topology =
            WireEventBody::ProbeTopologyDeclared { probes: Vec::<ProbeDecl>::new(), declared_at: self.tick(1) };
        assert_applied(&self.send(&rollout, topology).await);
        let at = self.tick(d.soak_secs as i64 + 1);
        let converged = WireEventBody::Converged { converged_at: at, current_closure: d.target_closure.clone() };
        assert_applied(&self.send(&rollout, converged).await);
    }

    /// Ack, activation fails, the agent rolls back: the host is Reverted.
    pub async fn fail_and_revert(&mut self, d: &Dispatch) {
        let rollout = d.rollout_id.to_string();
        let prior = self.current.clone();
        let ack = self.ack_body(d);
        assert_applied(&self.send(&rollout, ack).await);
        let failed = WireEventBody::ActivationFailed {
            exit_code: 1,
            stderr_tail: "switch-to-configuration: unit web.service failed".into(),
            failed_at: self.tick(3),
        };
        assert_applied(&self.send(&rollout, failed).await);
        let reverted = WireEventBody::RollbackComplete {
            reverted_to_closure: Closure::parse(&prior).expect("closure"),
            exit_code: 0,
            completed_at: self.tick(3),
        };
        assert_applied(&self.send(&rollout, reverted).await);
    }
}

pub fn assert_applied(r: &EventResult) {
    assert_eq!(r.status, nixfleet::wire::ResultStatus::Applied, "{:?}", r.reason);
}
