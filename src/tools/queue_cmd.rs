//! `nixfleet queue ls|inspect`: the operator's read-only look at an
//! agent's queue, through [`QueueView`] (no lock, nothing written), so it
//! is safe while the agent runs.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::output::print_stdout;
use crate::queue::view::Counts;
use crate::queue::{EntryState, QueueView, RevivedNote, ViewEntry, ViewError};

/// Undecodable bytes shown by `inspect` are cut here: enough to see what
/// the file holds, without flooding a terminal with a huge garbage file.
const MAX_RAW_PREVIEW_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum QueueCmdError {
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("writing to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// The folders `queue ls` shows for its `--pending`, `--acked`, `--dead`
/// and `--all` flags: pending and dead when none is given.
pub fn ls_folders(pending: bool, acked: bool, dead: bool, all: bool) -> Vec<EntryState> {
    let mut folders = Vec::new();
    if pending || all {
        folders.push(EntryState::Pending);
    }
    if acked || all {
        folders.push(EntryState::Acked);
    }
    if dead || all {
        folders.push(EntryState::Dead);
    }
    if folders.is_empty() {
        folders = vec![EntryState::Pending, EntryState::Dead];
    }
    folders
}

/// Lists the chosen folders as a table or one JSON document.
pub fn ls(state_dir: &Path, folders: &[EntryState], json: bool, now: OffsetDateTime) -> Result<(), QueueCmdError> {
    let view = QueueView::open(state_dir)?;
    let entries = view.list(folders)?;
    let counts = view.counts()?;
    let text = if json { ls_json(&view, &entries, counts, now) } else { ls_table(&entries, counts, folders, now) };
    print_stdout(&text)?;
    Ok(())
}

#[derive(Serialize)]
struct LsJson<'a> {
    queue_dir: &'a Path,
    counts: Counts,
    events: Vec<EntryJson<'a>>,
}

#[derive(Serialize)]
struct EntryJson<'a> {
    qseq: Option<u64>,
    state: EntryState,
    folder: EntryState,
    file: &'a str,
    size_bytes: u64,
    hostname: Option<&'a str>,
    rollout_id: Option<&'a str>,
    seq: Option<u64>,
    kind: Option<&'a str>,
    created_at: Option<String>,
    age_secs: Option<i64>,
    reason: Option<&'a str>,
    /// Set for an acked event that came back from `dead/` (re-sent and
    /// applied after a gap or a Replay-From).
    revived: Option<RevivedJson<'a>>,
}

#[derive(Serialize)]
struct RevivedJson<'a> {
    revived_at: Option<String>,
    was_dead_cause: &'static str,
    was_dead_reason: &'a str,
    was_dead_at: Option<String>,
}

/// One line for a revived event: when, and what it had been dead for.
fn revived_text(note: &RevivedNote) -> String {
    let at = note.revived_at.format(&Rfc3339).unwrap_or_default();
    format!("revived {at}; was dead ({}): {}", note.was_dead.cause.as_str(), note.was_dead.reason)
}

fn ls_json(view: &QueueView, entries: &[ViewEntry], counts: Counts, now: OffsetDateTime) -> String {
    let events = entries
        .iter()
        .map(|e| {
            let h = e.header.as_ref();
            EntryJson {
                qseq: e.qseq,
                state: e.state,
                folder: e.folder,
                file: e.name(),
                size_bytes: e.size_bytes,
                hostname: h.map(|h| h.hostname.as_str()),
                rollout_id: h.map(|h| h.rollout_id.as_str()),
                seq: h.map(|h| h.seq),
                kind: h.map(|h| h.kind.as_str()),
                created_at: h.and_then(|h| h.created_at.format(&Rfc3339).ok()),
                age_secs: h.map(|h| (now - h.created_at).whole_seconds().max(0)),
                reason: e.reason.as_deref(),
                revived: e.revived.as_ref().map(|n| RevivedJson {
                    revived_at: n.revived_at.format(&Rfc3339).ok(),
                    was_dead_cause: n.was_dead.cause.as_str(),
                    was_dead_reason: &n.was_dead.reason,
                    was_dead_at: n.was_dead.dead_at.format(&Rfc3339).ok(),
                }),
            }
        })
        .collect();
    let doc = LsJson { queue_dir: view.root(), counts, events };
    let mut text = serde_json::to_string(&doc).expect("listing serialises (string keys only)");
    text.push('\n');
    text
}

fn ls_table(entries: &[ViewEntry], counts: Counts, folders: &[EntryState], now: OffsetDateTime) -> String {
    let header = ["QSEQ", "STATE", "ROLLOUT", "SEQ", "KIND", "AGE", "SIZE", "REASON"];
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            let h = e.header.as_ref();
            let dash = || "-".to_owned();
            [
                e.qseq.map_or_else(dash, |q| q.to_string()),
                e.state.as_str().to_owned(),
                h.map_or_else(dash, |h| h.rollout_id.clone()),
                h.map_or_else(dash, |h| h.seq.to_string()),
                h.map_or_else(dash, |h| h.kind.clone()),
                h.map_or_else(dash, |h| age(now - h.created_at)),
                e.size_bytes.to_string(),
                match (&e.reason, &e.revived) {
                    (Some(reason), _) => one_line(reason),
                    (None, Some(note)) => one_line(&revived_text(note)),
                    (None, None) => String::new(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    if !rows.is_empty() {
        push_row(&mut out, &header.map(str::to_owned), &widths);
        for row in &rows {
            push_row(&mut out, row, &widths);
        }
    }
    let shown: Vec<&str> = folders.iter().map(|f| f.as_str()).collect();
    let _ = writeln!(
        out,
        "{} pending, {} acked, {} dead (showing {}: {} events)",
        counts.pending,
        counts.acked,
        counts.dead,
        shown.join("+"),
        rows.len()
    );
    out
}

fn push_row(out: &mut String, cells: &[String; 8], widths: &[usize; 8]) {
    let mut line = String::new();
    for (idx, (cell, width)) in cells.iter().zip(widths).enumerate() {
        // Numbers right-aligned, text left; no padding after the last column.
        let numeric = matches!(idx, 0 | 3 | 6);
        match (idx, numeric) {
            (7, _) => line.push_str(cell),
            (_, true) => {
                let _ = write!(line, "{cell:>width$}  ");
            }
            (_, false) => {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// A reason on one table line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// A short age: 42s, 5m, 3h, 2d (clock skew shows as 0s).
fn age(d: time::Duration) -> String {
    let secs = d.whole_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Prints one event: a readable summary, or the stored bytes with `--json`.
pub fn inspect(state_dir: &Path, selector: &str, json: bool, now: OffsetDateTime) -> Result<(), QueueCmdError> {
    let view = QueueView::open(state_dir)?;
    let found = view.inspect(selector)?;
    if json {
        let mut raw = found.raw;
        if raw.last() != Some(&b'\n') {
            raw.push(b'\n');
        }
        print_stdout(&String::from_utf8_lossy(&raw))?;
        return Ok(());
    }
    let e = &found.entry;
    let mut out = String::new();
    let _ = writeln!(out, "file:       {}", e.path.display());
    let _ = writeln!(out, "state:      {} (in {}/)", e.state.as_str(), e.folder.as_str());
    let _ = writeln!(out, "size:       {} bytes", e.size_bytes);
    match &found.record {
        Ok(q) => {
            let created = q.created_at.format(&Rfc3339).unwrap_or_default();
            let _ = writeln!(out, "qseq:       {}", q.qseq);
            let _ = writeln!(out, "hostname:   {}", q.hostname);
            let _ = writeln!(out, "rollout:    {}", q.rollout_id);
            let _ = writeln!(out, "seq:        {}", q.seq());
            let _ = writeln!(out, "kind:       {}", q.kind());
            let _ = writeln!(out, "created_at: {created} ({} ago)", age(now - q.created_at));
            let _ = writeln!(out, "checksum:   ok");
            if let Some(dead) = &found.dead_reason {
                let at = dead.dead_at.format(&Rfc3339).unwrap_or_default();
                let _ = writeln!(out, "dead:       {} at {at}: {}", dead.cause.as_str(), dead.reason);
            } else if let Some(reason) = &e.reason {
                let _ = writeln!(out, "dead:       {reason}");
            }
            if let Some(note) = &e.revived {
                let _ = writeln!(out, "revived:    {}", revived_text(note));
            }
            let event = serde_json::to_string_pretty(&q.event).expect("wire events serialise");
            let _ = writeln!(out, "event:\n{event}");
        }
        Err(why) => {
            let _ = writeln!(out, "record:     unreadable: {why}");
            if let Some(reason) = &e.reason {
                let _ = writeln!(out, "dead:       {reason}");
            }
            let preview = &found.raw[..found.raw.len().min(MAX_RAW_PREVIEW_BYTES)];
            let _ = writeln!(
                out,
                "raw ({} of {} bytes):\n{}",
                preview.len(),
                found.raw.len(),
                String::from_utf8_lossy(preview)
            );
        }
    }
    print_stdout(&out)?;
    Ok(())
}
