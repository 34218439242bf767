//! `exec` probes: run a program, Pass when it exits with the expected code
//! within its timeout. The program runs in its own process group so a
//! timeout kills everything it started, not just the first process.

use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::Command;

use super::ProbeRun;
use crate::agent::activation::utf8_tail;

/// Output kept from a probe program for its failure reason: the reason is
/// capped at 512 bytes anyway, and the rest is drained so a chatty program
/// never blocks on a full pipe.
pub const EXEC_OUTPUT_TAIL_BYTES: usize = 400;

/// Runs `argv` once.
pub async fn run(argv: &[String], timeout: Duration, expect_exit_code: i32) -> ProbeRun {
    let Some((program, args)) = argv.split_first() else {
        return ProbeRun::fail("exec probe has an empty argv");
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return ProbeRun::fail(format!("cannot run {program}: {e}")),
    };
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let waited = tokio::time::timeout(timeout, async {
        let (out, err, status) = tokio::join!(drain_tail(stdout), drain_tail(stderr), child.wait());
        (out, err, status)
    })
    .await;
    let (out, err, status) = match waited {
        Ok(done) => done,
        Err(_elapsed) => {
            if let Some(group) = pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw) {
                // The group may already be gone; kill_on_drop reaps the leader.
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            return ProbeRun::fail(format!("{program} timed out after {} s and was killed", timeout.as_secs()));
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => return ProbeRun::fail(format!("waiting for {program}: {e}")),
    };
    let output = if err.trim().is_empty() { out } else { err };
    let output = output.trim();
    let said = if output.is_empty() { String::new() } else { format!(": {output}") };
    match (status.code(), status.signal()) {
        (Some(code), _) if code == expect_exit_code => ProbeRun::pass(),
        (Some(code), _) => ProbeRun::fail(format!("{program} exited {code} (expected {expect_exit_code}){said}")),
        (None, sig) => ProbeRun::fail(format!("{program} was killed by signal {}{said}", sig.unwrap_or(0))),
    }
}

/// Reads a pipe to its end, keeping only the last [`EXEC_OUTPUT_TAIL_BYTES`].
async fn drain_tail(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else { return String::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * EXEC_OUTPUT_TAIL_BYTES {
                    kept.drain(..kept.len() - EXEC_OUTPUT_TAIL_BYTES);
                }
            }
        }
    }
    utf8_tail(&kept, EXEC_OUTPUT_TAIL_BYTES)
}
