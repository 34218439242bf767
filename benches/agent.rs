//! Agent benchmark (`just bench`): the real release `nixfleet agent` next to
//! a real `nixfleet cp serve` on loopback. Prints, with the targets:
//!
//! - idle RSS of the agent (target ≤ 12 MiB);
//! - its CPU over 60 s idle with 5 s ticks (target ≤ 0.5 % of one core);
//! - dispatch → first agent event (DispatchAck) in the CP's event log, over
//!   20 rollouts (target median ≤ 50 ms), next to the median of a bare HTTP
//!   round trip to the same CP (`GET /healthz`) measured in the same run.
//!
//! The host's current-system points at a real store path (`nix-store
//! --add`) when Nix is installed; without Nix it cannot resolve to a
//! closure, so the latency part is skipped and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet::sign;

const IDLE_SECS: u64 = 60;
const N_DISPATCHES: usize = 20;
const CLOSURE: &str = "/nix/store/0c3n4iv2w9ab1p6lq0yzf3d8k2m5r7s9-nixos-system-bench-target";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nixfleet")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn http(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Nixfleet-Protocol: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write body");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body_at = text.find("\r\n\r\n").map_or(out.len(), |i| i + 4);
    (status, out[body_at..].to_vec())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn real_store_path(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("nixfleet-bench-system");
    std::fs::create_dir_all(&src).ok()?;
    std::fs::write(src.join("marker"), "bench").ok()?;
    let out = Command::new("nix-store").arg("--add").arg(&src).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("nixfleet-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (key_path, pub_path) = sign::write_keypair(&dir.join("release")).expect("keys");
    let key = sign::SigningKey::load(&key_path).expect("key");

    let _cp = Proc(
        Command::new(bin())
            .args(["cp", "serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.join("cp.db"))
            .arg("--trust-key")
            .arg(&pub_path)
            .arg("--addr-file")
            .arg(dir.join("addr"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("cp serve"),
    );
    let addr = wait_for("cp address", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("addr")).ok().filter(|s| s.ends_with('\n'))
    })
    .trim()
    .to_owned();

    let current = dir.join("current-system");
    let store_path = real_store_path(&dir);
    match &store_path {
        Some(p) => std::os::unix::fs::symlink(p, &current).expect("symlink"),
        None => println!("nix-store not available: current-system does not resolve; the latency part is skipped"),
    }
    let agent = Proc(
        Command::new(bin())
            .arg("agent")
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .args(["--cp", &format!("http://{addr}"), "--hostname", "bench-1", "--trust-key"])
            .arg(&pub_path)
            .arg("--current-system")
            .arg(&current)
            .arg("--booted-system")
            .arg(&current)
            .arg("--profile")
            .arg(dir.join("profile"))
            .args(["--nix-store", "/bin/false", "--nix-env", "/bin/false", "--switch-runner", "direct"])
            .args(["--tick", "5s", "--heartbeat", "60s", "--drain", "15s", "--longpoll-wait", "60s"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    let pid = agent.0.id();
    std::thread::sleep(Duration::from_secs(3)); // start-up settles; not a synchronisation
    let rss_kib = proc_field(pid, "status", "VmRSS:").unwrap_or(0);
    let hz = clock_ticks_per_sec();
    let t0 = cpu_ticks(pid);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let ticks = cpu_ticks(pid) - t0;
    let cpu_pct = 100.0 * (ticks as f64 / hz as f64) / started.elapsed().as_secs_f64();
    println!(
        "agent idle: RSS {:.1} MiB (target <= 12), CPU {cpu_pct:.3} % of a core over {IDLE_SECS} s with 5 s ticks \
         ({ticks} clock ticks of 1/{hz} s; target <= 0.5)",
        rss_kib as f64 / 1024.0
    );

    if store_path.is_none() {
        return;
    }
    let mut rtt_ms = Vec::new();
    for _ in 0..N_DISPATCHES {
        let t = Instant::now();
        let (status, _) = http(&addr, "GET", "/healthz", None);
        assert_eq!(status, 200);
        rtt_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut latency_ms = Vec::new();
    for i in 0..N_DISPATCHES {
        let id = format!("bench@r{i}");
        let manifest = serde_json::json!({
            "schema": 1, "channel": "bench", "ref": format!("r{i}"),
            "issued_at": format!("2026-11-25T12:{:02}:00Z", i % 60),
            "policy": {"on_health_failure": "halt"},
            "waves": [{"name": "all", "soak_secs": 0, "max_in_flight": 1}],
            "hosts": {"bench-1": {"wave": 0, "target_closure": CLOSURE}},
        })
        .to_string();
        let envelope = serde_json::to_vec(&sign::sign_envelope(&key, manifest.as_bytes())).expect("json");
        let t = Instant::now();
        let (status, body) = http(&addr, "POST", "/v1/rollouts", Some(&envelope));
        assert!(status == 201, "publish {status}: {}", String::from_utf8_lossy(&body));
        wait_for("the DispatchAck", Duration::from_secs(30), || {
            let (_, body) = http(&addr, "GET", &format!("/v1/rollouts/{id}/events"), None);
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            v["events"].as_array()?.iter().any(|e| e["seq"] == 1).then_some(())
        });
        latency_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (lat, rtt) = (median(latency_ms), median(rtt_ms));
    println!(
        "dispatch -> DispatchAck in the CP log: median {lat:.1} ms over {N_DISPATCHES} rollouts (target <= 50); bare HTTP round trip to the CP: {rtt:.2} ms; ratio {:.1}",
        lat / rtt
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
