//! The service manager's notification protocol (sd_notify), so a systemd
//! unit of `Type=notify` learns when a role serves (`READY=1`), that it is
//! stopping (`STOPPING=1`), and that the loop that matters still turns
//! (`WATCHDOG=1`: the CP's store writer, the agent's reducer). A wedged loop
//! stops pinging and systemd restarts the process after `WatchdogSec=`.
//!
//! One datagram per message, `KEY=VALUE` lines, to the socket named by
//! `NOTIFY_SOCKET`: a file-system path, or `@name` for the abstract
//! namespace. Without `NOTIFY_SOCKET` every call does nothing, so the roles
//! behave the same outside systemd. Only the command entry points read the
//! environment ([`Notifier::take_from_env`]); the library entry points
//! (tests, the demo's in-process roles) run with [`Notifier::disabled`].

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The variables systemd sets for the protocol; removed from the process
/// environment once read, so children (probes, switches, `nix-store`) do not
/// notify on the agent's behalf.
const ENV_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Where notifications go; `Default` (no socket) sends nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    /// `WatchdogSec=` as systemd passed it (`WATCHDOG_USEC`), when it is ours.
    watchdog_timeout: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for log lines.
    name: String,
}

impl Notifier {
    /// Sends nothing: outside a service manager, and for in-process roles.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then removes
    /// them from the environment (see [`ENV_VARS`]). Call it before other
    /// threads start. An unusable value is logged and notifications are off:
    /// a supervisor that sets garbage should not stop the role (systemd then
    /// reports the missing `READY=1` itself).
    pub fn take_from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for name in ENV_VARS {
            std::env::remove_var(name);
        }
        let Some(socket) = socket else { return Notifier::disabled() };
        let watchdog_timeout = match watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id()) {
            Ok(timeout) => timeout,
            Err(why) => {
                tracing::error!("{why}; the watchdog is not pinged");
                None
            }
        };
        Notifier::new(&socket, watchdog_timeout).unwrap_or_else(|e| {
            tracing::error!(notify_socket = ?socket, error = %e, "cannot use NOTIFY_SOCKET; not notifying the service manager");
            Notifier::disabled()
        })
    }

    /// Notifies `notify_socket` (a path, or `@name` in the abstract
    /// namespace); `watchdog_timeout` is the service's `WatchdogSec=`, if any.
    pub fn new(notify_socket: &OsStr, watchdog_timeout: Option<Duration>) -> io::Result<Notifier> {
        let addr = match notify_socket.as_bytes().split_first() {
            Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
            Some((b'/', _)) => SocketAddr::from_pathname(notify_socket)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NOTIFY_SOCKET must be an absolute path or an @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A full receive queue drops a message instead of stalling the
        // reducer's runtime thread; the next ping is another chance.
        socket.set_nonblocking(true)?;
        let name = notify_socket.to_string_lossy().into_owned();
        Ok(Notifier { target: Some(Arc::new(Target { socket, addr, name })), watchdog_timeout })
    }

    /// `READY=1`: the role serves. `status` is shown by `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// The pinger for the one loop whose progress means the process is alive.
    pub fn watchdog(&self) -> Watchdog {
        match (&self.target, self.watchdog_timeout) {
            (Some(target), Some(timeout)) => {
                Watchdog { target: Some(Arc::clone(target)), timeout, last_ping: None, failing: false }
            }
            _ => Watchdog::disabled(),
        }
    }

    fn send(&self, message: &str) {
        if let Some(target) = &self.target {
            if let Err(e) = target.send(message) {
                tracing::warn!(notify_socket = %target.name, error = %e, "cannot notify the service manager");
            }
        }
    }
}

impl Target {
    fn send(&self, message: &str) -> io::Result<()> {
        self.socket.send_to_addr(message.as_bytes(), &self.addr).map(drop)
    }
}

/// `WATCHDOG_USEC` → the timeout, `None` when unset, zero, or meant for
/// another process (`WATCHDOG_PID` names it).
fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().map_err(|_| format!("WATCHDOG_PID={pid:?} is not a process id"))?;
        if pid != own_pid {
            return Ok(None);
        }
    }
    let usec: u64 =
        usec.trim().parse().map_err(|_| format!("WATCHDOG_USEC={usec:?} is not a number of microseconds"))?;
    Ok((usec > 0).then(|| Duration::from_micros(usec)))
}

/// Pings `WATCHDOG=1` at most once per half of the timeout, however often
/// [`Watchdog::ping`] is called, so a loop can call it on every turn.
#[derive(Debug)]
pub struct Watchdog {
    target: Option<Arc<Target>>,
    timeout: Duration,
    last_ping: Option<Instant>,
    /// Log a failing send once, not on every ping.
    failing: bool,
}

impl Watchdog {
    pub fn disabled() -> Watchdog {
        Watchdog { target: None, timeout: Duration::ZERO, last_ping: None, failing: false }
    }

    /// How often the pinging loop must turn at the least (its idle wake-up:
    /// the CP's planner tick, the agent's tick). A quarter of the timeout: a
    /// ping falls due at half, so one is sent at most three quarters of the
    /// timeout after the previous one. `None` without a watchdog.
    pub fn wake_interval(&self) -> Option<Duration> {
        self.target.as_ref().map(|_| self.timeout / 4)
    }

    /// One turn of the loop: sends `WATCHDOG=1` when half the timeout has
    /// passed since the last ping.
    pub fn ping(&mut self) {
        let Some(target) = &self.target else { return };
        let now = Instant::now();
        if self.last_ping.is_some_and(|last| now.duration_since(last) < self.timeout / 2) {
            return;
        }
        match target.send("WATCHDOG=1") {
            Ok(()) => {
                self.last_ping = Some(now);
                self.failing = false;
            }
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(notify_socket = %target.name, error = %e, "cannot ping the service manager's watchdog");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        // Proves both NOTIFY_SOCKET forms systemd uses are addressed right.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind path");
        listener.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let notifier = Notifier::new(path.as_os_str(), None).expect("notifier");
        notifier.ready("serving");
        assert_eq!(receive(&listener), "READY=1\nSTATUS=serving");

        let name = format!("nixfleet-unit-{}", std::process::id());
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let listener = UnixDatagram::bind_addr(&abstract_addr).expect("bind abstract");
        listener.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let notifier = Notifier::new(OsStr::new(&format!("@{name}")), None).expect("notifier");
        notifier.stopping("stopping");
        assert_eq!(receive(&listener), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        let e = Notifier::new(OsStr::new("run/notify"), None).expect_err("relative path");
        assert!(e.to_string().contains("absolute path or an @abstract name"), "{e}");
    }

    #[test]
    fn the_watchdog_pings_at_most_once_per_half_timeout() {
        // Proves a loop may call ping on every turn: a burst of calls sends
        // one WATCHDOG=1, and the next is sent once half the timeout passed.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let timeout = Duration::from_millis(200);
        let mut dog = Notifier::new(path.as_os_str(), Some(timeout)).expect("notifier").watchdog();
        assert_eq!(dog.wake_interval(), Some(Duration::from_millis(50)));
        for _ in 0..100 {
            dog.ping();
        }
        let mut buf = [0u8; 64];
        assert_eq!(listener.recv(&mut buf).expect("one ping"), "WATCHDOG=1".len());
        assert!(listener.recv(&mut buf).is_err(), "the burst sent one ping");
        std::thread::sleep(timeout / 2);
        dog.ping();
        assert_eq!(listener.recv(&mut buf).expect("second ping"), "WATCHDOG=1".len());
    }

    #[test]
    fn without_a_socket_or_a_timeout_there_is_no_watchdog() {
        assert_eq!(Notifier::disabled().watchdog().wake_interval(), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let _listener = UnixDatagram::bind(&path).expect("bind");
        assert_eq!(Notifier::new(path.as_os_str(), None).expect("notifier").watchdog().wake_interval(), None);
    }

    #[test]
    fn watchdog_usec_is_honoured_only_for_this_process() {
        assert_eq!(watchdog_timeout(None, None, 7), Ok(None));
        assert_eq!(watchdog_timeout(Some("30000000"), None, 7), Ok(Some(Duration::from_secs(30))));
        assert_eq!(watchdog_timeout(Some("30000000"), Some("7"), 7), Ok(Some(Duration::from_secs(30))));
        assert_eq!(watchdog_timeout(Some("30000000"), Some("8"), 7), Ok(None), "another process's watchdog");
        assert_eq!(watchdog_timeout(Some("0"), None, 7), Ok(None), "zero turns it off");
        let e = watchdog_timeout(Some("30s"), None, 7).expect_err("not microseconds");
        assert!(e.contains("WATCHDOG_USEC=\"30s\""), "{e}");
    }
}
