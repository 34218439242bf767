//! The online backup of a control-plane database (`nixfleet cp backup`):
//! SQLite's backup API, never a file copy, so a database in use by
//! `cp serve` is copied as one consistent snapshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

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
