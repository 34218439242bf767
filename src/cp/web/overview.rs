//! The web page's overview (`GET /`): the fleet's counts, what needs a
//! person, and every rollout that is not superseded. Everything it shows is
//! counted in SQL or cut to a bound, so the page costs the same on a
//! 100,000-host fleet as on ten hosts (a rollout's hosts are on its own,
//! paged, page).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hyper::StatusCode;
use rusqlite::Connection;
use time::OffsetDateTime;

use super::{
    age, counts, document, esc, host_link, html_response, is_long_deferral, rollout_link, rollout_section, Listing,
    MAX_INLINE_HOSTS,
};
use crate::cp::planner::RolloutState;
use crate::cp::routes::Resp;
use crate::cp::store::{self, HostRow, LivenessCounts, StoreError};
use crate::cp::views::{self, RolloutSummary, StatusView};

/// Rows of each host list on the overview (unreachable, drifting, waiting
/// for a reboot): the page is re-fetched every few seconds; the JSON views
/// have the rest.
pub const MAX_ATTENTION_ROWS: usize = 100;

/// `GET /`: counts from SQL, the attention lists cut at
/// [`MAX_ATTENTION_ROWS`], each unsuperseded rollout with its hosts inline
/// up to [`MAX_INLINE_HOSTS`] (else its wave counts and a link).
pub(super) fn page(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<Resp, StoreError> {
    let (status, live) = views::status_and_liveness(conn, path, now, stale_after_secs)?;
    let unreachable = store::unreachable_host_rows(conn, path, now, stale_after_secs, MAX_ATTENTION_ROWS)?;
    let mut sections = Vec::new();
    for head in store::rollout_heads(conn, path)?.iter().filter(|h| h.state != RolloutState::Superseded) {
        let (detail, listing) = if head.n_hosts <= MAX_INLINE_HOSTS {
            match views::rollout(conn, path, &head.rollout_id, now, None, MAX_INLINE_HOSTS)? {
                Some(d) => (d, Listing::Inline),
                None => continue,
            }
        } else {
            (views::outline(conn, path, head)?, Listing::Elsewhere)
        };
        let counts = store::wave_counts(conn, path, &head.rollout_id)?;
        sections.push(rollout_section(&detail, &counts, listing));
    }
    Ok(html_response(StatusCode::OK, document("Fleet", &overview(&status, &live, &unreachable, &sections))))
}

fn overview(status: &StatusView, live: &LivenessCounts, unreachable: &[HostRow], sections: &[String]) -> String {
    let mut out = String::from("<main id=\"main\">");
    let _ = write!(out, "<p class=\"muted\">control plane time {}</p>", esc(&status.server_time));
    out.push_str(&fleet_cards(status, live));
    out.push_str(&attention_lists(status, unreachable));
    out.push_str("<h1>Rollouts</h1>");
    if sections.is_empty() {
        out.push_str("<p class=\"muted\">No rollout yet: publish one with <code>nixfleet cp publish</code>.</p>");
    }
    for section in sections.iter().rev() {
        out.push_str(section);
    }
    let superseded: Vec<&RolloutSummary> =
        status.rollouts.iter().filter(|r| r.state == RolloutState::Superseded).collect();
    if !superseded.is_empty() {
        let _ = write!(
            out,
            "<details id=\"superseded\"><summary>{} superseded rollout(s)</summary><div class=\"scroll\"><table>\
             <tr><th>rollout</th><th>superseded by</th><th>hosts</th><th>updated</th></tr>",
            superseded.len()
        );
        for r in superseded.iter().rev() {
            let by = r.superseded_by.as_ref().map(|id| rollout_link(id.as_str())).unwrap_or_default();
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{by}</td><td>{}</td><td>{}</td></tr>",
                rollout_link(r.rollout_id.as_str()),
                counts(&r.hosts_by_state),
                esc(&r.updated_at)
            );
        }
        out.push_str("</table></div></details>");
    }
    out.push_str("</main>");
    out
}

fn fleet_cards(status: &StatusView, live: &LivenessCounts) -> String {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for r in status.rollouts.iter().filter(|r| r.state != RolloutState::Superseded) {
        for (state, n) in &r.hosts_by_state {
            *by_state.entry(state.clone()).or_insert(0) += n;
        }
    }
    let never_seen = live.never_seen;
    let long = status.deferred.iter().filter(|d| is_long_deferral(d.deferred_for_secs)).count();
    let card = |label: &str, n: usize, alert: bool| {
        let class = if alert && n > 0 { "card alert" } else { "card" };
        format!("<div class=\"{class}\"><span class=\"n\">{n}</span> {}</div>", esc(label))
    };
    let mut out = String::from("<h1>Fleet</h1><div class=\"cards\">");
    out.push_str(&card("hosts", status.n_hosts, false));
    out.push_str(&card("unreachable", status.n_unreachable, true));
    out.push_str(&card("never seen", never_seen, false));
    out.push_str(&card("drifting", status.n_drifting, true));
    out.push_str(&card("waiting for a reboot", status.deferred.len(), false));
    out.push_str(&card("long deferrals", long, true));
    out.push_str(&card("quarantined closures", status.quarantined.len(), true));
    out.push_str("</div>");
    let _ = write!(out, "<p>Hosts in current rollouts by state: {}</p>", counts(&by_state));
    out
}

/// "… and N more" under a list cut at [`MAX_ATTENTION_ROWS`].
fn more(out: &mut String, total: usize, shown: usize) {
    if total > shown {
        let _ = write!(
            out,
            "<p class=\"muted\">… and {} more: <code>GET /v1/status</code> and <code>GET /v1/hosts</code> list \
             them all.</p>",
            total - shown
        );
    }
}

/// Unreachable, drifting and deferred hosts and quarantined closures:
/// what needs a person, each list only when it is not empty, and at most
/// [`MAX_ATTENTION_ROWS`] rows of each host list.
fn attention_lists(status: &StatusView, unreachable: &[HostRow]) -> String {
    let mut out = String::new();
    if !unreachable.is_empty() {
        out.push_str("<h2>Unreachable</h2><div class=\"scroll\"><table><tr><th>host</th><th>last heartbeat</th></tr>");
        for h in unreachable {
            let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", host_link(&h.hostname), esc(&h.last_heartbeat_at));
        }
        out.push_str("</table></div>");
        more(&mut out, status.n_unreachable, unreachable.len());
    }
    if !status.drifting.is_empty() {
        out.push_str(
            "<h2>Drifting</h2><div class=\"scroll\"><table><tr><th>host</th><th>runs</th><th>expected</th>\
             <th>according to</th></tr>",
        );
        for d in status.drifting.iter().take(MAX_ATTENTION_ROWS) {
            let _ = write!(
                out,
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                host_link(d.hostname.as_str()),
                esc(&d.current_closure),
                esc(&d.expected_closure),
                rollout_link(&d.expected_from)
            );
        }
        out.push_str("</table></div>");
        more(&mut out, status.drifting.len(), status.drifting.len().min(MAX_ATTENTION_ROWS));
    }
    if !status.deferred.is_empty() {
        out.push_str(
            "<h2>Waiting for a reboot</h2><div class=\"scroll\"><table><tr><th>host</th><th>rollout</th>\
             <th>deferred at</th><th>for</th></tr>",
        );
        for d in status.deferred.iter().take(MAX_ATTENTION_ROWS) {
            let class = if is_long_deferral(d.deferred_for_secs) { " class=\"long\"" } else { "" };
            let _ = write!(
                out,
                "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                host_link(d.hostname.as_str()),
                rollout_link(d.rollout_id.as_str()),
                esc(&d.deferred_at),
                age(d.deferred_for_secs)
            );
        }
        out.push_str("</table></div>");
        more(&mut out, status.deferred.len(), status.deferred.len().min(MAX_ATTENTION_ROWS));
    }
    if !status.quarantined.is_empty() {
        out.push_str(
            "<h2>Quarantined closures</h2><div class=\"scroll\"><table><tr><th>channel</th><th>closure</th>\
             <th>reverted on</th><th>rollout</th><th>at</th></tr>",
        );
        for q in &status.quarantined {
            let _ = write!(
                out,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&q.channel),
                esc(&q.closure),
                host_link(&q.hostname),
                rollout_link(&q.rollout_id),
                esc(&q.quarantined_at)
            );
        }
        out.push_str("</table></div>");
    }
    out
}
