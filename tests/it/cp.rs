//! The control plane over real HTTP on loopback, driven by scripted agents,
//! against the real `nixfleet cp serve` process (SPEC §5, §8; issue 4).

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nixfleet::cp::client;
use nixfleet::cp::store;
use nixfleet::wire::{ResultStatus, WireEventBody};
use time::macros::datetime;

use crate::harness::{assert_applied, closure, manifest, Agent, Cp, Release, TempDir};

const T0: &str = "2026-11-25T12:00:00Z";
const T1: &str = "2026-11-25T13:00:00Z";

fn two_waves(id: &str, issued_at: &str, max_failed: u32) -> String {
    manifest(
        id,
        issued_at,
        max_failed,
        &[("canary", 0, 1), ("rest", 0, 2)],
        &[("web-1", 0, "web-1-new"), ("web-2", 1, "web-2-new"), ("web-3", 1, "web-3-new"), ("web-4", 1, "web-4-new")],
    )
}

fn setup(label: &str) -> (TempDir, Release, Cp) {
    let dir = TempDir::new(label);
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    (dir, release, cp)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Publishing verifies the signature and the manifest, is idempotent for the
/// same bytes, and refuses other bytes under the same id with 409.
#[test]
fn publish_verifies_signatures_and_is_idempotent() {
    let (dir, release, cp) = setup("publish");
    let other = Release::new(dir.path(), "stranger");
    rt().block_on(async {
        let good = two_waves("stable@r1", T0, 0);
        let envelope = release.sign(&good);
        let resp = cp.publish(&envelope).await;
        assert_eq!(resp.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(cp.publish(&envelope).await.status, StatusCode::OK, "identical re-publish is a no-op");

        let conflicting = release.sign(&two_waves("stable@r1", T1, 0));
        let resp = cp.publish(&conflicting).await;
        assert_eq!(resp.status, StatusCode::CONFLICT);
        assert!(resp.error().to_string().contains("different manifest bytes"), "{}", resp.error());

        let unknown_key = other.sign(&two_waves("stable@r2", T1, 0));
        assert_eq!(cp.publish(&unknown_key).await.status, StatusCode::FORBIDDEN);

        let mut tampered: serde_json::Value =
            serde_json::from_slice(&release.sign(&two_waves("stable@r3", T1, 0))).unwrap();
        let evil = two_waves("stable@r3", T1, 5);
        tampered["payload"] = base64_encode(evil.as_bytes()).into();
        let resp = cp.publish(tampered.to_string().as_bytes()).await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN, "tampered payload");
        assert!(resp.error().to_string().contains("does not verify"), "{}", resp.error());

        let mut bad_sig: serde_json::Value =
            serde_json::from_slice(&release.sign(&two_waves("stable@r4", T1, 0))).unwrap();
        let sig = bad_sig["signatures"][0]["sig"].as_str().unwrap().to_owned();
        let flipped = match sig.strip_prefix('A') {
            Some(rest) => format!("B{rest}"),
            None => format!("A{}", &sig[1..]),
        };
        bad_sig["signatures"][0]["sig"] = flipped.into();
        assert_eq!(cp.publish(bad_sig.to_string().as_bytes()).await.status, StatusCode::FORBIDDEN, "bad signature");

        let invalid = release.sign(&good.replace("\"max_in_flight\":1", "\"max_in_flight\":0"));
        let resp = cp.publish(&invalid).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST);
        assert!(resp.error().to_string().contains("max_in_flight"), "{}", resp.error());

        assert_eq!(cp.publish(b"{not json").await.status, StatusCode::BAD_REQUEST);

        let rollouts = cp.get_json("/v1/rollouts").await;
        let ids: Vec<&str> = rollouts.as_array().unwrap().iter().map(|r| r["rollout_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["stable@r1"], "only the good manifest was stored");
        let stored = cp.get("/v1/rollouts/stable%40r1/manifest").await;
        assert_eq!(stored.body.as_ref(), envelope.as_slice(), "the envelope is served as published");
    });
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `cp publish` and `cp status` work against a running CP and print what
/// happened; a bad signature is an error exit naming the problem.
#[test]
fn publish_and_status_commands() {
    let (dir, release, cp) = setup("cli");
    let path = dir.path().join("r1.signed.json");
    std::fs::write(&path, release.sign(&two_waves("stable@r1", T0, 0))).unwrap();
    let url = format!("http://{}", cp.url.authority());
    let run = |args: &[&str]| std::process::Command::new(crate::harness::bin()).args(args).output().expect("run");
    let out = run(&["cp", "publish", "--cp", &url, path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "published stable@r1\n");
    let out = run(&["cp", "publish", "--cp", &url, path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already published"));

    let stranger = Release::new(dir.path(), "stranger");
    std::fs::write(&path, stranger.sign(&two_waves("stable@r2", T1, 0))).unwrap();
    let out = run(&["cp", "publish", "--cp", &url, path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no signature is from a trusted key"), "{out:?}");

    let out = run(&["cp", "status", "--cp", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stable@r1") && text.contains("active") && text.contains("Pending=4"), "{text}");
    let out = run(&["cp", "status", "--cp", &url, "--rollout", "stable@r1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dispatched, waiting for the agent") && text.contains("waiting for wave 0"), "{text}");
    let out = run(&["cp", "status", "--cp", &url, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(json["rollouts"][0]["state"], "active");
}

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

/// Waits until `n` long-polls are parked (the CP's `/metrics` gauge), so a
/// test publishes only after its polls really wait.
async fn wait_parked(cp: &Cp, n: usize) {
    let start = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&cp.get("/metrics").await.body).into_owned();
        let parked: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("nixfleet_cp_longpolls_parked "))
            .and_then(|v| v.parse().ok())
            .expect("parked gauge");
        if parked >= n {
            return;
        }
        assert!(start.elapsed() < crate::harness::DEADLINE, "long-polls never parked ({parked} of {n})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// Agents post continuously while the real `cp serve` is killed with -9 in
/// the middle of the traffic, five times: every event any agent saw
/// answered `applied` is in the event log after each restart (the CP's log
/// is compared with what the agents believe was acknowledged). Agents keep
/// an unconfirmed event and send it again first, like the real queue.
#[test]
fn acknowledged_events_survive_kill_9_under_load() {
    const N_HOSTS: usize = 8;
    const ROUNDS: usize = 5;
    const ACKS_PER_ROUND: usize = 150;
    type Confirmed = Vec<(String, u64)>;
    let (_dir, release, mut cp) = setup("kill9load");
    let names: Vec<String> = (0..N_HOSTS).map(|i| format!("load-{i}")).collect();
    let hosts: Vec<(&str, usize, &str)> = names.iter().map(|n| (n.as_str(), 0, n.as_str())).collect();
    let m = manifest("stable@load", T0, 0, &[("all", 0, N_HOSTS as u32)], &hosts);
    let rt = rt();
    let mut agents: Vec<(Agent, Option<nixfleet::wire::OutboundEvent>)> = rt.block_on(async {
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        let mut agents = Vec::new();
        for name in &names {
            let mut agent = Agent::new(name, &cp.url);
            let d = agent.poll(0).await.expect("dispatch");
            let ack = agent.ack_body(&d);
            let first = agent.emit("stable@load", ack);
            agents.push((agent, Some(first)));
        }
        agents
    });
    let mut confirmed: Confirmed = Vec::new();
    for round in 0..ROUNDS {
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        let runtime_context = rt.enter();
        for (mut agent, mut unconfirmed) in std::mem::take(&mut agents) {
            agent.url = cp.url.clone();
            let acked = std::sync::Arc::clone(&acked);
            tasks.spawn(async move {
                let mut mine: Confirmed = Vec::new();
                loop {
                    let event = match unconfirmed.take() {
                        Some(e) => e,
                        None => {
                            let n = agent.last_seq("stable@load") as i64;
                            agent.emit(
                                "stable@load",
                                WireEventBody::ActivationStarted {
                                    started_at: datetime!(2026-11-25 12:00 UTC) + time::Duration::seconds(n),
                                    switch_method: "switch".into(),
                                },
                            )
                        }
                    };
                    let sent = tokio::time::timeout(
                        Duration::from_secs(5),
                        agent.post_raw_checked(&[("stable@load", &event)]),
                    )
                    .await;
                    match sent {
                        Ok(Some(results))
                            if matches!(results[0].status, ResultStatus::Applied | ResultStatus::Duplicate) =>
                        {
                            if results[0].status == ResultStatus::Applied {
                                mine.push((agent.host.clone(), event.seq));
                            }
                            acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(Some(results)) => panic!("unexpected verdict {:?}", results[0]),
                        // The CP died under us: keep the event and send it again.
                        Ok(None) | Err(_) => {
                            unconfirmed = Some(event);
                            break;
                        }
                    }
                }
                (agent, unconfirmed, mine)
            });
        }
        drop(runtime_context);
        crate::harness::wait_for("acknowledgements before the kill", || {
            (acked.load(std::sync::atomic::Ordering::SeqCst) >= ACKS_PER_ROUND).then_some(())
        });
        cp.kill9();
        rt.block_on(async {
            while let Some(r) = tasks.join_next().await {
                let (agent, unconfirmed, mine) = r.unwrap();
                confirmed.extend(mine);
                agents.push((agent, unconfirmed));
            }
        });
        cp.restart();
        rt.block_on(async {
            let log = cp.get_json("/v1/rollouts/stable@load/events?limit=10000").await;
            let stored: std::collections::BTreeSet<(String, u64)> = log["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["hostname"].as_str().unwrap().to_owned(), e["seq"].as_u64().unwrap()))
                .collect();
            for (host, seq) in &confirmed {
                assert!(
                    stored.contains(&(host.clone(), *seq)),
                    "round {round}: {host} seq {seq} was acknowledged but is lost"
                );
            }
        });
    }
    assert!(confirmed.len() >= ROUNDS * ACKS_PER_ROUND / 2, "{}", confirmed.len());
}

/// Every event answered `applied` survives an immediate `kill -9` of the real
/// `nixfleet cp serve` (synchronous=FULL, answer after commit): after each
/// restart the event log and the host records hold all of them.
#[test]
fn applied_events_survive_kill_9() {
    let (_dir, release, mut cp) = setup("kill9");
    const N_HOSTS: usize = 6;
    let names: Vec<String> = (0..N_HOSTS).map(|i| format!("k-{i}")).collect();
    let hosts: Vec<(&str, usize, &str)> = names.iter().map(|n| (n.as_str(), 0, n.as_str())).collect();
    let m = manifest("stable@k", T0, 0, &[("all", 0, N_HOSTS as u32)], &hosts);
    let rt = rt();
    let mut agents: Vec<Agent> = Vec::new();
    rt.block_on(async {
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        for n in &names {
            agents.push(Agent::new(n, &cp.url));
        }
    });
    let mut n_applied = 0;
    for round in 0..4 {
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for mut agent in std::mem::take(&mut agents) {
                agent.url = cp.url.clone();
                tasks.spawn(async move {
                    let event = match agent.last_seq("stable@k") {
                        0 => {
                            let d = agent.poll(0).await.expect("dispatch");
                            let ack = agent.ack_body(&d);
                            agent.emit("stable@k", ack)
                        }
                        n => agent.emit(
                            "stable@k",
                            WireEventBody::ActivationStarted {
                                started_at: datetime!(2026-11-25 12:00 UTC) + time::Duration::seconds(n as i64),
                                switch_method: format!("switch-{n}"),
                            },
                        ),
                    };
                    let r = agent.post(&[("stable@k", &event)]).await;
                    assert_eq!(r[0].status, ResultStatus::Applied, "round {round}: {:?}", r[0].reason);
                    agent
                });
            }
            while let Some(a) = tasks.join_next().await {
                agents.push(a.unwrap());
            }
        });
        n_applied += N_HOSTS;
        cp.kill9();
        cp.restart();
        rt.block_on(async {
            let log = cp.get_json("/v1/rollouts/stable@k/events?limit=10000").await;
            assert_eq!(log["events"].as_array().unwrap().len(), n_applied, "round {round}: an applied event was lost");
        });
    }
    rt.block_on(async {
        for a in &agents {
            let detail = cp.get_json("/v1/rollouts/stable@k").await;
            let host = detail["waves"][0]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["hostname"] == a.host.as_str())
                .unwrap()
                .clone();
            assert_eq!(host["last_seq"], a.last_seq("stable@k"));
            assert_eq!(host["state"], "Activating");
        }
    });
}

/// After the database is deleted, re-publishing and the agents' heartbeats +
/// Replay-From rebuild exactly the host records the CP had before; events
/// sent before the re-publish are answered `retry`, not lost.
#[test]
fn database_loss_is_rebuilt_from_agents_by_replay() {
    let (_dir, release, mut cp) = setup("dbloss");
    let rt = rt();
    let r1 = two_waves("stable@r1", T0, 1);
    let envelope = release.sign(&r1);
    let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
    rt.block_on(async {
        cp.publish(&envelope).await;
        let d = agents[0].poll(0).await.unwrap();
        agents[0].activate(&d).await;
        agents[0].converge(&d).await;
        let d2 = agents[1].poll(0).await.unwrap();
        agents[1].fail_and_revert(&d2).await;
        let d3 = agents[2].poll(0).await.unwrap();
        agents[2].activate(&d3).await; // Soaking
    });
    let before = {
        let conn = store::open_reader(&cp.db).unwrap();
        store::cached_host_records(&conn, &cp.db).unwrap()
    };
    assert_eq!(before.len(), 4);
    let rebuilt = {
        let conn = store::open_reader(&cp.db).unwrap();
        store::rebuild_host_records(&conn, &cp.db).unwrap()
    };
    assert_eq!(rebuilt, before, "the event log alone rebuilds the cache");

    assert!(cp.terminate().success());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", cp.db.display()));
    }
    cp.restart();
    rt.block_on(async {
        for a in &mut agents {
            a.url = cp.url.clone();
        }
        let extra = agents[2].emit(
            "stable@r1",
            WireEventBody::ProbeTopologyDeclared { probes: vec![], declared_at: datetime!(2026-11-25 12:59 UTC) },
        );
        let _ = extra; // journaled, not yet delivered
        let r = agents[0].replay("stable@r1", 0).await;
        assert!(r.iter().all(|r| r.status == ResultStatus::Retry), "unknown rollout → retry: {r:?}");
        assert_eq!(cp.publish(&envelope).await.status, StatusCode::CREATED, "re-publish after loss");
        for a in &agents {
            let (hb, _) = a.heartbeat().await;
            let want = if a.last_seq("stable@r1") > 0 { Some(&0) } else { None };
            assert_eq!(hb.replay_from.get(&"stable@r1".parse().unwrap()), want, "{}", a.host);
            if let Some(from) = hb.replay_from.get(&"stable@r1".parse().unwrap()) {
                let results = a.replay("stable@r1", *from).await;
                assert!(results.iter().all(|r| r.status == ResultStatus::Applied), "{results:?}");
            }
            let (hb, header) = a.heartbeat().await;
            assert!(hb.replay_from.is_empty() && header.is_none(), "caught up");
        }
    });
    let after = {
        let conn = store::open_reader(&cp.db).unwrap();
        store::cached_host_records(&conn, &cp.db).unwrap()
    };
    for (key, record) in &after {
        if key.1.as_str() == "web-3" {
            assert_eq!(record.last_seq, before[key].last_seq + 1, "the undelivered event arrived too");
            assert_eq!(record.topology, Some(vec![]), "the undelivered topology event applied");
        } else {
            assert_eq!(record, &before[key], "{key:?}");
        }
    }
}

/// Heartbeats answer replay_from only where the CP is behind (with the header
/// when exactly one rollout needs it), never change host state, and record
/// liveness: a silent host turns unreachable after 3 intervals.
#[test]
fn heartbeat_replay_from_and_liveness() {
    let dir = TempDir::new("heartbeat");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--heartbeat-interval-secs", "1"]);
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

/// The rollout view shows every host state (Pending, Activating, Deferred
/// with its reboot note, Soaking, Converged, Failed, Reverted) with agent
/// timestamps, and the event view lists the log in order with paging.
#[test]
fn status_views_reflect_every_state() {
    let (_dir, release, cp) = setup("views");
    rt().block_on(async {
        let names = ["s-pending", "s-activating", "s-deferred", "s-soaking", "s-converged", "s-failed", "s-reverted"];
        let hosts: Vec<(&str, usize, &str)> = names.iter().map(|n| (*n, 0, *n)).collect();
        cp.publish(&release.sign(&manifest("views@r1", T0, 10, &[("all", 0, 6)], &hosts))).await;
        let mut a: Vec<Agent> = names.iter().map(|n| Agent::new(n, &cp.url)).collect();
        let mut ds = Vec::new();
        for agent in &a {
            ds.push(agent.poll(0).await);
        }
        let idle: Vec<usize> = (0..7).filter(|i| ds[*i].is_none()).collect();
        assert_eq!(idle.len(), 1, "max_in_flight 6 of 7");
        // Hosts are dispatched in hostname order, so s-soaking is left out.
        assert_eq!(names[idle[0]], "s-soaking");
        let d = |i: usize| ds[i].clone().unwrap();
        let ack = a[1].ack_body(&d(1));
        assert_applied(&a[1].send("views@r1", ack).await);
        let ack = a[2].ack_body(&d(2));
        assert_applied(&a[2].send("views@r1", ack).await);
        assert_applied(
            &a[2]
                .send(
                    "views@r1",
                    WireEventBody::ActivationDeferred {
                        component: "kernel".into(),
                        deferred_at: datetime!(2026-11-25 12:05 UTC),
                    },
                )
                .await,
        );
        let dc = d(4);
        a[4].activate(&dc).await;
        a[4].converge(&dc).await;
        assert_applied(
            &a[5]
                .send(
                    "views@r1",
                    WireEventBody::DispatchRejected {
                        target_closure: d(5).target_closure,
                        code: nixfleet::machine::RejectCode::Refused,
                        reason: "target mismatch".into(),
                        rejected_at: datetime!(2026-11-25 12:06 UTC),
                    },
                )
                .await,
        );
        let dr = d(6);
        a[6].fail_and_revert(&dr).await;
        // s-converged freed a slot: now s-soaking gets its dispatch.
        let ds3 = a[3].poll(0).await.expect("freed slot");
        a[3].activate(&ds3).await;
        // s-pending got a dispatch but never acked it: still Pending.
        let detail = cp.get_json("/v1/rollouts/views@r1").await;
        let by_name = |n: &str| {
            detail["waves"][0]["hosts"].as_array().unwrap().iter().find(|h| h["hostname"] == n).unwrap().clone()
        };
        let want = [
            ("s-pending", "Pending"),
            ("s-activating", "Activating"),
            ("s-deferred", "Deferred"),
            ("s-soaking", "Soaking"),
            ("s-converged", "Converged"),
            ("s-failed", "Failed"),
            ("s-reverted", "Reverted"),
        ];
        for (name, state) in want {
            assert_eq!(by_name(name)["state"], state, "{name}: {detail:#}");
        }
        assert!(by_name("s-deferred")["note"].as_str().unwrap().contains("reboot"));
        assert!(by_name("s-pending")["note"].as_str().unwrap().contains("dispatched"));
        assert_eq!(by_name("s-converged")["converged_at"], "2026-11-25T12:00:08Z", "agent time, not CP time");
        assert_eq!(detail["state"], "converging", "all dispatched; s-failed and s-reverted within the budget");

        let page = cp.get_json("/v1/rollouts/views@r1/events?limit=3").await;
        assert_eq!(page["events"].as_array().unwrap().len(), 3);
        let next = page["next_after"].as_i64().unwrap();
        let rest = cp.get_json(&format!("/v1/rollouts/views@r1/events?after={next}&limit=1000")).await;
        let ids: Vec<i64> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .chain(rest["events"].as_array().unwrap())
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
        assert!(rest["next_after"].is_null());
        assert_eq!(cp.get("/v1/rollouts/views@nope").await.status, StatusCode::NOT_FOUND);
    });
}

/// Malformed input is refused with a JSON error naming the problem, and
/// nothing is stored: bad JSON, wrong types, unknown enum values, oversized
/// bodies, missing or wrong protocol header, bad hostnames and rollout ids.
#[test]
fn bad_input_is_refused_with_json_errors_and_not_stored() {
    let (_dir, release, cp) = setup("badinput");
    rt().block_on(async {
        cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await;
        let event = serde_json::json!({"seq": 1, "kind": "DispatchRejected", "target_closure": closure("web-1-new"),
            "reason": "x", "rejected_at": "2026-11-25T12:00:00Z"});
        let batch = |host: &str, event: &serde_json::Value| {
            serde_json::json!({"hostname": host, "events": [{"rollout_id": "stable@r1", "event": event}]})
                .to_string()
                .into_bytes()
        };
        let mut unknown_kind = event.clone();
        unknown_kind["kind"] = "Exploded".into();
        let unknown_mode = serde_json::json!({"seq": 1, "kind": "ProbeResult", "probe_name": "p", "mode": "sometimes",
            "status": "pass", "observed_at": "2026-11-25T12:00:00Z"});
        let too_many = serde_json::json!({"hostname": "web-1",
            "events": vec![serde_json::json!({"rollout_id": "stable@r1", "event": event}); 257]})
        .to_string()
        .into_bytes();
        let no_header = [("X-Nixfleet-Protocol", "")];
        let v2 = [("X-Nixfleet-Protocol", "2")];
        let events = "/v1/agent/events";
        let heartbeat = "/v1/agent/heartbeat";
        type Case<'a> = (&'a str, &'a str, Vec<u8>, &'a [(&'a str, &'a str)], StatusCode, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("malformed JSON", events, b"{\"hostname\": ".to_vec(), &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            (
                "wrong type",
                events,
                br#"{"hostname": 7, "events": []}"#.to_vec(),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            (
                "unknown event kind",
                events,
                batch("web-1", &unknown_kind),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            (
                "unknown probe mode",
                events,
                batch("web-1", &unknown_mode),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_event_batch",
            ),
            ("bad hostname", events, batch("Web_1", &event), &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            ("too many events", events, too_many, &[], StatusCode::BAD_REQUEST, "bad_event_batch"),
            (
                "missing protocol header",
                events,
                batch("web-1", &event),
                &no_header,
                StatusCode::BAD_REQUEST,
                "missing_protocol_header",
            ),
            (
                "wrong protocol version",
                events,
                batch("web-1", &event),
                &v2,
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_protocol",
            ),
            (
                "body over 1 MiB",
                events,
                vec![b' '; nixfleet::wire::MAX_BODY_BYTES + 1],
                &[],
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
            ),
            (
                "heartbeat with a bad closure",
                heartbeat,
                br#"{"hostname":"web-1","current_closure":"/tmp/x","uptime_secs":1,"agent_version":"t"}"#.to_vec(),
                &[],
                StatusCode::BAD_REQUEST,
                "bad_heartbeat",
            ),
            (
                "heartbeat without header",
                heartbeat,
                b"{}".to_vec(),
                &no_header,
                StatusCode::BAD_REQUEST,
                "missing_protocol_header",
            ),
        ];
        for (name, path, body, headers, status, code) in cases {
            let resp = client::request(&cp.url, Method::POST, path, headers, Some(body)).await.expect(name);
            let text = String::from_utf8_lossy(&resp.body).into_owned();
            assert_eq!(resp.status, status, "{name}: {text}");
            let json: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
            assert_eq!(json["error"], code, "{name}");
            assert!(!json["message"].as_str().unwrap_or("").is_empty(), "{name}");
        }
        for (path, code) in [
            ("/v1/agent/dispatch?hostname=Web_1&wait=0", "bad_hostname"),
            ("/v1/agent/dispatch?wait=0", "missing_hostname"),
            ("/v1/agent/dispatch?hostname=web-1&wait=soon", "bad_wait"),
            ("/v1/rollouts/no-at-sign", "bad_rollout_id"),
        ] {
            let resp = cp.get(path).await;
            assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&resp.body).unwrap()["error"], code, "{path}");
        }
        let log = cp.get_json("/v1/rollouts/stable@r1/events").await;
        assert!(log["events"].as_array().unwrap().is_empty(), "nothing stored: {log:#}");
        let hosts = cp.get_json("/v1/hosts").await;
        assert!(hosts.as_array().unwrap().iter().all(|h| h["last_heartbeat_at"].is_null()), "{hosts:#}");
        assert_eq!(cp.host_state("stable@r1", "web-1").await, "Pending");
    });
}

/// SIGTERM wakes parked long-polls with 204, lets the process exit 0 and
/// logs a graceful stop; the database reopens cleanly.
#[test]
fn sigterm_wakes_longpolls_and_exits_gracefully() {
    let (_dir, _release, mut cp) = setup("sigterm");
    let rt = rt();
    #[allow(clippy::async_yields_async)] // the spawned poll is awaited after the SIGTERM
    let parked = rt.block_on(async {
        let agent = Agent::new("web-9", &cp.url);
        let task = tokio::spawn(async move {
            let start = Instant::now();
            (agent.poll(60).await, start)
        });
        wait_parked(&cp, 1).await;
        task
    });
    let status = cp.terminate();
    assert!(status.success(), "{status}");
    let (answer, start) = rt.block_on(parked).unwrap();
    assert!(answer.is_none() && start.elapsed() < Duration::from_secs(20), "woken with 204");
    let log = cp.log_text();
    assert!(log.contains("control plane stopped (graceful"), "{log}");
    cp.restart();
}

/// A transport that authenticates every connection as one host: stands in
/// for mTLS (the certificate's hostname) through the acceptor seam.
#[derive(Debug, Clone)]
struct AuthenticatedAs(nixfleet::ids::Hostname);

impl nixfleet::cp::Acceptor for AuthenticatedAs {
    type Io = tokio::net::TcpStream;
    async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<(tokio::net::TcpStream, nixfleet::cp::routes::PeerIdentity)> {
        Ok((tcp, nixfleet::cp::routes::PeerIdentity(Some(self.0.clone()))))
    }
}

/// With an authenticated transport an agent may only speak for its own host
/// (403 otherwise, nothing stored), and liveness follows the injected clock:
/// silent for more than 3 heartbeat intervals is unreachable.
#[test]
fn identity_is_enforced_and_liveness_follows_the_clock() {
    let dir = TempDir::new("identity");
    let release = Release::new(dir.path(), "release");
    let rt = rt();
    rt.block_on(async {
        let listener = nixfleet::cp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = client::CpUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let clock = nixfleet::clock::ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let cfg = nixfleet::cp::ServeConfig {
            db_path: dir.path().join("cp.db"),
            trust_keys: vec![nixfleet::sign::PublicKey::load(&release.pub_path).unwrap()],
            heartbeat_interval_secs: 60,
            grace: Duration::from_secs(5),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(nixfleet::cp::serve(
            listener,
            AuthenticatedAs("web-1".parse().unwrap()),
            cfg,
            clock.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        let publish =
            client::request(&url, Method::POST, "/v1/rollouts", &[], Some(release.sign(&two_waves("stable@r1", T0, 0))))
                .await
                .unwrap();
        assert_eq!(publish.status, StatusCode::CREATED);

        let mut me = Agent::new("web-1", &url);
        let mut impostor = Agent::new("web-2", &url);
        let d = me.poll(0).await.expect("own dispatch");
        let ack = impostor.ack_body(&d);
        let event = impostor.emit("stable@r1", ack);
        let resp = impostor.post_raw(&[("stable@r1", &event)]).await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN);
        assert!(resp.error().to_string().contains("authenticated as web-1"), "{}", resp.error());
        let resp =
            client::request(&url, Method::GET, "/v1/agent/dispatch?hostname=web-2&wait=0", &[], None).await.unwrap();
        assert_eq!(resp.status, StatusCode::FORBIDDEN);
        let hb = serde_json::json!({"hostname": "web-2", "current_closure": closure("x"), "uptime_secs": 1, "agent_version": "t"});
        let resp = client::request(&url, Method::POST, "/v1/agent/heartbeat", &[], Some(hb.to_string().into_bytes()))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::FORBIDDEN);

        me.activate(&d).await;
        me.heartbeat().await;
        let liveness = |hosts: serde_json::Value| {
            hosts.as_array().unwrap().iter().find(|h| h["hostname"] == "web-1").unwrap()["liveness"].clone()
        };
        let get = |path: &'static str| {
            let url = url.clone();
            async move {
                let r = client::request(&url, Method::GET, path, &[], None).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
            }
        };
        assert_eq!(liveness(get("/v1/hosts").await), "reachable");
        clock.advance(time::Duration::seconds(180));
        assert_eq!(liveness(get("/v1/hosts").await), "reachable", "exactly 3 intervals is not yet silent");
        clock.advance(time::Duration::seconds(1));
        assert_eq!(liveness(get("/v1/hosts").await), "unreachable");
        assert_eq!(get("/v1/status").await["n_unreachable"], 1);
        let log = get("/v1/rollouts/stable@r1/events").await;
        let hosts: Vec<&str> = log["events"].as_array().unwrap().iter().map(|e| e["hostname"].as_str().unwrap()).collect();
        assert_eq!(hosts, ["web-1", "web-1"], "the impostor's event was not stored");

        stop_tx.send(()).unwrap();
        let report = server.await.unwrap().unwrap();
        assert!(report.graceful);
        assert!(report.writer.n_events_applied >= 2);
    });
}

/// `cp status` renders a halted rollout for a person: the halt reason, the
/// quarantined closure, every host's state and why waiting hosts wait.
#[test]
fn status_command_renders_a_halted_rollout() {
    let (_dir, release, cp) = setup("render");
    let rt = rt();
    rt.block_on(async {
        cp.publish(&release.sign(&two_waves("stable@2026-11-25.1", T0, 0))).await;
        let id = "stable@2026-11-25.1";
        let mut a: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
        let d1 = a[0].poll(0).await.unwrap();
        a[0].activate(&d1).await;
        a[0].converge(&d1).await;
        a[0].heartbeat().await;
        let d2 = a[1].poll(0).await.unwrap();
        a[1].activate(&d2).await;
        a[1].heartbeat().await;
        let d3 = a[2].poll(0).await.unwrap();
        a[2].fail_and_revert(&d3).await;
        a[2].heartbeat().await;
        assert_eq!(cp.get_json(&format!("/v1/rollouts/{id}")).await["state"], "halted");
    });
    let url = format!("http://{}", cp.url.authority());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::harness::bin()).args(args).output().expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let fleet = run(&["cp", "status", "--cp", &url]);
    println!("$ nixfleet cp status\n{fleet}");
    assert!(fleet.contains("halted: 1 host(s) failed (web-3)"), "{fleet}");
    assert!(fleet.contains(&closure("web-3-new")), "{fleet}");
    let rollout = run(&["cp", "status", "--cp", &url, "--rollout", "stable@2026-11-25.1"]);
    println!("$ nixfleet cp status --rollout stable@2026-11-25.1\n{rollout}");
    for want in ["web-1", "Converged", "web-2", "Soaking", "web-3", "Reverted", "web-4", "rollout halted"] {
        assert!(rollout.contains(want), "{want} in {rollout}");
    }
    let hosts = run(&["cp", "status", "--cp", &url, "--hosts"]);
    println!("$ nixfleet cp status --hosts\n{hosts}");
    assert!(hosts.contains("reachable") && hosts.contains("never seen"), "{hosts}");
}
