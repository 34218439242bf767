//! `GET /metrics` of the real CP, read with a Prometheus text-format parser
//! (`prometheus-parse`), not by matching strings: build info, the latency
//! histograms, hosts per rollout and state, drift and unreachable counts.

use std::collections::BTreeMap;

use hyper::StatusCode;
use prometheus_parse::{Sample, Scrape, Value};

use crate::cp::rt;
use crate::harness::{closure, manifest, Agent, Cp, Release, TempDir, DEADLINE};

async fn scrape(cp: &Cp) -> Scrape {
    let resp = cp.get("/metrics").await;
    assert_eq!(resp.status, StatusCode::OK);
    parse_scrape(std::str::from_utf8(&resp.body).expect("utf-8"))
}

/// The Prometheus text parsed; every sample line ends in a number.
pub(crate) fn parse_scrape(text: &str) -> Scrape {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "not a sample line: {line:?}");
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

/// A gauge's (or counter's) value; panics naming the sample when absent.
pub(crate) fn gauge(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, name, labels).map(|s| &s.value) {
        Some(Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v)) => *v,
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

/// A histogram's total count (its +Inf bucket) and whether its buckets are
/// cumulative.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some(Value::Histogram(buckets)) = find(scrape, name, labels).map(|s| &s.value) else {
        panic!("{name}{labels:?} is not a histogram")
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "{name}: buckets are cumulative");
    let total = buckets.iter().find(|b| b.less_than.is_infinite()).expect("+Inf bucket").count;
    assert_eq!(gauge(scrape, &format!("{name}_count"), labels), total, "{name}_count is the +Inf bucket");
    total
}

/// Every figure moves with what the fleet does: dispatches and a 204
/// long-poll, ingested batches and commits in the histograms, hosts by
/// state per rollout, one drifting and one unreachable host.
#[test]
fn metrics_parse_and_count_the_fleet() {
    let dir = TempDir::new("metrics");
    let release = Release::new(dir.path(), "release");
    // Heartbeats every 1 s: a host silent for 3 s is unreachable.
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--heartbeat-interval", "1s"]);
    rt().block_on(async {
        let before = scrape(&cp).await;
        let version = find(&before, "nixfleet_build_info", &[]).expect("build info");
        assert_eq!(version.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(gauge(&before, "nixfleet_build_info", &[("role", "cp")]), 1.0);
        assert_eq!(histogram_count(&before, "nixfleet_cp_ingest_seconds", &[]), 0.0);

        let hosts = [("m-1", 0, "m-1-new"), ("m-2", 0, "m-2-new"), ("m-3", 0, "m-3-new")];
        let m = manifest("metrics@r1", "2026-11-25T12:00:00Z", 0, &[("all", 0, 2)], &hosts);
        assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        let mut m1 = Agent::new("m-1", &cp.url);
        let mut m2 = Agent::new("m-2", &cp.url);
        let m3 = Agent::new("m-3", &cp.url);
        m3.heartbeat().await;
        let d1 = m1.poll(0).await.expect("dispatch");
        m1.activate(&d1).await;
        m1.converge(&d1).await;
        let d2 = m2.poll(0).await.expect("dispatch");
        let ack = m2.ack_body(&d2);
        crate::harness::assert_applied(&m2.send("metrics@r1", ack).await);
        assert!(Agent::new("idle", &cp.url).poll(0).await.is_none(), "a host in no manifest: 204");

        // m-3 falls silent; m-1 keeps beating, with a closure nobody rolled out.
        m1.current = closure("hand-built");
        let started = std::time::Instant::now();
        let after = loop {
            m1.heartbeat().await;
            let scrape = scrape(&cp).await;
            if gauge(&scrape, "nixfleet_hosts_unreachable", &[]) == 1.0 {
                break scrape;
            }
            assert!(started.elapsed() < DEADLINE, "m-3 never counted as unreachable");
            // One heartbeat a second stays inside the per-host quota's burst.
            tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        };
        assert_eq!(gauge(&after, "nixfleet_hosts_drifting", &[]), 1.0);
        assert_eq!(gauge(&after, "nixfleet_cp_hosts", &[("liveness", "unreachable")]), 1.0);
        assert_eq!(gauge(&after, "nixfleet_cp_hosts", &[("liveness", "reachable")]), 1.0, "m-1");
        assert_eq!(gauge(&after, "nixfleet_cp_hosts", &[("liveness", "never_seen")]), 1.0, "m-2 sent no heartbeat");
        let per_rollout: BTreeMap<String, f64> = after
            .samples
            .iter()
            .filter(|s| s.metric == "nixfleet_cp_rollout_hosts" && s.labels.get("rollout") == Some("metrics@r1"))
            .map(|s| match s.value {
                Value::Gauge(v) => (s.labels.get("state").unwrap_or_default().to_owned(), v),
                ref other => panic!("nixfleet_cp_rollout_hosts is a gauge: {other:?}"),
            })
            .collect();
        let want: BTreeMap<String, f64> = [
            ("Activating", 1.0),
            ("Converged", 1.0),
            ("Deferred", 0.0),
            ("Failed", 0.0),
            ("Pending", 1.0),
            ("Reverted", 0.0),
            ("Soaking", 0.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(per_rollout, want);
        assert_eq!(histogram_count(&after, "nixfleet_cp_longpoll_answer_seconds", &[("outcome", "dispatch")]), 2.0);
        assert_eq!(histogram_count(&after, "nixfleet_cp_longpoll_answer_seconds", &[("outcome", "no_work")]), 1.0);
        // m-1: ack, completed, topology, converged; m-2: ack. One batch each.
        assert_eq!(histogram_count(&after, "nixfleet_cp_ingest_seconds", &[]), 5.0);
        let commits = gauge(&after, "nixfleet_cp_commits_total", &[]);
        assert!(commits >= 7.0, "publish, 5 batches, heartbeats: {commits}");
        assert_eq!(histogram_count(&after, "nixfleet_cp_commit_seconds", &[]), commits, "one observation per commit");
        assert_eq!(gauge(&after, "nixfleet_cp_events_total", &[("status", "applied")]), 5.0);

        // docs/manual.md ("Metrics") names every family the CP exports.
        let manual = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/manual.md")).expect("manual");
        let metrics = &manual[manual.find("### Metrics").expect("a Metrics section")..];
        assert!(after.docs.len() >= 12, "every family has its HELP line: {:?}", after.docs.keys());
        for name in after.docs.keys() {
            assert!(
                metrics.contains(&format!("`{name}`")) || metrics.contains(&format!("`{name}{{")),
                "{name} is exported but docs/manual.md (\"Metrics\") does not list it"
            );
        }
    });
}
