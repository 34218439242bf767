//! Long-poll dispatch and the planner through the real CP: waking, repeating,
//! waves, halts and quarantine, supersession.

use super::*;

/// A long-poll with nothing to do answers 204 once `wait` has passed, not
/// before, and not much later.
#[test]
fn longpoll_returns_204_after_wait() {
    let (_dir, _release, cp) = setup("lp204");
    rt().block_on(async {
        let agent = Agent::new("idle-1", &cp.url);
        let start = Instant::now();
        assert!(agent.poll(1).await.is_none());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(3), "{took:?}");
    });
}

/// A parked long-poll is woken within 100 ms of the dispatch, and the
/// dispatch is repeated on every poll until the host acks it.
#[test]
fn longpoll_wakes_promptly_and_repeats_until_acked() {
    let (_dir, release, cp) = setup("lpwake");
    rt().block_on(async {
        let mut canary = Agent::new("web-1", &cp.url);
        let parked = {
            let agent = Agent::new("web-1", &cp.url);
            tokio::spawn(async move {
                let d = agent.poll(30).await;
                (d, Instant::now())
            })
        };
        // The poll must be parked before we publish: wait until the board has it.
        wait_parked(&cp, 1).await;
        let resp = cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let published = Instant::now();
        assert_eq!(resp.status, StatusCode::CREATED);
        let (dispatch, woke) = parked.await.unwrap();
        let dispatch = dispatch.expect("woken with a dispatch");
        assert!(woke.saturating_duration_since(published) < Duration::from_millis(100), "woke late");
        assert_eq!(dispatch.rollout_id.as_str(), "stable@r1");
        assert_eq!(dispatch.target_closure.as_str(), closure("web-1-new"));
        assert_eq!(dispatch.wave, 0);

        let again = canary.poll(0).await.expect("not destructive: repeated");
        assert_eq!(again, dispatch);
        let ack = canary.ack_body(&dispatch);
        assert_applied(&canary.send("stable@r1", ack).await);
        assert!(canary.poll(0).await.is_none(), "the ack ends the dispatch");
    });
}

/// Hundreds of concurrent long-polls are all answered by one publish, each
/// with its own host's closure (the dispatches are stored 64 rows per
/// INSERT: 300 hosts are four full statements and a remainder), and the
/// stored dispatches survive a `kill -9`.
#[test]
fn many_concurrent_longpolls_are_all_woken() {
    const N: usize = 300;
    let (_dir, release, mut cp) = setup("lpmany");
    let names: Vec<String> = (0..N).map(|i| format!("node-{i}")).collect();
    let first_answers = rt().block_on(async {
        let hosts: Vec<(&str, usize, &str)> = names.iter().map(|n| (n.as_str(), 0, n.as_str())).collect();
        let m = manifest("fleet@big", T0, 0, &[("all", 0, N as u32)], &hosts);
        let mut polls = tokio::task::JoinSet::new();
        for name in &names {
            let agent = Agent::new(name, &cp.url);
            let name = name.clone();
            polls.spawn(async move { (name, agent.poll(30).await) });
        }
        wait_parked(&cp, N).await;
        let start = Instant::now();
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        let mut answers = std::collections::BTreeMap::new();
        while let Some(answer) = polls.join_next().await {
            let (name, dispatch) = answer.unwrap();
            let d = dispatch.unwrap_or_else(|| panic!("{name} got no dispatch"));
            assert_eq!(d.target_closure.as_str(), closure(&name), "{name} got another host's dispatch");
            answers.insert(name, d);
        }
        assert_eq!(answers.len(), N, "every long-poll got its dispatch");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        answers
    });
    cp.kill9();
    cp.restart();
    rt().block_on(async {
        for name in [&names[0], &names[63], &names[64], &names[N - 1]] {
            let d = Agent::new(name, &cp.url).poll(0).await.expect("the standing dispatch survives a restart");
            // The stored row, not a new plan after the restart: same issue time.
            assert_eq!(d, first_answers[name], "{name}");
        }
    });
}

/// A 2-wave rollout: only the canary is dispatched first, wave 1 is promoted
/// only after the canary converged, at most `max_in_flight` hosts of wave 1
/// are in flight, and the rollout completes.
#[test]
fn two_wave_rollout_promotes_only_after_canary_converged() {
    let (_dir, release, cp) = setup("waves");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await.status, StatusCode::CREATED);
        let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
        for a in &agents[1..] {
            assert!(a.poll(0).await.is_none(), "wave 1 waits for the canary");
        }
        let d = agents[0].poll(0).await.expect("canary dispatched");
        agents[0].activate(&d).await;
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Soaking");
        for a in &agents[1..] {
            assert!(a.poll(0).await.is_none(), "Soaking is not Converged: no promotion");
        }
        // Park web-2's poll, then converge the canary: promotion wakes it.
        let parked = {
            let a = Agent::new("web-2", &cp.url);
            tokio::spawn(async move { a.poll(30).await })
        };
        wait_parked(&cp, 1).await;
        agents[0].converge(&d).await;
        let woken = parked.await.unwrap().expect("promotion wakes the parked poll");
        assert_eq!(woken.wave, 1);
        let status = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(status["current_wave"], 1);

        // Hostname order within the wave: web-2 and web-3 take the 2 slots.
        let d2 = agents[1].poll(0).await.expect("web-2 dispatched");
        let d3 = agents[2].poll(0).await.expect("web-3 dispatched");
        assert!(agents[3].poll(0).await.is_none(), "max_in_flight 2: web-4 waits");
        agents[1].activate(&d2).await;
        assert!(agents[3].poll(0).await.is_none(), "Soaking still holds a slot");
        agents[1].converge(&d2).await;
        let d4 = agents[3].poll(0).await.expect("a freed slot dispatches web-4");
        for (i, d) in [(2, d3), (3, d4)] {
            agents[i].activate(&d).await;
            agents[i].converge(&d).await;
        }
        let status = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(status["state"], "completed", "{status:#}");
        assert_eq!(status["hosts_by_state"]["Converged"], 4);
        // A newer manifest does not relabel a completed rollout.
        let r2 = manifest("stable@r2", T1, 0, &[("all", 0, 4)], &[("web-1", 0, "web-1-r2")]);
        assert_eq!(cp.publish(&release.sign(&r2)).await.status, StatusCode::CREATED);
        assert_eq!(cp.get_json("/v1/rollouts/stable@r1").await["state"], "completed");
    });
}

/// With `max_failed_hosts: 0` one reverted canary halts the rollout (nothing
/// more is dispatched, the status says why), its closure is quarantined on
/// the channel, and a newer manifest that still ships that closure never
/// dispatches it; the newer manifest supersedes the halted one.
#[test]
fn failure_halts_quarantines_and_supersession_takes_over() {
    let (_dir, release, mut cp) = setup("halt");
    rt().block_on(async {
        assert_eq!(cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await.status, StatusCode::CREATED);
        let mut canary = Agent::new("web-1", &cp.url);
        let d = canary.poll(0).await.expect("canary dispatched");
        canary.fail_and_revert(&d).await;
        let status = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(status["state"], "halted");
        assert!(status["halt_reason"].as_str().unwrap().contains("web-1"), "{status:#}");
        for i in 2..=4 {
            assert!(Agent::new(&format!("web-{i}"), &cp.url).poll(0).await.is_none(), "halted: no dispatch");
        }
        let fleet = cp.get_json("/v1/status").await;
        assert_eq!(fleet["quarantined"][0]["closure"], closure("web-1-new"));
    });
    // The halt and the quarantine are stored, not remembered: they survive a crash.
    cp.kill9();
    cp.restart();
    let canary = Agent::new("web-1", &cp.url);
    rt().block_on(async {
        let status = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(status["state"], "halted", "halt survives a restart");
        assert!(Agent::new("web-2", &cp.url).poll(0).await.is_none(), "still halted after restart");

        // r2 fixes web-2..4 but still ships web-1's bad closure.
        let r2 = manifest(
            "stable@r2",
            T1,
            0,
            &[("all", 0, 10)],
            &[("web-1", 0, "web-1-new"), ("web-2", 0, "web-2-v2"), ("web-3", 0, "web-3-v2")],
        );
        assert_eq!(cp.publish(&release.sign(&r2)).await.status, StatusCode::CREATED);
        let old = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(old["state"], "superseded");
        assert_eq!(old["superseded_by"], "stable@r2");
        assert!(canary.poll(0).await.is_none(), "the quarantined closure is never dispatched");
        let d2 = Agent::new("web-2", &cp.url).poll(0).await.expect("web-2 dispatched by r2");
        assert_eq!(d2.rollout_id.as_str(), "stable@r2");
        let detail = cp.get_json("/v1/rollouts/stable@r2").await;
        let web1 = &detail["waves"][0]["hosts"][0];
        assert_eq!(web1["hostname"], "web-1");
        assert!(web1["note"].as_str().unwrap().contains("quarantined"), "{web1:#}");

        // An older manifest published late opens superseded and dispatches nothing.
        let r0 = manifest("stable@r0", "2026-11-24T00:00:00Z", 0, &[("all", 0, 10)], &[("web-4", 0, "web-4-r0")]);
        assert_eq!(cp.publish(&release.sign(&r0)).await.status, StatusCode::CREATED);
        assert_eq!(cp.get_json("/v1/rollouts/stable@r0").await["state"], "superseded");
        assert!(Agent::new("web-4", &cp.url).poll(0).await.is_none());
    });
}

/// A newer manifest withdraws the older rollout's standing dispatch: the
/// host is offered the new rollout instead, and in-flight hosts still report.
#[test]
fn supersession_withdraws_standing_dispatches() {
    let (_dir, release, cp) = setup("supersede");
    rt().block_on(async {
        let one = |id: &str, at: &str, label: &str| {
            manifest(id, at, 0, &[("all", 0, 5)], &[("db-1", 0, label), ("db-2", 0, label)])
        };
        cp.publish(&release.sign(&one("db@r1", T0, "db-r1"))).await;
        let mut db1 = Agent::new("db-1", &cp.url);
        let d1 = db1.poll(0).await.expect("r1 dispatch");
        db1.activate(&d1).await; // in flight under r1
        let db2 = Agent::new("db-2", &cp.url);
        assert_eq!(db2.poll(0).await.expect("standing r1 dispatch").rollout_id.as_str(), "db@r1");
        cp.publish(&release.sign(&one("db@r2", T1, "db-r2"))).await;
        assert_eq!(db2.poll(0).await.expect("r2 dispatch").rollout_id.as_str(), "db@r2");
        // The in-flight host of the superseded rollout finishes and is recorded.
        db1.converge(&d1).await;
        assert_eq!(cp.host_state("db@r1", "db-1").await, "Converged");
        assert_eq!(cp.get_json("/v1/rollouts/db@r1").await["state"], "superseded");
    });
}
