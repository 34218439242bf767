//! Ingesting agent events and heartbeats: per-event verdicts, Replay-From,
//! liveness.

use super::*;

/// Per event: applied, duplicate, rejected (illegal, with the transition
/// error), rejected (host not in the manifest), retry (unknown rollout); the
/// event log holds exactly the applied events, in order.
#[test]
fn ingest_answers_applied_duplicate_rejected_retry() {
    let (_dir, release, cp) = setup("ingest");
    rt().block_on(async {
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        let ack_body = agent.ack_body(&d);
        let ack = agent.emit("stable@r1", ack_body);
        let early_converge = agent.emit(
            "stable@r1",
            WireEventBody::Converged {
                converged_at: datetime!(2026-11-25 12:30 UTC),
                current_closure: d.target_closure.clone(),
            },
        );
        let unknown = agent.emit(
            "stable@nope",
            WireEventBody::DispatchRejected {
                target_closure: d.target_closure.clone(),
                code: nixfleet::machine::RejectCode::Refused,
                reason: "x".into(),
                rejected_at: datetime!(2026-11-25 12:00 UTC),
            },
        );
        let results = agent
            .post(&[
                ("stable@r1", &ack),
                ("stable@r1", &ack),
                ("stable@r1", &early_converge),
                ("stable@nope", &unknown),
            ])
            .await;
        let statuses: Vec<ResultStatus> = results.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            [ResultStatus::Applied, ResultStatus::Duplicate, ResultStatus::Rejected, ResultStatus::Retry]
        );
        let reason = results[2].reason.as_deref().unwrap();
        assert!(reason.contains("Converged") && reason.contains("Activating"), "{reason}");

        let stranger = Agent::new("not-in-manifest", &cp.url);
        let r = stranger.post(&[("stable@r1", &ack)]).await;
        assert_eq!(r[0].status, ResultStatus::Rejected);

        let metrics = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        for line in [
            "nixfleet_cp_events_total{status=\"applied\"} 1",
            "nixfleet_cp_events_total{status=\"duplicate\"} 1",
            "nixfleet_cp_events_total{status=\"rejected\"} 2",
            "nixfleet_cp_events_total{status=\"retry\"} 1",
            "nixfleet_cp_rollouts{state=\"active\"} 1",
            "nixfleet_cp_host_records{state=\"Activating\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }

        let log = cp.get_json("/v1/rollouts/stable@r1/events").await;
        let events = log["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{log:#}");
        assert_eq!(events[0]["kind"], "DispatchAck");
        assert_eq!(events[0]["seq"], 1);
        assert_eq!(events[0]["agent_at"], "2026-11-25T12:00:01Z", "the agent's time is stored");
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Activating");
    });
}

/// Heartbeats answer replay_from only where the CP is behind (with the header
/// when exactly one rollout needs it), never change host state, and record
/// liveness: a silent host turns unreachable after 3 intervals.
#[test]
fn heartbeat_replay_from_and_liveness() {
    let dir = TempDir::new("heartbeat");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--heartbeat-interval", "1s"]);
    rt().block_on(async {
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let mut agent = Agent::new("web-1", &cp.url);
        let d = agent.poll(0).await.unwrap();
        agent.activate(&d).await; // seq 1, 2 delivered
        let (hb, header) = agent.heartbeat().await;
        assert!(hb.replay_from.is_empty() && header.is_none());
        // Two events the CP never got.
        agent.emit(
            "stable@r1",
            WireEventBody::ProbeTopologyDeclared { probes: vec![], declared_at: datetime!(2026-11-25 12:10 UTC) },
        );
        agent.emit(
            "stable@r1",
            WireEventBody::Converged {
                converged_at: datetime!(2026-11-25 12:11 UTC),
                current_closure: d.target_closure.clone(),
            },
        );
        agent.emit(
            "stable@unknown",
            WireEventBody::DispatchRejected {
                target_closure: d.target_closure.clone(),
                code: nixfleet::machine::RejectCode::Refused,
                reason: "x".into(),
                rejected_at: datetime!(2026-11-25 12:12 UTC),
            },
        );
        let (hb, header) = agent.heartbeat().await;
        assert_eq!(hb.replay_from.len(), 1, "{hb:?}");
        assert_eq!(hb.replay_from[&"stable@r1".parse().unwrap()], 2);
        assert_eq!(header.as_deref(), Some("2"));
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Soaking", "a heartbeat never changes state");
        let results = agent.replay("stable@r1", 2).await;
        assert!(results.iter().all(|r| r.status == ResultStatus::Applied));
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Converged");

        agent.heartbeat().await;
        let hosts = cp.get_json("/v1/hosts").await;
        let web1 = hosts.as_array().unwrap().iter().find(|h| h["hostname"] == "web-1").unwrap().clone();
        assert_eq!(web1["liveness"], "reachable");
        assert_eq!(web1["current_closure"], agent.current.as_str());
        let web2 = hosts.as_array().unwrap().iter().find(|h| h["hostname"] == "web-2").unwrap().clone();
        assert_eq!(web2["liveness"], "never_seen");
        // Silent for more than 3 intervals of 1 s: unreachable.
        let start = Instant::now();
        loop {
            let hosts = cp.get_json("/v1/hosts").await;
            if hosts.as_array().unwrap().iter().any(|h| h["hostname"] == "web-1" && h["liveness"] == "unreachable") {
                break;
            }
            assert!(start.elapsed() < crate::harness::DEADLINE, "web-1 never turned unreachable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
