//! Ingest throughput of the control plane: 100 concurrent scripted
//! agents, each on its own keep-alive connection, post batches of 32 events
//! over loopback HTTP into an in-process `cp::serve`; every event must come
//! back `applied`. Printed next to a raw baseline measured in the same run:
//! plain batched INSERTs of the same rows into a WAL SQLite file with
//! synchronous=FULL, 100 rows per transaction. Three runs each; medians.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nixfleet::client;
use nixfleet::clock::ClockHandle;
use nixfleet::cp::{self, PlainAcceptor, ServeConfig};
use nixfleet::sign;
use nixfleet::wire::{EventBatchResponse, OutboundEvent, ResultStatus, WireEventBody};
use time::macros::datetime;

const N_AGENTS: usize = 100;
const BATCH_EVENTS: usize = 32;
const BATCHES_PER_AGENT: usize = 20;
const N_EVENTS: usize = N_AGENTS * BATCH_EVENTS * BATCHES_PER_AGENT;
const BASELINE_ROWS_PER_TXN: usize = 100;
const RUNS: usize = 3;

fn closure(i: usize) -> String {
    format!("/nix/store/{:0>32}-nixos-system-n{i}", i)
}

fn events_for(agent: usize) -> Vec<Vec<u8>> {
    let t0 = datetime!(2026-11-25 12:00 UTC);
    let mut seq = 0u64;
    (0..BATCHES_PER_AGENT)
        .map(|_| {
            let items: Vec<serde_json::Value> = (0..BATCH_EVENTS)
                .map(|_| {
                    seq += 1;
                    let at = t0 + time::Duration::seconds(seq as i64);
                    let body = if seq == 1 {
                        WireEventBody::DispatchAck {
                            current_closure_at_dispatch: closure(100_000 + agent).parse().expect("closure"),
                            target_closure: closure(agent).parse().expect("closure"),
                            soak_secs: 0,
                            received_at: at,
                        }
                    } else {
                        WireEventBody::ActivationStarted { started_at: at, switch_method: "switch".into() }
                    };
                    serde_json::json!({"rollout_id": "bench@r1", "event": OutboundEvent { seq, body }})
                })
                .collect();
            serde_json::json!({"hostname": format!("n{agent}"), "events": items}).to_string().into_bytes()
        })
        .collect()
}

fn baseline(dir: &std::path::Path, bodies: &[Vec<Vec<u8>>]) -> f64 {
    let path = dir.join("baseline.db");
    let _ = std::fs::remove_file(&path);
    let mut conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE event_log (id INTEGER PRIMARY KEY AUTOINCREMENT, hostname TEXT NOT NULL, rollout_id TEXT NOT NULL,
           seq INTEGER NOT NULL, kind TEXT NOT NULL, event TEXT NOT NULL, agent_at TEXT NOT NULL, received_at TEXT NOT NULL,
           UNIQUE (hostname, rollout_id, seq));",
    )
    .expect("schema");
    // The same rows the CP writes: one per event, the wire JSON as sent.
    let mut rows = Vec::with_capacity(N_EVENTS);
    for (agent, batches) in bodies.iter().enumerate() {
        for body in batches {
            let v: serde_json::Value = serde_json::from_slice(body).expect("json");
            for item in v["events"].as_array().expect("events") {
                rows.push((
                    format!("n{agent}"),
                    item["event"]["seq"].as_i64().expect("seq"),
                    item["event"].to_string(),
                ));
            }
        }
    }
    let start = Instant::now();
    for chunk in rows.chunks(BASELINE_ROWS_PER_TXN) {
        let tx = conn.transaction().expect("begin");
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
                     VALUES (?1, 'bench@r1', ?2, 'ActivationStarted', ?3, '2026-11-25T12:00:00Z', '2026-11-25T12:00:00Z')",
                )
                .expect("prepare");
            for (host, seq, json) in chunk {
                stmt.execute(rusqlite::params![host, seq, json]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    rows.len() as f64 / start.elapsed().as_secs_f64()
}

async fn agent_run(url: client::CpUrl, bodies: Vec<Vec<u8>>) -> usize {
    let stream = tokio::net::TcpStream::connect(url.authority()).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let driver = tokio::spawn(conn);
    let mut n_applied = 0;
    for body in bodies {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/agent/events")
            .header("host", url.authority())
            .header(nixfleet::wire::PROTOCOL_HEADER, nixfleet::wire::PROTOCOL_VERSION)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = sender.send_request(req).await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let answer: EventBatchResponse = serde_json::from_slice(&bytes).expect("answer");
        n_applied += answer.results.iter().filter(|r| r.status == ResultStatus::Applied).count();
    }
    drop(sender);
    let _ = driver.await;
    n_applied
}

async fn cp_run(dir: &std::path::Path, bodies: &[Vec<Vec<u8>>]) -> f64 {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run_dir = dir.join(format!("cp-{}", RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("dir");
    let key = sign::generate().expect("key");
    let hosts: serde_json::Map<String, serde_json::Value> = (0..N_AGENTS)
        .map(|i| (format!("n{i}"), serde_json::json!({"wave": 0, "target_closure": closure(i)})))
        .collect();
    let manifest = serde_json::json!({
        "schema": 1, "channel": "bench", "ref": "r1", "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": 0},
        "waves": [{"name": "all", "soak_secs": 0, "max_in_flight": N_AGENTS}], "hosts": hosts,
    })
    .to_string();
    let envelope = serde_json::to_vec(&sign::sign_envelope(&key, manifest.as_bytes())).expect("envelope");
    let listener = cp::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let url = client::CpUrl::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("url");
    let cfg = ServeConfig {
        db_path: run_dir.join("cp.db"),
        trust_keys: vec![key.public_key()],
        heartbeat_interval_secs: 60,
        grace: Duration::from_secs(5),
        // Every simulated agent connects from 127.0.0.1.
        limits: cp::ServeLimits { max_connections_per_address: usize::MAX, ..cp::ServeLimits::default() },
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cp::serve(listener, PlainAcceptor, cfg, ClockHandle::system(), async {
        let _ = stop_rx.await;
    }));
    let resp = client::request(&url, Method::POST, "/v1/rollouts", &[], Some(envelope)).await.expect("publish");
    assert_eq!(resp.status, StatusCode::CREATED);

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for b in bodies {
        tasks.spawn(agent_run(url.clone(), b.clone()));
    }
    let mut n_applied = 0;
    while let Some(n) = tasks.join_next().await {
        n_applied += n.expect("agent");
    }
    let rate = n_applied as f64 / start.elapsed().as_secs_f64();
    assert_eq!(n_applied, N_EVENTS, "every event applied");
    let _ = stop_tx.send(());
    let report = server.await.expect("join").expect("serve");
    println!(
        "  cp run: {rate:>8.0} events/s ({} commits, {:.1} events per commit)",
        report.writer.n_commits,
        N_EVENTS as f64 / report.writer.n_commits.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&run_dir);
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("nixfleet-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bodies: Vec<Vec<Vec<u8>>> = (0..N_AGENTS).map(events_for).collect();
    println!("ingest: {N_AGENTS} agents x {BATCHES_PER_AGENT} batches x {BATCH_EVENTS} events = {N_EVENTS} events, {RUNS} runs");
    let baselines: Vec<f64> = (0..RUNS)
        .map(|_| {
            let r = baseline(&dir, &bodies);
            println!("  baseline: {r:>8.0} rows/s (WAL, synchronous=FULL, {BASELINE_ROWS_PER_TXN} rows/txn)");
            r
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let cps: Vec<f64> = (0..RUNS).map(|_| rt.block_on(cp_run(&dir, &bodies))).collect();
    let (b, c) = (median(baselines), median(cps));
    println!("ingest median: cp {c:.0} events/s, baseline {b:.0} rows/s, ratio {:.2} (target >= 0.30)", c / b);
    let _ = std::fs::remove_dir_all(&dir);
}
