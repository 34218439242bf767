//! HTTP routes of the control plane (`docs/protocol.md` §4): parse and validate at the
//! boundary, hand changes to the writer, answer only after its commit, read
//! views from reader connections (the view handlers in `routes/view_routes.rs`). Every error is JSON `{error, message}`
//! with the right status, and nothing is stored for a refused request.

// Helpers return `Result<_, Resp>` so a handler can `?`-style return the
// error answer; the answer is built once per request, so its size is moot.
#![allow(clippy::result_large_err)]

mod view_routes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::actions;
use super::authz::authorize;
pub use super::authz::{require_host, require_host_or_operator, require_operator, PeerIdentity};
use super::config::ServeConfig;
use super::longpoll::{Board, PollOutcome};
use super::metrics;
use super::quota::{HostQuotas, OverQuota};
use super::route_table::{find_route, Endpoint};
use super::store::{self, Command, Counters, PublishOutcome, Reply, StoreError};
use super::views;
use super::web;
use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::sign::{self, PublicKey, VerifyError};
use crate::wire::{
    ErrorBody, EventBatch, EventBatchResponse, Heartbeat, HeartbeatResponse, Manifest, MAX_BODY_BYTES, MAX_CLOCK_SKEW,
    MAX_LONGPOLL_WAIT_SECS, PROTOCOL_HEADER, PROTOCOL_VERSION, REPLAY_FROM_HEADER,
};
use view_routes::{view, JsonView, View};

/// `POST /v1/rollouts` only: a manifest may list up to 100,000 hosts
/// (≈ 12 MiB, wire::manifest::MAX_HOSTS), and base64 in the envelope adds a
/// third. The endpoint is for operators and the body is verified before
/// anything is stored; every agent endpoint keeps the 1 MiB limit.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

/// Longest request target (path and query) the routes read: every real one
/// is under 300 bytes; a longer one is answered 414 here, as JSON, before
/// hyper's own buffer limit answers it with an empty 431.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Status views built at once (each holds a reader connection and up to a
/// parsed manifest plus one page); more wait up to [`VIEW_QUEUE_TIMEOUT`].
/// 40 parallel whole-rollout views of a 100,000-host rollout used to peak
/// at 11 GB.
pub const MAX_CONCURRENT_VIEWS: usize = 4;
/// How long a view waits for its turn before 503 `busy`.
pub const VIEW_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Header of `GET /v1/hosts` naming the `after` of the next page (absent on
/// the last page); the body stays a plain array.
pub const NEXT_AFTER_HEADER: &str = "X-Nixfleet-Next-After";

/// Reader connections kept for the status views; more concurrent readers
/// open a connection and drop it (views are rare operator requests).
const MAX_IDLE_READERS: usize = 4;

/// Shared by every connection.
#[derive(Debug)]
pub struct App {
    pub writer: mpsc::Sender<Command>,
    pub board: Arc<Board>,
    pub counters: Arc<Counters>,
    pub trust_keys: Vec<PublicKey>,
    pub clock: ClockHandle,
    pub shutdown: watch::Receiver<bool>,
    pub db_path: PathBuf,
    pub heartbeat_interval_secs: u64,
    pub latencies: metrics::RouteLatencies,
    pub body_timeout: Duration,
    /// Per-host ingest quotas (events, heartbeats).
    pub event_quota: HostQuotas,
    pub heartbeat_quota: HostQuotas,
    /// Permits for [`MAX_CONCURRENT_VIEWS`].
    views: tokio::sync::Semaphore,
    readers: Mutex<Vec<Connection>>,
}

impl App {
    pub fn new(
        writer: mpsc::Sender<Command>,
        board: Arc<Board>,
        counters: Arc<Counters>,
        clock: ClockHandle,
        shutdown: watch::Receiver<bool>,
        cfg: &ServeConfig,
    ) -> App {
        App {
            writer,
            board,
            counters,
            trust_keys: cfg.trust_keys.clone(),
            clock,
            shutdown,
            db_path: cfg.db_path.clone(),
            heartbeat_interval_secs: cfg.heartbeat_interval_secs,
            latencies: metrics::RouteLatencies::default(),
            body_timeout: cfg.limits.body_timeout,
            event_quota: HostQuotas::events(),
            heartbeat_quota: HostQuotas::heartbeats(),
            views: tokio::sync::Semaphore::new(MAX_CONCURRENT_VIEWS),
            readers: Mutex::new(Vec::new()),
        }
    }

    /// Runs a read-only query on a reader connection, off the reactor.
    pub(super) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &std::path::Path) -> Result<T, StoreError> + Send + 'static,
    {
        let app = Arc::clone(self);
        let panicked = || StoreError::ReaderPanicked { path: self.db_path.clone() };
        let joined = tokio::task::spawn_blocking(move || {
            let pooled = app.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => store::open_reader(&app.db_path)?,
            };
            let out = f(&conn, &app.db_path);
            let mut pool = app.readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
            out
        })
        .await;
        joined.unwrap_or_else(|_| Err(panicked()))
    }
}

pub type Resp = Response<Full<Bytes>>;

fn with_protocol(mut resp: Resp) -> Resp {
    resp.headers_mut().insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL_VERSION));
    resp
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    with_protocol(resp)
}

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Resp {
    json(status, &ErrorBody { error: code.to_owned(), message: message.into() })
}

fn empty(status: StatusCode) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    with_protocol(resp)
}

pub(super) fn store_unavailable(e: &StoreError) -> Resp {
    tracing::error!(error = %e, "storage error");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
        format!("the control plane could not store this: {e}; retry later"),
    )
}

/// Checks `X-Nixfleet-Protocol`: missing → 400, another version → 426.
pub(super) fn check_protocol(req: &Request<Incoming>, required: bool) -> Result<(), Resp> {
    match req.headers().get(PROTOCOL_HEADER) {
        None if required => Err(error(
            StatusCode::BAD_REQUEST,
            "missing_protocol_header",
            format!("this endpoint needs the header {PROTOCOL_HEADER}: {PROTOCOL_VERSION}"),
        )),
        None => Ok(()),
        Some(v) if v.as_bytes() == PROTOCOL_VERSION.as_bytes() => Ok(()),
        Some(v) => Err(error(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_protocol",
            format!(
                "{PROTOCOL_HEADER} is {:?}; this control plane speaks version {PROTOCOL_VERSION} only",
                String::from_utf8_lossy(v.as_bytes())
            ),
        )),
    }
}

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`] with 413.
pub(super) async fn body(req: Request<Incoming>, app: &App) -> Result<Bytes, Resp> {
    body_limited(req, MAX_BODY_BYTES, app.body_timeout).await
}

/// Reads the whole body within `deadline` (408 after it) and `limit` bytes
/// (413 beyond it), copying chunks into one buffer so memory follows the
/// bytes received, not the number of reads.
pub(super) async fn body_limited(req: Request<Incoming>, limit: usize, deadline: Duration) -> Result<Bytes, Resp> {
    let too_large = || {
        error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request bodies are limited to {limit} bytes"))
    };
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let expected = declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    match tokio::time::timeout(deadline, crate::client::collect_bounded(req.into_body(), limit, expected)).await {
        Ok(Ok(bytes)) => Ok(Bytes::from(bytes)),
        Ok(Err(crate::client::BodyError::TooLarge { .. })) => Err(too_large()),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, "bad_body", format!("could not read the request body: {e}"))),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {} s", deadline.as_secs()),
        )),
    }
}

/// A rollout id from a path segment; clients may percent-encode the `@`.
pub(super) fn parse_rollout_segment(segment: &str) -> Result<RolloutId, crate::ids::IdError> {
    RolloutId::parse(&percent_decode(segment))
}

/// Decodes `%XX` escapes; anything malformed is kept as is (and then fails
/// identifier validation with a message quoting it).
pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut idx = 0;
    while idx < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[idx], bytes.get(idx + 1).copied().and_then(hex), bytes.get(idx + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                idx += 3;
            }
            (b, _, _) => {
                out.push(b);
                idx += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The only entry point: routes one request through
/// [`ROUTES`](super::route_table::ROUTES).
pub async fn handle(req: Request<Incoming>, app: Arc<App>, peer: PeerIdentity) -> Resp {
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_URI_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target_len} bytes; the limit is {MAX_URI_BYTES}"),
        );
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let Err(resp) = authorize(&peer, &segments) {
        return resp;
    }
    let (endpoint, params) = match find_route(method.as_str(), &path) {
        Ok(found) => found,
        Err(true) => {
            let message = format!("{method} is not allowed on {path}");
            return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message);
        }
        Err(false) => return error(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}")),
    };
    let param = params.first().copied().unwrap_or_default();
    let rollout = || parse_rollout_segment(param);
    match endpoint {
        Endpoint::WebOverview => view(req, &app, View::Page(web::Page::Overview)).await,
        Endpoint::WebRollout => match rollout() {
            Ok(id) => match web::rollout_page(id, req.uri().query()) {
                Ok(page) => view(req, &app, View::Page(page)).await,
                Err(message) => web::bad_request(&message),
            },
            Err(e) => web::bad_request(&e.to_string()),
        },
        Endpoint::WebHost => match Hostname::parse(&percent_decode(param)) {
            Ok(host) => view(req, &app, View::Page(web::Page::Host(host))).await,
            Err(e) => web::bad_request(&e.to_string()),
        },
        Endpoint::Healthz => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        Endpoint::Metrics => metrics_route(&app).await,
        Endpoint::OpenApi => web::openapi_json(),
        Endpoint::Publish => publish(req, &app).await,
        Endpoint::Dispatch => dispatch(req, &app, &peer).await,
        Endpoint::Events => events(req, &app, &peer).await,
        Endpoint::Heartbeat => heartbeat(req, &app, &peer).await,
        Endpoint::Status => view(req, &app, View::Json(JsonView::Status)).await,
        Endpoint::Rollouts => view(req, &app, View::Json(JsonView::Rollouts)).await,
        Endpoint::Hosts => view(req, &app, View::Json(JsonView::Hosts)).await,
        Endpoint::Rollout | Endpoint::RolloutEvents | Endpoint::Manifest => {
            let id = match rollout() {
                Ok(id) => id,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_rollout_id", e.to_string()),
            };
            match endpoint {
                Endpoint::Rollout => view(req, &app, View::Json(JsonView::Rollout(id))).await,
                Endpoint::RolloutEvents => view(req, &app, View::Json(JsonView::Events(id))).await,
                _ => manifest(req, &app, id).await,
            }
        }
        // Operator actions and the dry run (`super::actions`).
        Endpoint::Resume => actions::on_rollout(req, &app, &peer, param, "resume").await,
        Endpoint::Cancel => actions::on_rollout(req, &app, &peer, param, "cancel").await,
        Endpoint::Unquarantine => actions::unquarantine(req, &app, &peer, param).await,
        Endpoint::Actions => actions::list(req, &app).await,
        Endpoint::Plan => actions::dry_run(req, &app).await,
    }
}

/// Sends a command to the writer and waits for the answer after its commit.
pub(super) async fn ask<T>(app: &App, make: impl FnOnce(oneshot::Sender<Reply<T>>) -> Command) -> Result<T, Resp> {
    let (tx, rx) = oneshot::channel();
    let gone =
        || error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the control plane is shutting down; retry later");
    app.writer.send(make(tx)).await.map_err(|_| gone())?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_unavailable(&e)),
        Err(_) => Err(gone()),
    }
}

async fn publish(req: Request<Incoming>, app: &Arc<App>) -> Resp {
    if let Err(resp) = check_protocol(&req, true) {
        return resp;
    }
    let bytes = match body_limited(req, MAX_ENVELOPE_BYTES, app.body_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let started = std::time::Instant::now();
    let (payload, manifest) = match verified_manifest(app, &bytes) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let id = manifest.rollout_id.clone();
    let n_hosts = manifest.hosts.len();
    let verified_ms = started.elapsed().as_millis();
    let envelope = bytes.to_vec();
    let outcome = ask(app, |reply| Command::Publish { envelope, payload, manifest: Box::new(manifest), reply }).await;
    let body = serde_json::json!({"rollout_id": id});
    match outcome {
        Ok(PublishOutcome::Created) => {
            let total_ms = started.elapsed().as_millis();
            // The writer offers the dispatches before it answers this request, so
            // with a big fleet the woken long-polls may be answered first.
            tracing::info!("rollout {id} published: {n_hosts} hosts, verified in {verified_ms} ms, stored, planned and committed; answered after {total_ms} ms");
            json(StatusCode::CREATED, &body)
        }
        Ok(PublishOutcome::Identical) => json(StatusCode::OK, &body),
        Ok(PublishOutcome::Conflict) => error(
            StatusCode::CONFLICT,
            "rollout_conflict",
            format!("rollout {id} was already published with different manifest bytes; publish a new ref instead"),
        ),
        Err(resp) => resp,
    }
}

/// 429 `quota_exceeded` with `Retry-After` (whole seconds, at least 1).
fn over_quota(over: &OverQuota) -> Resp {
    let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", over.message.clone());
    let secs = over.retry_after.as_secs().max(1);
    resp.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// A DSSE envelope verified with the CP's trust keys, and its manifest:
/// 400 malformed or invalid, 403 no trusted signature, 400 dated beyond
/// the clock-skew bound (publish and the dry run check the same way).
pub(super) fn verified_manifest(app: &App, bytes: &[u8]) -> Result<(Vec<u8>, Manifest), Resp> {
    let envelope =
        sign::parse_envelope(bytes).map_err(|e| error(StatusCode::BAD_REQUEST, "bad_envelope", e.to_string()))?;
    let payload = match sign::verify_envelope(&envelope, &app.trust_keys) {
        Ok(p) => p,
        Err(e @ (VerifyError::BadSignature { .. } | VerifyError::UnknownKey { .. })) => {
            return Err(error(StatusCode::FORBIDDEN, "bad_signature", e.to_string()))
        }
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, "bad_envelope", e.to_string())),
    };
    let manifest =
        Manifest::parse(&payload).map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_manifest", e.to_string()))?;
    // `docs/protocol.md` §2 (clock skew): a manifest dated beyond the clock-skew bound would
    // outrank every honest manifest on its channel; the agents refuse it too.
    let now = app.clock.now();
    if manifest.issued_in_the_future(now) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "issued_in_future",
            format!(
                "manifest issued_at {} is more than {} s ahead of the control plane time {}; check the release machine's clock",
                store::ts(manifest.issued_at),
                MAX_CLOCK_SKEW.whole_seconds(),
                store::ts(now)
            ),
        ));
    }
    Ok((payload, manifest))
}

async fn dispatch(req: Request<Incoming>, app: &Arc<App>, peer: &PeerIdentity) -> Resp {
    if let Err(resp) = check_protocol(&req, true) {
        return resp;
    }
    let hostname = match query_param(&req, "hostname").map(Hostname::parse) {
        Some(Ok(h)) => h,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_hostname", e.to_string()),
        None => return error(StatusCode::BAD_REQUEST, "missing_hostname", "the query needs hostname=H"),
    };
    if let Err(resp) = require_host(peer, &hostname) {
        return resp;
    }
    let wait_secs = match query_param(&req, "wait").map(str::parse::<u64>) {
        None => MAX_LONGPOLL_WAIT_SECS,
        Some(Ok(n)) => n.min(MAX_LONGPOLL_WAIT_SECS),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "bad_wait", "wait must be a whole number of seconds"),
    };
    let started = std::time::Instant::now();
    match app.board.poll(&hostname, Duration::from_secs(wait_secs), app.shutdown.clone()).await {
        PollOutcome::Dispatch(d) => {
            app.latencies.longpoll_dispatch.observe(started.elapsed());
            json(StatusCode::OK, &d)
        }
        PollOutcome::NoWork => {
            app.latencies.longpoll_no_work.observe(started.elapsed());
            empty(StatusCode::NO_CONTENT)
        }
        PollOutcome::Replaced => error(
            StatusCode::CONFLICT,
            "longpoll_replaced",
            format!("a newer long-poll for {hostname} arrived; one long-poll per host is held"),
        ),
    }
}

async fn events(req: Request<Incoming>, app: &Arc<App>, peer: &PeerIdentity) -> Resp {
    let started = std::time::Instant::now();
    if let Err(resp) = check_protocol(&req, true) {
        return resp;
    }
    let bytes = match body(req, app).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let batch = match EventBatch::parse(&bytes) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_event_batch", e.to_string()),
    };
    if let Err(resp) = require_host(peer, &batch.hostname) {
        return resp;
    }
    let n_events = u32::try_from(batch.events.len()).unwrap_or(u32::MAX);
    if let Err(over) = app.event_quota.take(&batch.hostname, n_events, std::time::Instant::now()) {
        return over_quota(&over);
    }
    let EventBatch { hostname, events: items } = batch;
    match ask(app, |reply| Command::Ingest { hostname, items, reply }).await {
        Ok(results) => {
            app.latencies.ingest.observe(started.elapsed());
            json(StatusCode::OK, &EventBatchResponse { results })
        }
        Err(resp) => resp,
    }
}

async fn heartbeat(req: Request<Incoming>, app: &Arc<App>, peer: &PeerIdentity) -> Resp {
    if let Err(resp) = check_protocol(&req, true) {
        return resp;
    }
    let bytes = match body(req, app).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let heartbeat = match Heartbeat::parse(&bytes) {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_heartbeat", e.to_string()),
    };
    if let Err(resp) = require_host(peer, &heartbeat.hostname) {
        return resp;
    }
    let hostname = heartbeat.hostname.clone();
    if let Err(over) = app.heartbeat_quota.take(&hostname, 1, std::time::Instant::now()) {
        return over_quota(&over);
    }
    let replay_from: BTreeMap<RolloutId, u64> = match ask(app, |reply| Command::Heartbeat { heartbeat, reply }).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_host",
                format!("no published manifest names host {hostname}; nothing stored"),
            )
        }
        Err(resp) => return resp,
    };
    let header = (replay_from.len() == 1).then(|| replay_from.values().next().copied()).flatten();
    let mut resp = json(StatusCode::OK, &HeartbeatResponse { server_time: app.clock.now(), replay_from });
    if let Some(seq) = header {
        resp.headers_mut().insert(REPLAY_FROM_HEADER, HeaderValue::from(seq));
    }
    resp
}

async fn manifest(req: Request<Incoming>, app: &Arc<App>, id: RolloutId) -> Resp {
    if let Err(resp) = check_protocol(&req, false) {
        return resp;
    }
    let wanted = id.clone();
    match app.read(move |conn, path| store::envelope(conn, path, &wanted)).await {
        Ok(Some(bytes)) => {
            let mut resp = Response::new(Full::new(Bytes::from(bytes)));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            with_protocol(resp)
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown_rollout", format!("no rollout {id}")),
        Err(e) => store_unavailable(&e),
    }
}

async fn metrics_route(app: &Arc<App>) -> Resp {
    let shared = Arc::clone(app);
    let now = app.clock.now();
    let stale_after_secs = app.heartbeat_interval_secs.saturating_mul(views::UNREACHABLE_AFTER_INTERVALS);
    let render = move |conn: &Connection, path: &std::path::Path| {
        let sources = metrics::Sources {
            counters: &shared.counters,
            latencies: &shared.latencies,
            board: &shared.board,
            now,
            stale_after_secs,
        };
        metrics::render(sources, conn, path)
    };
    match app.read(render).await {
        Ok(text) => {
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            with_protocol(resp)
        }
        Err(e) => store_unavailable(&e),
    }
}
