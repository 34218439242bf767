//! The control plane's process shell: socket, accept loop, connection
//! tasks, the writer thread, the planner tick, and graceful shutdown
//! (stop accepting, drain for a bounded time). [`serve`] takes its listener, acceptor, config, clock and
//! shutdown future, so tests run it in-process on port 0.
//!
//! Tasks and channels:
//! - accept loop (this task): owns the listener; one connection task per
//!   accepted socket, tracked in a JoinSet (nothing is fire-and-forget).
//! - connection tasks: hyper HTTP/1.1; handlers send [`Command`]s into the
//!   writer channel (capacity [`store::WRITER_CHANNEL_CAPACITY`]) and await a
//!   oneshot answer; long-polls park on the [`Board`].
//! - writer thread (`cp-writer`): the one mutator, see [`store`].
//! - tick task: sends `Tick` every [`PLAN_TICK_SECS`] with `try_send` (a full
//!   channel means the writer is busy and will plan anyway).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

pub use super::config::ServeConfig;
use super::conn::{self, AcceptBackoff, Admission, ConnCounter, ConnGuard, ConnLimits, JsonErrors};
use super::longpoll::Board;
use super::routes::{self, App, PeerIdentity};
use super::store::{self, Command, Counters, StoreError, Writer, WriterStats};
use crate::clock::ClockHandle;
use crate::sdnotify::Notifier;

/// Listen backlog: tokio's default `bind` gives 128, and 5,000 agents
/// reconnecting at once after a CP restart then stall in SYN retries for
/// ~30 s (perf-reliability.md B). The kernel caps it at somaxconn.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Safety-net re-plan interval; the planner also runs on every change. A
/// service watchdog shorter than four ticks shortens it (the tick is what
/// turns an idle writer's loop, which pings the watchdog).
pub const PLAN_TICK_SECS: u64 = 15;
/// hyper's per-connection read buffer cap: it never shrinks after growing,
/// and 64 KiB keeps an idle long-poll connection small (bodies stream
/// through it in chunks, so 1 MiB bodies still work).
pub const MAX_CONN_BUF_BYTES: usize = 64 * 1024;
/// Largest request head (request line and header fields): a real one is
/// under 1 KiB; beyond it hyper answers 431 (rewritten as JSON by
/// [`JsonErrors`]). Without it only the 64 KiB buffer cap bounded a head,
/// and an 80 KiB header field was still accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// TCP keepalive on every accepted connection: a client that vanished
/// without a FIN or RST (a NAT dropping its mapping) is noticed within
/// about a minute even while its long-poll is parked.
pub const TCP_KEEPALIVE: crate::client::Keepalive =
    crate::client::Keepalive { idle: Duration::from_secs(30), interval: Duration::from_secs(10), probes: 3 };

/// The transport seam: plain TCP ([`PlainAcceptor`]) or mutual TLS
/// (`transport::TlsAcceptor`, the client certificate as the peer identity).
pub trait Acceptor: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<(Self::Io, PeerIdentity)>> + Send;
}

/// Plain TCP: no peer identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainAcceptor;

impl Acceptor for PlainAcceptor {
    type Io = TcpStream;
    async fn accept(&self, tcp: TcpStream) -> io::Result<(TcpStream, PeerIdentity)> {
        Ok((tcp, PeerIdentity::default()))
    }
}

/// How the server ended.
#[derive(Debug, Clone, Copy)]
pub struct ServeReport {
    /// Every connection finished within the grace period.
    pub graceful: bool,
    pub writer: WriterStats,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the store writer thread: {0}")]
    WriterThread(io::Error),
    #[error("the store writer thread panicked")]
    WriterPanicked,
}

/// Creates a listening socket with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs `f` on a thread named `name`; the receiver resolves when the thread
/// ends, however it ends (return or panic unwinding drops the sender), so
/// an async loop can notice the death of a thread it depends on.
fn spawn_watched<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<(std::thread::JoinHandle<T>, tokio::sync::oneshot::Receiver<()>)> {
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let _ended = ended_tx;
        f()
    })?;
    Ok((handle, ended_rx))
}

/// Serves until `shutdown` resolves, then drains within `cfg.grace`, wakes
/// long-polls with 204, stops the writer and checkpoints the database.
pub async fn serve<A: Acceptor>(
    listener: TcpListener,
    acceptor: A,
    cfg: ServeConfig,
    clock: ClockHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeReport, ServeError> {
    serve_notifying(listener, acceptor, cfg, clock, &Notifier::disabled(), shutdown).await
}

/// [`serve`], telling the service manager `READY=1` once the writer runs and
/// connections are accepted, `STOPPING=1` when the shutdown begins, and
/// `WATCHDOG=1` from the writer's loop, which the planner tick wakes at least
/// every [`Watchdog::wake_interval`](crate::sdnotify::Watchdog::wake_interval).
pub async fn serve_notifying<A: Acceptor>(
    listener: TcpListener,
    acceptor: A,
    cfg: ServeConfig,
    clock: ClockHandle,
    notifier: &Notifier,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeReport, ServeError> {
    let (started, mut writer_ended) = start(&cfg, clock, notifier).await?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns: JoinSet<()> = JoinSet::new();
    tokio::pin!(shutdown);
    // The writer ends on its own only by a panic (it runs until every
    // sender is gone, and `app` holds one): without it every write answers
    // 503, so the server stops and the service manager restarts it.
    let writer_died = async {
        let _ = (&mut writer_ended).await;
        tracing::error!(
            "the store writer thread stopped unexpectedly; shutting down so the control plane is restarted"
        );
    };
    tokio::pin!(writer_died);
    let shutdown = async {
        tokio::select! {
            () = &mut shutdown => {}
            () = &mut writer_died => {}
        }
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let counter =
        ConnCounter::new(ConnLimits::fitted(cfg.limits.max_connections, cfg.limits.max_connections_per_address));
    tracing::info!(limits = ?counter.limits(), "connection limits");
    let mut backoff = AcceptBackoff::default();
    let local = listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
    notifier.ready(&format!("serving on {local}"));
    loop {
        while conns.try_join_next().is_some() {}
        if counter.is_full() {
            tokio::select! {
                _ = conns.join_next() => continue,
                () = &mut shutdown => break,
            }
        }
        let (tcp, peer_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off (growing) instead of spinning.
                    let pause = backoff.failed(&e);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut shutdown => break,
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        backoff.succeeded();
        let Some(accepted) = admit(&counter, tcp, peer_addr) else { continue };
        let header_timeout = if accepted.reserve {
            cfg.limits.header_timeout.min(conn::RESERVE_HEADER_TIMEOUT)
        } else {
            cfg.limits.header_timeout
        };
        let (acceptor, app, watcher) = (acceptor.clone(), Arc::clone(&started.app), graceful.watcher());
        conns.spawn(serve_connection(acceptor, app, watcher, accepted, header_timeout));
    }

    tracing::info!("shutting down: no new connections; waking long-polls; draining in-flight requests");
    notifier.stopping("draining in-flight requests");
    drop(listener);
    stop(started, graceful, conns, cfg.grace).await
}

/// What runs besides the accept loop: the writer thread, the state every
/// connection shares, and the planner tick.
struct Started {
    app: Arc<App>,
    writer_thread: std::thread::JoinHandle<WriterStats>,
    /// Stops the tick and wakes the long-polls.
    stop_tx: watch::Sender<bool>,
    tick: tokio::task::JoinHandle<()>,
}

/// Opens the store's writer and starts its thread, the shared [`App`] and
/// the planner tick. The receiver resolves when the writer thread ends.
async fn start(
    cfg: &ServeConfig,
    clock: ClockHandle,
    notifier: &Notifier,
) -> Result<(Started, oneshot::Receiver<()>), ServeError> {
    let board = Arc::new(Board::default());
    let counters = Arc::new(Counters::default());
    let mut writer = {
        let (path, clock, board, counters) =
            (cfg.db_path.clone(), clock.clone(), Arc::clone(&board), Arc::clone(&counters));
        tokio::task::spawn_blocking(move || Writer::open(&path, clock, board, counters))
            .await
            .map_err(|_| ServeError::WriterPanicked)??
    };
    writer.set_checkpoint_bound(cfg.limits.checkpoint_events);
    let (cmd_tx, cmd_rx) = mpsc::channel(store::WRITER_CHANNEL_CAPACITY);
    let watchdog = notifier.watchdog();
    let plan_tick = Duration::from_secs(PLAN_TICK_SECS);
    let tick_every = watchdog.wake_interval().map_or(plan_tick, |wake| wake.min(plan_tick));
    let (writer_thread, writer_ended) =
        spawn_watched("cp-writer", move || writer.run(cmd_rx, watchdog)).map_err(ServeError::WriterThread)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(App::new(cmd_tx.clone(), board, counters, clock, stop_rx.clone(), cfg));
    let tick = spawn_tick(cmd_tx, tick_every, stop_rx);
    Ok((Started { app, writer_thread, stop_tx, tick }, writer_ended))
}

/// Sends `Tick` every `every` with `try_send` (a full channel means the
/// writer is busy and will plan anyway) until the stop signal.
fn spawn_tick(
    tick_tx: mpsc::Sender<Command>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => { let _ = tick_tx.try_send(Command::Tick); }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    })
}

/// An accepted socket that the connection limits let in.
struct Accepted {
    tcp: TcpStream,
    peer_addr: SocketAddr,
    /// The connection's slot, released when the connection task ends.
    guard: ConnGuard,
    /// In the operator reserve: agent requests are refused, and the header
    /// timeout is shorter.
    reserve: bool,
}

/// Admits a socket under the connection limits (a refused one is answered
/// and closed here) and sets its TCP options.
fn admit(counter: &ConnCounter, tcp: TcpStream, peer_addr: SocketAddr) -> Option<Accepted> {
    let (guard, reserve) = match counter.admit(peer_addr.ip()) {
        Admission::Admitted(guard) => (guard, false),
        Admission::Reserve(guard) => (guard, true),
        Admission::Refused { status, code, message } => {
            tracing::debug!(%peer_addr, code, "connection refused");
            conn::refuse(tcp, status, code, &message);
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = TCP_KEEPALIVE.apply(&tcp) {
        tracing::debug!(%peer_addr, error = %e, "cannot set TCP keepalive");
    }
    Some(Accepted { tcp, peer_addr, guard, reserve })
}

/// One connection's task: the transport's handshake, then hyper HTTP/1.1
/// through [`routes::handle`] until the client or the graceful shutdown
/// ends it.
async fn serve_connection<A: Acceptor>(
    acceptor: A,
    app: Arc<App>,
    watcher: hyper_util::server::graceful::Watcher,
    accepted: Accepted,
    header_timeout: Duration,
) {
    let Accepted { tcp, peer_addr, guard, reserve } = accepted;
    let _slot = guard;
    let (io, peer) = match acceptor.accept(tcp).await {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(%peer_addr, error = %e, "handshake failed");
            return;
        }
    };
    let service = service_fn(move |req| {
        let (app, peer) = (Arc::clone(&app), peer.clone());
        async move {
            if reserve && req.uri().path().starts_with("/v1/agent/") {
                return Ok(routes::error(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_connections",
                    "the control plane is at its connection limit; this connection serves operators only; retry later",
                ));
            }
            Ok::<_, std::convert::Infallible>(routes::handle(req, app, peer).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_CONN_BUF_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(JsonErrors::new(io)), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer_addr, error = %e, "connection ended with an error");
    }
}

/// The shutdown after the accept loop: wake the long-polls, drain the
/// connections within `grace` (then close the rest), stop the tick, and
/// join the writer once every sender is gone.
async fn stop(
    started: Started,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    mut conns: JoinSet<()>,
    grace: Duration,
) -> Result<ServeReport, ServeError> {
    let Started { app, writer_thread, stop_tx, tick } = started;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace, graceful.shutdown()).await.is_ok();
    if !drained {
        tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing the remaining connections");
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
    let _ = tick.await;
    drop(app);
    let stats = tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .map_err(|_| ServeError::WriterPanicked)?
        .map_err(|_| ServeError::WriterPanicked)?;
    tracing::info!(
        "control plane stopped ({}; {} commits, {} events applied)",
        if drained { "graceful" } else { "forced: the grace period ran out" },
        stats.n_commits,
        stats.n_events_applied
    );
    Ok(ServeReport { graceful: drained, writer: stats })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watched_thread_is_noticed_when_it_returns_and_when_it_panics() {
        // Proves the writer's death cannot go unnoticed: the receiver
        // resolves on a normal return and on a panic, and join tells which.
        let (handle, ended) = spawn_watched("ok", || 7).expect("spawn");
        tokio::time::timeout(Duration::from_secs(10), ended).await.expect("noticed").expect_err("sender dropped");
        assert_eq!(handle.join().expect("returned"), 7);
        let (handle, ended) = spawn_watched("boom", || -> u32 { panic!("writer bug on purpose") }).expect("spawn");
        tokio::time::timeout(Duration::from_secs(10), ended).await.expect("noticed").expect_err("sender dropped");
        assert!(handle.join().is_err(), "the panic is seen by join");
    }
}
