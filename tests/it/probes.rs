//! Probe runners against real things: child processes, a real HTTP server
//! and real listeners on 127.0.0.1:0, and a stand-in `systemctl` script.
//! Each probe is built through the health-checks parser, as the agent does.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nixfleet::agent::probes::{HealthChecks, HostRunner, Probe, ProbeRun, ProbeRunner};
use nixfleet::machine::ProbeStatus;
use nixfleet::wire::event::MAX_FAILURE_REASON_BYTES;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::TempDir;

fn probe(fields: &str) -> Probe {
    let json = format!(r#"{{"probes":[{{"name":"p","mode":"enforce",{fields}}}]}}"#);
    HealthChecks::parse(&json).expect("valid probe").probes.remove(0)
}

async fn run(fields: &str) -> ProbeRun {
    let run = HostRunner::default().run(&probe(fields)).await;
    if let Some(reason) = &run.reason {
        assert!(reason.len() <= MAX_FAILURE_REASON_BYTES);
    }
    run
}

#[track_caller]
fn assert_fail(run: &ProbeRun, reason_has: &str) {
    assert_eq!(run.status, ProbeStatus::Fail, "{run:?}");
    let reason = run.reason.as_deref().expect("a Fail has a reason");
    assert!(reason.contains(reason_has), "reason {reason:?} should contain {reason_has:?}");
}

#[track_caller]
fn assert_pass(run: &ProbeRun) {
    assert_eq!(run, &ProbeRun::pass());
}

fn sh(script: &str) -> String {
    serde_json::to_string(&["/bin/sh", "-c", script]).expect("json")
}

#[tokio::test]
async fn exec_passes_on_the_expected_exit_code_and_fails_otherwise_with_stderr() {
    // Proves exec compares the real exit code with expect_exit_code and carries the program's stderr in the reason.
    assert_pass(&run(&format!(r#""kind":"exec","argv":{},"timeout_secs":5"#, sh("exit 0"))).await);
    let three = sh("echo degraded >&2; exit 3");
    assert_pass(&run(&format!(r#""kind":"exec","argv":{three},"timeout_secs":5,"expect_exit_code":3"#)).await);
    let failed = run(&format!(r#""kind":"exec","argv":{three},"timeout_secs":5"#)).await;
    assert_fail(&failed, "exited 3 (expected 0): degraded");
}

#[tokio::test]
async fn exec_past_its_timeout_fails_and_its_whole_process_group_is_killed() {
    // Proves a hung probe is a Fail at its timeout and leaves no process behind (the backgrounded sleep dies too).
    let dir = TempDir::new("probe-exec-timeout");
    let pidfile = dir.path().join("bg.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let begun = Instant::now();
    let failed = run(&format!(r#""kind":"exec","argv":{},"timeout_secs":1"#, sh(&script))).await;
    assert!(begun.elapsed() < Duration::from_secs(5), "failed at the timeout: {:?}", begun.elapsed());
    assert_fail(&failed, "timed out after 1 s and was killed");
    let pid = fs_err::read_to_string(&pidfile).expect("background pid").trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(&pid) {
        assert!(Instant::now() < deadline, "background sleep {pid} survived the timeout");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn process_alive(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned));
    !matches!(state.as_deref(), Some("Z") | Some("X"))
}

#[tokio::test]
async fn exec_of_a_missing_program_is_a_fail_not_a_panic() {
    // Proves a spawn error becomes a Fail naming the program.
    let failed = run(r#""kind":"exec","argv":["/nonexistent/probe"],"timeout_secs":1"#).await;
    assert_fail(&failed, "cannot run /nonexistent/probe");
}

/// A tiny HTTP/1.1 server: `/ok` 200 with a body, `/down` 503, `/chunked` a
/// chunked 200, `/big` 2 MiB of `x` then `needle`, `/garbage` not HTTP,
/// `/hang` reads the request and never answers.
async fn http_server() -> (u16, tokio::task::JoinHandle<()>) {
    serve(None).await
}

/// The same server behind TLS when `tls` is given.
async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { return };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => answer(conn).await,
                    // A failed handshake is the client's business: it reports why.
                    Some(acceptor) => {
                        if let Ok(conn) = acceptor.accept(conn).await {
                            answer(conn).await
                        }
                    }
                }
            });
        }
    });
    (port, task)
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let path = String::from_utf8_lossy(&req).split_whitespace().nth(1).unwrap_or("").to_owned();
    let big;
    let response: &[u8] = match path.as_str() {
        "/ok" => b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nstatus: healthy",
        "/down" => b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown",
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nheal\r\n3\r\nthy\r\n0\r\n\r\n",
        "/big" => {
            let body = format!("{}needle", "x".repeat(2 * 1024 * 1024));
            big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            big.as_bytes()
        }
        "/garbage" => b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        "/hang" => {
            // Hold the connection open without answering.
            let _ = conn.read(&mut buf).await;
            return;
        }
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    };
    let _ = conn.write_all(response).await;
    let _ = conn.shutdown().await;
}

fn http(port: u16, path: &str, extra: &str) -> String {
    format!(r#""kind":"http","url":"http://127.0.0.1:{port}{path}","timeout_secs":1{extra}"#)
}

#[tokio::test]
async fn http_checks_status_and_body_substring_against_a_real_server() {
    // Proves the GET reaches a real server and both the status and the body substring decide the result.
    let (port, server) = http_server().await;
    assert_pass(&run(&http(port, "/ok", "")).await);
    assert_pass(&run(&http(port, "/ok", r#","body_contains":"healthy""#)).await);
    assert_pass(&run(&http(port, "/chunked", r#","body_contains":"healthy""#)).await);
    assert_fail(&run(&http(port, "/ok", r#","body_contains":"ready""#)).await, "does not contain \"ready\"");
    assert_fail(&run(&http(port, "/down", "")).await, "status 503 (expected 200)");
    assert_pass(&run(&http(port, "/down", r#","expect_status":503"#)).await);
    server.abort();
}

#[tokio::test]
async fn http_reads_at_most_a_mib_of_body_and_a_non_http_answer_is_a_fail() {
    // Proves the 1 MiB body cap (a needle past it is not found, and the reason says so) and that a server
    // speaking something else is a Fail with a reason, not a hang or a panic.
    let (port, server) = http_server().await;
    assert_pass(&run(&http(port, "/big", r#","body_contains":"xxxx""#)).await);
    assert_fail(&run(&http(port, "/big", r#","body_contains":"needle""#)).await, "body (first MiB) does not contain");
    let garbage = run(&http(port, "/garbage", "")).await;
    eprintln!("non-HTTP answer: {garbage:?}");
    assert_fail(&garbage, &format!("GET http://127.0.0.1:{port}/garbage: "));
    server.abort();
}

#[tokio::test]
async fn http_to_a_server_that_never_answers_fails_at_the_timeout() {
    // Proves the timeout covers the response, not just the connect.
    let (port, server) = http_server().await;
    let begun = Instant::now();
    assert_fail(&run(&http(port, "/hang", "")).await, "timed out after 1 s");
    assert!(begun.elapsed() < Duration::from_secs(4), "{:?}", begun.elapsed());
    server.abort();
}

/// A port that was just listening and is now closed.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

#[tokio::test]
async fn http_to_a_closed_port_fails_with_the_connect_error() {
    // Proves a refused connection is a Fail naming the URL, not an error or a panic.
    let port = closed_port().await;
    assert_fail(&run(&http(port, "/ok", "")).await, "connect: Connection refused");
}

/// A pki (made by the real binary) with a server certificate for
/// 127.0.0.1 only, and an https server presenting it.
struct HttpsFixture {
    dir: TempDir,
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

fn pki(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .arg("pki")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run nixfleet pki");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn https_server() -> HttpsFixture {
    let dir = TempDir::new("https-probe");
    pki(dir.path(), &["init"]);
    pki(dir.path(), &["issue", "--name", "app", "--role", "cp", "--ip", "127.0.0.1"]);
    pki(&dir.path().join("other"), &["init"]);
    let chain = nixfleet::tls::load_certs(&dir.path().join("app.crt")).expect("cert");
    let key = nixfleet::tls::load_private_key(&dir.path().join("app.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(nixfleet::tls::crypto_provider())
        .with_protocol_versions(nixfleet::tls::PROTOCOL_VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let (port, server) = serve(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))).await;
    HttpsFixture { dir, port, server }
}

impl HttpsFixture {
    fn probe(&self, host: &str, path: &str, ca: Option<&str>, extra: &str) -> String {
        let ca_file = match ca {
            Some(name) => format!(r#","ca_file":"{}""#, self.dir.path().join(name).display()),
            None => String::new(),
        };
        format!(r#""kind":"http","url":"https://{host}:{}{path}","timeout_secs":5{ca_file}{extra}"#, self.port)
    }
}

#[tokio::test]
async fn https_passes_with_the_ca_file_and_checks_status_and_body() {
    // Proves an https probe completes a real rustls handshake with a pki-issued certificate when its ca_file
    // names the issuing CA, and then judges status and body as http does.
    let f = https_server().await;
    assert_pass(&run(&f.probe("127.0.0.1", "/ok", Some("ca.crt"), r#","body_contains":"healthy""#)).await);
    assert_pass(&run(&f.probe("127.0.0.1", "/chunked", Some("ca.crt"), r#","body_contains":"healthy""#)).await);
    assert_fail(&run(&f.probe("127.0.0.1", "/down", Some("ca.crt"), "")).await, "status 503 (expected 200)");
    f.server.abort();
}

#[tokio::test]
async fn https_fails_with_the_certificate_problem_when_the_certificate_is_not_trusted_or_not_for_the_host() {
    // Proves every trust failure is a Fail naming the certificate problem: without ca_file (the system's roots
    // do not know the fleet CA), with another CA's file, and with a certificate not issued for the name dialled.
    let f = https_server().await;
    let system = run(&f.probe("127.0.0.1", "/ok", None, "")).await;
    if nixfleet::tls::system_roots().is_ok() {
        assert_fail(&system, "TLS handshake: invalid peer certificate: UnknownIssuer");
    } else {
        assert_fail(&system, "TLS trust: no trusted root certificates in the system store");
    }
    let other = run(&f.probe("127.0.0.1", "/ok", Some("other/ca.crt"), "")).await;
    assert_fail(&other, "TLS handshake: invalid peer certificate: UnknownIssuer");
    let wrong_name = run(&f.probe("localhost", "/ok", Some("ca.crt"), "")).await;
    assert_fail(&wrong_name, "TLS handshake: invalid peer certificate: certificate not valid for name \"localhost\"");
    f.server.abort();
}

#[tokio::test]
async fn https_to_a_plain_http_server_and_a_vanished_ca_file_fail_with_a_reason() {
    // Proves TLS against a server that does not speak it, and a CA file removed after parsing, are Fails.
    let f = https_server().await;
    // A plain HTTP server answers a ClientHello as a bad request and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else { return };
        let mut hello = [0u8; 512];
        let _ = conn.read(&mut hello).await;
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    });
    let ca = f.dir.path().join("ca.crt");
    let to_plain =
        format!(r#""kind":"http","url":"https://127.0.0.1:{plain}/ok","timeout_secs":5,"ca_file":"{}""#, ca.display());
    let to_plain = run(&to_plain).await;
    eprintln!("https to plain http: {to_plain:?}");
    assert_fail(&to_plain, "TLS handshake: ");
    // A copy of the CA that no run has loaded yet (a loaded trust is reused for a minute).
    let copy = f.dir.path().join("ca-copy.crt");
    fs_err::copy(&ca, &copy).expect("copy CA");
    let checked = probe(&f.probe("127.0.0.1", "/ok", Some("ca-copy.crt"), ""));
    fs_err::remove_file(&copy).expect("remove CA");
    let failed = HostRunner::default().run(&checked).await;
    assert_fail(&failed, &format!("TLS trust: {}: No such file", copy.display()));
    server.abort();
    f.server.abort();
}

#[tokio::test]
async fn tcp_passes_on_an_open_port_and_fails_on_a_closed_one() {
    // Proves tcp probes make a real connection: a live listener passes, a closed port fails with the OS error.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let open = listener.local_addr().expect("addr").port();
    assert_pass(&run(&format!(r#""kind":"tcp","host":"127.0.0.1","port":{open}"#)).await);
    let closed = closed_port().await;
    let failed = run(&format!(r#""kind":"tcp","host":"127.0.0.1","port":{closed}"#)).await;
    assert_fail(&failed, &format!("connect to 127.0.0.1:{closed}: Connection refused"));
}

fn write_systemctl(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("systemctl");
    let script = "#!/bin/sh\n# stand-in: systemctl is-active -- UNIT\n\
                  [ \"$1\" = is-active ] && [ \"$2\" = -- ] || { echo \"bad args $*\" >&2; exit 2; }\n\
                  case \"$3\" in good.service) echo active; exit 0 ;; *) echo failed; exit 3 ;; esac\n";
    fs_err::write(&path, script).expect("write systemctl");
    fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test]
async fn systemd_asks_systemctl_is_active_and_reports_the_unit_state() {
    // Proves the systemd runner's program boundary: `is-active -- UNIT`, exit 0 passes, otherwise the state is the reason.
    let dir = TempDir::new("probe-systemd");
    let runner = HostRunner { systemctl: write_systemctl(dir.path()) };
    assert_pass(&runner.run(&probe(r#""kind":"systemd","unit":"good.service""#)).await);
    let failed = runner.run(&probe(r#""kind":"systemd","unit":"bad.service""#)).await;
    assert_fail(&failed, "unit bad.service is failed");
    let missing = HostRunner { systemctl: dir.path().join("no-systemctl") };
    assert_fail(&missing.run(&probe(r#""kind":"systemd","unit":"good.service""#)).await, "cannot run");
}
