//! A read-only view of a queue for `nixfleet queue ls|inspect`. It takes
//! no lock and writes nothing, so it is safe while an agent runs: a file
//! that moves between the listing and the read (acked, rejected, pruned)
//! is simply found in the folder listed after it, or not at all.
//! Unreadable files are shown as dead with the reason, as the agent will
//! move them at its next start.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{self, DeadReason, QueuedEvent, RecordHeader, RevivedNote};
use super::storage::{self, UnsafeFile, MAX_QUEUE_FILE_BYTES};
use super::{ACKED_DIR, DEAD_DIR, HIGH_WATER_FILE, QUEUE_DIR};

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    Pending,
    Acked,
    Dead,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Pending => "pending",
            EntryState::Acked => "acked",
            EntryState::Dead => "dead",
        }
    }
}

/// One file of the queue as `queue ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    /// Dead if in `dead/` or unreadable wherever it is.
    pub state: EntryState,
    /// The folder the file was read from.
    pub folder: EntryState,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// From the record, or from the file name when the record is unreadable.
    pub qseq: Option<u64>,
    /// None when the record is unreadable.
    pub header: Option<RecordHeader>,
    /// Why the event is dead: the sidecar's reason, or the read error.
    pub reason: Option<String>,
    /// For an acked event that was revived from `dead/` (re-sent after a
    /// gap or a Replay-From and applied): its old reason and when.
    pub revived: Option<RevivedNote>,
}

impl ViewEntry {
    pub fn name(&self) -> &str {
        self.path.file_name().and_then(|n| n.to_str()).unwrap_or("")
    }
}

/// Event files per folder, from the directory listings alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pending: usize,
    pub acked: usize,
    pub dead: usize,
}

/// One event read in full for `queue inspect`.
#[derive(Debug)]
pub struct Inspected {
    pub entry: ViewEntry,
    /// The file's bytes as stored.
    pub raw: Vec<u8>,
    /// The decoded record, or why it cannot be decoded.
    pub record: Result<QueuedEvent, InspectError>,
    pub dead_reason: Option<DeadReason>,
}

/// Why `queue inspect` shows no record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Not read at all (a link, not a regular file, too large).
    #[error(transparent)]
    NotRead(#[from] UnsafeFile),
    /// Read, but the bytes are not a valid record.
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("state dir {} does not exist or is not a directory", path.display())]
    NoStateDir { path: PathBuf },
    #[error("{} is not an agent state dir: it has no {QUEUE_DIR}/ folder", path.display())]
    NotAQueue { path: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no event {selector:?} in {}", root.display())]
    NotFound { selector: String, root: PathBuf },
}

/// One entry as read: its view, and its bytes or why they were not read.
type EntryRead = (ViewEntry, Result<Vec<u8>, UnsafeFile>);

/// Read-only access to `{state_dir}/outbound-queue/`.
#[derive(Debug, Clone)]
pub struct QueueView {
    root: PathBuf,
}

impl QueueView {
    /// Checks that `state_dir` holds a queue; takes no lock.
    pub fn open(state_dir: &Path) -> Result<QueueView, ViewError> {
        if !state_dir.is_dir() {
            return Err(ViewError::NoStateDir { path: state_dir.to_owned() });
        }
        let root = state_dir.join(QUEUE_DIR);
        if !root.is_dir() {
            return Err(ViewError::NotAQueue { path: state_dir.to_owned() });
        }
        Ok(QueueView { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn folder(&self, state: EntryState) -> PathBuf {
        match state {
            EntryState::Pending => self.root.clone(),
            EntryState::Acked => self.root.join(ACKED_DIR),
            EntryState::Dead => self.root.join(DEAD_DIR),
        }
    }

    /// Sorted event file names of one folder (a missing `acked/` or
    /// `dead/` is empty: an agent creates them at its first start).
    fn event_names(&self, folder: EntryState) -> Result<Vec<String>, ViewError> {
        let dir = self.folder(folder);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound && folder != EntryState::Pending => return Ok(Vec::new()),
            Err(source) => return Err(ViewError::Io { op: "list", path: dir, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ViewError::Io { op: "list", path: dir.clone(), source })?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            // high-water.json is the queue's own bookkeeping; every other
            // .json is an event (or a damaged one, which ls shows as dead).
            let is_high_water = folder == EntryState::Pending && name == HIGH_WATER_FILE;
            if name.ends_with(record::EVENT_SUFFIX) && !is_high_water {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// How many event files each folder holds.
    pub fn counts(&self) -> Result<Counts, ViewError> {
        Ok(Counts {
            pending: self.event_names(EntryState::Pending)?.len(),
            acked: self.event_names(EntryState::Acked)?.len(),
            dead: self.event_names(EntryState::Dead)?.len(),
        })
    }

    /// The events of the chosen folders, in qseq order.
    pub fn list(&self, folders: &[EntryState]) -> Result<Vec<ViewEntry>, ViewError> {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        // Files only move pending → acked/dead, so listing in this order
        // finds a file that moves during the listing in its new folder.
        for folder in [EntryState::Pending, EntryState::Acked, EntryState::Dead] {
            if !folders.contains(&folder) {
                continue;
            }
            for name in self.event_names(folder)? {
                if !seen.insert(name.clone()) {
                    continue;
                }
                if let Some((entry, _)) = self.read_entry(folder, &name)? {
                    entries.push(entry);
                }
            }
        }
        entries.sort_by(|a, b| (a.qseq, a.name()).cmp(&(b.qseq, b.name())));
        Ok(entries)
    }

    /// Reads one file; None if it vanished since the listing. The bytes are
    /// an [`UnsafeFile`] error when the file is not read at all (a link,
    /// not a regular file, beyond [`MAX_QUEUE_FILE_BYTES`]).
    fn read_entry(&self, folder: EntryState, name: &str) -> Result<Option<EntryRead>, ViewError> {
        let path = self.folder(folder).join(name);
        // Never through a link, never more than the queue's file bound: a
        // symlink to /etc/passwd is shown as what it is, not followed.
        let raw = match storage::read_regular(&path, MAX_QUEUE_FILE_BYTES) {
            Ok(raw) => Ok(raw),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => match storage::unsafe_file(&e) {
                Some(why) => Err(why.clone()),
                None => return Err(ViewError::Io { op: "read", path, source: e }),
            },
        };
        let size_bytes = match &raw {
            Ok(raw) => raw.len() as u64,
            Err(_) => fs::symlink_metadata(&path).map_or(0, |m| m.len()),
        };
        let (header, mut reason) = match raw.as_ref().map(|raw| record::decode_header(raw)) {
            Ok(Ok(header)) => (Some(header), None),
            Ok(Err(e)) => (None, Some(format!("unreadable: {e}"))),
            Err(why) => (None, Some(format!("unreadable: {why}"))),
        };
        if folder == EntryState::Dead {
            reason = Some(match self.dead_reason(name) {
                Some(dead) => match reason {
                    Some(read_error) => format!("{}; {read_error}", dead.reason),
                    None => dead.reason,
                },
                None => reason.unwrap_or_else(|| "(reason file missing)".to_owned()),
            });
        }
        let state = if header.is_none() { EntryState::Dead } else { folder };
        let qseq = header.as_ref().map(|h| h.qseq).or_else(|| record::qseq_of_name(name));
        let revived = if folder == EntryState::Acked { self.revived_note(name) } else { None };
        let entry = ViewEntry { state, folder, path, size_bytes, qseq, header, reason, revived };
        Ok(Some((entry, raw)))
    }

    fn revived_note(&self, name: &str) -> Option<RevivedNote> {
        let path = self.folder(EntryState::Acked).join(format!("{name}{}", record::REVIVED_SUFFIX));
        storage::read_regular(&path, MAX_QUEUE_FILE_BYTES).ok().and_then(|bytes| RevivedNote::decode(&bytes).ok())
    }

    fn dead_reason(&self, name: &str) -> Option<DeadReason> {
        let path = self.folder(EntryState::Dead).join(format!("{name}{}", record::REASON_SUFFIX));
        storage::read_regular(&path, MAX_QUEUE_FILE_BYTES).ok().and_then(|bytes| DeadReason::decode(&bytes).ok())
    }

    /// Finds one event by qseq (`42`) or by file name or path, in any
    /// folder, and reads it in full.
    pub fn inspect(&self, selector: &str) -> Result<Inspected, ViewError> {
        let not_found = || ViewError::NotFound { selector: selector.to_owned(), root: self.root.clone() };
        let wanted_name = Path::new(selector).file_name().and_then(|n| n.to_str()).ok_or_else(not_found)?;
        let wanted_qseq: Option<u64> = selector.parse().ok();
        for folder in [EntryState::Pending, EntryState::Acked, EntryState::Dead] {
            for name in self.event_names(folder)? {
                let hit = match wanted_qseq {
                    Some(qseq) => record::qseq_of_name(&name) == Some(qseq),
                    None => name == wanted_name,
                };
                if !hit {
                    continue;
                }
                let Some((entry, raw)) = self.read_entry(folder, &name)? else { continue };
                let (raw, record) = match raw {
                    Ok(raw) => {
                        let record = record::decode(&raw).map_err(InspectError::from);
                        (raw, record)
                    }
                    Err(why) => (Vec::new(), Err(InspectError::from(why))),
                };
                let dead_reason = if folder == EntryState::Dead { self.dead_reason(&name) } else { None };
                return Ok(Inspected { entry, raw, record, dead_reason });
            }
        }
        Err(not_found())
    }
}
