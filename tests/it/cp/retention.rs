//! The retention rule of the event log (`docs/protocol.md` §7, "Retention
//! of the event log"), exercised on a `cp backup` copy of a real CP's
//! database: deleting all of a terminal, superseded rollout that the rule
//! allows leaves `replay` with nothing to disagree about; deleting part of a
//! host's log makes `replay` fail naming that host.

use std::path::Path;
use std::process::{Command, Output};

use super::*;
use crate::harness::bin;

const R1: &str = "stable@r1";
const R2: &str = "stable@r2";

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run nixfleet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A copy of the live database through `cp backup`.
fn backup(cp: &Cp, to: &Path) {
    let out = run(&["cp", "backup", "--db", cp.db.to_str().expect("utf-8"), to.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn count(conn: &rusqlite::Connection, sql: &str, id: &str) -> i64 {
    conn.query_row(sql, [id], |r| r.get(0)).expect(sql)
}

/// Every table holding rows of one rollout, as the rule lists them.
const ROLLOUT_TABLES: [&str; 7] =
    ["event_log", "record_checkpoints", "dispatches", "skipped_hosts", "operator_actions", "host_records", "rollouts"];

/// r1: the canary reverts (halt, its closure quarantined), `resume`, the rest
/// converge: completed, with an operator action and a quarantine. r2 (new
/// closures) supersedes it in time and every host converges in it and
/// heartbeats, so `hosts.expected_from` names r2.
async fn two_rollouts(cp: &Cp, release: &Release, url: &str) -> Vec<Agent> {
    assert_eq!(cp.publish(&release.sign(&two_waves(R1, T0, 0))).await.status, StatusCode::CREATED);
    let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
    let d = agents[0].poll(0).await.expect("canary");
    agents[0].fail_and_revert(&d).await;
    assert_eq!(cp.get_json(&format!("/v1/rollouts/{R1}")).await["state"], "halted");
    let out = run(&["cp", "resume", "--cp", url, R1, "--reason", "INC-1: the probe's target was down"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for agent in &mut agents[1..] {
        let d = agent.poll(0).await.expect("wave 1 of r1");
        agent.activate(&d).await;
        agent.converge(&d).await;
    }
    assert_eq!(cp.get_json(&format!("/v1/rollouts/{R1}")).await["state"], "completed");
    let hosts: Vec<(String, usize, String)> =
        (1..=4).map(|i| (format!("web-{i}"), usize::from(i > 1), format!("web-{i}-r2"))).collect();
    let hosts: Vec<(&str, usize, &str)> = hosts.iter().map(|(h, w, c)| (h.as_str(), *w, c.as_str())).collect();
    let r2 = manifest(R2, T1, 0, &[("canary", 0, 1), ("rest", 0, 3)], &hosts);
    assert_eq!(cp.publish(&release.sign(&r2)).await.status, StatusCode::CREATED);
    for agent in &mut agents {
        let d = agent.poll(0).await.expect("r2");
        agent.activate(&d).await;
        agent.converge(&d).await;
        agent.heartbeat().await;
    }
    assert_eq!(cp.get_json(&format!("/v1/rollouts/{R2}")).await["state"], "completed");
    agents
}

/// The rule's conditions on `copy` for r1, checked rather than assumed:
/// terminal with a newer rollout of its channel, no host live in it, no
/// host's `expected_from` naming it.
fn assert_r1_may_go(conn: &rusqlite::Connection) {
    let state: String =
        conn.query_row("SELECT state FROM rollouts WHERE rollout_id = ?1", [R1], |r| r.get(0)).expect("r1's state");
    assert_eq!(state, "completed");
    assert_eq!(count(conn, "SELECT COUNT(*) FROM rollouts WHERE channel = 'stable' AND rollout_id != ?1", R1), 1);
    let live = "SELECT COUNT(*) FROM host_records WHERE rollout_id = ?1
                AND state NOT IN ('Converged', 'Reverted', 'Pending')";
    assert_eq!(count(conn, live, R1), 0, "no host live in r1");
    assert_eq!(count(conn, "SELECT COUNT(*) FROM hosts WHERE expected_from = ?1", R1), 0);
    assert_eq!(count(conn, "SELECT COUNT(*) FROM hosts WHERE expected_from = ?1", R2), 4);
}

/// Deleting all of a terminal superseded rollout, as the rule allows, from
/// a backup copy: `replay` of the copy replays what remains with 0
/// disagreements and no longer mentions the deleted rollout; the quarantine
/// it caused is kept. Deleting half of one host's rows of the remaining
/// rollout (its first half, or its last) makes `replay` fail naming that
/// host.
#[test]
fn deleting_a_terminal_superseded_rollout_keeps_replay_whole_and_a_partial_delete_is_named() {
    let (dir, release, cp) = setup("retention");
    let url = format!("http://{}", cp.url.authority());
    rt().block_on(two_rollouts(&cp, &release, &url));
    let whole = dir.path().join("whole.db");
    backup(&cp, &whole);
    let before = stdout(&run(&["replay", "--db", whole.to_str().unwrap(), "--quiet"]));
    assert!(before.contains(&format!("rollout {R1}")) && before.contains("; 0 disagreements"), "{before}");

    // What the rule allows: all of r1, in one transaction.
    let pruned = dir.path().join("pruned.db");
    backup(&cp, &pruned);
    {
        let mut conn = rusqlite::Connection::open(&pruned).unwrap();
        assert_r1_may_go(&conn);
        let n_events = count(&conn, "SELECT COUNT(*) FROM event_log WHERE rollout_id = ?1", R1);
        assert!(n_events >= 10, "r1 had a log to delete: {n_events}");
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM operator_actions WHERE rollout_id = ?1", R1), 1);
        let tx = conn.transaction().unwrap();
        for table in ROLLOUT_TABLES {
            tx.execute(&format!("DELETE FROM {table} WHERE rollout_id = ?1"), [R1]).unwrap();
        }
        tx.commit().unwrap();
        for table in ROLLOUT_TABLES {
            assert_eq!(count(&conn, &format!("SELECT COUNT(*) FROM {table} WHERE rollout_id = ?1"), R1), 0, "{table}");
        }
        let kept = "SELECT COUNT(*) FROM quarantined_closures WHERE rollout_id = ?1";
        assert_eq!(count(&conn, kept, R1), 1, "the quarantine r1 caused is a channel fact and stays");
    }
    let out = run(&["replay", "--db", pruned.to_str().unwrap(), "--quiet"]);
    let text = stdout(&out);
    println!("$ nixfleet replay --db pruned.db --quiet\n{text}");
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("rollout {R2}")) && !text.contains(R1), "{text}");
    assert!(text.contains("events of 4 hosts replayed; 0 disagreements"), "{text}");
    // A CP serves from the pruned copy: r2 only, and the quarantine r1 caused still holds on the channel.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(&pruned, restored.join("cp.db")).unwrap();
    let again = Cp::start(&restored, &release.pub_path);
    rt().block_on(async {
        let status = again.get_json("/v1/status").await;
        let ids: Vec<&str> =
            status["rollouts"].as_array().unwrap().iter().filter_map(|r| r["rollout_id"].as_str()).collect();
        assert_eq!(ids, [R2], "{status:#}");
        assert_eq!(status["quarantined"][0]["closure"], closure("web-1-new").as_str(), "{status:#}");
    });
    drop(again);

    // A partial delete: half of web-2's rows in r2, the first half or the last.
    for (label, order) in [("first-half", "ASC"), ("last-half", "DESC")] {
        let copy = dir.path().join(format!("partial-{label}.db"));
        backup(&cp, &copy);
        let conn = rusqlite::Connection::open(&copy).unwrap();
        let rows = "SELECT COUNT(*) FROM event_log WHERE rollout_id = ?1 AND hostname = 'web-2'";
        let n = count(&conn, rows, R2);
        assert!(n >= 4, "{n}");
        let sql = format!(
            "DELETE FROM event_log WHERE id IN (SELECT id FROM event_log WHERE rollout_id = ?1
             AND hostname = 'web-2' ORDER BY seq {order} LIMIT {})",
            n / 2
        );
        assert_eq!(conn.execute(&sql, [R2]).unwrap() as i64, n / 2);
        drop(conn);
        let out = run(&["replay", "--db", copy.to_str().unwrap(), "--quiet"]);
        let text = stdout(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{label}: {text}{err}");
        assert_eq!(out.status.code(), Some(1), "{label}: {text}");
        assert!(text.contains(" host web-2: ") && text.contains("DISAGREES"), "{label}: {text}");
        assert!(err.contains(&format!("web-2 in {R2}")), "{label}: the error names the host: {err}");
        assert!(!err.contains("web-1 in") && !err.contains("web-3 in"), "{label}: only web-2: {err}");
    }
}
