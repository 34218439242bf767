//! The web status page: `GET /` (the fleet and its live rollouts),
//! `GET /rollouts/{rollout_id}` and `GET /hosts/{hostname}` (a host and its
//! event timeline). Server-rendered HTML built from the same views as the
//! JSON API, complete without JavaScript; a small inline script re-fetches
//! the page and swaps its `<main>`, so the page stays live while only this
//! file turns data into markup. No external assets: the CSS and the script
//! are inline (air-gapped fleets), and a Content-Security-Policy allows
//! nothing else. Every string from the store goes through [`esc`]: probe
//! reasons, stderr tails and other agent text are attacker-influenced.
//! Also serves the API document (`GET /v1/openapi.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::routes::Resp;
use super::store::{self, StoreError};
use super::views::{self, HostInRollout, HostView, Liveness, RolloutDetail};
use crate::ids::{Hostname, RolloutId};
use crate::wire::{PROTOCOL_HEADER, PROTOCOL_VERSION};

/// A rollout with more hosts than this shows only its wave counts on the
/// overview (with a link to its own page, which lists every host): the
/// overview is re-fetched every few seconds and must stay small.
pub const MAX_INLINE_HOSTS: usize = 200;
/// Events on a host's page, newest first: a host soaking with flapping
/// probes logs thousands; the rest is in `GET /v1/rollouts/{id}/events`.
pub const MAX_TIMELINE_EVENTS: usize = 200;
/// A host waiting this long for its reboot is flagged on the overview: a
/// deferral that long usually means nobody scheduled the reboot.
pub const LONG_DEFERRAL_SECS: u64 = 15 * 60;
/// How often the script re-fetches the page.
pub const REFRESH_SECS: u64 = 5;
/// Without JavaScript the page reloads itself this often.
const NOSCRIPT_REFRESH_SECS: u64 = 30;

const STYLE: &str = include_str!("web/page.css");
const SCRIPT: &str = include_str!("web/live.js");
/// The JSON twin of docs/openapi.yaml (a test keeps them equal).
const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// A page of the status view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    Overview,
    /// A rollout and one page of its hosts: those after the hostname, if any.
    Rollout(RolloutId, Option<Hostname>),
    Host(Hostname),
}

/// The page of `GET /rollouts/{id}` for the request's query: `after=HOST`
/// asks for the page of hosts after HOST (the page's next link); a bad
/// value is refused with the message for [`bad_request`].
pub fn rollout_page(id: RolloutId, query: Option<&str>) -> Result<Page, String> {
    let after =
        query.into_iter().flat_map(|q| q.split('&')).filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == "after");
    match after {
        None => Ok(Page::Rollout(id, None)),
        Some((_, value)) => match Hostname::parse(value) {
            Ok(host) => Ok(Page::Rollout(id, Some(host))),
            Err(e) => Err(format!("after must be a hostname: {e}")),
        },
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment for a link: identifiers are validated, but encode
/// anything outside the unreserved set all the same.
fn seg(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The script's hash for the Content-Security-Policy (computed once).
fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(SCRIPT.as_bytes()));
        format!(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    })
}

fn html_response(status: StatusCode, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Ok(v) = HeaderValue::from_str(csp()) {
        headers.insert("content-security-policy", v);
    }
    headers.insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL_VERSION));
    resp
}

/// The page skeleton around `main` (which the script swaps).
fn document(title: &str, main: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"color-scheme\" content=\"light dark\">\
         <noscript><meta http-equiv=\"refresh\" content=\"{NOSCRIPT_REFRESH_SECS}\"></noscript>\
         <title>{title} · nixfleet</title><style>{STYLE}</style></head>\
         <body data-refresh-ms=\"{refresh}\"><header><a class=\"home\" href=\"/\">nixfleet</a>\
         <span id=\"live\" class=\"live\">static page: it reloads every {NOSCRIPT_REFRESH_SECS} s</span></header>\n\
         {main}\n<script>{SCRIPT}</script></body></html>\n",
        title = esc(title),
        refresh = REFRESH_SECS * 1000,
    )
}

fn message_page(status: StatusCode, title: &str, message: &str) -> Resp {
    let main = format!("<main id=\"main\"><h1>{}</h1><p class=\"error\">{}</p></main>", esc(title), esc(message));
    html_response(status, document(title, &main))
}

/// 400 as a page: a path parameter that is not an identifier.
pub fn bad_request(message: &str) -> Resp {
    message_page(StatusCode::BAD_REQUEST, "Bad request", message)
}

/// 503 as a page: the database could not be read.
pub fn unavailable(message: &str) -> Resp {
    message_page(StatusCode::SERVICE_UNAVAILABLE, "Status unavailable", &format!("{message}; retry later"))
}

/// `GET /v1/openapi.json`.
pub fn openapi_json() -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI_JSON.as_bytes())));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL_VERSION));
    resp
}

/// Renders one page on a reader connection. What it reads is bounded by
/// the page, never by the fleet: counts come from SQL, and hosts are listed
/// a page ([`views::MAX_VIEW_PAGE_HOSTS`]) at a time.
pub fn render(
    conn: &Connection,
    path: &Path,
    page: &Page,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<Resp, StoreError> {
    Ok(match page {
        Page::Overview => overview::page(conn, path, now, stale_after_secs)?,
        Page::Rollout(id, after) => {
            match views::rollout(conn, path, id, now, after.as_ref(), views::MAX_VIEW_PAGE_HOSTS)? {
                Some(d) => {
                    let counts = store::wave_counts(conn, path, id)?;
                    let section = rollout_section(&d, &counts, Listing::Paged(after.as_ref()));
                    html_response(StatusCode::OK, document(id.as_str(), &format!("<main id=\"main\">{section}</main>")))
                }
                None => message_page(StatusCode::NOT_FOUND, "Unknown rollout", &format!("no rollout {id}")),
            }
        }
        Page::Host(host) => match views::host(conn, path, now, stale_after_secs, host)? {
            Some(view) => {
                let limit = i64::try_from(MAX_TIMELINE_EVENTS).unwrap_or(i64::MAX);
                let events = store::host_event_rows(conn, path, host, limit)?;
                html_response(StatusCode::OK, document(host.as_str(), &host_page(&view, &events)))
            }
            None => message_page(StatusCode::NOT_FOUND, "Unknown host", &format!("no host {host}")),
        },
    })
}

fn state_badge(state: &str) -> String {
    format!("<span class=\"state s-{0}\">{0}</span>", esc(state))
}

fn host_link(host: &str) -> String {
    format!("<a href=\"/hosts/{}\">{}</a>", seg(host), esc(host))
}

fn rollout_link(id: &str) -> String {
    format!("<a href=\"/rollouts/{}\">{}</a>", seg(id), esc(id))
}

/// Whole seconds as "3d 4h", "5m 2s", "40s".
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Whether a deferral is long enough to flag.
pub fn is_long_deferral(deferred_for_secs: u64) -> bool {
    deferred_for_secs >= LONG_DEFERRAL_SECS
}

fn counts(by_state: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{} {n}", state_badge(s))).collect();
    parts.join(" ")
}

/// How a rollout section lists its hosts.
#[derive(Debug, Clone, Copy)]
enum Listing<'a> {
    /// Every host (the overview, a rollout of at most [`MAX_INLINE_HOSTS`]).
    Inline,
    /// None: the overview links to the rollout's own page.
    Elsewhere,
    /// The detail's page of hosts (those after the hostname, if any), with
    /// links to the first and the next page.
    Paged(Option<&'a Hostname>),
}

/// One rollout: its summary, halt reason and waves, each wave with its
/// host counts by state (`wave_counts`, the whole wave, from SQL) and the
/// hosts `listing` asks for.
fn rollout_section(d: &RolloutDetail, wave_counts: &[BTreeMap<String, usize>], listing: Listing<'_>) -> String {
    let s = &d.summary;
    let id = s.rollout_id.as_str();
    let mut out = format!(
        "<section class=\"rollout\" id=\"r-{}\"><h2>{} {}</h2>",
        esc(&seg(id)),
        rollout_link(id),
        state_badge(s.state.as_str())
    );
    if let Some(reason) = &s.halt_reason {
        let _ =
            write!(out, "<p class=\"halt\"><strong>Halted:</strong> <span class=\"reason\">{}</span></p>", esc(reason));
    }
    if let Some(by) = &s.superseded_by {
        let _ = write!(out, "<p class=\"muted\">Superseded by {}.</p>", rollout_link(by.as_str()));
    }
    let _ = write!(
        out,
        "<dl class=\"facts\"><dt>wave</dt><dd>{} of {}</dd><dt>hosts</dt><dd>{} ({})</dd>\
         <dt>policy</dt><dd>{}, at most {} failed</dd><dt>issued</dt><dd>{}</dd><dt>published</dt><dd>{}</dd>\
         <dt>updated</dt><dd>{}</dd></dl>",
        s.current_wave + 1,
        s.n_waves,
        s.n_hosts,
        counts(&s.hosts_by_state),
        esc(&d.on_health_failure),
        d.max_failed_hosts,
        esc(&s.issued_at),
        esc(&s.published_at),
        esc(&s.updated_at),
    );
    match listing {
        Listing::Inline => {}
        Listing::Elsewhere => {
            let _ = write!(
                out,
                "<p class=\"muted\">{} hosts: more than {MAX_INLINE_HOSTS}, so they are listed on the {} page.</p>",
                s.n_hosts,
                rollout_link(id)
            );
        }
        Listing::Paged(after) => out.push_str(&page_links(d, after)),
    }
    let empty = BTreeMap::new();
    for wave in &d.waves {
        let by_state = wave_counts.get(wave.index).unwrap_or(&empty);
        let open = wave.index == s.current_wave
            || by_state.contains_key("Failed")
            || by_state.contains_key("Reverted")
            || matches!(listing, Listing::Paged(_)) && !wave.hosts.is_empty();
        let _ = write!(
            out,
            "<details class=\"wave\" id=\"w-{}-{}\"{}><summary>Wave {}: {} · soak {} · at most {} at once · {}</summary>",
            esc(&seg(id)),
            wave.index,
            if open { " open" } else { "" },
            wave.index + 1,
            esc(&wave.name),
            age(wave.soak_secs),
            wave.max_in_flight,
            counts(by_state)
        );
        match listing {
            Listing::Inline => out.push_str(&host_table(&wave.hosts)),
            Listing::Paged(_) if !wave.hosts.is_empty() => out.push_str(&host_table(&wave.hosts)),
            _ => {}
        }
        out.push_str("</details>");
    }
    out.push_str("</section>");
    out
}

/// Where a page of a rollout's hosts stands, with links to the first page
/// and the next one; nothing when every host is on this page.
fn page_links(d: &RolloutDetail, after: Option<&Hostname>) -> String {
    if after.is_none() && d.next_after.is_none() {
        return String::new();
    }
    let id = seg(d.summary.rollout_id.as_str());
    let shown: usize = d.waves.iter().map(|w| w.hosts.len()).sum();
    let mut out = format!(
        "<nav class=\"pages\"><p>{} hosts, {} a page (by name); this page: {shown}{}.",
        d.summary.n_hosts,
        views::MAX_VIEW_PAGE_HOSTS,
        after.map(|h| format!(", after {}", esc(h.as_str()))).unwrap_or_default()
    );
    if after.is_some() {
        let _ = write!(out, " <a href=\"/rollouts/{id}\">first page</a>");
    }
    if let Some(next) = &d.next_after {
        let _ = write!(out, " <a rel=\"next\" href=\"/rollouts/{id}?after={}\">next page</a>", seg(next.as_str()));
    }
    out.push_str("</p></nav>");
    out
}

fn host_table(hosts: &[HostInRollout]) -> String {
    let mut out = String::from(
        "<div class=\"scroll\"><table class=\"hosts\"><tr><th>host</th><th>state</th><th>when</th><th>why</th></tr>",
    );
    for h in hosts {
        let _ = write!(
            out,
            "<tr data-host=\"{0}\" data-state=\"{1}\"><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td></tr>",
            esc(h.hostname.as_str()),
            esc(h.state.as_str()),
            host_link(h.hostname.as_str()),
            state_badge(h.state.as_str()),
            host_times(h),
            host_why(h)
        );
    }
    out.push_str("</table></div>");
    out
}

fn host_times(h: &HostInRollout) -> String {
    let times = [
        ("dispatched", &h.dispatch_issued_at),
        ("acked", &h.dispatch_acked_at),
        ("activated", &h.activation_completed_at),
        ("deferred", &h.deferred_at),
        ("soak due", &h.soak_due_at),
        ("converged", &h.converged_at),
        ("failed", &h.failed_at),
        ("reverted", &h.reverted_at),
    ];
    let parts: Vec<String> = times
        .iter()
        .filter_map(|(label, t)| t.as_ref().map(|t| format!("<span class=\"t\">{label} {}</span>", esc(t))))
        .collect();
    parts.join(" ")
}

fn host_why(h: &HostInRollout) -> String {
    let mut out = String::new();
    for p in &h.probe_failures {
        let _ = write!(
            out,
            "<div class=\"probe\">probe <code>{}</code> failing{}: <span class=\"reason\">{}</span></div>",
            esc(&p.probe_name),
            p.failing_since.as_ref().map(|t| format!(" since {}", esc(t))).unwrap_or_default(),
            esc(p.reason.as_deref().unwrap_or("no reason given"))
        );
    }
    if let Some(failure) = &h.failure {
        out.push_str(&failure_text(failure));
    }
    if let Some(note) = &h.note {
        let _ = write!(out, "<div class=\"note\">{}</div>", esc(note));
    }
    if let Some(by) = &h.held_by {
        let _ = write!(out, "<div class=\"note\">held: live in {}</div>", rollout_link(by.as_str()));
    }
    if let Some(skip) = &h.skipped {
        let _ = write!(out, "<div class=\"note\">skipped at {}: {}</div>", esc(&skip.skipped_at), esc(&skip.reason));
    }
    out
}

fn failure_text(failure: &crate::machine::Failure) -> String {
    use crate::machine::Failure;
    match failure {
        Failure::ActivationFailed { exit_code, stderr_tail } => {
            format!("<div class=\"failure\">activation failed (exit {exit_code})<pre>{}</pre></div>", esc(stderr_tail))
        }
        Failure::WrongClosure { observed } => {
            format!(
                "<div class=\"failure\">the host runs another closure: <code>{}</code></div>",
                esc(observed.as_str())
            )
        }
        Failure::SustainedProbeFailure { failing_probes, sustained_duration_secs } => format!(
            "<div class=\"failure\">probes failed for {}: {}</div>",
            age(*sustained_duration_secs),
            esc(&failing_probes.join(", "))
        ),
        Failure::DispatchRejected { reason } => {
            format!("<div class=\"failure\">the agent refused the dispatch: {}</div>", esc(reason))
        }
    }
}

fn host_page(h: &HostView, events: &[(String, store::LoggedRow)]) -> String {
    let name = h.hostname.as_str();
    let mut out = format!("<main id=\"main\"><h1>{}</h1><dl class=\"facts\">", esc(name));
    let liveness = match h.liveness {
        Liveness::Reachable => "reachable",
        Liveness::Unreachable => "unreachable",
        Liveness::NeverSeen => "never seen",
    };
    let drift = serde_json::to_value(h.drift).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let facts = [
        ("liveness", Some(liveness.to_owned())),
        ("last heartbeat", h.last_heartbeat_at.clone()),
        ("runs", h.current_closure.clone()),
        ("booted", h.booted_closure.clone()),
        ("drift", Some(drift)),
        ("expected", h.expected_closure.clone()),
        ("agent", h.agent_version.clone()),
        ("uptime", h.uptime_secs.map(age)),
    ];
    for (label, value) in facts {
        if let Some(v) = value {
            let _ = write!(out, "<dt>{label}</dt><dd>{}</dd>", esc(&v));
        }
    }
    out.push_str("</dl><h2>Rollouts</h2><ul>");
    for r in &h.rollouts {
        let _ = write!(out, "<li>{} {}</li>", rollout_link(r.rollout_id.as_str()), state_badge(r.state.as_str()));
    }
    out.push_str("</ul><h2>Timeline</h2>");
    if events.len() >= MAX_TIMELINE_EVENTS {
        let _ = write!(
            out,
            "<p class=\"muted\">The newest {MAX_TIMELINE_EVENTS} events; older ones are in \
             <code>GET /v1/rollouts/{{id}}/events</code>.</p>"
        );
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"timeline\"><tr><th>agent time</th><th>received</th><th>rollout</th>\
         <th>seq</th><th>event</th></tr>",
    );
    for (rollout, e) in events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><strong>{}</strong> {}</td></tr>",
            esc(&e.agent_at),
            esc(&e.received_at),
            rollout_link(rollout),
            e.seq,
            esc(&e.kind),
            event_fields(&e.event)
        );
    }
    out.push_str("</table></div></main>");
    out
}

/// An event's fields as `name: value` (the kind and seq are shown apart).
fn event_fields(event: &crate::wire::OutboundEvent) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&event.body) else { return String::new() };
    let mut out = String::new();
    for (name, value) in fields.iter().filter(|(n, _)| n.as_str() != "kind") {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if text.contains('\n') || text.len() > 120 {
            let _ = write!(out, "<div class=\"f\">{}:<pre>{}</pre></div>", esc(name), esc(&text));
        } else {
            let _ = write!(out, " <span class=\"f\">{}: {}</span>", esc(name), esc(&text));
        }
    }
    out
}

mod overview;
pub use overview::MAX_ATTENTION_ROWS;
#[cfg(test)]
mod tests;
