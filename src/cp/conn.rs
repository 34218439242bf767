//! Connection accounting and the connection-level error answers of the
//! control plane: how many sockets it holds in total and per client
//! address, the operator reserve, refusing a connection with a JSON answer
//! without reading it, and [`JsonErrors`], which turns the empty 400 / 431
//! answers hyper writes on its own for a request it cannot parse into the
//! protocol's JSON error shape.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::wire::{ErrorBody, PROTOCOL_HEADER, PROTOCOL_VERSION};

/// Connections accepted beyond the cap that serve only operator and health
/// endpoints (an agent request on one is answered 503 at once), so an
/// operator still gets `cp status` through while agents fill the CP.
pub const OPERATOR_RESERVE_CONNECTIONS: usize = 32;
/// The request-head deadline of a reserve connection: an operator's
/// request head arrives at once, and an idle connection must not hold a
/// reserve slot for the ordinary header timeout.
pub const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Descriptors the CP keeps free of connections: the SQLite files of the
/// writer and the readers (database, WAL, shared memory each), the
/// listener, the epoll instance, the log, and the refusals in flight. The
/// connection cap is the soft `RLIMIT_NOFILE` minus this and the reserve, so
/// `accept` does not fail with EMFILE in normal operation.
pub const FD_HEADROOM: usize = 64;

/// How many connections one [`Admission`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Ordinary connections held at once.
    pub max_total: usize,
    pub max_per_address: usize,
    /// Extra connections for operator and health endpoints only.
    pub reserve: usize,
}

impl ConnLimits {
    /// `wanted` total, lowered so that connections, the reserve and
    /// [`FD_HEADROOM`] fit the process's descriptor limit.
    pub fn fitted(wanted: usize, max_per_address: usize) -> ConnLimits {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let nofile = nofile.and_then(|n| usize::try_from(n).ok()).unwrap_or(usize::MAX);
        let room = nofile.saturating_sub(FD_HEADROOM + OPERATOR_RESERVE_CONNECTIONS).max(1);
        ConnLimits { max_total: wanted.min(room), max_per_address, reserve: OPERATOR_RESERVE_CONNECTIONS }
    }
}

/// What may happen with a freshly accepted connection.
#[derive(Debug)]
pub enum Admission {
    /// Served normally; the slot is released when the guard drops.
    Admitted(ConnGuard),
    /// Served for operator and health endpoints only.
    Reserve(ConnGuard),
    /// Answered at once with this error and closed.
    Refused { status: u16, code: &'static str, message: String },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    reserve: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Open connections, in total and per client address.
#[derive(Debug)]
pub struct ConnCounter {
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection's slot.
#[derive(Debug)]
pub struct ConnGuard {
    counts: Arc<Mutex<Counts>>,
    addr: IpAddr,
    reserve: bool,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if self.reserve {
            counts.reserve -= 1;
        } else {
            counts.total -= 1;
        }
        if let Some(n) = counts.by_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&self.addr);
            }
        }
    }
}

impl ConnCounter {
    pub fn new(limits: ConnLimits) -> ConnCounter {
        ConnCounter { limits, counts: Arc::default() }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Connections held now (ordinary and reserve).
    pub fn open(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total + counts.reserve
    }

    /// Whether every ordinary and reserve slot is taken: the accept loop
    /// then waits for one to free instead of accepting (the kernel backlog
    /// holds the rest).
    pub fn is_full(&self) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total >= self.limits.max_total && counts.reserve >= self.limits.reserve
    }

    pub fn admit(&self, addr: IpAddr) -> Admission {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let from_addr = counts.by_address.get(&addr).copied().unwrap_or(0);
        if from_addr >= self.limits.max_per_address {
            return Admission::Refused {
                status: 429,
                code: "too_many_connections_from_address",
                message: format!(
                    "{addr} already holds {from_addr} connections, the limit per client address; close some and retry"
                ),
            };
        }
        let reserve = if counts.total < self.limits.max_total {
            counts.total += 1;
            false
        } else if counts.reserve < self.limits.reserve {
            counts.reserve += 1;
            true
        } else {
            return Admission::Refused {
                status: 503,
                code: "too_many_connections",
                message: format!("the control plane holds {} connections, its limit; retry later", counts.total),
            };
        };
        *counts.by_address.entry(addr).or_insert(0) += 1;
        let guard = ConnGuard { counts: Arc::clone(&self.counts), addr, reserve };
        if reserve {
            Admission::Reserve(guard)
        } else {
            Admission::Admitted(guard)
        }
    }
}

/// A complete HTTP/1.1 answer with a JSON error body that closes the connection.
pub fn error_response(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&ErrorBody { error: code.to_owned(), message: message.to_owned() })
        .unwrap_or_else(|_| b"{}".to_vec());
    let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Answers a refused connection without a task or a wait: whatever request
/// bytes already arrived are read and dropped (closing with unread data
/// would reset the connection before the client reads the answer), the
/// answer is written if the socket takes it at once, then it is closed.
pub fn refuse(tcp: TcpStream, status: u16, code: &str, message: &str) {
    let mut sink = [0u8; 4096];
    let _ = tcp.try_read(&mut sink);
    let _ = tcp.try_write(&error_response(status, code, message));
    // Dropping the stream closes it.
}

/// The JSON answer replacing one of hyper's own error heads, if `bytes`
/// starts with one: an HTTP/1.1 400, 414 or 431 head, complete in `bytes`,
/// without the protocol header (every answer of the routes carries it).
/// Returns the head's length and the replacement.
fn hyper_error_head(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    if !bytes.starts_with(b"HTTP/1.1 ") || bytes.len() < 12 {
        return None;
    }
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    if head.contains(&PROTOCOL_HEADER.to_ascii_lowercase()) {
        return None;
    }
    let (code, message) = match &bytes[9..12] {
        b"400" => ("bad_request", "the request could not be parsed as HTTP/1.1 (method, URI, version or a header)"),
        b"414" => ("uri_too_long", "the request URI is too long"),
        b"431" => ("header_too_large", "the request head is too large (too many or too long header fields)"),
        _ => return None,
    };
    let status = std::str::from_utf8(&bytes[9..12]).ok()?.parse().ok()?;
    Some((end, error_response(status, code, message)))
}

/// An IO wrapper for one server connection: when hyper writes its own
/// empty answer to a request it could not parse (400, 414, 431), the head
/// is swallowed and the protocol's JSON error (naming the problem, with
/// the protocol header and `connection: close`) is written instead. All
/// other bytes pass through unchanged.
#[derive(Debug)]
pub struct JsonErrors<T> {
    inner: T,
    /// A replacement answer still to be written, and how much of it is out.
    unsent: Option<(Vec<u8>, usize)>,
}

impl<T> JsonErrors<T> {
    pub fn new(inner: T) -> JsonErrors<T> {
        JsonErrors { inner, unsent: None }
    }
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// Writes out the rest of an unsent replacement; Ready(Ok) once nothing is left.
    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.unsent.as_mut() {
            if *done == bytes.len() {
                self.unsent = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_unsent(cx))?;
        if let Some((head_len, replacement)) = hyper_error_head(buf) {
            self.unsent = Some((replacement, 0));
            return Poll::Ready(Ok(head_len));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_unsent(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some((head_len, replacement)) = hyper_error_head(first) {
                self.unsent = Some((replacement, 0));
                return Poll::Ready(Ok(head_len));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_unsent(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_unsent(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Back-off after a failed `accept` (EMFILE, ENFILE, ENOBUFS …): doubles
/// from [`MIN_ACCEPT_BACKOFF`] to [`MAX_ACCEPT_BACKOFF`] while accepts keep
/// failing, and the warning is logged at most once per
/// [`ACCEPT_WARN_EVERY`] with the number of failures since the last one
/// (584 warnings in 30 s used to flood the log at the descriptor limit).
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    failures: u64,
    last_warn: Option<tokio::time::Instant>,
}

/// First pause after a failed accept.
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause: a descriptor freed is used within this.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one "accept failed" warning this often.
pub const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

impl Default for AcceptBackoff {
    fn default() -> AcceptBackoff {
        AcceptBackoff { delay: MIN_ACCEPT_BACKOFF, failures: 0, last_warn: None }
    }
}

impl AcceptBackoff {
    /// Notes a failure; returns how long to pause before the next accept.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        self.failures += 1;
        let now = tokio::time::Instant::now();
        if self.last_warn.is_none_or(|at| now.duration_since(at) >= ACCEPT_WARN_EVERY) {
            tracing::warn!(error = %error, failures = self.failures, pause_ms = self.delay.as_millis() as u64, "accept failed; backing off");
            self.last_warn = Some(now);
            self.failures = 0;
        }
        let pause = self.delay;
        self.delay = (self.delay * 2).min(MAX_ACCEPT_BACKOFF);
        pause
    }

    pub fn succeeded(&mut self) {
        self.delay = MIN_ACCEPT_BACKOFF;
    }

    #[cfg(test)]
    fn delay(&self) -> Duration {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_address_cap_the_total_cap_and_the_reserve_are_enforced_and_released() {
        let counter = ConnCounter::new(ConnLimits { max_total: 3, max_per_address: 2, reserve: 1 });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let a1 = counter.admit(a);
        let a2 = counter.admit(a);
        assert!(matches!(a1, Admission::Admitted(_)) && matches!(a2, Admission::Admitted(_)));
        assert!(matches!(counter.admit(a), Admission::Refused { status: 429, .. }), "third from one address");
        let b1 = counter.admit(b);
        assert!(matches!(b1, Admission::Admitted(_)));
        let b2 = counter.admit(b);
        assert!(matches!(b2, Admission::Reserve(_)), "beyond the total: the reserve");
        assert!(counter.is_full());
        assert!(matches!(counter.admit(c), Admission::Refused { status: 503, .. }), "reserve used up");
        drop(a1);
        assert!(!counter.is_full());
        let c1 = counter.admit(c);
        assert!(matches!(c1, Admission::Admitted(_)), "a freed slot is reused");
        drop((a2, b1, b2));
        assert_eq!(counter.open(), 1);
        drop(c1);
        assert_eq!(counter.open(), 0);
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.expect("finite limit");
        let limits = ConnLimits::fitted(usize::MAX, 10);
        assert!((limits.max_total + limits.reserve + FD_HEADROOM) as u64 <= nofile.max(1 + 96), "{limits:?}");
        assert_eq!(ConnLimits::fitted(5, 10).max_total, 5);
    }

    #[test]
    fn accept_failures_back_off_exponentially_up_to_the_cap() {
        let mut backoff = AcceptBackoff::default();
        let e = io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..12).map(|_| backoff.failed(&e)).collect();
        assert_eq!(pauses[0], MIN_ACCEPT_BACKOFF);
        assert_eq!(pauses[1], MIN_ACCEPT_BACKOFF * 2);
        assert_eq!(*pauses.last().expect("pauses"), MAX_ACCEPT_BACKOFF);
        // 12 failures in a row wait several seconds in total, not 12 × 50 ms.
        assert!(pauses.iter().sum::<Duration>() >= Duration::from_secs(3));
        backoff.succeeded();
        assert_eq!(backoff.delay(), MIN_ACCEPT_BACKOFF);
    }

    #[test]
    fn only_hypers_own_error_heads_are_replaced() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let (len, replacement) = hyper_error_head(hyper_431).expect("replaced");
        assert_eq!(len, hyper_431.len());
        let text = String::from_utf8(replacement).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        let parsed: ErrorBody = serde_json::from_str(body).expect("JSON error shape");
        assert_eq!(parsed.error, "header_too_large");
        let ours = b"HTTP/1.1 400 Bad Request\r\nx-nixfleet-protocol: 1\r\ncontent-length: 2\r\n\r\n{}";
        assert!(hyper_error_head(ours).is_none(), "the routes' own answers pass");
        assert!(hyper_error_head(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(hyper_error_head(b"HTTP/1.1 400 Bad Req").is_none(), "an incomplete head passes");
    }
}
