//! `tcp` probes: Pass when a TCP connection to host:port is established
//! within the timeout; the connection is closed at once.

use std::time::Duration;

use tokio::net::TcpStream;

use super::ProbeRun;

/// Connects once to `host:port` (a name is resolved on every run, so a DNS
/// failure is a Fail like any other).
pub async fn run(host: &str, port: u16, timeout: Duration) -> ProbeRun {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(_stream)) => ProbeRun::pass(),
        Ok(Err(e)) => ProbeRun::fail(format!("connect to {host}:{port}: {e}")),
        Err(_elapsed) => ProbeRun::fail(format!("connect to {host}:{port} timed out after {} s", timeout.as_secs())),
    }
}
