//! Idle long-polls: the real `nixfleet cp serve` process holds
//! 10,000 parked `GET /v1/agent/dispatch?wait=60` connections; we print its
//! RSS per parked long-poll (from /proc, before and after), then publish a
//! rollout that dispatches to all of them and print the time from sending
//! the publish until the last long-poll answer has been read, split into
//! "first answer" (the CP receiving, verifying, storing, planning and
//! committing the rollout) and "the rest" (answering 10,000 connections).
//! Three runs; medians. Reference numbers from the issue: a bare hyper
//! server holds a pending long-poll in ≈ 17 KiB; targets ≤ 32 KiB each and
//! ≤ 500 ms for all.
//!
//! The same runs again with mutual TLS (`cp serve --tls-cert --tls-key
//! --client-ca`, every poller presenting its own host certificate, made in
//! memory from a `pki` CA), printed beside the plaintext figures: the
//! targets hold for both.
//!
//! Baseline measured in the same run: a bare hyper server (no routing, no
//! storage) holding the same 10,000 long-polls and releasing them all at
//! once, answered to the same client code: the floor this machine and this
//! client put under "answer 10,000 parked requests".
//!
//! The client is deliberately lean (plain tokio TCP, a minimal response
//! reader, one task per connection) because it shares the 2 cores with the
//! server: a hyper client per connection made the client itself the
//! bottleneck (the bare baseline took 500–770 ms with it, 100–150 ms now).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nixfleet::client::{self, CpUrl};
use nixfleet::sign;
use nixfleet::tls::{self, CertKeyFiles, ClientTlsFiles, ReloadableClientConfig, Role};
use nixfleet::tools::pki;
use tokio::io::{AsyncRead, AsyncWrite};

const N_POLLS: usize = 10_000;
const CONNECT_CONCURRENCY: usize = 256;
const RUNS: usize = 3;

/// `NIXFLEET_BENCH_RUNS=N` overrides [`RUNS`] (1 is handy under a profiler).
fn runs() -> usize {
    std::env::var("NIXFLEET_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(RUNS)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn parked(url: &CpUrl) -> usize {
    let resp = client::request(url, Method::GET, "/metrics", &[], None).await.expect("metrics");
    String::from_utf8_lossy(&resp.body)
        .lines()
        .find_map(|l| l.strip_prefix("nixfleet_cp_longpolls_parked "))
        .and_then(|v| v.parse().ok())
        .expect("gauge")
}

/// One agent: connect, send the long-poll, read the whole answer. The
/// client is plain tokio TCP with a minimal HTTP/1.1 response reader (one
/// task per connection, no connection driver), so the measuring side costs
/// as little CPU as it can on a machine it shares with the server. The
/// connection is returned open, as an agent keeps it for its DispatchAck:
/// closing 10,000 sockets is not part of "answered".
/// A poller's stream: plain TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn poll(
    url: CpUrl,
    host: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> (Instant, Box<dyn Stream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream: Box<dyn Stream> = {
        let _permit = gate.acquire().await.expect("semaphore");
        let tcp = tokio::net::TcpStream::connect(url.authority()).await.expect("connect");
        match tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
                Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("TLS handshake"))
            }
        }
    };
    let request = format!(
        "GET /v1/agent/dispatch?hostname={host}&wait=60 HTTP/1.1\r\nhost: {}\r\n{}: {}\r\n\r\n",
        url.authority(),
        nixfleet::wire::PROTOCOL_HEADER,
        nixfleet::wire::PROTOCOL_VERSION
    );
    stream.write_all(request.as_bytes()).await.expect("send long-poll");
    stream.flush().await.expect("flush");
    let mut buf = Vec::with_capacity(1024);
    loop {
        let n = stream.read_buf(&mut buf).await.expect("read answer");
        assert!(n > 0, "connection closed before the answer was complete");
        if let Some(total) = complete_response_len(&buf) {
            assert!(buf.len() >= total);
            break;
        }
    }
    let answered = Instant::now();
    assert!(buf.starts_with(b"HTTP/1.1 200 "), "every poll gets its dispatch: {}", String::from_utf8_lossy(&buf));
    (answered, stream)
}

/// The fleet's certificates for the TLS runs: a `pki` CA with the CP's and
/// an operator's certificate on disk, and one client config per host with
/// its own certificate (CN n{i}, URI SAN nixfleet:host), made in memory:
/// 10,000 key files would only measure the disk.
struct Fleet {
    pki_dir: std::path::PathBuf,
    hosts: Vec<Arc<rustls::ClientConfig>>,
}

impl Fleet {
    fn new(dir: &std::path::Path) -> Fleet {
        let pki_dir = dir.join("pki");
        let now = nixfleet::clock::ClockHandle::system().now();
        pki::init(&pki_dir, now).expect("pki init");
        let cp = pki::IssueRequest {
            name: "cp".into(),
            role: Role::Cp,
            dns: vec![],
            ips: vec!["127.0.0.1".parse().expect("ip")],
            days: 1,
        };
        pki::issue(&pki_dir, &cp, now).expect("cp certificate");
        let operator =
            pki::IssueRequest { name: "operator".into(), role: Role::Operator, dns: vec![], ips: vec![], days: 1 };
        pki::issue(&pki_dir, &operator, now).expect("operator certificate");
        let ca_pem = std::fs::read_to_string(pki_dir.join("ca.crt")).expect("ca.crt");
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki_dir.join("ca.key")).expect("ca.key")).expect("key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let roots = Arc::new(tls::load_ca_bundle(&pki_dir.join("ca.crt")).expect("roots"));
        let hosts = (0..N_POLLS)
            .map(|i| {
                let key = rcgen::KeyPair::generate().expect("key");
                let mut params = rcgen::CertificateParams::new(vec![format!("n{i}")]).expect("params");
                params.distinguished_name.push(rcgen::DnType::CommonName, format!("n{i}"));
                params.subject_alt_names.push(rcgen::SanType::URI("nixfleet:host".try_into().expect("uri")));
                params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + time::Duration::days(1);
                let cert = params.signed_by(&key, &issuer).expect("sign");
                let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
                let config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
                    .with_protocol_versions(tls::PROTOCOL_VERSIONS)
                    .expect("versions")
                    .with_root_certificates(Arc::clone(&roots))
                    .with_client_auth_cert(vec![cert.der().clone()], der)
                    .expect("client config");
                Arc::new(config)
            })
            .collect();
        Fleet { pki_dir, hosts }
    }

    fn serve_args(&self) -> Vec<std::ffi::OsString> {
        let p = |name: &str| self.pki_dir.join(name).into_os_string();
        vec!["--tls-cert".into(), p("cp.crt"), "--tls-key".into(), p("cp.key"), "--client-ca".into(), p("ca.crt")]
    }

    fn operator_url(&self, addr: &str) -> CpUrl {
        let files = ClientTlsFiles {
            ca: self.pki_dir.join("ca.crt"),
            identity: Some(CertKeyFiles {
                cert: self.pki_dir.join("operator.crt"),
                key: self.pki_dir.join("operator.key"),
            }),
        };
        let tls = Arc::new(ReloadableClientConfig::load(files).expect("operator config"));
        CpUrl::parse(&format!("https://{addr}")).expect("url").with_tls(tls)
    }
}

/// The length of a complete HTTP/1.1 response with a Content-Length body
/// at the start of `buf`, or None while more bytes are needed.
fn complete_response_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).expect("ASCII head");
    let body_len: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .map(|(_, v)| v.trim().parse().expect("content-length"))
        .expect("the answer has a content-length");
    (buf.len() >= head_end + body_len).then_some(head_end + body_len)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One measured run of the real CP.
struct Run {
    kib_per_poll: f64,
    /// Publish sent → last long-poll answer read.
    all_ms: f64,
    /// Publish sent → first long-poll answer read: receiving, verifying,
    /// storing, planning and committing the rollout.
    first_ms: f64,
}

async fn run(dir: &std::path::Path, idx: usize, fleet: Option<&Fleet>) -> Run {
    let run_dir = dir.join(format!("run-{idx}"));
    std::fs::create_dir_all(&run_dir).expect("dir");
    let (key_path, pub_path) = sign::write_keypair(&run_dir.join("release")).expect("keys");
    let key = sign::SigningKey::load(&key_path).expect("key");
    let addr_file = run_dir.join("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        // Every parked long-poll comes from 127.0.0.1.
        .args(["cp", "serve", "--listen", "127.0.0.1:0", "--max-connections-per-address", "1000000", "--trust-key"])
        .arg(&pub_path)
        .arg("--db")
        .arg(run_dir.join("cp.db"))
        .arg("--addr-file")
        .arg(&addr_file)
        .args(fleet.map(Fleet::serve_args).unwrap_or_default())
        .env("RUST_LOG", "nixfleet=info")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cp serve");
    let server = Server(child);
    let start = Instant::now();
    let addr = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if text.ends_with('\n') {
                break text.trim().to_owned();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "cp serve did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let url = match fleet {
        Some(fleet) => fleet.operator_url(&addr),
        None => CpUrl::parse(&format!("http://{addr}")).expect("url"),
    };
    let rss_before = rss_kib(server.0.id());

    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N_POLLS {
        let tls = fleet.map(|f| Arc::clone(&f.hosts[i]));
        tasks.spawn(poll(url.clone(), format!("n{i}"), tls, Arc::clone(&gate)));
    }
    let start = Instant::now();
    while parked(&url).await < N_POLLS {
        assert!(start.elapsed() < Duration::from_secs(120), "polls never all parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_after = rss_kib(server.0.id());
    let per_poll_kib = (rss_after.saturating_sub(rss_before)) as f64 / N_POLLS as f64;

    let hosts: serde_json::Map<String, serde_json::Value> = (0..N_POLLS)
        .map(|i| (format!("n{i}"), serde_json::json!({"wave": 0, "target_closure": format!("/nix/store/{i:0>32}-s")})))
        .collect();
    let manifest = serde_json::json!({
        "schema": 1, "channel": "bench", "ref": "r1", "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": 0},
        "waves": [{"name": "all", "soak_secs": 0, "max_in_flight": N_POLLS}], "hosts": hosts,
    })
    .to_string();
    let envelope = serde_json::to_vec(&sign::sign_envelope(&key, manifest.as_bytes())).expect("envelope");
    let published = Instant::now();
    let resp = client::request(&url, Method::POST, "/v1/rollouts", &[], Some(envelope)).await.expect("publish");
    assert_eq!(resp.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp.body));
    let publish_ms = published.elapsed().as_secs_f64() * 1000.0;
    let mut last = published;
    let mut first: Option<Instant> = None;
    let mut open = Vec::with_capacity(N_POLLS);
    while let Some(t) = tasks.join_next().await {
        let (t, stream) = t.expect("poll task");
        open.push(stream);
        last = last.max(t);
        first = Some(first.map_or(t, |f| f.min(t)));
    }
    drop(open);
    let first_ms = first.map_or(0.0, |f| (f.saturating_duration_since(published)).as_secs_f64() * 1000.0);
    let all_answered_ms = (last - published).as_secs_f64() * 1000.0;
    let mode = if fleet.is_some() { "mTLS" } else { "plaintext" };
    println!(
        "  {mode} run {idx}: cp RSS {rss_before} KiB idle -> {rss_after} KiB with {N_POLLS} parked = {per_poll_kib:.1} KiB per long-poll; all answered {all_answered_ms:.0} ms after publish (first after {first_ms:.0} ms; the publish itself answered in {publish_ms:.0} ms)"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&run_dir);
    Run { kib_per_poll: per_poll_kib, all_ms: all_answered_ms, first_ms }
}

/// Set in the environment of the child that plays the bare hyper server.
const BARE_SERVER_ENV: &str = "NIXFLEET_BENCH_BARE_SERVER";

/// The bare hyper server (run in a child process so that it, like the CP,
/// has its own file descriptors and RSS): `GET /parked` answers the number
/// of parked requests, `POST /release` releases them all, any other request
/// parks until released. Prints its address on stdout.
fn bare_server_main() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let listener = nixfleet::cp::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        let go = Arc::new(tokio::sync::Notify::new());
        let n_parked = Arc::new(AtomicUsize::new(0));
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (go, n_parked) = (Arc::clone(&go), Arc::clone(&n_parked));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (go, n_parked) = (Arc::clone(&go), Arc::clone(&n_parked));
                    async move {
                        let body = match req.uri().path() {
                            "/parked" => n_parked.load(Ordering::SeqCst).to_string(),
                            "/release" => {
                                go.notify_waiters();
                                String::new()
                            }
                            _ => {
                                let notified = go.notified();
                                tokio::pin!(notified);
                                notified.as_mut().enable();
                                n_parked.fetch_add(1, Ordering::SeqCst);
                                notified.await;
                                "{\"rollout_id\":\"bench@r1\"}".to_owned()
                            }
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
}

/// The baseline run: (KiB RSS per parked request, ms until all answered).
async fn bare_baseline() -> (f64, f64) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env(BARE_SERVER_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bare server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let server = Server(child);
    let url = CpUrl::parse(&format!("http://{}", line.trim())).expect("url");
    let rss_before = rss_kib(server.0.id());
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N_POLLS {
        tasks.spawn(poll(url.clone(), format!("n{i}"), None, Arc::clone(&gate)));
    }
    loop {
        let resp = client::request(&url, Method::GET, "/parked", &[], None).await.expect("parked");
        if String::from_utf8_lossy(&resp.body).parse::<usize>().unwrap_or(0) >= N_POLLS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_poll_kib = rss_kib(server.0.id()).saturating_sub(rss_before) as f64 / N_POLLS as f64;
    let released = Instant::now();
    client::request(&url, Method::POST, "/release", &[], None).await.expect("release");
    let mut last = released;
    let mut open = Vec::with_capacity(N_POLLS);
    while let Some(t) = tasks.join_next().await {
        let (t, stream) = t.expect("poll task");
        open.push(stream);
        last = last.max(t);
    }
    drop(open);
    drop(server);
    (per_poll_kib, (last - released).as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::var_os(BARE_SERVER_ENV).is_some() {
        return bare_server_main();
    }
    let dir = std::env::temp_dir().join(format!("nixfleet-bench-longpoll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    println!(
        "longpoll: {N_POLLS} parked long-polls on the real cp serve, {} runs plaintext and {} with mutual TLS",
        runs(),
        runs()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let plain: Vec<Run> = (0..runs()).map(|i| rt.block_on(run(&dir, i, None))).collect();
    let made = Instant::now();
    let fleet = Fleet::new(&dir);
    println!("  ({N_POLLS} host certificates and client configs made in {:.1} s)", made.elapsed().as_secs_f64());
    let mtls: Vec<Run> = (0..runs()).map(|i| rt.block_on(run(&dir, i, Some(&fleet)))).collect();
    let bare: Vec<(f64, f64)> = (0..runs())
        .map(|i| {
            let (kib, ms) = rt.block_on(bare_baseline());
            println!("  baseline run {i}: bare hyper server process, {kib:.1} KiB RSS per parked request; all {N_POLLS} released at once and answered in {ms:.0} ms");
            (kib, ms)
        })
        .collect();
    let bare_kib = median(bare.iter().map(|b| b.0).collect());
    let bare = median(bare.iter().map(|b| b.1).collect());
    for (mode, results) in [("plaintext", &plain), ("mTLS", &mtls)] {
        let rss = median(results.iter().map(|r| r.kib_per_poll).collect());
        let ms = median(results.iter().map(|r| r.all_ms).collect());
        let first = median(results.iter().map(|r| r.first_ms).collect());
        let spread = median(results.iter().map(|r| r.all_ms - r.first_ms).collect());
        println!(
            "longpoll median ({mode}): {rss:.1} KiB RSS per parked long-poll (target <= 32; bare hyper {bare_kib:.1} KiB, ratio {:.2})",
            rss / bare_kib.max(0.1)
        );
        println!(
            "longpoll median ({mode}): all {N_POLLS} answered {ms:.0} ms after the publish (target <= 500): the first after {first:.0} ms \
             (receive, verify, store, plan, commit), then all of them within {spread:.0} ms; bare hyper answering {N_POLLS} \
             released at once: {bare:.0} ms (answering ratio {:.2}; whole publish-to-last ratio {:.2})",
            spread / bare,
            ms / bare
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
