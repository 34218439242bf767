//! The storage seam: the few file-system operations the queue performs,
//! behind a trait, so tests can fail any one of them (EIO, ENOSPC) or
//! record them and enumerate what a crash could leave behind
//! (`queue::sim`, test-only). Each method is one system-call-sized step
//! with no hidden syncing, so the queue's write discipline is visible in
//! the queue code itself.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

pub trait Storage: fmt::Debug + Send {
    /// Creates a directory and its parents; an existing one is fine.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates or truncates `path` and writes all of `bytes`. Not synced.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Makes the data of `path` durable.
    fn fsync_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`. Not durable until the
    /// directories involved are synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creates, renames and removes in `dir` durable.
    fn fsync_dir(&self, dir: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Names of the regular files in `dir`, in no particular order.
    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

impl Storage for RealStorage {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        file.write_all(bytes)
    }

    fn fsync_file(&self, path: &Path) -> io::Result<()> {
        // fsync flushes the inode's dirty pages whichever descriptor wrote
        // them, so a fresh read-only descriptor is enough.
        File::open(path)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                // The queue only writes ASCII names; anything else is not ours.
                Err(raw) => tracing::warn!(dir = %dir.display(), name = ?raw, "ignoring a non-UTF-8 file name"),
            }
        }
        Ok(names)
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
}
