//! The control plane over real HTTP on loopback, driven by scripted agents,
//! against the real `nixfleet cp serve` process (`docs/protocol.md` §4).
//! One file per concern: [`publish`], [`dispatch`] (long-polls, waves,
//! halts, supersession), [`ingest`] (events and heartbeats), [`durability`]
//! (`kill -9`, database loss, SIGTERM), [`views`] (status JSON and the
//! `cp` commands' output), [`bad_input`] (malformed requests, identity),
//! [`checkpoint`] (record checkpoints of the event log). The shared
//! fixtures are here.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use nixfleet::client;
use nixfleet::cp::store;
use nixfleet::wire::{ResultStatus, WireEventBody};
use time::macros::datetime;

use crate::harness::{assert_applied, closure, manifest, Agent, Cp, Release, TempDir};

mod bad_input;
mod checkpoint;
mod dispatch;
mod durability;
mod ingest;
mod large_fleet;
mod limits;
mod operator;
mod publish;
mod retention;
mod views;

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

/// A temp dir, a release key the CP trusts, and the CP.
pub(crate) fn setup(label: &str) -> (TempDir, Release, Cp) {
    let dir = TempDir::new(label);
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    (dir, release, cp)
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
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
