//! `nixfleet cp resume|cancel|unquarantine|plan|backup`: thin clients of
//! the operator routes ([`super::actions`]), and the online backup of a
//! control-plane database (SQLite's backup API, never a file copy).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

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

/// Busy/locked answers of the backup step tolerated before giving up
/// (10 ms apart: 10 s). In WAL mode a reader is never blocked by the
/// writer, so this is only reached when another process holds an
/// exclusive lock (e.g. a migration).
const MAX_BACKUP_BUSY_RETRIES: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{} already exists; cp backup never overwrites a file (choose a new name)", .0.display())]
    Exists(PathBuf),
    #[error("{} does not exist", .0.display())]
    NoSource(PathBuf),
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("backing up {} to {}: {source}", from.display(), to.display())]
    Sqlite { from: PathBuf, to: PathBuf, source: rusqlite::Error },
    #[error("the copy {} fails its integrity check: {detail}", path.display())]
    Integrity { path: PathBuf, detail: String },
    #[error("{} stayed locked for {MAX_BACKUP_BUSY_RETRIES} attempts; is another process migrating it?", .0.display())]
    Busy(PathBuf),
}

/// `cp backup --db cp.db OUT`.
pub fn backup(args: &CpBackupArgs) -> Result<(), CpError> {
    let (n_rollouts, n_events, n_pages) = backup_file(&args.db, &args.out)?;
    let line = format!(
        "backed up {} to {}: {n_rollouts} rollouts, {n_events} logged events, {n_pages} pages\n",
        args.db.display(),
        args.out.display()
    );
    print_stdout(&line).map_err(CpError::Stdout)
}

/// Copies `from` (possibly in use by `cp serve`) to the new file `to`
/// with SQLite's online backup; `to` is created exclusively, removed if
/// the copy fails, checked (`PRAGMA integrity_check`) and fsynced.
pub fn backup_file(from: &Path, to: &Path) -> Result<(i64, i64, i32), BackupError> {
    if !from.is_file() {
        return Err(BackupError::NoSource(from.to_owned()));
    }
    // Claims the name atomically: a file that appears meanwhile is not overwritten.
    match fs_err::OpenOptions::new().write(true).create_new(true).open(to) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(BackupError::Exists(to.to_owned())),
        Err(source) => return Err(BackupError::Create { path: to.to_owned(), source }),
    }
    let result = copy_and_check(from, to);
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result
}

fn copy_and_check(from: &Path, to: &Path) -> Result<(i64, i64, i32), BackupError> {
    let sql = |source| BackupError::Sqlite { from: from.to_owned(), to: to.to_owned(), source };
    // Read-write open without migrating: a read-only connection cannot
    // join a WAL database whose -shm it may not create. Nothing is written.
    let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(sql)?;
    src.execute_batch("PRAGMA query_only = 1; PRAGMA busy_timeout = 5000;").map_err(sql)?;
    let mut dst = Connection::open(to).map_err(sql)?;
    // One step copying every page: the step runs in one read transaction,
    // so the copy is one consistent snapshot of the log and its records
    // (smaller steps restart whenever the CP commits in between, and under
    // steady ingest might never finish). In WAL mode the CP's writer keeps
    // committing meanwhile.
    let n_pages = {
        let backup = Backup::new(&src, &mut dst).map_err(sql)?;
        let mut busy = 0usize;
        loop {
            match backup.step(-1).map_err(sql)? {
                StepResult::Done => break,
                StepResult::Busy | StepResult::Locked if busy < MAX_BACKUP_BUSY_RETRIES => {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                StepResult::Busy | StepResult::Locked => return Err(BackupError::Busy(from.to_owned())),
                _ => {}
            }
        }
        backup.progress().pagecount
    };
    let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(sql)?;
    if check != "ok" {
        return Err(BackupError::Integrity { path: to.to_owned(), detail: check });
    }
    let count = |table: &str| dst.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0));
    let (n_rollouts, n_events) = (count("rollouts").map_err(sql)?, count("event_log").map_err(sql)?);
    drop(dst);
    let file = fs_err::File::open(to).map_err(|source| BackupError::Create { path: to.to_owned(), source })?;
    file.sync_all().map_err(|source| BackupError::Create { path: to.to_owned(), source })?;
    Ok((n_rollouts, n_events, n_pages))
}
