//! The storage seam: the few file-system operations the queue performs,
//! behind a trait, so tests can fail any one of them (EIO, ENOSPC) or
//! record them and enumerate what a crash could leave behind
//! (`queue::sim`, test-only). Each method is one system-call-sized step
//! with no hidden syncing, so the queue's write discipline is visible in
//! the queue code itself.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// The largest file the queue reads (an event record, the high-water mark, a
/// dead-reason or revived sidecar). One event must fit in a request body
/// (`wire::MAX_BODY_BYTES`), so a real record is far smaller; a bigger file
/// is damage or garbage and is never read into memory (a 300 MB file in the
/// queue used to cost the agent 300 MB at start).
pub const MAX_QUEUE_FILE_BYTES: u64 = crate::wire::MAX_BODY_BYTES as u64;

/// Why a file in the queue is not read. Carried inside an
/// [`io::ErrorKind::InvalidData`] error, so the queue treats the file as
/// unreadable (moved to `dead/`) instead of failing its start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeFile {
    #[error("a symbolic link (never followed: the queue holds only regular files)")]
    Symlink,
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("larger than {max} bytes, the queue's file bound")]
    TooLarge { max: u64 },
}

impl From<UnsafeFile> for io::Error {
    fn from(e: UnsafeFile) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The [`UnsafeFile`] inside an error of [`read_regular`], if that is why it failed.
pub fn unsafe_file(e: &io::Error) -> Option<&UnsafeFile> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<UnsafeFile>())
}

/// Reads a regular file of at most `max` bytes, opened without following a
/// symbolic link (`O_NOFOLLOW`) and without blocking on a FIFO
/// (`O_NONBLOCK`); anything else is an [`UnsafeFile`] error.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => return Err(UnsafeFile::Symlink.into()),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() { "a directory" } else { "a device, FIFO or socket" };
        return Err(UnsafeFile::NotRegular(what).into());
    }
    if meta.len() > max {
        return Err(UnsafeFile::TooLarge { max }.into());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow after the stat: read at most one byte past the bound.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(UnsafeFile::TooLarge { max }.into());
    }
    Ok(bytes)
}

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
    /// Reads a whole file; the real one reads only a regular file of at
    /// most [`MAX_QUEUE_FILE_BYTES`], never through a symbolic link.
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
        read_regular(path, MAX_QUEUE_FILE_BYTES)
    }
}
