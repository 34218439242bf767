//! `/metrics` and the web page of a 20,000-host fleet: the rows behind
//! them are put straight into the real CP's SQLite file (a published
//! 20,000-host manifest, 10,000 host records, 15,000 heartbeat rows), then
//! the real CP answers. What each answer costs is measured by what it
//! returns (bytes, rows listed) and by the CP's peak RSS above its RSS
//! while it builds the answer.

use std::time::Instant;

use hyper::{Method, StatusCode};
use nixfleet::clock::ClockHandle;
use nixfleet::ids::{Closure, Hostname, RolloutId};
use nixfleet::machine::{HostRecord, HostState};
use rusqlite::params;
use time::format_description::well_known::Rfc3339;

use super::limits::vm_kib;
use super::{rt, T0};
use crate::harness::{closure, manifest, request, Cp, Release, TempDir};
use crate::metrics::{gauge, parse_scrape};

const N: usize = 20_000;
const ID: &str = "large@r1";
/// Hosts heartbeating and drifting (the page lists at most 100 of them).
const N_DRIFTING: usize = 150;

fn name(i: usize) -> String {
    format!("h{i:06}")
}

/// h000000..h001999 in wave 0, the rest in wave 1; every host's target is
/// the closure "large".
fn large_manifest() -> String {
    let names: Vec<String> = (0..N).map(name).collect();
    let hosts: Vec<(&str, usize, &str)> =
        names.iter().enumerate().map(|(i, h)| (h.as_str(), usize::from(i >= N / 10), "large")).collect();
    manifest(ID, T0, 0, &[("canary", 0, 10), ("rest", 0, 100)], &hosts)
}

/// Straight into the stopped CP's database: hosts 0..N/2 Converged (a
/// record each), N/2..N Pending (no record, as after a publish); hosts
/// 0..N/2 heartbeat now, N/2..3N/4 an hour ago (unreachable), 3N/4..N
/// never (never seen); the first `N_DRIFTING` drift.
fn fill(db: &std::path::Path) {
    let mut conn = rusqlite::Connection::open(db).expect("open the CP's database");
    let tx = conn.transaction().expect("transaction");
    let id = RolloutId::parse(ID).expect("id");
    let target = Closure::parse(&closure("large")).expect("closure");
    let now = ClockHandle::system().now();
    let (fresh, stale) =
        (now.format(&Rfc3339).expect("ts"), (now - time::Duration::hours(1)).format(&Rfc3339).expect("ts"));
    for i in 0..N / 2 {
        let mut record =
            HostRecord::pending(id.clone(), Hostname::parse(&name(i)).expect("host"), Some(target.clone()));
        record.state = HostState::Converged;
        record.last_seq = 4;
        record.current_closure = Some(target.clone());
        let json = serde_json::to_string(&record).expect("record JSON");
        tx.execute(
            "INSERT INTO host_records (rollout_id, hostname, wave, state, last_seq, record) VALUES (?1, ?2, ?3, 'Converged', 4, ?4)",
            params![ID, name(i), i64::from(i >= N / 10), json],
        )
        .expect("insert record");
    }
    for i in 0..3 * N / 4 {
        let (at, drift) = match i {
            i if i < N_DRIFTING => (&fresh, "drifting"),
            i if i < N / 2 => (&fresh, "in_sync"),
            _ => (&stale, "unknown"),
        };
        let current = if drift == "drifting" { closure("hand-built") } else { target.as_str().to_owned() };
        tx.execute(
            "INSERT INTO hosts (hostname, last_heartbeat_at, current_closure, agent_version, uptime_secs, drift,
                                expected_closure, expected_from)
             VALUES (?1, ?2, ?3, 'test', 100, ?4, ?5, ?6)",
            params![name(i), at, current, drift, target.as_str(), ID],
        )
        .expect("insert host");
    }
    tx.commit().expect("commit");
}

/// The answer to `path` and the CP's peak RSS above its RSS while it was
/// built, in KiB (VmHWM reset through /proc/PID/clear_refs): the least of
/// three answers, so work the CP does meanwhile (its planner after the
/// restart) is not counted as the answer's.
async fn answer_and_peak_kib(cp: &Cp, path: &str) -> (String, u64) {
    let mut least = u64::MAX;
    let mut body = String::new();
    for _ in 0..3 {
        std::fs::write(format!("/proc/{}/clear_refs", cp.pid()), "5").expect("reset the peak RSS");
        let base = vm_kib(cp.pid(), "VmRSS:");
        let resp = request(&cp.url, Method::GET, path, &[], None).await.expect("GET");
        assert_eq!(resp.status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&resp.body));
        least = least.min(vm_kib(cp.pid(), "VmHWM:").saturating_sub(base));
        body = String::from_utf8(resp.body.to_vec()).expect("utf-8");
    }
    (body, least)
}

fn host_rows(html: &str) -> usize {
    html.matches("<tr data-host=\"").count()
}

/// `/metrics` counts all 20,000 hosts from SQL aggregates, and the web page
/// lists them a page of 1,000 at a time: the answers' sizes and the CP's
/// memory while building them stay bounded (the overview cuts its lists at
/// 100 rows, the rollout page shows 1,000 hosts and links to the next).
#[test]
fn metrics_and_the_web_page_of_a_20k_host_fleet_cost_what_a_page_costs() {
    let dir = TempDir::new("large-fleet");
    let release = Release::new(dir.path(), "release");
    // As in `views_of_a_100k_host_rollout_cost_tens_of_mb`: freed memory
    // goes back to the system at once, so RSS follows live memory.
    let malloc = [("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_ARENA_MAX", "2")];
    let mut cp = Cp::start_with_env(dir.path(), &release.pub_path, &[], &malloc);
    let envelope = release.sign(&large_manifest());
    let resp = rt().block_on(cp.publish(&envelope));
    assert_eq!(resp.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&resp.body));
    assert!(cp.terminate().success());
    fill(&cp.db);
    cp.restart();
    rt().block_on(async {
        // Once each first, so lazily built caches are not counted.
        for path in ["/metrics", "/", "/rollouts/large@r1", "/hosts/h000001"] {
            answer_and_peak_kib(&cp, path).await;
        }
        let started = Instant::now();
        let (text, metrics_kib) = answer_and_peak_kib(&cp, "/metrics").await;
        let metrics_time = started.elapsed() / 3;
        let scrape = parse_scrape(&text);
        let hosts = |state: &str| gauge(&scrape, "nixfleet_cp_rollout_hosts", &[("rollout", ID), ("state", state)]);
        assert_eq!((hosts("Converged"), hosts("Pending")), ((N / 2) as f64, (N / 2) as f64));
        let liveness = |l: &str| gauge(&scrape, "nixfleet_cp_hosts", &[("liveness", l)]);
        assert_eq!(liveness("reachable"), (N / 2) as f64);
        assert_eq!(liveness("unreachable"), (N / 4) as f64);
        assert_eq!(liveness("never_seen"), (N / 4) as f64);
        assert_eq!(gauge(&scrape, "nixfleet_hosts_unreachable", &[]), (N / 4) as f64);
        assert_eq!(gauge(&scrape, "nixfleet_hosts_drifting", &[]), N_DRIFTING as f64);
        assert_eq!(gauge(&scrape, "nixfleet_cp_host_records", &[("state", "Converged")]), (N / 2) as f64);

        let (overview, overview_kib) = answer_and_peak_kib(&cp, "/").await;
        assert!(overview.contains(&format!("<span class=\"n\">{N}</span> hosts")), "every host counted");
        assert!(overview.contains(&format!("<span class=\"n\">{}</span> never seen", N / 4)));
        assert!(overview.contains(&format!("<span class=\"n\">{N_DRIFTING}</span> drifting")));
        let unreachable_rows = overview.split("<h2>Unreachable</h2>").nth(1).expect("unreachable list");
        let unreachable_rows = unreachable_rows.split("</table>").next().unwrap_or_default().matches("<tr><td>").count();
        assert_eq!(unreachable_rows, nixfleet::cp::web::MAX_ATTENTION_ROWS, "the list is cut");
        assert!(overview.contains(&format!("… and {} more", N / 4 - nixfleet::cp::web::MAX_ATTENTION_ROWS)));
        assert!(overview.contains(&format!("… and {} more", N_DRIFTING - nixfleet::cp::web::MAX_ATTENTION_ROWS)));
        assert_eq!(host_rows(&overview), 0, "a rollout over the inline limit lists no host on the overview");
        assert!(overview.contains("Converged</span> 2000") && overview.contains("Converged</span> 8000"), "wave counts");

        let page = nixfleet::cp::views::MAX_VIEW_PAGE_HOSTS;
        let (first, rollout_kib) = answer_and_peak_kib(&cp, "/rollouts/large@r1").await;
        assert_eq!(host_rows(&first), page);
        assert!(first.contains(&format!("href=\"/rollouts/large@r1?after={}\">next page", name(page - 1))), "next link");
        let (second, _) = answer_and_peak_kib(&cp, &format!("/rollouts/large@r1?after={}", name(page - 1))).await;
        assert_eq!(host_rows(&second), page);
        assert!(second.contains(&format!("<tr data-host=\"{}\"", name(page))), "the second page starts after the first");
        assert!(second.contains("href=\"/rollouts/large@r1\">first page"));
        assert!(second.contains("id=\"w-large@r1-0\" open>"), "the wave holding the page's hosts is open");
        let (last, _) = answer_and_peak_kib(&cp, &format!("/rollouts/large@r1?after={}", name(N - page - 1))).await;
        assert_eq!(host_rows(&last), page);
        assert!(!last.contains("next page"), "the last page has no next link");
        let bad = request(&cp.url, Method::GET, "/rollouts/large@r1?after=Bad_Name", &[], None).await.expect("GET");
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "an after that is no hostname");
        assert!(String::from_utf8_lossy(&bad.body).contains("after must be a hostname"));
        let (host, host_kib) = answer_and_peak_kib(&cp, "/hosts/h000001").await;
        assert!(host.contains("/rollouts/large@r1") && host.contains(">Converged<"), "the host's rollout and state");

        println!(
            "{N}-host fleet (debug build): /metrics {} bytes in {metrics_time:?}, peak RSS +{metrics_kib} KiB; \
             overview {} bytes +{overview_kib} KiB; rollout page {} bytes +{rollout_kib} KiB; host page +{host_kib} KiB",
            text.len(),
            overview.len(),
            first.len()
        );
        // Answers: /metrics is a few lines per rollout, the overview cuts
        // every list, a rollout page holds 1,000 host rows.
        assert!(text.len() < 16 * 1024, "/metrics is {} bytes", text.len());
        assert!(overview.len() < 64 * 1024, "the overview is {} bytes", overview.len());
        assert!(first.len() < 1024 * 1024, "a rollout page is {} bytes", first.len());
        assert!(metrics_kib < MAX_PEAK_KIB, "/metrics cost {metrics_kib} KiB");
        assert!(overview_kib < MAX_PEAK_KIB, "the overview cost {overview_kib} KiB");
        assert!(host_kib < MAX_PEAK_KIB, "a host page cost {host_kib} KiB");
        assert!(rollout_kib < MAX_ROLLOUT_PAGE_PEAK_KIB, "a rollout page cost {rollout_kib} KiB");
    });
}

/// Peak RSS above RSS allowed for `/metrics`, the overview and a host page
/// of the 20,000-host fleet. What they cost is SQLite reading the 2.6 MB
/// manifest with its JSON functions (≈ 4 MiB measured); reading every host,
/// as these answers did before they were counted in SQL, cost 10 to 15 MiB
/// on the same database.
const MAX_PEAK_KIB: u64 = 8 * 1024;
/// A rollout page also parses the manifest in Rust (as the JSON view does)
/// and holds its 1,000 hosts (≈ 6 MiB measured; the whole rollout listed on
/// one page cost 16 MiB).
const MAX_ROLLOUT_PAGE_PEAK_KIB: u64 = 11 * 1024;
