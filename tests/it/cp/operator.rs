//! Operator actions through the real `nixfleet cp …` commands against the
//! real `cp serve` (`docs/protocol.md` §4, operator actions): resume after
//! a halt, cancel mid-rollout, unquarantine then republish, the dry run,
//! a backup of a live database replayed, `status --watch`.

use std::process::{Command, Output, Stdio};

use super::*;
use crate::harness::{bin, request};

const T2: &str = "2026-11-25T14:00:00Z";

fn url(cp: &Cp) -> String {
    format!("http://{}", cp.url.authority())
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run nixfleet")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A failed command: its exit code and stderr.
fn fails(args: &[&str]) -> (Option<i32>, String) {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Canary web-1 fails and reverts: with max_failed_hosts 0 the rollout halts.
async fn halt_at_the_canary(cp: &Cp, release: &Release, id: &str, issued_at: &str) -> Vec<Agent> {
    assert_eq!(cp.publish(&release.sign(&two_waves(id, issued_at, 0))).await.status, StatusCode::CREATED);
    let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
    let d = agents[0].poll(0).await.expect("canary dispatch");
    agents[0].fail_and_revert(&d).await;
    assert_eq!(cp.get_json(&format!("/v1/rollouts/{id}")).await["state"], "halted");
    agents
}

/// A halt, a fix outside the manifest (the canary's failure was its
/// environment, not the closures of the rest), then `cp resume`: the next
/// wave is dispatched, the accepted failure no longer counts, the rest
/// converge, and the outcome says what happened. The action is in the log
/// with who and why, and `replay` agrees with the stored state.
#[test]
fn a_halt_then_resume_dispatches_the_next_wave() {
    let (dir, release, cp) = setup("op-resume");
    let rt = rt();
    let mut agents = rt.block_on(halt_at_the_canary(&cp, &release, "stable@r1", T0));
    rt.block_on(async {
        assert!(agents[1].poll(0).await.is_none(), "halted: nothing dispatched");
    });
    let out = ok(&["cp", "resume", "--cp", &url(&cp), "stable@r1", "--reason", "INC-42: probe target was down"]);
    assert!(out.contains("resumed stable@r1") && out.contains("1 failed host(s) accepted"), "{out}");
    rt.block_on(async {
        for agent in &mut agents[1..3] {
            let d = agent.poll(0).await.expect("wave 1 dispatched after the resume");
            assert_eq!(d.wave, 1);
            agent.activate(&d).await;
            agent.converge(&d).await;
        }
        let d = agents[3].poll(0).await.expect("the last host");
        agents[3].activate(&d).await;
        agents[3].converge(&d).await;
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "completed", "{detail:#}");
        let action = &detail["operator_actions"][0];
        assert_eq!(action["action"], "resume");
        assert_eq!(action["operator"], "unauthenticated (plaintext)");
        assert_eq!(action["reason"], "INC-42: probe target was down");
        assert_eq!(action["detail"]["accepted_failures"], serde_json::json!(["web-1"]));
    });
    let text = ok(&["cp", "status", "--cp", &url(&cp), "--rollout", "stable@r1"]);
    assert!(text.contains("completed: 3 converged, 1 reverted"), "{text}");
    assert!(text.contains("resume by unauthenticated (plaintext): INC-42"), "{text}");
    // A second resume has no halt to clear: refused, naming the state.
    let (code, err) = fails(&["cp", "resume", "--cp", &url(&cp), "stable@r1", "--reason", "again"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("409") && err.contains("is completed, not halted"), "{err}");
    // The CP restarts from the database with the same state; replay agrees.
    drop(cp);
    let db = dir.path().join("cp.db");
    let replay = ok(&["replay", "--db", db.to_str().unwrap(), "--quiet"]);
    assert!(replay.contains("rollout state: completed (agrees: 1 failed, 1 accepted by a resume"), "{replay}");
    // Replay proves the rollout state from the log and the actions: a
    // copy whose stored state says halted disagrees (the one failure was
    // accepted), and so does one whose resume is gone (the failure then
    // calls for a halt).
    for (label, tamper) in [
        ("halted", "UPDATE rollouts SET state = 'halted'"),
        ("no-resume", "DELETE FROM operator_actions; UPDATE rollouts SET state = 'active'"),
    ] {
        let copy = dir.path().join(format!("tampered-{label}.db"));
        ok(&["cp", "backup", "--db", db.to_str().unwrap(), copy.to_str().unwrap()]);
        rusqlite::Connection::open(&copy).unwrap().execute_batch(tamper).unwrap();
        let out = run(&["replay", "--db", copy.to_str().unwrap(), "--quiet"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{label}: {text}");
        assert!(text.contains("rollout state:") && text.contains("DISAGREES"), "{label}: {text}");
    }
}

/// `cp cancel` mid-rollout: the standing dispatch is withdrawn and nothing
/// new is dispatched; the host already in flight finishes and its events
/// are applied; the rollout stays cancelled and says what happened.
#[test]
fn cancel_mid_rollout_stops_new_dispatches_and_in_flight_hosts_finish() {
    let (_dir, release, cp) = setup("op-cancel");
    let rt = rt();
    let (mut agents, d2) = rt.block_on(async {
        assert_eq!(cp.publish(&release.sign(&two_waves("stable@r1", T0, 0))).await.status, StatusCode::CREATED);
        let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
        let d = agents[0].poll(0).await.expect("canary");
        agents[0].activate(&d).await;
        agents[0].converge(&d).await;
        // Wave 1, max_in_flight 2: web-2 and web-3 offered; web-2 starts.
        let d2 = agents[1].poll(0).await.expect("web-2");
        assert!(agents[2].poll(0).await.is_some(), "web-3 offered");
        agents[1].activate(&d2).await;
        (agents, d2)
    });
    let out = ok(&["cp", "cancel", "--cp", &url(&cp), "stable@r1", "--reason", "wrong release"]);
    assert!(out.contains("cancelled stable@r1") && out.contains("1 host(s) in flight finish"), "{out}");
    assert!(out.contains("1 standing dispatch(es) withdrawn"), "{out}");
    rt.block_on(async {
        assert!(agents[2].poll(0).await.is_none(), "web-3's standing dispatch was withdrawn");
        assert!(agents[3].poll(0).await.is_none(), "nothing new");
        agents[1].converge(&d2).await;
        let detail = cp.get_json("/v1/rollouts/stable@r1").await;
        assert_eq!(detail["state"], "cancelled", "{detail:#}");
        assert_eq!(detail["waves"][1]["hosts"][0]["state"], "Converged", "in flight finished");
        assert_eq!(detail["waves"][1]["hosts"][1]["note"], "rollout cancelled");
        let actions = cp.get_json("/v1/actions?rollout=stable@r1").await;
        assert_eq!(actions[0]["action"], "cancel");
        assert_eq!(actions[0]["detail"]["state_before"], "active");
    });
    let text = ok(&["cp", "status", "--cp", &url(&cp)]);
    assert!(text.contains("cancelled: 2 converged, 2 never dispatched"), "{text}");
    let (_, err) = fails(&["cp", "cancel", "--cp", &url(&cp), "stable@r1", "--reason", "twice"]);
    assert!(err.contains("already cancelled"), "{err}");
    let (_, err) = fails(&["cp", "cancel", "--cp", &url(&cp), "stable@nope", "--reason", "typo"]);
    assert!(err.contains("404") && err.contains("no rollout stable@nope"), "{err}");
}

/// A quarantined closure skips its host in a newer rollout; after
/// `cp unquarantine` a republish dispatches it again. A second
/// unquarantine finds nothing to remove.
#[test]
fn unquarantine_then_a_republish_dispatches_again() {
    let (_dir, release, cp) = setup("op-unq");
    let rt = rt();
    let bad = closure("web-1-new");
    rt.block_on(async {
        let agents = halt_at_the_canary(&cp, &release, "stable@r1", T0).await;
        let status = cp.get_json("/v1/status").await;
        assert_eq!(status["quarantined"][0]["closure"], bad.as_str());
        cp.publish(&release.sign(&two_waves("stable@r2", T1, 0))).await;
        let web1 = cp.host_row("stable@r2", "web-1").await;
        assert!(web1["skipped"].is_object(), "quarantined: skipped in r2: {web1:#}");
        assert!(agents[0].poll(0).await.is_none());
    });
    let out = ok(&[
        "cp",
        "unquarantine",
        "--cp",
        &url(&cp),
        "--channel",
        "stable",
        &bad,
        "--reason",
        "flaky probe, not the closure",
    ]);
    assert!(out.contains("unquarantined") && out.contains("reverted by web-1"), "{out}");
    rt.block_on(async {
        assert!(cp.get_json("/v1/status").await["quarantined"].as_array().unwrap().is_empty());
        cp.publish(&release.sign(&two_waves("stable@r3", T2, 0))).await;
        let d = Agent::new("web-1", &cp.url).poll(0).await.expect("dispatched again after unquarantine");
        assert_eq!((d.rollout_id.as_str(), d.target_closure.as_str()), ("stable@r3", bad.as_str()));
        let actions = cp.get_json("/v1/actions").await;
        assert_eq!(actions[0]["action"], "unquarantine");
        assert_eq!(actions[0]["detail"]["quarantined_in"], "stable@r1");
    });
    let (_, err) = fails(&["cp", "unquarantine", "--cp", &url(&cp), "--channel", "stable", &bad, "--reason", "again"]);
    assert!(err.contains("is not quarantined on channel stable"), "{err}");
}

/// `cp plan` against a fleet with a quarantined closure, a busy host, a
/// drifting host, one already running its target and one never seen:
/// each lands where the planner would put it, and nothing changes.
#[test]
fn plan_shows_quarantined_busy_drifting_and_unreachable_hosts_and_changes_nothing() {
    let (dir, release, cp) = setup("op-plan");
    let rt = rt();
    // web-7 waits in other@r1's second wave (never reached while web-5
    // soaks): the CP knows it, so its heartbeat is stored, and it is live
    // nowhere.
    let other = manifest(
        "other@r1",
        T0,
        0,
        &[("all", 0, 2), ("later", 0, 1)],
        &[("web-5", 0, "web-5-new"), ("web-6", 0, "web-6-new"), ("web-7", 1, "web-7-other")],
    );
    rt.block_on(async {
        let agents = halt_at_the_canary(&cp, &release, "stable@r1", T0).await;
        agents[0].heartbeat().await;
        cp.publish(&release.sign(&other)).await;
        let mut web5 = Agent::new("web-5", &cp.url);
        let d5 = web5.poll(0).await.expect("web-5");
        web5.activate(&d5).await; // Soaking: live in other@r1
        web5.heartbeat().await;
        let mut web6 = Agent::new("web-6", &cp.url);
        let d6 = web6.poll(0).await.expect("web-6");
        web6.activate(&d6).await;
        web6.converge(&d6).await;
        web6.current = closure("web-6-hand-edited");
        web6.heartbeat().await; // drifting
        let mut web7 = Agent::new("web-7", &cp.url);
        web7.current = closure("web-7-new");
        web7.heartbeat().await; // already runs the plan's target
    });
    let plan = manifest(
        "stable@r2",
        T1,
        0,
        &[("canary", 0, 1), ("rest", 0, 5)],
        &[
            ("web-1", 0, "web-1-new"),
            ("web-5", 0, "web-5-next"),
            ("web-6", 1, "web-6-next"),
            ("web-7", 1, "web-7-new"),
            ("web-8", 1, "web-8-new"),
        ],
    );
    let path = dir.path().join("r2.signed.json");
    std::fs::write(&path, release.sign(&plan)).unwrap();
    let before = rt.block_on(cp.get_json("/v1/status"));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["cp", "plan", "--cp", &url(&cp), path.to_str().unwrap(), "--json"])).expect("json");
    crate::openapi::check_schema("cp plan --json", "PlanPreview", &json);
    assert_eq!(json["would_open"], "active");
    assert_eq!(json["would_supersede"], serde_json::json!(["stable@r1"]));
    let host = |wave: usize, i: usize| json["waves"][wave]["hosts"][i].clone();
    let brief = |h: serde_json::Value| {
        (
            h["hostname"].as_str().unwrap().to_owned(),
            h["plan"].as_str().unwrap().to_owned(),
            h["unreachable"] == true,
            h["drifting"] == true,
        )
    };
    let s = |t: &str| t.to_owned();
    assert_eq!(brief(host(0, 0)), (s("web-1"), s("quarantined"), false, false));
    assert_eq!(brief(host(0, 1)), (s("web-5"), s("busy"), false, false));
    assert_eq!(host(0, 1)["busy_in"], "other@r1");
    assert_eq!(brief(host(1, 0)), (s("web-6"), s("dispatch"), false, true));
    assert_eq!(brief(host(1, 1)), (s("web-7"), s("already_running"), false, false));
    assert_eq!(brief(host(1, 2)), (s("web-8"), s("dispatch"), true, false));
    let table = ok(&["cp", "plan", "--cp", &url(&cp), path.to_str().unwrap()]);
    println!("$ nixfleet cp plan r2.signed.json\n{table}");
    for want in [
        "dry run of stable@r2 (nothing was changed): would open active, superseding stable@r1",
        "wave 0 \"canary\" (max_in_flight 1): 0 to dispatch, 0 already running the target, 1 quarantined, 1 busy",
        "hold: busy in other@r1",
        "DRIFTING",
        "UNREACHABLE",
        "dispatch (already runs the target)",
    ] {
        assert!(table.contains(want), "{want:?} in\n{table}");
    }
    let after = rt.block_on(cp.get_json("/v1/status"));
    assert_eq!(before["rollouts"], after["rollouts"], "a dry run changes nothing");
    // An envelope the CP would not publish is refused by the dry run too.
    let stranger = Release::new(dir.path(), "stranger");
    std::fs::write(&path, stranger.sign(&plan)).unwrap();
    let (_, err) = fails(&["cp", "plan", "--cp", &url(&cp), path.to_str().unwrap()]);
    assert!(err.contains("403") && err.contains("no signature is from a trusted key"), "{err}");
}

/// `cp backup` while agents post events: the copy is a consistent
/// snapshot, so `replay` of the copy agrees with its cached records; an
/// existing file is never overwritten.
#[test]
fn backup_during_ingest_then_replay_of_the_copy_agrees() {
    const N_HOSTS: usize = 60;
    let (dir, release, cp) = setup("op-backup");
    let names: Vec<String> = (0..N_HOSTS).map(|i| format!("b-{i}")).collect();
    let hosts: Vec<(&str, usize, &str)> = names.iter().map(|n| (n.as_str(), 0, n.as_str())).collect();
    let m = manifest("stable@b1", T0, N_HOSTS as u32, &[("all", 0, N_HOSTS as u32)], &hosts);
    let rt = rt();
    rt.block_on(async { assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED) });
    let ingest = {
        let _guard = rt.enter();
        let url = cp.url.clone();
        let names = names.clone();
        tokio::spawn(async move {
            for name in &names {
                let mut agent = Agent::new(name, &url);
                let d = agent.poll(0).await.expect("dispatch");
                agent.activate(&d).await;
                agent.converge(&d).await;
            }
        })
    };
    let db = cp.db.display().to_string();
    let copies: Vec<std::path::PathBuf> = (0..3).map(|i| dir.path().join(format!("copy-{i}.db"))).collect();
    let mut n_copied = Vec::new();
    for copy in &copies {
        let out = ok(&["cp", "backup", "--db", &db, copy.to_str().unwrap()]);
        let n: usize =
            out.split(" rollouts, ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).expect(&out);
        n_copied.push(n);
    }
    rt.block_on(ingest).expect("ingest task");
    println!("events in the copies: {n_copied:?} of {}", N_HOSTS * 4);
    assert!(n_copied[0] < N_HOSTS * 4, "the first copy was taken during ingest: {n_copied:?}");
    for copy in &copies {
        let replay = ok(&["replay", "--db", copy.to_str().unwrap(), "--quiet"]);
        assert!(replay.contains("; 0 disagreements"), "{replay}");
    }
    let last = dir.path().join("final.db");
    ok(&["cp", "backup", "--db", &db, last.to_str().unwrap()]);
    let replay = ok(&["replay", "--db", last.to_str().unwrap(), "--quiet"]);
    assert!(
        replay.contains(&format!("{} events of {N_HOSTS} hosts replayed; 0 disagreements", N_HOSTS * 4)),
        "{replay}"
    );
    let size = std::fs::metadata(&copies[0]).unwrap().len();
    let (code, err) = fails(&["cp", "backup", "--db", &db, copies[0].to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists") && err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::metadata(&copies[0]).unwrap().len(), size, "the existing copy is untouched");
}

/// Every action needs a reason: without `--reason` clap refuses (exit 2,
/// naming the flag); a blank one is refused before anything is sent; the
/// API refuses a body without one.
#[test]
fn an_action_without_a_reason_is_refused() {
    let (_dir, release, cp) = setup("op-reason");
    let rt = rt();
    rt.block_on(halt_at_the_canary(&cp, &release, "stable@r1", T0));
    let (code, err) = fails(&["cp", "resume", "--cp", &url(&cp), "stable@r1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--reason"), "{err}");
    let (code, err) = fails(&["cp", "cancel", "--cp", &url(&cp), "stable@r1", "--reason", "  "]);
    assert_eq!(code, Some(1));
    assert!(err.contains("needs a reason"), "{err}");
    rt.block_on(async {
        let resp = request(&cp.url, Method::POST, "/v1/rollouts/stable@r1/resume", &[], Some(b"{}".to_vec()))
            .await
            .expect("request");
        assert_eq!(resp.status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&resp.body).contains("missing field `reason`"));
        assert_eq!(cp.get_json("/v1/rollouts/stable@r1").await["state"], "halted", "nothing changed");
        assert!(cp.get_json("/v1/actions").await.as_array().unwrap().is_empty());
    });
}

/// The operator actions and the dry run through the API, each 200 body
/// checked against docs/openapi.yaml by `harness::request`: the plan of a
/// newer release, unquarantine of the canary's closure, resume of the
/// halt, then cancel.
#[test]
fn each_action_and_the_dry_run_answer_as_the_document_says() {
    let (_dir, release, cp) = setup("op-api");
    rt().block_on(async {
        halt_at_the_canary(&cp, &release, "stable@r1", T0).await;
        let post = |path: &'static str, body: Vec<u8>| {
            let url = cp.url.clone();
            async move {
                let resp = request(&url, Method::POST, path, &[], Some(body)).await.expect(path);
                assert_eq!(resp.status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&resp.body));
                serde_json::from_slice::<serde_json::Value>(&resp.body).expect("JSON")
            }
        };
        let plan = post("/v1/plan", release.sign(&two_waves("stable@r2", T1, 0))).await;
        assert_eq!(plan["would_supersede"], serde_json::json!(["stable@r1"]), "{plan:#}");
        assert_eq!(plan["waves"][0]["hosts"][0]["plan"], "quarantined", "{plan:#}");
        let body = serde_json::json!({"closure": closure("web-1-new"), "reason": "flaky probe"});
        let unq = post("/v1/channels/stable/unquarantine", body.to_string().into_bytes()).await;
        println!("unquarantine: {unq:#}");
        let resumed = post("/v1/rollouts/stable@r1/resume", br#"{"reason": "INC-42"}"#.to_vec()).await;
        println!("resume: {resumed:#}");
        let cancelled = post("/v1/rollouts/stable@r1/cancel", br#"{"reason": "wrong release"}"#.to_vec()).await;
        println!("cancel: {cancelled:#}");
        assert_eq!(cp.get_json("/v1/rollouts/stable@r1").await["state"], "cancelled");
        let actions = cp.get_json("/v1/actions").await;
        let kinds: Vec<&str> =
            actions.as_array().expect("actions").iter().filter_map(|a| a["action"].as_str()).collect();
        assert_eq!(kinds.len(), 3, "{actions:#}");
        for kind in ["unquarantine", "resume", "cancel"] {
            assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
        }
    });
}

/// `cp status --watch`, piped: one table per change until the rollout
/// ends; one wave numbering in the table and its notes; a rollout whose
/// every host reverted says so instead of a bare "completed".
#[test]
fn status_watch_prints_each_change_until_the_rollout_ends() {
    let (_dir, release, cp) = setup("op-watch");
    let rt = rt();
    // max_failed_hosts 4: every host may revert without a halt.
    rt.block_on(async { cp.publish(&release.sign(&two_waves("stable@r1", T0, 4))).await });
    let watch = Command::new(bin())
        .args(["cp", "status", "--cp", &url(&cp), "--rollout", "stable@r1", "--watch", "--interval", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
        for agent in &mut agents {
            let d = agent.poll(5).await.expect("dispatch");
            agent.fail_and_revert(&d).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let out = watch.wait_with_output().expect("watch ends by itself");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let frames: Vec<&str> = text.split("--- ").filter(|f| !f.trim().is_empty()).collect();
    println!("{} frames; first:\n{}\nlast:\n{}", frames.len(), frames[0], frames[frames.len() - 1]);
    assert!(frames.len() >= 3, "one table per change: {text}");
    assert!(!text.contains('\x1b'), "piped: no terminal control sequences");
    let first = frames[0];
    assert!(
        first.contains(" 0/1 ") && first.contains("wave 0 \"canary\"") && first.contains("wave 1 \"rest\""),
        "{first}"
    );
    assert!(first.contains("waiting for wave 0 to settle"), "{first}");
    // The rollout is terminal once the last host is Failed (settled); its
    // RollbackComplete is a separate request and may land after the watch's
    // last read, so the last frame reads "4 reverted" or "3 reverted, 1 failed".
    let last = frames[frames.len() - 1];
    assert!(
        last.contains("completed: 0 converged, 4 reverted")
            || last.contains("completed: 0 converged, 3 reverted, 1 failed"),
        "{last}"
    );
    // Once every rollback is in, a plain status says what happened.
    let after = Command::new(bin())
        .args(["cp", "status", "--cp", &url(&cp), "--rollout", "stable@r1"])
        .output()
        .expect("status");
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(after.contains("completed: 0 converged, 4 reverted"), "{after}");
}

/// `cp status --watch --json`, piped: each line is one compact JSON
/// document of the rollout (the document's RolloutDetail), one per change,
/// the last one terminal; `cp status --json` (overview, one rollout, hosts)
/// prints the API's documents too.
#[test]
fn status_json_outputs_match_the_document() {
    let (_dir, release, cp) = setup("op-watch-json");
    let rt = rt();
    rt.block_on(async { cp.publish(&release.sign(&two_waves("stable@r1", T0, 4))).await });
    let watch = Command::new(bin())
        .args(["cp", "status", "--cp", &url(&cp), "--rollout", "stable@r1", "--watch", "--json", "--interval", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut agents: Vec<Agent> = (1..=4).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
        for agent in &mut agents {
            let d = agent.poll(5).await.expect("dispatch");
            agent.activate(&d).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.converge(&d).await;
        }
    });
    let out = watch.wait_with_output().expect("watch ends by itself");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    println!("{} lines; last: {}", lines.len(), lines[lines.len() - 1]);
    assert!(lines.len() >= 3, "one document per change: {text}");
    let mut states = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {i} not JSON ({e}): {line}"));
        // Compact: as long as serde_json's own compact form (key order aside).
        assert_eq!(serde_json::to_string(&doc).unwrap().len(), line.len(), "line {i} is compact JSON: {line}");
        crate::openapi::check_schema(&format!("cp status --watch --json, line {i}"), "RolloutDetail", &doc);
        states.push(doc["state"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(states.last().map(String::as_str), Some("completed"), "{states:?}");
    assert!(states[..states.len() - 1].iter().all(|s| s == "active" || s == "converging"), "{states:?}");
    let overview: serde_json::Value =
        serde_json::from_str(&ok(&["cp", "status", "--cp", &url(&cp), "--json"])).unwrap();
    crate::openapi::check_schema("cp status --json", "Status", &overview);
    let detail: serde_json::Value =
        serde_json::from_str(&ok(&["cp", "status", "--cp", &url(&cp), "--rollout", "stable@r1", "--json"])).unwrap();
    crate::openapi::check_schema("cp status --rollout --json", "RolloutDetail", &detail);
    assert_eq!(detail["state"], "completed");
    let hosts: serde_json::Value =
        serde_json::from_str(&ok(&["cp", "status", "--cp", &url(&cp), "--hosts", "--json"])).unwrap();
    let hosts = hosts.as_array().expect("an array of hosts");
    assert_eq!(hosts.len(), 4);
    for host in hosts {
        crate::openapi::check_schema("cp status --hosts --json", "HostView", host);
    }
}

/// `cp status --watch` on a terminal (a pty from util-linux `script`): the
/// table is redrawn in place (cursor up, clear) until the rollout ends.
#[test]
fn status_watch_on_a_terminal_redraws_in_place() {
    let (_dir, release, cp) = setup("op-watch-tty");
    let rt = rt();
    let m = manifest("stable@t1", T0, 0, &[("all", 0, 2)], &[("web-1", 0, "web-1-new"), ("web-2", 0, "web-2-new")]);
    rt.block_on(async { cp.publish(&release.sign(&m)).await });
    let command = format!("{} cp status --cp {} --rollout stable@t1 --watch --interval 100ms", bin(), url(&cp));
    let watch = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` runs the watch on a pty");
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for host in ["web-1", "web-2"] {
            let mut agent = Agent::new(host, &cp.url);
            let d = agent.poll(5).await.expect("dispatch");
            agent.activate(&d).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.converge(&d).await;
        }
    });
    let out = watch.wait_with_output().expect("the watch ends by itself");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("\x1b[J") && text.matches("A\x1b[J").count() >= 2, "redrawn in place: {text:?}");
    assert!(!text.contains("--- "), "no piped separators on a terminal: {text:?}");
    assert!(text.contains("completed: 2 converged"), "{text}");
}
