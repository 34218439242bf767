//! The journal's file primitives and their write discipline (see the
//! module doc): a new file is written to a `.tmp`, synced, renamed and its
//! folder synced; a move is a rename and a sync of the destination. A
//! failure that leaves the disk unknown poisons the queue.

use std::io;
use std::path::{Path, PathBuf};

use super::record::{self, DeadReason};
use super::{io_err, Queue, QueueError};

impl Queue {
    /// tmp → write → fsync → rename → fsync dir. On failure nothing stays
    /// visible under `path`, or the queue is poisoned.
    pub(super) fn write_durably(&mut self, dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), QueueError> {
        let tmp = tmp_path(path);
        let result = (|| {
            self.storage.write_file(&tmp, bytes).map_err(io_err("write", &tmp))?;
            self.storage.fsync_file(&tmp).map_err(io_err("fsync", &tmp))?;
            self.storage.rename(&tmp, path).map_err(io_err("rename", &tmp))
        })();
        if let Err(e) = result {
            // Never fsync again and trust it: drop the tmp, the caller
            // writes the whole thing anew.
            let _ = self.storage.remove_file(&tmp);
            self.undo_visible(dir, path);
            return Err(e);
        }
        if let Err(e) = self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir)) {
            self.undo_visible(dir, path);
            return Err(e);
        }
        Ok(())
    }

    /// After a failed write, makes sure `path` is durably absent, or
    /// poisons the queue when that cannot be established.
    fn undo_visible(&mut self, dir: &Path, path: &Path) {
        let outcome = match self.storage.remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => Err(format!("remove {}: {e}", path.display())),
            Ok(()) => self.storage.fsync_dir(dir).map_err(|e| format!("fsync directory {}: {e}", dir.display())),
        };
        if let Err(why) = outcome {
            tracing::error!(path = %path.display(), %why, "cannot undo a failed queue write; queue stopped");
            self.poisoned = Some(why);
        }
    }

    /// Removes a file; one already gone is fine. Whether it was there.
    pub(super) fn remove_if_present(&self, path: &Path) -> Result<bool, QueueError> {
        match self.storage.remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(QueueError::Io { op: "remove", path: path.to_owned(), source }),
        }
    }

    /// rename `from_dir/name` → `to_dir/name`, fsync the destination (see
    /// "Write discipline"). A retry after a rename that happened but whose
    /// fsync failed finds the file already moved and only syncs.
    pub(super) fn move_durably(&mut self, from_dir: &Path, to_dir: &Path, name: &str) -> Result<(), QueueError> {
        let (from, to) = (from_dir.join(name), to_dir.join(name));
        match self.storage.rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.storage.exists(&to).unwrap_or(false) => {}
            Err(source) => return Err(QueueError::Io { op: "rename", path: from, source }),
        }
        self.storage.fsync_dir(to_dir).map_err(io_err("fsync directory", to_dir))
    }

    /// Writes `dead/<name>.reason` (tmp, fsync, rename; the caller's move
    /// syncs `dead/`).
    pub(super) fn write_dead_reason(&mut self, name: &str, reason: &DeadReason) -> Result<(), QueueError> {
        let path = self.dead_dir.join(format!("{name}{}", record::REASON_SUFFIX));
        let tmp = tmp_path(&path);
        // The directory fsync makes the reason durable before the event
        // moves in: a dead event is never without its reason (the rebuild
        // after a restart ignores unexplained dead events, which would
        // leave a hole in the rollout's history).
        let dead_dir = self.dead_dir.clone();
        let result = (|| {
            self.storage.write_file(&tmp, &reason.encode()).map_err(io_err("write", &tmp))?;
            self.storage.fsync_file(&tmp).map_err(io_err("fsync", &tmp))?;
            self.storage.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            self.storage.fsync_dir(&dead_dir).map_err(io_err("fsync directory", &dead_dir))
        })();
        if result.is_err() {
            let _ = self.storage.remove_file(&tmp);
        }
        result
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut os = path.as_os_str().to_owned();
    os.push(record::TMP_SUFFIX);
    PathBuf::from(os)
}
