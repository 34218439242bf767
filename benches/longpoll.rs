//! Idle long-polls (issue 4): the real `nixfleet cp serve` process holds
//! 10,000 parked `GET /v1/agent/dispatch?wait=60` connections; we print its
//! RSS per parked long-poll (from /proc, before and after), then publish a
//! rollout that dispatches to all of them and print the time from the
//! publish until the last long-poll is answered. Three runs; medians.
//! Reference numbers from the issue: a bare hyper server holds a pending
//! long-poll in ≈ 17 KiB; targets ≤ 32 KiB each and ≤ 500 ms for all.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nixfleet::cp::client::{self, CpUrl};
use nixfleet::sign;

const N_POLLS: usize = 10_000;
const CONNECT_CONCURRENCY: usize = 256;
const RUNS: usize = 3;

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

/// One agent: connect, long-poll, return when answered.
async fn poll(url: CpUrl, host: String, gate: Arc<tokio::sync::Semaphore>) -> Instant {
    let stream = {
        let _permit = gate.acquire().await.expect("semaphore");
        tokio::net::TcpStream::connect(url.authority()).await.expect("connect")
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("/v1/agent/dispatch?hostname={host}&wait=60"))
        .header("host", url.authority())
        .header(nixfleet::wire::PROTOCOL_HEADER, nixfleet::wire::PROTOCOL_VERSION)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("long-poll");
    let answered = Instant::now();
    assert_eq!(resp.status(), StatusCode::OK, "every poll gets its dispatch");
    let _ = resp.into_body().collect().await;
    drop(sender);
    driver.abort();
    answered
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(dir: &std::path::Path, idx: usize) -> (f64, f64) {
    let run_dir = dir.join(format!("run-{idx}"));
    std::fs::create_dir_all(&run_dir).expect("dir");
    let (key_path, pub_path) = sign::write_keypair(&run_dir.join("release")).expect("keys");
    let key = sign::SigningKey::load(&key_path).expect("key");
    let addr_file = run_dir.join("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .args(["cp", "serve", "--listen", "127.0.0.1:0", "--trust-key"])
        .arg(&pub_path)
        .arg("--db")
        .arg(run_dir.join("cp.db"))
        .arg("--addr-file")
        .arg(&addr_file)
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
    let url = CpUrl::parse(&format!("http://{addr}")).expect("url");
    let rss_before = rss_kib(server.0.id());

    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N_POLLS {
        tasks.spawn(poll(url.clone(), format!("n{i}"), Arc::clone(&gate)));
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
    while let Some(t) = tasks.join_next().await {
        let t = t.expect("poll task");
        last = last.max(t);
        first = Some(first.map_or(t, |f| f.min(t)));
    }
    let first_ms = first.map_or(0.0, |f| (f.saturating_duration_since(published)).as_secs_f64() * 1000.0);
    let all_answered_ms = (last - published).as_secs_f64() * 1000.0;
    println!(
        "  run {idx}: cp RSS {rss_before} KiB idle -> {rss_after} KiB with {N_POLLS} parked = {per_poll_kib:.1} KiB per long-poll; all answered {all_answered_ms:.0} ms after publish (first after {first_ms:.0} ms; the publish itself answered in {publish_ms:.0} ms)"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&run_dir);
    (per_poll_kib, all_answered_ms)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("nixfleet-bench-longpoll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    println!("longpoll: {N_POLLS} parked long-polls on the real cp serve, {RUNS} runs");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let results: Vec<(f64, f64)> = (0..RUNS).map(|i| rt.block_on(run(&dir, i))).collect();
    let rss = median(results.iter().map(|r| r.0).collect());
    let ms = median(results.iter().map(|r| r.1).collect());
    println!(
        "longpoll median: {rss:.1} KiB RSS per parked long-poll (target <= 32; bare hyper ~17 KiB, ratio {:.2}); all {N_POLLS} answered in {ms:.0} ms (target <= 500)",
        rss / 17.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
