//! The operator views of the HTTP API: the status JSON (`status`,
//! `rollouts`, `hosts`, one rollout, its event log) and the web pages, with
//! their query parameters, paging header and the bound on views built at
//! once. Apart from `routes.rs` so the agent and write endpoints read on
//! their own.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::{
    check_protocol, error, percent_decode, query_param, store_unavailable, with_protocol, App, Resp,
    MAX_CONCURRENT_VIEWS, NEXT_AFTER_HEADER, VIEW_QUEUE_TIMEOUT,
};
use crate::cp::{store, views, web};
use crate::ids::{Hostname, RolloutId};

/// An operator view. Every one (JSON or web page) passes through [`view`],
/// so a check placed there guards them all.
pub(super) enum View {
    /// A page of the web status view (`cp::web`).
    Page(web::Page),
    Json(JsonView),
}

pub(super) enum JsonView {
    Status,
    Rollouts,
    Hosts,
    Rollout(RolloutId),
    Events(RolloutId),
}

pub(super) async fn view(req: Request<Incoming>, app: &Arc<App>, which: View) -> Resp {
    if let Err(resp) = check_protocol(&req, false) {
        return resp;
    }
    match which {
        View::Page(page) => page_view(app, page).await,
        View::Json(which) => json_view(&req, app, which).await,
    }
}

async fn page_view(app: &Arc<App>, page: web::Page) -> Resp {
    let now = app.clock.now();
    let stale_after_secs = app.heartbeat_interval_secs.saturating_mul(views::UNREACHABLE_AFTER_INTERVALS);
    match app.read(move |conn, path| web::render(conn, path, &page, now, stale_after_secs)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "storage error");
            web::unavailable(&e.to_string())
        }
    }
}

async fn json_view(req: &Request<Incoming>, app: &Arc<App>, which: JsonView) -> Resp {
    let now = app.clock.now();
    let stale_after_secs = app.heartbeat_interval_secs.saturating_mul(views::UNREACHABLE_AFTER_INTERVALS);
    let bad_query = |what: &str| error(StatusCode::BAD_REQUEST, "bad_query", what.to_owned());
    let limit = match query_param(req, "limit").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_query("limit must be a whole number"),
    };
    let after_raw = query_param(req, "after").map(percent_decode);
    let (event_after, host_after) = match (&which, after_raw) {
        (_, None) => (0, None),
        (JsonView::Events(_), Some(a)) => match a.parse::<i64>() {
            Ok(n) => (n, None),
            Err(_) => return bad_query("after must be a whole number (an event id)"),
        },
        (_, Some(a)) => match Hostname::parse(&a) {
            Ok(h) => (0, Some(h)),
            Err(e) => return bad_query(&format!("after must be a hostname: {e}")),
        },
    };
    let event_limit = limit.unwrap_or(1000).min(store::MAX_EVENTS_PAGE);
    let host_limit = limit.unwrap_or(views::MAX_VIEW_PAGE_HOSTS).clamp(1, views::MAX_VIEW_PAGE_HOSTS);
    // At most MAX_CONCURRENT_VIEWS views are built at once; the rest wait.
    let Ok(Ok(_permit)) = tokio::time::timeout(VIEW_QUEUE_TIMEOUT, app.views.acquire()).await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{MAX_CONCURRENT_VIEWS} status views are being built; retry later"),
        );
    };
    let result = app
        .read(move |conn, path| {
            let mut next_after = None;
            let bytes = match which {
                JsonView::Status => Some(serde_json::to_vec(&views::status(conn, path, now, stale_after_secs)?)),
                JsonView::Rollouts => Some(serde_json::to_vec(&views::rollouts(conn, path)?)),
                JsonView::Hosts => {
                    let (page, next) =
                        views::hosts(conn, path, now, stale_after_secs, host_after.as_ref(), host_limit)?;
                    next_after = next;
                    Some(serde_json::to_vec(&page))
                }
                JsonView::Rollout(id) => views::rollout(conn, path, &id, now, host_after.as_ref(), host_limit)?
                    .map(|v| serde_json::to_vec(&v)),
                JsonView::Events(id) => {
                    views::events(conn, path, &id, event_after, event_limit)?.map(|v| serde_json::to_vec(&v))
                }
            };
            Ok((bytes, next_after))
        })
        .await;
    match result {
        Ok((Some(Ok(bytes)), next_after)) => {
            let mut resp = Response::new(Full::new(Bytes::from(bytes)));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(next) = next_after.and_then(|h| HeaderValue::from_str(h.as_str()).ok()) {
                resp.headers_mut().insert(NEXT_AFTER_HEADER, next);
            }
            with_protocol(resp)
        }
        Ok((Some(Err(e)), _)) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        Ok((None, _)) => error(StatusCode::NOT_FOUND, "unknown_rollout", "no such rollout"),
        Err(e) => store_unavailable(&e),
    }
}
