//! The status views and the `cp publish` / `cp status` commands' output.

use super::*;

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
