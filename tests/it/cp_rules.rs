//! `docs/protocol.md` §3 rules 2, 8 and 10, §2 (order on a channel) and
//! the quarantine outcome, through the
//! real `nixfleet cp serve` over HTTP with scripted agents: one live rollout
//! per host, gaps answered with the expected seq (also after a database
//! loss), drift visible everywhere, no downgrade by publish order, and a
//! host whose target is quarantined settling as "skipped".

use std::process::Command;

use hyper::{Method, StatusCode};
use nixfleet::cp::store;
use nixfleet::ids::Closure;
use nixfleet::machine::RejectCode;
use nixfleet::wire::{OutboundEvent, ResultStatus, WireEventBody};
use time::macros::datetime;

use crate::cp::{rt, setup};
use crate::harness::{assert_applied, bin, closure, manifest, Agent, Cp};

const T0: &str = "2026-11-25T12:00:00Z";
const T1: &str = "2026-11-25T13:00:00Z";

async fn host_entry(cp: &Cp, host: &str) -> serde_json::Value {
    let hosts = cp.get_json("/v1/hosts").await;
    hosts.as_array().expect("hosts").iter().find(|h| h["hostname"] == host).cloned().expect("host listed")
}

/// (hostname, seq, kind, agent_at, event) of every logged event, in log order.
async fn log_of(cp: &Cp, rollout: &str) -> Vec<(String, u64, String, String, serde_json::Value)> {
    let log = cp.get_json(&format!("/v1/rollouts/{rollout}/events?limit=10000")).await;
    log["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["hostname"].as_str().expect("host").to_owned(),
                e["seq"].as_u64().expect("seq"),
                e["kind"].as_str().expect("kind").to_owned(),
                e["agent_at"].as_str().expect("agent_at").to_owned(),
                e["event"].clone(),
            )
        })
        .collect()
}

fn run_cli(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run nixfleet");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn replay_agrees(cp: &Cp) {
    let out = Command::new(bin()).args(["replay", "--db", cp.db.to_str().expect("utf-8"), "--quiet"]).output();
    let out = out.expect("run replay");
    assert!(
        out.status.success(),
        "replay --db disagrees:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rule 2: a seq beyond the next one is answered `gap` with the expected
/// seq and nothing is stored; once the missing event arrives both apply and
/// the log holds 1, 2, 3 in order.
#[test]
fn a_gap_is_answered_with_the_expected_seq_and_nothing_is_stored() {
    let (_dir, release, cp) = setup("gap");
    rt().block_on(async {
        let m = manifest("stable@r1", T0, 0, &[("all", 0, 1)], &[("web-1", 0, "web-1-new")]);
        cp.publish(&release.sign(&m)).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        let ack = agent.ack_body(&d);
        let e1 = agent.emit("stable@r1", ack);
        let e2 = agent.emit(
            "stable@r1",
            WireEventBody::ActivationStarted {
                started_at: datetime!(2026-11-25 12:00:02 UTC),
                switch_method: "direct".into(),
            },
        );
        let e3 = agent.emit(
            "stable@r1",
            WireEventBody::ActivationCompleted {
                observed_current_closure: d.target_closure.clone(),
                exit_code: 0,
                completed_at: datetime!(2026-11-25 12:00:03 UTC),
            },
        );
        assert_applied(&agent.post(&[("stable@r1", &e1)]).await[0]);
        let r = agent.post(&[("stable@r1", &e3)]).await.remove(0);
        assert_eq!((r.status, r.expected_seq), (ResultStatus::Gap, Some(2)), "{r:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains("seq 2"), "{r:?}");
        let log: Vec<u64> = log_of(&cp, "stable@r1").await.iter().map(|e| e.1).collect();
        assert_eq!(log, [1], "nothing stored for the gap");
        let web1 = cp.host_row("stable@r1", "web-1").await;
        assert_eq!((web1["state"].as_str(), web1["last_seq"].as_u64()), (Some("Activating"), Some(1)));

        let results = agent.post(&[("stable@r1", &e2), ("stable@r1", &e3)]).await;
        assert!(results.iter().all(|r| r.status == ResultStatus::Applied), "{results:?}");
        let log: Vec<u64> = log_of(&cp, "stable@r1").await.iter().map(|e| e.1).collect();
        assert_eq!(log, [1, 2, 3]);
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Soaking");
        let metrics = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        assert!(metrics.contains("nixfleet_cp_events_total{status=\"gap\"} 1"), "{metrics}");
    });
    replay_agrees(&cp);
}

/// Rule 2 after a database loss: the CP is restarted on an empty database
/// and the manifest re-published; the agent's drainer posts its pending
/// events BEFORE any heartbeat and is answered `gap` from seq 1 (not
/// rejected: nothing is dead-lettered); when it re-sends 1..N the records
/// and the event log equal what they were, and the pending event applies.
#[test]
fn after_a_database_loss_pending_events_get_a_gap_and_a_resend_rebuilds_the_records() {
    let (_dir, release, mut cp) = setup("gaploss");
    let rt = rt();
    let m = manifest("stable@r1", T0, 0, &[("all", 0, 2)], &[("web-1", 0, "web-1-new"), ("web-2", 0, "web-2-new")]);
    let envelope = release.sign(&m);
    let mut web1 = Agent::new("web-1", &cp.url);
    let mut web2 = Agent::new("web-2", &cp.url);
    let d2 = rt.block_on(async {
        cp.publish(&envelope).await;
        let d1 = web1.poll(0).await.expect("web-1 dispatched");
        web1.activate(&d1).await;
        web1.converge(&d1).await;
        let d2 = web2.poll(0).await.expect("web-2 dispatched");
        web2.activate(&d2).await;
        let topology =
            WireEventBody::ProbeTopologyDeclared { probes: vec![], declared_at: datetime!(2026-11-25 12:01 UTC) };
        assert_applied(&web2.send("stable@r1", topology).await);
        d2
    });
    let records_before = {
        let conn = store::open_reader(&cp.db).expect("reader");
        store::cached_host_records(&conn, &cp.db).expect("records")
    };
    let log_before = rt.block_on(log_of(&cp, "stable@r1"));
    assert_eq!(log_before.len(), 7);

    assert!(cp.terminate().success());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", cp.db.display()));
    }
    cp.restart();
    rt.block_on(async {
        web1.url = cp.url.clone();
        web2.url = cp.url.clone();
        assert_eq!(cp.publish(&envelope).await.status, StatusCode::CREATED, "re-publish after the loss");
        // web-2's queue still holds an undelivered event (seq 4): the drainer
        // sends it first, before any heartbeat.
        let pending = web2.emit(
            "stable@r1",
            WireEventBody::Converged {
                converged_at: datetime!(2026-11-25 12:02 UTC),
                current_closure: d2.target_closure.clone(),
            },
        );
        assert_eq!(pending.seq, 4);
        let r = web2.post(&[("stable@r1", &pending)]).await.remove(0);
        assert_eq!((r.status, r.expected_seq), (ResultStatus::Gap, Some(1)), "{r:?}");
        // The scripted agents re-send from seq 1 (acked events are retained).
        let results = web1.replay("stable@r1", 0).await;
        assert!(results.iter().all(|r| r.status == ResultStatus::Applied), "{results:?}");
        let acked: Vec<OutboundEvent> = web2.journal["stable@r1"][..3].to_vec();
        let items: Vec<(&str, &OutboundEvent)> = acked.iter().map(|e| ("stable@r1", e)).collect();
        let results = web2.post(&items).await;
        assert!(results.iter().all(|r| r.status == ResultStatus::Applied), "{results:?}");
    });
    let records_after = {
        let conn = store::open_reader(&cp.db).expect("reader");
        store::cached_host_records(&conn, &cp.db).expect("records")
    };
    assert_eq!(records_after, records_before, "re-sending 1..N rebuilds the records exactly");
    assert_eq!(rt.block_on(log_of(&cp, "stable@r1")), log_before, "and the event log");
    rt.block_on(async {
        let results = web2.replay("stable@r1", 3).await;
        assert_eq!(results.iter().map(|r| r.status).collect::<Vec<_>>(), [ResultStatus::Applied]);
        assert_eq!(cp.host_state("stable@r1", "web-2").await, "Converged");
    });
    replay_agrees(&cp);
}

/// Rule 8 with supersession: r2 supersedes r1 on the channel, but db-1 is
/// Soaking in r1, so r2 holds db-1's dispatch (it is neither in flight nor
/// settled, the view says why) while db-2 gets r2 at once; db-1's later r1
/// events are still applied, and once it converged in r1 r2 is offered.
#[test]
fn a_newer_rollout_waits_while_the_host_is_live_in_the_superseded_one() {
    let (_dir, release, cp) = setup("live-supersede");
    rt().block_on(async {
        let one = |id: &str, at: &str, label: &str| {
            manifest(id, at, 0, &[("all", 0, 5)], &[("db-1", 0, label), ("db-2", 0, label)])
        };
        cp.publish(&release.sign(&one("db@r1", T0, "db-r1"))).await;
        let mut db1 = Agent::new("db-1", &cp.url);
        let d1 = db1.poll(0).await.expect("r1 dispatch");
        db1.activate(&d1).await; // Soaking in r1
        let db2 = Agent::new("db-2", &cp.url);
        cp.publish(&release.sign(&one("db@r2", T1, "db-r2"))).await;
        assert_eq!(cp.get_json("/v1/rollouts/db@r1").await["state"], "superseded");
        assert_eq!(db2.poll(0).await.expect("r2 dispatch").rollout_id.as_str(), "db@r2");
        assert!(db1.poll(0).await.is_none(), "db-1 is live in db@r1: r2 must not touch it");
        let held = cp.host_row("db@r2", "db-1").await;
        assert_eq!(held["state"], "Pending");
        assert_eq!(held["held_by"], "db@r1", "{held:#}");
        assert!(held["note"].as_str().unwrap_or("").contains("live in rollout db@r1"), "{held:#}");
        assert_eq!(cp.get_json("/v1/rollouts/db@r2").await["state"], "active", "r2's wave waits for db-1");

        db1.converge(&d1).await;
        assert_eq!(cp.host_state("db@r1", "db-1").await, "Converged", "r1's in-flight host finished");
        let d = db1.poll(0).await.expect("r2 is offered once r1 is terminal on db-1");
        assert_eq!(d.rollout_id.as_str(), "db@r2");
    });
}

/// Rule 8 across channels: a host Failed in one rollout with its rollback
/// still running is live; another channel's rollout holds it until the
/// rollback completed.
#[test]
fn a_rollback_in_progress_holds_another_channels_dispatch() {
    let (_dir, release, cp) = setup("live-rollback");
    rt().block_on(async {
        let web = manifest("web@r1", T0, 0, &[("all", 0, 1)], &[("h-1", 0, "h-1-web")]);
        cp.publish(&release.sign(&web)).await;
        let mut h1 = Agent::new("h-1", &cp.url);
        let d = h1.poll(0).await.expect("web dispatch");
        let prior = h1.current.clone();
        let ack = h1.ack_body(&d);
        assert_applied(&h1.send("web@r1", ack).await);
        let failed = WireEventBody::ActivationFailed {
            exit_code: 1,
            stderr_tail: "boom".into(),
            failed_at: datetime!(2026-11-25 12:00:05 UTC),
        };
        assert_applied(&h1.send("web@r1", failed).await); // Failed, rollback fired
        let cache = manifest("cache@r1", T1, 0, &[("all", 0, 1)], &[("h-1", 0, "h-1-cache")]);
        cp.publish(&release.sign(&cache)).await;
        assert!(h1.poll(0).await.is_none(), "rolling back in web@r1: cache@r1 waits");
        assert_eq!(cp.host_row("cache@r1", "h-1").await["held_by"], "web@r1");
        let reverted = WireEventBody::RollbackComplete {
            reverted_to_closure: Closure::parse(&prior).expect("closure"),
            exit_code: 0,
            completed_at: datetime!(2026-11-25 12:00:09 UTC),
        };
        assert_applied(&h1.send("web@r1", reverted).await);
        let d = h1.poll(0).await.expect("offered once the rollback completed");
        assert_eq!(d.rollout_id.as_str(), "cache@r1");
    });
}

/// Rule 8: an agent's `busy` refusal is "ask again later": the host stays
/// Pending, nothing counts as failed (max_failed_hosts 0 does not halt),
/// the dispatch keeps standing and a later ack activates the host.
#[test]
fn a_busy_refusal_is_ask_again_later() {
    let (_dir, release, cp) = setup("busy");
    rt().block_on(async {
        let m = manifest("stable@r1", T0, 0, &[("all", 0, 1)], &[("web-1", 0, "web-1-new")]);
        cp.publish(&release.sign(&m)).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        let busy = WireEventBody::DispatchRejected {
            target_closure: d.target_closure.clone(),
            code: RejectCode::Busy,
            reason: "live in other@r9".into(),
            rejected_at: datetime!(2026-11-25 12:00:01 UTC),
        };
        assert_applied(&agent.send("stable@r1", busy).await);
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "converging", "not halted: {detail:#}");
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Pending");
        assert_eq!(agent.poll(0).await.expect("the dispatch still stands"), d);
        let ack = agent.ack_body(&d);
        assert_applied(&agent.send("stable@r1", ack).await);
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Activating");
    });
}

/// Quarantine: when web-1 reverts, its closure (shared by web-2 and web-3)
/// is quarantined and their standing dispatches are withdrawn in the same
/// commit; never acked, they settle as "skipped" (not failed: one bad
/// closure is one failure, so max_failed_hosts 1 does not halt) and the
/// rollout completes. The outcome survives a restart, shows in the views and
/// `cp status`, a later rollout shipping the closure skips at once, and
/// `replay --db` still agrees (skips are not host records).
#[test]
fn a_quarantined_target_withdraws_dispatches_and_skips_the_host() {
    let (_dir, release, mut cp) = setup("skip");
    let rt = rt();
    rt.block_on(async {
        let hosts = [("web-1", 0, "shared"), ("web-2", 0, "shared"), ("web-3", 0, "shared")];
        cp.publish(&release.sign(&manifest("stable@r1", T0, 1, &[("all", 0, 3)], &hosts))).await;
        let mut web1 = Agent::new("web-1", &cp.url);
        let web2 = Agent::new("web-2", &cp.url);
        let d1 = web1.poll(0).await.expect("web-1 dispatched");
        assert!(web2.poll(0).await.is_some(), "web-2 has a standing dispatch");
        web1.fail_and_revert(&d1).await;
        assert!(web2.poll(0).await.is_none(), "the quarantined dispatch was withdrawn");
        assert!(Agent::new("web-3", &cp.url).poll(0).await.is_none());
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "completed", "{detail:#}");
        assert_eq!(detail["hosts_by_state"]["Skipped"], 2, "{detail:#}");
        assert_eq!(detail["hosts_by_state"]["Reverted"], 1, "{detail:#}");
        let w2 = cp.host_row("stable@r1", "web-2").await;
        assert_eq!(w2["state"], "Pending", "the record is still the fold of web-2's (no) events");
        assert!(w2["skipped"]["reason"].as_str().unwrap_or("").contains("quarantined"), "{w2:#}");
        assert!(w2["skipped"]["skipped_at"].is_string(), "{w2:#}");
    });
    cp.kill9();
    cp.restart();
    rt.block_on(async {
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(
            (detail["state"].as_str(), detail["hosts_by_state"]["Skipped"].as_u64()),
            (Some("completed"), Some(2))
        );
        let r2 = manifest("stable@r2", T1, 0, &[("all", 0, 3)], &[("web-2", 0, "shared"), ("web-4", 0, "web-4-r2")]);
        cp.publish(&release.sign(&r2)).await;
        assert!(Agent::new("web-2", &cp.url).poll(0).await.is_none());
        let mut web4 = Agent::new("web-4", &cp.url);
        let d4 = web4.poll(0).await.expect("web-4 dispatched");
        web4.activate(&d4).await;
        web4.converge(&d4).await;
        let detail = cp.get_json("/v1/rollouts/stable@r2").await;
        assert_eq!(detail["state"], "completed", "a skipped host settles its wave: {detail:#}");
        let metrics = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        assert!(metrics.contains("nixfleet_cp_hosts_skipped 3"), "{metrics}");
    });
    let url = format!("http://{}", cp.url.authority());
    let text = run_cli(&["cp", "status", "--cp", &url, "--rollout", "stable@r1"]);
    assert!(text.contains("Skipped") && text.contains("quarantined"), "{text}");
    let fleet = run_cli(&["cp", "status", "--cp", &url]);
    assert!(fleet.contains("Skipped=2"), "{fleet}");
    replay_agrees(&cp);
}

/// An ack that races a skip wins, and the rollout follows it. web-2 held
/// its offer when web-1's revert quarantined the shared closure (the
/// withdrawal cannot reach back into a long-poll answer already sent); its
/// late ack unsettles the completed rollout, and its failure makes two
/// failed hosts, more than `max_failed_hosts` = 1: the rollout halts. The
/// writer used to never plan a completed rollout again, so it stayed
/// "completed" with a host in flight and the budget exceeded. Found by
/// `nixfleet sim --seed 239 --hosts 12 --faults heavy` (replays arriving
/// late after a database loss do the same).
#[test]
fn a_late_ack_and_failure_reopen_and_halt_a_completed_rollout() {
    let (_dir, release, cp) = setup("late-ack");
    let rt = rt();
    rt.block_on(async {
        let hosts = [("web-1", 0, "shared"), ("web-2", 0, "shared")];
        cp.publish(&release.sign(&manifest("stable@r1", T0, 1, &[("all", 0, 2)], &hosts))).await;
        let mut web1 = Agent::new("web-1", &cp.url);
        let mut web2 = Agent::new("web-2", &cp.url);
        let d1 = web1.poll(0).await.expect("web-1 dispatched");
        let d2 = web2.poll(0).await.expect("web-2 dispatched");
        web1.fail_and_revert(&d1).await;
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "completed", "web-2 skipped, web-1 within the budget: {detail:#}");
        let ack = web2.ack_body(&d2);
        assert_applied(&web2.send("stable@r1", ack).await);
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "converging", "web-2 is in flight after its late ack: {detail:#}");
        let failed = WireEventBody::ActivationFailed {
            exit_code: 1,
            stderr_tail: "switch-to-configuration: unit web.service failed".into(),
            failed_at: web2.tick(3),
        };
        assert_applied(&web2.send("stable@r1", failed).await);
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "halted", "two failed hosts, max_failed_hosts 1: {detail:#}");
        let reason = detail["halt_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("web-1") && reason.contains("web-2"), "{detail:#}");
    });
    replay_agrees(&cp);
}

/// Rule 10: a heartbeat whose current closure differs from the closure the
/// records say the host runs is drift, shown in `/v1/hosts`, `/v1/status`,
/// `/metrics` and `cp status`; an activating host, and a host whose events
/// the CP has not all received yet, are not judged.
#[test]
fn drift_is_visible_in_views_metrics_and_status() {
    let (_dir, release, cp) = setup("drift");
    rt().block_on(async {
        let hosts = [("web-1", 0, "web-1-r1"), ("web-2", 0, "web-2-r1")];
        cp.publish(&release.sign(&manifest("stable@r1", T0, 0, &[("all", 0, 2)], &hosts))).await;
        let mut web1 = Agent::new("web-1", &cp.url);
        let mut web2 = Agent::new("web-2", &cp.url);
        let d1 = web1.poll(0).await.expect("dispatch");
        web1.activate(&d1).await;
        web1.converge(&d1).await;
        web1.heartbeat().await;
        let h = host_entry(&cp, "web-1").await;
        assert_eq!(
            (h["drift"].as_str(), h["expected_closure"].as_str()),
            (Some("in_sync"), Some(closure("web-1-r1").as_str()))
        );
        assert_eq!(h["expected_from"], "stable@r1");

        web1.current = closure("hand-built");
        web1.heartbeat().await;
        let h = host_entry(&cp, "web-1").await;
        assert_eq!(h["drift"], "drifting", "{h:#}");
        let status = cp.get_json("/v1/status").await;
        assert_eq!(status["n_drifting"], 1, "{status:#}");
        assert_eq!(status["drifting"][0]["hostname"], "web-1");
        assert_eq!(status["drifting"][0]["current_closure"], closure("hand-built"));
        let metrics = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        assert!(metrics.contains("\nnixfleet_hosts_drifting 1\n"), "{metrics}");

        // Activating: the records do not know what it runs; not judged.
        let d2 = web2.poll(0).await.expect("dispatch");
        let ack = web2.ack_body(&d2);
        assert_applied(&web2.send("stable@r1", ack).await);
        web2.current = closure("anything");
        web2.heartbeat().await;
        assert_eq!(host_entry(&cp, "web-2").await["drift"], "unknown");
        // The same verdict again: the row is still rewritten (the writer
        // then updates it without setting `drift`).
        web2.current = closure("anything-else");
        web2.heartbeat().await;
        let h = host_entry(&cp, "web-2").await;
        assert_eq!(
            (h["drift"].as_str(), h["current_closure"].as_str()),
            (Some("unknown"), Some(closure("anything-else").as_str())),
            "{h:#}"
        );

        // The CP is behind web-1 (an event not delivered yet): not judged.
        cp.publish(&release.sign(&manifest("stable@r2", T1, 0, &[("all", 0, 2)], &[("web-1", 0, "web-1-r2")]))).await;
        let d = web1.poll(0).await.expect("r2 dispatch");
        let ack = web1.ack_body(&d);
        web1.emit("stable@r2", ack);
        web1.current = closure("web-1-r2");
        let (hb, _) = web1.heartbeat().await;
        assert!(!hb.replay_from.is_empty());
        assert_eq!(host_entry(&cp, "web-1").await["drift"], "unknown");
        web1.replay("stable@r2", 0).await;
        let completed = WireEventBody::ActivationCompleted {
            observed_current_closure: d.target_closure.clone(),
            exit_code: 0,
            completed_at: datetime!(2026-11-25 13:00:30 UTC),
        };
        assert_applied(&web1.send("stable@r2", completed).await);
        web1.heartbeat().await;
        let h = host_entry(&cp, "web-1").await;
        assert_eq!((h["drift"].as_str(), h["expected_from"].as_str()), (Some("in_sync"), Some("stable@r2")), "{h:#}");
        let metrics = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        assert!(metrics.contains("\nnixfleet_hosts_drifting 0\n"), "{metrics}");

        web1.current = closure("hand-built");
        web1.heartbeat().await;
    });
    let url = format!("http://{}", cp.url.authority());
    let fleet = run_cli(&["cp", "status", "--cp", &url]);
    assert!(fleet.contains("1 drifting") && fleet.contains(&closure("hand-built")), "{fleet}");
    let hosts = run_cli(&["cp", "status", "--cp", &url, "--hosts"]);
    assert!(hosts.contains("DRIFT") && hosts.contains("drifting"), "{hosts}");
}

/// Clock skew (`docs/protocol.md` §2) on the CP: a manifest issued beyond
/// the clock-skew bound in the future is refused with 400 naming issued_at
/// and the CP's time, and nothing is stored.
#[test]
fn publish_refuses_a_manifest_issued_in_the_future() {
    let (_dir, release, cp) = setup("future");
    rt().block_on(async {
        let m = manifest("stable@r9", "2099-01-01T00:00:00Z", 0, &[("all", 0, 1)], &[("web-1", 0, "web-1-new")]);
        let resp = cp.publish(&release.sign(&m)).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST);
        let err: serde_json::Value = serde_json::from_slice(&resp.body).expect("json error");
        assert_eq!(err["error"], "issued_in_future");
        let message = err["message"].as_str().unwrap_or("");
        assert!(
            message.contains("issued_at 2099-01-01T00:00:00Z") && message.contains("control plane time"),
            "{message}"
        );
        assert_eq!(cp.get_json("/v1/rollouts").await, serde_json::json!([]), "nothing stored");
        assert!(Agent::new("web-1", &cp.url).poll(0).await.is_none());
    });
}

/// Order on a channel (`docs/protocol.md` §2): on equal `issued_at` the
/// byte-greater ref is newer, whatever the publish order: on channel a the
/// newer is published last, on channel b first; both end with `@y` active
/// and `@x` superseded by it.
#[test]
fn equal_issued_at_is_ordered_by_ref_whatever_the_publish_order() {
    let (_dir, release, cp) = setup("newness");
    rt().block_on(async {
        let m = |id: &str, host: &str| manifest(id, T0, 0, &[("all", 0, 1)], &[(host, 0, &id.replace('@', "-"))]);
        for (channel, order) in [("a", ["x", "y"]), ("b", ["y", "x"])] {
            for r in order {
                let id = format!("{channel}@{r}");
                let resp = cp.publish(&release.sign(&m(&id, &format!("{channel}-1")))).await;
                assert_eq!(resp.status, StatusCode::CREATED, "{id}");
            }
            let x = cp.get_json(&format!("/v1/rollouts/{channel}@x")).await;
            let y = cp.get_json(&format!("/v1/rollouts/{channel}@y")).await;
            assert_eq!(
                (x["state"].as_str(), x["superseded_by"].as_str()),
                (Some("superseded"), Some(&*format!("{channel}@y")))
            );
            assert_eq!(y["state"], "converging", "channel {channel}: its one host is dispatched: {y:#}");
            let d = Agent::new(&format!("{channel}-1"), &cp.url).poll(0).await.expect("dispatch");
            assert_eq!(d.rollout_id.as_str(), format!("{channel}@y"));
        }
    });
}

/// A DispatchAck whose soak_secs differs from the manifest's wave is
/// refused like another target (the soak window would be wrong), nothing
/// is stored, and the right ack then applies.
#[test]
fn an_ack_with_another_soak_than_the_manifest_is_rejected() {
    let (_dir, release, cp) = setup("soak");
    rt().block_on(async {
        let m = manifest("stable@r1", T0, 0, &[("all", 300, 1)], &[("web-1", 0, "web-1-new")]);
        cp.publish(&release.sign(&m)).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        let mut short = d.clone();
        short.soak_secs = 1;
        let bad = agent.ack_body(&short);
        let event = OutboundEvent { seq: 1, body: bad };
        let r = agent.post(&[("stable@r1", &event)]).await.remove(0);
        assert_eq!(r.status, ResultStatus::Rejected);
        let reason = r.reason.unwrap_or_default();
        assert!(reason.contains("soak_secs 1") && reason.contains("300"), "{reason}");
        assert!(log_of(&cp, "stable@r1").await.is_empty(), "nothing stored");
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Pending");
        let ack = agent.ack_body(&d);
        assert_applied(&agent.send("stable@r1", ack).await);
    });
}

/// A heartbeat `last_seq` above the largest wire seq is refused with 400
/// naming the field (it would wrap in the database), and nothing is stored.
#[test]
fn a_heartbeat_seq_beyond_max_seq_is_refused() {
    let (_dir, release, cp) = setup("hbseq");
    rt().block_on(async {
        cp.publish(&release.sign(&manifest("stable@r1", T0, 0, &[("all", 0, 1)], &[("web-1", 0, "web-1-new")]))).await;
        let big = nixfleet::wire::MAX_SEQ + 1;
        let body = format!(
            r#"{{"hostname":"web-1","current_closure":"{}","uptime_secs":1,"agent_version":"t","last_seq":{{"stable@r1":{big}}}}}"#,
            closure("web-1-old")
        );
        let resp = crate::harness::request(&cp.url, Method::POST, "/v1/agent/heartbeat", &[], Some(body.into_bytes()))
            .await
            .expect("heartbeat");
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&resp.body));
        let err: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
        assert_eq!(err["error"], "bad_heartbeat");
        assert!(err["message"].as_str().unwrap_or("").contains("last_seq.stable@r1"), "{err:#}");
        assert!(host_entry(&cp, "web-1").await["last_heartbeat_at"].is_null(), "nothing stored");
    });
}

/// A Deferred host shows since when it waits for its reboot, and for how
/// long, in the rollout view and in `cp status --rollout`.
#[test]
fn a_deferred_host_shows_its_age() {
    let (_dir, release, cp) = setup("deferred");
    rt().block_on(async {
        cp.publish(&release.sign(&manifest("stable@r1", T0, 0, &[("all", 0, 1)], &[("web-1", 0, "web-1-new")]))).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        let ack = agent.ack_body(&d);
        assert_applied(&agent.send("stable@r1", ack).await);
        let deferred = WireEventBody::ActivationDeferred {
            component: "kernel".into(),
            deferred_at: datetime!(2026-11-25 12:05 UTC),
        };
        assert_applied(&agent.send("stable@r1", deferred).await);
        let h = cp.host_row("stable@r1", "web-1").await;
        assert_eq!(h["deferred_at"], "2026-11-25T12:05:00Z", "{h:#}");
        assert!(h["deferred_for_secs"].as_u64().unwrap_or(0) > 0, "{h:#}");
    });
    let url = format!("http://{}", cp.url.authority());
    let text = run_cli(&["cp", "status", "--cp", &url, "--rollout", "stable@r1"]);
    assert!(text.contains("deferred since 2026-11-25T12:05:00Z"), "{text}");
    let fleet = run_cli(&["cp", "status", "--cp", &url]);
    assert!(fleet.contains("web-1") && fleet.contains("deferred since 2026-11-25T12:05:00Z"), "{fleet}");
}
