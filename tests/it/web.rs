//! The web status page of the real `nixfleet cp serve`: its HTML without
//! JavaScript (through the harness, so it is checked against the API
//! document too), its limits, and what a real browser renders after the
//! page's script ran. The browser is Debian's `chromium`, headless; `.ci/run`
//! installs it. Without it, the `web::browser_*` tests fail saying so; a
//! developer without chromium runs `cargo test -- --skip web::browser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use nixfleet::cp::web::{MAX_INLINE_HOSTS, MAX_TIMELINE_EVENTS};
use nixfleet::machine::{ProbeDecl, ProbeKind, ProbeMode, ProbeStatus};
use nixfleet::wire::{OutboundEvent, WireEventBody};
use time::macros::datetime;

use crate::cp::rt;
use crate::harness::{assert_applied, manifest, Agent, Cp, Release, TempDir};

const T0: &str = "2026-11-25T12:00:00Z";
const ID: &str = "web@2026-11-25.1";
/// Attacker-influenced text (a probe's failure reason, a switch's stderr)
/// that would add an element and run script if it were not escaped.
const INJECTION: &str = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>";

/// Ten hosts in three waves: web-1 the canary, web-2..4 early, web-5..10 the rest.
fn ten_hosts() -> String {
    let names: Vec<String> = (1..=10).map(|i| format!("web-{i}")).collect();
    let hosts: Vec<(&str, usize, String)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.as_str(),
                if i == 0 {
                    0
                } else if i < 4 {
                    1
                } else {
                    2
                },
                format!("{n}-new"),
            )
        })
        .collect();
    let hosts: Vec<(&str, usize, &str)> = hosts.iter().map(|(n, w, c)| (*n, *w, c.as_str())).collect();
    manifest(ID, T0, 0, &[("canary", 0, 1), ("early", 0, 3), ("rest", 0, 6)], &hosts)
}

/// The states of [`mid_rollout`], and after [`halt`].
const DURING: [(&str, &str); 10] = [
    ("web-1", "Converged"),
    ("web-2", "Soaking"),
    ("web-3", "Activating"),
    ("web-4", "Pending"),
    ("web-5", "Pending"),
    ("web-6", "Pending"),
    ("web-7", "Pending"),
    ("web-8", "Pending"),
    ("web-9", "Pending"),
    ("web-10", "Pending"),
];

fn halted_states() -> Vec<(&'static str, &'static str)> {
    DURING.iter().map(|(h, s)| (*h, if *h == "web-3" { "Reverted" } else { *s })).collect()
}

fn probe_topology() -> WireEventBody {
    WireEventBody::ProbeTopologyDeclared {
        probes: vec![ProbeDecl { name: "http-health".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }],
        declared_at: datetime!(2026-11-25 12:10 UTC),
    }
}

fn failing_probe(n: i64) -> WireEventBody {
    WireEventBody::ProbeResult {
        probe_name: "http-health".into(),
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Fail,
        observed_at: datetime!(2026-11-25 12:11 UTC) + time::Duration::seconds(n),
        failure_reason: Some(format!("GET /health: 503 {INJECTION}")),
    }
}

/// The fleet mid-rollout: web-1 Converged (wave 1 done), web-2 Soaking
/// with a failing probe, web-3 Activating, web-4 dispatched but Pending,
/// web-5..10 waiting for wave 2.
async fn mid_rollout(cp: &Cp, release: &Release) -> Vec<Agent> {
    assert_eq!(cp.publish(&release.sign(&ten_hosts())).await.status, StatusCode::CREATED);
    let mut a: Vec<Agent> = (1..=10).map(|i| Agent::new(&format!("web-{i}"), &cp.url)).collect();
    let d1 = a[0].poll(0).await.expect("canary dispatch");
    a[0].activate(&d1).await;
    a[0].converge(&d1).await;
    a[0].heartbeat().await;
    let d2 = a[1].poll(0).await.expect("wave 2 dispatch");
    a[1].activate(&d2).await;
    assert_applied(&a[1].send(ID, probe_topology()).await);
    assert_applied(&a[1].send(ID, failing_probe(0)).await);
    let d3 = a[2].poll(0).await.expect("wave 2 dispatch");
    let ack = a[2].ack_body(&d3);
    assert_applied(&a[2].send(ID, ack).await);
    assert!(a[3].poll(0).await.is_some(), "web-4 is dispatched");
    assert!(a[4].poll(0).await.is_none(), "wave 3 waits");
    a
}

/// web-3's activation fails and it rolls back: one failed host is over the
/// budget of 0, so the rollout halts.
async fn halt(a: &mut [Agent]) {
    let failed = WireEventBody::ActivationFailed {
        exit_code: 4,
        stderr_tail: format!("switch-to-configuration: {INJECTION}"),
        failed_at: datetime!(2026-11-25 12:20 UTC),
    };
    assert_applied(&a[2].send(ID, failed).await);
    let reverted = WireEventBody::RollbackComplete {
        reverted_to_closure: nixfleet::ids::Closure::parse(&a[2].current).expect("closure"),
        exit_code: 0,
        completed_at: datetime!(2026-11-25 12:21 UTC),
    };
    assert_applied(&a[2].send(ID, reverted).await);
}

/// After the resume: web-2's probe passes and it converges, web-4 (its
/// dispatch withdrawn by the halt) is dispatched again and converges, so
/// wave 1 settles with web-3's accepted failure, and wave 2 (web-5..10)
/// converges: the rollout completes.
async fn finish_after_resume(a: &mut [Agent]) {
    let passing = WireEventBody::ProbeResult {
        probe_name: "http-health".into(),
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Pass,
        observed_at: datetime!(2026-11-25 12:30 UTC),
        failure_reason: None,
    };
    assert_applied(&a[1].send(ID, passing).await);
    let converged = WireEventBody::Converged {
        converged_at: datetime!(2026-11-25 12:31 UTC),
        current_closure: nixfleet::ids::Closure::parse(&a[1].current).expect("closure"),
    };
    assert_applied(&a[1].send(ID, converged).await);
    let d4 = a[3].poll(0).await.expect("web-4 dispatched after the resume");
    a[3].activate(&d4).await;
    a[3].converge(&d4).await;
    for agent in &mut a[4..] {
        let d = agent.poll(0).await.expect("wave 2 dispatched");
        assert_eq!(d.wave, 2);
        agent.activate(&d).await;
        agent.converge(&d).await;
    }
}

/// Every host once the resumed rollout completed.
fn completed_states() -> Vec<(&'static str, &'static str)> {
    DURING.iter().map(|(h, _)| (*h, if *h == "web-3" { "Reverted" } else { "Converged" })).collect()
}

/// Waits for a `cp status --watch` to end by itself (at `what`), or fails.
fn wait_ended(mut watch: std::process::Child, what: &str) -> std::process::Output {
    let started = Instant::now();
    while watch.try_wait().expect("watch status").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = watch.kill();
            panic!("cp status --watch did not end at {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = watch.wait_with_output().expect("watch output");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The `<tr>` of one host in a rendered page.
fn host_row<'a>(html: &'a str, host: &str) -> &'a str {
    let start = html.find(&format!("<tr data-host=\"{host}\"")).unwrap_or_else(|| panic!("no row for {host}"));
    let len = html[start..].find("</tr>").expect("row end");
    &html[start..start + len]
}

fn assert_states(html: &str, want: &[(&str, &str)]) {
    for (host, state) in want {
        let row = host_row(html, host);
        assert!(row.contains(&format!(">{state}</span>")), "{host} should show {state}: {row}");
    }
}

/// Nothing of the injected markup became an element; its text is shown.
fn assert_escaped(html: &str) {
    assert!(!html.contains("<img"), "an injected element was rendered");
    assert!(!html.contains("pwned</title>") && !html.contains("<script>document.title"), "injected script");
    assert!(html.contains("&lt;img src=x onerror="), "the reason is shown as text");
}

async fn page(cp: &Cp, path: &str) -> (StatusCode, String, hyper::HeaderMap) {
    let resp = cp.get(path).await;
    (resp.status, String::from_utf8(resp.body.to_vec()).expect("utf-8"), resp.headers)
}

/// Without JavaScript: the server's HTML shows every host's state, the
/// failing probe and its reason (escaped), the halt reason and each host's
/// timeline, with only inline assets and a policy allowing nothing else.
#[test]
fn page_works_without_javascript() {
    let dir = TempDir::new("webhtml");
    let release = Release::new(dir.path(), "release");
    // Heartbeats every 1 s: a host silent for 3 s is unreachable.
    let cp = Cp::start_with(dir.path(), &release.pub_path, &["--heartbeat-interval", "1s"]);
    rt().block_on(async {
        let mut a = mid_rollout(&cp, &release).await;
        halt(&mut a).await;
        let (status, html, headers) = page(&cp, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'") && csp.contains("script-src 'sha256-"), "{csp}");
        assert_states(&html, &halted_states());
        let detail = cp.get_json(&format!("/v1/rollouts/{ID}")).await;
        let reason = detail["halt_reason"].as_str().expect("halted");
        assert!(html.contains(&nixfleet::cp::web::esc(reason)), "halt reason {reason:?} shown");
        assert!(host_row(&html, "web-2").contains("http-health"), "the failing probe is named");
        assert!(host_row(&html, "web-2").contains("GET /health: 503 &lt;img"), "with its reason");
        assert!(host_row(&html, "web-3").contains("activation failed (exit 4)"));
        assert_escaped(&html);
        for external in ["src=\"http", "href=\"http", "<link", "@import", "url("] {
            assert!(!html.contains(external), "no external asset ({external})");
        }
        assert!(html.contains("@media (prefers-color-scheme:dark)") && html.contains("name=\"viewport\""));

        let (status, host, _) = page(&cp, "/hosts/web-2").await;
        assert_eq!(status, StatusCode::OK);
        for kind in ["DispatchAck", "ActivationCompleted", "ProbeTopologyDeclared", "ProbeResult"] {
            assert!(host.contains(&format!("<strong>{kind}</strong>")), "{kind} in the timeline");
        }
        assert_escaped(&host);
        let (status, rollout, _) = page(&cp, &format!("/rollouts/{ID}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_states(&rollout, &[("web-3", "Reverted")]);
        assert_eq!(page(&cp, "/hosts/nobody").await.0, StatusCode::NOT_FOUND);
        assert_eq!(page(&cp, "/hosts/Bad_Name").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(page(&cp, "/rollouts/web@none").await.0, StatusCode::NOT_FOUND);

        // What needs a person: web-4's ack raced the halt and it now waits
        // for a reboot (since days, by its clock: a long deferral); web-1
        // runs a closure nobody rolled out, then falls silent.
        let (_, before, _) = page(&cp, "/").await;
        assert!(!before.contains("<h2>Waiting for a reboot</h2>") && !before.contains("<h2>Drifting</h2>"));
        let d4 = nixfleet::wire::Dispatch {
            rollout_id: ID.parse().unwrap(),
            target_closure: nixfleet::ids::Closure::parse(&crate::harness::closure("web-4-new")).unwrap(),
            wave: 1,
            soak_secs: 0,
            issued_at: datetime!(2026-11-25 12:00 UTC),
        };
        let ack = a[3].ack_body(&d4);
        assert_applied(&a[3].send(ID, ack).await);
        let deferred = WireEventBody::ActivationDeferred {
            component: "kernel".into(),
            deferred_at: datetime!(2026-11-25 12:30 UTC),
        };
        assert_applied(&a[3].send(ID, deferred).await);
        a[0].current = crate::harness::closure("hand-built");
        a[0].heartbeat().await;
        let started = Instant::now();
        let html = loop {
            let (_, html, _) = page(&cp, "/").await;
            if html.contains("<h2>Unreachable</h2>") {
                break html;
            }
            assert!(started.elapsed() < crate::harness::DEADLINE, "web-1 never shown unreachable");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let section = |title: &str| {
            let start = html.find(&format!("<h2>{title}</h2>")).unwrap_or_else(|| panic!("no {title} list"));
            let end = html[start..].find("</table>").expect("table end");
            html[start..start + end].to_owned()
        };
        assert!(section("Unreachable").contains(">web-1</a>"));
        assert!(section("Drifting").contains(&crate::harness::closure("hand-built")));
        let waiting = section("Waiting for a reboot");
        assert!(waiting.contains("<tr class=\"long\"><td><a href=\"/hosts/web-4\">"), "{waiting}");
        assert_states(&html, &[("web-4", "Deferred")]);
        assert!(html.contains("<span class=\"n\">1</span> long deferrals"));
    });
}

/// A rollout of more than MAX_INLINE_HOSTS hosts shows only its counts on
/// the overview and every host on its own page; one of exactly the limit is
/// listed inline. A host's timeline shows its newest MAX_TIMELINE_EVENTS.
#[test]
fn page_limits() {
    let (_dir, release, cp) = crate::cp::setup("weblimits");
    rt().block_on(async {
        let names = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}-{i}")).collect::<Vec<_>>();
        let (small, big) = (names("small", MAX_INLINE_HOSTS), names("big", MAX_INLINE_HOSTS + 1));
        for (id, hosts) in [("small@r1", &small), ("big@r1", &big)] {
            let list: Vec<(&str, usize, &str)> = hosts.iter().map(|h| (h.as_str(), 0, h.as_str())).collect();
            let m = manifest(id, T0, 0, &[("all", 0, 1)], &list);
            assert_eq!(cp.publish(&release.sign(&m)).await.status, StatusCode::CREATED);
        }
        let (_, html, _) = page(&cp, "/").await;
        assert!(html.contains("<tr data-host=\"small-199\""), "the limit itself is listed inline");
        assert!(!html.contains("<tr data-host=\"big-0\""), "over the limit: not inline");
        assert!(html.contains(&format!("{} hosts: more than {MAX_INLINE_HOSTS}", MAX_INLINE_HOSTS + 1)));
        let (_, rollout, _) = page(&cp, "/rollouts/big@r1").await;
        assert_eq!(rollout.matches("<tr data-host=\"big-").count(), MAX_INLINE_HOSTS + 1);

        // small-0 is dispatched (max_in_flight 1): ack, activate, then
        // enough probe results for the timeline to overflow.
        let mut agent = Agent::new("small-0", &cp.url);
        let d = agent.poll(0).await.expect("dispatch");
        agent.activate(&d).await;
        assert_applied(&agent.send("small@r1", probe_topology()).await);
        let events: Vec<OutboundEvent> =
            (0..MAX_TIMELINE_EVENTS as i64).map(|n| agent.emit("small@r1", failing_probe(n))).collect();
        let items: Vec<(&str, &OutboundEvent)> = events.iter().map(|e| ("small@r1", e)).collect();
        for r in agent.post(&items).await {
            assert_applied(&r);
        }
        let (_, host, _) = page(&cp, "/hosts/small-0").await;
        let rows = host.matches("<tr><td>").count();
        assert_eq!(rows, MAX_TIMELINE_EVENTS, "the newest {MAX_TIMELINE_EVENTS} of {} events", MAX_TIMELINE_EVENTS + 3);
        assert!(host.contains(&format!("The newest {MAX_TIMELINE_EVENTS} events")));
        assert!(!host.contains("<strong>DispatchAck</strong>"), "the oldest events are left out");
    });
}

/// Debian's chromium, or a failure that says how to get it or skip.
fn chromium() -> PathBuf {
    for candidate in ["chromium", "chromium-browser"] {
        let found = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join(candidate))
            .find(|p| p.is_file());
        if let Some(path) = found {
            return path;
        }
    }
    panic!(
        "chromium is not installed: the web page is tested in a real browser. Install it \
         (`apt-get install -y chromium`; .ci/run does) or skip these tests with \
         `cargo test -- --skip web::browser`"
    )
}

/// Limit for one browser run: a page that never settles fails the test.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

/// Loads `url` in headless chromium, lets the page's script run for
/// `virtual_ms` of virtual time, and returns the serialised DOM; a
/// screenshot at phone width is left at `shot`.
fn render(dir: &Path, url: &str, virtual_ms: u64, shot: &Path) -> String {
    let browser = chromium();
    let run = |extra: &[String], label: &str| {
        let profile = tempfile::Builder::new().prefix("chromium-").tempdir_in(dir).expect("profile dir");
        let mut child = Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={virtual_ms}"))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("chromium-{label}.log"))).expect("log"))
            .spawn()
            .expect("start chromium");
        let start = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if start.elapsed() > BROWSER_DEADLINE {
                let _ = child.kill();
                panic!("chromium did not finish {url} within {BROWSER_DEADLINE:?}; see {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("chromium output");
        assert!(out.status.success(), "chromium failed ({}); see {}/chromium-{label}.log", out.status, dir.display());
        String::from_utf8(out.stdout).expect("utf-8 DOM")
    };
    run(&["--window-size=412,1400".into(), format!("--screenshot={}", shot.display())], "shot");
    assert!(shot.is_file(), "chromium wrote no screenshot");
    run(&["--dump-dom".into()], "dom")
}

/// A real browser renders the page of a running CP during a rollout of 10
/// hosts in 3 waves, after its halt, and after `cp resume` once it
/// completed through wave 2: after the script's refreshes (virtual time),
/// the DOM shows each host's state, the halt reason and the probe reason as
/// text, then `completed` and no halt, and the script reports itself live.
/// `cp status --watch` follows it to the halt, and a second one from the
/// resume to the completion. Screenshots stay in the test's dir when it
/// fails.
#[test]
fn browser_renders_a_live_rollout_and_its_halt() {
    let dir = TempDir::new("webbrowser");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let url = format!("http://{}/", cp.url.authority());
    let virtual_ms = nixfleet::cp::web::REFRESH_SECS * 1000 * 2 + 1000;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut agents = rt().block_on(mid_rollout(&cp, &release));
        // The operator's other view of the same rollout: `cp status --watch`
        // (piped: one table per change) until the halt ends it.
        let watch = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet"))
            .args(["cp", "status", "--cp", &format!("http://{}", cp.url.authority()), "--rollout", ID])
            .args(["--watch", "--interval", "200ms"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cp status --watch");
        let dom = render(dir.path(), &url, virtual_ms, &dir.path().join("during.png"));
        assert_states(&dom, &DURING);
        assert!(dom.contains("id=\"live\" class=\"live on\">live · updated"), "the script refreshed the page");
        assert!(!dom.contains("class=\"halt\""), "not halted yet");
        assert_escaped(&dom);

        rt().block_on(halt(&mut agents));
        let dom = render(dir.path(), &url, virtual_ms, &dir.path().join("halted.png"));
        assert_states(&dom, &halted_states());
        let reason =
            rt().block_on(cp.get_json(&format!("/v1/rollouts/{ID}")))["halt_reason"].as_str().unwrap().to_owned();
        assert!(
            dom.contains(&format!("<span class=\"reason\">{}</span>", nixfleet::cp::web::esc(&reason))),
            "halt reason {reason:?}"
        );
        assert!(dom.contains("id=\"live\" class=\"live on\">live · updated"), "the script refreshed the page");
        assert!(dom.contains("<title>Fleet · nixfleet</title>"), "the title is the page's own");
        assert_escaped(&dom);

        let out = wait_ended(watch, "the halt");
        let text = String::from_utf8_lossy(&out.stdout);
        let frames: Vec<&str> = text.split("--- ").filter(|f| !f.trim().is_empty()).collect();
        assert!(frames.len() >= 2, "one table per change, from mid-rollout to the halt:\n{text}");
        assert!(!frames[0].contains("halted"), "{}", frames[0]);
        assert!(frames[frames.len() - 1].contains("halted"), "{}", frames[frames.len() - 1]);
        assert!(frames[frames.len() - 1].contains(&reason), "the halt reason: {}", frames[frames.len() - 1]);
        let dom = render(dir.path(), &format!("{url}hosts/web-2"), virtual_ms, &dir.path().join("host.png"));
        assert!(dom.contains("<strong>ProbeResult</strong>"), "the host's timeline");
        assert_escaped(&dom);

        // The fix (web-3's switch failed on something outside the manifest), then `cp resume`: a new watch
        // follows the rollout through wave 2 to its completion, and the page shows it completed.
        let cp_url = format!("http://{}", cp.url.authority());
        let out = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
            .args(["cp", "resume", "--cp", &cp_url, ID, "--reason", "INC-9: web-3's disk was full; cleaned"])
            .output()
            .expect("cp resume");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("resumed {ID}")));
        let watch = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
            .args(["cp", "status", "--cp", &cp_url, "--rollout", ID, "--watch", "--interval", "200ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cp status --watch");
        rt().block_on(finish_after_resume(&mut agents));
        let out = wait_ended(watch, "the completion");
        let text = String::from_utf8_lossy(&out.stdout);
        let frames: Vec<&str> = text.split("--- ").filter(|f| !f.trim().is_empty()).collect();
        let last = frames[frames.len() - 1];
        println!("{} frames after the resume; last:\n{last}", frames.len());
        assert!(frames.len() >= 2 && !frames[0].contains("completed"), "one table per change:\n{text}");
        assert!(last.contains("completed: 9 converged, 1 reverted"), "{last}");
        assert!(last.contains("resume by unauthenticated (plaintext): INC-9"), "{last}");
        for (host, state) in completed_states() {
            assert!(
                last.lines().any(|l| l.split_whitespace().next() == Some(host) && l.contains(state)),
                "{host} {state}: {last}"
            );
        }
        let dom = render(dir.path(), &url, virtual_ms, &dir.path().join("completed.png"));
        assert_states(&dom, &completed_states());
        assert!(dom.contains("class=\"state s-completed\">completed</span>"), "the rollout is completed");
        assert!(!dom.contains("class=\"halt\""), "the halt is cleared");
        assert!(dom.contains("id=\"live\" class=\"live on\">live · updated"), "the script refreshed the page");
    }));
    if let Err(panic) = result {
        let kept = dir.keep();
        eprintln!("web browser test failed; screenshots, DOM logs and the CP log are in {}", kept.display());
        std::panic::resume_unwind(panic);
    }
}
