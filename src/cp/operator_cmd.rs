//! `nixfleet cp resume|cancel|unquarantine|plan|backup`: thin clients of
//! the operator routes ([`super::actions`]), and `cp backup`, whose online
//! copy of a control-plane database is [`store::backup_file`].

use std::fmt::Write as _;

use hyper::Method;

use super::cmd::CpError;
use super::preview::{HostPlan, PlanPreview};
use super::routes::MAX_ENVELOPE_BYTES;
use super::store::{self, ActionRecord};
use crate::cli::{CpBackupArgs, CpPlanArgs, CpRolloutActionArgs, CpUnquarantineArgs};
use crate::client::{self, CpUrl};
use crate::ids::{Closure, RolloutId};
use crate::output::print_stdout;

/// `cp resume` / `cp cancel`.
pub async fn rollout_action(action: &str, args: CpRolloutActionArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let id =
        RolloutId::parse(&args.rollout).map_err(|e| CpError::Refused(format!("rollout {:?}: {e}", args.rollout)))?;
    store::check_reason(&args.reason).map_err(|m| CpError::Refused(format!("--{m}")))?;
    let body = serde_json::json!({ "reason": args.reason });
    let path = format!("/v1/rollouts/{}/{action}", id.as_str().replace('@', "%40"));
    let record = post_action(&url, &path, body).await?;
    let line = match action {
        "resume" => {
            let accepted = record.detail.get("accepted_failures").and_then(|v| v.as_array()).map_or(0, Vec::len);
            format!("resumed {id} (action {}; {accepted} failed host(s) accepted)\n", record.id)
        }
        _ => {
            let n = |k: &str| record.detail.get(k).and_then(|v| v.as_array()).map_or(0, Vec::len);
            format!(
                "cancelled {id} (action {}; {} host(s) in flight finish, {} standing dispatch(es) withdrawn)\n",
                record.id,
                n("in_flight"),
                n("dispatches_withdrawn")
            )
        }
    };
    print_stdout(&line).map_err(CpError::Stdout)
}

/// `cp unquarantine --channel C CLOSURE`.
pub async fn unquarantine(args: CpUnquarantineArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let closure =
        Closure::parse(&args.closure).map_err(|e| CpError::Refused(format!("closure {:?}: {e}", args.closure)))?;
    store::check_reason(&args.reason).map_err(|m| CpError::Refused(format!("--{m}")))?;
    let body = serde_json::json!({ "closure": closure, "reason": args.reason });
    let path = format!("/v1/channels/{}/unquarantine", args.channel);
    let record = post_action(&url, &path, body).await?;
    let by = record.detail.get("quarantined_by_host").and_then(|v| v.as_str()).unwrap_or("?");
    let line = format!(
        "unquarantined {closure} on channel {} (action {}; it was reverted by {by})\n",
        args.channel, record.id
    );
    print_stdout(&line).map_err(CpError::Stdout)
}

/// POSTs an action; a refusal is the control plane's sentence
/// (`ClientError::Status`: "the control plane answered 409 Conflict: …").
async fn post_action(url: &CpUrl, path: &str, body: serde_json::Value) -> Result<ActionRecord, CpError> {
    let resp = client::request(url, Method::POST, path, &[], Some(body.to_string().into_bytes())).await?;
    Ok(resp.json()?)
}

/// `cp plan SIGNED.json [--json]`.
pub async fn plan(args: CpPlanArgs) -> Result<(), CpError> {
    let url = args.client.url()?;
    let meta = fs_err::metadata(&args.envelope).map_err(CpError::Read)?;
    if meta.len() > MAX_ENVELOPE_BYTES as u64 {
        return Err(CpError::TooLarge { path: args.envelope.clone(), limit: MAX_ENVELOPE_BYTES });
    }
    let bytes = fs_err::read(&args.envelope).map_err(CpError::Read)?;
    let resp = client::request(&url, Method::POST, "/v1/plan", &[], Some(bytes)).await?;
    let text = if args.json {
        let value: serde_json::Value = resp.json()?;
        format!("{}\n", serde_json::to_string_pretty(&value).unwrap_or_default())
    } else {
        render_plan(&resp.json()?)
    };
    print_stdout(&text).map_err(CpError::Stdout)
}

fn render_plan(p: &PlanPreview) -> String {
    let mut out = String::new();
    let opens = match &p.superseded_by {
        Some(by) => format!("would open superseded by {by}: nothing of it would be dispatched"),
        None if p.would_supersede.is_empty() => "would open active".to_owned(),
        None => {
            let ids: Vec<&str> = p.would_supersede.iter().map(RolloutId::as_str).collect();
            format!("would open active, superseding {}", ids.join(", "))
        }
    };
    let _ = writeln!(out, "dry run of {} (nothing was changed): {opens}", p.rollout_id);
    if p.already_published {
        let _ = writeln!(out, "note: {} is already published; publishing it again changes nothing", p.rollout_id);
    }
    for wave in &p.waves {
        let count = |plan: HostPlan| wave.hosts.iter().filter(|h| h.plan == plan).count();
        let _ = writeln!(
            out,
            "\nwave {} {:?} (max_in_flight {}): {} to dispatch, {} already running the target, {} quarantined, {} busy",
            wave.index,
            wave.name,
            wave.max_in_flight,
            count(HostPlan::Dispatch),
            count(HostPlan::AlreadyRunning),
            count(HostPlan::Quarantined),
            count(HostPlan::Busy)
        );
        for h in &wave.hosts {
            let what = match h.plan {
                HostPlan::Dispatch => "dispatch".to_owned(),
                HostPlan::AlreadyRunning => "dispatch (already runs the target)".to_owned(),
                HostPlan::Quarantined => "skip: target quarantined on the channel".to_owned(),
                HostPlan::Busy => {
                    format!("hold: busy in {}", h.busy_in.as_ref().map_or("another rollout", RolloutId::as_str))
                }
            };
            let mut notes = Vec::new();
            if h.unreachable {
                notes.push("UNREACHABLE");
            }
            if h.drifting {
                notes.push("DRIFTING");
            }
            let line = format!("  {:<24} {:<44} {}", h.hostname.as_str(), what, notes.join(" "));
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

/// `cp backup --db cp.db OUT`.
pub fn backup(args: &CpBackupArgs) -> Result<(), CpError> {
    let (n_rollouts, n_events, n_pages) = store::backup_file(&args.db, &args.out)?;
    let line = format!(
        "backed up {} to {}: {n_rollouts} rollouts, {n_events} logged events, {n_pages} pages\n",
        args.db.display(),
        args.out.display()
    );
    print_stdout(&line).map_err(CpError::Stdout)
}
