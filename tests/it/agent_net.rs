//! The real `nixfleet agent` against the real CP over HTTP on loopback when
//! the CP answers its long-poll 409 `longpoll_replaced` (a newer long-poll
//! for the host took its place) and its heartbeat 404 `unknown_host` (no
//! published manifest names the host yet): each is logged once per episode,
//! and the agent keeps polling and heartbeating.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};

use crate::agent::{manifest, wait_state, Host, PASSING_PROBE};
use crate::cp::rt;
use crate::harness::{request, Cp, Release, TempDir, DEADLINE};

const NOT_NAMED: &str = "this host is not in any published manifest yet";
const NAMED_NOW: &str = "a published manifest now names this host";
const REPLACED: &str = "answered this long-poll 409 longpoll_replaced";
const ANSWERED_AGAIN: &str = "long-poll answered again after being replaced";

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn wait_log(host: &Host, needle: &str) {
    let started = Instant::now();
    while !host.log().contains(needle) {
        assert!(started.elapsed() < DEADLINE, "the agent never logged {needle:?}:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent heartbeats every second and long-polls with a 2 s wait
/// (`Host::start_agent`). Unnamed for several heartbeats, it logs that
/// once; the test then takes the host's long-poll three times in a row and
/// each time the agent's next poll takes it back (so it kept polling), one
/// warning naming the likely cause for the whole run; a manifest naming the
/// host is then dispatched, acted on and converged, the change is logged
/// once, and the CP stores the agent's heartbeats.
#[test]
fn a_replaced_long_poll_and_an_unnamed_host_are_logged_once_and_the_agent_keeps_going() {
    let dir = TempDir::new("agent-net");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut host = Host::new("net-1");
    let base = host.closure("base", PASSING_PROBE);
    host.boot_into(&base);
    host.start_agent(&cp, &release.pub_path);

    wait_log(&host, NOT_NAMED);
    // Four more heartbeats, each answered 404.
    std::thread::sleep(Duration::from_secs(4));
    let log = host.log();
    assert_eq!(count(&log, NOT_NAMED), 1, "logged once, not at every heartbeat:\n{log}");
    assert_eq!(count(&log, "heartbeat failed"), 0, "404 unknown_host is no failure:\n{log}");

    rt().block_on(async {
        let path = "/v1/agent/dispatch?hostname=net-1&wait=20";
        for round in 0..3 {
            let started = Instant::now();
            // Ours replaces the agent's parked poll; the agent's next poll
            // (a second later) replaces ours.
            let resp = request(&cp.url, Method::GET, path, &[], None).await.expect("long-poll");
            assert_eq!(resp.status, StatusCode::CONFLICT, "round {round}: {}", String::from_utf8_lossy(&resp.body));
            assert!(started.elapsed() < Duration::from_secs(15), "round {round}: the agent stopped polling");
        }
    });
    // The agent's poll is answered (204 after its 2 s wait): the episode ends.
    wait_log(&host, ANSWERED_AGAIN);
    let log = host.log();
    assert_eq!(count(&log, REPLACED), 1, "one warning for the whole episode:\n{log}");
    assert!(log.lines().any(|l| l.contains(REPLACED) && l.contains("second agent")), "names the cause:\n{log}");
    assert!(log.lines().any(|l| l.contains(ANSWERED_AGAIN) && l.contains("replaced=3")), "{log}");
    assert_eq!(count(&log, "long-poll failed"), 0, "409 is not backed off as an error:\n{log}");

    rt().block_on(async {
        let m = manifest("net@r1", 0, &[("net-1", 0, &base)]);
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        wait_state(&cp, "net@r1", &host, "Converged").await;
    });
    wait_log(&host, NAMED_NOW);
    let hosts = rt().block_on(cp.get_json("/v1/hosts"));
    let row = hosts.as_array().expect("array").iter().find(|h| h["hostname"] == "net-1").cloned().expect("net-1");
    assert_eq!(row["liveness"], "reachable", "{row}");
    assert_eq!(row["current_closure"], base.as_str(), "{row}");
    let log = host.log();
    assert_eq!(count(&log, NOT_NAMED), 1, "{log}");
    assert_eq!(count(&log, NAMED_NOW), 1, "{log}");
    assert_eq!(count(&log, "heartbeat failed"), 0, "{log}");
}
