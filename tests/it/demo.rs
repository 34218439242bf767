//! `nixfleet demo` as a new user runs it: the real binary, with real Nix and
//! with a PATH that has no `nix-store` (the demo's stand-in mode), as an
//! unprivileged user who may not write `/nix/store`, `--hosts`, and Ctrl-C /
//! SIGTERM mid-run.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::harness::{TempDir, DEADLINE};

/// The final table's label in stand-in mode.
const STAND_IN_LABEL: &str = "STAND-IN closures: plain directories, no Nix";

fn demo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nixfleet"))
}

fn has_real_nix() -> bool {
    Command::new("nix-store").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A PATH with no `nix-store`: a directory holding only a link to `setsid`,
/// the one program the demo's agents look up on PATH in stand-in mode.
fn path_without_nix(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs_err::create_dir_all(&bin).expect("mkdir bin");
    let setsid = ["/usr/bin/setsid", "/bin/setsid"].into_iter().find(|p| Path::new(p).exists()).expect("setsid");
    std::os::unix::fs::symlink(setsid, bin.join("setsid")).expect("link setsid");
    bin
}

/// The work dir the demo announced on its second line.
fn work_dir(stdout: &str) -> PathBuf {
    let line =
        stdout.lines().find(|l| l.contains("] work dir ")).unwrap_or_else(|| panic!("no work dir in:\n{stdout}"));
    PathBuf::from(line.split("] work dir ").nth(1).expect("work dir path").trim())
}

/// Whether this user may write `/nix/store` (creating it if missing), as
/// the demo decides: else its stand-in closures go to its work dir's store.
fn nix_store_writable() -> bool {
    let nix_store = Path::new("/nix/store");
    std::fs::create_dir_all(nix_store).is_ok()
        && rustix::fs::access(nix_store, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK).is_ok()
}

/// The store directory of the stand-in run whose work dir is `work`, and
/// the `NIX_STORE_DIR=… ` a command reading that run's data needs.
fn run_store(work: &Path) -> (PathBuf, String) {
    if nix_store_writable() {
        ("/nix/store".into(), String::new())
    } else {
        let store = work.join("store");
        let env = format!("NIX_STORE_DIR={} ", store.display());
        (store, env)
    }
}

/// The final table's label of the stand-in run whose work dir is `work`.
fn stand_in_label(work: &Path) -> String {
    if nix_store_writable() {
        STAND_IN_LABEL.to_owned()
    } else {
        own_store_label(work)
    }
}

/// Store entries made by the run whose work dir is `work` (its nonce is in their names).
fn closures_left(work: &Path) -> Vec<String> {
    let name = work.file_name().expect("work dir name").to_string_lossy();
    let nonce = name.trim_start_matches("nixfleet-demo-");
    let (store, _) = run_store(work);
    let entries = std::fs::read_dir(store).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    entries
        .into_iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&format!("-{nonce}-")))
        .collect()
}

fn assert_story(out: &Output, n_hosts: usize, mode_line: &str, table_label: Option<&str>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table_label = table_label.map_or_else(|| stand_in_label(&work_dir(&stdout)), str::to_owned);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let first = stdout.lines().next().unwrap_or("");
    assert!(first.contains(&format!("nixfleet demo, {n_hosts} hosts, ")), "{first}");
    assert!(first.contains(mode_line), "first line {first:?} lacks {mode_line:?}");
    let last_host = format!("web-{n_hosts}");
    for line in [
        "control plane on https://127.0.0.1:",
        "(mutual TLS;",
        "rollout converging (wave 1)",
        "web-1  Soaking -> Converged",
        "rollout halted (wave 1): 1 host(s) failed (web-3)",
        &format!("closures: {table_label}\nHOST    WAVE  STATE       RUNNING     NOTE\n"),
        "web-1   0     Converged   new",
        "web-3   1     Reverted    old         sustained_probe_failure",
        &format!("{last_host:<7} 1     Converged   new"),
        // The closing lines come from the CP's answer (Reverted, the failure's cause, /v1/status's
        // quarantine list): only web-3 failed, and nothing is said about another host.
        "\nweb-3: its probe failed, it rolled back to the closure it ran before, and its closure is quarantined.\n",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains('\x1b'), "piped output must be plain lines:\n{stdout}");
    // The agents stop before the CP: none outlives it and logs a refused
    // connection under the final table.
    assert!(!stderr.contains("Connection refused"), "an agent outlived the CP:\n{stderr}");
    let closing: Vec<&str> = stdout.lines().filter(|l| l.contains(", and its closure is")).collect();
    assert_eq!(closing.len(), 1, "one closing sentence per failed host, and only web-3 failed:\n{stdout}");
    assert!(!stdout.contains("scripted to fail"), "the scripted host did fail:\n{stdout}");
    let work = work_dir(&stdout);
    assert!(!work.exists(), "work dir {} left behind", work.display());
    assert_eq!(closures_left(&work), Vec::<String>::new(), "closures left in the store");
}

#[test]
fn the_demo_with_nix_rolls_out_two_waves_rolls_one_host_back_and_halts() {
    // With real Nix the closures are real store paths, the first line and the
    // table say so, and the story (canary, halt, web-3 reverted) is printed.
    if !has_real_nix() {
        println!("nix: absent; the stand-in test below covers this machine");
        return;
    }
    println!("nix: real");
    let out = demo().arg("demo").output().expect("run demo");
    assert_story(&out, 4, "with Nix (nix-store (Nix)", Some("real Nix store paths"));
}

#[test]
fn the_demo_without_nix_store_on_path_runs_with_labelled_stand_in_closures() {
    // A PATH without nix-store: the demo does not refuse, it runs the same
    // story with stand-in closures, says so first and in the table, and
    // removes its plain-directory closures at the end.
    let dir = TempDir::new("demo-no-nix");
    let out = demo().arg("demo").env("PATH", path_without_nix(dir.path())).output().expect("run demo");
    assert_story(&out, 4, "WITHOUT Nix (no nix-store on PATH): STAND-IN closures", None);
}

/// The final table's label when the stand-ins live in the work dir's store.
fn own_store_label(work: &Path) -> String {
    format!(
        "{STAND_IN_LABEL}; store dir {}/store (as NIX_STORE_DIR: /nix/store is not writable by this user)",
        work.display()
    )
}

/// The demo binary, run by a user who may not write `/nix/store`: `nobody`
/// through setpriv(1) when this test runs as root (as CI does), else this
/// user. A copy of the binary in `dir` (any user can run it there), a PATH
/// without `nix-store`, HOME and TMPDIR in a directory that user owns, and
/// nothing else from this environment. None where the test cannot arrange
/// it (a user who may write `/nix/store` and cannot become another).
struct Unprivileged {
    exe: PathBuf,
    /// setpriv(1), found on this test's PATH (the child's has none).
    setpriv: Option<PathBuf>,
    path: PathBuf,
    home: PathBuf,
}

impl Unprivileged {
    fn command(&self) -> Command {
        let mut cmd = if let Some(setpriv) = &self.setpriv {
            let mut setpriv = Command::new(setpriv);
            setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&self.exe);
            setpriv
        } else {
            Command::new(&self.exe)
        };
        cmd.env_clear().env("PATH", &self.path).env("HOME", &self.home).env("TMPDIR", &self.home);
        cmd
    }
}

fn unprivileged_demo(dir: &Path) -> Option<Unprivileged> {
    use std::os::unix::fs::PermissionsExt as _;
    let nix_store = Path::new("/nix/store");
    let root = rustix::process::geteuid().is_root();
    let world_writable = std::fs::metadata(nix_store).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
    let writable_here = rustix::fs::access(nix_store, rustix::fs::Access::WRITE_OK).is_ok();
    if world_writable || (!root && writable_here) {
        println!("/nix/store is writable by every user or by this one: no unprivileged user to run the demo as");
        return None;
    }
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod test dir");
    let home = dir.join("home");
    fs_err::create_dir_all(&home).expect("mkdir home");
    fs_err::set_permissions(&home, std::fs::Permissions::from_mode(0o1777)).expect("chmod home");
    let exe = dir.join("nixfleet");
    fs_err::copy(env!("CARGO_BIN_EXE_nixfleet"), &exe).expect("copy the binary");
    let setpriv = if root {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let found = std::env::split_paths(&path).map(|d| d.join("setpriv")).find(|p| p.is_file());
        Some(found.expect("setpriv(1) (util-linux) to run the demo as nobody"))
    } else {
        None
    };
    Some(Unprivileged { exe, setpriv, path: path_without_nix(dir), home })
}

#[test]
fn the_demo_without_nix_runs_for_a_user_who_may_not_write_nix_store() {
    // An unprivileged user, no nix-store on PATH, no writable /nix/store: the
    // stand-in closures go to the work dir's store (NIX_STORE_DIR for the
    // whole run), the first line and the table say so, the story is the
    // same, and nothing is left in the work dir or /nix/store.
    let dir = TempDir::new("demo-nobody");
    let Some(user) = unprivileged_demo(dir.path()) else { return };
    let out = user.command().arg("demo").output().expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let work = work_dir(&stdout);
    assert!(work.starts_with(dir.path().join("home")), "work dir {} not in TMPDIR", work.display());
    let first = format!(
        "WITHOUT Nix (no nix-store on PATH): STAND-IN closures, plain directories under {}/store (as \
         NIX_STORE_DIR: /nix/store is not writable by this user)",
        work.display()
    );
    assert_story(&out, 4, &first, Some(&own_store_label(&work)));
}

#[test]
fn a_kept_unprivileged_run_says_how_to_read_its_store() {
    // --keep in the work dir's store: the printed replay command sets
    // NIX_STORE_DIR, and it is needed: the kept CP database names closures in
    // that store, which a replay with the default store refuses.
    let dir = TempDir::new("demo-nobody-keep");
    let Some(user) = unprivileged_demo(dir.path()) else { return };
    let out = user.command().args(["demo", "--hosts", "2", "--keep"]).output().expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let work = work_dir(&stdout);
    let store = work.join("store");
    let kept = format!("`NIX_STORE_DIR={} nixfleet replay --db {}/cp.db`", store.display(), work.display());
    assert!(stdout.contains(&kept), "missing {kept:?} in:\n{stdout}");
    assert_eq!(fs_err::read_dir(&store).expect("kept store").count(), 4, "two closures per host are kept");
    let replay = |store_dir: Option<&Path>| {
        let mut cmd = user.command();
        cmd.args(["replay", "--db"]).arg(work.join("cp.db"));
        if let Some(store_dir) = store_dir {
            cmd.env("NIX_STORE_DIR", store_dir);
        }
        cmd.output().expect("run replay")
    };
    let out = replay(Some(&store));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = replay(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a replay in /nix/store must refuse closures elsewhere:\n{stderr}");
    assert!(stderr.contains("must start with /nix/store/"), "{stderr}");
}

#[test]
fn the_demo_runs_seven_hosts() {
    // --hosts 7: seven agents, web-1 the canary, web-2..web-7 the second wave.
    let dir = TempDir::new("demo-7");
    let out = demo().args(["demo", "--hosts", "7"]).env("PATH", path_without_nix(dir.path())).output().expect("run");
    assert_story(&out, 7, "WITHOUT Nix", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wave 1 = web-2 web-3 web-4 web-5 web-6 web-7"), "{stdout}");
}

#[test]
fn the_demo_refuses_a_host_count_outside_its_range_with_a_usage_error() {
    // 0, 1 and 33 hosts are usage errors (exit 2) naming the allowed range;
    // nothing starts.
    for bad in ["0", "1", "33", "many"] {
        let out = demo().args(["demo", "--hosts", bad]).output().expect("run demo");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--hosts {bad}: {stderr}");
        assert!(stderr.contains("--hosts"), "--hosts {bad}: {stderr}");
        let expected = if bad == "many" { "is not a number of hosts" } else { "the demo runs 2 to 32 hosts" };
        assert!(stderr.contains(expected), "--hosts {bad}: {stderr}");
        assert!(out.stdout.is_empty(), "--hosts {bad} started a demo");
    }
}

/// Every process whose environment holds `marker`: the demo's descendants,
/// whichever session or process group they moved to.
fn processes_marked(marker: &str) -> Vec<String> {
    let needle = format!("NIXFLEET_DEMO_TEST_MARK={marker}");
    let procs = std::fs::read_dir("/proc").map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    procs
        .into_iter()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            format!("{} {}", e.file_name().to_string_lossy(), String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

/// Members of process group `pgid`.
fn group_members(pgid: u32) -> Vec<String> {
    let procs = std::fs::read_dir("/proc").map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    procs
        .into_iter()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok().map(|s| (e.file_name(), s)))
        .filter(|(_, stat)| {
            // Fields after the command's closing parenthesis: state ppid pgrp …
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(2) == Some(&pgid.to_string()) && rest.split_whitespace().next() != Some("Z")
        })
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect()
}

/// Starts the demo in its own process group, waits until its agents are
/// activating, sends `signal`, and checks that nothing of the run remains.
fn interrupt_mid_run(signal: rustix::process::Signal, name: &str, path: Option<PathBuf>) {
    let marker = format!("{}-{}", std::process::id(), name);
    let mut cmd = demo();
    cmd.arg("demo").env("NIXFLEET_DEMO_TEST_MARK", &marker).process_group(0);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let mut child = cmd.spawn().expect("start demo");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut seen, mut line) = (String::new(), String::new());
    let started = Instant::now();
    // Mid-run: the canary is activating or soaking, the agents and the CP are up.
    while !(seen.contains("web-1  Pending -> ") || seen.contains("web-1  Activating -> ")) {
        line.clear();
        let n = stdout.read_line(&mut line).expect("read demo stdout");
        assert!(n > 0 && started.elapsed() < DEADLINE * 3, "the demo ended or stalled before mid-run:\n{seen}");
        seen.push_str(&line);
    }
    assert!(!processes_marked(&marker).is_empty(), "the marker must reach the demo itself");
    let demo_pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(demo_pid, signal).expect("signal the demo");
    let out = child.wait_with_output().expect("wait for the demo");
    let work = work_dir(&seen);
    assert!(!work.exists(), "work dir {} left behind", work.display());
    assert_eq!(closures_left(&work), Vec::<String>::new(), "closures left in the store");
    assert_eq!(processes_marked(&marker), Vec::<String>::new(), "processes of the demo still run");
    assert_eq!(group_members(pid), Vec::<String>::new(), "the demo's process group still has members");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted demo must exit non-zero; stderr:\n{stderr}");
    assert!(stderr.contains(&format!("demo interrupted by {name}")), "{stderr}");
}

#[test]
fn ctrl_c_mid_run_stops_every_child_and_removes_the_work_dir_and_closures() {
    // SIGINT (what Ctrl-C sends) while the canary activates: the demo exits
    // non-zero saying it was interrupted, and no process, work dir or
    // closure of the run remains.
    if has_real_nix() {
        println!("nix: real");
    }
    interrupt_mid_run(rustix::process::Signal::INT, "SIGINT", None);
}

#[test]
fn sigterm_mid_run_without_nix_cleans_up_the_same_way() {
    // SIGTERM in stand-in mode: the plain-directory closures under /nix/store go too.
    let dir = TempDir::new("demo-term");
    interrupt_mid_run(rustix::process::Signal::TERM, "SIGTERM", Some(path_without_nix(dir.path())));
}

#[test]
fn keep_leaves_the_work_dir_and_says_how_to_look_at_it() {
    // --keep: the work dir stays, the demo prints its path and the replay
    // and queue commands, and `replay` of the kept CP database agrees.
    let dir = TempDir::new("demo-keep");
    let out = demo()
        .args(["demo", "--hosts", "2", "--keep"])
        .env("PATH", path_without_nix(dir.path()))
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let work = work_dir(&stdout);
    let left = closures_left(&work);
    let (store, env) = run_store(&work);
    // The kept run is this test's to remove, whatever happens below.
    let cleanup = scopeguard(|| {
        let _ = std::fs::remove_dir_all(&work);
        for name in &left {
            let _ = std::fs::remove_dir_all(store.join(name));
        }
    });
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(work.join("cp.db").is_file(), "no cp.db in the kept {}", work.display());
    assert_eq!(left.len(), 4, "two closures per host are kept: {left:?}");
    let kept = format!("kept {w}: `{env}nixfleet replay --db {w}/cp.db`", w = work.display());
    assert!(stdout.contains(&kept), "missing {kept:?} in:\n{stdout}");
    assert!(
        stdout.contains(&format!("`{env}nixfleet queue ls --state-dir {}/web-2/state --all`", work.display())),
        "{stdout}"
    );
    let mut replay = demo();
    if !env.is_empty() {
        replay.env("NIX_STORE_DIR", &store);
    }
    let replay = replay.args(["replay", "--db"]).arg(work.join("cp.db")).output().expect("run replay");
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    drop(cleanup);
}

/// Runs `f` when dropped (also when the test panics).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[test]
fn on_a_terminal_the_rollout_is_a_view_redrawn_in_place() {
    // Under a pseudo-terminal (util-linux `script`) stdout is a terminal: the
    // view (rollout, waves, hosts with their time in state) is redrawn by
    // moving the cursor up over the previous one, and the table follows.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(script) = std::env::split_paths(&path).map(|d| d.join("script")).find(|p| p.is_file()) else {
        println!("script(1) absent: no pseudo-terminal to run the demo on");
        return;
    };
    let dir = TempDir::new("demo-tty");
    let command = format!("{} demo --hosts 2", env!("CARGO_BIN_EXE_nixfleet"));
    let out = Command::new(script)
        .args(["-qefc", &command, "/dev/null"])
        .env("PATH", path_without_nix(dir.path()))
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let tty = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    assert!(out.status.success(), "{tty}\n{}", String::from_utf8_lossy(&out.stderr));
    // Five lines: the rollout, two waves, two hosts.
    let redraws = tty.matches("\x1b[5F\x1b[J").count();
    assert!(redraws >= 5, "{redraws} redraws in:\n{tty}");
    for line in ["] rollout stable@demo-1 converging (wave 1)", "  wave 0 canary   done", "    web-1    Converged "] {
        assert!(tty.contains(line), "missing {line:?} in:\n{tty}");
    }
    assert!(tty.contains(&format!("closures: {}\n", stand_in_label(&work_dir(&tty)))), "{tty}");
    assert!(!tty.contains("web-1  Pending -> "), "per-change lines are for piped output:\n{tty}");
}
