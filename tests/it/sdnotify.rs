//! The service-manager notifications (sd_notify) of the real `nixfleet cp
//! serve` and `nixfleet agent`, received on a datagram socket of the test's
//! own as systemd would receive them: `READY=1` once serving, `WATCHDOG=1`
//! from the loop that matters at the pace `WATCHDOG_USEC` asks, and
//! `STOPPING=1` on SIGTERM. The units in `contrib/systemd/` are checked with
//! `systemd-analyze verify` where systemd is installed.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixfleet::agent::reducer::{commands, Input, Journal, JournalError, Reducer, INPUT_CAPACITY};
use nixfleet::agent::rollouts::Rollouts;
use nixfleet::clock::ClockHandle;
use nixfleet::ids::{Closure, Hostname, RolloutId};
use nixfleet::machine::{OnHealthFailure, Policy};
use nixfleet::sdnotify::Notifier;
use nixfleet::wire::OutboundEvent;
use tokio::sync::Semaphore;

use crate::harness::{bin, child_param, child_test, manifest, wait_for, Cp, Release, TempDir};

/// The watchdog timeout the roles are started with: pings are due every
/// second, and the loops are woken every half second.
const WATCHDOG: Duration = Duration::from_secs(2);

/// The test's end of `NOTIFY_SOCKET`. A thread receives every datagram and
/// stamps it on arrival, so gaps between pings are measured as systemd
/// would measure them, whenever the test looks.
struct NotifySocket {
    /// The value for `NOTIFY_SOCKET`.
    env: String,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    receiver: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn at_path(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        NotifySocket::with(socket, path.display().to_string())
    }

    /// In the abstract namespace (`@name`), as systemd's own manager uses.
    fn in_abstract_namespace(label: &str) -> NotifySocket {
        let name = format!("nixfleet-it-{label}-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket::with(socket, format!("@{name}"))
    }

    fn with(socket: UnixDatagram, env: String) -> NotifySocket {
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, until) = (Arc::clone(&seen), Arc::clone(&stop));
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !until.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    into.lock().expect("lock").push((Instant::now(), message));
                }
            }
        });
        NotifySocket { env, seen, stop, receiver: Some(receiver) }
    }

    fn seen(&self) -> Vec<(Instant, String)> {
        self.seen.lock().expect("lock").clone()
    }

    /// Arrival times of the messages holding the line `line`.
    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.seen().into_iter().filter(|(_, m)| m.lines().any(|l| l == line)).map(|(at, _)| at).collect()
    }

    fn pings(&self) -> Vec<Instant> {
        self.times_of("WATCHDOG=1")
    }

    /// Waits for the `n`th message holding the line `line`; its arrival
    /// time and text. Fails if `child` exits first.
    fn wait_nth(&self, line: &str, n: usize, child: &mut Child, log: &Path) -> (Instant, String) {
        wait_for(&format!("message {n} with {line:?}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "exited with {status} before {line:?}; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            self.seen().into_iter().filter(|(_, m)| m.lines().any(|l| l == line)).nth(n - 1)
        })
    }

    /// Stops the receiver; everything that arrived is in `seen`.
    fn finish(&mut self) {
        std::thread::sleep(Duration::from_millis(100)); // lets a datagram sent just before exit be received
        self.stop.store(true, Ordering::Relaxed);
        if let Some(receiver) = self.receiver.take() {
            receiver.join().expect("receiver thread");
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn spawn(args: &[String], notify: &NotifySocket, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(bin())
        .args(args)
        .env("NOTIFY_SOCKET", &notify.env)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env("RUST_LOG", "nixfleet=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn nixfleet")
}

fn sigterm_and_wait(child: &mut Child) -> ExitStatus {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    assert!(ok.success());
    wait_for("the process to exit", || child.try_wait().expect("try_wait"))
}

/// Every gap between consecutive pings is shorter than the timeout (what
/// systemd checks), and there are at least `n`.
fn assert_paced(pings: &[Instant], n: usize) {
    assert!(pings.len() >= n, "{} pings, wanted {n}", pings.len());
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap < WATCHDOG, "a gap of {gap:?} between pings; systemd kills at {WATCHDOG:?}");
        assert!(
            gap >= WATCHDOG / 2 - Duration::from_millis(200),
            "pinged after {gap:?}: throttled to half the timeout"
        );
    }
}

fn cp_args(dir: &Path, trust: &Path) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    ["cp", "serve", "--listen", "127.0.0.1:0", "--db", &path("cp.db"), "--trust-key"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([trust.display().to_string(), "--addr-file".into(), path("cp.addr")])
        .collect()
}

/// A plain `GET /healthz`, answered by the CP's connection tasks, not by the
/// writer: proves the process serves while its writer is wedged.
fn healthz(addr: &str) -> bool {
    let Ok(mut tcp) = std::net::TcpStream::connect(addr) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let mut answer = String::new();
    tcp.write_all(request.as_bytes()).is_ok()
        && tcp.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

#[test]
fn cp_serve_says_ready_when_it_serves_pings_from_its_writer_and_says_stopping() {
    let dir = TempDir::new("sd-cp");
    let release = Release::new(dir.path(), "release");
    let mut notify = NotifySocket::at_path(&dir.path().join("notify.sock"));
    let log = dir.path().join("cp.log");
    let mut cp = spawn(&cp_args(dir.path(), &release.pub_path), &notify, &log);

    let (_, ready) = notify.wait_nth("READY=1", 1, &mut cp, &log);
    let addr = std::fs::read_to_string(dir.path().join("cp.addr")).expect("address written before READY=1");
    assert!(healthz(addr.trim()), "READY=1 means it answers requests");
    assert!(ready.contains(&format!("STATUS=serving on {}", addr.trim())), "{ready:?}");

    // The planner tick (15 s) is shortened to a quarter of the watchdog, so
    // an idle writer still pings every second.
    let (start, _) = notify.wait_nth("WATCHDOG=1", 1, &mut cp, &log);
    notify.wait_nth("WATCHDOG=1", 4, &mut cp, &log);
    let pings: Vec<Instant> = notify.pings().into_iter().filter(|at| *at >= start).collect();
    assert_paced(&pings, 4);

    assert!(sigterm_and_wait(&mut cp).success(), "graceful exit");
    notify.finish();
    assert_eq!(notify.times_of("STOPPING=1").len(), 1, "{:?}", notify.seen());
    assert_eq!(notify.times_of("READY=1").len(), 1);
}

#[test]
fn a_wedged_cp_writer_stops_the_watchdog_pings_while_the_server_still_answers() {
    // The test holds SQLite's write lock, so the writer's publish waits
    // (busy_timeout 5 s) inside its transaction. If the pings came from a
    // timer, or from any task but the writer's loop, they would go on.
    let dir = TempDir::new("sd-wedge");
    let release = Release::new(dir.path(), "release");
    let notify = NotifySocket::at_path(&dir.path().join("notify.sock"));
    let log = dir.path().join("cp.log");
    let mut cp = spawn(&cp_args(dir.path(), &release.pub_path), &notify, &log);
    notify.wait_nth("READY=1", 1, &mut cp, &log);
    notify.wait_nth("WATCHDOG=1", 2, &mut cp, &log);
    let addr = std::fs::read_to_string(dir.path().join("cp.addr")).expect("address").trim().to_owned();

    let db = rusqlite::Connection::open(dir.path().join("cp.db")).expect("open the CP's database");
    db.execute_batch("BEGIN IMMEDIATE;").expect("take the write lock");
    let signed = dir.path().join("signed.json");
    let m = manifest("stable@sd-1", "2026-11-01T00:00:00Z", 0, &[("all", 60, 10)], &[("web-1", 0, "new")]);
    std::fs::write(&signed, release.sign(&m)).expect("write envelope");
    let sent = Instant::now();
    let mut publish = Command::new(bin())
        .args(["cp", "publish", "--cp", &format!("http://{addr}"), &signed.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cp publish");
    let mut served_while_wedged = false;
    let published = wait_for("cp publish to end", || {
        if !served_while_wedged && sent.elapsed() > Duration::from_millis(1500) {
            assert!(healthz(&addr), "connections are served while the writer waits");
            served_while_wedged = true;
        }
        publish.try_wait().expect("try_wait")
    });
    let answered = Instant::now();
    db.execute_batch("ROLLBACK;").expect("release the write lock");
    assert!(!published.success(), "the publish could not commit while the lock was held");
    assert!(served_while_wedged, "the wedge lasted {:?}", answered - sent);
    let window = (sent + Duration::from_millis(1000), answered - Duration::from_millis(500));
    // Longer than the watchdog timeout without a ping: systemd would restart it.
    assert!(window.1 - window.0 >= WATCHDOG, "the writer was wedged for only {:?}", answered - sent);
    let during: Vec<_> = notify.pings().into_iter().filter(|at| *at > window.0 && *at < window.1).collect();
    assert!(during.is_empty(), "{} pings while the writer was wedged", during.len());

    let before = notify.pings().len();
    notify.wait_nth("WATCHDOG=1", before + 2, &mut cp, &log);
    assert!(sigterm_and_wait(&mut cp).success());
}

#[test]
fn the_agent_says_ready_after_restoring_pings_from_its_reducer_and_says_stopping() {
    let dir = TempDir::new("sd-agent");
    let release = Release::new(dir.path(), "release");
    let cp = Cp::start(dir.path(), &release.pub_path);
    let mut notify = NotifySocket::in_abstract_namespace("agent");
    let log = dir.path().join("agent.log");
    let state = dir.path().join("state");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let args: Vec<String> = [
        "agent",
        "--state-dir",
        &state.display().to_string(),
        "--cp",
        &format!("http://{}", cp.url.authority()),
        "--hostname",
        "web-1",
        "--trust-key",
        &release.pub_path.display().to_string(),
        "--health-checks",
        &path("health-checks.json"),
        "--current-system",
        &path("current-system"),
        "--booted-system",
        &path("current-system"),
        // The default tick (5 s) is longer than the watchdog: the agent
        // must shorten it to keep an idle reducer pinging.
        "--tick",
        "5s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut agent = spawn(&args, &notify, &log);
    let (_, ready) = notify.wait_nth("READY=1", 1, &mut agent, &log);
    assert!(ready.contains("STATUS=running as web-1"), "{ready:?}");
    assert!(state.join("outbound-queue").is_dir(), "READY=1 comes after the queue is open");
    let (start, _) = notify.wait_nth("WATCHDOG=1", 1, &mut agent, &log);
    notify.wait_nth("WATCHDOG=1", 4, &mut agent, &log);
    let pings: Vec<Instant> = notify.pings().into_iter().filter(|at| *at >= start).collect();
    assert_paced(&pings, 4);
    assert!(sigterm_and_wait(&mut agent).success(), "graceful exit");
    notify.finish();
    assert_eq!(notify.times_of("STOPPING=1").len(), 1, "{:?}", notify.seen());

    // An agent that cannot rebuild its state never says it is ready.
    std::fs::write(state.join("accepted-channels.json"), b"{not json").expect("corrupt the history");
    let mut notify = NotifySocket::at_path(&dir.path().join("notify2.sock"));
    let mut agent = spawn(&args, &notify, &log);
    let status = wait_for("the agent to refuse to start", || agent.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(1), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    notify.finish();
    assert!(notify.times_of("READY=1").is_empty(), "{:?}", notify.seen());
}

/// Run by [`the_command_entry_points_take_the_variables_out_of_the_environment`]
/// in a process of its own (changing the environment is only safe there):
/// the parameter is the `WATCHDOG_USEC` it expects to be honoured, or `none`.
#[test]
#[ignore = "a child process of the_command_entry_points_take_the_variables_out_of_the_environment"]
fn take_from_env_child() {
    let Some(expected) = child_param() else { return };
    let notifier = Notifier::take_from_env();
    for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(std::env::var_os(name).is_none(), "{name} is still set for children");
    }
    let wake = notifier.watchdog().wake_interval();
    match expected.as_str() {
        "none" => assert_eq!(wake, None),
        usec => assert_eq!(wake, Some(Duration::from_micros(usec.parse().expect("usec")) / 4)),
    }
    notifier.ready("child");
}

#[test]
fn the_command_entry_points_take_the_variables_out_of_the_environment() {
    // Proves probes and switches started by the agent cannot notify in its
    // name, and that WATCHDOG_PID naming another process turns the
    // watchdog off while READY=1 still goes out.
    let dir = TempDir::new("sd-env");
    for (label, pid, expected) in [("ours", None, "2000000"), ("theirs", Some("1"), "none")] {
        let notify = NotifySocket::at_path(&dir.path().join(format!("{label}.sock")));
        let mut child = child_test("sdnotify::take_from_env_child", expected);
        child.env("NOTIFY_SOCKET", &notify.env).env("WATCHDOG_USEC", "2000000").stdout(Stdio::null());
        if let Some(pid) = pid {
            child.env("WATCHDOG_PID", pid);
        }
        let status = child.status().expect("run the child test");
        assert!(status.success(), "{label}: the child's checks failed");
        wait_for("READY=1 from the child", || notify.times_of("READY=1").first().copied());
    }
}

/// A journal whose appends wait until the test opens the gate: a reducer
/// stuck on its journal, as on a hung disk.
#[derive(Debug, Clone)]
struct GatedJournal {
    open: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl Journal for GatedJournal {
    async fn append(&mut self, _: &RolloutId, _: &OutboundEvent) -> Result<(), JournalError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let permit = self.open.acquire().await.map_err(|e| JournalError::Failed(e.to_string()));
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.map(drop)
    }
}

/// Feeds the reducer a tick every 50 ms (the agent's tick worker, faster)
/// until `done` holds; panics after the harness deadline.
async fn tick_until(inputs: &tokio::sync::mpsc::Sender<Input>, what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < crate::harness::DEADLINE, "timed out waiting for {what}");
        let _ = inputs.try_send(Input::Tick { now: ClockHandle::system().now() });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_agent_reducer_stops_the_watchdog_pings_until_it_moves_again() {
    // Proves the agent's pings come from the reducer's loop: ticks keep
    // arriving, but while one input waits on the journal none is handled,
    // so no WATCHDOG=1; once the journal answers, the pings resume.
    let dir = TempDir::new("sd-reducer");
    let notify = NotifySocket::at_path(&dir.path().join("notify.sock"));
    let timeout = Duration::from_millis(400);
    let notifier = Notifier::new(notify.env.as_ref(), Some(timeout)).expect("notifier");
    let journal = GatedJournal { open: Arc::new(Semaphore::new(0)), waiting: Arc::default() };
    let (cmds, _rx) = commands();
    let host = Hostname::parse("web-1").expect("valid");
    let (reducer, _snapshot) = Reducer::new(Rollouts::new(host), journal.clone(), cmds);
    let (inputs, inputs_rx) = tokio::sync::mpsc::channel(INPUT_CAPACITY);
    let task = tokio::spawn(reducer.run_pinging(inputs_rx, notifier.watchdog()));

    tick_until(&inputs, "pings from a reducer handling ticks", || notify.pings().len() >= 2).await;

    let at = ClockHandle::system().now();
    let closure = |c: char| Closure::parse(&format!("/nix/store/{}-system", c.to_string().repeat(32))).expect("valid");
    let dispatch = Input::Dispatch {
        rollout_id: RolloutId::parse("stable@wedge").expect("valid"),
        policy: Policy { on_health_failure: OnHealthFailure::RollbackAndHalt, sustained_failure_secs: 60 },
        target_closure: closure('1'),
        soak_secs: 60,
        current_closure: closure('0'),
        issued_at: at,
        at,
    };
    inputs.send(dispatch).await.expect("reducer alive");
    tick_until(&inputs, "the reducer to wait on its journal", || journal.waiting.load(Ordering::SeqCst) == 1).await;
    // A ping sent just before the wedge may still be on its way to the
    // receiving thread; 100 ms covers it, and pings are due every 200 ms.
    let wedged_at = Instant::now() + Duration::from_millis(100);
    let wedge_ends = wedged_at + 3 * timeout;
    tick_until(&inputs, "three watchdog timeouts of a wedged reducer", || Instant::now() > wedge_ends).await;
    let during = notify.pings().into_iter().filter(|at| *at > wedged_at).count();
    assert_eq!(during, 0, "pings while the reducer waited on its journal");

    journal.open.add_permits(Semaphore::MAX_PERMITS / 2);
    let after = || notify.pings().into_iter().filter(|at| *at > wedge_ends).count();
    tick_until(&inputs, "pings once the journal answered", || after() >= 2).await;
    drop(inputs);
    task.await.expect("reducer ends");
}

/// `systemd-analyze verify` on the units as shipped, with the binary path
/// pointed at the built `nixfleet` (verify checks that it is executable).
#[test]
fn the_systemd_units_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("skipped: systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    };
    assert!(out.status.success(), "systemd-analyze --version failed");
    let dir = TempDir::new("sd-units");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut paths = Vec::new();
    for name in ["nixfleet-cp.service", "nixfleet-agent.service"] {
        let text = std::fs::read_to_string(units.join(name)).expect("unit");
        for line in ["Type=notify", "NotifyAccess=main"] {
            assert!(text.lines().any(|l| l == line), "{name} lacks {line}");
        }
        assert!(text.lines().any(|l| l.starts_with("WatchdogSec=")), "{name} lacks WatchdogSec=");
        assert!(text.contains("/usr/local/bin/nixfleet "), "{name}: ExecStart names the installed binary");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/nixfleet ", &format!("{} ", bin()))).expect("write unit");
        paths.push(path);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&paths).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values: its warnings are the verdict.
    let about_units: Vec<&str> = stderr.lines().filter(|l| l.contains("nixfleet")).collect();
    assert!(out.status.success() && about_units.is_empty(), "systemd-analyze verify:\n{stderr}");
}

/// The check above must be able to fail: a misspelt key is reported.
#[test]
fn systemd_analyze_verify_reports_a_misspelt_key() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = TempDir::new("sd-badunit");
    let path = dir.path().join("nixfleet-bad.service");
    std::fs::write(&path, "[Service]\nType=notify\nWatchdogSecs=60s\nExecStart=/bin/true\n").expect("unit");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.contains("nixfleet-bad.service") && l.contains("WatchdogSecs")), "{stderr}");
}
