//! Record checkpoints through the real `cp serve` (`--checkpoint-events`)
//! over loopback: a flapping probe's events give way to the record they
//! made, and the agent's side of the protocol does not change across a
//! `kill -9` and a lost database (`docs/protocol.md` §7).

use std::process::Command;

use nixfleet::machine::{ProbeDecl, ProbeKind, ProbeMode, ProbeStatus};

use super::*;
use crate::harness::bin;

const ROLLOUT: &str = "stable@r1";
const BOUND: i64 = 20;

fn one(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// web-1's rows in the event log and the seq of its checkpoint (0: none).
fn log_of(cp: &Cp) -> (i64, i64) {
    let conn = rusqlite::Connection::open(&cp.db).expect("open db");
    let rows = one(&conn, "SELECT COUNT(*) FROM event_log WHERE hostname = 'web-1'");
    let seq = one(&conn, "SELECT COALESCE(MAX(seq), 0) FROM record_checkpoints WHERE hostname = 'web-1'");
    (rows, seq)
}

fn records(
    cp: &Cp,
) -> std::collections::BTreeMap<(nixfleet::ids::RolloutId, nixfleet::ids::Hostname), nixfleet::machine::HostRecord> {
    let conn = store::open_reader(&cp.db).expect("reader");
    store::cached_host_records(&conn, &cp.db).expect("records")
}

/// `nixfleet replay --db` (the real binary): it agrees and names the checkpoint.
fn replay_agrees_from(cp: &Cp, seq: i64) {
    let out = Command::new(bin()).args(["replay", "--db", cp.db.to_str().expect("utf-8"), "--quiet"]).output();
    let out = out.expect("replay");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("started from a checkpoint at seq {seq} ")), "{text}");
    assert!(text.contains("0 disagreements"), "{text}");
}

/// `n` results of a flapping enforce probe, posted in batches of 10: all applied.
async fn flap(agent: &mut Agent, n: usize) {
    for _ in 0..n / 10 {
        let events: Vec<_> = (0..10)
            .map(|i| {
                let status = if i % 2 == 0 { ProbeStatus::Fail } else { ProbeStatus::Pass };
                let body = WireEventBody::ProbeResult {
                    probe_name: "web".into(),
                    mode: ProbeMode::Enforce,
                    status,
                    observed_at: agent.tick(1),
                    failure_reason: (status == ProbeStatus::Fail).then(|| "connection refused".into()),
                };
                agent.emit(ROLLOUT, body)
            })
            .collect();
        let items: Vec<_> = events.iter().map(|e| (ROLLOUT, e)).collect();
        agent.post(&items).await.iter().for_each(assert_applied);
    }
}

/// With `--checkpoint-events 20`, 100 results of a flapping probe leave at
/// most 22 rows of web-1 (DispatchAck and ActivationCompleted are kept);
/// `replay` agrees and names the checkpoint. After `kill -9` the agent's
/// whole history re-sent is answered `duplicate` (below the checkpoint
/// too) and the heartbeat asks for nothing; after the database is lost,
/// the re-published rollout and the agent's re-sent history give the same
/// record, compacted again.
#[test]
fn a_flapping_probe_is_checkpointed_across_kill_9_and_database_loss() {
    let dir = crate::harness::TempDir::new("checkpoint");
    let release = Release::new(dir.path(), "release");
    let mut cp = Cp::start_with(dir.path(), &release.pub_path, &["--checkpoint-events", &BOUND.to_string()]);
    let envelope = release.sign(&two_waves(ROLLOUT, T0, 1));
    let mut agent = Agent::new("web-1", &cp.url);
    let rt = rt();
    rt.block_on(async {
        cp.publish(&envelope).await;
        let d = agent.poll(0).await.expect("dispatch");
        agent.activate(&d).await;
        let probes = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        let topology = WireEventBody::ProbeTopologyDeclared { probes, declared_at: agent.tick(1) };
        assert_applied(&agent.send(ROLLOUT, topology).await);
        flap(&mut agent, 100).await;
    });
    let (rows, k) = log_of(&cp);
    assert!(k > BOUND && rows <= BOUND + 2, "rows {rows}, checkpoint at seq {k}");
    replay_agrees_from(&cp, k);
    let before = records(&cp);

    cp.kill9();
    cp.restart();
    agent.url = cp.url.clone();
    rt.block_on(async {
        let results = agent.replay(ROLLOUT, 0).await;
        assert_eq!(results.len(), 103);
        assert!(results.iter().all(|r| r.status == ResultStatus::Duplicate), "{results:?}");
        let (hb, header) = agent.heartbeat().await;
        assert!(hb.replay_from.is_empty() && header.is_none(), "nothing to re-send");
        flap(&mut agent, 30).await;
    });
    assert_eq!(records(&cp).len(), before.len());
    let (rows, k2) = log_of(&cp);
    assert!(k2 > k && rows <= BOUND + 2, "the next checkpoint after the restart: rows {rows}, seq {k2}");
    replay_agrees_from(&cp, k2);
    let before_loss = records(&cp);

    assert!(cp.terminate().success());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", cp.db.display()));
    }
    cp.restart();
    agent.url = cp.url.clone();
    rt.block_on(async {
        assert_eq!(cp.publish(&envelope).await.status, StatusCode::CREATED, "re-publish after loss");
        let (hb, _) = agent.heartbeat().await;
        assert_eq!(hb.replay_from.get(&ROLLOUT.parse().expect("id")), Some(&0));
        let results = agent.replay(ROLLOUT, 0).await;
        assert!(results.iter().all(|r| r.status == ResultStatus::Applied), "{results:?}");
    });
    assert_eq!(records(&cp), before_loss, "the agents' journals rebuild the same records");
    let (rows, k3) = log_of(&cp);
    assert!(k3 > BOUND && rows <= BOUND + 2, "compacted again: rows {rows}, seq {k3}");
    replay_agrees_from(&cp, k3);
}
